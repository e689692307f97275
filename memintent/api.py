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


def _program(plan: Program | str | os.PathLike) -> Program:
    from memintent.ir.plan_file import load_plan
    from memintent.passes.verify import verify

    return verify(plan if isinstance(plan, Program) else load_plan(plan))


def load(plan: Program | str | os.PathLike, device: str | None = None, *, allow_code: bool = False,
         check: bool = False):
    """Build the model the plan names (preset, hf: folder, or py: factory with ``allow_code``), fill its host
    store from the source's weights, and attach the plan. Returns ``(model, handle)``."""
    from memintent.runtime.device import pick_device
    from memintent.compiler.plan_source import source_for
    from memintent.runtime import attach

    program = _program(plan)
    src = source_for(program, allow_code)
    model = src.build("meta")
    handle = attach(model, program, pick_device(device), check=check, fill=src.fill_weights)
    return model, handle


def wrap(model: torch.nn.Module, plan: Program | str | os.PathLike, device: str | None = None, *,
         check: bool = False):
    """Attach a plan to a model you built (with its weights): its weights move into the plan's host store and
    arena, and ``model(...)`` / ``model.generate(...)`` stream from then on. Returns the handle (``detach()``)."""
    from memintent.runtime.device import pick_device
    from memintent.runtime import attach

    return attach(model, _program(plan), pick_device(device), check=check)
