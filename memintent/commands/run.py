"""``memintent run``: execute a plan's forwards, measure them against the plan and the floor, optionally verify.

The plan is a plan file or its IR text (``memintent dump``), verified before anything runs. What one forward
reports: wall time, stall (compute waiting on a copy), bytes copied, achieved H2D GB/s, host overhead per block,
the plan's prediction and the PCIe floor: streamed bytes / measured pinned H2D bandwidth, the time the copies
alone take. ``--verify`` also runs the same inputs through the resident model (its forward time is shown in its
own column) and, for a plan without quantization, exits 1 on any difference in the logits.

Inputs: random token ids of ``--tokens BATCHxSEQ`` (default: the plan's shape), or, for a plan naming a ``py:``
factory, the factory's own example inputs (``--tokens`` does not apply to them).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from rich.console import Console
from rich.table import Table

from memintent.errors import MemintentError
from memintent.ir.model import Program, Quant, Residency
from memintent.ir.plan_file import check_writable, load_program, write_atomic
from memintent.ir.proven import Proven
from memintent.models.plan_model import resident_model, source_for
from memintent.models.source import ModelSource
from memintent.passes.verify import prove
from memintent.runtime.device import as_fault, pick_device, sync_compute
from memintent.runtime.executor import attach, proven_shape_error
from memintent.runtime.host_store import HostStore
from memintent.runtime.memory import PeakMeter
from memintent.runtime.profile import measure_h2d_gbps, time_forward
from memintent.see.perfetto import write_run_trace
from memintent.units import fmt_bytes, fmt_s, parse_tokens


@dataclass
class RunReport:
    device: str
    inputs: str                        # what each forward was given, for people: "tokens 1x64", "example inputs ..."
    tokens: str | None = None          # BATCHxSEQ of the random token ids; None for a py: factory's own inputs
    forwards: list[dict] = field(default_factory=list)
    h2d_gbps: float = 0.0
    streamed_bytes: int = 0
    pcie_floor_s: float = 0.0          # streamed bytes / measured pinned H2D: the copies alone
    resident_s: float | None = None    # the resident model's forward (--verify), None when not measured
    predicted_s: float = 0.0
    peak_hbm_bytes: int | None = None
    predicted_peak_bytes: int = 0
    budget_bytes: int = 0
    max_abs_diff: float | None = None
    identical: bool | None = None


@dataclass
class _Forward:
    """What the forwards run on: the model source, its inputs and keyword arguments, on ``device``."""

    proven: Proven
    src: ModelSource
    device: torch.device
    inputs: tuple
    kwargs: dict


def load_verified(path: str) -> Proven:
    """A plan file or IR text, verified once: both are untrusted input, so only what verifies runs. A pipeline file
    is refused in one line (``load_program``)."""
    return prove(load_program(path))


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{'x'.join(map(str, x.shape)) or 'scalar'} {str(x.dtype).removeprefix('torch.')}"
    return type(x).__name__


def _inputs(src: ModelSource, program: Program, args, device: torch.device) -> tuple[tuple, str, str | None]:
    """The forward's positional inputs on ``device``, how to describe them, and the BATCHxSEQ of token ids."""
    if src.own_inputs:
        own = src.example_inputs(program.shape.batch, program.shape.seq, "cpu")
        what = "the factory's example inputs " + ", ".join(_describe(x) for x in own)
        if args.tokens:
            raise MemintentError(f"--tokens {args.tokens}: the plan names a py: factory ({program.model.ref}), which "
                                 f"runs on {what}; leave --tokens out")
        return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in own), what, None
    batch, seq = parse_tokens(args.tokens) if args.tokens else (program.shape.batch, program.shape.seq)
    why = proven_shape_error(program, [(batch, seq)])
    if why is not None:   # before the host store is filled: the plan's proof says nothing about this shape
        raise MemintentError(f"--tokens {batch}x{seq}: {why}")
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, src.vocab_size or 2, (batch, seq), generator=gen).to(device)   # (B, S) token ids
    return (ids,), f"tokens {batch}x{seq}", f"{batch}x{seq}"


def _resident_logits(fw: _Forward, forwards: int) -> tuple[float, torch.Tensor]:
    """The resident model's median forward time and logits (CPU float32); the model is released on return."""
    ref = resident_model(fw.src, fw.device)
    time_s, out = time_forward(lambda: ref(*fw.inputs, **fw.kwargs), fw.device, max(forwards, 1))
    return time_s, fw.src.logits(out).float().cpu()


def _resident_reference(fw: _Forward, forwards: int, rep: RunReport) -> torch.Tensor:
    """The resident model's logits for the same inputs, timing its forward into ``rep``."""
    with torch.no_grad():
        rep.resident_s, logits = _resident_logits(fw, forwards)
    if fw.device.type == "cuda":
        torch.cuda.empty_cache()   # the resident model is gone: hand its memory back before the arena
    return logits


def _streamed_forwards(fw: _Forward, store, args, rep: RunReport) -> torch.Tensor:
    """Run ``args.forwards`` streamed forwards under the plan, recording each into ``rep``; the last logits."""
    model = fw.src.build("meta")
    meter = PeakMeter(fw.device, fw.proven.program.arena.size_bytes)
    handle = attach(model, fw.proven, fw.device, check=args.check, host_store=store, model_checked=True)
    try:
        with torch.no_grad():
            for _ in range(args.forwards):
                t = time.perf_counter()
                with meter:
                    out = model(*fw.inputs, **fw.kwargs)
                sync_compute(fw.device)
                wall = time.perf_counter() - t
                st = handle.last_stats
                rep.forwards.append({"wall_s": wall, "stall_s": st.stall_s, "bytes_copied": st.bytes_copied,
                                     "copy_gbps": st.copy_gbps,
                                     "host_overhead_per_block_s": st.host_overhead_per_block_s})
            logits = fw.src.logits(out).float().cpu()
        rep.peak_hbm_bytes = meter.peak_bytes
        if getattr(args, "trace", None):
            write_run_trace(args.trace, fw.proven.program, handle.stats())
    except MemintentError:
        raise
    except Exception as e:   # a failed copy, out of memory mid-forward: one line, after the finally drained it
        raise as_fault(e, f"streamed forward {len(rep.forwards)}") from e
    finally:
        handle.detach()   # also on Ctrl-C: waits for in-flight copies, removes the hooks, releases the arena
    return logits


def _verdict(program: Program, rep: RunReport, logits: torch.Tensor, ref_logits: torch.Tensor | None,
             check: bool) -> int:
    """Compare with the resident model, print the report and what failed; the exit code."""
    con = Console(stderr=True, highlight=False)
    code = 0
    if ref_logits is not None:
        rep.identical = bool(torch.equal(logits, ref_logits))
        rep.max_abs_diff = float((logits - ref_logits).abs().max()) if logits.shape == ref_logits.shape else float("inf")
    if check and torch.isnan(logits).any():
        con.print("[red]checked mode: the output holds NaN: a weight was used outside its planned residency[/red]")
        code = 1
    _print_report(program, rep)
    quantized = any(b.quant != Quant.none for b in program.blocks if b.residency == Residency.streamed)
    if rep.identical is False and not quantized:
        con.print(f"[red]streamed logits differ from the resident model's (max |diff| {rep.max_abs_diff:g}); a plan "
                  "without quantization must be bitwise identical[/red]")
        code = 1
    return code


def run_plan(args) -> int:
    proven = load_verified(args.plan)
    program = proven.program
    for flag in ("json", "trace"):
        if getattr(args, flag, None) is not None:   # before the run, not after it; "" is refused, not skipped
            check_writable(getattr(args, flag), f"--{flag}", {"plan": args.plan})
    device = pick_device(args.device)
    src = source_for(program, args.allow_code)
    if args.forwards < 1:
        raise MemintentError(f"--forwards {args.forwards} must be at least 1")
    inputs, what, tokens = _inputs(src, program, args, device)
    fw = _Forward(proven, src, device, inputs, src.forward_kwargs())

    store = HostStore(program, pin="auto" if device.type == "cuda" else "none")
    store.fill(src.fill_weights)
    pr = program.prediction
    rep = RunReport(device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                    inputs=what, tokens=tokens, budget_bytes=program.budget_bytes or 0,
                    predicted_s=pr.step_time_s if pr else 0.0, predicted_peak_bytes=pr.peak_hbm_bytes if pr else 0,
                    streamed_bytes=pr.streamed_bytes if pr else 0, h2d_gbps=measure_h2d_gbps(device))
    rep.pcie_floor_s = rep.streamed_bytes / (rep.h2d_gbps * 1e9)
    ref_logits = _resident_reference(fw, args.forwards, rep) if args.verify else None
    logits = _streamed_forwards(fw, store, args, rep)
    code = _verdict(program, rep, logits, ref_logits, args.check)
    if getattr(args, "json", None):
        write_atomic(args.json, json.dumps(asdict(rep), indent=1) + "\n")
    return code


def _print_report(program: Program, rep: RunReport) -> None:
    con = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    t = Table(title=f"{program.name} on {rep.device}, {rep.inputs}", show_edge=False, header_style="bold")
    cols = ["forward", "wall", "stall", "copied", "H2D GB/s", "host/block", "predicted", "PCIe floor"]
    for col in cols + (["resident"] if rep.resident_s is not None else []):
        t.add_column(col, justify="right")
    for i, f in enumerate(rep.forwards):
        t.add_row(str(i), fmt_s(f["wall_s"]), fmt_s(f["stall_s"]), fmt_bytes(f["bytes_copied"]),
                  "-" if f["copy_gbps"] is None else f"{f['copy_gbps']:.1f}",
                  fmt_s(f["host_overhead_per_block_s"]), fmt_s(rep.predicted_s), fmt_s(rep.pcie_floor_s),
                  *([fmt_s(rep.resident_s)] if rep.resident_s is not None else []))
    con.print(t)
    peak = "-" if rep.peak_hbm_bytes is None else fmt_bytes(rep.peak_hbm_bytes)
    resident = "not measured (--verify measures it)" if rep.resident_s is None else fmt_s(rep.resident_s)
    con.print(f"measured pinned H2D {rep.h2d_gbps:.1f} GB/s; streamed {fmt_bytes(rep.streamed_bytes)}/forward "
              f"(PCIe floor = streamed / H2D); resident forward {resident}; peak HBM {peak} (plan "
              f"{fmt_bytes(rep.predicted_peak_bytes)}, budget {fmt_bytes(rep.budget_bytes)})")
    if rep.identical is not None:
        con.print("verify: streamed logits are bitwise identical to the resident model" if rep.identical else
                  f"verify: max |streamed - resident| = {rep.max_abs_diff:g}")
