"""Requests from a JSON-lines file or a seeded synthetic mix, and results written back as JSON lines.

A request line is ``{"id": ..., "prompt": "text"}`` or ``{"id": ..., "prompt_ids": [..]}``, with optional
``"max_new_tokens"``, ``"stop_token_ids"`` and the sampling fields (``sampling.SAMPLING_KEYS``: ``"temperature"``,
``"top_p"``, ``"top_k"``, ``"min_p"``, ``"presence_penalty"``, ``"frequency_penalty"``, ``"seed"``, ``"logprobs"``,
``"stop"`` strings, ``"ignore_eos"``). Text needs the model folder's tokenizer. Every problem is one line
naming the file and line and what would be right.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from memintent.engine.sampling import SAMPLING_KEYS, SamplingParams
from memintent.engine.sequence import Request
from memintent.errors import MemintentError

KEYS = ("id", "prompt", "prompt_ids", "max_new_tokens", "stop_token_ids") + SAMPLING_KEYS


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """'512' -> (512, 512); '64:1024' -> (64, 1024)."""
    parts = str(text).split(":")
    try:
        lo, hi = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else (None, None)
    except ValueError:
        lo = hi = None
    if lo is None or lo < 1 or hi < lo:
        raise MemintentError(f"{flag} {text!r} is not a length or a range: write 512 or 64:1024 (positive, low:high)")
    return lo, hi


def synthetic(n: int, prompt_len: tuple[int, int], gen_len: tuple[int, int], vocab: int, seed: int) -> list[Request]:
    """``n`` requests with prompt and output lengths drawn uniformly from the ranges and random token ids; the same
    seed gives the same requests on any machine (Python's own generator, not torch's). They ignore the model's
    end-of-sequence ids, so that each generates its drawn length."""
    if n < 1:
        raise MemintentError(f"--synthetic {n} must be at least 1")
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = rng.randint(*prompt_len)
        g = rng.randint(*gen_len)
        out.append(Request(id=str(i), prompt_ids=tuple(rng.randrange(vocab) for _ in range(p)), max_new_tokens=g,
                           sampling=SYNTHETIC))
    return out


SYNTHETIC = SamplingParams(ignore_eos=True)


def _ids(value, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise MemintentError(f"{where}: {what} must be a list of integer token ids")
    return tuple(value)


def _one(raw: dict, where: str, tokenizer, default_max_new: int, chat: bool) -> Request:
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise MemintentError(f"{where}: unknown key {unknown[0]!r}: a request has {', '.join(KEYS)}")
    rid = raw.get("id")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise MemintentError(f"{where}: \"id\" must be a string or an integer")
    if ("prompt" in raw) == ("prompt_ids" in raw):
        raise MemintentError(f"{where}: give exactly one of \"prompt\" (text) and \"prompt_ids\" (token ids)")
    text = raw.get("prompt")
    if text is not None:
        if not isinstance(text, str):
            raise MemintentError(f"{where}: \"prompt\" must be a string")
        if tokenizer is None:
            raise MemintentError(f"{where}: a text prompt needs a tokenizer, and this plan's model has none "
                                 "(a Hugging Face folder with tokenizer.json): give \"prompt_ids\"")
        ids = encode(tokenizer, text, chat)
    else:
        ids = _ids(raw["prompt_ids"], where, "\"prompt_ids\"")
    max_new = raw.get("max_new_tokens", default_max_new)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise MemintentError(f"{where}: \"max_new_tokens\" must be a positive integer")
    stops = _ids(raw.get("stop_token_ids", []), where, "\"stop_token_ids\"")
    return Request(id=str(rid), prompt_ids=ids, max_new_tokens=max_new, stop_token_ids=stops, prompt=text,
                   sampling=SamplingParams.parse(raw, where))


def load(path: str, *, tokenizer=None, default_max_new: int, chat: bool = False) -> list[Request]:
    """Requests of a JSON-lines file (blank lines skipped); ids must be unique."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise MemintentError(f"--prompts {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MemintentError(f"--prompts {path} cannot be read as text: {e}") from None
    out: list[Request] = []
    seen: set[str] = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            raw = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            raise MemintentError(f"{where}: not a JSON object ({str(e).split(':')[0]}): write one request per line, "
                                 "like {\"id\": 1, \"prompt_ids\": [1, 2, 3]}") from None
        if not isinstance(raw, dict):
            raise MemintentError(f"{where}: a request line is a JSON object, not {type(raw).__name__}")
        req = _one(raw, where, tokenizer, default_max_new, chat)
        if req.id in seen:
            raise MemintentError(f"{where}: id {req.id!r} appears twice: request ids must be unique")
        seen.add(req.id)
        out.append(req)
    if not out:
        raise MemintentError(f"--prompts {path} holds no requests: write one JSON object per line")
    return out


def encode(tokenizer, text: str, chat: bool) -> tuple[int, ...]:
    """Token ids of ``text``; with ``chat``, wrapped as one user turn by the folder's chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise MemintentError("--chat: the model folder's tokenizer defines no chat template (neither "
                                 "chat_template.jinja nor a chat_template in tokenizer_config.json): leave --chat out "
                                 "to send the text as it is")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return tuple(int(t) for t in ids)
    return tuple(int(t) for t in tokenizer(text, add_special_tokens=True)["input_ids"])


def line_numbers(path: str) -> dict[str, int]:
    """Request id -> its line in ``path`` (for errors raised later, such as a prompt longer than the context)."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            raw = json.loads(line)
        except ValueError:
            continue
        if isinstance(raw, dict) and "id" in raw:
            out[str(raw["id"])] = n
    return out


def validate(request: Request, *, context: int, vocab: int, where: str = "") -> None:
    """Refuse what a plan cannot serve: an empty prompt, one longer than the plan's context, token ids outside the
    vocabulary. ``where``: a prefix naming the request's line."""
    n = len(request.prompt_ids)
    if n == 0:
        raise MemintentError(f"{where}request {request.id}: the prompt is empty: give at least one token")
    if n > context:
        raise MemintentError(f"{where}request {request.id}: the prompt has {n} tokens, more than the plan's context "
                             f"{context}: shorten it or compile with a larger --context")
    if request.max_new_tokens < 1:
        raise MemintentError(f"{where}request {request.id}: max_new_tokens {request.max_new_tokens} must be at "
                             "least 1")
    for what, ids in (("prompt token", request.prompt_ids), ("stop token", request.stop_token_ids)):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise MemintentError(f"{where}request {request.id}: {what} id {bad} is outside the vocabulary "
                                 f"0..{vocab - 1}")
