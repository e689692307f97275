"""Prefetch schedule: which stream slot each streamed visit lands in, when its copy is issued, and the arena layout.

Requires: ``residency`` (block residencies and the number of stream slots).
Ensures: every streamed visit has a slot and an issue stage; the slot-occupancy intervals of visits sharing a slot
do not overlap (checked as a colouring of their interval graph); the arena lays resident blocks, stream slots and
the KV cache end to end at aligned offsets; ``program.prediction`` holds the simulated times and the peak.

The copy for the next forward's first visits is issued in the tail of the current forward, as soon as its slot is
freed (``issue_next_forward``), so in steady state the first layers' copies hide behind the last layers' compute.
"""

from __future__ import annotations

import networkx as nx

from memintent.ir.model import Arena, ObjectKind, Prediction, Program, Residency, Slot, SlotKind
from memintent.passes.costs import copy_time_s, dequant_time_s
from memintent.passes.lifetimes import activation_profile
from memintent.passes.manager import Pass
from memintent.passes.residency import ALIGN, aligned, reserved_bytes
from memintent.passes.simulate import make_schedule, simulate


def schedule_of(p: Program):
    """Rebuild the schedule, its simulation and each visit's unpacking time (seconds; 0 unquantized) from a program
    whose residency and stream slots are decided."""
    streamed = {b.name for b in p.blocks if b.residency == Residency.streamed}
    k = sum(1 for s in p.arena.slots if s.kind == SlotKind.stream)
    sched = make_schedule(p.stages, p.visits, streamed, k)
    bmap = p.block_map()
    copy_s = {i: copy_time_s(bmap[v.block], p.hardware) for i, v in enumerate(p.visits)}
    deq_s = {i: dequant_time_s(bmap[v.block], p.hardware) for i, v in enumerate(p.visits)}
    return sched, simulate(p.stages, p.visits, sched, copy_s, deq_s), deq_s


def prefetch(program: Program) -> Program:
    p = program   # in place: run_passes hands the pipeline its own copy
    stream_slots = [s for s in p.arena.slots if s.kind == SlotKind.stream]
    slot_bytes = stream_slots[0].size_bytes if stream_slots else 0
    sched, sim, deq_s = schedule_of(p)
    assert sched is not None, "residency chose a depth that cannot hold the schedule"

    # Arena: resident blocks (in block order), then stream slots, then the KV cache.
    slots: list[Slot] = []
    off = 0
    bmap = p.block_map()
    for b in p.blocks:
        if b.residency == Residency.resident:
            b.slot = len(slots)
            slots.append(Slot(index=len(slots), kind=SlotKind.resident, offset_bytes=off,
                              size_bytes=aligned(b.size_bytes), holds=[b.name]))
            off += aligned(b.size_bytes)
    first_stream = len(slots)
    for j in range(sched.k):
        slots.append(Slot(index=len(slots), kind=SlotKind.stream, offset_bytes=off, size_bytes=slot_bytes))
        off += slot_bytes
    kv_bytes = sum(aligned(o.size_bytes) for o in p.objects if o.kind == ObjectKind.kv)
    if kv_bytes:
        slots.append(Slot(index=len(slots), kind=SlotKind.kv, offset_bytes=off, size_bytes=kv_bytes,
                          holds=sorted({o.block for o in p.objects if o.kind == ObjectKind.kv and o.block})))
        off += kv_bytes
    p.arena = Arena(size_bytes=off, alignment_bytes=ALIGN, slots=slots)

    # Visits: slot, issue point, predicted arrival against deadline.
    # A visit is ready when its copy has arrived and, if quantized, been unpacked: that is what compute waits for.
    arrive = {e.visit: e.end_s + deq_s[e.visit] for e in sim.copies}
    for i, v in enumerate(p.visits):
        if i in sched.slot:
            v.slot = first_stream + sched.slot[i]
            slots[v.slot].holds.append(v.block)
            v.issue_stage = sched.issue_stage[i]
            v.issue_next_forward = sched.issue_next[i]
            # Times are from the steady-state forward's start: a copy issued in the previous forward may arrive
            # at a negative time.
            v.arrive_s = arrive[i]
            v.deadline_s = sim.stage_start_s[sched.wait_stage[i]] - sim.stage_stall_s[sched.wait_stage[i]]
            v.slack_s = v.deadline_s - v.arrive_s
        else:
            v.slot = bmap[v.block].slot

    prof = activation_profile(p)
    res = reserved_bytes(p)
    peak_act = max(prof, default=0)
    streamed_bytes = sum(bmap[p.visits[i].block].transfer_bytes for i in sched.visits)
    floor = max(streamed_bytes / (p.hardware.h2d_gbps * 1e9), sim.compute_s)
    binding = "none" if not sched.visits else ("pcie" if sim.copy_busy_s >= sim.compute_s else "compute")
    p.prediction = Prediction(
        step_time_s=sim.step_time_s, first_step_time_s=sim.first_step_time_s, compute_s=sim.compute_s,
        stall_s=sim.stall_s, streamed_bytes=streamed_bytes, floor_s=floor,
        resident_bytes=sum(s.size_bytes for s in slots if s.kind == SlotKind.resident),
        stream_slot_bytes=slot_bytes * sched.k, kv_bytes=kv_bytes, activation_peak_bytes=peak_act,
        workspace_bytes=res["workspace"], arena_bytes=off, peak_hbm_bytes=off + peak_act + res["workspace"],
        peak_step=prof.index(peak_act) if prof else 0, prefetch_depth=sched.k, binding=binding,
    )
    return p


def occupancy_graph(p: Program) -> nx.Graph:
    """Interval graph of stream-slot occupancy: visits are nodes, overlapping occupancy an edge.

    A visit occupies its slot from the issue of its copy to its free, in a time line of two forwards (stage
    indices of the second forward offset by the number of stages, so a copy issued in the previous forward's tail
    overlaps the previous occupant it follows)."""
    n = len(p.stages)
    g = nx.Graph()
    spans = {}
    for i, v in enumerate(p.visits):
        if v.issue_stage is None:
            continue
        free = next((s for s in range(v.last_stage + 1, n) if p.stages[s].module), n)
        start = v.issue_stage if v.issue_next_forward else n + v.issue_stage
        spans[i] = (start, n + free)
        g.add_node(i, slot=v.slot)
    # the previous forward's occurrences of every visit, for occupants that cross the forward boundary
    for i, (a, b) in list(spans.items()):
        spans[(i, "prev")] = (a - n, b - n)
        g.add_node((i, "prev"), slot=p.visits[i].slot)
    items = sorted(spans.items(), key=lambda kv: kv[1])
    for x in range(len(items)):
        for y in range(x + 1, len(items)):
            (u, (_, b1)), (w, (a2, _)) = items[x], items[y]
            if a2 >= b1:
                break
            g.add_edge(u, w)
    return g


def _ensure(p: Program) -> None:
    g = occupancy_graph(p)
    for u, w in g.edges:
        assert g.nodes[u]["slot"] != g.nodes[w]["slot"], f"visits {u} and {w} overlap in slot {g.nodes[u]['slot']}"
    assert p.prediction is not None


PREFETCH = Pass("prefetch", prefetch, requires=("residency",), ensures=_ensure)
