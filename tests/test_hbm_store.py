"""The HBM store: quantized streamed blocks whose packed bytes stay in HBM, each visit copying them from a store slot
instead of from the host (spec/runtime.md, "The HBM store").

The planner keeps a block there only where that buys time: on a profile whose device copies are faster than its
host link, and never where they are not. A stored plan computes exactly the weights the plan says (bitwise equal to
the resident model with ``dequant(quant(w))`` weights, as every quantized plan: tests/test_quant_stream.py), counts
only host-to-device bytes as streamed, and survives the plan's text and JSON forms.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_quant_stream import (
    attach_streamed,
    fill_values,
    inputs,
    reference_values,
    resident_model,
)

from memintent.compiler.compile import compile_model, trace_ref
from memintent.compiler.hardware import BUILTIN
from memintent.errors import PlanVerificationError
from memintent.ir.model import (
    ActionKind,
    Program,
    Quant,
    Residency,
    RunShape,
    SlotKind,
    align_up,
)
from memintent.ir.parser import parse
from memintent.ir.printer import dump
from memintent.passes import run_passes
from memintent.passes.actions import ACTIONS
from memintent.passes.costs import COSTS, copy_time_s, dequant_time_s
from memintent.passes.lifetimes import LIFETIMES
from memintent.passes.prefetch import PREFETCH
from memintent.passes.residency import given_residency_pass
from memintent.passes.verify import VERIFY, verify

TINY = "tiny-llama"
# The CPU profile's host link made slow (0.05 GB/s) and its device memory fast (64 GB/s: device copies at 32): the
# copies bind, so a store slot saves time. The plain CPU profile copies on the device as fast as from the host
# (16 / 2 = 8 GB/s), so there a store slot would buy nothing.
PCIE_BOUND = BUILTIN["cpu"].model_copy(update={"name": "cpu-slow-link", "h2d_gbps": 0.05, "hbm_gbps": 64.0})
BUDGET_BYTES = 5 << 18      # between streaming every layer and keeping every layer resident


@functools.cache
def _searched() -> Program:
    return compile_model(TINY, budget_bytes=BUDGET_BYTES, hardware=PCIE_BOUND, batch=1, seq=16, quant="int4g")


def searched() -> Program:
    return _searched().model_copy(deep=True)


def given(streamed: set[str], k: int, stored: set[str], hw=PCIE_BOUND, mapped: set[str] = frozenset()) -> Program:
    """tiny-llama with the residency given: ``streamed`` int4g blocks (the vocabulary ones int8) through ``k``
    stream slots, those in ``stored`` from the HBM store, ``mapped`` read in place."""
    program = trace_ref(TINY, RunShape(batch=1, seq=16)).model_copy(
        update={"budget_bytes": BUDGET_BYTES, "hardware": hw})
    passes = (LIFETIMES, COSTS, given_residency_pass(streamed, k, Quant.int4g, stored, mapped), PREFETCH, ACTIONS,
              VERIFY)
    return Program.model_validate_json(run_passes(program, passes).model_dump_json())


def stored_names(p: Program) -> set[str]:
    return {b.name for b in p.blocks if b.in_hbm_store}


def test_the_search_stores_quantized_blocks_where_the_host_link_binds():
    p = searched()
    stored = stored_names(p)
    assert stored, "a PCIe-bound plan with HBM to spare keeps some packed blocks in HBM"
    bmap, slots = p.block_map(), p.arena.slots
    for name in stored:
        b = bmap[name]
        assert b.residency == Residency.streamed and b.quant != Quant.none
        assert slots[b.slot].kind == SlotKind.store and slots[b.slot].holds == [name]
        assert slots[b.slot].size_bytes == align_up(b.transfer_bytes)
    assert p.prediction.stored_bytes == sum(align_up(bmap[n].transfer_bytes) for n in stored)
    # streamed bytes are what crosses the host link: copies out of the store are not counted
    host = [a for a in p.actions if a.kind == ActionKind.copy_start and not bmap[a.block].in_hbm_store]
    assert p.prediction.streamed_bytes == sum(bmap[a.block].transfer_bytes for a in host)
    assert p.prediction.peak_hbm_bytes <= BUDGET_BYTES


def test_the_store_shortens_the_predicted_step_of_the_same_residency():
    p = searched()
    streamed = {b.name for b in p.blocks if b.residency == Residency.streamed}
    mapped = {b.name for b in p.blocks if b.residency == Residency.mapped}
    k = p.prediction.prefetch_depth
    with_store, without = given(streamed, k, stored_names(p), mapped=mapped), given(streamed, k, set(), mapped=mapped)
    assert stored_names(with_store) == stored_names(p)
    assert with_store.prediction.step_time_s < without.prediction.step_time_s
    assert with_store.prediction.streamed_bytes < without.prediction.streamed_bytes
    assert with_store.prediction.arena_bytes > without.prediction.arena_bytes


def test_nothing_is_stored_where_device_copies_are_no_faster_than_the_host_link():
    for budget in (5 << 18, 1 << 20, 3 << 19):
        p = compile_model(TINY, budget_bytes=budget, hardware=BUILTIN["cpu"], batch=1, seq=16, quant="int4g")
        assert not stored_names(p) and p.prediction.stored_bytes == 0, budget


@pytest.mark.parametrize("check", [False, True], ids=["plain", "checked"])
def test_a_stored_plan_computes_exactly_the_planned_weights(check):
    p = searched()
    values = fill_values(TINY, p)
    exact = resident_model(TINY, reference_values(p, values))
    model, h = attach_streamed(TINY, p, check=check)
    with torch.no_grad():
        for i in range(3):   # forward 0 issues its own prefetches; 1 and 2 use the previous forward's tail
            x = inputs(TINY, i)
            assert torch.equal(model(*x), exact(*x)), f"forward {i}: a stored plan's logits differ"
    starts = [a for a in p.actions if a.kind == ActionKind.copy_start]
    stats = h.stats()
    assert [s.bytes_copied for s in stats] == [p.prediction.streamed_bytes] * 3   # host-to-device bytes only
    assert [s.copies for s in stats] == [len(starts)] * 3                        # every visit still copies
    h.detach()


def test_a_stored_plan_survives_its_text_and_json_forms():
    p = searched()
    assert parse(dump(p)) == p
    assert Program.model_validate_json(p.model_dump_json()) == p
    assert "store offset=" in dump(p)


def test_an_unquantized_block_in_the_store_is_refused():
    p = searched()
    b = next(b for b in p.blocks if b.in_hbm_store)
    b.quant = Quant.none
    with pytest.raises(PlanVerificationError, match=rf"block '{b.name}' is in the HBM store unquantized") as e:
        verify(p)
    assert e.value.rule == "hbm-store"


def test_an_empty_store_slot_is_refused():
    p = searched()
    next(b for b in p.blocks if b.in_hbm_store).slot = None
    with pytest.raises(PlanVerificationError, match=r"store slot \d+ holds no block of the HBM store") as e:
        verify(p)
    assert e.value.rule == "hbm-store"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stored_plan_is_bitwise_the_host_streamed_plan():
    # Within one backend the store changes where a visit's bytes come from, never what is computed with them.
    p = searched()
    streamed = {b.name for b in p.blocks if b.residency == Residency.streamed}
    mapped = {b.name for b in p.blocks if b.residency == Residency.mapped}
    plans = (given(streamed, p.prediction.prefetch_depth, stored_names(p), mapped=mapped),
             given(streamed, p.prediction.prefetch_depth, set(), mapped=mapped))
    logits = []
    for plan in plans:
        model, h = attach_streamed(TINY, plan, "cuda")
        with torch.no_grad():
            logits.append([model(inputs(TINY, i)[0].cuda()).cpu() for i in range(3)])
        assert [s.bytes_copied for s in h.stats()] == [plan.prediction.streamed_bytes] * 3
        h.detach()
    assert all(torch.equal(a, b) for a, b in zip(*logits))


def test_copy_and_unpack_times_follow_where_a_block_comes_from_and_its_kernel():
    # the cost model's two terms a stored visit changes, against figures worked out by hand
    hw = BUILTIN["cpu"].model_copy(update={"h2d_gbps": 10.0, "hbm_gbps": 1000.0, "copy_latency_s": 0.0,
                                           "dequant_gbps": 100.0, "dequant_int4_gbps": 400.0})
    p = searched()
    b = next(b for b in p.blocks if b.in_hbm_store and b.quant == Quant.int4g)
    assert copy_time_s(b, hw) == pytest.approx(b.transfer_bytes / 500e9)            # HBM read + write: 1000 / 2
    assert copy_time_s(b, hw, from_hbm=False) == pytest.approx(b.transfer_bytes / 10e9)
    assert dequant_time_s(b, hw) == pytest.approx(b.size_bytes / 400e9)              # the int4g kernel's rate
    int8 = b.model_copy(update={"quant": Quant.int8})
    assert dequant_time_s(int8, hw) == pytest.approx(b.size_bytes / 100e9)
    no_int4_rate = hw.model_copy(update={"dequant_int4_gbps": 0.0})                 # older profiles: one rate
    assert dequant_time_s(b, no_int4_rate) == pytest.approx(b.size_bytes / 100e9)
