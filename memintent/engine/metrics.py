"""What a serving run measured, summarised: throughput, time to first token, time per output token, KV pool use
over time and preemptions by kind (``generate`` prints it, ``--json`` writes it, benchmarks read it)."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from memintent.engine.core import EngineStats
from memintent.engine.sequence import RequestOutput

SPARK = "▁▂▃▄▅▆▇█"


def _quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


@dataclass
class ServeReport:
    device: str
    requests: int
    generated_tokens: int
    prompt_tokens: int
    total_s: float
    tokens_per_s: float                 # generated tokens over the whole run
    decode_tokens_per_s: float          # decode tokens over the time of the steps that decoded
    full_decode_tokens_per_s: float     # the decode rate of steps at full concurrency (>= 90 % of the run's most
                                        # decoding sequences): what a wave's decode phase runs at
    steps: int
    step_median_s: float
    predicted_step_s: float
    ttft_median_s: float | None
    ttft_p99_s: float | None
    tpot_median_s: float | None
    tpot_p99_s: float | None
    num_pages: int
    kv_peak_pages: int
    kv_mean_pages: float
    kv_over_time: list[int] = field(default_factory=list)     # used pages after each step
    preemptions: dict[str, int] = field(default_factory=dict)
    spare_steps: int = 0                # steps that copied streamed blocks from the pool's spare pages
    spare_blocks_max: int = 0           # the most blocks one step copied from there
    h2d_gbps: float = 0.0
    streamed_bytes: int = 0
    link_bytes: int = 0                 # bytes over the host link per step: streamed copies and mapped reads
    step_floor_s: float = 0.0           # link bytes per step / measured pinned H2D
    warm_s: float = 0.0                 # the engine's start before the run: kernels compiled, decode graphs captured
    peak_hbm_bytes: int | None = None
    budget_bytes: int = 0
    predicted_peak_bytes: int = 0
    agreement: float | None = None      # --verify: greedy tokens equal to the reference's
    max_logit_error: float | None = None
    verified_requests: int = 0

    def sparkline(self, width: int = 48) -> str:
        xs = self.kv_over_time
        if not xs:
            return ""
        step = max(1, len(xs) // width)
        cols = [max(xs[i:i + step]) for i in range(0, len(xs), step)]
        return "".join(SPARK[min(len(SPARK) - 1, int(c / max(self.num_pages - 1, 1) * (len(SPARK) - 1) + 0.5))]
                       for c in cols)


def _per(num: float, den: float) -> float:
    return num / den if den else 0.0


def _median(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else 0.0


def _full_concurrency_rate(decode_steps) -> float:
    """Decode tokens/s over the steps that ran at (within 10 % of) the run's highest decode concurrency: the steady
    state the plan predicts, without the ramp-up and the tail."""
    top = max((s.decode_tokens for s in decode_steps), default=0)
    return _median(s.decode_tokens / s.time_s for s in decode_steps if s.decode_tokens >= 0.9 * top)


def summarize(stats: EngineStats, outputs: list[RequestOutput], *, total_s: float, device: str, program,
              prompt_tokens: int) -> ServeReport:
    steps = stats.steps
    generated = sum(len(o.token_ids) for o in outputs)
    decode_steps = [s for s in steps if s.decode_tokens]
    ttft = [o.ttft_s for o in outputs]
    tpot = [o.tpot_s for o in outputs if o.tpot_s is not None]
    used = [s.used_pages for s in steps]
    kinds = dict(Counter(p.kind for p in stats.preemptions))
    return ServeReport(
        device=device, requests=len(outputs), generated_tokens=generated, prompt_tokens=prompt_tokens,
        total_s=total_s, tokens_per_s=_per(generated, total_s),
        decode_tokens_per_s=_per(sum(s.decode_tokens for s in decode_steps), sum(s.time_s for s in decode_steps)),
        full_decode_tokens_per_s=_full_concurrency_rate(decode_steps),
        steps=len(steps), step_median_s=_median(s.time_s for s in steps),
        predicted_step_s=program.generation.decode_step_s,
        ttft_median_s=_quantile(ttft, 0.5), ttft_p99_s=_quantile(ttft, 0.99),
        tpot_median_s=_quantile(tpot, 0.5), tpot_p99_s=_quantile(tpot, 0.99),
        num_pages=stats.num_pages, kv_peak_pages=max(used, default=0),
        kv_mean_pages=statistics.fmean(used) if used else 0.0, kv_over_time=used, preemptions=kinds,
        spare_steps=sum(1 for s in stats.steps if s.spare_blocks),
        spare_blocks_max=max((s.spare_blocks for s in stats.steps), default=0),
        streamed_bytes=program.prediction.streamed_bytes,
        link_bytes=program.prediction.link_bytes,
        budget_bytes=program.budget_bytes or 0,
        predicted_peak_bytes=program.prediction.peak_hbm_bytes)
