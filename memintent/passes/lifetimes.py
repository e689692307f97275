"""Lifetimes: object first/last use, urgency step, stages and block visits.

Requires: ``trace`` (steps with uses/defs, blocks).
Ensures: every used object has ``first_use <= last_use``; stages partition the steps in order; every block that a
stage needs has a visit covering that stage.

An object's live range is its span in the dependency graph (``passes.graph``): from the first step that defines or
reads it to the last, and on to the end of any module call it is an argument of (eager PyTorch keeps a module's
arguments alive until the call returns).
"""

from __future__ import annotations

from memintent.ir.model import ObjectKind, Program, Stage, Visit
from memintent.passes.graph import dependency_graph, live_range, module_calls
from memintent.passes.manager import Pass, ensure


def build_stages(program: Program) -> list[Stage]:
    """Maximal runs of consecutive steps owned by one block module (or by root glue)."""
    obj_block = {o.name: o.block for o in program.objects if o.kind == ObjectKind.weight}
    stages: list[Stage] = []
    for s in program.steps:
        if not stages or stages[-1].block != s.block:
            stages.append(Stage(index=len(stages), module=s.block, block=s.block, first_step=s.index,
                                last_step=s.index))
        st = stages[-1]
        st.last_step = s.index
        for u in s.uses:
            b = obj_block.get(u)
            if b is not None and b not in st.needs:
                st.needs.append(b)
    return stages


def build_visits(stages: list[Stage], block_order: list[str]) -> list[Visit]:
    """One visit per maximal run of consecutive stages needing a block, ordered by first stage then block order."""
    rank = {b: i for i, b in enumerate(block_order)}
    open_: dict[str, Visit] = {}
    visits: list[Visit] = []
    for st in stages:
        for b in st.needs:
            v = open_.get(b)
            if v is not None and v.last_stage == st.index - 1:
                v.last_stage = st.index
            else:
                v = Visit(block=b, first_stage=st.index, last_stage=st.index)
                open_[b] = v
                visits.append(v)
    visits.sort(key=lambda v: (v.first_stage, rank.get(v.block, 0)))
    return visits


def lifetimes(program: Program) -> Program:
    p = program   # in place: run_passes hands the pipeline its own copy
    g = dependency_graph(p.steps)
    calls = module_calls(p.steps)
    for o in p.objects:
        # Activations are what frames hold; a weight is held by its module whatever the calls.
        held = calls if o.kind == ObjectKind.buffer else None
        o.first_use, o.last_use = live_range(g, o.name, held) or (None, None)
        o.urgency_step = o.first_use
    p.stages = build_stages(p)
    p.visits = build_visits(p.stages, [b.name for b in p.blocks])
    return p


def _ensure(p: Program) -> None:
    bad = [o.name for o in p.objects if o.first_use is not None and not o.first_use <= o.last_use]
    ensure(not bad, f"objects with first_use after last_use: {bad[:3]}")
    firsts = [s.first_step for s in p.stages]
    ensure(firsts == sorted(firsts), "stages are not in step order")
    covered = {(v.block, i) for v in p.visits for i in range(v.first_stage, v.last_stage + 1)}
    uncovered = [(b, st.index) for st in p.stages for b in st.needs if (b, st.index) not in covered]
    ensure(not uncovered, f"(block, stage) needs no visit covers: {uncovered[:3]}")


def activation_profile(program: Program) -> list[int]:
    """Bytes of live buffers (step outputs and inputs) at each step; an object is live from its first to last use."""
    n = len(program.steps)
    delta = [0] * (n + 1)
    for o in program.objects:
        if o.kind == ObjectKind.buffer and o.first_use is not None:
            delta[o.first_use] += o.size_bytes
            delta[o.last_use + 1] -= o.size_bytes
    live, out = 0, []
    for i in range(n):
        live += delta[i]
        out.append(live)
    return out


LIFETIMES = Pass("lifetimes", lifetimes, requires=("trace",), ensures=_ensure)
