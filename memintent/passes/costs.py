"""Costs: seconds from the hardware profile.

Requires: ``lifetimes``; ``program.hardware`` set.
Ensures: every step, stage and block has a time/transfer size; every used object has an urgency time.

Step time is a roofline, max(FLOPs / matmul rate, bytes / HBM bandwidth), plus a fixed launch overhead for ops that
launch a kernel (views launch none). A block's copy costs a fixed latency plus its transfer bytes over the pinned
host-to-device bandwidth; a quantized block adds its dequantisation (output bytes over ``dequant_gbps``).
"""

from __future__ import annotations

from memintent.ir.layout import quantized_block_bytes
from memintent.ir.model import Block, HardwareProfile, Object, ObjectKind, Program, Quant
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


def copy_time_s(block: Block, hw: HardwareProfile) -> float:
    return hw.copy_latency_s + (block.transfer_bytes or block.size_bytes) / (hw.h2d_gbps * 1e9)


def dequant_time_s(block: Block, hw: HardwareProfile) -> float:
    if block.quant == Quant.none:
        return 0.0
    rate = hw.dequant_gbps or hw.hbm_gbps / 2
    return block.size_bytes / (rate * 1e9)


def step_time_s(flops: int, hbm_bytes: int, hw: HardwareProfile) -> float:
    if flops == 0 and hbm_bytes == 0:
        return 0.0
    return max(flops / (hw.bf16_tflops * 1e12), hbm_bytes / (hw.hbm_gbps * 1e9)) + hw.launch_overhead_s


def costs(program: Program) -> Program:
    p = program   # in place: run_passes hands the pipeline its own copy
    hw = p.hardware
    for s in p.steps:
        s.time_s = round_s(step_time_s(s.flops, s.hbm_bytes, hw))
    start_s = []
    t = 0.0
    for s in p.steps:
        start_s.append(t)
        t += s.time_s
    for st in p.stages:
        st.time_s = round_s(sum(p.steps[i].time_s for i in range(st.first_step, st.last_step + 1)))
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
