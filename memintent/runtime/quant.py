"""Weight quantization for streamed blocks: fewer bytes over PCIe, dequantized on the device after arrival.

A streamed block whose ``Block.quant`` is ``int8``, ``int4`` or ``int4g`` lives on the host as a *packed block*: one
flat uint8 buffer holding, for each weight in the block's order, either the weight as it is (``raw``) or its
quantized values followed by its scales (and int4g's minimums). Each part starts on a 256-byte boundary. A visit copies the packed buffer into the
end of its stream slot, and ``unpack_block`` dequantizes it into the start of the same slot, which is laid out
exactly like the unquantized block (weight ``w`` at ``objects[w].block_offset_bytes``), so the model's views on
the slot do not change (spec/runtime.md, "Quantized blocks").

Formats (``w`` is a 2-D weight of shape ``(out, in)``, row = output channel):

``int8``
    symmetric, one bf16 scale per row: ``scale = absmax(row) / 127`` (rounded to nearest bf16),
    ``q = clamp(round(w / scale), -127, 127)``; values ``int8 (out, in)``, scales ``bf16 (out,)``.
    Dequantized: ``q * scale`` computed in float32 (exact: a 7-bit integer times an 8-bit mantissa), rounded once
    to the weight's dtype.
``int4``
    symmetric, one bf16 scale per group of ``INT4_GROUP`` = 128 consecutive input columns of a row:
    ``scale = absmax(group) / 7`` (rounded to nearest bf16), ``q = clamp(round(w / scale), -8, 7)`` stored as
    ``q + 8`` in a nibble, two per byte, the low nibble holding the even column. A row with an odd number of
    columns is padded with one zero value (nibble 8), so values are ``uint8 (out, ceil(in / 2))``; scales
    ``bf16 (out, ceil(in / 128))``, the last group of a row may be short. (As the scale is rounded to nearest,
    ``-absmax / scale >= -7.03``: the value -8 never occurs in practice.) 4.125 bits per weight.
``int4g``
    asymmetric, one bf16 scale and one bf16 minimum per group of ``INT4G_GROUP`` = 32 consecutive input columns of
    a row (GGUF's Q4_1, with bf16 for its f16): with ``lo``/``hi`` the group's min and max, ``min = lo`` and
    ``scale = hi / 15 - min / 15`` (each rounded to nearest bf16), ``q = clamp(round((w - min) / scale), 0, 15)``
    in a nibble, two per byte as int4. Values ``uint8 (out, ceil(in / 2))``, scales and minimums
    ``bf16 (out, ceil(in / 32))``. Dequantized: ``q * scale + min`` in float32 (the product exact, the sum rounded
    once), then rounded to the weight's dtype. 5 bits per weight (``layout.bytes_per_weight``). The minimum is a
    float, not an integer zero point: a zero point puts 0 on the grid, so a group's ends fall up to half a step
    off the levels and its outliers clamp; on SmolLM2-135M that cost was most of int4g's earlier perplexity rise
    (benchmarks/quality.py, README "Quantization and quality").

Where ``qmax * scale`` (int4g: ``min + 15 * scale``) would exceed the weight dtype's max (weights within 2^-8 of
it), the scale (and int4g's minimum) is rounded toward zero instead, so nothing dequantizes to inf.

Which weights are quantized, and where each part sits in the packed buffer, is ``memintent.ir.layout`` (pure
arithmetic the compiler sizes copies with); this module fills and reads that layout with torch.

A zero row (int8) or zero group (int4, int4g) gets scale 0 and values 0 and dequantizes to exact zeros (int4g: to
its minimum, so any constant group that bf16 holds is exact). Non-finite
weights are rejected (``ValueError``): their scale would be inf/NaN and poison the whole row.

Backends: the functions here are torch ops only and run on CPU and CUDA; that torch path is the reference.
``dequantize_int8``/``dequantize_int4``/``dequantize_int4g``/``unpack_block`` take ``backend="auto"``, which on
CUDA tensors with ``triton`` importable uses a one-pass Triton kernel (read packed values, scales and minimums,
write the output dtype). Both compute the same float32 value (an exact product; int4g adds its minimum, rounded once
in float32) and round it once to the output dtype, so they are bitwise equal: tests/test_quant_stream.py checks it on a GPU, and tests/test_quant.py on the CPU with Triton's
interpreter (``TRITON_INTERPRET=1``, under which ``backend="triton"`` also takes CPU tensors).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import pathlib
from typing import Literal

import torch

from memintent.errors import RuntimeFault
from memintent.ir.dtypes import torch_dtypes
from memintent.ir.layout import (  # noqa: F401 -- the layout's names, re-exported for the runtime's callers
    INT4_GROUP,
    INT4G_GROUP,
    PART_ALIGN_BYTES,
    QUANTIZABLE_DTYPES,
    Part,
    QuantEntry,
    Storage,
    int4_shapes,
    quant_layout,
    quantized_block_bytes,
    quantized_payload_bytes,
    weight_storage,
)
from memintent.ir.model import Block, Object, align_up

_QUANT_CHUNK_ELEMS = 1 << 24   # quantize in row chunks of about this many elements (bounds float32 temporaries)

Backend = Literal["auto", "torch", "triton"]


def _rows_per_chunk(cols: int) -> int:
    return max(1, _QUANT_CHUNK_ELEMS // max(cols, 1))


def _check_2d_float(w: torch.Tensor, what: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D weight (out, in), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point weight, got {w.dtype}")


def _bf16_scale(absmax: torch.Tensor, qmax: int, wmax: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale as stored: bf16, divisor used to quantize: float32, 1 where the scale is 0).

    ``absmax``: float32 per row/group; ``wmax``: the largest finite value of the weight's dtype.
    """
    return _round_scale(absmax / qmax, qmax, wmax, what)


def _round_scale(scale32: torch.Tensor, qmax: int, wmax: float, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``_bf16_scale`` from the float32 scale itself: dequantized values are at most ``qmax * scale`` in size."""
    if not bool(torch.isfinite(scale32).all()):   # one value per row/group: a cheap check
        raise ValueError(f"{what}: the weight has inf or NaN values; they cannot be quantized")
    scale32 = scale32.contiguous()
    # Round to nearest bf16 (relative error <= 2^-8): the values clamped at qmax then err by at most
    # absmax * 2^-8 < scale / 2. Only where qmax * scale would exceed the weight dtype's range (weights within
    # 2^-8 of its max) take the scale rounded *down* (low 16 bits of the float32 dropped: bf16 is its top
    # half), so that no dequantized value overflows to inf; there the clamp error is up to ~scale.
    near = scale32.to(torch.bfloat16)
    down = (scale32.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)   # exact conversion
    scale = torch.where(near.double() * qmax > wmax, down, near)
    # Quantize with the stored scale, the one dequantization uses; a zero scale (zero row/group, or one so tiny
    # that its scale underflows) divides by 1 instead, giving q = round(w) = 0 for such a tiny w.
    div = scale.float()
    div = torch.where(div == 0, torch.ones_like(div), div)
    return scale, div


# ---- int8 -----------------------------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w (out, in)`` float -> ``(q: int8 (out, in), scale: bf16 (out,))``, symmetric per output row.

    Runs on ``w``'s device. Works through rows in chunks so the float32 temporaries stay ~64 MiB.
    """
    _check_2d_float(w, "quantize_int8")
    out_ch, in_ch = w.shape
    q = torch.empty((out_ch, in_ch), dtype=torch.int8, device=w.device)
    scale = torch.empty((out_ch,), dtype=torch.bfloat16, device=w.device)
    step = _rows_per_chunk(in_ch)
    for r0 in range(0, out_ch, step):
        x = w[r0:r0 + step].float()
        absmax = x.abs().amax(dim=1) if in_ch else x.new_zeros(x.shape[0])
        s, div = _bf16_scale(absmax, 127, torch.finfo(w.dtype).max, "quantize_int8")
        scale[r0:r0 + step] = s
        q[r0:r0 + step] = torch.round(x / div[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, backend: Backend = "auto"
                    ) -> torch.Tensor:
    """Write ``q * scale`` into ``out`` (``(out, in)``, bf16/f16/f32, any row stride) in place; returns ``out``.

    Torch path temporaries: none of the output's size. ``out.copy_(q)`` converts int8 -> out dtype exactly
    (|q| <= 127 fits the 8-bit mantissa of bf16), and ``out.mul_(scale[:, None])`` multiplies in float32 and rounds
    once; only a dtype-converted copy of the (out,)-sized scale may be made by torch when dtypes differ.
    """
    if q.shape != out.shape or q.dim() != 2 or scale.shape != (q.shape[0],):
        raise ValueError(f"dequantize_int8: shapes q {tuple(q.shape)}, scale {tuple(scale.shape)}, "
                         f"out {tuple(out.shape)} do not match")
    if _use_triton(backend, q, out):
        _triton_dequant_int8(q, scale, out)
        return out
    out.copy_(q)
    out.mul_(scale[:, None])
    return out


# ---- int4 -----------------------------------------------------------------------------------------------------

def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w (out, in)`` float -> ``(packed: uint8 (out, ceil(in/2)), scales: bf16 (out, ceil(in/128)))``.

    Symmetric per group of 128 input columns; value ``q`` in [-8, 7] stored as ``q + 8``; low nibble = even column.
    Columns beyond ``in`` (padding to a whole group / byte) are treated as zeros: they do not affect a scale and
    pad nibbles hold 8 (value 0).
    """
    _check_2d_float(w, "quantize_int4")
    out_ch, in_ch = w.shape
    (_, n_bytes), (_, n_groups) = int4_shapes(out_ch, in_ch)
    packed = torch.empty((out_ch, n_bytes), dtype=torch.uint8, device=w.device)
    scales = torch.empty((out_ch, n_groups), dtype=torch.bfloat16, device=w.device)
    if in_ch == 0:
        return packed, scales
    pad = n_groups * INT4_GROUP - in_ch
    step = _rows_per_chunk(n_groups * INT4_GROUP)
    for r0 in range(0, out_ch, step):
        x = torch.nn.functional.pad(w[r0:r0 + step].float(), (0, pad))            # (r, G*128) float32
        x = x.view(x.shape[0], n_groups, INT4_GROUP)
        s, div = _bf16_scale(x.abs().amax(dim=2), 7, torch.finfo(w.dtype).max, "quantize_int4")   # (r, G)
        scales[r0:r0 + step] = s
        u = (torch.round(x / div[:, :, None]).clamp_(-8, 7) + 8).to(torch.uint8)   # (r, G, 128) in [0, 15]
        u = u.view(u.shape[0], -1)[:, :2 * n_bytes]                                  # (r, 2*ceil(in/2))
        packed[r0:r0 + step] = u[:, 0::2] | (u[:, 1::2] << 4)
    return packed, scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, out: torch.Tensor, backend: Backend = "auto"
                    ) -> torch.Tensor:
    """Write the dequantized ``(out, in)`` weight into ``out`` (bf16/f16/f32, unit column stride) in place.

    Torch path temporaries: none of the output's size. The nibbles are extracted with float arithmetic *in*
    ``out``: a byte ``p`` (0..255) converts exactly to bf16/f16 (8 significant bits), ``p mod 16`` and
    ``floor(p / 16)`` are exact there too (p / 16 is p * 2^-4), then ``- 8`` and ``* scale`` (multiplied in
    float32, rounded once). Torch makes only small per-group scale views (and a converted copy of ``scales`` when
    dtypes differ). Each elementwise op is one pass over half or all of ``out``: four passes in all; the Triton
    kernel does it in one.
    """
    out_ch, in_ch = out.shape if out.dim() == 2 else (-1, -1)
    pshape, sshape = int4_shapes(out_ch, in_ch)
    if out.dim() != 2 or tuple(packed.shape) != pshape or tuple(scales.shape) != sshape:
        raise ValueError(f"dequantize_int4: shapes packed {tuple(packed.shape)}, scales {tuple(scales.shape)}, "
                         f"out {tuple(out.shape)} do not match (expected {pshape} and {sshape})")
    if in_ch == 0 or out_ch == 0:
        return out
    if _use_triton(backend, packed, out):
        _triton_dequant_int4(packed, scales, out)
        return out
    _nibbles_into(packed, out)
    out.sub_(8)
    _per_group(out, INT4_GROUP, lambda view, g0, g1: view.mul_(scales[:, g0:g1, None]))
    return out


# ---- int4g: asymmetric int4, a scale and a minimum per group -------------------------------------------------

def quantize_int4g(w: torch.Tensor, group: int = INT4G_GROUP
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w (out, in)`` float -> ``(packed: uint8 (out, ceil(in/2)), scales: bf16 (out, G), mins: bf16 (out, G))``
    with ``G = ceil(in / group)``: asymmetric per group of ``group`` input columns (the layout's is
    ``INT4G_GROUP``; another ``group`` is for measuring, not for packing). Nibble ``q`` in [0, 15] stands for
    ``q * scale + min``; low nibble = even column. A short last group is padded with copies of its last column, so
    padding never widens a group's range; a pad nibble is never read back."""
    _check_2d_float(w, "quantize_int4g")
    out_ch, in_ch = w.shape
    (_, n_bytes), (_, n_groups) = int4_shapes(out_ch, in_ch, group)
    packed = torch.empty((out_ch, n_bytes), dtype=torch.uint8, device=w.device)
    scales = torch.empty((out_ch, n_groups), dtype=torch.bfloat16, device=w.device)
    mins = torch.empty((out_ch, n_groups), dtype=torch.bfloat16, device=w.device)
    if in_ch == 0:
        return packed, scales, mins
    pad = n_groups * group - in_ch
    step = _rows_per_chunk(n_groups * group)
    for r0 in range(0, out_ch, step):
        x = w[r0:r0 + step].float()
        x = torch.cat([x, x[:, -1:].expand(-1, pad)], dim=1).view(x.shape[0], n_groups, group)  # (r, G, group)
        s, div, m = _int4g_scale_min(x.amin(dim=2), x.amax(dim=2), torch.finfo(w.dtype).max)
        scales[r0:r0 + step], mins[r0:r0 + step] = s, m
        u = torch.round((x - m.float()[:, :, None]) / div[:, :, None]).clamp_(0, 15).to(torch.uint8)
        u = u.view(u.shape[0], -1)[:, :2 * n_bytes]                                  # (r, 2*ceil(in/2))
        packed[r0:r0 + step] = u[:, 0::2] | (u[:, 1::2] << 4)
    return packed, scales, mins


def _toward_zero_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 rounded toward zero (the low 16 bits dropped: bf16 is the float32's top half), exact."""
    return (x.contiguous().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def _int4g_scale_min(lo: torch.Tensor, hi: torch.Tensor, wmax: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale: bf16, divisor: float32, min: bf16) of groups spanning [lo, hi] (float32).

    The minimum is the group's own, a float (not an integer zero point that would pull 0 onto the grid and leave
    up to half a step unused at an end: GGUF's Q4_1). Rounded to nearest bf16, except where that would pass the
    weight dtype's max ``wmax``, which takes it rounded toward zero, so the lowest level ``min`` stays finite; the
    scale ``hi/15 - min/15`` (not ``(hi - min)/15``, which overflows near the max) likewise, so the highest level
    ``min + 15 * scale`` stays finite, and capped so that ``15 * scale`` does. Nothing dequantizes to inf."""
    if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("quantize_int4g: the weight has inf or NaN values; they cannot be quantized")
    near = lo.to(torch.bfloat16)
    m = torch.where(near.float().abs() > wmax, _toward_zero_bf16(lo), near)
    m32 = m.float()
    # >= 0: m can round above a constant group's value. At most 2^124 (float32's max / 16), so that ``q * scale``
    # stays finite in float32: only a group spanning more than float32's max (weights of both signs near a
    # bf16/f32 max) is capped, its top values then clamping to finite levels.
    scale32 = (hi / 15 - m32 / 15).clamp_(min=0, max=2.0 ** 124)
    near_s = scale32.to(torch.bfloat16)
    scale = torch.where(m32.double() + 15 * near_s.double() > wmax, _toward_zero_bf16(scale32), near_s)
    div = scale.float()
    return scale, torch.where(div == 0, torch.ones_like(div), div), m


_DEQUANT_CHUNK_ELEMS = 1 << 20   # int4g's torch path: float32 rows of about this many elements at a time


def dequantize_int4g(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, out: torch.Tensor,
                     backend: Backend = "auto", group: int = INT4G_GROUP) -> torch.Tensor:
    """Write ``q * scale + min`` into ``out`` (``(out, in)``, bf16/f16/f32, unit column stride) in place.

    ``q * scale`` (an integer below 16 times a bf16) is exact in float32 and ``+ min`` rounds once there, then
    the sum is rounded to the output dtype: the Triton kernel computes the same in one pass (a fused multiply-add
    gives the same sum, the product being exact). The torch path needs the float32 sum before that last rounding,
    so a bf16/f16 output is filled in row chunks of a float32 temporary of ``_DEQUANT_CHUNK_ELEMS``.
    """
    out_ch, in_ch = out.shape if out.dim() == 2 else (-1, -1)
    pshape, sshape = int4_shapes(out_ch, in_ch, group)
    if (out.dim() != 2 or tuple(packed.shape) != pshape or tuple(scales.shape) != sshape
            or tuple(mins.shape) != sshape):
        raise ValueError(f"dequantize_int4g: shapes packed {tuple(packed.shape)}, scales {tuple(scales.shape)}, "
                         f"mins {tuple(mins.shape)}, out {tuple(out.shape)} do not match (expected {pshape} and "
                         f"{sshape})")
    if in_ch == 0 or out_ch == 0:
        return out
    if _use_triton(backend, packed, out):
        _triton_dequant_int4g(packed, scales, mins, out, group)
        return out
    step = max(1, _DEQUANT_CHUNK_ELEMS // in_ch)
    in_place = out.dtype == torch.float32      # a float32 output holds the sum itself
    for r0 in range(0, out_ch, step):
        rows = slice(r0, r0 + step)
        acc = out[rows] if in_place else out.new_empty(out[rows].shape, dtype=torch.float32)
        _nibbles_into(packed[rows], acc)
        _per_group(acc, group, lambda view, g0, g1, rows=rows: view.mul_(scales[rows, g0:g1, None]))
        _per_group(acc, group, lambda view, g0, g1, rows=rows: view.add_(mins[rows, g0:g1, None]))
        if not in_place:
            out[rows].copy_(acc)
    return out


def _nibbles_into(packed: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:, c]`` := nibble ``c`` of ``packed`` (0..15), computed exactly in ``out``'s float dtype: a byte
    ``p`` converts exactly, and ``p mod 16`` and ``floor(p / 16)`` are exact there too."""
    even = out[:, 0::2]                        # (out, ceil(in/2)): columns 0, 2, 4, ... take the low nibbles
    odd = out[:, 1::2]                         # (out, floor(in/2)): columns 1, 3, ... take the high nibbles
    odd.copy_(packed[:, :odd.shape[1]])        # the byte's value, exact in out's dtype
    odd.div_(16, rounding_mode="floor")        # high nibble
    even.copy_(packed)
    even.remainder_(16)                        # low nibble


def _per_group(out: torch.Tensor, group: int, op) -> None:
    """``op(view, g0, g1)`` on ``out`` seen as (out, groups g0..g1, group): the whole groups, then a short last
    one (its view has a group axis of length 1 holding the remaining columns)."""
    in_ch = out.shape[1]
    full = in_ch // group
    if full:
        op(out[:, :full * group].unflatten(1, (full, group)), 0, full)
    if in_ch % group:
        op(out[:, full * group:].unsqueeze(1), full, full + 1)


_QUANTIZE = {Storage.int8: quantize_int8, Storage.int4: quantize_int4, Storage.int4g: quantize_int4g}
_DEQUANTIZE = {Storage.int8: dequantize_int8, Storage.int4: dequantize_int4, Storage.int4g: dequantize_int4g}


# ---- errors ---------------------------------------------------------------------------------------------------

def relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` (Frobenius), computed in float64; 0 when both are zero, inf when only ref is."""
    r = ref.detach().to(torch.float64)
    d = torch.linalg.vector_norm(got.detach().to(torch.float64) - r).item()
    n = torch.linalg.vector_norm(r).item()
    if n == 0:
        return 0.0 if d == 0 else math.inf
    return d / n


# ---- pack / unpack --------------------------------------------------------------------------------------------

def _torch_dtype(ir: str) -> torch.dtype:
    try:
        return torch_dtypes()[ir]
    except KeyError:
        raise ValueError(f"weight dtype {ir!r} has no torch dtype; use one of {sorted(torch_dtypes())}") from None


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as a flat uint8 tensor (a view when ``t`` is contiguous)."""
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8)


def typed_view(flat: torch.Tensor, offset_bytes: int, dtype: torch.dtype, shape: list[int] | tuple[int, ...]
               ) -> torch.Tensor:
    """A tensor of ``dtype``/``shape`` aliasing ``flat`` (uint8) from ``offset_bytes``: no copy, no allocation."""
    n_bytes = math.prod(shape) * dtype.itemsize
    return flat[offset_bytes:offset_bytes + n_bytes].view(dtype).view(tuple(shape))


def _check_flat(buf: torch.Tensor, need: int, what: str) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"{what}: expected a flat uint8 tensor, got {buf.dtype} of shape {tuple(buf.shape)}")
    if buf.numel() < need:
        raise ValueError(f"{what}: {buf.numel()} bytes, the layout needs {need}")


def pack_block(block: Block, objects: dict[str, Object], tensors: dict[str, torch.Tensor], dst: torch.Tensor
               ) -> list[QuantEntry]:
    """Quantize/copy every weight of ``block`` into ``dst`` (flat uint8, CPU, pinned or CUDA) at the layout's
    offsets; the padding after each part is zeroed so the buffer's bytes are deterministic. Quantization runs on
    each tensor's device, then the parts are copied into ``dst``. Returns the layout."""
    layout = quant_layout(block, objects)
    total = quantized_block_bytes(block, objects)
    _check_flat(dst, total, f"pack_block({block.name})")
    for e in layout:
        t = tensors[e.name]
        if tuple(t.shape) != e.shape or t.dtype != _torch_dtype(e.dtype):
            raise ValueError(f"pack_block: {e.name} is {t.dtype} {tuple(t.shape)}, the plan says "
                             f"{e.dtype} {list(e.shape)}")
        if e.storage == Storage.raw:
            parts = [_bytes_of(t)]
        else:
            parts = [_bytes_of(x) for x in _QUANTIZE[e.storage](t)]
        for part, data in zip(e.parts(), parts):
            if data.numel() != part.size_bytes:   # the quantizer and the layout disagree: never write past a part
                raise ValueError(f"pack_block: {e.name} packs to {data.numel()} bytes, its layout part holds "
                                 f"{part.size_bytes}")
            dst[part.offset_bytes:part.offset_bytes + part.size_bytes].copy_(data)
            dst[part.offset_bytes + part.size_bytes:part.offset_bytes + align_up(part.size_bytes)].zero_()
    return layout


UnpackOp = tuple  # (storage, values view, (scales view[, mins view]) or None, output view): see prepare_unpack


def _entry_op(e: QuantEntry, src: torch.Tensor, out: torch.Tensor) -> UnpackOp:
    """Typed views of one entry's parts in ``src`` (the packed buffer) and its destination ``out``."""
    v = e.values
    if e.storage == Storage.raw:
        # raw bytes: src uint8 [n] -> out uint8 [n], copied byte for byte
        return (Storage.raw, src[v.offset_bytes:v.offset_bytes + v.size_bytes], None, out)
    s = e.scales
    if s is None:   # the plan's quant layout is validated on load; a quantized entry without scales is a bug here
        raise RuntimeFault(f"quantized entry of shape {e.shape} has no scales")
    out_ch, in_ch = e.shape
    if e.storage == Storage.int8:
        q = typed_view(src, v.offset_bytes, torch.int8, (out_ch, in_ch))             # int8 (out, in)
        scale = typed_view(src, s.offset_bytes, torch.bfloat16, (out_ch,))           # bf16 (out,)
        return (Storage.int8, q, (scale,), out)
    group = INT4_GROUP if e.storage == Storage.int4 else INT4G_GROUP
    pshape, sshape = int4_shapes(out_ch, in_ch, group)
    packed = typed_view(src, v.offset_bytes, torch.uint8, pshape)                    # uint8 (out, ceil(in/2))
    meta = (typed_view(src, s.offset_bytes, torch.bfloat16, sshape),)                # bf16 (out, ceil(in/group))
    if e.storage == Storage.int4g:
        meta += (typed_view(src, e.mins.offset_bytes, torch.bfloat16, sshape),)       # bf16 (out, ceil(in/32))
    return (e.storage, packed, meta, out)


def prepare_unpack(block: Block, objects: dict[str, Object], src: torch.Tensor, dst: torch.Tensor,
                   offsets: dict[str, int] | None = None) -> list[UnpackOp]:
    """The views ``unpack_block`` works on, built once: for each weight (in block order), its parts in ``src``
    (flat uint8, the packed buffer) and its output in ``dst`` (flat uint8 laid out like the unquantized block, or
    each weight at ``offsets[name]``: ``ir.layout.unpack_offsets``). The runtime builds them at attach for each
    (block, stream slot), so a visit's dequantization is only kernel launches (``run_unpack``); the views alias the
    arena and stay valid for its lifetime."""
    layout = quant_layout(block, objects)
    at = offsets or {e.name: e.dst_offset_bytes for e in layout}
    _check_flat(src, quantized_block_bytes(block, objects), f"unpack_block({block.name}) src")
    _check_flat(dst, max((at[e.name] + e.dst_size_bytes for e in layout), default=0),
                f"unpack_block({block.name}) dst")
    ops = []
    for e in layout:
        if e.storage == Storage.raw:
            out = dst[at[e.name]:at[e.name] + e.values.size_bytes]                  # uint8 [n]
        else:
            out = typed_view(dst, at[e.name], _torch_dtype(e.dtype), e.shape)       # weight dtype (out, in)
        ops.append(_entry_op(e, src, out))
    return ops


def run_unpack(ops: list[UnpackOp], backend: Backend = "auto") -> None:
    """Dequantize/copy every prepared entry; enqueued on the current stream (on CUDA no host synchronization)."""
    for storage, values, meta, out in ops:
        if storage == Storage.raw:
            out.copy_(values)
        else:
            _DEQUANTIZE[storage](values, *meta, out, backend)


def unpack_block(block: Block, objects: dict[str, Object], src: torch.Tensor, dst: torch.Tensor,
                 backend: Backend = "auto") -> None:
    """Dequantize ``src`` (the packed buffer, flat uint8) into ``dst`` (flat uint8 laid out like the unquantized
    block: weight ``w`` at ``objects[w].block_offset_bytes``); raw weights are copied byte for byte. Both on the
    same device; enqueued on the current stream (on CUDA nothing here synchronizes with the host)."""
    run_unpack(prepare_unpack(block, objects, src, dst), backend)


def unpack_weight(block: Block, objects: dict[str, Object], src: torch.Tensor, name: str, out: torch.Tensor,
                  backend: Backend = "auto") -> torch.Tensor:
    """Dequantize one weight ``name`` of ``block`` from ``src`` (the packed buffer) into ``out`` (a tensor of the
    weight's dtype and shape); returns ``out``."""
    e = next((e for e in quant_layout(block, objects) if e.name == name), None)
    if e is None:
        raise ValueError(f"unpack_weight: {name!r} is not a weight of block {block.name!r}")
    _check_flat(src, quantized_block_bytes(block, objects), f"unpack_weight({block.name}) src")
    if tuple(out.shape) != e.shape or out.dtype != _torch_dtype(e.dtype):
        raise ValueError(f"unpack_weight: out is {out.dtype} {tuple(out.shape)}, {name} is {e.dtype} {list(e.shape)}")
    if e.storage == Storage.raw and not out.is_contiguous():
        raise ValueError("unpack_weight: a raw weight needs a contiguous out")
    target = _bytes_of(out) if e.storage == Storage.raw else out   # raw: uint8 [n] view of out; else out itself
    run_unpack([_entry_op(e, src, target)], backend)
    return out


# ---- Triton (CUDA; on the CPU under Triton's interpreter) -----------------------------------------------------

@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # deferred: heavy, optional  # noqa: F401
        import triton.language  # deferred: heavy, optional  # noqa: F401
    except Exception:  # noqa: BLE001 -- any import failure means: use torch
        return False
    return True


def triton_interpreting() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1``): its kernels run on CPU tensors (the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _use_triton(backend: Backend, src: torch.Tensor, out: torch.Tensor) -> bool:
    if backend == "torch":
        return False
    on_device = (src.is_cuda and out.is_cuda) or (backend == "triton" and triton_interpreting())
    ok = (on_device and triton_available() and out.stride(1) == 1 and src.is_contiguous()
          and out.dtype in (torch.bfloat16, torch.float16, torch.float32))
    if backend == "triton" and not ok:
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1), triton importable, a "
                         "contiguous source and an output with unit column stride of dtype bf16/f16/f32")
    return ok


_TRITON_BLOCK = 1024   # output columns per program of the int8 kernel
# Output columns per program of the int4/int4g kernel, with 4 warps: H49 (H200, benchmarks/unpack.py) ran it at
# 2.5-2.9 TB/s of output on opt-30b's and llama-3-70b's layer shapes (1024 or 2048 columns, or 8 warps: 1.8-2.7;
# the former kernel of 1024 packed bytes a program and two strided stores: 1.5-1.7).
_TRITON_INT4_COLUMNS = 4096


@functools.lru_cache(maxsize=None)
def triton_kernels_module(interpreting: bool):
    """``memintent.runtime.quant_kernels``, compiled for CUDA or, ``interpreting``, for Triton's interpreter. Triton
    reads ``TRITON_INTERPRET`` when a kernel is defined, so each mode gets its own copy of that module, executed
    under the mode's name."""
    name = f"memintent.runtime._quant_kernels_{'interpreted' if interpreting else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).with_name("quant_kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _triton_kernels(interpreting: bool):
    """(triton, the int8 kernel, the int4/int4g kernel) of ``triton_kernels_module``."""
    import triton  # deferred: heavy, optional

    module = triton_kernels_module(interpreting)
    return triton, module.dq_int8, module.dq_int4_groups


def _triton_dequant_int8(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    triton, dq_int8, _ = _triton_kernels(triton_interpreting())
    out_ch, in_ch = out.shape
    if out_ch == 0 or in_ch == 0:
        return
    grid = (out_ch, triton.cdiv(in_ch, _TRITON_BLOCK))
    dq_int8[grid](q, scale.contiguous(), out, in_ch, q.stride(0), out.stride(0), BLOCK=_TRITON_BLOCK)


def _triton_dequant_nibbles(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None,
                            out: torch.Tensor, group: int) -> None:
    """int4 (``mins`` None: ``(q - 8) * scale``) or int4g (``q * scale + min``), one pass."""
    triton, _, dq_int4 = _triton_kernels(triton_interpreting())
    out_ch, in_ch = out.shape
    n_bytes, n_groups = packed.shape[1], scales.shape[1]
    half = group // 2
    if group % 2 or half & (half - 1):   # a byte's two columns share a group; a tile's side is a power of two
        raise RuntimeFault(f"the int4 kernel needs a group size of twice a power of two (32, 128), not {group}")
    scales = scales.contiguous()
    groups = max(1, _TRITON_INT4_COLUMNS // group)   # groups a program unpacks
    grid = (out_ch, triton.cdiv(n_groups, groups))
    dq_int4[grid](packed, scales, scales if mins is None else mins.contiguous(), out, in_ch, n_bytes, n_groups,
                  out.stride(0), GROUPS=groups, HALF_GROUP=group // 2, MINS=mins is not None, num_warps=4)


def _triton_dequant_int4(packed: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
    _triton_dequant_nibbles(packed, scales, None, out, INT4_GROUP)


def _triton_dequant_int4g(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, out: torch.Tensor,
                          group: int) -> None:
    _triton_dequant_nibbles(packed, scales, mins, out, group)
