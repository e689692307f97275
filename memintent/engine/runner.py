"""The model runner: one engine step on the device, from a ``Batch`` to the sampled tokens.

It owns the model (built on meta and bound to the plan, so its weights stream as planned; or, for the all-resident
reference engine, filled on the device), the KV pool's views over the arena's KV slot, the host swap space, and
the copies that move swapped pages. Copies use the runtime's copy engine backend: on CUDA the copy stream that
weight streaming also uses (so a swap waits its turn behind the weight copies issued before it, FIFO), on the CPU
backend plain synchronous copies.
"""

from __future__ import annotations

from time import perf_counter

import torch

from memintent.engine.graphs import DecodeGraphs
from memintent.engine.pages import PagePool, SwapSpace
from memintent.engine.scheduler import Batch
from memintent.engine.spare_pages import SpareStep
from memintent.engine.step_inputs import Carried, StepLists, use_kernel
from memintent.errors import RuntimeFault
from memintent.ir.model import SlotKind
from memintent.ir.proven import Proven
from memintent.kv import attention
from memintent.kv.attention import (
    DecodeChunk,
    PrefillChunk,
    StepMeta,
    plan_decode_chunks,
)
from memintent.kv.layout import PoolViews, layout_of
from memintent.kv.paged_kernel import (
    KernelConfig,
    MetaSizes,
    MetaStaging,
    PagedMeta,
    build_meta,
    paged_attention_varlen,
    warm_uploads,
)
from memintent.models import norm_kernel
from memintent.models.plan_model import resident_model
from memintent.runtime.arena import POISON_BYTE
from memintent.runtime.copy_engine import CpuBackend, CudaBackend
from memintent.runtime.device import sync
from memintent.runtime.executor import attach
from memintent.runtime.host_store import HostStore


class ModelRunner:
    """One part of a proven generation plan (the whole model, or a pipeline part) on ``device``. ``resident=True``:
    the same engine with every weight on the device and the pool in its own tensor (the reference the streamed
    engine must match bitwise on the same requests). ``src``: the plan's model, already checked against the plan
    (``models.plan_model.source_for``)."""

    def __init__(self, proven: Proven, src, device: torch.device, pool: PagePool, *, check: bool = False,
                 store: HostStore | None = None, resident: bool = False, attention_backend: str = "auto",
                 graphs: bool = True):
        program = proven.program
        self.program, self.src, self.device, self.check, self.pool = program, src, device, check, pool
        kv = program.kv_pool
        self.layout = layout_of(kv, src.torch_dtype)
        self.dtype = src.torch_dtype
        self.group = src.n_heads // src.n_kv_heads                # query heads per KV head
        gen = program.generation
        self.gather_tokens = attention.scratch_of(kv, src.torch_dtype, src.n_heads, context=gen.context,
                                                  step_tokens=gen.step_tokens, max_seqs=gen.max_seqs
                                                  ).gather_tokens(program.hardware.attention == "kernel")
        self.handle = None
        self.forward_stats: list = []                    # the runtime's per-step statistics, kept at close
        model = src.engine_build("meta")
        if resident:
            model = resident_model(src, device, model)
            flat = torch.empty(kv.num_pages * kv.page_bytes, dtype=torch.uint8, device=device)
            self.backend = CudaBackend(device, timing=False) if device.type == "cuda" else CpuBackend(device)
        else:
            if store is None:
                store = HostStore(program, pin="auto" if device.type == "cuda" else "none")
                store.fill(src.fill_weights)
            self.handle = attach(model, proven, device, check=check, host_store=store, model_checked=True)
            slot = next(s for s in program.arena.slots if s.kind == SlotKind.kv)
            flat = self.handle.arena.slot(slot.index)
            self.backend = self.handle.backend
        self.model = model
        # Unwritten positions are masked, but a masked score still multiplies its value by zero and 0 * NaN is NaN:
        # the pool starts zeroed, never as whatever the arena held (checked mode fills it with NaN on purpose).
        flat.zero_()
        first_layer = program.model.part[0] if program.model.part else 0
        self.views = PoolViews(flat, self.layout, kv.num_pages, layer_offset=first_layer)
        self.swap = SwapSpace(kv.swap_pages, kv.page_bytes, pin=device.type == "cuda")
        self.kernel = use_kernel(attention_backend, device)
        self.staging = MetaStaging(device, torch.long)             # the step's token integers
        self.meta_staging = MetaStaging(device)                    # the kernel's attention metadata
        self.hole_staging = MetaStaging(device, torch.long)        # where a step's carried tokens go
        # Decode steps as CUDA graphs, streamed or not (a capture holds the plan's copies); not in checked mode,
        # whose frees poison slots, nor for a pipeline part, whose steps take or give hidden states (spec/runtime.md,
        # "Captured steps").
        capturable = device.type == "cuda" and self.kernel and not check and not program.model.part
        self.graphs = DecodeGraphs(self, program.generation.max_seqs) if graphs and capturable else None
        self.warm_s = self._warm() if device.type == "cuda" else 0.0

    def _warm(self) -> float:
        """Everything a first use would otherwise do inside the run, done before it: compile the attention and
        dequantization kernels' variants and capture the decode graphs. Returns the seconds it took (the engine's
        start, not its run)."""
        t0 = perf_counter()
        warm_uploads(self.device)
        if self.kernel:
            self._compile_kernels()
            norm_kernel.warm(self.model, self.device, self.dtype)
        if self.handle is not None:
            self.handle.warm_unpacks()
            self.handle.warm_mapped()
        if self.graphs is not None:
            self.graphs.capture_all()
        sync(self.device)
        return perf_counter() - t0

    def _compile_kernels(self) -> None:
        """Compile, before the first step, every variant of the attention kernel this plan's steps can launch (each
        decode key split and the prompt tiles): Triton compiles a variant on its first launch, which mid-run is a
        step several times its length."""
        pt, g = self.layout.page_tokens, self.group
        q = torch.zeros(1, self.src.n_heads, self.src.head_dim, dtype=self.dtype, device=self.device)  # (T, H, hd)
        ks, vs = self.views.keys[0], self.views.values[0]
        kss = self.views.key_scales[0] if self.views.key_scales is not None else None
        vss = self.views.value_scales[0] if self.views.value_scales is not None else None
        for lengths in ([1], [2]):              # a decode tile; a prompt tile
            meta = build_meta([0], lengths, [lengths[0]], [[0]], page_tokens=pt, group=g, device=self.device,
                              staging=self.meta_staging)
            qq = q.expand(lengths[0], -1, -1).contiguous()
            for splits in ((1, 2, 4, 8, 16) if lengths == [1] else (1,)):
                paged_attention_varlen(qq, ks, vs, kss, vss, meta, scale=1.0,
                                       config=KernelConfig(decode_splits=splits))   # reads the null page only
    # -- moving pages ----------------------------------------------------------------------------------------
    def _copy_pages(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        if not pairs:
            return []
        # The copies wait for the compute queued so far: the step before may still be writing these pages when the
        # engine looks ahead (its tokens unread), and a page a sequence finished with may still be read by it.
        after = None
        if self.device.type == "cuda":
            after = torch.cuda.Event()
            after.record()
        return [self.backend.copy(dst, src, after)[1] for dst, src in pairs]

    def _wait(self, arrivals: list) -> None:
        for a in arrivals:
            if a is not None:
                self.backend.wait(a)

    def move_pages(self, batch: Batch) -> None:
        """Swap out, (checked mode: poison what was freed, zero what was handed out), swap in. The host read the
        previous step's tokens, so no compute of it still reads or writes these pages; the compute stream waits
        for every copy before this step's attention touches the pool."""
        out = [(self.swap.buffer[h], self.views.page(b)) for pages, slots in batch.swap_out
               for b, h in zip(pages, slots)]
        arrivals = self._copy_pages(out)
        if self.check:
            self._wait(arrivals)      # the poison below must not overwrite pages before they are read out
            arrivals = []
            self.poison(batch.freed_pages)
            for b in batch.new_pages:
                self.views.page(b).zero_()
        ins = [(self.views.page(b), self.swap.buffer[h]) for slots, pages in batch.swap_in
               for h, b in zip(slots, pages)]
        if self.check and ins and self.device.type == "cuda":
            # the copy stream must not write a page before the zero fill on the compute stream has run
            torch.cuda.current_stream(self.device).synchronize()
        arrivals += self._copy_pages(ins)
        self._wait(arrivals)

    def hold(self, spare: SpareStep) -> None:
        """The step's streamed blocks held in or filling the pool's spare pages (``spare_pages``); the pages they
        gave back are poisoned in checked mode, like a finished sequence's."""
        if self.handle is not None:
            self.handle.hold_in_pages(self.views.pages, spare.held, spare.filling)
        self.poison(spare.released)

    def poison(self, pages: list[int]) -> None:
        """Checked mode: returned pages are filled with NaN (0xFF) so that a read of a page nobody owns shows."""
        if self.check:
            for b in pages:
                self.views.page(b).fill_(POISON_BYTE)

    # -- one step ---------------------------------------------------------------------------------------------
    def lists(self, batch: Batch) -> StepLists:
        """The step's integers on the host: one pass over its chunks."""
        return StepLists.of(batch, self.pool, self.layout.page_tokens)

    def inputs(self, lists: StepLists) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StepMeta]:
        """The step's token ids (1, T), positions (T,), logits rows (S,) and attention metadata on the device."""
        n = len(lists.ids)
        # One host -> device transfer for the step's token integers (from pinned staging on CUDA, not blocking).
        dev = self.staging.upload(lists.ids + lists.positions + lists.write_pages + lists.write_offsets + lists.rows,
                                  "eager")
        ids, pos, wpages, woffs = dev[:n], dev[n:2 * n], dev[2 * n:3 * n], dev[3 * n:4 * n]
        meta = StepMeta(write_pages=wpages, write_offsets=woffs)
        if self.kernel:
            meta.paged = self._paged_meta(lists)
        else:
            self._attention_groups(lists, meta)
        return ids[None], pos, dev[4 * n:], meta

    def _paged_meta(self, lists: StepLists, sizes: MetaSizes | None = None) -> PagedMeta:
        return build_meta(lists.starts, lists.lengths, lists.contexts, lists.tables, page_tokens=self.layout.page_tokens,
                          group=self.group, device=self.device, staging=self.meta_staging,
                          sizes=sizes)

    def _attention_groups(self, lists: StepLists, meta: StepMeta) -> None:
        """The reference backend's metadata: decode sequences in chunks within the gather the plan proves, prompt
        chunks one by one (gather + SDPA, ``kv.attention``)."""
        bt, dev = self.layout.page_tokens, self.device
        # Decode sequences shortest first: a chunk pads to its longest table, so like lengths pad little.
        decode = sorted((i for i, n in enumerate(lists.lengths) if n == 1), key=lambda i: lists.contexts[i])
        for group in plan_decode_chunks([lists.contexts[i] for i in decode], bt, self.gather_tokens):
            idx = [decode[j] for j in group]
            nb = max(len(lists.tables[i]) for i in idx)
            rows = torch.tensor([lists.starts[i] for i in idx], dtype=torch.long)
            tab = torch.zeros(len(idx), nb, dtype=torch.long)             # padded with the null page (0)
            for r, i in enumerate(idx):
                tab[r, :len(lists.tables[i])] = torch.tensor(lists.tables[i], dtype=torch.long)
            ctx = torch.tensor([lists.contexts[i] for i in idx], dtype=torch.long)
            rows, tab, ctx = rows.to(dev), tab.to(dev), ctx.to(dev)
            keys = torch.arange(nb * bt, device=dev)                        # (L,)
            meta.decode.append(DecodeChunk(rows=rows, tables=tab, mask=(keys < ctx[:, None])[:, None, None],
                                           positions=ctx - 1))
        for i, n in enumerate(lists.lengths):
            if n == 1:
                continue
            context = lists.contexts[i]
            nb = -(-context // bt)
            table = torch.tensor(lists.tables[i][:nb], dtype=torch.long, device=dev)
            q_pos = torch.arange(context - n, context, device=dev)          # (n,)
            mask = torch.arange(nb * bt, device=dev)[None, :] <= q_pos[:, None]   # (n, L): padding past context is
            # above every query's position, so it is masked too
            meta.prefill.append(PrefillChunk(start=lists.starts[i], length=n, context=context, table=table,
                                             mask=mask))

    def forward(self, batch: Batch, hidden: torch.Tensor | None = None, carried: Carried | None = None) -> torch.Tensor:
        """Move the step's pages and run it: logits (S, vocab); a pipeline part before the last returns its hidden
        states (1, T, dim) instead, and one after the first takes the previous part's as ``hidden``. A decode step
        replays its bucket's CUDA graph (``DecodeGraphs``). ``carried``: the step
        before's tokens, still on the device, for the sequences whose last token the host has not read yet."""
        self.move_pages(batch)
        lists = self.lists(batch)
        held = self.handle is not None and self.handle.holds_pages      # such a forward is not captured
        if self.graphs is not None and hidden is None and lists.decode_only and not held:
            return self.graphs.step(lists, lambda ids: self.fill(ids, lists, carried))
        ids, positions, rows, meta = self.inputs(lists)
        self.fill(ids[0], lists, carried)
        return self.run_model(ids if hidden is None else hidden, positions, rows, meta)

    def fill(self, ids: torch.Tensor, lists: StepLists, carried: Carried | None) -> None:
        """Write the step's ``PENDING`` token ids (``lists.holes``) into its ids (T,) on the device, from the step
        before's sampled tokens (``carried``), in stream order behind the step that drew them."""
        if not lists.holes:
            return
        if carried is None:
            raise RuntimeFault(f"a step reads {len(lists.holes)} token(s) not yet sampled, with no step before it to "
                               "take them from")
        k = len(lists.holes)
        dev = self.hole_staging.upload(lists.holes + [carried.rows[s] for s in lists.hole_seqs], "holes")   # (2 k,)
        ids.index_copy_(0, dev[:k], carried.tokens.index_select(0, dev[k:]))

    def run_model(self, ids: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor,
                  meta: StepMeta) -> torch.Tensor:
        """The model's forward over one step's inputs, its attention over the pool as ``meta`` says."""
        with torch.no_grad(), attention.step(self.views, meta, self.dtype):
            return self.src.step_logits(self.model, ids, positions, rows)

    def close(self) -> None:
        # The graphs first: their memory pool and the buffers they captured are device memory until they go.
        self.graphs = None
        if self.handle is not None:
            self.forward_stats = self.handle.stats()     # read before detach releases the device state
            self.handle.detach()
            self.handle = None
        self.model = self.views = None
        if self.device.type == "cuda":
            # cuBLAS keeps a workspace per stream it ran on (the graphs' capture stream too) for the process's life:
            # released here, so the next engine in this process measures its own peak against its own budget.
            clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
            if clear is not None:
                sync(self.device)
                clear()
            torch.cuda.empty_cache()
