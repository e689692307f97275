"""The host copy of a model's weights in the plan's block layout: one flat byte buffer per block.

Every block's home is host memory. A streamed block is copied from here into a stream slot on each visit, a
resident block once into its own slot at attach time, and on detach the model's tensors point back here.
The buffers are pinned when a CUDA device will read them, because only copies from page-locked memory run
asynchronously on a copy stream (from pageable memory the driver stages them through a bounce buffer and the
host blocks).

A block with ``quant`` int8/int4 (a streamed block the compiler chose to quantize) is stored *packed*: its host
buffer holds ``quantized_block_bytes`` bytes in the layout of ``memintent.ir.layout.quant_layout`` (quantized
values and scales of its 2-D weights, raw bytes of the rest), which is exactly what a visit copies. The fill
callback still writes full-precision values; for a packed block it writes them into a scratch buffer of one
block, which is then quantized (on the CUDA device when there is one, else on the CPU) into the pinned buffer.
So host memory holds the packed model plus one full-precision block, never the full-precision model.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Iterable

import torch

from memintent.errors import MemintentError
from memintent.ir.dtypes import torch_dtypes
from memintent.ir.model import ALIGN_BYTES, Block, Object, Program, Quant, Residency, align_up
from memintent.progress import bar
from memintent.runtime.device import check_host_memory
from memintent.runtime.quant import pack_block, quantized_block_bytes, typed_view, unpack_weight

# A fill callback receives {weight name: host tensor of that weight's dtype and shape} and writes each value in.
FillFn = Callable[[dict[str, torch.Tensor]], None]


class ScratchViews(dict):
    """The ``{weight: host tensor}`` a fill callback gets for a packed (quantized) block: the tensors alias a
    scratch buffer that is quantized right after the callback returns and then reused for the next block, so a
    callback must not keep them. ``fill_from_module(adopt=True)`` therefore releases the module's own tensors of
    such a block (points them at the meta device) instead of adopting the scratch views."""

PROGRESS_MIN_BYTES = 10**9   # show a progress bar when filling more than this
PIN_MODES = ("auto", "register", "alloc", "none")


def torch_dtype(ir: str) -> torch.dtype:
    try:
        return torch_dtypes()[ir]
    except KeyError:
        raise MemintentError(
            f"weight dtype {ir!r} cannot be executed by the runtime: use one of {sorted(torch_dtypes())}") from None


def _aligned_empty(n_bytes: int, pin_memory: bool = False) -> torch.Tensor:
    """uint8 [n_bytes] host memory starting on an ``ALIGN_BYTES`` boundary. CPU and pinned allocations are only
    guaranteed 64-byte aligned, so it over-allocates by ``ALIGN_BYTES`` and slices."""
    raw = torch.empty(n_bytes + ALIGN_BYTES, dtype=torch.uint8, pin_memory=pin_memory)   # [n_bytes + pad]
    skip = (-raw.data_ptr()) % ALIGN_BYTES
    return raw[skip:skip + n_bytes]


def rebind(t: torch.Tensor, value: torch.Tensor) -> None:
    """Point parameter/buffer ``t`` at ``value``'s storage, keeping ``t``'s identity (tied weights, optimizers and
    hooks that hold the object see the change). ``.data =`` is the cheap path; a meta tensor cannot take a real
    storage that way, so it swaps the whole object instead (once, at attach)."""
    if torch._has_compatible_shallow_copy_type(t, value):
        t.data = value
    else:
        # Swap with a fresh object aliasing ``value``, never ``value`` itself: the swap gives that object ``t``'s
        # old (meta) contents, and the runtime keeps ``value`` to rebind ``t`` to at every visit. (A buffer such
        # as a rotary embedding's inv_freq in a streamed block met exactly that: its second visit bound the model
        # to a meta tensor and failed in set_data.)
        fresh = value.detach()
        new = torch.nn.Parameter(fresh, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else fresh
        torch.utils.swap_tensors(t, new)


def _cudart():
    return torch.cuda.cudart()


def _unregister(base: torch.Tensor) -> None:
    # Runs when the store is collected; ``base`` is kept alive by this finalizer's arguments until then, so the
    # memory is never freed while still registered with the driver.
    try:
        _cudart().cudaHostUnregister(base.untyped_storage().data_ptr())
    except Exception:  # noqa: BLE001 -- the process may be shutting down; nothing useful left to do
        pass


class HostStore:
    """One 256-byte-aligned flat uint8 buffer per block. An unquantized block's buffer is its weights at
    ``block_offset_bytes`` (``size_bytes`` long), with a typed view per weight; a quantized block's buffer is its
    packed bytes (``quantized_block_bytes`` long, what a visit copies), with no typed views (``weight(name)``
    dequantizes one).

    ``pin``: ``"register"`` allocates one plain host allocation for all blocks and page-locks it with
    ``cudaHostRegister`` (no size rounding); ``"alloc"`` uses PyTorch's pinned allocator per block (which rounds
    each allocation up to a power of two: up to 2x the memory); ``"none"`` leaves it pageable (CPU runs);
    ``"auto"``: ``"register"`` if CUDA is available, else ``"none"``. If registering fails it falls back to
    ``"alloc"`` with a warning.
    ``quant_device``: where ``fill`` quantizes packed blocks; None: the current CUDA device if there is one, else
    the CPU. (CUDA and CPU quantization are bitwise identical: both are IEEE float32 division, round-half-even
    and max; the device is only faster.) If the device runs out of memory, the rest is quantized on the CPU.
    """

    def __init__(self, program: Program, *, pin: str = "auto", blocks: Iterable[str] | None = None,
                 quant_device: torch.device | str | None = None, pin_resident: bool = False):
        if pin not in PIN_MODES:
            raise MemintentError(f"pin={pin!r}: use one of {', '.join(PIN_MODES)}")
        if pin == "auto":
            pin = "register" if torch.cuda.is_available() else "none"
        if blocks is None:
            # The plan states what a run holds on the host; refuse before allocating a byte if it cannot fit.

            check_host_memory(program)
        self._select_blocks(program, blocks)
        # Packed blocks: those the plan quantizes. Their buffer is the packed layout (what a visit copies).
        self.packed: set[str] = {n for n, b in self.blocks.items() if b.quant != Quant.none}
        self._nbytes = {n: quantized_block_bytes(b, self._objects) if n in self.packed else b.size_bytes
                        for n, b in self.blocks.items()}
        self.nbytes = sum(self._nbytes.values())                        # host bytes of all buffers
        self.source_nbytes = sum(b.size_bytes for b in self.blocks.values())   # full-precision bytes filled
        if quant_device is None:
            quant_device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                            else torch.device("cpu"))
        self.quant_device = torch.device(quant_device)
        self.pin = pin
        # Only what streams needs page-locked memory: a resident block is copied once at attach, and pinning it
        # would hold host memory the OS cannot page out for nothing (for llama-3-70b int4 the bf16 embedding and
        # head are 4.2 GB of a 40.8 GB store). ``pin_resident`` pins them too, for a store shared by several plans.
        self.pinned_blocks: set[str] = {n for n, b in self.blocks.items()
                                        if pin_resident or b.residency != Residency.resident}
        self.pinned_nbytes = sum(self._nbytes[n] for n in self.pinned_blocks) if pin != "none" else 0
        self._buffers: dict[str, torch.Tensor] = {}
        self._finalizer = None
        self._allocate()
        self._views: dict[str, torch.Tensor] = {}
        for name, b in self.blocks.items():
            if name not in self.packed:
                self._views.update(self._typed_views(b, self._buffers[name]))

    def _select_blocks(self, program: Program, blocks: Iterable[str] | None) -> None:
        """The blocks this store holds (all, or those named), their weights' objects and each weight's block."""
        objects = program.object_map()
        wanted = set(blocks) if blocks is not None else None
        self.blocks: dict[str, Block] = {b.name: b for b in program.blocks if wanted is None or b.name in wanted}
        self._objects: dict[str, Object] = {w: objects[w] for b in self.blocks.values() for w in b.weights
                                            if w in objects}
        missing = [w for b in self.blocks.values() for w in b.weights if w not in objects]
        if missing:
            raise MemintentError(f"plan lists weights without an object entry: {missing[:5]}")
        self._owner = {w: b.name for b in self.blocks.values() for w in b.weights}

    def _allocate(self) -> None:
        """One buffer per block: the pinned ones in one registered allocation (``pin="register"``), the rest (or
        all, for ``"alloc"``/``"none"``) one allocation each."""
        if self.pin == "register":
            try:
                self._alloc_registered()
            except Exception as e:  # noqa: BLE001 -- e.g. a sandbox without cudaHostRegister
                warnings.warn(f"cudaHostRegister failed ({e}); using PyTorch's pinned allocator instead "
                              f"(it rounds each block up to a power of two)", stacklevel=3)
                self.pin = "alloc"
        for name in self.blocks:
            if name not in self._buffers:
                self._buffers[name] = self._alloc_block(name)

    def _alloc_block(self, name: str) -> torch.Tensor:
        """uint8 [buffer_bytes(name)], 256-byte aligned; pinned when ``pin="alloc"`` and the block is pinned."""
        n = self._nbytes[name]
        want_pin = self.pin == "alloc" and name in self.pinned_blocks
        try:
            return _aligned_empty(n, pin_memory=want_pin)
        except RuntimeError as e:
            if not want_pin:
                raise
            # Page-locked memory is a limited resource (ulimit -l, the driver's budget): run from pageable
            # memory, slower (copies at ~8 GB/s instead of ~55 on an H100), rather than not at all.
            warnings.warn(f"pinned host allocation failed ({str(e).splitlines()[0]}); the host store falls back "
                          f"to pageable memory: copies will be several times slower than the plan predicts",
                          stacklevel=4)
            self.pin = "none"
            self.pinned_blocks = set()
            self.pinned_nbytes = 0
            return _aligned_empty(n)

    def _typed_views(self, b: Block, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{weight: typed view of flat}`` for ``b``'s unquantized layout (``flat``: uint8 [>= size_bytes])."""
        return {w: typed_view(flat, self._objects[w].block_offset_bytes or 0, torch_dtype(self._objects[w].dtype),
                              self._objects[w].shape) for w in b.weights}

    def _alloc_registered(self) -> None:
        offsets, total = {}, 0
        for name in self.blocks:
            if name not in self.pinned_blocks:
                continue
            offsets[name] = total
            total = align_up(total + self._nbytes[name])
        base = _aligned_empty(total)   # uint8 [total] plain host memory, page-locked below
        if total:
            # The whole allocation, from its storage's start (up to ALIGN_BYTES before ``base``): PyTorch asks
            # whether a tensor is pinned by its storage's start, and a CUDA graph capture copies only from memory
            # that is. flags 0 = cudaHostRegisterDefault; the returned value is a cudaError_t (0 = success).
            storage = base.untyped_storage()
            err = _cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaError {int(err)}")
            self._finalizer = weakref.finalize(self, _unregister, base)
        for name, off in offsets.items():
            self._buffers[name] = base[off:off + self._nbytes[name]]

    @property
    def pinned(self) -> bool:
        return self.pin in ("register", "alloc")

    def buffer(self, block: str) -> torch.Tensor:
        """The block's flat host buffer: uint8 [size_bytes], or for a packed block uint8 [quantized_block_bytes]
        (``buffer_bytes``)."""
        return self._buffers[block]

    def buffer_bytes(self, block: str) -> int:
        return self._nbytes[block]

    def _refuse_packed(self, block: str, what: str) -> None:
        raise MemintentError(f"{what}: block {block!r} is stored quantized ({self.blocks[block].quant.value}); its "
                             f"host buffer holds packed values, not the weights: use HostStore.weight(name) for a "
                             f"dequantized copy")

    def view(self, weight: str) -> torch.Tensor:
        """The weight's typed host view (aliases its block buffer). Not for weights of packed blocks (they have no
        full-precision host copy): ``MemintentError``; use ``weight``."""
        v = self._views.get(weight)
        if v is None:
            if self._owner.get(weight) in self.packed:
                self._refuse_packed(self._owner[weight], f"view({weight!r})")
            raise KeyError(weight)
        return v

    def weight(self, name: str) -> torch.Tensor:
        """The weight's host value: the typed view (unquantized block), or a new tensor holding the dequantized
        values (packed block: exactly the values a visit of the block computes with)."""
        block = self._owner.get(name)
        if block is None:
            raise KeyError(name)
        if block not in self.packed:
            return self._views[name]
        o = self._objects[name]
        out = torch.empty(tuple(o.shape), dtype=torch_dtype(o.dtype))   # weight dtype [shape], host
        return unpack_weight(self.blocks[block], self._objects, self._buffers[block], name, out, backend="torch")

    def block_views(self, block: str) -> dict[str, torch.Tensor]:
        if block in self.packed:
            self._refuse_packed(block, f"block_views({block!r})")
        return {w: self._views[w] for w in self.blocks[block].weights}

    def fill(self, fill: FillFn, *, progress: bool | None = None) -> None:
        """Call ``fill`` once per block with that block's weight tensors, so a source can load (and release) one
        block at a time. An unquantized block gets its views into the store; a packed block gets ``ScratchViews``
        of one reusable full-precision scratch buffer, quantized into the store right after the call.
        ``progress``: None shows progress when more than 1 GB is filled (``memintent.progress.bar``: a bar on a
        terminal, a plain line every few seconds in a log)."""
        need = max((self.blocks[n].size_bytes for n in self.packed), default=0)
        # One scratch for all packed blocks: uint8 [largest packed block's size_bytes], pageable host memory.
        scratch = torch.empty(need, dtype=torch.uint8) if need else None

        show = self.source_nbytes > PROGRESS_MIN_BYTES if progress is None else progress
        with bar("filling host weights", self.source_nbytes, enabled=show) as shown:
            for name, b in self.blocks.items():
                if name in self.packed:
                    flat = scratch[:b.size_bytes]   # uint8 [size_bytes]: the block's unquantized layout
                    fill(ScratchViews(self._typed_views(b, flat)))
                    self._pack(b, flat)
                else:
                    fill(self.block_views(name))
                shown.advance(b.size_bytes)
        if self.quant_device.type == "cuda" and self.packed:
            torch.cuda.empty_cache()   # hand the quantization temporaries back before the arena is allocated

    def _pack(self, b: Block, flat: torch.Tensor) -> None:
        """Quantize one block from ``flat`` (uint8 [size_bytes] host, unquantized layout, filled) into its
        packed host buffer."""
        dst = self._buffers[b.name]   # uint8 [packed bytes], pinned (CUDA) or pageable
        dev = self.quant_device
        if dev.type == "cuda":
            try:
                d_flat = flat.to(dev)                                                # uint8 [size_bytes], device
                d_out = torch.empty(dst.numel(), dtype=torch.uint8, device=dev)      # uint8 [packed bytes], device
                pack_block(b, self._objects, self._typed_views(b, d_flat), d_out)   # quantize on the device
                dst.copy_(d_out)   # device -> host, synchronous (non_blocking=False): dst is complete on return
                return
            except torch.cuda.OutOfMemoryError:
                warnings.warn(f"out of device memory while quantizing block {b.name!r} on {dev}; quantizing the "
                              f"remaining blocks on the CPU (same result, slower)", stacklevel=3)
                self.quant_device = torch.device("cpu")
                torch.cuda.empty_cache()
        pack_block(b, self._objects, self._typed_views(b, flat), dst)

    def close(self) -> None:
        """Unpin (if registered) and drop the buffers. Tensors still viewing them stay valid, merely pageable."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        self._buffers.clear()
        self._views.clear()


def fill_from_module(module: torch.nn.Module, *, adopt: bool = True) -> FillFn:
    """A fill callback that copies weights out of ``module`` (its parameters and buffers, by qualified name).

    ``adopt``: after copying a weight, point the module's tensor at its host-store view, so the module's original
    storage is released as the fill goes: peak host memory is one model plus one tensor, never two models
    (provided nothing else holds the original tensors). For a packed block (``ScratchViews``) there is no
    host-store view to adopt: the module's tensor is pointed at the meta device instead (its storage is released;
    ``attach`` binds it to device memory next). Use ``adopt=False`` to fill from a reference model that must stay
    intact.
    """
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())

    def fill(named: dict[str, torch.Tensor]) -> None:
        scratch = isinstance(named, ScratchViews)
        for name, dst in named.items():
            src = tensors.get(name)
            if src is None:
                raise MemintentError(f"the plan's weight {name!r} is not a parameter or buffer of the model")
            if src.is_meta:
                raise MemintentError(f"weight {name!r} is on the meta device: it has no values to copy; pass a "
                                     f"fill callback that loads it (e.g. from the checkpoint)")
            with torch.no_grad():
                dst.copy_(src)   # dst: [shape] host view; src: [shape] on any device
            if adopt:
                # a scratch view is overwritten by the next packed block: release the original, keep no alias
                rebind(src, torch.empty(src.shape, dtype=src.dtype, device="meta") if scratch else dst)

    return fill
