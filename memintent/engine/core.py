"""The serving engine: requests in, results out, one tick at a time. One core serves a plan on one GPU and a
pipeline of parts over several GPUs (``compile --gpus N``).

    with Engine("p.json", device="cuda") as engine:
        for out in engine.generate([Request("a", (1, 2, 3), max_new_tokens=16)]):
            print(out.id, out.token_ids, out.finish_reason)

Each step the scheduler packs tokens into a ``Batch`` (``scheduler.py``), the runner of each part moves swapped
pages and runs its part of the model (``runner.py``), the last part's logits give each sampling chunk its token,
and finished sequences return their pages. ``generate`` yields each request's result as soon as it finishes.

A plan on one GPU is a pipeline of one part. With N parts, micro-batches keep every part busy: requests are dealt
round-robin to N groups, each with its own scheduler over the one pool of KV pages (each part holds its layers'
share of every page). Time runs in ticks: at tick t group t mod N's next batch enters part 0, and part r runs the
batch that entered at tick t - r, so all N parts (and their links) work at once on different batches. A batch
leaves the last part N - 1 ticks after it entered; its tokens reach every rank (``links``), and its group
schedules its next batch at the very next tick it owns, N ticks after the last: just in time. With one part a tick
is a step: schedule, run, sample.

Every rank runs every group's scheduler, in the same order, on the same tokens: the parts were planned to serve the
same steps over pools of the same pages (``passes.verify.verify_pipeline``) and weigh the same preemption costs
(``Costs.of_parts``), so every rank makes the same decisions with no messages about them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from time import perf_counter
from typing import Callable, Iterable, Iterator

import torch

from memintent.engine.links import LocalLink
from memintent.engine.pages import PagePool, SwapSpace
from memintent.engine.requests import validate
from memintent.engine.runner import ModelRunner
from memintent.engine.sampling import (
    Drawn,
    Sampled,
    Sampler,
    SamplingParams,
    StopConditions,
)
from memintent.engine.scheduler import Batch, Costs, Preemption, Scheduler
from memintent.engine.sequence import Request, RequestOutput, Sequence, State
from memintent.engine.spare_pages import SparePages
from memintent.engine.step_inputs import Carried
from memintent.errors import MemintentError, RuntimeFault
from memintent.ir.model import Pipeline, Program
from memintent.ir.proven import Proven
from memintent.models.plan_model import PlanSources, plan_sources
from memintent.passes.verify import prove
from memintent.runtime.device import pick_device, sync
from memintent.runtime.host_store import HostStore


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How an engine runs a plan: the same fields for one GPU and for a pipeline."""

    device: torch.device
    check: bool = False           # checked mode: returned pages and freed slots poisoned, pool invariants checked
    preempt: str = "cost"         # "cost" (swap or recompute by predicted cost), or forced "swap" / "recompute"
    allow_code: bool = False      # run a py: factory the plan names
    resident: bool = False        # the reference engine: every weight on the device (one plan, not a pipeline)
    log: Callable[[str], None] | None = None   # called with one line per preemption decision
    attention: str = "auto"       # "kernel" (Triton, CUDA), "reference" (gather + SDPA), "auto": the kernel on CUDA
    graphs: bool = True           # decode steps replay CUDA graphs (CUDA, outside checked mode)
    lookahead: bool | None = None  # launch the next step before reading this one's tokens (None: on CUDA, one part)
    spare_pages: bool | None = None   # hold streamed blocks in the pool's spare pages (None: as the plan says)


@dataclass(frozen=True, slots=True)
class StepRecord:
    """What one engine step did (the run report, the trace and the report's plots read these)."""

    index: int
    start_s: float                # from the start of the run
    time_s: float                 # wall time of the step, host scheduling and the device sync included
    tokens: int
    decode_tokens: int            # chunks of one token (a running sequence's next token)
    prefill_tokens: int
    sequences: int
    used_pages: int               # KV pool pages owned after the step
    preemptions: tuple[Preemption, ...] = ()
    swapped_in: int = 0           # sequences whose pages came back in this step
    decode_context_tokens: int = 0   # keys the decode tokens attended to (the sum of their contexts)
    prefill_context_tokens: int = 0  # keys the prompt chunks read (the sum of their contexts)
    prefill_pairs: int = 0        # (query, key) pairs the prompt chunks scored
    spare_blocks: int = 0         # streamed blocks copied from the pool's spare pages, not the host (spare_pages)


@dataclass(slots=True)
class EngineStats:
    steps: list[StepRecord] = field(default_factory=list)
    num_pages: int = 0

    @property
    def preemptions(self) -> list[Preemption]:
        return [p for s in self.steps for p in s.preemptions]


def record_step(batch: Batch, start_s: float, time_s: float, used_pages: int) -> StepRecord:
    """What the step held: its tokens by kind and the attention work they did (the cost model's inputs)."""
    dec = [c for c in batch.chunks if c.length == 1]
    pre = [c for c in batch.chunks if c.length > 1]
    return StepRecord(
        index=batch.index, start_s=start_s, time_s=time_s, tokens=batch.tokens, decode_tokens=len(dec),
        prefill_tokens=batch.tokens - len(dec), sequences=len(batch.chunks), used_pages=used_pages,
        preemptions=tuple(batch.preemptions), swapped_in=len(batch.swap_in),
        decode_context_tokens=sum(c.start + 1 for c in dec),
        prefill_context_tokens=sum(c.start + c.length for c in pre),
        prefill_pairs=sum(c.length * c.start + c.length * (c.length + 1) // 2 for c in pre),
        spare_blocks=batch.spare_blocks)


def request_output(seq: Sequence) -> RequestOutput:
    """A finished sequence's result: its generated tokens, its text cut at a stop string, logprobs, its times."""
    n = len(seq.generated)
    tpot = (seq.finish_s - seq.first_token_s) / (n - 1) if n > 1 else None
    return RequestOutput(id=seq.request.id, token_ids=list(seq.generated), finish_reason=seq.finish_reason,
                         ttft_s=seq.first_token_s, tpot_s=tpot, preemptions=list(seq.preemptions),
                         text=seq.stop_text,
                         logprobs=list(seq.logprobs) if seq.request.sampling.logprobs is not None else None)


def report_program(pipeline: Pipeline, programs: list[Program]) -> Program:
    """What the parts this process runs promise together, as one program for the serving report: the bytes they
    stream, their peaks and budgets summed (in one process they share one device; a rank holds one), and the
    pipeline's tick as the step."""
    p0, step_s = programs[0], pipeline.pipelined_step_s
    pr = p0.prediction.model_copy(update=dict(
        streamed_bytes=sum(p.prediction.streamed_bytes for p in programs),
        peak_hbm_bytes=sum(p.prediction.peak_hbm_bytes for p in programs), step_time_s=step_s))
    return p0.model_copy(update=dict(
        name=pipeline.name, prediction=pr, budget_bytes=sum(p.budget_bytes or 0 for p in programs),
        arena=p0.arena.model_copy(update=dict(size_bytes=sum(p.arena.size_bytes for p in programs)))))


@dataclasses.dataclass(slots=True)
class _InFlight:
    group: int
    batch: Batch


class Engine:
    """A generation plan (or pipeline), ready to serve: ``add``, ``step`` (one tick), ``generate``, ``stats``,
    ``close``, and the ``with`` form.

    ``plan``: a ``Proven`` plan (``passes.verify.prove``), or a plan file, ``Program`` or ``Pipeline``, proven here.
    ``options`` (or its fields as keywords, ``device`` among them): ``RunOptions``. ``sources``: the plan's models,
    already resolved and checked (``models.plan_model.plan_sources``; done here when left out). ``link``: how the parts reach
    each other (``links``; every part in this process when left out). ``store``: a host store already filled for
    the plan (one GPU; benchmarks reuse one across engines)."""

    def __init__(self, plan: Proven | Program | Pipeline | str | os.PathLike, device: str | torch.device | None = None,
                 *, options: RunOptions | None = None, sources: PlanSources | None = None, link=None,
                 store: HostStore | None = None, **option_fields):
        self.proven = prove(plan).generation_plan(getattr(plan, "name", None) or str(plan))
        if options is None:
            dev = device if isinstance(device, torch.device) else pick_device(device)
            options = RunOptions(device=dev, **option_fields)
        self.options = opts = options
        self.program, self.n = self.proven.program, self.proven.parts
        self._refuse_for_pipeline(opts, store)
        g, kv = self.program.generation, self.program.kv_pool
        self.device, self.check = opts.device, opts.check
        self.log = opts.log or (lambda line: None)
        self.link = link or LocalLink()
        self.local = self.link.parts(self.n)
        sources = sources or plan_sources(self.proven, opts.allow_code, self.local)
        self.src = sources.whole
        self.stops = StopConditions.of(self.src)              # the model's end-of-sequence ids and tokenizer
        self.sampler = Sampler(self.device)
        self.pool = PagePool(kv.num_pages)
        self.runners = {r: ModelRunner(self.proven.part(r), sources.parts[r], self.device, self.pool,
                                       check=opts.check, store=store, resident=opts.resident,
                                       attention_backend=opts.attention, graphs=opts.graphs) for r in self.local}
        self.warm_s = sum(r.warm_s for r in self.runners.values())   # first uses done before the run
        swap = self.runners[0].swap if self.n == 1 else SwapSpace(0, kv.page_bytes, pin=False)
        costs = Costs.of_parts([self.proven.part(r).program for r in range(self.n)])
        self.groups = [Scheduler(self.pool, swap, costs, max_seqs=g.max_seqs, step_tokens=g.step_tokens,
                                 context=g.context, preempt=opts.preempt, seq_ids=(i, self.n), stops=self.stops,
                                 admission=g.admission, admission_class_tokens=g.admission_class_tokens)
                       for i in range(self.n)]
        self.spare = self._spare_pages(opts)
        self.stats = EngineStats(num_pages=kv.num_pages)
        self.tick, self._dealt, self._idle = 0, 0, 0
        self._inflight: dict[int, _InFlight] = {}
        self._cancel_later: set[int] = set()          # sequence ids cancelled while in a batch in flight
        self.closed = False
        self._t0: float | None = None
        self.track: set[str] = set()                          # request ids whose logits are kept (--verify)
        self.tracked_logits: dict[str, list[torch.Tensor]] = {}
        self.last_logits: torch.Tensor | None = None
        # Per part here, with several parts: one record per forward, its time from its input's arrival to its output
        # (the device synchronized), to compare with that part's own PCIe floor. One part is timed by its ticks.
        self.part_steps: dict[int, list[StepRecord]] = {r: [] for r in self.local} if self.n > 1 else {}
        self.lookahead = self._lookahead(opts)
        if self.device.type == "cuda" and self.n == 1:
            self.warm_s += self._warm_step()

    def _warm_step(self) -> float:
        """Run and forget a step of the plan's full step tokens of prompt and one decode step: the first step with
        that many rows loads the library kernels it uses (cuBLAS loads them lazily) and grows the allocator, which
        inside the run made its first prompt step 4 x its length (opt-30b, H200). Returns the seconds it took."""
        t0 = perf_counter()
        g = self.proven.program.generation
        if g.context < 3:                               # no room for a prompt and two new tokens: nothing to warm
            return 0.0
        per = g.context - 2                             # prompt tokens a request may bring (two new tokens follow)
        sizes = [min(per, g.step_tokens - i * per) for i in range(min(g.max_seqs, -(-g.step_tokens // per)))]
        warm = [Request(f"memintent-warm-up-{i}", (0,) * n, max_new_tokens=2, sampling=SamplingParams(ignore_eos=True))
                for i, n in enumerate(sizes)]
        list(self.generate(warm))
        self.reset_stats()
        sync(self.device)
        return perf_counter() - t0

    def _spare_pages(self, opts: RunOptions) -> SparePages | None:
        """The spare-page rules (``spare_pages``) where the plan asks for them (or ``opts.spare_pages`` says so) and
        streams blocks from the host: one part, the streamed engine (not the resident reference)."""
        wanted = opts.spare_pages if opts.spare_pages is not None else self.program.generation.spare_pages == "on"
        if not wanted or self.n > 1 or opts.resident:
            return None
        spare = SparePages(self.program, self.pool)
        return spare if spare.order else None

    def _lookahead(self, opts: RunOptions) -> bool:
        """Whether a step's successor is scheduled and launched before its tokens are read (``_step_ahead``): by
        default on CUDA, where it hides the host's work between steps behind the device's; one part only."""
        if opts.lookahead and self.n > 1:
            raise MemintentError("lookahead is for a plan on one GPU: a pipeline's parts already overlap their "
                                 "micro-batches (leave lookahead unset)")
        return self.n == 1 and (opts.lookahead if opts.lookahead is not None else self.device.type == "cuda")

    def _refuse_for_pipeline(self, opts: RunOptions, store) -> None:
        if self.n == 1:
            return
        if opts.preempt == "swap":
            raise MemintentError("a pipeline's parts have no swap space: use --preempt cost or recompute")
        if opts.resident or store is not None:
            raise MemintentError("the resident reference engine and a given host store are for one plan, not a "
                                 "pipeline")

    @property
    def report_program(self) -> Program:
        """The program serving reports describe (a pipeline's parts here, as one)."""
        if self.n == 1:
            return self.program
        return report_program(self.proven.pipeline, [self.proven.part(r).program for r in self.local])

    @property
    def scheduler(self) -> Scheduler:
        """The first group's scheduler (``steps`` counts the ticks its group ran)."""
        return self.groups[0]

    # -- requests ---------------------------------------------------------------------------------------------
    def validate(self, request: Request) -> None:
        """Refuse what the plan cannot serve, naming the request (``requests.validate``), a request that is not a
        ``Request``, and any request once the engine is closed."""
        self.check_open()
        if not isinstance(request, Request):
            raise MemintentError(f"the engine serves Request objects, not {type(request).__name__}: build one with "
                                 "Request(id, prompt_ids, max_new_tokens)")
        validate(request, context=self.program.generation.context, vocab=self.src.vocab_size)
        self.stops.validate(request)

    def check_open(self) -> None:
        if self.closed:
            raise MemintentError("the engine is closed (its arena was released): make a new Engine to serve more "
                                 "requests")

    def add(self, request: Request) -> Sequence:
        self.validate(request)
        group = self.groups[self._dealt % self.n]
        self._dealt += 1
        self._idle = 0           # new work: idle ticks before it (a cancelled batch's last) are no stall
        return group.add(request)

    @property
    def has_work(self) -> bool:
        return bool(self._inflight) or any(s.has_work for s in self.groups)

    def generate(self, requests: Iterable[Request]) -> Iterator[RequestOutput]:
        """Serve ``requests`` (all arriving now; ids unique); yields each result as its request finishes. Closing
        the generator early (``break``) cancels the requests it queued that did not finish: their KV pages go back,
        and no later call returns them."""
        requests = list(requests)
        queued = {s.request.id for g in self.groups for s in g.sequences if s.state != State.finished}
        seen: set = set()
        for r in requests:
            self.validate(r)                # every request before any is queued: all or none
            if r.id in seen or r.id in queued:
                twice = "in this call" if r.id in seen else "in this call and queued already"
                raise MemintentError(f"request {r.id!r} appears twice ({twice}): the ids of the requests an engine "
                                     "serves at once must be unique")
            seen.add(r.id)
        mine = [self.add(r) for r in requests]
        try:
            while self.has_work:
                yield from self.step()
        finally:
            self.cancel([s for s in mine if s.state != State.finished])

    def cancel(self, sequences: list[Sequence]) -> None:
        """Drop unfinished sequences between steps: their pages (poisoned in checked mode) and swap slots go back.
        A sequence in a batch still in flight through a pipeline's parts is dropped when that batch leaves."""
        moving = {c.seq.seq_id for e in self._inflight.values() for c in e.batch.chunks}
        self._cancel_later.update(s.seq_id for s in sequences if s.seq_id in moving)
        for seq in sequences:
            if seq.seq_id not in moving:
                self._release(seq)

    def abort(self, request_id) -> bool:
        """Give up request ``request_id`` between steps (its client went away): ``cancel``. False if it is not being
        served (finished, or never added)."""
        seq = next((s for g in self.groups if (s := g.find(request_id)) is not None), None)
        if seq is None:
            return False
        self.cancel([seq])
        if self.check:
            self.pool.check()
        return True

    def _release(self, seq: Sequence) -> None:
        freed = next(g for g in self.groups if any(x is seq for x in g.sequences)).cancel(seq)
        for runner in self.runners.values():
            runner.poison(freed)

    # -- ticks ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One tick: a batch enters, every part here runs its own, and one leaves the last part; returns the
        requests that finished in it."""
        self.check_open()
        if self._t0 is None:
            self._t0 = perf_counter()
        if self.lookahead:
            finished = self._step_ahead()
        else:
            t, start_s = self.tick, perf_counter()
            entered = self._enter(t)
            for r in self.local:
                entry = self._inflight.get(t - r)
                if entry is not None:
                    self._run_part(r, entry.batch)
            finished = self._leave(t - (self.n - 1), start_s)
            self.tick += 1
            self._count_idle(entered)
        if self.spare is not None and not self.has_work and self.pool.spare_pages:
            self._release_spare()
        return finished

    def _release_spare(self) -> None:
        """Out of work: the blocks give their pages back now (``SparePages.release_all``), once the device has run
        every copy that may read them, so the next requests find the whole pool."""
        sync(self.device)
        self.runners[0].hold(self.spare.release_all())

    def _count_idle(self, entered: bool) -> None:
        """A whole round of ticks in which no group could schedule a batch: the pool is too small for any."""
        self._idle = 0 if entered else self._idle + 1
        if self._idle >= self.n and self.has_work:
            raise RuntimeFault("no sequence can run: the KV pool cannot hold the next request's first chunk "
                               f"({self.pool.free_pages} of {self.pool.num_pages - 1} pages free)")

    def _step_ahead(self) -> list[RequestOutput]:
        """One step of one part, looking ahead: this step was launched by the tick before (or now, after an idle
        one); its tokens are drawn on the device, its sequences advanced with their new tokens unread
        (``Scheduler.advance``), the next step scheduled and launched, reading those tokens on the device
        (``Carried``), and only then are they read. The host's work between steps runs while the device computes.
        Finishes by length are known before the tokens; a stop token is read one step late: the step launched
        ahead still runs its sequence, whose result there is dropped (``Batch.skipped``)."""
        t, start_s = self.tick, perf_counter()
        if t not in self._inflight and self._enter(t):
            self._run_part(0, self._inflight[t].batch)
        entry = self._inflight.pop(t, None)
        self.tick += 1
        self._count_idle(entry is not None)
        if entry is None:
            return []
        drawn = self._draw(entry.batch)
        self._advance(entry)
        if self._enter(t + 1):
            carried = Carried.of(drawn.tokens, entry.batch) if drawn is not None else None
            self._run_part(0, self._inflight[t + 1].batch, carried)
        return self._record(entry, drawn, start_s)

    def _enter(self, t: int) -> bool:
        """Group t mod N schedules its next batch, which enters the first part; whether one entered."""
        group = self.groups[t % self.n]
        if not group.has_work:
            return False
        batch = group.schedule()
        for p in batch.preemptions:
            self.log(p.describe())
        if not (batch.chunks or batch.freed_pages or batch.new_pages):
            return False
        if self.spare is not None:
            self.runners[0].hold(self.spare.update(self.groups, batch))
        self._inflight[t] = _InFlight(t % self.n, batch)
        return True

    def _run_part(self, r: int, batch: Batch, carried: Carried | None = None) -> None:
        runner = self.runners[r]
        if not batch.chunks:
            runner.move_pages(batch)
            return
        hidden = None
        # What this part sent last tick has arrived (the next part received it at this tick's start): waited on
        # before the forward, it is not device memory beside the step's activations, which the part's proof counts.
        self.link.flush()
        if r == self.n - 1:
            self.last_logits = None       # the previous step's: not held through this one (the proof counts one)
        if r > 0:
            hidden = self.link.recv(r, (1, batch.tokens, runner.src.config.dim), runner.dtype)     # (1, T, dim)
        start_s = perf_counter()
        out = runner.forward(batch, hidden, carried)  # (1, T, dim); the last part's: logits (S, vocab)
        if self.part_steps:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            self.part_steps[r].append(record_step(batch, start_s - self._t0, perf_counter() - start_s,
                                                  self.pool.used_pages))
        if r < self.n - 1:
            self.link.send(r, out)
        else:
            self.last_logits = out

    def _leave(self, t_entered: int, tick_start_s: float) -> list[RequestOutput]:
        """The batch that entered at ``t_entered`` leaves the last part: its tokens go to its group. Its record's
        time is this tick's (a batch leaves per tick: their times sum to the run's)."""
        entry = self._inflight.pop(t_entered, None)
        if entry is None:
            return []
        drawn = self._draw(entry.batch)
        self._advance(entry)
        return self._record(entry, drawn, tick_start_s)

    def _draw(self, batch: Batch) -> Drawn | None:
        """The step's tokens, drawn on the device in one batched call (``sampling.Sampler``) on the last part, not
        read yet; None where this process has no last part or the step sampled nothing."""
        if not batch.chunks or self.n - 1 not in self.runners:
            return None
        drawn = self.sampler.draw(self.last_logits, batch.chunks)
        if self.track:
            self.keep_logits(batch, self.last_logits)
        return drawn

    def _advance(self, entry: _InFlight) -> None:
        """The step's sequences advance before its tokens are read (``Scheduler.advance``); the pages of those that
        ended are poisoned (checked mode) now, before a step that may take them is launched."""
        ended = self.groups[entry.group].advance(entry.batch)
        for runner in self.runners.values():
            runner.poison(ended)

    @staticmethod
    def _read(drawn: Drawn | None) -> Sampled | None:
        """Wait for a step's tokens: the engine's one synchronisation with the device a step."""
        return drawn.read() if drawn is not None else None

    def _record(self, entry: _InFlight, drawn: Drawn | None, tick_start_s: float) -> list[RequestOutput]:
        """Read the step's tokens (every rank gets them: ``links``) and record them in its group."""
        batch = entry.batch
        mine = self._read(drawn)
        sampled = (self.link.tokens(mine.tokens if mine else None, sum(1 for c in batch.chunks if c.sample))
                   if batch.chunks else [])
        now = perf_counter() - self._t0
        finished, freed = self.groups[entry.group].record(batch, sampled, now, mine.logprobs if mine else None)
        for runner in self.runners.values():
            runner.poison(freed)
        finished = self._drop_cancelled(batch, finished)
        if self.check:
            self.pool.check()
        self.stats.steps.append(record_step(batch, tick_start_s - self._t0, perf_counter() - tick_start_s,
                                            self.pool.used_pages))
        return [request_output(s) for s in finished]

    def _drop_cancelled(self, batch: Batch, finished: list[Sequence]) -> list[Sequence]:
        """Sequences cancelled while this batch was in flight: cancelled now, their results dropped (no one waits for
        them)."""
        if not self._cancel_later:
            return finished
        late = [c.seq for c in batch.chunks if c.seq.seq_id in self._cancel_later]
        self._cancel_later.difference_update(s.seq_id for s in late)
        for seq in late:
            if seq.state != State.finished:
                self._release(seq)
        return [s for s in finished if all(s is not x for x in late)]

    def keep_logits(self, batch: Batch, logits: torch.Tensor) -> None:
        """Keep the tracked requests' rows of a step's logits (S, vocab), one row per sampling chunk."""
        rows = [c.seq.request.id for c in batch.chunks if c.sample]
        for j, rid in enumerate(rows):
            if rid in self.track:
                self.tracked_logits.setdefault(rid, []).append(logits[j].float().cpu())

    def reset_stats(self) -> None:
        """Forget the steps measured so far (after a warm-up), and start the clock again."""
        self.stats = EngineStats(num_pages=self.stats.num_pages)
        self.part_steps = {r: [] for r in self.part_steps}
        self._t0 = None

    def close(self) -> None:
        self.link.flush()
        for runner in self.runners.values():
            runner.close()
        self.closed = True

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Engine", "EngineStats", "RunOptions", "StepRecord", "record_step", "report_program",
           "request_output"]
