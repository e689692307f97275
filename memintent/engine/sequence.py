"""A request, and the state of the sequence that serves it."""

from __future__ import annotations

import enum
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

from memintent.errors import MemintentError

RequestId = str | int      # a request's id keeps its JSON type: 1 stays 1, "a" stays "a"

from memintent.engine.sampling import SamplingParams, TokenLogprobs


@dataclass(frozen=True, slots=True)
class Request:
    """What a user asks for: token ids (or text, tokenized by the caller) and when to stop. Its fields are checked
    when it is built (``check_request``): a wrong one is one ``MemintentError`` naming it."""

    id: RequestId
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    prompt: str | None = None        # the text, when the request was given as text
    sampling: SamplingParams = SamplingParams()   # how it draws tokens, stop strings, ignore_eos, logprobs

    def __post_init__(self) -> None:
        check_request(self)


# ---- checking a request's fields ------------------------------------------------------------------------------
# Each checker takes (value, field name) and returns the value as the request keeps it, or raises ``_Bad`` saying
# what the value must be. ``REQUEST_FIELDS`` lists them per field: a new field of ``Request`` adds its checker there.

class _Bad(Exception):
    pass


def _is_int(v: Any) -> bool:
    """An integer (Python's, NumPy's, a 0-d integer tensor's item), never a bool or a float such as 1.0."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    return f"{type(v).__name__} {v!r}" if isinstance(v, (str, bytes, float, bool)) else type(v).__name__


def request_id(v: Any, name: str) -> RequestId:
    if isinstance(v, str) or _is_int(v):
        return v if isinstance(v, str) else int(v)
    raise _Bad(f"{name} must be a string or an integer, not {_kind(v)}")


def token_ids(v: Any, name: str) -> tuple[int, ...]:
    """A sequence of integer token ids: a list, a tuple or a 1-D integer tensor or array."""
    if hasattr(v, "ndim") and hasattr(v, "tolist"):            # a tensor or an array
        if v.ndim != 1:
            raise _Bad(f"{name} must be 1-D token ids, not a {v.ndim}-D {type(v).__name__} of shape "
                       f"{tuple(v.shape)}: give one request per prompt")
        v = v.tolist()
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        raise _Bad(f"{name} must be a list of integer token ids, not {_kind(v)}")
    if set(map(type, v)) <= {int}:                              # the common case, checked at C speed
        return v if isinstance(v, tuple) else tuple(v)
    bad = next((t for t in v if not _is_int(t)), None)
    if bad is not None:
        raise _Bad(f"{name} must hold integer token ids: {bad!r} is a {type(bad).__name__}")
    return tuple(int(t) for t in v)


def positive_int(v: Any, name: str) -> int:
    if not _is_int(v) or v < 1:
        raise _Bad(f"{name} must be a positive integer, not {_kind(v)}")
    return int(v)


def optional_text(v: Any, name: str) -> str | None:
    if v is not None and not isinstance(v, str):
        raise _Bad(f"{name} must be a string (the prompt's text) or None, not {_kind(v)}")
    return v


def sampling_params(v: Any, name: str) -> SamplingParams:
    """A ``SamplingParams`` (its own fields are checked when it is built)."""
    if not isinstance(v, SamplingParams):
        raise _Bad(f"{name} must be a SamplingParams, not {_kind(v)}")
    return v


REQUEST_FIELDS: dict[str, Callable[[Any, str], Any]] = {
    "id": request_id, "prompt_ids": token_ids, "max_new_tokens": positive_int, "stop_token_ids": token_ids,
    "prompt": optional_text, "sampling": sampling_params,
}


def check_request(request: Request) -> None:
    """Check and normalize every field ``REQUEST_FIELDS`` knows (a tensor's ids become a tuple of ints); the first
    wrong one is a ``MemintentError`` naming the request and the field."""
    for name, check in REQUEST_FIELDS.items():
        try:
            object.__setattr__(request, name, check(getattr(request, name), name))
        except _Bad as e:
            rid = getattr(request, "id", None)
            who = f"request {rid!r}" if name != "id" and (isinstance(rid, str) or _is_int(rid)) else "a request"
            raise MemintentError(f"{who}: {e}") from None


PENDING = -1     # a sampled token the host has not read yet (the engine looking ahead: ``Scheduler.advance``)


class State(enum.Enum):
    waiting = "waiting"      # not admitted yet, or preempted for recomputation: its KV is not in the pool
    running = "running"      # owns pages in the pool; scheduled every step until it finishes
    swapped = "swapped"      # preempted: its pages wait in host memory
    finished = "finished"


@dataclass(slots=True)
class Sequence:
    """A request being served. ``tokens`` is the prompt followed by what was generated; ``cached`` of them have
    their keys and values in the pool (after a recomputation preemption, 0 again: the prompt and the generated
    tokens are prefilled anew)."""

    seq_id: int                      # admission order: also the FCFS priority (lower first)
    request: Request
    tokens: list[int]
    cached: int = 0
    state: State = State.waiting
    preemptions: list[str] = field(default_factory=list)    # "swap" / "recompute", in order
    first_token_s: float | None = None
    finish_s: float | None = None
    finish_reason: str | None = None  # "stop", "length" (max_new_tokens), "context" (the plan's context), "cancelled"
    logprobs: list[TokenLogprobs] = field(default_factory=list)   # per generated token, when the request asks
    stop_text: str | None = None     # the generated text cut before the stop string that ended it

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.request.prompt_ids):]

    @property
    def pending(self) -> int:
        """Tokens whose keys and values are not yet in the pool."""
        return len(self.tokens) - self.cached


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One finished request, as ``generate --output`` writes it (one JSON line)."""

    id: RequestId
    token_ids: list[int]             # generated tokens only
    finish_reason: str
    ttft_s: float                    # time to first token, from the start of the run
    tpot_s: float | None             # time per output token after the first (None for one token)
    preemptions: list[str]
    text: str | None = None
    logprobs: list[TokenLogprobs] | None = None     # per generated token, when the request asked for them

    def as_json(self) -> dict:
        out = {"id": self.id, "token_ids": self.token_ids}
        if self.text is not None:
            out["text"] = self.text
        if self.logprobs is not None:
            out["logprobs"] = [{"logprob": t.logprob, "top": [list(x) for x in t.top]} for t in self.logprobs]
        out.update(finish_reason=self.finish_reason, ttft_s=self.ttft_s, tpot_s=self.tpot_s,
                   preemptions=self.preemptions)
        return out
