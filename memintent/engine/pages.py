"""The paged KV cache: fixed-size blocks in the plan's KV region, block tables, and the host swap space.

Layout (spec/serving.md). The plan's KV slot is ``num_blocks`` blocks of ``block_bytes`` each, laid end to end. One
block holds ``block_tokens`` tokens of keys and values for *every* layer, so a sequence has one block table for the
whole model and a swapped block moves in one contiguous copy:

    block b: values  [layer][k|v][token][kv_head][head_dim]   (model dtype, or int8 under KV quantization)
             scales  [layer][k|v][token][kv_head]             (float32; int8 only: one per token and head)

Block 0 is the *null block*: it is never handed out, stays zero, and pads block tables, so that attention over a
padded table reads zeros, never another sequence's (or a freed, poisoned) block.

``BlockPool`` is the host-side bookkeeping (which block is free, which sequence owns it); ``PoolViews`` are the
tensors over the device bytes; ``SwapSpace`` is pinned host memory that swapped-out blocks wait in.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass

import torch

from memintent.errors import MemintentError, RuntimeFault
from memintent.ir.dtypes import ir_dtype_of
from memintent.ir.layout import kv_block_parts
from memintent.ir.model import KVPool, KVQuant

NULL_BLOCK = 0
SCALE_DTYPE = torch.float32      # int8 KV: one float32 scale per token and KV head (spec/serving.md)


@dataclass(frozen=True, slots=True)
class BlockLayout:
    """Byte layout of one block, from the plan's ``KVPool``."""

    layers: int
    kv_heads: int
    head_dim: int
    block_tokens: int
    value_dtype: torch.dtype      # model dtype, or int8
    quantized: bool

    def _parts(self) -> tuple[int, int]:
        return kv_block_parts(self.layers, self.kv_heads, self.head_dim, self.block_tokens,
                              ir_dtype_of(self.value_dtype), self.quantized)

    @property
    def value_bytes(self) -> int:
        """Bytes of the values part of a block: (layers, 2, tokens, kv_heads, head_dim) elements."""
        return self._parts()[0]

    @property
    def scale_bytes(self) -> int:
        """Bytes of the scales part (int8 only): (layers, 2, tokens, kv_heads) float32."""
        return self._parts()[1]

    @property
    def block_bytes(self) -> int:
        return self.value_bytes + self.scale_bytes


def layout_of(pool: KVPool, model_dtype: torch.dtype) -> BlockLayout:
    quantized = pool.quant == KVQuant.int8
    return BlockLayout(layers=pool.layers, kv_heads=pool.kv_heads, head_dim=pool.head_dim,
                       block_tokens=pool.block_tokens, value_dtype=torch.int8 if quantized else model_dtype,
                       quantized=quantized)


class PoolViews:
    """Typed views over the pool's device bytes (no copy): per layer, keys and values (and their scales).

    ``flat``: uint8 [num_blocks * block_bytes], the arena's KV slot (or, for an all-resident engine, a tensor of
    the same size)."""

    def __init__(self, flat: torch.Tensor, layout: BlockLayout, num_blocks: int, layer_offset: int = 0):
        need = num_blocks * layout.block_bytes
        if flat.numel() < need:
            raise MemintentError(f"the KV region holds {flat.numel()} bytes but {num_blocks} blocks of "
                                 f"{layout.block_bytes} bytes need {need}: recompile the plan")
        self.layout, self.num_blocks = layout, num_blocks
        # A pipeline stage's pool holds its own layers; attention names layers as the whole model does.
        self.layer_offset = layer_offset
        blocks = flat[:need].view(num_blocks, layout.block_bytes)                     # uint8 (N, block_bytes)
        self.blocks = blocks
        L, bt, kvh, hd = layout.layers, layout.block_tokens, layout.kv_heads, layout.head_dim
        values = blocks[:, :layout.value_bytes].view(layout.value_dtype).view(num_blocks, L, 2, bt, kvh, hd)
        self.keys = [values[:, i, 0] for i in range(L)]                               # (N, bt, kvh, hd) each
        self.values = [values[:, i, 1] for i in range(L)]
        if layout.quantized:
            scales = blocks[:, layout.value_bytes:].view(SCALE_DTYPE).view(num_blocks, L, 2, bt, kvh)
            self.key_scales = [scales[:, i, 0] for i in range(L)]                     # (N, bt, kvh) each
            self.value_scales = [scales[:, i, 1] for i in range(L)]
        else:
            self.key_scales = self.value_scales = None

    def block(self, b: int) -> torch.Tensor:
        """uint8 [block_bytes]: block ``b``'s bytes (contiguous), for swap copies and poisoning."""
        return self.blocks[b]


class BlockPool:
    """Which block is free and which sequence owns each one; the only place blocks change hands.

    Policy: free blocks are handed out lowest id first (a deterministic order, so two engines fed the same
    requests make the same tables); a finished or preempted sequence's blocks go back at once."""

    def __init__(self, num_blocks: int):
        if num_blocks < 2:
            raise MemintentError(f"a KV pool needs at least 2 blocks (one is the null block), not {num_blocks}")
        self.num_blocks = num_blocks
        self._free: list[int] = list(range(NULL_BLOCK + 1, num_blocks))      # a min-heap: lowest id first
        self.owner: list[int | None] = [None] * num_blocks                       # block -> sequence id
        self.tables: dict[int, list[int]] = {}                                    # sequence id -> its blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, seq: int, n: int) -> list[int]:
        """Give ``seq`` ``n`` more blocks (appended to its table); the caller checked ``can_allocate``."""
        if n > len(self._free):
            raise RuntimeFault(f"sequence {seq} asked for {n} KV blocks but {len(self._free)} are free")
        table = self.tables.setdefault(seq, [])
        got = [heapq.heappop(self._free) for _ in range(n)]
        for b in got:
            self.owner[b] = seq
        table.extend(got)
        return got

    def release(self, seq: int) -> list[int]:
        """Return every block of ``seq`` to the free list; returns them (so the caller can poison them)."""
        table = self.tables.pop(seq, [])
        for b in table:
            self.owner[b] = None
        for b in table:
            heapq.heappush(self._free, b)
        return table

    def table(self, seq: int) -> list[int]:
        return self.tables.get(seq, [])

    def check(self) -> None:
        """The invariants: every block but the null block is either free or owned by exactly one sequence, and a
        sequence's table lists exactly the blocks it owns. Raises ``RuntimeFault`` naming the first violation."""
        free = set(self._free)
        if len(free) != len(self._free):
            raise RuntimeFault("KV pool: a block is on the free list twice")
        if NULL_BLOCK in free or self.owner[NULL_BLOCK] is not None:
            raise RuntimeFault("KV pool: the null block was handed out")
        seen: dict[int, int] = {}
        for seq, table in self.tables.items():
            for b in table:
                if b in seen:
                    raise RuntimeFault(f"KV pool: block {b} is in the tables of sequences {seen[b]} and {seq}")
                if b in free:
                    raise RuntimeFault(f"KV pool: block {b} is free but in the table of sequence {seq}")
                if self.owner[b] != seq:
                    raise RuntimeFault(f"KV pool: block {b} is in sequence {seq}'s table but owned by "
                                       f"{self.owner[b]}")
                seen[b] = seq
        for b in range(1, self.num_blocks):
            if b not in free and b not in seen:
                raise RuntimeFault(f"KV pool: block {b} is neither free nor owned (lost)")


class SwapSpace:
    """Host memory for swapped-out blocks: ``capacity_blocks`` blocks of ``block_bytes``, pinned when CUDA reads
    them (only pinned memory copies asynchronously on the copy stream)."""

    def __init__(self, capacity_blocks: int, block_bytes: int, pin: bool):
        self.capacity_blocks, self.block_bytes = capacity_blocks, block_bytes
        self.buffer = torch.empty((max(capacity_blocks, 0), block_bytes), dtype=torch.uint8,
                                  pin_memory=pin and capacity_blocks > 0)                 # (C, block_bytes)
        self._free: collections.deque[int] = collections.deque(range(capacity_blocks))
        self.held: dict[int, list[int]] = {}                                          # sequence -> host slots

    @property
    def free_blocks(self) -> int:
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
