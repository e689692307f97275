"""Execute a plan: stream weight blocks between pinned host memory and a device arena around an eager model.

    handle = attach(model, program, "cuda")      # validate, allocate the arena, copy resident blocks, hook
    logits = model(input_ids)                    # runs the plan's copies/waits/frees from forward hooks
    print(handle.last_stats.summary())
    handle.detach()                              # hooks removed, weights back on the host, arena released
"""

from memintent.runtime.arena import POISON_BYTE, DeviceArena, check_fits
from memintent.runtime.copy_engine import CopyEngine, CpuBackend, CudaBackend, ForwardStats
from memintent.runtime.executor import StreamedModel, attach
from memintent.runtime.host_store import FillFn, HostStore, fill_from_module

__all__ = [
    "attach", "StreamedModel", "ForwardStats", "HostStore", "fill_from_module", "FillFn", "DeviceArena",
    "check_fits", "CopyEngine", "CpuBackend", "CudaBackend", "POISON_BYTE",
]
