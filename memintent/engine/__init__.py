"""The serving engine: a paged KV pool in the plan's KV region, continuous batching with chunked prefill over the
streamed weight schedule, and preemption by cost (swap or recompute). ``Engine`` is the entry point."""

from memintent.engine.engine import Engine, EngineStats, StepRecord
from memintent.engine.sequence import Request, RequestOutput

__all__ = ["Engine", "EngineStats", "StepRecord", "Request", "RequestOutput"]
