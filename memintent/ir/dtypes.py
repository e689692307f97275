"""The IR's dtypes: one table of every dtype name with its width, its torch dtype and its safetensors name.

Every other dtype rule derives from ``DTYPES``: the bits per value (``DTYPE_BITS``, ``dtype_bytes``), the torch
conversions both ways (``torch_dtype``, ``ir_dtype``), the safetensors header names (``safetensors_dtype``) and
the float dtypes a model may be built in (``MODEL_DTYPES``, ``normalize_float_dtype``). The table names torch
dtypes by attribute so that this module, like the rest of ``memintent.ir``, imports no torch; the functions that
return torch objects import it when called.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DType:
    bits: int                       # width of one value; int4 packs two values in a byte
    torch: str | None = None        # attribute of the ``torch`` module; None: the runtime cannot hold it
    safetensors: str | None = None  # dtype name in a safetensors header; None: not read from checkpoints


DTYPES: dict[str, DType] = {
    "f64": DType(64, "float64", "F64"),
    "f32": DType(32, "float32", "F32"),
    "bf16": DType(16, "bfloat16", "BF16"),
    "f16": DType(16, "float16", "F16"),
    "i64": DType(64, "int64", "I64"),
    "i32": DType(32, "int32", "I32"),
    "i16": DType(16, "int16", "I16"),
    "i8": DType(8, "int8", "I8"),
    "u8": DType(8, "uint8", "U8"),
    "i4": DType(4),
    "bool": DType(8, "bool", "BOOL"),
    "f8e4m3": DType(8),
    "f8e5m2": DType(8),
    "c64": DType(64, "complex64"),
}

DTYPE_BITS: dict[str, int] = {name: d.bits for name, d in DTYPES.items()}

# The float dtypes a model is built and traced in (presets, hf: folders, --dtype), and the names users write.
MODEL_DTYPES = ("bf16", "f16", "f32")
_FLOAT_ALIASES: dict[str, str] = {
    "bf16": "bf16", "bfloat16": "bf16",
    "f16": "f16", "fp16": "f16", "float16": "f16", "half": "f16",
    "f32": "f32", "fp32": "f32", "float32": "f32", "float": "f32",
}


def dtype_bytes(dtype: str, numel: int) -> int:
    """Bytes that ``numel`` values of ``dtype`` occupy (int4 rounds up to whole bytes)."""
    return (DTYPE_BITS[dtype] * numel + 7) // 8


@functools.lru_cache(maxsize=None)
def torch_dtypes() -> dict[str, Any]:
    """``{IR name: torch.dtype}`` for every dtype the runtime can hold (do not modify: it is cached)."""
    import torch  # deferred: the IR and the passes are plain data and arithmetic, and run without torch

    return {name: getattr(torch, d.torch) for name, d in DTYPES.items() if d.torch is not None}


@functools.lru_cache(maxsize=None)
def _ir_names() -> dict[Any, str]:
    return {t: name for name, t in torch_dtypes().items()}


def torch_dtype(ir: str) -> Any:
    """The torch dtype of IR dtype ``ir``; ``KeyError`` when it has none (callers say what that means to them)."""
    return torch_dtypes()[ir]


def ir_dtype_of(dtype: Any) -> str | None:
    """The IR name of a torch dtype, or None when the IR has none for it."""
    return _ir_names().get(dtype)


def safetensors_dtype(name: str) -> Any:
    """The torch dtype of a safetensors header dtype name ("BF16"), or None when a plan's weight cannot have it."""
    ir = next((k for k, d in DTYPES.items() if d.safetensors == name), None)
    return torch_dtype(ir) if ir is not None else None


def normalize_float_dtype(name: str) -> str | None:
    """IR name of a float dtype written as 'bf16', 'bfloat16', 'torch.bfloat16', 'fp16', 'half', ...; None when the
    name is not one of ``MODEL_DTYPES``."""
    return _FLOAT_ALIASES.get(str(name).lower().removeprefix("torch."))
