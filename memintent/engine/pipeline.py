"""Serving a pipeline (``compile --stages N``): the model's decoder layers split over N GPUs, each stage a plan of
its own under its own budget, streaming its own weights over its own host link with its own copy stream.

Micro-batches keep every stage busy. Requests are dealt round-robin to N groups, each with its own scheduler over
the one pool of KV pages (each stage holds its layers' part of every block). Time runs in ticks: at tick t group
t mod N's next step (a micro-batch) enters stage 0, and stage r runs the micro-batch that entered at tick t - r, so
all N stages (and their links) work at once on different micro-batches. A micro-batch leaves the last stage N - 1
ticks after it entered; its greedy tokens are broadcast to every rank, and its group schedules its next step at
the very next tick it owns, N ticks after the last: just in time. A sequence thus makes one token per N ticks,
and the pipeline one micro-batch of tokens per tick (``Pipeline.pipelined_step_s``).

Every rank runs every group's scheduler, in the same order, on the same tokens: the stages were planned to serve
the same steps over pools of the same blocks (``stages.verify_pipeline``) and weigh the same preemption costs
(``pipeline_costs``), so every rank makes the same decisions with no messages about them. Activations pass down
the stages by torch.distributed send/recv (hidden states (1, T, dim)); the tokens come back by broadcast.

Without a process group (one process) every stage runs here, on one device, in the same ticks (``LocalLink``):
the same micro-batches, so the same tokens bit for bit, under the sum of the stages' budgets.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from time import perf_counter
from typing import Callable

import torch

from memintent.engine.engine import EngineStats, Serving, StepRecord, _record, request_output
from memintent.engine.pages import PagePool, SwapSpace
from memintent.engine.runner import ModelRunner
from memintent.engine.sampling import StopConditions
from memintent.engine.scheduler import Costs, Scheduler, StepPlan
from memintent.engine.sequence import Request, RequestOutput, Sequence
from memintent.errors import MemintentError, RuntimeFault
from memintent.ir.model import Pipeline, Program


def pipeline_costs(stages: list[Program]) -> Costs:
    """The preemption costs of a step through every stage: a block's swap and recompute are each stage's share
    summed; the idle time a swap or a recompute can hide in is the least any stage has."""
    each = [Costs.of(p) for p in stages]
    return dataclasses.replace(
        each[0], evict_page_s=sum(c.evict_page_s for c in each),
        swap_in_page_s=sum(c.swap_in_page_s for c in each),
        recompute_page_s=sum(c.recompute_page_s for c in each), copy_idle_s=min(c.copy_idle_s for c in each),
        compute_slack_s=min(c.compute_slack_s for c in each))


# ---------------------------------------------------------------------------------------------------------------
# Links between stages


class LocalLink:
    """Every stage in this process: hidden states wait in a queue per receiving stage."""

    rank, world = 0, 1

    def __init__(self):
        self._boxes: dict[int, collections.deque] = collections.defaultdict(collections.deque)

    def stages(self, n: int) -> range:
        return range(n)

    def send(self, stage: int, hidden: torch.Tensor) -> None:
        self._boxes[stage + 1].append(hidden)

    def recv(self, stage: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self._boxes[stage].popleft()

    def tokens(self, tokens: list[int] | None, n: int) -> list[int]:
        return tokens

    def flush(self) -> None:
        """Nothing in flight."""


class DistLink:
    """One stage per rank of the default process group (``torchrun``; gloo on the CPU, NCCL on CUDA). Sends are
    non-blocking (a rank goes on to the tick's broadcast while its activations travel) and waited on before the
    next tick's send reuses nothing of theirs."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.dist, self.device = dist, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self._sends: list = []

    def stages(self, n: int) -> range:
        if n != self.world:
            raise MemintentError(f"the pipeline has {n} stages but {self.world} processes were started: start "
                                 f"one per stage (torchrun --nproc-per-node {n})")
        return range(self.rank, self.rank + 1)

    def send(self, stage: int, hidden: torch.Tensor) -> None:
        self.flush()
        self._sends.append((self.dist.isend(hidden.contiguous(), stage + 1), hidden))   # keep it alive in flight

    def recv(self, stage: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        self.dist.recv(t, stage - 1)
        return t

    def tokens(self, tokens: list[int] | None, n: int) -> list[int]:
        """The last stage's ``n`` sampled tokens, on every rank."""
        t = (torch.tensor(tokens, dtype=torch.long) if tokens is not None
             else torch.empty(n, dtype=torch.long)).to(self.device)
        self.dist.broadcast(t, src=self.world - 1)
        return t.tolist()

    def flush(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()


def rank_device(device: torch.device) -> torch.device:
    """The device this process serves on: under torchrun with several processes on CUDA, its own GPU
    (``LOCAL_RANK``), made current; else ``device``."""
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def link_from_env(device: torch.device):
    """A ``DistLink`` when this process was started as one of several (WORLD_SIZE > 1), else a ``LocalLink``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return LocalLink()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistLink(device)


# ---------------------------------------------------------------------------------------------------------------
# The engine


@dataclasses.dataclass(slots=True)
class _InFlight:
    group: int
    plan: StepPlan


class PipelineEngine(Serving):
    """``Engine``'s interface over a pipeline: ``add``, ``step`` (one tick), ``generate``, ``stats``, ``close``.
    ``link``: how the stages reach each other (``LocalLink`` when None: every stage here)."""

    def __init__(self, pipeline: Pipeline | str | os.PathLike, device: str | torch.device | None = None, *,
                 link=None, check: bool = False, preempt: str = "cost", allow_code: bool = False,
                 log: Callable[[str], None] | None = None):
        from memintent.models.plan_model import source_for
        from memintent.models.refs import resolve
        from memintent.runtime.device import pick_device

        self.pipeline = _load(pipeline)
        self.program = self.pipeline.stages[0]               # the steps every stage serves
        g, kv = self.program.generation, self.program.kv_pool
        if preempt == "swap":
            raise MemintentError("a pipeline's stages have no swap space: use --preempt cost or recompute")
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.link, self.n, self.check = link or LocalLink(), len(self.pipeline.stages), check
        self.log = log or (lambda line: None)
        self.local = self.link.stages(self.n)
        # Requests are checked and --verify's reference is built against the whole model.
        self.src = resolve(self.pipeline.model.ref, dtype=self.pipeline.model.dtype)
        self.pool = PagePool(kv.num_pages)
        self.stops = StopConditions.of(self.src)
        self.runners = {r: ModelRunner(self.pipeline.stages[r], source_for(self.pipeline.stages[r], allow_code),
                                       self.device, self.pool, check=check) for r in self.local}
        costs, swap = pipeline_costs(self.pipeline.stages), SwapSpace(0, kv.page_bytes, pin=False)
        self.groups = [Scheduler(self.pool, swap, costs, max_seqs=g.max_seqs, step_tokens=g.step_tokens,
                                 context=g.context, preempt=preempt, seq_ids=(i, self.n),
                                 stops=self.stops) for i in range(self.n)]
        self.stats = EngineStats(num_pages=kv.num_pages)
        self.tick, self._dealt, self._idle = 0, 0, 0
        self._inflight: dict[int, _InFlight] = {}
        self._t0: float | None = None
        self.track: set[str] = set()
        self.tracked_logits: dict[str, list[torch.Tensor]] = {}
        self.last_logits: torch.Tensor | None = None
        # Per stage here, one record per forward: its time from its input's arrival to its output (the device
        # synchronized), to compare with that stage's own PCIe floor; in one process a tick runs the stages in turn.
        self.stage_steps: dict[int, list[StepRecord]] = {r: [] for r in self.local}

    @property
    def report_program(self) -> Program:
        return report_program(self.pipeline, [self.pipeline.stages[r] for r in self.local])

    @property
    def scheduler(self):
        """The first group's scheduler (``steps`` counts the ticks its group ran)."""
        return self.groups[0]

    # -- requests ---------------------------------------------------------------------------------------------
    def add(self, request: Request) -> Sequence:
        self.validate(request)
        group = self.groups[self._dealt % self.n]
        self._dealt += 1
        return group.add(request)

    @property
    def has_work(self) -> bool:
        return bool(self._inflight) or any(s.has_work for s in self.groups)

    # -- ticks ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One tick: a micro-batch enters, every stage here runs its own, and one leaves the last stage."""
        if self._t0 is None:
            self._t0 = perf_counter()
        t, start_s = self.tick, perf_counter()
        self._enter(t)
        for r in self.local:
            entry = self._inflight.get(t - r)
            if entry is not None:
                self._run_stage(r, entry.plan)
        finished = self._leave(t - (self.n - 1), start_s)
        self.tick += 1
        # A whole round of ticks with nothing in flight: no group can schedule (the pool is too small for any).
        self._idle = 0 if self._inflight or finished else self._idle + 1
        if self._idle >= self.n and self.has_work:
            raise RuntimeFault("no sequence can run: the KV pool cannot hold the next request's first chunk "
                               f"({self.pool.free_pages} of {self.pool.num_pages - 1} blocks free)")
        return finished

    def _enter(self, t: int) -> None:
        group = self.groups[t % self.n]
        if not group.has_work:
            return
        plan = group.schedule()
        for p in plan.preemptions:
            self.log(p.describe())
        if plan.chunks or plan.freed_pages or plan.new_pages:
            self._inflight[t] = _InFlight(t % self.n, plan)

    def _run_stage(self, r: int, plan: StepPlan) -> None:
        runner = self.runners[r]
        if not plan.chunks:
            runner.move_pages(plan)
            return
        hidden = None
        # What this stage sent last tick has arrived (the next stage received it at this tick's start): waited on
        # before the forward, it is not device memory beside the step's activations, which the stage's proof counts.
        self.link.flush()
        if r == self.n - 1:
            self.last_logits = None       # the previous step's: not held through this one (the proof counts one)
        if r > 0:
            hidden = self.link.recv(r, (1, plan.tokens, runner.src.config.dim), runner.dtype)     # (1, T, dim)
        start_s = perf_counter()
        out = runner.forward(plan, hidden)           # (1, T, dim); the last stage's: logits (S, vocab)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.stage_steps[r].append(_record(plan, start_s - self._t0, perf_counter() - start_s,
                                           self.pool.used_pages))
        if r < self.n - 1:
            self.link.send(r, out)
        else:
            self.last_logits = out

    def _leave(self, t_entered: int, tick_start_s: float) -> list[RequestOutput]:
        """The micro-batch that entered at ``t_entered`` leaves the last stage: its tokens go to its group. Its
        record's time is this tick's (a micro-batch leaves per tick: their times sum to the run's)."""
        entry = self._inflight.pop(t_entered, None)
        if entry is None:
            return []
        plan = entry.plan
        sampled: list[int] = []
        mine = None
        if plan.chunks:
            last = self.runners.get(self.n - 1)
            mine = last.sampler.step(self.last_logits, plan.chunks) if last is not None else None
            sampled = self.link.tokens(mine.tokens if mine else None, sum(1 for c in plan.chunks if c.sample))
            if self.track and mine is not None:
                self.keep_logits(plan, self.last_logits)
        now = perf_counter() - self._t0
        finished, freed = self.groups[entry.group].postprocess(plan, sampled, now, mine.logprobs if mine else None)
        for runner in self.runners.values():
            runner.poison(freed)
        if self.check:
            self.pool.check()
        self.stats.steps.append(_record(plan, tick_start_s - self._t0, perf_counter() - tick_start_s,
                                        self.pool.used_pages))
        return [request_output(s) for s in finished]

    def reset_stats(self) -> None:
        self.stats = EngineStats(num_pages=self.stats.num_pages)
        self.stage_steps = {r: [] for r in self.local}
        self._t0 = None

    def close(self) -> None:
        self.link.flush()
        for runner in self.runners.values():
            runner.close()


def _load(pipeline) -> Pipeline:
    from memintent.passes.verify import verify_pipeline
    from memintent.ir.plan_file import load_plan_or_pipeline

    loaded = pipeline if isinstance(pipeline, Pipeline) else load_plan_or_pipeline(pipeline)
    if not isinstance(loaded, Pipeline):
        raise MemintentError(f"{pipeline} is one plan, not a pipeline: serve it with memintent.Engine")
    return verify_pipeline(loaded)


def report_program(pipeline: Pipeline, programs: list[Program]) -> Program:
    """What the stages this process runs promise together, as one program for the serving report: the bytes they
    stream, their peaks and budgets summed (in one process they share one device; a rank holds one), and the
    pipeline's tick as the step."""
    p0, step_s = programs[0], pipeline.pipelined_step_s
    pr = p0.prediction.model_copy(update=dict(
        streamed_bytes=sum(p.prediction.streamed_bytes for p in programs),
        peak_hbm_bytes=sum(p.prediction.peak_hbm_bytes for p in programs), step_time_s=step_s))
    return p0.model_copy(update=dict(
        name=pipeline.name, prediction=pr, budget_bytes=sum(p.budget_bytes or 0 for p in programs),
        arena=p0.arena.model_copy(update=dict(size_bytes=sum(p.arena.size_bytes for p in programs)))))


__all__ = ["DistLink", "LocalLink", "PipelineEngine", "link_from_env", "pipeline_costs", "rank_device",
           "report_program"]
