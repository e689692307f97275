"""A block's bytes laid over whole KV pages (spec/runtime.md, "Spare pages").

The pool is one tensor of pages, uint8 (N, page_bytes); a block held there takes ``ceil(bytes / page_bytes)`` of
them, in order, the last one partly. ``gather`` copies the block into a slot region (one ``index_select`` over the
whole pages and one copy of the last page's part: kernels within HBM, on whatever stream is current, which the
copy engine makes its copy stream); ``scatter`` writes a slot region into the pages, on the compute stream, after
the block's stage ran. The reference backend runs the same calls on the CPU.
"""

from __future__ import annotations

import torch

from memintent.errors import RuntimeFault


class PageRun:
    """``nbytes`` of a block over pool ``pages`` (uint8 (N, page_bytes)) with ids ``ids`` (in order)."""

    def __init__(self, pages: torch.Tensor, ids: list[int], nbytes: int):
        page_bytes = pages.shape[1]
        self.full, self.rem = divmod(nbytes, page_bytes)
        need = self.full + (1 if self.rem else 0)
        if len(ids) < need or any(not 0 < i < pages.shape[0] for i in ids):
            raise RuntimeFault(f"a block of {nbytes} bytes needs {need} pool pages of {page_bytes} bytes (ids 1.."
                               f"{pages.shape[0] - 1}), not {len(ids)}: {ids[:4]}...")
        self.pages, self.nbytes, self.page_bytes = pages, nbytes, page_bytes
        self.idx = torch.tensor(ids[:self.full], dtype=torch.long).to(pages.device)     # (full,)
        self.last = ids[self.full] if self.rem else 0
        # The ids were uploaded on the stream current now (compute); a gather on the copy stream waits for them.
        self.uploaded = None
        if pages.is_cuda:
            self.uploaded = torch.cuda.Event()
            self.uploaded.record()

    def gather(self, dst: torch.Tensor) -> None:
        """dst: uint8 [nbytes] (a slot region) <- the pages, on the current stream."""
        if self.uploaded is not None:
            stream = torch.cuda.current_stream(self.pages.device)
            stream.wait_event(self.uploaded)
            self.idx.record_stream(stream)   # the ids outlive a run dropped while its gather is in flight
        cut = self.full * self.page_bytes
        torch.index_select(self.pages, 0, self.idx, out=dst[:cut].view(self.full, self.page_bytes))
        if self.rem:
            dst[cut:].copy_(self.pages[self.last, :self.rem])

    def scatter(self, src: torch.Tensor) -> None:
        """The pages <- src: uint8 [nbytes] (a slot region)."""
        cut = self.full * self.page_bytes
        self.pages.index_copy_(0, self.idx, src[:cut].view(self.full, self.page_bytes))
        if self.rem:
            self.pages[self.last, :self.rem].copy_(src[cut:])


__all__ = ["PageRun"]
