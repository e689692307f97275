"""Reading blocks in place from pinned host memory (``memintent.runtime.mapped``) on the card: how fast the kernels
read over the host link against the copy engine's rate measured in the same run, whether they share the link with
a concurrent copy, whether they replay in a CUDA graph, and how far they are from the unpacked reference.

    python benchmarks/mapped.py --out $OUT

Shapes: llama-3-70b's vocabulary blocks (128256 x 8192, int8 with a bf16 scale per row)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import event_time_s
from memintent.runtime import mapped
from memintent.runtime.quant import dequantize_int8, quantize_int8

GB = 1e9


def _table(vocab: int, dim: int):
    """int8 values and bf16 scales of a random (vocab, dim) table, pinned, and the unpacked table on the device."""
    w = torch.randn(vocab, dim, dtype=torch.bfloat16, device="cuda") * 0.02
    q, s = quantize_int8(w)
    unpacked = dequantize_int8(q, s, torch.empty_like(w))
    return q.cpu().pin_memory(), s.cpu().pin_memory(), unpacked


def _copy_rate_gbps(src: torch.Tensor, dst: torch.Tensor) -> float:
    return src.numel() * src.element_size() / event_time_s(lambda: dst.copy_(src, non_blocking=True), 5) / GB


def _linear_rows(q, s, unpacked, rows_list):
    out = []
    link_bytes = q.numel() + s.numel() * 2
    for m in rows_list:
        x = torch.randn(m, q.shape[1], dtype=torch.bfloat16, device="cuda")
        t = event_time_s(lambda x=x: mapped.mapped_linear(x, q, s), 5)
        ref = torch.nn.functional.linear(x, unpacked)
        got = mapped.mapped_linear(x, q, s)
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        out.append(dict(rows=m, ms=t * 1e3, gbps=link_bytes / t / GB, rel_err=err))
    return out


def _embedding_rows(q, s, unpacked, tokens_list):
    out = []
    for n in tokens_list:
        ids = torch.randint(0, q.shape[0], (n,), device="cuda")
        t = event_time_s(lambda ids=ids: mapped.mapped_embedding(ids, q, s, torch.bfloat16), 5)
        same = torch.equal(mapped.mapped_embedding(ids, q, s, torch.bfloat16), unpacked[ids])
        out.append(dict(tokens=n, ms=t * 1e3, gbps=n * (q.shape[1] + 2) / t / GB, bitwise=same))
    return out


def _shared_link(q, s, m: int, copy_bytes: int) -> dict:
    """The mapped linear and a copy of ``copy_bytes`` on another stream at once: does the link carry both?"""
    src = torch.empty(copy_bytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
    x = torch.randn(m, q.shape[1], dtype=torch.bfloat16, device="cuda")
    side = torch.cuda.Stream()

    def both():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)
        mapped.mapped_linear(x, q, s)
        torch.cuda.current_stream().wait_stream(side)

    t_copy = event_time_s(lambda: dst.copy_(src, non_blocking=True), 3)
    t_lin = event_time_s(lambda: mapped.mapped_linear(x, q, s), 3)
    t_both = event_time_s(both, 3)
    total = copy_bytes + q.numel() + 2 * s.numel()
    return dict(copy_ms=t_copy * 1e3, linear_ms=t_lin * 1e3, both_ms=t_both * 1e3, both_gbps=total / t_both / GB)


def _graph_replays(q, s, unpacked) -> bool:
    ids = torch.randint(0, q.shape[0], (64,), device="cuda")
    x = torch.randn(64, q.shape[1], dtype=torch.bfloat16, device="cuda")
    mapped.mapped_embedding(ids, q, s, torch.bfloat16)
    mapped.mapped_linear(x, q, s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        e = mapped.mapped_embedding(ids, q, s, torch.bfloat16)
        y = mapped.mapped_linear(x, q, s)
    ids.copy_(torch.randint(0, q.shape[0], (64,), device="cuda"))
    g.replay()
    torch.cuda.synchronize()
    return torch.equal(e, unpacked[ids]) and torch.equal(y, mapped.mapped_linear(x, q, s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    t0 = time.time()
    q, s, unpacked = _table(args.vocab, args.dim)
    res = dict(card=torch.cuda.get_device_name(), shape=[args.vocab, args.dim])
    res["copy_gbps"] = _copy_rate_gbps(q.view(-1), torch.empty(q.numel(), dtype=torch.int8, device="cuda"))
    res["linear"] = _linear_rows(q, s, unpacked, [1, 16, 64, 128, 184, 256])
    for bn in (32, 128):
        mapped._LINEAR_BN = bn
        res[f"linear_bn{bn}"] = _linear_rows(q, s, unpacked, [184])
    mapped._LINEAR_BN = 64
    res["embedding"] = _embedding_rows(q, s, unpacked, [1, 184, 2392, 4784])
    res["shared_link"] = _shared_link(q, s, 184, 4 << 30)
    res["graph_replays_exactly"] = _graph_replays(q, s, unpacked)
    res["wall_s"] = time.time() - t0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "mapped.json").write_text(json.dumps(res, indent=1))
    print(f"card {res['card']}; copy engine {res['copy_gbps']:.1f} GB/s (1 GB pinned -> device)")
    print("linear rows   ms     GB/s   rel_err")
    for r in res["linear"] + res["linear_bn32"] + res["linear_bn128"]:
        print(f"{r['rows']:>11} {r['ms']:7.2f} {r['gbps']:7.1f}  {r['rel_err']:.2e}")
    print("embedding tokens   ms     GB/s  bitwise")
    for r in res["embedding"]:
        print(f"{r['tokens']:>16} {r['ms']:6.3f} {r['gbps']:7.1f}  {r['bitwise']}")
    print("shared link:", {k: round(v, 2) for k, v in res["shared_link"].items()})
    print("graph replays exactly:", res["graph_replays_exactly"])


if __name__ == "__main__":
    main()
