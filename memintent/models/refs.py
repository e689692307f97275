"""Model references: what the user names on the command line, resolved into a ``ModelSource``.

``NAME``
    A preset (``models.preset``: ``llama-3-70b``, ``w1``, ...), with deterministic random weights.
``hf:PATH``
    A local Hugging Face folder (``models.hf``).
``py:MODULE:FUNCTION``
    A factory returning ``(nn.Module, example_inputs_tuple)`` (``models.py``); runs user code: ``allow_code``.
"""

from __future__ import annotations

import dataclasses

from memintent.errors import MemintentError
from memintent.models import preset
from memintent.models.hf import _resolve_hf
from memintent.models.preset import PresetSource
from memintent.models.py import PySource, _load_factory
from memintent.models.source import ModelSource, normalize_dtype


def resolve(ref: str, dtype: str | None = None, allow_code: bool = True) -> ModelSource:
    """Resolve a model reference: a preset name, ``hf:PATH`` or ``py:MODULE:FUNCTION``."""
    ref = str(ref).strip()
    ir_dtype = normalize_dtype(dtype) if dtype is not None else None
    if ref.startswith("hf:"):
        return _resolve_hf(ref, ir_dtype, allow_code)
    if ref.startswith("py:"):
        if not allow_code:
            raise MemintentError(f"{ref}: py: references import and run your code: pass --allow-code to allow it")
        return PySource(ref, _load_factory(ref), ir_dtype)
    if ref in preset.PRESETS:
        cfg = preset.ModelConfig.from_name(ref)
        if ir_dtype is not None:
            cfg = dataclasses.replace(cfg, dtype=ir_dtype)
        return PresetSource(ref, cfg)
    raise MemintentError(f"unknown model {ref!r}: use a preset ({', '.join(preset.PRESETS)}), hf:PATH (a local "
                         "Hugging Face folder) or py:MODULE:FUNCTION (a factory returning (module, inputs); "
                         "needs --allow-code)")




__all__ = ["resolve", "normalize_dtype"]
