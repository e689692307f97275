"""Serving over HTTP against `generate`: llama-3-70b int4 at 24 GiB, 256 concurrent streamed completion requests.

The requests are the serving mix (seeded: prompts 64-1024 tokens given as token ids, outputs 16-128 tokens,
ignore_eos, greedy). One plan (bf16 KV) and one host store serve two runs in this process, one after the other:

  generate  the engine serves the requests in-process (``commands.generate.serve``, a warm-up request first), all
            arriving at once: tokens/s = generated tokens / the run's time; time to first token from the start.
  http      a fresh engine on the same host store behind ``memintent serve``'s application (uvicorn in a thread
            of this process, on 127.0.0.1; one short warm-up request first). A client process (this script with
            --client: its own interpreter, so its work does not share the server's GIL) sends every request at once
            as a streamed /v1/completions and records, per request, when it was sent, when its first token arrived
            and when its last did. tokens/s = generated tokens / (the last token's arrival - the first request's
            sending); time to first token per request from its sending.

The engine steps of both runs are measured against the PCIe floor of this run (streamed bytes / pinned H2D measured
at the start); peak HBM against the budget. Acceptance: http tokens/s within 5 % of generate's.

    python benchmarks/serve_http.py --out $OUT
    python benchmarks/serve_http.py --model tiny-llama --device cpu --budget 3MiB --requests 16 --dtype f32 \\
        --prompt-len 8:24 --gen-len 4:8        # smoke test

Prints a table last and writes serve_http.json under --out (after each run, so a run cut short keeps the first).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_NAME = "bench"


# ---------------------------------------------------------------------------------------------------------------
# The client (its own process: python benchmarks/serve_http.py --client URL REQUESTS.json RESULTS.json)


async def _one(http, url: str, r: dict, t0: float) -> dict:
    body = dict(model=MODEL_NAME, prompt=r["prompt_ids"], max_tokens=r["max_tokens"], temperature=0,
                ignore_eos=True, stream=True, return_token_ids=True)
    sent = time.perf_counter()
    first, tokens, status = None, [], 0
    async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
        status = resp.status_code
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            ids = [t for c in chunk.get("choices", []) for t in (c.get("token_ids") or [])]
            if ids and first is None:
                first = time.perf_counter()
            tokens += ids
    return dict(id=r["id"], status=status, sent_s=sent - t0, first_s=(first or sent) - t0,
                done_s=time.perf_counter() - t0, token_ids=tokens)


async def _client(url: str, reqs: list[dict]) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=len(reqs) + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as http:
        t0 = time.perf_counter()
        return list(await asyncio.gather(*(_one(http, url, r, t0) for r in reqs)))


def client_main(url: str, requests_path: str, results_path: str) -> int:
    reqs = json.loads(Path(requests_path).read_text())
    Path(results_path).write_text(json.dumps(asyncio.run(_client(url, reqs))))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The server side


def _quantile(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else None


def _start_server(app):
    import socket
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, thread, sock.getsockname()[1]


def http_row(plan, requests, device, store, floor_s: float, generate_outputs: dict) -> dict:
    """Serve ``requests`` over HTTP with a fresh engine on ``store``; one row of the table."""
    import torch

    from memintent.engine import Engine, Request
    from memintent.runtime.memory import PeakMeter
    from memintent.serve.app import Server, create_app
    from memintent.serve.loop import EngineLoop
    from memintent.serve.metrics import ServerMetrics

    engine = Engine(plan, device, store=store)
    list(engine.generate([Request("warmup", requests[0].prompt_ids[:8], max_new_tokens=2)]))   # first-call costs
    engine.reset_stats()
    meter = PeakMeter(device, plan.arena.size_bytes)
    loop = EngineLoop(engine, ServerMetrics(num_pages=plan.kv_pool.num_pages, floor_s=floor_s), keep_steps=True)
    srv = Server(loop, model_name=MODEL_NAME, tokenizer=None, max_waiting=len(requests))
    server, thread, port = _start_server(create_app(srv))
    with tempfile.TemporaryDirectory() as tmp:
        req_path, res_path = Path(tmp) / "requests.json", Path(tmp) / "results.json"
        req_path.write_text(json.dumps([dict(id=r.id, prompt_ids=list(r.prompt_ids), max_tokens=r.max_new_tokens)
                                        for r in requests]))
        with meter:
            subprocess.run([sys.executable, __file__, "--client", f"http://127.0.0.1:{port}", str(req_path),
                            str(res_path)], check=True)
        results = json.loads(res_path.read_text())
    steps = loop.step_log
    server.should_exit = True
    thread.join()                       # the lifespan closes the loop, and the loop the engine
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return _http_summary(plan, results, steps, floor_s, meter.peak_bytes, generate_outputs)


def _http_summary(plan, results: list[dict], steps, floor_s: float, peak_bytes: int, generate_outputs: dict) -> dict:
    bad = [r for r in results if r["status"] != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed over HTTP (first: status {bad[0]['status']})")
    generated = sum(len(r["token_ids"]) for r in results)
    span_s = max(r["done_s"] for r in results) - min(r["sent_s"] for r in results)
    ttft = [r["first_s"] - r["sent_s"] for r in results]
    tpot = [(r["done_s"] - r["first_s"]) / (len(r["token_ids"]) - 1) for r in results if len(r["token_ids"]) > 1]
    step_median_s = statistics.median(s.time_s for s in steps) if steps else 0.0
    same = sum(r["token_ids"] == generate_outputs.get(r["id"]) for r in results)
    row = dict(case="http", requests=len(results), generated=generated, total_s=span_s,
               tokens_per_s=generated / span_s, ttft_median_s=_quantile(ttft, 0.5), ttft_p99_s=_quantile(ttft, 0.99),
               tpot_median_s=_quantile(tpot, 0.5), tpot_p99_s=_quantile(tpot, 0.99), steps=len(steps),
               step_median_s=step_median_s, floor_s=floor_s,
               step_over_floor=step_median_s / floor_s if floor_s else None,
               preemptions=dict(_kinds(steps)), peak_hbm_bytes=peak_bytes, budget_bytes=plan.budget_bytes,
               peak_within_budget=peak_bytes <= plan.budget_bytes, same_tokens_as_generate=same)
    print(f"http: {row['tokens_per_s']:.1f} tok/s generated; time to first token median {row['ttft_median_s']:.2f} s, "
          f"p99 {row['ttft_p99_s']:.2f} s; step median {step_median_s * 1e3:.1f} ms vs floor {floor_s * 1e3:.1f} ms; "
          f"{same} of {len(results)} requests with generate's tokens", flush=True)
    return row


def _kinds(steps):
    from collections import Counter

    return Counter(p.kind for s in steps for p in s.preemptions)


def _table(doc: dict) -> None:
    rows = {r["case"]: r for r in doc["rows"]}
    print(f"\n{doc['device']}, pinned H2D {doc['h2d_gbps']:.1f} GB/s, profile {doc['hw']}; {doc['requests']} requests "
          f"(prompts {doc['prompt_len']}, outputs {doc['gen_len']}), all sent at once")
    print(f"{'case':10s} {'tok/s':>8s} {'x gen':>6s} {'TTFT med':>9s} {'TTFT p99':>9s} {'TPOT med':>9s} "
          f"{'step ms':>8s} {'x floor':>7s} {'peak GiB':>8s} {'budget':>7s}")
    base = rows.get("generate", {}).get("tokens_per_s")
    for r in doc["rows"]:
        ratio = f"{r['tokens_per_s'] / base:6.3f}" if base else "     -"
        over = f"{r['step_over_floor']:7.3f}" if r.get("step_over_floor") else "      -"
        print(f"{r['case']:10s} {r['tokens_per_s']:8.1f} {ratio} {r['ttft_median_s']:9.2f} {r['ttft_p99_s']:9.2f} "
              f"{(r['tpot_median_s'] or 0):9.3f} {r['step_median_s'] * 1e3:8.1f} {over} "
              f"{(r['peak_hbm_bytes'] or 0) / (1 << 30):8.2f} {r['budget_bytes'] / (1 << 30):7.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--budget", default="24GiB")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-len", default="64:1024")
    ap.add_argument("--gen-len", default="16:128")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--hw", default=None, help="hardware profile (file or built-in name; default: this card's)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--client", nargs=3, metavar=("URL", "REQUESTS", "RESULTS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.client:
        return client_main(*args.client)
    return run(args)


def run(args) -> int:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import GiB, card_profile, fill, header, serve_row, write
    from memintent.compiler.planner import plan_generation
    from memintent.models.refs import resolve
    from memintent.engine.requests import parse_range, synthetic
    from memintent.units import parse_bytes

    device = torch.device(args.device)
    hw = card_profile(device, spec=args.hw)
    doc = header(device, hw)
    prompt_len, gen_len = parse_range(args.prompt_len, "--prompt-len"), parse_range(args.gen_len, "--gen-len")
    doc.update(requests=args.requests, prompt_len=args.prompt_len, gen_len=args.gen_len)
    src = resolve(args.model, dtype=args.dtype)
    context = prompt_len[1] + gen_len[1]
    reqs = synthetic(args.requests, prompt_len, gen_len, src.vocab_size, seed=0)       # ignore_eos, greedy
    plan = plan_generation(args.model, budget_bytes=parse_bytes(args.budget), hardware=hw, quant="int4",
                           dtype=args.dtype, context=context, prompt_len=sum(prompt_len) // 2,
                           gen_len=sum(gen_len) // 2, kv_quant="none")
    store, doc["host_fill_s"] = fill(plan, src, device)
    floor_s = plan.prediction.streamed_bytes / (doc["h2d_gbps"] * 1e9)
    gen = serve_row("generate", plan, reqs, device, doc["h2d_gbps"], store)
    doc["rows"].append(gen)
    write(args.out, "serve_http.json", doc)
    doc["rows"].append(http_row(plan, reqs, device, store, floor_s, gen["_outputs"]))
    write(args.out, "serve_http.json", doc)
    _table(doc)
    http, base = doc["rows"][-1], doc["rows"][0]
    print(f"http / generate tokens/s: {http['tokens_per_s'] / base['tokens_per_s']:.3f} (acceptance >= 0.95); "
          f"peak HBM {http['peak_hbm_bytes'] / GiB:.2f} GiB of {plan.budget_bytes / GiB:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
