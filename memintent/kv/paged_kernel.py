"""One attention call per layer per engine step, reading keys and values in place from the paged KV pool.

``paged_attention_varlen`` computes, for every query token of a step (prompt chunks and decode tokens of many
sequences together, packed into ``q (T, H, hd)``), causal attention over its own sequence's keys, read through the
sequence's page table straight from one layer's pages of the pool (no gather copy). It is a Triton kernel:

- a program per (query tile, KV head, key split) handles the ``G = H / KV`` query heads that share the KV head
  together: its score tile has ``BLOCK_M * G`` rows (query token major, padded to a power of two >= 16 for
  ``tl.dot``), so grouped-query heads read each key once and never repeat it; a tile of one row (the decode of a
  model with as many KV heads as query heads) takes the tensor cores too (15 rows of padding cost nothing in a
  step bound by reading keys, and Triton pipelines the loads that feed a dot: 1.4 x faster on an H200), except over
  int8 pages, where its products on the CUDA cores are faster (``KernelConfig``); its programs are launched heads
  first, so the heads of one sequence read neighbouring bytes of each page together;
- it walks the sequence's keys ``BLOCK_N`` at a time (several pages: each key's page comes from the page table),
  with an online softmax in float32 (base 2), causal and sliding-window masks from positions, and logit
  soft-capping (``softcap * tanh(logit / softcap)``) before the mask;
- int8 KV is dequantized in registers: the int8 values are exact in bf16/f16 and go to the tensor cores as they
  are; a key's float32 scale multiplies its column of scores after the first dot, a value's scale multiplies its
  softmax weight before the second (one rounding to the model dtype, where dequantizing first would round the
  product value x scale too, and hold a whole (keys, head_dim) tile in float32);
- decode tiles (one query token) and prompt tiles (up to ``BLOCK_M`` consecutive tokens of one chunk) are two
  launches of the same kernel with different row counts; decode tiles may split each sequence's keys over several
  programs (flash decoding) when too few (sequence, KV head) pairs would fill the GPU, and a second small kernel
  merges the splits. So one call is two to three launches whatever the mix of sequences.

The metadata (``PagedMeta``: tiles, page table, sequence lengths; int32) is built once per step on the host from
plain lists by ``build_meta``, copied to the device in one non-blocking copy from pinned staging, and shared by
every layer. Its sizes are rounded up to buckets (powers of two) and padded tiles are no-ops, so a CUDA graph
captured for one bucket replays for every step of that bucket (``MetaStaging`` keeps one device buffer per bucket:
the same addresses each step). Everything the kernel launches depends only on the tensors' shapes.

``paged_attention_reference`` is the same computation in plain PyTorch (float64 by default), for tests.

Why the layout of a program: a page holds ``page_tokens`` tokens x KV heads x head_dim, with the head dim
contiguous; one (page, KV head) is ``page_tokens`` rows of ``head_dim`` contiguous elements (256 bytes at hd 128
bf16), which the loads take as whole 16-byte vectors (the pool's strides are multiples of 16 elements).
"""

from __future__ import annotations

import array
import functools
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from memintent.accounting import host_side
from memintent.errors import MemintentError

TILE_FIELDS = 4                  # a tile: [sequence row, first query token in q, query tokens, first query position]
PROMPT_ROWS = 64                 # score-tile rows of a prompt tile: BLOCK_M = PROMPT_ROWS // G query tokens
MIN_ROWS = 16                    # tl.dot wants at least 16 rows
MIN_SPLIT_KEYS = 256             # a decode split reads at least this many keys (fewer would not pay the merge)
MAX_SPLITS = 16
SPLIT_PROGRAMS_PER_SM = 2        # split decode keys until this many programs per SM (when the keys allow)
DESIGN_SMS = 132                 # H200; the split rule's SM count where no CUDA device answers (the interpreter)
MAX_PLANNED_SMS = 4 * DESIGN_SMS  # the split rule counts at most this many SMs: the plan bounds the splits' scratch


@dataclass(frozen=True, slots=True)
class MetaSizes:
    """The padded sizes of a step's metadata: a CUDA graph captured for one ``MetaSizes`` replays for any step that
    fits it."""

    decode_tiles: int
    prompt_tiles: int
    seqs: int
    pages: int                   # page-table width

    @property
    def ints(self) -> int:
        return TILE_FIELDS * (self.decode_tiles + self.prompt_tiles) + self.seqs * (self.pages + 1)


@dataclass(frozen=True, slots=True)
class PagedMeta:
    """What a step's attention needs, int32 device tensors shared by every layer (views of one buffer).

    A tile's queries are ``n`` consecutive tokens of q, from ``q_start``, at positions ``pos0 .. pos0 + n - 1`` of
    sequence ``row``; a query at position p sees keys 0..p of its sequence (and, with a window w, only those > p - w).
    Padded tiles are all zero (no queries): no-ops."""

    decode_tiles: torch.Tensor   # (sizes.decode_tiles, 4) int32: tiles of one query token
    prompt_tiles: torch.Tensor   # (sizes.prompt_tiles, 4) int32: tiles of up to prompt_block_m query tokens
    page_table: torch.Tensor     # (sizes.seqs, sizes.pages) int32, padded with page 0 (the null page)
    seq_lens: torch.Tensor       # (sizes.seqs,) int32: keys of each sequence once this step's keys are written
    prompt_block_m: int          # query tokens per prompt tile
    group: int                   # query heads per KV head it was built for (prompt tiles have block_m * group rows)
    page_tokens: int
    sizes: MetaSizes


@dataclass(frozen=True, slots=True)
class KernelConfig:
    """Launch parameters (tuning, not semantics): keys per iteration, warps and pipeline stages of each tile kind,
    and the decode key splits (``None``: ``decode_splits`` decides from the shapes)."""

    block_n: int = 32                   # prompt tiles: H31 (H200), 32 keys an iteration beat 64 and 128 by 9-17 %
    num_warps: int = 4
    num_stages: int = 2
    decode_block_n: int = 64
    decode_warps: int | None = None     # None: ``ONE_ROW_INT8_WARPS`` for one-row tiles over int8 pages, else 4
    decode_stages: int = 2
    decode_splits: int | None = None
    # Decode tiles of G = 1 (one score row): on the tensor cores as a 16-row tile (15 rows padding) or on the CUDA
    # cores. None: tensor cores over pages in the model dtype, CUDA cores over int8 pages (H27, H200, 64 decodes of
    # 530 keys over 56 heads: bf16 0.24 ms vs 0.34, int8 0.40 ms vs 0.21 with 2 warps).
    decode_dot: bool | None = None
    # Launch a one-row decode tile's KV heads side by side: they read neighbouring bytes of each page (H27: 1-4 %).
    heads_fastest: bool = True
    # Walk the keys every row of a tile sees (up to its first query's position) without the causal mask, then the
    # rest with it: prompt tiles (``split_mask``: H31, 0-12 % faster) and decode tiles (``decode_split_mask``: no
    # faster, one key block in ~30 is masked anyway).
    split_mask: bool = True
    decode_split_mask: bool = False


ONE_ROW_INT8_WARPS = 2


DEFAULT_CONFIG = KernelConfig()


# ---- metadata ---------------------------------------------------------------------------------------------------

def bucket(n: int) -> int:
    """The padded size of ``n`` things: 0, or the next power of two."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def buckets(n: int) -> list[int]:
    """Every padded size of 1 .. ``n`` things: powers of two up to ``bucket(n)``. A step's decode tiles pad to one
    of them, and the engine captures a decode graph for each."""
    return [1 << i for i in range(bucket(max(n, 1)).bit_length())]


def prompt_block_m(group: int, prompt_rows: int = PROMPT_ROWS) -> int:
    """Query tokens per prompt tile when ``group`` query heads share a KV head."""
    return max(1, prompt_rows // group)


def _tiles(starts: Sequence[int], lengths: Sequence[int], contexts: Sequence[int],
           block_m: int) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]:
    """Decode tiles (chunks of one token) and prompt tiles (the rest, ``block_m`` tokens at a time), each list
    longest context first, so the programs that read the most keys start first (the tail is shorter)."""
    decode, prompt = [], []
    for row, (start, n, ctx) in enumerate(zip(starts, lengths, contexts)):
        pos0 = ctx - n
        if n == 1:
            decode.append((row, start, 1, pos0))
        else:
            prompt.extend((row, start + j, min(block_m, n - j), pos0 + j) for j in range(0, n, block_m))
    decode.sort(key=lambda t: -(t[3] + t[2]))
    prompt.sort(key=lambda t: -(t[3] + t[2]))
    return decode, prompt


def _check_chunks(starts, lengths, contexts, page_tables, page_tokens: int) -> None:
    if not len(starts) == len(lengths) == len(contexts) == len(page_tables):
        raise MemintentError(f"build_meta: {len(starts)} starts, {len(lengths)} lengths, {len(contexts)} contexts "
                             f"and {len(page_tables)} page tables: give one of each per sequence of the step")
    for i, (n, ctx, table) in enumerate(zip(lengths, contexts, page_tables)):
        if not 1 <= n <= ctx:
            raise MemintentError(f"build_meta: sequence {i} has {n} query tokens and a context of {ctx}: a chunk "
                                 "has 1..context tokens (the context counts this step's keys)")
        if len(table) * page_tokens < ctx:
            raise MemintentError(f"build_meta: sequence {i} has {ctx} keys but {len(table)} pages of {page_tokens}")


def _check_sizes(sizes: MetaSizes, need: MetaSizes) -> None:
    for name in MetaSizes.__slots__:
        if getattr(sizes, name) < getattr(need, name):
            raise MemintentError(f"build_meta: the step needs {getattr(need, name)} {name} but sizes allow "
                                 f"{getattr(sizes, name)}: use a larger bucket")


# array.array's typecode of each staged dtype: the signed integer of its width (C's int and long long on the usual
# platforms), and C's float for the sampler's float32 parameters
_TYPECODES = {t: next(c for c in "ilq" if array.array(c).itemsize == t.itemsize) for t in (torch.int32, torch.int64)}
_TYPECODES[torch.float32] = "f"
HOST_READ_BLOCK = 1024           # elements per program of ``_host_read_kernel``


@functools.lru_cache(maxsize=None)
def _host_read_kernel():
    """The kernel ``MetaStaging`` uploads with on CUDA (None without Triton): it loads pinned host memory in place."""
    try:
        import triton  # deferred: heavy, optional
        import triton.language as tl  # deferred: heavy, optional
    except ImportError:
        return None

    # n is each upload's own length: specialized on, a length that turns a multiple of 16 would compile a variant
    @triton.jit(do_not_specialize=["n"])
    def read_host(SRC, DST, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        tl.store(DST + i, tl.load(SRC + i, mask=ok), mask=ok)

    return read_host


class MetaStaging:
    """Where a step's metadata goes on its way to the device: two pinned host buffers used in turn (the one being
    refilled waits for its previous upload, two uploads back, to finish) and one device buffer per key (``MetaSizes``,
    or the caller's own: the engine stages its token ids the same way, in int64; the sampler its rows' parameters).

    On CUDA a kernel on the current stream loads the pinned buffer in place (``_host_read_kernel``) rather than a
    copy: copies to the device all queue on one copy engine, where this small one would wait behind the weight
    copy in flight (up to its 8-20 ms), and the step's compute, which reads the metadata first, with it (H70, H72).

    The device buffer is reused: a meta built with the same sizes overwrites the previous one's tensors (in stream
    order, so a step's kernels read their own metadata), and a CUDA graph captured against it sees each new step."""

    def __init__(self, device: torch.device | str, dtype: torch.dtype = torch.int32):
        self.device, self.dtype = torch.device(device), dtype
        self._pin = self.device.type == "cuda"
        self._host: list[torch.Tensor | None] = [None, None]
        self._copied: list[object | None] = [None, None]   # the event after each host buffer's last copy
        self._turn = 0
        self._device: dict[MetaSizes, torch.Tensor] = {}

    def _host_buffer(self, n: int) -> torch.Tensor:
        i = self._turn
        if self._copied[i] is not None:
            self._copied[i].synchronize()
        buf = self._host[i]
        if buf is None or buf.numel() < n:
            with host_side():      # pinned host memory on a GPU: not the device's
                buf = torch.empty(max(n, 1024), dtype=self.dtype, pin_memory=self._pin)
            self._host[i] = buf
        return buf

    def upload(self, flat: list[int] | list[float] | torch.Tensor, key) -> torch.Tensor:
        """``flat`` (a list, or a host tensor of this staging's dtype, flattened) -> the device buffer of ``key``
        (``MetaSizes``: ``sizes.ints`` ints): one upload. A key's buffer keeps its address while its length does."""
        n = flat.numel() if isinstance(flat, torch.Tensor) else len(flat)
        host = self._host_buffer(n)
        if isinstance(flat, torch.Tensor):
            host[:n].copy_(flat.reshape(-1))
        elif n:
            # Through array.array: 5 x faster than torch.tensor(list) (50 us for the 4400 integers of a 64-sequence
            # decode step's metadata where torch.tensor took 260: host time every step waits for).
            host[:n].copy_(torch.frombuffer(array.array(_TYPECODES[self.dtype], flat), dtype=self.dtype))
        dev = self._device.get(key)
        if dev is None or dev.numel() != n:
            dev = self._device[key] = torch.empty(n, dtype=self.dtype, device=self.device)
        kernel = _host_read_kernel() if self._pin else None
        if kernel is None or not n:
            dev.copy_(host[:n], non_blocking=self._pin)
        else:
            kernel[(-(-n // HOST_READ_BLOCK),)](host, dev, n, BLOCK=HOST_READ_BLOCK)
        if self._pin:
            ev = torch.cuda.Event()
            ev.record()
            self._copied[self._turn] = ev
        self._turn ^= 1
        return dev


def warm_uploads(device: torch.device) -> None:
    """Compile the upload kernel's variant for each dtype a staging holds (the engine's int32 and int64, the
    sampler's float32) before a run: Triton compiles one on its first launch, which inside a step costs up to a
    second. Nothing to do off CUDA."""
    if torch.device(device).type != "cuda":
        return
    for dtype in (torch.int32, torch.int64, torch.float32):
        MetaStaging(device, dtype).upload(torch.zeros(1, dtype=dtype), "warm")


def build_meta(starts: Sequence[int], lengths: Sequence[int], contexts: Sequence[int],
               page_tables: Sequence[Sequence[int]], *, page_tokens: int, group: int,
               device: torch.device | str, staging: MetaStaging | None = None, sizes: MetaSizes | None = None,
               prompt_rows: int = PROMPT_ROWS) -> PagedMeta:
    """A step's attention metadata from plain lists, one entry per sequence of the step (its row in the page table):
    ``starts[i]``: index in q of its first query token; ``lengths[i]``: its query tokens this step (1 for a decode);
    ``contexts[i]``: its keys once this step's are written (its queries sit at positions context - length ..
    context - 1); ``page_tables[i]``: its pages, in order. ``group``: query heads per KV head (sets the prompt
    tiles' token count). ``sizes``: the padded sizes (a CUDA graph's bucket); default: each rounded up to a power of
    two. ``staging``: the engine's ``MetaStaging`` (default: a fresh one, fine for tests)."""
    flat, sizes = meta_ints(starts, lengths, contexts, page_tables, page_tokens=page_tokens, group=group,
                            sizes=sizes, prompt_rows=prompt_rows)
    buf = (staging or MetaStaging(device)).upload(flat, sizes)   # (sizes.ints,) int32
    nd, np_ = TILE_FIELDS * sizes.decode_tiles, TILE_FIELDS * sizes.prompt_tiles
    nt = sizes.seqs * sizes.pages
    return PagedMeta(decode_tiles=buf[:nd].view(sizes.decode_tiles, TILE_FIELDS),
                     prompt_tiles=buf[nd:nd + np_].view(sizes.prompt_tiles, TILE_FIELDS),
                     page_table=buf[nd + np_:nd + np_ + nt].view(sizes.seqs, sizes.pages),
                     seq_lens=buf[nd + np_ + nt:nd + np_ + nt + sizes.seqs],
                     prompt_block_m=prompt_block_m(group, prompt_rows), group=group, page_tokens=page_tokens,
                     sizes=sizes)


def meta_ints(starts: Sequence[int], lengths: Sequence[int], contexts: Sequence[int],
              page_tables: Sequence[Sequence[int]], *, page_tokens: int, group: int, sizes: MetaSizes | None = None,
              prompt_rows: int = PROMPT_ROWS) -> tuple[list[int], MetaSizes]:
    """``build_meta``'s integers, in the order its device buffer holds them, and their padded sizes: what a CUDA
    graph's replay needs uploaded into the buffer it was captured with (its views of it do not change)."""
    _check_chunks(starts, lengths, contexts, page_tables, page_tokens)
    decode, prompt = _tiles(starts, lengths, contexts, prompt_block_m(group, prompt_rows))
    need = MetaSizes(len(decode), len(prompt), len(page_tables), max((len(t) for t in page_tables), default=0))
    if sizes is None:
        sizes = MetaSizes(*(bucket(getattr(need, f)) for f in MetaSizes.__slots__))
    _check_sizes(sizes, need)
    flat: list[int] = []
    for tiles, padded in ((decode, sizes.decode_tiles), (prompt, sizes.prompt_tiles)):
        for t in tiles:
            flat.extend(t)
        flat.extend([0] * (TILE_FIELDS * (padded - len(tiles))))
    for table in page_tables:
        flat.extend(table)
        flat.extend([0] * (sizes.pages - len(table)))
    flat.extend([0] * (sizes.pages * (sizes.seqs - len(page_tables))))
    flat.extend(contexts)
    flat.extend([0] * (sizes.seqs - len(contexts)))
    return flat, sizes


# ---- the kernels ------------------------------------------------------------------------------------------------

def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1: the CPU tests)."""
    import triton  # deferred: heavy, optional

    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.lru_cache(maxsize=None)
def _kernels(interpret: bool):
    """The two Triton kernels, compiled (or interpreted) per ``interpret``: the flag is read when ``triton.jit``
    wraps a function, so they are wrapped on first use and once per mode."""
    del interpret   # the cache key: triton.jit below reads the same flag
    import triton  # deferred: heavy, optional
    import triton.language as tl  # deferred: heavy, optional

    # Per-step integers and metadata pointers are not specialized on: Triton would compile a new variant when a
    # step's tile count or page-table width turns 1 or a multiple of 16, or a metadata slice's address loses
    # 16-byte alignment: a compile (0.3-1 s) inside a step that takes milliseconds.
    @triton.jit(do_not_specialize=["n_tiles", "s_table"], do_not_specialize_on_alignment=["TILES", "TABLE", "LENS"])
    def attend(Q, K, V, KS, VS, O, PO, PML, TILES, TABLE, LENS,
               sq_t, sq_h, sk_p, sk_t, sk_h, sv_p, sv_t, sv_h, sks_p, sks_t, sks_h, svs_p, svs_t, svs_h,
               so_t, so_h, s_table, n_tiles, heads, scale, softcap, window,
               G: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
               HEAD_DIM: tl.constexpr, HD: tl.constexpr, PAGE: tl.constexpr, QUANT: tl.constexpr,
               SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, SPLITS: tl.constexpr, DOT_F32: tl.constexpr,
               PRECISION: tl.constexpr, USE_DOT: tl.constexpr, HEADS_FIRST: tl.constexpr, SPLIT_MASK: tl.constexpr):
        # One program: a tile's queries x the G query heads of one KV head (pid0 and pid1, in the order
        # HEADS_FIRST says), over key split pid2.
        if HEADS_FIRST:
            tile = tl.program_id(1)
            kvh = tl.program_id(0)
        else:
            tile = tl.program_id(0)
            kvh = tl.program_id(1)
        split = tl.program_id(2)
        seq = tl.load(TILES + tile * 4)
        q0 = tl.load(TILES + tile * 4 + 1)
        nq = tl.load(TILES + tile * 4 + 2)
        pos0 = tl.load(TILES + tile * 4 + 3)
        r = tl.arange(0, ROWS)                                  # score row r: query token r // G, head r % G
        m = r // G
        head = kvh * G + r % G
        row_ok = (m < nq) & (r < BLOCK_M * G)
        d = tl.arange(0, HD)
        d_ok = d < HEAD_DIM
        dtype = Q.dtype.element_ty
        q = tl.load(Q + (q0 + m)[:, None].to(tl.int64) * sq_t + head[:, None] * sq_h + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)                      # (ROWS, HD)
        if DOT_F32:
            q = q.to(tl.float32)
        qpos = pos0 + m                                                                   # (ROWS,)
        hi = tl.minimum(pos0 + nq, tl.load(LENS + seq))         # keys [lo, hi) can be seen by some row
        lo = pos0 * 0
        if WINDOW:
            lo = tl.maximum(pos0 - window + 1, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
        hi = tl.where(nq > 0, hi, lo)
        per = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), SPLITS) * BLOCK_N        # keys per split
        start = lo + split * per
        end = tl.minimum(hi, start + per)
        m_i = tl.full((ROWS,), float("-inf"), tl.float32)      # running max of base-2 logits
        l_i = tl.zeros((ROWS,), tl.float32)                     # running sum of exp2(logit - m_i)
        acc = tl.zeros((ROWS, HD), tl.float32)
        mid = start
        if SPLIT_MASK and not WINDOW:
            # Keys up to pos0 are seen by every row: whole blocks of them need no mask (the causal diagonal and the
            # end of the keys fall in the blocks from ``mid`` on).
            mid = tl.minimum(tl.maximum((pos0 + 1) // BLOCK_N * BLOCK_N, start), end)
        for phase in tl.static_range(2):
            # phase 0: blocks every row sees whole (no mask); phase 1: the rest, masked (a constant: two loops)
            if phase == 1:
                first, last = mid, end
            else:
                first, last = start, mid
            for n0 in range(first, last, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)                                                    # key positions
                n_ok = n < end
                if phase == 1:
                    page = tl.load(TABLE + seq * s_table + n // PAGE, mask=n_ok, other=0).to(tl.int64)
                else:
                    page = tl.load(TABLE + seq * s_table + n // PAGE).to(tl.int64)
                slot = n % PAGE
                if HD == HEAD_DIM:
                    kv_ok = n_ok[:, None]                               # constant along the head dim: vector loads
                else:
                    kv_ok = n_ok[:, None] & d_ok[None, :]
                k_at = K + (page * sk_p + slot * sk_t + kvh * sk_h)[:, None] + d[None, :]
                v_at = V + (page * sv_p + slot * sv_t + kvh * sv_h)[:, None] + d[None, :]
                if phase == 1 or HD != HEAD_DIM:
                    k = tl.load(k_at, mask=kv_ok, other=0)                                        # (BLOCK_N, HD)
                    v = tl.load(v_at, mask=kv_ok, other=0)
                else:
                    k = tl.load(k_at)
                    v = tl.load(v_at)
                if QUANT:
                    ks = tl.load(KS + page * sks_p + slot * sks_t + kvh * sks_h, mask=n_ok, other=0.0)   # (BLOCK_N,)
                    vs = tl.load(VS + page * svs_p + slot * svs_t + kvh * svs_h, mask=n_ok, other=0.0)
                    if USE_DOT:
                        k = k.to(tl.float32).to(dtype)                  # int8 is exact in the model dtype
                        v = v.to(tl.float32).to(dtype)
                if USE_DOT:
                    if DOT_F32:
                        k = k.to(tl.float32)
                        v = v.to(tl.float32)
                    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)                         # (ROWS, BLOCK_N)
                else:   # one row: on the CUDA cores (a tensor-core tile would be 16 rows, 15 of them padding)
                    s = tl.sum(q.to(tl.float32) * k.to(tl.float32), 1)[None, :]                  # (1, BLOCK_N)
                if QUANT:
                    s = s * ks[None, :]
                if SOFTCAP:
                    x = s * (scale / softcap)
                    s = (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * (softcap * 1.4426950408889634)   # softcap*tanh(x)
                else:
                    s = s * (scale * 1.4426950408889634)
                if phase == 1:
                    seen = (n[None, :] <= qpos[:, None]) & n_ok[None, :]
                    if WINDOW:
                        seen = seen & (n[None, :] > qpos[:, None] - window)
                    s = tl.where(seen, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)   # a row that has seen nothing yet stays at 0
                p = tl.exp2(s - m_use[:, None])
                alpha = tl.exp2(m_i - m_use)
                l_i = l_i * alpha + tl.sum(p, 1)
                if QUANT:
                    p = p * vs[None, :]                                 # each value row's scale, on its weight
                if USE_DOT:
                    p = p.to(dtype)
                    if DOT_F32:
                        p = p.to(tl.float32)
                    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
                else:
                    w = tl.sum(p, 0)                                    # (BLOCK_N,): the one row's weights
                    acc = acc * alpha[:, None] + tl.sum(w[:, None] * v.to(tl.float32), 0)[None, :]
                m_i = m_new
        out_ok = row_ok[:, None] & d_ok[None, :]
        if SPLITS == 1:
            o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
            tl.store(O + (q0 + m)[:, None].to(tl.int64) * so_t + head[:, None] * so_h + d[None, :], o.to(dtype),
                     mask=out_ok)
        else:
            # Unnormalized partials of a one-token tile, (split, tile, head) major, merged by ``merge`` below.
            part = (split * n_tiles + tile) * heads + head                                # (ROWS,)
            tl.store(PO + part[:, None].to(tl.int64) * HD + d[None, :], acc, mask=out_ok)
            tl.store(PML + part * 2, m_i, mask=row_ok)
            tl.store(PML + part * 2 + 1, l_i, mask=row_ok)

    @triton.jit(do_not_specialize=["n_tiles"], do_not_specialize_on_alignment=["TILES"])
    def merge(PO, PML, O, TILES, so_t, so_h, n_tiles, heads, SPLITS: tl.constexpr, SP: tl.constexpr,
              HEAD_DIM: tl.constexpr, HD: tl.constexpr):
        # One program: one decode tile's token x one query head, its SPLITS partial softmaxes merged.
        tile = tl.program_id(0)
        head = tl.program_id(1)
        q0 = tl.load(TILES + tile * 4 + 1)
        nq = tl.load(TILES + tile * 4 + 2)
        s = tl.arange(0, SP)
        s_ok = s < SPLITS
        part = (s * n_tiles + tile) * heads + head                                        # (SP,)
        m_s = tl.load(PML + part * 2, mask=s_ok, other=float("-inf"))
        l_s = tl.load(PML + part * 2 + 1, mask=s_ok, other=0.0)
        m_all = tl.max(m_s, 0)
        w = tl.exp2(m_s - tl.where(m_all == float("-inf"), 0.0, m_all))                   # (SP,)
        l_all = tl.sum(w * l_s, 0)
        d = tl.arange(0, HD)
        d_ok = d < HEAD_DIM
        acc = tl.load(PO + part[:, None].to(tl.int64) * HD + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                      other=0.0)                                                          # (SP, HD)
        o = tl.sum(acc * w[:, None], 0) / tl.where(l_all == 0.0, 1.0, l_all)
        tl.store(O + q0.to(tl.int64) * so_t + head * so_h + d, o.to(O.dtype.element_ty), mask=d_ok & (nq > 0))

    return triton, attend, merge


# ---- the call ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return min(torch.cuda.get_device_properties(device).multi_processor_count, MAX_PLANNED_SMS)
    return DESIGN_SMS


def decode_splits(decode_tiles: int, kv_heads: int, max_keys: int, sm_count: int = DESIGN_SMS) -> int:
    """Key splits per decode tile: enough programs for ``SPLIT_PROGRAMS_PER_SM`` per SM, each split reading at least
    ``MIN_SPLIT_KEYS`` of the longest context ``max_keys`` (a function of the padded shapes only, so a captured
    graph keeps it)."""
    programs = max(1, decode_tiles * kv_heads)
    want = -(-SPLIT_PROGRAMS_PER_SM * sm_count // programs)
    n = max(1, min(want, max_keys // MIN_SPLIT_KEYS, MAX_SPLITS))
    return 1 << (n.bit_length() - 1)


def _check_inputs(q, k_pages, v_pages, k_scales, v_scales, meta: PagedMeta, out) -> None:
    if q.dim() != 3 or k_pages.dim() != 4 or v_pages.shape != k_pages.shape:
        raise MemintentError(f"paged attention: q must be (T, H, hd) and k/v pages (P, page_tokens, KV, hd) alike, "
                             f"not {tuple(q.shape)}, {tuple(k_pages.shape)}, {tuple(v_pages.shape)}")
    heads, hd = q.shape[1], q.shape[2]
    _, page_tokens, kv_heads, khd = k_pages.shape
    if khd != hd or heads % kv_heads or page_tokens != meta.page_tokens or heads != kv_heads * meta.group:
        raise MemintentError(f"paged attention: {heads} query heads of dim {hd} over {kv_heads} KV heads of dim "
                             f"{khd} in pages of {page_tokens} (the metadata says pages of {meta.page_tokens}, "
                             f"{meta.group} query heads per KV head): the heads must be a multiple of the KV heads, "
                             "with equal head dims, as the metadata was built for")
    _check_storage(q, k_pages, v_pages, k_scales, v_scales, meta, out)


def _check_storage(q, k_pages, v_pages, k_scales, v_scales, meta: PagedMeta, out) -> None:
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise MemintentError(f"paged attention: queries in {q.dtype}; the kernel takes bf16, f16 or f32")
    quantized = k_pages.dtype == torch.int8
    if (quantized != (k_scales is not None and v_scales is not None) or v_pages.dtype != k_pages.dtype
            or (not quantized and k_pages.dtype != q.dtype)):
        raise MemintentError(f"paged attention: pages of {k_pages.dtype} for queries of {q.dtype}: pages hold the "
                             "model dtype, or int8 with float32 scales for both keys and values")
    if any(t.stride(-1) != 1 for t in (q, k_pages, v_pages)):
        raise MemintentError("paged attention: q and the pages need a contiguous head dim (stride 1)")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1):
        raise MemintentError(f"paged attention: out {tuple(out.shape)} {out.dtype} for q {tuple(q.shape)} {q.dtype}: "
                             "give one of q's shape and dtype with a contiguous head dim")
    if meta.page_table.device != q.device:
        raise MemintentError(f"paged attention: the metadata is on {meta.page_table.device}, q on {q.device}")


def paged_attention_varlen(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                           k_scales: torch.Tensor | None, v_scales: torch.Tensor | None, meta: PagedMeta, *,
                           scale: float, softcap: float | None = None, window: int | None = None,
                           out: torch.Tensor | None = None, config: KernelConfig = DEFAULT_CONFIG) -> torch.Tensor:
    """Attention of a step's queries over their sequences' keys, read in place from one layer's pages.

    q (T, H, hd) in the model dtype (bf16, f16 or f32), any strides with a contiguous head dim; k_pages, v_pages
    (P, page_tokens, KV, hd) strided views of the pool, in the model dtype or int8; k_scales, v_scales
    (P, page_tokens, KV) float32 views under int8 (else None); meta from ``build_meta`` for this step. Query head h
    uses KV head h // (H / KV). ``softcap``: logits become softcap * tanh(logit / softcap); ``window``: a query at
    position p sees keys p - window + 1 .. p. Returns ``out`` (T, H, hd) in q's dtype (a new contiguous tensor, or
    the one given); rows of q that no tile covers are left as they were. Launches depend only on shapes: run it
    once before capturing it in a CUDA graph (Triton compiles on first use)."""
    _check_inputs(q, k_pages, v_pages, k_scales, v_scales, meta, out)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    heads = q.shape[1]
    kv_heads = k_pages.shape[2]
    args = _Launch(q, k_pages, v_pages, k_scales, v_scales, out, meta, heads // kv_heads, scale, softcap, window)
    if meta.sizes.prompt_tiles:
        args.run(meta.prompt_tiles, meta.prompt_block_m, 1, config.block_n, config.num_warps, config.num_stages,
                 dot=True, split_mask=config.split_mask)
    if meta.sizes.decode_tiles:
        splits = config.decode_splits or decode_splits(meta.sizes.decode_tiles, kv_heads,
                                                       meta.sizes.pages * meta.page_tokens, _sm_count(q.device))
        one_row = args.group == 1
        quantized = k_scales is not None
        dot = (not quantized) if config.decode_dot is None else config.decode_dot
        warps = config.decode_warps or (ONE_ROW_INT8_WARPS if one_row and quantized and not dot else 4)
        args.run(meta.decode_tiles, 1, splits, config.decode_block_n, warps, config.decode_stages, dot=dot,
                 heads_fastest=one_row and config.heads_fastest, split_mask=config.decode_split_mask)
    return out


class _Launch:
    """The arguments one call's launches share."""

    def __init__(self, q, k_pages, v_pages, k_scales, v_scales, out, meta, group, scale, softcap, window):
        self.q, self.k, self.v, self.out, self.meta, self.group = q, k_pages, v_pages, out, meta, group
        quant = k_scales is not None
        # Without int8 the scale pointers are never read: any tensor stands in.
        self.ks = k_scales if quant else meta.seq_lens
        self.vs = v_scales if quant else meta.seq_lens
        kss = k_scales.stride() if quant else (0, 0, 0)
        vss = v_scales.stride() if quant else (0, 0, 0)
        self.strides = (q.stride(0), q.stride(1), *k_pages.stride()[:3], *v_pages.stride()[:3], *kss, *vss,
                        out.stride(0), out.stride(1), meta.page_table.stride(0))
        self.scalars = (float(scale), float(softcap or 1.0), int(window or 0))
        hd = q.shape[2]
        interpret = interpreting()
        f32 = q.dtype == torch.float32
        dot_f32 = interpret or f32                         # the interpreter's dot takes no bf16/f16 operands
        # float32 on a GPU: three tf32 passes (float32 accuracy on the tensor cores; "ieee" spills registers).
        precision = "ieee" if interpret else ("tf32x3" if f32 else None)
        self.flags = dict(HEAD_DIM=hd, HD=max(MIN_ROWS, 1 << (hd - 1).bit_length()), PAGE=meta.page_tokens,
                          QUANT=quant, SOFTCAP=bool(softcap), WINDOW=bool(window), DOT_F32=dot_f32,
                          PRECISION=precision)
        self.max_block_n = 32 if f32 and not interpret else 1 << 30
        _, self.attend, self.merge = _kernels(interpret)

    def run(self, tiles: torch.Tensor, block_m: int, splits: int, block_n: int, warps: int, stages: int, *,
            dot: bool, heads_fastest: bool = False, split_mask: bool = False) -> None:
        n_tiles, heads, kv_heads = tiles.shape[0], self.q.shape[1], self.k.shape[2]
        used = block_m * self.group                        # score rows with a query
        use_dot = used > 1 or dot                          # else one row: a vector product on the CUDA cores
        block_n = min(block_n, self.max_block_n)
        rows = max(MIN_ROWS, 1 << (used - 1).bit_length()) if use_dot else 1
        po = pml = self.out
        if splits > 1:
            po = torch.empty((splits, n_tiles, heads, self.flags["HD"]), dtype=torch.float32, device=self.q.device)
            pml = torch.empty((splits, n_tiles, heads, 2), dtype=torch.float32, device=self.q.device)
        grid = (kv_heads, n_tiles, splits) if heads_fastest else (n_tiles, kv_heads, splits)
        self.attend[grid](
            self.q, self.k, self.v, self.ks, self.vs, self.out, po, pml, tiles, self.meta.page_table,
            self.meta.seq_lens, *self.strides, n_tiles, heads, *self.scalars, G=self.group, BLOCK_M=block_m,
            ROWS=rows, BLOCK_N=block_n, SPLITS=splits, USE_DOT=use_dot, HEADS_FIRST=heads_fastest,
            SPLIT_MASK=split_mask, num_warps=warps, num_stages=stages, **self.flags)
        if splits > 1:
            self.merge[(n_tiles, heads)](po, pml, self.out, tiles, self.out.stride(0), self.out.stride(1), n_tiles,
                                         heads, SPLITS=splits, SP=max(2, 1 << (splits - 1).bit_length()),
                                         HEAD_DIM=self.flags["HEAD_DIM"], HD=self.flags["HD"])


# ---- the reference ----------------------------------------------------------------------------------------------

def paged_attention_reference(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                              k_scales: torch.Tensor | None, v_scales: torch.Tensor | None, meta: PagedMeta, *,
                              scale: float, softcap: float | None = None, window: int | None = None,
                              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``paged_attention_varlen`` in plain PyTorch, tile by tile, in ``dtype``: keys dequantized as value x scale,
    grouped heads repeated, masked scores, softmax. Returns (T, H, hd) in ``dtype``, zero on rows no tile covers."""
    heads, kv_heads, pt = q.shape[1], k_pages.shape[2], meta.page_tokens
    out = torch.zeros(q.shape, dtype=dtype, device=q.device)
    table, lens = meta.page_table.tolist(), meta.seq_lens.tolist()
    for seq, q0, nq, pos0 in torch.cat([meta.decode_tiles, meta.prompt_tiles]).tolist():
        if nq == 0:
            continue
        keys = min(pos0 + nq, lens[seq])
        pos = torch.arange(keys, device=q.device)
        pages = torch.tensor(table[seq], device=q.device)[pos // pt]
        k = k_pages[pages, pos % pt].to(dtype)                                     # (keys, KV, hd)
        v = v_pages[pages, pos % pt].to(dtype)
        if k_scales is not None:
            k = k * k_scales[pages, pos % pt].to(dtype)[..., None]
            v = v * v_scales[pages, pos % pt].to(dtype)[..., None]
        k = k.repeat_interleave(heads // kv_heads, 1)                              # (keys, H, hd)
        v = v.repeat_interleave(heads // kv_heads, 1)
        s = torch.einsum("qhd,khd->hqk", q[q0:q0 + nq].to(dtype), k) * scale       # (H, nq, keys)
        if softcap:
            s = torch.tanh(s / softcap) * softcap
        qpos = torch.arange(pos0, pos0 + nq, device=q.device)[:, None]             # (nq, 1)
        seen = pos[None, :] <= qpos
        if window:
            seen &= pos[None, :] > qpos - window
        s = s.masked_fill(~seen, float("-inf"))
        out[q0:q0 + nq] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v)
    return out


# ---- writing a step's keys and values ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _write_kernel(interpret: bool):
    """The Triton kernel that stores a step's new keys and values at their (page, offset): one program per (token,
    block of ``HEADS`` KV heads); a token whose page is negative (the padding of a CUDA graph's bucket) writes
    nothing. Under int8 KV it quantizes as ``kv.attention.quantize_kv`` does: one float32 scale per token and head,
    absmax / 127, values rounded half to even (``div_rn``: IEEE division; then torch.round's rule)."""
    del interpret   # the cache key (see ``_kernels``)
    import triton  # deferred: heavy, optional
    import triton.language as tl  # deferred: heavy, optional

    # The token pages and offsets are slices of the step's staged integers: their alignment changes with the
    # step's token count (see ``attend``).
    @triton.jit(do_not_specialize=["kv_heads"], do_not_specialize_on_alignment=["PAGES", "OFFS"])
    def write(K, V, KP, VP, KS, VS, PAGES, OFFS, sk_t, sk_h, sv_t, sv_h, skp_p, skp_t, skp_h, svp_p, svp_t, svp_h,
              sks_p, sks_t, sks_h, svs_p, svs_t, svs_h, kv_heads,
              HEAD_DIM: tl.constexpr, HD: tl.constexpr, HEADS: tl.constexpr, QUANT: tl.constexpr):
        t = tl.program_id(0)
        h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)                                # (HEADS,)
        page = tl.load(PAGES + t)
        if page >= 0:
            off = tl.load(OFFS + t)
            d = tl.arange(0, HD)
            ok = (h < kv_heads)[:, None] & (d < HEAD_DIM)[None, :]                         # (HEADS, HD)
            k = tl.load(K + t.to(tl.int64) * sk_t + h[:, None] * sk_h + d[None, :], mask=ok, other=0.0)
            v = tl.load(V + t.to(tl.int64) * sv_t + h[:, None] * sv_h + d[None, :], mask=ok, other=0.0)
            kdst = KP + page.to(tl.int64) * skp_p + off * skp_t + h[:, None] * skp_h + d[None, :]
            vdst = VP + page.to(tl.int64) * svp_p + off * svp_t + h[:, None] * svp_h + d[None, :]
            if QUANT:
                kf, vf = k.to(tl.float32), v.to(tl.float32)
                ks = tl.max(tl.abs(kf), 1) / 127.0                                        # (HEADS,)
                vs = tl.max(tl.abs(vf), 1) / 127.0
                kx = tl.math.div_rn(kf, tl.where(ks == 0.0, 1.0, ks)[:, None])
                vx = tl.math.div_rn(vf, tl.where(vs == 0.0, 1.0, vs)[:, None])
                # torch.round's rule (half to even) in plain arithmetic: libdevice's rint is not in the interpreter
                kf, vf = tl.floor(kx), tl.floor(vx)
                k_odd = (kf - 2.0 * tl.floor(kf * 0.5)) != 0.0
                v_odd = (vf - 2.0 * tl.floor(vf * 0.5)) != 0.0
                kq = tl.where((kx - kf > 0.5) | ((kx - kf == 0.5) & k_odd), kf + 1.0, kf)
                vq = tl.where((vx - vf > 0.5) | ((vx - vf == 0.5) & v_odd), vf + 1.0, vf)
                tl.store(kdst, tl.minimum(tl.maximum(kq, -127.0), 127.0).to(tl.int8), mask=ok)
                tl.store(vdst, tl.minimum(tl.maximum(vq, -127.0), 127.0).to(tl.int8), mask=ok)
                h_ok = h < kv_heads
                tl.store(KS + page.to(tl.int64) * sks_p + off * sks_t + h * sks_h, ks, mask=h_ok)
                tl.store(VS + page.to(tl.int64) * svs_p + off * svs_t + h * svs_h, vs, mask=h_ok)
            else:
                tl.store(kdst, k.to(KP.dtype.element_ty), mask=ok)
                tl.store(vdst, v.to(VP.dtype.element_ty), mask=ok)

    return write


@dataclass(frozen=True, slots=True)
class WriteConfig:
    """Launch parameters of the KV write (tuning, not semantics): KV heads per program (a power of two; None: all of
    a token's) and warps."""

    heads: int | None = 4     # H31 (H200): 4 heads and 2 warps write 4608 tokens of 56 heads 2.2 x faster than
    num_warps: int = 2        # one head and one warp (0.072 vs 0.160 ms), and a GQA model's 8 heads 1.7-2.2 x


DEFAULT_WRITE = WriteConfig()


def write_kv_pages(k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                   k_scales: torch.Tensor | None, v_scales: torch.Tensor | None, pages: torch.Tensor,
                   offsets: torch.Tensor, config: WriteConfig = DEFAULT_WRITE) -> None:
    """Store k and v (T, KV, hd), any strides with a contiguous head dim, at (pages[t], offsets[t]) of one layer's
    pages (P, page_tokens, KV, hd), quantized under int8 KV (scales (P, page_tokens, KV) float32). ``pages`` (T,)
    int: a negative page skips its token. One launch for keys and values; what it launches depends only on shapes."""
    t, kv_heads, hd = k.shape
    quant = k_scales is not None
    ks = k_scales if quant else pages
    vs = v_scales if quant else pages
    kss = k_scales.stride() if quant else (0, 0, 0)
    vss = v_scales.stride() if quant else (0, 0, 0)
    heads = config.heads or 1 << (kv_heads - 1).bit_length()
    _write_kernel(interpreting())[(t, -(-kv_heads // heads))](
        k, v, k_pages, v_pages, ks, vs, pages, offsets, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_pages.stride()[:3], *v_pages.stride()[:3], *kss, *vss, kv_heads,
        HEAD_DIM=hd, HD=max(16, 1 << (hd - 1).bit_length()), HEADS=heads, QUANT=quant, num_warps=config.num_warps)


def kv_bytes_read(contexts: Sequence[int], kv_heads: int, head_dim: int, value_bytes: int, quantized: bool) -> int:
    """Bytes of keys and values (and int8 scales) the step's sequences hold, each read once: the HBM floor's
    numerator."""
    per_token = 2 * kv_heads * (head_dim * value_bytes + (4 if quantized else 0))
    return per_token * sum(contexts)


__all__ = ["KernelConfig", "MetaSizes", "MetaStaging", "PagedMeta", "build_meta", "bucket", "buckets",
           "decode_splits", "meta_ints", "kv_bytes_read", "paged_attention_reference", "paged_attention_varlen",
           "prompt_block_m", "interpreting", "warm_uploads", "WriteConfig", "write_kv_pages"]
