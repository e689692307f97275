"""``memintent run``: execute a plan's forwards, measure them against the plan and the floor, optionally verify.

What one forward reports: wall time, stall (compute waiting on a copy), bytes copied, achieved H2D GB/s, peak
HBM, the plan's prediction and the floor: max(streamed bytes / measured pinned H2D bandwidth, resident time when
known). ``--verify`` runs the same inputs through the resident model; for a plan without quantization any
difference in the logits exits 1.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from memintent.compiler.fingerprint import named_weights
from memintent.compiler.refs import ModelSource, resolve
from memintent.errors import MemintentError, RuntimeFault
from memintent.ir.model import Program, Quant, Residency
from memintent.ir.plan_file import load_plan
from memintent.runtime.profile import measure_h2d_gbps
from memintent.units import fmt_bytes, fmt_s, parse_tokens


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MemintentError(f"--device {name}: CUDA is not available here; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise MemintentError(f"--device {name!r}: use cpu or cuda")
    return torch.device(name)


def source_for(program: Program, allow_code: bool) -> ModelSource:
    """The model the plan was compiled for. A plan naming a py: factory runs user code: only with --allow-code."""
    if program.model.kind == "py" and not allow_code:
        raise MemintentError(f"the plan names a py: model factory ({program.model.ref}); running it imports and "
                             "runs that code: pass --allow-code if you trust it")
    src = resolve(program.model.ref, dtype=program.model.dtype, allow_code=allow_code)
    check_source(program, src)
    return src


def check_source(program: Program, src: ModelSource) -> None:
    """Refuse, before anything is allocated, a model or checkpoint that is not the one the plan was compiled for:
    the built model's fingerprint (weight names, shapes, dtypes) must be the plan's, and stored weights (the
    safetensors headers of an hf: folder) must have the shapes and dtypes the plan expects."""
    from memintent.compiler.fingerprint import IR_TO_TORCH, fingerprint_module, weight_entries
    from memintent.ir.model import ObjectKind

    model = src.build("meta")
    fp = fingerprint_module(model)
    want = {o.name: (tuple(o.shape), o.dtype) for o in program.objects if o.kind == ObjectKind.weight}
    if fp != program.fingerprint:
        have = {n: (tuple(s), d) for n, s, d in weight_entries(model)}
        fmt = lambda x: "absent" if x is None else f"{'x'.join(map(str, x[0])) or 'scalar'} {x[1]}"  # noqa: E731
        diffs = [f"{n}: model {fmt(have.get(n))}, plan {fmt(want.get(n))}" for n in sorted(set(have) | set(want))
                 if have.get(n) != want.get(n)]
        more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
        why = ("; first differences: " + "; ".join(diffs[:3]) + more if diffs else
               " (its weight objects match the model: the plan's fingerprint was edited)")
        raise MemintentError(f"the model {program.model.ref} does not match the plan {program.name!r}: model "
                             f"fingerprint {fp}, plan {program.fingerprint}{why}; recompile the plan for this model")
    src.check_checkpoint({n: (shape, IR_TO_TORCH[d]) for n, (shape, d) in want.items() if d in IR_TO_TORCH})


def as_fault(e: BaseException, what: str) -> RuntimeFault:
    """A ``RuntimeFault`` (one line, exit 2) for an exception raised while executing a plan; ``--debug`` shows the
    original traceback (it is chained as the cause)."""
    if isinstance(e, torch.OutOfMemoryError):
        return RuntimeFault(f"{what} ran out of device memory (the arena and the activations do not fit what is "
                            f"free: compile for a smaller budget or free device memory): "
                            f"{(str(e).splitlines() or [''])[0][:200]}")
    msg = (str(e).strip().splitlines() or [""])[0][:300]
    return RuntimeFault(f"{what} failed: {type(e).__name__}: {msg}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sync_compute(device: torch.device) -> None:
    """Wait for this forward's compute only: the copy stream keeps prefetching the next forward's first blocks,
    as it would in a serving loop (a full device sync would idle the copy engine at every forward boundary)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def resident_model(src: ModelSource, device: torch.device) -> torch.nn.Module:
    """The whole model on ``device`` in its own dtype, filled from the model source itself (the same values the
    host store was filled with, before any quantization for transfer)."""
    model = src.build("meta").to_empty(device=device)
    with torch.no_grad():
        src.fill_weights(named_weights(model))   # tied aliases: filled once, under the first name
    return model


def time_forward(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    """Median seconds of ``fn()`` over ``repeats`` after one warm-up, and its last output."""
    out = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def time_back_to_back(fn, device: torch.device, repeats: int) -> tuple[float, list[float], object]:
    """Steady-state seconds per forward: ``repeats`` forwards back to back after two warm-ups, divided by the wall
    time until the device is idle. Between forwards only the host waits for nothing: a full device sync there would
    also wait for the next forward's prefetch and leave the copy engine idle at every forward boundary, which no
    serving loop does. Returns (seconds per forward, per-forward host-visible times, last output)."""
    out = fn()
    out = fn()
    sync(device)
    ts = []
    t0 = time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    sync(device)
    return (time.perf_counter() - t0) / repeats, ts, out


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


def measured_events(stats) -> list:
    """The runtime's CUDA-event intervals of each forward as MeasuredEvents on one clock (forwards laid end to end
    by their measured device time)."""
    from memintent.trace import MeasuredEvent

    out, origin = [], 0.0
    for f, st in enumerate(stats):
        for lane, name, a, b in st.events:
            block = name.split("@")[0]
            if lane == "copy":
                out.append(MeasuredEvent("copy", name, origin + a, origin + b, f, block=block))
            elif lane == "wait":
                out.append(MeasuredEvent("compute", f"wait {block}", origin + a, origin + b, f, block=block,
                                         stall=True))
            elif lane == "dequant":
                out.append(MeasuredEvent("compute", f"dequant {block}", origin + a, origin + b, f, block=block))
            else:
                out.append(MeasuredEvent("compute", name, origin + a, origin + b, f))
        origin += st.device_s or 0.0
    return out


def write_run_trace(path: str, program: Program, stats) -> None:
    """Predicted and measured timelines side by side, as a Chrome trace (opens in Perfetto)."""
    from memintent.timeline import build_timeline
    from memintent.trace import write_trace

    measured = measured_events(stats)
    write_trace(path, build_timeline(program) if program.prediction else None, measured or None)


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
