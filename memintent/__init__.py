"""memintent: GPU memory as a bounded working set. Trace a PyTorch model into the Memory Intent IR, plan which
blocks stay resident and which stream from pinned host memory under an HBM budget, and run the plan."""

__version__ = "0.1.0"


def load(plan, device=None, *, allow_code=False, check=False):
    """See ``memintent.api.load``: the plan's model, filled and attached; returns ``(model, handle)``."""
    from memintent.api import load as _load

    return _load(plan, device, allow_code=allow_code, check=check)


def wrap(model, plan, device=None, *, check=False):
    """See ``memintent.api.wrap``: attach a plan to your own model; returns the handle."""
    from memintent.api import wrap as _wrap

    return _wrap(model, plan, device, check=check)
