"""Prefetch: the arena layout and, per streamed visit, its stream slot, the stage its copy is issued at and its
predicted arrival against its deadline.

Requires: ``residency`` (block residencies and the number of stream slots).
Ensures: every streamed visit has a slot and an issue stage; the arena lays resident blocks, stream slots and the
KV cache end to end at aligned offsets; ``program.prediction`` holds the simulated times and the peak. That no two
visits occupy a slot at once is the verifier's to prove (on the actions, which is what the runtime runs).

The schedule (slot, issue, wait and free stage of each visit) is ``passes.schedule.make_schedule``; this pass
records it and its simulation. The copy for the next forward's first visits is issued in the tail of the current
forward, as soon as its slot is freed (``issue_next_forward``), so in steady state the first layers' copies hide
behind the last layers' compute.
"""

from __future__ import annotations

from memintent.ir.model import (
    ALIGN_BYTES,
    Arena,
    ObjectKind,
    Prediction,
    Program,
    Quant,
    Residency,
    Slot,
    SlotKind,
    align_up,
)
from memintent.passes.costs import (
    MappedRead,
    dequant_time_s,
    host_copy_bytes,
    link_busy_s,
    mapped_link_bytes,
    stage_link_s,
    visit_copy_s,
)
from memintent.passes.lifetimes import activation_profile
from memintent.passes.manager import Pass, PassContractError, ensure
from memintent.passes.residency import reserved_bytes
from memintent.passes.schedule import Schedule, make_schedule
from memintent.passes.simulate import SimResult, simulate
from memintent.units import round_s


def schedule_of(p: Program, reads: dict[str, MappedRead] | None = None, from_pages: int = 0):
    """Rebuild the schedule and its simulation from a program whose residency and stream slots are decided; both
    None when the stream slots cannot hold the streamed blocks' schedule. Each visit's unpacking time is in the
    simulation (a copy's ``ready_s``), and the mapped blocks' reads (``costs.mapped_reads``: as traced, or as
    ``reads`` counts them, for a program without steps or an engine step of another shape). ``from_pages``: that
    many blocks copy from the KV pool's spare pages (``costs.visit_copy_s``)."""
    streamed = {b.name for b in p.blocks if b.residency == Residency.streamed}
    k = sum(1 for s in p.arena.slots if s.kind == SlotKind.stream)
    sched = make_schedule(p.stages, p.visits, streamed, k)
    bmap = p.block_map()
    copy_s = visit_copy_s(p, from_pages)
    deq_s = {i: dequant_time_s(bmap[v.block], p.hardware) for i, v in enumerate(p.visits)}
    link_s = stage_link_s(p, reads=reads)
    return sched, None if sched is None else simulate(p.stages, p.visits, sched, copy_s, deq_s, link_s=link_s)


def _lay_out_arena(p: Program, k: int, slot_bytes: int, unpack_bytes: int = 0) -> int:
    """Resident blocks (in block order), the HBM store's slots as ``residency`` sized them, then ``k`` stream
    slots, the unpack slot (``unpack_bytes``; 0: none), then the KV cache; returns the first stream slot."""
    bmap = p.block_map()
    owned = [(SlotKind.resident, align_up(b.size_bytes), b) for b in p.blocks if b.residency == Residency.resident]
    owned += [(SlotKind.store, s.size_bytes, bmap[s.holds[0]]) for s in p.arena.slots if s.kind == SlotKind.store]
    slots: list[Slot] = []
    off = 0
    for kind, size, b in owned:      # a slot of its own for each: the block names it
        b.slot = len(slots)
        slots.append(Slot(index=len(slots), kind=kind, offset_bytes=off, size_bytes=size, holds=[b.name]))
        off += size
    first_stream = len(slots)
    for _ in range(k):
        slots.append(Slot(index=len(slots), kind=SlotKind.stream, offset_bytes=off, size_bytes=slot_bytes))
        off += slot_bytes
    if unpack_bytes:
        quantized = [b.name for b in p.blocks if b.residency == Residency.streamed and b.quant != Quant.none]
        slots.append(Slot(index=len(slots), kind=SlotKind.unpack, offset_bytes=off, size_bytes=unpack_bytes,
                          holds=quantized))
        off += unpack_bytes
    kv_bytes = sum(align_up(o.size_bytes) for o in p.objects if o.kind == ObjectKind.kv)
    if kv_bytes:
        slots.append(Slot(index=len(slots), kind=SlotKind.kv, offset_bytes=off, size_bytes=kv_bytes,
                          holds=sorted({o.block for o in p.objects if o.kind == ObjectKind.kv and o.block})))
        off += kv_bytes
    p.arena = Arena(size_bytes=off, alignment_bytes=ALIGN_BYTES, slots=slots)
    return first_stream


def _place_visits(p: Program, sched: Schedule, sim: SimResult, first_stream: int) -> None:
    """Each visit's slot; a streamed one's issue point and predicted arrival against its deadline. A visit is ready
    when its copy has arrived and, if quantized, been unpacked: that is what compute waits for."""
    arrive = {e.visit: e.ready_s for e in sim.copies}
    bmap = p.block_map()
    slots = p.arena.slots
    for i, v in enumerate(p.visits):
        if i not in sched.slot:
            v.slot = bmap[v.block].slot
            continue
        v.slot = first_stream + sched.slot[i]
        slots[v.slot].holds.append(v.block)
        v.issue_stage = sched.issue_stage[i]
        v.issue_next_forward = sched.issue_next[i]
        # Times are from the steady-state forward's start: a copy issued in the previous forward may arrive at a
        # negative time.
        v.arrive_s = round_s(arrive[i])
        v.deadline_s = round_s(sim.stage_start_s[sched.wait_stage[i]] - sim.stage_stall_s[sched.wait_stage[i]])
        v.slack_s = round_s(v.deadline_s - v.arrive_s)


def _prediction(p: Program, sched: Schedule, sim: SimResult, slot_bytes: int) -> Prediction:
    prof = activation_profile(p)
    workspace = reserved_bytes(p)["workspace"]
    peak_act = max(prof, default=0)
    slots = p.arena.slots
    streamed_bytes = host_copy_bytes(p)
    mapped_bytes = mapped_link_bytes(p)
    floor = max(link_busy_s(p.hardware, streamed_bytes, mapped_bytes), sim.compute_s)
    binding = ("none" if not sched.visits and not mapped_bytes
               else "pcie" if sim.copy_busy_s >= sim.compute_s else "compute")
    arena_bytes = p.arena.size_bytes
    pinned, pageable = host_bytes(p)
    return Prediction(
        step_time_s=round_s(sim.step_time_s), first_step_time_s=round_s(sim.first_step_time_s),
        compute_s=round_s(sim.compute_s), stall_s=round_s(sim.stall_s), streamed_bytes=streamed_bytes,
        mapped_bytes=mapped_bytes, floor_s=round_s(floor), host_pinned_bytes=pinned, host_pageable_bytes=pageable,
        resident_bytes=sum(s.size_bytes for s in slots if s.kind == SlotKind.resident),
        stored_bytes=sum(s.size_bytes for s in slots if s.kind == SlotKind.store),
        stream_slot_bytes=slot_bytes * sched.k + sum(s.size_bytes for s in slots if s.kind == SlotKind.unpack),
        kv_bytes=sum(s.size_bytes for s in slots if s.kind == SlotKind.kv), activation_peak_bytes=peak_act,
        workspace_bytes=workspace, arena_bytes=arena_bytes, peak_hbm_bytes=arena_bytes + peak_act + workspace,
        peak_step=prof.index(peak_act) if prof else 0, prefetch_depth=sched.k, binding=binding,
    )


def host_bytes(p: Program) -> tuple[int, int]:
    """(pinned, pageable) host bytes a run holds: the host store's buffers (a streamed or mapped block's in its
    transfer layout, pinned, as the runtime's HostStore pins only what the device reads from the host; a resident
    block's pageable) with the KV swap space pinned, and the one full-precision block the fill quantizes packed
    blocks from."""
    pinned = sum(align_up(b.transfer_bytes or b.size_bytes) for b in p.blocks if b.residency != Residency.resident)
    pageable = sum(align_up(b.size_bytes) for b in p.blocks if b.residency == Residency.resident)
    pageable += max((b.size_bytes for b in p.blocks if b.quant != Quant.none), default=0)
    if p.kv_pool is not None:
        pinned += p.kv_pool.swap_pages * p.kv_pool.page_bytes
    return pinned, pageable


def prefetch(program: Program) -> Program:
    p = program   # in place: run_passes hands the pipeline its own copy
    stream_slots = [s for s in p.arena.slots if s.kind == SlotKind.stream]
    slot_bytes = stream_slots[0].size_bytes if stream_slots else 0
    unpack_bytes = sum(s.size_bytes for s in p.arena.slots if s.kind == SlotKind.unpack)
    sched, sim = schedule_of(p)
    if sched is None:
        raise PassContractError(f"residency chose {len(stream_slots)} stream slot(s), which cannot hold the schedule "
                                f"of its streamed blocks")
    first_stream = _lay_out_arena(p, sched.k, slot_bytes, unpack_bytes)
    _place_visits(p, sched, sim, first_stream)
    p.prediction = _prediction(p, sched, sim, slot_bytes)
    return p


def _ensure(p: Program) -> None:
    streamed = {b.name for b in p.blocks if b.residency == Residency.streamed}
    unplaced = [v.block for v in p.visits if v.block in streamed and (v.slot is None or v.issue_stage is None)]
    ensure(not unplaced, f"streamed visits without a slot or issue stage: {unplaced[:3]}")
    ends = [(s.offset_bytes, s.offset_bytes + s.size_bytes) for s in p.arena.slots]
    ensure(all(e0 == s1 for (_, e0), (s1, _) in zip(ends, ends[1:])) and (not ends or ends[-1][1] == p.arena.size_bytes),
           "arena slots are not laid end to end")
    ensure(all(s.offset_bytes % ALIGN_BYTES == 0 for s in p.arena.slots), f"an arena slot is not {ALIGN_BYTES}-byte aligned")
    ensure(p.prediction is not None, "no prediction")


PREFETCH = Pass("prefetch", prefetch, requires=("residency",), ensures=_ensure)
