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
import sys
from pathlib import Path

from memintent.engine.sampling import SAMPLING_KEYS, SamplingParams
from memintent.engine.sequence import Request, RequestId
from memintent.errors import MemintentError

KEYS = ("id", "prompt", "prompt_ids", "max_new_tokens", "stop_token_ids") + SAMPLING_KEYS
GZIP_MAGIC = b"\x1f\x8b"
SYNTHETIC = SamplingParams(ignore_eos=True)     # synthetic requests generate their drawn lengths


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


def _one(raw: dict, where: str, tokenizer, default_max_new: int, chat: bool) -> Request:
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise MemintentError(f"{where}: unknown key {unknown[0]!r}: a request has {', '.join(KEYS)}")
    if "id" not in raw:
        raise MemintentError(f"{where}: no \"id\": every request has one (a string or an integer)")
    if ("prompt" in raw) == ("prompt_ids" in raw):
        raise MemintentError(f"{where}: give exactly one of \"prompt\" (text) and \"prompt_ids\" (token ids)")
    text = raw.get("prompt")
    try:
        if text is not None and isinstance(text, str):
            if tokenizer is None:
                raise MemintentError("a text prompt needs a tokenizer, and this plan's model has none (a Hugging "
                                     "Face folder with tokenizer.json): give \"prompt_ids\"")
            ids = encode(tokenizer, text, chat)
        else:
            ids = raw.get("prompt_ids", ())
        # the request checks its own fields (types, a positive max_new_tokens), naming the one that is wrong
        return Request(id=raw["id"], prompt_ids=ids, max_new_tokens=raw.get("max_new_tokens", default_max_new),
                       stop_token_ids=raw.get("stop_token_ids", ()), prompt=text,
                       sampling=SamplingParams.parse(raw, where))
    except MemintentError as e:
        raise MemintentError(f"{where}: {e}") from None


def read_lines(path: str) -> list[tuple[int, str]]:
    """(line number, text) of each non-blank line of a JSON-lines file, or of stdin for ``-``. Lines end at ``\\n``
    only (a JSON string may hold U+2028, U+2029 or U+0085, which ``str.splitlines`` would split at); a UTF-8 byte
    order mark is skipped; a gzip file is refused."""
    name = "--prompts -" if path == "-" else f"--prompts {path}"
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise MemintentError(f"{name} does not exist") from None
    except OSError as e:
        raise MemintentError(f"{name} cannot be read: {e.strerror or e}") from None
    if data[:2] == GZIP_MAGIC:
        raise MemintentError(f"{name} is gzip-compressed: decompress it first (gunzip -k FILE), then give the "
                             "JSON-lines file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MemintentError(f"{name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}): write "
                             "the requests as UTF-8 JSON lines") from None
    return [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]


def load_numbered(path: str, *, tokenizer=None, default_max_new: int, chat: bool = False
                  ) -> list[tuple[int, Request]]:
    """(line number, request) of each request of a JSON-lines file (``-``: stdin; blank lines skipped); ids must
    be unique (1 and "1" are different ids: an id keeps its JSON type)."""
    shown = "stdin" if path == "-" else path
    out: list[tuple[int, Request]] = []
    seen: dict[RequestId, int] = {}
    for n, line in read_lines(path):
        where = f"{shown}:{n}"
        try:
            raw = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            raise MemintentError(f"{where}: not a JSON object ({str(e).split(':')[0]}): write one request per line, "
                                 "like {\"id\": 1, \"prompt_ids\": [1, 2, 3]}") from None
        if not isinstance(raw, dict):
            raise MemintentError(f"{where}: a request line is a JSON object, not {type(raw).__name__}")
        req = _one(raw, where, tokenizer, default_max_new, chat)
        if req.id in seen:
            raise MemintentError(f"{where}: id {req.id!r} appears twice (first on line {seen[req.id]}): request ids "
                                 "must be unique")
        seen[req.id] = n
        out.append((n, req))
    if not out:
        raise MemintentError(f"--prompts {path} holds no requests: write one JSON object per line")
    return out


def load(path: str, *, tokenizer=None, default_max_new: int, chat: bool = False) -> list[Request]:
    """The requests of a JSON-lines file (``load_numbered`` without the line numbers)."""
    return [r for _, r in load_numbered(path, tokenizer=tokenizer, default_max_new=default_max_new, chat=chat)]


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
