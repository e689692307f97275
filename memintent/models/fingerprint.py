"""A model's structural fingerprint: what a plan was compiled for, so a runtime can refuse a different model."""

from __future__ import annotations

import hashlib

import torch

from memintent.errors import MemintentError
from memintent.ir.dtypes import ir_dtype_of, torch_dtypes
from memintent.ir.model import ObjectKind, Program


def ir_dtype(dtype: torch.dtype) -> str:
    """The IR name of a tensor's dtype (``memintent.ir.dtypes`` is the one table); a one-line error for others."""
    name = ir_dtype_of(dtype)
    if name is None:
        raise MemintentError(f"dtype {dtype} is not supported: use one of {sorted(map(str, torch_dtypes().values()))}")
    return name


def fingerprint_entries(entries: list[tuple[str, list[int] | tuple[int, ...], str]]) -> str:
    """sha256 over sorted (name, shape, dtype) triples."""
    h = hashlib.sha256()
    for name, shape, dtype in sorted((n, tuple(s), d) for n, s, d in entries):
        h.update(f"{name}:{'x'.join(map(str, shape))}:{dtype};".encode())
    return "sha256:" + h.hexdigest()


def named_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, each shared tensor once under its first name: the names plans use."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def weight_entries(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every weight, as ``named_weights`` names them."""
    return [(name, tuple(t.shape), ir_dtype(t.dtype)) for name, t in named_weights(module).items()]


def fingerprint_module(module: torch.nn.Module) -> str:
    return fingerprint_entries(weight_entries(module))


def check_fingerprint(module: torch.nn.Module, program: Program, limit: int = 3) -> None:
    """Refuse a model that is not the one ``program`` was compiled for: its fingerprint must be the plan's. The message names both fingerprints and the first ``limit`` weights whose name,
    shape or dtype differ."""
    fp = fingerprint_module(module)
    if fp == program.fingerprint:
        return
    have = {n: (tuple(s), d) for n, s, d in weight_entries(module)}
    want = {o.name: (tuple(o.shape), o.dtype) for o in program.objects if o.kind == ObjectKind.weight}

    def fmt(x):
        return "absent" if x is None else f"{'x'.join(map(str, x[0])) or 'scalar'} {x[1]}"

    diffs = [f"{n}: model {fmt(have.get(n))}, plan {fmt(want.get(n))}" for n in sorted(set(have) | set(want))
             if have.get(n) != want.get(n)]
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    why = ("; first differences: " + "; ".join(diffs[:limit]) + more if diffs else
           " (its weight objects match the model: the plan's fingerprint was edited)")
    raise MemintentError(f"the model {program.model.ref} does not match the plan {program.name!r}: model fingerprint "
                         f"{fp}, plan {program.fingerprint}{why}; recompile the plan for this model")
