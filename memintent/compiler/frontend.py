"""Front end: a PyTorch model -> a Memory Intent IR ``Program``.

The model is exported with ``torch.export`` on the meta device (fake tensors: no weight is ever allocated), and
every node of the exported graph becomes a step. Parameters and buffers become weight objects grouped into
blocks (one per decoder layer; every other module that holds weights is its own block), node outputs become
buffer objects sized from their fake values, and KV-cache objects are added per layer in blocks of tokens.

Repeated-layer folding: a model whose decoder layers are identical is traced with two layers and the second
layer's steps are repeated for the others, renaming modules and weights. This keeps compile time and memory flat
in depth (an 80-layer 70B model traces like a 2-layer one). The expansion is checked against the full model's
weight names, shapes and dtypes; a model whose two traced layers differ is traced in full.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from memintent.compiler.fingerprint import fingerprint_entries, ir_dtype, weight_entries
from memintent.errors import MemintentError
from memintent.ir.model import (
    Block, ModelRef, Object, ObjectKind, Program, RunShape, Step, Tier, dtype_bytes,
)

ALIGN_BYTES = 256          # every weight starts 256-byte aligned in its block's flat buffer (vectorised copies)
ROOT_BLOCK = "root"
# ops whose eager kernels hold a float32 copy of a 16-bit input while they run
UPCASTING_OPS = {"aten.rms_norm.default", "aten.layer_norm.default", "aten.native_layer_norm.default",
                 "aten._fused_rms_norm.default", "aten.softmax.int", "aten._softmax.default"}        # weights held by the root module itself (rotary tables and the like): always resident


# ---------------------------------------------------------------------------------------------------------------
# FLOPs and bytes of one node


def _shape(v: Any) -> tuple[int, ...] | None:
    return tuple(int(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


def _tensor_bytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_tensor_bytes(x) for x in v)
    return 0


def _node_flops(target: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """FLOPs of one aten op: torch's own flop formulas where it has one, matmul-shaped ops by hand otherwise."""
    name = str(target)
    if "linear" in name and isinstance(out, torch.Tensor):
        # aten.linear is not in torch's flop registry (it decomposes to addmm): 2 * out elements * in features.
        w = args[1]
        return 2 * out.numel() * int(w.shape[-1])
    if "scaled_dot_product" in name and isinstance(out, torch.Tensor):
        q, k = args[0], args[1]
        # QK^T and PV: 2 matmuls of (B, H, Sq, D) x (B, H, D, Skv); causal masking is not subtracted.
        b_h = q.numel() // (q.shape[-2] * q.shape[-1])
        return 4 * b_h * int(q.shape[-2]) * int(k.shape[-2]) * int(q.shape[-1])
    from torch.utils.flop_counter import flop_registry

    fn = flop_registry.get(target) or flop_registry.get(getattr(target, "overloadpacket", None))
    if fn is None:
        return 0
    try:
        return int(fn(*args, **kwargs, out_val=out))
    except Exception:  # a formula that does not accept these arguments: count no FLOPs rather than fail
        return 0


def _is_view(target: Any) -> bool:
    """True when the op's output aliases its first input (view, transpose, slice, ...): it allocates nothing."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.returns:
        return False
    ret = schema.returns[0].alias_info
    return ret is not None and not ret.is_write


def _allocates(node: torch.fx.Node) -> bool:
    """Whether the node's output is new memory. Ops returning nothing (metadata asserts) and getitem allocate
    nothing; an aliasing op (view, transpose, slice) allocates nothing unless it changes dtype: ``aten.to`` and
    ``type_as`` are declared as aliases because they return their input when nothing changes, but a cast to
    float32 is a full new tensor (missing it under-counted W1's peak by 64 MiB at 4x512)."""
    out = node.meta.get("val")
    if out is None or str(node.target) == "<built-in function getitem>":
        return False
    if not _is_view(node.target):
        return True
    src = next((a.meta.get("val") for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)), None)
    return isinstance(out, torch.Tensor) and isinstance(src, torch.Tensor) and (
        out.dtype != src.dtype or out.numel() > src.numel())


# ---------------------------------------------------------------------------------------------------------------
# Proto-steps: graph nodes with references that folding can rename


@dataclass
class _Proto:
    key: str                                   # unique id of the node in the traced graph
    op: str
    module: str
    layer: int | None                          # decoder layer index owning the node, None outside layers
    inputs: list[tuple[str, str]]              # ("node", key) | ("weight", fqn) | ("input", name)
    out_bytes: int
    out_dtype: str
    out_shape: list[int]
    flops: int
    in_bytes: int
    view: bool


_LAYER_RE_CACHE: dict[str, re.Pattern] = {}


def _layer_of(module: str, layers_path: str | None) -> int | None:
    if not layers_path:
        return None
    pat = _LAYER_RE_CACHE.setdefault(layers_path, re.compile(rf"^{re.escape(layers_path)}\.(\d+)(\.|$)"))
    m = pat.match(module)
    return int(m.group(1)) if m else None


def _rename_layer(name: str, layers_path: str, src: int, dst: int) -> str:
    prefix = f"{layers_path}.{src}"
    if name == prefix or name.startswith(prefix + "."):
        return f"{layers_path}.{dst}" + name[len(prefix):]
    return name


def _export(module: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, args, kwargs=kwargs, strict=False)
    except Exception as e:  # torch's own messages are long; keep the first line, it names the op or construct
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MemintentError(f"torch.export could not trace the model: {first[:300]} "
                             f"(a model must be export-traceable with static shapes)") from None


def _protos(ep: torch.export.ExportedProgram, module: nn.Module, layers_path: str | None) -> tuple[list[_Proto], list[str]]:
    """Walk the exported graph; return proto-steps and the keys of the graph's outputs."""
    sig = ep.graph_signature
    # Canonical weight names: a tensor shared under several names (tied embeddings) keeps its first name.
    canonical: dict[int, str] = {}
    for name, t in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False)):
        canonical.setdefault(id(t), name)
    by_name = dict(module.named_parameters(remove_duplicate=False)) | dict(module.named_buffers(remove_duplicate=False))
    placeholder: dict[str, tuple[str, str]] = {}
    for spec in sig.input_specs:
        arg = getattr(spec.arg, "name", None)
        if arg is None:
            continue
        if spec.kind.name in ("PARAMETER", "BUFFER") and spec.target in by_name:
            placeholder[arg] = ("weight", canonical[id(by_name[spec.target])])
        elif spec.kind.name == "USER_INPUT":
            placeholder[arg] = ("input", arg)
        else:  # lifted constants: tiny tensors baked into the graph, not part of the model's state
            placeholder[arg] = ("const", arg)

    protos: list[_Proto] = []
    outputs: list[str] = []
    for node in ep.graph.nodes:
        if node.op == "output":
            outputs = [a.name for a in node.all_input_nodes if a.op == "call_function"]
            continue
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        module_path = list(stack.values())[-1][0] if stack else ""
        module_path = _clean_fqn(module_path)
        inputs: list[tuple[str, str]] = []
        for a in node.all_input_nodes:
            if a.op == "placeholder":
                ref = placeholder.get(a.name, ("const", a.name))
                if ref[0] != "const":
                    inputs.append(ref)
            else:
                inputs.append(("node", a.name))
        out = node.meta.get("val")
        fake = lambda x: x.meta.get("val") if isinstance(x, torch.fx.Node) else x  # noqa: E731
        args = torch.fx.node.map_aggregate(node.args, fake)
        kwargs = torch.fx.node.map_aggregate(node.kwargs, fake)
        view = not _allocates(node)
        out_t = out if isinstance(out, torch.Tensor) else None
        seen_in: set[str] = set()
        in_bytes = 0
        for a in node.all_input_nodes:
            if a.name not in seen_in:
                seen_in.add(a.name)
                in_bytes += _tensor_bytes(a.meta.get("val"))
        protos.append(_Proto(
            key=node.name,
            op=_op_name(node.target),
            module=module_path,
            layer=_layer_of(module_path, layers_path),
            inputs=inputs,
            out_bytes=0 if view else _tensor_bytes(out),
            out_dtype=ir_dtype(out_t.dtype) if out_t is not None else "u8",
            out_shape=list(_shape(out_t) or []) if out_t is not None else [_tensor_bytes(out)],
            flops=0 if view else _node_flops(node.target, args, kwargs, out),
            in_bytes=0 if view else in_bytes,
            view=view,
        ))
    return protos, outputs


def _op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__}" if target.namespace == "aten" else f"{target.namespace}.{target.__name__}"
    return getattr(target, "__name__", str(target))


def _clean_fqn(path: str) -> str:
    # Strict-mode export writes "L__self___layers_0"; non-strict writes "layers.0". Keep the dotted form.
    return path.removeprefix("L['self'].").removeprefix("L__self__.")


# ---------------------------------------------------------------------------------------------------------------
# Folding repeated layers


def _fold(protos: list[_Proto], layers_path: str, n_layers: int) -> list[_Proto]:
    """Expand a two-layer trace to ``n_layers``: pre + layer 0 + (layer 1 renamed to i, i = 1..n-1) + post."""
    seg: list[str] = []
    tags: dict[str, str] = {}
    for p in protos:
        tag = "L0" if p.layer == 0 else "L1" if p.layer == 1 else "pre" if "L0" not in seg else "post"
        if not seg or seg[-1] != tag:
            seg.append(tag)
        tags[p.key] = tag
    if seg not in (["pre", "L0", "L1", "post"], ["L0", "L1", "post"], ["pre", "L0", "L1"], ["L0", "L1"]):
        return []
    l0 = [p for p in protos if tags[p.key] == "L0"]
    l1 = [p for p in protos if tags[p.key] == "L1"]
    if len(l0) != len(l1) or any(a.op != b.op or a.out_shape != b.out_shape for a, b in zip(l0, l1)):
        return []
    l0_of_l1 = {b.key: a.key for a, b in zip(l0, l1)}
    l1_keys = {p.key for p in l1}
    l0_keys = {p.key for p in l0}
    out: list[_Proto] = [p for p in protos if tags[p.key] in ("pre", "L0")]
    # key of the node in layer i that corresponds to a template node of layer 1
    def key_in(layer: int, l1_key: str) -> str:
        return l1_key if layer == 1 else f"{l1_key}@{layer}" if layer > 1 else l0_of_l1[l1_key]
    l1_of_l0 = {v: k for k, v in l0_of_l1.items()}
    for i in range(1, n_layers):
        for p in l1:
            inputs = []
            for kind, ref in p.inputs:
                if kind == "node" and ref in l1_keys:
                    inputs.append(("node", key_in(i, ref)))
                elif kind == "node" and ref in l0_keys:
                    inputs.append(("node", key_in(i - 1, l1_of_l0[ref]) if i > 1 else ref))
                elif kind == "weight":
                    inputs.append((kind, _rename_layer(ref, layers_path, 1, i)))
                else:
                    inputs.append((kind, ref))
            out.append(dataclasses.replace(p, key=key_in(i, p.key), layer=i, inputs=inputs,
                                           module=_rename_layer(p.module, layers_path, 1, i)))
    for p in protos:
        if tags[p.key] == "post":
            inputs = [("node", key_in(n_layers - 1, r)) if k == "node" and r in l1_keys else (k, r)
                      for k, r in p.inputs]
            out.append(dataclasses.replace(p, inputs=inputs))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Blocks


def find_layers(module: nn.Module) -> str | None:
    """The fqn of the largest ModuleList whose children all share one class: the decoder layers."""
    best, best_n = None, 1
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > best_n and len({type(c) for c in m}) == 1:
            best, best_n = name, len(m)
    return best


def _block_of_module(fqn: str, block_modules: list[str]) -> str:
    """The block whose module contains ``fqn`` (the longest matching prefix), or "" for root glue."""
    best = ""
    for b in block_modules:
        if b and (fqn == b or fqn.startswith(b + ".")) and len(b) > len(best):
            best = b
    return best


def _group_blocks(module: nn.Module, layers_path: str | None,
                  entries: list[tuple[str, tuple[int, ...], str]]) -> dict[str, list[tuple[str, tuple[int, ...], str]]]:
    """Weights grouped by block, keyed by the block module's fqn (``root`` for the root's own weights)."""
    groups: dict[str, list] = {}
    for name, shape, dtype in entries:
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        layer = _layer_of(owner, layers_path)
        key = f"{layers_path}.{layer}" if layer is not None else (owner or ROOT_BLOCK)
        groups.setdefault(key, []).append((name, shape, dtype))
    return groups


# ---------------------------------------------------------------------------------------------------------------
# The entry point


@dataclass
class TraceSpec:
    """What the front end needs to know about a model besides the module itself."""

    name: str
    ref: ModelRef
    build: Callable[[int | None], nn.Module]         # num_layers (None: full depth) -> module on meta
    inputs: tuple                                     # positional example inputs (meta tensors)
    kwargs: dict = field(default_factory=dict)
    layers_path: str | None = None
    num_layers: int | None = None
    n_kv_heads: int | None = None
    head_dim: int | None = None


def trace(spec: TraceSpec, shape: RunShape, progress: Callable[[str], None] | None = None) -> Program:
    say = progress or (lambda msg: None)
    full = spec.build(None)
    layers_path = spec.layers_path or find_layers(full)
    n_layers = len(full.get_submodule(layers_path)) if layers_path else 0
    entries = weight_entries(full)

    protos: list[_Proto] = []
    traced_layers = None
    try:
        # A source that cannot rebuild itself at another depth (a py: factory) is traced in full.
        small = spec.build(2) if layers_path and n_layers > 2 else None
    except MemintentError:
        small = None
    if small is not None:
        say(f"tracing 2 of {n_layers} layers (identical layers are folded)")
        protos, outputs = _protos(_export(small, spec.inputs, spec.kwargs), small, layers_path)
        protos = _fold(protos, layers_path, n_layers)
        if protos:
            traced_layers = 2
            # post-part outputs were renamed with their layer; map graph outputs the same way
            outputs = [o if any(p.key == o for p in protos) else f"{o}@{n_layers - 1}" for o in outputs]
    if not protos:
        say(f"tracing all {n_layers or 'of the'} layers")
        protos, outputs = _protos(_export(full, spec.inputs, spec.kwargs), full, layers_path)
        traced_layers = None

    # The expansion must name exactly the full model's weights (the fingerprint is taken from the full model).
    known = {n for n, _, _ in entries}
    used = {r for p in protos for k, r in p.inputs if k == "weight"}
    unknown = sorted(used - known)
    if unknown:
        raise MemintentError(f"traced graph uses weights the model does not have: {unknown[:3]} "
                             "(the layers are not identical; this is a front-end bug worth reporting)")

    groups = _group_blocks(full, layers_path, entries)
    blocks: list[Block] = []
    objects: list[Object] = []
    for bname, ws in groups.items():
        off = 0
        names = []
        for name, wshape, dtype in ws:
            size = dtype_bytes(dtype, math.prod(wshape))
            objects.append(Object(name=name, kind=ObjectKind.weight, dtype=dtype, shape=list(wshape),
                                  size_bytes=size, home=Tier.host, block=bname, block_offset_bytes=off))
            names.append(name)
            off += -(-size // ALIGN_BYTES) * ALIGN_BYTES
        blocks.append(Block(name=bname, module="" if bname == ROOT_BLOCK else bname, size_bytes=off, weights=names))
    block_modules = [b.module for b in blocks if b.module]

    # Steps and buffer objects. A view's uses are uses of the buffer it aliases.
    alias: dict[str, str] = {}
    buffer_name: dict[str, str] = {}
    steps: list[Step] = []
    for p in protos:
        i = len(steps)
        uses: list[str] = []
        for kind, ref in p.inputs:
            if kind == "node":
                base = alias.get(ref, ref)
                if base in buffer_name:
                    uses.append(buffer_name[base])
            else:
                uses.append(ref)
        uses = list(dict.fromkeys(uses))
        defs: list[str] = []
        if p.view:
            src = next((alias.get(r, r) for k, r in p.inputs if k == "node"), None)
            if src is not None:
                alias[p.key] = src
        else:
            bname = f"t{i}"
            buffer_name[p.key] = bname
            defs.append(bname)
            objects.append(Object(name=bname, kind=ObjectKind.buffer, dtype=p.out_dtype, shape=p.out_shape,
                                  size_bytes=p.out_bytes, home=Tier.hbm))
            if p.op in UPCASTING_OPS and p.out_dtype in ("bf16", "f16"):
                # Eager norms on 16-bit inputs compute in float32: one f32 copy of the input lives during the op
                # (measured on an H100: W1 at 4x512 peaked 64 MiB above the plan before this was counted).
                sname = f"t{i}.scratch"
                defs.append(sname)
                objects.append(Object(name=sname, kind=ObjectKind.buffer, dtype="f32", shape=p.out_shape,
                                      size_bytes=2 * p.out_bytes, home=Tier.hbm))
        steps.append(Step(index=i, op=p.op, module=p.module, block=_block_of_module(p.module, block_modules),
                          flops=p.flops, hbm_bytes=p.in_bytes + p.out_bytes, uses=uses, defs=defs))
    # The graph's outputs stay alive to the end: give them a use at the last step.
    if steps:
        for o in outputs:
            b = buffer_name.get(alias.get(o, o))
            if b and b not in steps[-1].uses:
                steps[-1].uses.append(b)
        for name in {r for p in protos for k, r in p.inputs if k == "input"}:
            t = next((x for x in spec.inputs if isinstance(x, torch.Tensor)), None)
            objects.append(Object(name=name, kind=ObjectKind.buffer, dtype=ir_dtype(t.dtype) if t is not None else "i64",
                                  shape=list(t.shape) if t is not None else [], size_bytes=_tensor_bytes(t),
                                  home=Tier.hbm))

    _add_kv(objects, steps, blocks, spec, shape, layers_path, n_layers, entries)

    return Program(
        name=spec.name, model=spec.ref.model_copy(update={"traced_layers": traced_layers}),
        fingerprint=fingerprint_entries(entries), shape=shape,
        objects=objects, blocks=blocks, steps=steps, passes=["trace"],
    )


def _add_kv(objects: list[Object], steps: list[Step], blocks: list[Block], spec: TraceSpec, shape: RunShape,
            layers_path: str | None, n_layers: int, entries: list) -> None:
    """KV-cache objects: per layer, ceil(kv_len / kv_block_tokens) blocks of keys and values."""
    if shape.kv_len <= 0:
        return
    if not (layers_path and spec.n_kv_heads and spec.head_dim):
        raise MemintentError(f"--kv-len needs a decoder model with known KV heads and head size; "
                             f"{spec.ref.ref} does not say them (use --kv-len 0)")
    dtype = spec.ref.dtype
    per_block = 2 * shape.batch * spec.n_kv_heads * shape.kv_block_tokens * spec.head_dim  # keys + values
    n_blocks = -(-shape.kv_len // shape.kv_block_tokens)
    for i in range(n_layers):
        layer = f"{layers_path}.{i}"
        attn = [s for s in steps if s.block == layer and "scaled_dot_product" in s.op]
        users = attn or [s for s in steps if s.block == layer][:1]
        for j in range(n_blocks):
            name = f"kv.{layer}.{j}"
            objects.append(Object(
                name=name, kind=ObjectKind.kv, dtype=dtype,
                shape=[2, shape.batch, spec.n_kv_heads, shape.kv_block_tokens, spec.head_dim],
                size_bytes=dtype_bytes(dtype, per_block), home=Tier.hbm, block=layer))
            for s in users:
                s.uses.append(name)
