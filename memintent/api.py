"""The Python API: a few lines from a plan (or a model of your own) to a model whose forward streams.

    import memintent
    model, handle = memintent.load("tiny.plan.json", device="cpu")   # the plan's model, weights filled, hooked
    logits = model(input_ids)                                         # streams as planned
    handle.detach()

    handle = memintent.wrap(my_model, "plan.json", device="cuda")    # your own nn.Module (weights loaded)
    my_model.generate(...)                                            # Hugging Face generate runs unchanged
"""

from __future__ import annotations

import os

import torch

from memintent.ir.model import Program
from memintent.ir.plan_file import load_plan
from memintent.ir.proven import Proven
from memintent.models.plan_model import source_for
from memintent.passes.verify import prove
from memintent.runtime.device import pick_device
from memintent.runtime.executor import StreamedModel, attach


def _proven(plan: Proven | Program | str | os.PathLike) -> Proven:
    """One plan (a pipeline file is refused in one line by ``load_plan``), verified once."""
    return prove(plan if isinstance(plan, (Proven, Program)) else load_plan(plan))


def load(plan: Proven | Program | str | os.PathLike, device: str | None = None, *, allow_code: bool = False,
         check: bool = False) -> tuple[torch.nn.Module, StreamedModel]:
    """Build the model the plan names (preset, hf: folder, or py: factory with ``allow_code``), fill its host
    store from the source's weights, and attach the plan. Returns ``(model, handle)``."""
    proven = _proven(plan)
    src = source_for(proven.program, allow_code)
    model = src.build("meta")
    handle = attach(model, proven, pick_device(device), check=check, fill=src.fill_weights, model_checked=True)
    return model, handle


def wrap(model: torch.nn.Module, plan: Proven | Program | str | os.PathLike, device: str | None = None, *,
         check: bool = False) -> StreamedModel:
    """Attach a plan to a model you built (with its weights): its weights move into the plan's host store and
    arena, and ``model(...)`` / ``model.generate(...)`` stream from then on. Returns the handle (``detach()``)."""
    return attach(model, _proven(plan), pick_device(device), check=check)
