"""A layer's norms in an engine step on the kernel backend: one Triton pass per norm, and the residual add before the
feed-forward norm in the same pass.

Eager, an OPT layer's two LayerNorms and two residual adds are four kernels that each read and write the whole
(tokens, dim) activation; on an H200 they took 11.1 ms of a 447 ms opt-30b prompt step of 4784 tokens (LayerNorm at
about 2 TB/s, run H45), and a Llama layer's RMSNorm is six eager kernels with a float32 copy of its input. Here
``norm`` reads its input once and writes its output once, and ``add_norm`` reads the residual and the attention's
output once and writes both the sum (the residual the layer's last add takes) and its norm.

Numerics follow the eager modules (``nn.LayerNorm``; the preset's ``RMSNorm``): everything in float32, the sum
rounded to the model dtype before it is normalised (as the eager add stores it), RMSNorm's normalised value rounded
to the model dtype before the weight multiplies it. Only the order of the row's sums differs, so the kernel
backend's logits stay within the reference backend's tolerance (tests/test_engine_kernel.py), and streamed and
resident plans, which both run it, stay bitwise equal. The reference backend (the CPU, CI's tests) and tracing
run the eager modules.

This module imports triton only when a kernel is first launched.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from memintent.kv.paged_kernel import interpreting


def supported(module: nn.Module) -> bool:
    """Whether ``norm`` and ``add_norm`` can run ``module``: a LayerNorm over the last dimension with a weight (and
    a bias or none), or an RMSNorm with a weight (any module with ``weight`` and ``eps`` and no ``bias``)."""
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine and len(module.normalized_shape) == 1
    return getattr(module, "weight", None) is not None and hasattr(module, "eps") and not hasattr(module, "bias")


def norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` in one pass: x (..., dim) -> (..., dim)."""
    return _launch(*_params(module), x, None)[0]


def add_norm(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, module(h)) with h = x + delta, in one pass: x and delta (..., dim) -> two (..., dim)."""
    y, h = _launch(*_params(module), x, delta)
    return h, y


def warm(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Launch each variant the model's norms will use once, on zeros, so that Triton compiles it before a step
    (a compile inside a captured or timed step costs up to a second). A variant is the dtype, the width, the
    flags: the weights' values do not matter. Returns the variants launched."""
    variants = {(m.weight.shape[-1], getattr(m, "bias", None) is not None, isinstance(m, nn.LayerNorm))
                for m in model.modules() if supported(m)}
    for dim, bias, layer in variants:
        w = torch.zeros(dim, device=device, dtype=dtype)           # (dim,): weight, and bias where there is one
        x = torch.zeros(1, dim, device=device, dtype=dtype)        # (1, dim)
        for delta in (None, x):                                    # norm, then add_norm
            _launch(w, w if bias else None, 1e-5, layer, x, delta)
    return 2 * len(variants)


def _params(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, float, bool]:
    """(weight, bias or None, eps, whether it is a LayerNorm) of a ``supported`` norm module."""
    return module.weight, getattr(module, "bias", None), float(module.eps), isinstance(module, nn.LayerNorm)


def _launch(weight: torch.Tensor, bias: torch.Tensor | None, eps: float, layer: bool, x: torch.Tensor,
            delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm of x [+ delta], x + delta or None), both shaped like x."""
    dim = x.shape[-1]
    rows = x.numel() // dim
    x2 = x.reshape(rows, dim).contiguous()                                # (rows, dim)
    d2 = delta.reshape(rows, dim).contiguous() if delta is not None else x2
    y = torch.empty_like(x2)                                              # (rows, dim)
    h = torch.empty_like(x2) if delta is not None else y                  # (rows, dim): the sum, when there is one
    block = 1 << (dim - 1).bit_length()
    if rows:
        _kernel(interpreting())[(rows,)](
            x2, d2, h, y, weight, bias if bias is not None else weight, dim, eps,
            RESIDUAL=delta is not None, BIAS=bias is not None, LAYER=layer, BLOCK=block,
            num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16)
    return y.view(x.shape), (h.view(x.shape) if delta is not None else None)


@functools.cache
def _kernel(interpret: bool):
    """The Triton kernel, wrapped on first use and once per interpreter mode (the flag is read when ``triton.jit``
    wraps a function)."""
    del interpret   # the cache key: triton.jit below reads the same flag
    import triton  # deferred: heavy, optional
    import triton.language as tl  # deferred: heavy, optional

    @triton.jit
    def add_norm_rows(X, D, H, Y, W, B, dim, eps, RESIDUAL: tl.constexpr, BIAS: tl.constexpr, LAYER: tl.constexpr,
                      BLOCK: tl.constexpr):
        # One program: one row of dim values (BLOCK >= dim, a power of two), in float32 throughout.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < dim
        x = tl.load(X + row * dim + cols, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:
            # the sum is stored in the model dtype, and normalised as stored, as the eager add then norm do
            h = (x + tl.load(D + row * dim + cols, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
            tl.store(H + row * dim + cols, h, mask=mask)
            x = h.to(tl.float32)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        if LAYER:
            mean = tl.sum(x, axis=0) / dim
            centred = tl.where(mask, x - mean, 0.0)
            y = centred * (1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / dim + eps)) * w
            if BIAS:
                y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            # RMSNorm: x * rsqrt(mean(x^2) + eps), rounded to the model dtype, then times the weight
            y = (x * (1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps))).to(Y.dtype.element_ty).to(tl.float32) * w
        tl.store(Y + row * dim + cols, y.to(Y.dtype.element_ty), mask=mask)

    return add_norm_rows
