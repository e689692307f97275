"""A decoder layer's norms and residual adds on this card: eager (the reference backend's modules and adds) against
the fused kernel of ``memintent.models.norm_kernel`` (one pass per norm, the first add inside the second norm), at
the token counts of opt-30b's and llama-3-70b's prompt-heavy and decode steps.

Why: eager, an OPT layer's two LayerNorms and two adds read and write the whole activation four times (11.1 of 447 ms
of an opt-30b prompt step of 4784 tokens, H45), a Llama layer's RMSNorm is six kernels.

    python benchmarks/norms.py --out $OUT        # CUDA only; table last; norms.json

"layer" is what one decoder layer runs besides its matmuls and attention: norm, add, norm, add (eager) against norm,
add_norm, add (fused); each time is triton.testing.do_bench's median of the sequence. Rates count the bytes the
eager sequence must move at least (read x and the attention's output, write the sum and two norms, read the
feed-forward's output, write the layer's output) over the time.
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
from memintent.models import norm_kernel  # noqa: E402
from memintent.models.preset import RMSNorm  # noqa: E402

CASES = {  # name: (norm kind, dim, dtype, tokens)
    "opt30b-prompt": ("layer", 7168, torch.float16, 4784),
    "opt30b-decode": ("layer", 7168, torch.float16, 64),
    "llama70b-prompt": ("rms", 8192, torch.bfloat16, 2392),
    "llama70b-decode": ("rms", 8192, torch.bfloat16, 184),
}


def bench_s(fn) -> float:
    return median_s(fn, True, 10, 100)


def one_case(kind: str, dim: int, dtype: torch.dtype, tokens: int) -> dict:
    make = (lambda: RMSNorm(dim, 1e-5)) if kind == "rms" else (lambda: torch.nn.LayerNorm(dim))
    n1, n2 = (make().to("cuda", dtype).requires_grad_(False) for _ in range(2))
    x, a, f = (torch.randn(tokens, dim, device="cuda", dtype=dtype) for _ in range(3))   # (tokens, dim) each

    def eager():
        n1(x)
        h = x + a
        n2(h)
        return h + f

    def fused():
        norm_kernel.norm(n1, x)
        h, _ = norm_kernel.add_norm(n2, x, a)
        return h + f

    h_e, h_f = x + a, norm_kernel.add_norm(n2, x, a)[0]
    assert torch.equal(h_e, h_f), "the fused sum must be the eager add's"
    err = float((norm_kernel.add_norm(n2, x, a)[1].float() - n2(h_e).float()).abs().max())
    moved_bytes = 8 * x.numel() * x.element_size()
    eager_s, fused_s = bench_s(eager), bench_s(fused)
    return dict(kind=kind, dim=dim, dtype=str(dtype), tokens=tokens, eager_s=eager_s, fused_s=fused_s,
                eager_gbps=moved_bytes / eager_s / 1e9, fused_gbps=moved_bytes / fused_s / 1e9,
                max_abs_diff_vs_eager=err)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    rows = {name: one_case(*c) for name, c in CASES.items()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "norms.json").write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows),
                                                          indent=1))
    print(f"{'case':18} {'eager us':>9} {'fused us':>9} {'speedup':>8} {'fused GB/s':>11} {'max |diff|':>10}")
    for name, r in rows.items():
        print(f"{name:18} {r['eager_s'] * 1e6:9.1f} {r['fused_s'] * 1e6:9.1f} {r['eager_s'] / r['fused_s']:8.2f} "
              f"{r['fused_gbps']:11.0f} {r['max_abs_diff_vs_eager']:10.3g}")


if __name__ == "__main__":
    main()
