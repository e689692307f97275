"""Serving on a GPU: the engine's copies (weights, swapped KV pages) on the copy stream, its attention on CUDA.
Skipped without CUDA (CI has none; benchmarks/RESULTS.md records the GPU runs)."""

from __future__ import annotations

import pytest
import torch

from memintent.engine.core import RunOptions
from memintent.commands.generate import serve
from memintent.compiler.hardware import BUILTIN
from memintent.compiler.planner import plan_generation
from memintent.engine import Engine
from memintent.engine.requests import synthetic
from memintent.ir.model import Residency

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def _plan(**kw):
    # 74.5 MiB: two cuBLAS workspaces (36 MiB each: the engine's stream and the decode graphs') and a little:
    # 5 of tiny-llama's blocks stream.
    args = dict(budget_bytes=int(74.5 * (1 << 20)), hardware=BUILTIN["h200"], context=48, prompt_len=8, gen_len=8, quant="none",
                concurrency=3, kv_page_tokens=4, swap_pages=64, dtype="f32", max_step_tokens=64)
    args.update(kw)
    return plan_generation("tiny-llama", **args)


@pytest.fixture(scope="module")
def plan():
    p = _plan()
    assert any(b.residency == Residency.streamed for b in p.blocks)
    return p


@pytest.mark.parametrize("policy", ["swap", "recompute"])
def test_cuda_engine_is_bitwise_the_resident_engine(plan, policy):
    reqs = synthetic(24, (2, 30), (1, 14), 512, seed=7)
    runs = []
    for resident in (False, True):
        # both eager: decode graphs pad to a bucket, and a matmul of more rows may round differently
        with Engine(plan, CUDA, preempt=policy, check=not resident, resident=resident, graphs=False) as eng:
            runs.append(({o.id: o.token_ids for o in eng.generate(reqs)}, eng.stats))
    (a, sa), (b, sb) = runs
    assert {p.kind for p in sa.preemptions} == {policy}
    assert a == b and [s.tokens for s in sa.steps] == [s.tokens for s in sb.steps]


def test_cuda_engine_agrees_with_the_model_alone_and_keeps_the_budget(plan):
    rep, _, _ = serve(plan, synthetic(8, (4, 24), (4, 10), 512, seed=3), RunOptions(device=CUDA), verify=True)
    assert rep.agreement == 1.0, rep.agreement            # float32, nothing quantized
    assert rep.peak_hbm_bytes <= plan.budget_bytes, (rep.peak_hbm_bytes, plan.budget_bytes)


def test_cuda_int8_kv_reports_agreement():
    rep, _, _ = serve(_plan(kv_quant="int8"), synthetic(6, (4, 16), (4, 8), 512, seed=1), RunOptions(device=CUDA), verify=True)
    assert rep.agreement >= 0.9 and rep.max_logit_error < 0.1


def test_cuda_pipeline_parts_run_eagerly_and_agree_with_the_model_alone():
    # A part's steps take or give hidden states, so no part captures decode graphs (a graph of the first part would
    # return hidden rows as logits); both parts resident at 100 MiB each, in one process.
    from memintent.compiler.pipeline import plan_pipeline
    from memintent.engine.reference import compare

    pp = plan_pipeline("tiny-llama", parts=2, budget_bytes=100 << 20, hardware=BUILTIN["h200"], context=64,
                       prompt_len=16, gen_len=8, dtype="f32", concurrency=4)
    reqs = synthetic(8, (4, 30), (3, 8), 512, seed=4)
    with Engine(pp, CUDA) as eng:
        eng.track = {r.id for r in reqs}
        outs = list(eng.generate(reqs))
        assert all(r.graphs is None for r in eng.runners.values())
    a = compare(eng.src, CUDA, reqs, outs, eng.tracked_logits)
    # float32: the kernel and the model's own attention differ by rounding only (tests/test_engine_cuda.py)
    assert a.agreeing == a.tokens == sum(len(o.token_ids) for o in outs)
    assert a.max_logit_error < 1e-3


def test_blocks_held_in_spare_pages_give_the_streamed_engines_tokens_within_the_budget():
    # int8 weights streamed packed; in the run's tail two of them are held in the pool's spare pages and copied from
    # there, within HBM (engine/spare_pages.py). Both runs eager (see above): the same kernels on the same bytes.
    plan = _plan(budget_bytes=int(75.5 * (1 << 20)), quant="int8", concurrency=12)
    reqs = synthetic(24, (2, 30), (1, 14), 512, seed=7)
    runs = []
    for spare in (True, False):
        rep, outs, eng = serve(plan, reqs, RunOptions(device=CUDA, graphs=False, check=True, spare_pages=spare))
        runs.append(({o.id: o.token_ids for o in outs}, [s.spare_blocks for s in eng.stats.steps], rep))
    (held, spare_steps, rep), (plain, plain_steps, _) = runs
    assert max(spare_steps) == 2 and max(plain_steps) == 0
    assert held == plain
    assert rep.peak_hbm_bytes <= plan.budget_bytes, (rep.peak_hbm_bytes, plan.budget_bytes)
