"""Quantized streamed blocks end to end: compiled int8/int4 plans executed by the runtime.

The exact check: the streamed model's logits are BITWISE equal to a resident reference model whose streamed blocks'
weights were replaced by ``dequant(quant(w))`` (built here from the same fill values with ``quantize_int8``/
``quantize_int4`` + ``dequantize_*``), i.e. the runtime computes with exactly the weights the plan says it does.
The error of quantization itself (against the plain resident model) is printed and bounded loosely.

CPU tests run everywhere; the CUDA tests at the bottom (skipped without a device) repeat the exact check on a GPU
with the torch and the Triton dequantization and compare CPU/GPU quantization bytes.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from memintent.passes.verify import prove
from memintent.compiler.compile import compile_model
from memintent.compiler.hardware import BUILTIN
from memintent.models.refs import resolve
from memintent.errors import MemintentError
from memintent.ir.layout import weight_unpackers
from memintent.ir.model import ActionKind, Program, Quant, Residency, SlotKind
from memintent.passes.residency import unpack_need_bytes
from memintent.runtime import POISON_BYTE, HostStore, attach, fill_from_module
from memintent.runtime.host_store import torch_dtype
from memintent.runtime.quant import Storage, dequantize_int4, dequantize_int4g, dequantize_int8, quantize_int4, quantize_int4g, quantize_int8, relative_error, weight_storage
from test_quant import packed_bytes_by_quantizing

TINY = "tiny-llama"
TOY = "py:examples/toy_mlp.py:mlp_stack"
# Relative logits error of the quantized plan against the plain (unquantized) resident model, for these tiny random
# models. Observed on CPU (torch 2.13): tiny-llama int8 2.0-2.1e-2, int4 0.33-0.39 (each int4 weight alone has a
# round-trip error of ~0.12; ~30 quantized matrices compound it); toy MLP (f32) int8 1.7-1.9e-3, int4 1.9-2.0e-2.
# Printed by the test (run with -s).
# int4g: tiny-llama 0.28, toy MLP 1.9e-2.
TOLERANCE = {"int8": 5e-2, "int4": 5e-1, "int4g": 4e-1}


@functools.lru_cache(maxsize=None)
def _plan(ref: str, quant: str, depth: int) -> Program:
    """The first budget (smallest first) at which the plan is feasible; it streams several quantized layers."""
    for budget in (1 << 19, 5 << 17, 3 << 18, 7 << 17, 1 << 20, 3 << 19, 2 << 20):
        try:
            return compile_model(ref, budget_bytes=budget, hardware=BUILTIN["cpu"], batch=1, seq=16, depth=depth,
                                 quant=quant)
        except MemintentError:
            continue
    raise AssertionError(f"no feasible budget for {ref} {quant} depth {depth}")


def plan(ref: str, quant: str, depth: int) -> Program:
    return _plan(ref, quant, depth).model_copy(deep=True)


@functools.lru_cache(maxsize=None)
def _source(ref: str):
    return resolve(ref)


def fill_values(ref: str, p: Program) -> dict[str, torch.Tensor]:
    """{weight: host tensor} of every planned weight, from the same fill callback the host store uses."""
    objects = p.object_map()
    values = {w: torch.empty(tuple(objects[w].shape), dtype=torch_dtype(objects[w].dtype))
              for b in p.blocks for w in b.weights}
    _source(ref).fill_weights(values)
    return values


def dequant_quant(w: torch.Tensor, quant: Quant) -> torch.Tensor:
    """``dequant(quant(w))``: the weight a visit of a quantized block computes with."""
    out = torch.empty_like(w)   # w's dtype, (out, in)
    if quant == Quant.int8:
        q, s = quantize_int8(w)            # int8 (out, in), bf16 (out,)
        return dequantize_int8(q, s, out, backend="torch")
    if quant == Quant.int4:
        q, s = quantize_int4(w)            # uint8 (out, ceil(in/2)), bf16 (out, ceil(in/128))
        return dequantize_int4(q, s, out, backend="torch")
    q, s, z = quantize_int4g(w)            # uint8 (out, ceil(in/2)), bf16 and uint8 (out, ceil(in/32))
    return dequantize_int4g(q, s, z, out, backend="torch")


def reference_values(p: Program, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fill values with every quantized weight of every quantized (streamed) block replaced by its round trip."""
    objects = p.object_map()
    out = dict(values)
    for b in p.blocks:
        if b.quant == Quant.none:
            continue
        for w in b.weights:
            if weight_storage(b.quant, objects[w]) != Storage.raw:
                out[w] = dequant_quant(values[w], b.quant)
    return out


def resident_model(ref: str, values: dict[str, torch.Tensor], device: str = "cpu") -> torch.nn.Module:
    """The whole model on ``device`` with the given weight values (tied aliases share their first name's)."""
    model = _source(ref).build("meta").to_empty(device=device)
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    with torch.no_grad():
        for n, t in tensors.items():
            t.copy_(values[n])
    return model.eval()


def inputs(ref: str, i: int) -> tuple:
    src = _source(ref)
    if src.kind == "py":   # the factory's example (4, 256), perturbed per forward
        (x,) = src.example_inputs(1, 1, "cpu")
        return (x + 0.1 * i,)
    g = torch.Generator().manual_seed(i)
    return (torch.randint(0, src.vocab_size, (1, 16), generator=g),)   # (B, S) token ids


def produced_bytes(p: Program, values: dict[str, torch.Tensor]) -> dict[str, int]:
    """{block: bytes a visit must copy}, counted from the weights themselves: an unquantized block's flat buffer
    (the front end's size), a quantized block's parts as quantizing its real weights produces them."""
    return {b.name: b.size_bytes if b.quant == Quant.none else
            packed_bytes_by_quantizing([values[w] for w in b.weights], b.quant) for b in p.blocks}


def quantized_visits(p: Program) -> list:
    bmap = p.block_map()
    return [a for a in p.actions if a.kind == ActionKind.copy_start and bmap[a.block].quant != Quant.none]


def streamed_bytes(p: Program) -> int:
    bmap = p.block_map()
    return sum(bmap[a.block].transfer_bytes for a in p.actions if a.kind == ActionKind.copy_start)


def attach_streamed(ref: str, p: Program, device: str = "cpu", **kw):
    """A model attached to ``p``: the toy MLP as a real module (the default adopting fill, which must release the
    quantized blocks' originals), tiny-llama built on meta and filled by its source."""
    src = _source(ref)
    if src.kind == "py":
        model = copy.deepcopy(src.module)
        return model, attach(model, prove(p), device, **kw)
    model = src.build("meta")
    return model, attach(model, prove(p), device, fill=src.fill_weights, **kw)


# ---------------------------------------------------------------------------------------------------------------
# The exact check
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("check", [False, True], ids=["plain", "checked"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("quant", ["int8", "int4", "int4g"])
@pytest.mark.parametrize("ref", [TINY, TOY])
def test_streamed_quantized_logits_are_exactly_the_planned_ones(ref, quant, depth, check):
    p = plan(ref, quant, depth)
    assert len(p.arena.slots) and sum(s.kind == SlotKind.stream for s in p.arena.slots) == depth
    qv = quantized_visits(p)
    assert qv, "the plan must stream quantized blocks"
    assert all(b.quant == Quant.none for b in p.blocks if b.residency == Residency.resident)
    values = fill_values(ref, p)
    exact = resident_model(ref, reference_values(p, values))
    plain = resident_model(ref, values)
    model, h = attach_streamed(ref, p, check=check)
    src = _source(ref)
    errs = []
    with torch.no_grad():
        for i in range(3):   # forward 0 issues its own prefetches; 1 and 2 use the previous forward's tail
            x = inputs(ref, i)
            got = model(*x)
            assert torch.equal(got, exact(*x)), f"forward {i}: streamed logits differ from dequant(quant(w))"
            errs.append(relative_error(src.logits(plain(*x)), src.logits(got)))
    err = max(errs)
    print(f"\n{ref} {quant} depth {depth}{' checked' if check else ''}: relative logits error against the "
          f"unquantized model {err:.3e} (tolerance {TOLERANCE[quant]:g})")
    assert 0 < err < TOLERANCE[quant]
    stats = h.stats()
    # bytes copied per forward = the transfer_bytes of the streamed visits = what packing the weights produces
    # = the prediction
    want = streamed_bytes(p)
    produced = produced_bytes(p, values)
    assert want == sum(produced[a.block] for a in p.actions if a.kind == ActionKind.copy_start)
    assert want == p.prediction.streamed_bytes
    assert [s.bytes_copied for s in stats] == [want] * 3
    assert [s.dequants for s in stats] == [len(qv)] * 3
    assert all(s.dequant_s is not None and s.dequant_s > 0 for s in stats)
    assert "dequant" in stats[-1].summary()
    h.detach()
    # detached: packed blocks have no full-precision host copy, and detaching must not allocate one (a 70B int4
    # plan would need 140 GB of host memory): their weights are left on the meta device, the others on the host
    named = dict(model.named_parameters())
    for b in p.blocks:
        for w in b.weights:
            if w in named:
                assert named[w].is_meta == (b.quant != Quant.none), w


@pytest.mark.parametrize("quant", ["int8", "int4g"])
def test_warming_the_unpacks_before_the_first_forward_changes_no_logit(quant):
    # The engine's start runs one quantized visit of each layout so Triton compiles before the run: what it writes
    # must be rewritten before any weight is read, so the logits stay exactly the planned ones.
    p = plan(TINY, quant, 2)
    exact = resident_model(TINY, reference_values(p, fill_values(TINY, p)))
    model, h = attach_streamed(TINY, p)
    layouts = h.warm_unpacks()
    blocks = {v.block for v in quantized_visits(p)}
    assert 1 <= layouts < len(blocks), "repeated layers share a layout: one run each, not one per block"
    with torch.no_grad():
        for i in range(2):
            x = inputs(TINY, i)
            assert torch.equal(model(*x), exact(*x)), f"forward {i} after warming differs from dequant(quant(w))"
    h.detach()


def test_a_layer_unpacks_each_weight_right_before_its_linear():
    # With an unpack slot, a decoder layer's quantized weights share one region of it: each is unpacked by its
    # linear module's pre-hook, so at the moment each linear runs its weight is exactly dequant(quant(w)).
    p = plan(TINY, "int4", 2)
    by_weight = weight_unpackers(p)
    layers = [b for b in p.blocks if b.name.startswith("layers.") and b.residency == Residency.streamed]
    assert p.unpack_slot() is not None and layers and all(b.name in by_weight for b in layers)
    assert "embed" not in by_weight     # an embedding reads its weight by index, not through a linear
    exact = reference_values(p, fill_values(TINY, p))
    model, h = attach_streamed(TINY, p)
    modules = dict(model.named_modules())
    seen: dict[str, int] = {}

    def check(name):
        def hook(module, args):
            seen[name] = module.weight.data_ptr()
            assert torch.equal(module.weight, exact[name + ".weight"]), name
        return hook

    names = [m for b in layers for m in by_weight[b.name].values()]
    handles = [modules[m].register_forward_pre_hook(check(m)) for m in names]   # after the executor's own
    with torch.no_grad():
        model(*inputs(TINY, 0))
    for k in handles:
        k.remove()
    h.detach()
    assert set(seen) == set(names)
    assert len(set(seen.values())) == 1, "every quantized weight of every layer starts the one shared region"


def test_transfer_bytes_are_what_packing_produces():
    for ref in (TINY, TOY):
        for quant in ("int8", "int4", "int4g"):
            p = plan(ref, quant, 2)
            produced = produced_bytes(p, fill_values(ref, p))
            assert any(b.quant != Quant.none for b in p.blocks)
            for b in p.blocks:
                assert b.transfer_bytes == produced[b.name], b.name


def test_int4_host_store_is_under_035_of_bf16():
    p4 = plan(TINY, "int4", 2)
    layers = [b for b in p4.blocks if b.name.startswith("layers.")]
    assert layers and all(b.residency == Residency.streamed and b.quant == Quant.int4 for b in layers)
    p16 = _plan_none_all_streamed()
    s4, s16 = HostStore(p4, pin="none"), HostStore(p16, pin="none")
    ratio = s4.nbytes / s16.nbytes
    print(f"\nint4 host store {s4.nbytes} B, bf16 {s16.nbytes} B: ratio {ratio:.3f}")
    assert s16.nbytes == sum(b.size_bytes for b in p16.blocks)
    assert ratio < 0.35


@functools.lru_cache(maxsize=None)
def _plan_none_all_streamed() -> Program:
    p = compile_model(TINY, budget_bytes=1 << 20, hardware=BUILTIN["cpu"], batch=1, seq=16, depth=2, quant="none")
    assert all(b.residency == Residency.streamed for b in p.blocks if b.name.startswith("layers."))
    return p


def test_host_store_packs_and_adopting_fill_releases_the_originals():
    p = plan(TOY, "int4", 2)
    src = _source(TOY)
    model = copy.deepcopy(src.module)
    store = HostStore(p, pin="none")
    store.fill(fill_from_module(model, adopt=True))
    objects = p.object_map()
    values = fill_values(TOY, p)
    tensors = dict(model.named_parameters())
    for b in p.blocks:
        if b.quant == Quant.none:
            assert store.buffer(b.name).numel() == b.size_bytes
            for w in b.weights:   # adopted: the module's tensor is the store's view
                assert tensors[w].data_ptr() == store.view(w).data_ptr()
            continue
        assert b.name in store.packed and store.buffer(b.name).numel() == b.transfer_bytes
        for w in b.weights:
            # released, not adopted (the scratch the fill wrote is reused for the next block)
            assert tensors[w].is_meta
            with pytest.raises(MemintentError, match="stored quantized"):
                store.view(w)
            want = (dequant_quant(values[w], b.quant) if weight_storage(b.quant, objects[w]) != Storage.raw
                    else values[w])
            assert torch.equal(store.weight(w), want)
        with pytest.raises(MemintentError, match="stored quantized"):
            store.block_views(b.name)


def test_checked_mode_poisons_the_whole_slot_on_free():
    p = plan(TINY, "int8", 2)
    model, h = attach_streamed(TINY, p, check=True)
    bmap = p.block_map()
    streams = [sl for sl in p.arena.slots if sl.kind == SlotKind.stream]
    poisoned = []
    real_poison = h.backend.poison
    h.backend.poison = lambda dst: (poisoned.append((dst.data_ptr(), dst.numel())), real_poison(dst))
    in_flight = []

    unpack = p.unpack_slot()
    assert unpack is not None, "the int8 plan's quantized visits share one unpack slot"

    def probe(*_):
        # Runs after the runtime's pre-hook of the same module. A quantized visit whose copy has started but whose
        # copy_done has not run yet: its packed bytes are at the end of its stream slot, and the rest of the slot
        # is still poisoned (0xFF from the free, or from the allocation): its weights go to the unpack slot, which
        # only the dequantization writes.
        e = h.engine
        for sl in streams:
            vid = e.slot_occupant[sl.index]
            if vid < 0 or e.slot_freed[sl.index] or e.arrival[vid] is None:
                continue
            b = bmap[e.keys[vid].split("@")[0]]
            flat = h.arena.slot(sl.index)   # uint8 [slot size]
            packed = flat[sl.size_bytes - b.transfer_bytes:]
            in_flight.append(bool((flat[:sl.size_bytes - b.transfer_bytes] == POISON_BYTE).all())
                             and torch.equal(packed, h.host_store.buffer(b.name)))

    hooks = [model.get_submodule(st.module).register_forward_pre_hook(probe) for st in p.stages if st.module]
    with torch.no_grad():
        for i in range(2):
            model(*inputs(TINY, i))
    for k in hooks:
        k.remove()
    assert in_flight and all(in_flight)
    # every free poisoned a whole stream slot, packed region included, and a quantized visit's free the whole
    # unpack slot its weights were in
    whole = {(h.arena.slot(sl.index).data_ptr(), sl.size_bytes) for sl in streams}
    unpacked = (h.arena.slot(unpack).data_ptr(), p.arena.slots[unpack].size_bytes)
    assert poisoned and set(poisoned) <= whole | {unpacked}
    assert poisoned.count(unpacked) == sum(1 for a in p.actions if a.kind == ActionKind.free) * 2
    h.detach()


def test_wrong_plans_are_refused():
    base = plan(TINY, "int8", 2)
    q = next(b for b in base.blocks if b.quant != Quant.none)

    p = base.model_copy(deep=True)
    next(b for b in p.blocks if b.name == q.name).transfer_bytes = q.transfer_bytes - 256
    with pytest.raises(MemintentError, match="transfer_bytes .* differ from the runtime's packed layout"):
        attach_streamed(TINY, p)

    p = base.model_copy(deep=True)
    assert p.unpack_slot() is not None
    for s in p.arena.slots:
        if s.kind == SlotKind.stream:
            s.size_bytes = q.transfer_bytes - 256   # 256 bytes short of the packed bytes the copy lands
    with pytest.raises(MemintentError, match=r"bytes as it arrives\) does not fit stream slot"):
        attach_streamed(TINY, p)

    p = base.model_copy(deep=True)
    by_weight = weight_unpackers(base)
    layer = next(b for b in base.blocks if b.quant != Quant.none and b.residency == Residency.streamed
                 and b.name in by_weight)
    need = unpack_need_bytes(layer, base.object_map(), True)
    assert need < layer.size_bytes      # a decoder layer unpacks one weight at a time (ir/layout.py)
    p.arena.slots[p.unpack_slot()].size_bytes = need - 256    # too small for the unpacked weights
    with pytest.raises(MemintentError, match=r"unpack slot \d+ \(\d+ bytes\) cannot hold the unpacked weights"):
        attach_streamed(TINY, p)

    p = base.model_copy(deep=True)
    r = next(b for b in p.blocks if b.residency == Residency.resident and b.weights)
    r.quant = Quant.int8
    with pytest.raises(MemintentError, match=f"resident block '{r.name}' is quantized"):
        attach_streamed(TINY, p)


@pytest.mark.parametrize("quant", ["int4", "int4g", "int8"])
def test_vocabulary_blocks_stay_int8_under_a_four_bit_policy(quant):
    # tiny-llama's head is untied ('output'): both it and the embedding are found, by the embedding step and as
    # the last matrix the step reads, of the embedding's shape; the decoder layers take the policy's width
    p = plan(TINY, quant, 2)
    widths = {b.name: b.quant.value for b in p.blocks if b.residency in (Residency.streamed, Residency.mapped)}
    assert {widths["embed"], widths["output"]} == {"int8"}
    assert {w for name, w in widths.items() if name.startswith("layers.")} == {quant}


def test_given_host_store_must_match_the_plans_quantization():
    p8, p4 = plan(TINY, "int8", 2), plan(TINY, "int4", 2)
    store = HostStore(p4, pin="none")
    model = _source(TINY).build("meta")
    # the embedding is int8 in both (block_quant keeps a vocabulary block at int8 under a 4-bit policy): the
    # first block that differs is the first decoder layer
    with pytest.raises(MemintentError, match=r"does not match block 'layers.0': the plan needs \d+ bytes \(quant "
                                             r"int8\), the store holds 96000 bytes \(quant int4\)"):
        attach(model, prove(p8), "cpu", host_store=store)


# ---------------------------------------------------------------------------------------------------------------
# CUDA (skipped here; run on a GPU)
# ---------------------------------------------------------------------------------------------------------------
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _triton_ok() -> bool:
    from memintent.runtime.quant import triton_available

    return torch.cuda.is_available() and triton_available()


def read_in_place_as_planned(model: torch.nn.Module, p: Program, values: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``model`` with each linear layer the plan maps (an int8 head) computed as the runtime computes it on a GPU:
    the mapped kernel over the int8 values and scales of its fill values, in pinned memory. Its sums run in another
    order than cuBLAS's, so the exact reference takes the same kernel (tested against float64 in test_mapped.py);
    what this checks is that the runtime reads the right packed bytes in place."""
    from memintent.runtime.mapped import mapped_linear

    for b in p.blocks:
        module = model.get_submodule(b.module) if b.residency == Residency.mapped else None
        if isinstance(module, torch.nn.Linear):
            q, s = (t.cpu().pin_memory() for t in quantize_int8(values[b.weights[0]]))
            module.forward = lambda x, q=q, s=s: mapped_linear(x, q, s)
    return model


@cuda
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_ok(), reason="needs triton"))])
@pytest.mark.parametrize("check", [False, True], ids=["plain", "checked"])
@pytest.mark.parametrize("quant", ["int8", "int4", "int4g"])
@pytest.mark.parametrize("ref", [TINY, TOY])
def test_cuda_streamed_quantized_logits_are_exactly_the_planned_ones(ref, quant, check, backend):
    p = plan(ref, quant, 2)
    values = fill_values(ref, p)   # (preset: the source draws on CUDA; the same values for all three models)
    exact = read_in_place_as_planned(resident_model(ref, reference_values(p, values), "cuda"), p, values)
    plain = resident_model(ref, values, "cuda")
    model, h = attach_streamed(ref, p, "cuda", check=check, dequant_backend=backend)
    assert h.host_store.quant_device.type == "cuda"
    src = _source(ref)
    with torch.no_grad():
        for i in range(5):
            x = tuple(t.cuda() for t in inputs(ref, i))
            got = model(*x)
            assert torch.equal(got, exact(*x)), f"forward {i}"
        err = relative_error(src.logits(plain(*x)), src.logits(got))
    print(f"\ncuda {ref} {quant} {backend}: relative logits error {err:.3e}")
    assert err < TOLERANCE[quant]
    stats = h.stats()
    assert [s.bytes_copied for s in stats] == [streamed_bytes(p)] * 5
    assert all(s.dequants == len(quantized_visits(p)) and s.dequant_s > 0 and s.stall_s is not None
               for s in stats)
    h.detach()


@cuda
@pytest.mark.parametrize("quant", ["int8", "int4", "int4g"])
def test_cuda_and_cpu_quantization_pack_the_same_bytes(quant):
    p = plan(TINY, quant, 2)
    values = fill_values(TINY, p)

    def fill(named):
        for n, t in named.items():
            t.copy_(values[n])

    a, b = HostStore(p, pin="none", quant_device="cpu"), HostStore(p, pin="none", quant_device="cuda")
    a.fill(fill)
    b.fill(fill)
    for blk in p.blocks:
        assert torch.equal(a.buffer(blk.name), b.buffer(blk.name)), blk.name
