"""Requests that stop early at a token they generate: for tests of where a sequence stops."""

from __future__ import annotations

import dataclasses


def cut_at_stops(requests, outputs: dict) -> tuple[list, dict]:
    """Every other request stops at the token it generates halfway (``outputs``: each request's tokens without
    stops). Returns the requests and, per request id, the tokens and finish reason it must return."""
    cut, expect = [], {}
    for i, r in enumerate(requests):
        toks = outputs[r.id]
        if i % 2 or len(toks) < 3:
            cut.append(r)
            expect[r.id] = (toks, "length")
            continue
        stop = toks[len(toks) // 2]
        cut.append(dataclasses.replace(r, stop_token_ids=(stop,)))
        expect[r.id] = (toks[:toks.index(stop) + 1], "stop")
    return cut, expect
