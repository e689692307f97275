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
from torch.utils.flop_counter import flop_registry

from memintent.errors import MemintentError
from memintent.ir.layout import weight_offsets
from memintent.ir.model import Block, ModelRef, Object, ObjectKind, Program, RunShape, Step, Tier, dtype_bytes
from memintent.models.fingerprint import fingerprint_entries, ir_dtype, weight_entries

ROOT_BLOCK = "root"        # weights held by the root module itself (rotary tables and the like): always resident
# ops whose eager kernels hold a float32 copy of a 16-bit input while they run
UPCASTING_OPS = {"aten.rms_norm.default", "aten.layer_norm.default", "aten.native_layer_norm.default",
                 "aten._fused_rms_norm.default", "aten.softmax.int", "aten._softmax.default"}


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
    if ("linear" in name or "addmm_activation" in name) and isinstance(out, torch.Tensor):
        # aten.linear and addmm with an activation epilogue are not in torch's flop registry: 2 * out elements * in
        # features (the last dim of linear's weight (out, in) and of _addmm_activation's mat1 (N, in) alike).
        return 2 * out.numel() * int(args[1].shape[-1])
    if "scaled_dot_product" in name and isinstance(out, torch.Tensor):
        q, k = args[0], args[1]
        # QK^T and PV: 2 matmuls of (B, H, Sq, D) x (B, H, D, Skv); causal masking is not subtracted.
        b_h = q.numel() // (q.shape[-2] * q.shape[-1])
        return 4 * b_h * int(q.shape[-2]) * int(k.shape[-2]) * int(q.shape[-1])

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


_EXPORT_MESSAGE_CHARS = 300   # torch.export's first line can be a whole graph dump; a one-line error keeps this much


def _shorten(text: str, limit_chars: int = _EXPORT_MESSAGE_CHARS) -> str:
    """``text`` cut at the last word boundary within ``limit_chars``, saying so; unchanged when it fits."""
    if len(text) <= limit_chars:
        return text
    cut = text.rfind(" ", 0, limit_chars)
    return text[:cut if cut > 0 else limit_chars].rstrip() + " ... (message shortened)"


def _export(module: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, args, kwargs=kwargs, strict=False)
    except Exception as e:  # torch's own messages are long; keep the first line, it names the op or construct
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        indexer = _indexer_of(module)
        if indexer is not None:
            raise MemintentError(f"torch.export could not trace the model, whose attention picks each query's keys "
                                 f"with a learned indexer ({indexer}: sparse attention), which memintent neither "
                                 f"traces nor serves; torch.export said: {_shorten(first)}") from None
        raise MemintentError(f"torch.export could not trace the model: {_shorten(first)} "
                             f"(a model must be export-traceable with static shapes)") from None


def _indexer_of(module: nn.Module) -> str | None:
    """The class name of a sparse-attention indexer in ``module`` (DeepSeek-V3.2's lightning indexer and its
    kind: a module whose class name ends in "Indexer"), or None. Asked only once torch.export has failed: a model
    with an indexer that traces (one whose indexer is idle at these shapes) is planned as any other."""
    return next((type(m).__name__ for m in module.modules() if type(m).__name__.endswith("Indexer")), None)


def _placeholders(ep: torch.export.ExportedProgram, module: nn.Module) -> dict[str, tuple[str, str]]:
    """Graph placeholder -> ("weight", canonical fqn) | ("input", name) | ("const", name)."""
    # Canonical weight names: a tensor shared under several names (tied embeddings) keeps its first name.
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    canonical: dict[int, str] = {}
    for name, t in named:
        canonical.setdefault(id(t), name)
    by_name = dict(named)
    placeholder: dict[str, tuple[str, str]] = {}
    for spec in ep.graph_signature.input_specs:
        arg = getattr(spec.arg, "name", None)
        if arg is None:
            continue
        if spec.kind.name in ("PARAMETER", "BUFFER") and spec.target in by_name:
            placeholder[arg] = ("weight", canonical[id(by_name[spec.target])])
        elif spec.kind.name == "USER_INPUT":
            placeholder[arg] = ("input", arg)
        else:  # lifted constants: tiny tensors baked into the graph, not part of the model's state
            placeholder[arg] = ("const", arg)
    return placeholder


def _node_inputs(node: torch.fx.Node, placeholder: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    """The node's references: other nodes, weights and model inputs (lifted constants are left out)."""
    inputs: list[tuple[str, str]] = []
    for a in node.all_input_nodes:
        if a.op != "placeholder":
            inputs.append(("node", a.name))
            continue
        ref = placeholder.get(a.name, ("const", a.name))
        if ref[0] != "const":
            inputs.append(ref)
    return inputs


def _input_bytes(node: torch.fx.Node) -> int:
    """Bytes of the node's distinct tensor inputs."""
    return sum(_tensor_bytes(a.meta.get("val")) for a in dict.fromkeys(node.all_input_nodes))


def _proto(node: torch.fx.Node, placeholder: dict[str, tuple[str, str]], layers_path: str | None) -> _Proto:
    stack = node.meta.get("nn_module_stack") or {}
    module_path = _clean_fqn(list(stack.values())[-1][0] if stack else "")
    out = node.meta.get("val")
    out_t = out if isinstance(out, torch.Tensor) else None
    view = not _allocates(node)
    flops = 0
    if not view:
        fake = lambda x: x.meta.get("val") if isinstance(x, torch.fx.Node) else x  # noqa: E731
        flops = _node_flops(node.target, torch.fx.node.map_aggregate(node.args, fake),
                            torch.fx.node.map_aggregate(node.kwargs, fake), out)
    return _Proto(
        key=node.name,
        op=_op_name(node.target),
        module=module_path,
        layer=_layer_of(module_path, layers_path),
        inputs=_node_inputs(node, placeholder),
        out_bytes=0 if view else _tensor_bytes(out),
        out_dtype=ir_dtype(out_t.dtype) if out_t is not None else "u8",
        out_shape=list(_shape(out_t) or []) if out_t is not None else [_tensor_bytes(out)],
        flops=flops,
        in_bytes=0 if view else _input_bytes(node),
        view=view,
    )


def _protos(ep: torch.export.ExportedProgram, module: nn.Module, layers_path: str | None) -> tuple[list[_Proto], list[str]]:
    """Walk the exported graph; return proto-steps and the keys of the graph's outputs."""
    placeholder = _placeholders(ep, module)
    protos: list[_Proto] = []
    outputs: list[str] = []
    for node in ep.graph.nodes:
        if node.op == "output":
            outputs = [a.name for a in node.all_input_nodes if a.op == "call_function"]
        elif node.op == "call_function":
            protos.append(_proto(node, placeholder, layers_path))
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


_FOLDABLE = (["pre", "L0", "L1", "post"], ["L0", "L1", "post"], ["pre", "L0", "L1"], ["L0", "L1"])


def _first_layer(protos: list[_Proto]) -> int:
    """The index of the first traced layer: 0, or a pipeline part's first layer (its layers keep their names)."""
    return min((p.layer for p in protos if p.layer is not None), default=0)


def _segment_tags(protos: list[_Proto]) -> dict[str, str] | None:
    """Each proto's segment of a two-layer trace: "pre" (before the first layer), "L0", "L1", "post"; None when the
    trace is not laid out as those segments in that order (it cannot be folded)."""
    seg: list[str] = []
    tags: dict[str, str] = {}
    base = _first_layer(protos)
    for p in protos:
        tag = "L0" if p.layer == base else "L1" if p.layer == base + 1 else "pre" if "L0" not in seg else "post"
        if not seg or seg[-1] != tag:
            seg.append(tag)
        tags[p.key] = tag
    return tags if seg in _FOLDABLE else None


@dataclass
class _Template:
    """The two traced layers of a fold: layer 1's protos are the template every later layer is renamed from."""

    l1: list[_Proto]
    l0_of_l1: dict[str, str]   # layer-1 key -> the corresponding layer-0 key
    l1_of_l0: dict[str, str]   # layer-0 key -> the corresponding layer-1 key
    base: int = 0              # the first traced layer's index (a pipeline part's first layer); i counts from it

    def key_in(self, layer: int, l1_key: str) -> str:
        """Key of the node in ``layer`` that corresponds to the template node ``l1_key``."""
        return l1_key if layer == 1 else f"{l1_key}@{layer}" if layer > 1 else self.l0_of_l1[l1_key]

    def layer(self, i: int, layers_path: str) -> list[_Proto]:
        """Layer ``i`` (>= 1): the template renamed, its inputs pointing at layer i's and layer i-1's nodes."""
        out = []
        for p in self.l1:
            inputs = [self._input_in(i, kind, ref, layers_path) for kind, ref in p.inputs]
            out.append(dataclasses.replace(p, key=self.key_in(i, p.key), layer=self.base + i, inputs=inputs,
                                           module=_rename_layer(p.module, layers_path, self.base + 1,
                                                                self.base + i)))
        return out

    def _input_in(self, i: int, kind: str, ref: str, layers_path: str) -> tuple[str, str]:
        if kind == "node" and ref in self.l0_of_l1:          # a node of the same layer
            return "node", self.key_in(i, ref)
        if kind == "node" and ref in self.l1_of_l0:          # a node of the previous layer
            return "node", self.key_in(i - 1, self.l1_of_l0[ref]) if i > 1 else ref
        if kind == "weight":
            return kind, _rename_layer(ref, layers_path, self.base + 1, self.base + i)
        return kind, ref


def _same_layers(l0: list[_Proto], l1: list[_Proto]) -> bool:
    """Whether two traced layers run the same ops on the same output shapes, node for node."""
    return len(l0) == len(l1) and all(a.op == b.op and a.out_shape == b.out_shape for a, b in zip(l0, l1))


def _fold(protos: list[_Proto], layers_path: str, n_layers: int) -> list[_Proto]:
    """Expand a two-layer trace to ``n_layers``: pre + layer 0 + (layer 1 renamed to i, i = 1..n-1) + post.
    Returns [] when the two traced layers differ (the model is traced in full instead)."""
    tags = _segment_tags(protos)
    if tags is None:
        return []
    l0 = [p for p in protos if tags[p.key] == "L0"]
    l1 = [p for p in protos if tags[p.key] == "L1"]
    if not _same_layers(l0, l1):
        return []
    l0_of_l1 = {b.key: a.key for a, b in zip(l0, l1)}
    template = _Template(l1, l0_of_l1, {v: k for k, v in l0_of_l1.items()}, _first_layer(protos))
    out: list[_Proto] = [p for p in protos if tags[p.key] in ("pre", "L0")]
    for i in range(1, n_layers):
        out.extend(template.layer(i, layers_path))
    last = n_layers - 1
    for p in protos:
        if tags[p.key] == "post":
            inputs = [("node", template.key_in(last, r)) if k == "node" and r in l0_of_l1 else (k, r)
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
    protos, outputs, traced_layers = _trace_protos(spec, full, layers_path, n_layers, say)
    _check_weights_known(protos, entries)
    blocks, objects = _weight_blocks(_group_blocks(full, layers_path, entries))
    steps, buffers = _steps(protos, [b.module for b in blocks if b.module])
    objects += buffers.objects
    if steps:
        objects += _finish_steps(steps, protos, outputs, buffers, spec)
    # What a forward plan proves: the shapes of the tensors it was traced with, positional then keyword.
    tensors = [*spec.inputs, *spec.kwargs.values()]
    shape = shape.model_copy(update={"inputs": [list(t.shape) for t in tensors if isinstance(t, torch.Tensor)]})
    return Program(
        name=spec.name, model=spec.ref.model_copy(update={"traced_layers": traced_layers}),
        fingerprint=fingerprint_entries(entries), shape=shape,
        objects=objects, blocks=blocks, steps=steps, passes=["trace"],
    )


def _trace_protos(spec: TraceSpec, full: nn.Module, layers_path: str | None, n_layers: int,
                  say: Callable[[str], None]) -> tuple[list[_Proto], list[str], int | None]:
    """(protos, graph output keys, traced layers): two layers folded to ``n_layers`` where the source can build
    two and they fold, else the full model (traced layers None)."""
    try:
        # A source that cannot rebuild itself at another depth (a py: factory) is traced in full; so is a model
        # whose layers differ (a hybrid: linear attention or Mamba in some layers), which two layers cannot stand for.
        foldable = layers_path and n_layers > 2 and _layers_alike(full.get_submodule(layers_path))
        small = spec.build(2) if foldable else None
    except MemintentError:
        small = None
    if small is not None:
        say(f"tracing 2 of {n_layers} layers (identical layers are folded)")
        protos, outputs = _protos(_export(small, spec.inputs, spec.kwargs), small, layers_path)
        protos = _fold(protos, layers_path, n_layers)
        if protos:
            # post-part outputs were renamed with their layer; map graph outputs the same way
            keys = {p.key for p in protos}
            return protos, [o if o in keys else f"{o}@{n_layers - 1}" for o in outputs], 2
    say(f"tracing all {n_layers or 'of the'} layers")
    protos, outputs = _protos(_export(full, spec.inputs, spec.kwargs), full, layers_path)
    return protos, outputs, None


def _layers_alike(layers: nn.Module) -> bool:
    """Whether every layer has the same modules and the same parameter names and shapes."""
    def signature(layer: nn.Module) -> tuple:
        return (tuple((n, type(m).__name__) for n, m in layer.named_modules()),
                tuple((n, tuple(t.shape)) for n, t in layer.named_parameters()))

    # children, not indexing: a pipeline part holds its layers in a dict under their whole-model names ("12", ...)
    first, *rest = (signature(layer) for layer in layers.children())
    return all(sig == first for sig in rest)


def _check_weights_known(protos: list[_Proto], entries: list[tuple[str, tuple[int, ...], str]]) -> None:
    """The expansion must name exactly the full model's weights (the fingerprint is taken from the full model)."""
    known = {n for n, _, _ in entries}
    unknown = sorted({r for p in protos for k, r in p.inputs if k == "weight"} - known)
    if unknown:
        raise MemintentError(f"traced graph uses weights the model does not have: {unknown[:3]} "
                             "(the layers are not identical; this is a front-end bug worth reporting)")


def _weight_blocks(groups: dict[str, list[tuple[str, tuple[int, ...], str]]]) -> tuple[list[Block], list[Object]]:
    """One block per group, its weights laid out by ``memintent.ir.layout.weight_offsets``."""
    blocks: list[Block] = []
    objects: list[Object] = []
    for bname, ws in groups.items():
        sizes = [dtype_bytes(dtype, math.prod(wshape)) for _, wshape, dtype in ws]
        offsets, size_bytes = weight_offsets(sizes)
        for (name, wshape, dtype), size, off in zip(ws, sizes, offsets):
            objects.append(Object(name=name, kind=ObjectKind.weight, dtype=dtype, shape=list(wshape),
                                  size_bytes=size, home=Tier.host, block=bname, block_offset_bytes=off))
        blocks.append(Block(name=bname, module="" if bname == ROOT_BLOCK else bname, size_bytes=size_bytes,
                            weights=[name for name, _, _ in ws]))
    return blocks, objects


class _Buffers:
    """Buffer objects of the traced steps. A view defines no buffer: its uses are uses of the buffer it aliases."""

    def __init__(self) -> None:
        self.alias: dict[str, str] = {}         # view key -> key of the node whose buffer it aliases
        self.name: dict[str, str] = {}          # node key -> its buffer object's name
        self.held: dict[str, str] = {}          # key of a view of a weight or model input -> that object's name
        self.objects: list[Object] = []

    def of(self, key: str) -> str | None:
        """The buffer object a node's output lives in (through views), the weight or model input a view of one
        aliases (``weight.t()`` read by a matmul), or None (no buffer: a constant)."""
        return self.name.get(self.alias.get(key, key)) or self.held.get(key)

    def uses(self, p: _Proto) -> list[str]:
        uses = [self.of(ref) if kind == "node" else ref for kind, ref in p.inputs]
        return list(dict.fromkeys(u for u in uses if u is not None))

    def define(self, i: int, p: _Proto) -> list[str]:
        """The objects step ``i`` defines: none for a view, its output buffer (and scratch) otherwise."""
        if p.view:
            src = next((self.alias.get(r, r) for k, r in p.inputs if k == "node"), None)
            if src is not None:
                self.alias[p.key] = src
                if src in self.held:
                    self.held[p.key] = self.held[src]
            else:
                obj = next((r for k, r in p.inputs if k != "node"), None)
                if obj is not None:
                    self.held[p.key] = obj
            return []
        bname = f"t{i}"
        self.name[p.key] = bname
        self.objects.append(Object(name=bname, kind=ObjectKind.buffer, dtype=p.out_dtype, shape=p.out_shape,
                                   size_bytes=p.out_bytes, home=Tier.hbm))
        if not (p.op in UPCASTING_OPS and p.out_dtype in ("bf16", "f16")):
            return [bname]
        # Eager norms on 16-bit inputs compute in float32: one f32 copy of the input lives during the op
        # (measured on an H100: W1 at 4x512 peaked 64 MiB above the plan before this was counted).
        sname = f"t{i}.scratch"
        self.objects.append(Object(name=sname, kind=ObjectKind.buffer, dtype="f32", shape=p.out_shape,
                                   size_bytes=2 * p.out_bytes, home=Tier.hbm))
        return [bname, sname]


def _steps(protos: list[_Proto], block_modules: list[str]) -> tuple[list[Step], _Buffers]:
    """One step per proto, and the buffers the steps define."""
    buffers = _Buffers()
    steps: list[Step] = []
    for i, p in enumerate(protos):
        uses = buffers.uses(p)
        defs = buffers.define(i, p)
        steps.append(Step(index=i, op=p.op, module=p.module, block=_block_of_module(p.module, block_modules),
                          flops=p.flops, hbm_bytes=p.in_bytes + p.out_bytes, uses=uses, defs=defs))
    return steps, buffers


def _finish_steps(steps: list[Step], protos: list[_Proto], outputs: list[str], buffers: _Buffers,
                  spec: TraceSpec) -> list[Object]:
    """Keep the graph's outputs alive to the end (a use at the last step); return the model inputs' objects."""
    for o in outputs:
        b = buffers.of(o)
        if b and b not in steps[-1].uses:
            steps[-1].uses.append(b)
    t = next((x for x in spec.inputs if isinstance(x, torch.Tensor)), None)
    return [Object(name=name, kind=ObjectKind.buffer, dtype=ir_dtype(t.dtype) if t is not None else "i64",
                   shape=list(t.shape) if t is not None else [], size_bytes=_tensor_bytes(t), home=Tier.hbm)
            for name in dict.fromkeys(r for p in protos for k, r in p.inputs if k == "input")]
