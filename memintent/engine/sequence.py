"""A request, and the state of the sequence that serves it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from memintent.engine.sampling import SamplingParams, TokenLogprobs


@dataclass(frozen=True, slots=True)
class Request:
    """What a user asks for: token ids (or text, tokenized by the caller) and when to stop."""

    id: str
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    prompt: str | None = None        # the text, when the request was given as text
    sampling: SamplingParams = SamplingParams()   # how it draws tokens, stop strings, ignore_eos, logprobs


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
    finish_reason: str | None = None  # "stop", "length" (max_new_tokens), "context" (the plan's context), "abort"
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

    id: str
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
