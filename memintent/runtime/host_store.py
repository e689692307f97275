"""The host copy of a model's weights in the plan's block layout: one flat byte buffer per block.

Every block's home is host memory. A streamed block is copied from here into a stream slot on each visit, a
resident block once into its own slot at attach time, and on detach the model's tensors point back here.
The buffers are pinned when a CUDA device will read them, because only copies from page-locked memory run
asynchronously on a copy stream (from pageable memory the driver stages them through a bounce buffer and the
host blocks).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable, Iterable

import torch

from memintent.compiler.fingerprint import IR_TO_TORCH
from memintent.errors import MemintentError
from memintent.ir.model import Block, Program

# A fill callback receives {weight name: host tensor of that weight's dtype and shape} and writes each value in.
FillFn = Callable[[dict[str, torch.Tensor]], None]

ALIGN_BYTES = 256            # every block buffer starts on this boundary (and the plan's offsets are multiples of it)
PROGRESS_MIN_BYTES = 10**9   # show a progress bar when filling more than this


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def torch_dtype(ir: str) -> torch.dtype:
    try:
        return IR_TO_TORCH[ir]
    except KeyError:
        raise MemintentError(
            f"weight dtype {ir!r} cannot be executed by the runtime: use one of {sorted(IR_TO_TORCH)}") from None


def typed_view(flat: torch.Tensor, offset_bytes: int, dtype: torch.dtype, shape: list[int] | tuple[int, ...]
               ) -> torch.Tensor:
    """A tensor of ``dtype``/``shape`` aliasing ``flat`` (uint8) from ``offset_bytes``: no copy, no allocation."""
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return flat[offset_bytes:offset_bytes + nbytes].view(dtype).view(tuple(shape))


def rebind(t: torch.Tensor, value: torch.Tensor) -> None:
    """Point parameter/buffer ``t`` at ``value``'s storage, keeping ``t``'s identity (tied weights, optimizers and
    hooks that hold the object see the change). ``.data =`` is the cheap path; a meta tensor cannot take a real
    storage that way, so it swaps the whole object instead (once, at attach)."""
    if torch._has_compatible_shallow_copy_type(t, value):
        t.data = value
    else:
        new = torch.nn.Parameter(value, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else value
        torch.utils.swap_tensors(t, new)


def _cudart():
    return torch.cuda.cudart()


def _unregister(base: torch.Tensor) -> None:
    # Runs when the store is collected; ``base`` is kept alive by this finalizer's arguments until then, so the
    # memory is never freed while still registered with the driver.
    try:
        _cudart().cudaHostUnregister(base.data_ptr())
    except Exception:  # noqa: BLE001 -- the process may be shutting down; nothing useful left to do
        pass


class HostStore:
    """One 256-byte-aligned flat uint8 buffer per block, with a typed view per weight at ``block_offset_bytes``.

    ``pin``: ``"register"`` allocates one plain host allocation for all blocks and page-locks it with
    ``cudaHostRegister`` (no size rounding); ``"alloc"`` uses PyTorch's pinned allocator per block (which rounds
    each allocation up to a power of two: up to 2x the memory); ``"none"`` leaves it pageable (CPU runs);
    ``"auto"``: ``"register"`` if CUDA is available, else ``"none"``. If registering fails it falls back to
    ``"alloc"`` with a warning.
    """

    def __init__(self, program: Program, *, pin: str = "auto", blocks: Iterable[str] | None = None):
        if pin not in ("auto", "register", "alloc", "none"):
            raise MemintentError(f"pin={pin!r}: use one of auto, register, alloc, none")
        if pin == "auto":
            pin = "register" if torch.cuda.is_available() else "none"
        objects = program.object_map()
        wanted = set(blocks) if blocks is not None else None
        self.blocks: dict[str, Block] = {b.name: b for b in program.blocks if wanted is None or b.name in wanted}
        self._objects = {w: objects[w] for b in self.blocks.values() for w in b.weights if w in objects}
        missing = [w for b in self.blocks.values() for w in b.weights if w not in objects]
        if missing:
            raise MemintentError(f"plan lists weights without an object entry: {missing[:5]}")
        self.nbytes = sum(b.size_bytes for b in self.blocks.values())
        self.pin = pin
        self._buffers: dict[str, torch.Tensor] = {}
        self._finalizer = None
        if pin == "register":
            try:
                self._alloc_registered()
            except Exception as e:  # noqa: BLE001 -- e.g. a sandbox without cudaHostRegister
                warnings.warn(f"cudaHostRegister failed ({e}); using PyTorch's pinned allocator instead "
                              f"(it rounds each block up to a power of two)", stacklevel=2)
                self.pin = pin = "alloc"
        if pin in ("alloc", "none"):
            for b in self.blocks.values():
                # [size_bytes] uint8; CPU/pinned allocations are at least 64-byte aligned, pad to 256 by hand
                raw = torch.empty(b.size_bytes + ALIGN_BYTES, dtype=torch.uint8, pin_memory=(pin == "alloc"))
                skip = (-raw.data_ptr()) % ALIGN_BYTES
                self._buffers[b.name] = raw[skip:skip + b.size_bytes]
        self._views: dict[str, torch.Tensor] = {}
        for b in self.blocks.values():
            flat = self._buffers[b.name]
            for w in b.weights:
                o = self._objects[w]
                self._views[w] = typed_view(flat, o.block_offset_bytes or 0, torch_dtype(o.dtype), o.shape)

    def _alloc_registered(self) -> None:
        offsets, total = {}, 0
        for b in self.blocks.values():
            offsets[b.name] = total
            total = _align(total + b.size_bytes, ALIGN_BYTES)
        raw = torch.empty(total + ALIGN_BYTES, dtype=torch.uint8)   # [total + pad] plain host memory
        skip = (-raw.data_ptr()) % ALIGN_BYTES
        base = raw[skip:skip + total]
        if total:
            # flags 0 = cudaHostRegisterDefault; the returned value is a cudaError_t (0 = success)
            err = _cudart().cudaHostRegister(base.data_ptr(), total, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaError {int(err)}")
            self._finalizer = weakref.finalize(self, _unregister, base)
        for name, off in offsets.items():
            self._buffers[name] = base[off:off + self.blocks[name].size_bytes]

    @property
    def pinned(self) -> bool:
        return self.pin in ("register", "alloc")

    def buffer(self, block: str) -> torch.Tensor:
        """The block's flat host buffer: uint8 [size_bytes]."""
        return self._buffers[block]

    def view(self, weight: str) -> torch.Tensor:
        """The weight's typed host view (aliases its block buffer)."""
        return self._views[weight]

    def block_views(self, block: str) -> dict[str, torch.Tensor]:
        return {w: self._views[w] for w in self.blocks[block].weights}

    def fill(self, fill: FillFn, *, progress: bool | None = None) -> None:
        """Call ``fill`` once per block with that block's weight views, so a source can load (and release) one
        block at a time. ``progress``: None shows a bar when more than 1 GB is filled."""
        show = self.nbytes > PROGRESS_MIN_BYTES if progress is None else progress
        if not show:
            for name in self.blocks:
                fill(self.block_views(name))
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
            task = bar.add_task("filling host weights", total=self.nbytes)
            for name, b in self.blocks.items():
                fill(self.block_views(name))
                bar.advance(task, b.size_bytes)

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
    (provided nothing else holds the original tensors). Use ``adopt=False`` to fill from a reference model that
    must stay intact.
    """
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())

    def fill(named: dict[str, torch.Tensor]) -> None:
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
                rebind(src, dst)

    return fill
