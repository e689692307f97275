"""What quantization costs the real chat model: a short run of benchmarks/quality.py with its bounds.

SmolLM2-135M-Instruct in float32 scores the first window of both public-domain texts through transformers (the
reference) and through the product's own paths: forward plans streaming every block as int8 and int4g (the
embedding and head at int8, ``block_quant``) through ``memintent.load``, and the serving engine's prefill over an
int8 KV pool. The full texts' figures are in the README (``python benchmarks/quality.py``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import quality  # noqa: E402

TOKENS = 1024        # one window of each text


@pytest.fixture(scope="module")
def measured(smollm2_dir):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = quality.measure(smollm2_dir, tokens=TOKENS, window=TOKENS, step=256,
                                 rows=("transformers", "int8", "int4g", "kv-int8"), progress=lambda m: None)
    finally:
        torch.set_num_threads(n)
    print("\n" + quality.table(result))
    return result


def _rise(result, row: str, text: str) -> float:
    """Relative perplexity rise of ``row`` over transformers' float32 on ``text``."""
    return result["rows"][row][text] / result["rows"]["transformers"][text] - 1


@pytest.mark.parametrize("text", list(quality.TEXTS))
def test_int8_weights_stay_within_one_percent(measured, text):
    assert measured["texts"][text] == TOKENS - 1
    assert abs(_rise(measured, "int8", text)) <= 0.01


@pytest.mark.parametrize("text", list(quality.TEXTS))
def test_int4g_weights_stay_within_ten_percent(measured, text):
    # The 4-bit bound. Observed on this window: +0.38 % / +0.15 % (the symmetric int4, not run here, +62 %
    # / +106 %). This model's decoder weights come from a Q4_1 GGUF, so they already lie on a grid of 16 levels
    # per group of 32 that int4g's min-and-scale groups reproduce almost exactly: the bound checks the format and
    # the int8 vocabulary blocks, not what 4 bits cost a model trained in bf16 (README, "Quantization and quality").
    assert 0 < abs(_rise(measured, "int4g", text)) <= 0.10     # > 0: the weights were quantized at all


@pytest.mark.parametrize("text", list(quality.TEXTS))
def test_int8_kv_pool_is_reported_and_close(measured, text):
    assert abs(_rise(measured, "kv-int8", text)) <= 0.02


def test_text_header_is_not_scored():
    text = quality.read_text(quality.TEXTS["sqlite3.h"])
    assert text.startswith("/*\n** 2001-09-15") and "License:" not in text


def test_offgrid_control_moves_weights_by_at_most_half_a_step():
    import offgrid

    # a weight on a Q4_1 grid: 16 levels per group of 32 (step 0.1 from -0.7)
    levels = torch.randint(0, 16, (4, 64), generator=torch.Generator().manual_seed(0)).float()
    levels[:, ::32], levels[:, 1::32] = 0, 15           # each group spans the whole grid: its step is 0.1
    w = levels * 0.1 - 0.7
    moved = offgrid.off_grid("w", w, "1")
    assert torch.equal(moved, offgrid.off_grid("w", w, "1")) and not torch.equal(moved, offgrid.off_grid("w", w, "2"))
    d = (moved - w).abs()
    assert d.max() <= 0.05 + 1e-6 and d.mean() > 0.02     # uniform in +-half a step: mean 0.025
