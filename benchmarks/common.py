"""What the GPU benchmarks share: the card's profile, the floors measured in the same process, one serving run
measured against them, and the JSON every script writes under --out."""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memintent.engine.core import RunOptions
from memintent.commands.generate import serve  # noqa: E402
from memintent.compiler.hardware import BUILTIN, profile_for_device  # noqa: E402
from memintent.runtime import HostStore  # noqa: E402
from memintent.runtime.profile import measure_h2d_gbps  # noqa: E402

GiB = 1 << 30


class CompileLog:
    """Every Triton kernel variant compiled while it is open: (kernel name, perf_counter start, seconds). A compile
    inside a served run is a step that waits 0.3-1 s on the host: the engine's warm-up is meant to leave none."""

    def __init__(self):
        self.events: list[tuple[str, float, float]] = []
        self._jit = None

    def __enter__(self) -> "CompileLog":
        try:
            from triton.runtime import jit
        except ImportError:           # no Triton: nothing compiles
            return self
        self._jit, inner = jit, jit.JITFunction._do_compile

        def logged(fn, *args, **kwargs):
            t = time.perf_counter()
            out = inner(fn, *args, **kwargs)
            self.events.append((getattr(fn, "__name__", str(fn)), t, time.perf_counter() - t))
            return out

        jit.JITFunction._do_compile, self._inner = logged, inner
        return self

    def __exit__(self, *exc) -> None:
        if self._jit is not None:
            self._jit.JITFunction._do_compile = self._inner

    def in_run(self, t0: float, steps) -> list[dict]:
        """The compiles after ``t0`` (the run's perf_counter start), each with the step it fell in."""
        out = []
        for name, t, dur in self.events:
            if t < t0:
                continue
            at = [s.index for s in steps if s.start_s <= t - t0]
            out.append(dict(kernel=name, at_s=t - t0, compile_s=dur, step=at[-1] if at else None))
        return out


def event_time_s(fn, repeats: int, calls: int = 1) -> float:
    """Median seconds of one ``fn()`` on the current CUDA stream, by CUDA events around ``calls`` back-to-back calls,
    over ``repeats`` timings after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / calls)   # elapsed_time: milliseconds
    return statistics.median(times)


def median_s(fn, cuda: bool, warmup_ms: float, rep_ms: float, cpu_repeats: int = 3) -> float:
    """Median seconds of one ``fn()``: of CUDA work (``cuda``) triton.testing.do_bench's (CUDA events; ``warmup_ms``
    and ``rep_ms`` of calls to warm up and to time), else a host timer over ``cpu_repeats`` calls after one warm-up
    call."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(cpu_repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def card_profile(device: torch.device, measure: bool = False, spec: str | None = None):
    """``spec`` (a profile file or built-in name) if given, else the built-in profile of this card (by its name), or
    one measured here and now (``measure``, or no built-in one): a benchmark never plans with another card's rates."""
    if spec:
        from memintent.compiler.hardware import load_profile

        return load_profile(spec)
    if device.type != "cuda":
        return BUILTIN["cpu"]
    known = profile_for_device(torch.cuda.get_device_name(device))
    if known is not None and not measure:
        return known
    from memintent.runtime.profile import profile_device

    return profile_device(str(device), quick=True).profile


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fill(plan, src, device, pin_resident: bool = True) -> tuple[HostStore, float]:
    """A host store for ``plan`` (resident blocks pinned too, so plans that stream them can share it)."""
    t = time.perf_counter()
    store = HostStore(plan, pin="auto" if device.type == "cuda" else "none", pin_resident=pin_resident)
    store.fill(src.fill_weights)
    return store, time.perf_counter() - t


def serve_row(tag: str, plan, requests, device, h2d_gbps: float, store=None, predictor=None, **options) -> dict:
    """One measured serving run: throughput, steps against the PCIe floor and the plan, peak HBM against the
    budget; ``predictor`` (a ``planner.StepPredictor``): the cost model's time for each step as it ran.
    ``options``: ``RunOptions`` fields besides the device."""
    t = time.perf_counter()
    with CompileLog() as compiles:
        rep, outs, engine = serve(plan, requests, RunOptions(device=device, **options), store=store, warmup=True)
    wall = time.perf_counter() - t
    g, pr = plan.generation, plan.prediction
    floor = pr.link_bytes / (h2d_gbps * 1e9)   # the link's bytes: copies and mapped reads
    steps = engine.stats.steps
    decode_only = [s.time_s for s in steps if s.decode_tokens == s.tokens and s.tokens]
    row = dict(case=tag, requests=rep.requests, generated=rep.generated_tokens, prompt_tokens=rep.prompt_tokens,
               total_s=rep.total_s, wall_with_setup_s=wall, engine_warm_s=rep.warm_s, tokens_per_s=rep.tokens_per_s,
               decode_tokens_per_s=rep.decode_tokens_per_s, full_decode_tokens_per_s=rep.full_decode_tokens_per_s,
               predicted_tokens_per_s=g.tokens_per_s,
               concurrency=g.concurrency, kv_quant=plan.kv_pool.quant.value, num_pages=plan.kv_pool.num_pages,
               step_tokens=g.step_tokens, steps=rep.steps, step_median_s=rep.step_median_s,
               decode_only_step_median_s=statistics.median(decode_only) if decode_only else None,
               predicted_step_s=g.decode_step_s, floor_s=floor, streamed_bytes=pr.streamed_bytes,
               mapped_bytes=pr.mapped_bytes,
               step_over_floor=rep.step_median_s / floor if floor else None, ttft_median_s=rep.ttft_median_s,
               ttft_p99_s=rep.ttft_p99_s, tpot_median_s=rep.tpot_median_s, tpot_p99_s=rep.tpot_p99_s,
               kv_peak_pages=rep.kv_peak_pages, preemptions=rep.preemptions, peak_hbm_bytes=rep.peak_hbm_bytes,
               budget_bytes=plan.budget_bytes, predicted_peak_bytes=pr.peak_hbm_bytes,
               peak_within_budget=rep.peak_hbm_bytes is not None and rep.peak_hbm_bytes <= plan.budget_bytes,
               streamed_blocks=sum(1 for b in plan.blocks if b.residency.value == "streamed"),
               max_steps_over_floor=max(s.time_s for s in steps) / floor if floor and steps else None)
    if predictor is not None:
        row["prediction"] = prediction_errors(predictor, steps)
        row["step_records"] = [dict(tokens=s.tokens, decode=s.decode_tokens, prefill=s.prefill_tokens,
                                    seqs=s.sequences, decode_ctx=s.decode_context_tokens,
                                    prefill_ctx=s.prefill_context_tokens, pairs=s.prefill_pairs,
                                    spare=s.spare_blocks, time_s=s.time_s,
                                    predicted_s=predictor.predict_s(s)) for s in steps]
    row["compiles_in_run"] = compiles.in_run(engine._t0, steps) if engine._t0 is not None else []
    row["first_steps_s"] = [round(s.time_s, 4) for s in steps[:4]]
    for c in row["compiles_in_run"]:
        print(f"{tag}: compiled {c['kernel']} in step {c['step']} ({c['compile_s']:.2f} s)", flush=True)
    row["_outputs"] = {o.id: o.token_ids for o in outs}
    row["_steps"] = steps
    del engine                # closed: its graphs and arena go back before the next case
    print(f"{tag}: {rep.tokens_per_s:.1f} tok/s generated, decode {rep.decode_tokens_per_s:.1f} tok/s, at full "
          f"concurrency {rep.full_decode_tokens_per_s:.1f} tok/s (plan "
          f"{g.tokens_per_s:.1f}); step median {rep.step_median_s * 1e3:.1f} ms vs floor {floor * 1e3:.1f} ms; peak "
          f"{(rep.peak_hbm_bytes or 0) / GiB:.2f} GiB of {plan.budget_bytes / GiB:.2f}", flush=True)
    free(device)
    return row


def prediction_errors(predictor, steps) -> dict:
    """Median measured / predicted step time, for decode-only steps and for steps mostly of prompt tokens."""
    kinds = {"decode": [s for s in steps if s.tokens and s.decode_tokens == s.tokens],
             "prefill": [s for s in steps if s.tokens and s.prefill_tokens >= 0.8 * s.tokens]}
    out = {}
    for kind, group in kinds.items():
        if len(group) >= 3:
            ratios = [s.time_s / predictor.predict_s(s) for s in group]
            out[kind] = dict(steps=len(group), median_ratio=statistics.median(ratios))
    return out


def write(out: str | None, name: str, doc: dict) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in doc.items()}
        clean["rows"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in doc.get("rows", [])]
        (Path(out) / name).write_text(json.dumps(clean, indent=1, default=str))


def header(device: torch.device, hw) -> dict:
    h2d = measure_h2d_gbps(device, nbytes=2 * GiB if device.type == "cuda" else 64 << 20)
    doc = dict(date=time.strftime("%Y-%m-%d"), torch=torch.__version__, hw=hw.name, hw_source=hw.source,
               device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", h2d_gbps=h2d, rows=[])
    print(f"{doc['device']}, torch {doc['torch']}, profile {hw.name}; pinned H2D {h2d:.1f} GB/s", flush=True)
    return doc


def table(doc: dict) -> None:
    print(f"\n{doc['device']}, pinned H2D {doc['h2d_gbps']:.1f} GB/s, profile {doc['hw']}")
    print(f"{'case':34s} {'tok/s':>8s} {'decode':>8s} {'full':>8s} {'plan':>8s} {'step ms':>8s} {'floor':>8s} "
          f"{'x floor':>7s} {'peak GiB':>8s} {'budget':>7s} {'preempt':>12s}")
    for r in doc["rows"]:
        if "tokens_per_s" not in r:
            continue
        pre = ",".join(f"{k[0]}{v}" for k, v in sorted(r["preemptions"].items())) or "-"
        print(f"{r['case'][:34]:34s} {r['tokens_per_s']:8.1f} {r['decode_tokens_per_s']:8.1f} "
              f"{r['full_decode_tokens_per_s']:8.1f} "
              f"{r['predicted_tokens_per_s']:8.1f} {r['step_median_s'] * 1e3:8.1f} {r['floor_s'] * 1e3:8.1f} "
              f"{(r['step_over_floor'] or 0):7.3f} {(r['peak_hbm_bytes'] or 0) / GiB:8.2f} "
              f"{r['budget_bytes'] / GiB:7.2f} {pre:>12s}")
