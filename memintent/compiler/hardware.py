"""Hardware profiles: the rates the cost model turns bytes and FLOPs into seconds.

``h100-sxm`` holds figures measured on this project's H100 machine (../shared/ANCHORS.md); the others come from
vendor datasheets and say so in ``source``. ``memintent profile`` measures a card and writes a JSON file that
``compile --hw FILE.json`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from memintent.errors import MemintentError
from memintent.ir.model import GemmRates, HardwareProfile

GiB = 1 << 30

_H200_TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
# Sustained linears of the H200 by tokens (run H24): (dtype, in features, out features, TFLOP/s at each of _H200_TOKENS)
_H200_GEMM = [GemmRates(dtype=d, in_features=k, out_features=n, tflops=list(zip(_H200_TOKENS, rates)))
              for d, k, n, rates in (
    ("bf16", 8192, 8192, (3.654, 60.78, 222.3, 665.7, 682.9, 690.5, 659.5)),
    ("bf16", 8192, 28672, (4.203, 67.62, 249.3, 575.0, 670.5, 673.8, 656.9)),
    ("bf16", 28672, 8192, (4.002, 62.94, 235.5, 596.4, 680.3, 689.2, 666.1)),
    ("f16", 8192, 8192, (3.337, 60.09, 221.4, 637.2, 646.4, 666.0, 648.1)),
    ("f16", 8192, 28672, (4.141, 63.13, 248.2, 524.0, 658.2, 651.0, 656.6)),
    ("f16", 28672, 8192, (3.946, 62.96, 238.6, 561.7, 651.1, 673.9, 625.1)),
              )]

BUILTIN: dict[str, HardwareProfile] = {
    "h100-sxm": HardwareProfile(
        name="h100-sxm",
        source="measured 2026-11-26 on an NVIDIA H100 80GB HBM3 (PCIe gen5 x16 host link), torch 2.11.0+cu130: "
               "pinned 2 GiB copies, 8192^3 bf16 matmul, device-to-device copy",
        h2d_gbps=54.8, d2h_gbps=55.0, hbm_gbps=2995.0, bf16_tflops=754.0, hbm_bytes=81559 * (1 << 20),
        # Dequantisation is a memory-bound elementwise pass: read packed ints, write bf16; a fraction of HBM rate.
        dequant_gbps=1200.0,
        # cuBLAS workspace (32 MiB) plus what the caching allocator rounds up: W1 at 1x64 peaked 2.06 MiB above
        # arena + activations + 32 MiB on this card.
        workspace_bytes=36 << 20,
    ),
    "h200": HardwareProfile(
        name="h200",
        source="measured 2026-12-02 on an NVIDIA H200 (143771 MiB, PCIe gen5 x16 host link, driver 580.159.04), "
               "torch 2.11.0+cu130, Triton 3.6, by `memintent profile` (run H24): pinned 2 GiB copies 55.3 GB/s both "
               "ways, 1 GiB device copy, 8192^3 bf16 matmul, int8 -> bf16 dequantisation (Triton), sustained bf16 "
               "and f16 linears of three shapes by tokens, the paged-attention kernel (256 decodes of 200-1024 keys: "
               "2.15 TB/s of keys and values; prompt chunks 172 TFLOP/s); the kernel's decode rates on its other "
               "paths from run H29 (int8 pages, one query head per KV head: benchmarks/data/h200-profile-h29.json); "
               "the unpacking rates from run H50 (2026-12-03, `benchmarks/unpack.py --profile-json`: the profile's "
               "own measurement, back to back, of the int8 kernel and of the grouped-tile int4g kernel, 8192 x 8192); "
               "the mapped linear kernel's read of a pinned int8 128256 x 8192 matrix in place, from run H56 "
               "(2026-12-03, `benchmarks/mapped.py`: 51.0-51.3 GB/s for 1-128 rows, against the copy engine's 55.4)",
        h2d_gbps=55.3, d2h_gbps=55.2, hbm_gbps=4094.0, bf16_tflops=756.0, hbm_bytes=150109880320,
        launch_overhead_s=9.8e-6, copy_latency_s=7.2e-6, dequant_gbps=2453.0, dequant_int4_gbps=2720.0,
        workspace_bytes=36 << 20,
        # the profile's gemm_tflops is its bf16 8192 -> 28672 entry (profiles that predate the shapes)
        gemm_tflops=_H200_GEMM[1].tflops, gemm_shapes=_H200_GEMM,
        attention_tflops=171.7, attention_gbps=2154.0,
        attention_int8_gbps=824.6, attention_one_row_gbps=3562.0, attention_one_row_int8_gbps=1901.0,
        mapped_gbps=51.0,
    ),
    "a100-80g": HardwareProfile(
        name="a100-80g",
        source="datasheet (NVIDIA A100 80GB SXM: 2.039 TB/s HBM2e, 312 dense bf16 TFLOP/s, PCIe gen4 x16 "
               "~25 GB/s achievable per direction)",
        h2d_gbps=25.0, d2h_gbps=25.0, hbm_gbps=2039.0, bf16_tflops=312.0, hbm_bytes=80 * 10**9,
        dequant_gbps=800.0,
    ),
    "rtx-4090": HardwareProfile(
        name="rtx-4090",
        source="datasheet (GeForce RTX 4090: 1.008 TB/s GDDR6X, 165 dense bf16 TFLOP/s, PCIe gen4 x16 "
               "~25 GB/s achievable per direction)",
        h2d_gbps=25.0, d2h_gbps=25.0, hbm_gbps=1008.0, bf16_tflops=165.0, hbm_bytes=24 * GiB,
        dequant_gbps=400.0,
    ),
    # The CPU backend: "device" memory is host memory, copies are memcpy. Rough figures for a 2-core CI machine;
    # `memintent profile --device cpu` measures the real ones. No kernel workspace is reserved.
    "cpu": HardwareProfile(
        name="cpu",
        source="estimate for the CPU backend (memcpy-speed copies, a few cores); measure with `memintent profile`",
        h2d_gbps=8.0, d2h_gbps=8.0, hbm_gbps=16.0, bf16_tflops=0.2, hbm_bytes=16 * GiB,
        launch_overhead_s=2e-5, copy_latency_s=2e-6, dequant_gbps=2.0, workspace_bytes=0, attention="reference",
    ),
}


def load_profile(spec: str) -> HardwareProfile:
    """A built-in name, or a JSON file written by ``memintent profile``."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec)
    if not path.suffix == ".json" and not path.exists():
        raise MemintentError(
            f"unknown hardware profile {spec!r}: use one of {', '.join(BUILTIN)} or a profile JSON file")
    try:
        return HardwareProfile.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise MemintentError(f"hardware profile file {spec} does not exist: run `memintent profile -o {spec}` "
                             f"on the GPU, or use one of {', '.join(BUILTIN)}") from None
    except (ValidationError, json.JSONDecodeError, UnicodeDecodeError) as e:
        first = e.errors()[0] if isinstance(e, ValidationError) else {"loc": (), "msg": str(e)}
        where = ".".join(map(str, first["loc"])) or "file"
        raise MemintentError(f"hardware profile {spec} is not a valid profile: {where}: {first['msg']}") from None


# Device names (as torch.cuda.get_device_name reports them) -> the built-in profile measured on that card.
_BY_DEVICE_NAME = (("H200", "h200"), ("H100", "h100-sxm"))


def profile_for_device(device_name: str) -> HardwareProfile | None:
    """The built-in profile of the card called ``device_name``, or None when there is none: benchmarks then measure
    the card (``memintent profile``) rather than assume another card's rates."""
    return next((BUILTIN[key] for part, key in _BY_DEVICE_NAME if part in device_name), None)
