"""Where bytes sit in a block's buffers: the front end's block layout and the packed (quantized) block layout.

Pure arithmetic over the IR (no torch): the compiler sizes copies and stream slots with it, the runtime packs and
unpacks with it, so both agree by construction.

Block layout (``weight_offsets``): a block's weights in order, each at the next ``ALIGN_BYTES`` boundary; the
block's ``size_bytes`` is the end of the last one, rounded up. ``Object.block_offset_bytes`` holds the offsets.

Packed layout (``quant_layout``): a block whose ``Block.quant`` is ``int8``, ``int4`` or ``int4g`` lives on the
host as one flat buffer holding, for each weight in the block's order, either the weight as it is (``raw``) or its
quantized values followed by its scales (and, ``int4g``, its minimums), each part on an ``ALIGN_BYTES`` boundary (the formats are described in
``memintent.runtime.quant``). In a block with ``quant != none`` every weight with a 2-D shape, both dimensions
non-zero and a floating dtype in ``QUANTIZABLE_DTYPES`` is quantized; everything else (norms, biases, integer
buffers, 0-D/3-D tensors) is stored raw. A block with ``quant == none`` has raw parts only, which is the block
layout itself.

Unpack layout (``unpack_offsets``): where a quantized visit's weights sit once dequantized in the plan's unpack
slot. A block unpacks whole, in its block layout, unless each weight it quantizes is read by one linear step of its
own module alone (``weight_unpackers``): then it unpacks one weight at a time, right before that module runs, and
those weights share one region after the block's raw weights (norms, biases), sized for the largest. A 70B decoder
layer then needs 0.44 GiB of unpack slot instead of 1.59.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass
from typing import Iterable

from memintent.ir.dtypes import dtype_bytes
from memintent.ir.model import (
    ALIGN_BYTES,
    Block,
    Object,
    ObjectKind,
    Program,
    Quant,
    align_up,
)

INT4_GROUP = 128          # input columns per int4 scale
INT4G_GROUP = 32          # input columns per int4g scale and minimum (chosen over 64 by perplexity: spec/runtime.md)
PART_ALIGN_BYTES = ALIGN_BYTES    # every part of a packed block starts on this boundary
QUANTIZABLE_DTYPES = ("bf16", "f16", "f32")
SCALE_BYTES = 2           # scales are bf16
# Rows of x one program of the mapped linear kernel multiplies (``runtime.mapped``): a forward of more rows reads the
# weights over the host link once per this many (the cost model charges it).
MAPPED_LINEAR_ROWS = 256
MIN_BYTES = 2             # int4g minimums are bf16 (a float offset: the group's own minimum, not a rounded level)


def weight_offsets(sizes_bytes: Iterable[int]) -> tuple[list[int], int]:
    """The block layout of weights of ``sizes_bytes`` (in block order): (offset of each, block size in bytes)."""
    offsets, end = [], 0
    for size in sizes_bytes:
        offsets.append(end)
        end += align_up(size)
    return offsets, end


def int4_shapes(out_ch: int, in_ch: int, group: int = INT4_GROUP) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of the packed values and of the scales of an ``(out, in)`` weight quantized to int4 in groups of
    ``group`` input columns (int4g's minimums have the scales' shape)."""
    return (out_ch, -(-in_ch // 2)), (out_ch, -(-in_ch // group))


class Storage(str, enum.Enum):
    raw = "raw"     # the weight's own bytes
    int8 = "int8"
    int4 = "int4"
    int4g = "int4g"


@dataclass(frozen=True)
class Part:
    offset_bytes: int   # inside the packed block buffer; a multiple of PART_ALIGN_BYTES
    size_bytes: int     # payload bytes (the aligned footprint is align_up(size_bytes))


@dataclass(frozen=True)
class QuantEntry:
    """How one weight of a block is stored in the block's packed buffer."""

    name: str
    storage: Storage
    dtype: str                    # the weight's IR dtype (what it dequantizes to)
    shape: tuple[int, ...]
    dst_offset_bytes: int         # where it goes in the unquantized block layout (Object.block_offset_bytes)
    dst_size_bytes: int           # Object.size_bytes
    values: Part                  # raw: the weight's bytes; int8: int8 (out, in); int4/int4g: uint8 (out, ceil(in/2))
    scales: Part | None = None    # int8: bf16 (out,); int4: bf16 (out, ceil(in/128)); int4g: bf16 (out, ceil(in/32))
    mins: Part | None = None      # int4g: bf16 (out, ceil(in/32)); otherwise None

    def parts(self) -> list[Part]:
        return [p for p in (self.values, self.scales, self.mins) if p is not None]


def weight_storage(quant: Quant, obj: Object) -> Storage:
    """How ``obj`` is stored in a block quantized as ``quant``."""
    if quant == Quant.none or len(obj.shape) != 2 or obj.dtype not in QUANTIZABLE_DTYPES or 0 in obj.shape:
        return Storage.raw
    return Storage(quant.value)


def _part_sizes(storage: Storage, obj: Object) -> tuple[int, int | None, int | None]:
    """(values bytes, scales bytes or None, minimums bytes or None) of ``obj`` stored as ``storage``."""
    if storage == Storage.raw:
        return obj.size_bytes, None, None
    return quantized_part_sizes(storage, *obj.shape)


def quantized_part_sizes(storage: Storage, out_ch: int, in_ch: int) -> tuple[int, int, int | None]:
    """(values, scales, minimums or None) bytes of an ``(out, in)`` weight stored as int8/int4/int4g."""
    if storage == Storage.int8:
        return out_ch * in_ch, out_ch * SCALE_BYTES, None            # int8 (out, in); bf16 (out,)
    if storage == Storage.int4:
        (_, nb), (_, ng) = int4_shapes(out_ch, in_ch)
        return out_ch * nb, out_ch * ng * SCALE_BYTES, None          # uint8 (out, ceil(in/2)); bf16 (out, groups)
    (_, nb), (_, ng) = int4_shapes(out_ch, in_ch, INT4G_GROUP)       # uint8 values; bf16 scales; bf16 minimums
    return out_ch * nb, out_ch * ng * SCALE_BYTES, out_ch * ng * MIN_BYTES


def bytes_per_weight(quant: Quant, in_ch: int) -> float:
    """Bytes one weight of a quantized ``(out, in_ch)`` matrix costs in the packed layout (values and its share of
    the scales and minimums, without the 256-byte part padding): int8 ``1 + 2/in``, int4 ``0.5 + 2/128``
    (4.125 bits), int4g ``0.5 + 4/32`` (5 bits) for ``in`` a multiple of the group."""
    return sum(x or 0 for x in quantized_part_sizes(Storage(quant.value), 1, in_ch)) / in_ch


def quant_layout(block: Block, objects: dict[str, Object]) -> list[QuantEntry]:
    """The packed layout of ``block``: one entry per weight, in ``block.weights`` order, parts at consecutive
    256-byte-aligned offsets (values then scales). Shared by the compiler (sizes) and the runtime (pack/unpack)."""
    entries = []
    off = 0
    for name in block.weights:
        o = objects[name]
        storage = weight_storage(block.quant, o)
        parts = []
        for size in _part_sizes(storage, o):   # values, then scales, then minimums, each 256-aligned
            parts.append(None if size is None else Part(off, size))
            off += 0 if size is None else align_up(size)
        entries.append(QuantEntry(name=name, storage=storage, dtype=o.dtype, shape=tuple(o.shape),
                                  dst_offset_bytes=o.block_offset_bytes or 0, dst_size_bytes=o.size_bytes,
                                  values=parts[0], scales=parts[1], mins=parts[2]))
    return entries


def quantized_payload_bytes(block: Block, objects: dict[str, Object]) -> int:
    """Sum of the parts' sizes of ``block``'s packed layout, without alignment padding."""
    return sum(p.size_bytes for e in quant_layout(block, objects) for p in e.parts())


def quantized_block_bytes(block: Block, objects: dict[str, Object]) -> int:
    """Bytes of ``block``'s packed buffer (what a visit copies): the sum of its parts, each rounded up to 256.

    This is ``memintent.passes.costs.transfer_bytes`` of a quantized block (costs calls this function), so the
    planner's copy sizes and stream-slot sizes are exactly what the runtime copies. Properties:

    * ``quant == none``: the layout is the weights at consecutive 256-aligned offsets, i.e. the front end's block
      layout, so the result is ``block.size_bytes`` for blocks built by the front end.
    * Always a multiple of ``PART_ALIGN_BYTES`` and ``payload <= quantized_block_bytes < payload + 256 *
      number_of_parts`` (``quantized_payload_bytes``; a raw weight has one part, a quantized one two: values and
      scales; int4g three: values, scales and minimums). The payload counts int4 rows padded to whole bytes (``out * ceil(in / 2)``), and 2-D weights that
      are not quantized (integer/bool/f64 dtype, a zero dimension) at their raw size.
    """
    total = 0
    for e in quant_layout(block, objects):
        for p in e.parts():
            total = max(total, p.offset_bytes + align_up(p.size_bytes))
    return total


# ---- unpack layout (module docstring) ---------------------------------------------------------------------------
UNPACK_BY_WEIGHT_OPS = ("aten.linear.default",)   # steps whose module's pre-hook may unpack the weight they read


def _quantizable(o: Object) -> bool:
    """Whether a block quantized at any bit width quantizes ``o`` (int8, int4 and int4g take the same weights)."""
    return weight_storage(Quant.int8, o) != Storage.raw


def weight_unpackers(program: Program) -> dict[str, dict[str, str]]:
    """{block: {weight: module whose forward pre-hook unpacks it}} for every block that can unpack one weight at a
    time: it has weights to quantize, and each is read by exactly one step, an ``UNPACK_BY_WEIGHT_OPS`` step of
    the module that owns the weight (``<module>.<name>``), with no two of those modules equal or nested (each
    hook then runs right before its weight's only read, and after the previous one's read is enqueued)."""
    objects = program.object_map()
    readers: dict[str, list[tuple[str, str]]] = {}      # weight -> [(op, module)] of the steps that read it
    for st in program.steps:
        for u in st.uses:
            o = objects.get(u)
            if o is not None and o.kind == ObjectKind.weight:
                readers.setdefault(u, []).append((st.op, st.module))
    out = {}
    for b in program.blocks:
        hooks = _unpackers(b, objects, readers)
        if hooks:
            out[b.name] = hooks
    return out


def _unpackers(block: Block, objects: dict[str, Object], readers: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    hooks = {}
    for w in block.weights:
        if not _quantizable(objects[w]):
            continue
        uses = readers.get(w, [])
        if len(uses) != 1 or uses[0][0] not in UNPACK_BY_WEIGHT_OPS or w.rpartition(".")[0] != uses[0][1]:
            return {}
        hooks[w] = uses[0][1]
    mods = sorted(hooks.values())
    if any(m == n or n.startswith(m + ".") for m, n in itertools.pairwise(mods)):
        return {}       # sorted, a module's descendants follow it directly: neighbours show any nesting
    return hooks


def unpack_offsets(block: Block, objects: dict[str, Object], by_weight: bool) -> tuple[dict[str, int], int]:
    """({weight: offset}, bytes) of ``block``'s unpacked weights in the unpack slot: its block layout
    (``block_offset_bytes``, ``size_bytes``), or ``by_weight`` its raw weights at consecutive aligned offsets and
    every weight it quantizes at one offset after them."""
    if not by_weight:
        return {w: objects[w].block_offset_bytes or 0 for w in block.weights}, align_up(block.size_bytes)
    raw = [w for w in block.weights if not _quantizable(objects[w])]
    offsets, shared = weight_offsets(objects[w].size_bytes for w in raw)
    out = dict(zip(raw, offsets))
    largest = max((objects[w].size_bytes for w in block.weights if w not in out), default=0)
    out.update({w: shared for w in block.weights if w not in out})
    return out, shared + align_up(largest)


# ---- KV pool pages (spec/serving.md) --------------------------------------------------------------------------

KV_SCALE_BYTES = 4        # int8 KV: one float32 scale per token and KV head


def kv_page_parts(layers: int, kv_heads: int, head_dim: int, page_tokens: int, value_dtype: str,
                   quantized: bool) -> tuple[int, int]:
    """(values bytes, scales bytes) of one KV pool block: values (layers, 2, page_tokens, kv_heads, head_dim) in
    ``value_dtype`` (int8 under KV quantization), then, quantized, scales (layers, 2, page_tokens, kv_heads)."""

    n = layers * 2 * page_tokens * kv_heads
    values = dtype_bytes("i8" if quantized else value_dtype, n * head_dim)
    return values, (n * KV_SCALE_BYTES if quantized else 0)
