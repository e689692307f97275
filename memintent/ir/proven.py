"""A plan that has been verified: the value the engine and the runtime accept as already proven.

``passes.verify.prove`` is what makes one, after the plan (or every part of a pipeline, and the promises the parts
make each other) kept every rule of the verifier. Holding a ``Proven`` means the proof ran once; nothing below it
runs it again. Run-time checks that need the machine (free device memory, host memory, the model's weights against
the plan) are not part of the proof and still run where the resources are taken.
"""

from __future__ import annotations

from dataclasses import dataclass

from memintent.errors import MemintentError
from memintent.ir.model import Pipeline, Program


@dataclass(frozen=True, slots=True)
class Proven:
    """A verified plan (``program``), or a verified pipeline (``pipeline``; ``program`` is then its first part)."""

    program: Program
    pipeline: Pipeline | None = None

    @property
    def parts(self) -> int:
        return len(self.pipeline.parts) if self.pipeline is not None else 1

    def part(self, index: int) -> Proven:
        """Part ``index`` of a pipeline as a proven plan of its own (each part was verified under its budget)."""
        if self.pipeline is None:
            if index != 0:
                raise MemintentError(f"part {index}: {self.program.name} is one plan, not a pipeline")
            return self
        return Proven(self.pipeline.parts[index])

    @property
    def name(self) -> str:
        return self.pipeline.name if self.pipeline is not None else self.program.name

    def generation_plan(self, what: str) -> Proven:
        """Itself, if it plans generation (``compile --objective``); else a one-line error naming ``what``."""
        if self.program.generation is None or self.program.kv_pool is None:
            raise MemintentError(f"{what} is not a generation plan: compile it with --objective throughput|latency")
        return self


def require_proven(plan: object, what: str) -> Proven:
    """``plan`` as a ``Proven``, or a one-line error: the caller must load it through ``passes.verify.prove``."""
    if not isinstance(plan, Proven):
        raise MemintentError(f"{what} takes a verified plan: load it with memintent.passes.verify.prove(...) "
                             f"(got {type(plan).__name__})")
    return plan


__all__ = ["Proven", "require_proven"]
