"""Execute a plan on an eager PyTorch model through forward hooks.

``attach(model, program, device)`` allocates the arena, copies resident blocks into their slots, points every
planned parameter/buffer at device memory (resident: its slot for good; streamed: a stream slot, rebound on each
visit) and registers a forward pre-hook on each stage module plus a pre- and post-hook on the root. After that
``model(...)`` and ``model.generate(...)`` run unchanged, with the plan's copies overlapping compute.

Quantized streamed blocks (``Block.quant`` int8/int4) live packed in the host store; a visit copies the packed
bytes into the end of its stream slot and copy_done dequantizes them, on the compute stream, into the start of the
slot, where the block's tensors are bound exactly as for an unquantized block (spec/runtime.md, "Quantized
blocks").

Hook contract (see spec/runtime.md): the root pre-hook opens a forward (and, on a first forward, issues the copies
that a previous forward's tail would have issued); each stage module's pre-hook checks that it is the next stage
the plan expects, then runs that stage's actions in list order; the root post-hook checks that every stage ran and
runs the end-of-forward actions (frees and next-forward prefetches).
"""

from __future__ import annotations

import functools
import contextlib
import warnings
import weakref
from time import perf_counter
from typing import Any, Callable

import torch

from memintent.compiler.fingerprint import fingerprint_module, named_weights, weight_entries
from memintent.errors import MemintentError, RuntimeFault
from memintent.ir.model import ActionKind, Block, ObjectKind, Program, Quant, Residency, SlotKind, dtype_bytes
from memintent.runtime.arena import DeviceArena, check_fits
from memintent.runtime.copy_engine import CopyEngine, CpuBackend, CudaBackend, ForwardStats
from memintent.runtime.host_store import FillFn, HostStore, fill_from_module, rebind, torch_dtype, typed_view
from memintent.runtime.quant import prepare_unpack, quantized_block_bytes, run_unpack

_START, _DONE, _FREE = 0, 1, 2

# Models currently attached: a second attach would double the hooks and fight over the same parameters.
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint_diff(model: torch.nn.Module, program: Program, limit: int = 3) -> str:
    """A hint at what differs: the first few weights whose name, shape or dtype disagree."""
    have = {n: (tuple(s), d) for n, s, d in weight_entries(model)}
    want = {o.name: (tuple(o.shape), o.dtype) for o in program.objects if o.kind == ObjectKind.weight}
    diffs = []
    for name in sorted(set(have) | set(want)):
        h, w = have.get(name), want.get(name)
        if h == w:
            continue
        fmt = lambda x: "absent" if x is None else f"{'x'.join(map(str, x[0])) or 'scalar'} {x[1]}"  # noqa: E731
        diffs.append(f"{name}: model {fmt(h)}, plan {fmt(w)}")
    if not diffs:
        return ""
    more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; first differences: " + "; ".join(diffs[:limit]) + more


class StreamedModel:
    """A model bound to a plan. Construct through ``attach``; ``detach()`` undoes everything.

    ``check``: checked mode. The arena starts poisoned (0xFF bytes: NaN in bf16/f16/f32), every ``free`` poisons
    its slot, and each stage entry verifies that the streamed blocks the plan says it reads are bound and not
    freed, so weights used outside their planned residency either fault or turn the output into NaN.
    ``timing``: CUDA timing events for copy time, stalls, dequantization and device time (a few microseconds per
    block).
    ``dequant_backend``: how quantized blocks are dequantized on arrival (``memintent.runtime.quant``): ``"auto"``
    (default: the one-pass Triton kernel on CUDA when triton is importable, else torch; the H100 tests check the
    two bitwise equal), ``"torch"`` (elementwise torch ops, the reference) or ``"triton"``.
    """

    def __init__(self, model: torch.nn.Module, program: Program, device: torch.device | str = "cuda", *,
                 check: bool = False, host_store: HostStore | None = None, fill: FillFn | None = None,
                 timing: bool = True, pin: str = "auto", progress: bool | None = None,
                 dequant_backend: str = "auto"):
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
        self.model, self.program, self.device, self.check = model, program, dev, check
        self.dequant_backend = dequant_backend
        self._hooks: list[Any] = []
        self._detached = False
        self._paused = False

        self._validate()
        pred = program.prediction
        extra = (pred.activation_peak_bytes + pred.workspace_bytes) if pred is not None else 0
        # Refuse an arena the device cannot hold before the (possibly long) fill; the arena itself is allocated
        # after it, so quantizing the packed blocks on the device has the device memory to itself.
        check_fits(program.arena.size_bytes, dev)

        if host_store is None:
            host_store = HostStore(program, pin=pin if dev.type == "cuda" else "none", quant_device=dev)
            host_store.fill(fill or fill_from_module(model, adopt=True), progress=progress)
        else:
            for b in program.blocks:
                want = self._host_bytes[b.name]
                have = host_store.blocks.get(b.name)
                if (have is None or have.size_bytes != b.size_bytes or have.quant != b.quant
                        or host_store.buffer_bytes(b.name) != want):
                    held = ("no buffer" if have is None else
                            f"{host_store.buffer_bytes(b.name)} bytes (quant {have.quant.value})")
                    raise MemintentError(f"the host store given does not match block {b.name!r}: the plan needs "
                                         f"{want} bytes (quant {b.quant.value}), the store holds {held}: build "
                                         f"it from this plan")
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

    # -- validation ---------------------------------------------------------------------------------------------
    def _validate(self) -> None:
        p, model = self.program, self.model
        if p.arena is None or not p.stages:
            raise MemintentError(f"program {p.name!r} carries no plan (no arena or stages): run the passes first")
        fp = fingerprint_module(model)
        if fp != p.fingerprint:
            raise MemintentError(
                f"the model does not match the plan: model fingerprint {fp}, plan {p.name!r} was compiled for "
                f"{p.fingerprint} ({p.model.ref}){_fingerprint_diff(model, p)}")
        tensors = named_weights(model)
        objects = p.object_map()
        slots = p.arena.slots
        owner: dict[str, str] = {}
        # Bytes of each block's host buffer and of each visit's copy: the packed layout for quantized blocks.
        self._host_bytes: dict[str, int] = {}
        for b in p.blocks:
            if b.residency is None:
                raise MemintentError(f"block {b.name!r} has no residency: run the passes first")
            if b.quant != Quant.none:
                if b.residency == Residency.resident:
                    raise MemintentError(f"resident block {b.name!r} is quantized ({b.quant.value}): resident "
                                         f"blocks stay in the model's dtype (recompile the plan)")
                if any(w not in objects for w in b.weights):
                    missing = next(w for w in b.weights if w not in objects)
                    raise MemintentError(f"weight {missing!r} of block {b.name!r} is not an object of the plan")
                qbytes = quantized_block_bytes(b, objects)
                if b.transfer_bytes is not None and b.transfer_bytes != qbytes:
                    raise MemintentError(f"block {b.name!r} ({b.quant.value}): the plan's transfer_bytes "
                                         f"{b.transfer_bytes} differ from the runtime's packed layout of {qbytes} "
                                         f"bytes: the plan was compiled by another version; recompile it")
                self._host_bytes[b.name] = qbytes
            else:
                self._host_bytes[b.name] = b.size_bytes
            for w in b.weights:
                o, t = objects.get(w), tensors.get(w)
                if o is None or t is None:
                    raise MemintentError(f"weight {w!r} of block {b.name!r} is "
                                         f"{'not an object of the plan' if o is None else 'not in the model'}")
                if w in owner:
                    raise MemintentError(f"weight {w!r} is in blocks {owner[w]!r} and {b.name!r}")
                owner[w] = b.name
                dt = torch_dtype(o.dtype)
                if tuple(t.shape) != tuple(o.shape) or t.dtype != dt:
                    raise MemintentError(f"weight {w!r}: model has {tuple(t.shape)} {t.dtype}, plan has "
                                         f"{tuple(o.shape)} {o.dtype}")
                off = o.block_offset_bytes
                n = dtype_bytes(o.dtype, t.numel())
                if off is None or off % dt.itemsize or off < 0 or off + n > b.size_bytes:
                    raise MemintentError(f"weight {w!r} at offset {off} ({n} bytes) does not fit block {b.name!r} "
                                         f"of {b.size_bytes} bytes aligned to its dtype")
            if b.residency == Residency.resident:
                if b.slot is None or not 0 <= b.slot < len(slots) or slots[b.slot].kind != SlotKind.resident:
                    raise MemintentError(f"resident block {b.name!r} has no resident slot (slot {b.slot})")
                if b.size_bytes > slots[b.slot].size_bytes:
                    raise MemintentError(f"resident block {b.name!r} ({b.size_bytes} bytes) exceeds its slot "
                                         f"{b.slot} ({slots[b.slot].size_bytes} bytes)")
        self._unplanned = [n for n in tensors if n not in owner]
        modules = dict(model.named_modules())
        for s in p.stages:
            if s.module and s.module not in modules:
                raise MemintentError(f"stage {s.index}: module {s.module!r} is not a submodule of the model")
        blocks = p.block_map()
        starts: dict[tuple[str, int], int] = {}
        n_st = len(p.stages)
        for i, a in enumerate(p.actions):
            where = f"action {i} ({a.kind.value} of {a.block!r} at stage {a.stage})"
            if not 0 <= a.stage <= n_st or not 0 <= a.visit_stage < n_st:
                raise MemintentError(f"{where}: stage or visit_stage out of range 0..{n_st}")
            if a.stage < n_st and not p.stages[a.stage].module:
                raise MemintentError(f"{where}: stage {a.stage} is root glue code, which has no hook to run it")
            b = blocks.get(a.block)
            if b is None or b.residency != Residency.streamed:
                raise MemintentError(f"{where}: {a.block!r} is not a streamed block")
            if not 0 <= a.slot < len(slots) or slots[a.slot].kind != SlotKind.stream:
                raise MemintentError(f"{where}: slot {a.slot} is not a stream slot")
            if b.quant == Quant.none and b.size_bytes > slots[a.slot].size_bytes:
                raise MemintentError(f"{where}: block of {b.size_bytes} bytes does not fit slot {a.slot} "
                                     f"({slots[a.slot].size_bytes} bytes)")
            if b.quant != Quant.none and self._packed_start(b, slots[a.slot].size_bytes) < b.size_bytes:
                raise MemintentError(f"{where}: {b.quant.value} block needs {b.size_bytes} bytes of weights at the "
                                     f"start of slot {a.slot} and {self._host_bytes[b.name]} packed bytes at its "
                                     f"end; the slot has {slots[a.slot].size_bytes} bytes")
            key = (a.block, a.visit_stage)
            if a.kind == ActionKind.copy_start:
                if key in starts:
                    raise MemintentError(f"{where}: the visit already has a copy_start (action {starts[key]})")
                starts[key] = i
        for i, a in enumerate(p.actions):
            key = (a.block, a.visit_stage)
            if a.kind != ActionKind.copy_start:
                if key not in starts:
                    raise MemintentError(f"action {i} ({a.kind.value} of {a.block!r} at stage {a.stage}): the visit "
                                         f"at stage {a.visit_stage} has no copy_start")
                if p.actions[starts[key]].slot != a.slot:
                    raise MemintentError(f"action {i} ({a.kind.value} of {a.block!r}): slot {a.slot} differs from "
                                         f"the visit's copy_start slot {p.actions[starts[key]].slot}")

    def _packed_start(self, b: Block, slot_bytes: int) -> int:
        """Offset in a stream slot of ``slot_bytes`` where a quantized visit of ``b`` lands its packed bytes: the
        slot's last ``aligned(transfer_bytes)`` bytes (residency.slot_need_bytes sizes slots as weights first, packed
        bytes last). The packed layout's size is a multiple of 256 already; aligning again states the contract."""
        return slot_bytes - -(-self._host_bytes[b.name] // 256) * 256

    # -- precomputed tables (so hooks only index lists) ---------------------------------------------------------
    def _build_tables(self) -> None:
        p, host = self.program, self.host_store
        objects = p.object_map()
        tensors = named_weights(self.model)
        self._tensors = tensors
        self._block_names = [b.name for b in p.blocks]
        bidx = {n: i for i, n in enumerate(self._block_names)}
        blocks = p.blocks

        views: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        unpacks: dict[tuple[int, int], Callable[[], None]] = {}

        def packed_region(bi: int, slot: int) -> torch.Tensor:
            # uint8 [packed bytes]: the end of the slot, where a quantized visit's copy lands
            flat = self.arena.slot(slot)
            start = self._packed_start(blocks[bi], flat.numel())
            return flat[start:start + self._host_bytes[blocks[bi].name]]

        def unpacker(bi: int, slot: int) -> Callable[[], None]:
            # The dequantization of a quantized visit: views built once (they alias the arena), so copy_done only
            # launches kernels. src: the packed region at the end of the slot; dst: uint8 [size_bytes] at its
            # start, the unquantized layout the block's tensors are bound to.
            if (bi, slot) not in unpacks:
                flat = self.arena.slot(slot)
                ops = prepare_unpack(blocks[bi], objects, packed_region(bi, slot), flat[:blocks[bi].size_bytes])
                unpacks[(bi, slot)] = functools.partial(run_unpack, ops, self.dequant_backend)
            return unpacks[(bi, slot)]

        def bindings(bi: int, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
            # (model tensor, typed view into the slot) pairs: a visit's copy_done rebinds them in one loop
            if (bi, slot) not in views:
                flat = self.arena.slot(slot)
                views[(bi, slot)] = [
                    (tensors[w], typed_view(flat, objects[w].block_offset_bytes, torch_dtype(objects[w].dtype),
                                            objects[w].shape)) for w in blocks[bi].weights]
            return views[(bi, slot)]

        self._visit_ids: dict[tuple[str, int], int] = {}
        self._visit_labels: list[str] = []
        self._visit_keys: list[str] = []
        for a in p.actions:
            if a.kind == ActionKind.copy_start:
                self._visit_ids[(a.block, a.visit_stage)] = len(self._visit_labels)
                self._visit_labels.append(f"block {a.block!r} (visit at stage {a.visit_stage})")
                self._visit_keys.append(f"{a.block}@{a.visit_stage}")

        n_st = len(p.stages)
        self._acts: list[list[tuple]] = [[] for _ in range(n_st + 1)]
        self._start_acts: list[tuple] = []   # next-forward copies a first forward must issue itself
        self._first_slot: dict[int, tuple[int, int]] = {}   # block -> (visit_stage, slot) of its earliest visit
        for a in p.actions:
            vid, bi = self._visit_ids[(a.block, a.visit_stage)], bidx[a.block]
            quantized = blocks[bi].quant != Quant.none
            size = self._host_bytes[a.block]   # bytes the visit copies: size_bytes, or the packed bytes
            if a.kind == ActionKind.copy_start:
                # dst: uint8 [size] in the slot (its start; a quantized block's packed bytes: its end);
                # src: uint8 [size] host block buffer
                dst = packed_region(bi, a.slot) if quantized else self.arena.slot(a.slot)[:size]
                act = (_START, vid, a.slot, dst, host.buffer(a.block), size, a.next_forward)
                bindings(bi, a.slot)   # also where _bind_initial points the block before its first visit
                if a.next_forward:
                    self._start_acts.append(act)
                if bi not in self._first_slot or a.visit_stage < self._first_slot[bi][0]:
                    self._first_slot[bi] = (a.visit_stage, a.slot)
            elif a.kind == ActionKind.copy_done:
                act = (_DONE, vid, bindings(bi, a.slot), bi, unpacker(bi, a.slot) if quantized else None)
            else:
                act = (_FREE, vid, a.slot, self.arena.slot(a.slot) if self.check else None, bi)
            self._acts[a.stage].append(act)
        self._views = views
        self._unpacks = unpacks

        # Hooked stages in plan order; each hook compares its module id with the next expected one.
        self._mod_names: list[str] = []
        self._mod_block: list[str] = []
        mid_of: dict[str, int] = {}
        self._hook_stage: list[int] = []
        self._hook_mid: list[int] = []
        for s in p.stages:
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
        streamed = {i for i, b in enumerate(blocks) if b.residency == Residency.streamed}
        self._needs_streamed = [[bidx[n] for n in s.needs if n in bidx and bidx[n] in streamed] for s in p.stages]

    def _bind_initial(self) -> None:
        """Point every planned tensor at device memory, so the model's own storage is released and nothing in
        the model can silently keep reading it. Streamed blocks start in the slot of their first visit."""
        p = self.program
        objects = p.object_map()
        for bi, b in enumerate(p.blocks):
            if b.residency == Residency.resident:
                dst = self.arena.slot(b.slot)[:b.size_bytes]   # uint8 [size_bytes]
                dst.copy_(self.host_store.buffer(b.name))
                for w in b.weights:
                    o = objects[w]
                    rebind(self._tensors[w], typed_view(self.arena.slot(b.slot), o.block_offset_bytes,
                                                        torch_dtype(o.dtype), o.shape))
            elif bi in self._first_slot:
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

    # -- hooks --------------------------------------------------------------------------------------------------
    def _register_hooks(self) -> None:
        modules = dict(self.model.named_modules())
        for name, mid in self._mid_of.items():
            self._hooks.append(modules[name].register_forward_pre_hook(self._stage_hook(mid)))
        self._hooks.append(self.model.register_forward_pre_hook(self._root_pre))
        self._hooks.append(self.model.register_forward_hook(self._root_post))

    def _reset_forward_state(self) -> None:
        self._in_forward = False
        self._pos = self._n_hooked + 1   # past the end: a stage hook outside a forward fails the order check
        self._overhead_s = 0.0
        self._entries = 0
        self._max_hook_s = 0.0
        self._live = [-1] * len(self._block_names)      # visit id whose copy_done bound the block, -1: none
        self._freed_at = [-1] * len(self._block_names)  # stage of the block's last free (for messages)

    def _stage_hook(self, mid: int) -> Callable:
        # Kept lean: this runs once per stage per forward (measured in ForwardStats.host_overhead_s).
        def hook(module: torch.nn.Module, args: Any) -> None:
            if self._paused:
                return
            t0 = perf_counter()
            w0 = self.backend.sync_work_s
            pos = self._pos
            if pos >= self._n_hooked or self._hook_mid[pos] != mid:
                self._order_fault(mid, pos)
            self._pos = pos + 1
            s = self._hook_stage[pos]
            acts = self._acts[s]
            if acts:
                self._run(acts, s)
            if self.check:
                self._check_needs(s)
            dt = perf_counter() - t0 - (self.backend.sync_work_s - w0)
            self._overhead_s += dt
            self._entries += 1
            if dt > self._max_hook_s:
                self._max_hook_s = dt

        return hook

    def _run(self, acts: list[tuple], stage: int, first_forward: bool = False) -> None:
        e = self.engine
        try:
            for a in acts:
                k = a[0]
                if k == _START:
                    # a first forward issues next-forward copies for itself: they count towards this forward
                    e.copy_start(a[1], a[2], a[3], a[4], a[5], a[6] and not first_forward)
                elif k == _DONE:
                    e.copy_done(a[1], a[4])   # waits for the arrival, then dequantizes a quantized visit
                    for t, v in a[2]:
                        t.data = v   # [shape] view into the slot; no allocation
                    self._live[a[3]] = a[1]
                else:
                    e.free(a[1], a[2], a[3])
                    if self._live[a[4]] == a[1]:
                        self._live[a[4]] = -1
                        self._freed_at[a[4]] = stage
        except RuntimeFault as err:
            raise RuntimeFault(f"{self._where(stage)}: {err}") from None

    def _where(self, stage: int) -> str:
        n = len(self.program.stages)
        if stage >= n:
            return f"end of forward (stage {n})"
        if stage < 0:
            return "start of forward"
        return f"stage {stage} (module {self.program.stages[stage].module!r})"

    def _check_needs(self, s: int) -> None:
        for bi in self._needs_streamed[s]:
            if self._live[bi] < 0:
                why = (f"its slot was freed at {self._where(self._freed_at[bi])}" if self._freed_at[bi] >= 0
                       else "no copy_done bound it for this visit")
                raise RuntimeFault(f"{self._where(s)} reads block {self._block_names[bi]!r}, which is not in "
                                   f"device memory: {why}")

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

    def _root_pre(self, module: torch.nn.Module, args: Any) -> None:
        if self._paused:
            return
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
                self._run(self._start_acts, -1, first_forward=True)
        dt = perf_counter() - t0 - (self.backend.sync_work_s - w0)
        self._overhead_s += dt
        self._entries += 1
        self._max_hook_s = max(self._max_hook_s, dt)

    def _root_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._paused:
            return
        t0 = perf_counter()
        w0 = self.backend.sync_work_s
        if self._pos != self._n_hooked:
            s = self._hook_stage[self._pos]
            raise RuntimeFault(f"the forward ended after {self._pos} of {self._n_hooked} planned stage entries: "
                               f"stage {s} (module {self.program.stages[s].module!r}, block "
                               f"{self.program.stages[s].block!r}) never ran")
        n = len(self.program.stages)
        if self._acts[n]:
            self._run(self._acts[n], n)
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

    @contextlib.contextmanager
    def hooks_paused(self):
        """Run the model with the hooks idle: only for a plan with no actions (nothing streams, nothing to order),
        e.g. to capture its forward as a CUDA graph, where per-forward Python bookkeeping would be frozen."""
        if self.program.actions or self.check:
            raise MemintentError("hooks can only be paused for a plan that streams nothing, outside checked mode")
        self._paused = True
        try:
            yield self
        finally:
            self._paused = False

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


def attach(model: torch.nn.Module, program: Program, device: torch.device | str = "cuda", check: bool = False,
           **kwargs: Any) -> StreamedModel:
    """Bind ``model`` to ``program`` on ``device`` and return the handle; see ``StreamedModel`` for the options
    (host_store, fill, timing, pin, progress, dequant_backend)."""
    return StreamedModel(model, program, device, check=check, **kwargs)
