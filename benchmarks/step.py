"""Engine steps at the hardware's limit (issue 18): a plan that keeps every weight resident, its decode steps against
their HBM floor, and where a prompt-heavy and a decode step spend their time.

Case ``resident``: opt-30b f16 on the whole card, 64 requests of prompt 512 + 32 generated at concurrency 64 (every
weight resident; decode steps replayed as CUDA graphs). Case ``streamed``: opt-30b at 24 GiB, weights at the bit
widths the planner picks (``auto``: int4g where they stream), int8 KV, 96 requests of 512 + 32 at concurrency 48 (the
step issue's FlexGen row): its prompt-heavy steps run the matmuls while the copy engine streams and the unpacking
kernels unpack. Reported: the run's time, each step against its floor (resident: the weights' bytes plus the live
keys and values, each read once, over the profile's device bandwidth; streamed: at least the streamed bytes over the
pinned H2D rate), the cost model's prediction per kind of step (decode-only, prompt-heavy, mixed), and torch.profiler
tables of one prompt-heavy and one decode step (host and device time, which kernels, the copies).

    python benchmarks/step.py --hw h200.json --out $OUT                   # on the GPU (the profile from this call)
    python benchmarks/step.py --case streamed --hw h200 --out $OUT          # the streamed case
    python benchmarks/step.py --device cpu --small --case both              # smoke test here

Prints a table last and writes step.json under --out.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from time import perf_counter

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import GiB, card_profile, fill, free, header, serve_row, write  # noqa: E402
from memintent.compiler.planner import StepPredictor, plan_generation  # noqa: E402
from memintent.engine import Engine  # noqa: E402
from memintent.engine.requests import synthetic  # noqa: E402
from memintent.engine.simulate import simulate_run, workload_of  # noqa: E402
from memintent.models.refs import resolve  # noqa: E402


def kind(s) -> str:
    if s.decode_tokens == s.tokens:
        return "decode"
    return "prompt" if s.prefill_tokens >= 0.8 * s.tokens else "mixed"


def floor_s(plan, record, hw) -> float:
    """The larger of: every weight plus the live keys and values the step's queries read, each read once from HBM;
    the streamed weights' bytes over the pinned H2D rate."""
    kv = plan.kv_pool
    weights = sum(b.size_bytes for b in plan.blocks)
    kv_bytes = (record.decode_context_tokens + record.prefill_context_tokens) * kv.page_bytes // kv.page_tokens
    streamed = sum(b.transfer_bytes for b in plan.blocks if b.residency.value == "streamed")
    return max((weights + kv_bytes) / (hw.hbm_gbps * 1e9), streamed / (hw.h2d_gbps * 1e9))


def by_kind(plan, steps, predictor, hw) -> dict:
    out = {}
    for k in ("decode", "prompt", "mixed"):
        group = [s for s in steps if s.tokens and kind(s) == k]
        if not group:
            continue
        ratios = [s.time_s / predictor.predict_s(s) for s in group]
        floors = [s.time_s / floor_s(plan, s, hw) for s in group]
        out[k] = dict(steps=len(group), median_s=statistics.median(s.time_s for s in group),
                      measured_over_predicted=statistics.median(ratios), over_floor=statistics.median(floors))
    return out


def profile_steps(plan, reqs, device, store, out: Path | None = None, case: str = "") -> dict:
    """torch.profiler tables of the first prompt-heavy step and of a decode step (after the graphs are captured);
    with ``out``, each step's timeline as a Perfetto (Chrome trace) file too, and the device's idle time between
    its kernels."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    # Without lookahead: a profiled call of ``step`` then runs exactly its own step (looking ahead, it would hold
    # the end of one step and the start of the next).
    with Engine(plan, device, store=store, lookahead=False) as eng:
        for r in reqs:
            eng.add(r)
        eng.step()                                          # first-call costs outside the profile
        for name in ("prompt", "decode"):
            while name == "decode" and eng.has_work and eng.scheduler.waiting:
                eng.step()                                  # every prompt admitted: the next steps decode
            for _ in range(2):
                if eng.has_work:
                    eng.step()                              # a decode bucket captured before it is profiled
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                eng.step()
                torch.cuda.synchronize(device)
            s = eng.stats.steps[-1]
            if out is not None:
                path = out / f"step-{case}-{name}.trace.json"
                prof.export_chrome_trace(str(path))
                tables[name + "_gaps"] = kernel_gaps(path)
                print(f"{name} step: device idle between kernels {tables[name + '_gaps']}", flush=True)
            tables[name] = (f"{name} step: {s.tokens} tokens ({s.prefill_tokens} prompt), {s.time_s * 1e3:.1f} ms\n"
                            + prof.key_averages().table(sort_by="cuda_time_total", row_limit=14,
                                                        max_name_column_width=44))
            print(tables[name], flush=True)
    return tables


def kernel_gaps(trace_path: Path, top: int = 8) -> dict:
    """From a Chrome trace: the device's busy and idle time between its first and last kernel, and the longest idle
    gaps with the kernels around them (what the device waited for)."""
    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    ks = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                key=lambda e: e["ts"])
    if not ks:
        return {}
    gaps, end_us = [], ks[0]["ts"] + ks[0]["dur"]
    for prev, e in itertools.pairwise(ks):
        if e["ts"] > end_us:
            gaps.append((e["ts"] - end_us, prev["name"][:40], e["name"][:40]))
        end_us = max(end_us, e["ts"] + e["dur"])
    span_us = end_us - ks[0]["ts"]
    idle_us = sum(g for g, _, _ in gaps)
    return dict(span_ms=span_us / 1e3, idle_ms=idle_us / 1e3, gaps=len(gaps),
                longest=[(round(g, 1), a, b) for g, a, b in sorted(gaps, reverse=True)[:top]])


def _timed(obj, name: str, acc: dict) -> None:
    """Wrap ``obj.name`` so that its host seconds add up in ``acc[name]`` (a benchmark's instrument)."""
    fn = getattr(obj, name)

    def wrapper(*a, **kw):
        t = perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            acc[name] = acc.get(name, 0.0) + perf_counter() - t

    setattr(obj, name, wrapper)


def host_split(plan, reqs, device, store, steps: int = 48) -> dict:
    """Where the host time of a step goes, per kind of step (decode, prompt, mixed: mean microseconds per step):
    each engine stage timed on the host, the step's wall time, and the device time of its forward (CUDA events
    around the model's launches: from the device reaching the first to it finishing the last). ``_read`` is the
    engine waiting for the device (reading the sampled tokens)."""
    acc: dict[str, float] = {}
    rows: list[tuple[str, dict, tuple | None]] = []      # per step: its kind, its host times (us), its forward's events
    with Engine(plan, device, store=store) as eng:
        for r in reqs:
            eng.add(r)
        runner = eng.runners[0]
        sched = eng.scheduler
        for obj, name in ((sched, "schedule"), (sched, "advance"), (sched, "record"), (runner, "move_pages"),
                          (runner, "lists"), (runner, "inputs"), (eng.sampler, "draw"), (eng, "_read"),
                          (runner, "forward")):
            _timed(obj, name, acc)
        if runner.graphs is not None:
            _timed(runner.graphs, "_upload", acc)
        events: dict[int, tuple] = {}                    # step index -> its forward's events
        forward = runner.forward

        def evented(batch, *a, **kw):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            out = forward(batch, *a, **kw)
            e1.record()
            events[batch.index] = (e0, e1)
            return out

        if device.type == "cuda":
            runner.forward = evented
        while eng.has_work and len(rows) < steps:
            acc.clear()
            t, recorded = perf_counter(), len(eng.stats.steps)
            eng.step()
            if len(eng.stats.steps) == recorded:
                continue                                 # a tick that recorded no step
            wall_s = perf_counter() - t
            rec = eng.stats.steps[-1]
            times_us = {k: v * 1e6 for k, v in acc.items()} | dict(wall=wall_s * 1e6)
            # a step that only moves pages runs no forward: no events. With the engine looking ahead, a tick's
            # host times are of this step's record and the next one's launch.
            rows.append((kind(rec) if rec.tokens else "empty", times_us, events.get(rec.index)))
        if events:
            torch.cuda.synchronize(device)
    out = {}
    for k in dict.fromkeys(k for k, _, _ in rows):
        mine = [(times, ev) for kk, times, ev in rows if kk == k]
        keys = sorted({key for times, _ in mine for key in times})
        out[k] = {key: statistics.mean(t.get(key, 0.0) for t, _ in mine) for key in keys} | dict(steps=len(mine))
        device_us = [a.elapsed_time(b) * 1e3 for _, ev in mine if ev is not None for a, b in [ev]]
        if device_us:
            out[k]["forward_device"] = statistics.mean(device_us)
    for k, v in out.items():
        print(f"host split, {k} steps (mean us): " + ", ".join(f"{n} {x:.0f}" for n, x in v.items()), flush=True)
    return out


# case -> (title, budget bytes (None: 95 % of the card), weight bit widths, KV, requests, concurrency)
CASES = {"resident": ("resident (whole card), concurrency 64", None, "none", "none", 64, 64),
         "streamed": ("streamed (24 GiB), int8 KV, concurrency 48", 24 * GiB, "auto", "int8", 96, 48)}
SMALL_BUDGET_BYTES = {"resident": 64 << 20, "streamed": 4 << 20}   # tiny-llama f32: all resident; some streamed


def section(case: str, args, device, hw, doc, max_step_tokens: int | None = None) -> None:
    title, budget, quant, kv_quant, n, concurrency = CASES[case]
    if max_step_tokens:
        title += f", steps of at most {max_step_tokens} tokens"
    name = "tiny-llama" if args.small else "opt-30b"
    if args.small:
        budget = SMALL_BUDGET_BYTES[case]
    elif budget is None:
        budget = int(0.95 * torch.cuda.get_device_properties(device).total_memory)
    src = resolve(name, dtype="f32" if args.small else None)
    reqs = synthetic(n, (512, 512) if not args.small else (16, 16), (32, 32) if not args.small else (8, 8),
                     src.vocab_size, seed=1)
    # --plan requests: what `compile --synthetic` plans (serve.py's rows); the streamed case's prompt steps then take
    # 4784 tokens, more than the stream's time.
    plan_for_requests = (dict(workload=workload_of(reqs, case), simulate=simulate_run) if args.plan == "requests"
                         else {})
    plan = plan_generation(name, budget_bytes=budget, hardware=hw, context=544 if not args.small else 32,
                           prompt_len=512 if not args.small else 16, gen_len=32 if not args.small else 8,
                           quant=quant if not args.small else "none", kv_quant=kv_quant, concurrency=concurrency,
                           dtype="f32" if args.small else None, max_step_tokens=max_step_tokens,
                           **plan_for_requests)
    predictor = StepPredictor(plan)
    store, _ = fill(plan, src, device)
    row = serve_row(f"{name} {title}", plan, reqs, device, doc["h2d_gbps"], store, predictor)
    row["streamed_blocks"] = sum(1 for b in plan.blocks if b.residency.value == "streamed")
    row["kinds"] = by_kind(plan, row.pop("_steps"), predictor, hw)
    row["step_tokens"], row["plan_step_s"] = plan.generation.step_tokens, plan.prediction.step_time_s
    write(args.out, "step.json", doc | {"rows": [row]})
    if args.profile:
        if device.type == "cuda":
            row["profiles"] = profile_steps(plan, reqs, device, store, Path(args.out) if args.out else None, case)
        row["host_split"] = host_split(plan, reqs, device, store)
    doc["rows"].append(row)
    free(device)
    write(args.out, "step.json", doc)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny models: a smoke test of the script")
    ap.add_argument("--hw", default=None, help="hardware profile (file or built-in name; default: this card's)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler tables")
    ap.add_argument("--case", choices=(*CASES, "both"), default="resident")
    ap.add_argument("--plan", choices=("steady", "requests"), default="steady",
                    help="plan for the steady state, or for the case's requests (as serve.py --plan requests)")
    ap.add_argument("--max-step-tokens", type=int, nargs="+", default=[None],
                    help="cap a step's tokens (the planner's choice otherwise); several: one row each")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    hw = card_profile(device, spec=args.hw)
    doc = header(device, hw)
    for case, cap in itertools.product(CASES if args.case == "both" else (args.case,), args.max_step_tokens):
        section(case, args, device, hw, doc, cap)
    print(f"\n{doc['device']}, profile {hw.name}")
    for r in doc["rows"]:
        print(f"{r['case']}: run {r['total_s']:.3f} s, {r['step_tokens']} tokens/step ({r['tokens_per_s']:.1f} "
              f"tok/s), {r['streamed_blocks']} blocks streamed, peak {(r['peak_hbm_bytes'] or 0) / GiB:.2f} GiB of {r['budget_bytes'] / GiB:.2f}")
        for k, h in (r.get("host_split") or {}).items():
            print(f"  {k} step host split (mean us): " + ", ".join(f"{n} {v:.0f}" for n, v in h.items()))
        for k, v in r["kinds"].items():
            print(f"  {k:7s} {v['steps']:4d} steps, median {v['median_s'] * 1e3:8.2f} ms, measured/predicted "
                  f"{v['measured_over_predicted']:.3f}, x floor {v['over_floor']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
