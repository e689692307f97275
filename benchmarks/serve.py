"""Serving llama-3-70b with int4 streamed weights under a 24 GiB budget, on one GPU, against floors from this run.

Cases (each a plan of the planner's own choice, served by the engine):
  mix-bf16   512 seeded requests, prompts 64-1024 tokens, outputs 16-128, KV in bf16
  mix-int8   the same requests, int8 KV
  fixed      64 requests of prompt 512 + 32 generated (the wave engine's workload; its batch-32 figure: 50.3 tok/s)

Every step streams the plan's bytes; the floor of a step is streamed bytes / pinned H2D measured at the start. Peak
HBM is torch's max_memory_allocated over the run, against the plan's budget.

    python benchmarks/serve.py --out $OUT
    python benchmarks/serve.py --model tiny-llama --device cpu --budget 3MiB --requests 16 --dtype f32   # smoke test

Prints a table last and writes serve.json under --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import card_profile, fill, free, header, serve_row, table, write  # noqa: E402
from memintent.compiler.planner import StepPredictor, plan_generation  # noqa: E402
from memintent.models.refs import resolve  # noqa: E402
from memintent.engine.requests import synthetic  # noqa: E402
from memintent.units import parse_bytes  # noqa: E402


def layout_key(plan) -> tuple:
    return tuple((b.name, b.quant.value) for b in plan.blocks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--budget", default="24GiB")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--cases", nargs="+", default=["mix-bf16", "mix-int8", "fixed"])
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--predict", action="store_true", help="also the cost model's time of each step as it ran")
    ap.add_argument("--hw", default=None, help="hardware profile (file or built-in name; default: this card's)")
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
    fixed = synthetic(64, (512, 512), (32, 32), vocab, seed=1)
    cases = {"mix-bf16": (dict(context=context, prompt_len=544, gen_len=72, kv_quant="none"), mix),
             "mix-int8": (dict(context=context, prompt_len=544, gen_len=72, kv_quant="int8"), mix),
             "fixed": (dict(context=544, prompt_len=512, gen_len=32, kv_quant="none"), fixed)}
    stores: dict[tuple, object] = {}
    for name in args.cases:
        kw, reqs = cases[name]
        plan = plan_generation(args.model, budget_bytes=budget, hardware=hw, quant="int4", dtype=args.dtype, **kw)
        key = layout_key(plan)
        if key not in stores:       # plans with the same blocks at the same bit widths share one host store
            stores.clear()
            free(device)
            stores[key], fill_s = fill(plan, src, device)
            doc.setdefault("host_fill_s", []).append(fill_s)
        predictor = StepPredictor(plan) if args.predict else None
        doc["rows"].append(serve_row(f"{args.model} {name}", plan, reqs, device, doc["h2d_gbps"], stores[key],
                                     predictor))
        write(args.out, "serve.json", doc)
    table(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
