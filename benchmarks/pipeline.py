"""Pipeline parts against the one-GPU plan of the same model and requests: on one card, or a GPU per part.

On one card (the default), both parts of ``compile --gpus 2`` run in this process, one after another in each
tick (they share one PCIe link and one GPU), so the run's tokens/s is not a multi-GPU figure. What one card
measures: each part's step (from its input's arrival to its output) against that part's own PCIe floor (its
streamed bytes / pinned H2D measured in this run), the tokens against the one-GPU plan's on the same requests, and
peak HBM against the parts' budgets summed. Under torchrun (one process and GPU per part, NCCL; gloo on the CPU)
the parts run at once and the run's tokens/s is the pipeline's, against the one-GPU run ``--one-gpu`` left under
the same --out just before. ``estimated``: a micro-batch's tokens per the slowest part's measured step.

    python benchmarks/pipeline.py --out $OUT                     # one card: both parts in this process
    python benchmarks/pipeline.py --one-gpu --out $OUT && \
        torchrun --nproc-per-node 2 benchmarks/pipeline.py --out $OUT   # a GPU per part, against one GPU
    python benchmarks/pipeline.py --model tiny-llama --device cpu --budget 5MiB --requests 8 --dtype f32   # smoke

Prints a table last and writes pipeline.json (pipeline-dist.json under torchrun) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import GiB, card_profile, free, header, serve_row, write  # noqa: E402
from memintent.engine.core import RunOptions
from memintent.commands.generate import serve  # noqa: E402
from memintent.compiler.planner import plan_generation  # noqa: E402
from memintent.models.refs import resolve  # noqa: E402
from memintent.compiler.pipeline import plan_pipeline  # noqa: E402
from memintent.engine.links import link_from_env, rank_device  # noqa: E402
from memintent.engine.requests import synthetic  # noqa: E402
from memintent.units import parse_bytes  # noqa: E402


def part_rows(pipeline, engine, h2d_gbps: float) -> list[dict]:
    rows = []
    for r, steps in engine.part_steps.items():
        p = pipeline.parts[r]
        floor_s = p.prediction.streamed_bytes / (h2d_gbps * 1e9)
        # decode-only micro-batches: the steps the floor bounds (prompt-heavy ones may be compute-bound)
        decode = [s.time_s for s in steps if s.decode_tokens == s.tokens]
        med = statistics.median(decode or [s.time_s for s in steps])
        rows.append(dict(part=r, layers=pipeline.layers[r], streamed_bytes=p.prediction.streamed_bytes,
                         floor_s=floor_s, step_median_s=med, step_over_floor=med / floor_s if floor_s else None,
                         predicted_step_s=p.prediction.step_time_s, steps=len(steps), decode_steps=len(decode),
                         budget_bytes=p.budget_bytes))
    return rows


def agreement(outs, ref: dict) -> dict:
    """How far each request's tokens agree with the one-GPU plan's: identical requests, the same first token, and
    the share of tokens before the first difference. bf16 steps of other compositions (a micro-batch holds other
    sequences than a one-GPU step) round differently, and greedy decoding of random weights turns a near tie into
    another token; a wrong pipeline would already differ at the first token."""
    same = first = prefix = total = 0
    for o in outs:
        want = ref[o.id]
        same += o.token_ids == want
        first += bool(o.token_ids) and bool(want) and o.token_ids[0] == want[0]
        k = next((i for i, (a, b) in enumerate(zip(o.token_ids, want)) if a != b), min(len(o.token_ids), len(want)))
        prefix, total = prefix + k, total + len(want)
    return dict(requests_identical=same, first_token_same=first, prefix_token_share=prefix / total if total else 0.0)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--budget", default="24GiB", help="per GPU")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--quant", default="int4", help="weights' bit width for both plans (none: bf16, bitwise exact)")
    ap.add_argument("--hw", default=None)
    ap.add_argument("--one-gpu", action="store_true", help="only the one-GPU plan (before a torchrun of the parts)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def one_gpu(a, device, doc, reqs, kw, say) -> tuple[object, dict]:
    """The one-GPU plan served on ``reqs``: its plan and each request's tokens (also saved beside the JSON, for a
    later torchrun of the parts)."""
    say("planning one GPU")
    one = plan_generation(a.model, progress=say, **kw)
    row = serve_row(f"{a.model} 1 GPU", one, reqs, device, doc["h2d_gbps"])
    ref = row.pop("_outputs")
    row["layout"] = {b.name: b.quant.value for b in one.blocks}
    doc["rows"].append(row)
    write(a.out, "pipeline.json", doc)
    if a.out:
        (Path(a.out) / "one_gpu_tokens.json").write_text(json.dumps(ref))
    free(device)
    return row, ref


def earlier_one_gpu(out: str | None) -> tuple[dict | None, dict]:
    """The one-GPU row and tokens that ``--one-gpu`` wrote under ``out`` (a torchrun of the parts runs after it)."""
    if not out or not (Path(out) / "one_gpu_tokens.json").exists():
        return None, {}
    doc = json.loads((Path(out) / "pipeline.json").read_text())
    return doc["rows"][0], json.loads((Path(out) / "one_gpu_tokens.json").read_text())


def run_parts(a, device, doc, reqs, kw, say, row, ref, link) -> dict:
    say(f"planning {a.parts} parts")
    t = time.perf_counter()
    pipe = plan_pipeline(a.model, parts=a.parts, progress=say, **kw)
    doc["pipeline_plan_s"] = time.perf_counter() - t
    rep, outs, engine = serve(pipe, reqs, RunOptions(device=device), warmup=True, link=link)
    parts = part_rows(pipe, engine, doc["h2d_gbps"])
    if link is not None and link.world > 1:      # every rank measured its own part: rank 0 reports them all
        every: list = [None] * link.world
        torch.distributed.all_gather_object(every, parts)
        parts = [s for part in every for s in part]
    agree = agreement(outs, ref) if ref else {}
    if row is not None:
        # Other bit widths (a part with room keeps a block resident in the model dtype that one GPU streams as
        # int4) are other weights: tokens then differ for that reason alone.
        bits = {b.name: b.quant.value for p in pipe.parts for b in p.blocks}
        agree["blocks_at_other_bit_widths"] = sorted(k for k, q in row["layout"].items() if bits.get(k) != q)
    micro = statistics.median(s.decode_tokens for s in engine.stats.steps if s.decode_tokens)
    slowest_s = max(s["step_median_s"] for s in parts)
    free(device)
    return dict(layers=pipe.layers, processes=link.world if link is not None else 1,
                concurrency=pipe.parts[0].generation.concurrency, tokens_per_s=rep.tokens_per_s,
                full_decode_tokens_per_s=rep.full_decode_tokens_per_s, predicted_tokens_per_s=pipe.tokens_per_s,
                predicted_tick_s=pipe.pipelined_step_s, micro_batch_decode_tokens=micro,
                one_part_per_gpu_estimate_tokens_per_s=micro / slowest_s, parts=parts, **agree,
                requests=len(outs), peak_hbm_bytes=rep.peak_hbm_bytes,
                budget_bytes=sum(p.budget_bytes for p in pipe.parts), _outputs=[o.token_ids for o in outs])


def main(argv=None) -> int:
    a = parse(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1    # torchrun: one process (and GPU) per part
    device = rank_device(torch.device(a.device))
    hw = card_profile(device, spec=a.hw)
    doc = header(device, hw)
    src = resolve(a.model, dtype=a.dtype)
    context = min(576, src.max_positions or 576)           # prompts up to 512 + 64 generated
    reqs = synthetic(a.requests, (64, context - 64), (16, 64), src.vocab_size, seed=0)
    kw = dict(budget_bytes=parse_bytes(a.budget), hardware=hw, context=context, prompt_len=288, gen_len=40,
              quant=a.quant, dtype=a.dtype)
    say = lambda m: print(f"[pipeline] {m}", flush=True)  # noqa: E731
    if distributed:
        row, ref = earlier_one_gpu(a.out)
        link = link_from_env(device)
    else:
        row, ref = one_gpu(a, device, doc, reqs, kw, say)
        link = None
        if a.one_gpu:
            return 0
    d = run_parts(a, device, doc, reqs, kw, say, row, ref, link)
    if link is not None and link.rank > 0:
        return 0
    d.pop("_outputs")
    doc["pipeline"] = d
    if row is not None:
        doc["rows"] = [row]
    write(a.out, "pipeline-dist.json" if distributed else "pipeline.json", doc)
    report(doc, a, row, d)
    return 0


def report(doc: dict, a, row: dict | None, d: dict) -> None:
    where = f"{d['processes']} processes" if d["processes"] > 1 else "one process, one card"
    print(f"\n{doc['device']}, pinned H2D {doc['h2d_gbps']:.1f} GB/s, profile {doc['hw']}; {a.model}, {a.budget} "
          f"per part; parts in {where}")
    if row is not None:
        print(f"1 GPU: {row['tokens_per_s']:.1f} tok/s over the run, {row['full_decode_tokens_per_s']:.1f} at full "
              f"concurrency, step {row['step_median_s'] * 1e3:.1f} ms vs floor {row['floor_s'] * 1e3:.1f} ms")
    print(f"parts: {d['tokens_per_s']:.1f} tok/s over the run, {d['full_decode_tokens_per_s']:.1f} at full "
          f"concurrency (plan {d['predicted_tokens_per_s']:.1f})"
          + (f": {d['tokens_per_s'] / row['tokens_per_s']:.2f} x 1 GPU over the run" if row else ""))
    print(f"{'part':>5} {'layers':>9} {'streamed GB':>11} {'step ms':>8} {'floor ms':>8} {'x floor':>7} "
          f"{'plan ms':>8}")
    for s in d["parts"]:
        print(f"{s['part']:>5} {str(s['layers']):>9} {s['streamed_bytes'] / 1e9:11.2f} "
              f"{s['step_median_s'] * 1e3:8.1f} "
              f"{s['floor_s'] * 1e3:8.1f} {s['step_over_floor'] or 0:7.3f} {s['predicted_step_s'] * 1e3:8.1f}")
    if "requests_identical" in d:
        print(f"tokens identical to 1 GPU: {d['requests_identical']}/{d['requests']} requests, first token "
              f"{d['first_token_same']}/{d['requests']}, {100 * d['prefix_token_share']:.1f} % of tokens before a "
              f"difference; blocks at other bit widths than 1 GPU's: "
              f"{', '.join(d.get('blocks_at_other_bit_widths', [])) or 'none'}")
    print(f"peak {(d['peak_hbm_bytes'] or 0) / GiB:.2f} GiB of {d['budget_bytes'] / GiB:.2f} (parts summed in one "
          f"process, else this rank's); one part per GPU, estimated from the part steps: "
          f"{d['one_part_per_gpu_estimate_tokens_per_s']:.1f} tok/s at this run's micro-batches")


if __name__ == "__main__":
    raise SystemExit(main())
