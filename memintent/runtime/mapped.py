"""Blocks read in place from pinned host memory (``Residency.mapped``): never copied to HBM, no slot.

Pinned host memory is mapped into the device's address space (unified addressing), so a kernel can load from it
directly; each load crosses the host link. That pays for two kinds of module whose weights would otherwise take a
stream slot sized for the whole vocabulary:

- an embedding reads only the rows of the step's tokens (a step of 2400 tokens reads 20 MB of llama-3-70b's int8
  table, not the 1 GB a visit would copy);
- a linear layer applied to a few rows (the head, on the rows the engine samples) reads its weights once per
  forward, as a visit would, but needs no stream slot and no unpack slot: each tile is dequantized in registers.

Both take the packed block's own parts (``memintent.runtime.quant``'s layout: int8 values and one bf16 scale per
row; or an embedding in the model's dtype). The kernels are ``quant_kernels.mapped_rows`` and
``quant_kernels.mapped_linear_int8``; the torch functions here are their reference (the CPU path: there host memory
is the device's), and compute the same values: the embedding bitwise, the linear layer up to the order of its sums.
"""

from __future__ import annotations

import torch

from memintent.accounting import host_side
from memintent.errors import MemintentError, RuntimeFault
from memintent.ir.dtypes import torch_dtypes
from memintent.ir.layout import MAPPED_LINEAR_ROWS, Storage, quant_layout
from memintent.ir.model import Block, Object
from memintent.runtime.quant import (
    Backend,
    dequantize_int8,
    triton_interpreting,
    triton_kernels_module,
    typed_view,
)

_ROW_BLOCK = 1024       # embedding columns per program
_LINEAR_BN = 64         # output columns (weight rows) per program of the linear kernel
_LINEAR_BK = 128        # input columns per step of its loop (64 for a tile of 256 rows: shared memory)


def _use_kernel(backend: Backend, x: torch.Tensor, w: torch.Tensor) -> bool:
    """The kernel when ``x`` is on the GPU (its weights then must be pinned host memory) or the interpreter runs."""
    if backend == "torch":
        return False
    if backend == "triton" and triton_interpreting():
        return True
    if backend == "triton" and not x.is_cuda:
        raise RuntimeFault("backend='triton' reads mapped weights from a CUDA device (or under TRITON_INTERPRET=1)")
    if x.is_cuda and not (w.is_pinned() or w.is_cuda):
        raise RuntimeFault("a mapped block's weights must be pinned host memory: the device reads them in place")
    return x.is_cuda


def mapped_embedding(ids: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype,
                     backend: Backend = "auto") -> torch.Tensor:
    """Rows ``ids`` (any shape, on the compute device) of the table ``weight`` (V, D) in host memory: int8 values
    with ``scale`` (V,) bf16, dequantized as the unpacked block holds them, or the model's own values (``scale``
    None); returns ``ids.shape + (D,)`` in ``dtype`` on ``ids``' device."""
    V, D = weight.shape
    if not _use_kernel(backend, ids, weight):
        with host_side():                   # what the kernel reads over the link: not device memory
            rows = weight[ids.reshape(-1)]                                          # (T, D) values
            row_scale = None if scale is None else scale[ids.reshape(-1)]          # (T,)
        out = torch.empty(rows.shape, dtype=dtype)                                  # (T, D)
        if row_scale is None:
            out.copy_(rows)
        else:
            dequantize_int8(rows, row_scale, out, backend="torch")
        return out.view(*ids.shape, D)
    flat = ids.reshape(-1).contiguous()                                             # (T,)
    out = torch.empty((flat.numel(), D), dtype=dtype, device=ids.device)            # (T, D)
    if flat.numel():
        kernels = triton_kernels_module(triton_interpreting())
        grid = (flat.numel(), -(-D // _ROW_BLOCK))
        kernels.mapped_rows[grid](flat, weight, weight if scale is None else scale, out, V, D, out.stride(0),
                                  BLOCK=_ROW_BLOCK, SCALED=scale is not None)
    return out.view(*ids.shape, D)


def _block_m(m: int) -> int:
    """Tokens per program: all of a decode step's rows in one tile (each program reads its weight tile over the
    link once), at least 16 (the matmul unit's smallest tile), at most ``MAPPED_LINEAR_ROWS``: more rows take more
    tiles, each reading the weights again (H56: 128 rows in one tile read at 51 GB/s, 184 in two at 25.6)."""
    return min(MAPPED_LINEAR_ROWS, max(16, 1 << max(0, m - 1).bit_length()))


def mapped_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, backend: Backend = "auto") -> torch.Tensor:
    """``x @ W.T`` with ``W`` (N, K) = int8 ``q`` times one bf16 ``scale`` (N,) per row, both in host memory;
    x (..., K) on the compute device; returns (..., N) in x's dtype."""
    N, K = q.shape
    if x.shape[-1] != K or scale.shape != (N,):
        raise RuntimeFault(f"mapped linear: x {tuple(x.shape)}, weight {tuple(q.shape)}, scale "
                           f"{tuple(scale.shape)} do not match")
    if not _use_kernel(backend, x, q):
        with host_side():                   # the kernel dequantizes tiles in registers: not device memory
            w = dequantize_int8(q, scale, torch.empty((N, K), dtype=x.dtype), backend="torch")   # (N, K)
        return torch.nn.functional.linear(x, w)
    rows = x.reshape(-1, K)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    M = rows.shape[0]                                                               # (M, K)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)                       # (M, N)
    if M:
        kernels = triton_kernels_module(triton_interpreting())
        bm = _block_m(M)
        grid = (-(-N // _LINEAR_BN), -(-M // bm))
        kernels.mapped_linear_int8[grid](rows, q, scale, out, M, N, K, rows.stride(0), out.stride(0), BM=bm,
                                         BN=_LINEAR_BN, BK=_LINEAR_BK if bm < 256 else 64,
                                         F32_DOT=x.dtype == torch.float32 or triton_interpreting(),
                                         num_warps=4 if bm <= 64 else 8)
    return out.view(*x.shape[:-1], N)


def mapped_parts(block: Block, objects: dict[str, Object], buffer: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, scales or None) of a mapped block's one weight, views of its host buffer (flat uint8: the packed
    layout of ``memintent.runtime.quant``, or the weight itself): int8 (out, in) and bf16 (out,), or the weight
    in its own dtype."""
    e = quant_layout(block, objects)[0]
    if e.storage == Storage.raw:
        return typed_view(buffer, e.dst_offset_bytes, torch_dtypes()[e.dtype], e.shape), None   # as unpacked
    values = typed_view(buffer, e.values.offset_bytes, torch.int8, e.shape)                   # (out, in)
    return values, typed_view(buffer, e.scales.offset_bytes, torch.bfloat16, (e.shape[0],))  # (out,)


def mapped_forward(module: torch.nn.Module, kind: str, values: torch.Tensor, scale: torch.Tensor | None,
                   dtype: torch.dtype):
    """The forward that reads ``module``'s weight in place (``kind`` as ``passes.costs.mapped_op`` says): an
    ``nn.Embedding`` (no max_norm: it would write the table) or an ``nn.Linear`` without bias; anything else is
    refused, naming the module."""
    if kind == "rows" and isinstance(module, torch.nn.Embedding) and module.max_norm is None:
        return lambda ids: mapped_embedding(ids, values, scale, dtype)
    if kind == "matrix" and isinstance(module, torch.nn.Linear) and module.bias is None:
        return lambda x: mapped_linear(x, values, scale)
    raise MemintentError(f"the plan reads a {type(module).__name__} in place as {kind!r}: only an nn.Embedding "
                         "without max_norm (rows) or an nn.Linear without bias (matrix) can be; recompile the plan")


def warm(values: torch.Tensor, scale: torch.Tensor | None, kind: str, dtype: torch.dtype,
         device: torch.device) -> None:
    """Launch each kernel variant a step can take once (Triton compiles one on its first launch, which inside a
    step costs up to a second): the embedding's, or the linear kernel's for every tile of rows."""
    if kind == "rows":
        mapped_embedding(torch.zeros(1, dtype=torch.long, device=device), values, scale, dtype)
        return
    for rows in sorted({_block_m(m) for m in range(1, MAPPED_LINEAR_ROWS + 1)}):
        mapped_linear(torch.zeros(rows, values.shape[1], dtype=dtype, device=device), values, scale)


__all__ = ["mapped_embedding", "mapped_forward", "mapped_linear", "mapped_parts", "warm"]
