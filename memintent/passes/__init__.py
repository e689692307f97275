"""IR -> IR passes, one file each, run in this order by ``schedule_program``."""

from __future__ import annotations

from typing import Callable

from memintent.ir.model import HardwareProfile, Program
from memintent.passes.actions import ACTIONS
from memintent.passes.costs import COSTS
from memintent.passes.lifetimes import LIFETIMES
from memintent.passes.manager import Pass, run_passes
from memintent.passes.prefetch import PREFETCH
from memintent.passes.residency import RESIDENCY, residency_pass
from memintent.passes.verify import VERIFY

PIPELINE: tuple[Pass, ...] = (LIFETIMES, COSTS, RESIDENCY, PREFETCH, ACTIONS, VERIFY)


def schedule_program(program: Program, budget_bytes: int | None, hardware: HardwareProfile,
                     on_pass: Callable[[str], None] | None = None, depth: int | None = None,
                     quant: str = "none") -> Program:
    """Traced program -> verified plan for ``budget_bytes`` of HBM (None: the whole card).

    ``depth`` forces the number of stream slots; by default the residency pass picks it from the cost model.
    ``quant`` is the bit-width policy for streamed blocks (none, int8, int4, auto)."""
    p = program.model_copy(update={"budget_bytes": budget_bytes, "hardware": hardware})
    pipeline = PIPELINE if depth is None and quant == "none" else tuple(
        residency_pass(depth, quant) if q.name == "residency" else q for q in PIPELINE)
    return run_passes(p, pipeline, on_pass)


__all__ = ["PIPELINE", "schedule_program", "run_passes", "Pass"]
