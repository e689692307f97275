"""``hf:PATH``: a local Hugging Face folder (config.json + *.safetensors, possibly sharded with
model.safetensors.index.json) of a decoder-only causal LM that transformers' ``AutoModelForCausalLM`` builds.
Weights are read with ``safetensors.safe_open``; nothing is ever unpickled. Checkpoint keys are mapped onto the
model's weights with transformers' own conversion table, as ``from_pretrained`` does.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from memintent.errors import MemintentError
from memintent.ir.dtypes import safetensors_dtype
from memintent.kv.attention import register_hf_attention
from memintent.models.source import (
    ModelSource,
    _alias_groups,
    _check_target,
    _find_layers,
    _first_line,
    _layer_count,
    _named_tensors,
    _non_persistent,
    normalize_dtype,
)


def _text_config(config):
    """The config of the language model: a multimodal config's text part, else the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _natural_key(key: str) -> list[tuple]:
    """Sort key of a checkpoint name with numbers compared as numbers ('experts.2' before 'experts.10'): the order
    in which transformers hands a checkpoint's keys to its converters, so stacked experts come out in order."""
    parts: list[tuple] = []
    for part in key.split("."):
        if part.isdigit():
            parts.append((0, int(part)))
            continue
        text = part.rstrip("0123456789")
        digits = part[len(text):]
        parts.append((1, text, int(digits)) if digits else (1, text))
    return parts


def _weight_transforms(model: nn.Module, ref: str) -> tuple[list, list]:
    """transformers' checkpoint conversions for ``model``, the table ``from_pretrained`` applies while loading, as
    (renamings, converters). transformers 5 rewrites some layouts (per-expert MoE matrices fused into one 3-D
    weight, renamed modules); transformers 4 has no such table and loads checkpoints by name: ([], []).

    ``WeightConverter`` is public (exported by ``transformers``); the table itself comes from
    ``transformers.conversion_mapping.get_model_conversion_mapping``, which ``from_pretrained`` and PEFT call
    (same signature in transformers 5.17 and 5.24). Any failure to get it is an error, never a silent fallback.
    """
    import transformers  # deferred: heavy, optional

    if importlib.util.find_spec("transformers.conversion_mapping") is None:
        return [], []   # transformers 4: checkpoints load by name
    try:
        from transformers import WeightConverter  # deferred: heavy, optional
        from transformers.conversion_mapping import get_model_conversion_mapping  # deferred: heavy, optional

        transforms = get_model_conversion_mapping(model)
    except Exception as e:
        raise MemintentError(f"{ref}: transformers {transformers.__version__} cannot give the checkpoint conversions "
                             f"of {type(model).__name__} ({type(e).__name__}: {_first_line(e)}), so its "
                             f"checkpoint cannot be mapped onto the model's weights") from None
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return [t for t in transforms if not isinstance(t, WeightConverter)], converters


def _rename_key(key: str, renamings: list, converters: list, prefix: str, model_names: set[str]
                ) -> tuple[str, Any, str | None]:
    """(model name, converter or None, the converter's source pattern or None) of checkpoint key ``key``. As
    ``from_pretrained``: every renaming in turn, then at most one converter, then the base model's prefix added or
    removed where that names a weight of the model."""
    for t in renamings:
        key, _ = t.rename_source_key(key)
    conv = pattern = None
    for c in converters:
        key, pattern = c.rename_source_key(key)
        if pattern is not None:
            conv = c
            break
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1:] in model_names:
        key = key[len(prefix) + 1:]
    elif prefix and f"{prefix}.{key}" in model_names:
        key = f"{prefix}.{key}"
    return key, conv, pattern


class _Shards:
    """The safetensors files of a checkpoint, each opened on first use and all closed on exit. A file that cannot
    be read is a one-line ``MemintentError`` naming it."""

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self._open: dict[Path, Any] = {}

    def __enter__(self) -> _Shards:
        return self

    def __exit__(self, *exc) -> None:
        for h in self._open.values():
            h.__exit__(None, None, None)
        self._open.clear()

    def _with(self, key: str, what):
        file = self.files[key]
        try:
            if file not in self._open:
                self._open[file] = safe_open(str(file), framework="pt").__enter__()
            return what(self._open[file])
        except Exception as e:
            raise MemintentError(f"safetensors file {file} is truncated or malformed: {e}") from None

    def header(self, key: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype name) of tensor ``key``, from the header only."""
        def shape_and_dtype(handle) -> tuple[tuple[int, ...], str]:
            sl = handle.get_slice(key)
            return tuple(sl.get_shape()), sl.get_dtype()

        return self._with(key, shape_and_dtype)

    def read(self, key: str) -> torch.Tensor:
        return self._with(key, lambda h: h.get_tensor(key))


@dataclasses.dataclass
class _Checkpoint:
    """A meta model of some depth and how a checkpoint's tensors map onto its weights."""

    n_layers: int | None                  # None: the source's own depth
    tensors: dict[str, torch.Tensor]      # every name of every weight (tied ones under each name)
    aliases: dict[str, list[str]]         # name -> all names of the same tensor
    non_persistent: set[str]              # buffers the model computes rather than loads
    model: nn.Module
    direct: dict[str, str]                # model name -> checkpoint key
    converted: dict[str, tuple]           # model name -> (converter, target, [(pattern, checkpoint key), ...])


# Architectures that pass every check below yet would serve wrong tokens or fail mid-step, each with why (found by
# tests/make_hf_tiny_table.py, which serves every causal LM of transformers): refused up front in one line.
_NOT_SERVED = {
    # the traced step's blocks run in another order than the modules' hooks fire
    "ctrl": "model holds a tensor (pos_encoding) on the module around its layers, which a generation plan visits "
            "out of the traced order",
    "gpt_bigcode": "model holds a tensor on the module around its layers, which a generation plan visits out of "
                   "the traced order",
    "zaya": "model holds weights (input_hidden_states_scale, _bias) on the module around its layers, which a "
            "generation plan visits out of the traced order",
    # every layer runs a Mamba mixer beside its attention: its recurrent state would have to live between steps
    "falcon_h1": "layers run a Mamba mixer beside attention, whose recurrent state the serving engine does not keep "
                 "between steps",
    "olmo3": "rotary embeddings run again between its layers, out of the traced order a generation plan follows",
    "modernbert-decoder": "rotary embeddings run again between its layers, out of the traced order a generation "
                          "plan follows",
    "phimoe": "rotary embedding's buffers are used where a generation plan does not copy them in",
    "jetmoe": "attention experts route tokens with data-dependent shapes, which a traced step cannot have",
}


class HFSource(ModelSource):
    kind = "hf"

    def __init__(self, ref: str, path: Path, config, dtype: str, dtype_forced: bool, files: dict[str, Path],
                 allow_code: bool):
        text = _text_config(config)
        if hasattr(text, "allow_global_per_layer_attribute_access"):
            # A config with per-layer attributes (Gemma 4: another head size in its global layers) refuses to read
            # them globally; the global value is what most layers use, and the KV pool is laid out for it: layers
            # that store keys of another shape are refused when traced (``check_kv_shapes``).
            text.allow_global_per_layer_attribute_access = True
        n_heads = getattr(text, "num_attention_heads", None)
        hidden = getattr(text, "hidden_size", None)
        head_dim = getattr(text, "head_dim", None) or (hidden // n_heads if hidden and n_heads else None)
        n_kv = getattr(text, "num_key_value_heads", None) or n_heads
        super().__init__(ref, dtype, getattr(text, "num_hidden_layers", None), None, n_kv, head_dim,
                         getattr(text, "vocab_size", None), n_heads)
        self.path, self.config, self.files = path, config, files
        self.max_positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        self.dtype_forced, self.allow_code = dtype_forced, allow_code
        self._meta: dict[int | None, nn.Module] = {}
        self._buffers: dict[int | None, nn.Module] = {}
        model = self._build_meta(None)
        self.layers_path, found = _find_layers(model, self.num_layers)
        if self.num_layers is None:
            self.num_layers = found
        self._kwargs = self._pick_forward_kwargs(model)

    # -- building ---------------------------------------------------------------------------------------------
    def _config_with_layers(self, num_layers: int | None):
        cfg = copy.deepcopy(self.config)
        if num_layers is None or num_layers == self.num_layers:
            return cfg
        text = _text_config(cfg)
        old = text.num_hidden_layers
        text.num_hidden_layers = num_layers
        # Per-layer lists (layer_types and the like) follow the depth: truncated, or extended cyclically.
        for key, value in list(vars(text).items()):
            if isinstance(value, list) and len(value) == old and old > 0:
                setattr(text, key, [value[i % old] for i in range(num_layers)])
        return cfg

    def _construct(self, cfg, attention: str | None = None):
        """Build from ``cfg`` with ``attention`` (an implementation registered with transformers), or else with
        SDPA, falling back to the best one transformers offers for an architecture without SDPA (eager)."""
        kw = dict(dtype=self.torch_dtype, trust_remote_code=self.allow_code)
        try:
            model = self._construct_default(cfg, kw) if attention is None else \
                self._construct_engine(cfg, kw, attention)
        except MemintentError:
            raise
        except Exception as e:
            raise MemintentError(f"{self.ref}: transformers cannot build the model from config.json: "
                                 f"{type(e).__name__}: {_first_line(e)}") from None
        return model.eval().requires_grad_(False)

    def _construct_engine(self, cfg, kw: dict, attention: str):
        """Build with attention routed to ``attention``. An architecture that looks implementations up in a table
        of its own refuses the name (Falcon: KeyError); one whose modeling code never consults transformers'
        attention interface (Bloom, MPT, GPT-Neo) builds with any name and is refused here, by its modeling
        module, before a trace could fail on it. The proof is the traced step's attention calls
        (``check_engine_attention``); this only names the cause early."""
        from transformers import AutoModelForCausalLM  # deferred: heavy, optional

        if getattr(cfg, "model_type", None) in _NOT_SERVED:
            raise MemintentError(self._refusal(_NOT_SERVED[cfg.model_type]))
        text = _text_config(cfg)
        if getattr(text, "num_kv_shared_layers", 0):
            raise MemintentError(self._refusal(
                f"last {text.num_kv_shared_layers} layers reuse earlier layers' keys and values (KV sharing), where "
                "the serving engine's pool holds each layer's own"))
        try:
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attention, **kw)
        except (KeyError, ValueError):
            raise MemintentError(self._bypasses_interface("")) from None
        module = type(model).__module__
        # Only transformers' own modeling files: custom code may reach the interface under another name.
        if module.startswith("transformers.") and "ALL_ATTENTION_FUNCTIONS" not in vars(sys.modules[module]):
            raise MemintentError(self._bypasses_interface(""))
        if any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules()):
            raise MemintentError(self._refusal("attention adds learned sink logits (GPT-OSS's s_aux), which the "
                                                  "serving engine's attention does not compute"))
        return model

    def _refusal(self, why: str) -> str:
        arch = type(self.config).__name__.removesuffix("Config")
        return f"{self.ref}: the {arch} architecture's {why} (plain forwards work: compile without --objective)"

    def _bypasses_interface(self, where: str) -> str:
        return self._refusal(f"attention does not go through transformers' attention interface{where}, which "
                                "generation plans need")

    def check_engine_attention(self, calls: int) -> None:
        """A model whose traced step calls the engine's attention in fewer layers than it has (a hybrid whose other
        layers keep a recurrent state, like Jamba's Mamba layers) is refused here; so is one that calls it more
        often (DiffLlama's two attention maps a layer): the KV pool holds one cache per layer, which a second call
        would overwrite."""
        n = self.num_layers
        if calls < n:
            raise MemintentError(self._bypasses_interface(f" in {n - calls} of its {n} layers"))
        if calls > n:
            raise MemintentError(self._refusal(
                f"attention calls transformers' attention interface {calls} times in its {n} layers, more than once "
                "in a layer, which the serving engine's KV pool (one cache per layer) does not serve"))

    def _construct_default(self, cfg, kw: dict):
        from transformers import AutoModelForCausalLM  # deferred: heavy, optional

        try:
            # A copy: a refused attempt leaves "sdpa" recorded in the config it was given, which the fallback
            # would then insist on.
            model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="sdpa", **kw)
        except (ValueError, ImportError):  # this architecture has no SDPA attention: the best it has
            model = AutoModelForCausalLM.from_config(cfg, **kw)
        self.attention = getattr(model.config, "_attn_implementation", None) or "eager"
        return model

    def _build_meta(self, num_layers: int | None) -> nn.Module:
        if num_layers not in self._meta:
            with torch.device("meta"):
                self._meta[num_layers] = self._construct(self._config_with_layers(num_layers))
        return self._meta[num_layers]

    def build(self, device="meta", num_layers: int | None = None, attention: str | None = None) -> nn.Module:
        cfg = self._config_with_layers(num_layers)
        with torch.device(device):
            return self._construct(cfg, attention)

    def engine_build(self, device="meta", num_layers: int | None = None) -> nn.Module:
        return self.build(device, num_layers, attention=register_hf_attention())

    def step_call(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> tuple[tuple, dict]:
        return (), dict(input_ids=ids, position_ids=positions[None], logits_to_keep=rows, use_cache=False)

    def step_output(self, out) -> torch.Tensor:
        return out.logits[0]                                              # (S, vocab)

    def dense_logits(self, model: nn.Module, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, logits_to_keep=rows, use_cache=False).logits[0]

    def tokenizer(self):
        """The folder's own tokenizer (tokenizer.json or tokenizer_config.json), loaded offline; None without one."""
        if not any((self.path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return None
        from transformers import AutoTokenizer  # deferred: heavy, optional

        try:
            return AutoTokenizer.from_pretrained(str(self.path), local_files_only=True,
                                                 trust_remote_code=self.allow_code)
        except Exception as e:
            raise MemintentError(f"{self.path}: the tokenizer files cannot be loaded: {type(e).__name__}: "
                                 f"{_first_line(e)}") from None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The ``eos_token_id`` of config.json and of generation_config.json (each one id or a list), in that order:
        Hugging Face's ``generate`` stops at them."""
        text = _text_config(self.config)
        found = [getattr(text, "eos_token_id", None)]
        gen = self.path / "generation_config.json"
        if gen.is_file():
            try:
                found.append(json.loads(gen.read_text()).get("eos_token_id"))
            except (OSError, ValueError, AttributeError) as e:
                raise MemintentError(f"{gen} is not a JSON object ({type(e).__name__}): fix or remove it") from None
        ids: list[int] = []
        for x in found:
            for i in x if isinstance(x, list) else [x]:
                if isinstance(i, int) and not isinstance(i, bool) and i not in ids:
                    ids.append(i)
        return tuple(ids)

    def _buffer_model(self, num_layers: int | None) -> nn.Module:
        """A build whose parameters are on meta and whose buffers are real CPU tensors from the model's own init."""
        if num_layers not in self._buffers:
            orig = nn.Module.register_parameter

            def to_meta(mod, name, param):
                orig(mod, name, param)
                p = mod._parameters.get(name)
                if p is not None and p.device.type != "meta":
                    mod._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

            nn.Module.register_parameter = to_meta
            try:
                with torch.device("cpu"):
                    self._buffers[num_layers] = self._construct(self._config_with_layers(num_layers))
            finally:
                nn.Module.register_parameter = orig
        return self._buffers[num_layers]

    # -- calling ----------------------------------------------------------------------------------------------
    @staticmethod
    def _pick_forward_kwargs(model: nn.Module) -> dict:
        params = inspect.signature(type(model).forward).parameters
        kw: dict[str, Any] = {}
        if "use_cache" in params:
            kw["use_cache"] = False
        # Only the last position's logits: transformers >= 4.50 calls it logits_to_keep, 4.45-4.49 num_logits_to_keep.
        for key in ("logits_to_keep", "num_logits_to_keep"):
            if key in params:
                kw[key] = 1
                break
        return kw

    def forward_kwargs(self) -> dict:
        return dict(self._kwargs)

    # -- weights ---------------------------------------------------------------------------------------------
    def _checkpoint_map(self, model: nn.Module) -> tuple[dict[str, str], dict[str, tuple]]:
        """How the checkpoint's tensors become the model's weights.

        Returns ``direct`` (model name -> checkpoint key) and ``converted`` (model name -> (converter, target,
        [(pattern, checkpoint key), ...])). Keys are renamed and grouped with transformers' own conversion table
        (``_weight_transforms``), in transformers' key order, so the tensors are read by name from the files and
        converted exactly as ``from_pretrained`` would.
        """
        renamings, converters = _weight_transforms(model, self.ref)
        prefix = getattr(model, "base_model_prefix", "") or ""
        model_names = set(_named_tensors(model))
        direct: dict[str, str] = {}
        groups: dict[str, tuple] = {}
        for key in sorted(self.files, key=_natural_key):
            target, conv, pattern = _rename_key(key, renamings, converters, prefix, model_names)
            if conv is None:
                direct.setdefault(target, key)
            else:
                groups.setdefault(target, (conv, target, []))[2].append((pattern, key))
        converted: dict[str, tuple] = {}
        for target, group in groups.items():
            conv = group[0]
            first = conv.target_patterns[0]
            for tp in conv.target_patterns:  # a one-to-many converter makes several weights
                converted[target.replace(first, tp, 1)] = group
        return direct, converted

    def _checkpoint_for(self, names) -> _Checkpoint:
        """The meta model that weights ``names`` belong to (deeper than the source when they name more layers)
        and how the checkpoint maps onto it."""
        layers = _layer_count(names) or None
        n_layers = None if layers is None or layers <= (self.num_layers or 0) else layers
        model = self._build_meta(n_layers)
        direct, converted = self._checkpoint_map(model)
        return _Checkpoint(n_layers, _named_tensors(model), _alias_groups(model), _non_persistent(model), model,
                           direct, converted)

    def _missing(self, name: str, names: list[str]) -> MemintentError:
        tied = [a for a in names if a != name]
        return MemintentError(
            f"weight {name} is missing from the safetensors files in {self.path}"
            + (f" (nor is its tied name {', '.join(tied)} there)" if tied else " and is not tied to one there"))

    def check_checkpoint(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        """Compare the safetensors headers with the weights a plan expects (``{name: (shape, dtype)}``) without
        reading any tensor data, so a checkpoint that changed since the plan was compiled is refused before
        anything is allocated. Tensors that transformers converts while loading (fused MoE experts and the like)
        and computed buffers are checked when ``fill_weights`` reads them."""
        ck = self._checkpoint_for(expected)
        with _Shards(self.files) as shards:
            for name, (shape, dtype) in expected.items():
                names = ck.aliases.get(name, [name])
                key = next((ck.direct[a] for a in names if a in ck.direct), None)
                if key is not None:
                    self._check_header(name, key, tuple(shape), dtype, shards)
                elif (not any(a in ck.converted for a in names) and name not in ck.non_persistent
                      and name in ck.aliases):
                    raise self._missing(name, names)

    def _check_header(self, name: str, key: str, shape: tuple[int, ...], dtype: torch.dtype, shards: _Shards
                      ) -> None:
        got_shape, got_name = shards.header(key)
        file = self.files[key].name
        if got_shape != shape:
            raise MemintentError(f"tensor {key} in {file} has shape {got_shape}: the plan expects {shape} for "
                                 f"{name} (was the checkpoint changed after compiling?)")
        got_dtype = safetensors_dtype(got_name)
        if got_dtype != dtype:
            convertible = got_dtype is not None and got_dtype.is_floating_point and dtype.is_floating_point
            if not (convertible and self.dtype_forced):
                raise MemintentError(f"tensor {key} in {file} is {got_dtype or got_name}: the plan expects "
                                     f"{dtype} for {name}")

    def fill_weights(self, named: dict[str, torch.Tensor]) -> None:
        ck = self._checkpoint_for(named)
        reads, computed = self._sources(named, ck)
        converted: dict[str, dict[str, torch.Tensor]] = {}   # converter target -> the weights it produced
        with _Shards(self.files) as shards, torch.no_grad():
            for name, t, key, conv in reads:
                if conv is None:
                    self._copy(name, key, self.files[key].name, shards.read(key), t)
                else:
                    self._copy_converted(name, t, conv, shards, ck.model, converted)
            if computed:
                bufs = _named_tensors(self._buffer_model(ck.n_layers))
                for name, t in computed:
                    t.copy_(bufs[name])

    def _sources(self, named: dict[str, torch.Tensor], ck: _Checkpoint) -> tuple[list[tuple], list[tuple]]:
        """Where each target's values come from, checked before any is read: ``reads`` of (name, tensor,
        checkpoint key, None) or (name, tensor, None, (alias, converter group)), and ``computed`` (name, tensor)
        for buffers the model computes (non-persistent ones such as RoPE frequencies)."""
        reads, computed = [], []
        for name, t in named.items():
            if name not in ck.tensors:
                raise MemintentError(f"{name} is not a weight of {self.ref}")
            _check_target(name, t, ck.tensors[name])
            names = ck.aliases[name]
            key = next((ck.direct[a] for a in names if a in ck.direct), None)
            conv = next(((a, ck.converted[a]) for a in names if a in ck.converted), None)
            if key is not None or conv is not None:
                reads.append((name, t, key, None if key is not None else conv))
            elif name in ck.non_persistent:
                computed.append((name, t))
            else:
                raise self._missing(name, names)
        return reads, computed

    def _copy_converted(self, name: str, t: torch.Tensor, conv: tuple, shards: _Shards, model: nn.Module,
                        converted: dict[str, dict[str, torch.Tensor]]) -> None:
        alias, (converter, target, items) = conv
        if target not in converted:
            converted[target] = self._convert(converter, target, items, shards.read, model)
        # Each converted weight is copied once: dropped right after, so the converted tensors held at any time are
        # one converter's outputs (a layer's experts), never the whole model a second time.
        out = converted[target].pop(alias, None)
        if out is None:
            raise MemintentError(f"converting {target} from {self.path} did not produce {alias}")
        self._copy(name, f"{alias} (converted)", self.files[items[0][1]].name, out, t)

    def _convert(self, conv, target: str, items, read, model) -> dict[str, torch.Tensor]:
        """Run one transformers WeightConverter (e.g. stack 8 experts' w1 and w3 into gate_up_proj)."""
        c = copy.deepcopy(conv)
        for pattern, key in items:
            c.add_tensor(target, key, pattern, lambda key=key: read(key))
        try:
            return c.convert(target, model=model, config=self.config)
        except MemintentError:
            raise
        except Exception as e:
            raise MemintentError(f"converting the checkpoint tensors {items[0][1]}... into {target} failed: "
                                 f"{type(e).__name__}: {e}") from None

    def _copy(self, name: str, key: str, file: str, src: torch.Tensor, t: torch.Tensor) -> None:
        if tuple(src.shape) != tuple(t.shape):
            raise MemintentError(f"tensor {key} in {file} has shape {tuple(src.shape)}: the model expects "
                                 f"{tuple(t.shape)} for {name}")
        if src.dtype != t.dtype:
            convertible = src.is_floating_point() and t.is_floating_point()
            if not (convertible and self.dtype_forced):
                raise MemintentError(
                    f"tensor {key} in {file} is {src.dtype}: the model expects {t.dtype} for {name}"
                    + (" (pass a dtype, --dtype, to convert)" if convertible else ""))
        t.copy_(src)



# -- resolving ------------------------------------------------------------------------------------------------

def _safetensors_index(path: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or else every *.safetensors header."""

    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MemintentError(f"{index} is not a safetensors index (a JSON object with a weight_map): {e}") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise MemintentError(f"{index} names {f.name}, which is not in {path}: copy that shard into the "
                                     "folder (the index's weight_map names the file of every tensor)")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        other = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        raise MemintentError(f"no *.safetensors files in {path}" + (
            f" (found {', '.join(other[:3])}: memintent does not unpickle checkpoints; convert them to "
            "safetensors)" if other else ""))
    files: dict[str, Path] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                for k in f.keys():
                    files[k] = shard
        except Exception as e:
            raise MemintentError(f"safetensors file {shard} is truncated or malformed: {e}") from None
    return files


def _check_shards(files: dict[str, Path]) -> None:
    """Open every shard's header, so a broken file is reported when resolving rather than mid-load."""

    for shard in sorted(set(files.values())):
        try:
            with safe_open(str(shard), framework="pt") as f:
                f.keys()
        except Exception as e:
            raise MemintentError(f"safetensors file {shard} is truncated or malformed: {e}") from None


def _read_config_json(ref: str, path: Path, allow_code: bool) -> dict:
    """config.json of an hf: folder as JSON, checked to be a transformers config whose code may run."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MemintentError(f"{ref}: no config.json in {path}: a Hugging Face model folder holds the config.json "
                             "that save_pretrained writes next to its safetensors files")
    try:
        raw_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise MemintentError(f"{cfg_file} is malformed JSON: {e}") from None
    except UnicodeDecodeError:
        raise MemintentError(f"{cfg_file} is not UTF-8 text") from None
    if not isinstance(raw_cfg, dict) or "model_type" not in raw_cfg:
        raise MemintentError(f"{cfg_file} has no model_type: not a transformers config")
    if raw_cfg.get("auto_map") and not allow_code:
        raise MemintentError(f"{ref}: config.json points at custom model code (auto_map): pass --allow-code to run it")
    return raw_cfg


_CAUSAL_EXAMPLES = "llama, mistral, qwen2, gemma2, phi3, gpt2"   # model types named in errors as what would do


def _load_causal_config(ref: str, path: Path, raw_cfg: dict, allow_code: bool):
    """transformers' config of the folder, refused unless AutoModelForCausalLM builds a decoder-only model of it."""
    try:
        import transformers  # deferred: heavy, optional
        from transformers import CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig  # deferred: heavy, optional
    except ImportError:
        raise MemintentError("hf: references need transformers: pip install 'memintent[hf]'") from None
    transformers.logging.set_verbosity_error()
    cfg_file = path / "config.json"
    model_type = raw_cfg.get("model_type")
    if not raw_cfg.get("auto_map") and model_type not in CONFIG_MAPPING:
        raise MemintentError(f"{cfg_file} is not a config transformers can read: model_type {model_type!r} is not "
                             f"an architecture transformers {transformers.__version__} knows: use a folder of a "
                             f"decoder-only causal LM it builds ({_CAUSAL_EXAMPLES}), or a transformers release "
                             f"that has {model_type!r}")
    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=allow_code, local_files_only=True)
    except Exception as e:
        raise MemintentError(f"{cfg_file} is not a config transformers can read (model_type {model_type!r}): "
                             f"{type(e).__name__}: {_first_line(e)}") from None
    # The public config -> causal-LM class table that AutoModelForCausalLM itself looks models up in.
    causal = type(config) in MODEL_FOR_CAUSAL_LM_MAPPING or (
        allow_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}))
    if not causal or getattr(config, "is_encoder_decoder", False):
        what = "an encoder-decoder model" if getattr(config, "is_encoder_decoder", False) else \
            "no causal LM class"
        raise MemintentError(f"{cfg_file}: model_type {config.model_type!r} is not a decoder-only causal LM that "
                             f"AutoModelForCausalLM builds ({what}): use a folder of one ({_CAUSAL_EXAMPLES}, ...)")
    return config


def _hf_dtype(path: Path, config, raw_cfg: dict, dtype: str | None) -> tuple[str, bool]:
    """(IR dtype to build in, whether the user forced it): ``dtype`` when given, else the one config.json declares."""
    if dtype is not None:
        return normalize_dtype(dtype), True
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or raw_cfg.get("dtype") \
        or raw_cfg.get("torch_dtype") or "float32"
    try:
        return normalize_dtype(declared), False
    except MemintentError:
        raise MemintentError(f"{path / 'config.json'} declares dtype {declared!r}: pass a dtype (bf16, f16 or f32)"
                             ) from None


def _resolve_hf(ref: str, dtype: str | None, allow_code: bool) -> HFSource:
    raw = ref[3:]
    if not raw:
        raise MemintentError("hf: needs a folder: write hf:/path/to/model (a local Hugging Face folder)")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise MemintentError(f"{ref}: folder {path} does not exist (hf: takes a local folder; download it first)")
    raw_cfg = _read_config_json(ref, path, allow_code)
    config = _load_causal_config(ref, path, raw_cfg, allow_code)
    ir, forced = _hf_dtype(path, config, raw_cfg, dtype)
    files = _safetensors_index(path)
    _check_shards(files)
    return HFSource(ref, path, config, ir, forced, files, allow_code)


