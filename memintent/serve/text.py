"""A choice's text as its tokens arrive: what is safe to send now, and the whole of it at the end.

A streamed response must add up to the text the same request gets without streaming. The final text is the
decoded tokens (special tokens skipped), cut before a stop string when one ended the request. While tokens still
arrive, the text sent holds back an incomplete UTF-8 character (decoded as U+FFFD) and any tail that could be the
start of a stop string, so nothing sent is later cut.
"""

from __future__ import annotations


def held_back(text: str, stops) -> int:
    """Characters at the end of ``text`` that could begin one of ``stops`` (the longest such tail)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class TextStream:
    """One choice's text. ``tokenizer`` None: a model without one, whose text is empty."""

    def __init__(self, tokenizer, stops=()):
        self.tokenizer, self.stops = tokenizer, tuple(stops)
        self.token_ids: list[int] = []
        self.sent = 0                 # characters sent so far
        self.text = ""                # the final text, once finished

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def push(self, token_ids: list[int], finished: bool = False, stop_text: str | None = None) -> str:
        """Add tokens; returns the text that may be sent now. ``finished``: these were the last (``stop_text``: the
        text cut before the stop string that ended it, which is then the whole text)."""
        self.token_ids += token_ids
        if finished:
            text = stop_text if stop_text is not None else self.decode(self.token_ids)
            self.text = text
        else:
            text = self.decode(self.token_ids).rstrip("\ufffd")        # an incomplete character waits
            text = text[:len(text) - held_back(text, self.stops)]
        if len(text) <= self.sent:
            return ""
        piece, self.sent = text[self.sent:], len(text)
        return piece

    def token_text(self, token_id: int) -> str:
        """One token's own text (logprobs name tokens by it); ``token_id:N`` without a tokenizer."""
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])
