"""Choosing each sequence's next token, and deciding when a sequence stops.

Sampling (``Sampler``)
----------------------
A step's logits (S, vocab), one row per sequence that samples in it, become S tokens in one batched sequence of
device kernels, whatever each row asks for (``SamplingParams``):

1. penalties: ``presence_penalty`` once for every token that appears among the sequence's generated tokens and
   ``frequency_penalty`` for every occurrence are subtracted from its logits (OpenAI's definition);
2. ``temperature`` divides them. Temperature 0 is greedy: the argmax of the logits after step 1, which for a
   request asking nothing else is bitwise ``logits.argmax(-1)``, what the engine has always done (a step whose
   rows all ask nothing else runs that alone);
3. ``top_k``, then ``top_p`` over what top-k kept (renormalised), then ``min_p`` (relative to the most likely
   token) leave a set of tokens; the others get -inf (Hugging Face's order; the most likely token always stays);
4. the token is drawn from the softmax of what is left by an exponential race, ``argmax_i log p_i - log E_i`` with
   ``E_i`` exponential: token ``i`` wins with probability ``p_i``.

The race's random numbers are a counter-based hash of (the request's seed, the token's index in its output, the
vocabulary entry), computed on the device. A row's numbers depend on nothing else in the step, so a seeded request
generates the same tokens whichever requests share its steps, and again after a preemption re-runs it. A request
without a seed gets one from its engine's random salt and its sequence id.

``logprobs``: log-softmax of the processed logits (after steps 1-3: the distribution the token was drawn from; for
a greedy row, temperature 1), for the chosen token and the ``logprobs`` most likely ones (OpenAI's ``logprobs`` /
``top_logprobs``). A filtered-out token's -inf is reported as ``LOGPROB_FLOOR`` (JSON has no infinity).

Memory: beyond the step's logits, a sampling step holds a few (S, vocab) float32/int64 tensors (a sort of them
when a row uses top-k, top-p or min-p). They live after the forward's activations are freed.

Stopping (``StopConditions``)
-----------------------------
A sequence stops (``finish_reason`` "stop") at one of its request's ``stop_token_ids``; at one of the model's
end-of-sequence ids (``config.json`` and ``generation_config.json``: ``ModelSource.eos_token_ids``) unless the
request sets ``ignore_eos``; or when its generated text contains one of its ``stop`` strings (models with a
tokenizer): its text is cut before the string, and it generates nothing past the token that completed it (the
token ids end there, as Hugging Face's and vLLM's do).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from memintent.errors import MemintentError
from memintent.kv.paged_kernel import MetaStaging

MAX_LOGPROBS = 20             # OpenAI's bound on top_logprobs
LOGPROB_FLOOR = -9999.0       # a filtered-out token's log-probability, as reported (vLLM's convention)
GREEDY_BELOW = 1e-5           # a temperature below this is greedy (dividing by it would overflow float32 logits)
M32, M64 = (1 << 32) - 1, (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How one request chooses its tokens and when it stops early (besides ``max_new_tokens`` and its
    ``stop_token_ids``). The default is greedy decoding that stops at the model's end-of-sequence ids."""

    temperature: float = 0.0          # 0: greedy
    top_p: float = 1.0                # (0, 1]: the smallest set of most likely tokens holding this much mass
    top_k: int = 0                    # the k most likely tokens; 0 or -1: all
    min_p: float = 0.0                # [0, 1]: drop tokens less likely than min_p x the most likely one
    presence_penalty: float = 0.0     # [-2, 2]
    frequency_penalty: float = 0.0    # [-2, 2]
    seed: int | None = None           # the same seed draws the same tokens (None: the engine picks one)
    logprobs: int | None = None       # None: none; k: the chosen token's log-probability and the k most likely
    stop: tuple[str, ...] = ()        # stop strings (needs the model's tokenizer)
    ignore_eos: bool = False          # keep generating past the model's end-of-sequence ids

    def __post_init__(self):
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        problem = next((msg for bad, msg in _problems(self) if bad), None)
        if problem:
            raise MemintentError(f"sampling: {problem}")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def truncated(self) -> bool:
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

    @property
    def plain(self) -> bool:
        """Greedy with nothing else asked: the logits' argmax is the whole answer."""
        return self.greedy and not self.penalized and self.logprobs is None

    @classmethod
    def parse(cls, raw: dict, where: str) -> "SamplingParams":
        """The sampling fields of a request line (``SAMPLING_KEYS``), checked; ``where`` names the line."""
        kw = {k: raw[k] for k in SAMPLING_KEYS if k in raw}
        try:
            return cls(**kw)
        except MemintentError as e:
            raise MemintentError(f"{where}: {e}") from None


SAMPLING_KEYS = tuple(f.name for f in fields(SamplingParams))


def _num(x, lo: float, hi: float) -> bool:
    """Whether ``x`` is a real number (not a bool) within [lo, hi]."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and lo <= x <= hi


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _problems(p: SamplingParams):
    """(is it wrong, what would be right), in field order."""
    return (
        (not _num(p.temperature, 0, math.inf), f"temperature {p.temperature!r} must be a number >= 0 (0: greedy)"),
        (not _num(p.top_p, 0, 1) or p.top_p == 0, f"top_p {p.top_p!r} must be a number in (0, 1]"),
        (not _int(p.top_k) or p.top_k < -1, f"top_k {p.top_k!r} must be an integer >= 1, or 0 or -1 for all tokens"),
        (not _num(p.min_p, 0, 1), f"min_p {p.min_p!r} must be a number in [0, 1]"),
        (not _num(p.presence_penalty, -2, 2), f"presence_penalty {p.presence_penalty!r} must be in [-2, 2]"),
        (not _num(p.frequency_penalty, -2, 2), f"frequency_penalty {p.frequency_penalty!r} must be in [-2, 2]"),
        (p.seed is not None and not _int(p.seed), f"seed {p.seed!r} must be an integer"),
        (p.logprobs is not None and (not _int(p.logprobs) or not 0 <= p.logprobs <= MAX_LOGPROBS),
         f"logprobs {p.logprobs!r} must be an integer from 0 to {MAX_LOGPROBS}"),
        (not isinstance(p.stop, tuple) or not all(isinstance(s, str) and s for s in p.stop),
         "stop must be a string or a list of non-empty strings"),
        (not isinstance(p.ignore_eos, bool), f"ignore_eos {p.ignore_eos!r} must be true or false"),
    )


# ---------------------------------------------------------------------------------------------------------------
# The sampler


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """One generated token's log-probability and the most likely tokens at its position, most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()      # (token id, log-probability)


@dataclass(slots=True)
class Sampled:
    """A step's tokens, one per sampling row in order; ``logprobs`` per row (None where the row asked none), or None
    when no row asked."""

    tokens: list[int]
    logprobs: list[TokenLogprobs | None] | None = None


def splitmix64(x: int) -> int:
    """A 64-bit integer hash (SplitMix64's output function): the request's stream key from its seed and counter."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32): split in 16-bit halves so that no product overflows."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (the "lowbias32" constants) over int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class Sampler:
    """Samples a step's rows on ``device``. ``salt``: where unseeded requests' seeds come from (random when None)."""

    def __init__(self, device: torch.device | str, salt: int | None = None):
        self.device = torch.device(device)
        self.salt = secrets.randbits(64) if salt is None else salt
        self._vocab_keys: torch.Tensor | None = None          # (vocab,) int64: mix32 of each vocabulary index
        self._staging: dict[torch.dtype, MetaStaging] = {}     # the rows' parameters on their way, by dtype

    def upload(self, x: torch.Tensor, key: str) -> torch.Tensor:
        """A host tensor on the device without waiting for the work queued there (``MetaStaging``: the engine's
        next step, when it looks ahead, and the weight copy in flight)."""
        if self.device.type != "cuda":
            return x.to(self.device)
        staging = self._staging.get(x.dtype)
        if staging is None:
            staging = self._staging[x.dtype] = MetaStaging(self.device, x.dtype)
        return staging.upload(x, key).view(x.shape)

    def seed_of(self, seq) -> int:
        seed = seq.request.sampling.seed
        return seed & M64 if seed is not None else splitmix64(self.salt ^ seq.seq_id)

    def step(self, logits: torch.Tensor, chunks) -> Sampled:
        """The next token of every chunk that samples (one row of ``logits`` (S, vocab) each, in chunk order)."""
        return self.draw(logits, chunks).read()

    def draw(self, logits: torch.Tensor, chunks) -> Drawn:
        """``step`` without waiting: the tokens drawn on the device and on their way to the host (``Drawn``)."""
        seqs = [c.seq for c in chunks if c.sample]
        if all(s.request.sampling.plain for s in seqs):
            return Drawn.of(logits.argmax(-1), None, None)
        return self.draw_rows(logits, [s.request.sampling for s in seqs], [self.seed_of(s) for s in seqs],
                              [len(s.generated) for s in seqs], [s.generated for s in seqs])

    def sample(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], counters: list[int],
               histories: list[list[int]]) -> Sampled:
        """Rows of ``logits`` (S, vocab), each with its parameters, seed, the index of the token it draws (its
        counter) and the tokens it generated so far (for penalties)."""
        return self.draw_rows(logits, params, seeds, counters, histories).read()

    def draw_rows(self, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], counters: list[int],
                  histories: list[list[int]]) -> Drawn:
        """``sample`` without waiting (``Drawn``)."""
        rows = _Rows.of(params, seeds, counters, self.upload)
        x = logits.float()                                                   # (S, V)
        if any(p.penalized for p in params):
            x = _penalize(x, rows, histories, self.upload)
        tokens = x.argmax(-1)                                                # (S,) greedy
        want_logprobs = any(p.logprobs is not None for p in params)
        logp = None
        if rows.any_sampled or want_logprobs:
            x = x / rows.temperature[:, None]
            if any(p.truncated for p in params):
                x = truncate(x, rows.top_k, rows.top_p, rows.min_p)
            logp = x.log_softmax(-1)                                         # (S, V)
        if rows.any_sampled:
            drawn = (logp - self._log_exponentials(rows.keys, x.shape[-1])).argmax(-1)   # (S,)
            tokens = torch.where(rows.sampled, drawn, tokens)
        return Drawn.of(tokens, logp if want_logprobs else None, params)

    def _log_exponentials(self, keys: torch.Tensor, vocab: int) -> torch.Tensor:
        """log E (S, vocab) for E exponential, from each row's 32-bit key (S,) and the vocabulary index."""
        if self._vocab_keys is None or self._vocab_keys.numel() != vocab:
            self._vocab_keys = mix32(torch.arange(vocab, dtype=torch.long, device=self.device))      # (V,)
        h = mix32(keys[:, None] ^ self._vocab_keys[None, :])                                        # (S, V)
        # 23 bits, offset by half a step: w lies in [2**-24, 1 - 2**-24], both exact in float32, so E > 0.
        w = ((h >> 9).float() + 0.5) * 2.0 ** -23                                                    # (S, V)
        return torch.log(-torch.log1p(-w))


@dataclass(slots=True)
class _Rows:
    """Per-row parameters on the device."""

    temperature: torch.Tensor     # (S,) float32; 1 for greedy rows (their logprobs are at temperature 1)
    top_k: torch.Tensor           # (S,) int64; vocab when off
    top_p: torch.Tensor           # (S,) float32; inf when off (a cumulative sum may round to 1 before the end)
    min_p: torch.Tensor           # (S,) float32
    presence: torch.Tensor        # (S,) float32
    frequency: torch.Tensor       # (S,) float32
    keys: torch.Tensor            # (S,) int64: the row's 32-bit random key for this token
    sampled: torch.Tensor         # (S,) bool: not greedy
    any_sampled: bool

    @classmethod
    def of(cls, params: list[SamplingParams], seeds: list[int], counters: list[int],
           upload: Callable[[torch.Tensor, str], torch.Tensor]) -> "_Rows":
        floats = torch.tensor([[1.0 if p.greedy else p.temperature for p in params],
                               [p.top_p if p.top_p < 1 else math.inf for p in params],
                               [p.min_p for p in params], [p.presence_penalty for p in params],
                               [p.frequency_penalty for p in params],
                               [0.0 if p.greedy else 1.0 for p in params]], dtype=torch.float32)            # (6, S)
        keys = [splitmix64(splitmix64(seed) ^ n) for seed, n in zip(seeds, counters)]
        ints = torch.tensor([[p.top_k if p.top_k > 0 else 1 << 62 for p in params],
                             [(k ^ (k >> 32)) & M32 for k in keys]], dtype=torch.long)                      # (2, S)
        floats, ints = upload(floats, "floats"), upload(ints, "ints")
        return cls(temperature=floats[0], top_p=floats[1], min_p=floats[2], presence=floats[3],
                   frequency=floats[4], sampled=floats[5] > 0, top_k=ints[0], keys=ints[1],
                   any_sampled=any(not p.greedy for p in params))


def _penalize(x: torch.Tensor, rows: _Rows, histories: list[list[int]],
              upload: Callable[[torch.Tensor, str], torch.Tensor]) -> torch.Tensor:
    """Logits (S, V) less each row's presence and frequency penalties over its generated tokens."""
    s, v = x.shape
    width = max((len(h) for h in histories), default=0)
    if width == 0:
        return x
    idx = torch.full((s, width), v, dtype=torch.long)             # (S, L) padded with an extra column, dropped below
    for r, h in enumerate(histories):
        idx[r, :len(h)] = torch.tensor(h, dtype=torch.long)
    idx = upload(idx, "histories")
    counts = torch.zeros(s, v + 1, device=x.device).scatter_add_(1, idx, torch.ones(idx.shape, device=x.device))
    counts = counts[:, :v]                                                                       # (S, V)
    return x - rows.frequency[:, None] * counts - rows.presence[:, None] * (counts > 0)


def truncate(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Logits (S, V) with -inf outside each row's kept set: its ``top_k`` (S,) most likely tokens, of those the
    smallest most-likely prefix holding ``top_p`` (S,) of their renormalised mass, and only tokens at least
    ``min_p`` (S,) times as likely as the most likely one. The most likely token is always kept."""
    v = x.shape[-1]
    sx, order = x.sort(dim=-1, descending=True, stable=True)                      # (S, V), (S, V)
    rank = torch.arange(v, device=x.device)                                    # (V,)
    keep = rank[None, :] < top_k[:, None]                                      # (S, V)
    sx = sx.masked_fill(~keep, -math.inf)
    p = sx.softmax(-1)                                                         # renormalised over the top-k
    keep &= (p.cumsum(-1) - p) < top_p[:, None]                                # mass of the more likely tokens
    keep &= sx >= sx[:, :1] + torch.log(min_p)[:, None]                        # log 0 = -inf keeps all
    keep[:, 0] = True
    mask = torch.empty_like(keep).scatter_(-1, order, keep)                    # back to vocabulary order
    return x.masked_fill(~mask, -math.inf)


@dataclass(slots=True)
class Drawn:
    """A step's tokens drawn on the device: ``tokens`` (S,) int64 there (what the engine's next step reads its
    sequences' new tokens from when it looks ahead), and a copy on its way to the host that ``read`` waits for."""

    tokens: torch.Tensor                          # (S,) int64, on the device
    host: torch.Tensor                            # (S,) int64, or (S, 2 + 2k) float64 with log-probabilities
    copied: torch.cuda.Event | None               # the copy to ``host`` is done (None: on the CPU, done)
    params: list[SamplingParams] | None           # per row, when ``host`` holds log-probabilities

    @classmethod
    def of(cls, tokens: torch.Tensor, logp: torch.Tensor | None, params: list[SamplingParams] | None) -> Drawn:
        """Tokens (S,) and, with ``logp`` (S, V), the chosen and top log-probabilities packed into one tensor, its
        copy to the host started (pinned memory, not blocking)."""
        packed = tokens
        if logp is not None:
            k = max((p.logprobs or 0) for p in params)
            parts = [tokens[:, None].double(), logp.gather(1, tokens[:, None]).double()]          # (S, 1) each
            if k:
                top = logp.topk(k, -1)                                                             # (S, k) each
                parts += [top.indices.double(), top.values.double()]
            packed = torch.cat(parts, 1).clamp_min(LOGPROB_FLOOR)            # (S, 2 + 2k): ids are exact in float64
        with_logprobs = params if logp is not None else None
        if packed.device.type != "cuda":
            return cls(tokens, packed, None, with_logprobs)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        host.copy_(packed, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        return cls(tokens, host, copied, with_logprobs)

    def read(self) -> Sampled:
        """Wait for the tokens (the engine's one synchronisation with the device a step) and unpack them."""
        if self.copied is not None:
            self.copied.synchronize()
        if self.params is None:
            return Sampled(self.host.tolist())
        k = (self.host.shape[1] - 2) // 2
        toks, out = [], []
        for row, p in zip(self.host.tolist(), self.params):
            toks.append(int(row[0]))
            if p.logprobs is None:
                out.append(None)
                continue
            n = p.logprobs
            out.append(TokenLogprobs(row[1], tuple((int(i), lp) for i, lp in zip(row[2:2 + n], row[2 + k:2 + k + n]))))
        return Sampled(toks, out)


# ---------------------------------------------------------------------------------------------------------------
# Stopping


class StopConditions:
    """When a sequence stops early: its request's stop token ids, the model's end-of-sequence ids (``eos_ids``)
    unless ``ignore_eos``, and its stop strings, checked on its generated text. ``tokenizer``: a callable returning
    the model's tokenizer (or None), called once, when the first stop string needs it."""

    def __init__(self, eos_ids=(), tokenizer=None):
        self.eos_ids = frozenset(eos_ids)
        self._load, self._tokenizer, self._loaded = tokenizer, None, tokenizer is None

    @classmethod
    def of(cls, src) -> "StopConditions":
        """The model source's end-of-sequence ids and tokenizer."""
        return cls(getattr(src, "eos_token_ids", ()), getattr(src, "tokenizer", None))

    @property
    def tokenizer(self):
        if not self._loaded:
            self._tokenizer, self._loaded = self._load(), True
        return self._tokenizer

    def validate(self, request, where: str = "") -> None:
        if request.sampling.stop and self.tokenizer is None:
            raise MemintentError(f"{where}request {request.id}: stop strings need the model's tokenizer, and this "
                                 "model has none (a Hugging Face folder with tokenizer.json): give stop_token_ids")

    def stopped(self, seq, token: int) -> bool:
        """Whether ``token``, just appended to ``seq``, ends it; a stop string found sets ``seq.stop_text`` to the
        generated text cut before it."""
        req = seq.request
        if token in req.stop_token_ids or (token in self.eos_ids and not req.sampling.ignore_eos):
            return True
        if not req.sampling.stop:
            return False
        text = self.tokenizer.decode(seq.generated, skip_special_tokens=True)
        at = min((i for i in (text.find(s) for s in req.sampling.stop) if i >= 0), default=-1)
        if at < 0:
            return False
        seq.stop_text = text[:at]
        return True
