"""Decode steps as CUDA graphs: the plan is static, so a decode step of ``S`` sequences is the same kernels every
time, on the same weights, pool and buffers; only its integers change (token ids, positions, page tables). A plan
that streams is no exception: each visit's copy lands in the slot the plan gives it, the same slot every step, so
the graph holds the plan's copies on the copy stream, the events that order them against compute, the
dequantizations and the compute (``StreamedModel.capturing``; spec/runtime.md, "Captured steps").

One graph per bucket of sequences (1, 2, 4, ... up to the plan's ``max_seqs``): a step of ``S`` sequences pads to
the smallest bucket ``B >= S``. Its integers are staged into device buffers whose addresses never change (one per
bucket: ``MetaStaging`` keys them), the padding tokens write their keys and values nowhere (page -1) and attend to
nothing (empty tiles), and their logit rows are dropped. Every bucket is captured when the runner starts
(``capture_all``), on a step of padding only: one eager run (kernel selection, allocations; a streamed plan's
forward before the captured one copies in the visits it reads first), then the capture from the same buffers.
Capturing inside the run made its first decode step of each size several times its length (0.73 s against 36 ms
for opt-30b on the H200), a cost the plan's prediction of the run does not carry.

Prompt-heavy and mixed steps run eagerly; so does every step in checked mode. A capture that fails (a model whose
forward synchronizes with the host) leaves that bucket eager, with one warning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from memintent.engine.step_inputs import StepLists
from memintent.kv.attention import StepMeta
from memintent.kv.paged_kernel import MetaSizes, buckets, meta_ints


@dataclass(slots=True)
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor          # (B, vocab): what a replay writes


class DecodeGraphs:
    """The CUDA graphs of a runner's decode steps (see the module docstring)."""

    def __init__(self, runner, max_seqs: int):
        self.runner = runner
        self.buckets = buckets(max_seqs)
        g = runner.program.generation
        # Every graph's page table is as wide as the plan's longest sequence needs.
        self.pages = -(-g.context // runner.layout.page_tokens)
        self.pool = torch.cuda.graph_pool_handle()          # one memory pool: the graphs replay one at a time
        self.graphs: dict[int, _Captured | None] = {}       # bucket -> its graph (None: it stays eager)

    def bucket_of(self, seqs: int) -> int:
        return next(b for b in self.buckets if b >= seqs)

    def _sizes(self, b: int) -> MetaSizes:
        return MetaSizes(decode_tiles=b, prompt_tiles=0, seqs=b, pages=self.pages)

    def _upload_ints(self, lists: StepLists, b: int) -> torch.Tensor:
        """The step's token integers into bucket ``b``'s buffer: ids, positions, pages, slots, logit rows (5 B,)."""
        pad = b - len(lists.ids)
        return self.runner.staging.upload(lists.ids + [0] * pad + lists.positions + [0] * pad + lists.write_pages
                                          + [-1] * pad + lists.write_offsets + [0] * pad + list(range(b)),
                                          ("graph", b))                                     # (5 B,) int64

    def _inputs(self, lists: StepLists, b: int):
        """The step's inputs in bucket ``b``'s buffers: ids (1, B), positions (B,), logit rows (B,), metadata."""
        r = self.runner
        dev = self._upload_ints(lists, b)
        paged = r._paged_meta(lists, self._sizes(b))
        meta = StepMeta(write_pages=dev[2 * b:3 * b], write_offsets=dev[3 * b:4 * b], paged=paged)
        return dev[:b][None], dev[b:2 * b], dev[4 * b:], meta

    def _upload(self, lists: StepLists, b: int) -> torch.Tensor:
        """A replay's inputs: only the integers, into the buffers the graph was captured with (the views of them it
        reads do not change, so none is made: host time the device waits for between steps). Returns the token
        ids' buffer (B,)."""
        r = self.runner
        dev = self._upload_ints(lists, b)
        sizes = self._sizes(b)
        flat, _ = meta_ints(lists.starts, lists.lengths, lists.contexts, lists.tables,
                            page_tokens=r.layout.page_tokens, group=r.group, sizes=sizes)
        r.meta_staging.upload(flat, sizes)
        return dev[:b]

    def capture_all(self) -> None:
        """Capture every bucket's graph on a step of padding only (it writes no page and attends to nothing)."""
        for b in self.buckets:
            inputs = self._inputs(StepLists(), b)
            self.runner.run_model(*inputs)              # eagerly first: cuBLAS and Triton pick their kernels
            self.graphs[b] = self._capture(b, *inputs)

    def step(self, lists: StepLists, fill: Callable[[torch.Tensor], None]) -> torch.Tensor:
        """Run a decode step of ``len(lists.ids)`` sequences: logits (S, vocab). ``fill``: writes the ids the host
        has not read yet into the step's token ids (B,) on the device (``ModelRunner.fill``)."""
        s = len(lists.ids)
        b = self.bucket_of(s)
        captured = self.graphs.get(b)
        if captured is None:                            # its capture failed: it runs eagerly
            ids, positions, rows, meta = self._inputs(lists, b)
            fill(ids[0])
            return self.runner.run_model(ids, positions, rows, meta)[:s]
        fill(self._upload(lists, b))
        r = self.runner
        with r.handle.replaying() if r.handle is not None else contextlib.nullcontext():
            captured.graph.replay()
        return captured.logits[:s]

    def _capture(self, b: int, ids, positions, rows, meta: StepMeta) -> _Captured | None:
        r = self.runner
        graph = torch.cuda.CUDAGraph()
        try:
            # the handle's capture inside the graph's: the copy stream forks from and joins the capturing stream
            with (torch.cuda.graph(graph, pool=self.pool),
                  r.handle.capturing() if r.handle is not None else contextlib.nullcontext()):
                logits = r.run_model(ids, positions, rows, meta)
        except RuntimeError as e:
            if r.handle is not None:
                r.handle.reset()       # the forward that failed left its hooks mid-way: the next one starts afresh
            warnings.warn(f"decode steps of {b} sequences run eagerly: capturing them as a CUDA graph failed "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})", stacklevel=3)
            return None
        return _Captured(graph, logits)


__all__ = ["DecodeGraphs"]
