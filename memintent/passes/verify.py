"""Verification: a proof, by symbolic execution of the plan, that it is safe to run.

Requires: ``evict`` (a complete plan). Checks, raising ``PlanVerificationError`` naming the step and object:
- layout: arena slots lie inside the arena without overlapping; every block fits the slot it is placed in;
- memory: at every step, arena + workspace + live activations <= budget;
- arrival before use: every stage that reads a streamed block finds it copied (``copy_done`` ran) in its slot;
- no overwrite in use: a copy only starts into a slot whose previous occupant was freed;
- a free only after the visit's last reader; actions only at stage entries the runtime can hook.
The action trace is run for a cold first forward and two steady-state forwards, so the cross-forward prefetch is
checked too.
"""

from __future__ import annotations

from memintent.errors import PlanVerificationError
from memintent.ir.model import ActionKind, ObjectKind, Program, Residency, SlotKind
from memintent.passes.lifetimes import activation_profile
from memintent.passes.manager import Pass
from memintent.passes.residency import reserved_bytes, slot_need_bytes
from memintent.units import fmt_bytes


def _fail(p: Program, stage: int | None, msg: str) -> None:
    if stage is not None and stage < len(p.stages):
        st = p.stages[stage]
        where = f"step {st.first_step} (stage {stage}, module {st.module or '<root>'!r})"
    elif stage is not None:
        where = "the end of the forward"
    else:
        where = "the plan"
    raise PlanVerificationError(f"plan verification failed at {where}: {msg}")


def verify_layout(p: Program) -> None:
    a = p.arena
    if a is None:
        _fail(p, None, "no arena: run the prefetch pass")
    spans = sorted((s.offset_bytes, s.offset_bytes + s.size_bytes, s.index) for s in a.slots)
    for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
        if s1 < e0:
            _fail(p, None, f"arena slots {i0} and {i1} overlap ({s0}..{e0} and {s1}..{e1})")
    for s in a.slots:
        if s.offset_bytes < 0 or s.offset_bytes + s.size_bytes > a.size_bytes or s.offset_bytes % a.alignment_bytes:
            _fail(p, None, f"arena slot {s.index} at {s.offset_bytes}+{s.size_bytes} is outside the "
                           f"{a.size_bytes}-byte arena or not {a.alignment_bytes}-byte aligned")
    bmap = p.block_map()
    for b in p.blocks:
        if b.residency == Residency.resident:
            if b.slot is None or not 0 <= b.slot < len(a.slots) or a.slots[b.slot].kind != SlotKind.resident:
                _fail(p, None, f"resident block {b.name} has no resident slot")
            if a.slots[b.slot].size_bytes < b.size_bytes:
                _fail(p, None, f"block {b.name} ({b.size_bytes} B) does not fit slot {b.slot}")
    for act in p.actions:
        if not 0 <= act.slot < len(a.slots) or a.slots[act.slot].kind != SlotKind.stream:
            _fail(p, act.stage, f"{act.kind.value} of {act.block} names slot {act.slot}, not a stream slot")
        if act.block not in bmap:
            _fail(p, act.stage, f"{act.kind.value} names unknown block {act.block}")
        if a.slots[act.slot].size_bytes < slot_need_bytes(bmap[act.block]):
            _fail(p, act.stage, f"block {act.block} ({slot_need_bytes(bmap[act.block])} B with its packed bytes) "
                                f"does not fit stream slot {act.slot} ({a.slots[act.slot].size_bytes} B)")
        if act.stage > len(p.stages) or act.stage < 0 or (act.stage < len(p.stages) and not p.stages[act.stage].module):
            _fail(p, min(act.stage, len(p.stages)), f"{act.kind.value} of {act.block} is at a stage with no module "
                                                   "hook (actions must sit where the runtime can run them)")
    kv = sum(o.size_bytes for o in p.objects if o.kind == ObjectKind.kv)
    kv_slots = sum(s.size_bytes for s in a.slots if s.kind == SlotKind.kv)
    if kv_slots < kv:
        _fail(p, None, f"KV cache needs {kv} B but the arena reserves {kv_slots} B for it")


def verify_memory(p: Program) -> None:
    if p.budget_bytes is None:
        _fail(p, None, "no budget")
    prof = activation_profile(p)
    fixed = p.arena.size_bytes + reserved_bytes(p)["workspace"]
    if fixed > p.budget_bytes:
        _fail(p, None, f"arena {fmt_bytes(p.arena.size_bytes)} + workspace exceed the budget "
                       f"{fmt_bytes(p.budget_bytes)}")
    for i, live in enumerate(prof):
        if fixed + live > p.budget_bytes:
            s = p.steps[i]
            live_objs = [o for o in p.objects if o.kind == ObjectKind.buffer and o.first_use is not None
                         and o.first_use <= i <= o.last_use]
            big = max(live_objs, key=lambda o: o.size_bytes).name if live_objs else "-"
            raise PlanVerificationError(
                f"plan verification failed at step {i} ({s.op} in {s.module or '<root>'!r}): HBM "
                f"{fmt_bytes(fixed + live)} exceeds the budget {fmt_bytes(p.budget_bytes)} (largest live object "
                f"{big})")
    if p.prediction is not None and p.prediction.peak_hbm_bytes > p.budget_bytes:
        _fail(p, None, f"predicted peak {fmt_bytes(p.prediction.peak_hbm_bytes)} exceeds the budget")


def verify_actions(p: Program) -> None:
    n = len(p.stages)
    bmap = p.block_map()
    by_stage: list[list] = [[] for _ in range(n + 1)]
    for a in p.actions:
        by_stage[a.stage].append(a)
    # Which (block, visit) pairs are streamed, with the stages each visit covers.
    visit_span = {(v.block, v.first_stage): (v.first_stage, v.last_stage) for v in p.visits}
    # slot -> [block, visit_stage, state, forward]  state: loading | ready | freed
    occ: dict[int, list] = {}

    def start(a, fwd):
        cur = occ.get(a.slot)
        if cur is not None and cur[2] != "freed":
            _fail(p, a.stage if fwd >= 0 else 0,
                  f"copy of {a.block} into slot {a.slot} would overwrite {cur[0]} still in use there")
        occ[a.slot] = [a.block, a.visit_stage, "loading", fwd]

    # Cold start: the runtime issues the next-forward copies before the first forward.
    for a in p.actions:
        if a.kind == ActionKind.copy_start and a.next_forward:
            start(a, 0)
    for fwd in range(3):
        for s in range(n + 1):
            for a in by_stage[s]:
                if a.kind == ActionKind.free:
                    cur = occ.get(a.slot)
                    if cur is None or cur[0] != a.block or cur[2] != "ready":
                        _fail(p, s, f"free of {a.block} in slot {a.slot}, which does not hold it ready")
                    if visit_span.get((a.block, a.visit_stage), (0, n))[1] >= s:
                        _fail(p, s, f"{a.block} is freed before its last use at stage "
                                    f"{visit_span[(a.block, a.visit_stage)][1]}")
                    cur[2] = "freed"
                elif a.kind == ActionKind.copy_start:
                    start(a, fwd + 1 if a.next_forward else fwd)
                else:
                    cur = occ.get(a.slot)
                    if cur is None or cur[0] != a.block or cur[1] != a.visit_stage or cur[3] != fwd:
                        _fail(p, s, f"wait for {a.block} in slot {a.slot}, but no copy of it was issued there")
                    cur[2] = "ready"
            if s == n:
                break
            for b in p.stages[s].needs:
                blk = bmap[b]
                if blk.residency == Residency.resident:
                    continue
                ok = any(c[0] == b and c[2] == "ready" and c[3] == fwd for c in occ.values())
                if not ok:
                    w = next((w for w in blk.weights if any(w in p.steps[i].uses for i in
                              range(p.stages[s].first_step, p.stages[s].last_step + 1))), b)
                    _fail(p, s, f"object {w} of streamed block {b} is used before its copy arrived "
                                f"(or after its slot was freed)")


def verify(program: Program) -> Program:
    verify_layout(program)
    verify_memory(program)
    verify_actions(program)
    return program


VERIFY = Pass("verify", verify, requires=("evict",))
