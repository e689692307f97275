"""The generation planner: the KV pool, the step's token budget, the resident set, the weights' and the KV cache's
bit widths, chosen together for a budget.

What it plans for. The serving engine runs steps; each step is one pass of the plan's weight schedule and carries
the decode tokens of every running sequence plus chunks of waiting prompts (spec/serving.md). With ``N``
sequences running, a workload of mean prompt ``P`` and mean output ``G`` needs, in steady state, ``N`` decode tokens
and ``N * P / G`` prompt tokens per step, and keeps ``N`` contexts of up to ``P + G`` tokens in the pool. So ``N``
(the concurrency) sizes everything:

    pool pages   ceil(N * (P + G) / page_tokens) + 1 (the null page)
    step tokens   max(1.25 * N * (1 + P / G), the prompt tokens whose compute hides under the streamed bytes)
    step seqs     2 * N (short requests let more sequences share the pool)

and the predicted throughput is ``N / step_s``, where ``step_s`` is the simulated step (weights streamed as the
residency pass decides, attention over the contexts, the prompt chunks' compute). The search:

1. The step is traced at three (tokens, seqs) shapes; every step's FLOPs and bytes and every buffer's size are
   affine in the two (a transformer step has no product terms), so the step at any other shape is interpolated
   exactly, without tracing again.
2. For each KV bit width the policy allows (``--kv-quant none|int8|auto``) and each ``N`` on an integer search
   (a coarse geometric sweep up to the largest ``N`` whose pool fits, then a local refinement around the best),
   the residency pass chooses the resident set, the prefetch depth and (``--quant auto``) each streamed block's
   bit width in what the pool, the step's activations, the attention's scratch and the workspace leave of the
   budget; the step is simulated.
3. The best candidate is traced exactly at its shape and run through the whole pipeline, whose ``verify`` proves
   arena (resident blocks, stream slots, pool) + activations at the step maxima + workspace <= budget.

Streaming every layer to buy a larger pool is one of the candidates, not a special case: the residency pass
only keeps a layer resident where that wins, so full offload with a large batch is chosen whenever it is faster
(ZeRO-Inference's finding). Rejected candidates are kept, with their reason, in ``GenerationPlan.alternatives``.

``--kv-quant auto`` takes int8 KV only where it raises the predicted throughput by more than ``KV_QUANT_GAIN``
(int8 keys and values lose a little accuracy; ``generate --verify`` reports how much).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from memintent.compiler.frontend import TraceSpec, trace
from memintent.compiler.workload import (
    OpCosts,
    RunWorkload,
    SimRun,
    Simulate,
    StepTimes,
    Targets,
)
from memintent.errors import MemintentError
from memintent.ir.layout import weight_unpackers
from memintent.ir.model import (
    ADMISSION_ORDERS,
    GenerationPlan,
    HardwareProfile,
    KVPool,
    KVQuant,
    Object,
    ObjectKind,
    Prediction,
    Program,
    Residency,
    RunShape,
    Tier,
    align_up,
    describe_admission,
)
from memintent.kv import attention
from memintent.kv.layout import layout_of
from memintent.kv.paged_kernel import bucket, buckets
from memintent.models.refs import resolve
from memintent.passes import schedule_program
from memintent.passes.costs import (
    AttentionKind,
    MappedRead,
    attention_kind,
    host_copy_bytes,
    kv_block_costs,
    launches,
    mappable_reads,
    mapped_link_bytes,
    matmul_shapes,
    op_time_s,
    reads_at,
    spare_page_saving_s,
    stage_time_s,
)
from memintent.passes.lifetimes import activation_profile, lifetimes
from memintent.passes.manager import PassContractError
from memintent.passes.prefetch import schedule_of
from memintent.passes.residency import residency, vocab_blocks
from memintent.units import fmt_bytes, fmt_s

KV_QUANT_GAIN = 1.05          # --kv-quant auto: int8 KV must predict >5 % more tokens/s than bf16 KV
STEP_TOKEN_HEADROOM = 1.25    # step tokens over the steady-state need, for bursts of arrivals
MAX_STEP_TOKENS = 8192        # beyond this a step's activations cost more pool than its prompts gain
HIDE_FRACTION = 0.7           # of the streamed time that prompt compute may fill
SWEEP_POINTS = 7              # coarse concurrency sweep


@dataclass(frozen=True, slots=True)
class Workload:
    prompt_len: int               # mean prompt tokens
    gen_len: int                  # mean generated tokens
    context: int                  # longest sequence: prompt + generated
    max_step_tokens: int = MAX_STEP_TOKENS   # a cap on a step's tokens (its activations), from --max-step-tokens

    @property
    def seq_tokens(self) -> int:
        """Tokens a sequence holds in the pool at its end."""
        return min(self.prompt_len + self.gen_len, self.context)


@dataclass(frozen=True, slots=True)
class Shape:
    """One candidate: the concurrency and what it sizes."""

    concurrency: int
    kv_quant: KVQuant
    step_tokens: int
    max_seqs: int
    num_pages: int


# ---------------------------------------------------------------------------------------------------------------
# The traced step


def step_spec(src, tokens: int, seqs: int) -> TraceSpec:
    """One engine step as the front end traces it: ``tokens`` packed tokens, logits for ``seqs`` rows."""
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")          # (1, T)
    if src.takes_hidden:            # a pipeline part after the first takes the previous part's hidden states
        ids = torch.zeros(1, tokens, src.config.dim, dtype=src.torch_dtype, device="meta")   # (1, T, dim)
    pos = torch.zeros(tokens, dtype=torch.long, device="meta")             # (T,)
    rows = torch.zeros(seqs, dtype=torch.long, device="meta")              # (S,)
    inputs, kwargs = src.step_call(ids, pos, rows)
    return TraceSpec(name=src.ref.removeprefix("hf:").rstrip("/").rsplit("/", 1)[-1],
                     ref=src.model_ref(attention=attention.ENGINE_ATTENTION),
                     build=lambda n: src.engine_build("meta", num_layers=n), inputs=inputs, kwargs=kwargs,
                     layers_path=src.layers_path, num_layers=src.num_layers, n_kv_heads=src.n_kv_heads,
                     head_dim=src.head_dim)


def trace_step(src, tokens: int, seqs: int, progress: Callable[[str], None]) -> Program:
    with attention.tracing() as kv_shapes:
        p = trace(step_spec(src, tokens, seqs), RunShape(batch=1, seq=tokens), progress=progress)
    src.check_engine_attention(sum(1 for s in p.steps if is_attention(s.op)))
    src.check_kv_shapes(set(kv_shapes))
    return p


def is_attention(op: str) -> bool:
    return op.startswith(attention.OP_NAME)


class AffineStep:
    """A step's per-op FLOPs and bytes and its buffers' sizes as affine functions of (tokens, seqs), from three
    traces. ``exact`` is False when the three traces differ in structure (then callers trace each shape).

    For the search it also keeps, per step, the live activation bytes (``activation_profile``) as affine functions:
    a buffer's lifetime is the same at every shape, so the bytes live at a step are a sum of affine sizes."""

    def __init__(self, src, base: tuple[int, int], progress: Callable[[str], None]):
        t1, s1 = base
        self.base = base
        self.p = lifetimes(trace_step(src, t1, s1, progress))
        pt, ps = (lifetimes(trace_step(src, *shape, progress)) for shape in ((2 * t1, s1), (t1, 2 * s1)))
        self.exact = (len(self.p.steps) == len(pt.steps) == len(ps.steps)
                      and len(self.p.objects) == len(pt.objects) == len(ps.objects))
        if not self.exact:
            return
        self.d_steps = [((b.flops - a.flops) / t1, (b.hbm_bytes - a.hbm_bytes) / t1,
                         (c.flops - a.flops) / s1, (c.hbm_bytes - a.hbm_bytes) / s1)
                        for a, b, c in zip(self.p.steps, pt.steps, ps.steps)]
        self.d_sizes = [((b.size_bytes - a.size_bytes) / t1, (c.size_bytes - a.size_bytes) / s1)
                        for a, b, c in zip(self.p.objects, pt.objects, ps.objects)]
        prof, prof_t, prof_s = (activation_profile(x) for x in (self.p, pt, ps))
        self.live = [(a, (b - a) / t1, (c - a) / s1) for a, b, c in zip(prof, prof_t, prof_s)]
        self.attention_steps = [s.index for s in self.p.steps if is_attention(s.op)]
        self.shapes = matmul_shapes(self.p)
        last = set(self.p.steps[-1].defs) if self.p.steps else set()
        self.outputs = [i for i, o in enumerate(self.p.objects) if o.name in last]   # the step's logits

    def at(self, tokens: int, seqs: int) -> Program:
        """The traced program at another shape (weights and structure shared, sizes and costs interpolated)."""
        dt, ds = tokens - self.base[0], seqs - self.base[1]
        steps = [s.model_copy(update=dict(flops=max(0, round(s.flops + a * dt + c * ds)),
                                          hbm_bytes=max(0, round(s.hbm_bytes + b * dt + d * ds))))
                 for s, (a, b, c, d) in zip(self.p.steps, self.d_steps)]
        objects = [o if (a == 0 and b == 0) else o.model_copy(update=dict(
            size_bytes=max(0, round(o.size_bytes + a * dt + b * ds))))
            for o, (a, b) in zip(self.p.objects, self.d_sizes)]
        return self.p.model_copy(update=dict(steps=steps, objects=objects,
                                             shape=RunShape(batch=1, seq=tokens)))

    def stage_times(self, tokens: int, seqs: int, hw: HardwareProfile, attn: attention.AttentionWork,
                    kind: AttentionKind) -> list[float]:
        """Each stage's compute time at (tokens, seqs) with the attention ops costed as ``attn`` of ``kind`` (the
        costs pass's step rule, without building the program)."""
        dt, ds = tokens - self.base[0], seqs - self.base[1]
        work = [(attn.flops, attn.hbm_bytes) if is_attention(s.op) else
                (max(0, round(s.flops + a * dt + c * ds)), max(0, round(s.hbm_bytes + b * dt + d * ds)))
                for s, (a, b, c, d) in zip(self.p.steps, self.d_steps)]
        device = [op_time_s(s.op, f, b, hw, tokens, shape, kind)
                  for s, (f, b), shape in zip(self.p.steps, work, self.shapes)]
        kernels = [launches(f, b) for f, b in work]
        return [stage_time_s(sum(device[st.first_step:st.last_step + 1]),
                             sum(kernels[st.first_step:st.last_step + 1]), hw) for st in self.p.stages]

    def output_bytes(self, tokens: int, seqs: int) -> int:
        """Bytes of the step's output (its logits) at (tokens, seqs)."""
        dt, ds = tokens - self.base[0], seqs - self.base[1]
        return sum(align_up(max(0, round(self.p.objects[i].size_bytes + a * dt + b * ds)))
                   for i in self.outputs for a, b in (self.d_sizes[i],))

    def activation_peak(self, tokens: int, seqs: int, scratch_bytes: int) -> int:
        """Peak live activation bytes at (tokens, seqs), each attention op also holding ``scratch_bytes``."""
        dt, ds = tokens - self.base[0], seqs - self.base[1]
        live = [a + b * dt + c * ds for a, b, c in self.live]
        peak = max(live, default=0.0)
        for i in self.attention_steps:
            peak = max(peak, live[i] + scratch_bytes)
        return int(math.ceil(peak))


# ---------------------------------------------------------------------------------------------------------------
# Attention, the pool and the candidate's program


def kv_pool(src, shape: Shape, page_tokens: int, swap_pages: int) -> KVPool:
    probe = KVPool(layers=src.num_layers, kv_heads=src.n_kv_heads, head_dim=src.head_dim, page_tokens=page_tokens,
                   num_pages=shape.num_pages, quant=shape.kv_quant, page_bytes=1, swap_pages=swap_pages,
                   query_heads=src.n_heads)
    return probe.model_copy(update={"page_bytes": layout_of(probe, src.torch_dtype).page_bytes})


def step_scratch(src, pool: KVPool, context: int, step_tokens: int, max_seqs: int, hw: HardwareProfile,
                 graphs: bool = False) -> tuple[int, int]:
    """(each attention op's scratch, the step's attention metadata) in bytes: the bounds the runtime keeps to. A
    plan for the kernel (``hw.attention``) holds what either backend needs of it (``attention.Scratch``); the
    decode graphs (``graphs``) run the kernel alone."""
    scratch = attention.scratch_of(pool, src.torch_dtype, src.n_heads, context=context, step_tokens=step_tokens,
                                   max_seqs=max_seqs)
    meta = attention.metadata_bytes(step_tokens=step_tokens, max_seqs=max_seqs, context=context,
                                    page_tokens=pool.page_tokens, num_pages=pool.num_pages)
    return (scratch.kernel_bytes if graphs else scratch.bytes(hw.attention == "kernel")), meta


def annotate_step(p: Program, src, pool: KVPool, work: attention.AttentionWork, context: int,
                  max_seqs: int, hw: HardwareProfile, graph_bytes: int = 0) -> Program:
    """Give the step's attention ops their cost for the workload, the KV pool as what they read and write, and
    their scratch; the step's attention metadata is a workspace held through the step (``step_scratch``), and so is
    the memory of its decode steps' CUDA graphs (``graph_bytes``, ``decode_graph_bytes``)."""
    scratch, meta = step_scratch(src, pool, context, p.shape.seq, max_seqs, hw)
    if graph_bytes:
        p.objects.append(Object(name="step.graphs", kind=ObjectKind.workspace, dtype="u8", shape=[graph_bytes],
                                size_bytes=graph_bytes, home=Tier.hbm))
    p.objects.append(Object(name="kv.pool", kind=ObjectKind.kv, dtype="u8",
                            shape=[pool.num_pages, pool.page_bytes], size_bytes=pool.num_pages * pool.page_bytes,
                            home=Tier.hbm))
    p.objects.append(Object(name="step.metadata", kind=ObjectKind.workspace, dtype="u8", shape=[meta],
                            size_bytes=meta, home=Tier.hbm))
    for s in p.steps:
        if not is_attention(s.op):
            continue
        s.flops, s.hbm_bytes = work.flops, work.hbm_bytes
        name = f"t{s.index}.gather"
        # New lists: an interpolated step shares its lists with the base trace.
        s.uses, s.defs = [*s.uses, "kv.pool"], [*s.defs, name]
        p.objects.append(Object(name=name, kind=ObjectKind.buffer, dtype="u8", shape=[scratch], size_bytes=scratch,
                                home=Tier.hbm))
    p.kv_pool = pool
    return p


def step_work(src, pool: KVPool, shape: Shape, w: Workload, hw: HardwareProfile) -> attention.AttentionWork:
    """One layer's attention in a steady-state step: ``N`` decode queries over contexts of the mean length
    (prompt + half the output), and the step's prompt tokens over half their prompt on average."""
    n = shape.concurrency
    layout = layout_of(pool, src.torch_dtype)
    token_bytes = layout.page_bytes // (pool.page_tokens * pool.layers)
    prefill = min(shape.step_tokens - n, math.ceil(n * w.prompt_len / max(w.gen_len, 1)))
    chunks = max(1, math.ceil(prefill / max(w.prompt_len, 1)))
    return attention.attention_work(heads=src.n_heads, head_dim=src.head_dim,
                                    decode_context_tokens=n * (w.prompt_len + w.gen_len // 2),
                                    prefill_context_tokens=chunks * w.prompt_len,
                                    prefill_pairs=prefill * w.prompt_len // 2, kv_token_bytes=token_bytes,
                                    kv_heads=src.n_kv_heads, kernel=hw.attention == "kernel")


# ---------------------------------------------------------------------------------------------------------------
# Candidates


def shape_for(n: int, kvq: KVQuant, w: Workload, page_tokens: int, hide_tokens: int) -> Shape:
    n = min(n, w.max_step_tokens)                  # every running sequence needs a token of each step
    need = math.ceil(STEP_TOKEN_HEADROOM * n * (1 + w.prompt_len / max(w.gen_len, 1)))
    seqs = min(2 * n, w.max_step_tokens)
    tokens = max(min(max(need, hide_tokens), w.max_step_tokens), seqs)
    blocks = math.ceil(n * w.seq_tokens / page_tokens) + 1
    blocks = max(blocks, math.ceil(w.context / page_tokens) + 1)   # one sequence of the full context always fits
    return Shape(concurrency=n, kv_quant=kvq, step_tokens=tokens, max_seqs=seqs, num_pages=blocks)


def hide_tokens(src, step: Program, hw: HardwareProfile) -> int:
    """Prompt tokens per step whose compute fits under the weights' streaming when every layer streams."""
    weights = sum(o.size_bytes for o in step.objects if o.kind == ObjectKind.weight)
    per_token_flops = 2 * weights / max(src.torch_dtype.itemsize, 1)
    stream_s = weights / (hw.h2d_gbps * 1e9) / 4     # int4 streams about a quarter of the bytes
    token_s = per_token_flops / (hw.bf16_tflops * 1e12)
    return int(HIDE_FRACTION * stream_s / token_s) if token_s else 0


@dataclass(slots=True)
class Outcome:
    shape: Shape
    plan: Program | None          # the candidate's program with its residency decided, None when infeasible
    tokens_per_s: float
    why: str = ""
    step_s: float = 0.0           # simulated step
    binding: str = ""


class Search:
    """Evaluates candidates: the residency decision and the simulated step at the candidate's shape, on a light
    program (stages, visits, blocks and weights; the pool, the activation peak and the gather scratch as one
    reservation), so a candidate costs one residency search rather than a trace and the whole pipeline."""

    def __init__(self, src, step: AffineStep, w: Workload, *, budget_bytes: int, hw: HardwareProfile, quant: str,
                 page_tokens: int, swap: Callable[[Shape], int], say: Callable[[str], None],
                 objective: str = "throughput", kv_quant: str = "none"):
        self.src, self.step, self.w = src, step, w
        self.objective, self.kv_quant = objective, kv_quant
        self.budget, self.hw, self.quant, self.page_tokens = budget_bytes, hw, quant, page_tokens
        self.swap, self.say = swap, say
        self.cache: dict[tuple[int, str], Outcome] = {}
        self.weights = [o for o in step.p.objects if o.kind == ObjectKind.weight]
        # Found in the traced step: a light candidate has no steps, and its vocabulary blocks must get the bit width
        # the exact plan gives them (their stream slots set the candidate's depth).
        self.vocab = vocab_blocks(step.p)
        self.reads = mappable_reads(step.p)    # blocks that can be read in place, from the traced step
        self.by_weight = set(weight_unpackers(step.p))   # blocks that unpack one weight at a time, likewise

    def program(self, shape: Shape, exact: bool = False) -> Program:
        """The candidate's traced step, annotated: exactly traced, or interpolated from the three traces."""
        pool = kv_pool(self.src, shape, self.page_tokens, self.swap(shape))
        if exact or not self.step.exact:
            p = trace_step(self.src, shape.step_tokens, shape.max_seqs, self.say)
        else:
            p = self.step.at(shape.step_tokens, shape.max_seqs)
        p = annotate_step(p, self.src, pool, step_work(self.src, pool, shape, self.w, self.hw), self.w.context,
                          shape.max_seqs, self.hw, self.graph_bytes(pool, shape))
        # What the plan proves, before its prediction is known (verify, the pipeline's last pass, checks it).
        p.generation = GenerationPlan(
            objective=self.objective, step_tokens=shape.step_tokens, max_seqs=shape.max_seqs, context=self.w.context,
            prompt_len=self.w.prompt_len, gen_len=self.w.gen_len, concurrency=shape.concurrency,
            quant_policy=self.quant, kv_quant_policy=self.kv_quant, decode_step_s=0.0, tokens_per_s=0.0, binding="",
            spare_pages="on")
        return p

    def graph_bytes(self, pool: KVPool, shape: Shape) -> int:
        """Device memory the engine's decode graphs hold for the whole run beside every step (spec/runtime.md,
        "Captured steps"): the activations of a decode step of the largest bucket, in one pool shared by all buckets,
        and the kernels' workspace of the stream they were captured on (cuBLAS keeps one per stream: measured on
        the H200, a streamed tiny-llama plan peaked one workspace above its budget without it). Counted for every
        generation plan on a GPU profile, streamed or not."""
        if self.hw.attention != "kernel" or not self.step.exact:
            return 0
        b = bucket(shape.max_seqs)
        scratch, _ = step_scratch(self.src, pool, self.w.context, b, b, self.hw, graphs=True)
        # every graph keeps the logits it writes: the smaller buckets' beside the largest one's peak
        kept = sum(self.step.output_bytes(s, s) for s in buckets(b)[:-1])
        return align_up(self.step.activation_peak(b, b, scratch)) + kept + self.hw.workspace_bytes

    def light(self, shape: Shape) -> Program:
        pool = kv_pool(self.src, shape, self.page_tokens, self.swap(shape))
        work = step_work(self.src, pool, shape, self.w, self.hw)
        times = self.step.stage_times(shape.step_tokens, shape.max_seqs, self.hw, work, attention_kind(pool))
        scratch, meta = step_scratch(self.src, pool, self.w.context, shape.step_tokens, shape.max_seqs, self.hw)
        held = (align_up(pool.num_pages * pool.page_bytes) + meta + self.graph_bytes(pool, shape)
                + self.step.activation_peak(shape.step_tokens, shape.max_seqs, scratch))
        reserve = Object(name="kv.pool+activations", kind=ObjectKind.workspace, dtype="u8", shape=[held],
                         size_bytes=held, home=Tier.hbm)
        base = self.step.p
        return Program.model_construct(
            **{**dict(base), "objects": [*self.weights, reserve], "steps": [],
               "blocks": [b.model_copy() for b in base.blocks],
               "stages": [st.model_copy(update={"time_s": t}) for st, t in zip(base.stages, times)],
               "budget_bytes": self.budget, "hardware": self.hw, "arena": None})

    def reads_of(self, shape: Shape) -> dict[str, MappedRead]:
        """The in-place reads of a step of ``shape``: all its tokens' rows, the head on its sampled rows."""
        return reads_at(self.reads, (shape.step_tokens, shape.max_seqs))

    def evaluate(self, shape: Shape) -> Outcome:
        key = (shape.concurrency, shape.kv_quant.value, shape.step_tokens, shape.max_seqs, shape.num_pages)
        if key not in self.cache:
            self.cache[key] = self._evaluate(shape)
        return self.cache[key]

    def _evaluate(self, shape: Shape) -> Outcome:
        p = self.light(shape) if self.step.exact else None
        try:
            if p is None:
                p = schedule_program(self.program(shape), self.budget, self.hw, quant=self.quant)
                pr = p.prediction
                return Outcome(shape, p, shape.concurrency / pr.step_time_s, step_s=pr.step_time_s,
                               binding=pr.binding)
            reads = self.reads_of(shape)
            residency(p, None, self.quant, vocab=self.vocab, reads=reads, by_weight=self.by_weight)
        except PassContractError:
            raise          # a broken pass is a bug, not a candidate that does not fit
        except MemintentError as e:
            return Outcome(shape, None, 0.0, f"does not fit ({str(e).split(':')[0]})")
        _, sim = schedule_of(p, reads)
        step_s = sim.step_time_s
        binding = "none" if not sim.copies else ("pcie" if sim.copy_busy_s >= sim.compute_s else "compute")
        return Outcome(shape, p, shape.concurrency / step_s, step_s=step_s, binding=binding)


def _largest_fitting(search: Search, kvq: KVQuant, hide: int) -> int:
    """The largest concurrency whose pool, activations and workspace leave room for one stream slot: an upper bound
    for the sweep (bisection on the pool's size alone; the residency pass decides the rest)."""
    w, bt = search.w, search.page_tokens
    per_seq = kv_pool(search.src, shape_for(1, kvq, w, bt, hide), bt, 0).page_bytes * w.seq_tokens / bt
    return max(1, min(int(search.budget / max(per_seq, 1)), w.max_step_tokens))


def sweep(search: Search, kvq: KVQuant, hide: int, fixed: int | None) -> list[Outcome]:
    """Coarse geometric sweep of the concurrency, then integer refinement around the best feasible point."""
    w, bt = search.w, search.page_tokens
    if fixed:
        return [search.evaluate(shape_for(fixed, kvq, w, bt, hide))]
    hi = _largest_fitting(search, kvq, hide)
    grid = sorted({max(1, round(hi ** (i / (SWEEP_POINTS - 1)))) for i in range(SWEEP_POINTS)})
    outs = [search.evaluate(shape_for(n, kvq, w, bt, hide)) for n in grid]
    best = max(outs, key=lambda o: o.tokens_per_s)
    if best.plan is None:
        return outs
    lo_n, hi_n = _bracket(grid, best.shape.concurrency)
    while hi_n - lo_n > 2:                                 # ternary search on the integer bracket
        a, b = lo_n + (hi_n - lo_n) // 3, hi_n - (hi_n - lo_n) // 3
        oa, ob = (search.evaluate(shape_for(n, kvq, w, bt, hide)) for n in (a, b))
        outs += [oa, ob]
        if oa.tokens_per_s >= ob.tokens_per_s:
            hi_n = b
        else:
            lo_n = a
    outs += [search.evaluate(shape_for(n, kvq, w, bt, hide)) for n in range(lo_n, hi_n + 1)]
    return outs


def _bracket(grid: list[int], n: int) -> tuple[int, int]:
    i = grid.index(n)
    return (grid[i - 1] if i else max(1, n // 2)), (grid[i + 1] if i + 1 < len(grid) else n)


def _kv_options(kv_quant: str) -> tuple[KVQuant, ...]:
    if kv_quant not in ("none", "int8", "auto"):
        raise MemintentError(f"--kv-quant {kv_quant!r}: use none, int8 or auto")
    return {"none": (KVQuant.none,), "int8": (KVQuant.int8,), "auto": (KVQuant.none, KVQuant.int8)}[kv_quant]


def _pick(outs: list[Outcome], kv_quant: str) -> Outcome:
    feasible = [o for o in outs if o.plan is not None]
    if not feasible:
        raise MemintentError("no concurrency fits the budget: " + "; ".join(
            f"{o.shape.concurrency} sequences: {o.why}" for o in outs[:4]))
    best = {q: max((o for o in feasible if o.shape.kv_quant == q), key=lambda o: o.tokens_per_s, default=None)
            for q in KVQuant}
    plain, int8 = best[KVQuant.none], best[KVQuant.int8]
    if kv_quant == "auto" and plain is not None and int8 is not None:
        return int8 if int8.tokens_per_s > KV_QUANT_GAIN * plain.tokens_per_s else plain
    return max(feasible, key=lambda o: o.tokens_per_s)


def streamed_note(plan: Program) -> str:
    """"N blocks streamed", with how many of them copy from the HBM store, and how many are read in place."""
    streamed = sum(1 for b in plan.blocks if b.residency == Residency.streamed)
    stored = sum(1 for b in plan.blocks if b.in_hbm_store)
    mapped = sum(1 for b in plan.blocks if b.residency == Residency.mapped)
    return (f"{streamed} blocks streamed" + (f" ({stored} from the HBM store)" if stored else "")
            + (f", {mapped} read in place" if mapped else ""))


def _describe(o: Outcome, chosen: Outcome) -> str:
    s = o.shape
    head = f"{s.concurrency} sequences, {s.kv_quant.value} KV ({s.num_pages} blocks, {s.step_tokens} tokens/step)"
    if o.plan is None:
        return f"{head}: {o.why}"
    return (f"{head}: {o.tokens_per_s:.2f} tok/s, step {o.step_s * 1e3:.1f} ms, {streamed_note(o.plan)}, binds "
            f"{o.binding} (below the chosen {chosen.tokens_per_s:.2f})")


def _distinct(outs: list[Outcome], chosen: Outcome) -> list[Outcome]:
    """Each candidate evaluated once (the search revisits some), best first, without the chosen one."""
    seen = {id(chosen)}
    out = []
    for o in sorted(outs, key=lambda o: -o.tokens_per_s):
        if id(o) not in seen:
            seen.add(id(o))
            out.append(o)
    return out


def _binding(plan: Program, chosen: Outcome, outs: list[Outcome]) -> str:
    b = plan.prediction.binding
    bigger = [o for o in outs if o.shape.kv_quant == chosen.shape.kv_quant
              and o.shape.concurrency > chosen.shape.concurrency]
    if b != "pcie" and bigger and all(o.plan is None for o in bigger):
        return "kv capacity"
    return b


# ---------------------------------------------------------------------------------------------------------------
# The entry point


def _check_args(objective: str, context: int, prompt_len: int, gen_len: int, page_tokens: int) -> None:
    if objective not in ("throughput", "latency"):
        raise MemintentError(f"--objective {objective!r}: use throughput or latency")
    for flag, v in (("--context", context), ("--prompt-len", prompt_len), ("--gen-len", gen_len),
                    ("--kv-page-tokens", page_tokens)):
        if v < 1:
            raise MemintentError(f"{flag} {v} must be at least 1")
    if context < prompt_len + gen_len - 1:
        raise MemintentError(f"--context {context} is shorter than prompt {prompt_len} + generated {gen_len} - 1 "
                             "tokens: raise --context")


def generation_source(ref: str, dtype: str | None, context: int):
    """The model a generation plan is for, refused when the engine cannot serve it at ``context``."""
    src = resolve(ref, dtype=dtype)
    if not (src.num_layers and src.n_kv_heads and src.head_dim):
        raise MemintentError(f"{ref}: generation plans need a decoder model with known layers, KV heads and head "
                             "size")
    if src.max_positions and context > src.max_positions:
        raise MemintentError(f"--context {context} is longer than the {src.max_positions} positions {ref} encodes: "
                             f"use --context {src.max_positions} or less")
    return src


def plan_generation(ref: str, *, budget_bytes: int, hardware: HardwareProfile, context: int, prompt_len: int,
                    gen_len: int, objective: str = "throughput", quant: str = "auto", kv_quant: str = "none",
                    concurrency: int | None = None, kv_page_tokens: int = 16, swap_pages: int | None = None,
                    dtype: str | None = None, max_step_tokens: int | None = None,
                    progress: Callable[[str], None] | None = None, workload: RunWorkload | None = None,
                    simulate: Simulate | None = None, targets: Targets | None = None) -> Program:
    """A verified generation plan for ``ref`` under ``budget_bytes``. ``concurrency`` fixes N (tests,
    experiments); ``latency`` plans one sequence whose whole prompt fits one step. ``swap_pages``: host swap
    space in blocks (None: a quarter of the pool when the plan's copy engine has idle time to swap in, else none).

    ``workload`` (with ``simulate``, ``engine.simulate.simulate_run``): plan for these requests rather than for the
    steady state: each candidate's run of them is simulated and the best for the objective chosen (``RunSearch``);
    ``prompt_len`` and ``gen_len`` become the workload's means. ``latency`` then means the most tokens/s whose run
    meets ``targets`` (p99)."""
    say = progress or (lambda m: None)
    if workload is not None:
        prompt_len, gen_len = _workload_means(workload, simulate, context)
    _check_args(objective, context, prompt_len, gen_len, kv_page_tokens)
    src = generation_source(ref, dtype, context)
    w = Workload(prompt_len=prompt_len, gen_len=gen_len, context=context,
                 max_step_tokens=max_step_tokens or MAX_STEP_TOKENS)
    say("tracing the engine step at three shapes")
    step = AffineStep(src, (64, 8), say)
    steady_latency = objective == "latency" and workload is None
    hide = prompt_len + 1 if steady_latency else hide_tokens(src, step.p, hardware)
    search = Search(src, step, w, budget_bytes=budget_bytes, hw=hardware, quant=quant, page_tokens=kv_page_tokens,
                    swap=lambda s: s.num_pages if swap_pages is None else swap_pages, say=say,
                    objective=objective, kv_quant=kv_quant)
    fixed = 1 if steady_latency else concurrency
    outs: list[Outcome] = []
    for kvq in _kv_options(kv_quant):
        say(f"searching the concurrency with {kvq.value} KV")
        outs += sweep(search, kvq, hide, fixed)
    if workload is None:
        chosen = _pick(outs, kv_quant)
        say(f"{chosen.shape.concurrency} sequences, {chosen.shape.kv_quant.value} KV: tracing the step exactly")
        return _finish(search, chosen, outs, quant=quant, swap_pages=swap_pages)
    if not step.exact:
        raise MemintentError(f"{ref}: planning for a workload needs a step whose costs are affine in its tokens and "
                             "sequences, and this model's traces differ in structure: plan without --workload")
    runs = RunSearch(search, workload, simulate, targets or Targets(), swap_pages)
    best = runs.run(outs, kv_quant, hide, fixed)
    say(f"{best.outcome.shape.concurrency} sequences, {best.outcome.shape.kv_quant.value} KV, admission "
        f"{describe_admission(best.admission, runs.class_tokens(best.admission))}: tracing the step exactly")
    plan = _finish(search, best.outcome, outs, quant=quant, swap_pages=swap_pages, alternatives=runs.describe(best),
                   admission=best.admission, admission_class_tokens=runs.class_tokens(best.admission))
    return runs.record(plan, best)


def _workload_means(workload: RunWorkload, simulate: Simulate | None, context: int) -> tuple[int, int]:
    """The workload's mean prompt and output lengths (what the steady-state fields record); refused when a prompt
    is longer than ``context`` (the engine would refuse it)."""
    if simulate is None:
        raise ValueError("plan_generation(workload=...) needs simulate= (engine.simulate.simulate_run)")
    longest = max(workload.prompt_lens)
    if longest > context:
        raise MemintentError(f"--context {context} is shorter than the workload's longest prompt ({longest} "
                             f"tokens): raise --context to at least {longest} (or leave it out: the workload's "
                             "longest request)")
    return (max(1, round(workload.prompt_tokens / workload.requests)),
            max(1, round(workload.generated_tokens / workload.requests)))


def _auto_swap(binding: str, shape: Shape) -> int:
    """Host swap space in pages when the user gave none. A PCIe-bound plan never swaps (its copy engine has no idle
    time, so victims recompute): no pinned swap space. Otherwise a quarter of the pool: victims are the newest
    sequences, a few at a time."""
    return 0 if binding == "pcie" else shape.num_pages // 4


def _finish(search: Search, chosen: Outcome, outs: list[Outcome], *, quant: str, swap_pages: int | None,
            alternatives: list[str] | None = None, admission: str = "fcfs", admission_class_tokens: int = 1) -> Program:
    s = chosen.shape
    if swap_pages is None:
        search.swap = lambda shape: _auto_swap(chosen.binding, shape)
    plan = schedule_program(search.program(s, exact=True), search.budget, search.hw, quant=quant)
    pr = plan.prediction
    if alternatives is None:
        alternatives = [_describe(o, chosen) for o in _distinct(outs, chosen)][:12]
    plan.generation = plan.generation.model_copy(update=dict(
        decode_step_s=pr.step_time_s, tokens_per_s=s.concurrency / pr.step_time_s,
        binding=_binding(plan, chosen, outs), alternatives=alternatives, admission=admission,
        admission_class_tokens=admission_class_tokens))
    return plan


# ---------------------------------------------------------------------------------------------------------------
# Planning against a workload

REFINE_PROBES = 6          # concurrencies tried around the best run (ternary search)
TOKEN_FACTORS = (2.0, 0.5)  # step token budgets tried around the best run's, each way until one does not help
POOL_FACTORS = (1.25, 0.8)  # KV pools tried around the best run's, likewise
ORDER_SHAPES = 3           # the best runs' shapes also tried under every admission order
ADMISSION_CLASS_SPREAD = 4   # longest-output's class: the workload's spread of output lengths over this


@dataclass(slots=True)
class Run:
    """A candidate weighed by its simulated run of the workload."""

    outcome: Outcome
    admission: str
    sim: SimRun | None = None      # None: not simulated (its bound could not beat the best run)
    bound_s: float = 0.0           # no run of the workload under this candidate is shorter
    misses: float = 0.0            # latency: how far the run is from the targets (0: meets them)

    @property
    def run_s(self) -> float:
        return self.sim.run_s if self.sim is not None else math.inf

    @property
    def key(self) -> tuple[float, float, int, int, int]:
        """Lower is better: the targets met first (latency), then the shorter run (= more tokens/s), then (runs
        alike) the smaller pool and step: the memory they would hold for nothing."""
        s = self.outcome.shape
        return (self.misses, self.run_s, s.num_pages, s.step_tokens, s.max_seqs)


def kv_token_steps(w: RunWorkload) -> int:
    """The KV pool's work in a run of ``w``: the j-th output token of a request is sampled with p + j - 1 of its
    tokens cached, so the run's steps hold at least this many cached tokens in all."""
    return sum(g * p + g * (g - 1) // 2 for p, g in zip(w.prompt_lens, w.gen_lens))


def pool_steps(kv_token_steps: int, pool_tokens: int, step_tokens: int) -> int:
    """The fewest steps whose pool of ``pool_tokens`` holds ``kv_token_steps`` cached tokens in all, when the pool
    starts empty and each step caches at most ``step_tokens`` more: step j holds at most min(pool, j x step)
    tokens. The fill is why a run of many requests at once cannot reach its full-concurrency rate (the 70B mix at
    24 GiB with int8 KV: its pool fills in 55 steps, which costs 27 of its 188 fewest)."""
    fill = pool_tokens // step_tokens                  # steps before the pool can be full
    filled = step_tokens * fill * (fill + 1) // 2      # what those steps can hold in all
    if kv_token_steps > filled:
        return fill + math.ceil((kv_token_steps - filled) / pool_tokens)
    # done while filling: the least j with T j (j + 1) / 2 >= work (the float root, then made exact)
    j = max(1, math.ceil((math.sqrt(1 + 8 * kv_token_steps / step_tokens) - 1) / 2))
    while j > 1 and step_tokens * (j - 1) * j // 2 >= kv_token_steps:
        j -= 1
    while step_tokens * j * (j + 1) // 2 < kv_token_steps:
        j += 1
    return j


@dataclass(frozen=True, slots=True)
class _Probe:
    """A step record of one decode token over a context of one: the cheapest step a plan runs with
    ``spare_blocks`` blocks in the KV pool's spare pages."""

    tokens: int = 1
    sequences: int = 1
    decode_context_tokens: int = 1
    prefill_context_tokens: int = 0
    prefill_pairs: int = 0
    spare_blocks: int = 0


class RunSearch:
    """Candidates weighed by the run of the workload they would serve. Each is simulated (``simulate``: the engine's
    scheduler over the workload, every step costed by the candidate's ``StepTimes``), the most promising first by
    the steady-state estimate. One whose run cannot beat the best so far even if every step were its cheapest
    (``bound_s``) is not simulated, and a simulation stops once its run is longer than the best: the steady-state
    estimate prunes, the simulation decides.

    The candidates: every shape the steady-state sweep found feasible (its own choice among them, so a workload
    plan's run is never longer than the steady-state plan's), every request at once with a pool for them as they
    are, a ternary refinement of the concurrency around the best run, every admission order for the best few
    shapes, then around the best: no more sequences than requests, the pool sized for the requests and walked
    larger and smaller, the step token budget doubled and halved. ``throughput`` picks the shortest run;
    ``latency`` the shortest run among those that meet the targets (p99 time to first token and per output
    token)."""

    def __init__(self, search: Search, workload: RunWorkload, simulate: Simulate, targets: Targets,
                 swap_pages: int | None):
        self.search, self.workload, self.simulate, self.targets = search, workload, simulate, targets
        self.swap_pages = swap_pages
        self.fixed = False           # the concurrency is the user's (--concurrency): walks keep it
        self.ops = OpCosts(search.step, search.hw, is_attention)
        self.runs: dict[tuple, Run] = {}
        self.best: dict[KVQuant, Run] = {}
        w = workload
        tokens = sum(p + g - 1 for p, g in zip(w.prompt_lens, w.gen_lens))
        # KV token-steps: the j-th token of a request is sampled with p + j - 1 of its tokens cached
        self._kv_token_steps = kv_token_steps(w)
        self._tokens = tokens
        # longest-output's class of output lengths: a quarter of the workload's spread (engine/scheduler.py says why)
        self._longest_class = max(1, (max(w.gen_lens) - min(w.gen_lens)) // ADMISSION_CLASS_SPREAD)

    # -- one candidate ----------------------------------------------------------------------------------------
    def swap_of(self, o: Outcome) -> int:
        return _auto_swap(o.binding, o.shape) if self.swap_pages is None else self.swap_pages

    def shell(self, o: Outcome) -> Program:
        """The candidate as the engine's scheduler reads a plan (``Costs.of``): its pool, its step's maxima, its
        predicted step, compute and streamed bytes, and the KV pool object's preemption costs (``costs`` pass
        rules at the candidate's shape; the pool's urgency at stage rather than op granularity)."""
        s, search, p = o.shape, self.search, o.plan
        pool = kv_pool(search.src, s, search.page_tokens, self.swap_of(o))
        times = [st.time_s for st in p.stages]
        compute_s = sum(times)
        first_attn = int(next((i for i, n in enumerate(self.ops.attn_per_stage) if n), 0))
        streamed = host_copy_bytes(p)
        shell = Program.model_construct(**{**dict(p), "shape": RunShape(batch=1, seq=s.step_tokens), "kv_pool": pool})
        evict_s, recompute_s = kv_block_costs(shell, compute_s)
        kv = Object(name="kv.pool", kind=ObjectKind.kv, dtype="u8", shape=[pool.num_pages, pool.page_bytes],
                    size_bytes=pool.num_pages * pool.page_bytes, home=Tier.hbm, urgency_s=sum(times[:first_attn]),
                    evict_cost_s=evict_s, recompute_cost_s=recompute_s)
        g = GenerationPlan(
            objective=search.objective, step_tokens=s.step_tokens, max_seqs=s.max_seqs, context=search.w.context,
            prompt_len=search.w.prompt_len, gen_len=search.w.gen_len, concurrency=s.concurrency,
            quant_policy=search.quant, kv_quant_policy=search.kv_quant, decode_step_s=o.step_s,
            tokens_per_s=o.tokens_per_s, binding=o.binding, spare_pages="on")
        pr = Prediction.model_construct(step_time_s=o.step_s, compute_s=compute_s, streamed_bytes=streamed,
                                        mapped_bytes=mapped_link_bytes(p, search.reads_of(s)))
        return Program.model_construct(**{**dict(shell), "objects": [kv], "generation": g, "prediction": pr})

    def bound_s(self, o: Outcome, times: StepTimes) -> float:
        """No run of the workload under ``o`` is shorter: its fewest possible steps at its cheapest step's time.
        A step carries at most ``step_tokens`` tokens and samples at most ``max_seqs`` tokens; a request needs at
        least one step per generated token after its prompt's chunks; the pool holds at most its pages' tokens in
        every step, and a request's j-th token is sampled with p + j - 1 of its tokens cached."""
        s, w = o.shape, self.workload
        pool = kv_pool(self.search.src, s, self.search.page_tokens, 0)
        steps = max(math.ceil(self._tokens / s.step_tokens), math.ceil(w.generated_tokens / s.max_seqs),
                    max(math.ceil(p / s.step_tokens) + g - 1 for p, g in zip(w.prompt_lens, w.gen_lens)),
                    pool_steps(self._kv_token_steps, (pool.num_pages - 1) * pool.page_tokens, s.step_tokens))
        return self._cheapest_run_s(pool, steps, times)

    def _cheapest_run_s(self, pool: KVPool, steps: int, times: StepTimes) -> float:
        """No run of at least ``steps`` steps is shorter. Each step costs at least the cheapest step (``_Probe``)
        less what the blocks in the pool's spare pages take off it: at most ``costs.spare_page_saving_s`` per free
        page, and never below the cheapest step with every block held. The sequences leave free pages only where
        they do not cache their ``kv_token_steps`` tokens, so N steps cost at least max(N held_s,
        N (cheapest_s - per_page_s pages) + per_page_s kv_pages) (each step's floor is convex in its free pages):
        the least over N >= steps is at ``steps``, or where the two meet when the second falls with N."""
        per_page_s, blocks = spare_page_saving_s(times.program, pool.page_bytes)
        cheapest_s = times.predict_s(_Probe())
        held_s = times.predict_s(_Probe(spare_blocks=blocks)) if blocks else cheapest_s
        if held_s >= cheapest_s:
            return steps * cheapest_s
        pages, kv_pages = pool.num_pages - 1, self._kv_token_steps / pool.page_tokens
        slope_s = cheapest_s - per_page_s * pages          # what one more step adds to the second term
        if slope_s < 0:                                    # the second term falls as N grows: the least is where
            meet = per_page_s * kv_pages / (held_s - slope_s)   # it meets the first, if that is past ``steps``
            if meet >= steps:
                return meet * held_s
        return max(steps * held_s, steps * slope_s + per_page_s * kv_pages)

    def times(self, plan: Program, pool: KVPool) -> StepTimes:
        return StepTimes(self.ops, plan, pool, self.search.src.n_heads, self.search.src.head_dim,
                         self.search.src.n_kv_heads, self.search.reads)

    def class_tokens(self, admission: str) -> int:
        """The class of output lengths the scheduler ranks by under ``admission``: 1 (exactly) but under
        longest-output."""
        return self._longest_class if admission == "longest-output" else 1

    def weigh(self, o: Outcome, admission: str) -> Run:
        """Simulate ``o``'s run with ``admission`` (once), unless its bound cannot beat the best run of its KV."""
        key = (o.shape, admission)
        if key in self.runs:
            return self.runs[key]
        run = self.runs[key] = Run(o, admission)
        if o.plan is None:
            return run
        pool = kv_pool(self.search.src, o.shape, self.search.page_tokens, 0)
        times = self.times(o.plan, pool)
        run.bound_s = self.bound_s(o, times)
        best = self.best.get(o.shape.kv_quant)
        give_up = best.run_s if best is not None and best.misses == 0 else None
        if give_up is not None and run.bound_s >= give_up:
            return run
        run.sim = self.simulate(self.shell(o), self.workload, times, admission=admission,
                                admission_class_tokens=self.class_tokens(admission), give_up_s=give_up)
        if run.sim.prediction is not None:
            run.misses = self.targets.misses(run.sim.prediction)
            if best is None or run.key < best.key:
                self.best[o.shape.kv_quant] = run
        return run

    # -- the search -------------------------------------------------------------------------------------------
    def run(self, outs: list[Outcome], kv_quant: str, hide: int, fixed: int | None) -> Run:
        self.fixed = fixed is not None
        for kvq in _kv_options(kv_quant):
            mine = [o for o in outs if o.shape.kv_quant == kvq and o.plan is not None]
            if fixed is None and self.workload.requests <= _largest_fitting(self.search, kvq, hide):
                every = shape_for(self.workload.requests, kvq, self.search.w, self.search.page_tokens, hide)
                mine.append(self.search.evaluate(self.pool_for(every)))
            self.search.say(f"simulating the workload's run with {kvq.value} KV")
            for o in sorted({id(o): o for o in mine}.values(), key=lambda o: -o.tokens_per_s):
                self.weigh(o, "fcfs")
            if kvq not in self.best:
                continue
            if fixed is None:
                self._refine(kvq, hide)
            self._orders(kvq)
            self._shapes(kvq)
        return self._pick(kv_quant)

    def _try_n(self, n: int, kvq: KVQuant, hide: int) -> Run:
        return self.weigh(self.search.evaluate(shape_for(n, kvq, self.search.w, self.search.page_tokens, hide)),
                          "fcfs")

    def _refine(self, kvq: KVQuant, hide: int) -> None:
        """Ternary search of the concurrency between the best run's neighbours among those tried."""
        best = self.best[kvq].outcome.shape.concurrency
        tried = sorted({k[0].concurrency for k in self.runs if k[0].kv_quant == kvq})
        i = tried.index(best)
        lo, hi = (tried[i - 1] if i else max(1, best // 2)), (tried[i + 1] if i + 1 < len(tried) else best)
        for _ in range(REFINE_PROBES):
            if hi - lo <= 2:
                break
            a, b = lo + (hi - lo) // 3, hi - (hi - lo) // 3
            if self._try_n(a, kvq, hide).key <= self._try_n(b, kvq, hide).key:
                hi = b
            else:
                lo = a

    def _orders(self, kvq: KVQuant) -> None:
        w = self.workload
        if len(set(zip(w.prompt_lens, w.gen_lens))) == 1:
            return             # every request alike: every order is first come, first served
        done = sorted((r for r in self.runs.values() if r.sim is not None and r.sim.prediction is not None
                       and r.outcome.shape.kv_quant == kvq), key=lambda r: r.key)
        shapes = list(dict.fromkeys(r.outcome.shape for r in done))[:ORDER_SHAPES]
        for shape in shapes:
            for admission in ADMISSION_ORDERS:
                self.weigh(self.search.evaluate(shape), admission)

    def pool_for(self, s: Shape) -> Shape:
        """``s`` with a pool for ``s.concurrency`` of the workload's requests as they are: each holds its own
        whole pages at its end (the steady-state shape counts a mean request's tokens)."""
        pages = math.ceil(s.concurrency * self.workload.mean_pages(self.search.page_tokens, self.search.w.context))
        return replace(s, num_pages=max(s.num_pages, pages + 1))

    def _shapes(self, kvq: KVQuant) -> None:
        """Around the best run's shape: its pool sized for the workload's requests, then larger and smaller pools,
        then the step token budget doubled and halved, each way while that shortens the run."""
        w, bt = self.search.w, self.search.page_tokens
        least = math.ceil(w.context / bt) + 1                # one sequence of the full context always fits
        best = self.best[kvq]
        if not self.fixed:
            n = self.workload.requests      # no more sequences run at once than there are requests
            s = best.outcome.shape
            self.weigh(self.search.evaluate(replace(s, concurrency=min(s.concurrency, n),
                                                    max_seqs=min(s.max_seqs, n))), best.admission)
            best = self.best[kvq]
        self.weigh(self.search.evaluate(self.pool_for(best.outcome.shape)), best.admission)
        walks = [(lambda s, f: replace(s, num_pages=max(round(s.num_pages * f), least)), POOL_FACTORS),
                 (lambda s, f: replace(s, step_tokens=max(min(round(s.step_tokens * f), w.max_step_tokens),
                                                          s.max_seqs)), TOKEN_FACTORS)]
        for change, factors in walks:
            for factor in factors:
                while True:
                    best = self.best[kvq]
                    shape = change(best.outcome.shape, factor)
                    if shape == best.outcome.shape:
                        break
                    if self.weigh(self.search.evaluate(shape), best.admission) is not self.best[kvq]:
                        break

    def _pick(self, kv_quant: str) -> Run:
        if not self.best:
            why = "; ".join(f"{r.outcome.shape.concurrency} sequences: {r.sim.why if r.sim else r.outcome.why}"
                            for r in list(self.runs.values())[:4])
            raise MemintentError(f"no candidate plan can serve the workload ({self.workload.summary()}): {why}")
        plain, int8 = self.best.get(KVQuant.none), self.best.get(KVQuant.int8)
        if kv_quant == "auto" and plain is not None and int8 is not None:
            # int8 KV only where it shortens the run by more than KV_QUANT_GAIN (it loses a little accuracy)
            best = int8 if (int8.misses, int8.run_s * KV_QUANT_GAIN) < plain.key[:2] else plain
        else:
            best = min(self.best.values(), key=lambda r: r.key)
        if best.misses > 0:
            pr = best.sim.prediction
            raise MemintentError(
                f"no plan meets {self.targets.describe()} for {self.workload.summary()}: the closest, "
                f"{best.outcome.shape.concurrency} sequences at once, has p99 time to first token "
                f"{fmt_s(pr.ttft_p99_s)} and per output token {fmt_s(pr.tpot_p99_s)}: relax the targets, raise "
                "--budget or serve fewer requests at once")
        return best

    # -- the chosen plan --------------------------------------------------------------------------------------
    def record(self, plan: Program, best: Run) -> Program:
        """The chosen plan's own run (its exact step, pool and preemption costs) in ``generation.run``."""
        sim = self.simulate(plan, self.workload, self.times(plan, plan.kv_pool), admission=best.admission,
                            admission_class_tokens=self.class_tokens(best.admission))
        if sim.prediction is None:
            raise MemintentError(f"the chosen plan cannot serve the workload: {sim.why}")
        bound = self.bound_s(best.outcome, self.times(plan, plan.kv_pool))
        plan.generation = plan.generation.model_copy(update=dict(
            run=sim.prediction.model_copy(update=dict(bound_s=bound))))
        return plan

    def describe(self, chosen: Run) -> list[str]:
        """The runners-up, best first, each with why it lost."""
        others = sorted((r for r in self.runs.values() if r is not chosen and r.outcome.plan is not None),
                        key=lambda r: (r.sim is None or r.sim.prediction is None, r.key, r.bound_s))
        return [self._describe(r, chosen) for r in others][:12]

    def _describe(self, r: Run, chosen: Run) -> str:
        s = r.outcome.shape
        head = (f"{s.concurrency} sequences, {s.kv_quant.value} KV ({s.num_pages} pages), {s.step_tokens} tokens/step, "
                f"{describe_admission(r.admission, self.class_tokens(r.admission))}, {streamed_note(r.outcome.plan)}")
        best_s = chosen.run_s
        if r.sim is None:
            return (f"{head}: not simulated: at least {r.bound_s:.2f} s even at its cheapest step (chosen "
                    f"{best_s:.2f} s)")
        pr = r.sim.prediction
        if pr is None:
            return f"{head}: {r.sim.why}"
        why = (f"misses the targets (p99 TTFT {fmt_s(pr.ttft_p99_s)}, TPOT {fmt_s(pr.tpot_p99_s)})"
               if r.misses > 0 else f"{pr.run_s - best_s:.2f} s longer than the chosen {best_s:.2f} s"
               if pr.run_s >= best_s else f"within {KV_QUANT_GAIN - 1:.0%} of the chosen with int8 KV")
        return f"{head}: run {pr.run_s:.2f} s, {pr.tokens_per_s:.2f} tok/s, {pr.steps} steps: {why}"


class StepPredictor:
    """The plan's cost model applied to engine steps as they ran: the plan's residency, bit widths and stream slots,
    each step's own tokens and sequences, and the attention work its sequences did (a ``StepRecord``). Prediction
    errors per kind of step (decode-only, prompt-heavy; streamed or resident) come from comparing these with the
    measured steps (benchmarks/generate.py)."""

    def __init__(self, program: Program, progress: Callable[[str], None] | None = None):
        self.program = program
        self.src = resolve(program.model.ref, dtype=program.model.dtype)
        self.step = AffineStep(self.src, (64, 8), progress or (lambda m: None))
        pool = program.kv_pool
        self.token_bytes = pool.page_bytes // (pool.page_tokens * pool.layers)
        self.reads = mappable_reads(program)

    def predict_s(self, record) -> float:
        work = attention.attention_work(
            heads=self.src.n_heads, head_dim=self.src.head_dim, decode_context_tokens=record.decode_context_tokens,
            prefill_context_tokens=record.prefill_context_tokens, prefill_pairs=record.prefill_pairs,
            kv_token_bytes=self.token_bytes, kv_heads=self.src.n_kv_heads,
            kernel=self.program.hardware.attention == "kernel")
        times = self.step.stage_times(max(record.tokens, 1), max(record.sequences, 1), self.program.hardware, work,
                                      attention_kind(self.program.kv_pool))
        shell = self.program.model_copy(update={"stages": [st.model_copy(update={"time_s": t})
                                                           for st, t in zip(self.program.stages, times)]})
        _, sim = schedule_of(shell, reads_at(self.reads, (record.tokens, record.sequences)),
                             from_pages=getattr(record, "spare_blocks", 0))
        return sim.step_time_s


__all__ = ["plan_generation", "StepPredictor", "RunSearch", "step_spec", "trace_step", "Workload", "Shape", "kv_pool",
           "annotate_step", "fmt_bytes"]
