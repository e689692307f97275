"""Costs: seconds from the hardware profile.

Requires: ``lifetimes``; ``program.hardware`` set.
Ensures: every step, stage and block has a time/transfer size; every used object has an urgency time.

A step's device time is a roofline, max(FLOPs / rate, bytes / HBM bandwidth), where a matmul's rate is the profile's
rate at the step's token count for its weight's dtype and shape (``gemm_tflops``: a decode step's few rows run far
below the card's peak, a matmul into few features below one into many) and other ops take ``bf16_tflops``. A stage's time is its steps' device time, or, when longer, the host's time to launch them
(``launch_overhead_s`` per op that launches a kernel; views launch none): an eager step whose kernels are shorter
than their launches is bound by the host. A block's copy costs a fixed latency plus its transfer bytes over the
pinned host-to-device bandwidth; a quantized block adds its dequantisation (output bytes over ``dequant_gbps``).
"""

from __future__ import annotations

import collections
import math
from typing import NamedTuple

from memintent.ir.layout import (
    MAPPED_LINEAR_ROWS,
    QUANTIZABLE_DTYPES,
    SCALE_BYTES,
    quantized_block_bytes,
)
from memintent.ir.model import (
    PAGED_ATTENTION_OP,
    Block,
    HardwareProfile,
    KVPool,
    KVQuant,
    Object,
    ObjectKind,
    Program,
    Quant,
    Residency,
)
from memintent.passes.manager import Pass, ensure
from memintent.units import round_s

INT4_GROUP = 128  # int4 values per bf16 scale


def transfer_bytes(block: Block, program: Program, objects: dict[str, Object] | None = None) -> int:
    """Bytes a visit of ``block`` copies: what the runtime really copies. Unquantized: the block's flat buffer.
    Quantized (int8/int4 on its 2-D weights): the packed buffer of ``memintent.runtime.quant.quant_layout``
    (values and scales of each weight, raw bytes of the others, every part rounded up to 256 bytes), so the
    planner's copy times, streamed bytes and stream-slot sizes are the runtime's own. ``objects``: the program's
    ``object_map()``, when the caller has it."""
    if block.quant == Quant.none:
        return block.size_bytes
    # Imported here: memintent.runtime pulls in torch and the executor, which the passes do not otherwise need.

    return quantized_block_bytes(block, objects if objects is not None else program.object_map())


FOUR_BIT = (Quant.int4, Quant.int4g)   # the bit widths one kernel unpacks (``dequant_int4_gbps``)


def host_copy_bytes(p: Program) -> int:
    """Bytes a forward copies from the host: every visit of a streamed block, except those of blocks in the HBM
    store, which copy within HBM (the prediction's ``streamed_bytes``, whose floor is the host link's)."""
    bmap = p.block_map()
    return sum(bmap[v.block].transfer_bytes or 0 for v in p.visits
               if bmap[v.block].residency == Residency.streamed and not bmap[v.block].in_hbm_store)


def copy_time_s(block: Block, hw: HardwareProfile, from_hbm: bool | None = None) -> float:
    """A visit's copy: over PCIe from pinned host memory, or, for a block in the HBM store (``from_hbm``; None: as
    the block says), from its store slot, a device-to-device copy that reads and writes each byte in HBM."""
    from_hbm = block.in_hbm_store if from_hbm is None else from_hbm
    rate_gbps = hw.hbm_gbps / 2 if from_hbm else hw.h2d_gbps
    return hw.copy_latency_s + (block.transfer_bytes or block.size_bytes) / (rate_gbps * 1e9)


def spread_order(n: int) -> list[int]:
    """0..n-1 such that every prefix is spread evenly over them: the bit-reversed counting order (0, n/2, n/4,
    3n/4, ...), counted from the end (n - 1 first)."""
    bits = max(1, (n - 1).bit_length())
    rev = (int(format(k, f"0{bits}b")[::-1], 2) for k in range(1 << bits))
    return [n - 1 - r for r in rev if r < n]


def spare_page_blocks(p: Program) -> list[Block]:
    """The blocks the engine may hold in the KV pool's spare pages (spec/runtime.md, "Spare pages"), in the order it
    takes them: streamed from the host, visited once a forward, spread over the forward (``spread_order``, the last
    visited first). A prompt step's compute and its copies are near a balance: its streamed blocks' copies keep the
    host link busy while the held blocks' copies within HBM let the copy stream run ahead of the compute, which
    needs held blocks spread out (prefetch reaches only a few slots ahead), not bunched at the end."""
    bmap = p.block_map()
    visits = collections.Counter(v.block for v in p.visits)
    first = list(dict.fromkeys(v.block for v in p.visits))
    eligible = [n for n in first if visits[n] == 1 and bmap[n].residency == Residency.streamed
                and not bmap[n].in_hbm_store]
    return [bmap[eligible[i]] for i in spread_order(len(eligible))]


def spare_pages_of(block: Block, page_bytes: int) -> int:
    """The KV pool pages a block held there takes: its packed bytes, laid over whole pages and part of the last."""
    return math.ceil((block.transfer_bytes or block.size_bytes) / page_bytes)


def spare_page_saving_s(p: Program, page_bytes: int) -> tuple[float, int]:
    """(seconds, blocks): the most one KV pool page holding a block can take off a step (a held block's copy is a
    device copy instead of the host link's: removing time from one copy shortens the step by at most that much),
    and how many blocks the engine may hold (``spare_page_blocks``)."""
    blocks = spare_page_blocks(p)
    per_page = [(copy_time_s(b, p.hardware) - copy_time_s(b, p.hardware, True))
                / spare_pages_of(b, page_bytes) for b in blocks]
    return max(per_page, default=0.0), len(blocks)


def visit_copy_s(p: Program, from_pages: int = 0) -> dict[int, float]:
    """Each visit's copy time (``copy_time_s``), the first ``from_pages`` blocks of ``spare_page_blocks`` copied
    within HBM, from the spare pages that hold them."""
    held = {b.name for b in spare_page_blocks(p)[:from_pages]} if from_pages else set()
    bmap = p.block_map()
    return {i: copy_time_s(bmap[v.block], p.hardware, True if v.block in held else None)
            for i, v in enumerate(p.visits)}


def dequant_time_s(block: Block, hw: HardwareProfile) -> float:
    """A quantized visit's unpacking: its bf16 weights written at the profile's rate for its kernel (int8, or
    int4/int4g), or at half the HBM rate where the profile has none."""
    if block.quant == Quant.none:
        return 0.0
    rate = (block.quant in FOUR_BIT and hw.dequant_int4_gbps) or hw.dequant_gbps or hw.hbm_gbps / 2
    return block.size_bytes / (rate * 1e9)


EMBEDDING_OP = "aten.embedding.default"
LINEAR_OP = "aten.linear.default"


class MappedRead(NamedTuple):
    """Where a block could be read in place, from the traced steps (``mappable_reads``): the stage whose step reads
    it, how ("rows": an embedding's gather; "matrix": a linear layer without bias), and how many tokens (rows) or
    rows of x (matrix) that step reads."""

    block: str
    stage: int
    kind: str
    count: int


def mappable_reads(p: Program) -> dict[str, MappedRead]:
    """The blocks whose module can read them in place, whatever their bit width (``mapped_op`` adds that): one 2-D
    weight in bf16/f16/f32, visited once a forward and read by one step of the block, an ``aten.embedding`` or an
    ``aten.linear`` without bias. A program without steps (the planner's light candidates) has none: the planner
    passes its own."""
    objects = p.object_map()
    readers: dict[str, list] = {}
    for s in p.steps:
        for u in s.uses:
            readers.setdefault(u, []).append(s)
    visits: dict[str, int] = {}
    for v in p.visits:
        visits[v.block] = visits.get(v.block, 0) + 1
    stage_of = {i: st.index for st in p.stages for i in range(st.first_step, st.last_step + 1)}
    out = {}
    for b in p.blocks:
        w = objects[b.weights[0]] if b.module and len(b.weights) == 1 else None
        if (w is None or len(w.shape) != 2 or w.dtype not in QUANTIZABLE_DTYPES or visits.get(b.name) != 1
                or len(readers.get(w.name, [])) != 1):
            continue
        read = _step_read(b, w, readers[w.name][0], objects)
        if read is not None:
            out[b.name] = MappedRead(b.name, stage_of[readers[w.name][0].index], *read)
    return out


def _step_read(b: Block, w: Object, step, objects: dict[str, Object]) -> tuple[str, int] | None:
    """(kind, count) of the one step that reads ``b``'s weight ``w``, where a kernel can do it in place: the rows an
    embedding gathers, or the rows of x a linear layer without bias multiplies (its bias would be a second input)."""
    inputs = [u for u in step.uses if u not in step.defs and u != w.name]
    if step.block != b.name or step.op not in (EMBEDDING_OP, LINEAR_OP) or len(inputs) != 1:
        return None
    if step.op == EMBEDDING_OP:
        return "rows", math.prod(objects[step.defs[0]].shape) // max(w.shape[1], 1)
    return "matrix", max(1, round(step.flops / (2 * w.shape[0] * w.shape[1])))


def reads_at(reads: dict[str, MappedRead], at: tuple[int, int] | None) -> dict[str, MappedRead]:
    """``reads`` in an engine step of ``at`` = (tokens, rows the head multiplies), each at least 1; None: as
    traced."""
    if at is None:
        return reads
    return {b: r._replace(count=max(1, at[0] if r.kind == "rows" else at[1])) for b, r in reads.items()}


def mapped_op(p: Program, block: Block, reads: dict[str, MappedRead] | None = None) -> str | None:
    """How a mapped ``block`` is read in place (``Residency.mapped``), or None where it cannot be: "rows" for an
    embedding (``mappable_reads``) unquantized or int8, "matrix" for an int8 linear layer (the kernel dequantizes
    int8 tiles; a matmul of another width in place would differ from the resident model's). The one rule: the
    residency search offers only these, the verifier refuses any other, and the runtime binds these two."""
    r = (mappable_reads(p) if reads is None else reads).get(block.name)
    if r is None or block.quant not in ((Quant.none, Quant.int8) if r.kind == "rows" else (Quant.int8,)):
        return None
    return r.kind


def mapped_read_bytes(block: Block, objects: dict[str, Object], kind: str, count: int) -> int:
    """Bytes a mapped block's kernel reads over the host link for ``count`` tokens ("rows": each its row of values,
    and its int8 scale) or rows of x ("matrix": the packed matrix once per ``MAPPED_LINEAR_ROWS``)."""
    if kind == "matrix":
        return (block.transfer_bytes or 0) * max(1, -(-count // MAPPED_LINEAR_ROWS))
    w = objects[block.weights[0]]
    row_bytes = w.shape[1] + SCALE_BYTES if block.quant == Quant.int8 else w.size_bytes // max(w.shape[0], 1)
    return row_bytes * count


def mapped_reads(p: Program, blocks=None, reads: dict[str, MappedRead] | None = None,
                 objects: dict[str, Object] | None = None) -> list[tuple[str, int, int]]:
    """(block, stage, bytes over the link) of each mapped block's read in a forward (``blocks``: these, as if
    mapped; None: those the plan maps), counted as ``reads`` says (default: as traced, ``mappable_reads``).
    ``objects``: the program's ``object_map()``, when the caller has it."""
    reads = mappable_reads(p) if reads is None else reads
    objects = p.object_map() if objects is None else objects
    names = {b.name for b in p.blocks if b.residency == Residency.mapped} if blocks is None else set(blocks)
    return [(b.name, reads[b.name].stage, mapped_read_bytes(b, objects, reads[b.name].kind, reads[b.name].count))
            for b in p.blocks if b.name in names and b.name in reads]


def mapped_link_bytes(p: Program, reads: dict[str, MappedRead] | None = None) -> int:
    """Bytes the plan's mapped blocks read over the link in a forward (``mapped_reads``): the prediction's
    ``mapped_bytes``."""
    return sum(n for _, _, n in mapped_reads(p, reads=reads))


def mapped_rate_gbps(hw: HardwareProfile) -> float:
    return hw.mapped_gbps or hw.h2d_gbps


def link_busy_s(hw: HardwareProfile, streamed_bytes: int, mapped_bytes: int) -> float:
    """Seconds a forward holds the host link: its copies from the host and its mapped reads (a prediction's
    ``streamed_bytes`` and ``mapped_bytes``)."""
    return streamed_bytes / (hw.h2d_gbps * 1e9) + mapped_bytes / (mapped_rate_gbps(hw) * 1e9)


def link_read_s(n_bytes: int, hw: HardwareProfile) -> float:
    """A mapped read of ``n_bytes``: a fixed latency (as a copy's) plus its bytes at the mapped kernels' rate."""
    return hw.copy_latency_s + n_bytes / (mapped_rate_gbps(hw) * 1e9)


def stage_link_s(p: Program, blocks=None, reads: dict[str, MappedRead] | None = None,
                 objects: dict[str, Object] | None = None) -> dict[int, float]:
    """Seconds each stage's mapped reads hold the host link (``mapped_reads``), by stage: the stage takes that much
    longer, and the copy engine's queue waits as long (``passes.simulate``)."""
    out: dict[int, float] = {}
    for _, stage, n in mapped_reads(p, blocks, reads, objects):
        out[stage] = out.get(stage, 0.0) + link_read_s(n, p.hardware)
    return out


MATMUL_OPS = ("linear", ".mm.", "addmm", "matmul", "bmm", "baddbmm")


def is_matmul(op: str) -> bool:
    return any(m in op for m in MATMUL_OPS)


MatmulShape = tuple[str, int, int]     # a matmul's weight: (dtype, in features, out features)


def matmul_shapes(program: Program) -> list[MatmulShape | None]:
    """Per step, the 2-D weight a matmul multiplies by; None for other ops and for products of activations."""
    objects = program.object_map()
    out: list[MatmulShape | None] = []
    for s in program.steps:
        shape = None
        if is_matmul(s.op):
            w = next((objects[u] for u in s.uses if u in objects and objects[u].kind == ObjectKind.weight
                      and len(objects[u].shape) == 2), None)
            if w is not None:
                shape = (w.dtype, w.shape[1], w.shape[0])      # nn.Linear's weight is (out, in)
        out.append(shape)
    return out


def gemm_table(hw: HardwareProfile, shape: MatmulShape | None) -> list[tuple[float, float]]:
    """The rate table a matmul takes: the profile's entry of the weight's dtype nearest its shape (first in the
    ratio of in to out features, which sets how a tile's work splits, then in size), else ``gemm_tflops``."""
    same = [g for g in hw.gemm_shapes if shape is not None and g.dtype == shape[0]]
    if not same:
        return hw.gemm_tflops
    _, k, n = shape
    return min(same, key=lambda g: (round(abs(math.log(k / n * g.out_features / g.in_features)), 3),
                                    abs(math.log(k * n / (g.in_features * g.out_features))))).tflops


def gemm_tflops(hw: HardwareProfile, tokens: int, shape: MatmulShape | None = None) -> float:
    """The matmul rate at ``tokens`` rows: the table ``gemm_table`` picks, interpolated in log(tokens), held flat
    past its ends."""
    return table_tflops(gemm_table(hw, shape), tokens, hw.bf16_tflops)


def table_tflops(table: list[tuple[float, float]], tokens: int, default: float) -> float:
    """A rate table at ``tokens`` (see ``gemm_tflops``); ``default`` for an empty table."""
    if not table or tokens <= 0:
        return default
    if tokens <= table[0][0]:
        return table[0][1]
    for (t0, r0), (t1, r1) in zip(table, table[1:]):
        if tokens <= t1:
            f = math.log(tokens / t0) / math.log(t1 / t0)
            return r0 + f * (r1 - r0)
    return table[-1][1]


def step_time_s(flops: int, hbm_bytes: int, hw: HardwareProfile, op: str = "", tokens: int = 0,
                shape: MatmulShape | None = None) -> float:
    """One op's device time (see the module docstring)."""
    if flops == 0 and hbm_bytes == 0:
        return 0.0
    rate = gemm_tflops(hw, tokens, shape) if is_matmul(op) else hw.bf16_tflops
    return max(flops / (rate * 1e12), hbm_bytes / (hw.hbm_gbps * 1e9))


def op_time_s(op: str, flops: int, hbm_bytes: int, hw: HardwareProfile, tokens: int,
              shape: MatmulShape | None = None, attention: AttentionKind = (False, False)) -> float:
    """Any step's device time: the paged attention by the kernel's rates for its ``attention`` kind, the rest by
    ``step_time_s``."""
    if op.startswith(PAGED_ATTENTION_OP):
        return attention_time_s(flops, hbm_bytes, hw, attention)
    return step_time_s(flops, hbm_bytes, hw, op, tokens, shape)


def launches(flops: int, hbm_bytes: int) -> int:
    """Kernels an op launches: none for a view (no FLOPs, no bytes), else one."""
    return 0 if flops == 0 and hbm_bytes == 0 else 1


def stage_time_s(device_s: float, kernels: int, hw: HardwareProfile) -> float:
    """A stage's time: its steps' device time, or the host's time to launch its kernels when that is longer."""
    return max(device_s, kernels * hw.launch_overhead_s)


AttentionKind = tuple[bool, bool]     # (one query head per KV head, int8 pages): the decode paths of the kernel


def attention_kind(pool: KVPool | None) -> AttentionKind:
    """The kind of the paged attention over ``pool`` (a plan's ``kv_pool``): (one query head per KV head, int8
    pages); (False, False) without a pool; a pool that does not say its query heads (0) counts as grouped."""
    if pool is None:
        return (False, False)
    return (pool.query_heads == pool.kv_heads, pool.quant == KVQuant.int8)


def attention_decode_gbps(hw: HardwareProfile, kind: AttentionKind) -> float:
    """The kernel's rate reading decode tokens' keys and values, for its kind; a profile that did not measure the
    kind falls back to the grouped-heads rate, then to the card's HBM rate."""
    one_row, int8 = kind
    own = (hw.attention_one_row_int8_gbps if int8 else hw.attention_one_row_gbps) if one_row else 0.0
    return own or (hw.attention_int8_gbps if int8 else 0.0) or hw.attention_gbps or hw.hbm_gbps


def attention_time_s(flops: int, hbm_bytes: int, hw: HardwareProfile,
                     kind: AttentionKind = (False, False)) -> float:
    """A paged-attention op's device time: the kernel's own measured rates (``attention_tflops``, the decode rate of
    its ``kind``), else the card's."""
    if flops == 0 and hbm_bytes == 0:
        return 0.0
    return max(flops / ((hw.attention_tflops or hw.bf16_tflops) * 1e12),
               hbm_bytes / (attention_decode_gbps(hw, kind) * 1e9))


def costs(program: Program) -> Program:
    p = program   # in place: run_passes hands the pipeline its own copy
    hw = p.hardware
    tokens = p.shape.batch * p.shape.seq
    kind = attention_kind(p.kv_pool)
    for s, shape in zip(p.steps, matmul_shapes(p)):
        s.time_s = round_s(op_time_s(s.op, s.flops, s.hbm_bytes, hw, tokens, shape, kind))
    start_s = []
    t = 0.0
    for s in p.steps:
        start_s.append(t)
        t += s.time_s
    for st in p.stages:
        span = p.steps[st.first_step:st.last_step + 1]
        st.time_s = round_s(stage_time_s(sum(s.time_s for s in span),
                                         sum(launches(s.flops, s.hbm_bytes) for s in span), hw))
    for b in p.blocks:
        b.transfer_bytes = transfer_bytes(b, p)
    for o in p.objects:
        if o.urgency_step is not None:
            o.urgency_s = round_s(start_s[o.urgency_step])
        if o.kind == ObjectKind.kv and p.kv_pool is not None:
            o.evict_cost_s, o.recompute_cost_s = kv_block_costs(p, t)
        else:
            # Weights are clean (dropping one costs nothing; it is copied in again from its home) and activations
            # never leave HBM in these plans: neither cost has a reader (spec/IR.md, "Who reads what").
            o.evict_cost_s, o.recompute_cost_s = 0.0, None
    return p


def kv_block_costs(p: Program, step_s: float) -> tuple[float, float]:
    """The KV pool's intent annotations, per block (the scheduler reads them to preempt by cost):
    (seconds to swap one block out to host memory and back in on the copy engine, seconds to recompute its tokens:
    ``page_tokens`` times the step's compute per token)."""
    pool, hw = p.kv_pool, p.hardware
    swap_s = pool.page_bytes / (hw.d2h_gbps * 1e9) + pool.page_bytes / (hw.h2d_gbps * 1e9)
    return round_s(swap_s), round_s(pool.page_tokens * step_s / max(p.shape.seq, 1))


def _ensure(p: Program) -> None:
    ensure(all(b.transfer_bytes is not None for b in p.blocks), "a block has no transfer_bytes")
    ensure(all(o.urgency_s is not None for o in p.objects if o.urgency_step is not None),
           "an object with an urgency step has no urgency time")


COSTS = Pass("costs", costs, requires=("lifetimes",), ensures=_ensure)
