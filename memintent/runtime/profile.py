"""``memintent profile``: measure the rates the cost model needs and write them as a ``HardwareProfile``.

Why measure: a plan is only as good as its seconds, and the seconds come from five numbers (host link, device
memory, matmul rate, per-op and per-copy overheads, dequantisation) that differ between cards, hosts, PCIe
generations and driver versions, sometimes by 2x from the datasheet. ``compile --hw FILE.json`` then plans for
the machine the profile was measured on.

What is measured (medians of several repetitions after a warm-up; sizes depend on the backend and ``quick``):

* ``h2d_gbps`` / ``d2h_gbps``: copies between pinned host memory and the device at the block sizes that matter
  (CUDA: 64 MiB, 256 MiB, 1 GiB, 2 GiB), issued on a side stream as the runtime's copy engine does and timed with
  CUDA events on that stream; each size is reported, the profile takes the largest size's rate (weight blocks
  of large models are hundreds of MiB). Bytes copied once per copy, 1e9 bytes/s.
* ``hbm_gbps``: a large device-to-device copy, counting bytes read plus bytes written.
* ``bf16_tflops``: one dense bf16 matmul n x n x n (CUDA n = 8192), 2 n^3 floating-point operations.
* ``launch_overhead_s``: wall time per op of a batch of back-to-back tiny ops (an in-place add on one element)
  including the final synchronisation: in a long stream of small kernels this is what each one costs, whether
  the host's launch or the device's kernel turnaround is the limit.
* ``copy_latency_s``: the same for tiny (4 KiB) host-to-device copies on the side stream.
* ``dequant_gbps``: int8 -> bf16 with one scale per row (``dequant_int8_rowscale``), in output bytes per second.
  It calls the runtime's dequantisation kernel (``memintent.runtime.quant.dequantize_int8``: Triton on CUDA when
  importable, else torch), falling back to the same arithmetic in plain torch where that module is absent.
* ``dequant_int4_gbps``: the same for int4g (a scale and a minimum per 32 columns), the runtime's other kernel
  (``memintent.runtime.quant.dequantize_int4g``), which int4 shares.
* ``gemm_shapes``: linear layers of a large model's three shapes (CUDA: 8192 -> 8192, 8192 -> 28672, 28672 -> 8192
  features) in bf16 and f16, applied to 1 ... 16384 tokens: the rate by token count that the cost model
  interpolates for a matmul of that dtype and shape (a decode step's few rows read the whole weight for little
  arithmetic; a matmul into few features splits its work worse than one into many). Each rate is sustained: the
  card is first kept busy for a second (its clocks settle where a prompt step finds them) and each timing spans
  calls back to back for at least 20 ms. ``gemm_tflops`` repeats the bf16 8192 -> 28672 entry (profiles that
  predate the shapes).
* ``attention_tflops`` / ``attention_gbps`` (CUDA with Triton): the paged-attention kernel on 64 query heads over 8
  KV heads of 128, pages of 16 scattered in a pool laid out as the engine's: prompt chunks of 512 tokens after 512
  cached (FLOP/s), and 256 decode tokens over 200 to 1024 keys (bytes of keys and values read per second);
  ``attention_int8_gbps`` the same decodes over int8 pages, ``attention_one_row_gbps`` / ``..._int8_gbps`` 128
  decodes of 56 query heads over 56 KV heads (the kernel's one-row path), bf16 and int8.
* ``hbm_bytes``: the device's total memory (CPU: the machine's physical memory).

On the CPU backend (``device="cpu"``) "host" and "device" are the same memory: the copies are memcpy between
plain tensors and everything is timed with ``time.perf_counter``; sizes are small so it runs in seconds.
No timing here is ever asserted on by tests: the numbers depend on the machine.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import math
import os
import platform
import re
import statistics
from dataclasses import dataclass, field
from time import perf_counter
from typing import Callable

import torch

from memintent.errors import MemintentError
from memintent.ir.dtypes import torch_dtype
from memintent.ir.model import GemmRates, HardwareProfile
from memintent.kv.paged_kernel import build_meta, kv_bytes_read, paged_attention_varlen
from memintent.runtime import mapped, quant
from memintent.runtime.device import sync

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

ProgressFn = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Sizes:
    """The problem sizes of one profiling run."""

    copy_bytes: tuple[int, ...]       # host<->device copy sizes
    device_copy_bytes: int            # device-to-device copy size (bytes copied; read+write counts twice)
    matmul_n: int                     # n of the n x n x n bf16 matmul
    dequant_rows: int
    dequant_cols: int
    repeats: int                      # timed repetitions per measurement (after one warm-up)
    tiny_ops: int                     # ops per batch for launch overhead and copy latency
    # A large model's matmuls (in, out features): attention's square projections, the MLP's up and down; the
    # second is the one ``gemm_tflops`` repeats.
    gemm_shapes: tuple[tuple[int, int], ...] = ((8192, 8192), (8192, 28672), (28672, 8192))
    gemm_tokens: tuple[int, ...] = (1, 16, 64, 256, 1024, 4096, 16384)
    gemm_dtypes: tuple[str, ...] = ("bf16", "f16")


def sizes_for(device: torch.device, quick: bool) -> Sizes:
    if device.type == "cuda":
        if quick:
            return Sizes((64 * MiB, 256 * MiB), 256 * MiB, 4096, 4096, 4096, 3, 200,
                         ((4096, 4096), (4096, 14336), (14336, 4096)), (1, 64, 1024, 8192), ("bf16",))
        return Sizes((64 * MiB, 256 * MiB, 1 * GiB, 2 * GiB), 1 * GiB, 8192, 8192, 8192, 7, 1000)
    # The CPU computes in float32 whatever the weights' dtype; one shape class stands for all.
    if quick:
        return Sizes((256 * KiB, 1 * MiB), 2 * MiB, 128, 256, 256, 3, 50, ((256, 704),), (1, 64, 512), ("bf16",))
    return Sizes((4 * MiB, 16 * MiB, 64 * MiB), 64 * MiB, 512, 1024, 1024, 5, 500, ((512, 1408),),
                 (1, 16, 64, 256, 1024), ("bf16",))


@dataclass(frozen=True, slots=True)
class SizeRate:
    size_bytes: int
    gbps: float                       # median, 1e9 bytes per second
    samples_s: tuple[float, ...]      # the timed repetitions, seconds


@dataclass(slots=True)
class ProfileResult:
    profile: HardwareProfile
    device_name: str
    sizes: Sizes
    h2d: list[SizeRate] = field(default_factory=list)
    d2h: list[SizeRate] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# timing


class _Clock:
    """Times callables on the device: CUDA events recorded on the stream the work runs on (device time), else
    ``perf_counter``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _on(self, stream):
        # Run on ``stream`` (CUDA side stream) or, without one, on the current stream.
        return torch.cuda.stream(stream) if (self.cuda and stream is not None) else contextlib.nullcontext()

    def time_s(self, fn: Callable[[], object], repeats: int, stream=None) -> list[float]:
        """Seconds of each of ``repeats`` calls of ``fn`` after one warm-up call (allocator, kernel selection,
        page faults)."""
        with self._on(stream):
            fn()
        self.sync()
        out = []
        for _ in range(repeats):
            if self.cuda:
                s = stream or torch.cuda.current_stream(self.device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(s):
                    start.record(s)
                    fn()
                    end.record(s)
                end.synchronize()
                out.append(max(start.elapsed_time(end) / 1e3, 1e-9))   # elapsed_time is in milliseconds
            else:
                t = perf_counter()
                fn()
                out.append(max(perf_counter() - t, 1e-9))
        return out

    def wall_per_op_s(self, fn: Callable[[], object], ops: int, repeats: int, stream=None) -> float:
        """Median over ``repeats`` batches of the wall time per op of ``ops`` back-to-back calls plus a sync."""
        with self._on(stream):
            fn()
        self.sync()
        per = []
        for _ in range(repeats):
            t = perf_counter()
            with self._on(stream):
                for _ in range(ops):
                    fn()
            self.sync()
            per.append(max(perf_counter() - t, 1e-9) / ops)
        return statistics.median(per)


# ---------------------------------------------------------------------------------------------------------------
# the measurements


def dequant_kernel_name(device: torch.device) -> str:
    """What ``dequant_int8_rowscale`` runs on ``device``, for the profile's ``source``."""
    triton = device.type == "cuda" and quant.triton_available()
    return f"memintent.runtime.quant.dequantize_int8, {'triton' if triton else 'torch'} path"


def dequant_int8_rowscale(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """int8 ``q`` [rows, cols] with one bf16 ``scale`` per row -> ``out`` (bf16, same shape), in place.

    Calls the runtime's dequantisation kernel (``memintent.runtime.quant.dequantize_int8``), so the profile
    measures what a streamed int8 block costs."""
    return quant.dequantize_int8(q, scale, out)


def measure_dequant_gbps(clock: _Clock, rows: int, cols: int, repeats: int) -> float:
    """int8 unpacking throughput in output (bf16) bytes per second, 1e9 units."""
    dev = clock.device
    q = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, device=dev)
    scale = torch.rand(rows, dtype=torch.bfloat16, device=dev)
    out = torch.empty(rows, cols, dtype=torch.bfloat16, device=dev)
    return rows * cols * 2 / _unpack_s(clock, lambda: dequant_int8_rowscale(q, scale, out), repeats) / 1e9


def measure_dequant_int4_gbps(clock: _Clock, rows: int, cols: int, repeats: int) -> float:
    """int4g unpacking throughput (``memintent.runtime.quant.dequantize_int4g``) in output bytes per second."""
    dev = clock.device
    groups = -(-cols // quant.INT4G_GROUP)
    packed = torch.randint(0, 256, (rows, -(-cols // 2)), dtype=torch.uint8, device=dev)
    scales = torch.rand(rows, groups, dtype=torch.bfloat16, device=dev)
    mins = torch.rand(rows, groups, dtype=torch.bfloat16, device=dev)
    out = torch.empty(rows, cols, dtype=torch.bfloat16, device=dev)
    return rows * cols * 2 / _unpack_s(clock, lambda: quant.dequantize_int4g(packed, scales, mins, out), repeats) / 1e9


def _unpack_s(clock: _Clock, fn: Callable[[], object], repeats: int) -> float:
    """Seconds per unpacking, back to back as a step's unpacks run among its kernels. One call timed alone also
    times the host's launch of it: on the H200 (H50) that read 1444 / 1473 GB/s for int8 / int4g at 8192 x 8192,
    where the kernels run at 2.5-2.9 TB/s."""
    return _sustained_s(clock, fn, repeats, 0.02 if clock.cuda else 0.0)


def _host_buffer(n: int, cuda: bool) -> torch.Tensor:
    # Pinned (page-locked) host memory is what the runtime's host store uses and what lets copies run async.
    return torch.empty(n, dtype=torch.uint8, pin_memory=cuda)


def measure_copies(clock: _Clock, sizes_bytes: tuple[int, ...], repeats: int, say: ProgressFn
                   ) -> tuple[list[SizeRate], list[SizeRate]]:
    """Host->device and device->host rates per size, timed on a side stream (one pair of buffers, sliced)."""
    cuda = clock.cuda
    top = max(sizes_bytes)
    host = _host_buffer(top, cuda)
    host.fill_(1)                      # touch every page so the first timed copy does not pay page faults
    dev = torch.empty(top, dtype=torch.uint8, device=clock.device)
    dev.fill_(2)
    stream = torch.cuda.Stream(clock.device) if cuda else None
    clock.sync()
    h2d, d2h = [], []
    for n in sizes_bytes:
        say(f"host -> device copies of {_fmt_size(n)}")
        h, d = host[:n], dev[:n]
        t = clock.time_s(lambda: d.copy_(h, non_blocking=cuda), repeats, stream)
        h2d.append(SizeRate(n, n / statistics.median(t) / 1e9, tuple(t)))
        say(f"device -> host copies of {_fmt_size(n)}")
        t = clock.time_s(lambda: h.copy_(d, non_blocking=cuda), repeats, stream)
        d2h.append(SizeRate(n, n / statistics.median(t) / 1e9, tuple(t)))
    del host, dev
    return h2d, d2h


def measure_h2d_gbps(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Pinned host -> device bandwidth (1e9 bytes/s) of one size, median of ``repeats`` timed copies after a
    warm-up, on the current stream: the floor ``run``, ``generate`` and the benchmarks compare against. On the CPU
    backend a plain memcpy between host tensors (at most 64 MiB)."""
    device = torch.device(device)
    clock = _Clock(device)
    if not clock.cuda:
        nbytes = min(nbytes, 64 << 20)
    src = _host_buffer(nbytes, clock.cuda)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    t = clock.time_s(lambda: dst.copy_(src, non_blocking=clock.cuda), repeats)
    return nbytes / statistics.median(t) / 1e9


def measure_mapped_gbps(clock: _Clock, rows: int, cols: int, repeats: int) -> float:
    """The rate at which the mapped linear kernel (``runtime.mapped``) reads an int8 (rows, cols) matrix in place
    from pinned host memory, for 64 rows of x, in link bytes per second, 1e9 units (the CPU: its torch path)."""
    q = torch.zeros(rows, cols, dtype=torch.int8, pin_memory=clock.cuda)
    scale = torch.ones(rows, dtype=torch.bfloat16, pin_memory=clock.cuda)
    x = torch.zeros(64, cols, dtype=torch.bfloat16, device=clock.device)
    t = clock.time_s(lambda: mapped.mapped_linear(x, q, scale), repeats)
    return (q.numel() + 2 * scale.numel()) / statistics.median(t) / 1e9


def measure_copy_latency_s(clock: _Clock, ops: int, repeats: int) -> float:
    cuda = clock.cuda
    host = _host_buffer(4 * KiB, cuda)
    dev = torch.empty(4 * KiB, dtype=torch.uint8, device=clock.device)
    stream = torch.cuda.Stream(clock.device) if cuda else None
    return clock.wall_per_op_s(lambda: dev.copy_(host, non_blocking=cuda), ops, repeats, stream)


def measure_device_gbps(clock: _Clock, nbytes: int, repeats: int) -> float:
    """Device memory bandwidth from a device-to-device copy: bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=clock.device)
    src.fill_(3)
    dst = torch.empty_like(src)
    t = clock.time_s(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / statistics.median(t) / 1e9


def measure_matmul_tflops(clock: _Clock, n: int, repeats: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=clock.device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=clock.device)
    out = torch.empty(n, n, dtype=torch.bfloat16, device=clock.device)
    t = clock.time_s(lambda: torch.matmul(a, b, out=out), repeats)
    return 2 * n**3 / statistics.median(t) / 1e12


def _sustained_s(clock: _Clock, fn: Callable[[], object], repeats: int, span_s: float) -> float:
    """Seconds per call of ``fn`` run back to back: each timing spans enough calls to last ``span_s``."""
    one = statistics.median(clock.time_s(fn, 2))
    n = max(1, math.ceil(span_s / one))

    def calls() -> None:
        for _ in range(n):
            fn()

    return statistics.median(clock.time_s(calls, repeats)) / n


def measure_gemm_rates(clock: _Clock, sz: Sizes, repeats: int, say: ProgressFn) -> list[GemmRates]:
    """A ``GemmRates`` per (dtype, shape) of ``sz``: a linear layer of (in, out) features applied to each token
    count, sustained (see the module docstring); a decode step's few rows run far below the card's peak."""
    dev, out = clock.device, []
    if clock.cuda:   # a second of the largest matmul first: the clocks settle where a long prompt step finds them
        k, n = sz.gemm_shapes[0]
        w = torch.randn(n, k, dtype=torch.bfloat16, device=dev)                     # (out, in)
        x = torch.randn(max(sz.gemm_tokens), k, dtype=torch.bfloat16, device=dev)   # (tokens, in)
        _sustained_s(clock, lambda: torch.nn.functional.linear(x, w), 1, 1.0)
        del w, x
    for dtype in sz.gemm_dtypes:
        tdtype = torch_dtype(dtype)
        for k, n in sz.gemm_shapes:
            say(f"{dtype} linear {k} -> {n} by tokens")
            w = torch.randn(n, k, dtype=tdtype, device=dev) * 0.02                   # (out, in)
            rates = []
            for m in sz.gemm_tokens:
                x = torch.randn(m, k, dtype=tdtype, device=dev)                     # (tokens, in)
                t = _sustained_s(clock, lambda x=x, w=w: torch.nn.functional.linear(x, w), repeats,
                                 0.02 if clock.cuda else 0.0)
                rates.append((m, float(f"{2 * m * k * n / t / 1e12:.4g}")))
            out.append(GemmRates(dtype=dtype, in_features=k, out_features=n, tflops=rates))
    return out


@dataclass(frozen=True)
class AttentionRates:
    """The paged-attention kernel's rates (``HardwareProfile.attention_*``)."""

    tflops: float = 0.0                  # prompt chunks
    gbps: float = 0.0                    # decode tokens, grouped query heads, pages in the model dtype
    int8_gbps: float = 0.0               # the same over int8 pages (bytes as stored, scales included)
    one_row_gbps: float = 0.0            # decode tokens of one query head per KV head
    one_row_int8_gbps: float = 0.0


def _attention_timer(clock: _Clock, repeats: int, heads: int, kvh: int, pages: int, int8: bool):
    """A function (query tokens, contexts) -> median seconds of the paged-attention kernel over a pool laid out as
    the engine's (a page holds every layer: strided views of one layer), ``heads`` query heads over ``kvh`` KV heads
    of 128, pages of 16 scattered over the pool, int8 pages (with float32 scales) or bf16."""
    dev, pt, hd = clock.device, 16, 128
    shape = (pages, 2, 2, pt, kvh, hd)                                              # (P, layers, k|v, pt, KV, hd)
    scales = None
    if int8:   # the kernel's time does not depend on the values: random ones, no quantization pass
        pool = torch.randint(-127, 128, shape, dtype=torch.int8, device=dev)
        scales = torch.rand(shape[:-1], device=dev) / 127                             # (P, layers, k|v, pt, KV) f32
    else:
        pool = torch.randn(shape, dtype=torch.bfloat16, device=dev)
    kp, vp = pool[:, 1, 0], pool[:, 1, 1]                                            # layer 1: strided views
    ks, vs = (scales[:, 1, 0], scales[:, 1, 1]) if int8 else (None, None)
    perm = torch.randperm(pages - 1).add(1).tolist()                                # scattered pages, not page 0

    def time_s(lengths: list[int], contexts: list[int]) -> float:
        tables, at = [], 0
        for c in contexts:
            n = -(-c // pt)
            tables.append(perm[at:at + n])
            at += n
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        meta = build_meta(starts, lengths, contexts, tables, page_tokens=pt, group=heads // kvh, device=dev)
        q = torch.randn(sum(lengths), heads, hd, dtype=torch.bfloat16, device=dev)   # (T, H, hd)
        return statistics.median(clock.time_s(lambda: paged_attention_varlen(q, kp, vp, ks, vs, meta,
                                                                             scale=hd ** -0.5), repeats))
    return time_s


def measure_attention(clock: _Clock, repeats: int) -> AttentionRates:
    """The paged-attention kernel (``kv.paged_kernel``): FLOP/s on prompt chunks, and bytes of keys and values read
    per second by decode tokens on each of its paths: 64 query heads over 8 KV heads (a 70B-class layer) and 56 over
    56 (one query head per KV head, an OPT-30B-class layer), pages in bf16 and int8."""
    rates = {}
    for name, heads, kvh, seqs in (("", 64, 8, 256), ("one_row_", 56, 56, 128)):
        # Decodes of 200..1024 keys, a serving step's batch: 256 grouped (0.64 GB; 64 of them ran at half the rate on
        # an H200, bound by the kernel's latency rather than its bytes), 128 one-row (2.2 GB: with 64 of 32 heads the
        # longest contexts' programs ran alone at the end, 2.6 TB/s where 64 steady ones read 4.1, H28).
        contexts = [200 + (824 * i) // (seqs - 1) for i in range(seqs)]
        pages = sum(-(-c // 16) for c in contexts) + 1        # more than the prompt chunks' 8 x 64
        for int8 in (False, True):
            time_s = _attention_timer(clock, repeats, heads, kvh, pages, int8)
            t = time_s([1] * seqs, contexts)
            rates[f"{name}{'int8_' if int8 else ''}gbps"] = kv_bytes_read(contexts, kvh, 128, 1 if int8 else 2,
                                                                         int8) / t / 1e9
            if not name and not int8:
                prompt = [512] * 8
                t = time_s(prompt, [1024] * 8)                 # chunks of 512 after 512 cached
                rates["tflops"] = 4 * heads * 128 * sum(n * (1024 - n) + n * (n + 1) // 2 for n in prompt) / t / 1e12
            del time_s
            if clock.cuda:
                torch.cuda.empty_cache()
    return AttentionRates(**rates)


def measure_launch_overhead_s(clock: _Clock, ops: int, repeats: int) -> float:
    x = torch.zeros(1, device=clock.device)
    return clock.wall_per_op_s(lambda: x.add_(1), ops, repeats)


# ---------------------------------------------------------------------------------------------------------------
# the whole profile


def resolve_device(spec: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; None: CUDA when present, else the CPU."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise MemintentError(f"--device {spec!r} is not a device: use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MemintentError(f"--device {spec}: CUDA is not available here (torch {torch.__version__}); "
                                 "use --device cpu")
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        if idx >= torch.cuda.device_count():
            raise MemintentError(f"--device {spec}: there are {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", idx)
    if dev.type != "cpu":
        raise MemintentError(f"--device {spec!r}: profile measures cpu or cuda devices only")
    return dev


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _physical_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 16 * GiB                  # unknown: the built-in CPU profile's figure


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def legacy_gemm(rates: list[GemmRates], sz: Sizes) -> list[tuple[float, float]]:
    """``gemm_tflops``: the bf16 rates of the MLP's up projection (the shape profiles measured before the others)."""
    k, n = sz.gemm_shapes[1] if len(sz.gemm_shapes) > 1 else sz.gemm_shapes[0]
    return next(g.tflops for g in rates if (g.dtype, g.in_features, g.out_features) == ("bf16", k, n))


def _fmt_size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n / MiB:g} MiB"


def profile_device(device: str | None = None, quick: bool = False, progress: ProgressFn | None = None
                   ) -> ProfileResult:
    """Measure ``device`` and return the profile with the per-size copy rates it was derived from."""
    say = progress or (lambda msg: None)
    dev = resolve_device(device)
    clock = _Clock(dev)
    sz = sizes_for(dev, quick)
    if clock.cuda:
        torch.cuda.set_device(dev)
        name = torch.cuda.get_device_name(dev)
        total_bytes = torch.cuda.get_device_properties(dev).total_memory
        threads = ""
    else:
        name = _cpu_name()
        total_bytes = _physical_memory_bytes()
        threads = f", {torch.get_num_threads()} threads"
    try:
        h2d, d2h = measure_copies(clock, sz.copy_bytes, sz.repeats, say)
        say("tiny host -> device copies (per-copy latency)")
        copy_latency_s = measure_copy_latency_s(clock, sz.tiny_ops, sz.repeats)
        say(f"device-to-device copy of {_fmt_size(sz.device_copy_bytes)}")
        dev_gbps = measure_device_gbps(clock, sz.device_copy_bytes, sz.repeats)
        say(f"bf16 matmul {sz.matmul_n}^3")
        tflops = measure_matmul_tflops(clock, sz.matmul_n, sz.repeats)
        say("tiny ops (launch overhead)")
        launch_s = measure_launch_overhead_s(clock, sz.tiny_ops, sz.repeats)
        say(f"int8 -> bf16 dequantisation {sz.dequant_rows}x{sz.dequant_cols}")
        deq_gbps = measure_dequant_gbps(clock, sz.dequant_rows, sz.dequant_cols, sz.repeats)
        say(f"int4g -> bf16 dequantisation {sz.dequant_rows}x{sz.dequant_cols}")
        deq4_gbps = measure_dequant_int4_gbps(clock, sz.dequant_rows, sz.dequant_cols, sz.repeats)
        say(f"int8 matrix {sz.dequant_rows}x{sz.dequant_cols} read in place from pinned host memory")
        mapped_gbps = measure_mapped_gbps(clock, sz.dequant_rows, sz.dequant_cols, sz.repeats)
        attn = AttentionRates()
        if clock.cuda and quant.triton_available():
            # Before the matmuls: a decode's attention runs between matmuls at HBM speed, not on a card that a
            # second of full-power matmuls has clocked down.
            say("paged attention kernel (prompt chunks, decode)")
            attn = measure_attention(clock, sz.repeats)
        gemm = measure_gemm_rates(clock, sz, sz.repeats, say)
    except (torch.cuda.OutOfMemoryError, MemoryError) as e:
        first = (str(e).splitlines() or ["out of memory"])[0]
        raise MemintentError(f"profiling ran out of memory on {name}: {first}; free the device or try --quick") \
            from None
    finally:
        if clock.cuda:
            torch.cuda.empty_cache()
    date = _dt.date.today().isoformat()
    rates = lambda xs: ", ".join(f"{_fmt_size(r.size_bytes)} {r.gbps:.2f}" for r in xs)  # noqa: E731
    where = "pinned host memory, side stream, CUDA events" if clock.cuda else "memcpy between plain tensors"
    source = (f"measured on {name} {date} by memintent profile (torch {torch.__version__}); "
              f"{'quick; ' if quick else ''}copies ({where}) GB/s by size: h2d {rates(h2d)}; d2h {rates(d2h)}; "
              f"device copy {_fmt_size(sz.device_copy_bytes)}; matmul {sz.matmul_n}^3 bf16; dequant int8 and int4g->bf16 "
              f"{sz.dequant_rows}x{sz.dequant_cols} ({dequant_kernel_name(dev)}){threads}")
    profile = HardwareProfile(
        name=_slug(name) if clock.cuda else f"cpu-{_slug(name)}",
        source=source,
        # The largest block size: weight blocks of the models worth streaming are large.
        h2d_gbps=h2d[-1].gbps, d2h_gbps=d2h[-1].gbps,
        hbm_gbps=dev_gbps, bf16_tflops=tflops, hbm_bytes=int(total_bytes),
        launch_overhead_s=launch_s, copy_latency_s=copy_latency_s, dequant_gbps=deq_gbps, dequant_int4_gbps=deq4_gbps,
        mapped_gbps=mapped_gbps,
        # Kernel scratch: the default cuBLAS workspace reservation on CUDA; the CPU backend reserves none.
        # cuBLAS workspace (32 MiB) plus the caching allocator's rounding, which W1 showed at 2 MiB on an H100
        workspace_bytes=(36 << 20) if clock.cuda else 0,
        attention="kernel" if clock.cuda else "reference",
        gemm_tflops=legacy_gemm(gemm, sz), gemm_shapes=gemm, attention_tflops=attn.tflops, attention_gbps=attn.gbps,
        attention_int8_gbps=attn.int8_gbps, attention_one_row_gbps=attn.one_row_gbps,
        attention_one_row_int8_gbps=attn.one_row_int8_gbps,
    )
    return ProfileResult(profile=profile, device_name=name, sizes=sz, h2d=h2d, d2h=d2h)



# Timing of whole forwards (the run command and the benchmarks)


def time_forward(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``repeats`` after one warm-up, and its last output."""
    out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = perf_counter()
        out = fn()
        sync(device)
        times.append(perf_counter() - t)
    return statistics.median(times), out


def time_back_to_back(fn, device: torch.device, repeats: int) -> tuple[float, list[float], object]:
    """Steady-state seconds per forward: ``repeats`` forwards back to back after two warm-ups, divided by the wall
    time until the device is idle. Between forwards only the host waits for nothing: a full device sync there would
    also wait for the next forward's prefetch and leave the copy engine idle at every forward boundary, which no
    serving loop does. Returns (seconds per forward, per-forward host-visible times, last output)."""
    out = fn()
    out = fn()
    sync(device)
    ts = []
    t0 = perf_counter()
    for _ in range(repeats):
        t = perf_counter()
        out = fn()
        ts.append(perf_counter() - t)
    sync(device)
    return (perf_counter() - t0) / repeats, ts, out
