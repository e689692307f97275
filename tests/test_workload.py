"""Planning against a workload (issue 22): the planner simulates the engine's own scheduler over the requests it
will serve, and the two planner faults found on the way (the smallest budget a refusal states; --depth)."""

from __future__ import annotations

import argparse
import json
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memintent.cli import _workload, main
from memintent.compiler.compile import trace_ref
from memintent.compiler.hardware import BUILTIN
from memintent.compiler.planner import StepPredictor, is_attention, plan_generation, pool_steps
from memintent.compiler.workload import OpCosts, RunWorkload, StepTimes, Targets
from memintent.engine.core import Engine
from memintent.engine.pages import PagePool
from memintent.engine.requests import synthetic
from memintent.engine.scheduler import Costs, Scheduler
from memintent.engine.sequence import Request
from memintent.engine.simulate import simulate_run, workload_of
from memintent.errors import MemintentError
from memintent.ir.model import ADMISSION_ORDERS, GemmRates, Residency, RunShape
from memintent.ir.parser import parse
from memintent.ir.plan_file import load_plan
from memintent.ir.printer import dump
from memintent.passes import schedule_program
from memintent.passes.verify import verify

CPU, H100, H200 = BUILTIN["cpu"], BUILTIN["h100-sxm"], BUILTIN["h200"]
MINIMUM = re.compile(r"smallest feasible budget .* \((\d+) bytes\)")


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---- the smallest feasible budget a refusal states ------------------------------------------------------------

def stated_minimum(program, hw, depth=None) -> int:
    with pytest.raises(MemintentError) as e:
        schedule_program(program, 4096, hw, depth=depth)
    m = MINIMUM.search(str(e.value))
    assert m, str(e.value)
    return int(m.group(1))


def assert_minimum_is_exact(program, hw, depth=None):
    """The stated minimum compiles (a plan that verifies and peaks within it); one byte less is refused, stating
    the same minimum."""
    minimum = stated_minimum(program, hw, depth)
    plan = schedule_program(program, minimum, hw, depth=depth)
    verify(plan)
    assert plan.prediction.peak_hbm_bytes <= minimum
    with pytest.raises(MemintentError, match=rf"smallest feasible budget .* \({minimum} bytes\)"):
        schedule_program(program, minimum - 1, hw, depth=depth)
    return minimum, plan


@pytest.fixture(scope="module")
def smollm2_forward(smollm2_dir):
    """The real 135M-parameter chat model in float32, traced once (a forward of 64 tokens)."""
    return trace_ref(f"hf:{smollm2_dir}", RunShape(batch=1, seq=64))


def test_stated_minimum_compiles_and_one_byte_less_does_not_real_model(smollm2_forward):
    minimum, plan = assert_minimum_is_exact(smollm2_forward, CPU)
    embed = max(plan.blocks, key=lambda b: b.size_bytes)      # the tied embedding, read by the head too
    # The fault: slots sized for the embedding although it could stay resident (two slots of it: ~218 MiB).
    assert embed.residency == Residency.resident
    assert minimum < 2 * embed.size_bytes
    assert any(b.residency == Residency.streamed for b in plan.blocks)


def test_stated_minimum_compiles_and_one_byte_less_does_not_preset():
    program = trace_ref("opt-13b", RunShape(batch=1, seq=16))
    _, plan = assert_minimum_is_exact(program, H200)
    embed = max(plan.blocks, key=lambda b: sum(1 for v in plan.visits if v.block == b.name))   # read twice (tied)
    assert embed.residency == Residency.resident and plan.prediction.prefetch_depth == 1


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_every_depth_compiles_at_its_stated_minimum(smollm2_forward, depth):
    minimum, plan = assert_minimum_is_exact(smollm2_forward, CPU, depth)
    assert plan.prediction.prefetch_depth == depth


def test_depth_one_is_not_refused_with_a_budget_above_its_minimum(smollm2_forward):
    # The issue: `--depth 1` at 240 MiB was refused as "below the smallest feasible budget 120.88 MiB".
    plan = schedule_program(smollm2_forward, 240 << 20, CPU, depth=1)
    assert plan.prediction.prefetch_depth == 1 and plan.prediction.peak_hbm_bytes <= 240 << 20


@pytest.mark.parametrize("args, match", [
    (["--depth", "0"], r"--depth 0 must be at least 1 \(leave --depth out"),
    (["--depth", "-2"], r"--depth -2 must be at least 1"),
    (["--depth", "2", "--objective", "throughput"], r"--depth is for forward plans"),
])
def test_depth_refusals_say_why(tmp_path, capsys, args, match):
    assert main(["compile", "tiny-llama", "--hw", "cpu", "-o", str(tmp_path / "p.json"), *args]) == 2
    assert re.search(match, one_line(capsys))


def test_a_depth_the_plan_cannot_use_is_said(tmp_path, capsys):
    assert main(["compile", "tiny-llama", "--hw", "cpu", "--budget", "1GiB", "--depth", "3", "-o",
                 str(tmp_path / "p.json")]) == 0
    assert "--depth 3: the plan has 0 stream slot(s), as every block is resident" in capsys.readouterr().err


# ---- the simulation is the engine's schedule -----------------------------------------------------------------

def tiny(**kw):
    args = dict(budget_bytes=2 << 20, hardware=CPU, context=60, prompt_len=20, gen_len=10, quant="none",
                dtype="f32")
    args.update(kw)
    return plan_generation("tiny-llama", **args)


def schedule_of(records):
    """What a step did, without its times: tokens by kind, sequences, pages held, preemptions by kind."""
    return [(r.tokens, r.decode_tokens, r.prefill_tokens, r.sequences, r.used_pages, r.swapped_in,
             r.decode_context_tokens, r.prefill_context_tokens, r.prefill_pairs,
             tuple((p.request, p.kind, p.pages) for p in r.preemptions)) for r in records]


@pytest.fixture(scope="module")
def small_pool_plan():
    """A plan whose pool holds fewer sequences than the requests need: steps preempt (swap and recompute)."""
    return tiny(concurrency=6)


@pytest.mark.parametrize("seed, admission, classes", [(0, "fcfs", 1), (1, "longest-output", 1), (2, "fcfs", 1),
                                                      (3, "longest-output", 1), (4, "longest-output", 6),
                                                      (5, "output-density", 1)])
def test_simulated_schedule_equals_the_engines(small_pool_plan, seed, admission, classes):
    plan = small_pool_plan.model_copy(update={"generation": small_pool_plan.generation.model_copy(
        update={"admission": admission, "admission_class_tokens": classes})})
    requests = synthetic(24, (4, 40), (2, 20), 256, seed)
    # Request ids: the simulation numbers requests by their place; synthetic ids are their place too.
    sim = simulate_run(plan, workload_of(requests, "test"), StepPredictor(plan))
    assert sim.why == "" and sim.prediction.requests == 24
    with Engine(plan, device="cpu") as engine:
        outputs = list(engine.generate(requests))
        measured = engine.stats.steps
    assert schedule_of(sim.records) == schedule_of(measured)
    assert sim.prediction.preemptions > 0, "the pool must be small enough to preempt"
    assert sim.prediction.generated_tokens == sum(len(o.token_ids) for o in outputs)
    assert sim.prediction.steps == len(measured)


def _with_shapes(hw):
    """``hw`` with matmul rates by shape for every float dtype: each shape its own curve over token counts."""
    def rows(f: float) -> list[tuple[int, float]]:
        return [(1, 0.01 * f), (64, 0.3 * f), (4096, 2.0 * f)]

    return hw.model_copy(update={"gemm_shapes": [
        GemmRates(dtype=d, in_features=k, out_features=n, tflops=rows(f)) for d in ("f32", "bf16")
        for k, n, f in ((128, 128, 1.0), (128, 512, 1.5), (512, 128, 0.7))]})


@pytest.mark.parametrize("profile", ["cpu", "h200", "h200-shapes"])
def test_step_times_are_the_step_predictors(small_pool_plan, profile):
    """The planner's vectorized step costs (``StepTimes``) are ``StepPredictor.predict_s``, step by step: on the CPU
    profile (the reference attention's bytes, one matmul rate), on the H200's (matmul rates by token count, the
    attention kernel's rates, stages bound by their launches) and with rates by the matmul's dtype and shape."""
    hw = BUILTIN[profile.removesuffix("-shapes")]
    hw = _with_shapes(hw) if profile.endswith("-shapes") else hw
    plan = small_pool_plan.model_copy(update={"hardware": hw.model_copy(
        update={"hbm_bytes": small_pool_plan.hardware.hbm_bytes})})
    predictor = StepPredictor(plan)
    fast = StepTimes(OpCosts(predictor.step, plan.hardware, is_attention), plan, plan.kv_pool,
                     predictor.src.n_heads, predictor.src.head_dim, predictor.src.n_kv_heads)
    records = simulate_run(plan, workload_of(synthetic(24, (4, 40), (2, 20), 256, 0), "t"), predictor).records
    want = np.array([predictor.predict_s(r) for r in records])
    assert np.allclose(fast.predict_all(records), want, rtol=1e-9, atol=0)
    assert any(b.residency == Residency.streamed for b in plan.blocks), "the stream schedule must be exercised"


def test_the_plans_recorded_run_is_the_engines(tmp_path):
    requests = synthetic(16, (8, 40), (4, 16), 256, 5)
    plan = tiny(budget_bytes=3 << 20, workload=workload_of(requests, "mix"), simulate=simulate_run)
    run = plan.generation.run
    with Engine(plan, device="cpu") as engine:
        list(engine.generate(requests))
        steps = engine.stats.steps
    assert run.steps == len(steps) and run.preemptions == sum(len(s.preemptions) for s in steps)
    predictor = StepPredictor(plan)
    assert run.run_s == pytest.approx(sum(predictor.predict_s(s) for s in steps if s.tokens), rel=1e-9)
    assert parse(dump(plan)) == plan, "the run round-trips through the IR text"
    assert plan.generation.admission in ADMISSION_ORDERS


def test_poisson_arrivals(small_pool_plan):
    lens = dict(prompt_lens=[16] * 12, gen_lens=[8] * 12)
    w = RunWorkload.of(lens["prompt_lens"], lens["gen_lens"], "t", arrival_rate=50.0, seed=3)
    assert w.arrivals_s[0] == 0.0 and list(w.arrivals_s) == sorted(w.arrivals_s)
    assert RunWorkload.of(lens["prompt_lens"], lens["gen_lens"], "t", arrival_rate=50.0, seed=3) == w
    predictor = StepPredictor(small_pool_plan)
    run = simulate_run(small_pool_plan, w, predictor).prediction
    assert run.arrival_rate == 50.0 and run.run_s > w.arrivals_s[-1]
    # Requests far apart: each runs alone, its first token one prompt step after it arrives.
    sparse = RunWorkload.of(lens["prompt_lens"], lens["gen_lens"], "t", arrival_rate=0.01, seed=3)
    alone = simulate_run(small_pool_plan, sparse, predictor)
    assert max(alone.prediction.concurrency) == 1
    first_steps = [r for r in alone.records if r.prefill_tokens]
    assert len(first_steps) == 12
    assert alone.prediction.ttft_p99_s == pytest.approx(max(r.time_s for r in first_steps), rel=1e-9)
    starts = sorted(r.start_s for r in first_steps)
    assert all(s >= a - 1e-12 for s, a in zip(starts, sparse.arrivals_s))


# ---- choosing by the run -------------------------------------------------------------------------------------

def engine_predicted_s(plan, requests) -> float:
    """The plan's cost model over the steps the engine really made (not wall time: CI machines are noisy)."""
    predictor = StepPredictor(plan)
    with Engine(plan, device="cpu") as engine:
        list(engine.generate(requests))
        return sum(predictor.predict_s(s) for s in engine.stats.steps if s.tokens)


def test_workload_plan_beats_the_steady_state_plan_and_the_engine_agrees():
    requests = synthetic(8, (32, 32), (8, 8), 256, 0)
    w = workload_of(requests, "8 x 32+8")
    kw = dict(budget_bytes=4000 << 10, context=40, prompt_len=32, gen_len=8)
    steady = tiny(**kw)
    planned = tiny(**kw, workload=w, simulate=simulate_run)
    steady_run = simulate_run(steady, w, StepPredictor(steady)).prediction.run_s
    assert planned.generation.run.run_s < 0.95 * steady_run
    assert engine_predicted_s(planned, requests) < 0.95 * engine_predicted_s(steady, requests)
    assert planned.generation.alternatives and steady.generation.run is None


def test_opt30b_on_a_whole_h200_keeps_every_weight_resident_for_64_requests():
    w = RunWorkload.of([512] * 64, [32] * 64, "64 requests of 512 + 32")
    plan = plan_generation("opt-30b", budget_bytes=H200.hbm_bytes, hardware=H200, context=544, prompt_len=512,
                           gen_len=32, quant="none", workload=w, simulate=simulate_run)
    assert all(b.residency == Residency.resident for b in plan.blocks)
    assert plan.generation.run.preemptions == 0 and plan.generation.concurrency <= 64


def test_latency_targets_are_met_or_refused():
    requests = synthetic(12, (8, 24), (4, 12), 256, 0)
    w = workload_of(requests, "t")
    loose = tiny(objective="latency", workload=w, simulate=simulate_run, targets=Targets(ttft_s=10.0, tpot_s=1.0))
    assert loose.generation.run.ttft_p99_s <= 10.0 and loose.generation.objective == "latency"
    with pytest.raises(MemintentError, match=r"no plan meets p99 time to first token <= 1.0 us .* the closest"):
        tiny(objective="latency", workload=w, simulate=simulate_run, targets=Targets(ttft_s=1e-6))


def test_longest_output_first_admits_the_longest_requests_first():
    pool = PagePool(64)
    costs = Costs(page_tokens=4, step_tokens=64, evict_page_s=0.0, swap_in_page_s=0.0, recompute_page_s=0.0,
                  copy_idle_s=0.0, compute_slack_s=0.0, urgency_s=0.0)
    sched = Scheduler(pool, None, costs, max_seqs=2, step_tokens=64, context=64, admission="longest-output")
    for i, n in enumerate([3, 9, 1, 9, 5]):
        sched.add(Request(id=i, prompt_ids=(1, 2), max_new_tokens=n))
    batch = sched.schedule()
    assert [c.seq.request.id for c in batch.chunks] == [1, 3]     # the longest outputs, ties first come
    classed = Scheduler(PagePool(64), None, costs, max_seqs=3, step_tokens=64, context=64, admission="longest-output",
                        admission_class_tokens=4)
    for i, n in enumerate([3, 5, 1, 9, 7]):                       # classes 0, 1, 0, 2, 1
        classed.add(Request(id=i, prompt_ids=(1, 2), max_new_tokens=n))
    # the longest class first (9), then first come within the next (5 before 7), not 9, 7, 5
    assert [c.seq.request.id for c in classed.schedule().chunks] == [3, 1, 4]
    with pytest.raises(MemintentError, match="admission order 'lifo'"):
        Scheduler(pool, None, costs, max_seqs=2, step_tokens=64, context=64, admission="lifo")


def test_output_density_admits_long_outputs_with_short_prompts_first():
    costs = Costs(page_tokens=4, step_tokens=4096, evict_page_s=0.0, swap_in_page_s=0.0, recompute_page_s=0.0,
                  copy_idle_s=0.0, compute_slack_s=0.0, urgency_s=0.0)
    sched = Scheduler(PagePool(1024), None, costs, max_seqs=5, step_tokens=4096, context=2048,
                      admission="output-density")
    # (prompt tokens, max_new_tokens) and g*g / (p + g/2) by hand: 66.7, 71.4, 15.4, 3.6, 71.4
    for i, (p, g) in enumerate([(100, 100), (10, 50), (1000, 128), (64, 16), (10, 50)]):
        sched.add(Request(id=i, prompt_ids=(1,) * p, max_new_tokens=g))
    # the densest first, ties first come; the longest output (128) waits behind shorter ones with short prompts
    assert [c.seq.request.id for c in sched.schedule().chunks] == [1, 4, 0, 2, 3]


def test_the_planner_weighs_output_density():
    # A pool that holds about ten of 48 mixed requests: output-density's simulated run on the planner's plan is
    # shorter than longest-output's and first come's, and the planner weighed it (its pick or an alternative).
    w = workload_of(synthetic(48, (4, 40), (2, 24), 256, 0), "mix")
    plan = tiny(budget_bytes=2 << 20, workload=w, simulate=simulate_run)
    runs = {a: simulate_run(plan, w, StepPredictor(plan), admission=a, admission_class_tokens=1).prediction.run_s
            for a in ADMISSION_ORDERS}
    assert runs["output-density"] < min(runs["longest-output"], runs["fcfs"])
    g = plan.generation
    assert g.admission == "output-density" or any("output-density" in a for a in g.alternatives)


# ---- the command line ----------------------------------------------------------------------------------------

def test_compile_explain_generate_with_a_workload_file(tmp_path, capsys):
    requests = synthetic(8, (8, 24), (4, 8), 256, 1)
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"id": r.id, "prompt_ids": list(r.prompt_ids),
                                        "max_new_tokens": r.max_new_tokens, "ignore_eos": True}) + "\n"
                            for r in requests))
    plan = tmp_path / "p.json"
    assert main(["compile", "tiny-llama", "--hw", "cpu", "--budget", "3MiB", "--dtype", "f32", "--workload",
                 str(path), "-o", str(plan)]) == 0
    assert "predicted run of requests.jsonl: 8 requests" in capsys.readouterr().err
    assert main(["explain", str(plan)]) == 0
    out = capsys.readouterr().out
    assert "predicted run of requests.jsonl" in out and "concurrency over the run" in out and "rejected:" in out
    run = load_plan(plan).generation.run
    assert 0 < run.bound_s <= run.run_s                  # a bound: no simulated run beats it
    assert "no run of these requests under this plan is shorter than" in " ".join(out.split())
    assert main(["generate", str(plan), "--prompts", str(path), "--device", "cpu"]) == 0
    err = " ".join(capsys.readouterr().err.split())      # the console wraps long lines off a terminal
    predicted = re.search(r"run predicted .*? (\d+) steps, (\d+) preemptions", err)
    measured = re.search(r"run measured .*? (\d+) steps, (\d+) preemptions", err)
    assert predicted and measured and predicted.groups() == measured.groups()


@pytest.mark.parametrize("args, match", [
    (["--workload", "x.jsonl", "--synthetic", "4"], r"--workload and --synthetic both name the requests"),
    (["--objective", "throughput", "--arrival-rate", "2"], r"--arrival-rate is for planning against requests"),
    (["--synthetic", "4", "--ttft", "0.5"], r"--ttft and --tpot are latency targets: add --objective latency"),
    (["--synthetic", "4", "--objective", "latency"], r"give --ttft S and/or --tpot S"),
    (["--synthetic", "4", "--arrival-rate", "-1"], r"--arrival-rate -1.0 must be a positive number"),
    (["--synthetic", "4", "--gpus", "2", "--objective", "throughput"], r"--synthetic: a pipeline \(--gpus\)"),
    (["--objective", "throughput", "--prompt-len", "8:16"], r"a range is for --synthetic's requests"),
    (["--synthetic", "4", "--prompt-len", "60", "--context", "32"], r"shorter than the workload's longest prompt"),
    (["--ttft", "1"], r"--ttft is for generation plans"),
])
def test_workload_flags_are_refused_in_one_line(tmp_path, capsys, args, match):
    assert main(["compile", "tiny-llama", "--hw", "cpu", "--budget", "3MiB", "-o", str(tmp_path / "p.json"),
                 *args]) == 2
    assert re.search(match, one_line(capsys))


def test_text_prompts_are_counted_with_the_folders_tokenizer(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    texts = ["What is the capital of France?", "Write a haiku about memory."]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": t, "max_new_tokens": 5 + i}) + "\n"
                            for i, t in enumerate(texts)))
    args = argparse.Namespace(model=f"hf:{smollm2_dir}", dtype=None, workload=str(path), synthetic=None,
                              gen_len=None, prompt_len=None, chat=False, seed=0, arrival_rate=None)
    w = _workload(args, lambda m: None)
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir), local_files_only=True)
    assert w.prompt_lens == tuple(len(tok(t)["input_ids"]) for t in texts) and w.gen_lens == (5, 6)


@settings(max_examples=200, deadline=None)
@given(work=st.integers(1, 5000), pool=st.integers(1, 300), step=st.integers(1, 400))
def test_pool_steps_is_the_fewest_steps_that_hold_the_pools_work(work, pool, step):
    """Step j holds at most min(pool, j x step) cached tokens: counted one step at a time."""
    held, steps = 0, 0
    while held < work:
        steps += 1
        held += min(pool, steps * step)
    assert pool_steps(work, pool, step) == steps
