"""int8/int4/int4g weight quantization (memintent.runtime.quant): round trips, error bounds, packed block layout.

CPU only: the torch path is the reference; the Triton kernels run here under Triton's interpreter
(``TRITON_INTERPRET=1``) and must match it bitwise.
"""

from __future__ import annotations

import math

import pytest
import torch

from memintent.ir.model import Block, ModelRef, Object, ObjectKind, Program, Quant, RunShape, Tier
from memintent.passes.costs import transfer_bytes
from memintent.ir.layout import bytes_per_weight
from memintent.runtime import quant as quant_module
from memintent.runtime.quant import INT4_GROUP, INT4G_GROUP, PART_ALIGN_BYTES, Storage, dequantize_int4, dequantize_int4g, dequantize_int8, int4_shapes, pack_block, quant_layout, quantize_int4, quantize_int4g, quantize_int8, quantized_block_bytes, quantized_payload_bytes, relative_error, unpack_block

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "i64": torch.int64}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rt8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, s = quantize_int8(w)
    out = torch.full_like(w, float("nan"))   # every element must be overwritten
    assert dequantize_int8(q, s, out) is out
    return q, s, out


def _rt4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p, s = quantize_int4(w)
    out = torch.full_like(w, float("nan"))
    assert dequantize_int4(p, s, out) is out
    return p, s, out


def _rt4g(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    p, s, m = quantize_int4g(w)
    out = torch.full_like(w, float("nan"))
    assert dequantize_int4g(p, s, m, out) is out
    return p, s, m, out


def _nibbles_ref(p: torch.Tensor, in_ch: int) -> torch.Tensor:
    """Nibbles as int (out, in), low nibble first, by plain integer ops."""
    return torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)[:, :in_ch].to(torch.int32)


def _unpack_int4_ref(p: torch.Tensor, in_ch: int) -> torch.Tensor:
    """Nibbles -> q in [-8, 7] as int, (out, in), by plain integer ops."""
    u = torch.stack([p & 15, p >> 4], dim=-1).reshape(p.shape[0], -1)[:, :in_ch]
    return u.to(torch.int32) - 8


def _per_element_scale(s: torch.Tensor, in_ch: int, group: int | None) -> torch.Tensor:
    s = s.float()
    if group is None:
        return s[:, None].expand(-1, in_ch)
    return s.repeat_interleave(group, dim=1)[:, :in_ch]


def _check_bound(w: torch.Tensor, dq: torch.Tensor, scale_el: torch.Tensor, slack: float = 0.5) -> None:
    """|w - dq| <= slack * scale + the rounding of dq to its dtype (half an ulp: |dq| * eps / 2)."""
    w64, d64 = w.double(), dq.double()
    assert torch.isfinite(d64).all()
    bound = slack * scale_el.double() + d64.abs() * torch.finfo(dq.dtype).eps / 2
    err = (w64 - d64).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item()}"


# ---- int8 ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_round_trip_normal(dtype: torch.dtype) -> None:
    w = torch.randn(256, 4096, generator=_gen(1)).to(dtype)
    q, s, dq = _rt8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.dtype == torch.bfloat16 and s.shape == (256,)
    assert q.abs().max() <= 127
    _check_bound(w, dq, _per_element_scale(s, 4096, None))
    # the reference dequantization: q * scale in float32, rounded once
    assert torch.equal(dq, (q.float() * s.float()[:, None]).to(dtype))
    err = relative_error(w, dq)
    assert err < 1e-2, err          # observed ~0.0090 (rms rounding error scale/sqrt(12), absmax ~4 sigma)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4_round_trip_normal(dtype: torch.dtype) -> None:
    w = torch.randn(256, 4096, generator=_gen(2)).to(dtype)
    p, s, dq = _rt4(w)
    assert p.dtype == torch.uint8 and p.shape == (256, 2048)
    assert s.dtype == torch.bfloat16 and s.shape == (256, 4096 // INT4_GROUP)
    _check_bound(w, dq, _per_element_scale(s, 4096, INT4_GROUP))
    q = _unpack_int4_ref(p, 4096)
    assert torch.equal(dq, (q.float() * _per_element_scale(s, 4096, INT4_GROUP)).to(dtype))
    err = relative_error(w, dq)
    assert err < 1.5e-1, err        # observed ~0.117


@pytest.mark.parametrize("shape", [(1, 130), (3, 7), (4, 1), (1, 1), (2, 129), (1, 256), (5, 255), (1, 4096)])
def test_odd_shapes(shape: tuple[int, int]) -> None:
    out_ch, in_ch = shape
    w = torch.randn(shape, generator=_gen(3)).bfloat16()
    q, s8, dq8 = _rt8(w)
    _check_bound(w, dq8, _per_element_scale(s8, in_ch, None))
    p, s4, dq4 = _rt4(w)
    assert (tuple(p.shape), tuple(s4.shape)) == int4_shapes(out_ch, in_ch)
    assert p.shape == (out_ch, math.ceil(in_ch / 2)) and s4.shape == (out_ch, math.ceil(in_ch / 128))
    _check_bound(w, dq4, _per_element_scale(s4, in_ch, INT4_GROUP))
    if in_ch % 2:                   # the pad nibble of each row holds value 0
        assert ((p[:, -1] >> 4) == 8).all()


def test_int4_nibble_order() -> None:
    # one group, absmax 7 -> scale 1: q equals w; column 0 -> low nibble of byte 0, column 1 -> its high nibble
    w = torch.tensor([[1.0, -2.0, 7.0, -7.0, 0.0]])
    p, s = quantize_int4(w)
    assert s.tolist() == [[1.0]]
    assert p.tolist() == [[(1 + 8) | ((-2 + 8) << 4), (7 + 8) | ((-7 + 8) << 4), 8 | (8 << 4)]]
    out = torch.empty_like(w)
    dequantize_int4(p, s, out)
    assert torch.equal(out, w)


# ---- int4g ----------------------------------------------------------------------------------------------------

def _int4g_bound(s: torch.Tensor, m: torch.Tensor, in_ch: int) -> torch.Tensor:
    """Per-element error bound of int4g: half a step, plus where the bf16-rounded minimum and scale move the
    group's ends (each off by at most 2^-9 of itself; 2^-8 covers their sum), for values clamped there."""
    s_el, m_el = _per_element_scale(s, in_ch, INT4G_GROUP), _per_element_scale(m, in_ch, INT4G_GROUP)
    return 0.5 * s_el + (m_el.abs() + 15 * s_el) * 2.0 ** -8


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int4g_round_trip_normal(dtype: torch.dtype) -> None:
    w = (torch.randn(256, 4096, generator=_gen(2)) + 0.3).to(dtype)     # an offset: the groups are not symmetric
    p, s, m, dq = _rt4g(w)
    groups = 4096 // INT4G_GROUP
    assert p.dtype == torch.uint8 and p.shape == (256, 2048)
    assert s.dtype == m.dtype == torch.bfloat16 and s.shape == m.shape == (256, groups)
    _check_bound(w, dq, _int4g_bound(s, m, 4096), slack=1.0)
    # the reference dequantization, by integer ops: an exact float32 product plus the minimum, rounded once in
    # float32 and once to the dtype
    q = _nibbles_ref(p, 4096).float()
    ref = q * _per_element_scale(s, 4096, INT4G_GROUP) + _per_element_scale(m, 4096, INT4G_GROUP)
    assert torch.equal(dq, ref.to(dtype))
    err, err4 = relative_error(w, dq), relative_error(w, _rt4(w)[2])
    assert err < 0.75 * err4, (err, err4)     # observed ~0.078 against int4's ~0.12


def test_int4g_nibble_order_and_minimum() -> None:
    # one group spanning [-5, 10]: scale 1, minimum -5, so q = w + 5; column 0 -> low nibble of byte 0
    w = torch.tensor([[-5.0, 10.0, 0.0, 3.0, -1.0]])
    p, s, m = quantize_int4g(w)
    assert s.tolist() == [[1.0]] and m.tolist() == [[-5.0]]
    assert p.tolist()[0][:2] == [0 | (15 << 4), 5 | (8 << 4)] and p[0, 2] & 15 == 4   # the pad nibble: unread
    out = torch.empty_like(w)
    dequantize_int4g(p, s, m, out)
    assert torch.equal(out, w)
    # all of a group's 16 levels serve its own range, and its ends are levels even where the range leaves 0 out
    # (an integer zero point would shift such a grid by up to half a step)
    for grid in (torch.arange(16.0)[None] * 0.25, -1 - torch.arange(16.0)[None]):    # bf16 holds min and step
        out = torch.empty_like(grid)
        dequantize_int4g(*quantize_int4g(grid), out)
        assert torch.equal(out, grid), (grid, out)
    grid = torch.arange(16.0)[None] * 0.25 + 0.1       # a minimum bf16 rounds: each level within its rounding
    out = torch.empty_like(grid)
    dequantize_int4g(*quantize_int4g(grid), out)
    assert torch.allclose(out, grid, rtol=2.0 ** -8, atol=0), (grid, out)


@pytest.mark.parametrize("shape", [(1, 130), (3, 7), (4, 1), (2, 65), (1, 64), (5, 255), (2, 2100)])
def test_int4g_odd_shapes_and_zero_groups(shape: tuple[int, int]) -> None:
    out_ch, in_ch = shape
    w = torch.randn(shape, generator=_gen(3)).bfloat16()
    w[0, :min(in_ch, INT4G_GROUP)] = 0        # a zero group
    p, s, m, dq = _rt4g(w)
    assert (tuple(p.shape), tuple(s.shape)) == int4_shapes(out_ch, in_ch, INT4G_GROUP) == (
        (out_ch, math.ceil(in_ch / 2)), (out_ch, math.ceil(in_ch / INT4G_GROUP)))
    assert s[0, 0] == 0 and m[0, 0] == 0 and (dq[0, :INT4G_GROUP] == 0).all()
    _check_bound(w, dq, _int4g_bound(s, m, in_ch), slack=1.0)


def test_int4g_short_last_group_keeps_its_own_range() -> None:
    # 40 columns: a whole group, then 8 columns all near 5; padding that widened the last group to 0 would
    # spend its 16 levels on [0, 5.3] (a step of ~0.35) rather than its own [5, 5.3]
    w = torch.cat([torch.randn(1, 32, generator=_gen(9)), 5 + 0.3 * torch.rand(1, 8, generator=_gen(9))], dim=1)
    p, s, m, dq = _rt4g(w)
    assert s[0, 1] <= 0.3 / 15 * (1 + 2.0 ** -8) and (w - dq)[0, 32:].abs().max() <= 0.011


def test_int4g_extreme_values_do_not_overflow() -> None:
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        big = torch.finfo(dtype).max
        w = torch.tensor([[big, -big, 1.0, 0.0], [big, big * 0.99, 0.0, -1.0], [-big, -big, -big, -big]],
                         dtype=dtype)
        p, s, m, dq = _rt4g(w)
        assert torch.isfinite(dq).all(), dtype
        # the minimum is kept (to bf16); a group spanning more than float32's max has its top clamped but finite
        assert dq[0, 1] < -0.99 * big and dq[1, 0] > 0.9 * big and (dq[2] < -0.99 * big).all(), (dtype, dq)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="inf or NaN"):
            quantize_int4g(torch.tensor([[1.0, bad]]))


def test_bytes_per_weight_of_each_format() -> None:
    # int4: 4 bits + a bf16 per 128 (4.125 bits); int4g: 4 bits + a bf16 scale and a bf16 minimum per 32 (5 bits)
    assert bytes_per_weight(Quant.int4, 4096) == 0.5 + 2 / 128
    assert bytes_per_weight(Quant.int4g, 4096) == 0.5 + 4 / 32
    assert bytes_per_weight(Quant.int8, 4096) == 1 + 2 / 4096
    assert bytes_per_weight(Quant.int4g, 4096) / bytes_per_weight(Quant.int4, 4096) == pytest.approx(1.2121, abs=1e-4)


# ---- the Triton kernels under Triton's interpreter: bitwise the torch path ------------------------------------

@pytest.fixture
def triton_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
    quant_module.triton_kernels_module.cache_clear()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_kernels_match_the_torch_path_bitwise(triton_interpreter, dtype: torch.dtype) -> None:
    # shapes: whole groups, a short last group, an odd input (a pad nibble), more than one program per row
    for shape in [(3, 256), (2, 130), (4, 255), (2, 2100)]:
        w = (torch.randn(shape, generator=_gen(7)) * 3 + 0.5).to(dtype)
        for quantize, dequantize in ((quantize_int8, dequantize_int8), (quantize_int4, dequantize_int4),
                                     (quantize_int4g, dequantize_int4g)):
            parts = quantize(w)
            ref, got = torch.full_like(w, float("nan")), torch.full_like(w, float("nan"))
            dequantize(*parts, ref, backend="torch")
            dequantize(*parts, got, backend="triton")
            assert torch.equal(got.view(-1).view(torch.uint8), ref.view(-1).view(torch.uint8)), (
                quantize.__name__, shape, dtype)


def test_triton_kernel_writes_a_strided_output_bitwise(triton_interpreter) -> None:
    w = torch.randn(6, 200, generator=_gen(8)).bfloat16()
    big = torch.zeros(6, 300, dtype=torch.bfloat16)
    ref = torch.empty_like(w)
    dequantize_int4g(*quantize_int4g(w), ref, backend="torch")
    dequantize_int4g(*quantize_int4g(w), big[:, 50:250], backend="triton")
    assert torch.equal(big[:, 50:250], ref) and (big[:, :50] == 0).all() and (big[:, 250:] == 0).all()


def test_zero_rows_and_groups() -> None:
    w = torch.randn(4, 300, generator=_gen(4)).bfloat16()
    w[1] = 0                  # a zero row
    w[2, 128:256] = 0         # a zero int4 group
    w[3, 256:] = 0            # a zero (short) last group
    q, s8, dq8 = _rt8(w)
    assert s8[1] == 0 and (q[1] == 0).all() and (dq8[1] == 0).all()
    p, s4, dq4 = _rt4(w)
    assert s4[1].eq(0).all() and s4[2, 1] == 0 and s4[3, 2] == 0
    assert (dq4[1] == 0).all() and (dq4[2, 128:256] == 0).all() and (dq4[3, 256:] == 0).all()
    assert not dq8.isnan().any() and not dq4.isnan().any()
    z = torch.zeros(3, 5, dtype=torch.float16)
    assert torch.equal(_rt8(z)[2], z) and torch.equal(_rt4(z)[2], z)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_extreme_values(dtype: torch.dtype) -> None:
    rows = [
        [1e30, -1e30, 3.0, 0.0],         # huge next to moderate
        [1e-30, -3e-31, 0.0, 1e-32],     # tiny but normal
        [1e38, -2e38, 1e37, 5.0],        # near the top of the range
        [-127.0, 127.0, -127.0, 127.0],  # +-absmax only: scale 1, exact
    ]
    w = torch.tensor(rows, dtype=torch.float32).to(dtype)
    q, s8, dq8 = _rt8(w)
    _check_bound(w, dq8, _per_element_scale(s8, 4, None))
    assert torch.equal(dq8[3], w[3]) and torch.equal(q[3].abs(), torch.full((4,), 127, dtype=torch.int8))
    p, s4, dq4 = _rt4(w)
    _check_bound(w, dq4, _per_element_scale(s4, 4, INT4_GROUP))
    # at the dtype's max the scale is rounded down: still finite, error within one scale
    top = torch.finfo(dtype).max
    wm = torch.tensor([[top, -top, top / 3, 0.0]], dtype=dtype)
    for rt, group in ((_rt8, None), (_rt4, INT4_GROUP)):
        _, s, dq = rt(wm)
        assert torch.isfinite(dq).all()
        _check_bound(wm, dq, _per_element_scale(s, 4, group), slack=1.0)


def test_non_finite_rejected() -> None:
    for bad in (float("inf"), float("nan")):
        w = torch.ones(2, 3)
        w[1, 2] = bad
        with pytest.raises(ValueError, match="inf or NaN"):
            quantize_int8(w)
        with pytest.raises(ValueError, match="inf or NaN"):
            quantize_int4(w)


def test_dequantize_into_strided_view_and_other_dtype() -> None:
    # a view with a row stride larger than its width (a slice of a wider buffer), f16 output from bf16 scales
    w = torch.randn(6, 200, generator=_gen(5)).half()
    big = torch.full((6, 300), 123.0, dtype=torch.float16)
    q, s = quantize_int8(w)
    dequantize_int8(q, s, big[:, 50:250])
    assert torch.equal(big[:, 50:250], (q.float() * s.float()[:, None]).half())
    assert (big[:, :50] == 123).all() and (big[:, 250:] == 123).all()
    p, s4 = quantize_int4(w)
    big.fill_(123.0)
    dequantize_int4(p, s4, big[:, 50:250])
    assert torch.equal(big[:, 50:250], _rt4(w)[2])
    assert (big[:, :50] == 123).all() and (big[:, 250:] == 123).all()


def test_shape_mismatch_and_triton_on_cpu() -> None:
    w = torch.randn(4, 8)
    q, s = quantize_int8(w)
    with pytest.raises(ValueError):
        dequantize_int8(q, s, torch.empty(4, 9))
    p, s4 = quantize_int4(w)
    with pytest.raises(ValueError):
        dequantize_int4(p, s4, torch.empty(4, 10))
    with pytest.raises(ValueError, match="triton"):
        dequantize_int8(q, s, torch.empty(4, 8), backend="triton")
    with pytest.raises(ValueError):
        quantize_int8(torch.randn(8))


def test_relative_error() -> None:
    a = torch.tensor([3.0, 4.0])
    assert relative_error(a, a) == 0.0
    assert relative_error(a, torch.tensor([3.0, 5.0])) == pytest.approx(0.2)
    assert relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_error(torch.zeros(2), a) == math.inf


# ---- packed blocks ---------------------------------------------------------------------------------------------

def _aligned_256(n_bytes: int) -> int:
    return -(-n_bytes // 256) * 256


def packed_bytes_by_quantizing(weights: list[torch.Tensor], quant: Quant) -> int:
    """Bytes of the packed buffer of a block holding ``weights`` (in block order), counted without the layout code:
    quantize each real tensor that the format quantizes (2-D, both dimensions non-zero, bf16/f16/f32) and add up
    what ``quantize_int8``/``quantize_int4``/``quantize_int4g`` return (values, scales, minimums), every other
    weight's own bytes, each
    part padded to 256 bytes."""
    total = 0
    for t in weights:
        quantized = (quant != Quant.none and t.dim() == 2 and t.numel() > 0
                     and t.dtype in (torch.bfloat16, torch.float16, torch.float32))
        quantize = {Quant.int8: quantize_int8, Quant.int4: quantize_int4, Quant.int4g: quantize_int4g}.get(quant)
        parts = quantize(t) if quantized else (t,)
        total += sum(_aligned_256(p.numel() * p.element_size()) for p in parts)
    return total


def _block(weights: list[tuple[str, str, list[int]]], quant: Quant) -> tuple[Block, dict[str, Object]]:
    """A block laid out like the front end does: each weight at a 256-aligned offset."""
    objects, off = {}, 0
    for name, dtype, shape in weights:
        size = math.prod(shape) * DTYPES[dtype].itemsize
        objects[name] = Object(name=name, kind=ObjectKind.weight, dtype=dtype, shape=shape, size_bytes=size,
                               home=Tier.host, block="b", block_offset_bytes=off)
        off += -(-size // 256) * 256
    return Block(name="b", module="b", size_bytes=off, weights=[w[0] for w in weights], quant=quant), objects


def _program(block: Block, objects: dict[str, Object]) -> Program:
    return Program(name="t", model=ModelRef(ref="t", kind="py"), fingerprint="", shape=RunShape(batch=1, seq=1),
                   objects=list(objects.values()), blocks=[block])


LAYER = [("w", "bf16", [96, 130]), ("norm", "bf16", [130]), ("bias", "bf16", [96]),
         ("w2", "bf16", [64, 256]), ("pos", "i64", [3, 5]), ("up", "f16", [33, 1])]


def _tensors(objects: dict[str, Object], seed: int = 6) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    out = {}
    for name, o in objects.items():
        if o.dtype == "i64":
            out[name] = torch.randint(-(2**40), 2**40, o.shape, generator=g)
        else:
            out[name] = torch.randn(o.shape, generator=g).to(DTYPES[o.dtype])
    return out


@pytest.mark.parametrize("quant", [Quant.int8, Quant.int4, Quant.int4g, Quant.none])
def test_pack_unpack_block(quant: Quant) -> None:
    block, objects = _block(LAYER, quant)
    tensors = _tensors(objects)
    layout = quant_layout(block, objects)
    total = quantized_block_bytes(block, objects)

    # layout: in block order, parts 256-aligned, non-overlapping, in bounds
    assert [e.name for e in layout] == block.weights
    spans = sorted((p.offset_bytes, p.offset_bytes + p.size_bytes) for e in layout for p in e.parts())
    assert all(a % PART_ALIGN_BYTES == 0 for a, _ in spans)
    assert all(e0 <= a1 for (_, e0), (a1, _) in zip(spans, spans[1:]))
    assert spans[-1][1] <= total and total % PART_ALIGN_BYTES == 0
    expected = {"w": quant.value, "w2": quant.value, "up": quant.value} if quant != Quant.none else {}
    assert {e.name: e.storage.value for e in layout} == {n: expected.get(n, "raw") for n in block.weights}

    # pack into a dirty destination larger than needed: the packed bytes (with zeroed padding) end at `total`
    dst = torch.full((total + 512,), 0xAB, dtype=torch.uint8)
    pack_block(block, objects, tensors, dst)
    assert (dst[total:] == 0xAB).all()
    gaps = torch.ones(total, dtype=torch.bool)
    for a, b in spans:
        gaps[a:b] = False
    assert (dst[:total][gaps] == 0).all()
    packed = dst[:total].clone()
    pack_block(block, objects, tensors, dst)                     # deterministic
    assert torch.equal(dst[:total], packed)

    slot = torch.full((block.size_bytes,), 0xCD, dtype=torch.uint8)
    unpack_block(block, objects, packed, slot)
    for e in layout:
        o = objects[e.name]
        got = slot[o.block_offset_bytes:o.block_offset_bytes + o.size_bytes].view(DTYPES[o.dtype]).view(o.shape)
        t = tensors[e.name]
        if e.storage == Storage.raw:
            assert torch.equal(got.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
        else:
            want = torch.empty_like(t)
            if e.storage == Storage.int8:
                dequantize_int8(*quantize_int8(t), want)
            elif e.storage == Storage.int4:
                dequantize_int4(*quantize_int4(t), want)
            else:
                dequantize_int4g(*quantize_int4g(t), want)
            assert torch.equal(got, want), e.name
            assert relative_error(t, got) < (1e-2 if quant == Quant.int8 else 1.5e-1)
        # padding between weights in the slot is not written
        end = o.block_offset_bytes + o.size_bytes
        pad_end = -(-end // 256) * 256
        assert (slot[end:pad_end] == 0xCD).all()
    if quant == Quant.none:
        assert total == block.size_bytes
        for e in layout:   # the raw layout is the block layout: packed == the block's own flat buffer
            o = objects[e.name]
            assert e.values.offset_bytes == o.block_offset_bytes
            span = slice(o.block_offset_bytes, o.block_offset_bytes + o.size_bytes)
            assert torch.equal(packed[span], slot[span])


def test_pack_block_errors() -> None:
    block, objects = _block(LAYER, Quant.int8)
    tensors = _tensors(objects)
    total = quantized_block_bytes(block, objects)
    with pytest.raises(ValueError, match="needs"):
        pack_block(block, objects, tensors, torch.empty(total - 1, dtype=torch.uint8))
    bad = dict(tensors, w=tensors["w"].float())
    with pytest.raises(ValueError, match="plan says"):
        pack_block(block, objects, bad, torch.empty(total, dtype=torch.uint8))
    with pytest.raises(ValueError, match="needs"):
        unpack_block(block, objects, torch.empty(total - 256, dtype=torch.uint8),
                     torch.empty(block.size_bytes, dtype=torch.uint8))


# ---- costs.transfer_bytes against the bytes packing produces -------------------------------------------------

def _n_parts(block: Block, objects: dict[str, Object]) -> int:
    return sum(len(e.parts()) for e in quant_layout(block, objects))


@pytest.mark.parametrize("quant", [Quant.int8, Quant.int4, Quant.int4g])
def test_transfer_bytes_are_what_packing_produces(quant: Quant) -> None:
    # What a visit copies is the packed buffer with its 256-byte-aligned parts: costs must count exactly that.
    block, objects = _block([("wq", "bf16", [512, 4096]), ("norm", "bf16", [4096]), ("wo", "f16", [96, 130]),
                             ("b", "f32", [96]), ("emb", "f32", [1000, 64])], quant)
    tensors = _tensors(objects)
    tb = transfer_bytes(block, _program(block, objects))
    assert tb == packed_bytes_by_quantizing([tensors[w] for w in block.weights], quant)
    # and a packed buffer of exactly that size holds the block
    dst = torch.full((tb,), 0xAB, dtype=torch.uint8)
    pack_block(block, objects, tensors, dst)
    payload = quantized_payload_bytes(block, objects)
    assert payload <= tb < payload + PART_ALIGN_BYTES * _n_parts(block, objects)


def test_bytes_int4_odd_input_pads_rows() -> None:
    shapes = [[96, 129], [7, 1], [1, 3]]
    block, objects = _block([(f"w{i}", "bf16", s) for i, s in enumerate(shapes)], Quant.int4)
    # rows are padded to whole bytes: each row of an odd input dimension carries one pad nibble
    packed_values = [o * -(-i // 2) for o, i in shapes]
    scales = [o * -(-i // 128) * 2 for o, i in shapes]
    assert quantized_payload_bytes(block, objects) == sum(packed_values) + sum(scales)
    # 96x129: 6240 -> 6400 and 384 -> 512; 7x1: 7 -> 256 and 14 -> 256; 1x3: 2 -> 256 and 2 -> 256
    assert transfer_bytes(block, _program(block, objects)) == 6400 + 512 + 4 * 256


def test_bytes_unquantized_and_non_float_2d() -> None:
    block, objects = _block(LAYER, Quant.none)
    assert transfer_bytes(block, _program(block, objects)) == block.size_bytes
    assert quantized_block_bytes(block, objects) == block.size_bytes
    # a 2-D integer buffer stays raw, and costs counts it raw too: 4 * 8 int64 values are 256 bytes, one part
    block, objects = _block([("pos", "i64", [4, 8])], Quant.int8)
    assert quantized_payload_bytes(block, objects) == 4 * 8 * 8
    assert transfer_bytes(block, _program(block, objects)) == 256


def test_bytes_on_traced_model() -> None:
    from memintent.compiler.compile import trace_ref
    from memintent.models.refs import resolve

    ref = "py:examples/toy_mlp.py:mlp_stack"
    prog = trace_ref(ref, RunShape(batch=1, seq=1))
    objects = prog.object_map()
    values = dict(resolve(ref).module.named_parameters())   # the factory's real weights
    for b in prog.blocks:
        assert b.size_bytes == transfer_bytes(b, prog)       # unquantized: the front end's block buffer
        assert quantized_block_bytes(b, objects) == b.size_bytes
        for quant in (Quant.int8, Quant.int4, Quant.int4g):
            bq = b.model_copy(update={"quant": quant})
            tb = transfer_bytes(bq, prog)
            assert tb == packed_bytes_by_quantizing([values[w].detach() for w in b.weights], quant)
            assert quantized_payload_bytes(bq, objects) <= tb < (quantized_payload_bytes(bq, objects)
                                                                + PART_ALIGN_BYTES * _n_parts(bq, objects))
