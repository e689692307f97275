"""The plan's arena: one device allocation, cut into slots at the plan's fixed offsets.

One allocation made once means no allocator traffic per step: weights never go through the caching allocator
after attach, so streaming cannot fragment it or trigger its synchronising frees.
"""

from __future__ import annotations

import warnings

import torch

from memintent.errors import MemintentError
from memintent.ir.model import Arena, SlotKind
from memintent.units import fmt_bytes

POISON_BYTE = 0xFF   # 0xFF.. is a NaN in bf16, f16 and f32: poisoned weights turn the output into NaN


def check_fits(size_bytes: int, device: torch.device, extra_bytes: int = 0) -> None:
    """Refuse (before allocating anything) an arena the device cannot hold. ``extra_bytes`` (the plan's predicted
    activations and workspace) only warns: the arena is what must fit for the plan to run at all."""
    if device.type != "cuda":
        return
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    # Memory PyTorch caches but does not use is free to us: the allocator releases it and retries on a miss.
    free_bytes += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if size_bytes > free_bytes:
        raise MemintentError(
            f"the plan's arena needs {fmt_bytes(size_bytes)} but {device} has {fmt_bytes(free_bytes)} free of "
            f"{fmt_bytes(total_bytes)}: short by {fmt_bytes(size_bytes - free_bytes)}; compile the plan for a "
            f"smaller budget or free device memory")
    if size_bytes + extra_bytes > free_bytes:

        warnings.warn(f"arena {fmt_bytes(size_bytes)} + predicted activations/workspace {fmt_bytes(extra_bytes)} "
                      f"exceed the {fmt_bytes(free_bytes)} free on {device}: the forward may run out of memory",
                      stacklevel=3)


def validate_arena(arena: Arena) -> None:
    """Slots inside the arena and disjoint: a plan that overlaps two slots would corrupt weights silently."""
    spans = []
    for i, s in enumerate(arena.slots):
        if s.index != i:
            raise MemintentError(f"arena slot at position {i} has index {s.index}: slots must be listed by index")
        if s.offset_bytes < 0 or s.size_bytes < 0 or s.offset_bytes + s.size_bytes > arena.size_bytes:
            raise MemintentError(f"arena slot {i} [{s.offset_bytes}, {s.offset_bytes + s.size_bytes}) lies outside "
                                 f"the arena of {arena.size_bytes} bytes")
        spans.append((s.offset_bytes, s.offset_bytes + s.size_bytes, i))
    spans.sort()
    end, owner = 0, -1   # furthest end so far among non-empty slots, and whose it is
    for b0, b1, j in spans:
        if b1 == b0:
            continue
        if b0 < end:
            raise MemintentError(f"arena slots {owner} and {j} overlap at bytes [{b0}, {min(end, b1)})")
        if b1 > end:
            end, owner = b1, j


class DeviceArena:
    """``size_bytes`` of device memory in one tensor; ``slot(i)`` is a uint8 view of slot i (no allocation).

    ``poison``: fill it all with 0xFF at allocation (checked mode), so a weight read before its first copy is NaN.
    """

    def __init__(self, arena: Arena, device: torch.device | str, *, poison: bool = False, extra_bytes: int = 0):
        validate_arena(arena)
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        check_fits(arena.size_bytes, self.device, extra_bytes)
        self.plan = arena
        self.size_bytes = arena.size_bytes
        self.tensor: torch.Tensor | None = torch.empty(arena.size_bytes, dtype=torch.uint8, device=self.device)
        if poison:
            self.tensor.fill_(POISON_BYTE)
        # [slot.size_bytes] uint8 views, built once: slicing per step would cost a tensor object each time
        self._slots = [self.tensor[s.offset_bytes:s.offset_bytes + s.size_bytes] for s in arena.slots]

    def slot(self, index: int) -> torch.Tensor:
        return self._slots[index]

    def kind(self, index: int) -> SlotKind:
        return self.plan.slots[index].kind

    def release(self) -> None:
        """Drop the allocation. It is really freed only once no tensor views it any more (the executor first points
        the model's weights back at host memory)."""
        self._slots = []
        self.tensor = None

    @property
    def released(self) -> bool:
        return self.tensor is None
