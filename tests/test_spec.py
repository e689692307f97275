"""spec/ describes what the code reads and writes."""

from __future__ import annotations

import json
from pathlib import Path

from memintent.compiler.compile import compile_model
from memintent.compiler.hardware import BUILTIN
from memintent.ir.plan_file import plan_json_schema

SPEC = Path(__file__).resolve().parents[1] / "spec"


def test_plan_schema_is_current():
    # Regenerate with: python -c "from memintent.ir.plan_file import plan_json_schema as s; print(s(), end='')" \
    #   > spec/plan.schema.json
    assert (SPEC / "plan.schema.json").read_text() == plan_json_schema()


def test_a_compiled_plan_has_the_schema_fields():
    schema = json.loads((SPEC / "plan.schema.json").read_text())
    plan = json.loads(compile_model("tiny-llama", budget_bytes=1 << 20, hardware=BUILTIN["cpu"], batch=1,
                                    seq=8).model_dump_json())
    assert set(plan) <= set(schema["properties"])
    assert set(schema["required"]) <= set(plan)
