"""The scheduler: which tokens of which sequences go into the next engine step, and who gives up KV pages.

Policy
------
Every step is one pass over the model (one pass of the plan's weight schedule), so every token it carries shares
the streamed bytes. A step holds at most ``step_tokens`` tokens of at most ``max_seqs`` sequences:

1. Running sequences, in priority order. A decoding sequence contributes its one new token; one whose prompt is
   only partly in the cache contributes its next chunk, as long as the step keeps one token for each decoding
   sequence behind it.
2. A running sequence that needs a page the pool does not have takes one from the lowest-priority running
   sequence that has no token in this step yet (the victim is preempted); if there is none, it is preempted
   itself. The highest-priority sequences therefore always make progress and the lowest yield (vLLM's order).
3. If no one was preempted in this step, swapped-out sequences come back (highest priority first) when their pages
   and one more token fit; then waiting requests are admitted, highest priority first, with a chunk of their prompt
   as large as the remaining token budget, while pages are free. Admission never skips the request at the head of
   the queue.

Priority is the admission order, one of ``ADMISSION_ORDERS`` (the plan's ``generation.admission``, which the
planner chooses by simulating the run, ``engine/simulate.py``):

- ``fcfs``: first come, first served: the order requests were added (their sequence ids). No request waits for
  one added after it (no starvation).
- ``longest-output``: the request with the most ``max_new_tokens`` first, counted in classes of
  ``admission_class_tokens`` (``max_new_tokens // class``; ties: first come), so that the longest requests start
  early and the run does not end in a tail of a few long ones. A request's ``max_new_tokens`` stands for its output
  length (one that stops early at an end-of-sequence id merely finishes sooner). Why classes: ranked exactly, the
  sequences that fill the pool together have outputs of nearly one length and finish together, and the pool then
  refills at the step's token budget while few sequences decode (the 70B 512-request mix ran in waves whose troughs
  held 15-45 of 102 sequences); first come within a class mixes lengths, so sequences finish and are replaced a few
  at a time (simulated on that mix, three seeds: 3-7 % more tokens/s with classes of 24-48 tokens than exactly).
  The planner sets the class to a quarter of the workload's spread of output lengths. A later request with a longer
  output goes ahead of earlier ones still waiting: under a steady stream of long requests a short one can wait long
  (a batch of requests, which this order is for, has no such stream).
- ``output-density``: the request with the largest ``g**2 / (p + g/2)`` first (``g``: its ``max_new_tokens``,
  ``p``: its prompt tokens; ties: first come). ``g / (p + g/2)`` is the tokens it generates per token it holds in
  the pool on average over its life; the second ``g`` keeps long outputs early, as longest-output does. Why: the
  pool fills with the sequences that decode most per page, so the run reaches full decode sooner after the fill,
  and it ends on requests with long prompts and short outputs, whose prompts the step's compute absorbs while
  their few decode steps drain the pool quickly. Simulated on the 70B int8-KV mix (512 requests, prompts 64-1024,
  outputs 16-128), three seeds: 271-280 tok/s against 242-255 with longest-output in classes of 28 tokens (ranking
  by ``g / (p + g/2)`` alone: 271; by ``g**3`` or ``g**4`` over it: 274, 269). The same starvation caveat as
  longest-output.

Preemption by cost. A victim either swaps its pages to host memory (out now, back before it resumes, both on the
copy engine that weight streaming also uses) or drops them and later prefills its prompt and generated tokens
again. The predicted costs, from the plan's IR (the KV pool object's ``evict_cost_s`` and ``recompute_cost_s``,
per page) extended with the victim's length and the time until it resumes:

    swap      = pages * evict_cost_s - copy-engine idle time of the steps the two copies land in
                (the swap-out lands in this step; the swap-in in the step before it resumes, unless it resumes
                within one step: then both share one step's idle time)
    recompute = pages * recompute_cost_s - compute slack of the ceil(tokens / step_tokens) steps that re-run
                its tokens

(each floored at zero) and the cheaper wins; a tie, or a swap the host swap space cannot hold, recomputes. In a
plan whose steps are bound by PCIe the copy engine has no idle time and the compute has slack, so victims
recompute; in a plan whose weights are resident the copy engine idles and victims swap. ``preempt="swap"`` or
``"recompute"`` forces one kind (tests, experiments).

Swapped pages come back ahead of the step that needs them, using the pool's urgency (the predicted time of the
step's first attention, ``urgency_s`` of the KV pool object): a swap-in that takes no longer than that is issued at
the start of the resuming step itself; a longer one is issued one step earlier.

The schedule is a function of the requests and the plan alone (no clocks), so two engines fed the same requests
make the same steps: the streamed engine and the all-resident one compute bitwise the same tokens.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field

from memintent.engine.pages import PagePool, SwapSpace
from memintent.engine.sampling import StopConditions, TokenLogprobs
from memintent.engine.sequence import PENDING, Request, Sequence, State
from memintent.errors import MemintentError
from memintent.ir.model import ADMISSION_ORDERS, ObjectKind, Program
from memintent.passes.costs import link_busy_s

PREEMPT_POLICIES = ("cost", "swap", "recompute")


def priority_key(admission: str, class_tokens: int = 1):
    """The sort key of sequences under an admission order (lower first: see the module docstring); ``class_tokens``:
    longest-output's class of output lengths."""
    if admission == "fcfs":
        return lambda s: s.seq_id
    if admission == "longest-output":
        return lambda s: (-(s.request.max_new_tokens // class_tokens), s.seq_id)
    if admission == "output-density":
        return lambda s: (-output_density(len(s.request.prompt_ids), s.request.max_new_tokens), s.seq_id)
    raise MemintentError(f"admission order {admission!r}: use one of {', '.join(ADMISSION_ORDERS)}")


def output_density(prompt_tokens: int, max_new_tokens: int) -> float:
    """output-density's rank of a request (higher first; module docstring): ``g**2 / (p + g/2)``."""
    g = max_new_tokens
    return g * g / (prompt_tokens + g / 2) if prompt_tokens + g > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Costs:
    """What preemption decisions weigh (seconds), read from the plan: ``Costs.of(program)``, or for a pipeline
    ``Costs.of_parts(programs)``."""

    page_tokens: int
    step_tokens: int
    evict_page_s: float          # the KV pool object's evict_cost_s: one page out to host memory and back
    swap_in_page_s: float        # its host -> device half
    recompute_page_s: float      # the KV pool object's recompute_cost_s: re-running one page's tokens
    copy_idle_s: float            # copy engine idle per step (predicted step - copy busy)
    compute_slack_s: float        # compute idle per step (predicted step - compute)
    urgency_s: float              # the pool's urgency: when the step's first attention starts

    @classmethod
    def of(cls, program: Program) -> Costs:
        pool, g, pr, hw = program.kv_pool, program.generation, program.prediction, program.hardware
        kv = next(o for o in program.objects if o.kind == ObjectKind.kv)
        copy_busy_s = link_busy_s(hw, pr.streamed_bytes, pr.mapped_bytes)
        return cls(page_tokens=pool.page_tokens, step_tokens=g.step_tokens, evict_page_s=kv.evict_cost_s,
                   swap_in_page_s=pool.page_bytes / (hw.h2d_gbps * 1e9),
                   recompute_page_s=kv.recompute_cost_s or 0.0,
                   copy_idle_s=max(pr.step_time_s - copy_busy_s, 0.0),
                   compute_slack_s=max(pr.step_time_s - pr.compute_s, 0.0), urgency_s=kv.urgency_s or 0.0)

    @classmethod
    def of_parts(cls, programs: list[Program]) -> Costs:
        """The costs of a step through every part of a pipeline: a page's swap and recompute are each part's share
        summed; the idle time a swap or a recompute can hide in is the least any part has. One part: ``of``."""
        each = [cls.of(p) for p in programs]
        return dataclasses.replace(
            each[0], evict_page_s=sum(c.evict_page_s for c in each),
            swap_in_page_s=sum(c.swap_in_page_s for c in each),
            recompute_page_s=sum(c.recompute_page_s for c in each), copy_idle_s=min(c.copy_idle_s for c in each),
            compute_slack_s=min(c.compute_slack_s for c in each))


@dataclass(frozen=True, slots=True)
class Preemption:
    """One preemption decision, with both predicted costs (the run log prints it)."""

    step: int
    request: str
    kind: str                     # "swap" | "recompute"
    pages: int
    tokens: int
    swap_s: float
    recompute_s: float
    forced: bool                  # the policy was not "cost"

    def describe(self) -> str:
        why = "forced" if self.forced else "cheaper"
        return (f"step {self.step}: preempt {self.request} ({self.tokens} tokens, {self.pages} pages): "
                f"{self.kind} ({why}; predicted swap {self.swap_s * 1e3:.2f} ms, recompute "
                f"{self.recompute_s * 1e3:.2f} ms)")


@dataclass(slots=True)
class Chunk:
    """Tokens ``start .. start + length`` of ``seq`` in this step; ``sample``: the chunk ends at the sequence's
    last known token, so the step's logits there give its next token."""

    seq: Sequence
    start: int
    length: int
    sample: bool


@dataclass(slots=True)
class Batch:
    """What one engine step runs: its chunks of tokens, the pages it hands out or takes back, the copies that move
    swapped pages, and the preemptions decided for it."""

    index: int
    chunks: list[Chunk] = field(default_factory=list)
    new_pages: list[int] = field(default_factory=list)       # handed out in this step
    freed_pages: list[int] = field(default_factory=list)     # returned by preemption (finished: postprocess)
    swap_out: list[tuple[list[int], list[int]]] = field(default_factory=list)   # (device pages, host slots)
    swap_in: list[tuple[list[int], list[int]]] = field(default_factory=list)    # (host slots, device pages)
    preemptions: list[Preemption] = field(default_factory=list)
    skipped: set[int] = field(default_factory=set)   # sequences that finished while it was in flight (``advance``)
    spare_blocks: int = 0         # streamed blocks its forward copies from the pool's spare pages (``spare_pages``)

    @property
    def tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, pool: PagePool, swap: SwapSpace | None, costs: Costs, *, max_seqs: int, step_tokens: int,
                 context: int, preempt: str = "cost", seq_ids: tuple[int, int] = (0, 1),
                 stops: StopConditions | None = None, admission: str = "fcfs", admission_class_tokens: int = 1):
        """``seq_ids``: (first, stride) of the sequence ids it hands out; schedulers sharing a pool (a pipeline's
        micro-batch groups) use disjoint ones. ``stops``: when a sequence stops early (default: at its request's
        stop token ids only). ``admission``: the priority order (``ADMISSION_ORDERS``, module docstring), with
        ``admission_class_tokens`` (longest-output's class of output lengths)."""
        if preempt not in PREEMPT_POLICIES:
            raise MemintentError(f"preempt={preempt!r}: use one of {', '.join(PREEMPT_POLICIES)}")
        self.admission, self.priority = admission, priority_key(admission, admission_class_tokens)
        self.pool, self.swap, self.costs = pool, swap, costs
        self.max_seqs, self.step_tokens, self.context, self.preempt = max_seqs, step_tokens, context, preempt
        self.waiting: list[Sequence] = []      # by priority (preempted sequences go back to their place)
        self.running: list[Sequence] = []      # by priority
        self.swapped: list[Sequence] = []      # by priority
        self.resuming: list[Sequence] = []     # swap-in issued last step; they run from this step on
        self.sequences: list[Sequence] = []
        self.steps = 0
        self.seq_ids = seq_ids
        self.stops = stops or StopConditions()
        self._added = 0                        # sequences ever added (ids stay unique when finished ones are dropped)
        self._freed_per_step = 0.0             # moving average of pages finished sequences return per step
        self._ended_pages = 0                  # pages ``advance`` took back since the last ``record``

    # -- requests ---------------------------------------------------------------------------------------------
    def add(self, request: Request) -> Sequence:
        first, stride = self.seq_ids
        seq = Sequence(seq_id=first + stride * self._added, request=request, tokens=list(request.prompt_ids))
        self._added += 1
        self.sequences.append(seq)
        bisect.insort(self.waiting, seq, key=self.priority)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped or self.resuming)

    def cancel(self, seq: Sequence) -> list[int]:
        """Drop an unfinished ``seq`` from every queue (its caller stopped waiting for it): its swap slots and pool
        pages go back; returns the pages. Between steps only: no step in flight may hold it."""
        return self._finish(seq, "cancelled")

    # -- one step ---------------------------------------------------------------------------------------------
    def schedule(self) -> Batch:
        batch = Batch(index=self.steps)
        self.steps += 1
        for seq in self.resuming:
            seq.state = State.running
            bisect.insort(self.running, seq, key=self.priority)
        self.resuming = []
        budget = self._schedule_running(batch)
        if not batch.preemptions:
            budget = self._resume_swapped(batch, budget)
            self._admit_waiting(batch, budget)
        return batch

    def _pages_needed(self, seq: Sequence, n: int) -> int:
        return math.ceil((seq.cached + n) / self.costs.page_tokens) - len(self.pool.table(seq.seq_id))

    def _schedule_running(self, batch: Batch) -> int:
        budget = self.step_tokens
        decodes_left = sum(1 for s in self.running if s.pending == 1)
        scheduled: set[int] = set()
        for seq in list(self.running):
            if seq.state != State.running:
                continue                                   # preempted by a sequence ahead of it in this step
            decoding = seq.pending == 1
            if decoding:
                decodes_left -= 1
            n = 1 if decoding else min(seq.pending, budget - decodes_left)
            if n <= 0:
                continue
            need = self._pages_needed(seq, n)
            if need and not self._make_room(batch, seq, need, scheduled):
                continue                                   # seq itself was preempted
            if need:      # most decode tokens land in a page the sequence already holds
                batch.new_pages += self.pool.allocate(seq.seq_id, need)
            batch.chunks.append(Chunk(seq, seq.cached, n, sample=seq.cached + n == len(seq.tokens)))
            scheduled.add(seq.seq_id)
            budget -= n
        return budget

    def _make_room(self, batch: Batch, seq: Sequence, need: int, scheduled: set[int]) -> bool:
        """Preempt the newest unscheduled running sequences until ``need`` pages are free; False if ``seq``
        itself had to go."""
        while not self.pool.can_allocate(need):
            victims = [s for s in self.running if s.seq_id not in scheduled and s is not seq]
            victim = victims[-1] if victims else seq
            self._preempt(batch, victim)
            if victim is seq:
                return False
        return True

    def _resume_swapped(self, batch: Batch, budget: int) -> int:
        while self.swapped and budget > 0 and len(self.running) + len(self.resuming) < self.max_seqs:
            seq = self.swapped[0]
            n = min(seq.pending, budget)
            held = len(self.swap.held[seq.seq_id])
            grow = math.ceil((seq.cached + n) / self.costs.page_tokens) - held
            if not self.pool.can_allocate(held + grow):
                break
            self.swapped.pop(0)
            pages = self.pool.allocate(seq.seq_id, held)
            batch.new_pages += pages
            batch.swap_in.append((self.swap.give_back(seq.seq_id), pages))
            if self.costs.swap_in_page_s * held > self.costs.urgency_s:
                seq.state = State.swapped          # the copy needs more than the lead time: it runs next step
                self.resuming.append(seq)
                continue
            seq.state = State.running
            bisect.insort(self.running, seq, key=self.priority)
            batch.new_pages += self.pool.allocate(seq.seq_id, grow)
            batch.chunks.append(Chunk(seq, seq.cached, n, sample=seq.cached + n == len(seq.tokens)))
            budget -= n
        return budget

    def _admit_waiting(self, batch: Batch, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) + len(self.resuming) < self.max_seqs:
            seq = self.waiting[0]
            n = min(seq.pending, budget)
            need = self._pages_needed(seq, n)
            if not self.pool.can_allocate(need):
                break
            self.waiting.pop(0)
            seq.state = State.running
            bisect.insort(self.running, seq, key=self.priority)
            batch.new_pages += self.pool.allocate(seq.seq_id, need)
            batch.chunks.append(Chunk(seq, seq.cached, n, sample=seq.cached + n == len(seq.tokens)))
            budget -= n

    # -- preemption -------------------------------------------------------------------------------------------
    def predicted_costs(self, seq: Sequence) -> tuple[float, float]:
        """(swap_s, recompute_s) of preempting ``seq`` now (see the module docstring)."""
        c = self.costs
        pages = len(self.pool.table(seq.seq_id))
        resume_steps = pages / self._freed_per_step if self._freed_per_step > 0 else 1.0
        windows = 1.0 if resume_steps < 1.0 else 2.0
        swap_s = max(pages * c.evict_page_s - c.copy_idle_s * windows, 0.0)
        rerun_steps = math.ceil(max(seq.cached, 1) / c.step_tokens)
        recompute_s = max(pages * c.recompute_page_s - c.compute_slack_s * rerun_steps, 0.0)
        return swap_s, recompute_s

    def _choose(self, seq: Sequence) -> tuple[str, float, float]:
        swap_s, recompute_s = self.predicted_costs(seq)
        pages = len(self.pool.table(seq.seq_id))
        can_swap = self.swap is not None and self.swap.can_hold(pages) and pages > 0
        if self.preempt == "recompute" or not can_swap:
            kind = "recompute"
        elif self.preempt == "swap":
            kind = "swap"
        else:
            kind = "swap" if swap_s < recompute_s else "recompute"
        return kind, swap_s, recompute_s

    def _preempt(self, batch: Batch, seq: Sequence) -> None:
        kind, swap_s, recompute_s = self._choose(seq)
        pages = list(self.pool.table(seq.seq_id))
        batch.preemptions.append(Preemption(step=batch.index, request=seq.request.id, kind=kind, pages=len(pages),
                                           tokens=seq.cached, swap_s=swap_s, recompute_s=recompute_s,
                                           forced=self.preempt != "cost"))
        self.running.remove(seq)
        seq.preemptions.append(kind)
        self.pool.release(seq.seq_id)
        if kind == "swap":
            batch.swap_out.append((pages, self.swap.take(seq.seq_id, len(pages))))
            seq.state = State.swapped
            bisect.insort(self.swapped, seq, key=self.priority)
        else:
            seq.cached = 0
            seq.state = State.waiting
            bisect.insort(self.waiting, seq, key=self.priority)
        batch.freed_pages += pages

    # -- after the step ---------------------------------------------------------------------------------------
    def postprocess(self, batch: Batch, sampled: list[int], now_s: float,
                    logprobs: list[TokenLogprobs | None] | None = None) -> tuple[list[Sequence], list[int]]:
        """Record the step's results: ``sampled`` holds one token per sampling chunk, in chunk order (``logprobs``,
        when given, one entry each too). Returns the sequences that finished and the pages they gave back:
        ``advance`` then ``record``."""
        ended = self.advance(batch)
        finished, freed = self.record(batch, sampled, now_s, logprobs)
        return finished, ended + freed

    def advance(self, batch: Batch) -> list[int]:
        """A step's first half of its results, known before its tokens are read: its chunks' keys and values are in
        the pool, each sampling chunk's sequence holds a ``PENDING`` token, and one that reaches its
        ``max_new_tokens`` or the plan's context with it is finished. Returns the pages those gave back. Chunks of
        sequences that finished while the step was in flight (a stop read one step late, a cancel) are skipped:
        the step ran them, and they are gone."""
        freed = []
        for c in batch.chunks:
            seq = c.seq
            if seq.state == State.finished:
                batch.skipped.add(seq.seq_id)
                continue
            seq.cached += c.length
            if not c.sample:
                continue
            seq.tokens.append(PENDING)
            reason = self._limit_reason(seq)
            if reason:
                freed += self._finish(seq, reason)
        self._ended_pages += len(freed)
        return freed

    def record(self, batch: Batch, sampled: list[int], now_s: float,
               logprobs: list[TokenLogprobs | None] | None = None) -> tuple[list[Sequence], list[int]]:
        """A step's second half, once its tokens are read (after ``advance``): each sampling chunk's token replaces
        its ``PENDING`` one and may stop its sequence. Returns the sequences that finished in the step (by length
        too, from ``advance``) and the pages the stopped ones gave back."""
        finished, freed = [], []
        lps = iter(logprobs if logprobs is not None else ())
        for c, tok in zip((c for c in batch.chunks if c.sample), sampled, strict=True):
            seq, lp = c.seq, next(lps, None)
            if seq.seq_id in batch.skipped:
                continue
            seq.tokens[c.start + c.length] = tok
            if lp is not None:
                seq.logprobs.append(lp)
            if seq.first_token_s is None:
                seq.first_token_s = now_s
            if self.stops.stopped(seq, tok):
                if seq.state != State.finished:
                    freed += self._finish(seq, "stop")
                seq.finish_reason = "stop"
            if seq.state == State.finished:
                seq.finish_s = now_s
                finished.append(seq)
        self._freed_per_step = 0.9 * self._freed_per_step + 0.1 * (self._ended_pages + len(freed))
        self._ended_pages = 0
        return finished, freed

    def _limit_reason(self, seq: Sequence) -> str | None:
        if len(seq.generated) >= seq.request.max_new_tokens:
            return "length"
        if len(seq.tokens) > self.context:
            return "context"          # the new token has no position left in the plan's context
        return None

    def _finish(self, seq: Sequence, reason: str) -> list[int]:
        """``seq`` ends: out of every queue (a stop read late may find it preempted), its swap slots and pages
        back; returns the pages."""
        for queue in (self.waiting, self.running, self.swapped, self.resuming):
            queue[:] = [s for s in queue if s is not seq]
        if self.swap is not None and seq.seq_id in self.swap.held:
            self.swap.give_back(seq.seq_id)
        seq.state, seq.finish_reason = State.finished, reason
        return self.pool.release(seq.seq_id)

    # -- requests given up ------------------------------------------------------------------------------------
    def abort(self, request_id: str) -> list[int] | None:
        """``cancel`` the unfinished sequence serving request ``request_id`` (its client went away); the pages freed,
        or None if no unfinished sequence serves that request."""
        seq = self.find(request_id)
        return None if seq is None else self.cancel(seq)

    def find(self, request_id) -> Sequence | None:
        """The unfinished sequence serving request ``request_id``, or None."""
        return next((s for s in self.sequences if s.request.id == request_id and s.state != State.finished), None)

    def forget_finished(self) -> None:
        """Drop finished sequences from ``sequences`` (a long-running server would otherwise keep every one)."""
        self.sequences = [s for s in self.sequences if s.state != State.finished]
