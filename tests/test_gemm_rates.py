"""Matmul rates by weight dtype and shape (``HardwareProfile.gemm_shapes``): which table a matmul takes, and that
the costs pass and the planner's vectorized step costs both use it."""

from __future__ import annotations

from memintent.compiler.compile import compile_model
from memintent.compiler.hardware import BUILTIN
from memintent.ir.model import GemmRates
from memintent.passes.costs import gemm_tflops, is_matmul, matmul_shapes


def _profile(**rates):
    """The H200 profile with one flat rate per (dtype, in, out) entry, and none of ``memintent profile``'s."""
    shapes = [GemmRates(dtype=k.split("_")[0], in_features=int(k.split("_")[1]), out_features=int(k.split("_")[2]),
                        tflops=[(1, r), (16384, r)]) for k, r in rates.items()]
    return BUILTIN["h200"].model_copy(update=dict(gemm_shapes=shapes))


def test_a_matmul_takes_its_dtypes_rates_nearest_its_shape():
    hw = _profile(bf16_8192_8192=100.0, bf16_8192_28672=200.0, bf16_28672_8192=300.0, f16_8192_28672=400.0)
    assert gemm_tflops(hw, 64, ("bf16", 7168, 7168)) == 100.0
    assert gemm_tflops(hw, 64, ("bf16", 4096, 14336)) == 200.0      # the same ratio of in to out at another size
    assert gemm_tflops(hw, 64, ("bf16", 14336, 4096)) == 300.0
    assert gemm_tflops(hw, 64, ("f16", 28672, 7168)) == 400.0       # its dtype's only entry, whatever its shape
    legacy = gemm_tflops(hw, 64)                                    # no shape: the profile's gemm_tflops
    assert legacy not in (100.0, 200.0, 300.0, 400.0)
    assert gemm_tflops(hw, 64, ("f32", 64, 64)) == legacy           # no entry of its dtype


def test_the_costs_pass_times_each_matmul_by_its_shape():
    # tiny-llama (bf16): dim 128, MLP 352. Rates so low every matmul is compute-bound, the down projection 4 x
    # slower than the others: its steps take 4 x the time per FLOP.
    hw = _profile(bf16_128_128=1e-6, bf16_128_352=1e-6, bf16_352_128=0.25e-6)
    p = compile_model("tiny-llama", budget_bytes=64 << 20, hardware=hw, batch=1, seq=16)
    shapes = matmul_shapes(p)
    assert all((shape is not None) <= is_matmul(s.op) for s, shape in zip(p.steps, shapes))
    per_flop = {}
    for s, shape in zip(p.steps, shapes):
        if shape in (("bf16", 128, 352), ("bf16", 352, 128)) and s.flops:
            per_flop.setdefault(shape, set()).add(round(s.time_s / s.flops * 1e12, 3))
    assert per_flop == {("bf16", 128, 352): {1e6}, ("bf16", 352, 128): {4e6}}


# ---- the paged-attention kernel's decode rate by its path ------------------------------------------------------

def test_decode_attention_takes_the_rate_of_its_kernel_path():
    from memintent.passes.costs import attention_time_s

    hw = BUILTIN["h200"].model_copy(update=dict(attention_tflops=1e6, attention_gbps=1000.0, attention_int8_gbps=500.0,
                                                attention_one_row_gbps=4000.0, attention_one_row_int8_gbps=0.0))
    tb = 10 ** 12                                                         # bytes: seconds at 1000 GB/s
    assert attention_time_s(0, 4 * tb, hw, (False, False)) == 4.0
    assert attention_time_s(0, 4 * tb, hw, (False, True)) == 8.0
    assert attention_time_s(0, 4 * tb, hw, (True, False)) == 1.0
    assert attention_time_s(0, 4 * tb, hw, (True, True)) == 8.0          # not measured: int8 grouped first
    old = hw.model_copy(update=dict(attention_int8_gbps=0.0, attention_one_row_gbps=0.0))
    assert {attention_time_s(0, 4 * tb, old, k) for k in ((False, True), (True, False), (True, True))} == {4.0}


def test_a_plan_costs_its_attention_by_its_models_heads():
    # tiny-llama: 4 query heads over 2 KV heads (grouped). A profile whose one-row rate is far slower changes
    # nothing; one whose grouped rate is slower lengthens the attention steps.
    from memintent.compiler.planner import plan_generation
    from memintent.ir.model import PAGED_ATTENTION_OP

    def attention_s(**rates):
        hw = BUILTIN["h200"].model_copy(update={"attention_gbps": 1e-3, "attention_one_row_gbps": 1e-3, **rates})
        p = plan_generation("tiny-llama", budget_bytes=100 << 20, hardware=hw, context=64, prompt_len=8,
                            gen_len=8, quant="none", concurrency=2, kv_page_tokens=8)
        assert p.kv_pool.query_heads == 2 * p.kv_pool.kv_heads
        return sum(s.time_s for s in p.steps if s.op.startswith(PAGED_ATTENTION_OP))

    base = attention_s()
    assert base > 0
    assert attention_s(attention_one_row_gbps=1e-6) == base
    assert attention_s(attention_gbps=1e-6) > 10 * base
