"""Generation on a GPU: the decode step of a plan that streams nothing is captured as a CUDA graph and gives the
resident model's tokens. Skipped without CUDA (CI has none; benchmarks/RESULTS.md records the GPU runs)."""

from __future__ import annotations

import pytest
import torch

from memintent.compiler.hardware import BUILTIN
from memintent.compiler.planner import plan_generation
from memintent.commands.generate import generate_plan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("budget_bytes,mode", [(1 << 30, "cuda graph"), (37 << 20, "eager: the plan streams")])
def test_decode_graph_when_nothing_streams(budget_bytes, mode):
    p = plan_generation("tiny-llama", budget_bytes=budget_bytes, hardware=BUILTIN["h100-sxm"], context=64,
                        prompt_len=16, gen_len=8, quant="none", batch=4)
    rep, code = generate_plan(p, device="cuda", requests=6, verify=True, quiet=True, warmup=True)
    assert rep.decode_mode.startswith(mode), rep.decode_mode
    assert code == 0 and rep.identical is True
