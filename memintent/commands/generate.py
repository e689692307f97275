"""``memintent generate``: serve requests under a generation plan with the engine, then report what it measured.

Requests come from ``--prompts FILE`` (JSON lines; ``-``: stdin) or ``--synthetic N`` (seeded lengths from
ranges); each result goes to ``--output FILE`` as its request finishes (``commands/results.py``: a partial file
that becomes the output, in request order, when the run completes; ``--resume`` serves only what it lacks).
Everything that can be refused is refused before the host store is filled: unreadable requests, prompts longer
than the plan's context, outputs that cannot be written or that name an input, a host store larger than the
machine's available memory.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace

import torch
from rich.console import Console

from memintent.commands.results import Results
from memintent.engine import requests as reqs
from memintent.engine.core import Engine, RunOptions
from memintent.engine.links import link_from_env, rank_device
from memintent.engine.metrics import ServeReport, summarize
from memintent.engine.reference import compare
from memintent.engine.sampling import StopConditions
from memintent.errors import MemintentError
from memintent.ir.model import KVQuant, Program, Quant, Residency
from memintent.ir.plan_file import check_writable, write_atomic
from memintent.ir.proven import Proven
from memintent.models.plan_model import PlanSources, plan_sources
from memintent.passes.verify import prove
from memintent.progress import status
from memintent.runtime.device import as_fault, pick_device
from memintent.runtime.memory import PeakMeter
from memintent.runtime.profile import measure_h2d_gbps
from memintent.see.perfetto import write_serve_trace
from memintent.units import fmt_bytes, fmt_s

VERIFY_REQUESTS = 8   # --verify compares this many requests with the resident model (each runs alone, densely)


def load_requests(args, program: Program, src) -> tuple[list[reqs.Request], dict]:
    """The requests and, for a file, each one's line (request id -> line number)."""
    g = program.generation
    tokenizer = src.tokenizer()
    if args.prompts is not None:
        numbered = reqs.load_numbered(args.prompts, tokenizer=tokenizer, default_max_new=reqs.parse_range(
            args.gen_len or str(g.gen_len), "--gen-len")[1], chat=args.chat)
        out, where = [r for _, r in numbered], {r.id: n for n, r in numbered}
    else:
        n = args.synthetic or args.requests or g.concurrency
        out = reqs.synthetic(n, reqs.parse_range(args.prompt_len or str(g.prompt_len), "--prompt-len"),
                             reqs.parse_range(args.gen_len or str(g.gen_len), "--gen-len"), src.vocab_size,
                             args.seed)
        where = {}
    return out, where


def serve(plan, requests, options: RunOptions, *, sources: PlanSources | None = None, store=None, warmup=False,
          verify=False, progress=None, link=None, on_done=None) -> tuple[ServeReport, list, Engine]:
    """Run ``requests`` through an engine on ``plan`` (a plan or a pipeline, ideally ``Proven``; ``sources``: its
    models, already resolved and checked; ``link``: how a pipeline's parts reach each other, ``engine.links``);
    returns the report, the outputs in request order, and the engine (closed). ``progress(done_requests,
    generated_tokens)`` is called after each step, ``on_done(output)`` as each request finishes."""
    device = options.device
    engine = Engine(plan, options=options, sources=sources, link=link, store=store)
    program = engine.report_program
    outputs: dict[str, object] = {}
    try:
        if warmup:   # first-call costs (kernel selection, allocator growth) out of the numbers, as a server pays once
            list(engine.generate([reqs.Request("warmup", requests[0].prompt_ids[:8], max_new_tokens=2)]))
            engine.reset_stats()
        if verify:
            engine.track = {r.id for r in requests[:VERIFY_REQUESTS]}
        meter = PeakMeter(device, program.arena.size_bytes)
        for r in requests:
            engine.add(r)
        t0 = time.perf_counter()
        _run(engine, outputs, progress, meter, on_done)
        total_s = time.perf_counter() - t0
        peak = meter.peak_bytes
    finally:   # also on Ctrl-C: waits for in-flight copies, removes the hooks, releases the arena
        engine.close()
    ordered = [outputs[r.id] for r in requests]
    rep = summarize(engine.stats, ordered, total_s=total_s, program=program, prompt_tokens=sum(
        len(r.prompt_ids) for r in requests), device=torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu")
    rep.peak_hbm_bytes = peak
    rep.warm_s = engine.warm_s
    rep.h2d_gbps = measure_h2d_gbps(device)
    rep.step_floor_s = rep.link_bytes / (rep.h2d_gbps * 1e9) if rep.h2d_gbps else 0.0
    if verify:
        a = compare(engine.src, device, requests, ordered, engine.tracked_logits)
        rep.agreement, rep.max_logit_error, rep.verified_requests = a.fraction, a.max_logit_error, a.requests
    return rep, ordered, engine


def _run(engine: Engine, outputs: dict, progress, meter, on_done=None) -> None:
    """Step the engine until every request finished, each step measured by ``meter``; a failure mid-run (a copy,
    the device's memory) is one line."""
    generated = 0
    try:
        while engine.has_work:
            with meter:
                done = engine.step()
            for out in done:
                outputs[out.id] = out
                generated += len(out.token_ids)
                if on_done is not None:
                    on_done(out)
            if progress:
                progress(len(outputs), generated)
    except MemintentError:
        raise
    except Exception as e:
        raise as_fault(e, f"serving (engine step {engine.scheduler.steps})") from e


def exact(program: Program) -> bool:
    """Whether ``--verify`` must find the reference's tokens exactly: float32, nothing quantized (weights or KV)."""
    quantized = any(b.quant != Quant.none for b in program.blocks if b.residency == Residency.streamed)
    return program.model.dtype == "f32" and not quantized and program.kv_pool.quant == KVQuant.none


def run_generate(args) -> int:
    """The CLI command. The plan is loaded and verified once (``prove``) and its model resolved once
    (``plan_sources``); the engine takes both as they are."""
    proven = prove(args.plan).generation_plan(args.plan)
    program = proven.program
    _check_flags(args)
    device, link = _device_and_link(args, proven)
    sources = plan_sources(proven, args.allow_code, link.parts(proven.parts) if link is not None else (0,))
    src = sources.whole
    requests = _checked_requests(args, program, src)
    first = link is None or link.rank == 0    # every rank holds the same tokens: the first one writes them
    results = Results(args.output, resume=args.resume, inputs=_inputs(args)) if args.output and first else None
    todo = results.open(requests) if results else requests
    con = _console()
    if not todo:
        results.finish(requests)
        con.print(f"{args.output}: all {len(requests)} results were already there (--resume); nothing to serve")
        return 0
    rep, engine = _serve_into(proven, sources, todo, results, args, device, link, con, total=len(requests))
    program = engine.report_program
    if not first:
        con.print(f"rank {link.rank}: peak HBM {fmt_bytes(rep.peak_hbm_bytes)} (budget "
                  f"{fmt_bytes(program.budget_bytes)})")
        return _exit_code(program, rep, con)
    if results:
        results.finish(requests)
    if args.json:
        write_atomic(args.json, json.dumps(asdict(rep), indent=1) + "\n", "--json")
    if args.trace:
        write_serve_trace(args.trace, program, engine)
    _print(program, rep, con)
    return _exit_code(program, rep, con)


def _checked_requests(args, program: Program, src) -> list[reqs.Request]:
    """The requests, each refused (naming its line) if the plan cannot serve it: all before the first step."""
    requests, where = load_requests(args, program, src)
    shown = "stdin" if args.prompts == "-" else args.prompts
    stops = StopConditions.of(src)
    for r in requests:
        at = f"{shown}:{where[r.id]}: " if r.id in where else ""
        reqs.validate(r, context=program.generation.context, vocab=src.vocab_size, where=at)
        stops.validate(r, where=at)
    return requests


def _inputs(args) -> dict:
    """The files ``generate`` reads, which no output may name."""
    return {"--prompts": args.prompts, "plan": args.plan}


def _check_flags(args) -> None:
    """Refuse, before anything runs, flags that contradict each other and outputs that cannot be written."""
    if args.prompts is not None and (args.synthetic is not None or args.requests is not None):
        raise MemintentError("--prompts and --synthetic both name the requests: give one of them")
    if args.prompts == "":
        raise MemintentError('--prompts "": name a JSON-lines file, or - for stdin')
    if args.resume and not args.output:
        raise MemintentError("--resume finishes the results of an earlier run: name its file with --output")
    outputs = {f"--{flag}": getattr(args, flag, None) for flag in ("output", "json", "trace")}
    for flag, path in outputs.items():
        if path is not None:
            others = {f: p for f, p in outputs.items() if f != flag and p is not None}
            check_writable(path, flag, _inputs(args) | others)


def _serve_into(proven: Proven, sources: PlanSources, todo, results, args, device, link, con, *, total: int):
    """Serve ``todo``, each result into ``results`` as it finishes; a failure or an interrupt says what was kept."""
    tokenizer = sources.whole.tokenizer()

    def done(out) -> None:
        if results is not None:
            results.add(_with_text(out, tokenizer).as_json())

    options = RunOptions(device=device, check=args.check, preempt=args.preempt, allow_code=args.allow_code,
                         spare_pages=args.spare_pages, log=lambda line: con.print(f"[dim]{line}[/dim]"))
    try:
        with status(f"serving {len(todo)} requests", console=con) as st:
            rep, _, engine = serve(
                proven, todo, options, sources=sources, warmup=args.warmup, verify=args.verify, link=link,
                progress=lambda n, gen: st.update(f"{n} of {len(todo)} requests done, {gen} tokens generated"),
                on_done=done)
    except BaseException as e:     # also Ctrl-C and SIGTERM: the lines written so far stay, and the message says where
        note = results.note(total) if results is not None else None
        if note:
            e.add_note(note)
        raise
    return rep, engine


def _device_and_link(args, proven: Proven):
    """The device this process serves on and, for a pipeline, how its parts reach each other: one process per
    part under ``torchrun`` (each on its own GPU), else every part in this process."""
    if proven.pipeline is None:
        return pick_device(args.device), None
    device = rank_device(pick_device(args.device))
    link = link_from_env(device)
    if link.world > 1 and args.verify:
        raise MemintentError("--verify builds the whole model in one process: run the pipeline in one process "
                             "(without torchrun) to verify it")
    return device, link


def _with_text(out, tokenizer):
    if tokenizer is None or out.text is not None:     # text cut at a stop string is already there
        return out
    return replace(out, text=tokenizer.decode(out.token_ids, skip_special_tokens=True))


def _console():
    return Console(stderr=True, highlight=False)


def _print(program: Program, rep: ServeReport, con) -> None:
    pr = program.prediction
    q = lambda t: fmt_s(t) if t is not None else "-"  # noqa: E731
    con.print(f"{program.name}: {rep.requests} requests, {rep.prompt_tokens} prompt + {rep.generated_tokens} "
              f"generated tokens in {fmt_s(rep.total_s)} on {rep.device}")
    con.print(f"generated {rep.tokens_per_s:.2f} tok/s over the run; decode {rep.decode_tokens_per_s:.2f} tok/s, "
              f"{rep.full_decode_tokens_per_s:.2f} tok/s at full concurrency (plan {program.generation.tokens_per_s:.2f} "
              "tok/s)")
    con.print(f"time to first token: median {q(rep.ttft_median_s)}, p99 {q(rep.ttft_p99_s)}; time per output "
              f"token: median {q(rep.tpot_median_s)}, p99 {q(rep.tpot_p99_s)}")
    if program.generation.run is not None:
        _print_run(program.generation.run, rep, con)
    if rep.warm_s:
        con.print(f"engine start (before the run): kernels compiled, decode graphs captured in {fmt_s(rep.warm_s)}")
    con.print(f"steps: {rep.steps}, median {fmt_s(rep.step_median_s)} (plan {fmt_s(rep.predicted_step_s)}, PCIe floor "
              f"{fmt_s(rep.step_floor_s)} = {fmt_bytes(rep.link_bytes)} over the host link / {rep.h2d_gbps:.1f} GB/s "
              f"pinned)")
    used = 100 * rep.kv_peak_pages / max(rep.num_pages - 1, 1)
    con.print(f"KV pool: {rep.num_pages - 1} blocks; peak {used:.0f}%, mean "
              f"{100 * rep.kv_mean_pages / max(rep.num_pages - 1, 1):.0f}%; over time {rep.sparkline()}")
    if rep.spare_steps:
        con.print(f"spare pages: {rep.spare_steps} steps copied up to {rep.spare_blocks_max} streamed blocks from the "
                  "KV pool's spare pages, within HBM")
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(rep.preemptions.items())) or "none"
    con.print(f"preemptions: {kinds}")
    if rep.peak_hbm_bytes is not None:
        con.print(f"peak HBM {fmt_bytes(rep.peak_hbm_bytes)} (plan {fmt_bytes(pr.peak_hbm_bytes)}, budget "
                  f"{fmt_bytes(program.budget_bytes)})")
    if rep.agreement is not None:
        con.print(f"verify: {100 * rep.agreement:.2f}% of generated tokens agree with the resident model's greedy "
                  f"choice ({rep.verified_requests} requests, each alone); max |logit error| {rep.max_logit_error:.3g}")


def _print_run(run, rep: ServeReport, con) -> None:
    """The run the plan predicted for its workload (``compile --workload``) beside the one measured."""
    q = lambda t: fmt_s(t) if t is not None else "-"  # noqa: E731
    rows = (("predicted", run.run_s, run.tokens_per_s, run.ttft_median_s, run.ttft_p99_s, run.tpot_median_s,
             run.tpot_p99_s, run.requests, run.steps, run.preemptions),
            ("measured", rep.total_s, rep.tokens_per_s, rep.ttft_median_s, rep.ttft_p99_s, rep.tpot_median_s,
             rep.tpot_p99_s, rep.requests, rep.steps, sum(rep.preemptions.values())))
    for name, total, rate, t50, t99, p50, p99, n, steps, pre in rows:
        con.print(f"run {name:9s} {fmt_s(total):>9s}, {rate:.2f} tok/s; time to first token median {q(t50)}, p99 "
                  f"{q(t99)}; per output token median {q(p50)}, p99 {q(p99)}; {n} requests, {steps} steps, {pre} "
                  "preemptions")
    if (run.requests, run.prompt_tokens) != (rep.requests, rep.prompt_tokens):
        con.print(f"(the plan predicted its run of {run.workload}; these {rep.requests} requests of "
                  f"{rep.prompt_tokens} prompt tokens are another workload)")
    elif run.arrival_rate:
        con.print(f"(the plan predicted requests arriving at {run.arrival_rate:g}/s; generate serves them all at once)")


def _exit_code(program: Program, rep: ServeReport, con) -> int:
    if rep.peak_hbm_bytes is not None and rep.peak_hbm_bytes > (program.budget_bytes or 0):
        con.print(f"[red]measured peak HBM {fmt_bytes(rep.peak_hbm_bytes)} exceeds the plan's budget "
                  f"{fmt_bytes(program.budget_bytes)}: the plan's proof did not hold (please report it)[/red]")
        return 1
    if rep.agreement is not None and rep.agreement < 1.0 and exact(program):
        con.print("[red]generated tokens differ from the resident model's: a float32 plan without quantization "
                  "must generate exactly its tokens[/red]")
        return 1
    return 0
