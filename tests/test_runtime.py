"""Runtime tests on the CPU backend: same slot/visit/event bookkeeping as CUDA, synchronous copies.

Plans for the toy models are made by the compiler's own passes from a trace written by hand (``hand_plan``): the
schedule, the actions and the proof are the compiler's, only the trace and the residency decision are given.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from memintent.passes.verify import prove
from memintent.models.fingerprint import fingerprint_module, ir_dtype, named_weights
from memintent.compiler.hardware import BUILTIN
from memintent.errors import MemintentError, PlanVerificationError, RuntimeFault
from memintent.ir.model import ActionKind, Block, ModelRef, Object, ObjectKind, Program, RunShape, Step, Tier, dtype_bytes
from memintent.passes import run_passes
from memintent.passes.actions import ACTIONS
from memintent.passes.costs import COSTS
from memintent.passes.lifetimes import LIFETIMES
from memintent.passes.prefetch import PREFETCH
from memintent.passes.residency import given_residency_pass
from memintent.passes.verify import VERIFY
from memintent.runtime import HostStore, attach, fill_from_module

ALIGN = 256
ACTIVATION_BYTES = 1024   # each hand-traced step's output; only the predicted activation peak depends on it


# ---------------------------------------------------------------------------------------------------------------
# Plans: the real passes on a hand-written trace
# ---------------------------------------------------------------------------------------------------------------
def _al(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _call_order(model: nn.Module, example: torch.Tensor, modules: list[str]) -> list[str]:
    """The block modules in the order one forward calls them."""
    order: list[str] = []
    hooks = [model.get_submodule(m).register_forward_pre_hook(lambda _m, _a, m=m: order.append(m)) for m in modules]
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    return order


def _blocks(tensors: dict[str, torch.Tensor], block_modules: list[str]) -> tuple[list[Object], list[Block]]:
    """One block per module: its parameters and buffers (a tied weight under its first name), 256-byte aligned."""
    objects, blocks = [], []
    for m in block_modules:
        names = [n for n in tensors if n.startswith(m + ".")]
        off = 0
        for n in names:
            t = tensors[n]
            size = dtype_bytes(ir_dtype(t.dtype), t.numel())
            objects.append(Object(name=n, kind=ObjectKind.weight, dtype=ir_dtype(t.dtype), shape=list(t.shape),
                                  size_bytes=size, home=Tier.host, block=m, block_offset_bytes=off))
            off = _al(off + size)
        blocks.append(Block(name=m, module=m, size_bytes=off, weights=names))
    return objects, blocks


def hand_trace(model: nn.Module, example: torch.Tensor, block_modules: list[str],
               glue_after: str | None = None) -> Program:
    """What the front end would trace, written by hand: one step per call of a block module, in execution order,
    reading the weights that module holds and the previous step's output (plus a root-glue step after
    ``glue_after``)."""
    tensors = named_weights(model)
    objects, blocks = _blocks(tensors, block_modules)
    planned = {o.name for o in objects}
    name_of = {id(t): n for n, t in tensors.items()}
    steps: list[Step] = []

    def step(module: str, reads: list[str]) -> None:
        i = len(steps)
        objects.append(Object(name=f"act{i}", kind=ObjectKind.buffer, dtype="u8", shape=[ACTIVATION_BYTES],
                              size_bytes=ACTIVATION_BYTES, home=Tier.hbm))
        steps.append(Step(index=i, op="hand.call", module=module, block=module,
                          uses=reads + ([f"act{i - 1}"] if i else []), defs=[f"act{i}"]))

    for m in _call_order(model, example, block_modules):
        mod = model.get_submodule(m)
        reads = [name_of[id(t)] for t in [*mod.parameters(), *mod.buffers()] if name_of.get(id(t)) in planned]
        step(m, list(dict.fromkeys(reads)))
        if m == glue_after:
            step("", [])
    return Program(name="hand", model=ModelRef(ref="test:toy", kind="py", dtype="f32"),
                   fingerprint=fingerprint_module(model), shape=RunShape(batch=example.shape[0], seq=example.shape[1]),
                   hardware=BUILTIN["cpu"], objects=objects, blocks=blocks, steps=steps, passes=["trace"])


def hand_plan(model: nn.Module, example: torch.Tensor, block_modules: list[str], streamed: set[str], n_slots: int,
              glue_after: str | None = None) -> Program:
    """A verified plan for ``hand_trace``: ``streamed`` blocks stream through ``n_slots`` stream slots, the rest stay
    resident; lifetimes, costs, prefetch (``passes.schedule.make_schedule``), actions and verify are the compiler's
    own passes. Returned through the plan file's JSON, as the runtime gets it."""
    passes = (LIFETIMES, COSTS, given_residency_pass(set(streamed), n_slots), PREFETCH, ACTIONS, VERIFY)
    p = run_passes(hand_trace(model, example, block_modules, glue_after), passes)
    return Program.model_validate_json(p.model_dump_json())


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------
class Toy(nn.Module):
    def __init__(self, n_layers: int = 4, dim: int = 32, vocab: int = 64, reverse: bool = False, tied: bool = False):
        super().__init__()
        self.reverse = reverse
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for _ in range(n_layers))
        self.head = nn.Linear(dim, vocab)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) * 0.5   # [b, s, dim]; root glue between the embed and layer stages
        for layer in (reversed(self.layers) if self.reverse else self.layers):
            x = layer(x) + x        # [b, s, dim]
        return self.head(x)         # [b, s, vocab]


LAYERS = [f"layers.{i}" for i in range(4)]
BLOCKS = ["embed", *LAYERS, "head"]


def toy(seed: int = 0, **kw) -> Toy:
    torch.manual_seed(seed)
    return Toy(**kw).eval()


def ids(seed: int, b: int = 2, s: int = 8, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def plan_for(model: nn.Module, streamed=LAYERS, n_slots: int = 2, blocks=BLOCKS) -> Program:
    return hand_plan(model, ids(0), blocks, set(streamed), n_slots, glue_after="embed")


def streamed_bytes_per_forward(p: Program) -> int:
    sizes = {b.name: b.size_bytes for b in p.blocks}
    return sum(sizes[a.block] for a in p.actions if a.kind == ActionKind.copy_start)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_slots,streamed", [(1, LAYERS), (2, LAYERS), (3, LAYERS), (2, BLOCKS)])
def test_streamed_logits_bitwise_equal_over_forwards(n_slots, streamed):
    ref = toy()
    model = copy.deepcopy(ref)
    plan = plan_for(model, streamed, n_slots)
    h = attach(model, prove(plan), "cpu")
    for i in range(4):   # forwards 1.. consume copies issued in the previous forward's tail
        x = ids(i + 1)
        with torch.no_grad():
            assert torch.equal(model(x), ref(x)), f"forward {i}"
    stats = h.stats()
    assert len(stats) == 4
    per_forward = streamed_bytes_per_forward(plan)
    assert per_forward == sum(b.size_bytes for b in plan.blocks if b.name in streamed)   # one visit per block
    assert [s.bytes_copied for s in stats] == [per_forward] * 4
    assert [s.copies for s in stats] == [len(streamed)] * 4
    h.detach()


def test_tied_streamed_embedding_is_visited_twice():
    ref = toy(tied=True)
    model = copy.deepcopy(ref)
    plan = plan_for(model, ["embed", *LAYERS], 3)
    starts = [a for a in plan.actions if a.kind == ActionKind.copy_start and a.block == "embed"]
    assert sorted(a.visit_stage for a in starts) == [0, 6]
    h = attach(model, prove(plan), "cpu", check=True)
    for i in range(3):
        with torch.no_grad():
            assert torch.equal(model(ids(i)), ref(ids(i)))
    assert h.last_stats.bytes_copied == streamed_bytes_per_forward(plan)
    h.detach()


def test_inference_mode_and_json_plan():
    ref = toy()
    model = copy.deepcopy(ref)
    with attach(model, prove(plan_for(model)), "cpu"):
        with torch.inference_mode():
            for i in range(3):
                assert torch.equal(model(ids(i)), ref(ids(i)))


def test_checked_mode_correct_plan_is_exact_and_poisons_after_use():
    ref = toy()
    model = copy.deepcopy(ref)
    h = attach(model, prove(plan_for(model, n_slots=3)), "cpu", check=True)
    for i in range(3):
        with torch.no_grad():
            assert torch.equal(model(ids(i)), ref(ids(i)))
    # Between its free and the slot's next copy, a block's weights are poisoned: a use outside the plan is NaN.
    # With 3 slots, layers.2 (slot 4) is freed on entry to layers.3 and its slot is refilled only on entry to the
    # head, with the next forward's layers.2.
    frees = {(a.stage, a.block) for a in h.program.actions if a.kind == ActionKind.free}
    refills = [a.stage for a in h.program.actions if a.kind == ActionKind.copy_start and a.slot == 4]
    assert (5, "layers.2") in frees and refills == [6]
    seen = []
    probe = model.layers[3].register_forward_hook(lambda *_: seen.append(model.layers[2][0].weight.isnan().all()))
    with torch.no_grad():
        assert torch.equal(model(ids(5)), ref(ids(5)))
    probe.remove()
    assert seen == [True]
    with pytest.raises(RuntimeFault, match="outside a forward"):
        model.layers[3](torch.zeros(1, 32))
    h.detach()


def _move_free_into_last_use(plan: Program, block: str, first: bool) -> Program:
    """The bug a wrong last-use computation makes: the free fires on entry to the block's last stage."""
    p = plan.model_copy(deep=True)
    i = next(i for i, a in enumerate(p.actions) if a.kind == ActionKind.free and a.block == block)
    a = p.actions.pop(i)
    a.stage = a.visit_stage
    j = max(k for k, b in enumerate(p.actions) if b.stage == a.stage)   # after that stage's copy_done
    p.actions.insert(next(k for k, b in enumerate(p.actions) if b.stage == a.stage) if first else j + 1, a)
    return p


def refused(model: nn.Module, plan: Program, rule: str, match: str, **kw) -> None:
    """``attach`` refuses ``plan`` for breaking ``rule``, before hooking anything."""
    with pytest.raises(PlanVerificationError, match=match) as e:
        attach(model, prove(plan), "cpu", **kw)
    assert e.value.rule == rule
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_early_free_is_refused_at_attach():
    model = toy()
    bad = _move_free_into_last_use(plan_for(model), "layers.2", first=False)
    refused(model, bad, "free-after-last-use", r"at step 4 \(stage 4, module 'layers.2'\): 'layers.2' is freed before "
                                               r"its last use at stage 4", check=True)


def test_early_free_hidden_from_the_needs_is_refused_at_attach():
    # Same bug, and the plan's `needs` do not mention the block: the needs no longer say what the steps read.
    model = toy()
    bad = _move_free_into_last_use(plan_for(model), "layers.2", first=False)
    for s in bad.stages:
        s.needs = []
    refused(model, bad, "stage-needs", r"reads 'embed.weight' of block 'embed', which stage 0 does not list in its "
                                       r"needs", check=True)


class LeakyToy(Toy):
    """The toy with a read its trace never shows: after the layers, it reads layers.2's weight (times 0)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) * 0.5                         # [b, s, dim]
        for layer in self.layers:
            x = layer(x) + x                              # [b, s, dim]
        # .item() waits for the read, so on CUDA too it happens before the head's pre-hook refills the slot
        leak = self.layers[2][0].weight.sum().item()      # NaN if the weight is poisoned
        return self.head(x + 0.0 * leak)                  # [b, s, vocab]


def test_checked_mode_turns_a_read_outside_the_plan_into_nan():
    # A model that reads a streamed block outside its planned residency (the plan, from the well-behaved toy,
    # frees layers.2 on entry to layers.3; this model reads it after layers.3): checked mode makes it NaN.
    ref = toy()
    plan = plan_for(ref, n_slots=3)
    torch.manual_seed(0)
    leaky = LeakyToy().eval()
    leaky.load_state_dict(ref.state_dict())
    h = attach(leaky, prove(plan), "cpu", check=True)
    with torch.no_grad():
        assert leaky(ids(1)).isnan().all()
    h.detach()
    # unchecked, the CPU backend cannot see it (on a GPU it is a race): that is what checked mode is for
    with attach(leaky, prove(plan), "cpu"):
        with torch.no_grad():
            assert torch.equal(leaky(ids(1)), ref(ids(1)))


def test_free_before_copy_done_is_refused_at_attach():
    model = toy()
    bad = _move_free_into_last_use(plan_for(model), "layers.1", first=True)
    refused(model, bad, "free-ready-occupant", r"at step 3 \(stage 3, module 'layers.1'\): free of 'layers.1' in slot "
                                               r"\d+, which holds 'layers.1' \(loading\)")


def test_missing_copy_done_is_refused_at_attach():
    model = toy()
    p = plan_for(model)
    p.actions = [a for a in p.actions if not (a.kind == ActionKind.copy_done and a.block == "layers.3")]
    refused(model, p, "one-copy-per-visit", r"the visit of 'layers.3' at stage 5 has 1 copy_start, 0 copy_done, 1 free",
            check=True)


def test_copy_into_occupied_slot_is_refused_at_attach():
    model = toy()
    p = plan_for(model, n_slots=1)
    # layers.0's free moves behind the copy of layers.1 into the same slot, at the same stage entry
    i = next(i for i, a in enumerate(p.actions) if a.kind == ActionKind.free and a.block == "layers.0")
    free = p.actions.pop(i)
    j = next(j for j, a in enumerate(p.actions) if a.kind == ActionKind.copy_start and a.block == "layers.1")
    p.actions.insert(j + 1, free)
    refused(model, p, "copy-into-free-slot", r"the copy of 'layers.1' into slot \d+ would overwrite 'layers.0'")


def test_different_model_is_refused_by_fingerprint():
    plan = plan_for(toy())
    other = toy(dim=48)
    with pytest.raises(MemintentError, match=r"does not match the plan.*fingerprint sha256:.*sha256:.*"
                                             r"embed.weight: model 64x48 f32, plan 64x32 f32"):
        attach(other, prove(plan), "cpu")
    assert not other._forward_pre_hooks


def test_out_of_order_forward_names_the_block():
    plan = plan_for(toy())
    rev = toy(reverse=True)   # same weights, layers run last to first
    h = attach(rev, prove(plan), "cpu")
    with pytest.raises(RuntimeFault, match=r"at stage 2: the model ran module 'layers.3' \(block 'layers.3'\), "
                                           r"but the plan expected module 'layers.0' \(block 'layers.0'\)"):
        rev(ids(1))
    h.detach()


def test_recovers_after_a_forward_that_raised():
    ref = toy()
    model = copy.deepcopy(ref)
    h = attach(model, prove(plan_for(model)), "cpu", check=True)
    boom = model.layers[2].register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(ValueError("boom")))
    with pytest.raises(ValueError):
        model(ids(1))
    boom.remove()
    with torch.no_grad():
        for i in range(2):   # the aborted forward's slots and copies are forgotten; prefetch starts over
            assert torch.equal(model(ids(i)), ref(ids(i)))
    h.detach()


def test_detach_removes_hooks_and_releases_arena():
    ref = toy()
    model = copy.deepcopy(ref)
    h = attach(model, prove(plan_for(model)), "cpu")
    with torch.no_grad():
        model(ids(1))
    arena = weakref.ref(h.arena.tensor)
    start = h.arena.tensor.data_ptr()
    end = start + h.arena.size_bytes
    h.detach()
    gc.collect()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert arena() is None and h.arena.released
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert not start <= t.data_ptr() < end, n
    with torch.no_grad():   # weights are back on the host, the model runs as before
        assert torch.equal(model(ids(2)), ref(ids(2)))
    h.detach()   # idempotent


def test_fill_a_meta_model_from_a_source():
    ref = toy()
    with torch.device("meta"):
        model = Toy()
    plan = plan_for(ref)
    with attach(model, prove(plan), "cpu", fill=fill_from_module(ref, adopt=False)):
        with torch.no_grad():
            assert torch.equal(model(ids(3)), ref(ids(3)))
    assert not ref.embed.weight.is_meta and not model.embed.weight.is_meta


def test_host_store_layout_and_adopt():
    model = toy()
    plan = plan_for(model)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    store = HostStore(plan, pin="none")
    store.fill(fill_from_module(model, adopt=True))
    for b in plan.blocks:
        buf = store.buffer(b.name)
        assert buf.dtype == torch.uint8 and buf.numel() == b.size_bytes and buf.data_ptr() % ALIGN == 0
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n])
        # adopted: the module's tensor now lives in the store, no second host copy
        assert t.data_ptr() == store.view(n).data_ptr()


def test_stats_report_overhead_and_copy_time():
    model = toy()
    h = attach(model, prove(plan_for(model)), "cpu")
    for i in range(3):
        with torch.no_grad():
            model(ids(i))
    stats = h.stats()
    s = stats[-1]
    # Deterministic quantities only: how long the copies and hooks took depends on the machine's load.
    assert [x.index for x in stats] == [0, 1, 2]
    assert s.stall_s is None and s.device_s is None            # not measurable on the CPU backend
    assert s.copy_s is not None and s.host_overhead_s >= 0     # measured (perf_counter), whatever their values
    assert s.copies == len(LAYERS) and s.bytes_copied == streamed_bytes_per_forward(h.program)
    assert s.stage_entries == len([st for st in h.program.stages if st.module]) + 2
    assert s.host_overhead_per_block_s == s.host_overhead_s / len(LAYERS)
    assert s.dequants == 0
    assert f"copied {s.bytes_copied / 1e6:.1f} MB in {len(LAYERS)} copies" in s.summary() and "us/block" in s.summary()
    h.detach()


@pytest.mark.parametrize("mutate,rule,match", [
    (lambda p: setattr(p.actions[0], "stage", 1), "actions-hookable", "root glue"),
    (lambda p: setattr(p.arena.slots[-1], "size_bytes", 16), "stream-slots-fit", "does not fit stream slot"),
    (lambda p: p.actions.pop(next(i for i, a in enumerate(p.actions) if a.kind == ActionKind.copy_start)),
     "one-copy-per-visit", "0 copy_start"),
    (lambda p: setattr(p.objects[0], "block_offset_bytes", 4), "weight-layout", "not aligned|outside its block"),
    (lambda p: setattr(p, "arena", None), "plan-complete", "no complete plan: it has no arena"),
])
def test_invalid_plans_are_refused_at_load(mutate, rule, match):
    model = toy()
    p = plan_for(model)
    mutate(p)
    refused(model, p, rule, match)


def test_hugging_face_generate_runs_unchanged():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    model = copy.deepcopy(ref)
    prompt = ids(5, b=1, s=6, vocab=96)
    layers = [f"model.layers.{i}" for i in range(3)]
    blocks = ["model.embed_tokens", "model.rotary_emb", *layers, "model.norm", "lm_head"]
    plan = hand_plan(model, prompt, blocks, set(layers) | {"lm_head"}, 2)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = ref.generate(prompt, **kw)
    h = attach(model, prove(plan), "cpu", check=True)
    got = model.generate(prompt, **kw)
    assert torch.equal(got, want)
    assert len(h.stats()) == 6 and {s.bytes_copied for s in h.stats()} == {streamed_bytes_per_forward(plan)}
    h.detach()


def test_second_attach_is_refused_until_detach():
    model = toy()
    plan = plan_for(model)
    h = attach(model, prove(plan), "cpu")
    with pytest.raises(MemintentError, match="already attached"):
        attach(model, prove(plan), "cpu")
    h.detach()
    with attach(model, prove(plan), "cpu", host_store=h.host_store):   # re-attach, reusing the filled host store
        with torch.no_grad():
            assert torch.equal(model(ids(1)), toy()(ids(1)))


def test_a_captured_forward_leaves_the_engine_as_it_found_it():
    # A forward captured as a CUDA graph (engine/graphs.py) runs its hooks as a steady-state forward: on the CPU
    # backend it runs eagerly, so its logits show it read every weight the plan's way; what the forwards before it
    # left in flight (the next-forward copies its predecessor issued) is restored after it, and it has no statistics.
    ref = toy()
    model = copy.deepcopy(ref)
    plan = plan_for(model, LAYERS, 2)
    tail = sum(b.size_bytes for b in plan.blocks
               if any(a.kind == ActionKind.copy_start and a.next_forward and a.block == b.name for a in plan.actions))
    assert tail > 0, "the plan copies the next forward's first visits in its tail"
    h = attach(model, prove(plan), "cpu")
    with pytest.raises(MemintentError, match="after a whole forward"), h.capturing():
        pass
    with torch.no_grad():
        assert torch.equal(model(ids(1)), ref(ids(1)))
        arrival, pending = h.engine.arrival, h.engine._next
        with h.capturing():
            assert h.engine.capturing
            assert torch.equal(model(ids(2)), ref(ids(2)))
        assert not h.engine.capturing
        assert h.engine.arrival is arrival and h.engine._next is pending
        assert torch.equal(model(ids(3)), ref(ids(3)))
        with h.replaying():      # what a replay leaves: the graph copied the next forward's first visits itself
            pass
        assert torch.equal(model(ids(4)), ref(ids(4)))
    per_forward = streamed_bytes_per_forward(plan)
    assert [s.bytes_copied for s in h.stats()] == [per_forward, per_forward, per_forward - tail]
    h.detach()
    checked = copy.deepcopy(ref)
    h = attach(checked, prove(plan_for(checked, LAYERS, 2)), "cpu", check=True)
    with torch.no_grad():
        checked(ids(1))
    with pytest.raises(MemintentError, match="checked mode"), h.capturing():
        pass
    h.detach()
