"""Generation and quantized streaming on one GPU, each against its floor measured in the same process.

Sections (pick with --sections; default all):
  w1q      W1 forward streamed as bf16, int8 and int4 (every layer streams, depth 2): speed-up over bf16.
  l8b      llama-3-8b, bf16 streaming plan for generation: greedy tokens against the resident model's.
  l70b     llama-3-70b, int4 host weights, 24 GiB budget, throughput objective, prompt 512, gen 32: measured
           decode tokens/s against the plan's prediction, each decode step against streamed bytes / pinned H2D.
  opt30b   opt-30b f16 with the whole card as budget, 64 requests of prompt 512, gen 32: the planner's choice,
           next to a plan forced to stream every layer (decode step against its floor).

    python benchmarks/generate.py --out $OUT --sections w1q l8b l70b
    python benchmarks/generate.py --device cpu --model-small tiny-llama --sections w1q   # smoke test here

Prints a table last and writes generate.json under --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memintent.compiler.compile import compile_model  # noqa: E402
from memintent.compiler.hardware import BUILTIN  # noqa: E402
from memintent.compiler.planner import plan_generation  # noqa: E402
from memintent.compiler.refs import resolve  # noqa: E402
from memintent.commands.generate import generate_plan  # noqa: E402
from memintent.ir.model import Quant, Residency  # noqa: E402
from memintent.passes.costs import transfer_bytes  # noqa: E402
from memintent.passes.residency import slot_need_bytes  # noqa: E402
from memintent.runtime.quant import quantized_block_bytes  # noqa: E402
from memintent.runtime.profile import time_back_to_back  # noqa: E402
from memintent.runtime.profile import measure_h2d_gbps  # noqa: E402
from memintent.runtime import HostStore, attach  # noqa: E402

GiB = 1 << 30


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fill(plan, src, device):
    t = time.perf_counter()
    store = HostStore(plan, pin="auto" if device.type == "cuda" else "none")
    store.fill(src.fill_weights)
    return store, time.perf_counter() - t


def section_w1q(args, device, hw, h2d_gbps, rows):
    """W1 with every layer streamed (depth 2) as bf16, int8, int4: seconds per forward and the ratio to bf16."""
    name = args.model_small or "w1"
    src = resolve(name)
    batch, seq = (1, 64)
    inputs = (torch.randint(0, src.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device),)
    probe = compile_model(name, budget_bytes=None, hardware=hw, batch=batch, seq=seq)
    layer = max(probe.blocks, key=lambda b: b.size_bytes)
    small = sum(b.size_bytes for b in probe.blocks if b.size_bytes < layer.size_bytes)
    base = None
    for quant in ("none", "int8", "int4"):
        # Every layer streams in all three: room for two slots (weights + packed bytes) and a reserve smaller than a
        # layer, so the three plans move the same layers and differ only in bytes per layer.
        q = layer.model_copy(update={"quant": Quant(quant)})
        need = slot_need_bytes(q.model_copy(update={"transfer_bytes": transfer_bytes(q, probe)}))
        budget = small + 2 * need + (int(1.5 * GiB) if device.type == "cuda" else 1 << 16)
        plan = compile_model(name, budget_bytes=budget, hardware=hw, batch=batch, seq=seq, depth=2, quant=quant)
        store, fill_s = fill(plan, src, device)
        model = src.build("meta")
        handle = attach(model, plan, device, host_store=store)
        try:
            with torch.no_grad():
                t, _, _ = time_back_to_back(lambda: model(*inputs), device, args.repeats)
            st = handle.stats()[-1]
        finally:
            handle.detach()
            del model, store
            free(device)
        pr = plan.prediction
        floor = pr.streamed_bytes / (h2d_gbps * 1e9)
        base = base or t
        streamed = sum(1 for b in plan.blocks if b.residency == Residency.streamed)
        rows.append(dict(section="w1q", case=f"{name} 1x64 {quant}", time_s=t, floor_s=floor, ratio_floor=t / floor if floor else None,
                         predicted_s=pr.step_time_s, speedup_vs_bf16=base / t, streamed_blocks=streamed,
                         streamed_bytes=pr.streamed_bytes, stall_s=st.stall_s, host_fill_s=fill_s))
        print(f"w1q {quant}: {t * 1e3:.1f} ms/forward (floor {floor * 1e3:.1f}, predicted {pr.step_time_s * 1e3:.1f}),"
              f" {base / t:.2f}x bf16", flush=True)


def run_generation(tag, plan, args, device, h2d_gbps, rows, requests=None, verify=False):
    src = resolve(plan.model.ref)
    t = time.perf_counter()
    store, fill_s = fill(plan, src, device)
    rep, code = generate_plan(plan, device=str(device), requests=requests, verify=verify, store=store, quiet=True,
                              warmup=True)
    total = time.perf_counter() - t
    del store
    free(device)
    g = plan.generation
    steps = [w["decode_step_s"] for w in rep.waves]
    floor = plan.prediction.streamed_bytes / (h2d_gbps * 1e9)
    row = dict(section=tag, case=f"{plan.model.ref} b{g.batch} {g.quant_policy}", batch=g.batch,
               streamed_blocks=sum(1 for b in plan.blocks if b.residency == Residency.streamed),
               int4_blocks=sum(1 for b in plan.blocks if b.quant.value == "int4"),
               decode_step_s=statistics.median(steps), floor_s=floor, predicted_step_s=g.decode_step_s,
               ratio_floor=statistics.median(steps) / floor if floor else None,
               decode_tok_s=statistics.median(w["decode_tokens_per_s"] for w in rep.waves),
               predicted_decode_tok_s=g.batch / g.decode_step_s, predicted_tok_s=g.tokens_per_s,
               prefill_s=statistics.median(w["prefill_s"] for w in rep.waves), predicted_prefill_s=g.prefill_s,
               requests=rep.requests, total_s=rep.total_s, tokens_per_s=rep.tokens_per_s, host_fill_s=fill_s,
               setup_and_run_s=total, host_store_bytes=plan.prediction.streamed_bytes, peak_hbm_bytes=rep.peak_hbm_bytes,
               budget_bytes=plan.budget_bytes, identical=rep.identical, agreement=rep.agreement, exit_code=code,
               decode_mode=rep.decode_mode)
    rows.append(row)
    print(f"{tag}: {row['case']}: decode {row['decode_tok_s']:.2f} tok/s (plan {row['predicted_decode_tok_s']:.2f}), "
          f"step {row['decode_step_s'] * 1e3:.1f} ms (floor {floor * 1e3:.1f}), prefill {row['prefill_s']:.2f} s, "
          f"{rep.requests} requests {rep.total_s:.1f} s, fill {fill_s:.1f} s, identical={rep.identical}", flush=True)
    return row


def section_l8b(args, device, hw, h2d_gbps, rows):
    plan = plan_generation(args.model_small or "llama-3-8b", budget_bytes=args.l8b_budget, hardware=hw,
                           context=256, prompt_len=128, gen_len=16, quant="none", batch=4)
    run_generation("l8b", plan, args, device, h2d_gbps, rows, verify=True)


def section_l70b(args, device, hw, h2d_gbps, rows):
    t = time.perf_counter()
    plan = plan_generation("llama-3-70b", budget_bytes=24 * GiB, hardware=hw, context=1024, prompt_len=512,
                           gen_len=32, objective="throughput", quant="int4")
    compile_s = time.perf_counter() - t
    row = run_generation("l70b", plan, args, device, h2d_gbps, rows)
    row["compile_s"] = compile_s
    # Pinned host memory is what streams (resident blocks sit in pageable memory, copied once); compare it with
    # the model quantized to int4 throughout.
    objs = plan.object_map()
    row["host_pinned_gb"] = sum(b.transfer_bytes for b in plan.blocks if b.residency == Residency.streamed) / 1e9
    row["int4_model_gb"] = sum(
        quantized_block_bytes(b.model_copy(update={"quant": Quant.int4}), objs)
        if any(len(objs[w].shape) == 2 for w in b.weights) else b.size_bytes for b in plan.blocks) / 1e9


def section_opt30b(args, device, hw, h2d_gbps, rows):
    name = args.model_small or "opt-30b"
    card = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 8 * GiB
    own = plan_generation(name, budget_bytes=int(card * 0.97), hardware=hw, context=544, prompt_len=512,
                          gen_len=32, objective="throughput", quant="none")
    run_generation("opt30b", own, args, device, h2d_gbps, rows, requests=64)
    # Forced to stream every layer: a budget with room for the small blocks, two layer slots and a small batch's
    # KV. Fewer requests: at ~1 s a decode step, 64 of them would take minutes of device time.
    if args.opt_forced_requests <= 0:
        return
    forced = plan_generation(name, budget_bytes=args.opt_forced_budget, hardware=hw, context=544, prompt_len=512,
                             gen_len=32, objective="throughput", quant="none", batch=4)
    run_generation("opt30b-stream", forced, args, device, h2d_gbps, rows, requests=args.opt_forced_requests)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", nargs="+", default=["w1q", "l8b", "l70b", "opt30b"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--model-small", default=None, help="replace the big models (smoke tests on the CPU)")
    ap.add_argument("--l8b-budget", type=int, default=10 * GiB)
    ap.add_argument("--opt-forced-requests", type=int, default=4)
    ap.add_argument("--opt-forced-budget", type=int, default=7 * GiB)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    hw = BUILTIN["h100-sxm"] if device.type == "cuda" else BUILTIN["cpu"]
    h2d = measure_h2d_gbps(device, nbytes=2 * GiB if device.type == "cuda" else 64 << 20)
    print(f"pinned H2D {h2d:.1f} GB/s", flush=True)
    rows: list[dict] = []
    results = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__, date=time.strftime("%Y-%m-%d"), h2d_gbps=h2d, rows=rows)
    for sec in args.sections:
        try:
            {"w1q": section_w1q, "l8b": section_l8b, "l70b": section_l70b, "opt30b": section_opt30b}[sec](
                args, device, hw, h2d, rows)
        except Exception as e:   # keep the other sections' numbers: report the failure and go on
            import traceback

            traceback.print_exc()
            rows.append(dict(section=sec, case="FAILED", error=f"{type(e).__name__}: {e}"[:400]))
        free(device)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "generate.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n{results['device']}, torch {results['torch']}, pinned H2D {h2d:.1f} GB/s")
    for r in rows:
        keys = [k for k in ("time_s", "floor_s", "ratio_floor", "speedup_vs_bf16", "decode_tok_s",
                            "predicted_decode_tok_s", "decode_step_s", "predicted_step_s", "prefill_s", "total_s",
                            "tokens_per_s", "host_fill_s", "identical", "agreement", "decode_mode", "error")
                if r.get(k) is not None]
        print(f"{r['section']:13s} {r['case']:28s} " + " ".join(
            f"{k}={r[k]:.4g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
