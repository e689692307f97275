"""The text form of the Memory Intent IR: ``dump(program)`` prints a ``Program`` as readable, line-oriented text in
the manner of MLIR and XLA HLO; ``memintent.ir.parser.parse`` reads it back.

The format is described in spec/IR.md and its grammar is memintent/ir/memintent.lark. In short::

    program @tiny {
      <header: schema, model, fingerprint, shape, budget, passes>
      hardware { field = value ... }
      blocks { @block ... }
      objects { %object : kind<dtype [dims], size B> ... }
      arena size=... B align=... B { slot ... }
      body {
        stage 0 @block ...:          // one section per stage, in order
          copy-start @block -> slot 1 {visit=2}    // the actions that fire on entry to the stage
          0: %t0 = aten.op(%a, %b) ...             // its steps
        end:                         // actions at the end of the forward
      }
      visits { @block stages=[...] ... }
      prediction { field = value ... }
      generation { field = value ... }
    }

Nothing is lost: every field of every model is printed (booleans as a flag that is present when true), floats
with ``repr`` (which round-trips exactly and spells ``inf``, ``-inf``, ``nan``), strings as JSON string literals
and absent optional values as ``none``. Hence ``parse(dump(p)) == p`` and ``dump(parse(dump(p))) == dump(p)``.
The output is deterministic: it depends on the program only.
"""

from __future__ import annotations

import enum
import json
import re
import typing
from collections import deque
from typing import Iterable

from pydantic import BaseModel

from memintent.ir.model import Action, ActionKind, Block, Object, Program, Slot, Stage, Step, Visit

# A name that prints bare; anything else prints as a JSON string literal. Must match the grammar's WORD terminal.
_SIMPLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")

# Lists of names longer than this print one name per line.
_WRAP_COLUMNS = 100

INDENT = "  "

_ACTION_KEYWORD = {ActionKind.copy_start: "copy-start", ActionKind.copy_done: "copy-done", ActionKind.free: "free"}


# ---- scalars ---------------------------------------------------------------------------------------------------

def quote(text: str) -> str:
    """A JSON string literal, pure ASCII (so that no exotic character can pass for whitespace or a newline)."""
    return json.dumps(text, ensure_ascii=True)


def word(text: str) -> str:
    """A name bare when it is a simple identifier (dots allowed), else quoted: ``bf16``, ``"weird name"``."""
    return text if _SIMPLE_NAME.fullmatch(text) else quote(text)


def obj(name: str) -> str:
    return "%" + word(name)


def sym(name: str) -> str:
    return "@" + word(name)


def _int(value: int) -> str:
    return str(int(value))


def _float(value: float) -> str:
    # float() first: a float field set from an int must still print as a float, or the re-dump would differ.
    return repr(float(value))


def _opt_int(value: int | None) -> str:
    return "none" if value is None else _int(value)


def _bytes(value: int) -> str:
    return f"{_int(value)} B"


def _opt_bytes(value: int | None) -> str:
    return "none" if value is None else _bytes(value)


def _secs(value: float) -> str:
    return f"{_float(value)} s"


def _opt_secs(value: float | None) -> str:
    return "none" if value is None else _secs(value)


def _names(items: Iterable[str], indent: str, brackets: str = "[]") -> str:
    """``[a, b]``, or, when that would be too long to read, one item per line below a line indented by ``indent``."""
    items = list(items)
    inline = brackets[0] + ", ".join(items) + brackets[1]
    if len(items) < 2 or len(inline) <= _WRAP_COLUMNS:
        return inline
    inner = indent + INDENT
    return brackets[0] + "\n" + ",\n".join(inner + item for item in items) + "\n" + indent + brackets[1]


# ---- sections --------------------------------------------------------------------------------------------------

def _fields(keyword: str, model: BaseModel | None) -> list[str]:
    """A ``keyword { field = value ... }`` section with one line per model field, in declaration order."""
    if model is None:
        return [f"{INDENT}{keyword} none"]
    return [f"{INDENT}{keyword} {{", *_field_lines(model, INDENT * 2), INDENT + "}"]


def _field_lines(model: BaseModel, indent: str) -> list[str]:
    """One ``name = value`` line per field; a field holding a model is a nested ``name = { ... }`` section."""
    lines = []
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines += [f"{indent}{name} = {{", *_field_lines(value, indent + INDENT), indent + "}"]
            continue
        if isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            lines.append(f"{indent}{name} = [")      # a list of models: one nested section each
            for i, v in enumerate(value):
                end = "," if i < len(value) - 1 else ""
                lines += [f"{indent}{INDENT}{{", *_field_lines(v, indent + INDENT * 2), f"{indent}{INDENT}}}{end}"]
            lines.append(f"{indent}]")
            continue
        lines.append(f"{indent}{name} = {_value(model, name, info.annotation, value, indent)}")
    return lines


def _value(model: BaseModel, name: str, kind, value, indent: str) -> str:
    if value is None:
        return "none"          # an optional field left empty (a nested model, here)
    if kind is float:
        return _float(value)
    if kind is int:
        return _int(value)
    if kind is str:
        return quote(value)
    if kind == list[str]:
        return _names([quote(v) for v in value], indent)
    if typing.get_origin(kind) is list and isinstance(value, list) and all(type(v) is int for v in value):
        return "[" + ", ".join(_int(v) for v in value) + "]"      # a short series: one line
    if isinstance(value, enum.Enum):
        return quote(value.value)
    if typing.get_origin(kind) is typing.Literal:
        return quote(value)
    if typing.get_origin(kind) is list and all(isinstance(v, tuple) for v in value):
        return "[" + ", ".join(f"[{_float(a)}, {_float(b)}]" for a, b in value) + "]"   # rows of two numbers
    # a new field type needs a spelling here and in parser._fields_model
    raise TypeError(f"cannot print {type(model).__name__}.{name} of type {kind}")


def _block(b: Block) -> str:
    residency = "none" if b.residency is None else b.residency.value
    weights = _names([obj(w) for w in b.weights], INDENT * 2)
    return (f"{sym(b.name)} module={quote(b.module)} size={_bytes(b.size_bytes)} residency={residency} "
            f"quant={b.quant.value} transfer={_opt_bytes(b.transfer_bytes)} slot={_opt_int(b.slot)} "
            f"weights={weights}")


def _object(o: Object) -> str:
    dims = ", ".join(_int(d) for d in o.shape)   # as _dims, inside the object's type
    placement = "none" if o.block is None else sym(o.block)
    if o.block_offset_bytes is not None:
        placement += f"+{_int(o.block_offset_bytes)}"
    if o.first_use is None and o.last_use is None:
        live = "none"
    else:
        live = f"[{_opt_int(o.first_use)}, {_opt_int(o.last_use)}]"
    if o.urgency_step is None and o.urgency_s is None:
        urgent = "none"
    else:
        urgent = f"(step {_opt_int(o.urgency_step)}, {_opt_secs(o.urgency_s)})"
    return (f"{obj(o.name)} : {o.kind.value}<{word(o.dtype)} [{dims}], {_bytes(o.size_bytes)}> home={o.home.value} "
            f"block={placement} live={live} urgent={urgent} evict={_secs(o.evict_cost_s)} "
            f"recompute={_opt_secs(o.recompute_cost_s)}")


def _slot(s: Slot) -> str:
    return (f"slot {_int(s.index)} {s.kind.value} offset={_bytes(s.offset_bytes)} size={_bytes(s.size_bytes)} "
            f"holds={_names([sym(h) for h in s.holds], INDENT * 2)}")


def _stage(s: Stage) -> str:
    needs = _names([sym(n) for n in s.needs], INDENT * 2)
    return (f"stage {_int(s.index)} {sym(s.block)} module={quote(s.module)} "
            f"steps=[{_int(s.first_step)}, {_int(s.last_step)}] needs={needs} time={_secs(s.time_s)}:")


def _step(s: Step, indent: str) -> str:
    defs = ", ".join(obj(d) for d in s.defs) + " = " if s.defs else ""
    uses = _names([obj(u) for u in s.uses], indent, "()")
    return (f"{_int(s.index)}: {defs}{word(s.op)}{uses} module={quote(s.module)} block={sym(s.block)} "
            f"flops={_int(s.flops)} bytes={_int(s.hbm_bytes)} time={_secs(s.time_s)}")


def _action(a: Action, implied_stage: int | None) -> str:
    arrow = "" if a.kind is ActionKind.free else " ->"
    attrs = [] if a.stage == implied_stage else [f"stage={_int(a.stage)}"]
    attrs.append(f"visit={_int(a.visit_stage)}")
    if a.next_forward:
        attrs.append("next_forward")
    return f"{_ACTION_KEYWORD[a.kind]} {sym(a.block)}{arrow} slot {_int(a.slot)} {{{', '.join(attrs)}}}"


def _body(p: Program) -> list[str]:
    """The steps, stages and actions lists, interleaved for reading but each kept in its own order.

    Stage sections print in list order. Into each go, first, the actions at the front of the actions list that
    fire on entry to it (``action.stage == stage.index``, implied by the section), then the steps at the front of
    the steps list up to its last step. Steps before the first stage print before it; steps left over go into the
    last section; actions left over go into the ``end:`` section, whose implied stage is ``len(stages)``, with an
    explicit ``stage=`` where theirs differs. The parser rebuilds each list by concatenating what it reads, so
    the lists come back in their order even for a program whose stages or actions are out of order.
    """
    lines = [INDENT + "body {"]
    steps, actions = deque(p.steps), deque(p.actions)
    section, entry = INDENT * 2, INDENT * 3
    if p.stages:
        while steps and steps[0].index < p.stages[0].first_step:
            lines.append(section + _step(steps.popleft(), section))
    else:
        lines.extend(section + _step(s, section) for s in steps)
        steps.clear()
    for i, stage in enumerate(p.stages):
        lines.append(section + _stage(stage))
        while actions and actions[0].stage == stage.index:
            lines.append(entry + _action(actions.popleft(), stage.index))
        last = i == len(p.stages) - 1
        while steps and (last or steps[0].index <= stage.last_step):
            lines.append(entry + _step(steps.popleft(), entry))
    if actions:
        lines.append(section + "end:")
        lines.extend(entry + _action(a, len(p.stages)) for a in actions)
    lines.append(INDENT + "}")
    return lines


def _visit(v: Visit) -> str:
    flag = " next_forward" if v.issue_next_forward else ""
    return (f"{sym(v.block)} stages=[{_int(v.first_stage)}, {_int(v.last_stage)}] slot={_opt_int(v.slot)} "
            f"issue={_opt_int(v.issue_stage)}{flag} arrive={_opt_secs(v.arrive_s)} "
            f"deadline={_opt_secs(v.deadline_s)} slack={_opt_secs(v.slack_s)}")


def _list_section(keyword: str, lines: list[str]) -> list[str]:
    if not lines:
        return [f"{INDENT}{keyword} {{}}"]
    return [f"{INDENT}{keyword} {{", *(INDENT * 2 + line for line in lines), INDENT + "}"]


def _dims(shape: list[int]) -> str:
    return "[" + ", ".join(_int(d) for d in shape) + "]"


# ---- program ---------------------------------------------------------------------------------------------------

def dump(program: Program) -> str:
    """The text form of ``program``: every field, deterministic, and parsed back by ``parser.parse``."""
    p, m, s = program, program.model, program.shape
    out = [
        "// Memory Intent IR (spec/IR.md)",
        f"program {sym(p.name)} {{",
        f"{INDENT}schema {_int(p.schema_version)}",
        f"{INDENT}model {word(m.kind)} {quote(m.ref)} dtype={word(m.dtype)} traced_layers={_opt_int(m.traced_layers)} "
        f"attention={word(m.attention)}" + (f" part={_dims(m.part)}" if m.part else ""),
        f"{INDENT}fingerprint {quote(p.fingerprint)}",
        f"{INDENT}shape batch={_int(s.batch)} seq={_int(s.seq)} inputs=[{', '.join(_dims(d) for d in s.inputs)}]",
        f"{INDENT}budget {_opt_bytes(p.budget_bytes)}",
        f"{INDENT}passes {_names([quote(n) for n in p.passes], INDENT)}",
    ]
    out += _fields("hardware", p.hardware)
    out += _list_section("blocks", [_block(b) for b in p.blocks])
    out += _list_section("objects", [_object(o) for o in p.objects])
    if p.arena is None:
        out.append(f"{INDENT}arena none")
    else:
        a = p.arena
        out += _list_section(f"arena size={_bytes(a.size_bytes)} align={_bytes(a.alignment_bytes)}",
                             [_slot(s) for s in a.slots])
    out += _body(p)
    out += _list_section("visits", [_visit(v) for v in p.visits])
    out += _fields("prediction", p.prediction)
    out += _fields("generation", p.generation)
    out += _fields("kv_pool", p.kv_pool)
    out.append("}")
    return "\n".join(out) + "\n"
