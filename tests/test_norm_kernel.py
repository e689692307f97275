"""The fused norm kernel (memintent/models/norm_kernel.py) against float64: LayerNorm (with and without bias) and
RMSNorm, alone and after a residual add, over float32, bfloat16 and float16 rows whose width is not a power of two.

On the CPU it runs in Triton's interpreter in a child process started with TRITON_INTERPRET=1 (Triton reads the flag
when it is first imported, and an earlier test may have imported it); on CUDA the same cases run compiled. The
references are computed here, in float64, from the inputs as given.

Tolerances (|kernel - float64| <= atol + rtol * |float64|, elementwise): float32 1e-5 + 1e-5; float16 4e-3 + 4e-3;
bfloat16 3e-2 + 2^-5. A 16-bit output keeps 11 (f16) or 8 (bf16) significant bits; the sum is rounded before it is
normalised and RMSNorm rounds its normalised value before the weight multiplies it, so a 16-bit result carries up
to three roundings, and Triton's interpreter rounds float32 -> bf16 toward zero (twice a rounding's error). The sum
itself is one rounding of an exact float32 sum: within one unit in the last place of its dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
from interpreted import interpreted_outputs

pytest.importorskip("triton")

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 2 ** -5)}
ULP = {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}
KINDS = ("layer", "layer-nobias", "rms")


def _module(kind: str, dim: int, dtype: torch.dtype, g: torch.Generator) -> torch.nn.Module:
    from memintent.models.preset import RMSNorm
    m = RMSNorm(dim, 1e-5) if kind == "rms" else torch.nn.LayerNorm(dim, eps=1e-5, bias=kind == "layer")
    with torch.no_grad():
        m.weight.copy_(1 + 0.2 * torch.randn(dim, generator=g))
        if getattr(m, "bias", None) is not None:
            m.bias.copy_(0.3 * torch.randn(dim, generator=g))
    return m.to(dtype)


def cases() -> dict[str, dict]:
    """Each case's inputs: rows of 72 or 200 values (masked tails), a mean far from zero for LayerNorm."""
    out = {}
    for i, (kind, dname, dim) in enumerate((k, d, n) for k in KINDS for d in DTYPES for n in (72, 200)):
        g = torch.Generator().manual_seed(i)
        dtype = DTYPES[dname]
        x = (3 * torch.randn(5, 3, dim, generator=g) + 1.5).to(dtype)      # (5, 3, dim)
        delta = torch.randn(5, 3, dim, generator=g).to(dtype)             # (5, 3, dim)
        out[f"{kind}-{dname}-{dim}"] = dict(kind=kind, module=_module(kind, dim, dtype, g), x=x, delta=delta)
    return out


def kernel_outputs(jobs: dict[str, dict], device: str) -> dict[str, tuple]:
    from memintent.models import norm_kernel
    res = {}
    for name, j in jobs.items():
        # a copy: Module.to moves in place, and the references read the module on the CPU
        m, x, d = copy.deepcopy(j["module"]).to(device), j["x"].to(device), j["delta"].to(device)
        h, y_add = norm_kernel.add_norm(m, x, d)
        res[name] = (norm_kernel.norm(m, x).cpu(), h.cpu(), y_add.cpu())
    return res


def reference(kind: str, m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm of x in float64."""
    x = x.double()
    w = m.weight.double()
    if kind == "rms":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.eps) * w
    mean = x.mean(-1, keepdim=True)
    y = (x - mean) * torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + m.eps) * w
    return y + m.bias.double() if m.bias is not None else y


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOL[dtype]
    err = (got.double() - want).abs()
    bound = atol + rtol * want.abs()
    worst = int((err - bound).flatten().argmax())
    assert bool((err <= bound).all()), f"{what}: |err| {err.flatten()[worst]:.3g} > {bound.flatten()[worst]:.3g}"


def _check_all(jobs: dict[str, dict], got: dict[str, tuple]) -> None:
    for name, j in jobs.items():
        m, x, d = j["module"], j["x"], j["delta"]
        y, h, y_add = got[name]
        dtype = x.dtype
        exact = x.double() + d.double()
        assert h.dtype == dtype and y.dtype == dtype and y.shape == x.shape
        assert bool(((h.double() - exact).abs() <= ULP[dtype] * exact.abs() + 1e-30).all()), f"{name}: the sum"
        _check(y, reference(j["kind"], m, x), dtype, f"{name}: norm")
        # the norm after the add normalises the sum as stored (rounded to the dtype), as the eager add then norm
        _check(y_add, reference(j["kind"], m, h), dtype, f"{name}: add then norm")


def test_norm_kernel_interpreted_matches_float64(tmp_path):
    jobs = cases()
    _check_all(jobs, interpreted_outputs("test_norm_kernel", jobs, tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_norm_kernel_on_cuda_matches_float64():
    jobs = cases()
    _check_all(jobs, kernel_outputs(jobs, "cuda"))
