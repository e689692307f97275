"""The generation planner: batch, resident set and bit widths chosen together for a budget.

For each candidate batch the decode step (one token per sequence, attending over the whole context) is traced
with its KV cache, and the prefill of a prompt is traced for its compute time and activation peak; the scheduling
passes then pick the resident set, the prefetch depth and, under ``--quant auto``, a bit width per streamed block.
The predicted generated tokens per second of a wave,

    batch * gen_len / (prefill_s + (gen_len - 1) * decode_step_s),

ranks the candidates (``latency`` plans batch 1 and ranks by decode step). The chosen candidate's decode plan is
the plan; the rejected ones are kept with their reason in ``Program.generation.alternatives``.

Policy on KV: the cache lives in HBM for the whole generation (it is dirty and read at every step), so a batch
whose KV does not fit next to one stream slot is infeasible ("kv capacity" binds). The planner may decide that
nothing should stream: that is the answer when weights and the batch's KV fit.
"""

from __future__ import annotations

from typing import Callable

import torch

from memintent.compiler.frontend import TraceSpec, trace
from memintent.compiler.refs import resolve
from memintent.errors import MemintentError
from memintent.ir.model import (
    GenerationPlan, HardwareProfile, Object, ObjectKind, Program, Residency, RunShape, Tier,
)
from memintent.passes import schedule_program
from memintent.passes.costs import step_time_s
from memintent.passes.lifetimes import activation_profile, lifetimes
from memintent.units import fmt_bytes

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _decode_spec(src, batch: int, context: int) -> TraceSpec:
    """The decode step: input ids (B, 1) at position ``context - 1``, with a meta KV cache of ``context`` tokens."""
    if src.kind != "preset":
        raise MemintentError(f"generation plans need a preset model with the project's KV cache; {src.ref} is "
                             f"{src.kind} (plain forwards work: compile without --objective)")

    def build(n):
        model = src.build("meta", num_layers=n)
        dtype = src.torch_dtype
        caches = [(torch.empty(batch, src.n_kv_heads, context, src.head_dim, dtype=dtype, device="meta"),
                   torch.empty(batch, src.n_kv_heads, context, src.head_dim, dtype=dtype, device="meta"))
                  for _ in range(len(model.get_submodule(src.layers_path)))]
        model.attach_kv_cache(caches)   # (B, KV, context, hd) each
        return model

    ids = torch.zeros(batch, 1, dtype=torch.long, device="meta")     # (B, 1)
    pos = torch.zeros(1, dtype=torch.long, device="meta")            # (1,)
    return TraceSpec(name=src.ref, ref=src.model_ref(), build=build, inputs=(ids, pos),
                     layers_path=src.layers_path, num_layers=src.num_layers, n_kv_heads=src.n_kv_heads,
                     head_dim=src.head_dim)


def _prefill_spec(src, batch: int, prompt_len: int) -> TraceSpec:
    return TraceSpec(name=src.ref, ref=src.model_ref(), build=lambda n: src.build("meta", num_layers=n),
                     inputs=src.example_inputs(batch, prompt_len, "meta"), kwargs=src.forward_kwargs(),
                     layers_path=src.layers_path, num_layers=src.num_layers, n_kv_heads=src.n_kv_heads,
                     head_dim=src.head_dim)


def kv_bytes_per_seq(src, context: int) -> int:
    return 2 * (src.num_layers or 0) * (src.n_kv_heads or 0) * (src.head_dim or 0) * context * \
        torch.empty(0, dtype=src.torch_dtype).element_size()


def plan_generation(ref: str, *, budget_bytes: int, hardware: HardwareProfile, context: int, prompt_len: int,
                    gen_len: int, objective: str = "throughput", quant: str = "auto", batch: int | None = None,
                    kv_block_tokens: int = 64, progress: Callable[[str], None] | None = None) -> Program:
    say = progress or (lambda m: None)
    if objective not in ("throughput", "latency"):
        raise MemintentError(f"--objective {objective!r}: use throughput or latency")
    if context < prompt_len + gen_len - 1:
        raise MemintentError(f"--context {context} is shorter than prompt {prompt_len} + generated {gen_len} - 1 "
                             "tokens: raise --context")
    src = resolve(ref)
    per_seq = kv_bytes_per_seq(src, context)
    batches = [batch] if batch else ([1] if objective == "latency" else
                                      [b for b in BATCHES if b * per_seq < budget_bytes])
    if not batches:
        raise MemintentError(f"even batch 1 needs {fmt_bytes(per_seq)} of KV for {context} tokens, more than the "
                             f"budget {fmt_bytes(budget_bytes)}: raise --budget or lower --context")
    candidates: list[tuple[float, int, Program | None, str]] = []
    for b in batches:
        say(f"batch {b}: tracing decode and prefill")
        decode = trace(_decode_spec(src, b, context), RunShape(batch=b, seq=1, kv_len=context,
                                                               kv_block_tokens=kv_block_tokens), progress=say)
        prefill = lifetimes(trace(_prefill_spec(src, b, prompt_len), RunShape(batch=b, seq=prompt_len),
                                  progress=say))
        # The decode plan must also fit the prefill's activations, which it runs with the same weights' plan.
        extra = max(activation_profile(prefill), default=0) - max(activation_profile(lifetimes(decode)), default=0)
        if extra > 0:
            decode.objects.append(Object(name="prefill.activations", kind=ObjectKind.workspace, dtype="u8",
                                         shape=[extra], size_bytes=extra, home=Tier.hbm))
        try:
            say(f"batch {b}: scheduling")
            plan = schedule_program(decode, budget_bytes, hardware, quant=quant)
        except MemintentError as e:
            candidates.append((0.0, b, None, f"batch {b}: does not fit ({str(e).split(':')[0]}; KV "
                                                f"{fmt_bytes(b * per_seq)})"))
            continue
        pr = plan.prediction
        # Prefill streams the same blocks as a decode step, so it takes the longer of its compute and those copies.
        prefill_compute_s = sum(step_time_s(s.flops, s.hbm_bytes, hardware) for s in prefill.steps)
        prefill_s = max(prefill_compute_s, pr.streamed_bytes / (hardware.h2d_gbps * 1e9))
        decode_s = pr.step_time_s
        tok_s = b * gen_len / (prefill_s + (gen_len - 1) * decode_s)
        if objective == "latency":
            tok_s = 1.0 / decode_s
        plan.generation = GenerationPlan(
            objective=objective, batch=b, context=context, prompt_len=prompt_len, gen_len=gen_len,
            quant_policy=quant, prefill_s=prefill_s, decode_step_s=decode_s,
            tokens_per_s=b * gen_len / (prefill_s + (gen_len - 1) * decode_s), binding=pr.binding)
        candidates.append((tok_s, b, plan, ""))
    feasible = [c for c in candidates if c[2] is not None]
    if not feasible:
        raise MemintentError("no batch fits the budget: " + "; ".join(c[3] for c in candidates))
    best = max(feasible, key=lambda c: (c[0], -c[1]))
    plan = best[2]
    alts = []
    for tok_s, b, p, why in candidates:
        if p is plan:
            continue
        if p is None:
            alts.append(why)
        else:
            g = p.generation
            alts.append(f"batch {b}: {g.tokens_per_s:.2f} tok/s, decode step {g.decode_step_s * 1e3:.1f} ms, "
                        f"{sum(1 for x in p.blocks if x.residency == Residency.streamed)} blocks streamed, binds "
                        f"{g.binding} (lower than batch {plan.generation.batch})")
    # KV capacity binds when the next batch up did not fit.
    bigger = [c for c in candidates if c[1] > best[1]]
    if objective == "throughput" and bigger and bigger[0][2] is None and plan.generation.binding != "pcie":
        plan.generation.binding = "kv capacity"
    plan.generation.alternatives = alts
    return plan
