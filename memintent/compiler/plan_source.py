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
    check_source(program, src)
    return src


def check_source(program: Program, src: ModelSource) -> None:
    """Refuse, before anything is allocated, a model or checkpoint that is not the one the plan was compiled for:
    the built model's fingerprint (weight names, shapes, dtypes) must be the plan's, and stored weights (the
    safetensors headers of an hf: folder) must have the shapes and dtypes the plan expects."""
    from memintent.compiler.fingerprint import IR_TO_TORCH, fingerprint_module, weight_entries
    from memintent.ir.model import ObjectKind

    model = src.build("meta")
    fp = fingerprint_module(model)
    want = {o.name: (tuple(o.shape), o.dtype) for o in program.objects if o.kind == ObjectKind.weight}
    if fp != program.fingerprint:
        have = {n: (tuple(s), d) for n, s, d in weight_entries(model)}
        fmt = lambda x: "absent" if x is None else f"{'x'.join(map(str, x[0])) or 'scalar'} {x[1]}"  # noqa: E731
        diffs = [f"{n}: model {fmt(have.get(n))}, plan {fmt(want.get(n))}" for n in sorted(set(have) | set(want))
                 if have.get(n) != want.get(n)]
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        why = ("; first differences: " + "; ".join(diffs[:3]) + more if diffs else
               " (its weight objects match the model: the plan's fingerprint was edited)")
        raise MemintentError(f"the model {program.model.ref} does not match the plan {program.name!r}: model "
                             f"fingerprint {fp}, plan {program.fingerprint}{why}; recompile the plan for this model")
    src.check_checkpoint({n: (shape, IR_TO_TORCH[d]) for n, (shape, d) in want.items() if d in IR_TO_TORCH})


def resident_model(src: ModelSource, device: torch.device) -> torch.nn.Module:
    """The whole model on ``device`` in its own dtype, filled from the model source itself (the same values the
    host store was filled with, before any quantization for transfer)."""
    model = src.build("meta").to_empty(device=device)
    with torch.no_grad():
        src.fill_weights(named_weights(model))   # tied aliases: filled once, under the first name
    return model
