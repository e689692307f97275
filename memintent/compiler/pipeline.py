"""Pipeline parts: one model over several GPUs, each GPU holding a contiguous range of decoder layers under its
own budget and streaming its own blocks over its own host link (``compile --gpus N``).

Partition. The decoder layers are split into N contiguous ranges (the first part also holds the embedding, the
last the final norm and the head) so that the slowest part's work is as small as possible: a layer's work is
the time its weights take over PCIe at the bit width the policy starts from (``layer_work_s``), and the ranges
are found by bisection on the slowest part's work with a greedy fill (the classic linear partition). The cut
between two parts is found on the IR's dependency graph: the activations defined before the cut and read after
it are what a step sends to the next part (``send_bytes``; for a transformer, the hidden states).

Plans. Every part serves the same steps: the same pool of KV pages (each part holds its layers' part of every
block), the same token and sequence budgets, so one scheduler decision is valid on every rank. The engine keeps
every part busy with N micro-batches (``engine/core.py``): the pool holds the sequences of all N, a step is
one micro-batch's, so a part's plan proves steps of about concurrency / N sequences over a pool for all of them
(``micro_shape``). A tick is the slowest part's step (``pipelined_step_s``) and the pipeline makes one
micro-batch of tokens per tick; a micro-batch passes all parts in ``serial_step_s`` (a sequence's time per
token is N ticks). For each concurrency the planner tries (as ``planner.plan_generation`` does for one GPU),
every part's residency is decided under the per-part budget; each part's plan is verified under it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from memintent.compiler.planner import (
    MAX_STEP_TOKENS,
    AffineStep,
    Outcome,
    Search,
    Shape,
    Workload,
    _check_args,
    _kv_options,
    generation_source,
    hide_tokens,
    shape_for,
)
from memintent.errors import MemintentError
from memintent.ir.layout import quantized_block_bytes
from memintent.ir.model import HardwareProfile, Pipeline, Program, Quant
from memintent.models.part import PartSource
from memintent.passes import schedule_program
from memintent.passes.graph import dependency_graph
from memintent.passes.residency import block_quant, starting_quant, vocab_blocks
from memintent.passes.verify import verify_pipeline

SWEEP_POINTS = 7


# ---------------------------------------------------------------------------------------------------------------
# Partition


def layer_work_s(p: Program, hw: HardwareProfile, quant: str) -> tuple[list[float], float, float]:
    """(each decoder layer's work, the embedding's, the final norm's and head's) in seconds: a block's copy at the
    bit width the policy starts from (int4g for ``auto``; the embedding and head at int8 under a 4-bit policy:
    ``block_quant``), the work the part's link does for it each step."""
    objects, vocab = p.object_map(), vocab_blocks(p)
    policy = starting_quant(quant)

    def work(b) -> float:
        q = block_quant(policy, b.name, vocab)
        size = b.size_bytes if q == Quant.none else quantized_block_bytes(b.model_copy(update={"quant": q}), objects)
        return size / (hw.h2d_gbps * 1e9)
    layers = [work(b) for b in p.blocks if b.name.startswith("layers.")]
    embed = sum(work(b) for b in p.blocks if b.name in ("embed", "pos_embed"))
    head = sum(work(b) for b in p.blocks if b.name in ("norm", "output"))
    return layers, embed, head


def check_stages(n: int, num_layers: int) -> None:
    if not 1 <= n <= num_layers:
        raise MemintentError(f"--gpus {n}: a model of {num_layers} decoder layers splits into 1..{num_layers} "
                             "parts")


def partition(layers: list[float], embed: float, head: float, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous ranges of ``layers`` (their work), the first also carrying ``embed`` and the last ``head``,
    whose largest total is smallest: bisection on that total, each probe filled greedily (a greedy fill covers the
    most layers any split under a cap can, so it decides a cap exactly)."""
    check_stages(n, len(layers))
    # The first range always holds layer 0 and the last the last layer: their ends' work is theirs.
    work = list(layers)
    work[0] += embed
    work[-1] += head

    def fill(cap: float) -> list[tuple[int, int]] | None:
        """Ranges filled greedily up to ``cap`` each; None when they need more than ``n`` parts."""
        out, lo, load = [], 0, 0.0
        for i, w in enumerate(work):
            if load + w > cap and i > lo:
                out.append((lo, i))
                lo, load = i, 0.0
            load += w
        out.append((lo, len(work)))
        return None if len(out) > n or max(work) > cap else out
    lo_cap, hi_cap = max(work), sum(work) * (1 + 1e-9)
    for _ in range(60):
        mid = (lo_cap + hi_cap) / 2
        if fill(mid) is None:
            lo_cap = mid
        else:
            hi_cap = mid
    return _split_to(fill(hi_cap), n)


def _split_to(ranges: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """Exactly ``n`` ranges: the widest split while fewer (a balanced fill may leave a GPU with nothing to do)."""
    while len(ranges) < n:
        i = max(range(len(ranges)), key=lambda j: ranges[j][1] - ranges[j][0])
        lo, hi = ranges[i]
        if hi - lo < 2:
            break
        mid = (lo + hi) // 2
        ranges[i:i + 1] = [(lo, mid), (mid, hi)]
    return ranges


def send_bytes(p: Program, cut_layer: int) -> int:
    """Bytes of the activations a decoder layer before ``cut_layer`` defines and a step from that layer on reads:
    what the part before the cut sends the part after it (a walk of the IR's dependency graph across the cut).
    Values the model's root computes from the step's inputs (RoPE's rows) are not sent: every part computes its
    own."""
    first = next(s.index for s in p.steps if s.block == f"layers.{cut_layer}")
    g = dependency_graph(p.steps)
    sizes = {o.name: o.size_bytes for o in p.objects if o.kind.value == "buffer"}
    in_layer = {s.index for s in p.steps if (s.block or "").startswith("layers.")}
    crossing = {name for i in range(first, len(p.steps)) for name in g.pred[i]
                if name in sizes and any(d < first and d in in_layer for d in g.pred[name])}
    return sum(sizes[n] for n in crossing)


# ---------------------------------------------------------------------------------------------------------------
# Plans


def micro_shape(n: int, parts: int, kvq, w: Workload, page_tokens: int, hide: int) -> Shape:
    """A pool for ``n`` sequences, steps of one of ``parts`` micro-batches (ceil(n / parts) sequences)."""
    whole = shape_for(n, kvq, w, page_tokens, hide)
    step = shape_for(-(-n // parts), kvq, w, page_tokens, hide)
    return dataclasses.replace(step, concurrency=n, num_pages=whole.num_pages)


def _candidates(searches: list[Search], kvq, hide: int, fixed: int | None) -> list[int]:
    if fixed:
        return [fixed]
    w, bt = searches[0].w, searches[0].page_tokens
    per_seq = max(s.light(shape_for(1, kvq, w, bt, hide)).objects[-1].size_bytes for s in searches)
    hi = max(1, min(int(searches[0].budget / max(per_seq, 1)) * 4, w.max_step_tokens))
    return sorted({max(1, round(hi ** (i / (SWEEP_POINTS - 1)))) for i in range(SWEEP_POINTS)})


def _evaluate(searches: list[Search], shape: Shape) -> tuple[float, list[Outcome]]:
    """Tokens per second: a micro-batch of concurrency / N sequences per tick, the slowest part's step."""
    outs = [s.evaluate(shape) for s in searches]
    if any(o.plan is None for o in outs):
        return 0.0, outs
    return shape.concurrency / len(searches) / max(o.step_s for o in outs), outs


def _search(searches: list[Search], kv_options, hide: int, fixed: int | None) -> tuple[Shape, list[Outcome]]:
    """The concurrency (and KV bit width) whose slowest part serves the most tokens per second: a geometric sweep
    then the integers around the best point."""
    best: tuple[float, Shape | None, list[Outcome]] = (0.0, None, [])
    w, bt = searches[0].w, searches[0].page_tokens
    for kvq in kv_options:
        grid = _candidates(searches, kvq, hide, fixed)
        scored = [(_evaluate(searches, micro_shape(n, len(searches), kvq, w, bt, hide)), n) for n in grid]
        (rate, outs), n = max(scored, key=lambda x: x[0][0])
        if rate > 0 and not fixed:
            for m in range(max(1, n - max(1, n // 4)), n + max(1, n // 4) + 1):
                r, o = _evaluate(searches, micro_shape(m, len(searches), kvq, w, bt, hide))
                if r > rate:
                    rate, outs, n = r, o, m
        if rate > best[0]:
            best = (rate, micro_shape(n, len(searches), kvq, w, bt, hide), outs)
    if best[1] is None:
        raise MemintentError("no concurrency fits every part's budget: raise --budget or add --gpus")
    return best[1], best[2]


def plan_pipeline(ref: str, *, parts: int, budget_bytes: int, hardware: HardwareProfile, context: int,
                  prompt_len: int, gen_len: int, objective: str = "throughput", quant: str = "auto",
                  kv_quant: str = "none", concurrency: int | None = None, kv_page_tokens: int = 16,
                  dtype: str | None = None, max_step_tokens: int | None = None,
                  progress: Callable[[str], None] | None = None) -> Pipeline:
    """A pipeline of ``parts`` plans, each under ``budget_bytes`` (per GPU), serving one engine's steps."""
    say = progress or (lambda m: None)
    _check_args(objective, context, prompt_len, gen_len, kv_page_tokens)
    src = generation_source(ref, dtype, context)
    check_stages(parts, src.num_layers)
    w = Workload(prompt_len=prompt_len, gen_len=gen_len, context=context,
                 max_step_tokens=max_step_tokens or MAX_STEP_TOKENS)
    say("tracing the whole step to partition its layers")
    whole = AffineStep(src, (64, 8), say)
    ranges = partition(*layer_work_s(whole.p, hardware, quant), parts)
    # Every part streams a share of the weights: the tokens whose compute hides under a part's stream.
    hide = hide_tokens(src, whole.p, hardware) // parts if objective == "throughput" else prompt_len + 1
    searches = []
    for lo, hi in ranges:
        say(f"part layers {lo}-{hi - 1}: tracing")
        st = PartSource(src, lo, hi)
        searches.append(Search(st, AffineStep(st, (64, 8), say), w, budget_bytes=budget_bytes, hw=hardware,
                               quant=quant, page_tokens=kv_page_tokens, swap=lambda s: 0, say=say,
                               objective=objective, kv_quant=kv_quant))
    shape, _ = _search(searches, _kv_options(kv_quant), hide, 1 if objective == "latency" else concurrency)
    plans = [schedule_program(s.program(shape, exact=True), budget_bytes, hardware, quant=quant) for s in searches]
    steps = [p.prediction.step_time_s for p in plans]
    rate = shape.concurrency / parts / max(steps)
    for p in plans:   # the engine's step is a tick: every part busy with its own micro-batch
        p.generation = p.generation.model_copy(update=dict(
            decode_step_s=max(steps), tokens_per_s=rate, binding=p.prediction.binding))
    return verify_pipeline(Pipeline(
        name=f"{whole.p.name} x{parts}", model=src.model_ref(), layers=[list(r) for r in ranges], parts=plans,
        send_bytes=[send_bytes(whole.at(shape.step_tokens, shape.max_seqs), lo) for lo, _ in ranges[1:]],
        pipelined_step_s=max(steps), serial_step_s=sum(steps), tokens_per_s=rate))


__all__ = ["partition", "plan_pipeline", "send_bytes"]
