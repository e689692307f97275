"""Runtime tests on the CPU backend: same slot/visit/event bookkeeping as CUDA, synchronous copies.

Plans are built by hand (``hand_plan``) until the compiler produces them; the helper is deliberately small and
self-contained so it can be swapped for ``memintent.passes`` output.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from memintent.compiler.fingerprint import fingerprint_module, ir_dtype
from memintent.errors import MemintentError, RuntimeFault
from memintent.ir.model import (Action, ActionKind, Arena, Block, ModelRef, Object, ObjectKind, Program, Residency,
                                RunShape, Slot, SlotKind, Stage, Tier, dtype_bytes)
from memintent.runtime import HostStore, attach, fill_from_module

ALIGN = 256


# ---------------------------------------------------------------------------------------------------------------
# Hand-built plans (to be replaced by compiled ones)
# ---------------------------------------------------------------------------------------------------------------
def _al(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def hand_plan(model: nn.Module, example: torch.Tensor, block_modules: list[str], streamed: set[str], n_slots: int,
              glue_after: str | None = None) -> Program:
    """A valid plan: one block per module in ``block_modules`` (its parameters and buffers), one stage per block
    module in execution order (plus a root-glue stage after ``glue_after``), ``n_slots`` stream slots used round
    robin: visit i lives in slot i % n_slots, its copy starts when visit i - n_slots frees the slot (the first
    n_slots copies at the end of the previous forward), copy_done on entry to its first stage, free on entry to
    the next hooked stage (or at the end of the forward)."""
    order: list[str] = []
    hooks = [model.get_submodule(m).register_forward_pre_hook(lambda _m, _a, m=m: order.append(m))
             for m in block_modules]
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()

    tensors = dict(model.named_parameters())
    for n, b in model.named_buffers():
        tensors.setdefault(n, b)
    owner_by_id = {}
    objects, blocks = [], []
    for m in block_modules:
        names = [n for n in tensors if n.startswith(m + ".")]
        off = 0
        for n in names:
            t = tensors[n]
            size = dtype_bytes(ir_dtype(t.dtype), t.numel())
            objects.append(Object(name=n, kind=ObjectKind.weight, dtype=ir_dtype(t.dtype), shape=list(t.shape),
                                  size_bytes=size, home=Tier.host, block=m, block_offset_bytes=off))
            owner_by_id[id(t)] = m
            off = _al(off + size)
        blocks.append(Block(name=m, module=m, size_bytes=off, weights=names,
                            residency=Residency.streamed if m in streamed else Residency.resident))

    stages: list[Stage] = []
    for m in order:
        mod = model.get_submodule(m)
        needs = sorted({owner_by_id[id(t)] for t in list(mod.parameters()) + list(mod.buffers())})
        stages.append(Stage(index=len(stages), module=m, block=m, first_step=0, last_step=0, needs=needs))
        if m == glue_after:
            stages.append(Stage(index=len(stages), module="", block="", first_step=0, last_step=0))
    n_st = len(stages)

    slots, off = [], 0
    for b in blocks:
        if b.residency == Residency.resident:
            b.slot = len(slots)
            slots.append(Slot(index=len(slots), kind=SlotKind.resident, offset_bytes=off, size_bytes=b.size_bytes))
            off = _al(off + b.size_bytes)
    stream_bytes = max((b.size_bytes for b in blocks if b.residency == Residency.streamed), default=0)
    first_stream = len(slots)
    for _ in range(n_slots):
        slots.append(Slot(index=len(slots), kind=SlotKind.stream, offset_bytes=off, size_bytes=stream_bytes))
        off = _al(off + stream_bytes)

    # visits: maximal runs of consecutive stages that need a streamed block
    visits = []
    for b in (b for b in blocks if b.residency == Residency.streamed):
        run = [s.index for s in stages if b.name in s.needs]
        for s in run:
            if visits and visits[-1][0] == b.name and visits[-1][2] == s - 1:
                visits[-1][2] = s
            else:
                visits.append([b.name, s, s])
    visits.sort(key=lambda v: v[1])

    def next_hooked(s: int) -> int:
        while s < n_st and not stages[s].module:
            s += 1
        return s

    acts = []   # (stage, kind order, visit order, Action)
    free_at = []
    for i, (name, first, last) in enumerate(visits):
        slot = first_stream + i % n_slots
        free_at.append(next_hooked(last + 1))
        if i >= n_slots:
            start, nf = free_at[i - n_slots], False
            assert start <= first, "round robin needs more slots for this model"
        else:
            start, nf = n_st, True
        mk = lambda k, st, nf=False: Action(kind=k, stage=st, block=name, slot=slot, visit_stage=first,  # noqa
                                            next_forward=nf)
        acts += [(free_at[i], 0, i, mk(ActionKind.free, free_at[i])),
                 (start, 1, i, mk(ActionKind.copy_start, start, nf)),
                 (first, 2, i, mk(ActionKind.copy_done, first))]
    acts.sort(key=lambda a: a[:3])

    p = Program(name="hand", model=ModelRef(ref="test:toy", kind="py", dtype="f32"),
                fingerprint=fingerprint_module(model),
                shape=RunShape(batch=example.shape[0], seq=example.shape[1]), objects=objects, blocks=blocks,
                stages=stages, arena=Arena(size_bytes=off, slots=slots), actions=[a[3] for a in acts])
    return Program.model_validate_json(p.model_dump_json())   # as the runtime gets it: through the plan file


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
    h = attach(model, plan, "cpu")
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
    h = attach(model, plan, "cpu", check=True)
    for i in range(3):
        with torch.no_grad():
            assert torch.equal(model(ids(i)), ref(ids(i)))
    assert h.last_stats.bytes_copied == streamed_bytes_per_forward(plan)
    h.detach()


def test_inference_mode_and_json_plan():
    ref = toy()
    model = copy.deepcopy(ref)
    with attach(model, plan_for(model), "cpu"):
        with torch.inference_mode():
            for i in range(3):
                assert torch.equal(model(ids(i)), ref(ids(i)))


def test_checked_mode_correct_plan_is_exact_and_poisons_after_use():
    ref = toy()
    model = copy.deepcopy(ref)
    h = attach(model, plan_for(model, n_slots=2), "cpu", check=True)
    for i in range(3):
        with torch.no_grad():
            assert torch.equal(model(ids(i)), ref(ids(i)))
    # Between its free and the slot's next copy, a block's weights are poisoned: a use outside the plan is NaN.
    # layers.2 is freed on entry to layers.3 and its slot is refilled only at the end of the forward.
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


def test_checked_mode_catches_early_free():
    model = toy()
    bad = _move_free_into_last_use(plan_for(model), "layers.2", first=False)
    h = attach(model, bad, "cpu", check=True)
    with pytest.raises(RuntimeFault, match=r"stage 4 .*reads block 'layers.2'.*freed"):
        model(ids(1))
    h.detach()


def test_checked_mode_poisons_early_free_into_nan():
    # Same bug, but the plan's `needs` do not mention the block, so only the poisoned slot can reveal it.
    ref, model = toy(), toy()
    bad = _move_free_into_last_use(plan_for(model), "layers.2", first=False)
    for s in bad.stages:
        s.needs = []
    h = attach(model, bad, "cpu", check=True)
    with torch.no_grad():
        out = model(ids(1))
    assert out.isnan().all()
    h.detach()
    # unchecked, the CPU backend cannot see it (on a GPU it is a race): that is what checked mode is for
    model = copy.deepcopy(ref)
    h = attach(model, bad, "cpu")
    with torch.no_grad():
        assert torch.equal(model(ids(1)), ref(ids(1)))
    h.detach()


def test_free_before_copy_done_faults_in_any_mode():
    model = toy()
    bad = _move_free_into_last_use(plan_for(model), "layers.1", first=True)
    h = attach(model, bad, "cpu")
    with pytest.raises(RuntimeFault, match=r"free of block 'layers.1'.*before its copy_done"):
        model(ids(1))
    h.detach()


def test_checked_mode_catches_missing_copy_done():
    model = toy()
    p = plan_for(model)
    p.actions = [a for a in p.actions if not (a.kind == ActionKind.copy_done and a.block == "layers.3")]
    h = attach(model, p, "cpu", check=True)
    with pytest.raises(RuntimeFault, match=r"reads block 'layers.3'.*no copy_done"):
        model(ids(1))
    h.detach()


def test_copy_into_occupied_slot_faults():
    model = toy()
    p = plan_for(model, n_slots=1)
    p.actions = [a for a in p.actions if not (a.kind == ActionKind.free and a.block == "layers.0")]
    h = attach(model, p, "cpu")
    with pytest.raises(RuntimeFault, match=r"copy_start of block 'layers.1'.*while block 'layers.0'"):
        model(ids(1))
    h.detach()


def test_different_model_is_refused_by_fingerprint():
    plan = plan_for(toy())
    other = toy(dim=48)
    with pytest.raises(MemintentError, match=r"does not match the plan.*fingerprint sha256:.*sha256:.*"
                                             r"embed.weight: model 64x48 f32, plan 64x32 f32"):
        attach(other, plan, "cpu")
    assert not other._forward_pre_hooks


def test_out_of_order_forward_names_the_block():
    plan = plan_for(toy())
    rev = toy(reverse=True)   # same weights, layers run last to first
    h = attach(rev, plan, "cpu")
    with pytest.raises(RuntimeFault, match=r"at stage 2: the model ran module 'layers.3' \(block 'layers.3'\), "
                                           r"but the plan expected module 'layers.0' \(block 'layers.0'\)"):
        rev(ids(1))
    h.detach()


def test_recovers_after_a_forward_that_raised():
    ref = toy()
    model = copy.deepcopy(ref)
    h = attach(model, plan_for(model), "cpu", check=True)
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
    h = attach(model, plan_for(model), "cpu")
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
    with attach(model, plan, "cpu", fill=fill_from_module(ref, adopt=False)):
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
    h = attach(model, plan_for(model), "cpu")
    for i in range(3):
        with torch.no_grad():
            model(ids(i))
    s = h.last_stats
    assert s.stall_s is None and s.device_s is None            # not measurable on the CPU backend
    assert s.copy_s > 0 and s.copy_gbps > 0
    assert s.stage_entries == len([st for st in h.program.stages if st.module]) + 2
    assert 0 < s.host_overhead_per_block_s < 2e-3, s.summary()  # loose: shared CI machines
    assert "us/block" in s.summary()
    h.detach()


@pytest.mark.parametrize("mutate,match", [
    (lambda p: setattr(p.actions[0], "stage", 1), "root glue"),
    (lambda p: setattr(p.arena.slots[-1], "size_bytes", 16), "does not fit slot"),
    (lambda p: p.actions.pop(next(i for i, a in enumerate(p.actions) if a.kind == ActionKind.copy_start)),
     "no copy_start"),
    (lambda p: setattr(p.objects[0], "block_offset_bytes", 3), "does not fit block"),
    (lambda p: setattr(p, "arena", None), "no plan"),
])
def test_invalid_plans_are_refused_at_load(mutate, match):
    model = toy()
    p = plan_for(model)
    mutate(p)
    with pytest.raises(MemintentError, match=match):
        attach(model, p, "cpu")


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
    h = attach(model, plan, "cpu", check=True)
    got = model.generate(prompt, **kw)
    assert torch.equal(got, want)
    assert len(h.stats()) == 6 and {s.bytes_copied for s in h.stats()} == {streamed_bytes_per_forward(plan)}
    h.detach()


def test_second_attach_is_refused_until_detach():
    model = toy()
    plan = plan_for(model)
    h = attach(model, plan, "cpu")
    with pytest.raises(MemintentError, match="already attached"):
        attach(model, plan, "cpu")
    h.detach()
    with attach(model, plan, "cpu", host_store=h.host_store):   # re-attach, reusing the filled host store
        with torch.no_grad():
            assert torch.equal(model(ids(1)), toy()(ids(1)))
