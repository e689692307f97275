"""Reading the text form of the Memory Intent IR back into a ``Program`` (the inverse of ``printer.dump``).

``parse(text)`` runs lark's LALR parser over memintent/ir/memintent.lark with the ``_Builder`` transformer applied
during the parse: no parse tree is built, and a program of 3,000 steps and 8,000 objects parses in about a second.
Every problem is reported as one ``IRParseError`` naming ``source:line:column``: syntax errors say what was
expected there; values the grammar accepts but the model does not (an integer written as ``1.5``, an unknown enum
value, a negative object size, a duplicate or unknown field) point at the offending token. Nothing in the text is
ever evaluated: numbers go through ``int``/``float`` and strings through ``json.loads``.
"""

from __future__ import annotations

import enum
import json
import re
import types
import typing
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lark import Lark, Token, Transformer
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr
from pydantic import BaseModel, ValidationError

from memintent.errors import IRParseError
from memintent.ir.model import (
    Action,
    ActionKind,
    Arena,
    Block,
    GenerationPlan,
    HardwareProfile,
    KVPool,
    ModelRef,
    Object,
    ObjectKind,
    Prediction,
    Program,
    Quant,
    Residency,
    RunShape,
    Slot,
    SlotKind,
    Stage,
    Step,
    Tier,
    Visit,
)

GRAMMAR_PATH = Path(__file__).with_name("memintent.lark")

_ACTION_KINDS = {"copy-start": ActionKind.copy_start, "copy-done": ActionKind.copy_done, "free": ActionKind.free}
_MODEL_KINDS = ("preset", "hf", "py")
_INTEGER = re.compile(r"-?[0-9]+")
_WORD_AT = re.compile(r"[^\s,(){}\[\]<>=:]+")

# How syntax errors name the grammar's named terminals (anonymous keywords are shown as their text).
_TERMINAL_WORDS = {
    "NUMBER": "a number",
    "STRING": 'a string literal ("...")',
    "WORD": "a name",
    "OBJECT": "an object name (%name)",
    "SYMBOL": "a block name (@name)",
    "ACTION_KIND": "an action (copy-start, copy-done, free)",
    "$END": "the end of the text",
}


class _SemanticError(Exception):
    """A value the grammar accepts but the model does not, at a token; ``parse`` adds the source."""

    def __init__(self, message: str, token: Token | None):
        super().__init__(message)
        self.message = message
        self.line = getattr(token, "line", None) or 1
        self.column = getattr(token, "column", None) or 1


# ---- token conversion ------------------------------------------------------------------------------------------

def _int(token: Token) -> int:
    try:
        if _INTEGER.fullmatch(token):
            return int(token)
    except ValueError:  # more digits than int() converts (sys.get_int_max_str_digits)
        raise _SemanticError(f"integer literal of {len(token)} characters is too long", token) from None
    raise _SemanticError(f"expected an integer, got {token!s}", token)


def _opt_int(token: Token) -> int | None:
    return None if token.type == "NONE" else _int(token)


def _float(token: Token) -> float:
    return float(token)  # the NUMBER terminal only matches what float() reads: digits, exponent, inf, nan


def _opt_float(token: Token) -> float | None:
    return None if token.type == "NONE" else _float(token)


def _unquote(literal: str, at: Token) -> str:
    """The value of a JSON string literal; the common case (no escapes) skips the JSON decoder."""
    if "\\" not in literal:
        return literal[1:-1]
    try:
        # strict=False: raw control characters pass, as in the fast path (the printer escapes them anyway).
        return json.loads(literal, strict=False)
    except json.JSONDecodeError as e:
        raise _SemanticError(f"bad string literal {literal}: {e.msg}", at) from None


def _string(token: Token) -> str:
    return _unquote(token, token)


def _name(token: Token, prefix: int = 0) -> str:
    """A bare or quoted name after ``prefix`` sigil characters (``%`` or ``@``)."""
    text = str(token[prefix:])
    return _unquote(text, token) if text.startswith('"') else text


def _opt_symbol(token: Token) -> str | None:
    return None if token.type == "NONE" else _name(token, 1)


def _enum(cls: type[enum.Enum], token: Token, what: str) -> Any:
    try:
        return cls(str(token))
    except ValueError:
        allowed = ", ".join(m.value for m in cls)
        raise _SemanticError(f"unknown {what} {token!s}: expected one of {allowed}", token) from None


def _build(cls: type[BaseModel], fields: dict[str, Any], where: dict[str, Token], start: Token | None) -> Any:
    """``cls(**fields)``, reporting a validation error at the token of the offending field (else at ``start``)."""
    try:
        return cls(**fields)
    except ValidationError as e:
        error = e.errors()[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        raise _SemanticError(f"{cls.__name__}.{field}: {error['msg']}", where.get(field, start)) from None


class _Table(list):
    """A ``[[number, number], ...]`` value (a list of pairs), told apart from a list of strings."""


class _Sections(list):
    """A ``[{ field = value ... }, ...]`` value: a list of models, each a ``_Section``."""


def _fields_model(cls: type[BaseModel], head: Token, fields: list[Any]) -> Any:
    """A model from a ``keyword { field = value ... }`` section (None for ``keyword none``); each value must have
    its field's type."""
    if fields and isinstance(fields[0], Token):  # the NONE token
        return None
    values: dict[str, Any] = {}
    where: dict[str, Token] = {}
    for key, value in fields:
        name = str(key)
        info = cls.model_fields.get(name)
        if info is None:
            raise _SemanticError(f"unknown field {name} in {head}: expected one of {', '.join(cls.model_fields)}", key)
        if name in values:
            raise _SemanticError(f"field {name} given twice in {head}", key)
        values[name] = _field_value(name, info.annotation, key, value)
        where[name] = key
    return _build(cls, values, where, head)


_SCALARS = {(str, "STRING"): _string, (int, "NUMBER"): _int, (float, "NUMBER"): _float}


def _list_value(kind, literal: str, value) -> Any:
    """A list field's value (integers, two-number rows, strings; an empty ``[]`` reads as strings), or ``_NO``."""
    if _int_list(kind) and (literal == "_Numbers" or (literal == "list" and not value)):
        return [_int(t) for t in value.items] if literal == "_Numbers" else []
    if _pair_list(kind) and (literal == "_Table" or (literal == "list" and not value)):
        return list(value)
    if kind == list[str] and literal == "list":
        return value
    return _NO


def _named_value(kind, literal: str, value) -> Any:
    """An enum's or a literal's value (a STRING: pydantic checks it is one of the allowed), or ``_NO``."""
    named = typing.get_origin(kind) is typing.Literal or (isinstance(kind, type) and issubclass(kind, enum.Enum))
    return _string(value) if named and literal == "STRING" else _NO


_NO = object()   # "not this kind of value"


def _field_value(name: str, kind, key: Token, value) -> Any:
    """A field's value as its type ``kind`` wants it, from what the parser read."""
    literal = value.type if isinstance(value, Token) else type(value).__name__
    nested = _nested_model(kind)
    if nested is not None and literal in ("NONE", "_Section"):
        return None if literal == "NONE" else _fields_model(nested, key, value.fields)
    item = _list_model(kind)
    if item is not None and (literal == "_Sections" or (literal == "list" and not value)):
        return [_fields_model(item, key, section.fields) for section in value]
    scalar = _SCALARS.get((kind, literal))
    if scalar is not None:
        return scalar(value)
    for read in (_list_value, _named_value):
        out = read(kind, literal, value)
        if out is not _NO:
            return out
    wanted = "a list of [number, number] rows" if _pair_list(kind) else {
        str: "a string", int: "an integer", float: "a number"}.get(kind, "a list of strings")
    raise _SemanticError(f"{name} must be {wanted}", value if isinstance(value, Token) else key)


@dataclass
class _Section:
    """A nested ``name = { field = value ... }``: the (key, value) pairs of the model a field holds."""

    fields: list


@dataclass
class _Numbers:
    """A ``[1, 2, 3]`` list of NUMBER tokens."""

    items: list


def _nested_model(kind) -> type[BaseModel] | None:
    """The model a field of type ``Model | None`` holds, else None."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    return next((k for k in options if isinstance(k, type) and issubclass(k, BaseModel)), None)


def _list_model(kind) -> type[BaseModel] | None:
    """The model a ``list[Model]`` field holds, else None."""
    if typing.get_origin(kind) is not list:
        return None
    (item,) = typing.get_args(kind)
    return item if isinstance(item, type) and issubclass(item, BaseModel) else None


def _pair_list(kind) -> bool:
    """Whether ``kind`` is a list of two-number rows (``HardwareProfile.gemm_tflops``)."""
    return typing.get_origin(kind) is list and typing.get_origin(typing.get_args(kind)[0]) is tuple


def _int_list(kind) -> bool:
    """Whether ``kind`` is a list of integers (``list[int]``, or of a constrained int)."""
    if typing.get_origin(kind) is not list:
        return False
    (item,) = typing.get_args(kind)
    return (typing.get_args(item)[0] if typing.get_origin(item) is typing.Annotated else item) is int


@dataclass
class _PendingAction:
    """An action as read inside a body section: its stage is the section's unless written out."""

    kind: ActionKind
    block: str
    slot: int
    stage: int | None
    visit_stage: int
    next_forward: bool
    token: Token

    def build(self, implied_stage: int) -> Action:
        stage = implied_stage if self.stage is None else self.stage
        return _build(Action, dict(kind=self.kind, stage=stage, block=self.block, slot=self.slot,
                                   visit_stage=self.visit_stage, next_forward=self.next_forward), {}, self.token)


# ---- the transformer -------------------------------------------------------------------------------------------

class _Builder(Transformer):
    """Builds the model objects bottom-up as the LALR parser reduces each rule.

    Methods are named after the grammar's rules and receive the rule's children ``c``: tokens (keywords and
    punctuation written as anonymous strings in the grammar are filtered out) and the results of sub-rules.
    """

    def start(self, c):
        name, header, hardware, blocks, objects, arena, body, visits, prediction, generation, kv_pool = c
        steps, stages, actions = body
        return _build(Program, dict(name=_name(name, 1), **header, hardware=hardware, blocks=blocks,
                                    objects=objects, arena=arena, steps=steps, stages=stages, actions=actions,
                                    visits=visits, prediction=prediction, generation=generation, kv_pool=kv_pool),
                      {}, name)

    def pipeline_part(self, c):
        return c[0] if c else []

    def header(self, c):
        (schema, kind, ref, dtype, traced, attention, part, fingerprint, batch, seq, inputs, budget, passes) = c
        if str(kind) not in _MODEL_KINDS:
            raise _SemanticError(f"unknown model kind {kind!s}: expected one of {', '.join(_MODEL_KINDS)}", kind)
        model = _build(ModelRef, dict(ref=_string(ref), kind=str(kind), dtype=_name(dtype),
                                      traced_layers=_opt_int(traced), attention=_name(attention), part=part),
                       {}, kind)
        shape = _build(RunShape, dict(batch=_int(batch), seq=_int(seq), inputs=inputs), {}, batch)
        return dict(schema_version=_int(schema), model=model, fingerprint=_string(fingerprint), shape=shape,
                    budget_bytes=_opt_int(budget), passes=passes)

    # -- sections of fields: the keyword, then `none` or (key, value) pairs
    def hardware(self, c):
        return _fields_model(HardwareProfile, c[0], c[1:])

    def prediction(self, c):
        return _fields_model(Prediction, c[0], c[1:])

    def generation(self, c):
        return _fields_model(GenerationPlan, c[0], c[1:])

    def kv_pool(self, c):
        return _fields_model(KVPool, c[0], c[1:])

    def field(self, c):
        return c[0], c[1]

    def section(self, c):
        return _Section(list(c))

    def sections(self, c):
        return _Sections(c)

    def numbers(self, c):
        return _Numbers(list(c))

    # -- blocks and objects
    def blocks(self, c):
        return c

    def block(self, c):
        name, module, size, residency, quant, transfer, slot, weights = c
        return _build(Block, dict(
            name=_name(name, 1), module=_string(module), size_bytes=_int(size),
            residency=None if residency.type == "NONE" else _enum(Residency, residency, "residency"),
            quant=_enum(Quant, quant, "quantization"), transfer_bytes=_opt_int(transfer), slot=_opt_int(slot),
            weights=weights), {"size_bytes": size, "transfer_bytes": transfer, "slot": slot}, name)

    def objects(self, c):
        return c

    def object(self, c):
        name, kind, dtype, dims, size, home, placement, live, urgency, evict, recompute = c
        (block, offset), (first, last), (urgency_step, urgency_s) = placement, live, urgency
        return _build(Object, dict(
            name=_name(name, 1), kind=_enum(ObjectKind, kind, "object kind"), dtype=_name(dtype), shape=dims,
            size_bytes=_int(size), home=_enum(Tier, home, "tier"), block=block, block_offset_bytes=offset,
            first_use=first, last_use=last, urgency_step=urgency_step, urgency_s=urgency_s,
            evict_cost_s=_float(evict), recompute_cost_s=_opt_float(recompute),
        ), {"size_bytes": size}, name)

    def dims(self, c):
        return [_int(t) for t in c]

    def shapes(self, c):
        return list(c)

    def placement(self, c):
        return _opt_symbol(c[0]), (_int(c[1]) if len(c) > 1 else None)

    def live(self, c):
        return (None, None) if len(c) == 1 else (_opt_int(c[0]), _opt_int(c[1]))

    def urgency(self, c):
        return (None, None) if len(c) == 1 else (_opt_int(c[0]), _opt_float(c[1]))

    # -- arena
    def arena(self, c):
        if len(c) == 2 and c[1].type == "NONE":
            return None
        head, size, alignment, *slots = c
        return _build(Arena, dict(size_bytes=_int(size), alignment_bytes=_int(alignment), slots=slots), {}, head)

    def slot(self, c):
        index, kind, offset, size, holds = c
        return _build(Slot, dict(index=_int(index), kind=_enum(SlotKind, kind, "slot kind"),
                                 offset_bytes=_int(offset), size_bytes=_int(size), holds=holds), {}, index)

    # -- body
    def body(self, c):
        steps: list[Step] = []
        stages: list[Stage] = []
        actions: list[Action] = []
        for item in c:
            if isinstance(item, Step):  # a step before the first stage
                steps.append(item)
            else:
                stage, entries = item
                if stage is not None:
                    stages.append(stage)
                for entry in entries:
                    if isinstance(entry, Step):
                        steps.append(entry)
                    else:  # the end section (stage None) fires after the last stage: its stage is len(stages)
                        actions.append(entry.build(len(stages) if stage is None else stage.index))
        return steps, stages, actions

    def stage(self, c):
        index, block, module, first, last, needs, time, *entries = c
        stage = _build(Stage, dict(index=_int(index), module=_string(module), block=_name(block, 1),
                                   first_step=_int(first), last_step=_int(last), needs=needs, time_s=_float(time)),
                       {}, index)
        return stage, entries

    def end(self, c):
        return None, c[1:]

    def step(self, c):
        index, defs, op, uses, module, block, flops, hbm_bytes, time = c
        return _build(Step, dict(index=_int(index), op=_name(op), module=_string(module), block=_name(block, 1),
                                 flops=_int(flops), hbm_bytes=_int(hbm_bytes), time_s=_float(time), uses=uses,
                                 defs=defs), {}, index)

    def defs(self, c):
        return [_name(t, 1) for t in c]

    def uses(self, c):
        return [_name(t, 1) for t in c]

    def action(self, c):
        kind, block, slot, *rest = c
        stage = None
        if rest[0].type == "STAGE_KEY":
            stage, rest = _int(rest[1]), rest[2:]
        return _PendingAction(kind=_ACTION_KINDS[str(kind)], block=_name(block, 1), slot=_int(slot), stage=stage,
                              visit_stage=_int(rest[0]), next_forward=len(rest) > 1, token=kind)

    # -- visits
    def visits(self, c):
        return c

    def visit(self, c):
        block, first, last, slot, issue, *rest = c
        next_forward = rest[0].type == "NEXT_FORWARD"
        arrive, deadline, slack = rest[1:] if next_forward else rest
        return _build(Visit, dict(block=_name(block, 1), first_stage=_int(first), last_stage=_int(last),
                                  slot=_opt_int(slot), issue_stage=_opt_int(issue), issue_next_forward=next_forward,
                                  arrive_s=_opt_float(arrive), deadline_s=_opt_float(deadline),
                                  slack_s=_opt_float(slack)), {}, block)

    # -- lists of names
    def strings(self, c):
        return [_string(t) for t in c]

    def table(self, c):
        return _Table(c)

    def pair(self, c):
        return (_float(c[0]), _float(c[1]))

    def symbols(self, c):
        return [_name(t, 1) for t in c]

    def objects_list(self, c):
        return [_name(t, 1) for t in c]


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(GRAMMAR_PATH.read_text(), parser="lalr", lexer="contextual", transformer=_Builder(),
                maybe_placeholders=False)


# ---- errors ----------------------------------------------------------------------------------------------------

def _describe(terminal: str) -> str:
    if terminal in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[terminal]
    try:
        pattern = _parser().get_terminal(terminal).pattern
    except KeyError:
        return terminal
    return json.dumps(pattern.value) if isinstance(pattern, PatternStr) else terminal.lower()


def _expected(names: set[str]) -> str:
    words = sorted({_describe(n) for n in names})
    if not words:
        return "nothing more"
    return words[0] if len(words) == 1 else "one of " + ", ".join(words)


def _syntax_error(e: UnexpectedInput, text: str, source: str) -> IRParseError:
    if isinstance(e, UnexpectedToken):
        token, expected = e.token, _expected(set(e.accepts or e.expected))
        if token.type == "$END":
            # lark's end token borrows the last token's position: point just past it, where the text stopped short.
            return IRParseError(f"unexpected end of text: expected {expected}", token.end_line or 1,
                                token.end_column or 1, source)
        # Show the whole misspelled word ("copy-dne"), not just the part that lexed as a token ("copy").
        word = _WORD_AT.match(text, token.start_pos) if token.type == "WORD" else None
        got = json.dumps((word.group() if word else str(token))[:40])
        return IRParseError(f"unexpected {got}: expected {expected}", e.line, e.column, source)
    if isinstance(e, UnexpectedCharacters):
        word = re.compile(r"\S{1,40}").match(text, e.pos_in_stream)
        got = json.dumps(word.group() if word else text[e.pos_in_stream])
        return IRParseError(f"unexpected {got}: expected {_expected(set(e.allowed or ()))}", e.line, e.column,
                            source)
    return IRParseError(str(e).splitlines()[0], getattr(e, "line", 1), getattr(e, "column", 1), source)


def parse(text: str, source: str = "<ir>") -> Program:
    """The ``Program`` that ``text`` (as printed by ``printer.dump``) describes; ``IRParseError`` if it is not one.

    ``source`` names the text in error messages (a file name)."""
    try:
        return _parser().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, source) from None
    except _SemanticError as e:
        raise IRParseError(e.message, e.line, e.column, source) from None
