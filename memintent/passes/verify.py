"""Verification: the one proof that a plan is safe to run.

Requires: ``actions`` (a complete plan). The compiler's last pass, ``memintent check``, ``run``, ``generate``,
``explain``/``simulate``/``report`` and the runtime's ``attach`` (so ``memintent.load`` and ``wrap`` too) all
call ``verify``; nothing else re-checks these rules.

A plan file is untrusted input: whatever it holds, ``verify`` either returns it or raises a ``RuleViolation`` (a
``PlanVerificationError``) whose ``rule`` names the broken rule and whose message says, in words, where and what.
Each rule is one function below with its statement as docstring, registered in ``RULES`` in the order they run.
A rule may rely on every rule before it (no dangling name, no index out of range, no negative size), so the later
ones reason about the program the runtime will execute and never trip over a malformed one. The groups:

- structure: the program is self-consistent: numbered lists in order, every name a step, stage, visit or action
  uses exists, weights inside their blocks, stage needs covering what their steps read, no object read before it
  is defined, recorded live ranges covering the dependency graph's (``passes.graph``);
- layout: arena slots lie inside the arena without overlapping; every block fits the slot it is placed in, a
  quantized one as the runtime lays out its packed bytes; actions sit only where the runtime has a hook;
- memory: at every step, arena + workspace + live activations fit the budget, and the recorded prediction neither
  exceeds the budget nor understates that peak; the host memory the plan states (checked against the machine
  before a run allocates) is exactly what its host store and KV swap space take;
- the action trace (``TRACE_RULES``): the plan's actions, run symbolically in list order through the runtime's
  slot state for a cold first forward and two steady-state forwards (so the cross-forward prefetch is checked
  too): no copy into a slot in use, a wait only for an issued copy, a free only of a ready visit after its last
  stage, and every stage finds the streamed blocks it reads arrived (a mapped block, read in place, always is).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, NoReturn

from memintent.errors import MemintentError, PlanVerificationError
from memintent.ir.layout import kv_page_parts, weight_unpackers
from memintent.ir.model import (
    ADMISSION_ORDERS,
    DTYPE_BITS,
    Action,
    ActionKind,
    KVQuant,
    ObjectKind,
    Pipeline,
    Program,
    Quant,
    Residency,
    SlotKind,
    dtype_bytes,
)
from memintent.ir.plan_file import load_plan_or_pipeline
from memintent.ir.proven import Proven
from memintent.passes.costs import mapped_op, transfer_bytes
from memintent.passes.graph import (
    dependency_graph,
    early_uses,
    live_range,
    module_calls,
    names,
)
from memintent.passes.lifetimes import activation_profile
from memintent.passes.manager import Pass
from memintent.passes.prefetch import host_bytes
from memintent.passes.residency import (
    slot_need_bytes,
    unpack_need_bytes,
    workspace_bytes,
)
from memintent.units import fmt_bytes

TRACE_FORWARDS = 3   # a cold first forward, then two steady-state ones (each one's prefetch issued by the last)


class RuleViolation(PlanVerificationError):
    """A plan breaking one rule of ``RULES`` or ``TRACE_RULES``; ``rule`` is its name."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


class _Broken(Exception):
    """Raised inside a rule; the rule's wrapper turns it into a ``RuleViolation`` carrying the rule's name."""

    def __init__(self, what: str, where: str = ""):
        super().__init__(what)
        self.what, self.where = what, where


@dataclass(frozen=True)
class Rule:
    name: str
    check: Callable
    doc: str


RULES: list[Rule] = []         # check(program, facts), in the order verify runs them
TRACE_RULES: list[Rule] = []   # called by the action trace, per action or stage entry


def _rule(name: str, registry: list[Rule] = RULES) -> Callable:
    """Register the decorated function as rule ``name``; a ``fail`` inside it becomes a ``RuleViolation`` naming it."""
    def register(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def checked(*args):
            try:
                return fn(*args)
            except _Broken as b:
                raise RuleViolation(name, f"plan verification failed{b.where}: {b.what}") from None

        registry.append(Rule(name, checked, " ".join((fn.__doc__ or "").split())))
        return checked
    return register


def fail(what: str, where: str = "") -> NoReturn:
    """Inside a rule: the plan breaks it. ``what`` is wrong (and what would be right); ``where``: ``at_stage`` or
    ``at_step``, or empty when ``what`` names the plan's parts itself."""
    raise _Broken(what, where)


def at_stage(p: Program, stage: int) -> str:
    """Where an action fires or a stage runs, in words."""
    n = len(p.stages)
    if stage < 0:
        return " at the start of the first forward"
    if stage >= n:
        return " at the end of the forward"
    st = p.stages[stage]
    return f" at step {st.first_step} (stage {stage}, module {st.module or '<root>'!r})"


def at_step(p: Program, i: int) -> str:
    s = p.steps[i]
    return f" at step {i} ({s.op} in module {s.module or '<root>'!r})"


def _first_duplicate(items: list[str]) -> str | None:
    seen: set[str] = set()
    for n in items:
        if n in seen:
            return n
        seen.add(n)
    return None


class Facts:
    """Lookups the rules share, each built on first use, which comes after the rules that make it safe to build."""

    def __init__(self, p: Program):
        self.p = p

    @cached_property
    def omap(self):
        return self.p.object_map()

    @cached_property
    def bmap(self):
        return self.p.block_map()

    @cached_property
    def graph(self):
        return dependency_graph(self.p.steps)

    @cached_property
    def activations(self) -> list[int]:
        return activation_profile(self.p)

    @cached_property
    def visit_spans(self) -> dict[tuple[str, int], int]:
        """(block, first stage) -> last stage of each visit."""
        return {(v.block, v.first_stage): v.last_stage for v in self.p.visits}


# ---- structure ------------------------------------------------------------------------------------------------

@_rule("plan-complete")
def plan_complete(p: Program, f: Facts) -> None:
    """The program holds a plan: an arena, a budget, a hardware profile (the kernels' workspace, part of the budget,
    comes from it) and a prediction."""
    for missing, what in ((p.arena is None, "no arena (run the prefetch pass)"), (p.budget_bytes is None, "no budget"),
                          (p.hardware is None, "no hardware profile, so the kernels' workspace is unknown"),
                          (p.prediction is None, "no prediction (run the prefetch pass)")):
        if missing:
            fail(f"the program carries no complete plan: it has {what}")


@_rule("unique-names")
def unique_names(p: Program, f: Facts) -> None:
    """No two objects share a name, and no two blocks: every other rule looks them up by name."""
    for what, items in (("objects", [o.name for o in p.objects]), ("blocks", [b.name for b in p.blocks])):
        d = _first_duplicate(items)
        if d is not None:
            fail(f"two {what} are named {d!r}: names must be unique")


@_rule("slots-numbered")
def slots_numbered(p: Program, f: Facts) -> None:
    """Arena slot i has index i: actions and blocks name slots by index."""
    for i, s in enumerate(p.arena.slots):
        if s.index != i:
            fail(f"the arena's slot at position {i} has index {s.index}: slots must be listed by index")


@_rule("block-weights")
def block_weights(p: Program, f: Facts) -> None:
    """Each block lists only weight objects; each weight is listed by exactly one block, the one it names."""
    owner: dict[str, str] = {}
    for b in p.blocks:
        for w in b.weights:
            o = f.omap.get(w)
            if o is None or o.kind != ObjectKind.weight:
                fail(f"block {b.name!r} lists {w!r}, which is not a weight object of the plan")
            if w in owner:
                fail(f"weight {w!r} is listed by blocks {owner[w]!r} and {b.name!r}: each weight is in one block")
            owner[w] = b.name
    for o in p.objects:
        if o.kind == ObjectKind.weight and (o.block not in f.bmap or owner.get(o.name) != o.block):
            fail(f"weight {o.name!r} names block {o.block!r}, which does not list it")


@_rule("weight-layout")
def weight_layout(p: Program, f: Facts) -> None:
    """Each weight has a known dtype, is as many bytes as its shape and dtype make, and lies inside its block's
    buffer at an offset aligned to its dtype (the runtime views it there)."""
    for o in p.objects:
        if o.kind != ObjectKind.weight:
            continue
        if o.dtype not in DTYPE_BITS:
            fail(f"weight {o.name!r} has unknown dtype {o.dtype!r}: use one of {', '.join(DTYPE_BITS)}")
        numel = 1
        for d in o.shape:
            numel *= d
        if o.size_bytes != dtype_bytes(o.dtype, numel):
            fail(f"weight {o.name!r} of shape {o.shape} {o.dtype} is {dtype_bytes(o.dtype, numel)} bytes, not the "
                 f"{o.size_bytes} bytes the plan records")
        off, page_bytes, align = o.block_offset_bytes, f.bmap[o.block].size_bytes, max(1, DTYPE_BITS[o.dtype] // 8)
        if off is None or off + o.size_bytes > page_bytes:
            fail(f"weight {o.name!r} at offset {off} ({o.size_bytes} bytes) lies outside its block {o.block!r} "
                 f"({page_bytes} bytes)")
        if off % align:
            fail(f"weight {o.name!r} ({o.dtype}) at offset {off} of block {o.block!r} is not aligned to its "
                 f"{align}-byte dtype")


@_rule("weights-disjoint")
def weights_disjoint(p: Program, f: Facts) -> None:
    """The weights of a block do not overlap in its buffer: each is filled, copied and viewed there on its own."""
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for o in p.objects:
        if o.kind == ObjectKind.weight and o.size_bytes:
            spans.setdefault(o.block, []).append((o.block_offset_bytes, o.block_offset_bytes + o.size_bytes, o.name))
    for block, ws in spans.items():
        ws.sort()
        for (_, end, a), (start, _, b) in zip(ws, ws[1:]):
            if start < end:
                fail(f"weights {a!r} and {b!r} overlap in block {block!r} (bytes {start}..{end})")


@_rule("steps-numbered")
def steps_numbered(p: Program, f: Facts) -> None:
    """Step i has index i: steps are listed in execution order."""
    for i, s in enumerate(p.steps):
        if s.index != i:
            fail(f"the step at position {i} has index {s.index}: steps must be listed in order")


@_rule("names-known")
def names_known(p: Program, f: Facts) -> None:
    """Every object a step reads or writes is an object of the plan."""
    unknown = next((n for n in names(f.graph) if n not in f.omap), None)
    if unknown is not None:
        i = next(i for i, s in enumerate(p.steps) if unknown in s.uses or unknown in s.defs)
        fail(f"it uses or defines {unknown!r}, which is not an object of the plan", at_step(p, i))


@_rule("defined-before-use")
def defined_before_use(p: Program, f: Facts) -> None:
    """No object is read before the step that first defines it: the step order is a topological order of the
    dependency graph (every def -> use edge runs forward)."""
    for name, use, first_def in early_uses(f.graph):
        fail(f"it reads {name!r} before step {first_def} ({p.steps[first_def].op}) defines it", at_step(p, use))


@_rule("live-ranges")
def live_ranges(p: Program, f: Facts) -> None:
    """Each object's recorded live range [first_use, last_use] lies within the steps and covers every step that
    defines or reads it, and the module calls that hold it as an argument (the activation peak is computed from
    these ranges)."""
    n = len(p.steps)
    calls = module_calls(p.steps)
    for o in p.objects:
        span = live_range(f.graph, o.name, calls if o.kind == ObjectKind.buffer else None)
        if o.first_use is None and o.last_use is None and span is None:
            continue
        lo, hi = span or (o.first_use, o.last_use)
        if (o.first_use is None or o.last_use is None or not o.first_use <= o.last_use < n
                or (lo is not None and o.first_use > lo) or (hi is not None and o.last_use < hi)):
            fail(f"object {o.name!r} has live range [{o.first_use}, {o.last_use}], but the plan's {n} steps use it "
                 f"in [{lo}, {hi}]")


@_rule("stages-partition")
def stages_partition(p: Program, f: Facts) -> None:
    """Stages are numbered in order and partition the steps in order: each starts right after the one before it
    ends, the first at step 0 and the last ending at the last step."""
    n, expect = len(p.steps), 0
    for i, st in enumerate(p.stages):
        if st.index != i:
            fail(f"the stage at position {i} has index {st.index}: stages must be listed in order")
        if st.first_step != expect or st.last_step < st.first_step or st.last_step >= n:
            fail(f"stage {i} covers steps [{st.first_step}, {st.last_step}]: stages must partition the {n} steps in "
                 f"order (expected it to start at step {expect})")
        expect = st.last_step + 1
    if p.stages and expect != n:
        fail(f"the stages end at step {expect - 1} but the plan has {n} steps")
    if n and not p.stages:
        fail(f"the plan has {n} steps but no stages (run the lifetimes pass)")


@_rule("stage-needs")
def stage_needs(p: Program, f: Facts) -> None:
    """Each stage's needs are blocks of the plan and include the block of every weight its steps read: the action
    trace checks that the needs are in device memory, so they must be what the steps really read."""
    for i, st in enumerate(p.stages):
        unknown = next((b for b in st.needs if b not in f.bmap), None)
        if unknown is not None:
            fail(f"stage {i} needs unknown block {unknown!r}", at_stage(p, i))
        for j in range(st.first_step, st.last_step + 1):
            for u in f.graph.pred[j]:
                o = f.omap[u]
                if o.kind == ObjectKind.weight and o.block not in st.needs:
                    fail(f"it reads {u!r} of block {o.block!r}, which stage {i} does not list in its needs",
                         at_step(p, j))


@_rule("visits-known")
def visits_known(p: Program, f: Facts) -> None:
    """Each visit names a block of the plan, covers stages that exist and a slot that exists, and no two visits
    of a block start at the same stage."""
    n_st, n_sl = len(p.stages), len(p.arena.slots)
    seen: set[tuple[str, int]] = set()
    for v in p.visits:
        what = f"the visit of {v.block!r} at stages [{v.first_stage}, {v.last_stage}]"
        if v.block not in f.bmap:
            fail(f"{what} names unknown block {v.block!r}")
        if not v.first_stage <= v.last_stage < n_st:
            fail(f"{what} lies outside the plan's {n_st} stages")
        if v.slot is not None and v.slot >= n_sl:
            fail(f"{what} names slot {v.slot}, which does not exist ({n_sl} slots)")
        if (v.block, v.first_stage) in seen:
            fail(f"block {v.block!r} has two visits starting at stage {v.first_stage}")
        seen.add((v.block, v.first_stage))


@_rule("actions-known")
def actions_known(p: Program, f: Facts) -> None:
    """Each action fires at a stage that exists (or at the forward's end, stage ``len(stages)``), names a streamed
    block of the plan, a slot that exists and a visit of that block that the plan has."""
    n_st, n_sl = len(p.stages), len(p.arena.slots)
    for a in p.actions:
        what = f"{a.kind.value} of {a.block!r}"
        if a.stage > n_st:
            fail(f"{what} fires at stage {a.stage}, past the plan's {n_st} stages")
        if a.block not in f.bmap:
            fail(f"{what} names unknown block {a.block!r}", at_stage(p, a.stage))
        if f.bmap[a.block].residency != Residency.streamed:
            fail(f"{what}: block {a.block!r} is not streamed, so it is never copied", at_stage(p, a.stage))
        if a.slot >= n_sl:
            fail(f"{what} names slot {a.slot}, which does not exist ({n_sl} slots)", at_stage(p, a.stage))
        if (a.block, a.visit_stage) not in f.visit_spans:
            fail(f"{what} serves a visit at stage {a.visit_stage}, but the plan has no such visit of {a.block!r}",
                 at_stage(p, a.stage))


@_rule("one-copy-per-visit")
def one_copy_per_visit(p: Program, f: Facts) -> None:
    """Each visit that has actions has exactly one copy_start, one copy_done and one free, all in the same slot:
    one copy in, one wait, one release."""
    per_visit: dict[tuple[str, int], list[Action]] = {}
    for a in p.actions:
        per_visit.setdefault((a.block, a.visit_stage), []).append(a)
    for (block, stage), acts in per_visit.items():
        counts = {k: sum(1 for a in acts if a.kind == k) for k in ActionKind}
        what = f"the visit of {block!r} at stage {stage}"
        if any(c != 1 for c in counts.values()):
            have = ", ".join(f"{c} {k.value}" for k, c in counts.items())
            fail(f"{what} has {have}: each visit needs exactly one copy_start, one copy_done and one free")
        if len({a.slot for a in acts}) != 1:
            fail(f"{what} names slots {sorted({a.slot for a in acts})}: its copy_start, copy_done and free must name "
                 f"one slot")


# ---- layout ---------------------------------------------------------------------------------------------------

@_rule("slots-in-arena")
def slots_in_arena(p: Program, f: Facts) -> None:
    """Each arena slot lies inside the arena at an offset aligned to the arena's alignment."""
    a = p.arena
    for s in a.slots:
        where = f"arena slot {s.index} at bytes {s.offset_bytes}..{s.offset_bytes + s.size_bytes}"
        if s.offset_bytes + s.size_bytes > a.size_bytes:
            fail(f"{where} ends past the {a.size_bytes}-byte arena")
        if s.offset_bytes % a.alignment_bytes:
            fail(f"{where} does not start on a {a.alignment_bytes}-byte boundary, the arena's alignment")


@_rule("slots-disjoint")
def slots_disjoint(p: Program, f: Facts) -> None:
    """No two non-empty arena slots overlap."""
    # Sorted by start, each slot must begin at or after the furthest end so far.
    end, owner = 0, -1
    for s0, e0, i0 in sorted((s.offset_bytes, s.offset_bytes + s.size_bytes, s.index) for s in p.arena.slots):
        if e0 == s0:
            continue
        if s0 < end:
            fail(f"arena slots {owner} and {i0} overlap (bytes {s0}..{min(end, e0)})")
        if e0 > end:
            end, owner = e0, i0


@_rule("resident-slots")
def resident_slots(p: Program, f: Facts) -> None:
    """Every block has a residency; each resident block has a resident slot of its own that holds it."""
    slots = p.arena.slots
    holder: dict[int, str] = {}
    for b in p.blocks:
        if b.residency is None:
            fail(f"block {b.name!r} has no residency (run the residency pass)")
        if b.residency != Residency.resident:
            continue
        if b.slot is None or not 0 <= b.slot < len(slots) or slots[b.slot].kind != SlotKind.resident:
            fail(f"resident block {b.name!r} names slot {b.slot}, which is not a resident slot of the arena")
        if slots[b.slot].size_bytes < b.size_bytes:
            fail(f"resident block {b.name!r} ({b.size_bytes} bytes) does not fit its slot {b.slot} "
                 f"({slots[b.slot].size_bytes} bytes)")
        if b.slot in holder:
            fail(f"resident blocks {holder[b.slot]!r} and {b.name!r} share slot {b.slot}")
        holder[b.slot] = b.name


@_rule("resident-unquantized")
def resident_unquantized(p: Program, f: Facts) -> None:
    """Resident blocks stay in the model's dtype: only streamed blocks are quantized (quantizing a block that is
    copied once would save nothing and cost accuracy)."""
    for b in p.blocks:
        if b.residency == Residency.resident and b.quant != Quant.none:
            fail(f"resident block {b.name!r} is quantized ({b.quant.value}): resident blocks stay in the model's "
                 f"dtype (recompile the plan)")


@_rule("hbm-store")
def hbm_store(p: Program, f: Facts) -> None:
    """A streamed block that names a slot is in the HBM store: quantized (an unquantized block would take the HBM
    of a resident one and still be copied), with a store slot of its own that holds its packed bytes, which its
    visits copy from; and every store slot holds such a block."""
    slots, holder = p.arena.slots, {}
    for b in p.blocks:
        if not b.in_hbm_store:
            continue
        if not 0 <= b.slot < len(slots) or slots[b.slot].kind != SlotKind.store:
            fail(f"streamed block {b.name!r} names slot {b.slot}, which is not a store slot of the arena: a streamed "
                 f"block names a slot only when its packed bytes stay in HBM (recompile the plan)")
        if b.quant == Quant.none:
            fail(f"block {b.name!r} is in the HBM store unquantized: only quantized blocks are stored, an "
                 f"unquantized one stays resident (recompile the plan)")
        if slots[b.slot].size_bytes < (b.transfer_bytes or 0):
            fail(f"block {b.name!r} ({b.transfer_bytes} bytes packed) does not fit its store slot {b.slot} "
                 f"({slots[b.slot].size_bytes} bytes)")
        if b.slot in holder:
            fail(f"blocks {holder[b.slot]!r} and {b.name!r} share store slot {b.slot}")
        holder[b.slot] = b.name
    empty = next((s.index for s in slots if s.kind == SlotKind.store and s.index not in holder), None)
    if empty is not None:
        fail(f"store slot {empty} holds no block of the HBM store (recompile the plan)")


@_rule("mapped-in-place")
def mapped_in_place(p: Program, f: Facts) -> None:
    """A mapped block is one its module can read in place from pinned host memory (``costs.mapped_op``: an
    embedding unquantized or int8, or an int8 linear layer without bias, each read by one step and visited once),
    and it has no slot: nothing of it is ever in HBM."""
    for b in p.blocks:
        if b.residency != Residency.mapped:
            continue
        if mapped_op(p, b) is None:
            fail(f"block {b.name!r} is mapped, but only an embedding (unquantized or int8) or an int8 linear layer "
                 f"without bias, read by one step once a forward, can be read in place (recompile the plan)")
        if b.slot is not None or any(v.slot is not None for v in p.visits if v.block == b.name):
            fail(f"mapped block {b.name!r} names a slot: a mapped block is read in place from host memory and "
                 f"takes none (recompile the plan)")


@_rule("transfer-bytes")
def transfer_bytes_match(p: Program, f: Facts) -> None:
    """A block's transfer_bytes is what a visit of it copies: its size in the model's dtype, or, quantized, the
    runtime's packed layout (``memintent.runtime.quant``), which the stream slots are sized for."""
    for b in p.blocks:
        if b.quant == Quant.none:
            if b.transfer_bytes not in (None, b.size_bytes):
                fail(f"block {b.name!r} is not quantized, so a visit copies its {b.size_bytes} bytes, but the plan's "
                     f"transfer_bytes say {b.transfer_bytes}")
            continue
        packed = transfer_bytes(b, p, f.omap)
        if b.transfer_bytes != packed:
            fail(f"block {b.name!r} ({b.quant.value}): the plan's transfer_bytes {b.transfer_bytes} differ from the "
                 f"runtime's packed layout of {packed} bytes: the plan was compiled by another version; recompile it")


@_rule("stream-slots-fit")
def stream_slots_fit(p: Program, f: Facts) -> None:
    """Every action names a stream slot that holds its block's visit: the weights at the slot's start and, for a
    quantized block, its packed bytes at the slot's end, the two disjoint; with an unpack slot, a quantized visit's
    stream slot holds only its packed bytes and the unpack slot its weights (``residency.slot_need_bytes``), whole
    or, where the block unpacks one weight at a time, its raw weights and its largest (``unpack_need_bytes``)."""
    slots, unpack, by_weight = p.arena.slots, p.unpack_slot(), weight_unpackers(p)
    if sum(1 for s in slots if s.kind == SlotKind.unpack) > 1:
        fail("the arena has more than one unpack slot: quantized visits share one")
    for a in p.actions:
        s, b = slots[a.slot], f.bmap[a.block]
        if s.kind != SlotKind.stream:
            fail(f"{a.kind.value} of {a.block!r} names slot {a.slot}, a {s.kind.value} slot, not a stream slot",
                 at_stage(p, a.stage))
        unpacked = unpack_need_bytes(b, f.omap, b.name in by_weight)
        if unpack is not None and slots[unpack].size_bytes < unpacked:
            fail(f"unpack slot {unpack} ({slots[unpack].size_bytes} bytes) cannot hold the unpacked weights of "
                 f"{a.block!r} ({unpacked} bytes)", at_stage(p, a.stage))
        need = slot_need_bytes(b, unpack is not None)
        if s.size_bytes >= need:
            continue
        if b.quant == Quant.none or unpack is not None:
            fail(f"block {a.block!r} ({need} bytes as it arrives) does not fit stream slot {a.slot} "
                 f"({s.size_bytes} bytes)", at_stage(p, a.stage))
        fail(f"stream slot {a.slot} ({s.size_bytes} bytes) cannot hold the {b.quant.value} visit of {a.block!r}: its "
             f"weights ({b.size_bytes} bytes) at the slot's start and its packed bytes at its end "
             f"({b.transfer_bytes} bytes) need {need} bytes", at_stage(p, a.stage))


@_rule("actions-hookable")
def actions_hookable(p: Program, f: Facts) -> None:
    """Actions fire only where the runtime has a hook: on entry to a stage with a module, or at the forward's end
    (root glue code between modules has none)."""
    for a in p.actions:
        if a.stage < len(p.stages) and not p.stages[a.stage].module:
            fail(f"{a.kind.value} of {a.block!r} fires at stage {a.stage}, which is root glue code with no module "
                 f"hook to run it: actions sit on stages with a module or at the forward's end", at_stage(p, a.stage))


@_rule("kv-reserved")
def kv_reserved(p: Program, f: Facts) -> None:
    """The arena's KV slots hold the whole KV cache."""
    kv = sum(o.size_bytes for o in p.objects if o.kind == ObjectKind.kv)
    kv_slots = sum(s.size_bytes for s in p.arena.slots if s.kind == SlotKind.kv)
    if kv_slots < kv:
        fail(f"the KV cache needs {fmt_bytes(kv)} ({kv} bytes) but the arena's KV slots hold {kv_slots} bytes")


@_rule("kv-pool")
def kv_pool(p: Program, f: Facts) -> None:
    """A generation plan has one KV pool object, the size of its pool; the pool's blocks have the byte layout of
    spec/serving.md and its query heads are a multiple of its KV heads; a forward plan has neither."""
    kv = [o for o in p.objects if o.kind == ObjectKind.kv]
    if (p.generation is None) != (p.kv_pool is None):
        fail("a generation plan needs a KV pool and a forward plan has none: the plan has "
             f"{'a generation section' if p.generation else 'no generation section'} and "
             f"{'a kv_pool' if p.kv_pool else 'no kv_pool'}")
    pool = p.kv_pool
    if pool is None:
        if kv:
            fail(f"object {kv[0].name} is a KV object, but the plan has no KV pool")
        return
    if p.model.dtype not in DTYPE_BITS:
        fail(f"the model's dtype {p.model.dtype!r} is not an IR dtype, so the KV pool's layout is unknown")
    parts = kv_page_parts(pool.layers, pool.kv_heads, pool.head_dim, pool.page_tokens, p.model.dtype,
                           pool.quant == KVQuant.int8)
    if pool.query_heads % pool.kv_heads:
        fail(f"the KV pool's {pool.query_heads} query heads are not a multiple of its {pool.kv_heads} KV heads: "
             "each KV head serves the same number of query heads (0: not recorded)")
    if pool.page_bytes != sum(parts):
        fail(f"KV pool pages of {pool.page_bytes} bytes: {pool.layers} layers x {pool.page_tokens} tokens x "
             f"{pool.kv_heads} heads x {pool.head_dim} ({pool.quant.value} KV) are {sum(parts)} bytes")
    if len(kv) != 1 or kv[0].size_bytes != pool.num_pages * pool.page_bytes:
        fail(f"the KV pool of {pool.num_pages} pages needs one KV object of {pool.num_pages * pool.page_bytes} "
             f"bytes; the plan has {[(o.name, o.size_bytes) for o in kv]}")


@_rule("step-shape")
def step_shape(p: Program, f: Facts) -> None:
    """A generation plan's program is one engine step at its maxima: ``step_tokens`` tokens (the traced forward),
    at least one token per sequence, and a pool that holds one sequence of the plan's context; its admission order
    is one the scheduler knows, with classes of output lengths under longest-output only."""
    g, pool = p.generation, p.kv_pool
    if g is None or pool is None:
        return
    if p.shape.batch != 1 or p.shape.seq != g.step_tokens:
        fail(f"the traced step is {p.shape.batch}x{p.shape.seq} tokens but the plan proves steps of "
             f"{g.step_tokens}: recompile the plan")
    if g.max_seqs > g.step_tokens:
        fail(f"{g.max_seqs} sequences per step need at least as many tokens, not {g.step_tokens}")
    if (pool.num_pages - 1) * pool.page_tokens < g.context:
        fail(f"the KV pool holds {(pool.num_pages - 1) * pool.page_tokens} tokens, fewer than one sequence of the "
             f"plan's context {g.context}")
    if g.admission not in ADMISSION_ORDERS:
        fail(f"the admission order {g.admission!r} is not one the scheduler knows ({', '.join(ADMISSION_ORDERS)})")
    if g.admission != "longest-output" and g.admission_class_tokens != 1:
        fail(f"admission classes of {g.admission_class_tokens} tokens under {g.admission!r}: classes of output "
             "lengths belong to longest-output; any other order has 1")


# ---- memory ---------------------------------------------------------------------------------------------------

@_rule("budget")
def budget(p: Program, f: Facts) -> None:
    """At every step, arena + workspace + the activations live at that step fit the budget."""
    prof = f.activations
    arena, workspace = p.arena.size_bytes, workspace_bytes(p)
    peak_act = max(prof, default=0)
    peak = arena + workspace + peak_act
    if peak <= p.budget_bytes:
        return
    at = ""
    if prof:
        i = prof.index(peak_act)
        live = [o for o in p.objects if o.kind == ObjectKind.buffer and o.first_use is not None
                and o.first_use <= i <= o.last_use]
        at = f", at step {i} ({p.steps[i].op} in module {p.steps[i].module or '<root>'!r})"
        at += f", largest live object {max(live, key=lambda o: o.size_bytes).name!r}" if live else ""
    fail(f"budget {fmt_bytes(p.budget_bytes)} is below the plan's peak {fmt_bytes(peak)} (arena {fmt_bytes(arena)} + "
         f"activations {fmt_bytes(peak_act)} + workspace {fmt_bytes(workspace)}{at}): the budget must be at least "
         f"{fmt_bytes(peak)} ({peak} bytes) for this plan; for a smaller one, compile a plan for it")


@_rule("prediction-honest")
def prediction_honest(p: Program, f: Facts) -> None:
    """The recorded predicted peak neither exceeds the budget nor understates the peak the plan's own steps need
    (arena + workspace + activations)."""
    recorded = p.prediction.peak_hbm_bytes
    peak = p.arena.size_bytes + workspace_bytes(p) + max(f.activations, default=0)
    if recorded > p.budget_bytes:
        fail(f"the plan's recorded predicted peak {fmt_bytes(recorded)} exceeds its budget {fmt_bytes(p.budget_bytes)}")
    if recorded < peak:
        fail(f"the plan's recorded predicted peak {recorded} bytes understates the {peak} bytes (arena + workspace + "
             f"activations) its own steps need")


@_rule("host-memory")
def host_memory(p: Program, f: Facts) -> None:
    """The plan states the host memory its run holds, and the runtime checks that figure against the machine's
    available memory before it allocates anything: the stated pinned bytes are exactly the streamed blocks' host
    buffers plus the KV swap space (``swap_pages`` x ``page_bytes``), the stated pageable bytes exactly the
    resident blocks' buffers plus the fill's one full-precision scratch block. A plan stating less (an edited swap
    space) would pass that check and then fail, or be killed, while allocating."""
    pr = p.prediction
    pinned, pageable = host_bytes(p)
    swap = p.kv_pool.swap_pages * p.kv_pool.page_bytes if p.kv_pool is not None else 0
    for what, stated, need, parts in (
            ("pinned", pr.host_pinned_bytes, pinned, f"streamed blocks {fmt_bytes(pinned - swap)} + KV swap space "
                                                     f"{fmt_bytes(swap)}"),
            ("pageable", pr.host_pageable_bytes, pageable, "resident blocks and the fill's scratch block")):
        if stated != need:
            fail(f"the plan states {stated} bytes of {what} host memory, but its {parts} need {need} bytes "
                 f"({fmt_bytes(need)}): the host memory a run is checked against must be what it allocates; "
                 "recompile the plan")


# ---- the action trace -----------------------------------------------------------------------------------------

@dataclass(slots=True)
class _Occupant:
    block: str
    visit_stage: int
    forward: int          # the forward whose visit the copy serves
    state: str            # "loading" (copy issued), "ready" (copy_done ran), "freed"


class _Trace:
    """The runtime's slot state (``runtime.copy_engine``), run symbolically over the plan's actions."""

    def __init__(self, p: Program, f: Facts):
        self.p, self.f = p, f
        self.occ: dict[int, _Occupant] = {}
        self.unpack = p.unpack_slot()
        self.unpacked: tuple[str, int] | None = None   # the quantized visit whose weights the unpack slot holds

    def ready(self, block: str, forward: int) -> bool:
        return any(o.block == block and o.state == "ready" and o.forward == forward for o in self.occ.values())


@_rule("copy-into-free-slot", TRACE_RULES)
def copy_into_free_slot(t: _Trace, a: Action, stage: int, forward: int) -> None:
    """A copy starts only into a slot that is empty or whose previous occupant was freed: it never overwrites a
    block that is loading or still in use."""
    cur = t.occ.get(a.slot)
    if cur is not None and cur.state != "freed":
        fail(f"the copy of {a.block!r} into slot {a.slot} would overwrite {cur.block!r} (visit at stage "
             f"{cur.visit_stage}), which is still in use there (no free before this copy)", at_stage(t.p, stage))
    t.occ[a.slot] = _Occupant(a.block, a.visit_stage, forward, "loading")


@_rule("wait-for-issued-copy", TRACE_RULES)
def wait_for_issued_copy(t: _Trace, a: Action, stage: int, forward: int) -> None:
    """A copy_done waits for a copy of its visit, issued into its slot for this forward and not yet waited for."""
    cur = t.occ.get(a.slot)
    if (cur is None or (cur.block, cur.visit_stage, cur.forward) != (a.block, a.visit_stage, forward)
            or cur.state != "loading"):
        fail(f"copy_done waits for {a.block!r} in slot {a.slot}, but no copy of that visit for this forward is in "
             f"flight there", at_stage(t.p, stage))
    cur.state = "ready"


@_rule("free-ready-occupant", TRACE_RULES)
def free_ready_occupant(t: _Trace, a: Action, stage: int, forward: int) -> None:
    """A free releases its slot's current occupant, and only after that occupant's copy_done."""
    cur = t.occ.get(a.slot)
    if cur is None or (cur.block, cur.visit_stage) != (a.block, a.visit_stage) or cur.state != "ready":
        held = "nothing" if cur is None or cur.state == "freed" else f"{cur.block!r} ({cur.state})"
        fail(f"free of {a.block!r} in slot {a.slot}, which holds {held}: a free releases the visit it serves after "
             f"its copy_done", at_stage(t.p, stage))


@_rule("free-after-last-use", TRACE_RULES)
def free_after_last_use(t: _Trace, a: Action, stage: int, forward: int) -> None:
    """A free comes after the last stage of the visit it serves."""
    last = t.f.visit_spans[(a.block, a.visit_stage)]
    if last >= stage:
        fail(f"{a.block!r} is freed before its last use at stage {last}", at_stage(t.p, stage))
    t.occ[a.slot].state = "freed"


@_rule("arrival-before-use", TRACE_RULES)
def arrival_before_use(t: _Trace, stage: int, forward: int) -> None:
    """Every stage that reads a streamed block finds it in device memory: its copy_done ran for this forward and
    its slot was not freed since."""
    st = t.p.stages[stage]
    for b in st.needs:
        if t.f.bmap[b].residency in (Residency.resident, Residency.mapped) or t.ready(b, forward):
            continue
        reads = {u for j in range(st.first_step, st.last_step + 1) for u in t.f.graph.pred[j]}
        w = next((w for w in t.f.bmap[b].weights if w in reads), b)
        fail(f"it reads {w!r} of streamed block {b!r} before the block's copy arrived (no copy_done for this visit) "
             f"or after its slot was freed", at_stage(t.p, stage))


@_rule("unpack-slot-one-at-a-time", TRACE_RULES)
def unpack_one_at_a_time(t: _Trace, a: Action, stage: int, forward: int) -> None:
    """With an unpack slot, a quantized visit's copy_done unpacks into it and its weights stay there until its
    free: no copy_done unpacks over weights whose visit was not freed yet."""
    if t.unpack is None or t.f.bmap[a.block].quant == Quant.none:
        return
    visit = (a.block, a.visit_stage)
    if a.kind == ActionKind.copy_done:
        if t.unpacked is not None:
            fail(f"copy_done of {a.block!r} unpacks into slot {t.unpack}, which still holds the weights of "
                 f"{t.unpacked[0]!r} (visit at stage {t.unpacked[1]}): free that visit first", at_stage(t.p, stage))
        t.unpacked = visit
    elif a.kind == ActionKind.free and t.unpacked == visit:
        t.unpacked = None


def _act(t: _Trace, a: Action, stage: int, forward: int) -> None:
    if a.kind == ActionKind.copy_start:
        copy_into_free_slot(t, a, stage, forward + 1 if a.next_forward else forward)
    elif a.kind == ActionKind.copy_done:
        wait_for_issued_copy(t, a, stage, forward)
        unpack_one_at_a_time(t, a, stage, forward)
    else:
        free_ready_occupant(t, a, stage, forward)
        free_after_last_use(t, a, stage, forward)
        unpack_one_at_a_time(t, a, stage, forward)


def run_trace(p: Program, f: Facts) -> None:
    """Run the actions as the runtime does: before the first forward, the copies a previous forward's tail would
    have issued (``next_forward``); then, per forward, each stage's actions in list order on its entry followed by
    its reads, and the end-of-forward actions."""
    n = len(p.stages)
    by_stage: list[list[Action]] = [[] for _ in range(n + 1)]
    for a in p.actions:
        by_stage[a.stage].append(a)
    t = _Trace(p, f)
    for a in p.actions:
        if a.kind == ActionKind.copy_start and a.next_forward:
            copy_into_free_slot(t, a, -1, 0)
    for forward in range(TRACE_FORWARDS):
        for s in range(n + 1):
            for a in by_stage[s]:
                _act(t, a, s, forward)
            if s < n:
                arrival_before_use(t, s, forward)


def verify(program: Program) -> Program:
    """``program`` if it keeps every rule; else ``RuleViolation`` for the first rule it breaks."""
    facts = Facts(program)
    for r in RULES:
        r.check(program, facts)
    run_trace(program, facts)
    return program


VERIFY = Pass("verify", verify, requires=("actions",))
# ---------------------------------------------------------------------------------------------------------------
# Pipelines, and the one entry point that proves a plan file


def verify_pipeline(pl: Pipeline) -> Pipeline:
    """Every part's plan verified under its own budget, and the promises the parts make each other: their layers
    cover the model's in order, and they serve the same steps over the same pool (one scheduler decides for all)."""
    redo = "recompile it with `compile --gpus`"
    if not pl.parts or len(pl.parts) != len(pl.layers):
        raise MemintentError(f"pipeline {pl.name}: {len(pl.parts)} plans for {len(pl.layers)} layer ranges: {redo}")
    at = 0
    for i, (rng, p) in enumerate(zip(pl.layers, pl.parts)):
        if len(rng) != 2 or rng[0] != at or rng[1] <= at or p.model.part != rng:
            raise MemintentError(f"pipeline {pl.name}: part {i} holds layers {p.model.part}, expected {at}.. in "
                                 f"order (ranges {pl.layers}): {redo}")
        at = rng[1]
        verify(p)
        if p.generation is None or p.kv_pool is None:
            raise MemintentError(f"pipeline {pl.name}: part {i} is not a generation plan")
    if pl.model.kind != "preset":     # checked before resolving: a plan file never makes code run
        raise MemintentError(f"pipeline {pl.name}: its model {pl.model.ref} is not a preset; pipelines are built "
                             f"from presets: {redo}")
    # The head (a preset's block "output") is in the last part and in no other: the last part ends the model, so its
    # step samples from logits, never from hidden states.
    holding = [i for i, p in enumerate(pl.parts) if any(b.name == "output" for b in p.blocks)]
    if holding != [len(pl.parts) - 1]:
        raise MemintentError(f"pipeline {pl.name}: its parts hold layers 0..{at - 1} and the head is in parts "
                             f"{holding}: the last part must end with the last layer and the head; {redo}")
    first = pl.parts[0]
    for i, p in enumerate(pl.parts[1:], 1):
        for what, a, b in (("steps", _served(first), _served(p)), ("pool", _pool(first), _pool(p))):
            if a != b:
                raise MemintentError(f"pipeline {pl.name}: part {i} serves {what} {b}, part 0 {a}: every part "
                                     f"must serve the same steps; {redo}")
    return pl


def _served(p: Program) -> tuple:
    g = p.generation
    return (g.step_tokens, g.max_seqs, g.context, g.concurrency)


def _pool(p: Program) -> tuple:
    k = p.kv_pool
    return (k.num_pages, k.page_tokens, k.swap_pages, k.quant.value)


def prove(plan: Program | Pipeline | Proven | str | os.PathLike) -> Proven:
    """The one way a plan becomes runnable: a plan file or IR text (loaded), a ``Program`` or a ``Pipeline``,
    verified once. A ``Proven`` is returned as it is."""
    if isinstance(plan, Proven):
        return plan
    if not isinstance(plan, (Program, Pipeline)):
        plan = load_plan_or_pipeline(plan)
    if isinstance(plan, Pipeline):
        return Proven(verify_pipeline(plan).parts[0], plan)
    return Proven(verify(plan))


__all__ = ["RULES", "Rule", "RuleViolation", "VERIFY", "prove", "verify", "verify_pipeline"]
