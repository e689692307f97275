"""The README's Python API: a plan's model in two lines, and a plan attached to a model the user built."""

from __future__ import annotations

import pytest
import torch

import memintent
from memintent.errors import MemintentError
from memintent.compiler.compile import compile_model
from memintent.compiler.hardware import BUILTIN
from memintent.models.refs import resolve
from memintent.ir.plan_file import save_plan
from memintent.models.plan_model import resident_model


def test_load_streams_bitwise_like_the_resident_model(tmp_path):
    plan = compile_model("tiny-llama", budget_bytes=1 << 20, hardware=BUILTIN["cpu"], batch=1, seq=16)
    save_plan(plan, tmp_path / "tiny.plan.json")
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(3))   # (B, S)
    model, handle = memintent.load(tmp_path / "tiny.plan.json", device="cpu")
    try:
        with torch.no_grad():
            got = model(ids)
    finally:
        handle.detach()
    with torch.no_grad():
        want = resident_model(resolve("tiny-llama"), torch.device("cpu"))(ids)
    assert torch.equal(got, want)


def test_wrap_a_model_the_user_built(tmp_path):
    plan = compile_model("tiny-llama", budget_bytes=1 << 20, hardware=BUILTIN["cpu"], batch=1, seq=16)
    src = resolve("tiny-llama")
    mine = resident_model(src, torch.device("cpu"))        # the user's model, weights loaded
    ref = resident_model(src, torch.device("cpu"))
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(4))   # (B, S): the proven shape
    handle = memintent.wrap(mine, plan, device="cpu")
    try:
        assert handle.program.prediction.streamed_bytes > 0
        with torch.no_grad():
            assert torch.equal(mine(ids), ref(ids))
            # Another shape is outside what the plan proved: refused in one line, naming the proven one.
            with pytest.raises(MemintentError, match=r"inputs of shape 2x16: the plan proves 1x16 only"):
                mine(torch.cat([ids, ids]))
    finally:
        handle.detach()
