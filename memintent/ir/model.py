"""The Memory Intent IR: the data model shared by the compiler, the passes, the plan file and the runtime.

Glossary
--------
step
    One operation of the traced forward pass (an aten op from torch.export), in execution order. Steps are the
    unit of time of the IR: lifetimes, urgencies and peaks are stated in step indices.
stage
    A maximal run of consecutive steps that execute inside one block's module (or, for ``module == ""``, in
    glue code of the root module). Stages are the unit at which the runtime acts: a plan's actions fire on
    entry to a stage (a forward pre-hook on the stage's module), so actions may only sit on stages with a module.
object
    A piece of memory: a ``weight`` (parameter or buffer of the model), the ``kv`` pool (the paged KV cache of a
    generation plan: ``Program.kv_pool`` describes its blocks; its ``evict_cost_s`` and ``recompute_cost_s`` are
    per block), a ``buffer`` (the output of a step) or ``workspace`` (scratch that a kernel needs, such as the
    BLAS workspace).
block
    The unit that moves together between host and HBM: the weights of one decoder layer, or of the embedding,
    a norm, the head. Each weight belongs to exactly one block, stored as one flat buffer at
    ``Object.block_offset_bytes``.
visit
    One stretch of stages during which a block must be resident. A block used by two separate stages (a tied
    embedding and head) has two visits; a streamed block is copied in once per visit.
tier
    Where memory lives: ``host`` (pinned host memory), ``hbm`` (device memory), ``disk`` (reserved).
residency
    ``resident``: the block is placed once in its own arena slot and never moves. ``streamed``: the block's home
    is host memory and each visit copies it into a stream slot.
kv pool
    The KV cache of a generation plan: ``num_pages`` fixed-size blocks of ``page_tokens`` tokens, each holding
    keys and values of every layer (spec/serving.md). A sequence owns a page table; blocks are taken as it grows
    and returned when it finishes or is preempted (swapped to host memory, or dropped for recomputation).
step
    (of the serving engine) one forward over the model: the decode tokens of the running sequences plus chunks of
    waiting prompts, at most ``GenerationPlan.step_tokens`` tokens of at most ``max_seqs`` sequences. A generation
    plan's traced program is one such step at those maxima: the shape it proves.
arena
    The single device allocation a plan asks for, cut into slots at fixed offsets: resident blocks, stream
    slots that streamed blocks take turns in, and the KV pool. Activations are not in the arena; their peak is
    predicted from buffer lifetimes and added on top.
urgency
    The step (and the predicted time from the start of the forward) by which an object must be resident: its
    first use.
action
    What the runtime does on entry to a stage: ``copy_start`` (issue a block's copy into a slot on the copy
    stream, after the slot's previous reader is done), ``copy_done`` (compute waits until that copy arrived) and
    ``free`` (the slot's last reader is done; the slot may be overwritten).

Units: sizes in bytes (``_bytes``), times in seconds (``_s``), rates in gigabytes (1e9 bytes) per second
(``_gbps``) and in 1e12 floating-point operations per second (``_tflops``).
"""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from memintent.ir.dtypes import DTYPE_BITS, dtype_bytes  # noqa: F401 -- the IR's dtype table, named here too

# The serving engine's attention, one op of a traced engine step (``kv.attention``): the passes cost it by the
# attention kernel's own rates.
PAGED_ATTENTION_OP = "memintent.paged_attention"

SCHEMA_VERSION = 2      # 2: KV pages (were blocks), pipeline parts (were stages)

# Every weight in a block's flat buffer, every part of a packed block, every host block buffer and every arena
# slot starts on this boundary (vectorised copies, and a dtype-aligned view of any weight at any offset).
ALIGN_BYTES = 256

# Sizes, counts, indices and durations are never negative; rates are positive.
NonNeg = Annotated[int, Field(ge=0)]
Pos = Annotated[int, Field(ge=1)]
NonNegF = Annotated[float, Field(ge=0.0)]
PosF = Annotated[float, Field(gt=0.0)]


def align_up(n_bytes: int, alignment_bytes: int = ALIGN_BYTES) -> int:
    """``n_bytes`` rounded up to a multiple of ``alignment_bytes``."""
    return -(-n_bytes // alignment_bytes) * alignment_bytes


class _Model(BaseModel):
    # Forbid unknown fields so that a typo in a plan file is an error, not a silently ignored key.
    # No NaN or infinity in any float: a plan is data a runtime trusts, and NaN compares unequal to itself.
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)


class ObjectKind(str, enum.Enum):
    weight = "weight"
    kv = "kv"
    buffer = "buffer"
    workspace = "workspace"


class Tier(str, enum.Enum):
    host = "host"
    hbm = "hbm"
    disk = "disk"


class Residency(str, enum.Enum):
    resident = "resident"
    streamed = "streamed"
    # never copied: its module reads the weights in place from pinned host memory, mapped into the device's address
    # space (an embedding the step's rows, an int8 head all of it once per forward: ``passes.costs.mapped_op``)
    mapped = "mapped"


class Quant(str, enum.Enum):
    none = "none"   # transferred in the model's own dtype
    int8 = "int8"   # int8 values, one scale per output channel
    int4 = "int4"   # int4 values in groups of 128 along the input dimension, one bf16 scale per group
    int4g = "int4g"   # asymmetric int4 in groups of 32: a bf16 scale and a bf16 minimum per group


class KVQuant(str, enum.Enum):
    none = "none"   # keys and values in the model's dtype
    int8 = "int8"   # int8 values, one float32 scale per token and KV head (spec/serving.md)


class ActionKind(str, enum.Enum):
    copy_start = "copy_start"
    copy_done = "copy_done"
    free = "free"


class SlotKind(str, enum.Enum):
    resident = "resident"
    stream = "stream"
    kv = "kv"
    unpack = "unpack"   # where quantized visits unpack (one at a time): their stream slots hold the packed bytes
    store = "store"     # a streamed block's packed bytes kept in HBM: its visits copy from here, not from the host


class ModelRef(_Model):
    ref: str                      # as the user wrote it: "llama-3-70b", "hf:/path", "py:pkg.mod:factory"
    kind: Literal["preset", "hf", "py"]
    dtype: str = "bf16"           # dtype of the weights as traced
    traced_layers: int | None = None  # decoder layers actually traced when repeated layers were folded
    attention: str = "sdpa"       # the attention implementation the traced model runs ("memintent": the engine's)
    part: list[NonNeg] = Field(default_factory=list)    # a pipeline part: its decoder layers [first, last); [] all


class RunShape(_Model):
    batch: Pos                    # sequences per forward
    seq: Pos                      # tokens per sequence in the traced forward (an engine step: its tokens)
    inputs: list[list[NonNeg]] = Field(default_factory=list)   # shapes of the traced forward's tensor inputs


class GemmRates(_Model):
    """A matmul's rate by token count for one weight dtype and shape (``memintent profile``)."""

    dtype: str                    # the weight's dtype, as objects name it ("bf16", "f16")
    in_features: Pos
    out_features: Pos
    tflops: list[tuple[PosF, PosF]]   # [[tokens, TFLOP/s], ...] ascending


class HardwareProfile(_Model):
    name: str
    source: str                   # where the figures come from: "measured on ... (date)" or "datasheet"
    h2d_gbps: PosF               # pinned host -> device copy bandwidth
    d2h_gbps: PosF               # pinned device -> host copy bandwidth
    hbm_gbps: PosF               # device memory bandwidth (bytes read + written)
    bf16_tflops: PosF            # dense bf16 matmul rate
    hbm_bytes: Pos                # device memory capacity
    launch_overhead_s: NonNegF = 5e-6   # host time to launch one kernel (a stage is host-bound past its sum)
    copy_latency_s: NonNegF = 1e-5      # fixed cost per issued copy (descriptor setup, event)
    dequant_gbps: NonNegF = 0.0         # device rate of int8 -> bf16 unpacking, in output bytes; 0: unknown
    dequant_int4_gbps: NonNegF = 0.0    # the same for int4/int4g (another kernel); 0: dequant_gbps
    workspace_bytes: NonNeg = 32 << 20   # scratch reserved for kernels (cuBLAS workspace and the like)
    # Matmul rate by the tokens a step multiplies (its rows): [[tokens, TFLOP/s], ...] ascending, measured on shapes of
    # the large models (``memintent profile``); a few tokens run far below ``bf16_tflops``. Empty: bf16_tflops.
    gemm_tflops: list[tuple[PosF, PosF]] = Field(default_factory=list)
    # The same by weight dtype and shape, measured sustained (back to back on a warm card, as a prompt step runs
    # them): a matmul takes its dtype's entry nearest its shape (``passes.costs.gemm_table``). Empty: gemm_tflops.
    gemm_shapes: list[GemmRates] = Field(default_factory=list)
    # How the engine attends on this device: "kernel" (the Triton paged kernel, CUDA) or "reference" (gather + SDPA:
    # the CPU backend); the cost model counts the bytes each moves.
    attention: Literal["kernel", "reference"] = "kernel"
    attention_tflops: NonNegF = 0.0     # the paged-attention kernel's rate on prompt chunks; 0: bf16_tflops
    attention_gbps: NonNegF = 0.0       # its rate reading keys and values of decode tokens; 0: hbm_gbps
    # The same by the decode's kind (the kernel takes a different path for each): keys and values of int8 pages
    # (bytes as stored, scales included), and one query head per KV head (a one-row tile). 0: attention_gbps.
    attention_int8_gbps: NonNegF = 0.0
    attention_one_row_gbps: NonNegF = 0.0
    attention_one_row_int8_gbps: NonNegF = 0.0
    # Kernels reading pinned host memory in place (mapped blocks): their rate over the host link. 0: h2d_gbps.
    mapped_gbps: NonNegF = 0.0


class Object(_Model):
    name: str
    kind: ObjectKind
    dtype: str
    shape: list[NonNeg]
    size_bytes: NonNeg
    home: Tier
    block: str | None = None              # weights: the block that moves it; kv: the layer block it serves
    block_offset_bytes: NonNeg | None = None  # weights: offset inside the block's flat buffer
    first_use: NonNeg | None = None           # step index of the first use or definition
    last_use: NonNeg | None = None            # step index of the last use
    urgency_step: NonNeg | None = None        # step by which it must be resident (its first use)
    urgency_s: float | None = None         # predicted time from forward start of that step
    evict_cost_s: NonNegF = 0.0              # seconds to write it back before eviction (0: clean)
    recompute_cost_s: NonNegF | None = None  # seconds to recompute instead of keeping it; None: cannot (weights)


class Step(_Model):
    index: NonNeg
    op: str                       # "aten.linear.default"
    module: str                   # fully qualified name of the innermost owning module ("" for the root)
    block: str = ""               # the block whose module owns the step ("" for glue in the root)
    flops: NonNeg = 0
    hbm_bytes: NonNeg = 0            # bytes the step reads and writes in device memory
    time_s: NonNegF = 0.0         # predicted compute time
    uses: list[str] = Field(default_factory=list)   # objects read
    defs: list[str] = Field(default_factory=list)   # objects written (its outputs)


class Block(_Model):
    name: str
    module: str                   # fully qualified module name whose forward owns the block
    size_bytes: NonNeg            # bytes of its flat buffer in the model dtype (with alignment padding)
    weights: list[str]            # object names, in flat-buffer order
    residency: Residency | None = None
    quant: Quant = Quant.none
    transfer_bytes: NonNeg | None = None   # bytes a visit copies (after quantization); None until costed
    slot: NonNeg | None = None    # arena slot of a resident block, or the store slot of a block in the HBM store

    @property
    def in_hbm_store(self) -> bool:
        """A streamed block whose packed bytes stay in HBM (a store slot): each visit still copies them into a
        stream slot and unpacks them there, but from HBM, not over PCIe. Only a quantized block is stored: an
        unquantized one would take as many HBM bytes as keeping it resident, and still be copied."""
        return self.residency == Residency.streamed and self.slot is not None


class Stage(_Model):
    index: NonNeg
    module: str                   # module whose pre-hook fires on entry ("" for root glue: no hook)
    block: str                    # block owning the module ("" for root glue)
    first_step: NonNeg
    last_step: NonNeg
    needs: list[str] = Field(default_factory=list)   # blocks whose weights the stage's steps read
    time_s: NonNegF = 0.0         # predicted compute time of its steps


class Slot(_Model):
    index: NonNeg
    kind: SlotKind
    offset_bytes: NonNeg
    size_bytes: NonNeg
    holds: list[str] = Field(default_factory=list)   # blocks that occupy it (in visit order for stream slots)


class Arena(_Model):
    size_bytes: NonNeg
    alignment_bytes: Pos = ALIGN_BYTES
    slots: list[Slot] = Field(default_factory=list)


class Action(_Model):
    kind: ActionKind
    stage: NonNeg                 # fires on entry to this stage; == len(stages): at the end of the forward
    block: str
    slot: NonNeg
    visit_stage: NonNeg              # first stage of the visit this action serves
    next_forward: bool = False    # a copy_start issued in this forward for the next forward's visit


class Visit(_Model):
    block: str
    first_stage: NonNeg
    last_stage: NonNeg
    slot: NonNeg | None = None
    issue_stage: NonNeg | None = None     # stage on whose entry the copy starts (may be in the previous forward)
    issue_next_forward: bool = False   # the copy is issued during the previous forward's tail
    arrive_s: float | None = None      # predicted arrival, from forward start (negative: before it)
    deadline_s: float | None = None    # predicted start of first_stage
    slack_s: float | None = None       # deadline - arrival (negative: a stall)


class Prediction(_Model):
    step_time_s: float            # one forward, steady state (prefetch for it issued in the previous one)
    first_step_time_s: float      # the very first forward (no previous forward to prefetch from)
    compute_s: float
    stall_s: float                # compute waiting on copies, steady state
    streamed_bytes: int           # bytes copied host -> device per forward
    mapped_bytes: int = 0         # bytes mapped blocks' kernels read over the host link per forward (no copy)
    stored_bytes: int = 0         # the HBM store's slots: packed blocks whose visits copy from HBM
    floor_s: float                # max(streamed bytes / h2d bandwidth + mapped bytes / their rate, compute)
    resident_bytes: int
    stream_slot_bytes: int
    kv_bytes: int
    activation_peak_bytes: int
    workspace_bytes: int
    arena_bytes: int
    peak_hbm_bytes: int           # arena + activation peak + workspace
    peak_step: int                # step at which the activation peak occurs
    host_pinned_bytes: int = 0    # page-locked host memory a run needs: streamed blocks' buffers + KV swap space
    host_pageable_bytes: int = 0  # ordinary host memory a run needs: resident blocks' buffers + fill scratch
    prefetch_depth: int           # number of stream slots
    binding: str = ""             # which constraint binds: "pcie", "compute", "none"
    notes: list[str] = Field(default_factory=list)

    @property
    def link_bytes(self) -> int:
        """Bytes a forward moves over the host link: its copies from the host and its mapped reads."""
        return self.streamed_bytes + self.mapped_bytes


class KVPool(_Model):
    """The paged KV cache of a generation plan (spec/serving.md): the arena's KV slot holds ``num_pages`` blocks
    of ``page_bytes``; block 0 is the null page that pads page tables."""

    layers: Pos
    kv_heads: Pos
    head_dim: Pos
    page_tokens: Pos             # tokens per block
    num_pages: Pos               # blocks in the pool, the null page included
    quant: KVQuant = KVQuant.none
    page_bytes: Pos              # one block: keys and values of every layer (+ int8 scales)
    query_heads: NonNeg = 0      # the query heads that attend through the pool (a multiple of kv_heads; 0: unknown)
    swap_pages: NonNeg = 0       # blocks of pinned host memory that swapped-out sequences wait in


ADMISSION_ORDERS = ("fcfs", "longest-output", "output-density")   # the scheduler's admission orders (engine/scheduler.py)


def describe_admission(admission: str, class_tokens: int) -> str:
    """An admission order in words, longest-output with its class of output lengths."""
    return f"{admission} (classes of {class_tokens} tokens)" if class_tokens > 1 else admission


class RunPrediction(_Model):
    """The run the planner simulated for the requests it was given (``compile --workload``, ``--synthetic``,
    ``--arrival-rate``): the engine's own scheduler over those requests, each step costed by the plan's cost model
    (``engine/simulate.py``). Times are from the run's start (the first request's arrival)."""

    workload: str                 # what was simulated, in words: the requests' source, lengths and arrivals
    requests: Pos
    prompt_tokens: NonNeg         # over all requests
    generated_tokens: NonNeg
    arrival_rate: NonNegF         # requests per second (Poisson, seeded); 0: every request at the start
    run_s: NonNegF                # until the last request's last token
    tokens_per_s: NonNegF         # generated tokens / run_s
    steps: NonNeg
    preemptions: NonNeg
    ttft_median_s: NonNegF        # time to first token, from each request's arrival
    ttft_p99_s: NonNegF
    tpot_median_s: NonNegF        # time per output token after the first
    tpot_p99_s: NonNegF
    concurrency: list[NonNeg] = Field(default_factory=list)   # sequences in the step running at evenly spaced times
    series_interval_s: NonNegF = 0.0                          # the time between two points of ``concurrency``
    # No run of these requests under the plan is shorter: its fewest steps (tokens per step, sequences per step,
    # the longest request, the pool's work while it fills) at its cheapest step's time, less what the pool's spare
    # pages can take off them. 0: not computed.
    bound_s: NonNegF = 0.0


class GenerationPlan(_Model):
    """What the generation planner chose (``compile --objective``) and why. The program is one engine step at its
    maxima (``step_tokens`` tokens of ``max_seqs`` sequences): the shape the plan proves."""

    objective: str                # "throughput" | "latency"
    step_tokens: Pos              # tokens per engine step (decode tokens + prompt chunks): proven maximum
    max_seqs: Pos                 # sequences per engine step: proven maximum
    context: Pos                  # tokens one sequence may reach (prompt + generated): proven maximum
    prompt_len: Pos               # mean prompt tokens of the workload the prediction assumes
    gen_len: Pos                  # mean generated tokens per request of that workload
    concurrency: Pos              # sequences the planner expects to run at once (it sized the pool for them)
    quant_policy: str             # weights: "none" | "int8" | "int4" | "auto"
    kv_quant_policy: str = "none"   # KV: "none" | "int8" | "auto"
    decode_step_s: NonNegF        # predicted engine step at that concurrency, steady state
    tokens_per_s: NonNegF         # predicted generated tokens per second in steady state
    binding: str                  # what binds: "pcie", "compute", "kv capacity", "budget"
    alternatives: list[str] = Field(default_factory=list)   # rejected candidates, each with its reason
    admission: str = "fcfs"       # the scheduler's admission order, one of ADMISSION_ORDERS (spec/serving.md)
    # longest-output ranks requests by max_new_tokens // this (1: exactly; first come first within a class); 1 under
    # fcfs
    admission_class_tokens: Pos = 1
    run: RunPrediction | None = None   # the simulated run of the requests planned for; None: planned for steady state
    # "on": streamed blocks may be held in the KV pool's spare pages while no request waits (spec/runtime.md, "Spare
    # pages"): their visits then copy within HBM, not over the host link
    spare_pages: Literal["off", "on"] = "off"


class Program(_Model):
    """A traced model and, once the passes ran, its plan. The plan file is this object as JSON."""

    schema_version: int = SCHEMA_VERSION
    name: str
    model: ModelRef
    fingerprint: str              # sha256 of the weights' names, shapes and dtypes
    shape: RunShape
    budget_bytes: Pos | None = None
    hardware: HardwareProfile | None = None
    objects: list[Object] = Field(default_factory=list)
    blocks: list[Block] = Field(default_factory=list)
    steps: list[Step] = Field(default_factory=list)
    stages: list[Stage] = Field(default_factory=list)
    visits: list[Visit] = Field(default_factory=list)
    arena: Arena | None = None
    actions: list[Action] = Field(default_factory=list)
    prediction: Prediction | None = None
    generation: GenerationPlan | None = None
    kv_pool: KVPool | None = None
    passes: list[str] = Field(default_factory=list)   # names of the passes that ran, in order

    # Lookups are rebuilt on demand rather than stored, so the serialised form has one source of truth.
    def object_map(self) -> dict[str, Object]:
        return {o.name: o for o in self.objects}

    def block_map(self) -> dict[str, Block]:
        return {b.name: b for b in self.blocks}

    def unpack_slot(self) -> int | None:
        """The arena slot quantized visits unpack into, or None: each unpacks at the start of its stream slot."""
        if self.arena is None:
            return None
        return next((s.index for s in self.arena.slots if s.kind == SlotKind.unpack), None)


class Pipeline(_Model):
    """One model over several GPUs (``compile --gpus N``): each part is a plan of its own over a contiguous range of
    decoder layers (the first with the embedding, the last with the head), under its own budget, with its share of
    every KV page (its layers'). All parts serve the same steps (one ``GenerationPlan``: a step is one of
    ``len(parts)`` micro-batches, the pool holds them all); a step's activations pass from part to part."""

    schema_version: int = SCHEMA_VERSION
    kind: Literal["pipeline"] = "pipeline"   # tells a pipeline file from a plan file
    name: str
    model: ModelRef               # the whole model
    layers: list[list[NonNeg]]    # each part's decoder layers [first, last)
    parts: list[Program]          # each part's plan, in pipeline order
    send_bytes: list[NonNeg] = Field(default_factory=list)   # per cut: activation bytes a step sends downstream
    pipelined_step_s: NonNegF = 0.0   # a tick, every part busy with its own micro-batch: the slowest part's step
    serial_step_s: NonNegF = 0.0      # one micro-batch through every part: the parts' steps summed
    tokens_per_s: NonNegF = 0.0       # predicted: a micro-batch (concurrency / stages sequences) per tick
