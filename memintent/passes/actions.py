"""Actions: the copy_start, copy_done and free the runtime executes, inserted from the prefetch schedule.

Requires: ``prefetch`` (visits with slots and issue stages).
Ensures: one ``copy_start``, one ``copy_done`` and one ``free`` per streamed visit, at the schedule's issue, wait
and free stages (which are hookable, or the forward's end); at one stage entry frees come first (they release slots
that the copies issued there land in), then copies in FIFO order, then waits. That these actions are safe to run is
the verifier's to prove, in the pass after this one.

Weights are clean, so eviction is a free: the slot is released once the visit's last reader is done, with no copy
back. (KV pages, which are dirty, never leave HBM in these plans: the KV cache lives there.)
"""

from __future__ import annotations

from memintent.ir.model import Action, ActionKind, Program, Residency
from memintent.passes.manager import Pass, ensure
from memintent.passes.prefetch import schedule_of

_KIND_ORDER = {ActionKind.free: 0, ActionKind.copy_start: 1, ActionKind.copy_done: 2}


def insert_actions(program: Program) -> Program:
    p = program   # in place: run_passes hands the pipeline its own copy
    sched, _ = schedule_of(p)
    fifo = {i: j for j, i in enumerate(sched.visits)}
    actions: list[tuple[tuple, Action]] = []
    for i in sched.visits:
        v = p.visits[i]
        common = dict(block=v.block, slot=v.slot, visit_stage=v.first_stage)
        nxt = sched.issue_next[i]
        actions.append(((sched.issue_stage[i], 1, nxt, fifo[i]),
                        Action(kind=ActionKind.copy_start, stage=sched.issue_stage[i], next_forward=nxt, **common)))
        actions.append(((sched.wait_stage[i], 2, False, fifo[i]),
                        Action(kind=ActionKind.copy_done, stage=sched.wait_stage[i], **common)))
        actions.append(((sched.free_stage[i], 0, False, fifo[i]),
                        Action(kind=ActionKind.free, stage=sched.free_stage[i], **common)))
    p.actions = [a for _, a in sorted(actions, key=lambda x: x[0])]
    return p


def _ensure(p: Program) -> None:
    # What the plan must satisfy to be safe (one copy per visit, hookable stages, ...) the verifier proves, right
    # after this pass; here only what this pass promises on top: the list order and one action of each kind per
    # streamed visit of the schedule.
    keys = [(a.stage, _KIND_ORDER[a.kind]) for a in p.actions]
    ensure(keys == sorted(keys), "actions are not ordered by stage, then free, copy_start, copy_done")
    streamed = {b.name for b in p.blocks if b.residency == Residency.streamed}
    visits = sum(1 for v in p.visits if v.block in streamed)
    ensure(len(p.actions) == 3 * visits, f"{len(p.actions)} actions for {visits} streamed visits (3 each)")


ACTIONS = Pass("actions", insert_actions, requires=("prefetch",), ensures=_ensure)
