"""W1 streamed forward against its floor, in one process (benchmarks/RESULTS.md records the runs).

Measures, on one GPU: pinned host->device bandwidth (2 GiB copies), the resident forward, the forward streamed under
a plan that streams every decoder layer (8 of 8 for W1: the residency decision is given, embedding and head stay
resident), the planner's own choice at that plan's budget, a plan whose budget holds the whole model (must run
within 2% of resident), and Accelerate's ``cpu_offload`` when it is installed. Each row says what streamed. Checks
that streamed logits are bitwise identical to resident ones and that peak HBM stays under the budget.

    python benchmarks/stream_forward.py --out $OUT                 # on the GPU machine (W1, 1x64 and 4x512)
    python benchmarks/stream_forward.py --model tiny-llama --device cpu --tokens 1x16 --quick   # smoke test here

``--quant none int4 int4g`` measures, instead, every decoder layer streamed at each bit width (its own host store,
packed), each against its own PCIe floor (its streamed bytes over the measured pinned H2D rate), with the bytes per
weight of the streamed layers, the median unpacking time per forward (CUDA events) beside the copy time, and the
logits' relative error against the resident bf16 model:

    python benchmarks/stream_forward.py --out $OUT --tokens 1x64 --quant none int4 int4g --no-accelerate

Prints a table last and writes ``stream_forward.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memintent.passes.verify import prove
from memintent.compiler.compile import compile_model  # noqa: E402
from memintent.compiler.hardware import BUILTIN, load_profile  # noqa: E402
from memintent.models.refs import resolve  # noqa: E402
from memintent.ir.model import Residency  # noqa: E402
from memintent.models.plan_model import resident_model
from memintent.runtime.profile import time_back_to_back as timed  # noqa: E402
from memintent.runtime.profile import measure_h2d_gbps  # noqa: E402
from memintent.runtime import HostStore, attach  # noqa: E402
from memintent.units import parse_tokens  # noqa: E402

GiB = 1 << 30


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_streamed(src, plan, store, device, inputs, repeats, check=False):
    model = src.build("meta")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    handle = attach(model, prove(plan), device, check=check, host_store=store)
    try:
        with torch.no_grad():
            med, ts, out = timed(lambda: model(*inputs), device, repeats)
        logits = src.logits(out).float().cpu()
        stats = handle.stats()[-repeats:]
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        handle.detach()
        del model
        free(device)
    overhead = statistics.median(s.host_overhead_per_block_s for s in stats)
    stall = [s.stall_s for s in stats if s.stall_s is not None]
    copy_s = [s.copy_s for s in stats if s.copy_s]
    dequant_s = [s.dequant_s for s in stats if s.dequant_s is not None]
    return dict(
        median_s=med, all_s=ts, peak_hbm_bytes=peak, logits=logits,
        host_overhead_per_block_s=overhead, stall_s=statistics.median(stall) if stall else None,
        copy_gbps=statistics.median(s.copy_gbps for s in stats if s.copy_gbps) if copy_s else None,
        bytes_copied=stats[-1].bytes_copied, copies=stats[-1].copies,
        copy_s=statistics.median(copy_s) if copy_s else None,
        dequant_s=statistics.median(dequant_s) if dequant_s else None,
    )


def every_layer_streams(model: str, probe, budget_bytes: int, hw, batch: int, seq: int, quant: str = "none"):
    """A plan that streams every decoder layer through two slots (at bit width ``quant``), the rest resident: the
    residency decision is given (a budget alone lets the planner keep a layer resident where the small blocks
    leave room for one)."""
    from memintent.compiler.compile import trace_ref
    from memintent.ir.model import Quant, RunShape
    from memintent.passes import ACTIONS, COSTS, LIFETIMES, PREFETCH, VERIFY, run_passes
    from memintent.passes.residency import given_residency_pass

    layers = {b.name for b in probe.blocks if b.name.startswith("layers.")}
    program = trace_ref(model, RunShape(batch=batch, seq=seq)).model_copy(
        update={"budget_bytes": budget_bytes, "hardware": hw})
    return run_passes(program, (LIFETIMES, COSTS, given_residency_pass(layers, 2, Quant(quant)), PREFETCH, ACTIONS,
                                VERIFY))


def what_streams(plan) -> str:
    """In words: how many decoder layers stream, and which other blocks."""
    streamed = [b.name for b in plan.blocks if b.residency == Residency.streamed and b.name in
                {v.block for v in plan.visits}]
    layers = [b for b in plan.blocks if b.name.startswith("layers.")]
    n = sum(1 for b in streamed if b.startswith("layers."))
    others = [b for b in streamed if not b.startswith("layers.")]
    return f"{n} of {len(layers)} layers" + (f" + {', '.join(others)}" if others else "")


def bytes_per_weight(plan) -> float:
    """Bytes a visit copies per weight of the streamed decoder layers (values, scales, minimums, raw norms)."""
    objs = plan.object_map()
    layers = [b for b in plan.blocks if b.residency == Residency.streamed and b.name.startswith("layers.")]
    return sum(b.transfer_bytes for b in layers) / sum(math.prod(objs[w].shape) for b in layers for w in b.weights)


def quant_rows(args, src, probe, device, hw, tok, inputs, ref_logits, res_s, h2d_gbps, budget_bytes) -> list[dict]:
    """Every decoder layer streamed at each ``--quant`` bit width, each from its own (packed) host store."""
    from memintent.runtime.quant import relative_error

    batch, seq = parse_tokens(tok)
    rows = []
    for quant in args.quant:
        plan = every_layer_streams(args.model, probe, budget_bytes, hw, batch, seq, quant)
        store = HostStore(plan, pin="auto" if device.type == "cuda" else "none",
                          quant_device=device if device.type == "cuda" else None)
        store.fill(src.fill_weights)
        r = run_streamed(src, plan, store, device, inputs, args.repeats if not args.quick else 2)
        store.close()
        pr = plan.prediction
        floor_s = pr.streamed_bytes / (h2d_gbps * 1e9)
        row = dict(tokens=tok, plan=f"every layer streams, {quant}", quant=quant, streams=what_streams(plan),
                   budget_bytes=plan.budget_bytes, streamed_bytes=pr.streamed_bytes, floor_s=floor_s,
                   predicted_s=pr.step_time_s, resident_s=res_s, bytes_per_weight=bytes_per_weight(plan),
                   ratio_to_floor=r["median_s"] / floor_s, logits_rel_error=relative_error(ref_logits, r["logits"]),
                   **{k: v for k, v in r.items() if k != "logits"})
        rows.append(row)
        print(f"{tok} {row['plan']}: {r['median_s'] * 1e3:.1f} ms, floor {floor_s * 1e3:.1f} ms "
              f"({row['ratio_to_floor']:.3f} x), {row['bytes_per_weight']:.4f} B/weight, unpack "
              f"{(r['dequant_s'] or 0) * 1e3:.1f} ms of copy {(r['copy_s'] or 0) * 1e3:.1f} ms", flush=True)
        free(device)
    return rows


def print_quant_table(results: dict, rows: list[dict]) -> None:
    print(f"\n{results['device']}, torch {results['torch']}, pinned H2D {results['h2d_gbps']:.1f} GB/s, "
          f"{results['model']}: every decoder layer streamed")
    print(f"{'tokens':7s} {'quant':6s} {'B/weight':>9s} {'streamed':>10s} {'time':>9s} {'floor':>9s} "
          f"{'x floor':>8s} {'unpack':>9s} {'copy':>9s} {'logits err':>10s}")
    for r in rows:
        ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}ms"  # noqa: E731
        print(f"{r['tokens']:7s} {r['quant']:6s} {r['bytes_per_weight']:9.4f} {r['streamed_bytes'] / 1e9:8.2f}GB "
              f"{ms(r['median_s']):>9s} {ms(r['floor_s']):>9s} {r['ratio_to_floor']:8.3f} {ms(r['dequant_s']):>9s} "
              f"{ms(r['copy_s']):>9s} {r['logits_rel_error']:10.2e}")


def write_json(args, results: dict) -> None:
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = "stream_forward_quant.json" if args.quant else "stream_forward.json"
        (Path(args.out) / name).write_text(json.dumps(results, indent=1, default=str))


def accelerate_offload(src, store, device, inputs, repeats):
    try:
        from accelerate import cpu_offload
    except ImportError:
        return None
    model = src.build("meta").to_empty(device="cpu")
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            try:
                t.copy_(store.view(name))
            except KeyError:
                pass
    cpu_offload(model, execution_device=device)
    with torch.no_grad():
        med, ts, out = timed(lambda: model(*inputs), device, repeats)
    del model
    free(device)
    return dict(median_s=med, all_s=ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="w1")
    ap.add_argument("--tokens", nargs="+", default=["1x64", "4x512"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--out", default=None, help="folder for stream_forward.json")
    ap.add_argument("--quick", action="store_true", help="small smoke test: fewer repeats, no baselines")
    ap.add_argument("--no-accelerate", action="store_true")
    ap.add_argument("--quant", nargs="+", default=None, choices=("none", "int8", "int4", "int4g"),
                    help="measure every decoder layer streamed at each of these bit widths (and nothing else)")
    ap.add_argument("--hw", default=None, help="hardware profile for the plans (default: h100-sxm; e.g. the JSON "
                                               "`memintent profile` wrote on this card)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    hw = load_profile(args.hw) if args.hw else BUILTIN["h100-sxm"] if device.type == "cuda" else BUILTIN["cpu"]
    src = resolve(args.model)
    repeats = 2 if args.quick else args.repeats
    results = dict(model=args.model, hw=hw.name, hw_source=hw.source, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   torch=torch.__version__, date=time.strftime("%Y-%m-%d"), runs=[])

    h2d_gbps = measure_h2d_gbps(device, nbytes=2 * GiB if device.type == "cuda" else 64 << 20)
    results["h2d_gbps"] = h2d_gbps
    print(f"pinned H2D: {h2d_gbps:.1f} GB/s", flush=True)

    # One host store for every plan: all plans of a model share the block layout (blocks come from the trace).
    probe = compile_model(args.model, budget_bytes=None, hardware=hw, batch=1, seq=8)
    t0 = time.perf_counter()
    # pin_resident: the probe plan keeps everything resident, but the plans below stream from this same store
    store = HostStore(probe, pin="auto" if device.type == "cuda" else "none", pin_resident=True)
    store.fill(src.fill_weights)
    results["host_fill_s"] = time.perf_counter() - t0
    layer_bytes = max(b.size_bytes for b in probe.blocks)
    print(f"host store: {store.nbytes / 1e9:.2f} GB filled in {results['host_fill_s']:.1f} s", flush=True)

    rows = []
    for tok in args.tokens:
        batch, seq = parse_tokens(tok)
        gen = torch.Generator().manual_seed(0)
        inputs = (torch.randint(0, src.vocab_size, (batch, seq), generator=gen).to(device),)   # (B, S)
        with torch.no_grad():
            ref = resident_model(src, device)
            res_s, _, out = timed(lambda: ref(*inputs), device, repeats)
            ref_logits = src.logits(out).float().cpu()
            del ref, out
        free(device)
        # A budget at which every decoder layer streams: the small blocks plus two layer slots and the reserve.
        small = sum(b.size_bytes for b in probe.blocks if b.size_bytes < layer_bytes)
        # 1.5 GiB holds the activations and workspace but not a third layer (1.71 GB), so every layer streams.
        all_stream_budget = small + 2 * layer_bytes + int(1.5 * GiB if device.type == "cuda" else 1 << 20)
        if args.quant:
            # quantized visits need an unpack slot next to their (smaller) stream slots: a third layer's room
            rows += quant_rows(args, src, probe, device, hw, tok, inputs, ref_logits, res_s, h2d_gbps,
                               all_stream_budget + layer_bytes)
            continue
        plans = {
            "every decoder layer streams": every_layer_streams(args.model, probe, all_stream_budget, hw, batch, seq),
            "planner's choice, same budget": compile_model(args.model, budget_bytes=all_stream_budget, hardware=hw,
                                                           batch=batch, seq=seq),
            "budget holds the model": compile_model(args.model, budget_bytes=(store.nbytes + 8 * GiB) if
                                                    device.type == "cuda" else None, hardware=hw, batch=batch, seq=seq),
        }
        for name, plan in plans.items():
            r = run_streamed(src, plan, store, device, inputs, repeats)
            pr = plan.prediction
            floor_s = max(pr.streamed_bytes / (h2d_gbps * 1e9), res_s)
            identical = bool(torch.equal(r.pop("logits"), ref_logits))
            streamed = sum(1 for b in plan.blocks if b.residency == Residency.streamed)
            row = dict(tokens=tok, plan=name, budget_bytes=plan.budget_bytes, streamed_blocks=streamed,
                       streams=what_streams(plan),
                       depth=pr.prefetch_depth, streamed_bytes=pr.streamed_bytes, resident_s=res_s,
                       floor_s=floor_s, predicted_s=pr.step_time_s, predicted_peak_bytes=pr.peak_hbm_bytes,
                       ratio_to_floor=r["median_s"] / floor_s, ratio_to_resident=r["median_s"] / res_s,
                       identical=identical, block_copy_s=layer_bytes / (h2d_gbps * 1e9), **r)
            row["overhead_pct_of_copy"] = 100 * r["host_overhead_per_block_s"] / row["block_copy_s"]
            if r["peak_hbm_bytes"]:
                row["peak_vs_predicted"] = r["peak_hbm_bytes"] / pr.peak_hbm_bytes
            if name == "budget holds the model":
                # the same resident model again, right after: tells the runtime's cost from drift of the card
                with torch.no_grad():
                    ref = resident_model(src, device)
                    row["resident_again_s"], _, _ = timed(lambda: ref(*inputs), device, repeats)
                    del ref
                free(device)
            rows.append(row)
            print(f"{tok} {name}: {r['median_s'] * 1e3:.1f} ms (floor {floor_s * 1e3:.1f}, resident {res_s * 1e3:.1f},"
                  f" predicted {pr.step_time_s * 1e3:.1f}) identical={identical}", flush=True)
        if device.type == "cuda" and not args.quick and not args.no_accelerate:
            acc = accelerate_offload(src, store, device, inputs, 2)
            if acc:
                rows.append(dict(tokens=tok, plan="accelerate cpu_offload", median_s=acc["median_s"], floor_s=None,
                                 resident_s=res_s, ratio_to_resident=acc["median_s"] / res_s))
    results["runs"] = rows
    write_json(args, results)
    if args.quant:
        print_quant_table(results, rows)
        return 0

    print(f"\n{results['device']}, torch {results['torch']}, pinned H2D {h2d_gbps:.1f} GB/s, {args.model}")
    print(f"{'tokens':7s} {'plan':31s} {'streams':22s} {'time':>9s} {'floor':>9s} {'x floor':>8s} {'x resid':>8s} "
          f"{'pred':>9s} {'peak/pred':>9s} {'peak<=bud':>9s} {'ovh %':>6s} {'same':>5s}")
    for r in rows:
        ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}ms"  # noqa: E731
        print(f"{r['tokens']:7s} {r['plan']:31s} {r.get('streams', '-')[:22]:22s} {ms(r['median_s']):>9s} "
              f"{ms(r.get('floor_s')):>9s} "
              f"{r.get('ratio_to_floor', 0):8.3f} {r.get('ratio_to_resident', 0):8.3f} {ms(r.get('predicted_s')):>9s} "
              f"{r.get('peak_vs_predicted', 0):9.3f} "
              f"{str(r['peak_hbm_bytes'] <= r['budget_bytes']) if r.get('peak_hbm_bytes') else '-':>9s} "
              f"{r.get('overhead_pct_of_copy', 0):6.2f} {str(r.get('identical', '-')):>5s}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
