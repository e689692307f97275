"""A step's integers on the host, built once per step from its ``Batch``: the token ids, positions and where each
token's key and value go, which rows give logits, and, per sequence, the chunk and page table the attention reads.
The runner copies them to the device in one non-blocking copy from pinned staging (``kv.paged_kernel.MetaStaging``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from memintent.engine.pages import PagePool
from memintent.engine.scheduler import Batch
from memintent.engine.sequence import PENDING
from memintent.errors import MemintentError
from memintent.kv.paged_kernel import interpreting
from memintent.runtime.quant import triton_available

ATTENTION_BACKENDS = ("auto", "kernel", "reference")


def use_kernel(backend: str, device: torch.device) -> bool:
    """Whether a step's attention runs the Triton kernel (``kv.paged_kernel``) rather than the reference (gather +
    SDPA): ``auto`` takes the kernel on CUDA when Triton is there; the CPU backend always runs the reference."""
    if backend not in ATTENTION_BACKENDS:
        raise MemintentError(f"attention backend {backend!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "kernel" and device.type != "cuda" and not interpreting():
        raise MemintentError(f"the attention kernel runs on CUDA (or in Triton's interpreter, TRITON_INTERPRET=1), "
                             f"not {device}: use the reference backend")
    return backend == "kernel" or (backend == "auto" and device.type == "cuda" and triton_available())


@functools.cache
def _offsets(page_tokens: int) -> list[int]:
    """0 .. page_tokens - 1: the slots of one page, sliced for a run of positions within it."""
    return list(range(page_tokens))


@dataclass(slots=True)
class StepLists:
    """One step's integers, token-major (T tokens) and sequence-major (S sequences, in chunk order)."""

    ids: list[int] = field(default_factory=list)             # (T,) token ids
    positions: list[int] = field(default_factory=list)       # (T,) each token's position in its sequence
    write_pages: list[int] = field(default_factory=list)     # (T,) the page its key and value go to
    write_offsets: list[int] = field(default_factory=list)   # (T,) its slot in that page
    rows: list[int] = field(default_factory=list)            # (S_sampled,) tokens whose logits are kept
    starts: list[int] = field(default_factory=list)          # (S,) each chunk's first token among the T
    lengths: list[int] = field(default_factory=list)         # (S,) its tokens this step
    contexts: list[int] = field(default_factory=list)        # (S,) its keys once this step's are written
    tables: list[list[int]] = field(default_factory=list)    # (S,) its page table
    holes: list[int] = field(default_factory=list)           # tokens whose id is PENDING: read on the device
    hole_seqs: list[int] = field(default_factory=list)       # the sequence of each (its id)

    @classmethod
    def of(cls, batch: Batch, pool: PagePool, page_tokens: int) -> StepLists:
        out = cls()
        offsets = _offsets(page_tokens)
        for c in batch.chunks:
            table = pool.table(c.seq.seq_id)
            a, b = c.start, c.start + c.length                # the chunk's positions [a, b)
            out.starts.append(len(out.ids))
            out.lengths.append(c.length)
            out.contexts.append(b)
            out.tables.append(table)
            # By slices and whole pages, not token by token: a prompt step's thousands of tokens are host time
            # the device waits for.
            out.ids.extend(c.seq.tokens[a:b])
            out.positions.extend(range(a, b))
            for page in range(a // page_tokens, (b - 1) // page_tokens + 1):
                lo, hi = max(a, page * page_tokens), min(b, (page + 1) * page_tokens)
                out.write_pages.extend([table[page]] * (hi - lo))
                out.write_offsets.extend(offsets[lo % page_tokens:lo % page_tokens + hi - lo])
            if c.sample:
                out.rows.append(len(out.ids) - 1)
                if c.seq.tokens[b - 1] == PENDING:     # sampled by the step before, still on the device
                    out.holes.append(len(out.ids) - 1)
                    out.hole_seqs.append(c.seq.seq_id)
        return out

    @property
    def decode_only(self) -> bool:
        """Every chunk is one token that gives logits: the shape a decode step's CUDA graph replays."""
        return bool(self.lengths) and all(n == 1 for n in self.lengths) and len(self.rows) == len(self.lengths)


@dataclass(slots=True)
class Carried:
    """The step before's sampled tokens, still on the device, for a step launched before the host read them (the
    engine looking ahead): ``tokens`` (S,) int64, and each sequence's row in it."""

    tokens: torch.Tensor
    rows: dict[int, int]        # sequence id -> row of ``tokens``

    @classmethod
    def of(cls, tokens: torch.Tensor, batch: Batch) -> Carried:
        return cls(tokens, {c.seq.seq_id: i for i, c in enumerate(c for c in batch.chunks if c.sample)})


__all__ = ["ATTENTION_BACKENDS", "Carried", "StepLists", "use_kernel"]
