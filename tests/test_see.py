"""The "See" tools: predicted timeline, Chrome trace, HTML report, hardware profile and their CLI commands.

CPU only and fast; no assertion depends on how fast this machine is (profile numbers are checked for shape and
sign, never for value).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

import memintent
from memintent import progress

from memintent.cli import main
from memintent.compiler.compile import compile_model
from memintent.compiler.planner import plan_generation
from memintent.compiler.hardware import BUILTIN, load_profile
from memintent.models.refs import resolve
from memintent.errors import MemintentError
from memintent.ir.model import HardwareProfile, SlotKind
from memintent.ir.plan_file import load_plan, save_plan
from memintent.ir.printer import dump
from memintent.passes.verify import verify
from memintent.see.report import summarise_measured, write_report
from memintent.see.timeline import MEMORY_KINDS, build_timeline
from memintent.see.perfetto import PID_MEASURED, PID_PREDICTED, MeasuredEvent, read_measured, write_trace
from memintent.runtime.host_store import HostStore
from memintent.units import fmt_bytes, fmt_s

CPU = BUILTIN["cpu"]
# A host link so slow that the copies cannot hide behind compute: a plan with stalls.
SLOW = CPU.model_copy(update={"name": "cpu-slow-link", "h2d_gbps": 0.2})


@pytest.fixture(scope="module")
def plan():
    return compile_model("tiny-llama", budget_bytes=1 << 20, hardware=CPU, batch=1, seq=16, depth=2)


@pytest.fixture(scope="module")
def stalling_plan():
    return compile_model("tiny-llama", budget_bytes=1 << 20, hardware=SLOW, batch=1, seq=16, depth=2)


@pytest.fixture(scope="module")
def kv_plan():
    # A generation plan: an engine step with the KV pool in the arena
    return plan_generation("tiny-llama", budget_bytes=1200 << 10, hardware=CPU, context=64, prompt_len=8, gen_len=8,
                           quant="none", concurrency=2, kv_page_tokens=8)


@pytest.fixture(scope="module")
def quant_plan():
    # a budget where the copies of the int8 layers cannot all hide under compute (the plan stalls)
    return compile_model("tiny-llama", budget_bytes=3 << 18, hardware=CPU, batch=1, seq=16, quant="int8")


# Four equal layers, 16640 bytes each (Linear(64, 64) in f32: 16384 weight + 256 bias bytes), on a profile that
# makes every step cost exactly 1 s (launch overhead; the FLOP and byte terms are below float resolution) and every
# copy exactly 2 s (copy latency; the byte term likewise).
UNIT_STACK = """
import torch
from torch import nn


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)   # (2, 64)
        return x


def build():
    torch.manual_seed(0)
    return Stack(), (torch.randn(2, 64),)
"""
UNIT = HardwareProfile(name="unit", source="unit costs: 1 s per step, 2 s per copy", h2d_gbps=1e12, d2h_gbps=1e12,
                       hbm_gbps=1e12, bf16_tflops=1e12, hbm_bytes=1 << 30, launch_overhead_s=1.0,
                       copy_latency_s=2.0, workspace_bytes=0)


@pytest.fixture(scope="module")
def unit_plan(tmp_path_factory):
    factory = tmp_path_factory.mktemp("unit") / "stack.py"
    factory.write_text(UNIT_STACK)
    # 40 KiB: two stream slots (2 x 16640 B) and the activations fit, a third slot or a resident layer does not
    return compile_model(f"py:{factory}:build", budget_bytes=40 << 10, hardware=UNIT, depth=2)


@pytest.fixture(scope="module")
def plan_file(plan, tmp_path_factory):
    path = tmp_path_factory.mktemp("see") / "tiny.plan.json"
    save_plan(plan, path)
    return path


def _measured_from(tl, forwards: int = 3, extra_stall_s: float = 1e-4) -> list[MeasuredEvent]:
    """Fake measured events shaped like the predicted timeline (what the runtime would record), with an extra
    stall before the second streamed layer, on an arbitrary clock origin."""
    out = []
    t0 = 1000.0
    for f in range(forwards):
        base = t0 + f * (tl.step_time_s + extra_stall_s)
        shift = 0.0
        for st in tl.stages:
            if st.index == tl.copies[min(2, len(tl.copies) - 1)].wait_stage:
                out.append(MeasuredEvent("compute", f"wait {st.block}", base + st.start_s,
                                         base + st.start_s + extra_stall_s, f, st.block, True))
                shift = extra_stall_s
            out.append(MeasuredEvent("compute", st.name, base + st.start_s + shift, base + st.end_s + shift, f))
        for c in tl.copies:
            out.append(MeasuredEvent("copy", c.label, base + c.start_s, base + c.end_s, f, c.block))
    return out


# ---------------------------------------------------------------------------------------------------------------
# timeline


def test_timeline_of_a_unit_cost_plan_worked_by_hand(unit_plan):
    """Four 1 s layers, each streamed by a 2 s copy through two slots (round robin: layers 0, 2 in slot 0, layers
    1, 3 in slot 1). Each copy is issued when its slot's previous occupant is freed: layer 2 on entry to stage 1,
    layer 3 on entry to stage 2, the next forward's layer 0 on entry to stage 3 and layer 1 at the forward's end.

    Cold forward: copies 0 (0-2), 1 (2-4); stage 0 waits to 2, runs 2-3; stage 1 (entry 3) issues copy 2, which
    starts when the engine frees at 4 and ends at 6, waits for copy 1 (4), runs 4-5; stage 2 (entry 5) issues
    copy 3 (6-8), waits for copy 2 (6), runs 6-7; stage 3 (entry 7) issues the next layer 0 (8-10), waits for
    copy 3 (8), runs 8-9; the end (9) issues the next layer 1 (10-12). First forward: 9 s.
    Steady forward, times from its start: the copy engine is never idle (4 x 2 s of copies per 8 s forward), so
    copies run back to back from -1: layer 0 -1..1 (issued -2, at the previous stage 3 entry), layer 1 1..3
    (issued 0), layer 2 3..5 (issued 2), layer 3 5..7 (issued 4). Stage s is entered at 2s, waits 1 s for its
    copy, runs 2s+1..2s+2. Forward: 8 s, of which 4 s compute and 4 s stall, 1 s charged to each copy."""
    tl = build_timeline(unit_plan)
    assert (tl.step_time_s, tl.first_step_time_s, tl.compute_s, tl.stall_s) == (8.0, 9.0, 4.0, 4.0)
    assert tl.copy_busy_s == 8.0 and tl.copy_busy_frac == 1.0 and tl.prefetch_depth == 2
    assert [(st.entry_s, st.start_s, st.end_s, st.stall_s) for st in tl.stages] == [
        (0.0, 1.0, 2.0, 1.0), (2.0, 3.0, 4.0, 1.0), (4.0, 5.0, 6.0, 1.0), (6.0, 7.0, 8.0, 1.0)]
    assert [st.issued for st in tl.stages] == [(), ("layers.2@2",), ("layers.3@3",), ("layers.0@0",)]
    assert [(c.label, c.slot, c.issue_stage, c.next_forward, c.wait_stage, c.free_stage) for c in tl.copies] == [
        ("layers.0@0", 0, 3, True, 0, 1), ("layers.1@1", 1, 4, True, 1, 2),
        ("layers.2@2", 0, 1, False, 2, 3), ("layers.3@3", 1, 2, False, 3, 4)]
    assert [(c.issue_s, c.start_s, c.end_s, c.ready_s) for c in tl.copies] == [
        (-2.0, -1.0, 1.0, 1.0), (0.0, 1.0, 3.0, 3.0), (2.0, 3.0, 5.0, 5.0), (4.0, 5.0, 7.0, 7.0)]
    assert [(c.deadline_s, c.slack_s, c.stall_s) for c in tl.copies] == [(2.0 * i, -1.0, 1.0) for i in range(4)]
    assert tl.streamed_bytes == 4 * 16640 and all(c.transfer_bytes == c.block_bytes == 16640 for c in tl.copies)
    # Memory: two 16640 B stream slots, both held at every step (each slot's next occupant is copied in as soon
    # as the previous one is freed); (2, 64) f32 activations of 512 B: the model's input (its caller holds it for
    # the whole forward) and each layer's output, which lives while the next layer runs; at step 0 the input is the
    # layer's input itself, so 2 x 512 B there and 3 x 512 B at steps 1-3; no KV, no workspace.
    assert [(m.step, m.stage, m.start_s) for m in tl.memory] == [(i, i, 2.0 * i + 1) for i in range(4)]
    for m, act in zip(tl.memory, (1024, 1536, 1536, 1536)):
        assert (m.resident_bytes, m.stream_allocated_bytes, m.stream_occupied_bytes, m.kv_bytes,
                m.activation_bytes, m.workspace_bytes) == (0, 33280, 33280, 0, act, 0)
    assert tl.peak.step == 1 and tl.peak.total_bytes == 34816
    # and the compiler recorded the same numbers in the plan
    pr = unit_plan.prediction
    assert (pr.step_time_s, pr.first_step_time_s, pr.stall_s, pr.peak_hbm_bytes) == (8.0, 9.0, 4.0, 34816)


@pytest.mark.parametrize("which", ["plan", "stalling_plan", "kv_plan", "quant_plan"])
def test_timeline_agrees_with_the_plans_visits(which, request):
    p = request.getfixturevalue(which)
    tl = build_timeline(p)
    assert len(tl.stages) == len(p.stages) and len(tl.memory) == len(p.steps)
    streamed_visits = [v for v in p.visits if v.issue_stage is not None]
    assert [c.block for c in tl.copies] and len(tl.copies) == len(streamed_visits)
    for c in tl.copies:
        v = p.visits[c.visit]
        assert (c.slot, c.issue_stage, c.next_forward) == (v.slot, v.issue_stage, v.issue_next_forward)
        assert c.ready_s == pytest.approx(v.arrive_s) and c.ready_slack_s == pytest.approx(v.slack_s)  # unpacked too
        assert c.ready_slack_s == pytest.approx(c.deadline_s - c.ready_s) and c.ready_s >= c.end_s


@pytest.mark.parametrize("which", ["plan", "stalling_plan", "kv_plan", "quant_plan"])
def test_memory_never_exceeds_budget_and_peak_equals_prediction(which, request):
    """The exact relation: the allocated kinds at step ``prediction.peak_step`` add up to
    ``prediction.peak_hbm_bytes`` (= arena + activation peak + workspace), that step is the first maximum of the
    per-step total, and resident + stream slots + KV = the arena at every step."""
    p = request.getfixturevalue(which)
    verify(p)
    tl = build_timeline(p)
    pr = p.prediction
    for m in tl.memory:
        assert m.total_bytes <= p.budget_bytes
        assert 0 <= m.stream_occupied_bytes <= m.stream_allocated_bytes
        assert m.occupied_total_bytes <= m.total_bytes
        assert m.resident_bytes + m.stream_allocated_bytes + m.kv_bytes == pr.arena_bytes == p.arena.size_bytes
    at_peak = tl.memory[pr.peak_step]
    assert sum(getattr(at_peak, attr) for _, attr in MEMORY_KINDS) == pr.peak_hbm_bytes
    assert at_peak.total_bytes == pr.peak_hbm_bytes
    assert tl.peak.step == pr.peak_step and tl.peak.total_bytes == pr.peak_hbm_bytes
    assert at_peak.activation_bytes == pr.activation_peak_bytes
    if which == "kv_plan":
        assert at_peak.kv_bytes == pr.kv_bytes > 0
    # Stream slots are occupied at some step (the plan streams) and never by more visits than there are slots.
    slot_bytes = [s.size_bytes for s in p.arena.slots if s.kind == SlotKind.stream]
    if slot_bytes:
        assert max(m.stream_occupied_bytes for m in tl.memory) > 0


@pytest.mark.parametrize("which", ["stalling_plan", "quant_plan"])
def test_stall_is_attributed_to_blocks_exactly(which, request):
    tl = build_timeline(request.getfixturevalue(which))
    assert tl.stall_s > 0
    assert sum(c.stall_s for c in tl.copies) == pytest.approx(tl.stall_s)
    assert sum(tl.stall_by_block().values()) == pytest.approx(tl.stall_s)
    for st in tl.stages:
        charged = sum(c.stall_s for c in tl.copies if c.wait_stage == st.index)
        assert charged == pytest.approx(st.stall_s, abs=1e-12)
        assert st.start_s == pytest.approx(st.entry_s + st.stall_s)
    for c in tl.copies:
        # A copy with negative slack made compute wait at least until it was ready.
        assert c.ready_s <= tl.stages[c.wait_stage].start_s + 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Chrome trace


def _x_events(doc, pid, lane):
    tids = {e["tid"] for e in doc["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"
            and e["pid"] == pid and e["args"]["name"] == lane}
    assert len(tids) == 1
    return [e for e in doc["traceEvents"] if e["ph"] == "X" and e["pid"] == pid and e["tid"] in tids]


@pytest.mark.parametrize("which", ["plan", "stalling_plan", "quant_plan"])
def test_trace_has_both_lanes_in_consistent_order(which, request, tmp_path):
    p = request.getfixturevalue(which)
    tl = build_timeline(p)
    path = tmp_path / "pred.trace.json"
    write_trace(path, predicted=tl)
    doc = json.loads(path.read_text())
    names = {(e["pid"], e["name"]): e["args"]["name"] for e in doc["traceEvents"]
             if e["ph"] == "M" and e["name"] == "process_name"}
    assert names[(PID_PREDICTED, "process_name")] == "predicted"
    compute = _x_events(doc, PID_PREDICTED, "compute")
    copy = _x_events(doc, PID_PREDICTED, "copy")
    assert compute and copy
    for e in compute + copy:
        assert e["dur"] >= 0 and e["ts"] >= 0
    # The compute lane is one stream: intervals in order, none overlapping.
    compute.sort(key=lambda e: e["ts"])
    for a, b in zip(compute, compute[1:]):
        assert a["ts"] + a["dur"] <= b["ts"] + 1e-6
    assert [e["args"]["stage"] for e in compute if e["cat"] == "stage"] == list(range(len(p.stages)))
    # The copy engine is FIFO: each copy starts after the previous one ends.
    copy.sort(key=lambda e: e["ts"])
    for a, b in zip(copy, copy[1:]):
        assert a["ts"] + a["dur"] <= b["ts"] + 1e-6
    # Each copy lands before compute starts the stage that waits for it.
    stage_start = {e["args"]["stage"]: e["ts"] for e in compute if e["cat"] == "stage"}
    for c in tl.copies:
        ev = next(e for e in copy if e["name"] == c.label)
        assert ev["ts"] + ev["dur"] <= stage_start[c.wait_stage] + 1e-6
    # Dequantisation (quantized blocks only) has its own lane, after the copy's arrival.
    if any(c.ready_s > c.end_s for c in tl.copies):
        deq = _x_events(doc, PID_PREDICTED, "dequant")
        assert len(deq) == sum(c.ready_s > c.end_s for c in tl.copies)
        for e in deq:
            c = next(c for c in tl.copies if e["name"] == f"dequant {c.label}")
            arrival = next(x for x in copy if x["name"] == c.label)
            assert e["ts"] == pytest.approx(arrival["ts"] + arrival["dur"]) and e["dur"] > 0
    stalls = [e for e in compute if e["cat"] == "stall"]
    assert bool(stalls) == (tl.stall_s > 0)
    counters = [e for e in doc["traceEvents"] if e["ph"] == "C"]
    assert counters and all(e["args"]["allocated"] <= e["args"]["budget"] for e in counters
                            if e["name"] == "HBM total (bytes)")


def test_write_trace_read_measured_round_trip(plan, tmp_path):
    tl = build_timeline(plan)
    measured = _measured_from(tl)
    path = tmp_path / "run.trace.json"
    write_trace(path, predicted=tl, measured=measured)
    assert read_measured(path) == measured
    doc = json.loads(path.read_text())
    for lane in ("compute", "copy"):
        evs = _x_events(doc, PID_MEASURED, lane)
        assert evs and all(e["dur"] >= 0 and e["ts"] >= 0 for e in evs)
    # measured only, and an empty measured list
    write_trace(path, measured=measured[:5])
    assert read_measured(path) == measured[:5]
    write_trace(path, measured=[])
    assert read_measured(path) == []
    # a predicted-only trace holds nothing measured
    write_trace(path, predicted=tl)
    with pytest.raises(MemintentError, match="no measured events"):
        read_measured(path)
    with pytest.raises(ValueError):
        MeasuredEvent("gpu", "x", 0.0, 1.0, 0)
    with pytest.raises(ValueError):
        MeasuredEvent("copy", "x", 1.0, 0.5, 0)


def test_write_trace_is_atomic(plan, tmp_path, monkeypatch):
    tl = build_timeline(plan)
    path = tmp_path / "t.json"
    write_trace(path, predicted=tl)
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(MemintentError, match="No space left"):
        write_trace(path, measured=_measured_from(tl, forwards=1))
    monkeypatch.undo()
    assert path.read_bytes() == before                 # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]   # no temporary left behind
    with pytest.raises(MemintentError, match="does not exist"):
        write_trace(tmp_path / "missing" / "t.json", predicted=tl)


def test_read_measured_bad_files(tmp_path):
    with pytest.raises(MemintentError, match="does not exist"):
        read_measured(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MemintentError, match="not JSON"):
        read_measured(bad)
    bad.write_text('{"something": 1}')
    with pytest.raises(MemintentError, match="not a Chrome trace"):
        read_measured(bad)


# ---------------------------------------------------------------------------------------------------------------
# report


def test_report_html_and_pngs(plan, tmp_path):
    out = tmp_path / "report.html"
    written = write_report(plan, out)
    assert written[-1] == out
    html = out.read_text()
    assert html.count("<img") == 3 and "data:image/png;base64," in html
    assert plan.name in html and "budget" in html
    for name in ("memory", "timeline", "stall"):
        png = tmp_path / f"report-{name}.png"
        assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for b in plan.blocks:
        assert f">{b.name}<" in html


def test_report_with_measured_trace(stalling_plan, tmp_path):
    tl = build_timeline(stalling_plan)
    measured = _measured_from(tl)
    summary = summarise_measured(measured)
    assert summary.forwards == [0, 1, 2] and summary.steady == [1, 2] and summary.shown_forward == 2
    assert summary.stall_s == pytest.approx(1e-4)
    assert sum(summary.stall_by_block_s.values()) == pytest.approx(1e-4)
    out = tmp_path / "run.html"
    write_report(stalling_plan, out, measured=measured)
    html = out.read_text()
    assert "measured stall" in html and html.count("<img") == 3
    assert (tmp_path / "run-timeline.png").exists()


# ---------------------------------------------------------------------------------------------------------------
# CLI


def test_cli_simulate_prints_the_plans_step_time(plan_file, tmp_path, capsys):
    trace = tmp_path / "sim.trace.json"
    assert main(["simulate", str(plan_file), "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    pr = load_plan(plan_file).prediction
    steady = next(line for line in out.splitlines() if line.startswith("step time:"))
    assert f"steady {fmt_s(pr.step_time_s)}," in steady
    assert f"cold {fmt_s(pr.first_step_time_s)}" in steady
    assert "copy engine busy" in out and "peak HBM" in out and "layers.0" in out
    doc = json.loads(trace.read_text())
    assert _x_events(doc, PID_PREDICTED, "compute") and _x_events(doc, PID_PREDICTED, "copy")


def test_cli_report(plan_file, plan, tmp_path, capsys):
    run = tmp_path / "run.trace.json"
    write_trace(run, predicted=build_timeline(plan), measured=_measured_from(build_timeline(plan)))
    out = tmp_path / "r.html"
    assert main(["report", str(plan_file), "--trace", str(run), "-o", str(out)]) == 0
    assert "<img" in out.read_text()
    assert sorted(p.name for p in tmp_path.glob("r-*.png")) == ["r-memory.png", "r-stall.png", "r-timeline.png"]


@pytest.mark.parametrize("which", ["plan", "quant_plan"])
def test_cli_run_trace_on_cpu_feeds_report(which, request, tmp_path, capsys):
    """The CPU backend records its own intervals: one compute span per forward, the copies (and dequantizations
    of a quantized plan) the runtime ran, which ``report --trace`` then reads."""
    p = request.getfixturevalue(which)
    plan_path, trace = tmp_path / "p.plan.json", tmp_path / "run.trace.json"
    save_plan(p, plan_path)
    assert main(["run", str(plan_path), "--device", "cpu", "--forwards", "3", "--trace", str(trace)]) == 0
    measured = read_measured(trace)
    assert sorted({m.forward for m in measured}) == [0, 1, 2]
    streamed = [v for v in p.visits if v.issue_stage is not None]
    labels = sorted(f"{v.block}@{v.first_stage}" for v in streamed)
    quantized = sorted(f"dequant {v.block}" for v in streamed if p.block_map()[v.block].quant.value != "none")
    assert bool(quantized) == (which == "quant_plan")
    for f in range(3):
        fwd = [m for m in measured if m.forward == f]
        spans = [m for m in fwd if m.lane == "compute" and m.name == "forward"]
        copies = [m for m in fwd if m.lane == "copy"]
        assert len(spans) == 1 and spans[0].duration_s > 0
        assert sorted(m.name for m in copies) == labels        # every planned copy, recorded by the runtime
        assert all(m.duration_s > 0 and m.block == m.name.split("@")[0] for m in copies)
        assert sorted(m.name for m in fwd if m.name.startswith("dequant ")) == quantized
        assert not any(m.stall for m in fwd)                     # CPU copies are synchronous: no wait to measure
    # one clock: the copy engine's intervals in order, never overlapping, across forwards too
    copies = sorted((m for m in measured if m.lane == "copy"), key=lambda m: m.start_s)
    assert all(a.end_s <= b.start_s for a, b in zip(copies, copies[1:]))
    out = tmp_path / "r.html"
    assert main(["report", str(plan_path), "--trace", str(trace), "-o", str(out)]) == 0
    assert "measured forwards" in out.read_text()


def test_cli_profile_cpu_quick_feeds_compile(tmp_path, capsys):
    prof = tmp_path / "cpu.profile.json"
    assert main(["profile", "-o", str(prof), "--device", "cpu", "--quick"]) == 0
    hw = load_profile(str(prof))
    assert isinstance(hw, HardwareProfile)
    assert hw.source.startswith("measured on ") and f"by memintent profile (torch {torch.__version__})" in hw.source
    for rate in (hw.h2d_gbps, hw.d2h_gbps, hw.hbm_gbps, hw.bf16_tflops, hw.dequant_gbps, hw.dequant_int4_gbps,
                 hw.hbm_bytes):
        assert rate > 0
    assert hw.launch_overhead_s > 0 and hw.copy_latency_s > 0 and hw.workspace_bytes == 0
    plan_path = tmp_path / "p.plan.json"
    assert main(["compile", "tiny-llama", "--hw", str(prof), "--budget", "1MiB", "--seq", "16",
                 "-o", str(plan_path)]) == 0
    assert load_plan(plan_path).hardware == hw


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memintent: error:"), err
    return err[0]


def test_cli_bad_input_exits_2_with_one_line(plan_file, plan, tmp_path, capsys):
    missing = tmp_path / "missing.plan.json"
    for argv in (["simulate", str(missing)], ["report", str(missing), "-o", str(tmp_path / "r.html")]):
        assert main(argv) == 2
        assert "does not exist" in _one_line_error(capsys)
    # unwritable outputs: a folder that does not exist, a path that is a folder
    for argv in (["report", str(plan_file), "-o", str(tmp_path / "no" / "r.html")],
                 ["report", str(plan_file), "-o", str(tmp_path)],
                 ["simulate", str(plan_file), "--trace", str(tmp_path / "no" / "t.json")],
                 ["profile", "-o", str(tmp_path / "no" / "p.json"), "--device", "cpu", "--quick"]):
        assert main(argv) == 2, argv
        _one_line_error(capsys)
    # a trace that is not there, and a program without a plan
    assert main(["report", str(plan_file), "--trace", str(tmp_path / "none.json"), "-o",
                 str(tmp_path / "r.html")]) == 2
    _one_line_error(capsys)
    unplanned = tmp_path / "traced.plan.json"
    save_plan(plan.model_copy(update={"arena": None, "prediction": None, "actions": []}), unplanned)
    assert main(["simulate", str(unplanned)]) == 2
    assert "no plan" in _one_line_error(capsys)
    if not torch.cuda.is_available():
        assert main(["profile", "-o", str(tmp_path / "p.json"), "--device", "cuda"]) == 2
        assert "CUDA is not available" in _one_line_error(capsys)


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"memintent {memintent.__version__}"


def test_cli_compile_names_its_hardware_profile(tmp_path, capsys):
    out = tmp_path / "p.plan.json"
    assert main(["compile", "tiny-llama", "--hw", "cpu", "--budget", "1MiB", "--seq", "16", "-o", str(out)]) == 0
    assert f"hardware profile cpu (built in): {BUILTIN['cpu'].source}" in capsys.readouterr().err
    # the default is named as the default
    assert main(["compile", "tiny-llama", "--budget", "64MiB", "--seq", "16", "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"hardware profile h100-sxm (built in, the default: pass --hw to plan for another card): " \
           f"{BUILTIN['h100-sxm'].source}" in err
    prof = tmp_path / "hw.json"
    prof.write_text(CPU.model_copy(update={"name": "my-cpu", "source": "measured here"}).model_dump_json())
    assert main(["compile", "tiny-llama", "--hw", str(prof), "--budget", "1MiB", "--seq", "16", "-o", str(out)]) == 0
    assert f"hardware profile my-cpu (from {prof}): measured here" in capsys.readouterr().err


def test_cli_check_prints_sizes_in_units(plan_file, plan, capsys):
    assert main(["check", str(plan_file)]) == 0
    err = capsys.readouterr().err
    assert (f"ok ({len(plan.steps)} steps, {len(plan.actions)} actions; peak "
            f"{fmt_bytes(plan.prediction.peak_hbm_bytes)} <= budget 1.00 MiB)") in err


def _run_json(argv, tmp_path, capsys) -> tuple[dict, str]:
    out = tmp_path / "run.json"
    assert main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def _table_header(out: str) -> list[str]:
    line = next(line for line in out.splitlines() if "wall" in line and "forward" in line)
    return [c.strip() for c in re.split(r"[┃|]", line)]


def test_cli_run_columns_keep_one_meaning(plan_file, tmp_path, capsys):
    """The "PCIe floor" column is always streamed bytes / measured H2D; the resident forward, measured only with
    --verify, has its own column."""
    base = ["run", str(plan_file), "--device", "cpu", "--forwards", "1"]
    rep, out = _run_json(base, tmp_path, capsys)
    assert "PCIe floor" in _table_header(out) and "resident" not in _table_header(out)
    assert rep["pcie_floor_s"] == rep["streamed_bytes"] / (rep["h2d_gbps"] * 1e9) and rep["resident_s"] is None
    assert (rep["inputs"], rep["tokens"]) == ("tokens 1x16", "1x16") and "on cpu, tokens 1x16" in out
    rep, out = _run_json([*base, "--verify"], tmp_path, capsys)
    assert _table_header(out)[-2:] == ["PCIe floor", "resident"]
    assert rep["pcie_floor_s"] == rep["streamed_bytes"] / (rep["h2d_gbps"] * 1e9) and rep["resident_s"] > 0
    row = next(line for line in out.splitlines() if line.strip().startswith("0 "))
    assert [c.strip() for c in row.split("│")][-2:] == [fmt_s(rep["pcie_floor_s"]), fmt_s(rep["resident_s"])]


def test_cli_run_accepts_ir_text_and_verifies_it(plan, tmp_path, capsys):
    mir = tmp_path / "tiny.mir"
    mir.write_text(dump(plan))
    rep, out = _run_json(["run", str(mir), "--device", "cpu", "--forwards", "1", "--verify"], tmp_path, capsys)
    assert rep["identical"] is True and "bitwise identical" in out
    edited = tmp_path / "edited.mir"    # a budget below the plan's peak: refused by the verifier, nothing runs
    edited.write_text(mir.read_text().replace(f"budget {plan.budget_bytes} B", "budget 4096 B", 1))
    assert main(["run", str(edited), "--device", "cpu"]) == 2
    assert "plan verification failed" in _one_line_error(capsys)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "toy_mlp.py"


def test_example_commands_work_and_run_names_the_factory_inputs(tmp_path, capsys, monkeypatch):
    """The commands in examples/toy_mlp.py's docstring run as written (from the repository root); the run header
    names the factory's own inputs, and --tokens, which does not apply to them, is refused."""
    commands = [shlex.split(line.strip())[1:] for line in EXAMPLE.read_text().split('"""')[1].splitlines()
                if line.strip().startswith("memintent ")]
    assert [c[0] for c in commands] == ["compile", "run"]
    monkeypatch.chdir(EXAMPLE.parents[1])
    plan_path = tmp_path / "toy.plan.json"
    for argv in commands:
        argv = [str(plan_path) if a == "toy.plan.json" else a for a in argv]
        assert main(argv) == 0, argv
    assert "on cpu, the factory's example inputs 4x256 float32" in capsys.readouterr().out
    assert main(["run", str(plan_path), "--device", "cpu", "--allow-code", "--tokens", "1x64"]) == 2
    assert "leave --tokens out" in _one_line_error(capsys)


# ---------------------------------------------------------------------------------------------------------------
# progress


class _Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_progress_lines_worked_by_hand():
    clock, log = _Clock(), io.StringIO()
    with progress.bar("filling host weights", 40_800_000_000, console=Console(file=log), clock=clock,
                      interval_s=3600) as b:
        assert b.line() == "filling host weights: 0.0 of 40.8 GB, 0.0 GB/s, time left unknown"
        b.advance(12_300_000_000)
        clock.now_s += 1.5                                    # 12.3 GB in 1.5 s: 8.2 GB/s, 28.5 GB left: 3.5 s
        assert b.line() == "filling host weights: 12.3 of 40.8 GB, 8.2 GB/s, 3 s left"
        b.advance(28_500_000_000)
        clock.now_s += 125.3                                  # 40.8 GB in 126.8 s
        assert b.closing_line() == "filling host weights: 40.8 GB in 2 min 07 s, 0.3 GB/s"
    with progress.status("compiling llama-3-70b", console=Console(file=log), clock=clock, interval_s=3600) as s:
        s.update("compiling llama-3-70b: tracing")
        clock.now_s += 7250.0
        assert s.line() == "compiling llama-3-70b: tracing (2 h 00 min)"
        assert s.closing_line() == "compiling llama-3-70b: done in 2 h 00 min"
    assert log.getvalue() == ""                              # shorter than the interval: nothing logged


def test_progress_off_a_terminal_logs_a_line_every_interval():
    log = io.StringIO()
    console = Console(file=log)
    assert not console.is_terminal
    with progress.bar("filling host weights", 2_000_000, console=console, interval_s=0.02) as b:
        b.advance(1_000_000)
        time.sleep(0.3)                                      # no update meanwhile: the timer still reports
    lines = log.getvalue().splitlines()
    assert len(lines) >= 3
    for line in lines[:-1]:
        assert re.fullmatch(r"filling host weights: 1\.0 of 2\.0 MB, \d+\.\d MB/s, \d+ s left", line), line
    assert re.fullmatch(r"filling host weights: 1\.0 MB in \d+ s, \d+\.\d MB/s", lines[-1])
    log = io.StringIO()
    with pytest.raises(RuntimeError), progress.status("compiling x", console=Console(file=log), interval_s=0.02):
        time.sleep(0.1)
        raise RuntimeError("failed")
    lines = log.getvalue().splitlines()
    assert lines and all(re.fullmatch(r"compiling x \(\d+ s\)", line) for line in lines)   # no "done" line


def test_progress_on_a_terminal_is_a_live_display():
    log = io.StringIO()
    console = Console(file=log, force_terminal=True, width=100)
    with progress.bar("filling host weights", 2_000_000, console=console, interval_s=0.01) as b:
        b.advance(2_000_000)
        time.sleep(0.05)
    with progress.status("compiling x", console=console, interval_s=0.01) as s:
        s.update("compiling x: tracing")
        time.sleep(0.05)
    assert "\x1b[" in log.getvalue()                         # drawn with terminal control sequences
    assert not re.search(r"of 2\.0 MB, |\(\d+ s\)$", log.getvalue(), re.M)   # not the plain log lines


def test_host_fill_and_compile_log_progress_off_a_terminal(plan, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "INTERVAL_S", 0.01)
    store = HostStore(plan, pin="none")
    src = resolve("tiny-llama")

    def slow_fill(named):
        time.sleep(0.02)
        src.fill_weights(named)

    store.fill(slow_fill, progress=True)
    err = capsys.readouterr().err.splitlines()
    assert 1e6 <= store.source_nbytes < 1e9                   # so it is counted in MB
    total = f"{store.source_nbytes / 1e6:.1f} MB"
    assert any(re.fullmatch(rf"filling host weights: \d+\.\d of {total}, .* left", line) for line in err), err
    assert err[-1].startswith(f"filling host weights: {total} in ")
    assert main(["compile", "tiny-llama", "--hw", "cpu", "--budget", "1MiB", "--seq", "16", "-o",
                 str(tmp_path / "p.plan.json")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert any(re.fullmatch(r"compiling tiny-llama: .* \(\d+ s\)", line) for line in err), err
    assert any(re.fullmatch(r"compiling tiny-llama: done in \d+ s", line) for line in err), err
