"""What ``GET /metrics`` reports, in Prometheus' text exposition format (version 0.0.4).

The engine thread updates a ``ServerMetrics`` after every step; the web thread counts what it refuses and reads
the text. Rates and step times are over the last ``window_s`` seconds of steps. The PCIe floor of a step is the
plan's streamed bytes over the pinned host-to-device rate measured when the server started.
"""

from __future__ import annotations

import collections
import statistics
from dataclasses import dataclass, field
from time import perf_counter

PREFIX = "memintent_"


@dataclass
class ServerMetrics:
    num_pages: int                   # the KV pool's blocks, the null page included
    floor_s: float = 0.0              # streamed bytes per step / measured pinned H2D (0: nothing streams)
    predicted_step_s: float = 0.0     # the plan's decode step
    window_s: float = 10.0
    started_s: float = field(default_factory=perf_counter)
    generated_tokens: int = 0
    prompt_tokens: int = 0
    steps: int = 0
    used_pages: int = 0
    spare_pages: int = 0             # pool pages holding streamed blocks (engine/spare_pages.py)
    waiting: int = 0
    running: int = 0
    swapped: int = 0
    preemptions: collections.Counter = field(default_factory=collections.Counter)   # by kind
    finished: collections.Counter = field(default_factory=collections.Counter)      # by finish reason
    rejected: collections.Counter = field(default_factory=collections.Counter)      # by HTTP status
    recent: collections.deque = field(default_factory=collections.deque)            # (end_s, time_s, tokens)

    def observe(self, records, scheduler, pool, generated: int) -> None:
        """After a step (engine thread): its records, the queues, the pool and the tokens it gave requests."""
        now = perf_counter()
        for i, r in enumerate(records):          # one per engine step; the tokens are the last one's
            self.steps += 1
            self.preemptions.update(p.kind for p in r.preemptions)
            self.recent.append((now, r.time_s, generated if i == len(records) - 1 else 0))
        self.generated_tokens += generated
        while self.recent and self.recent[0][0] < now - self.window_s:
            self.recent.popleft()
        self.used_pages, self.spare_pages = pool.used_pages, pool.spare_pages
        self.waiting, self.running = len(scheduler.waiting), len(scheduler.running) + len(scheduler.resuming)
        self.swapped = len(scheduler.swapped)

    # The web thread reads what the engine thread changes: each reader copies first (one C call, atomic under the
    # GIL) rather than iterating a deque or a dict that may change under it.
    def tokens_per_s(self) -> float:
        now = perf_counter()
        span_s = min(self.window_s, now - self.started_s)
        recent = [x for x in list(self.recent) if x[0] >= now - self.window_s]
        return sum(x[2] for x in recent) / span_s if span_s > 0 else 0.0

    def step_median_s(self) -> float | None:
        times = [x[1] for x in list(self.recent)]
        return statistics.median(times) if times else None

    def text(self) -> str:
        """The exposition text."""
        step_s = self.step_median_s()
        usable = max(self.num_pages - 1, 1)
        finished, preemptions, rejected = dict(self.finished), dict(self.preemptions), dict(self.rejected)
        rows = [
            ("generated_tokens_total", "counter", "Tokens generated since the server started.",
             [("", self.generated_tokens)]),
            ("prompt_tokens_total", "counter", "Prompt tokens of the requests admitted.", [("", self.prompt_tokens)]),
            ("generation_tokens_per_second", "gauge", f"Tokens generated per second over the last {self.window_s:g} s.",
             [("", self.tokens_per_s())]),
            ("requests_running", "gauge", "Requests with KV pages in the pool.", [("", self.running)]),
            ("requests_waiting", "gauge", "Requests waiting to be admitted (or to recompute).", [("", self.waiting)]),
            ("requests_swapped", "gauge", "Requests whose KV pages wait in host memory.", [("", self.swapped)]),
            ("kv_pool_pages_used", "gauge", "KV pool pages owned by requests.", [("", self.used_pages)]),
            ("kv_pool_pages_holding_weights", "gauge", "Spare KV pool pages holding streamed blocks while no "
             "request waits.", [("", self.spare_pages)]),
            ("kv_pool_pages_total", "gauge", "KV pool pages requests can own.", [("", usable)]),
            ("kv_pool_usage_ratio", "gauge", "Fraction of the KV pool in use.", [("", self.used_pages / usable)]),
            ("preemptions_total", "counter", "Preemptions by kind.",
             [(f'{{kind="{k}"}}', preemptions.get(k, 0)) for k in ("swap", "recompute")]),
            ("requests_finished_total", "counter", "Requests finished, by finish reason.",
             [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(finished.items())]),
            ("requests_rejected_total", "counter", "Requests refused, by HTTP status.",
             [(f'{{status="{k}"}}', v) for k, v in sorted(rejected.items())]),
            ("steps_total", "counter", "Engine steps run.", [("", self.steps)]),
            ("step_seconds", "gauge", f"Median engine step over the last {self.window_s:g} s.",
             [("", step_s)] if step_s is not None else []),
            ("step_predicted_seconds", "gauge", "The plan's predicted decode step.", [("", self.predicted_step_s)]),
            ("step_floor_seconds", "gauge", "A step's PCIe floor: bytes over the host link / measured pinned H2D rate.",
             [("", self.floor_s)]),
            ("step_over_floor_ratio", "gauge", "Median step / its PCIe floor (absent when nothing streams).",
             [("", step_s / self.floor_s)] if step_s is not None and self.floor_s > 0 else []),
        ]
        out = []
        for name, kind, help_text, samples in rows:
            out += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
            out += [f"{PREFIX}{name}{labels} {_number(v)}" for labels, v in samples]
        return "\n".join(out) + "\n"


def _number(v) -> str:
    return str(v) if isinstance(v, int) else repr(float(v))
