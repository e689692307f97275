"""Every promise a plan makes is checked: the planned peak bounds the measured one, only proven shapes run, and the
host memory a plan states is checked before anything is filled."""

from __future__ import annotations

import json

import pytest
import torch

from memintent.engine.core import RunOptions
from memintent.cli import main
from memintent.commands.generate import serve
from memintent.compiler.compile import compile_model
from memintent.compiler.hardware import BUILTIN
from memintent.compiler.planner import plan_generation
from memintent.engine.requests import synthetic
from memintent.ir.plan_file import save_plan
from memintent.runtime import host_store

CPU = BUILTIN["cpu"]


@pytest.mark.parametrize("budget_bytes,batch,seq,quant", [(1 << 20, 1, 16, "none"), (2 << 20, 2, 64, "none"),
                                                          (8 << 20, 4, 128, "none"), (1 << 20, 2, 32, "int4"),
                                                          (3 << 19, 1, 48, "int8")])
def test_planned_peak_bounds_the_cpu_backends_measured_peak_in_forwards(tmp_path, budget_bytes, batch, seq, quant):
    plan = tmp_path / "p.json"
    save_plan(compile_model("tiny-llama", budget_bytes=budget_bytes, hardware=CPU, batch=batch, seq=seq, quant=quant),
              plan)
    out = tmp_path / "run.json"
    assert main(["run", str(plan), "--device", "cpu", "--forwards", "2", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert 0 < rep["peak_hbm_bytes"] <= rep["predicted_peak_bytes"] <= budget_bytes, rep


@pytest.mark.parametrize("kv_quant,budget_bytes", [("none", 3 << 20), ("int8", 3 << 20), ("none", 6 << 20)])
def test_planned_peak_bounds_the_measured_peak_of_engine_steps(kv_quant, budget_bytes):
    p = plan_generation("tiny-llama", budget_bytes=budget_bytes, hardware=CPU, context=48, prompt_len=8, gen_len=8,
                        quant="none", kv_page_tokens=4, dtype="f32", kv_quant=kv_quant)
    rep, _, _ = serve(p, synthetic(30, (2, 40), (1, 8), 512, seed=1), RunOptions(device=torch.device("cpu")))
    assert rep.steps >= 5 and max(rep.kv_over_time) > 0
    assert 0 < rep.peak_hbm_bytes <= p.prediction.peak_hbm_bytes <= budget_bytes


@pytest.mark.parametrize("kv_quant", ["none", "int8"])
def test_a_plan_for_the_attention_kernel_bounds_the_reference_backends_peak(kv_quant):
    """A plan for a card that runs the attention kernel holds no room for gathering half the pool; where the reference
    backend runs it (here, the CPU), it gathers decode sequences in chunks within the plan's scratch."""
    hw = CPU.model_copy(update={"attention": "kernel"})
    p = plan_generation("tiny-llama", budget_bytes=3 << 20, hardware=hw, context=48, prompt_len=8, gen_len=8,
                        quant="none", kv_page_tokens=4, dtype="f32", kv_quant=kv_quant)
    rep, _, _ = serve(p, synthetic(40, (30, 40), (4, 8), 512, seed=2), RunOptions(device=torch.device("cpu")))
    assert max(rep.kv_over_time) >= p.kv_pool.num_pages // 2     # decodes of many sequences at once
    graphs = next(o.size_bytes for o in p.objects if o.name == "step.graphs")   # the CPU captures none
    assert 0 < rep.peak_hbm_bytes <= p.prediction.peak_hbm_bytes - graphs


@pytest.fixture(scope="module")
def plan_1x64(tmp_path_factory):
    path = tmp_path_factory.mktemp("promise") / "p.json"
    save_plan(compile_model("tiny-llama", budget_bytes=1 << 20, hardware=CPU, batch=1, seq=64), path)
    return path


def test_run_refuses_a_shape_the_plan_did_not_prove(plan_1x64, capsys, monkeypatch):
    filled = []
    monkeypatch.setattr(host_store.HostStore, "fill", lambda self, *a, **k: filled.append(1))
    assert main(["run", str(plan_1x64), "--device", "cpu", "--tokens", "3x40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tokens 3x40" in err[0] and "the plan proves 1x64 only" in err[0], err
    assert not filled, "refused before the host store is filled"


def test_a_host_store_larger_than_the_machine_is_refused_before_filling(plan_1x64, capsys, monkeypatch):
    from memintent.runtime import device

    allocated = []
    real = host_store._aligned_empty
    monkeypatch.setattr(device, "available_host_bytes", lambda: 100_000)
    monkeypatch.setattr(host_store, "_aligned_empty", lambda *a, **k: allocated.append(1) or real(*a, **k))
    assert main(["run", str(plan_1x64), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "of host memory" in err[0] and "97.66 KiB available" in err[0], err
    assert not allocated, "nothing was allocated for the host store"


def test_generation_plan_states_its_host_memory_and_explain_shows_it(tmp_path, capsys):
    p = plan_generation("tiny-llama", budget_bytes=3 << 20, hardware=CPU, context=48, prompt_len=8, gen_len=8,
                        quant="int8", kv_page_tokens=4, dtype="f32", swap_pages=16)
    pr, pool = p.prediction, p.kv_pool
    streamed = [b for b in p.blocks if b.residency.value == "streamed"]
    assert pr.host_pinned_bytes >= sum(b.transfer_bytes for b in streamed) + 16 * pool.page_bytes
    assert pr.host_pageable_bytes > 0
    path = tmp_path / "g.json"
    save_plan(p, path)
    assert main(["explain", str(path)]) == 0
    out = capsys.readouterr().out
    assert "host memory:" in out and "pinned" in out and "KV pool:" in out and "preemption by cost" in out
