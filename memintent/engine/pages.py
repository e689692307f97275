"""The paged KV cache's host side: which page is free and who owns it (``PagePool``), and the host swap space
(``SwapSpace``) that swapped-out pages wait in. The device bytes and their layout are ``kv.layout``."""

from __future__ import annotations

import collections
import heapq

import torch

from memintent.errors import MemintentError, RuntimeFault
from memintent.kv.layout import NULL_PAGE


class PagePool:
    """Which page is free and which sequence owns each one; the only place pages change hands.

    Policy: free pages are handed out lowest id first (a deterministic order, so two engines fed the same
    requests make the same tables); a finished or preempted sequence's pages go back at once. Owners with negative
    ids are not sequences: streamed blocks held in spare pages (``spare_pages``); ``used_pages`` counts the
    sequences' pages, ``spare_pages`` theirs."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise MemintentError(f"a KV pool needs at least 2 pages (one is the null page), not {num_pages}")
        self.num_pages = num_pages
        self._free: list[int] = list(range(NULL_PAGE + 1, num_pages))      # a min-heap: lowest id first
        self.owner: list[int | None] = [None] * num_pages                       # page -> sequence id
        self.tables: dict[int, list[int]] = {}                                    # sequence id -> its pages
        self.spare_pages = 0                                                      # pages of negative owners

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def used_pages(self) -> int:
        return self.num_pages - 1 - len(self._free) - self.spare_pages

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, seq: int, n: int) -> list[int]:
        """Give ``seq`` ``n`` more pages (appended to its table); the caller checked ``can_allocate``."""
        if n > len(self._free):
            raise RuntimeFault(f"sequence {seq} asked for {n} KV pages but {len(self._free)} are free")
        table = self.tables.setdefault(seq, [])
        got = [heapq.heappop(self._free) for _ in range(n)]
        for b in got:
            self.owner[b] = seq
        table.extend(got)
        if seq < 0:
            self.spare_pages += n
        return got

    def release(self, seq: int) -> list[int]:
        """Return every page of ``seq`` to the free list; returns them (so the caller can poison them)."""
        table = self.tables.pop(seq, [])
        if seq < 0:
            self.spare_pages -= len(table)
        for b in table:
            self.owner[b] = None
        for b in table:
            heapq.heappush(self._free, b)
        return table

    def table(self, seq: int) -> list[int]:
        return self.tables.get(seq, [])

    def check(self) -> None:
        """The invariants: every page but the null page is either free or owned by exactly one sequence, and a
        sequence's table lists exactly the pages it owns. Raises ``RuntimeFault`` naming the first violation."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeFault("KV pool: a page is on the free list twice")
        if NULL_PAGE in free or self.owner[NULL_PAGE] is not None:
            raise RuntimeFault("KV pool: the null page was handed out")
        seen: dict[int, int] = {}
        for seq, table in self.tables.items():
            for b in table:
                if b in seen:
                    raise RuntimeFault(f"KV pool: page {b} is in the tables of sequences {seen[b]} and {seq}")
                if b in free:
                    raise RuntimeFault(f"KV pool: page {b} is free but in the table of sequence {seq}")
                if self.owner[b] != seq:
                    raise RuntimeFault(f"KV pool: page {b} is in sequence {seq}'s table but owned by "
                                       f"{self.owner[b]}")
                seen[b] = seq
        for b in range(1, self.num_pages):
            if b not in free and b not in seen:
                raise RuntimeFault(f"KV pool: page {b} is neither free nor owned (lost)")


class SwapSpace:
    """Host memory for swapped-out pages: ``capacity_blocks`` pages of ``page_bytes``, pinned when CUDA reads
    them (only pinned memory copies asynchronously on the copy stream)."""

    def __init__(self, capacity_blocks: int, page_bytes: int, pin: bool):
        self.capacity_blocks, self.page_bytes = capacity_blocks, page_bytes
        self.buffer = torch.empty((max(capacity_blocks, 0), page_bytes), dtype=torch.uint8,
                                  pin_memory=pin and capacity_blocks > 0)                 # (C, page_bytes)
        self._free: collections.deque[int] = collections.deque(range(capacity_blocks))
        self.held: dict[int, list[int]] = {}                                          # sequence -> host slots

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def can_hold(self, n: int) -> bool:
        return n <= len(self._free)

    def take(self, seq: int, n: int) -> list[int]:
        slots = [self._free.popleft() for _ in range(n)]
        self.held[seq] = slots
        return slots

    def give_back(self, seq: int) -> list[int]:
        slots = self.held.pop(seq)
        self._free.extend(slots)
        return slots
