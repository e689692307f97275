"""Actions: the copy_start, copy_done and free the runtime executes, inserted from the prefetch schedule.

Requires: ``prefetch`` (visits with slots and issue stages).
Ensures: each streamed visit has exactly one ``copy_start``, one ``copy_done`` and one ``free``; actions sit only on
hookable stages (or at the forward's end); at one stage entry frees come first (they release slots that the
copies issued there land in), then copies in FIFO order, then waits.

Weights are clean, so eviction is a free: the slot is released once the visit's last reader is done, with no copy
back. (KV blocks, which are dirty, never leave HBM in these plans: the KV cache lives there.)
"""

from __future__ import annotations

from memintent.ir.model import Action, ActionKind, Program
from memintent.passes.manager import Pass
from memintent.passes.prefetch import schedule_of

_KIND_ORDER = {ActionKind.free: 0, ActionKind.copy_start: 1, ActionKind.copy_done: 2}


def insert_actions(program: Program) -> Program:
    p = program   # in place: run_passes hands the pipeline its own copy
    sched, _, _ = schedule_of(p)
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
    n = len(p.stages)
    for a in p.actions:
        assert a.stage == n or p.stages[a.stage].module, f"action on unhookable stage {a.stage}"
    keys = [(a.stage, _KIND_ORDER[a.kind]) for a in p.actions]
    assert keys == sorted(keys)


ACTIONS = Pass("actions", insert_actions, requires=("prefetch",), ensures=_ensure)
