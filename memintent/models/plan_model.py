"""The model a plan names, resolved and checked against the plan before anything is allocated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from memintent.errors import MemintentError
from memintent.ir.dtypes import torch_dtypes
from memintent.ir.model import ObjectKind, Program
from memintent.ir.proven import Proven
from memintent.models.fingerprint import check_fingerprint, named_weights
from memintent.models.part import part_of
from memintent.models.refs import resolve
from memintent.models.source import ModelSource


def model_of(plan: Program | Proven, allow_code: bool) -> ModelSource:
    """The (whole) model a plan or pipeline names, resolved once. A plan naming a py: factory runs user code: only
    with ``allow_code``."""
    ref = plan.pipeline.model if isinstance(plan, Proven) and plan.pipeline is not None else (
        plan.program.model if isinstance(plan, Proven) else plan.model)
    if ref.kind == "py" and not allow_code:
        raise MemintentError(f"the plan names a py: model factory ({ref.ref}); running it imports and runs that "
                             "code: pass --allow-code if you trust it")
    return resolve(ref.ref, dtype=ref.dtype, allow_code=allow_code)


def part_source(program: Program, whole: ModelSource) -> ModelSource:
    """The model ``program`` runs, cut from the whole model (a pipeline part's layers, or all of it) and checked
    against the plan before anything is allocated (``check_source``)."""
    src = part_of(whole, program.model.part)
    check_source(program, src)
    return src


@dataclass(frozen=True, slots=True)
class PlanSources:
    """The models a proven plan runs, resolved once: the whole model (its vocabulary, tokenizer, ``--verify``'s
    reference) and, for each part this process runs, that part's model checked against the part's plan."""

    whole: ModelSource
    parts: dict[int, ModelSource]


def plan_sources(proven: Proven, allow_code: bool, local: Iterable[int] = (0,)) -> PlanSources:
    """``PlanSources`` of ``proven`` for its parts ``local`` (one plan: part 0, the whole model itself)."""
    whole = model_of(proven, allow_code)
    return PlanSources(whole, {r: part_source(proven.part(r).program, whole) for r in local})


def source_for(program: Program, allow_code: bool) -> ModelSource:
    """The model the plan was compiled for, resolved and checked: ``part_source(program, model_of(...))``."""
    return part_source(program, model_of(program, allow_code))


def check_source(program: Program, src: ModelSource) -> None:
    """Refuse, before anything is allocated, a model or checkpoint that is not the one the plan was compiled for:
    the built model's fingerprint (weight names, shapes, dtypes) must be the plan's, and stored weights (the
    safetensors headers of an hf: folder) must have the shapes and dtypes the plan expects."""
    check_fingerprint(src.build("meta"), program)
    want = {o.name: (tuple(o.shape), o.dtype) for o in program.objects if o.kind == ObjectKind.weight}
    torch_of = torch_dtypes()
    src.check_checkpoint({n: (shape, torch_of[d]) for n, (shape, d) in want.items() if d in torch_of})


def resident_model(src: ModelSource, device: torch.device, model: torch.nn.Module | None = None) -> torch.nn.Module:
    """The whole model (``model``, built on meta; default: ``src.build``) on ``device`` in its own dtype, filled from
    the model source itself (the same values the host store was filled with, before any quantization for
    transfer)."""
    model = (model if model is not None else src.build("meta")).to_empty(device=device)
    with torch.no_grad():
        src.fill_weights(named_weights(model))   # tied aliases: filled once, under the first name
    return model
