"""The predicted timeline of a plan: what the compute stream and the copy engine do, and what occupies HBM, per step.

A plan file records its decisions (residencies, slots, issue stages) and a few summary numbers, but not the
picture a person needs to believe them: when each copy runs against the compute it hides behind, where compute
waits, and how memory fills up against the budget. This module rebuilds that picture from the plan alone, with the
same event simulation the compiler used (``passes.prefetch.schedule_of``), so what ``simulate``/``report`` show is
what the compiler predicted, not a second model that could disagree with it.

Everything here is a pure function of the plan returning plain dataclasses; rendering (terminal, Chrome trace,
HTML) lives elsewhere.

Times are seconds from the start of the steady-state forward (the simulation's last forward): copies that serve
it but were issued in the previous forward's tail have negative issue/start/end times.

Memory, per step, by kind (bytes):

* ``resident``: the arena's resident slots (blocks placed once, never moved);
* ``stream allocated``: all stream slots. The arena allocates them for the whole run, so this is what counts
  against the budget; ``stream occupied`` is the part held by a visit at that step, from the entry of the stage
  that issues the visit's copy (the slot is written from then on) to the entry of the stage that frees it, counted
  as the bytes the occupying visit needs (the block's weights, plus its packed bytes when quantized; a slot is
  sized for the largest need);
* ``kv``: the arena's KV slot;
* ``activations``: live step buffers (``passes.lifetimes.activation_profile``), which live outside the arena;
* ``workspace``: kernel scratch reserved by the hardware profile.

``MemoryPoint.total_bytes`` (allocated basis) is what the verifier checks against the budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from memintent.errors import MemintentError
from memintent.ir.model import Block, Program, SlotKind
from memintent.passes.costs import host_copy_bytes, link_read_s, mapped_reads
from memintent.passes.lifetimes import activation_profile
from memintent.passes.prefetch import schedule_of
from memintent.passes.residency import slot_need_bytes


@dataclass(frozen=True, slots=True)
class StageSpan:
    """One stage on the compute lane. ``entry_s``: the stage is entered (its actions fire); ``start_s``: its steps
    start, after waiting ``stall_s`` for copies; ``end_s``: its last step ends."""

    index: int
    module: str                   # "" for root glue (no hook)
    block: str                    # "" for root glue
    first_step: int
    last_step: int
    entry_s: float
    start_s: float
    end_s: float
    stall_s: float
    compute_s: float
    issued: tuple[str, ...] = ()  # visit labels of the copies issued on entry to this stage
    waits: tuple[str, ...] = ()   # visit labels of the copies compute waits for on entry

    @property
    def name(self) -> str:
        return self.module or f"<root glue {self.index}>"


@dataclass(frozen=True, slots=True)
class CopySpan:
    """One streamed visit's copy on the copy lane (FIFO: a copy starts when issued and the engine is free)."""

    visit: int                    # index into Program.visits
    block: str
    label: str                    # "block@first_stage": unique per visit
    slot: int                     # arena slot index
    transfer_bytes: int
    block_bytes: int              # bytes the visit occupies in its slot (weights, + packed bytes if quantized)
    issue_s: float
    start_s: float
    end_s: float
    ready_s: float                # usable: arrived and, quantized, unpacked (after its wait stage's entry too)
    issue_stage: int              # == number of stages: issued at the forward's end
    next_forward: bool            # issued in the previous forward's tail
    wait_stage: int
    free_stage: int               # == number of stages: freed at the forward's end
    first_stage: int
    last_stage: int
    deadline_s: float             # entry of the wait stage
    slack_s: float                # deadline - arrival of the copy (end_s)
    ready_slack_s: float          # deadline - ready, as the plan's Visit.slack_s (negative: compute waits)
    stall_s: float                # the part of the wait stage's stall this copy is responsible for

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True, slots=True)
class MemoryPoint:
    """HBM by kind while a step runs (see the module docstring for what each kind counts)."""

    step: int
    stage: int
    start_s: float                # predicted start of the step in the steady-state forward
    resident_bytes: int
    stream_allocated_bytes: int
    stream_occupied_bytes: int
    kv_bytes: int
    activation_bytes: int
    workspace_bytes: int

    @property
    def total_bytes(self) -> int:
        """Allocated basis: what counts against the budget."""
        return (self.resident_bytes + self.stream_allocated_bytes + self.kv_bytes + self.activation_bytes
                + self.workspace_bytes)

    @property
    def occupied_total_bytes(self) -> int:
        """As ``total_bytes`` with only the stream slots' occupied part counted."""
        return (self.resident_bytes + self.stream_occupied_bytes + self.kv_bytes + self.activation_bytes
                + self.workspace_bytes)


# The kinds in stacking order, with the MemoryPoint attribute of each (allocated basis).
MEMORY_KINDS: tuple[tuple[str, str], ...] = (
    ("resident weights", "resident_bytes"),
    ("stream slots", "stream_allocated_bytes"),
    ("KV cache", "kv_bytes"),
    ("activations", "activation_bytes"),
    ("workspace", "workspace_bytes"),
)


@dataclass(slots=True)
class MappedSpan:
    """A mapped block's read in place over the host link, at its stage's start (``passes.simulate``)."""

    block: str
    stage: int
    start_s: float
    end_s: float
    link_bytes: int


@dataclass(slots=True)
class Timeline:
    """A plan's predicted steady-state forward (and summary of its cold first forward)."""

    name: str
    hardware: str
    budget_bytes: int
    step_time_s: float            # steady state
    first_step_time_s: float      # cold start
    compute_s: float
    stall_s: float
    copy_busy_s: float            # copy engine busy time per forward
    binding: str
    streamed_bytes: int
    arena_bytes: int
    prefetch_depth: int
    stages: list[StageSpan] = field(default_factory=list)
    copies: list[CopySpan] = field(default_factory=list)
    memory: list[MemoryPoint] = field(default_factory=list)
    mapped: list[MappedSpan] = field(default_factory=list)

    @property
    def copy_busy_frac(self) -> float:
        """Fraction of the steady-state forward during which the copy engine works (may exceed 1 when PCIe
        binds: then copies of one forward spill into the neighbouring ones)."""
        return self.copy_busy_s / self.step_time_s if self.step_time_s > 0 else 0.0

    @property
    def peak(self) -> MemoryPoint | None:
        """The first step with the largest allocated total."""
        return max(self.memory, key=lambda m: (m.total_bytes, -m.step), default=None)

    def stall_by_block(self) -> dict[str, float]:
        """Predicted compute stall attributed to each streamed block (seconds per forward), in visit order."""
        out: dict[str, float] = {}
        for c in self.copies:
            out[c.block] = out.get(c.block, 0.0) + c.stall_s
        return out


def _visit_label(block: str, first_stage: int) -> str:
    return f"{block}@{first_stage}"


def _stall_charges(p: Program, sched, entry_s: list[float], ready: dict[int, float]) -> dict[int, float]:
    """Each stage's stall attributed to the copies it waits for, in order of readiness: a copy is charged only the
    wait beyond the copies ready before it, so the charges add up to the stage's stall exactly."""
    charged: dict[int, float] = {}
    for s in range(len(p.stages)):
        t = entry_s[s]
        for i in sorted((i for i in sched.visits if sched.wait_stage[i] == s), key=lambda i: (ready[i], i)):
            charged[i] = max(0.0, ready[i] - t)
            t = max(t, ready[i])
    return charged


def streamed_where(b: Block) -> str:
    """Where a streamed block's visits copy from, as the tables name it: "HBM store", or "streamed" (the host)."""
    return "HBM store" if b.in_hbm_store else "streamed"


def _copy_spans(p: Program, sched, sim, entry_s: list[float]) -> list[CopySpan]:
    """The streamed visits' copies of the steady-state forward, in FIFO order."""
    bmap = p.block_map()
    stream_slots = [s for s in p.arena.slots if s.kind == SlotKind.stream]
    first_stream = stream_slots[0].index if stream_slots else 0
    by_visit = {e.visit: e for e in sim.copies}
    ready = {i: by_visit[i].ready_s for i in sched.visits}
    charged = _stall_charges(p, sched, entry_s, ready)
    copies: list[CopySpan] = []
    unpack_slot = p.unpack_slot() is not None
    for i in sched.visits:
        v, e, b = p.visits[i], by_visit[i], bmap[p.visits[i].block]
        w = sched.wait_stage[i]
        # a visit occupies its need (weights, + packed bytes when quantized), at most its slot
        held_bytes = (min(slot_need_bytes(b, unpack_slot), p.arena.slots[v.slot].size_bytes) if v.slot is not None
                      else b.size_bytes)
        copies.append(CopySpan(
            visit=i, block=v.block, label=_visit_label(v.block, v.first_stage),
            slot=v.slot if v.slot is not None else first_stream + sched.slot[i],
            transfer_bytes=b.transfer_bytes or b.size_bytes, block_bytes=held_bytes,
            issue_s=e.issue_s, start_s=e.start_s, end_s=e.end_s, ready_s=ready[i],
            issue_stage=sched.issue_stage[i], next_forward=sched.issue_next[i], wait_stage=w,
            free_stage=sched.free_stage[i], first_stage=v.first_stage, last_stage=v.last_stage,
            deadline_s=entry_s[w], slack_s=entry_s[w] - e.end_s,
            ready_slack_s=entry_s[w] - ready[i], stall_s=charged[i]))
    return copies


def _stage_spans(p: Program, sim, entry_s: list[float], copies: list[CopySpan]) -> list[StageSpan]:
    n = len(p.stages)
    issued: list[list[str]] = [[] for _ in range(n + 1)]
    waits: list[list[str]] = [[] for _ in range(n + 1)]
    for c in copies:
        issued[c.issue_stage].append(c.label)
        waits[c.wait_stage].append(c.label)
    return [StageSpan(
        index=st.index, module=st.module, block=st.block, first_step=st.first_step, last_step=st.last_step,
        entry_s=entry_s[s], start_s=sim.stage_start_s[s], end_s=sim.stage_end_s[s], stall_s=sim.stage_stall_s[s],
        compute_s=st.time_s, issued=tuple(issued[s]), waits=tuple(waits[s])) for s, st in enumerate(p.stages)]


def _stream_occupancy(n_stages: int, copies: list[CopySpan]) -> list[int]:
    """Stream-slot bytes held per stage: a visit holds its slot from its issue stage's entry to its free stage's
    entry; one issued in the previous forward's tail (``next_forward``) holds it from this forward's start to its
    free, and its successor issued in this forward's tail holds it from the issue to this forward's end."""
    occupied = [0] * n_stages
    for c in copies:
        spans = [(0, c.free_stage), (c.issue_stage, n_stages)] if c.next_forward else [(c.issue_stage, c.free_stage)]
        for a, z in spans:
            for s in range(a, min(z, n_stages)):
                occupied[s] += c.block_bytes
    return occupied


def _memory_points(p: Program, sim, copies: list[CopySpan]) -> list[MemoryPoint]:
    """HBM by kind at each step, with the step's predicted start in the steady-state forward."""
    n = len(p.stages)
    by_kind = {kind: sum(s.size_bytes for s in p.arena.slots if s.kind == kind) for kind in SlotKind}
    occupied = _stream_occupancy(n, copies)
    act = activation_profile(p)
    stage_of = [0] * len(p.steps)
    for st in p.stages:
        for i in range(st.first_step, st.last_step + 1):
            stage_of[i] = st.index
    memory: list[MemoryPoint] = []
    t_in_stage: dict[int, float] = {}
    for i, step in enumerate(p.steps):
        s = stage_of[i]
        t = t_in_stage.get(s, sim.stage_start_s[s] if n else 0.0)
        t_in_stage[s] = t + step.time_s
        memory.append(MemoryPoint(
            step=i, stage=s, start_s=t, resident_bytes=by_kind[SlotKind.resident],
            stream_allocated_bytes=by_kind[SlotKind.stream] + by_kind[SlotKind.unpack],
            stream_occupied_bytes=occupied[s] if n else 0,
            kv_bytes=by_kind[SlotKind.kv], activation_bytes=act[i] if i < len(act) else 0,
            workspace_bytes=p.prediction.workspace_bytes))
    return memory


def build_timeline(p: Program) -> Timeline:
    """The predicted timeline of a scheduled plan (raises ``MemintentError`` for a trace without a plan)."""

    if p.arena is None or p.prediction is None or p.hardware is None:
        raise MemintentError(f"{p.name}: the program holds no plan (no arena, prediction or hardware): compile it "
                             "with `memintent compile` first")
    sched, sim = schedule_of(p)
    if sched is None:
        raise MemintentError(f"{p.name}: the plan's stream slots cannot hold its streamed visits: recompile it")
    entry_s = [sim.stage_start_s[s] - sim.stage_stall_s[s] for s in range(len(p.stages))]
    copies = _copy_spans(p, sched, sim, entry_s)
    return Timeline(
        name=p.name, hardware=p.hardware.name, budget_bytes=p.budget_bytes or p.hardware.hbm_bytes,
        step_time_s=sim.step_time_s, first_step_time_s=sim.first_step_time_s, compute_s=sim.compute_s,
        stall_s=sim.stall_s, copy_busy_s=sim.copy_busy_s, binding=p.prediction.binding,
        streamed_bytes=host_copy_bytes(p),
        arena_bytes=p.arena.size_bytes, prefetch_depth=sched.k, stages=_stage_spans(p, sim, entry_s, copies),
        copies=copies, memory=_memory_points(p, sim, copies), mapped=_mapped_spans(p, sim))


def _mapped_spans(p: Program, sim) -> list[MappedSpan]:
    """Each mapped read as the event model places it: from its stage's start, for its time on the link."""
    out = []
    for block, stage, n in mapped_reads(p):
        start = sim.stage_start_s[stage]
        out.append(MappedSpan(block, stage, start, start + link_read_s(n, p.hardware), n))
    return out
