"""``memintent generate``: serve requests under a generation plan with the engine, then report what it measured.

Requests come from ``--prompts FILE`` (JSON lines) or ``--synthetic N`` (seeded lengths from ranges); results go
to ``--output FILE`` (JSON lines, in request order) once the run is complete. Everything that can be refused is
refused before the host store is filled: unreadable requests, prompts longer than the plan's context, outputs that
cannot be written, a host store larger than the machine's available memory.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict

import torch

from memintent.engine import requests as reqs
from memintent.engine.engine import Engine
from memintent.engine.metrics import ServeReport, summarize
from memintent.engine.sampling import StopConditions
from memintent.errors import MemintentError
from memintent.runtime.memory import PeakMeter
from memintent.ir.model import KVQuant, Pipeline, Program, Quant, Residency
from memintent.units import fmt_bytes, fmt_s

VERIFY_REQUESTS = 8   # --verify compares this many requests with the resident model (each runs alone, densely)


def load_requests(args, program: Program, src) -> list[reqs.Request]:
    g = program.generation
    tokenizer = src.tokenizer() if hasattr(src, "tokenizer") else None
    if args.prompts:
        out = reqs.load(args.prompts, tokenizer=tokenizer, default_max_new=reqs.parse_range(
            args.gen_len or str(g.gen_len), "--gen-len")[1], chat=args.chat)
        where = reqs.line_numbers(args.prompts)
    else:
        n = args.synthetic or args.requests or g.concurrency
        out = reqs.synthetic(n, reqs.parse_range(args.prompt_len or str(g.prompt_len), "--prompt-len"),
                             reqs.parse_range(args.gen_len or str(g.gen_len), "--gen-len"), src.vocab_size,
                             args.seed)
        where = {}
    return out, where


def serve(program: Program, requests, *, device, check=False, store=None, preempt="cost", warmup=False,
          verify=False, progress=None, log=None, allow_code=False, link=None) -> tuple[ServeReport, list, object]:
    """Run ``requests`` through an engine on ``program`` (a plan or a pipeline; ``link``: how a pipeline's stages
    reach each other, ``engine.pipeline``); returns the report, the outputs in request order, and the
    engine (closed). ``progress(done_requests, generated_tokens)`` is called after each step."""
    from memintent.runtime.profile import measure_h2d_gbps

    if isinstance(program, Pipeline):
        from memintent.engine.pipeline import PipelineEngine

        engine = PipelineEngine(program, device, link=link, check=check, preempt=preempt, log=log,
                                allow_code=allow_code)
    else:
        engine = Engine(program, device, check=check, store=store, preempt=preempt, log=log, allow_code=allow_code)
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
        _run(engine, outputs, progress, meter)
        total_s = time.perf_counter() - t0
        peak = meter.peak_bytes
    finally:   # also on Ctrl-C: waits for in-flight copies, removes the hooks, releases the arena
        engine.close()
    ordered = [outputs[r.id] for r in requests]
    rep = summarize(engine.stats, ordered, total_s=total_s, program=program, prompt_tokens=sum(
        len(r.prompt_ids) for r in requests), device=torch.cuda.get_device_name(device) if device.type == "cuda"
        else "cpu")
    rep.peak_hbm_bytes = peak
    rep.h2d_gbps = measure_h2d_gbps(device)
    rep.step_floor_s = rep.streamed_bytes / (rep.h2d_gbps * 1e9) if rep.h2d_gbps else 0.0
    if verify:
        from memintent.engine.reference import compare

        a = compare(engine.src, device, requests, ordered, engine.tracked_logits)
        rep.agreement, rep.max_logit_error, rep.verified_requests = a.fraction, a.max_logit_error, a.requests
    return rep, ordered, engine


def _run(engine: Engine, outputs: dict, progress, meter) -> None:
    """Step the engine until every request finished, each step measured by ``meter``; a failure mid-run (a copy,
    the device's memory) is one line."""
    from memintent.runtime.device import as_fault

    generated = 0
    try:
        while engine.has_work:
            with meter:
                done = engine.step()
            for out in done:
                outputs[out.id] = out
                generated += len(out.token_ids)
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
    """The CLI command."""
    from memintent.models.plan_model import source_for
    from memintent.passes.verify import verify_pipeline
    from memintent.ir.plan_file import check_writable, load_plan_or_pipeline, write_atomic
    from memintent.passes.verify import verify as verify_plan

    plan = load_plan_or_pipeline(args.plan)
    # a plan file is untrusted input: run only what verifies
    plan = verify_pipeline(plan) if isinstance(plan, Pipeline) else verify_plan(plan)
    program = plan.stages[0] if isinstance(plan, Pipeline) else plan
    if program.generation is None or program.kv_pool is None:
        raise MemintentError(f"{args.plan} is not a generation plan: compile it with --objective throughput|latency")
    for flag in ("output", "json", "trace"):
        if getattr(args, flag, None):
            check_writable(getattr(args, flag), f"--{flag}")
    device, link = _device_and_link(args, plan)
    src = source_for(program, args.allow_code)
    requests, where = load_requests(args, program, src)
    con = _console()
    stops = StopConditions.of(src)
    for r in requests:
        at = f"{args.prompts}:{where[r.id]}: " if r.id in where else ""
        reqs.validate(r, context=program.generation.context, vocab=src.vocab_size, where=at)
        stops.validate(r, where=at)
    from memintent.progress import status

    with status(f"serving {len(requests)} requests", console=con) as st:
        rep, outputs, engine = serve(
            plan, requests, device=device, check=args.check, preempt=args.preempt, warmup=args.warmup,
            verify=args.verify, allow_code=args.allow_code, log=lambda line: con.print(f"[dim]{line}[/dim]"),
            progress=lambda done, gen: st.update(f"{done} of {len(requests)} requests done, {gen} tokens generated"),
            link=link)
    program = engine.report_program
    if link is not None and link.rank > 0:   # every rank holds the same tokens: the first one writes them
        con.print(f"rank {link.rank}: peak HBM {fmt_bytes(rep.peak_hbm_bytes)} (budget "
                  f"{fmt_bytes(program.budget_bytes)})")
        return _exit_code(program, rep, con)
    tokenizer = src.tokenizer() if hasattr(src, "tokenizer") else None
    if args.output:
        write_atomic(args.output, "".join(json.dumps(_with_text(o, tokenizer).as_json()) + "\n" for o in outputs))
    if args.json:
        write_atomic(args.json, json.dumps(asdict(rep), indent=1) + "\n")
    if args.trace:
        from memintent.see.perfetto import write_serve_trace

        write_serve_trace(args.trace, program, engine)
    _print(program, rep, con)
    return _exit_code(program, rep, con)


def _device_and_link(args, plan):
    """The device this process serves on and, for a pipeline, how its stages reach each other: one process per
    stage under ``torchrun`` (each on its own GPU), else every stage in this process."""
    from memintent.runtime.device import pick_device

    if not isinstance(plan, Pipeline):
        return pick_device(args.device), None
    from memintent.engine.pipeline import link_from_env, rank_device

    device = rank_device(pick_device(args.device))
    link = link_from_env(device)
    if link.world > 1 and args.verify:
        raise MemintentError("--verify builds the whole model in one process: run the pipeline in one process "
                             "(without torchrun) to verify it")
    return device, link


def _with_text(out, tokenizer):
    if tokenizer is None or out.text is not None:     # text cut at a stop string is already there
        return out
    from dataclasses import replace

    return replace(out, text=tokenizer.decode(out.token_ids, skip_special_tokens=True))


def _console():
    from rich.console import Console

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
    con.print(f"steps: {rep.steps}, median {fmt_s(rep.step_median_s)} (plan {fmt_s(rep.predicted_step_s)}, PCIe floor "
              f"{fmt_s(rep.step_floor_s)} = {fmt_bytes(rep.streamed_bytes)} / {rep.h2d_gbps:.1f} GB/s pinned)")
    used = 100 * rep.kv_peak_pages / max(rep.num_pages - 1, 1)
    con.print(f"KV pool: {rep.num_pages - 1} blocks; peak {used:.0f}%, mean "
              f"{100 * rep.kv_mean_pages / max(rep.num_pages - 1, 1):.0f}%; over time {rep.sparkline()}")
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(rep.preemptions.items())) or "none"
    con.print(f"preemptions: {kinds}")
    if rep.peak_hbm_bytes is not None:
        con.print(f"peak HBM {fmt_bytes(rep.peak_hbm_bytes)} (plan {fmt_bytes(pr.peak_hbm_bytes)}, budget "
                  f"{fmt_bytes(program.budget_bytes)})")
    if rep.agreement is not None:
        con.print(f"verify: {100 * rep.agreement:.2f}% of generated tokens agree with the resident model's greedy "
                  f"choice ({rep.verified_requests} requests, each alone); max |logit error| {rep.max_logit_error:.3g}")


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
