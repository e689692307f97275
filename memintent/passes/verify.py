"""Verification: a proof, by symbolic execution of the plan, that it is safe to run.

Requires: ``actions`` (a complete plan). Checks, raising ``PlanVerificationError`` naming the step and object:
- structure: the program is self-consistent (steps and stages numbered in order, stages partitioning the steps,
  every name a step, stage, visit or action uses exists, every weight inside its block, each stage's ``needs``
  covering the blocks its steps read, buffer lifetimes covering their uses), so the checks below reason about
  the program the runtime will execute and never trip over a dangling reference;
- layout: arena slots lie inside the arena without overlapping; every block fits the slot it is placed in;
- memory: at every step, arena + workspace + live activations <= budget, and the recorded prediction neither
  exceeds the budget nor understates that peak;
- arrival before use: every stage that reads a streamed block finds it copied (``copy_done`` ran) in its slot;
- no overwrite in use: a copy only starts into a slot whose previous occupant was freed;
- a free only after the visit's last reader; actions only at stage entries the runtime can hook.
The action trace is run for a cold first forward and two steady-state forwards, so the cross-forward prefetch is
checked too. A plan file is untrusted input: whatever it holds, ``verify`` either returns or raises
``PlanVerificationError``.
"""

from __future__ import annotations

from memintent.errors import PlanVerificationError
from memintent.ir.model import DTYPE_BITS, ActionKind, ObjectKind, Program, Residency, SlotKind, dtype_bytes
from memintent.passes.lifetimes import activation_profile
from memintent.passes.manager import Pass
from memintent.passes.residency import reserved_bytes, slot_need_bytes
from memintent.units import fmt_bytes


def _fail(p: Program, stage: int | None, msg: str) -> None:
    if stage is not None and 0 <= stage < len(p.stages):
        st = p.stages[stage]
        where = f"step {st.first_step} (stage {stage}, module {st.module or '<root>'!r})"
    elif stage is not None:
        where = "the end of the forward"
    else:
        where = "the plan"
    raise PlanVerificationError(f"plan verification failed at {where}: {msg}")


def _dup(names: list[str]) -> str | None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            return n
        seen.add(n)
    return None


def verify_structure(p: Program) -> None:
    """The program is one the other checks (and the runtime) can reason about: nothing dangles, nothing is out of
    range, and the facts the proof relies on (stage needs, buffer lifetimes) agree with the steps."""
    if p.arena is None:
        _fail(p, None, "no arena: run the prefetch pass")
    if p.budget_bytes is None:
        _fail(p, None, "no budget")
    if p.hardware is None:
        _fail(p, None, "no hardware profile: the kernels' workspace, part of the budget, is unknown")
    if p.prediction is None:
        _fail(p, None, "no prediction: run the prefetch pass")
    for what, names in (("object", [o.name for o in p.objects]), ("block", [b.name for b in p.blocks])):
        d = _dup(names)
        if d is not None:
            _fail(p, None, f"two {what}s are named {d}")
    omap, bmap = p.object_map(), p.block_map()
    slots = p.arena.slots
    for i, s in enumerate(slots):
        if s.index != i:
            _fail(p, None, f"arena slot at position {i} has index {s.index}: slots must be listed by index")

    # Weights: each in exactly the block that lists it, inside that block's buffer, sized by its shape and dtype.
    owner: dict[str, str] = {}
    for b in p.blocks:
        for w in b.weights:
            o = omap.get(w)
            if o is None or o.kind != ObjectKind.weight:
                _fail(p, None, f"block {b.name} lists {w}, which is not a weight object")
            if w in owner:
                _fail(p, None, f"weight {w} is listed by blocks {owner[w]} and {b.name}")
            owner[w] = b.name
    for o in p.objects:
        if o.kind != ObjectKind.weight:
            continue
        if o.block not in bmap or owner.get(o.name) != o.block:
            _fail(p, None, f"weight {o.name} names block {o.block}, which does not list it")
        if o.dtype not in DTYPE_BITS:
            _fail(p, None, f"weight {o.name} has unknown dtype {o.dtype!r}")
        numel = 1
        for d in o.shape:
            numel *= d
        if o.size_bytes != dtype_bytes(o.dtype, numel):
            _fail(p, None, f"weight {o.name} of shape {o.shape} {o.dtype} is {dtype_bytes(o.dtype, numel)} B, "
                           f"not the {o.size_bytes} B the plan records")
        off = o.block_offset_bytes
        if off is None or off + o.size_bytes > bmap[o.block].size_bytes:
            _fail(p, None, f"weight {o.name} at offset {off} ({o.size_bytes} B) lies outside its block "
                           f"{o.block} ({bmap[o.block].size_bytes} B)")

    # Steps in order, naming only known objects; buffer lifetimes cover every step that touches the buffer.
    n = len(p.steps)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    first_use: dict[str, int] = {}
    defined: set[str] = set()
    for i, s in enumerate(p.steps):
        if s.index != i:
            raise PlanVerificationError(f"plan verification failed at the plan: step at position {i} has index "
                                        f"{s.index}: steps must be listed in order")
        for name in (*s.defs, *s.uses):
            if name not in omap:
                raise PlanVerificationError(f"plan verification failed at step {i} ({s.op}): it uses or defines "
                                            f"{name}, which is not an object of the plan")
            first.setdefault(name, i)
            last[name] = i
        for name in s.uses:
            first_use.setdefault(name, i)
        for name in s.defs:
            if name not in defined and first_use.get(name, i) < i:
                raise PlanVerificationError(f"plan verification failed at step {first_use[name]}: it uses {name} "
                                            f"before step {i} ({s.op}) defines it")
            defined.add(name)
    for o in p.objects:
        if o.first_use is None and o.last_use is None and o.name not in first:
            continue
        lo, hi = first.get(o.name, o.first_use), last.get(o.name, o.last_use)
        if (o.first_use is None or o.last_use is None or not o.first_use <= o.last_use < n
                or (lo is not None and o.first_use > lo) or (hi is not None and o.last_use < hi)):
            _fail(p, None, f"object {o.name} has live range [{o.first_use}, {o.last_use}], but the plan's {n} steps "
                           f"use it in [{lo}, {hi}]")

    # Stages: numbered in order, partitioning the steps; each one's needs cover the blocks its steps read.
    expect = 0
    for i, st in enumerate(p.stages):
        if st.index != i:
            _fail(p, None, f"stage at position {i} has index {st.index}: stages must be listed in order")
        if st.first_step != expect or st.last_step < st.first_step or st.last_step >= n:
            _fail(p, None, f"stage {i} covers steps [{st.first_step}, {st.last_step}]: stages must partition the "
                           f"{n} steps in order (expected it to start at step {expect})")
        expect = st.last_step + 1
        for b in st.needs:
            if b not in bmap:
                _fail(p, i, f"stage {i} needs unknown block {b}")
        for j in range(st.first_step, st.last_step + 1):
            for u in p.steps[j].uses:
                o = omap[u]
                if o.kind == ObjectKind.weight and o.block not in st.needs:
                    raise PlanVerificationError(
                        f"plan verification failed at step {j} (stage {i}): it reads {u} of block {o.block}, which "
                        f"the stage does not list in its needs")
    if p.stages and expect != n:
        _fail(p, None, f"the stages end at step {expect - 1} but the plan has {n} steps")
    if n and not p.stages:
        _fail(p, None, f"{n} steps but no stages: run the lifetimes pass")

    # Visits and actions name known blocks, stages in range and slots that exist.
    n_st = len(p.stages)
    visits: set[tuple[str, int]] = set()
    for v in p.visits:
        if v.block not in bmap:
            _fail(p, None, f"a visit names unknown block {v.block}")
        if not v.first_stage <= v.last_stage < n_st:
            _fail(p, None, f"the visit of {v.block} covers stages [{v.first_stage}, {v.last_stage}], outside the "
                           f"plan's {n_st} stages")
        if v.slot is not None and v.slot >= len(slots):
            _fail(p, None, f"the visit of {v.block} at stage {v.first_stage} names slot {v.slot}, which does not "
                           f"exist ({len(slots)} slots)")
        if (v.block, v.first_stage) in visits:
            _fail(p, None, f"block {v.block} has two visits starting at stage {v.first_stage}")
        visits.add((v.block, v.first_stage))
    for a in p.actions:
        what = f"{a.kind.value} of {a.block}"
        if a.stage > n_st:
            _fail(p, None, f"{what} fires at stage {a.stage}, past the plan's {n_st} stages")
        if a.block not in bmap:
            _fail(p, a.stage, f"{what} names unknown block {a.block}")
        if bmap[a.block].residency != Residency.streamed:
            _fail(p, a.stage, f"{what} names block {a.block}, which is not streamed")
        if a.slot >= len(slots):
            _fail(p, a.stage, f"{what} names slot {a.slot}, which does not exist ({len(slots)} slots)")
        if (a.block, a.visit_stage) not in visits:
            _fail(p, a.stage, f"{what} serves a visit at stage {a.visit_stage}, but the plan has no such visit of "
                              f"{a.block}")


def verify_layout(p: Program) -> None:
    a = p.arena
    if a is None:
        _fail(p, None, "no arena: run the prefetch pass")
    for s in a.slots:
        if s.offset_bytes + s.size_bytes > a.size_bytes or s.offset_bytes % a.alignment_bytes:
            _fail(p, None, f"arena slot {s.index} at {s.offset_bytes}+{s.size_bytes} is outside the "
                           f"{a.size_bytes}-byte arena or not {a.alignment_bytes}-byte aligned")
    # Non-empty slots must be disjoint: sorted by start, each must begin at or after the furthest end so far.
    end, owner = 0, -1
    for s0, e0, i0 in sorted((s.offset_bytes, s.offset_bytes + s.size_bytes, s.index) for s in a.slots):
        if e0 == s0:
            continue
        if s0 < end:
            _fail(p, None, f"arena slots {owner} and {i0} overlap ({s0}..{min(end, e0)})")
        if e0 > end:
            end, owner = e0, i0
    bmap = p.block_map()
    resident_in: dict[int, str] = {}
    for b in p.blocks:
        if b.residency is None:
            _fail(p, None, f"block {b.name} has no residency: run the residency pass")
        if b.residency == Residency.resident:
            if b.slot is None or not 0 <= b.slot < len(a.slots) or a.slots[b.slot].kind != SlotKind.resident:
                _fail(p, None, f"resident block {b.name} has no resident slot")
            if a.slots[b.slot].size_bytes < b.size_bytes:
                _fail(p, None, f"block {b.name} ({b.size_bytes} B) does not fit slot {b.slot}")
            if b.slot in resident_in:
                _fail(p, None, f"resident blocks {resident_in[b.slot]} and {b.name} share slot {b.slot}")
            resident_in[b.slot] = b.name
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
    if p.prediction is not None:
        if p.prediction.peak_hbm_bytes > p.budget_bytes:
            _fail(p, None, f"predicted peak {fmt_bytes(p.prediction.peak_hbm_bytes)} exceeds the budget")
        peak = fixed + max(prof, default=0)
        if p.prediction.peak_hbm_bytes < peak:
            _fail(p, None, f"the recorded predicted peak {p.prediction.peak_hbm_bytes} B understates the {peak} B "
                           f"(arena + workspace + activations) the plan's own steps need")


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
                    span = visit_span[(a.block, a.visit_stage)]
                    if span[1] >= s:
                        _fail(p, s, f"{a.block} is freed before its last use at stage {span[1]}")
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
    verify_structure(program)
    verify_layout(program)
    verify_memory(program)
    verify_actions(program)
    return program


VERIFY = Pass("verify", verify, requires=("actions",))
