"""Serving llama-3-70b with int4 streamed weights under a 24 GiB budget, on one GPU, against floors from this run.

Cases (each a plan of the planner's own choice, served by the engine):
  mix-bf16   512 seeded requests, prompts 64-1024 tokens, outputs 16-128, KV in bf16
  mix-int8   the same requests, int8 KV
  fixed      64 requests of prompt 512 + 32 generated (the wave engine's workload; its batch-32 figure: 50.3 tok/s);
             --fixed-requests sets how many
  fixed-int8 the same requests, int8 KV (opt-30b at 24 GiB with 96 of them: the step issue's FlexGen row)

Every step streams the plan's bytes; the floor of a step is streamed bytes / pinned H2D measured at the start. Peak
HBM is torch's max_memory_allocated over the run, against the plan's budget.

    python benchmarks/serve.py --out $OUT
    python benchmarks/serve.py --model tiny-llama --device cpu --budget 8MiB --requests 16 --dtype f32 --quant none  # smoke
    python benchmarks/serve.py --plan both --out $OUT    # each case planned for the steady state and for its requests
    python benchmarks/serve.py --model opt-30b --quant auto --cases fixed-int8 --fixed-requests 96 --plan both

``--plan requests`` compiles each case's plan against the case's own requests, as ``compile --synthetic`` does
(the planner simulates the engine's run of them: ``engine.simulate``); ``both`` serves the two plans of each case,
and the last table puts each plan's measured run beside the run it predicted.

Prints a table last and writes serve.json under --out.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import card_profile, fill, free, header, serve_row, table, write  # noqa: E402
from memintent.compiler.planner import StepPredictor, plan_generation  # noqa: E402
from memintent.engine.simulate import simulate_run, workload_of  # noqa: E402
from memintent.ir.plan_file import load_plan  # noqa: E402
from memintent.models.refs import resolve  # noqa: E402
from memintent.engine.requests import synthetic  # noqa: E402
from memintent.units import parse_bytes  # noqa: E402


def layout_key(plan) -> tuple:
    return tuple((b.name, b.quant.value) for b in plan.blocks)


LOOKAHEAD = {"on": (True,), "off": (False,), "both": (True, False)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--budget", default="24GiB")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--cases", nargs="+", default=["mix-bf16", "mix-int8", "fixed"])
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--fixed-requests", type=int, default=64, help="requests of the fixed cases (64)")
    ap.add_argument("--predict", action="store_true", help="also the cost model's time of each step as it ran")
    ap.add_argument("--hw", default=None, help="hardware profile (file or built-in name; default: this card's)")
    ap.add_argument("--quant", default="int4", help="bit width of streamed weights (int4; none, int8, auto)")
    ap.add_argument("--plan", default="steady", choices=("steady", "requests", "both"),
                    help="plan each case for the steady state (as before), for its own requests (compile "
                         "--synthetic), or both")
    ap.add_argument("--lookahead", choices=tuple(LOOKAHEAD), default="on",
                    help="the engine launches each step before reading the last one's tokens (on), or not (off), or "
                         "each case both ways")
    ap.add_argument("--graphs", choices=tuple(LOOKAHEAD), default="on",
                    help="decode steps replay CUDA graphs (on), or run eagerly (off), or each case both ways")
    ap.add_argument("--plan-file", nargs="+", default=None,
                    help="plans saved beforehand (`compile`, or `save_plan`), one per case in --cases' order, instead "
                         "of planning here: each is verified as it loads")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    hw = card_profile(device, spec=args.hw)
    doc = header(device, hw)
    budget = parse_bytes(args.budget)
    src = resolve(args.model, dtype=args.dtype)
    vocab = src.vocab_size
    context = min(1152, src.max_positions or 1152)      # 1024 + 128: the longest request of the mix
    mix = synthetic(args.requests, (64, context - 128), (16, 128), vocab, seed=0)
    fixed = synthetic(args.fixed_requests, (512, 512), (32, 32), vocab, seed=1)
    cases = {"mix-bf16": (dict(context=context, prompt_len=544, gen_len=72, kv_quant="none"), mix),
             "mix-int8": (dict(context=context, prompt_len=544, gen_len=72, kv_quant="int8"), mix),
             "fixed": (dict(context=544, prompt_len=512, gen_len=32, kv_quant="none"), fixed),
             "fixed-int8": (dict(context=544, prompt_len=512, gen_len=32, kv_quant="int8"), fixed)}
    stores: dict[tuple, object] = {}
    if args.plan_file and (len(args.cases) != len(args.plan_file) or args.plan == "both"):
        ap.error("--plan-file serves each case with one plan: as many files as --cases, and --plan steady or "
                 "requests")
    runs = [(name, mode) for name in args.cases for mode in (("steady", "requests") if args.plan == "both"
                                                              else (args.plan,))]
    for name, mode in runs:
        kw, reqs = cases[name]
        if mode == "requests":     # what `compile --synthetic` does: the requests' lengths, the engine's simulated run
            kw = dict(kw, workload=workload_of(reqs, name), simulate=simulate_run)
        plan = (load_plan(args.plan_file[args.cases.index(name)]) if args.plan_file else
                plan_generation(args.model, budget_bytes=budget, hardware=hw, quant=args.quant, dtype=args.dtype, **kw))
        key = layout_key(plan)
        if key not in stores:       # plans with the same blocks at the same bit widths share one host store
            stores.clear()
            free(device)
            stores[key], fill_s = fill(plan, src, device)
            doc.setdefault("host_fill_s", []).append(fill_s)
        predictor = StepPredictor(plan) if args.predict else None
        for ahead, graphs in itertools.product(LOOKAHEAD[args.lookahead], LOOKAHEAD[args.graphs]):
            tag = f"{args.model} {name} ({mode}{'' if ahead else ', no lookahead'}{'' if graphs else ', eager'})"
            row = serve_row(tag, plan, reqs, device, doc["h2d_gbps"], stores[key], predictor, lookahead=ahead,
                            graphs=graphs)
            run = plan.generation.run
            row.update(plan_mode=mode, predicted_run_s=run.run_s if run else None, lookahead=ahead, graphs=graphs,
                       predicted_run_tokens_per_s=run.tokens_per_s if run else None,
                       bound_tokens_per_s=run.generated_tokens / run.bound_s if run and run.bound_s else None,
                       admission=plan.generation.admission)
            doc["rows"].append(row)
            write(args.out, "serve.json", doc)
    table(doc)
    run_table(doc)
    return 0


def run_table(doc: dict) -> None:
    """Each case's run, measured, beside the run its plan predicted (plans made for the requests)."""
    print(f"\n{'case':40s} {'run s':>8s} {'predicted':>9s} {'/pred':>6s} {'tok/s':>8s} {'pred tok/s':>10s} "
          f"{'bound':>7s} {'seqs':>5s} {'admission':>14s}")
    for r in doc["rows"]:
        pred = r.get("predicted_run_s")
        ratio = f"{r['total_s'] / pred:6.3f}" if pred else f"{'-':>6s}"
        print(f"{r['case'][:40]:40s} {r['total_s']:8.2f} {pred or 0:9.2f} {ratio} {r['tokens_per_s']:8.1f} "
              f"{r.get('predicted_run_tokens_per_s') or 0:10.1f} {r.get('bound_tokens_per_s') or 0:7.1f} "
              f"{r['concurrency']:5d} {r.get('admission', '-'):>14s}")


if __name__ == "__main__":
    raise SystemExit(main())
