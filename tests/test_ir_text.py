"""The IR text format: round trip on random programs, a golden dump, error positions, and a large program."""

from __future__ import annotations

import enum
import re
import types
import typing
from pathlib import Path

import annotated_types
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from memintent.errors import IRParseError
from memintent.ir.model import Action, Arena, Block, GemmRates, HardwareProfile, ModelRef, Object, Prediction, Program, RunShape, Slot, Stage, Step, Visit
from memintent.ir.parser import parse
from memintent.ir.printer import dump

SPEC = Path(__file__).resolve().parents[1] / "spec" / "IR.md"


# ---- random programs -------------------------------------------------------------------------------------------
# Built from the model's own annotations, so that a field added to the model and forgotten by the printer or the
# parser fails the round trip instead of passing unnoticed.

_AWKWARD_NAMES = [
    "", "t17", "kv.layers.0.3", "model.layers.0.self_attn.q_proj.weight", "_", "a.", "0abc", "with space",
    'quo"te', "back\\slash", "new\nline", "tab\t", "colon:x", "slash/x", "br[0]", "%x", "@y", "-", "none", "inf",
    "nan", "stage", "end", "B", "s", "copy-start", "free", "next_forward", "é", "日本", "\u2028", "\x00", "\ud800",
]
names = st.one_of(
    st.sampled_from(_AWKWARD_NAMES),
    st.from_regex(r"[A-Za-z_][A-Za-z0-9_.]{0,12}", fullmatch=True),
    st.text(alphabet=st.characters(codec=None, categories=None), max_size=8),
)
# Small integers often, so that indices coincide (an action's stage with a stage's index) and the body's
# grouping is exercised; huge ones sometimes.
integers = st.one_of(st.integers(-2, 6), st.integers(-(2**70), 2**70))
# The model forbids NaN and infinity; +-0.0, subnormals and the largest finite floats remain.
floats = st.floats(allow_nan=False, allow_infinity=False)


def _strategy(annotation: typing.Any, metadata: list[typing.Any]) -> st.SearchStrategy:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:   # NonNeg, PosF, ...: constraints live in the FieldInfo metadata
        extra = [m for a in args[1:] for m in (getattr(a, "metadata", None) or [a])]
        return _strategy(args[0], [*metadata, *extra])
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(st.none() if a is type(None) else _strategy(a, metadata) for a in args))
    if origin is list:
        return st.lists(_strategy(args[0], []), max_size=5 if _is_subclass(args[0], BaseModel) else 3)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is tuple:
        return st.tuples(*(_strategy(a, []) for a in args))
    if _is_subclass(annotation, enum.Enum):
        return st.sampled_from(list(annotation))
    if _is_subclass(annotation, BaseModel):
        return models(annotation)
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        low = next((m.ge for m in metadata if isinstance(m, annotated_types.Ge)), None)
        return integers if low is None else st.one_of(st.integers(low, low + 6), st.integers(low, 2**70))
    if annotation is float:
        if any(isinstance(m, annotated_types.Gt) for m in metadata):
            return st.floats(min_value=0.0, exclude_min=True, allow_nan=False, allow_infinity=False)
        if any(isinstance(m, annotated_types.Ge) for m in metadata):
            return st.floats(min_value=0.0, allow_nan=False, allow_infinity=False)
        return floats
    if annotation is str:
        return names
    raise TypeError(f"no strategy for {annotation}")


def _is_subclass(cls: typing.Any, base: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, base)


def models(cls: type[BaseModel]) -> st.SearchStrategy:
    fields = {name: _strategy(info.annotation, info.metadata) for name, info in cls.model_fields.items()}
    return st.builds(cls, **fields)


@st.composite
def ordered_programs(draw: st.DrawFn) -> Program:
    """A program laid out like a real plan: steps in order, stages covering them, actions sorted by stage."""
    program = draw(models(Program))
    n_steps = len(program.steps)
    cuts = sorted(draw(st.lists(st.integers(0, n_steps), max_size=4)))
    bounds = [(a, b) for a, b in zip([0, *cuts], [*cuts, n_steps]) if b > a]   # stages are never empty
    steps = [s.model_copy(update={"index": i}) for i, s in enumerate(program.steps)]
    stages = [draw(models(Stage)).model_copy(update={"index": i, "first_step": a, "last_step": b - 1})
              for i, (a, b) in enumerate(bounds)]
    actions = sorted((a.model_copy(update={"stage": draw(st.integers(0, len(stages)))}) for a in program.actions),
                     key=lambda a: a.stage)
    return program.model_copy(update={"steps": steps, "stages": stages, "actions": actions})


def _assert_round_trip(program: Program) -> None:
    text = dump(program)
    again = parse(text)
    assert again == program
    assert dump(again) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(models(Program))
def test_round_trip_random_programs(program: Program) -> None:
    _assert_round_trip(program)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(ordered_programs())
def test_round_trip_ordered_programs(program: Program) -> None:
    text = dump(program)
    # In a well-ordered program every action sits in its stage's section or at the end, without stage=.
    assert "{stage=" not in text
    _assert_round_trip(program)


def test_nan_and_infinity_are_rejected() -> None:
    # A plan is data the runtime trusts: NaN (unequal to itself) and infinity are refused at parse time.
    text = dump(golden_program())
    bad = text.replace("time=2e-06 s", "time=nan s", 1)
    assert bad != text
    with pytest.raises(IRParseError, match="finite number"):
        parse(bad)


# ---- golden dump -----------------------------------------------------------------------------------------------

def golden_program() -> Program:
    """A two-layer toy model, planned: embed and head resident, layers streamed through one slot."""
    hidden = 64
    w = hidden * hidden * 2
    objects = [
        Object(name="embed.weight", kind="weight", dtype="bf16", shape=[256, hidden], size_bytes=256 * hidden * 2,
               home="host", block="embed", block_offset_bytes=0, first_use=0, last_use=0, urgency_step=0,
               urgency_s=0.0),
        Object(name="layers.0.wq.weight", kind="weight", dtype="bf16", shape=[hidden, hidden], size_bytes=w,
               home="host", block="layers.0", block_offset_bytes=0, first_use=1, last_use=1, urgency_step=1,
               urgency_s=2e-06),
        Object(name="layers.1.wq.weight", kind="weight", dtype="bf16", shape=[hidden, hidden], size_bytes=w,
               home="host", block="layers.1", block_offset_bytes=0, first_use=3, last_use=3, urgency_step=3,
               urgency_s=1.1e-05),
        Object(name="kv.layers.0.0", kind="kv", dtype="bf16", shape=[2, 1, 16, hidden], size_bytes=4096,
               home="hbm", block="layers.0", first_use=2, last_use=2, urgency_step=2, urgency_s=5e-06),
        Object(name="input_ids", kind="buffer", dtype="i64", shape=[1, 16], size_bytes=128, home="hbm",
               first_use=0, last_use=0, urgency_step=0, urgency_s=0.0),
        Object(name="t0", kind="buffer", dtype="bf16", shape=[1, 16, hidden], size_bytes=2048, home="hbm",
               first_use=0, last_use=1, urgency_step=0, urgency_s=0.0, recompute_cost_s=1.5e-06),
        Object(name="t1", kind="buffer", dtype="bf16", shape=[1, 16, hidden], size_bytes=2048, home="hbm",
               first_use=1, last_use=3),
        Object(name="cublas workspace", kind="workspace", dtype="u8", shape=[1024], size_bytes=1024, home="hbm"),
    ]
    blocks = [
        Block(name="embed", module="embed", size_bytes=32768, weights=["embed.weight"], residency="resident",
              transfer_bytes=32768, slot=0),
        Block(name="layers.0", module="layers.0", size_bytes=w, weights=["layers.0.wq.weight"],
              residency="streamed", quant="int8", transfer_bytes=w // 2),
        Block(name="layers.1", module="layers.1", size_bytes=w, weights=["layers.1.wq.weight"],
              residency="streamed", quant="int8", transfer_bytes=w // 2),
    ]
    steps = [
        Step(index=0, op="aten.embedding.default", module="embed", block="embed", hbm_bytes=2176, time_s=2e-06,
             uses=["embed.weight", "input_ids"], defs=["t0"]),
        Step(index=1, op="aten.linear.default", module="layers.0.wq", block="layers.0", flops=262144,
             hbm_bytes=12288, time_s=3e-06, uses=["t0", "layers.0.wq.weight"], defs=["t1"]),
        Step(index=2, op="aten.add.Tensor", module="", time_s=1e-06, uses=["t1"], defs=["t1"]),
        Step(index=3, op="aten.linear.default", module="layers.1.wq", block="layers.1", flops=262144,
             hbm_bytes=12288, time_s=3e-06, uses=["t1", "layers.1.wq.weight"], defs=["t1"]),
    ]
    stages = [
        Stage(index=0, module="embed", block="embed", first_step=0, last_step=0, needs=["embed"], time_s=2e-06),
        Stage(index=1, module="layers.0", block="layers.0", first_step=1, last_step=1, needs=["layers.0"],
              time_s=3e-06),
        Stage(index=2, module="", block="", first_step=2, last_step=2, time_s=1e-06),
        Stage(index=3, module="layers.1", block="layers.1", first_step=3, last_step=3, needs=["layers.1"],
              time_s=3e-06),
    ]
    actions = [
        Action(kind="copy_done", stage=1, block="layers.0", slot=1, visit_stage=1),
        Action(kind="copy_start", stage=1, block="layers.1", slot=1, visit_stage=3),
        Action(kind="free", stage=3, block="layers.0", slot=1, visit_stage=1),
        Action(kind="copy_done", stage=3, block="layers.1", slot=1, visit_stage=3),
        Action(kind="free", stage=4, block="layers.1", slot=1, visit_stage=3),
        Action(kind="copy_start", stage=4, block="layers.0", slot=1, visit_stage=1, next_forward=True),
    ]
    visits = [
        Visit(block="embed", first_stage=0, last_stage=0, slot=0),
        Visit(block="layers.0", first_stage=1, last_stage=1, slot=1, issue_stage=4, issue_next_forward=True,
              arrive_s=-1e-06, deadline_s=2e-06, slack_s=3e-06),
        Visit(block="layers.1", first_stage=3, last_stage=3, slot=1, issue_stage=1, arrive_s=7.5e-06,
              deadline_s=6e-06, slack_s=-1.5e-06),
    ]
    return Program(
        name="toy", model=ModelRef(ref="py:examples/toy.py:toy", kind="py", traced_layers=2),
        fingerprint="5f0c6a1e", shape=RunShape(batch=1, seq=16),
        budget_bytes=1 << 20,
        hardware=HardwareProfile(name="h100-pcie", source="datasheet", h2d_gbps=25.0, d2h_gbps=25.0,
                                 hbm_gbps=2000.0, bf16_tflops=756.0, hbm_bytes=80 * 10**9, dequant_gbps=800.0,
                                 gemm_shapes=[GemmRates(dtype="bf16", in_features=64, out_features=64,
                                                        tflops=[(1, 0.5), (16, 8.0)]),
                                              GemmRates(dtype="f16", in_features=64, out_features=256,
                                                        tflops=[(16, 9.5)])]),
        objects=objects, blocks=blocks, steps=steps, stages=stages, visits=visits,
        arena=Arena(size_bytes=45056, slots=[
            Slot(index=0, kind="resident", offset_bytes=0, size_bytes=32768, holds=["embed"]),
            Slot(index=1, kind="stream", offset_bytes=32768, size_bytes=8192, holds=["layers.0", "layers.1"]),
            Slot(index=2, kind="kv", offset_bytes=40960, size_bytes=4096, holds=["layers.0"]),
        ]),
        actions=actions,
        prediction=Prediction(
            step_time_s=1.25e-05, first_step_time_s=1.5e-05, compute_s=9e-06, stall_s=1.5e-06,
            streamed_bytes=8192, floor_s=9e-06, resident_bytes=32768, stream_slot_bytes=8192, kv_bytes=4096,
            activation_peak_bytes=4224, workspace_bytes=1024, arena_bytes=45056, peak_hbm_bytes=50304,
            peak_step=1, prefetch_depth=1, binding="pcie", notes=["layers.1 arrives 1.5 us late"]),
        passes=["blocks", "lifetimes", "residency", "schedule"],
    )


GOLDEN = r'''
// Memory Intent IR (spec/IR.md)
program @toy {
  schema 2
  model py "py:examples/toy.py:toy" dtype=bf16 traced_layers=2 attention=sdpa
  fingerprint "5f0c6a1e"
  shape batch=1 seq=16 inputs=[]
  budget 1048576 B
  passes ["blocks", "lifetimes", "residency", "schedule"]
  hardware {
    name = "h100-pcie"
    source = "datasheet"
    h2d_gbps = 25.0
    d2h_gbps = 25.0
    hbm_gbps = 2000.0
    bf16_tflops = 756.0
    hbm_bytes = 80000000000
    launch_overhead_s = 5e-06
    copy_latency_s = 1e-05
    dequant_gbps = 800.0
    dequant_int4_gbps = 0.0
    workspace_bytes = 33554432
    gemm_tflops = []
    gemm_shapes = [
      {
        dtype = "bf16"
        in_features = 64
        out_features = 64
        tflops = [[1.0, 0.5], [16.0, 8.0]]
      },
      {
        dtype = "f16"
        in_features = 64
        out_features = 256
        tflops = [[16.0, 9.5]]
      }
    ]
    attention = "kernel"
    attention_tflops = 0.0
    attention_gbps = 0.0
    attention_int8_gbps = 0.0
    attention_one_row_gbps = 0.0
    attention_one_row_int8_gbps = 0.0
    mapped_gbps = 0.0
  }
  blocks {
    @embed module="embed" size=32768 B residency=resident quant=none transfer=32768 B slot=0 weights=[%embed.weight]
    @layers.0 module="layers.0" size=8192 B residency=streamed quant=int8 transfer=4096 B slot=none weights=[%layers.0.wq.weight]
    @layers.1 module="layers.1" size=8192 B residency=streamed quant=int8 transfer=4096 B slot=none weights=[%layers.1.wq.weight]
  }
  objects {
    %embed.weight : weight<bf16 [256, 64], 32768 B> home=host block=@embed+0 live=[0, 0] urgent=(step 0, 0.0 s) evict=0.0 s recompute=none
    %layers.0.wq.weight : weight<bf16 [64, 64], 8192 B> home=host block=@layers.0+0 live=[1, 1] urgent=(step 1, 2e-06 s) evict=0.0 s recompute=none
    %layers.1.wq.weight : weight<bf16 [64, 64], 8192 B> home=host block=@layers.1+0 live=[3, 3] urgent=(step 3, 1.1e-05 s) evict=0.0 s recompute=none
    %kv.layers.0.0 : kv<bf16 [2, 1, 16, 64], 4096 B> home=hbm block=@layers.0 live=[2, 2] urgent=(step 2, 5e-06 s) evict=0.0 s recompute=none
    %input_ids : buffer<i64 [1, 16], 128 B> home=hbm block=none live=[0, 0] urgent=(step 0, 0.0 s) evict=0.0 s recompute=none
    %t0 : buffer<bf16 [1, 16, 64], 2048 B> home=hbm block=none live=[0, 1] urgent=(step 0, 0.0 s) evict=0.0 s recompute=1.5e-06 s
    %t1 : buffer<bf16 [1, 16, 64], 2048 B> home=hbm block=none live=[1, 3] urgent=none evict=0.0 s recompute=none
    %"cublas workspace" : workspace<u8 [1024], 1024 B> home=hbm block=none live=none urgent=none evict=0.0 s recompute=none
  }
  arena size=45056 B align=256 B {
    slot 0 resident offset=0 B size=32768 B holds=[@embed]
    slot 1 stream offset=32768 B size=8192 B holds=[@layers.0, @layers.1]
    slot 2 kv offset=40960 B size=4096 B holds=[@layers.0]
  }
  body {
    stage 0 @embed module="embed" steps=[0, 0] needs=[@embed] time=2e-06 s:
      0: %t0 = aten.embedding.default(%embed.weight, %input_ids) module="embed" block=@embed flops=0 bytes=2176 time=2e-06 s
    stage 1 @layers.0 module="layers.0" steps=[1, 1] needs=[@layers.0] time=3e-06 s:
      copy-done @layers.0 -> slot 1 {visit=1}
      copy-start @layers.1 -> slot 1 {visit=3}
      1: %t1 = aten.linear.default(%t0, %layers.0.wq.weight) module="layers.0.wq" block=@layers.0 flops=262144 bytes=12288 time=3e-06 s
    stage 2 @"" module="" steps=[2, 2] needs=[] time=1e-06 s:
      2: %t1 = aten.add.Tensor(%t1) module="" block=@"" flops=0 bytes=0 time=1e-06 s
    stage 3 @layers.1 module="layers.1" steps=[3, 3] needs=[@layers.1] time=3e-06 s:
      free @layers.0 slot 1 {visit=1}
      copy-done @layers.1 -> slot 1 {visit=3}
      3: %t1 = aten.linear.default(%t1, %layers.1.wq.weight) module="layers.1.wq" block=@layers.1 flops=262144 bytes=12288 time=3e-06 s
    end:
      free @layers.1 slot 1 {visit=3}
      copy-start @layers.0 -> slot 1 {visit=1, next_forward}
  }
  visits {
    @embed stages=[0, 0] slot=0 issue=none arrive=none deadline=none slack=none
    @layers.0 stages=[1, 1] slot=1 issue=4 next_forward arrive=-1e-06 s deadline=2e-06 s slack=3e-06 s
    @layers.1 stages=[3, 3] slot=1 issue=1 arrive=7.5e-06 s deadline=6e-06 s slack=-1.5e-06 s
  }
  prediction {
    step_time_s = 1.25e-05
    first_step_time_s = 1.5e-05
    compute_s = 9e-06
    stall_s = 1.5e-06
    streamed_bytes = 8192
    mapped_bytes = 0
    stored_bytes = 0
    floor_s = 9e-06
    resident_bytes = 32768
    stream_slot_bytes = 8192
    kv_bytes = 4096
    activation_peak_bytes = 4224
    workspace_bytes = 1024
    arena_bytes = 45056
    peak_hbm_bytes = 50304
    peak_step = 1
    host_pinned_bytes = 0
    host_pageable_bytes = 0
    prefetch_depth = 1
    binding = "pcie"
    notes = ["layers.1 arrives 1.5 us late"]
  }
  generation none
  kv_pool none
}
'''.lstrip("\n")


def test_golden_dump() -> None:
    assert dump(golden_program()) == GOLDEN
    assert parse(GOLDEN) == golden_program()


def test_spec_example_is_the_golden_dump() -> None:
    # spec/IR.md opens with a complete example: keep it what the printer prints.
    example = re.search(r"```\n(// Memory Intent IR.*?)```", SPEC.read_text(encoding="utf-8"), re.S)
    assert example is not None
    assert example.group(1) == GOLDEN


def test_empty_program() -> None:
    program = Program(name="empty", model=ModelRef(ref="x", kind="preset"), fingerprint="",
                      shape=RunShape(batch=1, seq=1))
    _assert_round_trip(program)
    assert "body {\n  }" in dump(program)


def test_quoted_names() -> None:
    program = golden_program()
    program.objects[0].name = "model.layers.0/attn:q[0]"
    program.blocks[0].name = 'say "hi"'
    text = dump(program)
    assert '%"model.layers.0/attn:q[0]"' in text
    assert r'@"say \"hi\""' in text
    _assert_round_trip(program)


# ---- errors ----------------------------------------------------------------------------------------------------

def _error(text: str) -> IRParseError:
    with pytest.raises(IRParseError) as info:
        parse(text, "toy.ir")
    error = info.value
    assert "\n" not in str(error)
    assert str(error).startswith(f"toy.ir:{error.line}:{error.column}: ")
    return error


def _position(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column of the first occurrence of ``needle``."""
    offset = text.index(needle)
    return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1


def test_truncated_text() -> None:
    cut = GOLDEN.index(" home=host block=@layers.0+0")
    error = _error(GOLDEN[:cut])
    # Reported just past the last complete token, where the text stopped short.
    assert (error.line, error.column) == _position(GOLDEN, " home=host block=@layers.0+0")
    assert "unexpected end of text" in str(error) and '"home"' in str(error)


def test_truncated_after_program() -> None:
    error = _error(GOLDEN.rstrip()[:-1])
    assert "unexpected end of text" in str(error) and '"}"' in str(error)


def test_misspelled_keyword() -> None:
    text = GOLDEN.replace("  objects {", "  objetcs {")
    error = _error(text)
    assert (error.line, error.column) == _position(text, "objetcs")
    assert 'unexpected "objetcs"' in str(error) and 'expected "objects"' in str(error)


def test_bad_number() -> None:
    text = GOLDEN.replace("flops=262144", "flops=26x144", 1)
    error = _error(text)
    assert (error.line, error.column) == _position(text, "x144")


def test_float_where_integer_expected() -> None:
    text = GOLDEN.replace("flops=262144", "flops=2.5", 1)
    error = _error(text)
    assert (error.line, error.column) == _position(text, "2.5")
    assert "expected an integer, got 2.5" in str(error)


def test_unknown_enum_value() -> None:
    text = GOLDEN.replace("home=hbm", "home=hmb", 1)
    error = _error(text)
    assert (error.line, error.column) == _position(text, "hmb")
    assert "unknown tier hmb: expected one of host, hbm, disk" in str(error)


def test_negative_object_size() -> None:
    text = GOLDEN.replace("128 B>", "-128 B>", 1)
    error = _error(text)
    assert (error.line, error.column) == _position(text, "-128")
    assert "size_bytes" in str(error)


def test_unknown_and_missing_fields() -> None:
    error = _error(GOLDEN.replace("    h2d_gbps = 25.0", "    h2d_gbsp = 25.0"))
    assert "unknown field h2d_gbsp in hardware" in str(error)
    text = GOLDEN.replace("    bf16_tflops = 756.0\n", "")
    error = _error(text)
    assert (error.line, error.column) == _position(text, "hardware {")
    assert "bf16_tflops" in str(error)


def test_unterminated_string() -> None:
    text = GOLDEN.replace('fingerprint "5f0c6a1e"', 'fingerprint "5f0c6a1e')
    error = _error(text)
    assert error.line == _position(text, "fingerprint")[0]


def test_bad_escape() -> None:
    text = GOLDEN.replace('fingerprint "5f0c6a1e"', r'fingerprint "5f0c\q"')
    error = _error(text)
    assert (error.line, error.column) == _position(text, r'"5f0c\q"')


def test_empty_text() -> None:
    error = _error("")
    assert (error.line, error.column) == (1, 1)


# ---- size ------------------------------------------------------------------------------------------------------

def large_program(n_steps: int = 3000, n_objects: int = 8000, n_layers: int = 80) -> Program:
    """A plan-sized program: n_layers streamed blocks of 9 weights, buffers for the rest of the objects."""
    weights = [f"model.layers.{i}.{part}.weight" for i in range(n_layers)
               for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm",
                            "post_attention_layernorm")]
    objects = [Object(name=n, kind="weight", dtype="bf16", shape=[8192, 8192], size_bytes=134217728, home="host",
                      block=f"layers.{k // 9}", block_offset_bytes=(k % 9) * 134217728, first_use=k, last_use=k,
                      urgency_step=k, urgency_s=k * 1.37e-05, recompute_cost_s=None)
               for k, n in enumerate(weights)]
    objects += [Object(name=f"t{k}", kind="buffer", dtype="bf16", shape=[4, 512, 8192], size_bytes=33554432,
                       home="hbm", first_use=k % n_steps, last_use=k % n_steps + 3, urgency_step=k % n_steps,
                       urgency_s=k * 1.1e-06, recompute_cost_s=2.5e-05)
                for k in range(n_objects - len(objects))]
    per_stage = n_steps // n_layers
    steps = [Step(index=i, op="aten.linear.default", module=f"model.layers.{i // per_stage}.mlp",
                  block=f"layers.{i // per_stage}", flops=2 * 4 * 512 * 8192 * 8192, hbm_bytes=167772160,
                  time_s=1.234e-04, uses=[f"t{i}", weights[i % len(weights)]], defs=[f"t{i + 1}"])
             for i in range(n_steps)]
    stages = [Stage(index=s, module=f"model.layers.{s}", block=f"layers.{s}", first_step=s * per_stage,
                    last_step=min(n_steps, (s + 1) * per_stage) - 1, needs=[f"layers.{s}"], time_s=4.6e-03)
              for s in range(n_layers)]
    actions = [Action(kind=kind, stage=s, block=f"layers.{s}", slot=s % 2, visit_stage=s)
               for s in range(n_layers) for kind in ("copy_done", "free")]
    blocks = [Block(name=f"layers.{i}", module=f"model.layers.{i}", size_bytes=9 * 134217728,
                    weights=weights[9 * i: 9 * i + 9], residency="streamed")
              for i in range(n_layers)]
    return Program(name="large", model=ModelRef(ref="llama-3-70b", kind="preset"), fingerprint="0" * 64,
                   shape=RunShape(batch=4, seq=512), objects=objects, blocks=blocks, steps=steps, stages=stages,
                   actions=actions)


def test_large_program() -> None:
    program = large_program()
    assert len(program.steps) == 3000 and len(program.objects) == 8000
    assert parse(dump(program)) == program
