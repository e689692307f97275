import dataclasses

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from memintent.models.fingerprint import named_weights
from memintent.models.preset import PRESETS, ModelConfig, PresetSource, build, init_weight
from memintent.errors import MemintentError

PUBLISHED = {
    "llama-3-8b": 8.03e9, "llama-3-70b": 70.55e9, "mistral-7b": 7.24e9, "qwen2-7b": 7.62e9,
    "opt-13b": 12.85e9, "opt-30b": 29.97e9, "mixtral-8x7b": 46.70e9, "w1": 7.37e9,
}


def tiny(**kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig.from_name("tiny-llama"), **kw)


def ids(batch=2, seq=16, vocab=512, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    cfg = ModelConfig.from_name(name)
    assert abs(cfg.num_params() - PUBLISHED[name]) / PUBLISHED[name] < 0.01


@pytest.mark.parametrize("name", list(PRESETS))
def test_num_params_matches_meta_build(name):
    cfg = ModelConfig.from_name(name)
    m = build(cfg, "meta")
    assert sum(p.numel() for p in m.parameters()) == cfg.num_params()
    assert all(p.dtype == cfg.torch_dtype for p in m.parameters())


def test_w1_layer_size():
    cfg = ModelConfig.from_name("w1")
    m = build(cfg, "meta")
    layer_bytes = sum(p.numel() * p.dtype.itemsize for p in m.layers[0].parameters())
    assert abs(layer_bytes - 1.711e9) < 0.001e9
    assert cfg.n_layers == 8 and cfg.vocab_size == 32000 and cfg.dtype == "bf16"


def test_module_names():
    m = build(tiny(), "meta")
    names = dict(m.named_parameters())
    for n in ["embed.weight", "layers.0.attention_norm.weight", "layers.0.attention.wq.weight",
              "layers.0.attention.wk.weight", "layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
              "layers.0.ffn_norm.weight", "layers.0.feed_forward.w1.weight", "layers.0.feed_forward.w2.weight",
              "layers.0.feed_forward.w3.weight", "norm.weight", "output.weight"]:
        assert n in names, n
    assert {n for n, _ in m.named_buffers()} == {"rope_cos", "rope_sin"}
    assert m.state_dict().keys() == names.keys()  # RoPE tables are non-persistent
    opt = build(ModelConfig.from_name("opt-13b"), "meta")
    assert opt.output.weight is opt.embed.weight
    assert "layers.0.feed_forward.fc1.bias" in dict(opt.named_parameters())
    assert opt.pos_embed.weight.shape == (2050, 5120)
    moe = build(ModelConfig.from_name("mixtral-8x7b"), "meta")
    assert len(moe.layers[0].moe.experts) == 8 and moe.layers[0].moe.gate.weight.shape == (8, 4096)
    assert ModelConfig.from_name("llama-3-70b").head_dim == 128
    assert "tiny-llama" in PRESETS


def fill_random(model):
    """``model`` (built on the CPU) with its preset's weight values (``PresetSource.fill_weights``)."""
    src = PresetSource("test", model.config)
    src.init_device = "cpu"
    src.fill_weights(named_weights(model))
    return model


def test_unknown_preset():
    with pytest.raises(MemintentError, match="unknown preset 'nope'.*tiny-llama"):
        ModelConfig.from_name("nope")
    with pytest.raises(MemintentError, match="divide"):
        tiny(n_heads=3)


def test_init_weight_deterministic():
    a = init_weight("layers.0.attention.wq.weight", (8, 8), torch.bfloat16, "cpu")
    b = init_weight("layers.0.attention.wq.weight", (8, 8), torch.bfloat16, "cpu")
    c = init_weight("layers.1.attention.wq.weight", (8, 8), torch.bfloat16, "cpu")
    d = init_weight("layers.0.attention.wq.weight", (8, 8), torch.bfloat16, "cpu", seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, d)
    assert a.dtype == torch.bfloat16 and 0.01 < a.float().std() < 0.03
    assert torch.equal(init_weight("layers.3.ffn_norm.weight", (8,), torch.float16), torch.ones(8, dtype=torch.float16))
    assert torch.equal(init_weight("norm.bias", (8,), torch.float32), torch.zeros(8))
    assert init_weight("layers.0.attention.wq.bias", (64,), torch.float32).abs().max() < 0.1


def test_tiny_forward_finite_and_small():
    # The CPU suite runs this model many times: its size is what keeps that cheap, so count its work (the matmul
    # FLOPs of one forward, by hand from the config) instead of timing it on a machine that may be busy.
    cfg = ModelConfig.from_name("tiny-llama")
    m = fill_random(build(cfg, "cpu"))
    x = ids()   # (2, 16)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        out = m(x)
    with torch.inference_mode():
        again = m(x)
    assert out.shape == (2, 512) and out.dtype == torch.bfloat16
    assert torch.isfinite(out).all() and torch.equal(out, again)
    d, q, kv, f = cfg.dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.ffn_dim
    per_token_layer = 2 * (d * q + 2 * d * kv + q * d + 3 * d * f)        # wq, wk, wv, wo, w1, w3, w2
    head = 2 * d * cfg.vocab_size                                           # the last position only, per sequence
    want = x.numel() * cfg.n_layers * per_token_layer + x.shape[0] * head   # 47,448,064
    matmul = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
    assert matmul == want


def test_bf16_close_to_f64():
    m = fill_random(build(ModelConfig.from_name("tiny-llama"), "cpu"))
    m64 = build(ModelConfig.from_name("tiny-llama"), "cpu")
    m64.load_state_dict(m.state_dict())
    m64.rope_cos.copy_(m.rope_cos)
    m64.rope_sin.copy_(m.rope_sin)
    m64 = m64.double()
    x = ids()
    with torch.inference_mode():
        out, ref = m(x).double(), m64(x)
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("kind", ["llama", "opt", "moe"])
def test_deep_bf16_forward_finite(kind):
    if kind == "llama":
        cfg = tiny(n_layers=80, dim=64, n_heads=4, n_kv_heads=2, ffn_dim=176)
    elif kind == "opt":
        cfg = dataclasses.replace(ModelConfig.from_name("opt-13b"), dim=64, n_heads=4, n_kv_heads=4, ffn_dim=256,
                                  vocab_size=512, n_layers=80, dtype="bf16", learned_pos=64)
    else:
        cfg = tiny(n_layers=80, dim=64, ffn_dim=64, n_experts=4, top_k=2)
    m = fill_random(build(cfg, "cpu"))
    with torch.inference_mode():
        out = m(ids(seq=8))
    assert torch.isfinite(out).all() and out.float().std() > 0


def _one_sequence_steps(m, cfg, x, prompt: int, page_tokens: int = 4):
    """Logits of a prefill of ``prompt`` tokens, then one decode step per further token, through the engine's paged
    attention with a small pool (one sequence, blocks 1, 2, ... in order)."""
    from memintent.kv import attention
    from memintent.kv.attention import DecodeChunk, PrefillChunk, StepMeta
    from memintent.kv.layout import PageLayout, PoolViews

    layout = PageLayout(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, page_tokens, cfg.torch_dtype, False)
    views = PoolViews(torch.zeros(16 * layout.page_bytes, dtype=torch.uint8), layout, 16)
    table = torch.arange(1, 16)
    outs = []
    for start, n in [(0, prompt)] + [(p, 1) for p in range(prompt, x.shape[1])]:
        pos = torch.arange(start, start + n)
        meta = StepMeta(write_pages=table[pos // page_tokens], write_offsets=pos % page_tokens)
        ctx = start + n
        nb = -(-ctx // page_tokens)
        if n == 1:
            meta.decode.append(DecodeChunk(rows=torch.tensor([0]), tables=table[None, :nb],
                                           mask=(torch.arange(nb * page_tokens) < ctx)[None, None, None],
                                           positions=torch.tensor([ctx - 1])))
        else:
            meta.prefill.append(PrefillChunk(start=0, length=n, context=ctx, table=table[:nb],
                                             mask=torch.arange(nb * page_tokens)[None, :] <= pos[:, None]))
        with attention.step(views, meta, cfg.torch_dtype):
            outs.append(m(x[:, start:start + n], pos, torch.tensor([n - 1]))[0])     # (vocab,)
    return outs


@pytest.mark.parametrize("kind", ["llama", "opt", "moe"])
def test_paged_steps_match_full_forward(kind):
    # The engine's path (a prompt step, then decode steps over the pool) against the dense forward of each prefix.
    if kind == "opt":
        cfg = dataclasses.replace(ModelConfig.from_name("opt-13b"), dim=64, n_heads=4, n_kv_heads=4, ffn_dim=128,
                                  vocab_size=512, n_layers=2, dtype="f32", learned_pos=64)
    else:
        cfg = tiny(dtype="f32", n_experts=4 if kind == "moe" else 0)
    m = fill_random(build(cfg, "cpu"))
    x = ids(seq=12)[:1]
    with torch.inference_mode():
        outs = _one_sequence_steps(m, cfg, x, prompt=7)   # 7: a partly filled block, whose padding is masked
        for i, p in enumerate(range(7, 13)):
            ref = m(x[:, :p])[0]
            assert torch.allclose(outs[i], ref, atol=1e-4, rtol=1e-4), p
    assert not torch.allclose(outs[0], outs[1])


def test_pool_stays_out_of_state():
    # The engine's pool is not the module's: state dict and fingerprint are the weights alone
    m = build(tiny(), "meta")
    assert all("kv" not in n for n in m.state_dict())
    assert not any(isinstance(b, torch.Tensor) and b.numel() > 1 << 20 for b in m.buffers())


def _export(m, args):
    return torch.export.export(m, args, strict=False)


@pytest.mark.parametrize("kind", ["llama", "moe"])
def test_export_on_meta(kind):
    cfg = tiny() if kind == "llama" else tiny(n_experts=8, top_k=2, ffn_dim=128, n_layers=2)
    m = build(cfg, "meta")
    ep = _export(m, (torch.zeros(2, 16, dtype=torch.long, device="meta"),))
    out = [n for n in ep.graph.nodes if n.op == "output"][0].args[0][0]
    assert tuple(out.meta["val"].shape) == (2, cfg.vocab_size)


def test_export_engine_step():
    # What the generation planner traces: a packed step, one paged attention op per layer, logits of S rows.
    from memintent.kv import attention

    cfg = tiny()
    m = build(cfg, "meta")
    args = (torch.zeros(1, 12, dtype=torch.long, device="meta"), torch.zeros(12, dtype=torch.long, device="meta"),
            torch.zeros(3, dtype=torch.long, device="meta"))
    with attention.tracing():
        ep = _export(m, args)
    targets = [str(n.target) for n in ep.graph.nodes]
    assert sum("paged_attention" in t for t in targets) == cfg.n_layers
    out = [n for n in ep.graph.nodes if n.op == "output"][0].args[0][0]
    assert tuple(out.meta["val"].shape) == (3, cfg.vocab_size)


@pytest.mark.parametrize("bias", [True, False])
def test_relu_mlp_equals_float64_composition(bias):
    # OPT's MLP takes its bias and ReLU in the first matmul's epilogue when it has a bias: the same function.
    from memintent.models.preset import MLP

    torch.manual_seed(0)
    mlp = MLP(16, 48, bias=bias)
    x = torch.randn(2, 5, 16)                                                     # (B, T, dim)
    with torch.no_grad():
        got = mlp(x)                                                              # (B, T, dim)
        w1, w2 = mlp.fc1.weight.double(), mlp.fc2.weight.double()
        b1 = mlp.fc1.bias.double() if bias else 0.0
        b2 = mlp.fc2.bias.double() if bias else 0.0
        want = torch.relu(x.double() @ w1.T + b1) @ w2.T + b2
    assert got.shape == (2, 5, 16)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)


def test_traced_fused_relu_matmul_counts_its_flops_and_reads_its_weight():
    # The IR of a fused bias + ReLU matmul (opt-13b: dim 5120, ffn 20480): 2 x tokens x in x out FLOPs, and fc1's
    # weight (read through its transpose) among the step's uses, so its lifetime and matmul rate follow it.
    from memintent.compiler.compile import trace_ref
    from memintent.ir.model import RunShape

    prog = trace_ref("opt-13b", RunShape(batch=1, seq=8))
    fused = [s for s in prog.steps if "_addmm_activation" in s.op]
    assert len(fused) == 40                                                       # one per layer
    s = fused[0]
    assert s.flops == 2 * 8 * 5120 * 20480
    assert "layers.0.feed_forward.fc1.weight" in s.uses
    assert not any("relu" in t.op for t in prog.steps)
