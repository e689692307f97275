"""Model sources: what a model reference resolves to, and the one way every layer above calls a model.

A ``ModelSource`` builds the module (on meta: nothing allocated), fills its weights, says how to call it for a
plain forward, for an engine step and for a dense reference forward, and checks stored weights against a plan.
One subclass per reference form, one file each: ``preset.py`` (``NAME``), ``hf.py`` (``hf:PATH``), ``py.py``
(``py:MODULE:FUNCTION``); ``part.py`` is a pipeline part of a preset; ``refs.resolve`` turns a reference into one.
Nothing outside this folder branches on a source's kind.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from memintent.errors import MemintentError
from memintent.ir.dtypes import MODEL_DTYPES, ir_dtype_of, normalize_float_dtype, torch_dtype
from memintent.ir.model import ModelRef


def normalize_dtype(dtype: Any) -> str:
    """IR dtype name of a float dtype given as 'bf16', 'bfloat16', 'torch.bfloat16' or a torch.dtype."""
    name = (ir_dtype_of(dtype) or str(dtype)) if isinstance(dtype, torch.dtype) else str(dtype)
    ir = normalize_float_dtype(name)
    if ir is None:
        raise MemintentError(f"dtype {dtype!r} is not supported: use one of {', '.join(MODEL_DTYPES)}")
    return ir


def _tokens(batch: int, seq: int, vocab: int | None, device) -> torch.Tensor:
    """Deterministic token ids (batch, seq) int64; on meta just the shape."""
    if str(device) == "meta":
        return torch.zeros((batch, seq), dtype=torch.long, device="meta")
    ids = (torch.arange(batch * seq, dtype=torch.long) * 7919 + 13) % (vocab or 32000)  # (batch*seq,)
    return ids.view(batch, seq).to(device)


def _named_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every name of every parameter and buffer, shared tensors under each of their names."""
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def _alias_groups(module: nn.Module) -> dict[str, list[str]]:
    """name -> all names of the same tensor (tied weights), first name first."""
    by_id: dict[int, list[str]] = {}
    for name, t in _named_tensors(module).items():
        by_id.setdefault(id(t), []).append(name)
    return {n: names for names in by_id.values() for n in names}


def _non_persistent(module: nn.Module) -> set[str]:
    out = set()
    for mname, m in module.named_modules(remove_duplicate=False):
        for b in getattr(m, "_non_persistent_buffers_set", ()):
            out.add(f"{mname}.{b}" if mname else b)
    return out


def _find_layers(module: nn.Module, n_layers: int | None = None) -> tuple[str | None, int | None]:
    """The ModuleList of decoder layers: the shallowest one (of length ``n_layers`` if given), longest first."""
    best = None
    for name, m in module.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0 or not name:
            continue
        if n_layers is not None and len(m) != n_layers:
            continue
        key = (name.count("."), -len(m), name)
        if best is None or key < best[0]:
            best = (key, name, len(m))
    return (best[1], best[2]) if best else (None, None)


def _layer_count(names) -> int:
    """1 + the highest decoder-layer index that appears in a name ('...layers.12.x' -> 13); 0 if none."""
    idx = [int(m.group(1)) for n in names for m in [re.search(r"(?:^|\.)layers\.(\d+)\.", n)] if m]
    return max(idx) + 1 if idx else 0


def _check_target(name: str, t: torch.Tensor, expected: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(expected.shape) or t.dtype != expected.dtype:
        raise MemintentError(f"tensor for {name} has shape {tuple(t.shape)} {t.dtype}: expected "
                             f"{tuple(expected.shape)} {expected.dtype}")


def _meta_clone(module: nn.Module, device) -> nn.Module:
    """A copy of ``module`` whose parameters and buffers are on ``device`` (meta: no data), ties kept."""
    memo: dict[int, Any] = {}
    for t in _named_tensors(module).values():
        if id(t) in memo:
            continue
        new = torch.empty_like(t, device="meta") if str(device) == "meta" else t.detach().to(device, copy=True)
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    return copy.deepcopy(module, memo)



def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__



class ModelSource:
    """A resolved model reference. Subclasses implement building and weight loading for each kind."""

    kind: str = ""

    def __init__(self, ref: str, dtype: str, num_layers: int | None, layers_path: str | None,
                 n_kv_heads: int | None = None, head_dim: int | None = None, vocab_size: int | None = None,
                 n_heads: int | None = None):
        self.ref, self.dtype = ref, dtype
        self.num_layers, self.layers_path = num_layers, layers_path
        self.n_kv_heads, self.head_dim, self.vocab_size = n_kv_heads, head_dim, vocab_size
        self.n_heads = n_heads or n_kv_heads
        self.attention = "sdpa"       # the attention implementation the built model uses (explain shows it)
        self.max_positions: int | None = None   # the longest sequence the model's position encoding covers

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ref={self.ref!r}, kind={self.kind!r}, dtype={self.dtype!r}, "
                f"num_layers={self.num_layers}, layers_path={self.layers_path!r})")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    def build(self, device="meta", num_layers: int | None = None, attention: str | None = None) -> nn.Module:
        """The model on ``device`` (meta: nothing allocated), at ``num_layers`` decoder layers if given.
        ``attention``: an attention implementation registered with transformers (Hugging Face models only; the
        presets route attention to the serving engine by themselves)."""
        raise NotImplementedError

    def tokenizer(self):
        """The model's tokenizer, or None (presets and py: factories have none)."""
        return None

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The token ids that end a generated sequence unless the request ignores them (presets have none)."""
        return ()

    def example_inputs(self, batch: int, seq: int, device="meta") -> tuple:
        return (_tokens(batch, seq, self.vocab_size, device),)

    def forward_kwargs(self) -> dict:
        return {}

    def logits(self, output) -> torch.Tensor:
        """The (B, vocab) logits of the last position from whatever the model returned."""
        if hasattr(output, "logits"):
            output = output.logits
        elif isinstance(output, (tuple, list)):
            output = output[0]
        if not isinstance(output, torch.Tensor):
            raise MemintentError(f"{self.ref}: cannot find logits in a model output of type {type(output).__name__}")
        return output[:, -1] if output.dim() == 3 else output

    def fill_weights(self, named: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def check_checkpoint(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> None:
        """Refuse stored weights that differ from ``{name: (shape, dtype)}`` before any is read (a checkpoint that
        changed since compiling). Sources without files (presets, py: factories) have nothing to check."""

    def check_engine_attention(self, calls: int) -> None:
        """Refuse an engine step whose trace calls the serving engine's attention ``calls`` times, other than once
        per decoder layer: a layer that does not would attend without the KV pool, across every sequence the step
        packs, and the tokens would be wrong without any error."""
        if calls != self.num_layers:
            raise MemintentError(self._refusal(f"{calls} of the model's {self.num_layers} layers call the serving "
                                               "engine's attention: generation plans need every layer to"))

    def check_kv_shapes(self, kv_shapes: set[tuple[int, int]]) -> None:
        """Refuse a model whose traced attention stores keys or values of other (KV heads, head size) than the KV
        pool is laid out for (``n_kv_heads`` x ``head_dim``, from the config): latent attention's, for example.
        The pool's pages would not hold them."""
        other = sorted(kv_shapes - {(self.n_kv_heads, self.head_dim)})
        if other and None not in (self.n_kv_heads, self.head_dim):     # None: a source that plans no KV pool
            raise MemintentError(self._refusal(
                f"attention stores keys and values of {other[0][0]} heads x {other[0][1]} per token where the KV "
                f"pool is laid out for {self.n_kv_heads} x {self.head_dim} (the config's KV heads and head size; "
                "latent attention, for example, is not served)"))

    def _refusal(self, why: str) -> str:
        """A generation refusal's one line: the model, why, and what still works."""
        return f"{self.ref}: {why} (plain forwards work: compile without --objective)"

    # -- engine steps: the one way the layers above call a model --------------------------------------------------
    takes_hidden = False      # a pipeline part after the first takes the previous part's hidden states, not ids
    own_inputs = False        # a py: factory runs on its own example inputs (``example_inputs``), not token ids

    def engine_build(self, device="meta", num_layers: int | None = None) -> nn.Module:
        """The model built for engine steps: its attention reads and writes the KV pool (``kv.attention``)."""
        raise MemintentError(f"{self.ref}: generation plans serve presets and hf: folders, not {self.kind} sources "
                             "(plain forwards work: compile without --objective)")

    def step_call(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor) -> tuple[tuple, dict]:
        """How an engine step calls the model: ids (1, T) (or hidden states (1, T, dim)), positions (T,), the rows
        (S,) whose logits it keeps -> (args, kwargs)."""
        return (ids, positions, rows), {}

    def step_output(self, out) -> torch.Tensor:
        """The step's logits (S, vocab) from what the model returned (a part before the last: hidden states)."""
        return out

    def step_logits(self, model: nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                    rows: torch.Tensor) -> torch.Tensor:
        """One engine step's forward: ids (1, T), positions (T,), rows (S,) -> logits (S, vocab)."""
        args, kwargs = self.step_call(ids, positions, rows)
        return self.step_output(model(*args, **kwargs))

    def dense_logits(self, model: nn.Module, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A plain causal forward of one sequence, ids (1, L), with the model's own attention and no cache: the logits
        (len(rows), vocab) at ``rows`` (the reference ``generate --verify`` compares the engine with)."""
        return model(ids, None, rows)

    def model_ref(self, traced_layers: int | None = None, attention: str | None = None):
        return ModelRef(ref=self.ref, kind=self.kind, dtype=self.dtype, traced_layers=traced_layers,
                        attention=attention or self.attention)


