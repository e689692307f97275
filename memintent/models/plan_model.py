"""The model a plan names, resolved and checked against the plan before anything is allocated."""

from __future__ import annotations

import torch

from memintent.compiler.fingerprint import named_weights
from memintent.compiler.refs import ModelSource, resolve
from memintent.errors import MemintentError
from memintent.ir.model import Program


def source_for(program: Program, allow_code: bool) -> ModelSource:
    """The model the plan was compiled for. A plan naming a py: factory runs user code: only with --allow-code."""
    if program.model.kind == "py" and not allow_code:
        raise MemintentError(f"the plan names a py: model factory ({program.model.ref}); running it imports and "
                             "runs that code: pass --allow-code if you trust it")
    src = resolve(program.model.ref, dtype=program.model.dtype, allow_code=allow_code)
    if program.model.stage:
        from memintent.compiler.stages import stage_of

        src = stage_of(src, program.model.stage)      # one pipeline stage's layers of the model
    check_source(program, src)
    return src


def check_source(program: Program, src: ModelSource) -> None:
    """Refuse, before anything is allocated, a model or checkpoint that is not the one the plan was compiled for:
    the built model's fingerprint (weight names, shapes, dtypes) must be the plan's, and stored weights (the
    safetensors headers of an hf: folder) must have the shapes and dtypes the plan expects."""
    from memintent.compiler.fingerprint import check_fingerprint
    from memintent.ir.dtypes import torch_dtypes
    from memintent.ir.model import ObjectKind

    check_fingerprint(src.build("meta"), program)
    want = {o.name: (tuple(o.shape), o.dtype) for o in program.objects if o.kind == ObjectKind.weight}
    torch_of = torch_dtypes()
    src.check_checkpoint({n: (shape, torch_of[d]) for n, (shape, d) in want.items() if d in torch_of})


def resident_model(src: ModelSource, device: torch.device) -> torch.nn.Module:
    """The whole model on ``device`` in its own dtype, filled from the model source itself (the same values the
    host store was filled with, before any quantization for transfer)."""
    model = src.build("meta").to_empty(device=device)
    with torch.no_grad():
        src.fill_weights(named_weights(model))   # tied aliases: filled once, under the first name
    return model
