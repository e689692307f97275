"""One test per rule of the verifier (memintent.passes.verify.RULES and TRACE_RULES): a plan the compiler made, with
exactly that rule broken, is refused with a PlanVerificationError naming the rule; the plans as compiled pass.

Each edit breaks its rule while keeping every rule before it (rules run in order, each relying on the earlier
ones), so the error names the rule the edit targets and not an earlier one it tripped over.
"""

from __future__ import annotations

from functools import lru_cache

import pytest

from memintent.compiler.compile import compile_model
from memintent.compiler.planner import plan_generation
from memintent.compiler.hardware import BUILTIN
from memintent.errors import PlanVerificationError
from memintent.ir.model import ActionKind, ObjectKind, Program, Quant, Residency, SlotKind
from memintent.passes.verify import RULES, TRACE_RULES, verify

CPU = BUILTIN["cpu"]


@lru_cache(maxsize=None)
def compiled(name: str) -> Program:
    """tiny-llama plans: ``stream`` (4 layers and the head streamed through 2 slots), ``int8`` (layers streamed as
    int8), ``mapped`` (int8 layers streamed, the int8 embedding and head read in place) and ``kv`` (a generation
    plan: an engine step with its KV pool)."""
    if name == "stream":
        return compile_model("tiny-llama", budget_bytes=1 << 20, hardware=CPU, batch=1, seq=16, depth=2)
    if name == "int8":
        return compile_model("tiny-llama", budget_bytes=3 << 19, hardware=CPU, batch=1, seq=16, depth=2, quant="int8")
    if name == "mapped":
        return compile_model("tiny-llama", budget_bytes=1 << 20, hardware=CPU, batch=1, seq=16, depth=2, quant="int8")
    return plan_generation("tiny-llama", budget_bytes=1200 << 10, hardware=CPU, context=64, prompt_len=8, gen_len=8,
                           quant="none", concurrency=2, kv_page_tokens=8)


def test_compiled_plans_verify():
    for name in ("stream", "int8", "mapped", "kv"):
        p = compiled(name)
        assert verify(p) is p
        assert any(b.residency == Residency.streamed for b in p.blocks) and p.actions, name
    assert any(b.quant == Quant.int8 for b in compiled("int8").blocks)
    assert compiled("int8").unpack_slot() is not None, "quantized visits share one unpack slot"
    # with less room the int8 plan reads its embedding and head in place (no slot sized for them)
    assert {b.name for b in compiled("mapped").blocks if b.residency == Residency.mapped} == {"embed", "output"}
    assert any(o.kind == ObjectKind.kv for o in compiled("kv").objects)


# ---- edits: each breaks one rule ------------------------------------------------------------------------------

def _streamed_visit(p: Program, nth: int = 1):
    """The ``nth`` visit that is copied during its own forward (not in the previous one's tail), with its three
    actions' positions in ``p.actions``."""
    starts = [a for a in p.actions if a.kind == ActionKind.copy_start and not a.next_forward]
    s = starts[nth]
    pos = {a.kind: i for i, a in enumerate(p.actions) if (a.block, a.visit_stage) == (s.block, s.visit_stage)}
    return s, pos


def _move(p: Program, i: int, stage: int, before: int | None = None) -> None:
    """Move action ``i`` to ``stage``: just before action ``before``, or after the stage's other actions."""
    a = p.actions.pop(i)
    a.stage = stage
    if before is None:
        j = max((k + 1 for k, b in enumerate(p.actions) if b.stage <= stage), default=0)
    else:
        j = before - (before > i)
    p.actions.insert(j, a)


def _last_weight(p: Program, block: str):
    """The weight at the end of ``block``'s buffer."""
    return max((o for o in p.objects if o.kind == ObjectKind.weight and o.block == block),
               key=lambda o: o.block_offset_bytes)


def _def_after_use(p: Program) -> None:
    """Move a buffer's def to the step after its first use."""
    for i, s in enumerate(p.steps):
        for name in s.defs:
            j = next((j for j in range(i + 1, len(p.steps) - 1) if name in p.steps[j].uses), None)
            if j is not None:
                s.defs.remove(name)
                p.steps[j + 1].defs.append(name)
                return
    raise AssertionError("no buffer is used after its def")


def break_plan_complete(p):
    p.prediction = None


def break_unique_names(p):
    p.objects.append(p.objects[0].model_copy())


def break_slots_numbered(p):
    p.arena.slots[0].index, p.arena.slots[1].index = 1, 0


def break_block_weights(p):
    p.blocks[2].weights.append(p.blocks[1].weights[0])   # a weight in two blocks


def break_weight_layout(p):
    # the block's buffer grows by 256 bytes and its last weight moves by one: inside, but not on a 2-byte boundary
    next(b for b in p.blocks if b.name == "layers.0").size_bytes += 256
    _last_weight(p, "layers.0").block_offset_bytes += 1


def break_weights_disjoint(p):
    w = [o for o in p.objects if o.kind == ObjectKind.weight and o.block == "layers.0"]
    w[1].block_offset_bytes = w[0].block_offset_bytes    # two weights in the same bytes


def break_steps_numbered(p):
    p.steps[3].index = 7


def break_names_known(p):
    p.steps[2].uses.append("nope")


def break_defined_before_use(p):
    _def_after_use(p)


def break_live_ranges(p):
    o = max((o for o in p.objects if o.kind == ObjectKind.buffer and o.last_use > o.first_use),
            key=lambda o: o.size_bytes)
    o.last_use = o.first_use                               # the activation peak would be understated


def break_stages_partition(p):
    p.stages[4].first_step += 1                            # a step in no stage


def break_stage_needs(p):
    next(s for s in p.stages if s.module.startswith("layers.")).needs.clear()


def break_visits_known(p):
    p.visits.append(p.visits[0].model_copy())


def break_actions_known(p):
    p.actions[0].block = "embed"                           # resident: never copied


def break_one_copy_per_visit(p):
    _, pos = _streamed_visit(p)
    del p.actions[pos[ActionKind.copy_done]]


def break_slots_in_arena(p):
    p.arena.slots[-1].size_bytes += 256


def break_slots_disjoint(p):
    p.arena.slots[1].offset_bytes = p.arena.slots[0].offset_bytes


def break_resident_slots(p):
    stream = next(s.index for s in p.arena.slots if s.kind == SlotKind.stream)
    next(b for b in p.blocks if b.residency == Residency.resident).slot = stream


def break_resident_unquantized(p):
    next(b for b in p.blocks if b.residency == Residency.resident and b.name.startswith("layers.")).quant = Quant.int8


def break_hbm_store(p):
    stream = next(s.index for s in p.arena.slots if s.kind == SlotKind.stream)
    next(b for b in p.blocks if b.quant != Quant.none and b.residency == Residency.streamed).slot = stream


def break_mapped_in_place(p):
    # int4 tiles are not what the mapped linear kernel reads: the head can be read in place at int8 only
    next(b for b in p.blocks if b.residency == Residency.mapped and b.name == "output").quant = Quant.int4


def break_transfer_bytes(p):
    next(b for b in p.blocks if b.quant != Quant.none).transfer_bytes -= 256


def break_stream_slots_fit(p):
    for s in p.arena.slots:
        if s.kind == SlotKind.stream:
            s.size_bytes -= 256


def break_unpack_one_at_a_time(p):
    # the second quantized visit unpacks (copy_done) at the first one's free stage, before that free runs
    quantized = {b.name for b in p.blocks if b.quant != Quant.none}
    dones = [a for a in p.actions if a.kind == ActionKind.copy_done and a.block in quantized and not a.next_forward]
    first, second = dones[0], dones[1]
    free = next(i for i, a in enumerate(p.actions)
                if a.kind == ActionKind.free and (a.block, a.visit_stage) == (first.block, first.visit_stage))
    _move(p, p.actions.index(second), p.actions[free].stage, before=free)


def break_actions_hookable(p):
    a, _ = _streamed_visit(p)
    a.stage = next(s.index for s in p.stages if not s.module and s.index < a.stage)   # root glue, no hook


def break_kv_pool(p: Program) -> None:
    p.kv_pool = p.kv_pool.model_copy(update={"page_bytes": p.kv_pool.page_bytes + 256})


def break_kv_query_heads(p: Program) -> None:
    p.kv_pool = p.kv_pool.model_copy(update={"query_heads": p.kv_pool.kv_heads + 1})


def break_step_shape(p: Program) -> None:
    p.generation = p.generation.model_copy(update={"step_tokens": p.generation.step_tokens + 1})


def break_kv_reserved(p):
    next(s for s in p.arena.slots if s.kind == SlotKind.kv).size_bytes -= 256


def break_budget(p):
    p.budget_bytes = p.arena.size_bytes // 2


def break_prediction_honest(p):
    p.prediction.peak_hbm_bytes = 1


def break_copy_into_free_slot(p):
    # the free of the slot's previous occupant moves behind the copy into it, at the same stage entry
    s, pos = _streamed_visit(p)
    prev_free = next(i for i, a in enumerate(p.actions) if a.kind == ActionKind.free and a.slot == s.slot
                     and a.stage == s.stage)
    _move(p, prev_free, s.stage, before=pos[ActionKind.copy_start] + 1)


def break_wait_for_issued_copy(p):
    # the copy_done moves to the copy_start's stage, in front of it: it waits for a copy not yet issued
    s, pos = _streamed_visit(p)
    _move(p, pos[ActionKind.copy_done], s.stage, before=pos[ActionKind.copy_start])


def break_free_ready_occupant(p):
    # the free moves in front of its visit's copy_done: it frees a block still loading
    _, pos = _streamed_visit(p)
    done = p.actions[pos[ActionKind.copy_done]]
    _move(p, pos[ActionKind.free], done.stage, before=pos[ActionKind.copy_done])


def break_free_after_last_use(p):
    # the free moves right behind its visit's copy_done, on entry to the stage that reads the block
    _, pos = _streamed_visit(p)
    done = p.actions[pos[ActionKind.copy_done]]
    _move(p, pos[ActionKind.free], done.stage, before=pos[ActionKind.copy_done] + 1)


def break_arrival_before_use(p):
    # the copy_done moves from the visit's first stage to the end of the forward: that stage reads it unarrived
    _, pos = _streamed_visit(p)
    _move(p, pos[ActionKind.copy_done], len(p.stages))


def break_host_memory(p):
    # a swap space of a million blocks, the prediction's host figures as compiled: the machine check would pass it
    p.kv_pool.swap_pages = 10**6


CASES = {   # rule -> (base plan, edit, what the message must say)
    "plan-complete": ("stream", break_plan_complete,
        r"^plan verification failed: the program carries no complete plan: it has no prediction"),
    "unique-names": ("stream", break_unique_names, r"two objects are named '.+': names must be unique"),
    "slots-numbered": ("stream", break_slots_numbered, r"the arena's slot at position 0 has index 1"),
    "block-weights": ("stream", break_block_weights, r"weight '.+' is listed by blocks '.+' and '.+'"),
    "weight-layout": ("stream", break_weight_layout,
        r"weight '.+' \(bf16\) at offset \d+ of block 'layers.0' is not aligned to its 2-byte dtype"),
    "weights-disjoint": ("stream", break_weights_disjoint, r"weights '.+' and '.+' overlap in block 'layers.0'"),
    "steps-numbered": ("stream", break_steps_numbered,
        r"the step at position 3 has index 7: steps must be listed in order"),
    "names-known": ("stream", break_names_known,
        r"failed at step 2 \(.+ in module '.*'\): it uses or defines 'nope', which is not an object of the plan"),
    "defined-before-use": ("stream", break_defined_before_use,
        r"failed at step \d+ \(.+\): it reads '.+' before step \d+ \(.+\) defines it"),
    "live-ranges": ("stream", break_live_ranges,
        r"object '.+' has live range \[\d+, \d+\], but the plan's \d+ steps use it in \[\d+, \d+\]"),
    "stages-partition": ("stream", break_stages_partition, r"stage 4 covers steps \[\d+, \d+\]: stages must partition"),
    "stage-needs": ("stream", break_stage_needs,
        r"it reads '.+' of block 'layers.0', which stage 3 does not list in its needs"),
    "visits-known": ("stream", break_visits_known, r"block '.+' has two visits starting at stage \d+"),
    "actions-known": ("stream", break_actions_known, r"block 'embed' is not streamed, so it is never copied"),
    "one-copy-per-visit": ("stream", break_one_copy_per_visit,
        r"the visit of '.+' at stage \d+ has 1 copy_start, 0 copy_done, 1 free"),
    "slots-in-arena": ("stream", break_slots_in_arena,
        r"arena slot \d+ at bytes \d+\.\.\d+ ends past the \d+-byte arena"),
    "slots-disjoint": ("stream", break_slots_disjoint, r"arena slots \d+ and \d+ overlap"),
    "resident-slots": ("stream", break_resident_slots,
        r"resident block '.+' names slot \d+, which is not a resident slot"),
    "resident-unquantized": ("int8", break_resident_unquantized, r"resident block 'layers\.\d+' is quantized \(int8\)"),
    "mapped-in-place": ("mapped", break_mapped_in_place,
        r"block 'output' is mapped, but only an embedding \(unquantized or int8\) or an int8 linear layer"),
    "hbm-store": ("int8", break_hbm_store, r"streamed block '.+' names slot \d+, which is not a store slot"),
    "transfer-bytes": ("int8", break_transfer_bytes,
        r"the plan's transfer_bytes \d+ differ from the runtime's packed layout of \d+ bytes"),
    "stream-slots-fit": ("int8", break_stream_slots_fit,
        r"block '.+' \(\d+ bytes as it arrives\) does not fit stream slot \d+ \(\d+ bytes\)"),
    "actions-hookable": ("stream", break_actions_hookable,
        r"fires at stage \d+, which is root glue code with no module hook"),
    "kv-pool": ("kv", break_kv_pool, r"KV pool pages of \d+ bytes: \d+ layers x \d+ tokens x \d+ heads x \d+ "
                                     r"\(none KV\) are \d+ bytes"),
    "step-shape": ("kv", break_step_shape, r"the traced step is 1x\d+ tokens but the plan proves steps of \d+"),
    "kv-reserved": ("kv", break_kv_reserved, r"the KV cache needs .+ but the arena's KV slots hold \d+ bytes"),
    "budget": ("stream", break_budget,
        (r"^plan verification failed: budget .+ is below the plan's peak .+ \(arena .+ \+ activations .+ \+ workspace "
         r".+, at step \d+ \(.+\)")),
    "prediction-honest": ("stream", break_prediction_honest, r"the plan's recorded predicted peak 1 bytes understates"),
    "host-memory": ("kv", break_host_memory,
        r"the plan states \d+ bytes of pinned host memory, but its streamed blocks .+ \+ KV swap space .+ need \d+ "
        r"bytes"),
    "copy-into-free-slot": ("stream", break_copy_into_free_slot,
        r"the copy of '.+' into slot \d+ would overwrite '.+' \(visit at stage \d+\), which is still in use"),
    "wait-for-issued-copy": ("stream", break_wait_for_issued_copy,
        r"copy_done waits for '.+' in slot \d+, but no copy of that visit for this forward is in flight"),
    "free-ready-occupant": ("stream", break_free_ready_occupant,
        r"free of '.+' in slot \d+, which holds '.+' \(loading\)"),
    "free-after-last-use": ("stream", break_free_after_last_use, r"'.+' is freed before its last use at stage \d+"),
    "unpack-slot-one-at-a-time": ("int8", break_unpack_one_at_a_time,
        r"copy_done of '.+' unpacks into slot \d+, which still holds the weights of '.+' \(visit at stage \d+\)"),
    "arrival-before-use": ("stream", break_arrival_before_use,
        (r"failed at step \d+ \(stage \d+, module '.+'\): it reads '.+' of streamed block '.+' before the block's copy "
         r"arrived")),
}


def test_every_rule_has_a_statement_and_a_test():
    names = [r.name for r in RULES + TRACE_RULES]
    assert len(names) == len(set(names))
    assert set(names) == set(CASES)
    assert all(len(r.doc) > 20 for r in RULES + TRACE_RULES)


@pytest.mark.parametrize("rule", list(CASES))
def test_breaking_one_rule_is_refused_naming_it(rule):
    base, edit, match = CASES[rule]
    p = compiled(base).model_copy(deep=True)
    edit(p)
    with pytest.raises(PlanVerificationError, match=match) as e:
        verify(p)
    assert e.value.rule == rule, str(e.value)
    assert "\n" not in str(e.value)
    verify(compiled(base))   # the plan as compiled still passes: the edit worked on a copy


def test_a_mapped_block_names_no_slot():
    # the mapped-in-place rule's second statement: nothing of a mapped block is ever in HBM
    p = compiled("mapped").model_copy(deep=True)
    next(b for b in p.blocks if b.residency == Residency.mapped).slot = 0
    with pytest.raises(PlanVerificationError, match=r"mapped block '.+' names a slot") as e:
        verify(p)
    assert e.value.rule == "mapped-in-place"


def test_kv_pool_query_heads_must_be_a_multiple_of_its_kv_heads():
    # the kv-pool rule's second statement (the cost model picks the attention kernel's path by this ratio)
    p = compiled("kv").model_copy(deep=True)
    assert p.kv_pool.query_heads == 2 * p.kv_pool.kv_heads                  # the planner records the model's heads
    break_kv_query_heads(p)
    with pytest.raises(PlanVerificationError, match=r"the KV pool's \d+ query heads are not a multiple of its \d+ KV "
                                                    r"heads") as e:
        verify(p)
    assert e.value.rule == "kv-pool"


def test_admission_classes_belong_to_longest_output():
    # the step-shape rule's last statement: a plan under fcfs carries no class of output lengths
    p = compiled("kv").model_copy(deep=True)
    assert p.generation.admission == "fcfs" and p.generation.admission_class_tokens == 1
    p.generation = p.generation.model_copy(update={"admission_class_tokens": 28})
    with pytest.raises(PlanVerificationError, match=r"admission classes of 28 tokens under 'fcfs'") as e:
        verify(p)
    assert e.value.rule == "step-shape"
    p.generation = p.generation.model_copy(update={"admission": "longest-output"})
    verify(p)
