"""Streamed blocks held in the KV pool's spare pages (spec/runtime.md, "Spare pages").

A streamed plan copies every streamed block over the host link each step. The pool's pages that no schedule can
allocate before they could be given back hold nothing (the pool fills over the run's first steps and empties in its
tail): the weights the budget could not keep move into them. A block taken into spare pages is copied from the host
once more (its "fill" step: after its stage ran, the executor writes the copy it streamed into the pages), and from
the step after on its visits copy it from those pages, within HBM, instead of over the host link. The ramp's prompt
steps then run at their compute rather than the link's pace, and the tail of a batch, whose sequences finish one by
one, runs faster each step, on the same budget: the pages are the pool's.

The rules, applied once per scheduled batch (``SparePages.update``), in the order the engine needs them:
- pages the blocks gave up at the step before go back to the pool now: a copy the step before issued (a next-step
  prefetch) may still read them until that step's compute, which every later step's compute follows;
- a swapped or resuming sequence gives every block up (its pages return at the next update): a swap-in takes a
  whole table at once;
- otherwise the blocks filled at the step before are held, and the free pages are kept at least at the reserve
  (``reserve_pages``: what the next two schedules can allocate, since pages given up now come back only after the
  next one; while no request waits, the running sequences' growth where that is less): below it the last blocks
  taken give theirs up; above it more are taken, in ``costs.spare_page_blocks``' order. Held blocks are a prefix of
  that order; the batch records how many (``Batch.spare_blocks``: the cost model's input,
  ``StepRecord.spare_blocks``).

The pages are owned, in the ``PagePool``, by pseudo-sequences with negative ids (one per block), so the pool's
invariants cover them. The simulated run (``engine.simulate``) applies the same rules, so the planner's prediction
counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from memintent.engine.pages import PagePool
from memintent.engine.scheduler import Batch, Scheduler
from memintent.ir.model import Program
from memintent.passes.costs import spare_page_blocks, spare_pages_of


@dataclass(slots=True)
class SpareStep:
    """What one step does with the spare pages: blocks copied from them (``held``), blocks copied from the host
    and then into them (``filling``), each with its pages in order; pages given back to the pool (``released``)."""

    held: dict[str, list[int]] = field(default_factory=dict)
    filling: dict[str, list[int]] = field(default_factory=dict)
    released: list[int] = field(default_factory=list)


class SparePages:
    """The spare-page rules for one plan and its pool (module docstring)."""

    def __init__(self, program: Program, pool: PagePool):
        kv = program.kv_pool
        g = program.generation
        self.pool, self.page_tokens, self.context = pool, kv.page_tokens, g.context
        # The most pages one schedule can allocate: its tokens' pages, plus a page begun by each of its chunks (a
        # chunk of n tokens starts at most ceil(n / page) pages). Swapping in is not bounded by it (a swapped
        # sequence takes its whole table back at once): blocks give everything up while any sequence is swapped.
        self.step_pages = math.ceil(g.step_tokens / self.page_tokens) + g.max_seqs
        # (block, pages it needs) in the order blocks are taken; owner ids -1, -2, ... in that order
        self.order = [(b.name, spare_pages_of(b, kv.page_bytes)) for b in spare_page_blocks(program)]
        self.held = 0             # blocks held: a prefix of ``order``
        self.filling = 0          # blocks after them filled by the step scheduled last
        self._returning: list[int] = []   # owners whose pages go back at the next update

    def _owner(self, i: int) -> int:
        return -1 - i

    def _give_up(self) -> list[int]:
        """The owners of every block held or filling, which hold nothing from now on."""
        owners = [self._owner(i) for i in range(self.held + self.filling)]
        self.held = self.filling = 0
        return owners

    def growth_pages(self, groups: list[Scheduler]) -> int:
        """Pages the running sequences may still take: each up to its prompt plus max_new_tokens, or the context."""
        need = 0
        for g in groups:
            for s in g.running:
                end = min(len(s.request.prompt_ids) + s.request.max_new_tokens, self.context)
                need += max(0, math.ceil(end / self.page_tokens) - len(self.pool.table(s.seq_id)))
        return need

    def release_all(self) -> SpareStep:
        """Every block gives its pages back at once: for an engine with no step in flight and its device idle (the
        next batch then starts with the whole pool, as the simulated run does)."""
        owners = self._give_up() + self._returning
        self._returning = []
        return SpareStep(released=[p for owner in owners for p in self.pool.release(owner)])

    def update(self, groups: list[Scheduler], batch: Batch) -> SpareStep:
        """The spare pages for ``batch``, just scheduled (module docstring); sets ``batch.spare_blocks``."""
        released = [p for owner in self._returning for p in self.pool.release(owner)]
        self._returning = []
        if any(g.swapped or g.resuming for g in groups):
            self._returning = self._give_up()
            return SpareStep(released=released)
        self.held += self.filling
        self.filling = 0
        spare = self.pool.free_pages - self.reserve_pages(groups)
        while spare < 0 and self.held:     # the last blocks taken go first: held blocks stay a prefix of the order
            self.held -= 1
            self._returning.append(self._owner(self.held))
            spare += self.order[self.held][1]
        while (not self._returning and self.held + self.filling < len(self.order)
               and self.order[self.held + self.filling][1] <= spare):
            i = self.held + self.filling
            self.pool.allocate(self._owner(i), self.order[i][1])
            spare -= self.order[i][1]
            self.filling += 1
        batch.spare_blocks = self.held
        return SpareStep(held=self._tables(0, self.held), filling=self._tables(self.held, self.held + self.filling),
                         released=released)

    def reserve_pages(self, groups: list[Scheduler]) -> int:
        """Free pages the blocks leave to the sequences: what the next two schedules can allocate (pages given up
        now come back only after the next schedule, so the one after it must find its pages free too), or, while
        no request waits, the running sequences' growth where that is less (only they allocate then)."""
        reserve = 2 * self.step_pages
        if any(g.waiting for g in groups):
            return reserve
        return min(reserve, self.growth_pages(groups))

    def _tables(self, first: int, end: int) -> dict[str, list[int]]:
        return {self.order[i][0]: self.pool.table(self._owner(i)) for i in range(first, end)}


__all__ = ["SparePages", "SpareStep"]
