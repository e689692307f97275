"""Residency: which blocks stay resident in HBM and how many stream slots the rest take turns in.

Requires: ``costs``; ``program.budget_bytes`` set.
Ensures: every block has a residency; the stream slots, resident blocks, the HBM store, KV, activation peak and
workspace fit the budget; ``program.arena`` holds the chosen number of stream slots and a store slot per stored
block (offsets are laid out by ``prefetch``).

Policy. HBM first holds what cannot move: the KV cache, the activation peak, the kernel workspace, and blocks that
are used before any hook can wait for them (weights of the root module). The rest starts streamed, and blocks
are made resident greedily by benefit per byte, where the benefit of a block is the reduction of the simulated
steady-state forward time when it stops streaming (plus a small term for the copy it no longer issues, so that
a block whose copy is fully hidden still prefers HBM when HBM is free). Blocks that are interchangeable (same
size, same number of visits: the decoder layers) form a class; within a class the next resident one is the
member farthest from the resident ones already chosen, which spreads resident compute through the forward and
gives the copy engine slack where it needs it. The number of stream slots (the prefetch depth) is chosen by
running this for every depth from 1 up and keeping the fastest plan (the smaller depth on a tie), so the depth
trades against resident blocks through the same simulated time.

A quantized streamed block can also be kept in the HBM store (spec/runtime.md, "The HBM store"): its packed bytes
in a store slot, each visit copying them from there at HBM speed rather than over the host link. That is a second
move of the same greedy search, weighed the same way (time saved per byte of HBM), and taken only where it saves
time or copies.

A block whose module can read it in place (``costs.mapped_op``: an embedding, an int8 head) starts *mapped*: never
copied, no slot, its kernel reading pinned host memory over the link (``Residency.mapped``). An embedding then
moves only a step's rows; a head moves as many bytes as a visit would, but the stream and unpack slots need no
longer fit a vocabulary-sized matrix (llama-3-70b int4: 1.5 GiB of 24 more for the KV cache). Two more moves of the
search undo it where HBM is to spare: the block streamed after all (its read overlapping compute again), or
resident.
"""

from __future__ import annotations

from typing import NamedTuple

from memintent.errors import MemintentError
from memintent.ir.layout import unpack_offsets, weight_unpackers
from memintent.ir.model import (
    ALIGN_BYTES,
    Arena,
    Block,
    Object,
    ObjectKind,
    Program,
    Quant,
    Residency,
    Slot,
    SlotKind,
    align_up,
)
from memintent.passes.costs import (
    FOUR_BIT,
    MappedRead,
    copy_time_s,
    dequant_time_s,
    mappable_reads,
    mapped_op,
    stage_link_s,
    transfer_bytes,
)
from memintent.passes.lifetimes import activation_profile
from memintent.passes.manager import Pass, ensure
from memintent.passes.schedule import (
    hookable,
    make_schedule,
    unpack_shareable,
    wait_stages,
)
from memintent.passes.simulate import simulate
from memintent.units import fmt_bytes

MAX_DEPTH = 8
COPY_PREFERENCE = 1e-3   # weight of a hidden copy's time in a block's benefit (prefer HBM when it is free)



def workspace_bytes(program: Program) -> int:
    """The kernels' scratch (from the hardware profile) plus any workspace objects, such as the extra activations
    of a prefill that a decode plan must also fit."""
    return program.hardware.workspace_bytes + sum(o.size_bytes for o in program.objects
                                                  if o.kind == ObjectKind.workspace)


def reserved_bytes(program: Program) -> dict[str, int]:
    """HBM that no residency choice can avoid: KV cache, activation peak, workspace."""
    prof = activation_profile(program)
    kv = sum(align_up(o.size_bytes) for o in program.objects if o.kind == ObjectKind.kv)
    return {"kv": kv, "activations": max(prof, default=0), "workspace": workspace_bytes(program)}


def forced_resident(program: Program) -> set[str]:
    """Blocks no hook can wait for: those needed at a stage with no hookable stage at or before it (the schedule's
    wait rule, ``passes.schedule.wait_stages``), and blocks of the root module."""
    wait_at = wait_stages(hookable(program.stages))
    forced = {b for st, w in zip(program.stages, wait_at) if w is None for b in st.needs}
    forced.update(b.name for b in program.blocks if not b.module)
    return forced


def slot_need_bytes(b: Block, shared_unpack: bool = False) -> int:
    """Stream-slot bytes a visit of ``b`` needs. Unquantized: its weights. Quantized: the packed bytes it arrives
    as (at the slot's end), plus, unless the plan has an unpack slot (``shared_unpack``), its unpacked weights at
    the slot's start."""
    if b.quant == Quant.none:
        return align_up(b.size_bytes)
    packed = align_up(b.transfer_bytes or 0)
    return packed if shared_unpack else align_up(b.size_bytes) + packed


def unpack_need_bytes(b: Block, objects: dict[str, Object], by_weight: bool) -> int:
    """Unpack-slot bytes a quantized visit of ``b`` needs (0 unquantized): its unpacked weights, or ``by_weight``
    (``ir.layout.weight_unpackers`` lists it) its raw weights and its largest quantized one
    (``ir.layout.unpack_offsets``)."""
    return unpack_offsets(b, objects, by_weight)[1] if b.quant != Quant.none else 0


def slot_layout(k: int, in_slot: list[int], landing: list[int], unpacked: list[int],
                shared_unpack: bool) -> tuple[int, int]:
    """(bytes of each of ``k`` stream slots, bytes of the unpack slot; 0: none) for streamed visits whose slot needs
    are ``in_slot`` (each unpacking in its own slot) or ``landing`` plus ``unpacked`` in one unpack slot, whichever
    arena is smaller; the unpack slot only where one serves every quantized visit (``shared_unpack``). The one rule
    that sizes them, for the residency search, its slots and the smallest-budget error."""
    own = (max(in_slot, default=0), 0)
    if not shared_unpack or not any(unpacked):
        return own
    shared = (max(landing, default=0), max(unpacked))
    return shared if k * shared[0] + shared[1] < k * own[0] else own


def stream_arena_bytes(p: Program, blocks, k: int, shared_unpack: bool, by_weight: set[str]) -> tuple[int, int]:
    """``slot_layout`` for streaming ``blocks`` of ``p`` through ``k`` slots; ``by_weight``: the blocks that unpack
    one weight at a time (``ir.layout.weight_unpackers``)."""
    blocks, objects = list(blocks), p.object_map()
    return slot_layout(k, [slot_need_bytes(b) for b in blocks], [slot_need_bytes(b, True) for b in blocks],
                       [unpack_need_bytes(b, objects, b.name in by_weight) for b in blocks], shared_unpack)


class Choice(NamedTuple):
    """A residency decision: resident blocks, streamed blocks, the streamed blocks kept in the HBM store, the
    simulated step time it gives, and the blocks read in place (mapped)."""

    resident: frozenset
    streamed: frozenset
    stored: frozenset
    time_s: float
    mapped: frozenset = frozenset()


class _Search:
    def __init__(self, program: Program, reads: dict[str, MappedRead] | None, by_weight: set[str]):
        self.p = program
        self.hw = program.hardware
        self.size = {b.name: align_up(b.size_bytes) for b in program.blocks}
        # one unpack slot when every block that may stream quantized unpacks after the previous one was freed
        self.shared_unpack = unpack_shareable(program.stages, program.visits,
                                              {b.name for b in program.blocks if b.quant != Quant.none})
        self.visits_of: dict[str, list[int]] = {b.name: [] for b in program.blocks}   # visit indices, in order
        for i, v in enumerate(program.visits):
            self.visits_of[v.block].append(i)
        self.nvisits = {name: len(idx) for name, idx in self.visits_of.items()}
        self.objects, self.by_weight = program.object_map(), by_weight
        self.need, self.land, self.unpack, self.packed = {}, {}, {}, {}
        self.copy_s, self.store_copy_s, self.deq_s = {}, {}, {}
        self.quantized: set[str] = set()
        for b in program.blocks:
            self._index(b)
        self.first_stage = {b: program.visits[idx[0]].first_stage for b, idx in self.visits_of.items() if idx}
        self.reads = mappable_reads(program) if reads is None else reads
        self.mappable = frozenset(b.name for b in program.blocks if mapped_op(program, b, self.reads))
        self.link_s = {b: stage_link_s(program, [b], self.reads) for b in self.mappable}   # block -> {stage: s}
        self._cache: dict[tuple, float | None] = {}

    def _index(self, block: Block) -> None:
        """What the search reads of ``block`` at its bit width: slot needs, its store slot's bytes, and each of its
        visits' copy (from the host and from the HBM store) and unpacking times."""
        self.need[block.name] = slot_need_bytes(block)
        self.land[block.name] = slot_need_bytes(block, True)
        self.unpack[block.name] = unpack_need_bytes(block, self.objects, block.name in self.by_weight)
        self.packed[block.name] = align_up(block.transfer_bytes or 0)   # a store slot's bytes
        self.quantized.discard(block.name)
        if block.quant != Quant.none:
            self.quantized.add(block.name)
        for i in self.visits_of[block.name]:
            self.copy_s[i] = copy_time_s(block, self.hw, False)
            self.store_copy_s[i] = copy_time_s(block, self.hw, True)
            self.deq_s[i] = dequant_time_s(block, self.hw)

    def requant(self, block: Block) -> None:
        """``block``'s bit width changed: its copy and unpacking times, slot need and in-place read follow; cached
        times go."""
        self._index(block)
        if block.name in self.mappable:
            self.link_s[block.name] = stage_link_s(self.p, [block.name], self.reads)
        self._cache.clear()

    def time(self, streamed: frozenset, k: int, stored: frozenset = frozenset(),
             mapped: frozenset = frozenset()) -> float | None:
        """The simulated step with ``streamed`` through ``k`` slots, those in ``stored`` copied from the HBM store,
        ``mapped`` read in place."""
        key = (streamed, stored, k, mapped)
        if key not in self._cache:
            sched = make_schedule(self.p.stages, self.p.visits, set(streamed), k)
            copy_s = {i: (self.store_copy_s if v.block in stored else self.copy_s)[i]
                      for i, v in enumerate(self.p.visits)} if stored else self.copy_s
            link_s: dict[int, float] = {}
            for b in mapped:
                for stage, t in self.link_s[b].items():
                    link_s[stage] = link_s.get(stage, 0.0) + t
            self._cache[key] = None if sched is None else simulate(
                self.p.stages, self.p.visits, sched, copy_s, self.deq_s, link_s=link_s).step_time_s
        return self._cache[key]

    def whole_time(self, streamed: frozenset, k: int, stored: frozenset,
                   mapped: frozenset = frozenset()) -> float | None:
        """``time``, or with nothing streamed or mapped the stages' compute."""
        return (self.time(streamed, k, stored, mapped) if streamed or mapped
                else sum(s.time_s for s in self.p.stages))

    def stream_bytes(self, streamed, k: int) -> int:
        """Stream and unpack slots' bytes for ``streamed`` through ``k`` slots (``slot_layout``); never more slots
        than streamed visits (``make_schedule`` uses no more)."""
        k = min(k, sum(self.nvisits[b] for b in streamed))
        slot, unpack = slot_layout(k, [self.need[b] for b in streamed], [self.land[b] for b in streamed],
                                   [self.unpack[b] for b in streamed], self.shared_unpack)
        return k * slot + unpack

    def memory(self, resident: set[str], streamed: frozenset, k: int, stored: frozenset = frozenset()) -> int:
        return (sum(self.size[b] for b in resident) + sum(self.packed[b] for b in stored)
                + (self.stream_bytes(streamed, k) if streamed else 0))

    def streamable(self, forced: set[str]) -> list[str]:
        """Blocks that may stream: read by some stage and not forced resident (a block no stage reads needs no HBM
        at all; it stays host-side and is never copied)."""
        return [b.name for b in self.p.blocks if b.name not in forced and self.nvisits[b.name] > 0]

    def smallest(self, k: int, forced: set[str]) -> tuple[set[str], frozenset, int] | None:
        """The (resident, streamed, HBM bytes) with the least HBM at ``k`` stream slots whose schedule exists, or
        None. Streaming a block costs its share of a slot sized for the largest streamed block, so the least HBM
        streams every block up to some slot need and keeps the larger ones resident (an embedding larger than a
        layer is cheaper resident than as the size of every slot): each threshold is tried, with and without the
        blocks read more than once (a tied embedding, read again by the head, needs a second slot when it
        streams). Blocks that can be mapped are (``mapped_of``): they take no HBM at all. The one rule for the
        smallest plan: the search starts from it and a refusal states it."""
        names = [b for b in self.streamable(forced) if b not in self.mappable]
        again = {b for b in names if self.nvisits[b] > 1}
        best = (set(forced), frozenset(), self.memory(set(forced), frozenset(), k)) if not names else None
        for cap in sorted({self.need[b] for b in names}):
            upto = frozenset(b for b in names if self.need[b] <= cap)
            for streamed in {upto, upto - again} - {frozenset()}:
                resident = set(forced) | (set(names) - streamed)
                mem = self.memory(resident, streamed, k)
                if (best is None or mem < best[2]) and self.time(streamed, k) is not None:
                    best = (resident, streamed, mem)
        return best

    def mapped_of(self, resident, forced: set[str]) -> frozenset:
        """The blocks a plan starting from ``resident`` maps: those that can be, unless resident."""
        return frozenset(b for b in self.streamable(forced) if b in self.mappable and b not in resident)

    def greedy(self, k: int, forced: set[str], room: int) -> Choice | None:
        resident = set(forced)
        mapped = self.mapped_of(resident, forced)
        streamed = frozenset(self.streamable(forced)) - mapped
        if self.memory(resident, streamed, k) > room or self.time(streamed, k, mapped=mapped) is None:
            # Everything streamed does not fit (or k slots cannot hold its schedule): start from the smallest plan.
            start = self.smallest(k, forced)
            if start is None or start[2] > room:
                return None
            resident, streamed, _ = start
            mapped = self.mapped_of(resident, forced)
        now = Choice(frozenset(resident), streamed, frozenset(), self.whole_time(streamed, k, frozenset(), mapped),
                     mapped)
        while now.streamed or now.mapped:
            mem_now = self.memory(now.resident, now.streamed, k, now.stored)
            best, best_key = None, None
            for b, move in self._moves(now):
                mem = self.memory(move.resident, move.streamed, k, move.stored)
                t_new = None if mem > room else self.whole_time(move.streamed, k, move.stored, move.mapped)
                if t_new is None:
                    continue
                gain = (now.time_s - t_new) + COPY_PREFERENCE * self._copy_saved_s(b, now, move)
                if gain <= 0 and b not in move.resident:
                    continue     # a store slot that saves nothing (device copies no faster than the host link)
                extra = mem - mem_now
                key = (float("inf") if extra <= 0 else gain / extra, gain, -self.first_stage.get(b, 0))
                if best_key is None or key > best_key:
                    best, best_key = move._replace(time_s=t_new), key
            if best is None:
                break
            now = best
        return now

    def _moves(self, now: Choice):
        """(block, the choice after the move) for each class of streamed blocks: its next block made resident
        (``_spread_pick``) and, when quantized, its next block kept in the HBM store. A stored block copies its
        packed bytes from HBM (``costs.copy_time_s``) for a quarter to a half of the HBM that resident weights take,
        so where PCIe binds it buys the most time per byte; resident blocks then also save the unpacking. A mapped
        block can be made resident or streamed (``make_schedule`` may find no schedule for it: the move is then
        not taken)."""
        for cls in self._classes(now.streamed):
            b = self._spread_pick(cls, set(now.resident))
            yield b, Choice(now.resident | {b}, now.streamed - {b}, now.stored - {b}, 0.0, now.mapped)
            host = [c for c in cls if c not in now.stored and c in self.quantized]
            if host:
                b = self._spread_pick(host, set(now.stored))
                yield b, Choice(now.resident, now.streamed, now.stored | {b}, 0.0, now.mapped)
        for b in sorted(now.mapped):
            yield b, Choice(now.resident | {b}, now.streamed, now.stored, 0.0, now.mapped - {b})
            yield b, Choice(now.resident, now.streamed | {b}, now.stored, 0.0, now.mapped - {b})

    def _copy_saved_s(self, b: str, now: Choice, move: Choice) -> float:
        """Copy time a visit of ``b`` no longer spends on the copy stream after the move, times its visits."""
        i = self._visit_of(b)
        if b in now.mapped:       # its read in place leaves the link, or moves to the copy engine
            return sum(self.link_s[b].values()) - (0.0 if b in move.resident else self.copy_s[i])
        before = self.store_copy_s[i] if b in now.stored else self.copy_s[i]
        after = 0.0 if b in move.resident else self.store_copy_s[i]
        return (before - after) * self.nvisits[b]

    def _visit_of(self, block: str) -> int:
        return self.visits_of[block][0]

    def _classes(self, streamed: frozenset) -> list[list[str]]:
        classes: dict[tuple[int, int], list[str]] = {}
        for b in self.p.blocks:
            if b.name in streamed:
                classes.setdefault((self.size[b.name], self.nvisits[b.name]), []).append(b.name)
        return list(classes.values())

    def _spread_pick(self, cls: list[str], chosen: set[str]) -> str:
        """The member of ``cls`` farthest from the blocks already ``chosen`` (resident, or stored)."""
        anchors = [self.first_stage[r] for r in chosen if r in self.first_stage]
        if not anchors:
            return cls[0]
        return max(cls, key=lambda b: (min(abs(self.first_stage[b] - a) for a in anchors), -self.first_stage[b]))


def _set_quant(p: Program, block: Block, q: Quant, objects: dict | None = None) -> None:
    block.quant = q
    block.transfer_bytes = transfer_bytes(block, p, objects)


def _relax_quant(p: Program, c: Choice, k: int, room: int, reads: dict[str, MappedRead] | None,
                 by_weight: set[str]) -> None:
    """``--quant auto``: starting from int4g everywhere (``starting_quant``), give each streamed block the widest
    bit width (bf16, then int8) that keeps the simulated forward within 1% of the all-int4g time and the plan
    within budget. Each width is weighed by the bytes its packed layout really copies (``costs.transfer_bytes``)
    and its unpacking time. Where PCIe binds nothing widens; where compute hides the copies, blocks go back to
    bf16 and lose no accuracy. Blocks in the HBM store keep their width: the store is sized for it. A mapped block
    widens only as far as its module still reads it in place (an embedding to bf16; a head stays int8)."""
    bmap, objs = p.block_map(), p.object_map()
    search = _Search(p, reads, by_weight)
    t_int4 = search.time(c.streamed, k, c.stored, c.mapped)
    order = {b.name: i for i, b in enumerate(p.blocks)}
    for name in sorted((c.streamed - c.stored) | c.mapped, key=order.__getitem__):
        b = bmap[name]
        if b.quant == Quant.none:
            continue
        for q in (Quant.none, Quant.int8):
            if name in c.mapped and mapped_op(p, b.model_copy(update={"quant": q}), search.reads) is None:
                continue
            old = b.quant
            _set_quant(p, b, q, objs)
            search.requant(b)
            t = search.time(c.streamed, k, c.stored, c.mapped)
            if t is not None and t <= t_int4 * 1.01 and search.memory(c.resident, c.streamed, k, c.stored) <= room:
                break
            _set_quant(p, b, old, objs)
            search.requant(b)


QUANT_POLICIES = ("none", "int8", "int4", "int4g", "auto")   # --quant: a bit width for every streamed block, or auto


def starting_quant(quant: str) -> Quant:
    """The bit width a ``--quant`` policy gives a streamable block first. ``auto`` starts from int4g, the int4 with
    a scale and a minimum per group of 32 (within 10 % of float32 perplexity on SmolLM2-135M where int4 more than
    doubles it: benchmarks/quality.py), never from int4 (one symmetric scale per 128 columns), which only an
    explicit ``--quant int4`` asks for. ``block_quant`` then keeps the vocabulary blocks at int8."""
    if quant not in QUANT_POLICIES:
        raise MemintentError(f"--quant {quant!r}: use {', '.join(QUANT_POLICIES[:-1])} or auto")
    return Quant.int4g if quant == "auto" else Quant(quant)


def vocab_blocks(p: Program) -> set[str]:
    """Blocks holding a vocabulary matrix: the weight an ``aten.embedding`` step reads (the token embedding, which
    a tied head shares) and the head, the matrix the last weight-reading step reads, where it has the embedding's
    shape (an untied head; a layer's matrix of that shape elsewhere in the model is not one). A part of a pipeline
    without the embedding finds none."""
    objs = p.object_map()
    embedded = {u for s in p.steps if s.op == "aten.embedding.default" for u in s.uses
                if u in objs and objs[u].block and len(objs[u].shape) == 2}
    matrices = [u for s in p.steps for u in s.uses
                if u in objs and objs[u].kind == ObjectKind.weight and len(objs[u].shape) == 2]
    shapes = {tuple(objs[u].shape) for u in embedded}
    head = {matrices[-1]} if matrices and tuple(objs[matrices[-1]].shape) in shapes else set()
    return {objs[u].block for u in embedded | head if objs[u].block}


def block_quant(policy: Quant, block: str, vocab: set[str]) -> Quant:
    """The bit width a streamed block gets under ``policy``: the policy's, except that a vocabulary block
    (``vocab_blocks``) takes int8 where the policy is 4-bit. Every token's logits go through the head, and each
    row of the embedding is one token's whole input: 4 bits there cost SmolLM2-135M a fifth to a quarter of the
    zero-point int4g's perplexity rise and a third to a half of int4's, for one or two blocks of a model's ~30+
    (llama.cpp keeps these at 6-8 bits too)."""
    return Quant.int8 if policy in FOUR_BIT and block in vocab else policy


def _initial_quant(p: Program, quant: str, forced: set[str], vocab: set[str]) -> None:
    """Every block that could stream at the policy's bit width (``starting_quant``, ``block_quant``); the rest
    unquantized."""
    policy = starting_quant(quant)
    objs = p.object_map()
    for b in p.blocks:
        quantizable = any(len(objs[w].shape) == 2 for w in b.weights)
        q = block_quant(policy, b.name, vocab) if quantizable and b.name not in forced else Quant.none
        _set_quant(p, b, q, objs)


def _fastest(p: Program, search: _Search, depth: int | None, forced: set[str],
             room: int) -> tuple[Choice, int] | None:
    """The fastest (choice, stream slots) over the depths tried, or None when none fits."""
    chosen = None
    for k in ([depth] if depth else range(1, MAX_DEPTH + 1)):
        out = search.greedy(k, forced, room)
        if out is None:
            if chosen is not None:
                break            # more slots only leave less room from here on
            continue
        if chosen is None or out.time_s < chosen[0].time_s * (1 - 1e-6):
            chosen = (out, min(k, len([v for v in p.visits if v.block in out.streamed])))
    return chosen


def smallest_plan_bytes(search: _Search, depth: int | None, forced: set[str]) -> tuple[int, int | None]:
    """(HBM bytes of the smallest plan besides the reserved bytes, its stream slots; None: every block resident)
    over the depths ``depth`` allows (``_Search.smallest``). Keeping every block resident is always a plan, whatever
    ``depth`` (the residency pass keeps it whenever it fits)."""
    best = (sum(search.size.values()), None)
    for k in ([depth] if depth else range(1, MAX_DEPTH + 1)):
        small = search.smallest(k, forced)
        if small is not None and small[2] < best[0]:
            best = (small[2], k)
    return best


def _depth_note(search: _Search, depth: int | None, forced: set[str]) -> str:
    """Why a forced ``depth`` streams nothing, when no streamed set has a schedule in that many slots."""
    if not depth or not search.streamable(forced) or search.smallest(depth, forced) is not None:
        return ""
    fits = next((d for d in range(1, MAX_DEPTH + 1) if search.smallest(d, forced) is not None), None)
    return (f"; --depth {depth}: {depth} stream slot(s) cannot hold the schedule of any streamed set of this model "
            "(a stage reads several streamed blocks, or a block is read again while the next must already be "
            "loading), so only a plan with every block resident fits: "
            + (f"use --depth {fits} or more to stream, or leave --depth out" if fits else "leave --depth out"))


def _infeasible(p: Program, search: _Search, depth: int | None, forced: set[str],
                res: dict[str, int]) -> MemintentError:
    """The budget is below what any plan needs: say the smallest feasible budget and what it is made of (the plan
    ``_Search.smallest`` finds, from which the search starts: that budget compiles, one byte less does not)."""
    plan_bytes, k = smallest_plan_bytes(search, depth, forced)
    forced_bytes = sum(search.size[b] for b in forced)
    minimum = sum(res.values()) + plan_bytes
    if k is None:
        layout = f"every block resident {fmt_bytes(plan_bytes)}"
    else:
        resident, streamed, _ = search.smallest(k, forced)
        stream = search.stream_bytes(streamed, k)
        layout = (f"always-resident blocks {fmt_bytes(forced_bytes)}, {len(resident) - len(forced)} more "
                  f"block(s) resident {fmt_bytes(plan_bytes - stream - forced_bytes)}, {k} stream slot(s) "
                  f"{fmt_bytes(stream)} in all")
    return MemintentError(
        f"budget {fmt_bytes(p.budget_bytes)} is below the smallest feasible budget {fmt_bytes(minimum)} "
        f"({minimum} bytes) for this model and shape: KV {fmt_bytes(res['kv'])}, activations "
        f"{fmt_bytes(res['activations'])}, workspace {fmt_bytes(res['workspace'])}, {layout}; "
        f"raise --budget, or lower --batch/--seq (a generation plan: --context or --concurrency)"
        + (" or --depth" if depth and k else "") + _depth_note(search, depth, forced)
        + f" (hardware profile {p.hardware.name})")


def _set_residencies(p: Program, resident: set[str], mapped: frozenset = frozenset()) -> None:
    """Each block's residency. A block no stage reads is never copied: it stays host-side as "streamed" with no
    visit. Resident weights stay in the model's dtype: quantizing them would save nothing."""
    for b in p.blocks:
        b.residency = (Residency.resident if b.name in resident else Residency.mapped if b.name in mapped
                       else Residency.streamed)
        b.slot = None    # resident slots are laid out by prefetch; store slots by _stream_slots
        if b.residency == Residency.resident:
            _set_quant(p, b, Quant.none)


def _stream_slots(p: Program, streamed: frozenset, k: int, stored: frozenset, by_weight: set[str]) -> None:
    """``k`` stream slots sized for the largest streamed visit, when a streamed block is quantized and one unpack
    slot serves them all, that slot, and a store slot for each block of ``stored`` (offsets are laid out by
    ``prefetch``)."""
    bmap = p.block_map()
    quantized = {b for b in streamed if bmap[b].quant != Quant.none}
    slot_bytes, unpack_bytes = stream_arena_bytes(p, (bmap[b] for b in streamed), k,
                                                  unpack_shareable(p.stages, p.visits, quantized), by_weight)
    slots = [Slot(index=i, kind=SlotKind.stream, offset_bytes=0, size_bytes=slot_bytes) for i in range(k)]
    if unpack_bytes:
        slots.append(Slot(index=k, kind=SlotKind.unpack, offset_bytes=0, size_bytes=unpack_bytes))
    for b in p.blocks:
        if b.name in stored:
            b.slot = len(slots)
            slots.append(Slot(index=len(slots), kind=SlotKind.store, offset_bytes=0,
                              size_bytes=align_up(b.transfer_bytes), holds=[b.name]))
    p.arena = Arena(size_bytes=0, alignment_bytes=ALIGN_BYTES, slots=slots)


def residency(program: Program, depth: int | None = None, quant: str = "none",
              vocab: set[str] | None = None, reads: dict[str, MappedRead] | None = None,
              by_weight: set[str] | None = None) -> Program:
    """``depth`` forces the number of stream slots (tests, experiments); None lets the cost model choose.
    ``quant``: bit width of streamed blocks' 2-D weights: none, int8, int4, int4g, or auto (chosen per block).
    ``vocab``, ``reads``, ``by_weight``: the vocabulary blocks (``vocab_blocks``), the blocks that can be read in
    place (``costs.mappable_reads``) and those that unpack one weight at a time (``ir.layout.weight_unpackers``),
    for a program without its steps (the planner's light candidates); None: found in ``program``'s steps."""
    p = program   # in place: run_passes hands the pipeline its own copy
    p.budget_bytes = p.budget_bytes if p.budget_bytes is not None else p.hardware.hbm_bytes
    res = reserved_bytes(p)
    room = p.budget_bytes - sum(res.values())
    forced = forced_resident(p)
    _initial_quant(p, quant, forced, vocab_blocks(p) if vocab is None else vocab)
    by_weight = set(weight_unpackers(p)) if by_weight is None else by_weight
    search = _Search(p, reads, by_weight)
    if sum(search.size.values()) <= room:
        c, k = Choice(frozenset(b.name for b in p.blocks), frozenset(), frozenset(), 0.0), 0
    else:
        chosen = _fastest(p, search, depth, forced, room)
        if chosen is None:
            raise _infeasible(p, search, depth, forced, res)
        c, k = chosen
    _set_residencies(p, set(c.resident), c.mapped)
    if quant == "auto" and c.streamed:
        _relax_quant(p, c, k, room, reads, by_weight)
    _stream_slots(p, c.streamed, k, c.stored, by_weight)
    return p


def given_residency(program: Program, streamed: set[str], k: int, quant: Quant = Quant.none,
                    stored: set[str] = frozenset(), mapped: set[str] = frozenset()) -> Program:
    """The residency pass with the decision given rather than searched: ``streamed`` blocks stream through ``k``
    stream slots, at bit width ``quant`` (``block_quant``) where they hold a 2-D weight, those of them in
    ``stored`` from the HBM store, ``mapped`` blocks read in place at that bit width, and the rest stay resident
    (tests, experiments and benchmarks that need a particular plan)."""
    p = program
    if p.budget_bytes is None:
        p.budget_bytes = p.hardware.hbm_bytes
    objs, vocab = p.object_map(), vocab_blocks(p)
    for b in p.blocks:
        quantizable = b.name in set(streamed) | set(mapped) and any(len(objs[w].shape) == 2 for w in b.weights)
        _set_quant(p, b, block_quant(quant, b.name, vocab) if quantizable else Quant.none, objs)
    _set_residencies(p, {b.name for b in p.blocks} - set(streamed) - set(mapped), frozenset(mapped))
    _stream_slots(p, frozenset(streamed), k, frozenset(stored), set(weight_unpackers(p)))
    return p


def _ensure(p: Program) -> None:
    ensure(all(b.residency is not None for b in p.blocks), "a block has no residency")
    streamed = {b.name for b in p.blocks if b.residency == Residency.streamed}
    k = sum(1 for s in p.arena.slots if s.kind == SlotKind.stream)
    ensure(make_schedule(p.stages, p.visits, streamed, k) is not None,
           f"{k} stream slot(s) cannot hold the schedule of the streamed blocks")
    resident_bytes = sum(align_up(b.size_bytes) for b in p.blocks if b.residency == Residency.resident)
    need = resident_bytes + sum(s.size_bytes for s in p.arena.slots) + sum(reserved_bytes(p).values())
    ensure(need <= p.budget_bytes, f"resident blocks, stream slots, KV, activations and workspace need "
                                   f"{fmt_bytes(need)}, over the budget {fmt_bytes(p.budget_bytes)}")


def residency_pass(depth: int | None = None, quant: str = "none") -> Pass:
    return Pass("residency", lambda p: residency(p, depth, quant), requires=("costs",), ensures=_ensure)


def given_residency_pass(streamed: set[str], k: int, quant: Quant = Quant.none,
                         stored: set[str] = frozenset(), mapped: set[str] = frozenset()) -> Pass:
    """A residency pass that records a given decision (``given_residency``) under the same contract."""
    return Pass("residency", lambda p: given_residency(p, streamed, k, quant, stored, mapped), requires=("costs",),
                ensures=_ensure)


RESIDENCY = residency_pass()
