"""Mapped blocks (``Residency.mapped``): weights read in place from pinned host memory, never copied to HBM.

- The kernels (``runtime.mapped``) against independent references: the embedding's rows bitwise the rows of the
  table as the unpacked block holds it (``dequantize_int8`` of the whole table); the linear layer against float64
  products of the same dequantized weights, within a stated tolerance. On the CPU in Triton's interpreter (a child
  process), on CUDA compiled, over pinned host memory.
- The plan: llama-3-70b int4 at 24 GiB reads its int8 embedding and head in place, so its stream and unpack slots
  fit a decoder layer; the search still keeps a vocabulary block resident where HBM is to spare.
- The cost model: a mapped read holds the host link (``passes.simulate``): copies wait for it.
- The runtime: a plan with mapped blocks computes exactly what the resident model computes with the same
  (dequantized) weights, and detach gives the modules their own forward back.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from interpreted import interpreted_outputs

from memintent.compiler.compile import compile_model
from memintent.compiler.hardware import BUILTIN
from memintent.ir.model import Residency, SlotKind, Stage, Visit
from memintent.passes.schedule import make_schedule
from memintent.passes.simulate import simulate
from memintent.passes.verify import prove
from memintent.runtime import attach
from memintent.runtime.quant import dequantize_int8, quantize_int8
from memintent.units import parse_bytes

ROOT = Path(__file__).resolve().parents[1]
# |kernel - float64| <= atol + rtol * |float64| elementwise, for x @ W.T with K = 200: the kernel's products of
# the dequantized weight are exact in float32 and its sums are float32 (error ~K * 2^-24 of the terms' sizes), then
# a bf16 output is one rounding (2^-8 relative), which the interpreter makes toward zero (2^-7).
TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2 ** -7)}


def cases() -> dict:
    """Tables (vocab 300, dim 200: neither a power of two), ids and inputs of 1, 17 and 300 rows (the last two
    tiles of rows: each reads the weight again)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        w = (torch.randn(300, 200, generator=g) * 0.05).to(dtype)
        q, s = quantize_int8(w)
        out[name] = dict(q=q, s=s, w=w, ids=torch.randint(0, 300, (3, 41), generator=g),
                         xs=[torch.randn(m, 200, generator=g).to(dtype) for m in (1, 17, 300)])
    return out


def kernel_outputs(jobs: dict, device: str) -> dict:
    """Each case through the kernels: the tables in (pinned, on CUDA) host memory, ids and inputs on ``device``."""
    from memintent.runtime.mapped import mapped_embedding, mapped_linear

    pin = device == "cuda"
    got = {}
    for name, j in jobs.items():
        q, s, w = (t.pin_memory() if pin else t for t in (j["q"], j["s"], j["w"]))
        got[name] = dict(
            rows_int8=mapped_embedding(j["ids"].to(device), q, s, j["w"].dtype, backend="triton").cpu(),
            rows_raw=mapped_embedding(j["ids"].to(device), w, None, j["w"].dtype, backend="triton").cpu(),
            linear=[mapped_linear(x.to(device), q, s, backend="triton").cpu() for x in j["xs"]])
    return got


def _check_all(jobs: dict, got: dict) -> None:
    for name, j in jobs.items():
        dtype = j["w"].dtype
        table = dequantize_int8(j["q"], j["s"], torch.empty_like(j["w"]), backend="torch")   # (300, 200)
        assert torch.equal(got[name]["rows_int8"], table[j["ids"]]), name
        assert torch.equal(got[name]["rows_raw"], j["w"][j["ids"]]), name
        atol, rtol = TOL[dtype]
        for x, y in zip(j["xs"], got[name]["linear"]):
            want = x.double() @ table.double().T                                             # (M, 300)
            assert y.shape == want.shape and y.dtype == dtype
            err = (y.double() - want).abs()
            assert bool((err <= atol + rtol * want.abs()).all()), f"{name} {tuple(x.shape)}: {err.max():.3g}"


def test_mapped_kernels_interpreted_match_the_references(tmp_path):
    pytest.importorskip("triton")
    jobs = cases()
    _check_all(jobs, interpreted_outputs("test_mapped", jobs, tmp_path))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mapped_kernels_on_cuda_read_pinned_memory_and_match_the_references():
    jobs = cases()
    _check_all(jobs, kernel_outputs(jobs, "cuda"))


def test_the_torch_path_is_the_same_computation():
    # the CPU path (no kernel): the embedding's rows bitwise, the linear layer as F.linear on the unpacked weight
    from memintent.runtime.mapped import mapped_embedding, mapped_linear

    j = cases()["bf16"]
    table = dequantize_int8(j["q"], j["s"], torch.empty_like(j["w"]), backend="torch")
    assert torch.equal(mapped_embedding(j["ids"], j["q"], j["s"], torch.bfloat16), table[j["ids"]])
    x = j["xs"][1]
    assert torch.equal(mapped_linear(x, j["q"], j["s"]), torch.nn.functional.linear(x, table))


def test_llama_70b_at_24_gib_reads_its_vocabulary_blocks_in_place():
    p = compile_model("llama-3-70b", budget_bytes=parse_bytes("24GiB"), hardware=BUILTIN["h200"], batch=1,
                      seq=64, quant="int4")
    mapped = {b.name: b for b in p.blocks if b.residency == Residency.mapped}
    assert set(mapped) == {"embed", "output"} and {b.quant.value for b in mapped.values()} == {"int8"}
    layer = p.block_map()["layers.0"]
    stream = [s for s in p.arena.slots if s.kind == SlotKind.stream]
    unpack = p.arena.slots[p.unpack_slot()]
    # the slots fit a decoder layer, not the 1 GB (packed) / 2 GB (unpacked) vocabulary matrices
    assert all(s.size_bytes < 2 * layer.transfer_bytes for s in stream)
    # a layer unpacks one weight at a time: its two norms (8192 bf16 each), then one region for its largest
    # weight (a 28672 x 8192 feed-forward matrix in bf16), not the whole 1.6 GiB layer
    assert unpack.size_bytes == 2 * 8192 * 2 + 28672 * 8192 * 2 < layer.size_bytes / 3
    # the head is read whole once (64 rows < 256), the embedding's 64 rows of 8192 int8 values and a bf16 scale
    assert p.prediction.mapped_bytes == mapped["output"].transfer_bytes + 64 * (8192 + 2)
    assert not any(a.block in mapped for a in p.actions)


def test_a_vocabulary_block_is_resident_where_hbm_is_to_spare():
    p = compile_model("tiny-llama", budget_bytes=3 << 19, hardware=BUILTIN["cpu"], batch=1, seq=16, depth=2,
                      quant="int8")
    assert p.block_map()["output"].residency == Residency.resident
    tight = compile_model("tiny-llama", budget_bytes=1 << 20, hardware=BUILTIN["cpu"], batch=1, seq=16, depth=2,
                          quant="int8")
    assert tight.block_map()["output"].residency == Residency.mapped


def test_a_mapped_read_holds_the_host_link():
    # one stage reads in place for 3 s; a 2 s copy issued at the same time waits for the link: it ends at 5 s
    stages = [Stage(index=0, module="a", block="a", first_step=0, last_step=0, time_s=1.0),
              Stage(index=1, module="b", block="b", first_step=1, last_step=1, needs=["b"], time_s=1.0)]
    visits = [Visit(block="b", first_stage=1, last_stage=1)]
    sched = make_schedule(stages, visits, {"b"}, 1)
    alone = simulate(stages, visits, sched, {0: 2.0}, forwards=1)
    shared = simulate(stages, visits, sched, {0: 2.0}, forwards=1, link_s={0: 3.0})
    assert shared.stage_end_s[0] == pytest.approx(alone.stage_end_s[0] + 3.0)   # the stage reads for 3 s
    assert shared.copy_busy_s == pytest.approx(alone.copy_busy_s + 3.0)


def test_a_mapped_plan_computes_with_exactly_the_planned_weights():
    sys.path.insert(0, str(ROOT / "tests"))
    from test_quant_stream import (
        _source,
        fill_values,
        inputs,
        reference_values,
        resident_model,
    )

    p = compile_model("tiny-llama", budget_bytes=1 << 20, hardware=BUILTIN["cpu"], batch=1, seq=16, depth=2,
                      quant="int8")
    assert {b.name for b in p.blocks if b.residency == Residency.mapped} == {"embed", "output"}
    exact = resident_model("tiny-llama", reference_values(p, fill_values("tiny-llama", p)))
    src = _source("tiny-llama")
    model = src.build("meta").to_empty(device="cpu")
    src.fill_weights(dict([*model.named_parameters(), *model.named_buffers()]))
    h = attach(model, prove(p), "cpu")
    with torch.no_grad():
        for i in range(3):
            x = inputs("tiny-llama", i)
            assert torch.equal(h(*x), exact(*x)), i
    assert model.output.weight.is_meta    # read in place: the module's own tensor holds nothing
    h.detach()
    assert "forward" not in vars(model.embed) and "forward" not in vars(model.output)


def test_the_predicted_trace_shows_each_mapped_read_on_its_own_lane():
    from memintent.see.perfetto import TID_MAPPED, predicted_events
    from memintent.see.timeline import build_timeline

    p = compile_model("tiny-llama", budget_bytes=1 << 20, hardware=BUILTIN["cpu"], batch=1, seq=16, depth=2,
                      quant="int8")
    tl = build_timeline(p)
    reads = {e["name"]: e for e in predicted_events(tl) if e.get("cat") == "mapped"}
    assert set(reads) == {"read embed", "read output"} and {e["tid"] for e in reads.values()} == {TID_MAPPED}
    # the head is read whole (16 rows of x: one tile), the embedding 16 rows of 128 int8 values and a scale
    head = p.block_map()["output"]
    assert reads["read output"]["args"]["link_bytes"] == head.transfer_bytes
    assert reads["read embed"]["args"]["link_bytes"] == 16 * (128 + 2)
    assert sum(m.link_bytes for m in tl.mapped) == p.prediction.mapped_bytes
