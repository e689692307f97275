"""The engine's fast path on a GPU against its reference: the attention kernel (``kv.paged_kernel``, one call per
layer over the pool) against gather + SDPA, and decode steps replayed as CUDA graphs (streamed plans' with their
copies) against the same steps run eagerly or by the resident engine. Skipped without CUDA (CI has none; the CPU
runs the kernel in Triton's interpreter: tests/test_engine_kernel.py).

Tolerances: bf16 plans, kernel vs reference: logits within 0.05 (bf16 keeps 8 significant bits: the two backends
round the softmax weights and the output at different points); float32 plans: identical greedy tokens and logits
within 1e-3 (a graph's matmuls run on a padded bucket of rows, which may pick another cuBLAS algorithm).
"""

from __future__ import annotations

import pytest
import torch
from stops import cut_at_stops

from memintent.compiler.hardware import BUILTIN
from memintent.compiler.planner import plan_generation
from memintent.engine import Engine
from memintent.engine.requests import synthetic

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CUDA = torch.device("cuda")


def _plan(dtype: str, kv_quant: str = "none", budget_bytes: int = 100 << 20, quant: str = "none"):
    return plan_generation("tiny-llama", budget_bytes=budget_bytes, hardware=BUILTIN["h200"], context=48,
                           prompt_len=8, gen_len=8, quant=quant, kv_quant=kv_quant, concurrency=6,
                           kv_page_tokens=4, dtype=dtype, max_step_tokens=64)


def _run(plan, reqs, **options):
    with Engine(plan, CUDA, preempt="recompute", **options) as eng:
        eng.track = {r.id for r in reqs}
        outs = {o.id: o.token_ids for o in eng.generate(reqs)}
        logits = {k: torch.stack(v) for k, v in eng.tracked_logits.items()}
        g = eng.runners[0].graphs
        graphed = g is not None and bool(g.graphs) and all(c is not None for c in g.graphs.values())
    return outs, logits, graphed


@pytest.mark.parametrize("kv_quant", ["none", "int8"])
def test_kernel_matches_the_reference_backend(kv_quant):
    # two cuBLAS workspaces (36 MiB each: the engine's stream and the graphs') and 1.5 MiB more: some of
    # tiny-llama's blocks stream
    plan = _plan("bf16", kv_quant, budget_bytes=int(73.5 * (1 << 20)))
    assert plan.actions
    reqs = synthetic(16, (3, 40), (2, 10), 512, seed=5)
    ko, kl, _ = _run(plan, reqs, attention="kernel")
    ro, rl, _ = _run(plan, reqs, attention="reference")
    # Compared up to each request's first differing token (inclusive): after it the two runs attend over other
    # contexts. A bf16 near-tie may flip a token, never often.
    errs, compared = [], 0
    for i in rl:
        n = next((j for j, (a, b) in enumerate(zip(ko[i], ro[i])) if a != b), min(len(ko[i]), len(ro[i])) - 1) + 1
        errs.append(float((kl[i][:n] - rl[i][:n]).abs().max()))
        compared += n
    assert compared >= sum(len(t) for t in ro.values()) // 2, "most tokens agree"
    assert max(errs) <= 0.05, max(errs)


@pytest.mark.parametrize("case", ["resident", "streamed-int8"])
def test_decode_graphs_match_eager_steps(case):
    # float32, so that only the bucket's padding separates the two runs (see the module's tolerances). Streamed: int8
    # weights stream packed and are unpacked on arrival, inside the graph.
    if case == "resident":
        plan, seed = _plan("f32"), 6
        assert not plan.actions, "the plan keeps every weight resident: its decode steps are captured"
    else:
        plan, seed = _plan("f32", budget_bytes=74 << 20, quant="int8"), 10
        assert plan.actions and any(b.quant.value == "int8" for b in plan.blocks)
    reqs = synthetic(20, (3, 30), (4, 12), 512, seed=seed)
    go, gl, graphed = _run(plan, reqs, graphs=True)
    eo, el, _ = _run(plan, reqs, graphs=False)
    assert graphed, "decode steps were replayed from CUDA graphs"
    assert go == eo
    assert max(float((gl[i] - el[i]).abs().max()) for i in el) <= 1e-3


def test_streamed_decode_graphs_equal_the_resident_engines():
    # A streamed plan's decode steps replay graphs that hold the plan's copies and events; the resident engine (every
    # weight on the device, no copies) replays graphs of the same buckets: the same kernels, so bitwise the same.
    plan = _plan("bf16", budget_bytes=int(73.5 * (1 << 20)))     # two cuBLAS workspaces (72 MiB) + 1.5
    assert plan.actions, "some blocks stream"
    reqs = synthetic(20, (3, 30), (4, 12), 512, seed=9)
    so, sl, graphed = _run(plan, reqs, spare_pages=False)   # blocks held in spare pages run eagerly
    ro, rl, resident_graphed = _run(plan, reqs, resident=True)
    assert graphed and resident_graphed, "both engines replayed every bucket's graph"
    assert so == ro
    assert all(torch.equal(sl[i], rl[i]) for i in rl)


@pytest.mark.parametrize("case", ["resident-f32", "streamed-bf16"])
def test_lookahead_generates_what_the_engine_without_it_does(case):
    # Looking ahead, a step is launched before the host read its sequences' last tokens: they are copied on the
    # device, into a graph's buffers or an eager step's ids. Same schedule, same kernels: bitwise the same tokens.
    # With stop tokens the schedules differ (a stop is read a step late), so the resident f32 plan checks where
    # each request stops.
    if case == "resident-f32":
        plan = _plan("f32")
        assert not plan.actions
    else:
        plan = _plan("bf16", budget_bytes=int(73.5 * (1 << 20)))     # two cuBLAS workspaces (72 MiB) + 1.5
        assert plan.actions, "some blocks stream"
    reqs = synthetic(20, (3, 30), (4, 12), 512, seed=8)
    # without spare pages: a step that holds blocks there runs eagerly, and the two runs may hold them in other steps
    with Engine(plan, CUDA, preempt="recompute", lookahead=False, spare_pages=False) as eng:
        plain = {o.id: o.token_ids for o in eng.generate(reqs)}
    with Engine(plan, CUDA, preempt="recompute", spare_pages=False) as eng:
        assert eng.lookahead, "on by default on CUDA"
        ahead = {o.id: o.token_ids for o in eng.generate(reqs)}
        if case == "resident-f32":
            cut, expect = cut_at_stops(reqs, plain)
            stopped = {o.id: (o.token_ids, o.finish_reason) for o in eng.generate(cut)}
        assert eng.pool.used_pages == 0
    assert ahead == plain
    if case == "resident-f32":
        assert stopped == expect


def _count_compiles():
    """A Triton hook that records each kernel variant compiled from now on (its name and specialization)."""
    triton = pytest.importorskip("triton")
    compiled: list[str] = []

    def hook(**kw):
        compiled.append(kw["repr"])

    triton.knobs.runtime.jit_post_compile_hook = hook
    return compiled


@pytest.mark.parametrize("case", ["resident", "streamed-int8"])
def test_nothing_compiles_or_captures_inside_the_run(case):
    # The engine's start compiles every kernel variant and captures every decode graph; a run of steps of many
    # shapes (prompt chunks of any length, 1 to 6 decodes, page tables of 1 to 12 pages) then compiles nothing.
    if case == "resident":
        plan = _plan("bf16")
        assert not plan.actions
    else:
        plan = plan_generation("tiny-llama", budget_bytes=int(73.5 * (1 << 20)), hardware=BUILTIN["h200"],
                               context=48, prompt_len=8, gen_len=8, quant="int8", kv_quant="int8", concurrency=6,
                               kv_page_tokens=4, dtype="bf16", max_step_tokens=64)
        assert plan.actions and any(b.quant.value == "int8" for b in plan.blocks)
    reqs = synthetic(24, (1, 40), (1, 8), 512, seed=7)
    with Engine(plan, CUDA, preempt="recompute") as eng:
        assert eng.warm_s > 0
        captured = dict(eng.runners[0].graphs.graphs) if eng.runners[0].graphs else {}
        compiled = _count_compiles()
        try:
            outs = list(eng.generate(reqs))
        finally:
            import triton
            triton.knobs.runtime.jit_post_compile_hook = None
        after = dict(eng.runners[0].graphs.graphs) if eng.runners[0].graphs else {}
    assert len(outs) == len(reqs)
    assert compiled == [], f"compiled inside the run: {compiled}"
    assert after == captured, "no decode graph was captured inside the run"
    assert captured and all(g is not None for g in captured.values()), "every bucket captured, streamed or not"
