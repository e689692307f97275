"""The schedule model and its event simulation: one copy engine (FIFO), one compute stream, events between them.

Policy (what ``make_schedule`` decides, for a given set of streamed blocks and ``k`` stream slots):
- Streamed visits are copied in visit order (first stage, then block order): the copy engine is a FIFO.
- Visit ``v`` lands in stream slot ``v mod k``. With equal-size slots and a FIFO engine this is the optimal
  colouring of the slot-occupancy intervals: a copy can start no earlier than its slot's previous occupant is
  released, and round robin releases the oldest occupant first.
- A visit's copy is issued as early as possible: on entry to the stage where its slot's previous occupant is freed
  (for the first visits of a forward, that occupant is in the previous forward: the copy is issued in its tail).
- Compute waits for a visit's arrival on entry to the latest hookable stage at or before the visit's first stage;
  the slot is freed on entry to the first hookable stage after the visit's last stage (or at the forward's end).

``simulate`` runs that schedule for a few forwards back to back and reports the steady-state forward (the last
one) and the very first one, whose leading copies start at time 0 with nothing to hide behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(slots=True)
class CopyEvent:
    visit: int                               # index into Program.visits
    forward: int
    issue_s: float
    start_s: float
    end_s: float


@dataclass(slots=True)
class SimResult:
    step_time_s: float                       # steady-state forward
    first_step_time_s: float                 # first forward from a cold start
    compute_s: float
    stall_s: float                           # steady state: compute waiting on copies
    stage_start_s: list[float] = field(default_factory=list)   # steady-state forward, from its start
    stage_end_s: list[float] = field(default_factory=list)
    stage_stall_s: list[float] = field(default_factory=list)
    copies: list[CopyEvent] = field(default_factory=list)      # steady-state forward's copies, times from its start
    copy_busy_s: float = 0.0                 # seconds the copy engine works per forward


def hookable(stages: list[Stage]) -> list[bool]:
    return [bool(s.module) for s in stages]


def make_schedule(stages: list[Stage], visits: list[Visit], streamed: set[str], k: int) -> Schedule | None:
    """The schedule for ``streamed`` blocks in ``k`` slots, or None when ``k`` slots cannot hold it."""
    n = len(stages)
    hook = hookable(stages)
    order = [i for i, v in enumerate(visits) if v.block in streamed]
    if not order:
        return Schedule(0, [], {}, {}, {}, {}, {})
    if k < 1:
        return None
    wait, free = {}, {}
    for i in order:
        v = visits[i]
        w = next((s for s in range(v.first_stage, -1, -1) if hook[s]), None)
        if w is None:
            return None          # no hook before the first use: such a block must stay resident
        wait[i] = w
        free[i] = next((s for s in range(v.last_stage + 1, n) if hook[s]), n)
    k = min(k, len(order))
    slot, issue, nxt = {}, {}, {}
    for j, i in enumerate(order):
        slot[i] = j % k
        if j >= k:
            prev = order[j - k]
            issue[i], nxt[i] = free[prev], False
        else:
            # The previous occupant is the last visit of the previous forward that used this slot.
            prev_j = max(jj for jj in range(len(order)) if jj % k == j % k)
            issue[i], nxt[i] = free[order[prev_j]], True
    # Keep issue order FIFO: copies go out in visit order, those for the next forward last. Round robin can free
    # a later visit's slot first at the wrap (an odd number of visits over two slots); such a copy waits for its
    # predecessor's issue rather than overtaking it on the copy engine.
    seq = [i for i in order if not nxt[i]] + [i for i in order if nxt[i]]
    running = 0
    for i in seq:
        running = max(running, issue[i])
        issue[i] = running
    for i in order:
        if not nxt[i] and issue[i] > wait[i]:
            return None              # the slot is still in use when its next occupant is needed: too few slots
    return Schedule(k, order, slot, wait, free, issue, nxt)


def simulate(stages: list[Stage], visits: list[Visit], sched: Schedule, copy_s: dict[int, float],
             dequant_s: dict[int, float] | None = None, forwards: int = 3) -> SimResult:
    """Event simulation of ``forwards`` back-to-back forwards; ``copy_s[visit]`` is each copy's duration."""
    n = len(stages)
    dequant_s = dequant_s or {}
    compute = [s.time_s for s in stages]
    # copies issued at each stage entry (n: at the forward's end), split by which forward they serve
    at_stage: list[list[int]] = [[] for _ in range(n + 1)]
    for i in sched.visits:
        at_stage[sched.issue_stage[i]].append(i)
    waits_at: list[list[int]] = [[] for _ in range(n)]
    for i in sched.visits:
        waits_at[sched.wait_stage[i]].append(i)

    engine_free = 0.0
    arrive: dict[tuple[int, int], float] = {}     # (forward, visit) -> arrival
    events: dict[tuple[int, int], CopyEvent] = {}

    def issue(i: int, fwd: int, t: float) -> None:
        nonlocal engine_free
        start = max(t, engine_free)
        end = start + copy_s[i]
        engine_free = end
        arrive[(fwd, i)] = end
        events[(fwd, i)] = CopyEvent(i, fwd, t, start, end)

    t = 0.0
    starts_all, ends_all, stalls_all, fwd_start = [], [], [], []
    # Cold start: copies that a previous forward would have issued in its tail go out at time 0.
    for i in sched.visits:
        if sched.issue_next[i]:
            issue(i, 0, 0.0)
    for f in range(forwards):
        fwd_start.append(t)
        starts, ends, stalls = [], [], []
        for s in range(n):
            entry = t
            for i in at_stage[s]:
                fwd = f + 1 if sched.issue_next[i] else f
                issue(i, fwd, entry)
            ready = entry
            for i in waits_at[s]:
                ready = max(ready, arrive[(f, i)] + dequant_s.get(i, 0.0))
            stalls.append(ready - entry)
            starts.append(ready)
            t = ready + compute[s]
            ends.append(t)
        for i in at_stage[n]:
            issue(i, f + 1 if sched.issue_next[i] else f, t)
        starts_all.append(starts)
        ends_all.append(ends)
        stalls_all.append(stalls)
    last = forwards - 1
    t0 = fwd_start[last]
    step_time = (ends_all[last][-1] if n else t) - t0
    first_time = (ends_all[0][-1] if n else 0.0)
    copies = [CopyEvent(e.visit, e.forward, e.issue_s - t0, e.start_s - t0, e.end_s - t0)
              for (f, _), e in sorted(events.items()) if f == last]
    return SimResult(
        step_time_s=step_time, first_step_time_s=first_time, compute_s=sum(compute),
        stall_s=sum(stalls_all[last]),
        stage_start_s=[x - t0 for x in starts_all[last]], stage_end_s=[x - t0 for x in ends_all[last]],
        stage_stall_s=stalls_all[last], copies=copies,
        copy_busy_s=sum(copy_s[i] for i in sched.visits),
    )
