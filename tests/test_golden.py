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

from memintent.compiler.compile import trace_ref
from memintent.compiler.hardware import BUILTIN
from memintent.ir.model import Program, Quant, Residency, RunShape
from memintent.ir.parser import parse
from memintent.ir.printer import dump
from memintent.passes import PIPELINE, run_passes
from memintent.passes.residency import residency_pass

GOLDEN = Path(__file__).parent / "golden"
STAGES = ["trace", *[p.name for p in PIPELINE]]

MLP_REF = "py:examples/toy_mlp.py:mlp_stack"
MLP_BUDGET_BYTES = 800 * 1024   # holds 1 resident layer + head + 2 stream slots of the 6-layer stack

LLAMA_REF = "tiny-llama"
LLAMA_SHAPE = RunShape(batch=1, seq=1, kv_len=128, kv_block_tokens=64)
LLAMA_BUDGET_BYTES = 800 * 1024   # int4: the embedding resident, the 4 layers and the head streamed


def _stages(ref: str, shape: RunShape, budget_bytes: int, quant: str) -> dict[str, str]:
    """IR text after the trace and after each pass of the pipeline (residency with bit-width policy ``quant``)."""
    program = trace_ref(ref, shape).model_copy(update={"budget_bytes": budget_bytes, "hardware": BUILTIN["cpu"]})
    out = {"trace": dump(program)}
    for p in PIPELINE:
        program = run_passes(program, [residency_pass(None, quant) if p.name == "residency" else p])
        out[p.name] = dump(program)
    out["plan"] = program
    return out


@pytest.fixture(scope="module")
def mlp_stages() -> dict:
    return _stages(MLP_REF, RunShape(batch=1, seq=1), MLP_BUDGET_BYTES, "none")


@pytest.fixture(scope="module")
def llama_int4_stages() -> dict:
    return _stages(LLAMA_REF, LLAMA_SHAPE, LLAMA_BUDGET_BYTES, "int4")


@pytest.fixture(scope="module")
def llama_int8_stages() -> dict:
    return _stages(LLAMA_REF, LLAMA_SHAPE, LLAMA_BUDGET_BYTES, "int8")


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
def test_golden_kv_int4(llama_int4_stages: dict, name: str) -> None:
    # Bit widths are chosen by residency: the stages before it do not depend on the policy and carry no "int4".
    policy = ".int4" if STAGES.index(name) >= STAGES.index("residency") else ""
    _check(GOLDEN / f"tiny_llama_kv{policy}.{name}.mir", llama_int4_stages[name], name)


def test_golden_kv_int8_plan(llama_int8_stages: dict) -> None:
    _check(GOLDEN / "tiny_llama_kv.int8.verify.mir", llama_int8_stages["verify"], "verify (int8)")


@pytest.mark.parametrize("quant", [Quant.int4, Quant.int8])
def test_golden_kv_plan_covers_kv_and_quantization(llama_int4_stages: dict, llama_int8_stages: dict,
                                                   quant: Quant) -> None:
    # What this golden model is for: a KV cache in the arena and quantized streamed blocks in the plan.
    p: Program = (llama_int4_stages if quant == Quant.int4 else llama_int8_stages)["plan"]
    kv = [o for o in p.objects if o.kind.value == "kv"]
    assert len(kv) == 4 * 2                                            # 4 layers x ceil(128 / 64) blocks
    assert any(s.kind.value == "kv" for s in p.arena.slots)
    streamed = [b for b in p.blocks if b.residency == Residency.streamed]
    assert {b.name for b in streamed} >= {f"layers.{i}" for i in range(4)}
    assert all(b.quant == quant for b in streamed)
    assert all(b.transfer_bytes < b.size_bytes for b in streamed)
