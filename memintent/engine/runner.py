"""The model runner: one engine step on the device, from a ``StepPlan`` to the sampled tokens.

It owns the model (built on meta and bound to the plan, so its weights stream as planned; or, for the all-resident
reference engine, filled on the device), the KV pool's views over the arena's KV slot, the host swap space, and
the copies that move swapped pages. Copies use the runtime's copy engine backend: on CUDA the copy stream that
weight streaming also uses (so a swap waits its turn behind the weight copies issued before it, FIFO), on the CPU
backend plain synchronous copies.
"""

from __future__ import annotations

import torch

from memintent.models.fingerprint import named_weights
from memintent.kv import attention
from memintent.kv.attention import DecodeChunk, PrefillChunk, StepMeta, plan_decode_chunks
from memintent.kv.layout import PoolViews, layout_of
from memintent.engine.pages import SwapSpace
from memintent.engine.sampling import Sampled, Sampler
from memintent.engine.scheduler import Chunk, StepPlan
from memintent.errors import MemintentError
from memintent.ir.model import Program, SlotKind
from memintent.runtime.arena import POISON_BYTE
from memintent.runtime.copy_engine import CpuBackend, CudaBackend


def engine_build_kwargs(src) -> dict:
    """How to build the source's model for engine steps: Hugging Face models route attention to the engine."""
    if src.kind == "hf":
        return {"attention": attention.register_hf_attention()}
    return {}


def step_logits(src, model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor,
                logits_index: torch.Tensor) -> torch.Tensor:
    """One engine step's forward: ids (1, T), positions (T,), logits_index (S,) -> logits (S, vocab)."""
    if src.kind == "hf":
        out = model(input_ids=ids, position_ids=positions[None], logits_to_keep=logits_index, use_cache=False)
        return out.logits[0]                                              # (S, vocab)
    return model(ids, positions, logits_index)                            # (S, vocab)


class ModelRunner:
    """``resident=True``: the same engine with every weight on the device and the pool in its own tensor (the
    reference the streamed engine must match bitwise on the same requests)."""

    def __init__(self, program: Program, src, device: torch.device, pool, *, check: bool = False, store=None,
                 resident: bool = False):
        from memintent.runtime import HostStore, attach

        if program.kv_pool is None or program.generation is None:
            raise MemintentError(f"{program.name} is not a generation plan: compile it with --objective")
        self.program, self.src, self.device, self.check, self.pool = program, src, device, check, pool
        pool = program.kv_pool
        self.layout = layout_of(pool, src.torch_dtype)
        self.dtype = src.torch_dtype
        self.gather_tokens = attention.gather_tokens(pool, program.generation.context)
        self.handle = None
        self.forward_stats: list = []                    # the runtime's per-step statistics, kept at close
        model = src.build("meta", **engine_build_kwargs(src))
        if resident:
            model = model.to_empty(device=device)
            with torch.no_grad():
                src.fill_weights(named_weights(model))
            flat = torch.empty(pool.num_pages * pool.page_bytes, dtype=torch.uint8, device=device)
            self.backend = CudaBackend(device, timing=False) if device.type == "cuda" else CpuBackend(device)
        else:
            if store is None:
                store = HostStore(program, pin="auto" if device.type == "cuda" else "none")
                store.fill(src.fill_weights)
            self.handle = attach(model, program, device, check=check, host_store=store)
            kv = next(s for s in program.arena.slots if s.kind == SlotKind.kv)
            flat = self.handle.arena.slot(kv.index)
            self.backend = self.handle.backend
        self.model = model
        # Unwritten positions are masked, but a masked score still multiplies its value by zero and 0 * NaN is NaN:
        # the pool starts zeroed, never as whatever the arena held (checked mode fills it with NaN on purpose).
        flat.zero_()
        stage = program.model.stage
        self.views = PoolViews(flat, self.layout, pool.num_pages, layer_offset=stage[0] if stage else 0)
        self.swap = SwapSpace(pool.swap_pages, pool.page_bytes, pin=device.type == "cuda")
        self.sampler = Sampler(device)

    # -- moving pages ----------------------------------------------------------------------------------------
    def _copy_pages(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
        arrivals = []
        for dst, src in pairs:
            _, arrived = self.backend.copy(dst, src, None)
            arrivals.append(arrived)
        return arrivals

    def _wait(self, arrivals: list) -> None:
        for a in arrivals:
            if a is not None:
                self.backend.wait(a)

    def move_pages(self, plan: StepPlan) -> None:
        """Swap out, (checked mode: poison what was freed, zero what was handed out), swap in. The host read the
        previous step's tokens, so no compute of it still reads or writes these pages; the compute stream waits
        for every copy before this step's attention touches the pool."""
        out = [(self.swap.buffer[h], self.views.page(b)) for pages, slots in plan.swap_out
               for b, h in zip(pages, slots)]
        arrivals = self._copy_pages(out)
        if self.check:
            self._wait(arrivals)      # the poison below must not overwrite pages before they are read out
            arrivals = []
            self.poison(plan.freed_pages)
            for b in plan.new_pages:
                self.views.page(b).zero_()
        ins = [(self.views.page(b), self.swap.buffer[h]) for slots, pages in plan.swap_in
               for h, b in zip(slots, pages)]
        if self.check and ins and self.device.type == "cuda":
            # the copy stream must not write a page before the zero fill on the compute stream has run
            torch.cuda.current_stream(self.device).synchronize()
        arrivals += self._copy_pages(ins)
        self._wait(arrivals)

    def poison(self, pages: list[int]) -> None:
        """Checked mode: returned pages are filled with NaN (0xFF) so that a read of a page nobody owns shows."""
        if self.check:
            for b in pages:
                self.views.page(b).fill_(POISON_BYTE)

    # -- one step ---------------------------------------------------------------------------------------------
    def inputs(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StepMeta]:
        """The step's token ids (1, T), positions (T,), logits rows (S,) and attention metadata."""
        bt = self.layout.page_tokens
        ids, pos, wblk, woff, sample_rows = [], [], [], [], []
        tables = {}
        at = 0
        for c in plan.chunks:
            table = self._table(c)
            tables[id(c)] = table
            for p in range(c.start, c.start + c.length):
                ids.append(c.seq.tokens[p])
                pos.append(p)
                wblk.append(table[p // bt])
                woff.append(p % bt)
            at += c.length
            if c.sample:
                sample_rows.append(at - 1)
        n = len(ids)
        # One host -> device transfer for all the integer metadata of the step.
        host = torch.tensor(ids + pos + wblk + woff + sample_rows, dtype=torch.long)
        dev = host.to(self.device)
        ids_d, pos_d, wblk_d, woff_d = dev[:n], dev[n:2 * n], dev[2 * n:3 * n], dev[3 * n:4 * n]
        meta = StepMeta(write_blocks=wblk_d, write_offsets=woff_d)
        self._attention_groups(plan.chunks, tables, meta)
        return ids_d[None], pos_d, dev[4 * n:], meta

    def _table(self, c: Chunk) -> list[int]:
        return self.pool.table(c.seq.seq_id)

    def _attention_groups(self, chunks: list[Chunk], tables: dict, meta: StepMeta) -> None:
        bt, dev = self.layout.page_tokens, self.device
        starts, at = [], 0
        for c in chunks:
            starts.append(at)
            at += c.length
        # Decode sequences shortest first: a chunk pads to its longest table, so like lengths pad little.
        decode = sorted((i for i, c in enumerate(chunks) if c.length == 1), key=lambda i: chunks[i].start)
        for group in plan_decode_chunks([chunks[i].start + 1 for i in decode], bt, self.gather_tokens):
            idx = [decode[j] for j in group]
            nb = max(len(tables[id(chunks[i])]) for i in idx)
            rows = torch.tensor([starts[i] for i in idx], dtype=torch.long)
            tab = torch.zeros(len(idx), nb, dtype=torch.long)             # padded with the null page (0)
            for r, i in enumerate(idx):
                t = tables[id(chunks[i])]
                tab[r, :len(t)] = torch.tensor(t, dtype=torch.long)
            ctx = torch.tensor([chunks[i].start + 1 for i in idx], dtype=torch.long)
            rows, tab, ctx = rows.to(dev), tab.to(dev), ctx.to(dev)
            keys = torch.arange(nb * bt, device=dev)                        # (L,)
            meta.decode.append(DecodeChunk(rows=rows, tables=tab, mask=(keys < ctx[:, None])[:, None, None],
                                           positions=ctx - 1))
        for i, c in enumerate(chunks):
            if c.length == 1:
                continue
            context = c.start + c.length
            nb = -(-context // bt)
            table = torch.tensor(tables[id(c)][:nb], dtype=torch.long, device=dev)
            q_pos = torch.arange(c.start, context, device=dev)                # (n,)
            mask = torch.arange(nb * bt, device=dev)[None, :] <= q_pos[:, None]   # (n, L): padding past context is
            # above every query's position, so it is masked too
            meta.prefill.append(PrefillChunk(start=starts[i], length=c.length, context=context, table=table,
                                             mask=mask))

    def forward(self, plan: StepPlan, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Move the step's pages and run it: logits (S, vocab); a pipeline stage before the last returns its
        hidden states (1, T, dim) instead, and one after the first takes the previous stage's as ``hidden``."""
        self.move_pages(plan)
        ids, positions, rows, meta = self.inputs(plan)
        with torch.no_grad(), attention.step(self.views, meta, self.dtype):
            return step_logits(self.src, self.model, ids if hidden is None else hidden, positions, rows)

    def execute(self, plan: StepPlan) -> Sampled:
        """Run the step; returns one token per sampling chunk, in chunk order (``sampling.Sampler``)."""
        # The previous step's logits go first: held through this step, they would be device memory the plan's
        # proof (one step's activations) does not count.
        self.last_logits = None
        logits = self.forward(plan)                                           # (S, vocab)
        self.last_logits = logits
        return self.sampler.step(logits, plan.chunks)

    def close(self) -> None:
        if self.handle is not None:
            self.forward_stats = self.handle.stats()     # read before detach releases the device state
            self.handle.detach()
            self.handle = None
