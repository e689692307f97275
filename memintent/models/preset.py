"""A compact decoder-only transformer (gpt-fast style) with the presets the compiler and the benchmarks use.

The model is written for ``torch.export``: static shapes everywhere (the MoE computes every expert densely), no
data-dependent control flow. In an engine step its attention reads and writes the serving engine's KV pool
(``memintent.kv.attention``), which lives outside the module's state, so state dicts and the fingerprint hold
weights only. Weight values come from ``init_weight``: a deterministic
function of the weight's name and a seed, so any process can regenerate any single weight without building the
model.
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from memintent.errors import MemintentError
from memintent.ir.dtypes import MODEL_DTYPES, torch_dtype
from memintent.kv import attention as paged
from memintent.models import norm_kernel
from memintent.models.source import ModelSource, _check_target, _layer_count, _named_tensors


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    ffn_dim: int = 352
    norm: str = "rms"             # "rms" (RMSNorm, weight only) | "layer" (LayerNorm with bias)
    act: str = "silu_glu"         # "silu_glu" (SwiGLU: w2(silu(w1 x) * w3 x)) | "relu" (fc2(relu(fc1 x)))
    qkv_bias: bool = False        # bias on wq, wk, wv (Qwen2)
    linear_bias: bool = False     # bias on every linear of the blocks (OPT)
    learned_pos: int = 0          # learned absolute positions (OPT); 0: RoPE
    rope_theta: float = 10000.0
    n_experts: int = 0            # 0: dense feed-forward; else a MoE of SwiGLU experts
    top_k: int = 2
    tie_embeddings: bool = False  # output.weight is embed.weight
    norm_eps: float = 1e-5
    dtype: str = "bf16"           # "bf16" | "f16" | "f32"
    max_seq_len: int = 4096       # rows of the RoPE tables
    pos_offset: int = 0           # learned positions start at this row (OPT: 2)
    part: tuple[int, int] | None = None    # a pipeline part: decoder layers [first, last) of the model only

    def __post_init__(self):
        if self.norm not in ("rms", "layer"):
            raise MemintentError(f"norm {self.norm!r} is not one of 'rms', 'layer'")
        if self.act not in ("silu_glu", "relu"):
            raise MemintentError(f"act {self.act!r} is not one of 'silu_glu', 'relu'")
        if self.dtype not in MODEL_DTYPES:
            raise MemintentError(f"dtype {self.dtype!r} is not one of {sorted(MODEL_DTYPES)}")
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise MemintentError(f"dim {self.dim}, n_heads {self.n_heads}, n_kv_heads {self.n_kv_heads}: dim must "
                                 "divide by n_heads and n_heads by n_kv_heads")
        if self.n_experts and (self.act != "silu_glu" or not 0 < self.top_k <= self.n_experts):
            raise MemintentError("a MoE needs act='silu_glu' and 0 < top_k <= n_experts")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def max_positions(self) -> int:
        """Longest sequence the position encoding covers."""
        return self.learned_pos if self.learned_pos else self.max_seq_len

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        try:
            return PRESETS[name]  # frozen: safe to share
        except KeyError:
            raise MemintentError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}") from None

    def num_params(self) -> int:
        """Parameters, counted from the config (a tied head counts once; RoPE tables are buffers, not counted)."""
        d, hd, f = self.dim, self.head_dim, self.ffn_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        qkv_b = self.qkv_bias or self.linear_bias
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if qkv_b else 0) + (d if self.linear_bias else 0)
        if self.act == "silu_glu":
            mlp = 3 * d * f + ((2 * f + d) if self.linear_bias else 0)
        else:
            mlp = 2 * d * f + ((f + d) if self.linear_bias else 0)
        if self.n_experts:
            mlp = self.n_experts * mlp + d * self.n_experts  # experts + router
        norm = 2 * d if self.norm == "layer" else d
        layer = attn + mlp + 2 * norm
        emb = self.vocab_size * d
        pos = (self.learned_pos + self.pos_offset) * d if self.learned_pos else 0
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return emb + pos + self.n_layers * layer + norm + head


_LLAMA3 = dict(norm="rms", act="silu_glu", rope_theta=500000.0, vocab_size=128256, max_seq_len=8192)
_OPT = dict(norm="layer", act="relu", linear_bias=True, learned_pos=2048, pos_offset=2, tie_embeddings=True,
            vocab_size=50272, dtype="f16")

# Published shapes. Mistral 7B v0.1 uses rope_theta 1e4 (later versions 1e6); w1 is the benchmark workload:
# Llama layers of 70B size (1.711 GB each in bf16), 8 of them, a 32000-token vocabulary: 7.37B parameters.
PRESETS: dict[str, ModelConfig] = {
    "tiny-llama": ModelConfig(vocab_size=512, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=352,
                              max_seq_len=1024),
    "llama-3-8b": ModelConfig(**_LLAMA3, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336),
    "llama-3-70b": ModelConfig(**_LLAMA3, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "mistral-7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                              rope_theta=10000.0, max_seq_len=8192),
    "qwen2-7b": ModelConfig(vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, ffn_dim=18944,
                            qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6, max_seq_len=8192),
    "opt-13b": ModelConfig(**_OPT, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=20480),
    "opt-30b": ModelConfig(**_OPT, dim=7168, n_layers=48, n_heads=56, n_kv_heads=56, ffn_dim=28672),
    "mixtral-8x7b": ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                                n_experts=8, top_k=2, rope_theta=1000000.0, max_seq_len=8192),
    "w1": ModelConfig(vocab_size=32000, dim=8192, n_layers=8, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                      rope_theta=500000.0, max_seq_len=8192),
}


def rope_tables(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, frequency), (max_seq_len, head_dim // 2) in the model dtype."""
    half = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, half, device=device, dtype=torch.float64) / half))
    pos = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float64)
    ang = torch.outer(pos, inv_freq)  # (max_seq_len, half)
    return ang.cos().to(cfg.torch_dtype), ang.sin().to(cfg.torch_dtype)


def init_weight(name: str, shape, dtype: torch.dtype, device: torch.device | str = "cpu",
                seed: int = 0) -> torch.Tensor:
    """The value of weight ``name``: a function of (name, seed, device type) only.

    Matrices and embeddings ~ N(0, 0.02); norm weights 1; LayerNorm biases 0; other biases ~ N(0, 0.01). Drawn in
    float32 from a generator on ``device`` (CPU and CUDA generators draw different streams) and cast.
    """
    shape = tuple(shape)
    leaf = name.rsplit(".", 1)[-1]
    owner = name.rsplit(".", 2)[-2] if name.count(".") else ""
    is_norm = owner.endswith("norm")
    if is_norm and leaf == "weight":
        return torch.ones(shape, dtype=dtype, device=device)
    if is_norm and leaf == "bias":
        return torch.zeros(shape, dtype=dtype, device=device)
    std = 0.02 if len(shape) >= 2 else 0.01
    g = torch.Generator(device=device)
    g.manual_seed((zlib.crc32(name.encode()) ^ seed) & 0xFFFFFFFF)
    out = torch.empty(shape, dtype=torch.float32, device=device)
    out.normal_(0.0, std, generator=g)
    return out.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()  # (..., dim) in float32 for the mean of squares
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., dim)
        return y.to(x.dtype) * self.weight


def _norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.dim, cfg.norm_eps) if cfg.norm == "rms" else nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate halves (the Hugging Face Llama layout): x (B, H, S, hd), cos/sin (S, hd/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, H, S, hd/2) each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, H, S, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv_b = cfg.qkv_bias or cfg.linear_bias
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=qkv_b)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_b)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=qkv_b)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.linear_bias)
        self.layer_idx = 0   # set by Transformer: which layer of the KV pool an engine step reads and writes

    def forward(self, x, cos, sin):
        B, S, _ = x.shape  # x: (B, S, dim)
        q = self.wq(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)     # (B, H, S, hd)
        k = self.wk(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, S, hd)
        v = self.wv(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, S, hd)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if paged.active():
            # An engine step: the new tokens' keys and values go to the KV pool, attention reads each sequence's
            # context back through its page table (memintent.kv.attention).
            y = paged.paged_attention(q, k, v, self.layer_idx)                    # (1, H, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, S, hd)
        y = y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim)  # (B, S, H*hd)
        return self.wo(y)  # (B, S, dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_dim, bias=bias)
        self.w2 = nn.Linear(ffn_dim, dim, bias=bias)
        self.w3 = nn.Linear(dim, ffn_dim, bias=bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # (..., dim)


class MLP(nn.Module):
    """ReLU MLP (OPT): fc2(relu(fc1 x))."""

    def __init__(self, dim: int, ffn_dim: int, bias: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, ffn_dim, bias=bias)
        self.fc2 = nn.Linear(ffn_dim, dim, bias=bias)

    def forward(self, x):
        fc1 = self.fc1
        if fc1.bias is None:
            return self.fc2(F.relu(fc1(x)))  # (..., dim)
        # The bias and the ReLU in the matmul's epilogue (cuBLASLt's RELU_BIAS; addmm then relu on the CPU): one
        # pass over the (tokens, ffn_dim) activation instead of a second kernel reading and writing it (3.4 of 236
        # ms of an opt-30b prompt step of 2392 tokens on an H200, H31).
        h = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t())   # (N, ffn_dim)
        return self.fc2(h.view(*x.shape[:-1], h.shape[-1]))  # (..., dim)


class MoE(nn.Module):
    """Top-k routed SwiGLU experts (Mixtral), computed densely.

    Every expert runs on every token and the outputs are combined with a (tokens, n_experts) weight matrix that is
    zero outside each token's top-k. Gathering only the routed tokens would give data-dependent shapes, which
    torch.export with fake tensors cannot trace and a static plan cannot size; the price is n_experts / top_k
    times the routed FLOPs, which the FLOP count the compiler reports shows as is.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg.dim, cfg.ffn_dim, cfg.linear_bias) for _ in range(cfg.n_experts))

    def forward(self, x):
        probs = F.softmax(self.gate(x).float(), dim=-1)     # (B, S, E)
        top_w, top_i = probs.topk(self.top_k, dim=-1)       # (B, S, k) each
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)     # (B, S, k) renormalised over the chosen experts
        route = torch.zeros_like(probs).scatter(-1, top_i, top_w).to(x.dtype)  # (B, S, E): zero off the top-k
        out = torch.zeros_like(x)                           # (B, S, dim)
        for e, expert in enumerate(self.experts):
            out = out + route[..., e:e + 1] * expert(x)     # (B, S, dim)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = _norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = _norm(cfg)
        if cfg.n_experts:
            self.moe = MoE(cfg)
        elif cfg.act == "silu_glu":
            self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, cfg.linear_bias)
        else:
            self.feed_forward = MLP(cfg.dim, cfg.ffn_dim, cfg.linear_bias)

    def forward(self, x, cos, sin):
        ff = self.moe if hasattr(self, "moe") else self.feed_forward
        if paged.kernel_step() and norm_kernel.supported(self.ffn_norm):
            # One pass per norm, the first residual add inside the second (models/norm_kernel.py)
            h, n = norm_kernel.add_norm(self.ffn_norm, x, self.attention(norm_kernel.norm(self.attention_norm, x),
                                                                         cos, sin))   # (B, S, dim) each
            return h + ff(n)  # (B, S, dim)
        h = x + self.attention(self.attention_norm(x), cos, sin)  # (B, S, dim)
        return h + ff(self.ffn_norm(h))  # (B, S, dim)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # Create the weights directly in the model dtype (no float32 copy of a big model on a real device).
        old = torch.get_default_dtype()
        torch.set_default_dtype(cfg.torch_dtype)
        try:
            self._make(cfg)
        finally:
            torch.set_default_dtype(old)
        self.to(cfg.torch_dtype)

    def _make(self, cfg: ModelConfig) -> None:
        lo, hi = cfg.part or (0, cfg.n_layers)
        self.first, self.last = lo == 0, hi == cfg.n_layers
        # A part holds its own layers under their names in the whole model (layers.12 stays layers.12), so its
        # weights, their values and the plan's names are the whole model's.
        if self.first or (self.last and cfg.tie_embeddings):
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embed = (nn.Embedding(cfg.learned_pos + cfg.pos_offset, cfg.dim)
                          if cfg.learned_pos and self.first else None)
        if cfg.part is None:
            self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layers))
        else:
            self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in range(lo, hi)})
        for i, layer in zip(range(lo, hi), self.layers.values() if cfg.part else self.layers):
            layer.attention.layer_idx = i
        if self.last:
            self.norm = _norm(cfg)
            self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
            if cfg.tie_embeddings:
                self.output.weight = self.embed.weight
        if not cfg.learned_pos:
            cos, sin = rope_tables(cfg, device=torch.get_default_device())
            self.register_buffer("rope_cos", cos, persistent=False)  # (max_seq_len, head_dim/2)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor, input_pos: torch.Tensor | None = None,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the last position, (B, vocab). In an engine step (``memintent.engine``): input_ids (1, T) of
        several sequences packed, input_pos (T,) each token's position in its own sequence, and the logits of the
        rows ``logits_index`` (S,) only: (S, vocab). A pipeline part after the first takes the previous part's
        hidden states (B, S, dim) instead of token ids; one before the last returns its hidden states."""
        B, S = input_ids.shape[:2]  # input_ids: (B, S) int64, or (B, S, dim) hidden states
        if input_pos is None:
            input_pos = torch.arange(S, device=input_ids.device)  # (S,)
        x = self.embed(input_ids) if self.first else input_ids  # (B, S, dim)
        if self.pos_embed is not None:
            x = x + self.pos_embed(input_pos + self.config.pos_offset)  # (B, S, dim)
        cos = sin = None
        if not self.config.learned_pos:
            cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # (S, hd/2) each
        for layer in (self.layers.values() if self.config.part else self.layers):
            x = layer(x, cos, sin)  # (B, S, dim)
        if not self.last:
            return x  # (B, S, dim): the next part's input
        if logits_index is not None:
            return self.output(self.norm(x[0, logits_index]))  # (S, vocab): the rows the engine samples
        x = self.norm(x[:, -1])  # (B, dim): only the last position feeds the head
        return self.output(x)  # (B, vocab)


def build(cfg: ModelConfig, device: torch.device | str = "meta") -> Transformer:
    """The model in eval mode; on ``meta`` nothing is allocated."""
    with torch.device(device):
        return Transformer(cfg).eval().requires_grad_(False)


def with_layers(cfg: ModelConfig, n_layers: int) -> ModelConfig:
    return dataclasses.replace(cfg, n_layers=n_layers)


class PresetSource(ModelSource):
    kind = "preset"

    def __init__(self, ref: str, cfg: ModelConfig, seed: int = 0):
        super().__init__(ref, cfg.dtype, cfg.n_layers, "layers", cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size,
                         cfg.n_heads)
        self.config, self.seed = cfg, seed
        self.max_positions = cfg.max_positions
        # Where init_weight draws: CUDA when there is one (fast; note CPU and CUDA draw different values).
        self.init_device = "cuda" if torch.cuda.is_available() else "cpu"

    def build(self, device="meta", num_layers: int | None = None, attention: str | None = None) -> nn.Module:
        cfg = self.config if num_layers is None else with_layers(self.config, num_layers)
        return build(cfg, device).requires_grad_(False)

    def engine_build(self, device="meta", num_layers: int | None = None) -> nn.Module:
        return self.build(device, num_layers)      # the presets route attention to the engine by themselves

    def fill_weights(self, named: dict[str, torch.Tensor]) -> None:
        cfg = with_layers(self.config, max(self.config.n_layers, _layer_count(named)))
        ref = _named_tensors(build(cfg, "meta"))
        rope = None
        with torch.no_grad():
            for name, t in named.items():
                if name not in ref:
                    raise MemintentError(f"{name} is not a weight of preset {self.ref}")
                _check_target(name, t, ref[name])
                if name in ("rope_cos", "rope_sin"):
                    rope = rope or rope_tables(cfg)
                    t.copy_(rope[0] if name == "rope_cos" else rope[1])
                    continue
                if cfg.tie_embeddings and name == "output.weight":
                    name = "embed.weight"  # the same tensor: same values
                t.copy_(init_weight(name, t.shape, t.dtype, self.init_device, self.seed))


__all__ = ["ModelConfig", "PRESETS", "PresetSource", "Transformer", "DecoderLayer", "Attention", "FeedForward", "MLP", "MoE",
           "RMSNorm", "init_weight", "rope_tables", "build", "with_layers"]
