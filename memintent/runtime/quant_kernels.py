"""The one-pass Triton dequantization kernels of ``memintent.runtime.quant`` (imported by it on first use, never
at package import: this module imports triton).

Each kernel reads the packed values, the scales (and int4g's minimums) and writes the output dtype once. Both
kernels compute the torch reference's float32 value (an exact product; int4g adds its minimum, one float32
rounding) and round it once to nearest even, so their output is
bitwise the torch path's (tests/test_quant.py checks it on the CPU under ``TRITON_INTERPRET=1``,
tests/test_quant_stream.py on a GPU).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_out(x, dtype: tl.constexpr):
    # float32 -> the output dtype, rounded to nearest even. bf16 is rounded here with integer ops (the top half of
    # the float32 after adding 0x7FFF plus the kept half's lowest bit), which is what the GPU's conversion does
    # too: Triton's interpreter truncates instead, and the CPU test compares bitwise with torch through it. x is
    # finite (an exact product of finite numbers), so NaN needs no case of its own.
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def dq_int8(q_ptr, s_ptr, o_ptr, n_cols, q_row_stride, o_row_stride, BLOCK: tl.constexpr):
    # One program: one row, BLOCK consecutive columns. out[r, c] = float32(q[r, c]) * float32(scale[r]).
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    q = tl.load(q_ptr + row * q_row_stride + cols, mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + row).to(tl.float32)
    tl.store(o_ptr + row * o_row_stride + cols, to_out(q * s, o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dq_int4_groups(p_ptr, s_ptr, m_ptr, o_ptr, n_cols, n_bytes, n_groups, o_row_stride, GROUPS: tl.constexpr,
                   HALF_GROUP: tl.constexpr, MINS: tl.constexpr):
    # One program: one row, GROUPS consecutive groups as a (GROUPS, HALF_GROUP) tile of packed bytes, so each
    # group's scale (and minimum) is loaded once and broadcast, and the two nibbles of a byte are interleaved into
    # one contiguous (GROUPS, 2 * HALF_GROUP) store of output columns: packed byte j -> columns 2j (low nibble)
    # and 2j + 1 (high). int4: out = float32(nibble - 8) * float32(scale), exact. int4g (MINS): out =
    # float32(nibble) * float32(scale) + float32(min): the product is exact, so a fused multiply-add and the torch
    # path's multiply then add give the same float32 sum. Either is rounded once to the output dtype, as the torch
    # path does.
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)                       # (GROUPS,)
    j = g[:, None] * HALF_GROUP + tl.arange(0, HALF_GROUP)[None, :]            # (GROUPS, HALF_GROUP) packed bytes
    p = tl.load(p_ptr + row * n_bytes + j, mask=j < n_bytes, other=0).to(tl.int32)
    s = tl.load(s_ptr + row * n_groups + g, mask=g < n_groups, other=0).to(tl.float32)[:, None]   # (GROUPS, 1)
    if MINS:
        m = tl.load(m_ptr + row * n_groups + g, mask=g < n_groups, other=0).to(tl.float32)[:, None]
        lo = (p & 15).to(tl.float32) * s + m
        hi = ((p >> 4) & 15).to(tl.float32) * s + m
    else:
        lo = ((p & 15) - 8).to(tl.float32) * s
        hi = (((p >> 4) & 15) - 8).to(tl.float32) * s
    # (GROUPS, HALF_GROUP, 2) -> (GROUPS, 2 * HALF_GROUP): lo, hi, lo, hi... (tl.interleave, spelled out: the
    # interpreter cannot call that helper when triton was imported before TRITON_INTERPRET was set)
    x = tl.reshape(tl.join(lo, hi), (GROUPS, 2 * HALF_GROUP))
    c = g[:, None] * (2 * HALF_GROUP) + tl.arange(0, 2 * HALF_GROUP)[None, :]  # output columns
    tl.store(o_ptr + row * o_row_stride + c, to_out(x, o_ptr.dtype.element_ty), mask=c < n_cols)


# The per-step values of the two mapped kernels are not specialized on: Triton compiles a new variant when an
# integer turns 1 or a multiple of 16, or a pointer loses 16-byte alignment, and such a compile (0.3-1 s) inside a
# served step is a step that waits on the host. M is the step's sampled rows (it only masks); the token ids are a
# view of the caller's staged integers (the engine's start at offset 0 today; a view at another offset would
# otherwise compile a variant), read one id per program, where alignment buys nothing.
@triton.jit(do_not_specialize_on_alignment=["ids_ptr"])
def mapped_rows(ids_ptr, w_ptr, s_ptr, o_ptr, n_rows, n_cols, o_row_stride, BLOCK: tl.constexpr,
                SCALED: tl.constexpr):
    # One program: one token, BLOCK consecutive columns of its embedding row, read in place from pinned host memory
    # (w_ptr, s_ptr: mapped). out[t, c] = w[ids[t], c], or with SCALED (int8) float32(q) * float32(scale[row]),
    # rounded once as ``dq_int8`` rounds: the dequantized block's row, bitwise. A row id past the table reads
    # nothing and writes zeros (never memory outside the table).
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    row = tl.load(ids_ptr + t).to(tl.int64)
    ok = (row >= 0) & (row < n_rows)
    mask = (cols < n_cols) & ok
    w = tl.load(w_ptr + row * n_cols + cols, mask=mask, other=0)
    if SCALED:
        s = tl.load(s_ptr + row, mask=ok, other=0).to(tl.float32)
        y = to_out(w.to(tl.float32) * s, o_ptr.dtype.element_ty)
    else:
        y = w.to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + t * o_row_stride + cols, y, mask=cols < n_cols)


@triton.jit(do_not_specialize=["M"])
def mapped_linear_int8(x_ptr, q_ptr, s_ptr, o_ptr, M, N, K, x_row_stride, o_row_stride, BM: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr, F32_DOT: tl.constexpr):
    # One program: BN output columns (rows of the int8 weight, read in place from pinned host memory) for BM
    # tokens. Each (BN, BK) weight tile is dequantized as ``dq_int8`` does it (float32(q) * float32(scale), rounded
    # once to x's dtype): the unpacked weight, bitwise; then multiplied with float32 sums. ``F32_DOT`` multiplies
    # float32 operands exactly (no tf32): for float32 models, and under the interpreter, whose bf16 dot is wrong
    # (a bf16 product is exact in float32, so the sums are the same). Only the order of the sums differs from a
    # matmul on the unpacked weight.
    n = tl.program_id(0) * BN + tl.arange(0, BN)                              # (BN,) output columns
    m = tl.program_id(1) * BM + tl.arange(0, BM)                              # (BM,) tokens
    s = tl.load(s_ptr + n, mask=n < N, other=0).to(tl.float32)[:, None]       # (BN, 1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)                                             # (BK,)
        w = tl.load(q_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=(n[:, None] < N) & (k[None, :] < K),
                    other=0)                                                  # (BN, BK) int8
        w = to_out(w.to(tl.float32) * s, x_ptr.dtype.element_ty)              # (BN, BK) x's dtype
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * x_row_stride + k[None, :],
                    mask=(m[:, None] < M) & (k[None, :] < K), other=0)        # (BM, BK)
        if F32_DOT:
            acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    out = to_out(acc, o_ptr.dtype.element_ty)                                 # (BM, BN)
    tl.store(o_ptr + m[:, None].to(tl.int64) * o_row_stride + n[None, :], out, mask=(m[:, None] < M) & (n[None, :] < N))
