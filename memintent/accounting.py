"""Host memory in the CPU backend's device-memory accounting (``runtime.memory.AllocationTracker``).

On a GPU, some of what a step allocates is host memory: the pinned staging its metadata is copied from
(``kv.paged_kernel.MetaStaging``), and the rows and tiles a mapped block's kernel reads over the host link
(``runtime.mapped``). On the CPU backend, host memory is the device's, so the tracker would count them against the
plan's HBM budget. Work inside ``host_side()`` allocates host memory: the tracker does not count it. Everything a
step computes into (its outputs, its activations) stays outside, and counts.
"""

from __future__ import annotations

_depth = 0     # > 0: inside ``host_side()``


class host_side:
    """Operations inside allocate host memory, not device memory."""

    def __enter__(self) -> None:
        global _depth
        _depth += 1

    def __exit__(self, *exc) -> None:
        global _depth
        _depth -= 1


def on_host_side() -> bool:
    return _depth > 0


__all__ = ["host_side", "on_host_side"]
