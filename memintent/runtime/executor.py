"""Execute a plan on an eager PyTorch model through forward hooks.

``attach(model, program, device)`` allocates the arena, copies resident blocks into their slots, points every
planned parameter/buffer at device memory (resident: its slot for good; streamed: a stream slot, rebound on each
visit) and registers a forward pre-hook on each stage module plus a pre- and post-hook on the root. After that
``model(...)`` and ``model.generate(...)`` run unchanged, with the plan's copies overlapping compute.

Quantized streamed blocks (``Block.quant`` int8/int4) live packed in the host store; a visit copies the packed
bytes into the end of its stream slot and copy_done dequantizes them, on the compute stream, into the start of the
slot, where the block's tensors are bound exactly as for an unquantized block (spec/runtime.md, "Quantized
blocks").

Attach takes a ``Proven`` plan (``passes.verify.prove``: the one proof of a plan's rules, run once by whoever
loaded the plan) and checks only what the proof cannot see: the model against the plan (fingerprint, weights
present with the plan's shapes and dtypes, stage modules present) and a given host store against the plan.

Hook contract (see spec/runtime.md): the root pre-hook opens a forward (and, on a first forward, issues the copies
that a previous forward's tail would have issued); each stage module's pre-hook checks that it is the next stage
the plan expects, then runs that stage's actions in list order; the root post-hook checks that every stage ran and
runs the end-of-forward actions (frees and next-forward prefetches).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from time import perf_counter
from typing import Any, Callable

import torch

from memintent.errors import MemintentError, RuntimeFault
from memintent.ir.layout import unpack_offsets, weight_unpackers
from memintent.ir.model import (
    Action,
    ActionKind,
    Block,
    Program,
    Quant,
    Residency,
    align_up,
)
from memintent.ir.proven import Proven, require_proven
from memintent.models.fingerprint import check_fingerprint, named_weights
from memintent.passes.costs import mapped_op, spare_page_blocks
from memintent.runtime import mapped
from memintent.runtime.arena import DeviceArena, check_fits
from memintent.runtime.copy_engine import (
    CopyEngine,
    CpuBackend,
    CudaBackend,
    ForwardStats,
)
from memintent.runtime.host_store import (
    FillFn,
    HostStore,
    fill_from_module,
    rebind,
    torch_dtype,
    typed_view,
)
from memintent.runtime.page_run import PageRun
from memintent.runtime.quant import prepare_unpack, run_unpack

_START, _DONE, _FREE = 0, 1, 2

# Models currently attached: a second attach would double the hooks and fight over the same parameters.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def proven_shape_error(program: Program, shapes: list[tuple[int, ...]]) -> str | None:
    """Why a forward given tensors of ``shapes`` (positional, then keyword) runs outside what the plan proved, or
    None. A forward plan proves the shapes it was traced with; a generation plan proves engine steps of ``(1, T)``
    token ids, ``T <= step_tokens``. The plan's memory proof says nothing about other shapes, so they are refused."""
    fmt = lambda s: "x".join(map(str, s)) or "scalar"  # noqa: E731
    g = program.generation
    if g is not None:
        ids = tuple(shapes[0]) if shapes else ()
        # A pipeline part after the first takes the previous part's hidden states (1, T, dim), not token ids.
        rank, what = (3, "hidden states of 1xTxdim") if program.model.part[:1] not in ([], [0]) else (2, "1xT tokens")
        if len(ids) != rank or ids[0] != 1 or not 1 <= ids[1] <= g.step_tokens:
            return (f"inputs of shape {fmt(ids)}: this generation plan proves engine steps of {what} with T "
                    f"<= {g.step_tokens} (run it through memintent.Engine or `memintent generate`)")
        return None
    want = [tuple(s) for s in program.shape.inputs]
    got = [tuple(s) for s in shapes[:len(want)]]
    if want and got != want:
        return (f"inputs of shape {', '.join(map(fmt, got)) or 'none'}: the plan proves "
                f"{', '.join(map(fmt, want))} only (a plan is compiled for one shape: compile one for this shape)")
    return None


def _tensor_shapes(args: tuple, kwargs: dict) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]


class StreamedModel:
    """A model bound to a plan. Construct through ``attach``; ``detach()`` undoes everything.

    ``check``: checked mode. The arena starts poisoned (0xFF bytes: NaN in bf16/f16/f32) and every ``free`` poisons
    its slot, so a model that reads weights outside their planned residency (a read the trace did not see) turns
    its output into NaN. (That the plan itself reads every streamed block only while it is in device memory is
    proven at attach, by the verifier.)
    ``timing``: CUDA timing events for copy time, stalls, dequantization and device time (a few microseconds per
    block).
    ``dequant_backend``: how quantized blocks are dequantized on arrival (``memintent.runtime.quant``): ``"auto"``
    (default: the one-pass Triton kernel on CUDA when triton is importable, else torch; the H100 tests check the
    two bitwise equal), ``"torch"`` (elementwise torch ops, the reference) or ``"triton"``.
    """

    def __init__(self, model: torch.nn.Module, plan: Proven, device: torch.device | str = "cuda", *,
                 check: bool = False, host_store: HostStore | None = None, fill: FillFn | None = None,
                 timing: bool = True, pin: str = "auto", progress: bool | None = None,
                 dequant_backend: str = "auto", model_checked: bool = False):
        dev = torch.device(device)
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise MemintentError(f"device {dev} requested but CUDA is not available: use device='cpu'")
            if dev.index is None:
                dev = torch.device("cuda", torch.cuda.current_device())
        elif dev.type != "cpu":
            raise MemintentError(f"device {dev} is not supported by the runtime: use cuda or cpu")
        if model in _ATTACHED:
            raise MemintentError("the model is already attached to a plan: detach() that handle first")
        if dequant_backend not in ("torch", "auto", "triton"):
            raise MemintentError(f"dequant_backend={dequant_backend!r}: use torch, auto or triton")
        program = require_proven(plan, "attach").program
        self.model, self.program, self.device, self.check = model, program, dev, check
        self.dequant_backend = dequant_backend
        self._hooks: list[Any] = []
        self._mapped: dict[str, tuple] = {}   # block -> (module, values, scales, kind, dtype) of a mapped block
        self._detached = False

        self._check_model(model_checked)    # the model against the plan
        pred = program.prediction
        extra = pred.activation_peak_bytes + pred.workspace_bytes
        # Refuse an arena the device cannot hold before the (possibly long) fill; the arena itself is allocated
        # after it, so quantizing the packed blocks on the device has the device memory to itself.
        check_fits(program.arena.size_bytes, dev)

        if host_store is None:
            host_store = HostStore(program, pin=pin if dev.type == "cuda" else "none", quant_device=dev)
            host_store.fill(fill or fill_from_module(model, adopt=True), progress=progress)
        else:
            self._check_host_store(host_store)
        self.host_store = host_store
        try:
            self.arena = DeviceArena(program.arena, dev, poison=check, extra_bytes=extra)
        except BaseException:
            self._rebind_to_host()   # an adopting fill pointed the model at the store (or meta): give it back
            raise

        self.backend = CudaBackend(dev, timing) if dev.type == "cuda" else CpuBackend(dev)
        self._build_tables()
        self._bind_initial()
        self.engine = CopyEngine(self.backend, len(program.arena.slots), self._visit_labels, self._visit_keys)
        self._reset_forward_state()
        self._primed = False   # next-forward prefetches for the coming forward have been issued
        self._register_hooks()
        _ATTACHED[model] = self

    # -- the model and the host store against the plan ---------------------------------------------------------
    def _check_model(self, fingerprint_checked: bool) -> None:
        """What the verifier cannot see: that this model is the one the plan was compiled for. Its fingerprint
        (unless the caller checked it against the plan already: ``models.plan_model.check_source``), every block
        weight present with the plan's shape and dtype, every stage module present."""
        p, model = self.program, self.model
        if not fingerprint_checked:
            check_fingerprint(model, p)
        tensors = named_weights(model)
        objects = p.object_map()
        for b in p.blocks:
            for w in b.weights:
                o, t = objects[w], tensors.get(w)
                if t is None:
                    raise MemintentError(f"weight {w!r} of block {b.name!r} is not in the model")
                if tuple(t.shape) != tuple(o.shape) or t.dtype != torch_dtype(o.dtype):
                    raise MemintentError(f"weight {w!r}: model has {tuple(t.shape)} {t.dtype}, plan has "
                                         f"{tuple(o.shape)} {o.dtype}")
        planned = {w for b in p.blocks for w in b.weights}
        self._unplanned = [n for n in tensors if n not in planned]
        modules = dict(model.named_modules())
        for s in p.stages:
            if s.module and s.module not in modules:
                raise MemintentError(f"stage {s.index}: module {s.module!r} is not a submodule of the model")
        # Bytes of each block's host buffer and of each visit's copy: the packed layout for a quantized block, which
        # the verifier proved equal to the plan's transfer_bytes (rule transfer-bytes).
        self._host_bytes = {b.name: b.size_bytes if b.quant == Quant.none else b.transfer_bytes for b in p.blocks}

    def _check_host_store(self, store: HostStore) -> None:
        """A host store passed in must hold every block at the plan's size and quantization."""
        for b in self.program.blocks:
            want = self._host_bytes[b.name]
            have = store.blocks.get(b.name)
            if (have is None or have.size_bytes != b.size_bytes or have.quant != b.quant
                    or store.buffer_bytes(b.name) != want):
                held = "no buffer" if have is None else f"{store.buffer_bytes(b.name)} bytes (quant {have.quant.value})"
                raise MemintentError(f"the host store given does not match block {b.name!r}: the plan needs {want} "
                                     f"bytes (quant {b.quant.value}), the store holds {held}: build it from this plan")

    def _packed_start(self, b: Block, slot_bytes: int) -> int:
        """Offset in a stream slot of ``slot_bytes`` where a quantized visit of ``b`` lands its packed bytes: the
        slot's last ``aligned(transfer_bytes)`` bytes (residency.slot_need_bytes sizes slots as weights first, packed
        bytes last; with an unpack slot, packed bytes only). The packed layout's size is a multiple of 256 already;
        aligning again states the contract."""
        return slot_bytes - align_up(self._host_bytes[b.name])

    # -- precomputed tables (so hooks only index lists) ---------------------------------------------------------
    def _packed_region(self, bi: int, slot: int) -> torch.Tensor:
        """uint8 [packed bytes]: the end of the slot, where a quantized visit's copy lands."""
        b = self.program.blocks[bi]
        flat = self.arena.slot(slot)
        start = self._packed_start(b, flat.numel())
        return flat[start:start + self._host_bytes[b.name]]

    def _weights_slot(self, bi: int, slot: int) -> int:
        """The slot a visit's weights are bound in: its stream slot, or, for a quantized visit of a plan with an
        unpack slot, that slot (the verifier proved it holds one visit's weights at a time)."""
        unpack = self.program.unpack_slot()
        return slot if unpack is None or self.program.blocks[bi].quant == Quant.none else unpack

    def _hooked(self, bi: int, slot: int) -> dict[str, str]:
        """{weight: module whose pre-hook unpacks it} of a visit that unpacks one weight at a time (a quantized
        visit into the plan's unpack slot of a block ``weight_unpackers`` lists); {} for any other visit."""
        hooks = self._by_weight.get(self.program.blocks[bi].name, {})
        return hooks if hooks and self._weights_slot(bi, slot) != slot else {}

    def _weight_offsets(self, bi: int, slot: int) -> dict[str, int]:
        """Where a visit's weights are bound in their slot: the block layout, or, for a visit that unpacks one
        weight at a time, its unpack layout (``ir.layout.unpack_offsets``)."""
        return unpack_offsets(self.program.blocks[bi], self._objects, bool(self._hooked(bi, slot)))[0]

    def _unpacker(self, bi: int, slot: int) -> Callable[[], None]:
        """The dequantization of a quantized visit at its copy_done: views built once (they alias the arena), so
        copy_done only launches kernels. src: the packed region at the end of the stream slot; dst: the start of
        the weights' slot, laid out as ``_weight_offsets`` says. A block that unpacks one weight at a time copies
        its raw weights here; each quantized weight's op waits in ``_lazy`` for its module's pre-hook."""
        if (bi, slot) not in self._unpacks:
            b = self.program.blocks[bi]
            flat = self.arena.slot(self._weights_slot(bi, slot))
            ops = prepare_unpack(b, self._objects, self._packed_region(bi, slot), flat,
                                 self._weight_offsets(bi, slot))
            hooks = self._hooked(bi, slot)
            self._lazy[(bi, slot)] = {hooks[w]: op for w, op in zip(b.weights, ops) if w in hooks}
            now = [op for w, op in zip(b.weights, ops) if w not in hooks]
            self._unpacks[(bi, slot)] = functools.partial(run_unpack, now, self.dequant_backend)
        return self._unpacks[(bi, slot)]

    def warm_unpacks(self) -> int:
        """Run one quantized visit of each distinct layout (bit width and weight shapes) once, before the first
        forward: Triton compiles a dequantization variant on its first launch, and inside a step that costs up to a
        second. It writes only where a visit unpacks, which every visit rewrites before its weights are read.
        Returns the layouts run."""
        seen = set()
        for (bi, slot), unpack in self._unpacks.items():
            b = self.program.blocks[bi]
            key = (b.quant, tuple(tuple(self._objects[w].shape) for w in b.weights))
            if key not in seen:
                seen.add(key)
                unpack()
                run_unpack(list(self._lazy[(bi, slot)].values()), self.dequant_backend)
        return len(seen)

    def _bindings(self, bi: int, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(model tensor, typed view into the weights' slot) pairs: a visit's copy_done rebinds them in one loop."""
        if (bi, slot) not in self._views:
            flat, objects = self.arena.slot(self._weights_slot(bi, slot)), self._objects
            at = self._weight_offsets(bi, slot)
            self._views[(bi, slot)] = [
                (self._tensors[w], typed_view(flat, at[w], torch_dtype(objects[w].dtype), objects[w].shape))
                for w in self.program.blocks[bi].weights]
        return self._views[(bi, slot)]

    def _number_visits(self) -> None:
        """One id per visit with a copy_start, in action order, with its labels for messages and statistics."""
        self._visit_ids: dict[tuple[str, int], int] = {}
        self._visit_labels: list[str] = []
        self._visit_keys: list[str] = []
        for a in self.program.actions:
            if a.kind == ActionKind.copy_start:
                self._visit_ids[(a.block, a.visit_stage)] = len(self._visit_labels)
                self._visit_labels.append(f"block {a.block!r} (visit at stage {a.visit_stage})")
                self._visit_keys.append(f"{a.block}@{a.visit_stage}")

    def _action_tuple(self, a: Action, vid: int, bi: int) -> tuple:
        """An action as the tuple ``_run`` dispatches on, with every tensor it touches made in advance."""
        b = self.program.blocks[bi]
        quantized = b.quant != Quant.none
        if a.kind == ActionKind.copy_start:
            size = self._host_bytes[a.block]   # bytes the visit copies: size_bytes, or the packed bytes
            # dst: uint8 [size] in the slot (its start; a quantized block's packed bytes: its end);
            # src: uint8 [size] host block buffer, or its store slot's bytes for a block in the HBM store
            dst = self._packed_region(bi, a.slot) if quantized else self.arena.slot(a.slot)[:size]
            src = self.arena.slot(b.slot)[:size] if b.in_hbm_store else self.host_store.buffer(a.block)
            self._bindings(bi, a.slot)   # also where _bind_initial points the block before its first visit
            self._copy_dst[(bi, a.slot)] = dst    # what a visit filling spare pages writes there (hold_in_pages)
            # the statistics count host-to-device bytes: a copy out of the HBM store counts none
            return (_START, vid, a.slot, dst, src, 0 if b.in_hbm_store else size, a.next_forward, bi)
        if a.kind == ActionKind.copy_done:
            unpack = self._unpacker(bi, a.slot) if quantized else None
            return (_DONE, vid, self._bindings(bi, a.slot), bi, unpack, self._lazy.get((bi, a.slot)))
        # checked mode poisons what the visit held: its stream slot and, unpacked elsewhere, its weights there
        held = (self.arena.slot(a.slot) if self._weights_slot(bi, a.slot) == a.slot
                else [self.arena.slot(a.slot), self.arena.slot(self._weights_slot(bi, a.slot))])
        return (_FREE, vid, a.slot, held if self.check else None, bi)

    def _build_actions(self) -> None:
        """Per stage (and at the forward's end, index ``len(stages)``) the actions to run, in plan order; the
        next-forward copies a first forward issues itself; each streamed block's first slot."""
        p = self.program
        bidx = self._block_index
        self._acts: list[list[tuple]] = [[] for _ in range(len(p.stages) + 1)]
        self._start_acts: list[tuple] = []   # next-forward copies a first forward must issue itself
        self._first_slot: dict[int, tuple[int, int]] = {}   # block -> (visit_stage, slot) of its earliest visit
        for a in p.actions:
            vid, bi = self._visit_ids[(a.block, a.visit_stage)], bidx[a.block]
            act = self._action_tuple(a, vid, bi)
            if a.kind == ActionKind.copy_start:
                if a.next_forward:
                    self._start_acts.append(act)
                if bi not in self._first_slot or a.visit_stage < self._first_slot[bi][0]:
                    self._first_slot[bi] = (a.visit_stage, a.slot)
            self._acts[a.stage].append(act)

    def _build_hook_order(self) -> None:
        """Hooked stages in plan order; each hook compares its module id with the next expected one."""
        self._mod_names: list[str] = []
        self._mod_block: list[str] = []
        mid_of: dict[str, int] = {}
        self._hook_stage: list[int] = []
        self._hook_mid: list[int] = []
        for s in self.program.stages:
            if not s.module:
                continue
            if s.module not in mid_of:
                mid_of[s.module] = len(self._mod_names)
                self._mod_names.append(s.module)
                self._mod_block.append(s.block)
            self._hook_stage.append(s.index)
            self._hook_mid.append(mid_of[s.module])
        self._mid_of = mid_of
        self._n_hooked = len(self._hook_stage)

    def _build_tables(self) -> None:
        self._objects = self.program.object_map()
        self._tensors = named_weights(self.model)
        self._block_names = [b.name for b in self.program.blocks]
        self._block_index = {n: i for i, n in enumerate(self._block_names)}
        self._views: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._unpacks: dict[tuple[int, int], Callable[[], None]] = {}
        # blocks that unpack one weight at a time (into the plan's unpack slot only: ir/layout.py says when)
        self._by_weight = weight_unpackers(self.program) if self.program.unpack_slot() is not None else {}
        self._lazy: dict[tuple[int, int], dict[str, Any]] = {}   # (block, slot) -> {module: its weight's unpack op}
        self._lazy_now: dict[str, Any] = {}                      # module -> the op of the visit that copied last
        self._copy_dst: dict[tuple[int, int], torch.Tensor] = {}   # (block, slot) -> the region its copy lands in
        self._from_pages: dict[int, PageRun] = {}   # block -> spare pages its visits copy from (hold_in_pages)
        self._to_pages: dict[int, PageRun] = {}     # block -> spare pages its visits fill after their stage
        self._page_runs: dict[tuple[int, tuple[int, ...]], PageRun] = {}
        self._holdable = {b.name for b in spare_page_blocks(self.program)}   # what hold_in_pages accepts
        self._number_visits()
        self._build_actions()
        self._build_hook_order()

    def _bind_initial(self) -> None:
        """Point every planned tensor at device memory, so the model's own storage is released and nothing in
        the model can silently keep reading it. Streamed blocks start in the slot of their first visit."""
        p = self.program
        objects = p.object_map()
        for bi, b in enumerate(p.blocks):
            if b.residency == Residency.mapped:
                self._bind_mapped(b)
            elif b.residency == Residency.resident:
                dst = self.arena.slot(b.slot)[:b.size_bytes]   # uint8 [size_bytes]
                dst.copy_(self.host_store.buffer(b.name))
                for w in b.weights:
                    o = objects[w]
                    rebind(self._tensors[w], typed_view(self.arena.slot(b.slot), o.block_offset_bytes,
                                                        torch_dtype(o.dtype), o.shape))
            elif bi in self._first_slot:
                if b.in_hbm_store:   # its packed bytes, once: every visit copies them from here
                    self.arena.slot(b.slot)[:b.transfer_bytes].copy_(self.host_store.buffer(b.name))
                for t, v in self._views[(bi, self._first_slot[bi][1])]:
                    rebind(t, v)
            else:
                raise MemintentError(f"streamed block {b.name!r} is never copied in: the plan has no copy_start "
                                     f"for it")
        # Tensors no block owns (the compiler may leave out e.g. non-persistent buffers) move to the device as
        # they are; detach moves them back.
        self._unplanned_home: dict[str, torch.device] = {}
        for n in self._unplanned:
            t = self._tensors[n]
            if t.is_meta:
                raise MemintentError(f"tensor {n!r} is in no block of the plan and has no values (meta device)")
            self._unplanned_home[n] = t.device
            rebind(t, t.detach().to(self.device))
        if self._unplanned:
            warnings.warn(f"{len(self._unplanned)} tensors are in no block of the plan and were moved to "
                          f"{self.device} outside the arena: {self._unplanned[:5]}", stacklevel=3)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # resident copies complete before any stream reads the slots

    def _bind_mapped(self, b: Block) -> None:
        """A mapped block's module reads its weight in place from the host store's pinned buffer: its forward is
        replaced (``runtime.mapped``) until detach, and its weight tensor points at meta, so that any other read of
        it fails rather than reading stale memory."""
        module = dict(self.model.named_modules())[b.module]
        kind = mapped_op(self.program, b)
        values, scale = mapped.mapped_parts(b, self._objects, self.host_store.buffer(b.name))
        w = self._objects[b.weights[0]]
        module.forward = mapped.mapped_forward(module, kind, values, scale, torch_dtype(w.dtype))
        self._mapped[b.name] = (module, values, scale, kind, torch_dtype(w.dtype))
        rebind(self._tensors[w.name], torch.empty(w.shape, dtype=torch_dtype(w.dtype), device="meta"))

    def warm_mapped(self) -> int:
        """Compile every kernel variant the mapped blocks' forwards can launch (``mapped.warm``), before the first
        forward. Returns the blocks warmed."""
        for _, values, scale, kind, dtype in self._mapped.values():
            mapped.warm(values, scale, kind, dtype, self.device)
        return len(self._mapped)

    # -- hooks --------------------------------------------------------------------------------------------------
    def _register_hooks(self) -> None:
        modules = dict(self.model.named_modules())
        for name, mid in self._mid_of.items():
            self._hooks.append(modules[name].register_forward_pre_hook(self._stage_hook(mid)))
        for name in sorted({m for ops in self._lazy.values() for m in ops}):   # blocks streamed quantized
            self._hooks.append(modules[name].register_forward_pre_hook(self._unpack_hook(name)))
        self._hooks.append(self.model.register_forward_pre_hook(self._root_pre, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._root_post))

    def _reset_forward_state(self) -> None:
        self._in_forward = False
        self._pos = self._n_hooked + 1   # past the end: a stage hook outside a forward fails the order check
        self._overhead_s = 0.0
        self._entries = 0
        self._max_hook_s = 0.0

    def _stage_hook(self, mid: int) -> Callable:
        # Kept lean: this runs once per stage per forward (measured in ForwardStats.host_overhead_s).
        def hook(module: torch.nn.Module, args: Any) -> None:
            t0 = perf_counter()
            w0 = self.backend.sync_work_s
            pos = self._pos
            if pos >= self._n_hooked or self._hook_mid[pos] != mid:
                self._order_fault(mid, pos)
            self._pos = pos + 1
            s = self._hook_stage[pos]
            acts = self._acts[s]
            if acts:
                self._run(acts)
            dt = perf_counter() - t0 - (self.backend.sync_work_s - w0)
            self._overhead_s += dt
            self._entries += 1
            if dt > self._max_hook_s:
                self._max_hook_s = dt

        return hook

    def _unpack_hook(self, name: str) -> Callable:
        """Unpack the weight of module ``name`` (a block that unpacks one weight at a time) right before it runs,
        from the packed bytes of its block's current visit, into the region the block's weights share."""
        def hook(module: torch.nn.Module, args: Any) -> None:
            op = self._lazy_now.get(name) if self._in_forward else None
            if op is None:
                raise RuntimeFault(f"module {name!r} ran outside its block's visit in a forward of the attached "
                                   f"model: its weight is only unpacked there")
            run_unpack([op], self.dequant_backend)

        return hook

    def _run(self, acts: list[tuple], first_forward: bool = False) -> None:
        e = self.engine
        for a in acts:
            k = a[0]
            if k == _START:
                run = self._from_pages.get(a[7]) if self._from_pages else None
                # a first forward issues next-forward copies for itself: they count towards this forward; a copy
                # from spare pages stays in HBM and counts no host bytes
                e.copy_start(a[1], a[2], a[3], a[4] if run is None else run.gather, a[5] if run is None else 0,
                             a[6] and not first_forward)
            elif k == _DONE:
                e.copy_done(a[1], a[4])   # waits for the arrival, then dequantizes a quantized visit
                for t, v in a[2]:
                    t.data = v   # [shape] view into the slot; no allocation
                if a[5]:
                    self._lazy_now.update(a[5])   # this visit's weights, for their modules' pre-hooks
            else:
                if self._to_pages and a[4] in self._to_pages:
                    # on the compute stream after the stage's last reader, before the slot's free event
                    self._to_pages[a[4]].scatter(self._copy_dst[(a[4], a[2])])
                e.free(a[1], a[2], a[3])

    def _order_fault(self, mid: int, pos: int) -> None:
        ran = f"module {self._mod_names[mid]!r} (block {self._mod_block[mid]!r})"
        if not self._in_forward:
            raise RuntimeFault(f"{ran} ran outside a forward of the attached model: its streamed weights are only "
                               f"valid inside the planned forward")
        if pos >= self._n_hooked:
            raise RuntimeFault(f"plan order violated: {ran} ran after the last planned stage "
                               f"{self._hook_stage[-1]}")
        s = self._hook_stage[pos]
        st = self.program.stages[s]
        raise RuntimeFault(f"plan order violated at stage {s}: the model ran {ran}, but the plan expected module "
                           f"{st.module!r} (block {st.block!r}) at stage {s}")

    def _root_pre(self, module: torch.nn.Module, args: Any, kwargs: dict) -> None:
        why = proven_shape_error(self.program, _tensor_shapes(args, kwargs))
        if why is not None:
            raise MemintentError(why)
        t0 = perf_counter()
        if self._in_forward:
            # The previous forward raised before its end: its copies and slot states are stale.
            self.reset()
        self.engine.begin_forward()
        w0 = self.backend.sync_work_s
        self._in_forward = True
        self._pos = 0
        self._overhead_s, self._entries, self._max_hook_s = 0.0, 0, 0.0
        if not self._primed:
            self._primed = True
            if self._start_acts:
                self._run(self._start_acts, first_forward=True)
        dt = perf_counter() - t0 - (self.backend.sync_work_s - w0)
        self._overhead_s += dt
        self._entries += 1
        self._max_hook_s = max(self._max_hook_s, dt)

    def _root_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        t0 = perf_counter()
        w0 = self.backend.sync_work_s
        if self._pos != self._n_hooked:
            s = self._hook_stage[self._pos]
            raise RuntimeFault(f"the forward ended after {self._pos} of {self._n_hooked} planned stage entries: "
                               f"stage {s} (module {self.program.stages[s].module!r}, block "
                               f"{self.program.stages[s].block!r}) never ran")
        n = len(self.program.stages)
        if self._acts[n]:
            self._run(self._acts[n])
        self._in_forward = False
        self._pos = self._n_hooked + 1
        dt = perf_counter() - t0 - (self.backend.sync_work_s - w0)
        self._overhead_s += dt
        self._entries += 1
        self._max_hook_s = max(self._max_hook_s, dt)
        self.engine.end_forward(self._overhead_s, self._entries, self._max_hook_s)

    # -- public -------------------------------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def hold_in_pages(self, pages: torch.Tensor | None, held: dict[str, list[int]],
                      filling: dict[str, list[int]]) -> None:
        """Between forwards: the blocks whose visits copy from KV pool pages (``held``), within HBM, instead of from
        the host, and those whose visits, after their stage ran, write the bytes they copied into pages
        (``filling``); each with its page ids in order. ``pages``: the pool, uint8 (N, page_bytes). Empty: every
        visit copies from the host. Only ``costs.spare_page_blocks`` can be held (spec/runtime.md, "Spare pages");
        a copy issued before this call keeps the source it was issued with."""
        if self._in_forward:
            raise MemintentError("blocks move into or out of spare pages between forwards, not inside one")
        if held or filling:
            wrong = sorted((set(held) | set(filling)) - self._holdable)
            if wrong or set(held) & set(filling) or pages is None:
                raise MemintentError(f"blocks {wrong or sorted(set(held) & set(filling))} cannot be held in spare "
                                     "pages: only streamed blocks copied from the host, visited once a forward, "
                                     "each either held or filling, over the pool's pages")
        bidx = self._block_index
        self._from_pages = {bidx[n]: self._page_run(pages, bidx[n], ids) for n, ids in held.items()}
        self._to_pages = {bidx[n]: self._page_run(pages, bidx[n], ids) for n, ids in filling.items()}

    def _page_run(self, pages: torch.Tensor, bi: int, ids: list[int]) -> PageRun:
        key = (bi, tuple(ids))
        run = self._page_runs.get(key)
        if run is None:
            run = PageRun(pages, ids, self._host_bytes[self._block_names[bi]])
            self._page_runs = {k: v for k, v in self._page_runs.items() if k[0] != bi}   # one run per block
            self._page_runs[key] = run
        return run

    @property
    def holds_pages(self) -> bool:
        """Some visits copy from or into spare pages (``hold_in_pages``): such a forward is not captured."""
        return bool(self._from_pages or self._to_pages)

    @contextlib.contextmanager
    def capturing(self):
        """Run one forward inside it to capture it as a CUDA graph (enter it inside ``torch.cuda.graph``): the
        forward's hooks run as in any steady-state forward, so the graph holds the plan's copies, events,
        dequantizations and compute, with every weight arriving in the slot the plan gives its visit, the same slot
        every step (spec/runtime.md, "Captured steps"). A forward must have run before (the captured one reads the
        visits that forward's end copied in), and the plan must not be in checked mode (whose frees would poison
        slots inside the graph where the engine expects them between steps)."""
        if self.check:
            raise MemintentError("a forward in checked mode is not captured: run it eagerly")
        if self.holds_pages:
            raise MemintentError("a forward that copies from or into spare pages is not captured: run it eagerly")
        if not self._primed or self._in_forward:
            raise MemintentError("capture a forward after a whole forward has run (it reads what that one copied)")
        self.engine.begin_capture()
        try:
            yield self
        finally:
            self.engine.end_capture()

    @contextlib.contextmanager
    def replaying(self):
        """Around a captured forward's replay: it starts after every copy issued before it and the next copy starts
        after it (``CopyEngine.before_replay`` / ``after_replay``)."""
        if self._in_forward:
            raise MemintentError("a captured forward replays between forwards, not inside one")
        self.engine.before_replay()
        try:
            yield self
        finally:
            self.engine.after_replay()

    def reset(self) -> None:
        """Wait for in-flight copies and forget all slot/visit state; the next forward behaves as a first one
        (issues its own prefetches). Called automatically when a forward raised before finishing."""
        self.engine.reset()
        self._reset_forward_state()
        self._primed = False

    def stats(self) -> list[ForwardStats]:
        """Per-forward statistics, oldest first (the last 256 forwards). Waits for their device events."""
        return self.engine.stats()

    @property
    def last_stats(self) -> ForwardStats | None:
        s = self.engine.stats()
        return s[-1] if s else None

    @property
    def attached(self) -> bool:
        return not self._detached

    def detach(self, *, empty_cache: bool = True) -> None:
        """Remove the hooks, point the model's tensors back at the host store (a working model on the host), and
        release the arena (and, on CUDA with ``empty_cache``, return it to the driver). Quantized blocks have no
        full-precision host copy: their tensors go to the meta device (see ``_rebind_to_host``)."""
        if self._detached:
            return
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self.backend.synchronize()   # no copy may still be writing into the arena
        self.engine.stats()          # read pending timing events while the device state is intact
        self._rebind_to_host()
        for n, home in self._unplanned_home.items():
            t = self._tensors[n]
            rebind(t, t.detach().to(home))
        # Every other reference to arena memory lives in these tables.
        self._acts, self._start_acts, self._views, self._unpacks = [], [], {}, {}
        self._lazy, self._lazy_now = {}, {}
        self._copy_dst, self._from_pages, self._to_pages, self._page_runs = {}, {}, {}, {}
        self.arena.release()
        self._detached = True
        _ATTACHED.pop(self.model, None)
        if self.device.type == "cuda" and empty_cache:
            torch.cuda.empty_cache()

    def _rebind_to_host(self) -> None:
        """Point every planned tensor at its host value: the store's views. A quantized block has only packed bytes
        on the host; its tensors go to the meta device rather than to a new dequantized host copy, which for a 70B
        int4 plan would be 140 GB of host memory allocated at detach (it killed the process on a 128 GB machine)."""
        tensors = named_weights(self.model)
        objects = self.program.object_map()
        for module, *_ in self._mapped.values():
            del module.forward       # the instance attribute _bind_mapped set: the class's forward again
        self._mapped = {}
        for b in self.program.blocks:
            if b.name in self.host_store.packed:
                for w in b.weights:
                    o = objects[w]
                    rebind(tensors[w], torch.empty(o.shape, dtype=torch_dtype(o.dtype), device="meta"))
            else:
                for w, v in self.host_store.block_views(b.name).items():
                    rebind(tensors[w], v)

    def __enter__(self) -> StreamedModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()


def attach(model: torch.nn.Module, plan: Proven, device: torch.device | str = "cuda", check: bool = False,
           **kwargs: Any) -> StreamedModel:
    """Bind ``model`` to the proven ``plan`` on ``device`` and return the handle; see ``StreamedModel`` for the
    options (host_store, fill, timing, pin, progress, dequant_backend, model_checked)."""
    return StreamedModel(model, plan, device, check=check, **kwargs)
