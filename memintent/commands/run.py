"""``memintent run``: execute a plan's forwards, measure them against the plan and the floor, optionally verify.

What one forward reports: wall time, stall (compute waiting on a copy), bytes copied, achieved H2D GB/s, peak
HBM, the plan's prediction and the floor: max(streamed bytes / measured pinned H2D bandwidth, resident time when
known). ``--verify`` runs the same inputs through the resident model; for a plan without quantization any
difference in the logits exits 1.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from memintent.errors import MemintentError
from memintent.ir.model import Program, Quant, Residency
from memintent.ir.plan_file import load_plan
from memintent.compiler.plan_source import resident_model, source_for
from memintent.runtime.device import as_fault, pick_device, sync_compute
from memintent.runtime.profile import measure_h2d_gbps, time_forward
from memintent.see.perfetto import write_run_trace
from memintent.units import fmt_bytes, fmt_s, parse_tokens


@dataclass
class RunReport:
    device: str
    tokens: str
    forwards: list[dict] = field(default_factory=list)
    h2d_gbps: float = 0.0
    streamed_bytes: int = 0
    floor_s: float = 0.0
    resident_s: float | None = None
    predicted_s: float = 0.0
    peak_hbm_bytes: int | None = None
    predicted_peak_bytes: int = 0
    budget_bytes: int = 0
    max_abs_diff: float | None = None
    identical: bool | None = None


def run_plan(args) -> int:
    from memintent.ir.plan_file import check_writable
    from memintent.passes.verify import verify
    from memintent.runtime import HostStore, attach

    program = verify(load_plan(args.plan))   # a plan file is untrusted input: run only what verifies
    for flag in ("json", "trace"):
        if getattr(args, flag, None):
            check_writable(getattr(args, flag), f"--{flag}")   # before the run, not after it
    device = pick_device(args.device)
    src = source_for(program, args.allow_code)
    batch, seq = parse_tokens(args.tokens) if args.tokens else (program.shape.batch, program.shape.seq)
    if args.forwards < 1:
        raise MemintentError(f"--forwards {args.forwards} must be at least 1")
    gen = torch.Generator().manual_seed(args.seed)
    vocab = src.vocab_size or 2
    if src.kind == "py":
        inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in src.example_inputs(batch, seq, "cpu"))
    else:
        inputs = (torch.randint(0, vocab, (batch, seq), generator=gen).to(device),)   # (B, S) token ids
    kwargs = src.forward_kwargs()

    from rich.console import Console

    con = Console(stderr=True, highlight=False)
    store = HostStore(program, pin="auto" if device.type == "cuda" else "none")
    store.fill(src.fill_weights)
    rep = RunReport(device=str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"),
                    tokens=f"{batch}x{seq}", budget_bytes=program.budget_bytes or 0,
                    predicted_s=program.prediction.step_time_s if program.prediction else 0.0,
                    predicted_peak_bytes=program.prediction.peak_hbm_bytes if program.prediction else 0)
    rep.h2d_gbps = measure_h2d_gbps(device)
    rep.streamed_bytes = program.prediction.streamed_bytes if program.prediction else 0

    ref_logits = None
    if args.verify:
        with torch.no_grad():
            ref = resident_model(src, device)
            rep.resident_s, out = time_forward(lambda: ref(*inputs, **kwargs), device, max(args.forwards, 1))
            ref_logits = src.logits(out).float().cpu()
            del ref, out
        if device.type == "cuda":
            torch.cuda.empty_cache()

    model = src.build("meta")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    handle = attach(model, program, device, check=args.check, host_store=store)
    try:
        with torch.no_grad():
            for i in range(args.forwards):
                t = time.perf_counter()
                out = model(*inputs, **kwargs)
                sync_compute(device)
                wall = time.perf_counter() - t
                st = handle.last_stats
                rep.forwards.append(dict(wall_s=wall, stall_s=st.stall_s, bytes_copied=st.bytes_copied,
                                         copy_gbps=st.copy_gbps, host_overhead_per_block_s=st.host_overhead_per_block_s))
            logits = src.logits(out).float().cpu()
        if device.type == "cuda":
            rep.peak_hbm_bytes = torch.cuda.max_memory_allocated(device)
        if getattr(args, "trace", None):
            write_run_trace(args.trace, program, handle.stats())
    except MemintentError:
        raise
    except Exception as e:   # a failed copy, out of memory mid-forward: one line, after the finally drained it
        raise as_fault(e, f"streamed forward {len(rep.forwards)}") from e
    finally:
        handle.detach()   # also on Ctrl-C: waits for in-flight copies, removes the hooks, releases the arena
    rep.floor_s = max(rep.streamed_bytes / (rep.h2d_gbps * 1e9), rep.resident_s or 0.0)
    code = 0
    if ref_logits is not None:
        rep.identical = bool(torch.equal(logits, ref_logits))
        rep.max_abs_diff = float((logits - ref_logits).abs().max()) if logits.shape == ref_logits.shape else float("inf")
    if args.check and torch.isnan(logits).any():
        con.print("[red]checked mode: the output holds NaN: a weight was used outside its planned residency[/red]")
        code = 1
    _print_report(program, rep)
    quantized = any(b.quant != Quant.none for b in program.blocks if b.residency == Residency.streamed)
    if rep.identical is False and not quantized:
        con.print(f"[red]streamed logits differ from the resident model's (max |diff| {rep.max_abs_diff:g}); a plan "
                  "without quantization must be bitwise identical[/red]")
        code = 1
    if getattr(args, "json", None):
        import json

        from memintent.ir.plan_file import write_atomic

        write_atomic(args.json, json.dumps(asdict(rep), indent=1) + "\n")
    return code


def _print_report(program: Program, rep: RunReport) -> None:
    from rich.console import Console
    from rich.table import Table

    import sys

    con = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    t = Table(title=f"{program.name} on {rep.device}, tokens {rep.tokens}", show_edge=False, header_style="bold")
    for col in ("forward", "wall", "stall", "copied", "H2D GB/s", "host/block", "predicted", "floor"):
        t.add_column(col, justify="right")
    for i, f in enumerate(rep.forwards):
        t.add_row(str(i), fmt_s(f["wall_s"]), fmt_s(f["stall_s"]), fmt_bytes(f["bytes_copied"]),
                  "-" if f["copy_gbps"] is None else f"{f['copy_gbps']:.1f}",
                  fmt_s(f["host_overhead_per_block_s"]), fmt_s(rep.predicted_s), fmt_s(rep.floor_s))
    con.print(t)
    peak = "-" if rep.peak_hbm_bytes is None else fmt_bytes(rep.peak_hbm_bytes)
    con.print(f"measured pinned H2D {rep.h2d_gbps:.1f} GB/s; streamed {fmt_bytes(rep.streamed_bytes)}/forward; "
              f"resident forward {fmt_s(rep.resident_s)}; peak HBM {peak} (plan {fmt_bytes(rep.predicted_peak_bytes)},"
              f" budget {fmt_bytes(rep.budget_bytes)})")
    if rep.identical is not None:
        con.print("verify: streamed logits are bitwise identical to the resident model" if rep.identical else
                  f"verify: max |streamed - resident| = {rep.max_abs_diff:g}")
