"""Unpacking rates on this card: the runtime's int8 / int4 / int4g -> bf16 kernels against launch variants and the
grouped-tile int4 kernel, on the weight shapes of opt-30b and llama-3-70b, beside a plain device copy.

Why: a block in the HBM store, or any quantized visit, unpacks its whole bf16 weights on the compute stream every
step. With opt-30b's blocks stored at 24 GiB that is 60 GB of output a step, and the plan's cost model charges it at
the profile's ``dequant_gbps``. Every variant's output is compared bitwise with the runtime kernel's first.

    python benchmarks/unpack.py --out $OUT        # CUDA only; table last; unpack.json
    python benchmarks/unpack.py --out $OUT --profile-json /tmp/hw.json   # and the profile's two rates, as a profile

Rates are output bytes per second (the figure ``dequant_gbps`` holds); "copy" is a bf16 device copy of the same
output size (reads and writes it), the HBM-bound reference. Each time is triton.testing.do_bench's median.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import median_s  # noqa: E402
from memintent.runtime import quant  # noqa: E402

SHAPES = {"opt30b.qkvo": (7168, 7168), "opt30b.fc1": (28672, 7168), "opt30b.fc2": (7168, 28672),
          "llama70b.up": (28672, 8192), "llama70b.down": (8192, 28672)}      # (out features, in features)
OUTPUTS_PER_PROGRAM = (1024, 2048, 4096)
WARPS = (4, 8)


def bench_s(fn) -> float:
    return median_s(fn, True, 5, 50)


def packed(kind: str, w: torch.Tensor) -> tuple:
    """The packed parts of ``w`` (out, in) bf16 and the runtime's unpacking of them into ``out``."""
    if kind == "int8":
        q, s = quant.quantize_int8(w)                 # int8 (out, in), bf16 (out,)
        return (q, s, None), lambda out: quant.dequantize_int8(q, s, out, backend="triton")
    if kind == "int4":
        q, s = quant.quantize_int4(w)                 # uint8 (out, in / 2), bf16 (out, in / 128)
        return (q, s, None), lambda out: quant.dequantize_int4(q, s, out, backend="triton")
    q, s, m = quant.quantize_int4g(w)                 # uint8 (out, in / 2), (out, in / 32) scales and minimums
    return (q, s, m), lambda out: quant.dequantize_int4g(q, s, m, out, backend="triton")


def variants(kind: str, parts: tuple, kernels) -> list[tuple[str, object]]:
    """(label, fn(out)) of the launch variants tried for ``kind``."""
    q, s, m = parts
    out_ch, in_ch = q.shape[0], q.shape[1] * (1 if kind == "int8" else 2)
    found = []
    for outputs in OUTPUTS_PER_PROGRAM:
        for warps in WARPS:
            if kind == "int8":
                def fn(out, b=outputs, w=warps):
                    kernels.dq_int8[(out_ch, -(-in_ch // b))](q, s, out, in_ch, q.stride(0), out.stride(0), BLOCK=b,
                                                              num_warps=w)
                found.append((f"rows, {outputs} columns a program, {warps} warps", fn))
                continue
            group = quant.INT4_GROUP if kind == "int4" else quant.INT4G_GROUP
            groups, n_groups = outputs // group, s.shape[1]

            def fn(out, g=groups, w=warps, group=group, n_groups=n_groups):
                kernels.dq_int4_groups[(out_ch, -(-n_groups // g))](
                    q, s, s if m is None else m, out, in_ch, q.shape[1], n_groups, out.stride(0), GROUPS=g,
                    HALF_GROUP=group // 2, MINS=m is not None, num_warps=w)
            found.append((f"grouped tiles, {outputs} columns a program, {warps} warps", fn))
    return found


def measure(kernels) -> list[dict]:
    rows = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, (out_ch, in_ch) in SHAPES.items():
        w = torch.randn(out_ch, in_ch, device="cuda", generator=g, dtype=torch.float32).to(torch.bfloat16)
        out_bytes = w.numel() * 2
        other = torch.empty_like(w)
        copy_s = bench_s(lambda o=other, w=w: o.copy_(w))
        rows.append(dict(shape=name, kind="bf16", variant="device copy", time_s=copy_s, out_gbps=out_bytes / copy_s / 1e9))
        for kind in ("int8", "int4", "int4g"):
            parts, runtime = packed(kind, w)
            want = torch.empty_like(w)
            runtime(want)
            t = bench_s(lambda r=runtime, o=want: r(o))
            rows.append(dict(shape=name, kind=kind, variant="runtime kernel", time_s=t, out_gbps=out_bytes / t / 1e9,
                             bitwise=True))
            for label, fn in variants(kind, parts, kernels):
                out = torch.full_like(w, float("nan"))
                fn(out)
                same = bool(torch.equal(out, want))
                t = bench_s(lambda fn=fn, out=out: fn(out))
                rows.append(dict(shape=name, kind=kind, variant=label, time_s=t, out_gbps=out_bytes / t / 1e9,
                                 bitwise=same))
        print(f"{name}: done", flush=True)
    return rows


def table(rows: list[dict]) -> None:
    kinds = ("bf16", "int8", "int4", "int4g")
    labels = list(dict.fromkeys((r["kind"], r["variant"]) for r in rows))
    print(f"\n{'kind':6s} {'variant':48s} " + " ".join(f"{s:>14s}" for s in SHAPES) + "  bitwise")
    for kind in kinds:
        for k, label in labels:
            if k != kind:
                continue
            cells = [next((r for r in rows if r["shape"] == s and r["kind"] == k and r["variant"] == label), None)
                     for s in SHAPES]
            ok = all(c is None or c.get("bitwise", True) for c in cells)
            print(f"{k:6s} {label[:48]:48s} " + " ".join(f"{c['out_gbps']:12.0f}GB" if c else f"{'-':>14s}"
                                                        for c in cells) + f"  {'y' if ok else 'NO'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--profile-json", default=None,
                    help="also measure the rates as `memintent profile` does and write this card's profile with them")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("unpack.py needs CUDA")
        return 2
    kernels = quant.triton_kernels_module(False)
    rows = measure(kernels)
    doc = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.profile_json:
        doc["profile_rates"] = profile_rates(args.profile_json)
    (Path(args.out) / "unpack.json").write_text(json.dumps(doc, indent=1))
    table(rows)
    if args.profile_json:
        r = doc["profile_rates"]
        print(f"\n`memintent profile`'s measurements ({r['rows']}x{r['cols']}): int8 {r['dequant_gbps']:.0f} GB/s, "
              f"int4g {r['dequant_int4_gbps']:.0f} GB/s (written into {args.profile_json})")
    return 0


def profile_rates(path: str) -> dict:
    """The two unpacking rates as ``memintent profile`` measures them (its sizes, clock and repeats), written into
    this card's built-in profile at ``path``: the profile a run on this card then plans with."""
    from benchmarks.common import card_profile
    from memintent.runtime import profile

    dev = torch.device("cuda")
    sz, clock = profile.sizes_for(dev, False), profile._Clock(dev)
    rates = dict(rows=sz.dequant_rows, cols=sz.dequant_cols,
                 dequant_gbps=profile.measure_dequant_gbps(clock, sz.dequant_rows, sz.dequant_cols, sz.repeats),
                 dequant_int4_gbps=profile.measure_dequant_int4_gbps(clock, sz.dequant_rows, sz.dequant_cols,
                                                                     sz.repeats))
    hw = card_profile(dev).model_copy(update={k: rates[k] for k in ("dequant_gbps", "dequant_int4_gbps")})
    Path(path).write_text(hw.model_dump_json(indent=1))
    return rates


if __name__ == "__main__":
    raise SystemExit(main())
