"""One layer's attention for a whole engine step on the device: the paged Triton kernel (memintent/kv/paged_kernel.py)
against the engine's gather + SDPA (cuDNN on and off), FlexAttention with a block mask, and the HBM floor.

Cases (pages of 16 tokens scattered over a shuffled pool whose pages hold two layers, the kernel reads the second;
bf16 model; bf16 and int8 KV):
  a. decode of 64 sequences of 200-1024 tokens, 64 query heads over 8 KV heads, head dim 128 (llama-3-70b);
  b. a prompt-heavy step of 2400 tokens, 13 sequences: 4 prompt chunks (two after cached prefixes) and 9 decodes;
  c. decode of 64 sequences of 513-544 tokens, 56 heads = 56 KV heads, head dim 128 (opt-30b);
  d. nine whole prompts of 512 tokens over the same heads (an opt-30b prompt-heavy step's attention).
Each variant is checked against a float64 reference first (bf16 tolerance: |err| <= 1e-2 + 2^-6 |ref|), then timed
(median, CUDA events); the kernel also captured in a CUDA graph (and its replay compared with the eager output). A
short sweep of the kernel's launch parameters follows (``--no-sweep`` skips it), and the KV write's launches on
the step's query tokens (``--no-write``); variants that fail are reported, not fatal. ``--cases b,d``: only those.

    python benchmarks/attention_kernel.py --out $OUT          # H200: under 3 minutes; table last; attention_kernel.json
    TRITON_INTERPRET=1 python benchmarks/attention_kernel.py --device cpu --quick   # the script's logic, tiny shapes

The floor: the keys and values (and int8 scales) of the step's sequences read once, at 4.3 TB/s (H200's HBM3e
peak 4.8 TB/s less the usual 10 %), or the step's attention FLOPs (4 x heads x head_dim per visible (query, key)
pair) at 989 TFLOP/s (dense bf16), whichever is longer; the measured device copy rate is recorded too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median_s  # noqa: E402
from memintent.kv import attention  # noqa: E402
from memintent.kv.attention import DecodeChunk, PrefillChunk, StepMeta, quantize_kv  # noqa: E402
from memintent.kv.layout import PageLayout, PoolViews  # noqa: E402
from memintent.kv import paged_kernel as pk  # noqa: E402

PT = 16
LAYERS = 2                       # a page holds every layer: the layer views have a page stride of two layers
HBM_FLOOR_GBPS = 4300.0
TENSOR_TFLOPS = 989.0            # H200 dense bf16: the compute floor of prompt-heavy steps
BUDGET_S = 360.0                 # sweep variants are skipped past this (seconds since start)
FLEX_START_S = 90.0              # a FlexAttention compile (20-60 s) starts only before this
KERNEL_ONLY = False              # --kernel-only
ATOL, RTOL = 1e-2, 2 ** -6       # bf16 against float64
T0 = time.perf_counter()


@dataclass
class Case:
    name: str
    heads: int
    kv_heads: int
    head_dim: int
    seqs: list[tuple[int, int]]          # (query tokens this step, context once written), in step order
    quantized: bool = False
    rows: list[dict] = field(default_factory=list)


def cases(quick: bool) -> list[Case]:
    rng = random.Random(0)
    if quick:
        dec = [(1, rng.randint(20, 80)) for _ in range(4)]
        shapes = [("a decode", 8, 2, 64, dec), ("b mixed", 8, 2, 64, [(40, 40), (20, 50)] + dec[:2]),
                  ("c mha decode", 4, 4, 64, dec)]
    else:
        dec70 = [(1, rng.randint(200, 1024)) for _ in range(64)]
        mix = [(1024, 1024), (700, 700), (400, 912), (267, 1024)] + [(1, rng.randint(200, 1024)) for _ in range(9)]
        rng.shuffle(mix)
        opt = [(1, rng.randint(513, 544)) for _ in range(64)]
        shapes = [("a decode 64x200-1024 64/8h", 64, 8, 128, dec70), ("b prompt-heavy 2400 tok, 13 seqs", 64, 8, 128, mix),
                  ("c opt-30b decode 64x~530 56/56h", 56, 56, 128, opt),
                  ("d opt-30b prompts 9x512 56/56h", 56, 56, 128, [(512, 512)] * 9)]
    return [Case(f"{n} {'int8' if q else 'bf16'}", h, kv, hd, list(s), q)
            for n, h, kv, hd, s in shapes for q in (False, True)]


# ---- timing ----------------------------------------------------------------------------------------------------

def bench_s(fn, dev) -> float:
    """Median seconds of ``fn``: CUDA events via triton's do_bench on a GPU, a host timer elsewhere."""
    return median_s(fn, dev.type == "cuda", 10, 40, cpu_repeats=2)


def copy_gbps(dev) -> float:
    x = torch.empty(1 << (30 if dev.type == "cuda" else 24), dtype=torch.uint8, device=dev)
    t = bench_s(lambda: x.clone(), dev)
    return 2 * x.numel() / t / 1e9


# ---- one step's pool, queries and metadata ---------------------------------------------------------------------

@dataclass
class Setup:
    views: PoolViews
    q4: torch.Tensor                     # (1, H, T, hd) bf16, as the model hands it over
    q: torch.Tensor                      # (T, H, hd) view of it
    starts: list[int]
    tables: list[list[int]]
    meta: pk.PagedMeta
    scale: float

    def kv(self):
        v = self.views
        scales = (v.key_scales[1], v.value_scales[1]) if v.key_scales is not None else (None, None)
        return v.keys[1], v.values[1], *scales


def setup(case: Case, dev, prompt_rows: int = pk.PROMPT_ROWS) -> Setup:
    rng = random.Random(1)
    need = sum(-(-c // PT) for _, c in case.seqs)
    layout = PageLayout(LAYERS, case.kv_heads, case.head_dim, PT, torch.int8 if case.quantized else torch.bfloat16,
                         case.quantized)
    views = PoolViews(torch.zeros((need + 1) * layout.page_bytes, dtype=torch.uint8, device=dev), layout, need + 1)
    gen = torch.Generator(device=dev).manual_seed(0)
    for i, x in enumerate((views.keys[1], views.values[1])):
        for p0 in range(1, need + 1, 2048):                                  # page 0 stays zero: the null page
            p1 = min(need + 1, p0 + 2048)
            r = torch.randn(x[p0:p1].shape, generator=gen, device=dev)         # (pages, PT, KV, hd) float32
            if case.quantized:
                vals, s = quantize_kv(r)
                x[p0:p1] = vals
                (views.key_scales, views.value_scales)[i][1][p0:p1] = s
            else:
                x[p0:p1] = r.to(torch.bfloat16)
    order = list(range(1, need + 1))
    rng.shuffle(order)
    tables, starts, at = [], [], 0
    for n, c in case.seqs:
        tables.append(order[:-(-c // PT)])
        order = order[-(-c // PT):]
        starts.append(at)
        at += n
    q4 = torch.randn(1, case.heads, at, case.head_dim, device=dev, dtype=torch.bfloat16)
    meta = pk.build_meta(starts, [n for n, _ in case.seqs], [c for _, c in case.seqs], tables, page_tokens=PT,
                         group=case.heads // case.kv_heads, device=dev, prompt_rows=prompt_rows)
    return Setup(views, q4, q4[0].transpose(0, 1), starts, tables, meta, case.head_dim ** -0.5)


def engine_meta(case: Case, s: Setup, dev) -> StepMeta:
    """The engine's gather + SDPA metadata: every decode in one chunk (its best case), one chunk per prompt."""
    meta = StepMeta(write_pages=torch.zeros(1, dtype=torch.long, device=dev),
                    write_offsets=torch.zeros(1, dtype=torch.long, device=dev))
    dec = [i for i, (n, _) in enumerate(case.seqs) if n == 1]
    if dec:
        nb = max(len(s.tables[i]) for i in dec)
        tab = torch.tensor([s.tables[i] + [0] * (nb - len(s.tables[i])) for i in dec], device=dev)
        lens = torch.tensor([case.seqs[i][1] for i in dec], device=dev)
        meta.decode.append(DecodeChunk(rows=torch.tensor([s.starts[i] for i in dec], device=dev), tables=tab,
                                       mask=(torch.arange(nb * PT, device=dev) < lens[:, None])[:, None, None],
                                       positions=lens - 1))
    for i, (n, c) in enumerate(case.seqs):
        if n > 1:
            nb = -(-c // PT)
            qpos = torch.arange(c - n, c, device=dev)
            meta.prefill.append(PrefillChunk(start=s.starts[i], length=n, context=c,
                                             table=torch.tensor(s.tables[i][:nb], device=dev),
                                             mask=torch.arange(nb * PT, device=dev)[None, :] <= qpos[:, None]))
    return meta


# ---- variants ----------------------------------------------------------------------------------------------------

def check(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, bool]:
    err = (got.double() - ref).abs()
    return float(err.max()), bool((err <= ATOL + RTOL * ref.abs()).all())


def variant(case: Case, name: str, fn, dev, ref=None, floor_s=None, **extra) -> dict:
    """Run ``fn`` once (checked against ``ref``), time it; a failure becomes the row's error."""
    row = dict(case=case.name, variant=name, **extra)
    try:
        out = fn()
        if ref is not None:
            row["max_abs_err"], row["within_tol"] = check(out, ref)
        row["time_s"] = bench_s(fn, dev)
        if floor_s:
            row["x_floor"] = row["time_s"] / floor_s
    except Exception as e:  # noqa: BLE001 -- a measurement: report and go on
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        row["trace"] = traceback.format_exc()[-1500:]
    case.rows.append(row)
    status = row.get("error") or f"{row['time_s'] * 1e3:.3f} ms, err {row.get('max_abs_err', float('nan')):.2e}"
    print(f"  {name}: {status}", flush=True)
    return row


def kernel_fn(s: Setup, config=pk.DEFAULT_CONFIG, meta=None, out=None):
    return lambda: pk.paged_attention_varlen(s.q, *s.kv(), meta or s.meta, scale=s.scale, out=out, config=config)


def graph_variant(case: Case, s: Setup, dev, ref, floor_s) -> None:
    """The kernel captured in a CUDA graph; its replay must equal the eager call bitwise."""
    if dev.type != "cuda":
        return
    row = dict(case=case.name, variant="kernel, CUDA graph replay")
    try:
        out = torch.empty(s.q.shape, dtype=s.q.dtype, device=dev)
        fn = kernel_fn(s, out=out)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
            fn()
        torch.cuda.current_stream().wait_stream(side)
        eager = out.clone()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        out.zero_()
        g.replay()
        row["graph_equals_eager"] = bool(torch.equal(out, eager))
        row["max_abs_err"], row["within_tol"] = check(out, ref)
        row["time_s"] = bench_s(g.replay, dev)
        row["x_floor"] = row["time_s"] / floor_s
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    case.rows.append(row)
    print(f"  graph: {row.get('error') or '%.3f ms' % (row['time_s'] * 1e3)}", flush=True)


def sdpa_variants(case: Case, s: Setup, dev, ref, floor_s) -> None:
    m = engine_meta(case, s, dev)
    ctx = attention._Context(s.views, m, torch.bfloat16)

    def layer():
        out = torch.empty_like(s.q4)                                            # (1, H, T, hd)
        for c in m.decode:
            out[0, :, c.rows] = attention._decode(ctx, 1, s.q4[0, :, c.rows], c, s.scale, None, None)
        for c in m.prefill:
            rows = slice(c.start, c.start + c.length)
            out[0, :, rows] = attention._prefill(ctx, 1, s.q4[0, :, rows], c, s.scale, None, None)
        return out[0].transpose(0, 1)

    calls = len(m.decode) + len(m.prefill)
    for cudnn in ((True, False) if dev.type == "cuda" else (False,)):
        prev = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(cudnn)
        try:
            variant(case, f"gather + SDPA, cuDNN {'on' if cudnn else 'off'} ({calls} calls)", layer, dev, ref, floor_s)
        finally:
            torch.backends.cuda.enable_cudnn_sdp(prev)


def varlen_variant(case: Case, s: Setup, dev, ref, floor_s) -> None:
    """torch's varlen flash attention (``torch.nn.attention.varlen``) over keys and values already contiguous, as a
    whole prompt's are in its own step (the step computed them; nothing read from the pool): what prompt tiles
    could reach outside the pool. Only for cases made of whole prompts in the model's dtype (H48: no faster than
    the kernel's prompt tiles on 512-token prompts)."""
    if case.quantized or any(n != c for n, c in case.seqs):
        return
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    pages = [t[p // PT] for (_, c), t in zip(case.seqs, s.tables) for p in range(c)]
    slots = [p % PT for _, c in case.seqs for p in range(c)]
    pages, slots = torch.tensor(pages, device=dev), torch.tensor(slots, device=dev)
    k = s.views.keys[1][pages, slots].contiguous()                              # (T, KV, hd)
    v = s.views.values[1][pages, slots].contiguous()                            # (T, KV, hd)
    q = s.q4[0].transpose(0, 1).contiguous()                                    # (T, H, hd)
    lens = [n for n, _ in case.seqs]
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=dev)   # (seqs + 1,)
    signature = inspect.signature(varlen_attn)
    causal = {"is_causal": True} if "is_causal" in signature.parameters else {"window_size": (-1, 0)}

    def layer():
        return varlen_attn(q, k, v, cu, cu, max(lens), max(lens), scale=s.scale, **causal)        # (T, H, hd)

    variant(case, "varlen flash, the step's own contiguous keys", layer, dev, ref, floor_s,
            signature=str(signature)[:300])


def flex_variant(case: Case, s: Setup, dev, ref, floor_s) -> None:
    """FlexAttention over the step's keys gathered once per layer into one packed sequence, a document-causal block
    mask built once per step (timed apart: it is shared by the layers)."""
    if case.quantized:
        return
    if time.perf_counter() - T0 > FLEX_START_S:
        case.rows.append(dict(case=case.name, variant="FlexAttention", error="skipped: out of time"))
        return
    row = dict(case=case.name, variant="gather + FlexAttention (block mask), compiled")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        pages, slots, kdoc, kpos, qdoc, qpos = [], [], [], [], [], []
        for i, ((n, c), table) in enumerate(zip(case.seqs, s.tables)):
            pages += [table[p // PT] for p in range(c)]
            slots += [p % PT for p in range(c)]
            kdoc += [i] * c
            kpos += list(range(c))
            qdoc += [i] * n
            qpos += list(range(c - n, c))
        pages, slots, kdoc, kpos, qdoc, qpos = (torch.tensor(x, device=dev) for x in
                                                (pages, slots, kdoc, kpos, qdoc, qpos))

        def mask_mod(b, h, qi, ki):
            return (qdoc[qi] == kdoc[ki]) & (kpos[ki] <= qpos[qi])

        t = time.perf_counter()
        bm = create_block_mask(mask_mod, 1, 1, len(qdoc), len(kdoc), device=dev)
        row["block_mask_s"] = time.perf_counter() - t
        k_pages, v_pages = s.views.keys[1], s.views.values[1]

        def layer():
            k = k_pages[pages, slots].transpose(0, 1)[None]                    # (1, KV, keys, hd)
            v = v_pages[pages, slots].transpose(0, 1)[None]
            return flex(s.q4, k, v, block_mask=bm, enable_gqa=True, scale=s.scale)[0].transpose(0, 1)

        out = layer()
        row["max_abs_err"], row["within_tol"] = check(out, ref)
        row["time_s"] = bench_s(layer, dev)
        row["x_floor"] = row["time_s"] / floor_s
    except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    case.rows.append(row)
    print(f"  flex: {row.get('error') or '%.3f ms' % (row['time_s'] * 1e3)}", flush=True)


# (prompt rows, keys per iteration, warps, stages) of prompt tiles tried, with and without the split mask
PROMPT_TILES = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3),
                (128, 128, 8, 2), (128, 64, 4, 2), (128, 32, 8, 3)]


def _sweep() -> list[tuple[str, dict, int | None, str]]:
    """(label, KernelConfig fields, prompt rows, the cases it applies to: "mha" decode (G = 1), "gqa" decode,
    "prompt"-heavy). H27 swept the decode launch parameters; this sweep tries the causal mask on the diagonal blocks
    only (``split_mask``) and the prompt tiles' shape."""
    rows: list[tuple[str, dict, int | None, str]] = []
    for kind in ("mha", "gqa"):
        rows.append(("decode, split mask", dict(decode_split_mask=True), None, kind))
    for (r, bn, w, st), split in itertools.product(PROMPT_TILES, (False, True)):
        label = f"prompt {r} rows, keys/iter {bn}, {w} warps, {st} stages" + (", split mask" if split else "")
        rows.append((label, dict(block_n=bn, num_warps=w, num_stages=st, split_mask=split), r, "prompt"))
    return rows


def _kind(case: Case) -> str:
    if any(n > 1 for n, _ in case.seqs):
        return "prompt"
    return "mha" if case.heads == case.kv_heads else "gqa"


def sweep(case: Case, s: Setup, dev, ref, floor_s) -> None:
    """Launch parameters of the tile kind the case is made of."""
    for label, fields, rows, kind in _sweep():
        if kind != _kind(case):
            continue
        if time.perf_counter() - T0 > BUDGET_S:
            case.rows.append(dict(case=case.name, variant="kernel, " + label, error="skipped: out of time"))
            continue
        meta = None
        if rows is not None:
            meta = pk.build_meta(s.starts, [n for n, _ in case.seqs], [c for _, c in case.seqs], s.tables,
                                 page_tokens=PT, group=case.heads // case.kv_heads, device=dev, prompt_rows=rows)
        variant(case, "kernel, " + label, kernel_fn(s, pk.KernelConfig(**fields), meta), dev, ref, floor_s)


# KV write launches tried: (KV heads per program, None: all of a token's; warps)
WRITES = [(1, 1), (2, 1), (4, 2), (8, 4), (16, 4), (None, 4), (None, 8)]


def write_variants(p: Prepared, dev) -> None:
    """The KV write of the case's query tokens (their keys and values into random slots of the pool) for each
    ``pk.WriteConfig``: each variant's pool checked bitwise against the default's, then timed, against the floor of
    reading the new keys and values and writing them (and their int8 scales) once."""
    case, s = p.case, p.setup
    t = sum(n for n, _ in case.seqs)
    kv = torch.randn(t, 2, case.kv_heads, case.head_dim, device=dev, dtype=torch.bfloat16)   # (T, 2, KV, hd)
    slots = torch.randperm(s.views.keys[1].shape[0] * PT, device=dev)[:t]
    pages, offs = slots // PT, slots % PT
    flat = s.views.pages
    before = flat.clone()
    per_value = 1 if case.quantized else 2
    moved = 2 * t * case.kv_heads * (case.head_dim * (2 + per_value) + (4 if case.quantized else 0))
    floor = moved / (HBM_FLOOR_GBPS * 1e9)
    want = None
    for heads, warps in WRITES:
        config = pk.WriteConfig(heads=heads, num_warps=warps)

        def write(config=config):
            pk.write_kv_pages(kv[:, 0], kv[:, 1], *s.kv(), pages, offs, config=config)
            return flat

        flat.copy_(before)
        row = variant(case, f"KV write, {heads or 'all'} heads a program, {warps} warps", write, dev, None, floor)
        if "error" in row:
            continue
        got = flat.clone()
        if want is None:
            want = got
        row["equals_default"] = bool(torch.equal(got, want))
    flat.copy_(before)


def meta_build_s(case: Case, s: Setup, dev) -> float:
    """Host time to build and upload a step's metadata with a kept staging (the engine's way)."""
    staging = pk.MetaStaging(dev)
    args = (s.starts, [n for n, _ in case.seqs], [c for _, c in case.seqs], s.tables)
    kw = dict(page_tokens=PT, group=case.heads // case.kv_heads, device=dev, staging=staging)
    pk.build_meta(*args, **kw)
    t = time.perf_counter()
    for _ in range(20):
        pk.build_meta(*args, **kw)
    return (time.perf_counter() - t) / 20


# ---- the run -----------------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    case: Case
    setup: Setup
    ref: torch.Tensor                    # (T, H, hd) float64
    floor_s: float


def prepare(case: Case, dev) -> Prepared:
    print(f"{case.name}: {len(case.seqs)} sequences, {sum(n for n, _ in case.seqs)} query tokens, "
          f"{sum(c for _, c in case.seqs)} keys", flush=True)
    s = setup(case, dev)
    contexts = [c for _, c in case.seqs]
    kv_bytes = pk.kv_bytes_read(contexts, case.kv_heads, case.head_dim, 1 if case.quantized else 2, case.quantized)
    pairs = sum(n * (c - n) + n * (n + 1) // 2 for n, c in case.seqs)          # (query, visible key) pairs
    flops = 4 * case.heads * case.head_dim * pairs
    floor_s = max(kv_bytes / (HBM_FLOOR_GBPS * 1e9), flops / (TENSOR_TFLOPS * 1e12))
    splits = pk.decode_splits(s.meta.sizes.decode_tiles, case.kv_heads, s.meta.sizes.pages * PT, pk._sm_count(dev))
    info = dict(case=case.name, variant="(step)", kv_bytes=kv_bytes, flops=flops, floor_s=floor_s,
                hbm_floor_s=kv_bytes / (HBM_FLOOR_GBPS * 1e9), sizes=str(s.meta.sizes),
                auto_decode_splits=splits, meta_build_s=meta_build_s(case, s, dev))
    case.rows.append(info)
    t = time.perf_counter()
    ref = pk.paged_attention_reference(s.q, *s.kv(), s.meta, scale=s.scale)          # (T, H, hd) float64
    info["reference_s"] = time.perf_counter() - t
    return Prepared(case, s, ref, floor_s)


def core(p: Prepared, dev) -> None:
    splits = p.case.rows[0]["auto_decode_splits"]
    bench_s(kernel_fn(p.setup), dev)       # the card's clocks up before the first timed call
    variant(p.case, f"kernel (auto: {splits} decode splits)", kernel_fn(p.setup), dev, p.ref, p.floor_s)
    graph_variant(p.case, p.setup, dev, p.ref, p.floor_s)
    if not KERNEL_ONLY:
        sdpa_variants(p.case, p.setup, dev, p.ref, p.floor_s)


def phase(name: str, prepared: list[Prepared], fn, dev) -> None:
    """``fn`` on every prepared case; a case that fails is reported and the others go on."""
    print(f"-- {name}", flush=True)
    for p in prepared:
        try:
            fn(p, dev)
        except Exception as e:  # noqa: BLE001 -- one case failing leaves the others
            p.case.rows.append(dict(case=p.case.name, variant=f"({name})", error=f"{type(e).__name__}: {e}"[:300]))


def table(doc: dict) -> None:
    print(f"\n{doc['device']}, torch {doc['torch']}, triton {doc['triton']}; device copy {doc['copy_gbps']:.0f} GB/s; "
          f"floor = max(KV bytes / {HBM_FLOOR_GBPS:.0f} GB/s, FLOPs / {TENSOR_TFLOPS:.0f} TFLOP/s)")
    print(f"{'case':38s} {'variant':64s} {'ms':>8s} {'x floor':>8s} {'max|err|':>9s} ok")
    for case in doc["cases"]:
        for r in case["rows"]:
            if r["variant"] == "(step)":
                print(f"{r['case'][:38]:38s} {'floor; meta build %.0f us' % (r['meta_build_s'] * 1e6):64s} "
                      f"{r['floor_s'] * 1e3:8.3f}")
                continue
            ms = "-" if r.get("time_s") is None else f"{r['time_s'] * 1e3:.3f}"
            xf = "-" if r.get("x_floor") is None else f"{r['x_floor']:.2f}"
            er = "-" if r.get("max_abs_err") is None else f"{r['max_abs_err']:.1e}"
            ok = {True: "y", False: "NO", None: "-"}[r.get("within_tol", r.get("equals_default"))]
            if r.get("graph_equals_eager") is False:
                ok += " (graph != eager)"
            print(f"{r['case'][:38]:38s} {r['variant'][:64]:64s} {ms:>8s} {xf:>8s} {er:>9s} {ok}"
                  + (f"  {r['error'][:80]}" if r.get("error") else ""))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (the interpreter on a CPU)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--cases", default="a,b,c,d", help="the cases to run, by letter (a,b,c,d)")
    ap.add_argument("--no-write", dest="write", action="store_false", help="skip the KV write launches")
    ap.add_argument("--kernel-only", action="store_true",
                    help="skip the former gather + SDPA path and FlexAttention (measured in H9)")
    args = ap.parse_args()
    global KERNEL_ONLY
    KERNEL_ONLY = args.kernel_only
    dev = torch.device(args.device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    doc = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, triton=triton_version,
               device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", copy_gbps=copy_gbps(dev),
               hbm_floor_gbps=HBM_FLOOR_GBPS, cases=[])
    prepared = []
    for case in cases(args.quick):
        if case.name.split()[0] not in args.cases.split(","):
            continue
        try:
            prepared.append(prepare(case, dev))
        except Exception as e:  # noqa: BLE001
            case.rows.append(dict(case=case.name, variant="(setup)", error=f"{type(e).__name__}: {e}"[:300]))
        doc["cases"].append(case)
    phase("kernel, graph, gather + SDPA", prepared, core, dev)
    phase("varlen flash", prepared, lambda p, d: varlen_variant(p.case, p.setup, d, p.ref, p.floor_s), dev)
    if not KERNEL_ONLY:
        phase("FlexAttention", prepared, lambda p, d: flex_variant(p.case, p.setup, d, p.ref, p.floor_s), dev)
    if args.write:
        phase("KV write", [p for p in prepared if _kind(p.case) != "gqa"], write_variants, dev)
    if not args.no_sweep:
        chosen = [p for p in prepared if p.case.name.endswith("bf16") or _kind(p.case) != "prompt"]
        phase("sweep", chosen, lambda p, d: sweep(p.case, p.setup, d, p.ref, p.floor_s), dev)
    doc["cases"] = [dict(name=c.name, heads=c.heads, kv_heads=c.kv_heads, head_dim=c.head_dim,
                         quantized=c.quantized, seqs=c.seqs, rows=c.rows) for c in doc["cases"]]
    doc["wall_s"] = time.perf_counter() - T0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "attention_kernel.json").write_text(json.dumps(doc, indent=1, default=str))
    table(doc)
    print(f"wall {doc['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
