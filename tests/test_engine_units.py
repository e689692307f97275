"""The serving engine's parts on small examples: the page pool's invariants, attention over page tables against
float64 dense attention, and the scheduler's policy (no model: steps are simulated)."""

from __future__ import annotations

import math

import pytest
import torch

from memintent.kv import attention
from memintent.kv.attention import DecodeChunk, PrefillChunk, StepMeta, plan_decode_chunks
from memintent.kv.layout import PageLayout, PoolViews
from memintent.engine.pages import PagePool, SwapSpace
from memintent.engine.scheduler import Costs, Scheduler
from memintent.engine.sequence import Request, State
from memintent.errors import MemintentError, RuntimeFault


# ---- the pool -------------------------------------------------------------------------------------------------

def test_pool_hands_out_lowest_blocks_first_and_never_the_null_block():
    pool = PagePool(6)
    assert pool.allocate(0, 2) == [1, 2]
    assert pool.allocate(1, 2) == [3, 4]
    pool.release(0)
    assert pool.allocate(2, 3) == [1, 2, 5]
    assert pool.free_pages == 0 and not pool.can_allocate(1)
    pool.check()


def test_pool_check_finds_a_shared_block_and_a_lost_one():
    pool = PagePool(5)
    pool.allocate(0, 2)
    pool.allocate(1, 1)
    pool.tables[1].append(pool.tables[0][0])          # corrupt: one page in two tables
    with pytest.raises(RuntimeFault, match="in the tables of sequences"):
        pool.check()
    pool = PagePool(5)
    pool.allocate(0, 2)
    pool.tables[0].pop()                              # corrupt: owned by nobody, not free
    with pytest.raises(RuntimeFault, match="neither free nor owned|owned by"):
        pool.check()


def test_pool_of_one_block_is_refused():
    with pytest.raises(MemintentError, match="at least 2 pages"):
        PagePool(1)


# ---- attention over page tables ------------------------------------------------------------------------------

def _dense_reference(q, k, v, scale, softcap=None, window=None):
    """q (H, n, hd) of the last n positions, k and v (KV, L, hd) of all L positions: causal attention in float64."""
    h, n, _ = q.shape
    kvh, L, _ = k.shape
    g = h // kvh
    k = k.double().repeat_interleave(g, 0)
    v = v.double().repeat_interleave(g, 0)
    s = q.double() @ k.transpose(-1, -2) * scale                          # (H, n, L)
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    qpos = torch.arange(L - n, L)[:, None]
    kpos = torch.arange(L)[None, :]
    allowed = kpos <= qpos
    if window:
        allowed &= kpos > qpos - window
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v                                        # (H, n, hd)


@pytest.mark.parametrize("quantized,softcap,window", [(False, None, None), (False, 30.0, None),
                                                     (False, None, 5), (True, None, None)])
def test_paged_attention_equals_dense_attention(quantized, softcap, window):
    torch.manual_seed(0)
    heads, kvh, hd, bt, L = 4, 2, 8, 4, 1
    layout = PageLayout(layers=L, kv_heads=kvh, head_dim=hd, page_tokens=bt,
                         value_dtype=torch.int8 if quantized else torch.float32, quantized=quantized)
    nblocks = 16
    views = PoolViews(torch.zeros(nblocks * layout.page_bytes, dtype=torch.uint8), layout, nblocks)
    pool = PagePool(nblocks)
    # Three sequences: two decoding (7 and 2 tokens cached), one prompt chunk of 6 tokens after 3 cached (9 tokens:
    # its last page is partly filled, so the padded keys must be masked).
    lens = [(7, 1), (2, 1), (3, 6)]
    full_k = {i: torch.randn(kvh, c + n, hd) for i, (c, n) in enumerate(lens)}
    full_v = {i: torch.randn(kvh, c + n, hd) for i, (c, n) in enumerate(lens)}
    for i, (c, n) in enumerate(lens):
        pool.allocate(i, math.ceil((c + n) / bt))
    # the cached tokens were written by earlier steps
    for i, (c, n) in enumerate(lens):
        if c:
            t = pool.table(i)
            meta = StepMeta(write_pages=torch.tensor([t[p // bt] for p in range(c)]),
                            write_offsets=torch.tensor([p % bt for p in range(c)]))
            attention.write_kv(attention._Context(views, meta, torch.float32), 0,
                               full_k[i][:, :c].transpose(0, 1), full_v[i][:, :c].transpose(0, 1))
    # this step: new tokens packed in order
    T = sum(n for _, n in lens)
    q = torch.randn(1, heads, T, hd)
    k_new = torch.cat([full_k[i][:, c:] for i, (c, n) in enumerate(lens)], 1)[None]   # (1, KV, T, hd)
    v_new = torch.cat([full_v[i][:, c:] for i, (c, n) in enumerate(lens)], 1)[None]
    wb, wo = [], []
    for i, (c, n) in enumerate(lens):
        t = pool.table(i)
        wb += [t[p // bt] for p in range(c, c + n)]
        wo += [p % bt for p in range(c, c + n)]
    dec = [0, 1]
    nb = max(len(pool.table(i)) for i in dec)
    tables = torch.zeros(2, nb, dtype=torch.long)
    for r, i in enumerate(dec):
        tables[r, :len(pool.table(i))] = torch.tensor(pool.table(i))
    ctx = torch.tensor([8, 3])
    meta = StepMeta(write_pages=torch.tensor(wb), write_offsets=torch.tensor(wo))
    meta.decode.append(DecodeChunk(rows=torch.tensor([0, 1]), tables=tables,
                                   mask=(torch.arange(nb * bt) < ctx[:, None])[:, None, None], positions=ctx - 1))
    qpos = torch.arange(3, 9)
    L = len(pool.table(2)) * bt                                   # 12 padded key positions for 9 tokens
    meta.prefill.append(PrefillChunk(start=2, length=6, context=9, table=torch.tensor(pool.table(2)),
                                     mask=torch.arange(L)[None, :] <= qpos[:, None]))
    with attention.step(views, meta, torch.float32):
        out = attention.paged_attention(q, k_new, v_new, 0, softcap=softcap, window=window)   # (1, H, T, hd)
    scale = hd ** -0.5
    tol = 0.05 if quantized else 1e-5     # int8 keys/values: ~1 % error per value
    starts = [0, 1, 2]
    for i, (c, n) in enumerate(lens):
        ref = _dense_reference(q[0, :, starts[i]:starts[i] + n], full_k[i], full_v[i], scale, softcap, window)
        got = out[0, :, starts[i]:starts[i] + n].double()
        assert (got - ref).abs().max() < tol, (i, (got - ref).abs().max())


def test_decode_chunks_keep_the_gather_within_its_bound():
    contexts = [5, 30, 7, 64, 1, 12]
    chunks = plan_decode_chunks(contexts, page_tokens=4, gather_tokens=96)
    assert sorted(i for c in chunks for i in c) == list(range(6))
    for c in chunks:
        widest = max(math.ceil(contexts[i] / 4) * 4 for i in c)
        assert len(c) * widest <= 96
    with pytest.raises(MemintentError, match="exceeds the attention gather"):
        plan_decode_chunks([200], page_tokens=4, gather_tokens=96)


def test_int8_kv_round_trip_error_is_within_half_a_step():
    x = torch.randn(50, 3, 16) * 4
    q, s = attention.quantize_kv(x)
    back = attention.dequantize_kv(q, s, torch.float32)
    assert ((back - x).abs() <= s[..., None] / 2 + 1e-6).all()


# ---- the scheduler --------------------------------------------------------------------------------------------

def _costs(**kw):
    base = dict(page_tokens=4, step_tokens=16, evict_page_s=1.0, swap_in_page_s=0.5, recompute_page_s=1.0,
                copy_idle_s=0.0, compute_slack_s=0.0, urgency_s=10.0)
    base.update(kw)
    return Costs(**base)


def _run(sched, steps=200, vocab=50, stop=None):
    """Drive the scheduler as an engine would, sampling token (step + seq) % vocab; check invariants each step."""
    log = []
    for _ in range(steps):
        if not sched.has_work:
            break
        plan = sched.schedule()
        assert plan.tokens <= sched.step_tokens and len(plan.chunks) <= sched.max_seqs
        sampled = [(plan.index + c.seq.seq_id) % vocab for c in plan.chunks if c.sample]
        sched.postprocess(plan, sampled, float(plan.index))
        sched.pool.check()
        log.append(plan)
    assert not sched.has_work, "the scheduler did not finish its requests"
    return log


def test_scheduler_serves_everything_within_budgets_and_fcfs():
    pool = PagePool(9)   # 8 usable pages of 4 tokens
    sched = Scheduler(pool, None, _costs(), max_seqs=3, step_tokens=8, context=24)
    for i in range(6):
        sched.add(Request(f"r{i}", tuple(range(1, 6 + i)), max_new_tokens=4))
    log = _run(sched)
    assert all(s.state == State.finished and len(s.generated) == 4 for s in sched.sequences)
    firsts = [s.first_token_s for s in sched.sequences]
    assert firsts == sorted(firsts), "admission is first come, first served"
    assert any(len(p.chunks) > 1 for p in log), "steps must pack several sequences"


def test_preemption_takes_the_newest_sequence_and_recomputes_when_cheaper():
    pool = PagePool(5)   # 4 usable pages: two sequences of 8 tokens fill it
    sched = Scheduler(pool, SwapSpace(8, 16, pin=False), _costs(copy_idle_s=0.0, compute_slack_s=100.0),
                      max_seqs=4, step_tokens=16, context=32)
    for i in range(2):
        sched.add(Request(f"r{i}", tuple(range(1, 8)), max_new_tokens=6))
    log = _run(sched)
    pre = [p for plan in log for p in plan.preemptions]
    assert pre and pre[0].request == "r1", "the newest running sequence yields"
    assert all(p.kind == "recompute" and p.recompute_s <= p.swap_s for p in pre)
    assert sched.sequences[1].preemptions[0] == "recompute"


def test_preemption_swaps_when_the_copy_engine_idles():
    pool = PagePool(5)
    swap = SwapSpace(8, 16, pin=False)
    sched = Scheduler(pool, swap, _costs(copy_idle_s=100.0, compute_slack_s=0.0), max_seqs=4, step_tokens=16,
                      context=32)
    for i in range(2):
        sched.add(Request(f"r{i}", tuple(range(1, 8)), max_new_tokens=6))
    log = _run(sched)
    pre = [p for plan in log for p in plan.preemptions]
    assert pre and all(p.kind == "swap" and p.swap_s < p.recompute_s for p in pre)
    assert any(plan.swap_in for plan in log) and swap.free_pages == 8


@pytest.mark.parametrize("policy", ["swap", "recompute"])
def test_forced_policy_is_obeyed(policy):
    pool = PagePool(5)
    sched = Scheduler(pool, SwapSpace(8, 16, pin=False), _costs(), max_seqs=4, step_tokens=16, context=32,
                      preempt=policy)
    for i in range(3):
        sched.add(Request(f"r{i}", tuple(range(1, 8)), max_new_tokens=6))
    log = _run(sched)
    kinds = {p.kind for plan in log for p in plan.preemptions}
    assert kinds == {policy}


def test_stop_token_and_context_end_a_sequence():
    pool = PagePool(9)
    sched = Scheduler(pool, None, _costs(), max_seqs=2, step_tokens=8, context=7)
    sched.add(Request("stop", (1, 2), max_new_tokens=10, stop_token_ids=(1,)))   # step 0 samples (0+0)%50 = 0
    sched.add(Request("ctx", (1, 2, 3, 4, 5), max_new_tokens=10))
    _run(sched)
    a, b = sched.sequences
    assert b.finish_reason == "context" and len(b.tokens) == 8
    assert a.finish_reason in ("stop", "length", "context")


def test_step_lists_place_every_token_at_its_page_and_slot():
    # Chunks that start mid-page, span several pages and end mid-page, beside a decode: each token's id, position,
    # page (its table's entry for position // page_tokens) and slot (position % page_tokens), token by token.
    from memintent.engine.scheduler import Batch, Chunk
    from memintent.engine.sequence import Sequence
    from memintent.engine.step_inputs import StepLists

    pt, pool = 4, PagePool(32)
    seqs, chunks = [], []
    for sid, (start, length, sample) in enumerate([(3, 11, True), (9, 1, True), (0, 8, False), (5, 3, True)]):
        seq = Sequence(seq_id=sid, request=Request(f"r{sid}", (1,), 1), tokens=[100 * sid + i for i in range(20)])
        pool.allocate(sid, -(-(start + length) // pt))
        seqs.append(seq)
        chunks.append(Chunk(seq, start, length, sample))
    lists = StepLists.of(Batch(index=0, chunks=chunks), pool, pt)
    want = [(s.tokens[p], p, pool.table(s.seq_id)[p // pt], p % pt)
            for s, c in zip(seqs, chunks) for p in range(c.start, c.start + c.length)]
    assert list(zip(lists.ids, lists.positions, lists.write_pages, lists.write_offsets)) == want
    assert lists.starts == [0, 11, 12, 20] and lists.lengths == [11, 1, 8, 3]
    assert lists.contexts == [14, 10, 8, 8] and lists.rows == [10, 11, 22]


def _scratch() -> attention.Scratch:
    """The attention scratch of the 70B plan at 24 GiB with int8 KV (64 query heads, 8 KV heads of 128), its pool
    of 8009 pages as before the plan held the kernel's scratch."""
    return attention.Scratch(kv_heads=8, head_dim=128, heads=64, value_bytes=2, quantized=True, step_tokens=2392,
                             max_seqs=416, context=1152, page_tokens=16, capacity_tokens=8008 * 16)


@pytest.mark.parametrize("kernel", [True, False])
def test_the_reference_backends_decode_gather_fits_the_plans_scratch(kernel):
    s = _scratch()
    g = s.gather_tokens(kernel)
    assert 1152 <= g <= s.capacity_tokens                       # at least one whole sequence, at most the pool
    assert s.decode_bytes(g) <= s.bytes(kernel)
    assert s.prompt_bytes <= s.bytes(kernel) and s.kernel_bytes <= s.bytes(kernel)


def test_a_plan_for_the_kernel_holds_no_half_pool_gather():
    """The 70B plan held 604 MB per attention op for a reference gather of half the pool that CUDA never makes."""
    s = _scratch()
    assert s.decode_bytes(s.gather_tokens(False)) > 600e6
    assert s.bytes(True) < 160e6 and s.bytes(True) == max(s.prompt_bytes, s.kernel_bytes)


def test_the_kernels_split_scratch_bounds_every_step_on_every_card():
    """The kernel's partial outputs, splits x padded decode tiles x heads x (head dim + 2) float32, for every decode
    count of the plan and every SM count the split rule counts, stay within ``kernel_scratch_bytes``."""
    from memintent.kv.paged_kernel import MAX_PLANNED_SMS, bucket, decode_splits

    bound = attention.kernel_scratch_bytes(heads=64, head_dim=128, kv_heads=8, max_seqs=416)
    assert bound < 16 << 20
    for sms in range(1, MAX_PLANNED_SMS + 1, 7):
        for seqs in range(1, 417):
            tiles = bucket(seqs)
            splits = decode_splits(tiles, 8, 1152, sms)
            used = splits * tiles * 64 * (128 + 2) * 4 if splits > 1 else 0
            assert used <= bound, (sms, seqs, splits)
