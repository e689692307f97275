"""The schedule: for a set of streamed blocks and ``k`` stream slots, which slot each streamed visit lands in and on
entry to which stage its copy is issued, compute waits for it and its slot is freed.

These rules live here and nowhere else: the residency search, the prefetch pass (and through it the actions pass,
``memintent simulate`` and the report's timelines) and the tests that build plans by hand all call
``make_schedule``. The verifier does not: it proves whatever actions a plan holds, not that they are these.

Policy:

- Streamed visits are copied in visit order (first stage, then block order): the copy engine is a FIFO.
- Slot: visit ``v`` lands in stream slot ``v mod k``. With equal-size slots and a FIFO engine this is the optimal
  colouring of the slot-occupancy intervals: a copy can start no earlier than its slot's previous occupant is
  released, and round robin releases the oldest occupant first.
- Wait: compute waits for a visit's arrival on entry to the latest hookable stage at or before the visit's first
  stage. A visit with no such stage cannot stream (no hook runs before its first use): its block stays resident.
- Free: the slot is freed on entry to the first hookable stage after the visit's last stage, or at the forward's
  end.
- Unpack: a quantized visit unpacks at its wait into the plan's one unpack slot, which holds its weights until its
  free. One slot serves every quantized visit when no two of those [wait, free] spans overlap (a free runs before
  a wait on the same stage's entry): ``unpack_shareable``. Otherwise each stream slot holds its visit's unpacked
  weights too.
- Issue: a visit's copy is issued as early as possible, on entry to the stage where its slot's previous occupant is
  freed (for the first visits of a forward that occupant is in the previous forward: the copy is issued in its
  tail), but never before the copy ahead of it in FIFO order.
"""

from __future__ import annotations

from dataclasses import dataclass

from memintent.ir.model import Stage, Visit


@dataclass(slots=True)
class Schedule:
    k: int                                   # stream slots (prefetch depth)
    visits: list[int]                        # indices into Program.visits of streamed visits, FIFO order
    slot: dict[int, int]                     # visit index -> stream slot (0..k-1)
    wait_stage: dict[int, int]               # stage on whose entry compute waits for the visit's copy
    free_stage: dict[int, int]               # stage on whose entry the slot is freed (len(stages): forward end)
    issue_stage: dict[int, int]              # stage on whose entry the copy is issued
    issue_next: dict[int, bool]              # issued in the previous forward's tail


def hookable(stages: list[Stage]) -> list[bool]:
    """Whether the runtime can act on entry to each stage: only a stage with a module has a forward pre-hook."""
    return [bool(s.module) for s in stages]


def wait_stages(hook: list[bool]) -> list[int | None]:
    """For each stage, the latest hookable stage at or before it: where compute waits for a visit starting there
    (None: no hook runs before it)."""
    out: list[int | None] = []
    last = None
    for s, h in enumerate(hook):
        if h:
            last = s
        out.append(last)
    return out


def free_stages(hook: list[bool]) -> list[int]:
    """For each stage, the first hookable stage after it: where a visit ending there is freed (``len(hook)``: the
    forward's end)."""
    n = len(hook)
    out = [n] * n
    after = n
    for s in range(n - 1, -1, -1):
        out[s] = after
        if hook[s]:
            after = s
    return out


def _round_robin(order: list[int], free: dict[int, int], k: int) -> tuple[dict, dict, dict]:
    """Slot ``j mod k`` for the ``j``-th streamed visit; its copy is issued where the slot's previous occupant is
    freed. For the first ``k`` visits that occupant is the last visit of the previous forward in the same slot."""
    slot, issue, nxt = {}, {}, {}
    last = len(order) - 1
    for j, i in enumerate(order):
        slot[i] = j % k
        if j >= k:
            issue[i], nxt[i] = free[order[j - k]], False
        else:
            prev_j = last - (last - j) % k     # the last position with the same slot
            issue[i], nxt[i] = free[order[prev_j]], True
    return slot, issue, nxt


def _keep_fifo(order: list[int], issue: dict[int, int], nxt: dict[int, bool]) -> None:
    """Keep issue order FIFO: copies go out in visit order, those for the next forward last. Round robin can free a
    later visit's slot first at the wrap (an odd number of visits over two slots); such a copy waits for its
    predecessor's issue rather than overtaking it on the copy engine."""
    running = 0
    for i in [i for i in order if not nxt[i]] + [i for i in order if nxt[i]]:
        running = max(running, issue[i])
        issue[i] = running


def make_schedule(stages: list[Stage], visits: list[Visit], streamed: set[str], k: int) -> Schedule | None:
    """The schedule for ``streamed`` blocks in ``k`` slots, or None when ``k`` slots cannot hold it (or a streamed
    block is read before any hook could wait for it)."""
    order = [i for i, v in enumerate(visits) if v.block in streamed]
    if not order:
        return Schedule(0, [], {}, {}, {}, {}, {})
    if k < 1:
        return None
    hook = hookable(stages)
    wait_at, free_at = wait_stages(hook), free_stages(hook)
    wait = {i: wait_at[visits[i].first_stage] for i in order}
    if any(w is None for w in wait.values()):
        return None              # no hook before the first use: such a block must stay resident
    free = {i: free_at[visits[i].last_stage] for i in order}
    k = min(k, len(order))
    slot, issue, nxt = _round_robin(order, free, k)
    _keep_fifo(order, issue, nxt)
    if any(not nxt[i] and issue[i] > wait[i] for i in order):
        return None              # the slot is still in use when its next occupant is needed: too few slots
    return Schedule(k, order, slot, wait, free, issue, nxt)


def unpack_shareable(stages: list[Stage], visits: list[Visit], blocks: set[str]) -> bool:
    """Whether one unpack slot can serve every visit of ``blocks`` (those that may stream quantized): their [wait,
    free] stage spans follow one another, each free at or before the next wait (frees run first on a stage's
    entry)."""
    hook = hookable(stages)
    wait_at, free_at = wait_stages(hook), free_stages(hook)
    spans = sorted((wait_at[v.first_stage], free_at[v.last_stage]) for v in visits
                   if v.block in blocks and wait_at[v.first_stage] is not None)
    return all(free <= nxt for (_, free), (nxt, _) in zip(spans, spans[1:]))
