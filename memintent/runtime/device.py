"""Which device a command runs on, waiting for it, and faults raised while a plan executes, as one line."""

from __future__ import annotations

import torch

from memintent.errors import MemintentError, RuntimeFault
from memintent.units import fmt_bytes


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MemintentError(f"--device {name}: CUDA is not available here; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise MemintentError(f"--device {name!r}: use cpu or cuda")
    return torch.device(name)


def as_fault(e: BaseException, what: str) -> RuntimeFault:
    """A ``RuntimeFault`` (one line, exit 2) for an exception raised while executing a plan; ``--debug`` shows the
    original traceback (it is chained as the cause)."""
    if isinstance(e, torch.OutOfMemoryError):
        return RuntimeFault(f"{what} ran out of device memory (the arena and the activations do not fit what is "
                            f"free: compile for a smaller budget or free device memory): "
                            f"{(str(e).splitlines() or [''])[0][:200]}")
    msg = (str(e).strip().splitlines() or [""])[0][:300]
    return RuntimeFault(f"{what} failed: {type(e).__name__}: {msg}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_compute(device: torch.device) -> None:
    """Wait for this forward's compute only: the copy stream keeps prefetching the next forward's first blocks,
    as it would in a serving loop (a full device sync would idle the copy engine at every forward boundary)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def available_host_bytes() -> int | None:
    """Memory the kernel says a new allocation can get without swapping (``MemAvailable``); None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_host_memory(program, *, extra_bytes: int = 0, available_bytes: int | None = None) -> None:
    """Refuse, before filling anything, a plan whose host store (pinned + pageable, as the plan states them) does
    not fit the memory this machine has available: the kernel would kill the process midway instead."""

    pr = program.prediction
    if pr is None:
        return
    need = pr.host_pinned_bytes + pr.host_pageable_bytes + extra_bytes
    have = available_host_bytes() if available_bytes is None else available_bytes
    if have is not None and need > have:
        raise MemintentError(
            f"the plan needs {fmt_bytes(need)} of host memory ({fmt_bytes(pr.host_pinned_bytes)} pinned, "
            f"{fmt_bytes(pr.host_pageable_bytes)} pageable{', ' + fmt_bytes(extra_bytes) + ' more' if extra_bytes else ''}) "
            f"but this machine has {fmt_bytes(have)} available: free memory, or compile with --quant int4 to "
            "shrink the host store")
