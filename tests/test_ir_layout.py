"""The IR's one dtype table and one alignment rule (memintent.ir.dtypes, ir.model.align_up, ir.layout), checked
against what torch and safetensors themselves say, and against the copies that other modules still keep."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from memintent.ir.dtypes import DTYPES, MODEL_DTYPES, dtype_bytes, ir_dtype_of, normalize_float_dtype, safetensors_dtype, torch_dtype, torch_dtypes
from memintent.ir.layout import weight_offsets
from memintent.ir.model import ALIGN_BYTES, Arena, align_up


def test_widths_are_torchs():
    for name, t in torch_dtypes().items():
        assert DTYPES[name].bits == t.itemsize * 8, name
        assert ir_dtype_of(t) == name and torch_dtype(name) is t
    assert ir_dtype_of(torch.float8_e4m3fn) is None
    with pytest.raises(KeyError):
        torch_dtype("i4")   # no torch dtype: the runtime cannot hold it


def test_bytes_by_hand():
    assert dtype_bytes("bf16", 5) == 10 and dtype_bytes("f32", 3) == 12 and dtype_bytes("bool", 7) == 7
    assert dtype_bytes("i4", 3) == 2 and dtype_bytes("i4", 4) == 2 and dtype_bytes("i4", 0) == 0


def test_safetensors_names_are_the_files(tmp_path):
    # Write one tensor of each dtype the table names for safetensors and read the dtype back from the header.
    tensors = {ir: torch.zeros(2, dtype=torch_dtype(ir)) for ir, d in DTYPES.items() if d.safetensors}
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    with safe_open(str(path), framework="pt") as f:
        for ir in tensors:
            header = f.get_slice(ir).get_dtype()
            assert DTYPES[ir].safetensors == header and safetensors_dtype(header) is torch_dtype(ir), ir
    assert safetensors_dtype("F8_E4M3") is None


def test_float_names():
    for text, ir in (("bf16", "bf16"), ("bfloat16", "bf16"), ("torch.bfloat16", "bf16"), ("FP16", "f16"),
                     ("half", "f16"), ("float", "f32"), ("float32", "f32")):
        assert normalize_float_dtype(text) == ir
    assert normalize_float_dtype("int8") is None and normalize_float_dtype("f64") is None
    assert set(MODEL_DTYPES) == {"bf16", "f16", "f32"}


def test_alignment_rule():
    assert ALIGN_BYTES == 256 and Arena(size_bytes=0).alignment_bytes == ALIGN_BYTES
    assert [align_up(n) for n in (0, 1, 255, 256, 257)] == [0, 256, 256, 256, 512]
    assert align_up(5, 4) == 8
    assert weight_offsets([10, 256, 300, 0]) == ([0, 256, 512, 1024], 1024)


def test_costing_a_quantized_block_needs_no_runtime():
    # The packed layout is IR arithmetic: the passes size a quantized block's copy without importing torch or the
    # runtime (a fresh interpreter, so nothing else here has imported them yet). 4x8 bf16 as int8: 32 bytes of
    # values and 8 of scales, each part padded to 256.
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "from memintent.ir.model import Block, ModelRef, Object, ObjectKind, Program, Quant, RunShape, Tier\n"
        "from memintent.passes.costs import transfer_bytes\n"
        "o = Object(name='w', kind=ObjectKind.weight, dtype='bf16', shape=[4, 8], size_bytes=64, home=Tier.host,\n"
        "           block='b', block_offset_bytes=0)\n"
        "b = Block(name='b', module='b', size_bytes=256, weights=['w'], quant=Quant.int8)\n"
        "p = Program(name='t', model=ModelRef(ref='t', kind='py'), fingerprint='', shape=RunShape(batch=1, seq=1),\n"
        "            objects=[o], blocks=[b])\n"
        "print(transfer_bytes(b, p), 'torch' in sys.modules, 'memintent.runtime' in sys.modules)\n"
    )
    root = str(Path(__file__).resolve().parents[1])   # this checkout's memintent, installed or not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    assert out == ["512", "False", "False"]


def test_a_block_unpacks_by_weight_only_where_each_weight_has_one_linear_reader():
    # weight_unpackers' rule, from the plan's own steps: tiny-llama's layers and head qualify, its embedding (read
    # by index) does not; a second reader of one weight, or a reader in another module, takes its block out.
    from memintent.compiler.compile import compile_model
    from memintent.compiler.hardware import BUILTIN
    from memintent.ir.layout import unpack_offsets, weight_unpackers

    p = compile_model("tiny-llama", budget_bytes=1 << 20, hardware=BUILTIN["cpu"], batch=1, seq=16, depth=2,
                      quant="int8")
    by_weight = weight_unpackers(p)
    assert {f"layers.{i}" for i in range(4)} | {"output"} == set(by_weight)
    assert by_weight["layers.0"]["layers.0.feed_forward.w2.weight"] == "layers.0.feed_forward.w2"
    w = "layers.1.attention.wq.weight"
    twice = p.model_copy(deep=True)
    next(s for s in twice.steps if w not in s.uses and s.block == "layers.1").uses.append(w)
    assert "layers.1" not in weight_unpackers(twice) and "layers.0" in weight_unpackers(twice)
    elsewhere = p.model_copy(deep=True)
    next(s for s in elsewhere.steps if w in s.uses).module = "layers.1.attention"
    assert "layers.1" not in weight_unpackers(elsewhere)
    # the unpack layout: the two norms first, then one region every matrix shares, sized for the largest
    objects = p.object_map()
    block = p.block_map()["layers.0"]
    offsets, size = unpack_offsets(block, objects, True)
    norms = [n for n in block.weights if n.endswith("norm.weight")]
    matrices = [n for n in block.weights if n not in norms]
    assert sorted(offsets[n] for n in norms) == [0, 256] and len({offsets[m] for m in matrices}) == 1
    assert size == offsets[matrices[0]] + max(objects[m].size_bytes for m in matrices) < block.size_bytes
    assert unpack_offsets(block, objects, False) == ({n: objects[n].block_offset_bytes for n in block.weights},
                                                    block.size_bytes)
