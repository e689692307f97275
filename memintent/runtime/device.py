"""Which device a command runs on, waiting for it, and faults raised while a plan executes, as one line."""

from __future__ import annotations

import torch

from memintent.errors import MemintentError, RuntimeFault


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
