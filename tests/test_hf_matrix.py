"""Every decoder-only causal LM of the installed transformers, from tests/hf_tiny_table.json (written by
tests/make_hf_tiny_table.py: each architecture's tiny random config and what memintent does with it).

An architecture the table says generates is saved in float32, planned with some decoder layers streamed, served
with its prompts packed into shared steps, and must generate transformers' own greedy tokens, stopping where
``generate`` stops. One the table says is refused must be refused in exactly the table's line. Those in
tests/test_hf_generate.py's hand-written MATRIX are served there, with their own configs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")

import hf_tiny
import make_hf_tiny_table as table
import test_hf_generate as th

from memintent.engine import Engine
from memintent.errors import MemintentError
from memintent.ir.model import Residency

ROWS = json.loads(table.TABLE.read_text())["models"]
GENERATES = sorted(n for n, r in ROWS.items() if r["outcome"] == "generates" and n not in th.MATRIX)
REFUSED = sorted(n for n, r in ROWS.items() if r["outcome"] == "refused")
README = Path(__file__).parents[1] / "README.md"

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _folder(tmp_path, name: str) -> tuple[Path, int]:
    if name not in transformers.CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    folder = tmp_path / name
    return folder, hf_tiny.save(folder, table.tiny_config(name, ROWS[name]["config"]))


@pytest.mark.parametrize("name", GENERATES)
def test_every_architecture_generates_what_transformers_generates(name, tmp_path):
    folder, weight_bytes = _folder(tmp_path, name)
    plan = th.tiny_plan(folder, weight_bytes)
    assert {Residency.streamed, Residency.resident} <= {b.residency for b in plan.blocks}
    with Engine(plan, "cpu") as eng:
        outs = {o.id: o.token_ids for o in eng.generate(th.requests())}
    assert [outs[str(i)] for i in range(len(th.PROMPTS))] == th.hf_generate(folder, th.PROMPTS, stop=True)


@pytest.mark.parametrize("name", REFUSED)
def test_every_refused_architecture_is_refused_in_its_line(name, tmp_path):
    """Planned as the table's generator plans it (the command line's refusals are tests/test_hf_generate.py's)."""
    folder, weight_bytes = _folder(tmp_path, name)
    with pytest.raises(MemintentError) as e:
        th.tiny_plan(folder, weight_bytes)
    assert str(e.value) == ROWS[name]["error"].replace("{folder}", str(folder))
    assert "\n" not in str(e.value)


def test_the_table_covers_every_causal_lm_and_the_readme_every_refusal():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) <= set(ROWS), "run tests/make_hf_tiny_table.py"
    # every causal LM is built from its tiny config (OVERRIDES where the generic shrink breaks one) and tested
    assert {r["outcome"] for r in ROWS.values()} <= {"generates", "refused", "out of scope"}
    listed = README.read_text().split("<!-- refused architectures -->")[1]
    assert sorted(re.findall(r"^- `([\w.-]+)`", listed, re.MULTILINE)) == REFUSED
