"""Scheduling passes: hand-worked schedules and simulations, residency policy, pass contracts, verification catching
broken plans (one test per verifier rule: tests/test_verify_rules.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from memintent.compiler.compile import compile_model, trace_ref
from memintent.compiler.hardware import BUILTIN
from memintent.errors import MemintentError, PlanVerificationError
from memintent.ir.model import ActionKind, Residency, RunShape, SlotKind, Stage, Visit
from memintent.passes.costs import COSTS
from memintent.passes.lifetimes import LIFETIMES
from memintent.passes.manager import Pass, PassContractError, run_passes
from memintent.passes.prefetch import PREFETCH
from memintent.passes.residency import given_residency
from memintent.passes.schedule import make_schedule
from memintent.passes.simulate import simulate
from memintent.passes.verify import verify

GiB = 1 << 30
CPU = BUILTIN["cpu"]
H100 = BUILTIN["h100-sxm"]


def _chain(n: int, compute_s: float = 1.0) -> tuple[list[Stage], list[Visit]]:
    stages = [Stage(index=i, module=f"l{i}", block=f"l{i}", first_step=i, last_step=i, needs=[f"l{i}"],
                    time_s=compute_s) for i in range(n)]
    visits = [Visit(block=f"l{i}", first_stage=i, last_stage=i) for i in range(n)]
    return stages, visits


def test_simulator_unit_costs_two_slots():
    # Four layers, each 1 s of compute and a 2 s copy, all streamed through 2 slots.
    # Slots: v0, v2 -> slot 0; v1, v3 -> slot 1. v2 is issued when v0 is freed (entry of stage 1), v3 at stage 2;
    # v0 and v1 of the next forward are issued when v2 (stage 3) and v3 (forward end) are freed.
    # Cold forward: v0 copies 0-2, v1 2-4. Stage 0 waits to 2, runs 2-3. Stage 1: v2 issued at 3, starts when the
    # engine frees at 4, ends 6; stage 1 waits v1 (4), runs 4-5. Stage 2: v3 copies 6-8; waits v2 (6), runs 6-7.
    # Stage 3: v0' copies 8-10; waits v3 (8), runs 8-9. End at 9: v1' copies 10-12.  First forward: 9 s.
    # Steady forward (from 9): stage 0 waits v0' (10) runs 10-11; stage 1: v2 copies 12-14, waits v1' (12)
    # runs 12-13; stage 2: v3 14-16, runs 14-15; stage 3: v0'' 16-18, runs 16-17. Forward 9..17: 8 s, of
    # which 4 s compute and 4 s stall: exactly the copy engine's 4 x 2 s (PCIe binds).
    stages, visits = _chain(4)
    sched = make_schedule(stages, visits, {f"l{i}" for i in range(4)}, 2)
    assert [sched.slot[i] for i in range(4)] == [0, 1, 0, 1]
    assert sched.issue_stage == {0: 3, 1: 4, 2: 1, 3: 2}
    assert sched.issue_next == {0: True, 1: True, 2: False, 3: False}
    sim = simulate(stages, visits, sched, {i: 2.0 for i in range(4)})
    assert sim.first_step_time_s == pytest.approx(9.0)
    assert sim.step_time_s == pytest.approx(8.0)
    assert sim.stall_s == pytest.approx(4.0)
    assert sim.compute_s == pytest.approx(4.0)
    assert sim.stage_start_s == pytest.approx([1.0, 3.0, 5.0, 7.0])


def test_simulator_unit_costs_one_slot_serialises():
    # One slot: a copy can only start when the previous layer is freed, i.e. when the next stage is entered, so
    # copy and compute alternate: each stage costs 2 s copy + 1 s compute = 3 s; 4 stages = 12 s steady.
    stages, visits = _chain(4)
    sched = make_schedule(stages, visits, {f"l{i}" for i in range(4)}, 1)
    sim = simulate(stages, visits, sched, {i: 2.0 for i in range(4)})
    assert sim.step_time_s == pytest.approx(12.0)


def test_simulator_compute_bound_hides_copies():
    # Copies of 0.5 s under 1 s stages: with 2 slots every copy but the cold first one is hidden.
    stages, visits = _chain(4)
    sched = make_schedule(stages, visits, {f"l{i}" for i in range(4)}, 2)
    sim = simulate(stages, visits, sched, {i: 0.5 for i in range(4)})
    assert sim.step_time_s == pytest.approx(4.0)
    assert sim.first_step_time_s == pytest.approx(4.5)
    assert sim.stall_s == pytest.approx(0.0)


def test_schedule_refuses_too_few_slots_for_a_stage_needing_two_blocks():
    stages = [Stage(index=0, module="a", block="a", first_step=0, last_step=0, needs=["a", "b"], time_s=1.0)]
    visits = [Visit(block="a", first_stage=0, last_stage=0), Visit(block="b", first_stage=0, last_stage=0)]
    assert make_schedule(stages, visits, {"a", "b"}, 1) is None
    assert make_schedule(stages, visits, {"a", "b"}, 2) is not None


def test_schedule_skips_root_glue_for_waits_and_frees():
    # Stage 1 is root glue (no module, no hook). A visit starting there waits on entry to stage 0, the latest hook
    # at or before it; a visit ending at stage 0 or 1 is freed on entry to stage 2, the first hook after it.
    stages = [Stage(index=0, module="a", block="a", first_step=0, last_step=0, needs=["a"], time_s=1.0),
              Stage(index=1, module="", block="", first_step=1, last_step=1, needs=["b"], time_s=1.0),
              Stage(index=2, module="c", block="c", first_step=2, last_step=2, needs=["c"], time_s=1.0)]
    visits = [Visit(block="a", first_stage=0, last_stage=0), Visit(block="b", first_stage=1, last_stage=1),
              Visit(block="c", first_stage=2, last_stage=2)]
    sched = make_schedule(stages, visits, {"a", "b", "c"}, 3)
    assert sched.wait_stage == {0: 0, 1: 0, 2: 2}
    assert sched.free_stage == {0: 2, 1: 2, 2: 3}   # 3: the forward's end
    # a block read at a glue stage before any hook cannot stream
    assert make_schedule(stages[1:2], [Visit(block="b", first_stage=0, last_stage=0)], {"b"}, 1) is None


@pytest.fixture(scope="module")
def tiny_streamed():
    return compile_model("tiny-llama", budget_bytes=1 << 20, hardware=CPU, batch=1, seq=16, depth=2)


def test_large_budget_keeps_everything_resident():
    plan = compile_model("tiny-llama", budget_bytes=200 * GiB, hardware=H100, batch=1, seq=16)
    assert all(b.residency == Residency.resident for b in plan.blocks)
    assert plan.actions == []
    assert plan.prediction.streamed_bytes == 0


def test_streamed_plan_verifies_and_respects_budget(tiny_streamed):
    p = tiny_streamed
    assert p.prediction.peak_hbm_bytes <= p.budget_bytes
    assert sum(1 for s in p.arena.slots if s.kind == SlotKind.stream) == 2
    streamed = [b for b in p.blocks if b.residency == Residency.streamed]
    assert streamed, "a 1 MiB budget must stream some layers of tiny-llama"
    # each streamed visit: one copy_start, one copy_done, one free
    for kind in ActionKind:
        assert sum(1 for a in p.actions if a.kind == kind) == sum(
            1 for v in p.visits if v.block in {b.name for b in streamed})
    verify(p)


def test_budget_below_minimum_states_the_minimum():
    with pytest.raises(MemintentError, match=r"smallest feasible budget .* \((\d+) bytes\)"):
        compile_model("tiny-llama", budget_bytes=100_000, hardware=CPU, batch=1, seq=16)


def _broken(p, mutate):
    q = p.model_copy(deep=True)
    mutate(q)
    return q


def test_verify_catches_early_free(tiny_streamed):
    def early(q):
        a = next(a for a in q.actions if a.kind == ActionKind.free and a.stage > 0)
        a.stage = a.visit_stage   # freed on entry to the stage that still reads it
        q.actions.sort(key=lambda a: a.stage)
    with pytest.raises(PlanVerificationError, match="is freed before its last use|which holds") as e:
        verify(_broken(tiny_streamed, early))
    assert e.value.rule in ("free-after-last-use", "free-ready-occupant")


def test_verify_catches_missing_wait(tiny_streamed):
    def drop(q):
        i = next(i for i, a in enumerate(q.actions) if a.kind == ActionKind.copy_done)
        del q.actions[i]
    with pytest.raises(PlanVerificationError, match="0 copy_done") as e:
        verify(_broken(tiny_streamed, drop))
    assert e.value.rule == "one-copy-per-visit"


def test_verify_catches_overwrite_in_use(tiny_streamed):
    def same_slot(q):
        stream = [s.index for s in q.arena.slots if s.kind == SlotKind.stream]
        for a in q.actions:
            a.slot = stream[0]   # every visit into one slot while the schedule assumed two
    with pytest.raises(PlanVerificationError, match="would overwrite") as e:
        verify(_broken(tiny_streamed, same_slot))
    assert e.value.rule == "copy-into-free-slot"


def test_verify_catches_budget_lie(tiny_streamed):
    def shrink(q):
        q.budget_bytes = q.arena.size_bytes // 2
    with pytest.raises(PlanVerificationError, match="budget .* is below the plan's peak") as e:
        verify(_broken(tiny_streamed, shrink))
    assert e.value.rule == "budget"


def test_folded_trace_equals_full_trace():
    """Tracing 2 layers and repeating the second gives the same program as tracing all layers."""
    from memintent.compiler import frontend

    shape = RunShape(batch=1, seq=8)
    folded = trace_ref("tiny-llama", shape)
    assert folded.model.traced_layers == 2
    orig = frontend._fold
    try:
        frontend._fold = lambda *a, **k: []          # force the full trace
        full = trace_ref("tiny-llama", shape)
    finally:
        frontend._fold = orig
    assert full.model.traced_layers is None
    strip = lambda p: [(s.op, s.module, s.block, s.flops, s.hbm_bytes, s.uses, s.defs) for s in p.steps]  # noqa: E731
    assert strip(folded) == strip(full)
    assert folded.objects == full.objects
    assert folded.fingerprint == full.fingerprint


def _calls_ending(steps) -> list[dict[str, int]]:
    """For each step, {called module: the last step of that call}, by a forward scan: a call of module M runs while
    consecutive steps' module paths start with M (numbered children of a container are called; it is not)."""
    def called(module: str) -> list[str]:
        parts = module.split(".") if module else []
        return [".".join(parts[:d]) for d in range(1, len(parts) + 1) if d == len(parts) or not parts[d].isdigit()]
    out: list[dict[str, int]] = []
    open_: dict[str, list[int]] = {}
    for i, st in enumerate(steps):
        now = called(st.module)
        for m in list(open_):
            if m not in now:
                del open_[m]
        mine = {}
        for m in now:
            open_.setdefault(m, [])
            open_[m].append(i)
            mine[m] = open_[m]          # shared list: grows while the call lasts
        out.append(mine)
    return [{m: lst[-1] for m, lst in d.items()} for d in out]


def test_lifetimes_are_first_and_last_touch_held_by_the_calls_in_between(tiny_streamed):
    # An independent reference: scan the steps for each object's first and last mention; an activation also lives
    # to the end of each module call it is an argument of, and the model's inputs and the root forward's own values
    # to the end of the forward.
    steps = tiny_streamed.steps
    ends = _calls_ending(steps)
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    made: dict[str, int] = {}
    for i, st in enumerate(steps):
        for name in (*st.uses, *st.defs):
            first[name] = min(first.get(name, i), i)
            last[name] = max(last.get(name, i), i)
        for name in st.defs:
            made.setdefault(name, i)
    held = dict(last)
    for i, st in enumerate(steps):
        for name in st.uses:
            d = made.get(name)
            if d is None or not ends[d]:
                held[name] = len(steps) - 1
                continue
            for m, end in ends[i].items():
                if ends[d].get(m) != end:
                    held[name] = max(held[name], end)
    for o in tiny_streamed.objects:
        want_last = held.get(o.name) if o.kind.value == "buffer" else last.get(o.name)
        assert (o.first_use, o.last_use) == (first.get(o.name), want_last), o.name


def _corrupting(p: Pass, corrupt) -> Pass:
    """``p`` with its result corrupted before its own ``ensures`` sees it."""
    return Pass(p.name, lambda prog: corrupt(p.run(prog)) or prog, p.requires, p.ensures)


def test_broken_pass_fails_its_contract_naming_the_pass():
    program = trace_ref("tiny-llama", RunShape(batch=1, seq=8)).model_copy(update={"hardware": CPU})
    swap = lambda prog: prog.stages.reverse()   # noqa: E731  stages out of step order
    with pytest.raises(PassContractError, match=r"^pass lifetimes: its result breaks its contract: stages are not in "
                                                r"step order"):
        run_passes(program, [_corrupting(LIFETIMES, swap)])
    lose = lambda prog: setattr(prog.blocks[0], "transfer_bytes", None)   # noqa: E731
    with pytest.raises(PassContractError, match=r"^pass costs: .*a block has no transfer_bytes"):
        run_passes(program, [LIFETIMES, _corrupting(COSTS, lose)])


def test_contracts_hold_under_python_dash_o():
    """``ensures`` checks are not asserts: ``python -O`` (which strips asserts) still raises them."""
    script = (
        "from memintent.compiler.compile import trace_ref\n"
        "from memintent.compiler.hardware import BUILTIN\n"
        "from memintent.ir.model import RunShape\n"
        "from memintent.passes.lifetimes import LIFETIMES\n"
        "from memintent.passes.manager import Pass, PassContractError, run_passes\n"
        "p = trace_ref('tiny-llama', RunShape(batch=1, seq=8)).model_copy(update={'hardware': BUILTIN['cpu']})\n"
        "bad = Pass('lifetimes', lambda q: LIFETIMES.run(q).stages.reverse() or q, ensures=LIFETIMES.ensures)\n"
        "assert False, 'asserts must be off under -O'\n"
        "try:\n"
        "    run_passes(p, [bad])\n"
        "except PassContractError as e:\n"
        "    print('refused:', e)\n"
    )
    r = subprocess.run([sys.executable, "-O", "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert "refused: pass lifetimes: its result breaks its contract: stages are not in step order" in r.stdout


def test_prefetch_refuses_a_residency_its_schedule_cannot_hold():
    program = trace_ref("tiny-llama", RunShape(batch=1, seq=8)).model_copy(update={"hardware": CPU})
    # every block streamed, but no stream slot: not a residency the residency pass would choose
    no_slots = Pass("residency", lambda p: given_residency(p, {b.name for b in p.blocks if b.module}, 0), ("costs",))
    with pytest.raises(PassContractError, match=r"^pass prefetch: residency chose 0 stream slot\(s\), which cannot "
                                                r"hold the schedule"):
        run_passes(program, [LIFETIMES, COSTS, no_slots, PREFETCH])
