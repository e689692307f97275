"""Golden IR text after each pass on a small model: a change in what a pass decides shows up as a text diff.

Set MEMINTENT_UPDATE_GOLDEN=1 to rewrite the files after checking the diff is intended.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from memintent.compiler.compile import trace_ref
from memintent.compiler.hardware import BUILTIN
from memintent.ir.model import RunShape
from memintent.ir.parser import parse
from memintent.ir.printer import dump
from memintent.passes import PIPELINE, run_passes

GOLDEN = Path(__file__).parent / "golden"
REF = "py:examples/toy_mlp.py:mlp_stack"
BUDGET_BYTES = 800 * 1024   # holds 1 resident layer + head + 2 stream slots of the 6-layer stack


@pytest.fixture(scope="module")
def stages_text() -> dict[str, str]:
    program = trace_ref(REF, RunShape(batch=1, seq=1)).model_copy(
        update={"budget_bytes": BUDGET_BYTES, "hardware": BUILTIN["cpu"]})
    out = {"trace": dump(program)}
    for p in PIPELINE:
        program = run_passes(program, [p])
        out[p.name] = dump(program)
    return out


@pytest.mark.parametrize("name", ["trace", *[p.name for p in PIPELINE]])
def test_golden(stages_text: dict[str, str], name: str) -> None:
    path = GOLDEN / f"mlp_stack.{name}.mir"
    text = stages_text[name]
    if os.environ.get("MEMINTENT_UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with MEMINTENT_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"IR after {name} differs from {path} (if intended, update the golden)"
    assert dump(parse(text)) == text
