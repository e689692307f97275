"""The serving engine: a paged KV pool in the plan's KV region, continuous batching with chunked prefill over the
streamed weight schedule, preemption by cost (swap or recompute), and pipelines of parts over several GPUs.
``Engine`` is the entry point."""

from memintent.engine.core import Engine, EngineStats, RunOptions, StepRecord
from memintent.engine.sequence import Request, RequestOutput

__all__ = ["Engine", "EngineStats", "RunOptions", "StepRecord", "Request", "RequestOutput"]
