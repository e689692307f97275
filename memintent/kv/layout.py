"""The paged KV cache's device side: the byte layout of a page and typed views over the pool's bytes.

Layout (spec/serving.md). The plan's KV slot is ``num_pages`` pages of ``page_bytes`` each, laid end to end. One
page holds ``page_tokens`` tokens of keys and values for *every* layer, so a sequence has one page table for the
whole model and a swapped page moves in one contiguous copy:

    page p: values  [layer][k|v][token][kv_head][head_dim]   (model dtype, or int8 under KV quantization)
            scales  [layer][k|v][token][kv_head]             (float32; int8 only: one per token and head)

Page 0 is the *null page*: it is never handed out, stays zero, and pads page tables, so that attention over a
padded table reads zeros, never another sequence's (or a freed, poisoned) page.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memintent.errors import MemintentError
from memintent.ir.dtypes import ir_dtype_of
from memintent.ir.layout import kv_page_parts
from memintent.ir.model import KVPool, KVQuant

NULL_PAGE = 0
SCALE_DTYPE = torch.float32      # int8 KV: one float32 scale per token and KV head (spec/serving.md)


@dataclass(frozen=True, slots=True)
class PageLayout:
    """Byte layout of one page, from the plan's ``KVPool``."""

    layers: int
    kv_heads: int
    head_dim: int
    page_tokens: int
    value_dtype: torch.dtype      # model dtype, or int8
    quantized: bool

    def _parts(self) -> tuple[int, int]:
        return kv_page_parts(self.layers, self.kv_heads, self.head_dim, self.page_tokens,
                              ir_dtype_of(self.value_dtype), self.quantized)

    @property
    def value_bytes(self) -> int:
        """Bytes of the values part of a page: (layers, 2, tokens, kv_heads, head_dim) elements."""
        return self._parts()[0]

    @property
    def scale_bytes(self) -> int:
        """Bytes of the scales part (int8 only): (layers, 2, tokens, kv_heads) float32."""
        return self._parts()[1]

    @property
    def page_bytes(self) -> int:
        return self.value_bytes + self.scale_bytes


def layout_of(pool: KVPool, model_dtype: torch.dtype) -> PageLayout:
    quantized = pool.quant == KVQuant.int8
    return PageLayout(layers=pool.layers, kv_heads=pool.kv_heads, head_dim=pool.head_dim,
                       page_tokens=pool.page_tokens, value_dtype=torch.int8 if quantized else model_dtype,
                       quantized=quantized)


class PoolViews:
    """Typed views over the pool's device bytes (no copy): per layer, keys and values (and their scales).

    ``flat``: uint8 [num_pages * page_bytes], the arena's KV slot (or, for an all-resident engine, a tensor of
    the same size)."""

    def __init__(self, flat: torch.Tensor, layout: PageLayout, num_pages: int, layer_offset: int = 0):
        need = num_pages * layout.page_bytes
        if flat.numel() < need:
            raise MemintentError(f"the KV region holds {flat.numel()} bytes but {num_pages} pages of "
                                 f"{layout.page_bytes} bytes need {need}: recompile the plan")
        self.layout, self.num_pages = layout, num_pages
        # A pipeline part's pool holds its own layers; attention names layers as the whole model does.
        self.layer_offset = layer_offset
        pages = flat[:need].view(num_pages, layout.page_bytes)                     # uint8 (N, page_bytes)
        self.pages = pages
        L, bt, kvh, hd = layout.layers, layout.page_tokens, layout.kv_heads, layout.head_dim
        values = pages[:, :layout.value_bytes].view(layout.value_dtype).view(num_pages, L, 2, bt, kvh, hd)
        self.keys = [values[:, i, 0] for i in range(L)]                               # (N, bt, kvh, hd) each
        self.values = [values[:, i, 1] for i in range(L)]
        if layout.quantized:
            scales = pages[:, layout.value_bytes:].view(SCALE_DTYPE).view(num_pages, L, 2, bt, kvh)
            self.key_scales = [scales[:, i, 0] for i in range(L)]                     # (N, bt, kvh) each
            self.value_scales = [scales[:, i, 1] for i in range(L)]
        else:
            self.key_scales = self.value_scales = None

    def page(self, b: int) -> torch.Tensor:
        """uint8 [page_bytes]: page ``b``'s bytes (contiguous), for swap copies and poisoning."""
        return self.pages[b]


