"""The attention kernel with and without Triton's specialization on per-step integers and metadata alignment.

Why: the engine's start compiles every kernel variant a run can launch; Triton would compile a new one whenever a
step's tile count or page-table width turns 1 or a multiple of 16 or a metadata slice loses 16-byte alignment, so
those arguments are not specialized on (``kv.paged_kernel``). This measures what that costs each kind of call.

    python benchmarks/specialize.py --out $OUT          # CUDA; prints a table last, writes $OUT/specialize.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import event_time_s  # noqa: E402
from memintent.kv import paged_kernel  # noqa: E402
from memintent.kv.paged_kernel import build_meta, kv_bytes_read, paged_attention_varlen  # noqa: E402

CASES = {   # name -> (query heads, KV heads, [(query tokens, keys)] per sequence)
    "decode, 64 x 200-1024 keys, 64/8 heads": (64, 8, [(1, 200 + (824 * i) // 63) for i in range(64)]),
    "decode, 64 x 530 keys, 56/56 heads": (56, 56, [(1, 530)] * 64),
    "decode, 200 x 600 keys, 64/8 heads": (64, 8, [(1, 600)] * 200),
    "prompt, 8 x 512 after 512, 64/8 heads": (64, 8, [(512, 1024)] * 8),
}


def kernels(specialized: bool):
    """The kernels as the package builds them, or built with every argument specialized."""
    import triton

    if not specialized:
        return paged_kernel._kernels(False)
    real = triton.jit

    def plain(fn=None, **kw):
        kw.pop("do_not_specialize", None)
        kw.pop("do_not_specialize_on_alignment", None)
        return real(fn, **kw) if fn is not None else (lambda f: real(f, **kw))

    triton.jit = plain
    try:
        return paged_kernel._kernels.__wrapped__(False)
    finally:
        triton.jit = real


def time_case(heads: int, kv_heads: int, seqs: list[tuple[int, int]], repeats: int) -> tuple[float, int, float]:
    dev, pt, hd = torch.device("cuda"), 16, 128
    pages = sum(-(-c // pt) for _, c in seqs) + 1
    pool = torch.randn(pages, 2, pt, kv_heads, hd, dtype=torch.bfloat16, device=dev)    # (P, k|v, pt, KV, hd)
    perm = torch.randperm(pages - 1).add(1).tolist()
    tables, at = [], 0
    for _, c in seqs:
        n = -(-c // pt)
        tables.append(perm[at:at + n])
        at += n
    lengths, contexts = [n for n, _ in seqs], [c for _, c in seqs]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    meta = build_meta(starts, lengths, contexts, tables, page_tokens=pt, group=heads // kv_heads, device=dev)
    q = torch.randn(sum(lengths), heads, hd, dtype=torch.bfloat16, device=dev)                 # (T, H, hd)
    t = event_time_s(lambda: paged_attention_varlen(q, pool[:, 0], pool[:, 1], None, None, meta, scale=hd ** -0.5),
                     repeats, calls=10)
    return t, kv_bytes_read(contexts, kv_heads, hd, 2, False), kv_bytes_read(contexts, kv_heads, hd, 2, False) / t / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=7)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for specialized in (True, False):
        built = kernels(specialized)
        paged_kernel._kernels = lambda interpret, k=built: k     # what paged_attention_varlen launches
        for name, (h, kvh, seqs) in CASES.items():
            t, nbytes, gbps = time_case(h, kvh, seqs, a.repeats)
            rows.append(dict(case=name, specialized=specialized, time_s=t, kv_bytes=nbytes, gbps=gbps))
    (a.out / "specialize.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))
    print(f"{torch.cuda.get_device_name()}: one layer's attention, median of {a.repeats} x 10 calls")
    print("| case | specialized ms | unspecialized ms | unspecialized / specialized | KV GB/s (spec / unspec) |")
    print("|---|---|---|---|---|")
    for name in CASES:
        s, u = (next(r for r in rows if r["case"] == name and r["specialized"] == x) for x in (True, False))
        print(f"| {name} | {s['time_s'] * 1e3:.4f} | {u['time_s'] * 1e3:.4f} | {u['time_s'] / s['time_s']:.3f} | "
              f"{s['gbps']:.0f} / {u['gbps']:.0f} |")


if __name__ == "__main__":
    main()
