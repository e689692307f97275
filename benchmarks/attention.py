"""Attention over a paged KV pool, one layer, on the device: the engine's gather + SDPA against FlexAttention.

Decode of S sequences (contexts drawn from 200..1024 tokens, 16-token blocks scattered over a shuffled pool; 64
query heads over 8 KV heads, head dim 128, bf16, the llama-3-70b shapes) and one prompt chunk of the second half of a
prompt. Each variant is checked against a float32 dense reference before it is timed (max |diff|).

    python benchmarks/attention.py --out $OUT            # prints a table last, writes attention.json

The floor: the keys and values the step must read once (bytes / measured HBM copy rate).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memintent.kv import attention  # noqa: E402
from memintent.kv.attention import DecodeChunk, PrefillChunk, StepMeta  # noqa: E402
from memintent.kv.layout import PageLayout, PoolViews  # noqa: E402
from benchmarks.common import median_s  # noqa: E402
from memintent.engine.pages import PagePool

H, KVH, HD, BT = 64, 8, 128, 16


def bench(fn, repeats=50):
    """Median seconds of ``fn``: CUDA events through triton's do_bench on a GPU, a host timer on the CPU."""
    return median_s(fn, torch.cuda.is_available(), 25, repeats)


def setup(S, quantized, dev, seed=0):
    rng = random.Random(seed)
    ctx = [rng.randint(200, 1024) for _ in range(S)]
    need = sum(math.ceil(c / BT) for c in ctx) + 1
    layout = PageLayout(1, KVH, HD, BT, torch.int8 if quantized else torch.bfloat16, quantized)
    views = PoolViews(torch.zeros(need * layout.page_bytes, dtype=torch.uint8, device=dev), layout, need)
    pool = PagePool(need)
    order = list(range(1, need))
    rng.shuffle(order)
    tables, at = [], 0
    for i, c in enumerate(ctx):
        n = math.ceil(c / BT)
        tables.append(order[at:at + n])
        at += n
    k_all = [torch.randn(c, KVH, HD, device=dev, dtype=torch.bfloat16) for c in ctx]
    v_all = [torch.randn(c, KVH, HD, device=dev, dtype=torch.bfloat16) for c in ctx]
    ctxobj = attention._Context(views, None, torch.bfloat16)
    for i, c in enumerate(ctx):
        pos = torch.arange(c, device=dev)
        t = torch.tensor(tables[i], device=dev)
        ctxobj.meta = StepMeta(write_pages=t[pos // BT], write_offsets=pos % BT)
        attention.write_kv(ctxobj, 0, k_all[i], v_all[i])
    return ctx, tables, views, k_all, v_all, pool


def decode_case(S, quantized, dev, out):
    ctx, tables, views, k_all, v_all, _ = setup(S, quantized, dev)
    nb = max(len(t) for t in tables)
    tab = torch.zeros(S, nb, dtype=torch.long, device=dev)
    for r, t in enumerate(tables):
        tab[r, :len(t)] = torch.tensor(t, device=dev)
    lens = torch.tensor(ctx, device=dev)
    chunk = DecodeChunk(rows=torch.arange(S, device=dev), tables=tab,
                        mask=(torch.arange(nb * BT, device=dev) < lens[:, None])[:, None, None], positions=lens - 1)
    q = torch.randn(H, S, HD, device=dev, dtype=torch.bfloat16)
    c = attention._Context(views, None, torch.bfloat16)
    fn = lambda: attention._decode(c, 0, q, chunk, HD ** -0.5, None, None)  # noqa: E731
    got = fn().float()
    err = 0.0
    for i in range(0, S, max(1, S // 8)):                     # float32 dense reference on a sample of sequences
        k = k_all[i].float().transpose(0, 1).repeat_interleave(H // KVH, 0)   # (H, ctx, hd)
        v = v_all[i].float().transpose(0, 1).repeat_interleave(H // KVH, 0)
        ref = torch.softmax(q[:, i:i + 1].float() @ k.transpose(-1, -2) * HD ** -0.5, -1) @ v   # (H, 1, hd)
        err = max(err, float((got[:, i:i + 1] - ref).abs().max()))
    t = bench(fn)
    kv_bytes = sum(ctx) * KVH * HD * 2 * (1 if quantized else 2)
    row = dict(case=f"decode S={S} {'int8' if quantized else 'bf16'} KV (gather + SDPA)", time_s=t,
               kv_bytes=kv_bytes, max_abs_err=err)
    out.append(row)
    flex_decode(S, ctx, tables, views, q, dev, out, k_all, v_all) if not quantized else None


def flex_decode(S, ctx, tables, views, q, dev, out, k_all, v_all):
    """FlexAttention over the same gathered keys, with a block mask from the context lengths (compiled)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
        L = max(len(t) for t in tables) * BT
        lens = torch.tensor(ctx, device=dev)
        tab = torch.zeros(S, L // BT, dtype=torch.long, device=dev)
        for r, t in enumerate(tables):
            tab[r, :len(t)] = torch.tensor(t, device=dev)

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx < lens[b]

        bm = create_block_mask(mask_mod, S, None, 1, L, device=dev)

        def run():
            k = views.keys[0][tab].flatten(1, 2).transpose(1, 2)       # (S, KV, L, hd)
            v = views.values[0][tab].flatten(1, 2).transpose(1, 2)
            qq = q.transpose(0, 1).unsqueeze(2)                          # (S, H, 1, hd)
            return flex(qq, k, v, block_mask=bm, enable_gqa=True)
        run()
        t = bench(run)
        out.append(dict(case=f"decode S={S} bf16 KV (gather + FlexAttention, compiled)", time_s=t,
                        kv_bytes=sum(ctx) * KVH * HD * 4, max_abs_err=None))
    except Exception as e:   # noqa: BLE001 -- a measurement, not a dependency: report what failed
        out.append(dict(case=f"decode S={S} FlexAttention", time_s=None, error=f"{type(e).__name__}: {e}"[:200]))


def prefill_case(dev, out):
    _, tables, views, k_all, v_all, _ = setup(1, False, dev, seed=1)
    c0 = len(k_all[0])
    n = c0 // 2                                    # the second half of the prompt, the first half cached
    table = torch.tensor(tables[0], device=dev)
    qpos = torch.arange(c0 - n, c0, device=dev)
    chunk = PrefillChunk(start=0, length=n, context=c0, table=table,
                         mask=torch.arange(c0, device=dev)[None, :] <= qpos[:, None])
    q = torch.randn(H, n, HD, device=dev, dtype=torch.bfloat16)
    c = attention._Context(views, None, torch.bfloat16)
    fn = lambda: attention._prefill(c, 0, q, chunk, HD ** -0.5, None, None)  # noqa: E731
    t = bench(fn)
    out.append(dict(case=f"prompt chunk {n} tokens after {c0 - n} cached (gather + SDPA)", time_s=t,
                    kv_bytes=c0 * KVH * HD * 4, max_abs_err=None))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    x = torch.empty(1 << (30 if dev.type == "cuda" else 26), dtype=torch.uint8, device=dev)
    t = bench(lambda: x.clone())
    hbm_gbps = 2 * x.numel() / t / 1e9
    del x
    rows: list[dict] = []
    for S in ((64, 128) if dev.type == "cuda" else (4,)):
        for qz in (False, True):
            decode_case(S, qz, dev, rows)
    prefill_case(dev, rows)
    for r in rows:
        r["floor_s"] = r["kv_bytes"] / (hbm_gbps * 1e9) if r.get("kv_bytes") else None
    Path(args.out, "attention.json").write_text(json.dumps(dict(hbm_gbps=hbm_gbps, rows=rows), indent=1))
    print(f"device copy {hbm_gbps:.0f} GB/s (read + write)")
    print(f"{'case':62s} {'ms/layer':>9s} {'floor ms':>9s} {'max|err|':>9s}")
    for r in rows:
        ms = "-" if r.get("time_s") is None else f"{r['time_s'] * 1e3:.3f}"
        fl = "-" if r.get("floor_s") is None else f"{r['floor_s'] * 1e3:.3f}"
        er = "-" if r.get("max_abs_err") is None else f"{r['max_abs_err']:.4f}"
        print(f"{r['case'][:62]:62s} {ms:>9s} {fl:>9s} {er:>9s}" + (f"  {r['error']}" if r.get("error") else ""))


if __name__ == "__main__":
    main()
