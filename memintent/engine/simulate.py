"""The engine's run, simulated: the engine's own scheduler (``scheduler.Scheduler``) over a pool of pages and a swap
space that holds no memory, fed requests of given lengths at given times, each step costed by the plan's cost
model instead of run. The planner calls ``simulate_run`` for each candidate plan it weighs (``compile
--workload``; compiler/ does not import engine/, so the command hands it over), and the chosen plan records its
run (``GenerationPlan.run``), which ``explain`` shows and ``generate`` prints beside the measured one.

The loop is the engine's (``core.Engine.step`` with one part): the scheduler makes a batch; a batch that carries no
tokens and moves no pages is no step (nothing can run: the engine's fault, here an unfinished run); the batch is
postprocessed with one token per sampling chunk and recorded with ``core.record_step``. Simulated requests never
meet a stop id (they ignore end-of-sequence ids, like ``generate --synthetic``'s): each generates its
``max_new_tokens``, or stops at the plan's context. So, with every request at the start, the simulated steps are
the engine's steps, token for token and preemption for preemption: the schedule is a function of the requests and
the plan alone (tests/test_workload.py runs both).

Time: each step takes its predicted time; a request arriving at time t joins the scheduler before the first step
that starts at or after t. Steps are costed in runs, to cost many at once (``compiler.workload.StepTimes``): until
the next arrival, as many steps as could fit before it even at the cheapest step's time are scheduled, then costed
together; within one step of an arrival, one step at a time.
"""

from __future__ import annotations

import bisect
import dataclasses
import math

import numpy as np

from memintent.compiler.workload import SERIES_POINTS, RunWorkload, SimRun, StepCost
from memintent.engine.core import StepRecord, record_step
from memintent.engine.metrics import _quantile
from memintent.engine.pages import PagePool, SwapSpace
from memintent.engine.requests import SYNTHETIC
from memintent.engine.scheduler import Costs, Scheduler
from memintent.engine.spare_pages import SparePages
from memintent.engine.sequence import Request, Sequence
from memintent.errors import MemintentError
from memintent.ir.model import Program, RunPrediction

MAX_BATCHED_STEPS = 4096       # steps costed together at most (bounds the (stages, steps) array)


class _Clock:
    """The simulated run's steps and their predicted times."""

    def __init__(self, step_cost: StepCost):
        self.cost = step_cost
        self.records: list[StepRecord] = []
        self.end_s: list[float] = []             # each step's end, from the run's start
        self.now_s = 0.0
        cheapest = StepRecord(index=0, start_s=0.0, time_s=0.0, tokens=1, decode_tokens=1, prefill_tokens=0,
                              sequences=1, used_pages=1, decode_context_tokens=1)
        self.cheapest_s = _predict(step_cost, [cheapest])[0]

    def steps_before(self, next_arrival_s: float) -> int:
        """How many steps can run before the next arrival, even if each took the cheapest step's time."""
        if math.isinf(next_arrival_s):
            return MAX_BATCHED_STEPS
        if self.cheapest_s <= 0:
            return 1
        return int(min(MAX_BATCHED_STEPS, max(1, (next_arrival_s - self.now_s) / self.cheapest_s)))

    def advance(self, records: list[StepRecord]) -> None:
        """Cost ``records`` (a step without tokens only moves pages: no forward, no time) and move the clock."""
        times = _predict(self.cost, [r for r in records if r.tokens])
        it = iter(times)
        for r in records:
            t = float(next(it)) if r.tokens else 0.0
            self.records.append(dataclasses.replace(r, start_s=self.now_s, time_s=t))
            self.now_s += t
            self.end_s.append(self.now_s)


def _predict(step_cost: StepCost, records: list) -> np.ndarray:
    many = getattr(step_cost, "predict_all", None)
    if many is not None:
        return many(records)
    return np.array([step_cost.predict_s(r) for r in records])


def simulate_run(plan: Program, workload: RunWorkload, step_cost: StepCost, *, admission: str | None = None,
                 admission_class_tokens: int | None = None, give_up_s: float | None = None) -> SimRun:
    """The run of ``workload`` under ``plan`` (one GPU: a program with its generation, KV pool, prediction and KV
    object, what the engine's scheduler reads), each step costed by ``step_cost`` (``predict_all(records)`` or
    ``predict_s(record)``: a ``compiler.planner.StepPredictor`` or ``compiler.workload.StepTimes``).
    ``admission``, ``admission_class_tokens``: the scheduler's admission order and longest-output's class (default:
    the plan's). A run still going at ``give_up_s`` stops there, unfinished."""
    g, kv = plan.generation, plan.kv_pool
    too_long = next((p for p in workload.prompt_lens if p > g.context), None)
    if too_long is not None:
        raise MemintentError(f"a request of the workload has a prompt of {too_long} tokens, more than the plan's "
                             f"context {g.context}")
    pool = PagePool(kv.num_pages)
    # A swap space of pages of no bytes: the scheduler's bookkeeping without the host memory.
    sched = Scheduler(pool, SwapSpace(kv.swap_pages, 0, pin=False), Costs.of(plan), max_seqs=g.max_seqs,
                      step_tokens=g.step_tokens, context=g.context, admission=admission or g.admission,
                      admission_class_tokens=admission_class_tokens or g.admission_class_tokens)
    order = sorted(range(workload.requests), key=lambda i: (workload.arrivals_s[i], i))
    clock, seqs, nxt = _Clock(step_cost), {}, 0
    spare = SparePages(plan, pool) if g.spare_pages == "on" else None
    while True:
        while nxt < len(order) and workload.arrivals_s[order[nxt]] <= clock.now_s:
            i = order[nxt]
            seqs[i] = sched.add(Request(id=str(i), prompt_ids=(0,) * workload.prompt_lens[i],
                                        max_new_tokens=workload.gen_lens[i], sampling=SYNTHETIC))
            nxt += 1
        next_arrival_s = workload.arrivals_s[order[nxt]] if nxt < len(order) else math.inf
        if not sched.has_work:
            if nxt == len(order):
                break
            clock.now_s = next_arrival_s          # idle until the next request arrives
            continue
        stuck = _run_steps(sched, pool, clock, clock.steps_before(next_arrival_s), spare)
        if stuck:
            return SimRun(None, clock.records, stuck)
        if give_up_s is not None and clock.now_s > give_up_s:
            return SimRun(None, clock.records, f"stopped at {clock.now_s:.3f} s: longer than the best run so far "
                                               f"({give_up_s:.3f} s)")
    return SimRun(_prediction(workload, clock, seqs), clock.records)


def _run_steps(sched: Scheduler, pool: PagePool, clock: _Clock, count: int, spare: SparePages | None) -> str:
    """Schedule and record up to ``count`` steps (the engine's step, tokens sampled as 0, the spare pages' rules
    applied as the engine applies them), then cost them; why the run cannot go on, or ""."""
    records: list[StepRecord] = []
    why = ""
    for _ in range(count):
        if not sched.has_work:
            break
        batch = sched.schedule()
        if not (batch.chunks or batch.freed_pages or batch.new_pages):
            why = (f"no sequence can run at step {batch.index}: the KV pool cannot hold the next request's first "
                   f"chunk ({pool.free_pages} of {pool.num_pages - 1} pages free)")
            break
        if spare is not None:
            spare.update([sched], batch)
        # Postprocessed at its step's index; _prediction turns indices into the steps' predicted end times.
        sched.postprocess(batch, [0] * sum(1 for c in batch.chunks if c.sample), float(batch.index))
        records.append(record_step(batch, 0.0, 0.0, pool.used_pages))
    clock.advance(records)
    return why


def _prediction(workload: RunWorkload, clock: _Clock, seqs: dict[int, Sequence]) -> RunPrediction:
    end = clock.end_s
    ttft, tpot = [], []
    for i, seq in seqs.items():
        first, last = end[int(seq.first_token_s)], end[int(seq.finish_s)]
        ttft.append(first - workload.arrivals_s[i])
        n = len(seq.generated)
        if n > 1:
            tpot.append((last - first) / (n - 1))
    run_s = clock.now_s
    generated = sum(len(s.generated) for s in seqs.values())
    starts = [r.start_s for r in clock.records]
    interval_s = run_s / SERIES_POINTS
    series = [clock.records[max(0, bisect.bisect_right(starts, j * interval_s) - 1)].sequences
              for j in range(SERIES_POINTS)] if clock.records else []
    return RunPrediction(
        workload=workload.summary(), requests=workload.requests, prompt_tokens=workload.prompt_tokens,
        generated_tokens=generated, arrival_rate=workload.arrival_rate, run_s=run_s,
        tokens_per_s=generated / run_s if run_s > 0 else 0.0, steps=len(clock.records),
        preemptions=sum(len(r.preemptions) for r in clock.records),
        ttft_median_s=_quantile(ttft, 0.5) or 0.0, ttft_p99_s=_quantile(ttft, 0.99) or 0.0,
        tpot_median_s=_quantile(tpot, 0.5) or 0.0, tpot_p99_s=_quantile(tpot, 0.99) or 0.0,
        concurrency=series, series_interval_s=interval_s)


def workload_of(requests: list[Request], source: str, *, arrival_rate: float | None = None,
                seed: int = 0) -> RunWorkload:
    """The planner's view of ``requests`` (``requests.load`` or ``requests.synthetic``): each one's prompt length
    and ``max_new_tokens``, all at the start or (``arrival_rate``) at seeded Poisson times, in the order given."""
    return RunWorkload.of([len(r.prompt_ids) for r in requests], [r.max_new_tokens for r in requests], source,
                          arrival_rate=arrival_rate, seed=seed)


__all__ = ["simulate_run", "workload_of"]
