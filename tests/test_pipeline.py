"""Pipeline parts (``compile --gpus N``): the partition, the per-part plans and their promises, and serving a
pipeline in one process and as one process per part (torchrun, gloo) against the resident whole model."""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memintent.compiler.hardware import load_profile
from memintent.models.preset import PRESETS
from memintent.compiler.pipeline import partition, plan_pipeline
from memintent.compiler.planner import trace_step
from memintent.models.part import PartSource
from memintent.models.refs import resolve
from memintent.passes.verify import verify_pipeline
from memintent.engine import requests as reqs
from memintent.engine.core import Engine
from memintent.engine.reference import compare
from memintent.errors import MemintentError
from memintent.ir.model import Residency
from memintent.ir.plan_file import load_plan_or_pipeline, load_program, save_plan

MiB = 1 << 20
CPU = load_profile("cpu")
# Small enough that every part streams weights (tiny-llama in f32 is 3.3 MiB), large enough for 8 sequences.
BUDGET_BYTES = 2 * MiB
PLAN = dict(budget_bytes=BUDGET_BYTES, hardware=CPU, context=256, prompt_len=32, gen_len=16, dtype="f32", quant="none")


@pytest.fixture(scope="module")
def two_parts():
    return plan_pipeline("tiny-llama", parts=2, **PLAN)


def _requests():
    return reqs.synthetic(10, (8, 40), (4, 12), PRESETS["tiny-llama"].vocab_size, seed=3)


# -- the partition ------------------------------------------------------------------------------------------------

def _brute_force(layers, embed, head, n):
    """The smallest possible largest part over every way to cut ``layers`` into ``n`` contiguous ranges."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(layers)), n - 1):
        bounds = (0, *cuts, len(layers))
        loads = [sum(layers[a:b]) for a, b in zip(bounds, bounds[1:])]
        loads[0] += embed
        loads[-1] += head
        best = min(best, max(loads))
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.1, 10.0), min_size=2, max_size=9), st.floats(0.0, 10.0), st.floats(0.0, 10.0),
       st.integers(1, 4))
def test_partition_is_contiguous_and_as_balanced_as_any(layers, embed, head, n):
    n = min(n, len(layers))
    ranges = partition(layers, embed, head, n)
    assert len(ranges) == n
    assert [r[0] for r in ranges] == [0] + [r[1] for r in ranges[:-1]] and ranges[-1][1] == len(layers)
    loads = [sum(layers[a:b]) for a, b in ranges]
    loads[0] += embed
    loads[-1] += head
    assert max(loads) <= _brute_force(layers, embed, head, n) * (1 + 1e-6)


def test_partition_refuses_more_parts_than_layers():
    with pytest.raises(MemintentError, match="splits into 1..3 parts"):
        partition([1.0, 1.0, 1.0], 0.0, 0.0, 4)


# -- the plans ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, budget_bytes", [(2, BUDGET_BYTES), (4, 1800 << 10)])
def test_every_part_verifies_under_its_budget_and_streams(n, budget_bytes, two_parts):
    pl = two_parts if n == 2 else plan_pipeline("tiny-llama", parts=n, **dict(PLAN, budget_bytes=budget_bytes))
    verify_pipeline(pl)
    cfg = PRESETS["tiny-llama"]
    assert [r for rng in pl.layers for r in range(*rng)] == list(range(cfg.n_layers))
    for rng, p in zip(pl.layers, pl.parts):
        assert p.model.part == rng
        assert p.budget_bytes == budget_bytes and p.prediction.peak_hbm_bytes <= budget_bytes
        layer_blocks = {b.name for b in p.blocks if b.name.startswith("layers.")}
        assert layer_blocks == {f"layers.{i}" for i in range(*rng)}
    # the parts with the embedding or the head hold more than their budget: they stream, or read in place
    streams = [any(b.residency in (Residency.streamed, Residency.mapped) for b in p.blocks) for p in pl.parts]
    assert streams[0] and streams[-1]
    assert ("embed" in {b.name for b in pl.parts[0].blocks}) and ("output" in {b.name for b in pl.parts[-1].blocks})
    assert pl.tokens_per_s == pytest.approx(pl.parts[0].generation.concurrency / n / pl.pipelined_step_s)
    assert pl.pipelined_step_s == pytest.approx(max(p.prediction.step_time_s for p in pl.parts))
    assert pl.serial_step_s == pytest.approx(sum(p.prediction.step_time_s for p in pl.parts))
    # what one step sends across a cut is the hidden states of its tokens, (1, T, dim) in the model's dtype
    T = pl.parts[0].generation.step_tokens
    assert pl.send_bytes == [T * cfg.dim * 4] * (n - 1)


def test_pipeline_file_round_trips_and_plan_readers_name_it(tmp_path, two_parts):
    path = tmp_path / "p.json"
    save_plan(two_parts, path)
    assert load_plan_or_pipeline(path) == two_parts
    with pytest.raises(MemintentError, match="is a pipeline of 2 parts"):
        load_program(path)


def test_tampered_pipeline_is_refused(two_parts):
    bad = two_parts.model_copy(update={"layers": [[0, 3], [3, 4]]})
    with pytest.raises(MemintentError, match="part 0 holds layers"):
        verify_pipeline(bad)
    s1 = two_parts.parts[1]
    other = s1.model_copy(update={"generation": s1.generation.model_copy(update={"concurrency": 1000})})
    with pytest.raises(MemintentError, match="same steps"):
        verify_pipeline(two_parts.model_copy(update={"parts": [two_parts.parts[0], other]}))
    # the first part alone: every plan in it verifies, but nothing holds the last layers and the head
    first = two_parts.model_copy(update={"parts": two_parts.parts[:1], "layers": two_parts.layers[:1]})
    with pytest.raises(MemintentError, match="the last part must end with the last layer"):
        verify_pipeline(first)
    named = two_parts.model_copy(update={"model": two_parts.model.model_copy(update={"kind": "py"})})
    with pytest.raises(MemintentError, match="is not a preset"):
        verify_pipeline(named)


# -- serving --------------------------------------------------------------------------------------------------------

def test_pipeline_in_one_process_generates_the_resident_models_tokens(two_parts):
    rs = _requests()
    with Engine(two_parts, "cpu", check=True) as e:
        e.track = {r.id for r in rs}
        outs = list(e.generate(rs))
        peaks = [r.handle.arena.size_bytes for r in e.runners.values()]
    assert {o.id for o in outs} == {r.id for r in rs}
    # micro-batches kept both parts busy: a micro-batch left the last part in every tick but the pipeline's fill
    # and drain (run one at a time, each would take two ticks)
    assert e.tick <= len(e.stats.steps) + 2 * len(two_parts.parts)
    a = compare(e.src, torch.device("cpu"), rs, outs, e.tracked_logits)
    # float32, nothing quantized: the reference's greedy tokens exactly, logits to float32 rounding
    assert a.tokens == sum(len(o.token_ids) for o in outs) and a.agreeing == a.tokens
    assert a.max_logit_error < 1e-4
    assert all(p <= BUDGET_BYTES for p in peaks)


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "memintent", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def test_one_process_per_part_matches_one_process(tmp_path, two_parts):
    """torchrun, two CPU processes over gloo: the same tokens as every part in one process, each rank under its
    part's budget."""
    plan = tmp_path / "p.json"
    save_plan(two_parts, plan)
    common = [str(plan), "--synthetic", "10", "--prompt-len", "8:40", "--gen-len", "4:12", "--seed", "3",
              "--device", "cpu", "--check"]
    local = _cli("generate", *common, "--output", str(tmp_path / "local.jsonl"))
    assert local.returncode == 0, local.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as s:          # a port nobody listens on, for the ranks' rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(port)]
    dist = subprocess.run([*torchrun, "-m", "memintent", "generate", *common, "--output", str(tmp_path / "dist.jsonl")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert dist.returncode == 0, dist.stderr[-3000:]
    tokens = lambda f: [json.loads(line)["token_ids"] for line in open(tmp_path / f)]  # noqa: E731
    assert tokens("dist.jsonl") == tokens("local.jsonl")
    assert "rank 1: peak HBM" in dist.stderr


def test_cli_compiles_and_explains_a_pipeline(tmp_path):
    out = tmp_path / "p.json"
    r = _cli("compile", "tiny-llama", "--objective", "throughput", "--gpus", "2", "--budget", "2MiB", "--hw", "cpu",
             "--dtype", "f32", "--context", "256", "--prompt-len", "32", "--gen-len", "16", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "part 1: layers 2-3" in r.stderr
    ex = _cli("explain", str(out))
    assert ex.returncode == 0 and "sends/step" in ex.stdout
    assert _cli("check", str(out)).returncode == 0


def test_trace_of_a_pipeline_run_has_a_lane_per_part_and_reports(tmp_path, two_parts):
    plan, trace = tmp_path / "p.json", tmp_path / "run.trace.json"
    save_plan(two_parts, plan)
    r = _cli("generate", str(plan), "--synthetic", "6", "--prompt-len", "8:30", "--gen-len", "3:8", "--device", "cpu",
             "--trace", str(trace))
    assert r.returncode == 0, r.stderr
    events = json.loads(trace.read_text())["traceEvents"]
    lanes = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert {"part 0", "part 1", "steps"} <= lanes
    per_part = [sum(1 for e in events if e.get("cat") == "part" and e["tid"] == 2 + k) for k in (0, 1)]
    assert per_part[0] > 0 and per_part[0] == per_part[1]     # every micro-batch ran through both parts
    rep = _cli("report", str(plan), "--trace", str(trace), "--part", "1", "-o", str(tmp_path / "r.html"))
    assert rep.returncode == 0, rep.stderr
    assert "KV pool" in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize("args, message", [
    (["--gpus", "2"], "--gpus splits a generation plan: add --objective"),
    (["--gpus", "9", "--objective", "throughput"], "splits into 1..4 parts"),
])
def test_cli_refuses_bad_part_requests_in_one_line(tmp_path, args, message):
    r = _cli("compile", "tiny-llama", "--hw", "cpu", *args, "-o", str(tmp_path / "p.json"))
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.json").exists()


def test_a_part_of_more_than_two_layers_is_traced_as_two_and_folded():
    # A part holds its layers under their whole-model names (layers "1", "2", "3" of tiny-llama's four): the front
    # end traces two of them and folds the rest in, as for a whole model; checking that the layers are alike once
    # indexed the dict by position (KeyError: 0), which failed every part of more than two layers (llama-3-70b over
    # 2, 4 or 8 GPUs).
    program = trace_step(PartSource(resolve("tiny-llama"), 1, 4), 8, 2, lambda line: None)
    assert program.model.traced_layers == 2
    layers = {o.name.split(".")[1] for o in program.objects if o.kind.value == "weight" and o.name.startswith("layers.")}
    assert layers == {"1", "2", "3"}
