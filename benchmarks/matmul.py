"""Matmul rates on this card by dtype, shape, token count and form (linear, linear with bias, mm then bias add).

Why: on the H200 OPT-30b's f16 prompt steps ran 1.18-1.29 x their prediction while the profile's bf16 linear
(8192 -> 28672) reaches 750-790 TFLOP/s; this script says whether the dtype, the bias epilogue, the shape or the
BLAS library is the cause, so that the fix (or the profile's term) is the right one.

    python benchmarks/matmul.py --out $OUT            # CUDA only; prints a table last, writes $OUT/matmul.json
    python benchmarks/matmul.py --out $OUT --shapes opt30b.qkvo opt30b.qkv-fused --dtypes float16 --blas cublaslt

Each figure is the median of ``--repeats`` CUDA-event timings after one warm-up; 2 * M * K * N FLOPs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import event_time_s  # noqa: E402

SHAPES = {                      # name -> (in features K, out features N)
    "opt30b.qkvo": (7168, 7168),
    "opt30b.qkv-fused": (7168, 3 * 7168),       # q, k and v as one matmul: would one wider matmul run faster?
    "opt30b.fc1": (7168, 28672),
    "opt30b.fc2": (28672, 7168),
    "llama70b.up": (8192, 28672),
}
TOKENS = (64, 512, 2474, 4096, 8192, 16384)
FORMS = ("linear", "linear+bias", "mm+add")


def call(form: str, x, w, bias):
    f = torch.nn.functional
    if form == "linear":
        return lambda: f.linear(x, w)
    if form == "linear+bias":
        return lambda: f.linear(x, w, bias)
    return lambda: f.linear(x, w).add_(bias)


def measure(dtypes, blas_libs, repeats: int, shapes=tuple(SHAPES), tokens=TOKENS) -> list[dict]:
    rows = []
    for lib in blas_libs:
        torch.backends.cuda.preferred_blas_library(lib)
        for dtype in dtypes:
            for name in shapes:
                k, n = SHAPES[name]
                w = torch.randn(n, k, dtype=dtype, device="cuda") * 0.02           # (N, K)
                bias = torch.randn(n, dtype=dtype, device="cuda")                   # (N,)
                for m in tokens:
                    x = torch.randn(1, m, k, dtype=dtype, device="cuda")           # (1, M, K): as a model calls it
                    for form in FORMS:
                        t = event_time_s(call(form, x, w, bias), repeats)
                        rows.append(dict(blas=lib, dtype=str(dtype).removeprefix("torch."), shape=name, k=k, n=n,
                                         tokens=m, form=form, time_s=t, tflops=2 * m * k * n / t / 1e12))
                    del x
                del w, bias
    return rows


def table(rows: list[dict]) -> str:
    tokens = sorted({r["tokens"] for r in rows})
    lines = ["| blas | dtype | shape | form | " + " | ".join(f"{m} tok" for m in tokens) + " |",
             "|---|---|---|---|" + "---|" * len(tokens)]
    keys = sorted({(r["blas"], r["dtype"], r["shape"], r["form"]) for r in rows}, key=str)
    for key in keys:
        rates = {r["tokens"]: r["tflops"] for r in rows if (r["blas"], r["dtype"], r["shape"], r["form"]) == key}
        lines.append("| " + " | ".join(key) + " | " + " | ".join(f"{rates[m]:.0f}" for m in tokens) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--blas", nargs="+", default=["cublas", "cublaslt"])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows = measure([getattr(torch, d) for d in a.dtypes], a.blas, a.repeats, a.shapes, a.tokens)
    info = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, rows=rows)
    (a.out / "matmul.json").write_text(json.dumps(info, indent=1))
    print(f"{info['device']}, torch {info['torch']}: TFLOP/s (2 M K N / median time)")
    print(table(rows))


if __name__ == "__main__":
    main()
