"""Golden IR text after each pass on small models: a change in what a pass decides shows up as a text diff.

Two models: the toy MLP stack (no KV cache, unquantized streaming) and the ``tiny-llama`` preset with a KV cache
(2 blocks of 64 tokens per layer) whose streamed blocks are quantized: the full pipeline for int4, and the final
plan for int8.

Set MEMINTENT_UPDATE_GOLDEN=1 to rewrite the files after checking the diff is intended.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memintent.compiler import planner
from memintent.compiler.compile import trace_ref
from memintent.compiler.hardware import BUILTIN
from memintent.models.refs import resolve
from memintent.ir.model import GenerationPlan, KVQuant, Program, Quant, Residency, RunShape
from memintent.ir.parser import parse
from memintent.ir.printer import dump
from memintent.passes import PIPELINE, run_passes
from memintent.passes.residency import residency_pass

GOLDEN = Path(__file__).parent / "golden"
STAGES = ["trace", *[p.name for p in PIPELINE]]

MLP_REF = "py:examples/toy_mlp.py:mlp_stack"
MLP_BUDGET_BYTES = 800 * 1024   # holds 1 resident layer + head + 2 stream slots of the 6-layer stack

LLAMA_BUDGET_BYTES = 720 * 1024   # int4: the embedding read in place, the 4 layers streamed, the head resident


def llama_step(kv_quant: KVQuant) -> Program:
    """tiny-llama's engine step as the generation planner traces it: 12 tokens of at most 4 sequences, a pool of 8
    blocks of 8 tokens (+ the null page), the attention costed for 2 sequences of an 8 + 8 token workload."""
    src = resolve("tiny-llama")
    shape = planner.Shape(concurrency=2, kv_quant=kv_quant, step_tokens=12, max_seqs=4, num_pages=9)
    pool = planner.kv_pool(src, shape, page_tokens=8, swap_pages=4)
    work = planner.step_work(src, pool, shape, planner.Workload(prompt_len=8, gen_len=8, context=64), BUILTIN["cpu"])
    p = planner.annotate_step(planner.trace_step(src, 12, 4, lambda m: None), src, pool, work, 64, 4, BUILTIN["cpu"])
    p.generation = GenerationPlan(objective="throughput", step_tokens=12, max_seqs=4, context=64, prompt_len=8, gen_len=8,
                                  concurrency=2, quant_policy="fixed", kv_quant_policy=kv_quant.value,
                                  decode_step_s=0.0, tokens_per_s=0.0, binding="-")
    return p


def _stages(program: Program, budget_bytes: int, quant: str) -> dict[str, str]:
    """IR text after the trace and after each pass of the pipeline (residency with bit-width policy ``quant``)."""
    program = program.model_copy(update={"budget_bytes": budget_bytes, "hardware": BUILTIN["cpu"]})
    out = {"trace": dump(program)}
    for p in PIPELINE:
        program = run_passes(program, [residency_pass(None, quant) if p.name == "residency" else p])
        out[p.name] = dump(program)
    out["plan"] = program
    return out


@pytest.fixture(scope="module")
def mlp_stages() -> dict:
    return _stages(trace_ref(MLP_REF, RunShape(batch=1, seq=1)), MLP_BUDGET_BYTES, "none")


@pytest.fixture(scope="module")
def llama_int4_stages() -> dict:
    return _stages(llama_step(KVQuant.none), LLAMA_BUDGET_BYTES, "int4")


@pytest.fixture(scope="module")
def llama_int8_stages() -> dict:
    return _stages(llama_step(KVQuant.int8), LLAMA_BUDGET_BYTES, "int8")


def _check(path: Path, text: str, what: str) -> None:
    if os.environ.get("MEMINTENT_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with MEMINTENT_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"IR after {what} differs from {path} (if intended, update the golden)"
    assert dump(parse(text)) == text


@pytest.mark.parametrize("name", STAGES)
def test_golden(mlp_stages: dict, name: str) -> None:
    _check(GOLDEN / f"mlp_stack.{name}.mir", mlp_stages[name], name)


@pytest.mark.parametrize("name", STAGES)
def test_golden_step_int4(llama_int4_stages: dict, name: str) -> None:
    # Bit widths are chosen by residency: the stages before it do not depend on the policy and carry no "int4".
    policy = ".int4" if STAGES.index(name) >= STAGES.index("residency") else ""
    _check(GOLDEN / f"tiny_llama_step{policy}.{name}.mir", llama_int4_stages[name], name)


def test_golden_step_int8_plan(llama_int8_stages: dict) -> None:
    # int8 weights and an int8 KV pool
    _check(GOLDEN / "tiny_llama_step.int8.verify.mir", llama_int8_stages["verify"], "verify (int8)")


@pytest.mark.parametrize("quant", [Quant.int4, Quant.int8])
def test_golden_kv_plan_covers_kv_and_quantization(llama_int4_stages: dict, llama_int8_stages: dict,
                                                   quant: Quant) -> None:
    # What this golden model is for: a KV pool in the arena, read by every layer's attention, with its intent
    # annotations, and quantized streamed blocks in the plan.
    p: Program = (llama_int4_stages if quant == Quant.int4 else llama_int8_stages)["plan"]
    kv = [o for o in p.objects if o.kind.value == "kv"]
    assert len(kv) == 1 and kv[0].size_bytes == 9 * p.kv_pool.page_bytes
    assert kv[0].evict_cost_s > 0 and kv[0].recompute_cost_s > 0 and kv[0].urgency_s > 0
    readers = [s for s in p.steps if kv[0].name in s.uses]
    assert len(readers) == 4 and all(s.op.startswith("memintent.paged_attention") for s in readers)
    slot = next(s for s in p.arena.slots if s.kind.value == "kv")
    assert slot.size_bytes >= kv[0].size_bytes
    streamed = [b for b in p.blocks if b.residency == Residency.streamed]
    assert {b.name for b in streamed} >= {f"layers.{i}" for i in range(4)}
    # decoder layers at the policy's width; the embedding and head at int8 under int4 too (block_quant)
    assert {b.quant for b in streamed if b.name.startswith("layers.")} == {quant}
    assert {b.quant for b in streamed if b.name in ("embed", "output")} <= {Quant.int8}
    assert all(b.transfer_bytes < b.size_bytes for b in streamed)
