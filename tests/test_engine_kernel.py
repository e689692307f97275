"""The serving engine with the attention kernel (``RunOptions(attention="kernel")``: the Triton paged kernel and the
fused key/value write, one call each per layer per step) against the same engine with the reference attention
(gather + SDPA), on the same requests: a seeded mix of prompt chunks and decodes with preemption, float32 and int8
KV. On the CPU the kernel runs in Triton's interpreter, in a child process started with TRITON_INTERPRET=1 (Triton
reads the flag when it is first imported); on CUDA tests/test_serve_cuda.py runs the same comparison compiled.

Tolerance: float32 plans generate identical tokens, with logits within 1e-4 (the two backends sum the keys in
another order); int8 KV within 2e-3 (the kernel applies the value scale to the softmax weight, the reference to the
value: one rounding apart, each within an int8 step's relative error).
"""

from __future__ import annotations

import json

import pytest
from interpreted import run_interpreted

pytest.importorskip("triton")


CHILD = r"""
import json, sys, torch
from memintent.compiler.hardware import BUILTIN
from memintent.compiler.planner import plan_generation
from memintent.engine import Engine
from memintent.engine.requests import synthetic

out = {}
for kvq in ("none", "int8"):
    plan = plan_generation("tiny-llama", budget_bytes=3 << 20, hardware=BUILTIN["cpu"], context=48, prompt_len=12,
                           gen_len=6, quant="none", kv_quant=kvq, concurrency=4, kv_page_tokens=4, dtype="f32")
    reqs = synthetic(10, (3, 30), (2, 9), 512, seed=4)
    runs = {}
    for backend in ("kernel", "reference"):
        with Engine(plan, "cpu", attention=backend, preempt="recompute") as e:
            e.track = {r.id for r in reqs}
            outs = {o.id: o.token_ids for o in e.generate(reqs)}
            logits = {k: torch.stack(v) for k, v in e.tracked_logits.items()}
            runs[backend] = (outs, logits, sum(len(s.preemptions) for s in e.stats.steps))
    (ko, kl, kp), (ro, rl, rp) = runs["kernel"], runs["reference"]
    err = max(float((kl[i] - rl[i]).abs().max()) for i in rl if kl[i].shape == rl[i].shape)
    out[kvq] = dict(same_tokens=ko == ro, max_logit_error=err, preemptions=kp, same_shapes=all(
        kl[i].shape == rl[i].shape for i in rl))
json.dump(out, sys.stdout)
"""


@pytest.fixture(scope="module")
def interpreted():
    run = run_interpreted(["-c", CHILD], timeout_s=900)
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_engine_with_the_kernel_generates_the_reference_engines_tokens(interpreted):
    f32 = interpreted["none"]
    assert f32["preemptions"] > 0, "the mix should preempt (recompute), so cached prefixes come back"
    assert f32["same_tokens"] and f32["same_shapes"]
    assert f32["max_logit_error"] <= 1e-4


def test_engine_with_the_kernel_and_int8_kv_stays_within_an_int8_step(interpreted):
    q = interpreted["int8"]
    assert q["same_shapes"]
    assert q["max_logit_error"] <= 2e-3
