"""Chrome trace event files (what Perfetto and chrome://tracing open) of predicted and measured forwards.

Why this format: it is the one timeline viewer everyone already has (ui.perfetto.dev opens it in a browser, no
install), it shows two lanes against one time axis, which is exactly the question "does the copy hide behind the
compute?", and it is plain JSON that ``report --trace`` can read back.

Layout of a file written by ``write_trace``:

* process "predicted" (pid 1) and process "measured" (pid 2), each with threads "compute" (tid 1) and "copy"
  (tid 2), named by ``"ph": "M"`` metadata events;
* ``"ph": "X"`` complete events, ``ts``/``dur`` in microseconds. Predicted compute events are the stages (named by
  module) and the waits before them ("wait <block>", category "stall"); predicted copy events are the streamed
  visits' copies (named "<block>@<first stage>"); quantized blocks' dequantisation, between a copy's arrival and
  the block being usable, sits on a third predicted lane "dequant", and mapped blocks' reads in place over the
  host link ("read <block>", category "mapped") on a fourth, "mapped reads". Measured events are the ``MeasuredEvent``
  list as given;
* ``"ph": "C"`` counter events in the predicted process: "HBM by kind (bytes)" (allocated, by kind) and "HBM
  total (bytes)" (allocated, in use, budget) at each step's predicted start;
* ``"ph": "i"`` instant events "issue <block>" on the predicted compute lane where a copy is issued.

Each process has its own time origin at 0: the predicted steady-state forward is shifted so that copies issued
in the previous forward's tail (negative times in ``Timeline``) start at or after 0; measured times are shifted
so the earliest measured event starts at 0. The exact seconds are kept in each event's ``args`` so that
``read_measured`` gives back exactly what was written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal

from memintent.errors import MemintentError
from memintent.ir.model import Program
from memintent.ir.plan_file import write_atomic
from memintent.see.timeline import MEMORY_KINDS, Timeline, build_timeline

PID_PREDICTED, PID_MEASURED = 1, 2
TID_COMPUTE, TID_COPY, TID_DEQUANT, TID_MAPPED = 1, 2, 3, 4
_LANE_TID = {"compute": TID_COMPUTE, "copy": TID_COPY}
_US_PER_S = 1e6


@dataclass(frozen=True, slots=True)
class MeasuredEvent:
    """One interval measured while running a plan (the runtime turns pairs of CUDA events into these).

    lane: ``"compute"`` for the compute stream, ``"copy"`` for the copy stream.
    name: what ran. Conventions the report relies on: a copy is named after its visit, ``"<block>@<first stage>"``
        (the ``CopySpan.label`` of the predicted timeline); a stage by its module name; a wait of the compute
        stream for a copy by ``"wait <block>"`` with ``stall=True``.
    start_s, end_s: seconds on one clock for the whole run (any origin, e.g. CUDA event time elapsed from a
        reference event recorded before the first forward); ``end_s >= start_s``.
    forward: index of the forward the event serves, counting from 0. A prefetch issued in forward ``f``'s tail
        for forward ``f + 1`` carries ``forward=f + 1``, as in the predicted timeline.
    block: the block a copy or wait concerns ("" when none); used for stall per block.
    stall: a compute-lane interval spent waiting for a copy (a ``copy_done`` wait), not computing.
    """

    lane: Literal["compute", "copy"]
    name: str
    start_s: float
    end_s: float
    forward: int
    block: str = ""
    stall: bool = False

    def __post_init__(self) -> None:
        if self.lane not in ("compute", "copy"):
            raise ValueError(f"MeasuredEvent lane {self.lane!r} is not 'compute' or 'copy'")
        if not self.end_s >= self.start_s:
            raise ValueError(f"MeasuredEvent {self.name!r} ends ({self.end_s}) before it starts ({self.start_s})")

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


# ---------------------------------------------------------------------------------------------------------------
# writing


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """The output rule of every command (``ir.plan_file.write_atomic``): a regular file is replaced atomically,
    stdout, a character device or a FIFO written directly; failures are one ``MemintentError`` naming the path."""
    write_atomic(path, data)


def _meta(pid: int, process: str) -> list[dict]:
    ev = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": process}},
        {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}},
    ]
    for lane, tid in _LANE_TID.items():
        ev.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": lane}})
        ev.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid, "args": {"sort_index": tid}})
    return ev


def _x(name: str, cat: str, pid: int, tid: int, start_s: float, end_s: float, origin_s: float, args: dict) -> dict:
    return {"name": name, "cat": cat, "ph": "X", "pid": pid, "tid": tid,
            "ts": (start_s - origin_s) * _US_PER_S, "dur": max(0.0, end_s - start_s) * _US_PER_S, "args": args}


def predicted_events(tl: Timeline) -> list[dict]:
    """Trace events of a predicted timeline (process "predicted")."""
    pid = PID_PREDICTED
    # Shift so that nothing starts before 0 (prefetches from the previous forward's tail have negative times).
    origin = min([0.0] + [c.issue_s for c in tl.copies])
    ev = _meta(pid, "predicted")
    for st in tl.stages:
        if st.stall_s > 0:
            ev.append(_x("wait " + ", ".join(w.split("@")[0] for w in st.waits), "stall", pid, TID_COMPUTE,
                         st.entry_s, st.start_s, origin, {"stage": st.index, "stall_s": st.stall_s,
                                                          "waits": list(st.waits)}))
        ev.append(_x(st.name, "stage", pid, TID_COMPUTE, st.start_s, st.end_s, origin,
                     {"stage": st.index, "block": st.block, "steps": f"{st.first_step}-{st.last_step}",
                      "compute_s": st.compute_s, "issued": list(st.issued)}))
    if any(c.ready_s > c.end_s for c in tl.copies):
        # Quantized blocks are usable only after dequantisation; it gets its own lane because it may overlap the
        # next copy (a Chrome trace thread must hold nested or disjoint intervals only).
        ev.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": TID_DEQUANT, "args": {"name": "dequant"}})
        ev.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": TID_DEQUANT,
                   "args": {"sort_index": TID_DEQUANT}})
    for c in tl.copies:
        if c.ready_s > c.end_s:
            ev.append(_x(f"dequant {c.label}", "dequant", pid, TID_DEQUANT, c.end_s, c.ready_s, origin,
                         {"block": c.block}))
        ev.append(_x(c.label, "copy", pid, TID_COPY, c.start_s, c.end_s, origin,
                     {"block": c.block, "slot": c.slot, "transfer_bytes": c.transfer_bytes, "issue_s": c.issue_s,
                      "issue_stage": c.issue_stage, "previous_forward": c.next_forward,
                      "ready_s": c.ready_s, "deadline_s": c.deadline_s, "slack_s": c.slack_s}))
        ev.append({"name": f"issue {c.block}", "cat": "issue", "ph": "i", "s": "t", "pid": pid,
                   "tid": TID_COMPUTE, "ts": (c.issue_s - origin) * _US_PER_S, "args": {"visit": c.label}})
    if tl.mapped:
        ev.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": TID_MAPPED, "args": {"name": "mapped reads"}})
        ev.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": TID_MAPPED,
                   "args": {"sort_index": TID_MAPPED}})
    for m in tl.mapped:
        ev.append(_x(f"read {m.block}", "mapped", pid, TID_MAPPED, m.start_s, m.end_s, origin,
                     {"block": m.block, "stage": m.stage, "link_bytes": m.link_bytes}))
    # Memory counters: one sample per step whose values differ from the previous sample; steps of zero duration
    # (views) share a timestamp, where the last one wins. "HBM by kind" holds the allocated kinds (the Chrome
    # viewer stacks them); "HBM total" the allocated and in-use totals against the budget (Perfetto draws each
    # argument of a counter as its own track).
    samples: list[tuple[float, dict, dict]] = []
    for m in tl.memory:
        kinds = {kind: getattr(m, attr) for kind, attr in MEMORY_KINDS}
        totals = {"allocated": m.total_bytes, "in use": m.occupied_total_bytes, "budget": tl.budget_bytes}
        ts = (m.start_s - origin) * _US_PER_S
        if samples and samples[-1][0] == ts:
            samples[-1] = (ts, kinds, totals)
        elif not samples or samples[-1][1:] != (kinds, totals):
            samples.append((ts, kinds, totals))
    for ts, kinds, totals in samples:
        ev.append({"name": "HBM by kind (bytes)", "ph": "C", "pid": pid, "tid": 0, "ts": ts, "args": kinds})
        ev.append({"name": "HBM total (bytes)", "ph": "C", "pid": pid, "tid": 0, "ts": ts, "args": totals})
    return ev


def measured_events(measured: Iterable[MeasuredEvent]) -> list[dict]:
    """Trace events of measured intervals (process "measured"); exact seconds ride along in ``args``."""
    measured = list(measured)
    pid = PID_MEASURED
    ev = _meta(pid, "measured")
    origin = min((m.start_s for m in measured), default=0.0)
    for m in measured:
        cat = "stall" if m.stall else ("copy" if m.lane == "copy" else "stage")
        ev.append(_x(m.name, cat, pid, _LANE_TID[m.lane], m.start_s, m.end_s, origin,
                     {"forward": m.forward, "block": m.block, "stall": m.stall, "start_s": m.start_s,
                      "end_s": m.end_s}))
    return ev


def trace_document(predicted: Timeline | None, measured: Iterable[MeasuredEvent] | None) -> dict:
    events: list[dict] = []
    other: dict = {"generator": "memintent"}
    if predicted is not None:
        events += predicted_events(predicted)
        other.update(plan=predicted.name, hardware=predicted.hardware,
                     predicted_step_time_s=predicted.step_time_s, budget_bytes=predicted.budget_bytes)
    if measured is not None:
        events += measured_events(measured)
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def write_trace(path: str | os.PathLike, predicted: Timeline | None = None,
                measured: Iterable[MeasuredEvent] | None = None) -> None:
    """Write a Chrome trace JSON file with the predicted timeline and/or measured events, atomically."""
    doc = trace_document(predicted, measured)
    write_bytes_atomic(path, (json.dumps(doc, separators=(",", ":")) + "\n").encode())


# ---------------------------------------------------------------------------------------------------------------
# reading


def _trace_events(path: Path) -> list:
    """The ``traceEvents`` list of a Chrome trace file (or a bare event list), as data."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise MemintentError(f"trace file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MemintentError(f"trace file {path} cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise MemintentError(f"{path}:{e.lineno}:{e.colno}: not JSON ({e.msg}); expected a Chrome trace file "
                             "written by memintent") from None
    events = doc.get("traceEvents") if isinstance(doc, dict) else doc if isinstance(doc, list) else None
    if not isinstance(events, list):
        raise MemintentError(f"{path}: not a Chrome trace (no traceEvents list)")
    return events


def _metadata(events: list, name: str) -> list[dict]:
    """The ``"ph": "M"`` events called ``name`` (process_name, thread_name)."""
    return [e for e in events if isinstance(e, dict) and e.get("ph") == "M" and e.get("name") == name]


def _measured_lanes(events: list) -> tuple[dict[tuple, str], set]:
    """``({(pid, tid): lane name}, pids)`` of the threads of the processes named "measured", and their pids."""
    pids = {e.get("pid") for e in _metadata(events, "process_name") if (e.get("args") or {}).get("name") == "measured"}
    return {(e["pid"], e.get("tid")): (e.get("args") or {}).get("name", "")
            for e in _metadata(events, "thread_name") if e.get("pid") in pids}, pids


def _measured_event(e: dict, lane: str) -> MeasuredEvent:
    """One X event of a measured lane; exact seconds from ``args`` when there, else from ``ts``/``dur`` (us)."""
    a = e.get("args") or {}
    if "start_s" in a and "end_s" in a:
        start, end = float(a["start_s"]), float(a["end_s"])
    else:
        start = float(e["ts"]) / _US_PER_S
        end = start + float(e.get("dur", 0.0)) / _US_PER_S
    return MeasuredEvent(lane=lane, name=str(e.get("name", "")), start_s=start, end_s=end,
                         forward=int(a.get("forward", 0)), block=str(a.get("block", "")),
                         stall=bool(a.get("stall", e.get("cat") == "stall")))


def read_measured(path: str | os.PathLike) -> list[MeasuredEvent]:
    """The measured events of a trace file written by ``write_trace`` (in file order).

    Events are taken from the process named "measured"; their exact times come from ``args`` (``start_s``,
    ``end_s``), falling back to ``ts``/``dur`` (microseconds) for X events written by another tool."""
    path = Path(path)
    events = _trace_events(path)
    lanes, pids = _measured_lanes(events)
    if not pids:
        raise MemintentError(f"{path}: holds no measured events (no process named 'measured'): it is not the "
                             "trace of a run")
    out: list[MeasuredEvent] = []
    for e in events:
        if not isinstance(e, dict) or e.get("ph") != "X" or e.get("pid") not in pids:
            continue
        lane = lanes.get((e.get("pid"), e.get("tid")))
        if lane not in ("compute", "copy"):
            continue
        try:
            out.append(_measured_event(e, lane))
        except (KeyError, TypeError, ValueError) as err:   # includes MeasuredEvent's own checks
            raise MemintentError(f"{path}: measured event {e.get('name')!r} is malformed: {err}") from None
    return out


def _stats_event(lane: str, name: str, start_s: float, end_s: float, forward: int) -> MeasuredEvent:
    """One runtime interval (``ForwardStats.events``) as a MeasuredEvent: copies on the copy lane; waits (stalls),
    dequantizations and the forward itself on the compute lane."""
    block = name.split("@")[0]
    if lane == "copy":
        return MeasuredEvent("copy", name, start_s, end_s, forward, block=block)
    if lane == "wait":
        return MeasuredEvent("compute", f"wait {block}", start_s, end_s, forward, block=block, stall=True)
    if lane == "dequant":
        return MeasuredEvent("compute", f"dequant {block}", start_s, end_s, forward, block=block)
    return MeasuredEvent("compute", name, start_s, end_s, forward)


def stats_events(stats) -> list[MeasuredEvent]:
    """The runtime's measured intervals of each forward (CUDA events, or the CPU backend's perf_counter marks) as
    MeasuredEvents on one clock: forwards laid end to end by their measured span (the "forward" interval: device
    time on CUDA, host time on the CPU). Each forward's times are from its own start, so the time between forwards
    is not in them; a forward is placed later than end to end where that keeps the copy lane in the order the FIFO
    copy engine ran it (a prefetch issued in the previous forward's tail, at a negative time, would otherwise
    overlap that forward's last copy by the time the host spent between the forwards)."""
    out, origin, copy_free = [], 0.0, float("-inf")
    for f, st in enumerate(stats):
        first_copy = min((a for lane, _, a, _ in st.events if lane == "copy"), default=None)
        if first_copy is not None:
            origin = max(origin, copy_free - first_copy)
        span_s = 0.0
        for lane, name, a, b in st.events:
            out.append(_stats_event(lane, name, origin + a, origin + b, f))
            if lane == "compute":
                span_s = max(span_s, b)
            elif lane == "copy":
                copy_free = max(copy_free, origin + b)
        origin += span_s
    return out


def write_run_trace(path: str, program: Program, stats) -> None:
    """Predicted and measured timelines side by side, as a Chrome trace (opens in Perfetto)."""

    measured = stats_events(stats)
    write_trace(path, build_timeline(program) if program.prediction else None, measured or None)


# ---------------------------------------------------------------------------------------------------------------
# serving runs: the engine's steps, KV pool use and preemptions (process "engine", host wall clock)

PID_ENGINE = 3
KV_COUNTER = "KV pool (pages)"


def engine_events(stats) -> list[dict]:
    """An ``EngineStats`` as trace events: one interval per step (its tokens in ``args``), the KV pool's used and
    free blocks after each step as a counter, and each preemption as an instant event with both predicted costs.
    Times are the host's wall clock from the run's start (steps include the host's scheduling and the device
    sync), a clock of their own: the "measured" process holds the device's view of the same steps."""
    pid = PID_ENGINE
    ev = [{"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": "engine"}},
          {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}},
          {"ph": "M", "name": "thread_name", "pid": pid, "tid": 1, "args": {"name": "steps"}}]
    usable = max(stats.num_pages - 1, 0)
    for s in stats.steps:
        ev.append(_x(f"step {s.index}", "step", pid, 1, s.start_s, s.start_s + s.time_s, 0.0,
                     {"tokens": s.tokens, "decode_tokens": s.decode_tokens, "prefill_tokens": s.prefill_tokens,
                      "sequences": s.sequences, "swapped_in": s.swapped_in, "start_s": s.start_s,
                      "time_s": s.time_s}))
        ev.append({"name": KV_COUNTER, "ph": "C", "pid": pid, "tid": 0, "ts": (s.start_s + s.time_s) * _US_PER_S,
                   "args": {"used": s.used_pages, "free": usable - s.used_pages}})
        for p in s.preemptions:
            ev.append({"name": f"preempt {p.request} ({p.kind})", "cat": "preemption", "ph": "i", "s": "p",
                       "pid": pid, "tid": 1, "ts": s.start_s * _US_PER_S,
                       "args": {"request": p.request, "kind": p.kind, "pages": p.pages, "tokens": p.tokens,
                                "swap_s": p.swap_s, "recompute_s": p.recompute_s, "step": p.step}})
    return ev


def part_events(part_steps: dict) -> list[dict]:
    """A pipeline's parts (``Engine.part_steps``) as one lane each in the engine process: every forward of a part
    from its input's arrival to its output, on the engine's wall clock."""
    pid, ev = PID_ENGINE, []
    for r, steps in sorted(part_steps.items()):
        ev.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 2 + r, "args": {"name": f"part {r}"}})
        for s in steps:
            ev.append(_x(f"step {s.index}", "part", pid, 2 + r, s.start_s, s.start_s + s.time_s, 0.0,
                         {"tokens": s.tokens, "decode_tokens": s.decode_tokens, "time_s": s.time_s}))
    return ev


def write_serve_trace(path: str, program: Program, engine) -> None:
    """A serving run: the plan's predicted step, the runtime's measured steps and the engine's process. A
    pipeline's parts are plans of their own, on clocks of their own: its trace has the engine process with a lane
    per part instead of the one plan's predicted and measured timelines."""
    runner = engine.runners[0] if engine.n == 1 else None
    measured = stats_events(runner.forward_stats) if runner is not None else None
    predicted = build_timeline(program) if runner is not None and program.prediction else None
    doc = trace_document(predicted, measured or None)
    doc["traceEvents"] += engine_events(engine.stats) + part_events(engine.part_steps)
    doc["otherData"]["kv_pool_pages"] = max(engine.stats.num_pages - 1, 0)
    write_bytes_atomic(path, (json.dumps(doc, separators=(",", ":")) + "\n").encode())


def read_engine(path: str | os.PathLike) -> tuple[list[tuple[float, int]], list[dict], int] | None:
    """The engine process of a serving trace: (time_s, used pages) samples, preemption events' args, and the
    pool's usable pages; None when the trace has no engine process (a forward run)."""
    events = _trace_events(Path(path))
    kv = [(e["ts"] / _US_PER_S, int(e["args"]["used"])) for e in events if isinstance(e, dict)
          and e.get("pid") == PID_ENGINE and e.get("name") == KV_COUNTER and e.get("ph") == "C"]
    if not kv:
        return None
    pre = [e["args"] for e in events if isinstance(e, dict) and e.get("pid") == PID_ENGINE
           and e.get("cat") == "preemption"]
    usable = next((e["args"]["used"] + e["args"]["free"] for e in events if isinstance(e, dict)
                   and e.get("name") == KV_COUNTER and e.get("ph") == "C"), 0)
    return kv, pre, usable
