"""The CPU backend's own allocation accounting: the peak of memory that operations allocate while a forward runs.

On CUDA the caching allocator counts (``torch.cuda.max_memory_allocated``); the CPU allocator counts nothing, so the
CPU backend counts for itself. ``AllocationTracker`` is a ``TorchDispatchMode``: every operation's outputs that own
new storage add its bytes, and storage whose last tensor died (a weak reference to the storage expired) is
subtracted. Views share their base's storage and in-place results reuse it, so neither is counted twice.

What it measures is what a plan's activation peak predicts: the memory a forward allocates beyond the arena (which
is allocated once, before). ``peak_bytes`` is the high-water mark from the tracker's start.

Work inside ``memintent.accounting.host_side()`` allocates host memory (a GPU's pinned staging, a mapped block's
rows on their way over the link) and is not counted.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from memintent.accounting import on_host_side


class AllocationTracker(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}   # storage data pointer -> (weak ref, bytes)
        self.live_bytes = 0
        self.peak_bytes = 0

    def _sweep(self) -> None:
        for key, (ref, n) in list(self._live.items()):
            if ref.expired():
                del self._live[key]
                self.live_bytes -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()   # what the inputs' last users just released is free before this output counts
        returns = getattr(getattr(func, "_schema", None), "returns", ())
        if on_host_side():
            return out  # host memory (``memintent.accounting``): not the device's
        if returns and all(r.alias_info is not None for r in returns):
            return out  # a view or an in-place result: its storage is an input's (perhaps from before the tracker)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
                s = t.untyped_storage()
                key = s.data_ptr()
                if key and key not in self._live:
                    self._live[key] = (StorageWeakRef(s), s.nbytes())
                    self.live_bytes += s.nbytes()
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out


class PeakMeter:
    """Peak device memory while the ``with`` sections run, the one measure ``run`` and ``generate`` check against the
    plan's budget: on CUDA the caching allocator's statistics (reset when the meter is made, so the arena allocated
    after counts); on the CPU backend ``arena_bytes`` plus the peak that operations allocate in any section."""

    def __init__(self, device: torch.device, arena_bytes: int = 0):
        self.device, self.arena_bytes = device, arena_bytes
        self._ops_peak = 0
        self._tracker: AllocationTracker | None = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)

    def __enter__(self) -> "PeakMeter":
        if self.device.type != "cuda":
            self._tracker = AllocationTracker().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._tracker is not None:
            self._tracker.__exit__(*exc)
            self._ops_peak = max(self._ops_peak, self._tracker.peak_bytes)
            self._tracker = None

    @property
    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return self.arena_bytes + self._ops_peak
