"""The requests a generation plan is planned for, and the step costs the planner simulates their run with.

``compile --workload FILE``, ``--synthetic N`` or ``--arrival-rate R`` give the planner a ``RunWorkload``: each
request's prompt and output length and its arrival time. For every candidate plan the planner asks for the run
of those requests to be simulated (``Simulate``: ``engine.simulate.simulate_run``, passed in by the command, since
compiler/ does not import engine/) and picks the candidate whose run is best for the objective.

A simulated run costs each engine step by the plan's cost model: ``StepTimes.predict_all`` is
``planner.StepPredictor.predict_s`` for many steps at once. The non-attention ops' seconds per stage depend only on
the step's (tokens, sequences) and are computed once per shape for every candidate (``OpCosts``, numpy over the
ops of the traced step); the attention ops add their work per step; the plan's stream schedule turns the stages'
compute into the step's time through the event model of ``passes.simulate``, run once for all the steps together
(``passes.simulate.step_times``). tests/test_workload.py checks that ``StepTimes`` and ``StepPredictor`` agree.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from memintent.errors import MemintentError
from memintent.ir.model import (
    HardwareProfile,
    KVPool,
    Program,
    Residency,
    RunPrediction,
    SlotKind,
)
from memintent.kv import attention
from memintent.passes.costs import (
    MappedRead,
    attention_kind,
    attention_time_s,
    dequant_time_s,
    gemm_table,
    is_matmul,
    launches,
    mappable_reads,
    reads_at,
    stage_link_s,
    table_tflops,
    visit_copy_s,
)
from memintent.passes.schedule import make_schedule
from memintent.passes.simulate import step_times
from memintent.units import fmt_s

SERIES_POINTS = 24       # points of a run's concurrency series


@dataclass(frozen=True, slots=True)
class RunWorkload:
    """Requests by their lengths: ``prompt_lens[i]`` prompt tokens, ``gen_lens[i]`` tokens to generate (its
    ``max_new_tokens``: simulated requests never stop early), arriving ``arrivals_s[i]`` seconds after the first."""

    prompt_lens: tuple[int, ...]
    gen_lens: tuple[int, ...]
    arrivals_s: tuple[float, ...]
    source: str                          # where the requests come from, for the summary
    arrival_rate: float = 0.0            # requests per second of the Poisson arrivals; 0: all at the start

    def __post_init__(self) -> None:
        if not self.prompt_lens or not (len(self.prompt_lens) == len(self.gen_lens) == len(self.arrivals_s)):
            raise MemintentError("a workload needs at least one request, each with a prompt length, an output "
                                 "length and an arrival time")
        if min(self.prompt_lens) < 1 or min(self.gen_lens) < 1:
            raise MemintentError("every request of a workload needs at least one prompt token and one token to "
                                 "generate")

    @classmethod
    def of(cls, prompt_lens, gen_lens, source: str, *, arrival_rate: float | None = None,
           seed: int = 0) -> RunWorkload:
        """Requests that all arrive at the start, or (``arrival_rate`` R > 0) as a Poisson process of R requests
        per second, seeded: the first at 0, then exponential gaps (Python's own generator, the same on any
        machine), in the order given."""
        prompt_lens, gen_lens = tuple(int(p) for p in prompt_lens), tuple(int(g) for g in gen_lens)
        if arrival_rate is None or arrival_rate == 0:
            return cls(prompt_lens, gen_lens, (0.0,) * len(prompt_lens), source)
        if not arrival_rate > 0 or math.isinf(arrival_rate):
            raise MemintentError(f"--arrival-rate {arrival_rate} must be a positive number of requests per second")
        rng = random.Random(seed)
        t, arrivals = 0.0, []
        for i in range(len(prompt_lens)):
            arrivals.append(t)
            t += rng.expovariate(arrival_rate)
        return cls(prompt_lens, gen_lens, tuple(arrivals), source, arrival_rate)

    @property
    def requests(self) -> int:
        return len(self.prompt_lens)

    @property
    def prompt_tokens(self) -> int:
        return sum(self.prompt_lens)

    @property
    def generated_tokens(self) -> int:
        return sum(self.gen_lens)

    @property
    def longest(self) -> int:
        """The most tokens one request holds at its end (prompt + generated)."""
        return max(p + g for p, g in zip(self.prompt_lens, self.gen_lens))

    def mean_pages(self, page_tokens: int, context: int) -> float:
        """KV pages a request holds when it samples its last token (its prompt and all but that token cached, at
        most ``context``), on average."""
        return statistics.fmean(-(-min(p + g - 1, context) // page_tokens)
                                for p, g in zip(self.prompt_lens, self.gen_lens))

    def summary(self) -> str:
        p, g = self.prompt_lens, self.gen_lens
        when = (f"Poisson arrivals at {self.arrival_rate:g} requests/s over {self.arrivals_s[-1]:.1f} s"
                if self.arrival_rate else "all at the start")
        return (f"{self.source}: {self.requests} requests, prompts {min(p)}..{max(p)} tokens (mean "
                f"{statistics.fmean(p):.0f}), outputs {min(g)}..{max(g)} (mean {statistics.fmean(g):.0f}), {when}")


@dataclass(frozen=True, slots=True)
class Targets:
    """``--objective latency`` with a workload: the p99 time to first token and per output token to meet."""

    ttft_s: float | None = None
    tpot_s: float | None = None

    def misses(self, run: RunPrediction) -> float:
        """How far ``run`` is from the targets: 0 when it meets them, else the largest p99 / target - 1."""
        over = [run.ttft_p99_s / self.ttft_s - 1 if self.ttft_s else 0.0,
                run.tpot_p99_s / self.tpot_s - 1 if self.tpot_s else 0.0]
        return max(0.0, *over)

    def describe(self) -> str:
        parts = [f"p99 time to first token <= {fmt_s(self.ttft_s)}" if self.ttft_s else "",
                 f"p99 time per output token <= {fmt_s(self.tpot_s)}" if self.tpot_s else ""]
        return " and ".join(p for p in parts if p)


@dataclass(slots=True)
class SimRun:
    """What ``Simulate`` returns: the predicted run (None when it did not finish), the engine's records of the
    simulated steps (their ``start_s`` and ``time_s`` predicted), and why it stopped early."""

    prediction: RunPrediction | None
    records: list = field(default_factory=list)
    why: str = ""                      # "": finished; else why the run was not finished

    @property
    def run_s(self) -> float:
        return self.prediction.run_s if self.prediction is not None else math.inf


class StepCost(Protocol):
    def predict_all(self, records: list) -> np.ndarray: ...
    def predict_s(self, record) -> float: ...


# ``simulate(plan, workload, step_cost, admission=..., give_up_s=...)``: the run of ``workload`` under ``plan``
# (a program with its generation, KV pool, prediction and KV object: what the engine's scheduler reads), each
# step costed by ``step_cost``; a run longer than ``give_up_s`` stops there (it cannot beat the best so far).
Simulate = Callable[..., SimRun]


class OpCosts:
    """The device seconds and kernel launches of a traced step's non-attention ops, summed per stage, at any (tokens,
    sequences): the arithmetic of ``AffineStep.stage_times`` (``passes.costs``: a matmul at its token count's rate,
    the rest at the card's) over numpy arrays, memoized per shape. Shared by every candidate of a search (the ops and
    the hardware are the same for all of them)."""

    def __init__(self, step, hw: HardwareProfile, is_attention: Callable[[str], bool]):
        steps = step.p.steps
        self.base, self.hw = step.base, hw
        self.f0 = np.array([s.flops for s in steps], dtype=float)               # (ops,)
        self.b0 = np.array([s.hbm_bytes for s in steps], dtype=float)           # (ops,)
        d = np.array(step.d_steps, dtype=float).reshape(len(steps), 4)          # (ops, 4): dF/dt, dB/dt, dF/ds, dB/ds
        self.df_t, self.db_t, self.df_s, self.db_s = d.T
        self.attn = np.array([is_attention(s.op) for s in steps], dtype=bool)   # (ops,)
        self.matmul = np.array([is_matmul(s.op) for s in steps], dtype=bool)    # (ops,)
        # Each matmul's rate table (``gemm_table``: by its weight's dtype and shape), as an index into the few
        # distinct tables, so a shape's rates are one interpolation per table.
        tables = [gemm_table(hw, shape) for shape in step.shapes]
        distinct = {id(t): t for t in tables}
        self.tables = list(distinct.values())
        order = {k: i for i, k in enumerate(distinct)}
        self.table_of = np.array([order[id(t)] for t in tables], dtype=int)      # (ops,)
        self.first = np.array([st.first_step for st in step.p.stages], dtype=int)   # (stages,)
        self.last = np.array([st.last_step for st in step.p.stages], dtype=int)
        cum_attn = np.concatenate([[0], np.cumsum(self.attn)])
        self.attn_per_stage = (cum_attn[self.last + 1] - cum_attn[self.first]).astype(float)   # (stages,)
        self._memo: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _per_stage(self, x: np.ndarray) -> np.ndarray:
        cum = np.concatenate([[0.0], np.cumsum(x)])
        return cum[self.last + 1] - cum[self.first]

    def stages_s(self, tokens: int, seqs: int) -> tuple[np.ndarray, np.ndarray]:
        """((stages,) device seconds, (stages,) kernels) of each stage's non-attention ops at (tokens, seqs)."""
        key = (tokens, seqs)
        out = self._memo.get(key)
        if out is None:
            dt, ds = tokens - self.base[0], seqs - self.base[1]
            flops = np.maximum(0.0, np.round(self.f0 + self.df_t * dt + self.df_s * ds))
            hbm = np.maximum(0.0, np.round(self.b0 + self.db_t * dt + self.db_s * ds))
            hw = self.hw
            rates = np.array([table_tflops(t, tokens, hw.bf16_tflops) for t in self.tables])   # (tables,)
            rate = np.where(self.matmul, rates[self.table_of], hw.bf16_tflops) * 1e12
            t = np.maximum(flops / rate, hbm / (hw.hbm_gbps * 1e9))
            idle = ((flops == 0) & (hbm == 0)) | self.attn                        # no work: no time, no launch
            t[idle] = 0.0
            out = self._memo[key] = (self._per_stage(t), self._per_stage((~idle).astype(float)))
        return out


class StepTimes:
    """``StepPredictor.predict_s`` for a candidate plan (its residency, bit widths and stream slots decided), for
    many engine steps at once: ``predict_all(records)`` (the engine's ``StepRecord``s, or anything with their
    tokens, sequences and attention fields)."""

    def __init__(self, ops: OpCosts, program: Program, pool: KVPool, heads: int, head_dim: int, kv_heads: int,
                 reads: dict[str, MappedRead] | None = None):
        """``reads``: the blocks that can be read in place (``costs.mappable_reads`` of the traced step; None: of
        ``program``'s steps), which ``program`` maps or not."""
        self.ops, self.heads, self.head_dim, self.kv_heads = ops, heads, head_dim, kv_heads
        self.program, self.objects = program, program.object_map()
        self.reads = mappable_reads(program) if reads is None else reads
        self.hw = hw = program.hardware
        self.token_bytes = pool.page_bytes // (pool.page_tokens * pool.layers)
        self.kind = attention_kind(pool)
        streamed = {b.name for b in program.blocks if b.residency == Residency.streamed}
        k = sum(1 for s in program.arena.slots if s.kind == SlotKind.stream)
        self.sched = make_schedule(program.stages, program.visits, streamed, k)
        bmap = program.block_map()
        self.copy_s = visit_copy_s(program)
        self.deq_s = {i: dequant_time_s(bmap[v.block], hw) for i, v in enumerate(program.visits)}
        self._spare_copy_s: dict[int, dict[int, float]] = {0: self.copy_s}   # blocks in spare pages -> copy_s

    def predict_all(self, records: list) -> np.ndarray:
        """(steps,) predicted seconds of each record's step."""
        if not records:
            return np.zeros(0)
        cols = []
        for r in records:
            work = attention.attention_work(
                heads=self.heads, head_dim=self.head_dim, decode_context_tokens=r.decode_context_tokens,
                prefill_context_tokens=r.prefill_context_tokens, prefill_pairs=r.prefill_pairs,
                kv_token_bytes=self.token_bytes, kv_heads=self.kv_heads, kernel=self.hw.attention == "kernel")
            attn_s = attention_time_s(work.flops, work.hbm_bytes, self.hw, self.kind)
            device, kernels = self.ops.stages_s(max(r.tokens, 1), max(r.sequences, 1))
            kernels = kernels + self.ops.attn_per_stage * launches(work.flops, work.hbm_bytes)
            # stage_time_s over arrays: the device time, or the host's launches when they take longer
            cols.append(np.maximum(device + self.ops.attn_per_stage * attn_s, kernels * self.hw.launch_overhead_s))
        return step_times(np.stack(cols, axis=1), self.sched, self._copies(records), self.deq_s,   # (stages, steps)
                          link_s=self._link_s(records))                                          # -> (steps,)

    def _copies(self, records: list) -> dict[int, float | np.ndarray]:
        """Each visit's copy time, or, where some records held blocks in the KV pool's spare pages, (steps,) arrays:
        those blocks copy within HBM in those steps (``costs.visit_copy_s``)."""
        held = [getattr(r, "spare_blocks", 0) for r in records]
        if not any(held):
            return self.copy_s
        for k in set(held) - set(self._spare_copy_s):
            self._spare_copy_s[k] = visit_copy_s(self.program, k)
        return {i: np.array([self._spare_copy_s[k][i] for k in held]) for i in self.copy_s}

    def _link_s(self, records: list) -> dict[int, np.ndarray]:
        """By stage, (steps,) seconds of the plan's mapped reads in each record's step (its tokens' rows, the head on
        its sequences)."""
        per_step = [stage_link_s(self.program, reads=reads_at(self.reads, (r.tokens, r.sequences)),
                                 objects=self.objects) for r in records]
        stages = {s for d in per_step for s in d}
        return {s: np.array([d.get(s, 0.0) for d in per_step]) for s in stages}

    def predict_s(self, record) -> float:
        return float(self.predict_all([record])[0])


__all__ = ["RunWorkload", "Targets", "SimRun", "Simulate", "StepCost", "OpCosts", "StepTimes"]
