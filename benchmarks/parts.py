"""Predicted pipeline steps for 1, 2, 4 and 8 parts (``compile --gpus N``): the planner's cost model, on this
machine, no GPU. For each part count: the layer ranges, the sequences at once, the tick (the slowest part's step,
every part busy with its own micro-batch) against that part's own PCIe floor, a micro-batch's time through every
part (a sequence's time per token is a round of N ticks), and predicted tokens per second.

    python benchmarks/parts.py --model llama-3-70b --budget 24GiB --hw h200 --out results/
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memintent.compiler.hardware import load_profile  # noqa: E402
from memintent.compiler.pipeline import plan_pipeline  # noqa: E402
from memintent.units import parse_bytes  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--budget", default="24GiB", help="HBM budget per GPU")
    ap.add_argument("--hw", default="h200")
    ap.add_argument("--gpus", default="1,2,4,8")
    ap.add_argument("--quant", default="int4")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--out", default=".")
    a = ap.parse_args()
    hw, budget_bytes = load_profile(a.hw), parse_bytes(a.budget, "--budget")
    rows = []
    for n in map(int, a.gpus.split(",")):
        t = time.perf_counter()
        print(f"[parts] planning {a.model} over {n} part(s)...", flush=True)
        pl = plan_pipeline(a.model, parts=n, budget_bytes=budget_bytes, hardware=hw, context=a.context,
                           prompt_len=a.prompt_len, gen_len=a.gen_len, quant=a.quant,
                           progress=lambda m: print(f"[parts]   {m}", flush=True))
        g = pl.parts[0].generation
        floors = [p.prediction.streamed_bytes / (hw.h2d_gbps * 1e9) for p in pl.parts]
        rows.append(dict(parts=n, layers=pl.layers, concurrency=g.concurrency, step_tokens=g.step_tokens,
                         kv_quant=pl.parts[0].kv_pool.quant.value,
                         part_step_s=[p.prediction.step_time_s for p in pl.parts], part_floor_s=floors,
                         tick_s=pl.pipelined_step_s, microbatch_s=pl.serial_step_s, tokens_per_s=pl.tokens_per_s,
                         send_bytes=pl.send_bytes, plan_s=time.perf_counter() - t))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parts.json").write_text(json.dumps(dict(model=a.model, budget=a.budget, hw=hw.name, quant=a.quant,
                                                     context=a.context, prompt_len=a.prompt_len,
                                                     gen_len=a.gen_len, rows=rows), indent=1) + "\n")
    print(f"\n{a.model}, {a.budget} per GPU, {hw.name} profile, {a.quant} weights (predicted)")
    print(f"{'parts':>6} {'seqs':>5} {'tick ms':>8} {'tick/floor':>10} {'microbatch ms':>13} {'tok/s':>8} {'x1':>5}")
    for r in rows:
        slow = max(range(r["parts"]), key=lambda i: r["part_step_s"][i])
        floor = r["part_floor_s"][slow]
        print(f"{r['parts']:>6} {r['concurrency']:>5} {1e3 * r['tick_s']:>8.1f} "
              f"{r['tick_s'] / floor if floor else float('nan'):>10.3f} {1e3 * r['microbatch_s']:>13.1f} "
              f"{r['tokens_per_s']:>8.1f} {r['tokens_per_s'] / rows[0]['tokens_per_s']:>5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
