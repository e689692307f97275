"""A control for benchmarks/quality.py: a copy of an hf: folder whose decoder weights are moved off a 4-bit grid.

SmolLM2-135M-Instruct as shipped here comes from a Q4_1 GGUF, so its decoder weights lie on 16 levels per group of
32 columns, which int4g rebuilds almost exactly. This writes a copy with each 2-D weight other than the embedding
moved by uniform noise of +-half its group's step ((max - min) / 15 per 32 columns: the size of the rounding that
made the grid), seeded per weight name and ``--seed``. The copy is its own float32 reference:

    python benchmarks/offgrid.py /tmp/offgrid --seed 1
    python benchmarks/quality.py --model /tmp/offgrid --tokens 1024 --rows transformers int8 int4g
"""

from __future__ import annotations

import argparse
import shutil
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUP = 32   # the GGUF Q4_1 group this control moves weights off


def off_grid(name: str, w: torch.Tensor, seed: str) -> torch.Tensor:
    """``w`` plus uniform noise of +-half a step of its groups of ``GROUP`` columns (deterministic per name, seed)."""
    out_ch, in_ch = w.shape
    x = w.float().view(out_ch, in_ch // GROUP, GROUP)
    step = (x.amax(dim=2) - x.amin(dim=2)) / 15
    gen = torch.Generator().manual_seed(zlib.crc32((name + seed).encode()))
    noise = (torch.rand(x.shape, generator=gen) - 0.5) * step[..., None]
    return (x + noise).view(out_ch, in_ch).to(w.dtype)


def main(argv=None) -> int:
    from safetensors.torch import load_file, save_file

    from quality import default_folder

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder to write")
    ap.add_argument("--model", type=Path, default=None, help="an hf: folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--seed", default="1")
    args = ap.parse_args(argv)
    src = args.model or default_folder()
    args.out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, args.out / f.name)
    tensors = load_file(src / "model.safetensors")
    moved = {n: off_grid(n, w, args.seed) if w.dim() == 2 and "embed" not in n and w.shape[1] % GROUP == 0 else w
             for n, w in tensors.items()}
    save_file(moved, args.out / "model.safetensors", metadata={"format": "pt"})
    print(f"{args.out}: {sum(1 for n in moved if moved[n] is not tensors[n])} of {len(moved)} tensors moved")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
