"""Streamed blocks held in the KV pool's spare pages (engine/spare_pages.py, spec/runtime.md "Spare pages"): the
tokens are the engine's without them, bit for bit; the pool's invariants hold with blocks owning pages; a request
arriving takes their pages back a step later; the simulated run holds the same blocks in the same steps, and the
cost model counts their copies within HBM."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from memintent.commands.generate import serve
from memintent.compiler.hardware import BUILTIN
from memintent.compiler.planner import StepPredictor, is_attention, plan_generation
from memintent.compiler.workload import OpCosts, StepTimes
from memintent.engine import Engine
from memintent.engine.core import RunOptions
from memintent.engine.requests import synthetic
from memintent.engine.sequence import Request
from memintent.engine.simulate import simulate_run, workload_of
from memintent.errors import MemintentError, RuntimeFault
from memintent.passes.costs import spare_page_blocks, spread_order
from memintent.runtime.page_run import PageRun

CPU = BUILTIN["cpu"]


@pytest.fixture(scope="module")
def plan():
    """tiny-llama float32 with int8 weights at 2 MiB: its four layers stream, and the pool (33 pages of 32 KiB)
    holds all four (184 KiB each) once the last requests run."""
    p = plan_generation("tiny-llama", budget_bytes=2 << 20, hardware=CPU, context=60, prompt_len=20, gen_len=10,
                        quant="int8", dtype="f32")
    assert p.generation.spare_pages == "on" and len(spare_page_blocks(p)) == 4
    return p


def requests(seed: int = 0):
    return synthetic(24, (4, 40), (2, 20), 256, seed)


def run(plan, reqs, **options):
    with Engine(plan, device="cpu", **options) as engine:
        outs = {o.id: o.token_ids for o in engine.generate(reqs)}
        pool = engine.pool
        assert pool.used_pages == 0 and pool.free_pages + pool.spare_pages == pool.num_pages - 1
        return outs, engine.stats.steps


def test_held_blocks_give_the_tokens_of_streamed_ones_and_keep_the_pools_invariants(plan):
    # checked mode: every step checks the pool's invariants (blocks own pages as sequences do), poisons what is
    # freed, and the arena's freed slots: a block read from pages that did not hold it would turn into NaN
    held, steps = run(plan, requests(), check=True)
    plain, plain_steps = run(plan, requests(), check=True, spare_pages=False)
    assert held == plain
    assert max(s.spare_blocks for s in steps) == 4, "every block was held in the tail"
    assert all(s.spare_blocks == 0 for s in plain_steps)
    assert sum(len(s.preemptions) for s in steps) > 0, "the run also preempts: blocks never take a sequence's pages"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_simulated_run_holds_the_blocks_the_engine_holds(plan, seed):
    reqs = requests(seed)
    sim = simulate_run(plan, workload_of(reqs, "test"), StepPredictor(plan))
    _, steps = run(plan, reqs)
    key = lambda r: (r.tokens, r.sequences, r.used_pages, r.spare_blocks, len(r.preemptions))  # noqa: E731
    assert [key(r) for r in sim.records] == [key(r) for r in steps]
    assert any(r.spare_blocks for r in steps)


def test_requests_arriving_take_the_blocks_pages_back_a_step_later(plan):
    late = [Request(f"late-{i}", tuple(range(1 + i, 51 + i)), max_new_tokens=8) for i in range(6)]
    with Engine(plan, device="cpu", check=True) as engine:
        for r in requests():
            engine.add(r)
        while engine.spare.held < 4:
            engine.step()
        for r in late:
            engine.add(r)
        engine.step()
        # requests wait: the blocks gave their pages up, which stay theirs while the step before may still read them
        assert engine.scheduler.waiting and engine.spare.held == 0 and engine.pool.spare_pages == 24
        engine.step()
        filling = sum(n for _, n in engine.spare.order[:engine.spare.filling])
        assert engine.spare.held == 0 and engine.pool.spare_pages == filling
        outs = {}
        while engine.has_work:
            outs.update({o.id: o.token_ids for o in engine.step()})
    alone, _ = run(plan, late, spare_pages=False)
    assert {k: outs[k] for k in alone} == alone


def test_the_cost_model_copies_held_blocks_within_hbm(plan):
    h200 = plan.model_copy(update={"hardware": BUILTIN["h200"].model_copy(
        update={"hbm_bytes": plan.hardware.hbm_bytes})})
    predictor = StepPredictor(h200)
    fast = StepTimes(OpCosts(predictor.step, h200.hardware, is_attention), h200, h200.kv_pool,
                     predictor.src.n_heads, predictor.src.head_dim, predictor.src.n_kv_heads)
    records = simulate_run(h200, workload_of(requests(), "t"), predictor).records
    assert any(r.spare_blocks for r in records)
    want = np.array([predictor.predict_s(r) for r in records])
    assert np.allclose(fast.predict_all(records), want, rtol=1e-9, atol=0)
    # a decode step of one sequence is bound by the host link: each held block takes its copy off it
    one = next(r for r in records if r.spare_blocks == 4 and r.tokens == 1)
    times = [predictor.predict_s(type(one)(**{**{f: getattr(one, f) for f in one.__dataclass_fields__},
                                               "spare_blocks": k})) for k in range(5)]
    assert all(a >= b for a, b in itertools.pairwise(times)) and times[-1] < times[0], times


def test_page_runs_lay_a_block_over_whole_pages_and_part_of_the_last():
    pages = torch.zeros(10, 8, dtype=torch.uint8)          # (N, page_bytes)
    block = torch.arange(1, 20, dtype=torch.uint8)        # 19 bytes: two whole pages and 3 bytes of a third
    r = PageRun(pages, [5, 2, 7], 19)
    r.scatter(block)
    assert pages[5].tolist() == list(range(1, 9)) and pages[2].tolist() == list(range(9, 17))
    assert pages[7].tolist() == [17, 18, 19, 0, 0, 0, 0, 0]
    assert int(pages[[0, 1, 3, 4, 6, 8, 9]].sum()) == 0, "no other page written"
    out = torch.zeros(30, dtype=torch.uint8)
    r.gather(out[4:23])
    assert torch.equal(out[4:23], block) and int(out[:4].sum()) == int(out[23:].sum()) == 0
    with pytest.raises(RuntimeFault, match="needs 3 pool pages"):
        PageRun(pages, [5, 2], 19)
    with pytest.raises(RuntimeFault, match="needs 3 pool pages"):
        PageRun(pages, [5, 0, 7], 19)                     # the null page is never a block's


def test_only_streamed_blocks_visited_once_can_be_held(plan):
    with Engine(plan, device="cpu") as engine:
        handle = engine.runners[0].handle
        pages = engine.runners[0].views.pages
        with pytest.raises(MemintentError, match="cannot be held in spare pages"):
            handle.hold_in_pages(pages, {"embed": [1, 2]}, {})
        name = spare_page_blocks(plan)[0].name
        with pytest.raises(MemintentError, match="cannot be held in spare pages"):
            handle.hold_in_pages(pages, {name: list(range(1, 8))}, {name: list(range(8, 15))})
        handle.hold_in_pages(pages, {}, {})
        assert not handle.holds_pages


def test_the_run_report_counts_the_steps_that_copied_from_spare_pages(plan):
    rep, _, engine = serve(plan, requests(), RunOptions(device=torch.device("cpu")))
    held = [s.spare_blocks for s in engine.stats.steps]
    assert rep.spare_steps == sum(1 for k in held if k) > 0 and rep.spare_blocks_max == max(held) == 4
    off, _, _ = serve(plan, requests(), RunOptions(device=torch.device("cpu"), spare_pages=False))
    assert off.spare_steps == off.spare_blocks_max == 0


def test_blocks_held_while_requests_wait_leave_every_schedule_as_it_was():
    # The 70B plan at 24 GiB (H200 profile, int8 KV; simulated, nothing runs): its pool fills over the first steps
    # of prompts while requests wait. Blocks take the pages beyond what the next two schedules can allocate, so each
    # schedule is the one without them (the same tokens, sequences, pages and preemptions), and the run is shorter.
    plan = plan_generation("llama-3-70b", budget_bytes=24 << 30, hardware=BUILTIN["h200"], quant="int4",
                           kv_quant="int8", context=1152, prompt_len=544, gen_len=72)
    off = plan.model_copy(update={"generation": plan.generation.model_copy(update={"spare_pages": "off"})})
    reqs = synthetic(256, (64, 1024), (16, 128), 128256, seed=0)
    held = simulate_run(plan, workload_of(reqs, "mix"), StepPredictor(plan))
    plain = simulate_run(off, workload_of(reqs, "mix"), StepPredictor(off))
    key = lambda r: (r.tokens, r.sequences, r.used_pages, len(r.preemptions))  # noqa: E731
    assert [key(r) for r in held.records] == [key(r) for r in plain.records]
    # requests wait until the steps have carried every prompt token: blocks are held in those steps
    prompts = sum(len(r.prompt_ids) for r in reqs)
    waiting = list(itertools.takewhile(lambda i: sum(r.tokens for r in held.records[:i + 1]) < prompts,
                                       range(len(held.records))))
    assert len(waiting) > 20 and all(held.records[i].spare_blocks for i in waiting[1:20])
    assert held.prediction.run_s < 0.95 * plain.prediction.run_s
    assert all(r.spare_blocks == 0 for r in plain.records)


@pytest.mark.parametrize("n", [1, 2, 5, 23, 80, 96])
def test_held_blocks_are_spread_over_the_forward(n):
    # any prefix of the order leaves no run of streamed blocks longer than twice the even spacing, so the copy
    # stream, a few slots ahead of the compute, meets held blocks all through a prompt step
    order = spread_order(n)
    assert sorted(order) == list(range(n)) and order[0] == n - 1
    for m in range(1, n + 1):
        held = sorted(order[:m])
        gaps = [b - a - 1 for a, b in itertools.pairwise([-1, *held, n])]
        assert max(gaps) <= 2 * n / m, (m, held)


def test_a_runs_bound_counts_the_steps_spare_pages_shorten():
    # opt-30b at 24 GiB, 96 requests of 512 + 32 (the row; simulated, nothing runs): the ramp's steps hold
    # layers in the pool's spare pages, cheaper than the cheapest step without them, so a bound at that step
    # (18.57 s) was longer than the run it bounds (18.28 s)
    reqs = [Request(f"r{i}", (1,) * 512, max_new_tokens=32) for i in range(96)]
    plan = plan_generation("opt-30b", budget_bytes=24 << 30, hardware=BUILTIN["h200"], quant="auto", kv_quant="int8",
                           context=544, prompt_len=512, gen_len=32, workload=workload_of(reqs, "fixed"),
                           simulate=simulate_run)
    run = plan.generation.run
    assert plan.generation.spare_pages == "on" and run.steps > 0
    assert 0 < run.bound_s <= run.run_s
