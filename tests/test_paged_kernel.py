"""The paged attention kernel (memintent/kv/paged_kernel.py) run by Triton's interpreter on the CPU: against float64
attention computed densely from each sequence's own keys and values (never through the pool or the metadata),
against the serving engine's gather + SDPA attention on the same pool, and its step metadata.

Each step is a shuffled mix of decode tokens and prompt chunks (with cached prefixes) whose pages are scattered over
a pool of two layers (the kernel reads layer 1: strided views), with every slot no sequence owns -- the tails of last
pages, unused pages -- filled with NaN, so a read outside a sequence's keys shows in the output.

Triton decides whether it interprets when it is first imported (its own library functions, tl.cdiv or tl.sum, are
wrapped then), and any earlier test may have imported it: so the kernel runs in one child process started with
TRITON_INTERPRET=1 (this file run as a script, ``kernel_outputs``), which gets every job's inputs and returns the
outputs; the references and the assertions stay in this process.

Tolerances (|kernel - float64| <= atol + rtol * |float64|, elementwise): float32 1e-5 + 1e-5; float16 2e-3 + 2e-3;
bfloat16 1e-2 + 2^-6. bf16 keeps 8 significant bits: rounding the softmax weights and the output to bf16 costs up to
2^-8 of the output each, and Triton's interpreter rounds float32 -> bf16 toward zero (twice that); the engine's
bf16 attention rounds the same way, so kernel vs engine takes the sum of both tolerances.
"""

from __future__ import annotations

import functools
import itertools
import random
import sys
from dataclasses import dataclass

import pytest
import torch
from interpreted import run_interpreted

pytest.importorskip("triton")

from memintent.kv import attention  # noqa: E402
from memintent.kv.attention import DecodeChunk, PrefillChunk, StepMeta, quantize_kv  # noqa: E402
from memintent.kv.layout import PageLayout, PoolViews  # noqa: E402
from memintent.errors import MemintentError  # noqa: E402
from memintent.kv.paged_kernel import KernelConfig, MetaSizes, MetaStaging, WriteConfig, build_meta, decode_splits, paged_attention_reference, paged_attention_varlen, write_kv_pages  # noqa: E402

PT = 16            # tokens per page
LAYERS = 2         # the pool holds two layers; the kernel reads the second
HEADS = 8
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 2 ** -6)}



@dataclass
class Step:
    """A step over a pool, with each sequence's keys and values also kept densely in float64."""

    q: torch.Tensor                  # (T + pad, H, hd) model dtype
    pool: torch.Tensor               # (P, LAYERS, 2, PT, KV, hd) model dtype or int8
    scales: torch.Tensor | None      # (P, LAYERS, 2, PT, KV) float32 under int8
    starts: list[int]
    lengths: list[int]
    contexts: list[int]
    tables: list[list[int]]
    dense_k: list[torch.Tensor]      # (context, KV, hd) float64, per sequence
    dense_v: list[torch.Tensor]

    def views(self):
        k, v = self.pool[:, 1, 0], self.pool[:, 1, 1]                     # (P, PT, KV, hd), page stride of 2 layers
        if self.scales is None:
            return k, v, None, None
        return k, v, self.scales[:, 1, 0], self.scales[:, 1, 1]


def make_step(seed: int, dtype, kv_heads: int, head_dim: int, quantized: bool, decodes: int = 3, prompts: int = 3,
              pad_tokens: int = 3, poison: float = float("nan")) -> Step:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    seqs = [(1, rng.randint(1, 90)) for _ in range(decodes)]
    for _ in range(prompts):
        n = rng.randint(2, 40)
        seqs.append((n, n + rng.choice([0, rng.randint(1, 50)])))        # a first chunk, or one after a prefix
    rng.shuffle(seqs)
    need = sum(-(-ctx // PT) for _, ctx in seqs)
    pages = list(range(1, need + 4))                                      # page 0 is the null page; 3 spare
    rng.shuffle(pages)
    vdtype = torch.int8 if quantized else dtype
    pool = torch.full((need + 4, LAYERS, 2, PT, kv_heads, head_dim), poison if not quantized else 0, dtype=dtype)
    pool = pool.to(vdtype)
    scales = torch.full((need + 4, LAYERS, 2, PT, kv_heads), poison) if quantized else None
    pool[0] = 0
    if quantized:
        scales[0] = 0
    starts, tables, dk, dv, at = [], [], [], [], 0
    for n, ctx in seqs:
        table, pages = pages[:-(-ctx // PT)], pages[-(-ctx // PT):]
        pos = torch.arange(ctx)
        dense = []
        for kv in (0, 1):
            x = torch.randn(ctx, kv_heads, head_dim, generator=gen) * (1.0 + kv)    # (ctx, KV, hd)
            if quantized:
                vals, s = quantize_kv(x)
                pool[torch.tensor(table)[pos // PT], 1, kv, pos % PT] = vals
                scales[torch.tensor(table)[pos // PT], 1, kv, pos % PT] = s
                dense.append(vals.double() * s.double()[..., None])
            else:
                x = x.to(dtype)
                pool[torch.tensor(table)[pos // PT], 1, kv, pos % PT] = x
                dense.append(x.double())
        dk.append(dense[0])
        dv.append(dense[1])
        tables.append(table)
        starts.append(at)
        at += n
    q = torch.randn(at + pad_tokens, HEADS, head_dim, generator=gen).to(dtype)
    return Step(q, pool, scales, starts, [n for n, _ in seqs], [c for _, c in seqs], tables, dk, dv)


def dense_attention(step: Step, scale: float, softcap=None, window=None) -> torch.Tensor:
    """float64 attention of every sequence's queries over its dense keys and values, head by head: (T, H, hd);
    padding rows zero."""
    out = torch.zeros(step.q.shape, dtype=torch.float64)
    group = HEADS // step.dense_k[0].shape[1]
    for start, n, ctx, k, v in zip(step.starts, step.lengths, step.contexts, step.dense_k, step.dense_v):
        qpos = torch.arange(ctx - n, ctx)[:, None]                        # (n, 1)
        kpos = torch.arange(ctx)[None, :]                                 # (1, ctx)
        seen = kpos <= qpos
        if window:
            seen &= kpos > qpos - window
        for h in range(HEADS):
            s = step.q[start:start + n, h].double() @ k[:, h // group].T * scale     # (n, ctx)
            if softcap:
                s = torch.tanh(s / softcap) * softcap
            p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1)
            out[start:start + n, h] = p @ v[:, h // group]
    return out


def assert_within(got: torch.Tensor, want: torch.Tensor, dtype, factor: float = 1.0) -> None:
    atol, rtol = (factor * t for t in TOL[dtype])
    err = (got.double() - want.double()).abs()
    bound = atol + rtol * want.double().abs()
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (f"max |err| {err.max().item():.3g}; at the worst element |err| "
                                        f"{err.flatten()[worst].item():.3g} > {bound.flatten()[worst].item():.3g}")


# ---- the kernel, in an interpreting child process ------------------------------------------------------------------

CASES = {  # id: dtype, KV heads (GQA ratio 8 / KV), head dim, int8 KV, window, softcap, decode splits, prompt rows,
           # keys per iteration (16: more iterations and splits with work on these short contexts; 64: the default),
           # one-row decode tiles (G = 1) on the tensor cores (None: the default for the pages' dtype)
    "f32-gqa1-hd64-rows16": (torch.float32, 8, 64, False, None, None, None, 16, 64, None),
    "f32-gqa4-hd128-int8-window-softcap-split3": (torch.float32, 2, 128, True, 24, 20.0, 3, 64, 16, None),
    "bf16-gqa8-hd128-softcap-split2": (torch.bfloat16, 1, 128, False, None, 30.0, 2, 64, 32, None),
    "bf16-gqa4-hd64-int8-window": (torch.bfloat16, 2, 64, True, 17, None, 1, 64, 16, None),
    "bf16-gqa1-hd128-int8-window-softcap-split4": (torch.bfloat16, 8, 128, True, 9, 10.0, 4, 64, 16, None),
    "bf16-gqa1-hd80-int8-softcap-dot-split2": (torch.bfloat16, 8, 80, True, None, 5.0, 2, 64, 16, True),
    "f16-gqa1-hd64-window-cores": (torch.float16, 8, 64, False, 13, None, None, 64, 16, False),
    "f16-gqa8-hd64-int8": (torch.float16, 1, 64, True, None, None, None, 128, 64, None),
    "bf16-gqa4-hd80-window-split3": (torch.bfloat16, 2, 80, False, 30, None, 3, 64, 16, None),
}
# Each case twice: with the causal mask on every key block, and only on the blocks past the first query's position
SPLIT_MASK = ("", "-split-mask")
ENGINE_CASES = {"f32": (torch.float32, False), "bf16-int8": (torch.bfloat16, True)}
ENGINE_KV_HEADS, ENGINE_HEAD_DIM, ENGINE_SOFTCAP, ENGINE_WINDOW = 2, 64, 8.0, 20


@functools.lru_cache(maxsize=None)
def case_step(case: str) -> Step:
    dtype, kv_heads, head_dim, quantized, window, *_ = CASES[case]
    return make_step(1000 * kv_heads + head_dim + (window or 0), dtype, kv_heads, head_dim, quantized)


def _jobs() -> dict[str, dict]:
    """Every kernel call the tests check: its inputs, as plain lists and tensors (views keep their strides)."""
    jobs = {}
    for (case, (dtype, kv_heads, head_dim, _, window, softcap, splits, rows, block_n, dot)), split in \
            itertools.product(CASES.items(), SPLIT_MASK):
        st = case_step(case)
        k, v, ks, vs = st.views()
        jobs[case + split] = dict(q=st.q, k=k, v=v, ks=ks, vs=vs, starts=st.starts, lengths=st.lengths,
                                  contexts=st.contexts, tables=st.tables, group=HEADS // kv_heads, rows=rows,
                                  scale=head_dim ** -0.5, softcap=softcap, window=window,
                                  out=torch.full(st.q.shape, 7.0, dtype=dtype),
                                  config=KernelConfig(block_n=block_n, decode_block_n=block_n, decode_splits=splits,
                                                      decode_dot=dot, split_mask=bool(split),
                                                      decode_split_mask=bool(split)))
    for case, (dtype, quantized) in ENGINE_CASES.items():
        st, _, views = engine_step(dtype, quantized)
        # The pool's bytes travel whole (its typed views share them, which torch.save refuses); the child makes the
        # same views of them.
        jobs["engine-" + case] = dict(q=st.q[:sum(st.lengths)], pool=views.pages, layout=views.layout,
                                      starts=st.starts, lengths=st.lengths, contexts=st.contexts,
                                      tables=st.tables, group=HEADS // ENGINE_KV_HEADS, rows=64,
                                      scale=ENGINE_HEAD_DIM ** -0.5, softcap=ENGINE_SOFTCAP, window=ENGINE_WINDOW,
                                      out=None, config=KernelConfig())
    for name, (dtype, quantized, kv_heads, config) in WRITE_CASES.items():
        jobs[name] = write_job(dtype, quantized, kv_heads) | dict(config=config)
    return jobs


# The KV write: 3 KV heads (a block of 2 heads is half padding on its second), model dtype and int8, a head per
# program, blocks of heads, all of a token's heads in one program
WRITE_CASES = {f"write-{d}-{'int8' if qz else d}-{h or 'all'}": (dt, qz, 3, WriteConfig(heads=h, num_warps=w))
               for (d, dt), qz, (h, w) in itertools.product((("bf16", torch.bfloat16), ("f32", torch.float32)),
                                                            (False, True), ((1, 1), (2, 2), (4, 2), (None, 4)))}
WRITE_TOKENS, WRITE_PAGES = 11, 4


def write_job(dtype, quantized: bool, kv_heads: int) -> dict:
    """A step's new keys and values (T, KV, hd) as strided views of (T, 2, KV, hd), their (page, offset) (the last
    token's page -1: padding, written nowhere), and a pool of NaN (scales NaN) to write them into."""
    gen = torch.Generator().manual_seed(kv_heads)
    kv = (torch.randn(WRITE_TOKENS, 2, kv_heads, 64, generator=gen) * 3).to(dtype)      # (T, 2, KV, hd)
    slots = torch.randperm(WRITE_PAGES * PT, generator=gen)[:WRITE_TOKENS]
    pages = (slots // PT).tolist()
    pages[-1] = -1
    vdtype = torch.int8 if quantized else dtype
    pool = torch.full((WRITE_PAGES, 2, PT, kv_heads, 64), 0 if quantized else float("nan"), dtype=dtype).to(vdtype)
    scales = torch.full((WRITE_PAGES, 2, PT, kv_heads), float("nan")) if quantized else None
    return dict(write=True, k=kv[:, 0], v=kv[:, 1], pool=pool, scales=scales, pages=torch.tensor(pages),
                offsets=slots % PT)


def written_pools(j: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pool (and scales) after ``write_kv_pages`` of job ``j`` (its pool is written in place)."""
    pool, scales = j["pool"], j["scales"]
    ks, vs = (scales[:, 0], scales[:, 1]) if scales is not None else (None, None)
    write_kv_pages(j["k"], j["v"], pool[:, 0], pool[:, 1], ks, vs, j["pages"], j["offsets"], config=j["config"])
    return pool, scales


def _run_jobs(jobs_path: str, out_path: str) -> None:
    """The child process (TRITON_INTERPRET=1 before anything imported Triton): each job's output, or its error."""
    results = {}
    for name, j in torch.load(jobs_path, weights_only=False).items():
        if "write" in j:
            results[name] = written_pools(j)
            continue
        if "pool" in j:
            views = PoolViews(j["pool"].flatten(), j["layout"], j["pool"].shape[0])
            j.update(k=views.keys[1], v=views.values[1], ks=None, vs=None)
            if views.key_scales is not None:
                j.update(ks=views.key_scales[1], vs=views.value_scales[1])
        try:
            meta = build_meta(j["starts"], j["lengths"], j["contexts"], j["tables"], page_tokens=PT, group=j["group"],
                              device="cpu", prompt_rows=j["rows"])
            results[name] = paged_attention_varlen(j["q"], j["k"], j["v"], j["ks"], j["vs"], meta, scale=j["scale"],
                                                   softcap=j["softcap"], window=j["window"], out=j["out"],
                                                   config=j["config"])
        except Exception as e:  # noqa: BLE001 -- reported by the job's test
            results[name] = f"{type(e).__name__}: {e}"
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def kernel_outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("paged_kernel")
    torch.save(_jobs(), d / "jobs.pt")
    run_interpreted([__file__, str(d / "jobs.pt"), str(d / "out.pt")], timeout_s=600)
    return torch.load(d / "out.pt", weights_only=False)


def _output(kernel_outputs, name: str) -> torch.Tensor:
    got = kernel_outputs[name]
    if isinstance(got, str) and "only 0-dimensional arrays can be converted" in got:
        # Triton before 3.8 interprets a loop bound with int() of a 1-element array, which NumPy >= 2.4 refuses.
        pytest.skip("this Triton's interpreter cannot run loops under this NumPy (Triton >= 3.8 can); on a GPU "
                    "benchmarks/attention_kernel.py checks the kernel against the float64 reference")
    assert isinstance(got, torch.Tensor), got
    return got


@pytest.mark.parametrize("split", SPLIT_MASK)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_float64_attention(kernel_outputs, case, split):
    dtype, kv_heads, head_dim, _, window, softcap, _, rows, *_ = CASES[case]
    st = case_step(case)
    meta = build_meta(st.starts, st.lengths, st.contexts, st.tables, page_tokens=PT, group=HEADS // kv_heads,
                      device="cpu", prompt_rows=rows)
    assert meta.sizes.decode_tiles + meta.sizes.prompt_tiles > 6          # bucketing left padded (no-op) tiles
    got = _output(kernel_outputs, case + split)
    t = sum(st.lengths)
    assert got.dtype == dtype and bool((got[t:] == 7.0).all())            # rows no tile covers kept their 7
    assert_within(got[:t], dense_attention(st, head_dim ** -0.5, softcap, window)[:t], dtype)


def test_reference_equals_dense_float64_attention():
    st = make_step(5, torch.bfloat16, 2, 64, True, decodes=2, prompts=2)
    meta = build_meta(st.starts, st.lengths, st.contexts, st.tables, page_tokens=PT, group=4, device="cpu")
    ref = paged_attention_reference(st.q, *st.views(), meta, scale=0.125, softcap=15.0, window=12)
    want = dense_attention(st, 0.125, 15.0, 12)
    assert ref.dtype == torch.float64 and torch.allclose(ref, want, rtol=0, atol=1e-12)


# ---- against the engine's gather + SDPA attention on the same pool -------------------------------------------------

@functools.lru_cache(maxsize=None)
def engine_step(dtype, quantized: bool):
    """The same kind of step in the engine's pool: the cached prefixes written as an earlier step would, then
    ``attention.paged_attention`` (write this step's keys, attend) for layer 1. Returns the step, the engine's
    output (T, H, hd) and the pool views the kernel then reads."""
    kv_heads, head_dim = ENGINE_KV_HEADS, ENGINE_HEAD_DIM
    st = make_step(11, dtype, kv_heads, head_dim, quantized)
    layout = PageLayout(LAYERS, kv_heads, head_dim, PT, torch.int8 if quantized else dtype, quantized)
    pages = st.pool.shape[0]
    gen = torch.Generator().manual_seed(1)
    flat = (torch.rand(pages * layout.page_bytes, generator=gen) * 60).to(torch.uint8)   # finite garbage
    views = PoolViews(flat, layout, pages)
    for x in (views.keys[1], views.values[1]) + ((views.key_scales[1], views.value_scales[1]) if quantized else ()):
        x[0] = 0                                                           # the null page
    t = sum(st.lengths)
    k_new = torch.empty(t, kv_heads, head_dim, dtype=dtype)               # (T, KV, hd)
    v_new = torch.empty_like(k_new)
    ctx = attention._Context(views, None, dtype)
    for start, n, c, table, k, v in zip(st.starts, st.lengths, st.contexts, st.tables, st.dense_k, st.dense_v):
        pos = torch.arange(c - n)                                          # the cached prefix
        ctx.meta = StepMeta(write_pages=torch.tensor(table, dtype=torch.long)[pos // PT], write_offsets=pos % PT)
        attention.write_kv(ctx, 1, k[:c - n].to(dtype), v[:c - n].to(dtype))
        k_new[start:start + n], v_new[start:start + n] = k[c - n:].to(dtype), v[c - n:].to(dtype)
    q = st.q[:t].transpose(0, 1)[None]                                    # (1, H, T, hd)
    with attention.step(views, _engine_meta(st), dtype):
        got = attention.paged_attention(q, k_new.transpose(0, 1)[None], v_new.transpose(0, 1)[None], 1,
                                        scale=head_dim ** -0.5, softcap=ENGINE_SOFTCAP, window=ENGINE_WINDOW)
    return st, got[0].transpose(0, 1), views


def _engine_meta(st: Step) -> StepMeta:
    """The engine's metadata for the step, as engine/runner.py builds it: one decode chunk, one per prompt chunk."""
    wb, wo = [], []
    for n, c, table in zip(st.lengths, st.contexts, st.tables):
        wb += [table[p // PT] for p in range(c - n, c)]
        wo += [p % PT for p in range(c - n, c)]
    meta = StepMeta(write_pages=torch.tensor(wb), write_offsets=torch.tensor(wo))
    dec = [i for i, n in enumerate(st.lengths) if n == 1]
    nb = max(len(st.tables[i]) for i in dec)
    tables = torch.tensor([st.tables[i] + [0] * (nb - len(st.tables[i])) for i in dec])
    lens = torch.tensor([st.contexts[i] for i in dec])
    meta.decode.append(DecodeChunk(rows=torch.tensor([st.starts[i] for i in dec]), tables=tables,
                                   mask=(torch.arange(nb * PT) < lens[:, None])[:, None, None], positions=lens - 1))
    for i, n in enumerate(st.lengths):
        if n > 1:
            c = st.contexts[i]
            nb = -(-c // PT)
            qpos = torch.arange(c - n, c)
            meta.prefill.append(PrefillChunk(start=st.starts[i], length=n, context=c,
                                             table=torch.tensor(st.tables[i][:nb]),
                                             mask=torch.arange(nb * PT)[None, :] <= qpos[:, None]))
    return meta


@pytest.mark.parametrize("case", list(ENGINE_CASES))
def test_kernel_equals_engine_attention_on_the_same_pool(kernel_outputs, case):
    dtype, quantized = ENGINE_CASES[case]
    _, want, _ = engine_step(dtype, quantized)
    assert_within(_output(kernel_outputs, "engine-" + case), want, dtype, factor=2.0)


# ---- the metadata ----------------------------------------------------------------------------------------------

def test_meta_tiles_cover_every_query_once_and_pad_with_no_ops():
    # sequences: a decode at context 40, a 20-token chunk after 5 cached, a decode at 3, a 9-token first chunk
    meta = build_meta([0, 1, 21, 22], [1, 20, 1, 9], [40, 25, 3, 9], [[4, 2, 9], [5, 1], [3], [7]], page_tokens=PT,
                      group=4, device="cpu")
    assert meta.prompt_block_m == 16 and meta.sizes == MetaSizes(decode_tiles=2, prompt_tiles=4, seqs=4, pages=4)
    assert meta.decode_tiles.tolist() == [[0, 0, 1, 39], [2, 21, 1, 2]]   # longest context first
    assert meta.prompt_tiles.tolist() == [[1, 17, 4, 21], [1, 1, 16, 5], [3, 22, 9, 0], [0, 0, 0, 0]]
    assert meta.page_table.tolist() == [[4, 2, 9, 0], [5, 1, 0, 0], [3, 0, 0, 0], [7, 0, 0, 0]]
    assert meta.seq_lens.tolist() == [40, 25, 3, 9]
    assert meta.page_table.dtype == torch.int32


def test_meta_of_one_bucket_reuses_one_device_buffer():
    staging = MetaStaging("cpu")
    sizes = MetaSizes(decode_tiles=4, prompt_tiles=2, seqs=8, pages=8)
    a = build_meta([0, 1], [1, 1], [5, 17], [[1], [2, 3]], page_tokens=PT, group=1, device="cpu", staging=staging,
                   sizes=sizes)
    ptr = a.page_table.data_ptr()
    b = build_meta([0], [30], [30], [[6, 7]], page_tokens=PT, group=1, device="cpu", staging=staging, sizes=sizes)
    assert b.page_table.data_ptr() == ptr and b.sizes == sizes            # a captured graph sees the new step
    assert b.decode_tiles.tolist() == [[0, 0, 0, 0]] * 4 and b.prompt_tiles.tolist() == [[0, 0, 30, 0], [0] * 4]
    with pytest.raises(MemintentError, match="needs 3 decode_tiles but sizes allow 2"):
        build_meta([0, 1, 2], [1, 1, 1], [1, 1, 1], [[1], [2], [3]], page_tokens=PT, group=1, device="cpu",
                   sizes=MetaSizes(2, 0, 4, 1))


def test_staging_keeps_every_integer_of_its_dtype():
    # the token staging is int64 (padding pages are -1; ids and positions may pass 2^31), the metadata's int32
    wide, narrow = MetaStaging("cpu", torch.long), MetaStaging("cpu")
    values = [0, -1, 2 ** 40, -(2 ** 63), 2 ** 63 - 1]
    got = wide.upload(values, "ids")
    assert got.dtype == torch.int64 and got.tolist() == values
    assert narrow.upload([-(2 ** 31), 2 ** 31 - 1, 7], "meta").tolist() == [-(2 ** 31), 2 ** 31 - 1, 7]
    assert wide.upload([], "empty").numel() == 0


def test_meta_refuses_a_chunk_longer_than_its_context_or_its_pages():
    with pytest.raises(MemintentError, match="1..context"):
        build_meta([0], [5], [4], [[1]], page_tokens=PT, group=1, device="cpu")
    with pytest.raises(MemintentError, match="has 40 keys but 2 pages of 16"):
        build_meta([0], [1], [40], [[1, 2]], page_tokens=PT, group=1, device="cpu")


def test_decode_splits_fill_the_chip_only_when_few_sequences_have_long_contexts():
    assert decode_splits(64, 8, 1024, sm_count=132) == 1                  # 512 programs: enough
    assert decode_splits(4, 8, 4096, sm_count=132) == 8                   # 32 programs: 8 splits of 512 keys
    assert decode_splits(4, 8, 300, sm_count=132) == 1                    # too few keys to split
    assert decode_splits(1, 1, 1 << 20, sm_count=132) == 16               # at most 16


def test_kernel_refuses_mismatched_heads_and_int8_without_scales():
    step = make_step(3, torch.float32, 2, 64, False, decodes=1, prompts=0)
    meta = build_meta(step.starts, step.lengths, step.contexts, step.tables, page_tokens=PT, group=4, device="cpu")
    k, v, _, _ = step.views()
    with pytest.raises(MemintentError, match="multiple of the KV heads"):
        paged_attention_varlen(step.q[:, :7], k, v, None, None, meta, scale=1.0)
    with pytest.raises(MemintentError, match="int8 with float32 scales"):
        paged_attention_varlen(step.q, k.to(torch.int8), v.to(torch.int8), None, None, meta, scale=1.0)


@pytest.mark.parametrize("case", list(WRITE_CASES))
def test_kv_write_kernel_stores_what_the_reference_write_stores(kernel_outputs, case):
    """Bitwise: the values (or their int8 quantization and scales, ``quantize_kv``) at each token's (page, offset),
    nothing anywhere else (the padding token's page -1 included)."""
    dtype, quantized, kv_heads, _ = WRITE_CASES[case]
    j = write_job(dtype, quantized, kv_heads)
    pool, scales = j["pool"].clone(), j["scales"].clone() if quantized else None
    live = j["pages"] >= 0
    idx = (j["pages"][live], j["offsets"][live])
    for i, x in enumerate((j["k"][live], j["v"][live])):
        if quantized:
            vals, sc = quantize_kv(x)
            pool[:, i].index_put_(idx, vals)
            scales[:, i].index_put_(idx, sc)
        else:
            pool[:, i].index_put_(idx, x)
    got = kernel_outputs[case]
    assert isinstance(got, tuple), got
    assert torch.equal(got[0].view(torch.uint8), pool.view(torch.uint8))
    if quantized:
        assert torch.equal(got[1].view(torch.int32), scales.view(torch.int32))


if __name__ == "__main__":
    _run_jobs(sys.argv[1], sys.argv[2])
