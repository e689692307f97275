"""memintent: GPU memory as a bounded working set. Trace a PyTorch model into the Memory Intent IR, plan which
blocks stay resident and which stream from pinned host memory under an HBM budget, and run the plan.

``memintent.load(plan)`` builds the plan's model and attaches the plan; ``memintent.wrap(model, plan)`` attaches it
to a model you built (``memintent.api``); ``memintent.engine.Engine`` serves a generation plan."""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``load`` and ``wrap`` come from the top layer (``api``); resolved on first use, so importing a lower layer
    # (the IR, the passes: plain arithmetic) does not import torch and the runtime through this package.
    if name in ("load", "wrap"):
        return getattr(importlib.import_module("memintent.api"), name)
    raise AttributeError(f"module 'memintent' has no attribute {name!r}")


__all__ = ["__version__", "load", "wrap"]
