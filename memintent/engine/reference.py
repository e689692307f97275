"""``generate --verify``: the engine's tokens and logits against an independent reference, the resident model in
its own dtype running each request alone, densely (its own attention, no KV cache, no quantization), teacher-forced
on the tokens the engine generated."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memintent.models.plan_model import resident_model


@dataclass(frozen=True, slots=True)
class Agreement:
    requests: int
    tokens: int
    agreeing: int                 # generated tokens equal to the reference's greedy choice at that position
    max_logit_error: float        # max |engine logit - reference logit| over the compared rows

    @property
    def fraction(self) -> float:
        return self.agreeing / self.tokens if self.tokens else 1.0


def reference_logits(src, model, prompt: tuple[int, ...], generated: list[int], device) -> torch.Tensor:
    """(len(generated), vocab) float32: the reference's logits at each position that produced a generated token."""
    tokens = list(prompt) + generated[:-1]
    ids = torch.tensor([tokens], dtype=torch.long, device=device)                 # (1, L)
    rows = torch.arange(len(prompt) - 1, len(tokens), device=device)              # (len(generated),)
    with torch.no_grad():
        out = src.dense_logits(model, ids, rows)                                 # (len(generated), vocab)
    return out.float().cpu()


def compare(src, device, requests, outputs, engine_logits: dict[str, list[torch.Tensor]]) -> Agreement:
    """Teacher-forced comparison of the tracked requests (those with ``engine_logits``)."""

    by_id = {o.id: o for o in outputs}
    model = resident_model(src, device)
    tokens = agreeing = 0
    err = 0.0
    try:
        for r in requests:
            if r.id not in engine_logits or r.id not in by_id:
                continue
            gen = by_id[r.id].token_ids
            ref = reference_logits(src, model, r.prompt_ids, gen, device)           # (n, vocab)
            mine = torch.stack(engine_logits[r.id])                               # (n, vocab)
            agreeing += int((ref.argmax(-1) == torch.tensor(gen)).sum())
            tokens += len(gen)
            err = max(err, float((ref - mine).abs().max()))
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return Agreement(requests=len(engine_logits), tokens=tokens, agreeing=agreeing, max_logit_error=err)


__all__ = ["Agreement", "compare", "reference_logits"]
