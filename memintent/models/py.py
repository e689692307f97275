"""``py:MODULE:FUNCTION``: a factory returning ``(nn.Module, example_inputs_tuple)``; MODULE is a dotted module name
or a path to a .py file. Importing it runs user code, so it needs ``allow_code=True`` (``--allow-code``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import torch
from torch import nn

from memintent.errors import MemintentError
from memintent.ir.dtypes import torch_dtype
from memintent.models.source import (
    ModelSource,
    _check_target,
    _find_layers,
    _meta_clone,
    _named_tensors,
    normalize_dtype,
)


class PySource(ModelSource):
    kind = "py"
    own_inputs = True

    def __init__(self, ref: str, factory, dtype: str | None):
        self.factory = factory
        try:
            result = factory()
        except MemintentError:
            raise
        except Exception as e:
            raise MemintentError(f"{ref}: the factory raised {type(e).__name__}: {e}") from None
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module)):
            raise MemintentError(f"{ref}: the factory must return (nn.Module, example_inputs_tuple), "
                                 f"got {type(result).__name__}")
        module, inputs = result
        inputs = inputs if isinstance(inputs, tuple) else (inputs,)
        floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
        own = normalize_dtype(floats[0]) if floats else "f32"
        if dtype is not None and dtype != own:
            module = module.to(torch_dtype(dtype))
            inputs = tuple(x.to(torch_dtype(dtype)) if isinstance(x, torch.Tensor) and x.is_floating_point()
                           else x for x in inputs)
        self.module, self.inputs = module.eval().requires_grad_(False), inputs
        lm = getattr(module, "layers", None)
        path, n = ("layers", len(lm)) if isinstance(lm, nn.ModuleList) else _find_layers(module)
        super().__init__(ref, dtype or own, n, path)

    def build(self, device="meta", num_layers: int | None = None, attention: str | None = None) -> nn.Module:
        if num_layers is not None and num_layers != self.num_layers:
            raise MemintentError(f"{self.ref}: a py: factory builds {self.num_layers} layers; it cannot build "
                                 f"{num_layers}")
        return _meta_clone(self.module, device)

    def example_inputs(self, batch: int, seq: int, device="meta") -> tuple:
        """The factory's own example inputs (batch and seq are the factory's, not these), moved to ``device``."""
        return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in self.inputs)

    def fill_weights(self, named: dict[str, torch.Tensor]) -> None:
        ref = _named_tensors(self.module)
        with torch.no_grad():
            for name, t in named.items():
                if name not in ref:
                    raise MemintentError(f"{name} is not a weight of {self.ref}")
                _check_target(name, t, ref[name])
                t.copy_(ref[name])



def _load_factory(ref: str):
    spec = ref[3:]
    mod_name, sep, func_name = spec.rpartition(":")
    if not sep or not mod_name or not func_name:
        raise MemintentError(f"{ref!r} is not py:MODULE:FUNCTION (e.g. py:examples/toy_mlp.py:mlp_stack or "
                             "py:mypkg.models:build)")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name or "/" in mod_name:
            file = Path(mod_name).expanduser()
            if not file.is_file():
                raise MemintentError(f"{ref}: file {file} does not exist")
            mspec = importlib.util.spec_from_file_location(f"memintent_user_{file.stem}", file)
            module = importlib.util.module_from_spec(mspec)
            mspec.loader.exec_module(module)
        else:
            try:
                module = importlib.import_module(mod_name)
            except ModuleNotFoundError as e:
                if e.name is None or not mod_name.startswith(e.name) or os.getcwd() in sys.path:
                    raise
                sys.path.insert(0, os.getcwd())  # console scripts do not put the working directory on sys.path
                module = importlib.import_module(mod_name)
    except MemintentError:
        raise
    except Exception as e:
        raise MemintentError(f"{ref}: cannot import {mod_name}: {type(e).__name__}: {e}") from None
    factory = getattr(module, func_name, None)
    if not callable(factory):
        raise MemintentError(f"{ref}: {mod_name} has no function {func_name}")
    return factory


