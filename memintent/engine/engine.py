"""The serving engine: requests in, results out, one step of the plan at a time.

    engine = memintent.Engine("p.json", device="cuda")
    for out in engine.generate([Request("a", (1, 2, 3), max_new_tokens=16)]):
        print(out.id, out.token_ids, out.finish_reason)
    engine.close()

Each step the scheduler packs tokens (``scheduler.py``), the runner moves swapped pages and runs one forward over
the model (``runner.py``), the sampled tokens go back to their sequences, and finished sequences return their
blocks. ``generate`` yields each request's result as soon as it finishes. Tokens are chosen and sequences stop as
``sampling.py`` says.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from time import perf_counter
from typing import Callable, Iterable, Iterator

import torch

from memintent.engine.pages import PagePool
from memintent.engine.runner import ModelRunner
from memintent.engine.sampling import Sampled, StopConditions
from memintent.engine.scheduler import Costs, Preemption, Scheduler
from memintent.engine.sequence import Request, RequestOutput, Sequence
from memintent.errors import MemintentError, RuntimeFault
from memintent.ir.model import Program


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
    used_pages: int              # KV pool pages owned after the step
    preemptions: tuple[Preemption, ...] = ()
    swapped_in: int = 0           # sequences whose blocks came back in this step
    decode_context_tokens: int = 0   # keys the decode tokens attended to (the sum of their contexts)
    prefill_context_tokens: int = 0  # keys the prompt chunks read (the sum of their contexts)
    prefill_pairs: int = 0        # (query, key) pairs the prompt chunks scored


@dataclass(slots=True)
class EngineStats:
    steps: list[StepRecord] = field(default_factory=list)
    num_pages: int = 0

    @property
    def preemptions(self) -> list[Preemption]:
        return [p for s in self.steps for p in s.preemptions]


def _record(plan, start_s: float, time_s: float, used_pages: int) -> StepRecord:
    """What the step held: its tokens by kind and the attention work they did (the cost model's inputs)."""
    dec = [c for c in plan.chunks if c.length == 1]
    pre = [c for c in plan.chunks if c.length > 1]
    return StepRecord(
        index=plan.index, start_s=start_s, time_s=time_s, tokens=plan.tokens, decode_tokens=len(dec),
        prefill_tokens=plan.tokens - len(dec), sequences=len(plan.chunks), used_pages=used_pages,
        preemptions=tuple(plan.preemptions), swapped_in=len(plan.swap_in),
        decode_context_tokens=sum(c.start + 1 for c in dec),
        prefill_context_tokens=sum(c.start + c.length for c in pre),
        prefill_pairs=sum(c.length * c.start + c.length * (c.length + 1) // 2 for c in pre))


def _load(plan) -> Program:
    from memintent.ir.plan_file import load_program
    from memintent.passes.verify import verify

    return verify(plan if isinstance(plan, Program) else load_program(plan))


def request_output(seq: Sequence) -> RequestOutput:
    """A finished sequence's result: its generated tokens and its times."""
    n = len(seq.generated)
    tpot = (seq.finish_s - seq.first_token_s) / (n - 1) if n > 1 else None
    return RequestOutput(id=seq.request.id, token_ids=list(seq.generated), finish_reason=seq.finish_reason,
                         ttft_s=seq.first_token_s, tpot_s=tpot, preemptions=list(seq.preemptions),
                         text=seq.stop_text,
                         logprobs=list(seq.logprobs) if seq.request.sampling.logprobs is not None else None)


class Serving:
    """What ``Engine`` and the pipeline's engine share: requests checked against the plan (``program``) and the
    whole model (``src``), the serving loop, tracked logits (``--verify``) and the ``with`` form. A subclass
    provides ``add``, ``has_work``, ``step`` and ``close``."""

    program: Program
    src: object                                     # the whole model's source (vocabulary, --verify's reference)
    track: set[str]                                 # request ids whose logits are kept (--verify)
    tracked_logits: dict[str, list[torch.Tensor]]

    stops: StopConditions                           # the model's end-of-sequence ids and tokenizer

    def validate(self, request: Request) -> None:
        """Refuse what the plan cannot serve, naming the request (``requests.validate``)."""
        from memintent.engine.requests import validate

        validate(request, context=self.program.generation.context, vocab=self.src.vocab_size)
        self.stops.validate(request)

    def generate(self, requests: Iterable[Request]) -> Iterator[RequestOutput]:
        """Serve ``requests`` (all arriving now); yields each result as its request finishes."""
        for r in requests:
            self.add(r)
        while self.has_work:
            yield from self.step()

    def keep_logits(self, plan, logits: torch.Tensor) -> None:
        """Keep the tracked requests' rows of a step's logits (S, vocab), one row per sampling chunk."""
        rows = [c.seq.request.id for c in plan.chunks if c.sample]
        for j, rid in enumerate(rows):
            if rid in self.track:
                self.tracked_logits.setdefault(rid, []).append(logits[j].float().cpu())

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Engine(Serving):
    """A generation plan, ready to serve. ``resident``: the reference engine with every weight on the device
    (same scheduler, same steps). ``preempt``: "cost" (default), "swap" or "recompute". ``check``: checked mode
    (freed blocks poisoned with NaN, pool invariants checked after every step). ``log``: called with one line per
    preemption decision."""

    def __init__(self, plan: Program | str | os.PathLike, device: str | torch.device | None = None, *,
                 allow_code: bool = False, check: bool = False, store=None, preempt: str = "cost",
                 resident: bool = False, log: Callable[[str], None] | None = None):
        from memintent.models.plan_model import source_for
        from memintent.runtime.device import pick_device

        self.program = _load(plan)
        g, pool = self.program.generation, self.program.kv_pool
        if g is None or pool is None:
            raise MemintentError(f"{self.program.name} is not a generation plan: compile it with --objective "
                                 "throughput|latency")
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.src = source_for(self.program, allow_code)
        self.check, self.log = check, log or (lambda line: None)
        self.pool = PagePool(pool.num_pages)
        self.stops = StopConditions.of(self.src)
        self.runner = ModelRunner(self.program, self.src, self.device, self.pool, check=check, store=store,
                                  resident=resident)
        self.scheduler = Scheduler(self.pool, self.runner.swap, Costs.of(self.program), max_seqs=g.max_seqs,
                                   step_tokens=g.step_tokens, context=g.context, preempt=preempt,
                                   stops=self.stops)
        self.stats = EngineStats(num_pages=pool.num_pages)
        self._t0: float | None = None
        self.track: set[str] = set()                          # request ids whose logits are kept (--verify)
        self.tracked_logits: dict[str, list[torch.Tensor]] = {}

    @property
    def report_program(self) -> Program:
        """The program serving reports describe (a pipeline's engine describes its stages as one)."""
        return self.program

    # -- requests ---------------------------------------------------------------------------------------------
    def add(self, request: Request) -> Sequence:
        self.validate(request)
        return self.scheduler.add(request)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # -- steps ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that finished in it."""
        if self._t0 is None:
            self._t0 = perf_counter()
        t = perf_counter()
        plan = self.scheduler.schedule()
        if not plan.chunks and not plan.swap_in and not plan.preemptions:
            raise RuntimeFault("no sequence can run: the KV pool cannot hold the next request's first chunk "
                               f"({self.pool.free_pages} of {self.pool.num_pages - 1} blocks free)")
        for p in plan.preemptions:
            self.log(p.describe())
        sampled = self.runner.execute(plan) if plan.chunks else self._only_move(plan)
        if self.track and plan.chunks:
            self.keep_logits(plan, self.runner.last_logits)
        now = perf_counter() - self._t0
        finished, freed = self.scheduler.postprocess(plan, sampled.tokens, now, sampled.logprobs)
        self.runner.poison(freed)
        if self.check:
            self.pool.check()
        self.stats.steps.append(_record(plan, t - self._t0, perf_counter() - t, self.pool.used_pages))
        return [request_output(s) for s in finished]

    def abort(self, request_id: str) -> bool:
        """Give up request ``request_id`` between steps (its client went away): its KV pages and swap slots are
        free for the next step. False if it is not being served (finished, or never added)."""
        freed = self.scheduler.abort(request_id)
        if freed is None:
            return False
        self.runner.poison(freed)
        if self.check:
            self.pool.check()
        return True

    def reset_stats(self) -> None:
        """Forget the steps measured so far (after a warm-up), and start the clock again."""
        self.stats = EngineStats(num_pages=self.stats.num_pages)
        self._t0 = None

    def _only_move(self, plan) -> Sampled:
        self.runner.move_pages(plan)
        return Sampled([])

    def close(self) -> None:
        self.runner.close()
