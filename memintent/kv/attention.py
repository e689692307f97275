"""Attention over page tables: the one attention implementation of the serving engine, for presets and for
Hugging Face models (registered with transformers' attention interface as ``"memintent"``).

A step packs the new tokens of many sequences into one forward, ``(1, T)`` tokens. For each layer the model calls
``paged_attention(q, k, v, layer)`` with this layer's queries, keys and values of the T new tokens; it

1. writes the new keys and values into the pool at each token's (page, offset) (quantized per token and head
   under int8 KV), then
2. computes attention of every query over its own sequence's context, read back from the pool through the
   sequence's page table:
   - decode tokens (one query per sequence) in chunks of sequences: their pages are gathered into a padded
     ``(S, kv_heads, L, head_dim)`` tensor and attended with a key-padding mask in one call;
   - each prompt chunk on its own: its context gathered ``(1, kv_heads, ctx, head_dim)``, a causal mask offset by
     the tokens already in the cache.
   Grouped-query attention folds the query heads that share a KV head into the query-length dimension, so one
   kernel call serves a group without materializing repeated keys.

Why gather + SDPA rather than a kernel reading the pool in place: it is the same code on the CPU backend (which CI
tests) and on CUDA; its scratch is bounded by ``gather_tokens`` per call (the plan counts it); and a decode step of a
streamed plan spends its time on PCIe, not here (benchmarks/RESULTS.md has the measurement).

While the front end traces a step (``tracing(...)``), the call is the custom op ``memintent::paged_attention`` instead:
one node in the exported graph with the queries' shape, whose cost and scratch the front end takes from
``attention_cost``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from memintent.errors import MemintentError
from memintent.ir.model import PAGED_ATTENTION_OP, KVQuant
from memintent.kv.layout import PoolViews
from memintent.kv.paged_kernel import (
    MAX_PLANNED_SMS,
    MAX_SPLITS,
    MIN_SPLIT_KEYS,
    PagedMeta,
    buckets,
    decode_splits,
    paged_attention_varlen,
    prompt_block_m,
    write_kv_pages,
)

OP_NAME = PAGED_ATTENTION_OP
ENGINE_ATTENTION = "memintent"      # the name registered with transformers, and ModelRef.attention of a generation plan


@dataclass(slots=True)
class DecodeChunk:
    """Decode queries of ``S`` sequences attended together."""

    rows: torch.Tensor            # (S,) long: the queries' indices among the step's T tokens
    tables: torch.Tensor          # (S, nb) long: page tables, padded with the null page
    mask: torch.Tensor            # (S, 1, 1, nb * page_tokens) bool: True where a key position is in the context
    positions: torch.Tensor       # (S,) long: each query's position (for sliding windows)


@dataclass(slots=True)
class PrefillChunk:
    """``length`` consecutive prompt tokens of one sequence, starting at token ``start`` of the step."""

    start: int
    length: int
    context: int                  # tokens of the sequence in the cache once this chunk is written
    table: torch.Tensor           # (nb,) long: the sequence's pages
    mask: torch.Tensor            # (length, L) bool, L = the table's pages x page_tokens: causal, offset by the
                                  # tokens already cached, False on the padding past ``context``


@dataclass(slots=True)
class StepMeta:
    """Where a step's tokens go and what each one attends to (device tensors, built once per step). The kernel
    backend reads ``paged`` (one call per layer for every sequence, pages read in place); the reference backend
    reads ``decode`` and ``prefill`` (gather + SDPA)."""

    write_pages: torch.Tensor     # (T,) long: page of each token's key/value; -1: a padding token, written nowhere
    write_offsets: torch.Tensor   # (T,) long: its position inside the page
    decode: list[DecodeChunk] = field(default_factory=list)
    prefill: list[PrefillChunk] = field(default_factory=list)
    paged: PagedMeta | None = None


@dataclass(frozen=True, slots=True)
class AttentionWork:
    """What a step's attention costs, for the cost model: FLOPs and device-memory bytes per layer."""

    flops: int
    hbm_bytes: int


class _Context:
    def __init__(self, views: PoolViews | None, meta: StepMeta | None, dtype: torch.dtype):
        self.views, self.meta, self.dtype = views, meta, dtype


_ACTIVE: _Context | None = None
# While a step is traced: the (KV heads, head size) of each attention call's keys and values; None otherwise
_TRACED_KV: list[tuple[int, int]] | None = None


@contextlib.contextmanager
def step(views: PoolViews, meta: StepMeta, dtype: torch.dtype) -> Iterator[None]:
    """Run the model's forward for one engine step: attention reads and writes ``views`` as ``meta`` says."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, _Context(views, meta, dtype)
    try:
        yield
    finally:
        _ACTIVE = prev


@contextlib.contextmanager
def tracing() -> Iterator[list[tuple[int, int]]]:
    """Trace a step: ``paged_attention`` becomes the custom op (no pool, no metadata: shapes only). Yields the
    (KV heads, head size) of every call's keys and of its values, which the KV pool's layout must match."""
    global _TRACED_KV
    prev, _TRACED_KV = _TRACED_KV, []
    try:
        yield _TRACED_KV
    finally:
        _TRACED_KV = prev


def active() -> bool:
    return _TRACED_KV is not None or _ACTIVE is not None


def kernel_step() -> bool:
    """Whether an engine step is running on the kernel backend (its attention metadata built for the Triton kernel):
    the model then runs its other fused kernels too (``models.norm_kernel``); tracing and the reference run eager."""
    return _ACTIVE is not None and _ACTIVE.meta is not None and _ACTIVE.meta.paged is not None


@torch.library.custom_op("memintent::paged_attention", mutates_args=())
def _paged_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float, softcap: float,
              window: int) -> torch.Tensor:
    # Only ever traced (on meta): the engine calls the implementation below directly.
    raise MemintentError("memintent::paged_attention runs only inside an engine step")


@_paged_op.register_fake
def _paged_fake(q, k, v, layer, scale, softcap, window):
    return torch.empty_like(q)   # (1, H, T, hd)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, *, scale: float | None = None,
                    softcap: float | None = None, window: int | None = None) -> torch.Tensor:
    """q (1, H, T, hd), k and v (1, KV, T, hd) of the step's new tokens -> (1, H, T, hd)."""
    if _TRACED_KV is not None:
        _TRACED_KV.extend([(int(k.shape[1]), int(k.shape[3])), (int(v.shape[1]), int(v.shape[3]))])
        return torch.ops.memintent.paged_attention(q, k, v, layer, scale or 0.0, softcap or 0.0, window or 0)
    ctx = _ACTIVE
    if ctx is None:
        raise MemintentError("paged attention outside an engine step: run the model through memintent's engine")
    scale = scale or q.shape[-1] ** -0.5
    if ctx.meta.paged is not None:
        return _paged_kernel(ctx, layer, q, k, v, scale, softcap, window)
    write_kv(ctx, layer, k[0].transpose(0, 1), v[0].transpose(0, 1))     # (T, KV, hd) each
    out = torch.empty_like(q)                                             # (1, H, T, hd)
    for chunk in ctx.meta.decode:
        out[0, :, chunk.rows] = _decode(ctx, layer, q[0, :, chunk.rows], chunk, scale, softcap, window)
    for chunk in ctx.meta.prefill:
        rows = slice(chunk.start, chunk.start + chunk.length)
        out[0, :, rows] = _prefill(ctx, layer, q[0, :, rows], chunk, scale, softcap, window)
    return out


def _paged_kernel(ctx: _Context, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  softcap: float | None, window: int | None) -> torch.Tensor:
    """The kernel backend (``kv.paged_kernel``): one launch writes the step's keys and values, one call attends
    every query over its own sequence's pages in place. q (1, H, T, hd) -> (1, H, T, hd), a view of (T, H, hd)."""
    views, m = ctx.views, ctx.meta
    i = layer - views.layer_offset
    ks = views.key_scales[i] if views.key_scales is not None else None
    vs = views.value_scales[i] if views.value_scales is not None else None
    write_kv_pages(k[0].transpose(0, 1), v[0].transpose(0, 1), views.keys[i], views.values[i], ks, vs,
                   m.write_pages, m.write_offsets)                       # (T, KV, hd) each
    out = paged_attention_varlen(q[0].transpose(0, 1), views.keys[i], views.values[i], ks, vs, m.paged,
                                 scale=scale, softcap=softcap, window=window)   # (T, H, hd)
    return out.transpose(0, 1)[None]                                      # (1, H, T, hd)


# ---- the pool -------------------------------------------------------------------------------------------------

def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., hd) float -> int8 values (..., hd) and float32 scales (...): symmetric, one scale per token and head."""
    xf = x.float()
    scale = xf.abs().amax(-1) / 127.0                                     # (...)
    q = torch.round(xf / torch.where(scale == 0, 1.0, scale)[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_kv(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 values (..., hd) times their scales (...) in ``dtype``: an int8 value is exact in bf16, so the result
    differs from the float32 product by the rounding of the scale and of the product (half a unit of the dtype's
    last place each), and it moves 2 + 2 bytes per value instead of 4 + 4 + 2."""
    return values.to(dtype) * scales.to(dtype)[..., None]


def write_kv(ctx: _Context, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
    """Store the step's new keys and values, k and v (T, KV, hd), at their (page, offset)."""
    views, m = ctx.views, ctx.meta
    layer -= views.layer_offset
    idx = (m.write_pages, m.write_offsets)
    if views.key_scales is None:
        views.keys[layer].index_put_(idx, k.to(views.keys[layer].dtype))
        views.values[layer].index_put_(idx, v.to(views.values[layer].dtype))
        return
    for x, vals, scales in ((k, views.keys[layer], views.key_scales[layer]),
                            (v, views.values[layer], views.value_scales[layer])):
        q, s = quantize_kv(x)
        vals.index_put_(idx, q)
        scales.index_put_(idx, s)


def _gather(ctx: _Context, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of the pages in ``tables`` (..., nb) -> (..., nb * page_tokens, KV, hd) each, in the
    model dtype (int8 KV is dequantized here)."""
    views = ctx.views
    layer -= views.layer_offset
    out = []
    for vals, scales in ((views.keys, views.key_scales), (views.values, views.value_scales)):
        x = vals[layer][tables]                                           # (..., nb, bt, KV, hd)
        if scales is not None:
            x = dequantize_kv(x, scales[layer][tables], ctx.dtype)
        out.append(x.flatten(-4, -3))                                     # (..., nb * bt, KV, hd)
    return out[0], out[1]


# ---- the two shapes of attention --------------------------------------------------------------------------------

def _fold(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q (B, H, Q, hd) -> (B, KV, G * Q, hd): the G = H / KV query heads of each KV head as extra query rows (the
    Hugging Face head order: KV head i serves query heads i*G .. i*G+G-1)."""
    b, h, n, d = q.shape
    return q.reshape(b, kv_heads, (h // kv_heads) * n, d)


def _unfold(o: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, KV, G * Q, hd) -> (B, H, Q, hd)."""
    b, kvh, gn, d = o.shape
    return o.reshape(b, heads, gn * kvh // heads, d)


def _window_mask(mask: torch.Tensor, q_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Also hide keys more than ``window`` positions behind their query: mask (..., Q, L), q_pos (..., Q)."""
    if not window:
        return mask
    k_pos = torch.arange(mask.shape[-1], device=mask.device)              # (L,)
    return mask & (k_pos > q_pos[..., None] - window)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: float | None) -> torch.Tensor:
    """q (B, KV, Q, hd) over k, v (B, KV, L, hd) where ``mask`` (B or 1, 1, Q, L) is True -> (B, KV, Q, hd)."""
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # Logit soft-capping (Gemma 2) has no SDPA kernel: the scores are computed here, in float32.
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale        # (B, KV, Q, L)
    s = torch.tanh(s / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)


def _decode(ctx: _Context, layer: int, q: torch.Tensor, c: DecodeChunk, scale: float, softcap: float | None,
            window: int | None) -> torch.Tensor:
    """q (H, S, hd) of S decode tokens -> (H, S, hd)."""
    k, v = _gather(ctx, layer, c.tables)                                  # (S, L, KV, hd) each
    kvh, heads = k.shape[-2], q.shape[0]
    k, v = k.transpose(1, 2), v.transpose(1, 2)                           # (S, KV, L, hd)
    qs = _fold(q.transpose(0, 1).unsqueeze(2), kvh)                        # (S, KV, G, hd)
    mask = c.mask
    if window:
        mask = _window_mask(mask, c.positions[:, None, None], window)      # (S, 1, 1, L)
    o = attend(qs, k, v, mask, scale, softcap)                            # (S, KV, G, hd)
    return _unfold(o, heads).squeeze(2).transpose(0, 1)                   # (H, S, hd)


def _prefill(ctx: _Context, layer: int, q: torch.Tensor, c: PrefillChunk, scale: float, softcap: float | None,
             window: int | None) -> torch.Tensor:
    """q (H, n, hd) of one prompt chunk -> (H, n, hd). The keys keep their padded length (whole pages: a multiple of
    the page size, which the fused SDPA kernels want) with the padding masked; each KV head is repeated for its
    query heads, so the mask (n, L) broadcasts over heads instead of being repeated for them."""
    k, v = _gather(ctx, layer, c.table)                                   # (L, KV, hd) each, L = nb * bt
    kvh, heads, n = k.shape[1], q.shape[0], q.shape[1]
    k = k.transpose(0, 1).repeat_interleave(heads // kvh, 0)[None]        # (1, H, L, hd)
    v = v.transpose(0, 1).repeat_interleave(heads // kvh, 0)[None]
    mask = c.mask                                                         # (n, L): causal from the cached prefix
    if window:
        q_pos = torch.arange(c.context - n, c.context, device=mask.device)  # (n,)
        mask = _window_mask(mask, q_pos, window)
    return attend(q[None], k, v, mask[None, None], scale, softcap)[0]     # (H, n, hd)


# ---- what it costs --------------------------------------------------------------------------------------------

def attention_work(*, heads: int, head_dim: int, decode_context_tokens: int, prefill_context_tokens: int,
                   prefill_pairs: int, kv_token_bytes: int, kv_heads: int | None = None,
                   kernel: bool = True) -> AttentionWork:
    """One layer's attention in a step: the decode queries read ``decode_context_tokens`` keys (the sum of their
    contexts), the prompt chunks read ``prefill_context_tokens`` and score ``prefill_pairs`` (query, key) pairs;
    ``kv_token_bytes``: one token's keys and values of one layer as stored. QK^T and PV are 2 multiply-adds each
    per (query head, key) pair.

    Bytes moved: the kernel (``kernel``, ``kv.paged_kernel``) reads each decode query's keys and values once in
    place, and each prompt tile (``prompt_block_m`` queries) its keys once, so a prompt chunk reads about
    ``prefill_pairs / prompt_block_m`` keys; the reference backend gathers the stored keys and values once and writes
    them in the model dtype, which SDPA reads again (three times the bytes)."""
    flops = 4 * heads * head_dim * (decode_context_tokens + prefill_pairs)
    if kernel:
        block_m = prompt_block_m(heads // (kv_heads or heads))
        hbm = kv_token_bytes * (decode_context_tokens + -(-prefill_pairs // block_m))
    else:
        hbm = 3 * kv_token_bytes * (decode_context_tokens + prefill_context_tokens)
    return AttentionWork(flops=flops, hbm_bytes=hbm)


def kernel_scratch_bytes(*, heads: int, head_dim: int, kv_heads: int, max_seqs: int) -> int:
    """The kernel's own scratch in one call: the partial outputs (float32, with their max and sum) of decode tiles
    whose keys are split over several programs (``decode_splits``), at the worst padded tile count of a step of
    up to ``max_seqs`` sequences, on a card of up to ``MAX_PLANNED_SMS`` and keys long enough for every split.
    Splits shrink as tiles grow (they fill the SMs), so this is a few MiB, not ``MAX_SPLITS`` x the largest
    bucket. Keys and values are written and read in place: nothing else."""
    hd = max(16, 1 << (head_dim - 1).bit_length())
    split = [(decode_splits(tiles, kv_heads, MAX_SPLITS * MIN_SPLIT_KEYS, MAX_PLANNED_SMS), tiles)
             for tiles in buckets(max_seqs)]
    return max((s * tiles for s, tiles in split if s > 1), default=0) * heads * (hd + 2) * 4


@dataclass(frozen=True, slots=True)
class Scratch:
    """What one layer's attention holds beyond its output, at most, for a plan's shapes: the reference backend's
    decode chunk (``decode_bytes``) and prompt chunk (``prompt_bytes``), which run one after the other, and the
    kernel's split outputs (``kernel_bytes``). One rule for the plan's count (``bytes``) and the runner's decode
    chunks (``gather_tokens``)."""

    kv_heads: int
    head_dim: int
    heads: int
    value_bytes: int              # the model dtype's bytes
    quantized: bool               # int8 KV
    step_tokens: int
    max_seqs: int
    context: int
    page_tokens: int
    capacity_tokens: int          # the pool's positions, the null page left out

    @property
    def _per_position(self) -> int:
        """Bytes a gathered key position holds: keys and values in the model dtype (and any copy SDPA makes), under
        int8 KV also the int8 gather and the dequantization's temporaries."""
        e = self.value_bytes
        return self.kv_heads * self.head_dim * (2 * e + 5 if self.quantized else 4 * e)

    @property
    def _whole(self) -> int:
        """One sequence of the plan's context, padded to whole pages."""
        return -(-self.context // self.page_tokens) * self.page_tokens

    def decode_bytes(self, gather_tokens: int) -> int:
        """A decode chunk of ``gather_tokens`` padded positions (and its mask), folding the queries of up to
        ``max_seqs`` sequences and holding its output."""
        folded = 2 * self.max_seqs * self.heads * self.head_dim * self.value_bytes
        return gather_tokens * (self._per_position + 1) + folded

    @property
    def prompt_bytes(self) -> int:
        """A prompt chunk: one sequence's context gathered, its keys and values repeated for every query head, the
        queries' output and the float mask SDPA makes of the boolean one (``step_tokens`` tokens over the context)."""
        whole, e = self.context + 16, self.value_bytes
        return (whole * self._per_position + 2 * whole * self.heads * self.head_dim * e + 4 * self.step_tokens * whole
                + 2 * self.step_tokens * self.heads * self.head_dim * e)

    @property
    def kernel_bytes(self) -> int:
        return kernel_scratch_bytes(heads=self.heads, head_dim=self.head_dim, kv_heads=self.kv_heads,
                                    max_seqs=self.max_seqs)

    def gather_tokens(self, kernel: bool) -> int:
        """Padded positions one decode chunk of the reference backend may gather, never less than one sequence.
        A plan for the reference backend (``kernel`` False) lets it gather half the pool: decode sequences are
        chunked shortest first, so a full pool's decodes take about two chunks per layer. A plan for the kernel
        reads the pool in place and holds only what a prompt chunk needs; the reference backend, where it runs such
        a plan (the CPU, ``--attention reference``), gathers in chunks within that."""
        if kernel:
            room = max(self.prompt_bytes, self.kernel_bytes) - self.decode_bytes(0)
            want = room // (self._per_position + 1)
        else:
            want = -(-self.capacity_tokens // 2)
        return min(self.capacity_tokens, max(self._whole, want))

    def bytes(self, kernel: bool) -> int:
        """The plan's scratch per attention op: it holds for either backend (the CPU runs the reference, CUDA the
        kernel)."""
        return max(self.decode_bytes(self.gather_tokens(kernel)), self.prompt_bytes, self.kernel_bytes)


def scratch_of(pool, dtype: torch.dtype, heads: int, *, context: int, step_tokens: int, max_seqs: int) -> Scratch:
    """The attention scratch of a plan with ``pool`` (an ``ir.KVPool``) and these shapes."""
    return Scratch(kv_heads=pool.kv_heads, head_dim=pool.head_dim, heads=heads, value_bytes=dtype.itemsize,
                   quantized=pool.quant == KVQuant.int8, step_tokens=step_tokens, max_seqs=max_seqs,
                   context=context, page_tokens=pool.page_tokens,
                   capacity_tokens=(pool.num_pages - 1) * pool.page_tokens)


def metadata_bytes(*, step_tokens: int, max_seqs: int, context: int, page_tokens: int, num_pages: int) -> int:
    """Device memory of a step's attention metadata (``StepMeta`` and the token ids, positions and logit rows), held
    for the whole step: at most ``step_tokens`` tokens of ``max_seqs`` sequences, none longer than ``context``."""
    pages = -(-context // page_tokens)
    ints = 8 * (4 * step_tokens + max_seqs)                    # ids, positions, write pages and offsets, rows
    decode = 8 * max_seqs * pages + max_seqs * pages * page_tokens + 24 * max_seqs   # tables, masks, indices
    prompt = step_tokens * context + 8 * step_tokens + 8 * num_pages                  # masks, positions, tables
    return ints + decode + prompt


def plan_decode_chunks(contexts: list[int], page_tokens: int, gather_tokens: int) -> list[list[int]]:
    """Split decode sequences (their context lengths, in step order) into chunks whose padded gather,
    len(chunk) * max pages * page_tokens, stays within ``gather_tokens``: the attention scratch the plan
    proves. Order is kept, so the split is a function of the step alone."""
    chunks: list[list[int]] = []
    cur: list[int] = []
    widest = 0
    for i, n in enumerate(contexts):
        w = math.ceil(n / page_tokens) * page_tokens
        if w > gather_tokens:
            raise MemintentError(f"a sequence of {n} tokens exceeds the attention gather of {gather_tokens} tokens "
                                 "the plan proves")
        if cur and (len(cur) + 1) * max(widest, w) > gather_tokens:
            chunks.append(cur)
            cur, widest = [], 0
        cur.append(i)
        widest = max(widest, w)
    if cur:
        chunks.append(cur)
    return chunks


def register_hf_attention() -> str:
    """Register ``"memintent"`` with transformers' attention interface (idempotent); returns the name to build a
    model with (``attn_implementation=...``)."""
    from transformers import AttentionInterface  # deferred: heavy, optional

    AttentionInterface.register(ENGINE_ATTENTION, hf_attention)
    return ENGINE_ATTENTION


def hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """transformers' attention-function signature: query (B, H, T, hd), key and value (B, KV, T, hd) after the
    model's rotary embedding; returns (B, T, H, hd) and no weights. The mask transformers would build is not used
    (for an implementation it has no mask function for, it builds none): the engine's page tables say what each
    query sees, and the window comes from the arguments. A sliding layer is one the model passes a
    ``sliding_window`` for; a model that passes no such argument at all has its window on the attention module
    (Qwen2-MoE's sliding layers: its mask applies ``module.sliding_window``, the call does not carry it)."""
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise MemintentError(f"{type(module).__name__} passes attention sinks, which the serving engine's attention "
                             "does not compute: generation plans cannot serve this model")
    if getattr(module, "layer_idx", None) is None:
        raise MemintentError(f"{type(module).__name__} has no layer index (one attention module shared by several "
                             "layers), so its keys and values have no layer of the KV pool to go to: generation plans "
                             "cannot serve this model")
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else getattr(module, "sliding_window", None)
    out = paged_attention(query, key, value, module.layer_idx, scale=scaling, softcap=softcap,
                          window=window)                                  # (1, H, T, hd)
    return out.transpose(1, 2), None
