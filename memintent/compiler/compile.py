"""Model reference -> verified plan: resolve, trace, run the scheduling passes."""

from __future__ import annotations

from typing import Callable

from memintent.compiler.frontend import TraceSpec, trace
from memintent.errors import MemintentError
from memintent.ir.model import HardwareProfile, Program, RunShape
from memintent.models.refs import resolve
from memintent.passes import schedule_program


def trace_ref(ref: str, shape: RunShape, dtype: str | None = None, allow_code: bool = True,
              progress: Callable[[str], None] | None = None) -> Program:
    say = progress or (lambda m: None)
    say(f"resolving {ref}")
    src = resolve(ref, dtype=dtype, allow_code=allow_code)
    if src.vocab_size is None and shape.seq < 1:
        raise MemintentError("--seq must be at least 1")
    spec = TraceSpec(
        name=ref.removeprefix("hf:").removeprefix("py:").rstrip("/").rsplit("/", 1)[-1],
        ref=src.model_ref(), build=lambda n: src.build("meta", num_layers=n),
        inputs=src.example_inputs(shape.batch, shape.seq, "meta"), kwargs=src.forward_kwargs(),
        layers_path=src.layers_path, num_layers=src.num_layers, n_kv_heads=src.n_kv_heads, head_dim=src.head_dim,
    )
    return trace(spec, shape, progress=say)


def compile_model(ref: str, *, budget_bytes: int | None, hardware: HardwareProfile, batch: int = 1, seq: int = 64,
                  dtype: str | None = None, allow_code: bool = True,
                  depth: int | None = None, quant: str = "none", progress: Callable[[str], None] | None = None) -> Program:
    for name, v, lo in (("--batch", batch, 1), ("--seq", seq, 1), ("--depth", 1 if depth is None else depth, 1)):
        if v < lo:
            raise MemintentError(f"{name} {v} must be at least {lo}" + (
                " (leave --depth out to let the cost model choose)" if name == "--depth" else ""))
    shape = RunShape(batch=batch, seq=seq)
    program = trace_ref(ref, shape, dtype=dtype, allow_code=allow_code, progress=progress)
    say = progress or (lambda m: None)
    return schedule_program(program, budget_bytes, hardware, on_pass=lambda n: say(f"pass {n}"), depth=depth,
                            quant=quant)
