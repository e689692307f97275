"""Where a streamed step's time goes beyond its link floor: a Perfetto trace of a few consecutive engine steps of a
served mix (lookahead and graphs as served), and the host link's idle time in it.

A streamed step is bound by the host link: every layer's bytes cross it once. Whatever keeps the copy engine idle
(a copy waiting for a slot that compute still reads, the host building the next step, the head read in place
competing for the link) shows as a gap between copies. This script serves the mix of ``benchmarks/serve.py`` with
a plan file (compiled on any machine: `memintent compile`, or ``planner.plan_generation`` + ``save_plan``), runs
``--warm-steps`` steps, then records ``--steps`` more under torch.profiler and reports, over the recorded window:
the copies' busy time and their gaps (each with the kernels that ran across it), the device's kernel time by name,
and each step's wall time. With ``--serve`` it then serves the whole mix on the same host store, with the cost
model's prediction of each step as it ran (serve.py's row).

    python benchmarks/step_trace.py --plan-file plan.json --hw h200 --out $OUT
    python benchmarks/step_trace.py --plan-file plan.json --hw h200 --serve --out $OUT

Prints a table last and writes step_trace.json (and step_trace.trace.json, for ui.perfetto.dev) under --out.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import CompileLog, card_profile, fill, free, header, serve_row, write  # noqa: E402
from memintent.compiler.planner import StepPredictor  # noqa: E402
from memintent.engine import Engine  # noqa: E402
from memintent.engine.requests import synthetic  # noqa: E402
from memintent.ir.plan_file import load_plan  # noqa: E402
from memintent.models.refs import resolve  # noqa: E402

COPY_NAMES = ("Memcpy HtoD", "memcpy")      # the copy engine's events in a Chrome trace, by name prefix


def intervals(events: list[dict]) -> list[tuple[float, float]]:
    """Merged (start_us, end_us) of ``events``."""
    out: list[tuple[float, float]] = []
    for e in sorted(events, key=lambda e: e["ts"]):
        s, t = e["ts"], e["ts"] + e["dur"]
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], t))
        else:
            out.append((s, t))
    return out


def link_gaps(trace: dict, top: int = 12) -> dict:
    """The copy engine's busy time and its idle gaps between the first and the last copy, each gap with the
    compute kernels that ran in it (what the copy waited for)."""
    events = [e for e in trace.get("traceEvents", []) if "dur" in e and e.get("ph") == "X"]
    copies = [e for e in events if e.get("cat") == "gpu_memcpy" and "HtoD" in e.get("name", "")]
    kernels = [e for e in events if e.get("cat") == "kernel"]
    if not copies:
        return {}
    busy = intervals(copies)
    span_us = busy[-1][1] - busy[0][0]
    gaps = [(b[0] - a[1], a[1], b[0]) for a, b in itertools.pairwise(busy) if b[0] > a[1]]
    longest = []
    for g_us, s, t in sorted(gaps, reverse=True)[:top]:
        inside = collections.Counter(k["name"][:48] for k in kernels if k["ts"] < t and k["ts"] + k["dur"] > s)
        longest.append(dict(gap_ms=round(g_us / 1e3, 3), at_ms=round((s - busy[0][0]) / 1e3, 1),
                            kernels=inside.most_common(4)))
    by_kernel = collections.Counter()
    for k in kernels:
        by_kernel[k["name"][:60]] += k["dur"]
    return dict(span_ms=span_us / 1e3, copy_busy_ms=sum(t - s for s, t in busy) / 1e3,
                copy_bytes=sum(int(e.get("args", {}).get("bytes", 0)) for e in copies),
                gaps=len(gaps), gap_ms=sum(g for g, _, _ in gaps) / 1e3, longest=longest,
                kernels_ms={k: round(v / 1e3, 2) for k, v in by_kernel.most_common(16)})


def traced(plan, reqs, device, store, warm_steps: int, steps: int, out: Path | None) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with Engine(plan, device, store=store) as eng:
        for r in reqs:
            eng.add(r)
        while eng.has_work and len(eng.stats.steps) < warm_steps:
            eng.step()
        first = len(eng.stats.steps)
        with CompileLog() as compiles, profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]) as prof:
            while eng.has_work and len(eng.stats.steps) < first + steps:
                eng.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        recs = eng.stats.steps[first:]
        compiled = compiles.in_run(eng._t0, eng.stats.steps) if eng._t0 is not None else []
    path = (out or Path("/tmp")) / "step_trace.trace.json"
    prof.export_chrome_trace(str(path))
    gaps = link_gaps(json.loads(path.read_text()))
    return dict(steps=[dict(index=s.index, time_ms=round(s.time_s * 1e3, 1), tokens=s.tokens,
                            decode=s.decode_tokens, sequences=s.sequences) for s in recs], link=gaps,
                compiles=compiled)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan-file", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--hw", default=None, help="hardware profile (file or built-in name; default: this card's)")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--max-prompt", type=int, default=1024, help="longest prompt of the mix (1024: serve.py's)")
    ap.add_argument("--warm-steps", type=int, default=60, help="steps before the traced ones (60: a full pool)")
    ap.add_argument("--steps", type=int, default=3, help="steps traced")
    ap.add_argument("--serve", action="store_true", help="then serve the whole mix, each step predicted")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    doc = header(device, card_profile(device, spec=args.hw))
    plan = load_plan(args.plan_file)
    src = resolve(plan.model.ref, dtype=plan.model.dtype)
    reqs = synthetic(args.requests, (64, args.max_prompt), (16, 128), src.vocab_size, seed=0)   # serve.py's mix
    store, doc["host_fill_s"] = fill(plan, src, device)
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    doc["trace"] = traced(plan, reqs, device, store, args.warm_steps, args.steps, out)
    write(args.out, "step_trace.json", doc)
    free(device)
    if args.serve:
        row = serve_row(f"{plan.model.ref} mix (plan file)", plan, reqs, device, doc["h2d_gbps"], store,
                        StepPredictor(plan))
        doc["rows"].append(row)
        write(args.out, "step_trace.json", doc)
    link = doc["trace"]["link"]
    print("\nkernels (ms over the traced steps):")
    for k, v in link.get("kernels_ms", {}).items():
        print(f"  {v:9.2f}  {k}")
    for c in doc["trace"]["compiles"]:
        print(f"  traced steps: compiled {c['kernel']} in step {c['step']} ({c['compile_s']:.2f} s)")
    print("longest link gaps:", *link.get("longest", []), sep="\n  ")
    print(f"\n{'step':>5s} {'ms':>8s} {'tokens':>7s} {'decode':>7s}")
    for s in doc["trace"]["steps"]:
        print(f"{s['index']:5d} {s['time_ms']:8.1f} {s['tokens']:7d} {s['decode']:7d}")
    print(f"link: span {link.get('span_ms', 0):.1f} ms, copies busy {link.get('copy_busy_ms', 0):.1f} ms, "
          f"{link.get('gaps', 0)} gaps of {link.get('gap_ms', 0):.1f} ms; H2D {doc['h2d_gbps']:.1f} GB/s")
    for r in doc["rows"]:
        print(f"served: {r['tokens_per_s']:.1f} tok/s in {r['total_s']:.2f} s, {r['steps']} steps; "
              f"per kind {r.get('prediction')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
