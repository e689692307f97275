"""The event model: one copy engine (FIFO), one compute stream, events between them, running a ``Schedule``
(``memintent.passes.schedule``, where the slot, wait, free and issue rules live).

``simulate`` runs the schedule for a few forwards back to back and reports the steady-state forward (the last
one) and the very first one, whose leading copies start at time 0 with nothing to hide behind. A stage starts
once the previous one ended and every copy it waits for has arrived and, quantized, been unpacked (on the compute
stream, after both); a copy starts once it is issued and the copy engine has finished the copy before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from memintent.ir.model import Stage, Visit
from memintent.passes.schedule import Schedule, make_schedule  # noqa: F401  (make_schedule: the old import path


@dataclass(slots=True)
class CopyEvent:
    visit: int                               # index into Program.visits
    forward: int
    issue_s: float
    start_s: float
    end_s: float
    ready_s: float = 0.0                     # usable: arrived, and a quantized one unpacked (set when its stage waits)


@dataclass(slots=True)
class SimResult:
    step_time_s: float                       # steady-state forward
    first_step_time_s: float                 # first forward from a cold start
    compute_s: float
    stall_s: float                           # steady state: compute waiting on copies and unpacking them
    stage_start_s: list[float] = field(default_factory=list)   # steady-state forward, from its start
    stage_end_s: list[float] = field(default_factory=list)
    stage_stall_s: list[float] = field(default_factory=list)
    copies: list[CopyEvent] = field(default_factory=list)      # steady-state forward's copies, times from its start
    copy_busy_s: float = 0.0                 # seconds the host link works per forward: copies and mapped reads


@dataclass(slots=True)
class _Forward:
    start_s: float
    stage_start_s: list[float] = field(default_factory=list)
    stage_end_s: list[float] = field(default_factory=list)
    stage_stall_s: list[float] = field(default_factory=list)


class _Run:
    """The copy engine's and the compute stream's clocks over consecutive forwards of one schedule."""

    def __init__(self, compute: list, sched: Schedule, copy_s: dict[int, float], dequant_s: dict[int, float],
                 later: Callable = max, link_s: dict | None = None):
        """``compute``: each stage's compute time, a float (or, with ``later=numpy.maximum``, an array of many steps'
        times for that stage, simulated at once: the clocks become arrays); ``link_s``: by stage, the seconds its
        mapped reads hold the host link (floats, or arrays like ``compute``'s)."""
        n = len(compute)
        self.sched, self.copy_s, self.dequant_s, self.later = sched, copy_s, dequant_s, later
        self.link_s = link_s or {}
        self.compute = compute
        # copies issued at each stage entry (n: at the forward's end), and the copies each stage waits for
        self.issued_at: list[list[int]] = [[] for _ in range(n + 1)]
        self.waits_at: list[list[int]] = [[] for _ in range(n)]
        for i in sched.visits:
            self.issued_at[sched.issue_stage[i]].append(i)
            self.waits_at[sched.wait_stage[i]].append(i)
        self.engine_free_s = 0.0
        self.arrive_s: dict[tuple[int, int], float] = {}     # (forward, visit) -> arrival
        self.events: dict[tuple[int, int], CopyEvent] = {}

    def issue(self, i: int, fwd: int, t: float) -> None:
        start = self.later(t, self.engine_free_s)
        end = start + self.copy_s[i]
        self.engine_free_s = end
        self.arrive_s[(fwd, i)] = end
        self.events[(fwd, i)] = CopyEvent(i, fwd, t, start, end)

    def issue_all(self, stage: int, f: int, t: float) -> None:
        for i in self.issued_at[stage]:
            self.issue(i, f + 1 if self.sched.issue_next[i] else f, t)

    def cold_start(self) -> None:
        """Copies that a previous forward would have issued in its tail go out at time 0."""
        for i in self.sched.visits:
            if self.sched.issue_next[i]:
                self.issue(i, 0, 0.0)

    def forward(self, f: int, t: float) -> tuple[_Forward, float]:
        """Forward ``f`` starting at ``t``: its stage times, and the time it ends."""
        out = _Forward(t)
        for s in range(len(self.compute)):
            entry = t
            self.issue_all(s, f, entry)
            ready = entry
            for i in self.waits_at[s]:
                # A quantized visit is unpacked on the compute stream once it has arrived (the runtime's copy_done:
                # wait, then dequantize): after the previous stage too. In a compute-bound step the unpacking is
                # compute time, not hidden behind the copy (opt-30b int4g at 24 GiB, H200: prompt steps of 4784
                # tokens ran 1.12 x their prediction, the unpacking 36.5 of ~500 ms).
                unpack_s = self.dequant_s.get(i, 0.0)
                ready = self.later(ready, self.arrive_s[(f, i)]) + unpack_s
                self.events[(f, i)].ready_s = ready if unpack_s else self.arrive_s[(f, i)]
            out.stage_stall_s.append(ready - entry)
            out.stage_start_s.append(ready)
            t = ready + self.compute[s]
            if s in self.link_s:      # its mapped reads: the stage and the copy engine's queue both wait for them
                self.engine_free_s = self.later(self.engine_free_s, ready) + self.link_s[s]
                t = t + self.link_s[s]
            out.stage_end_s.append(t)
        self.issue_all(len(self.compute), f, t)
        return out, t


def simulate(stages: list[Stage], visits: list[Visit], sched: Schedule, copy_s: dict[int, float],
             dequant_s: dict[int, float] | None = None, forwards: int = 3,
             link_s: dict[int, float] | None = None) -> SimResult:
    """Event simulation of ``forwards`` back-to-back forwards; ``copy_s[visit]`` is each copy's duration,
    ``link_s[stage]`` its mapped reads' time on the host link."""
    run = _Run([s.time_s for s in stages], sched, copy_s, dequant_s or {}, link_s=link_s)
    run.cold_start()
    t = 0.0
    done: list[_Forward] = []
    for f in range(forwards):
        fwd, t = run.forward(f, t)
        done.append(fwd)
    last, t0 = done[-1], done[-1].start_s
    n = len(stages)
    copies = [CopyEvent(e.visit, e.forward, e.issue_s - t0, e.start_s - t0, e.end_s - t0, e.ready_s - t0)
              for (f, _), e in sorted(run.events.items()) if f == forwards - 1]
    return SimResult(
        step_time_s=(last.stage_end_s[-1] if n else t) - t0, first_step_time_s=done[0].stage_end_s[-1] if n else 0.0,
        compute_s=sum(run.compute), stall_s=sum(last.stage_stall_s),
        stage_start_s=[x - t0 for x in last.stage_start_s], stage_end_s=[x - t0 for x in last.stage_end_s],
        stage_stall_s=last.stage_stall_s, copies=copies,
        copy_busy_s=sum(copy_s[i] for i in sched.visits) + sum(run.link_s.values()),
    )


def step_times(compute: np.ndarray, sched: Schedule, copy_s: dict[int, float],
               dequant_s: dict[int, float] | None = None, forwards: int = 3,
               link_s: dict[int, np.ndarray] | None = None) -> np.ndarray:
    """``simulate``'s steady-state forward time for many steps at once: ``compute`` is (stages, steps), each column
    one step's stage times, ``link_s`` by stage (steps,) arrays; the same event model, its clocks arrays over the
    steps. Returns (steps,)."""
    run = _Run(list(compute), sched, copy_s, dequant_s or {}, later=np.maximum, link_s=link_s)
    run.cold_start()
    t = np.zeros(compute.shape[1])
    start = t
    for f in range(forwards):
        start = t
        _, t = run.forward(f, t)
    return np.asarray(t - start, dtype=float)
