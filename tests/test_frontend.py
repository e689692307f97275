"""Front-end details that the golden files and the folded-trace test do not show."""

from __future__ import annotations

import pytest
import torch

from memintent.compiler import frontend
from memintent.errors import MemintentError


class _Refuses(torch.nn.Module):
    """A module whose forward fails while being traced, with a long one-line message."""

    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def forward(self, x):
        raise RuntimeError(self.message)


def test_export_error_is_cut_at_a_word_and_says_so():
    words = " ".join(f"word{i:03d}" for i in range(100))          # 799 characters, no newline
    with pytest.raises(MemintentError) as info:
        frontend._export(_Refuses(words), (torch.zeros(2),), {})
    msg = str(info.value)
    assert "\n" not in msg
    kept = msg.split("torch.export could not trace the model: ", 1)[1].split(" ... (message shortened)", 1)[0]
    assert kept and words.startswith(kept) and words[len(kept)] == " "   # ends on a whole word
    assert len(kept) <= 300
    assert msg.endswith("(a model must be export-traceable with static shapes)")


def test_export_error_that_fits_is_kept_whole():
    with pytest.raises(MemintentError) as info:
        frontend._export(_Refuses("short reason"), (torch.zeros(2),), {})
    assert "short reason (a model must" in str(info.value) and "shortened" not in str(info.value)


class ToyIndexer(torch.nn.Module):
    """Stands for a sparse-attention indexer (DeepSeek-V3.2's kind): a module whose class name ends in Indexer."""

    def forward(self, x):
        return x


class _SparseRefuses(_Refuses):
    def __init__(self, message: str):
        super().__init__(message)
        self.indexer = ToyIndexer()


class _SparseTraces(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.indexer = ToyIndexer()

    def forward(self, x):
        return self.indexer(x) * 2


def test_a_failed_export_of_a_model_with_an_indexer_names_the_indexer():
    with pytest.raises(MemintentError) as info:
        frontend._export(_SparseRefuses("'NoneType' object is not subscriptable"), (torch.zeros(2),), {})
    msg = str(info.value)
    assert "learned indexer (ToyIndexer: sparse attention)" in msg
    assert msg.endswith("torch.export said: 'NoneType' object is not subscriptable")


def test_a_model_with_an_indexer_that_traces_is_traced():
    ep = frontend._export(_SparseTraces(), (torch.zeros(2),), {})
    assert any(n.op == "call_function" for n in ep.graph.nodes)
