"""Tiny random Hugging Face folders for the tests: one config per architecture, written with save_pretrained, and
a word-level tokenizer built offline with the ``tokenizers`` library (nothing is downloaded).

Every config is small enough that a CPU step takes milliseconds (hidden 64, 4 layers, vocabulary 128) and has
layers large next to the KV pool and the step's activations, so a budget of most of the weights' bytes makes a
plan that keeps some blocks resident and streams the others. Sliding windows (8 tokens) are shorter than the
prompts, so a layer that ignored its window would generate other tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

HIDDEN, FFN, LAYERS, HEADS, VOCAB, POSITIONS, WINDOW = 64, 128, 4, 4, 128, 64, 8


def _common(**extra) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                vocab_size=VOCAB, max_position_embeddings=POSITIONS, **extra)


def _configs() -> dict[str, Callable]:
    import transformers as T

    return {
        "llama": lambda: T.LlamaConfig(**_common(num_key_value_heads=2)),
        # sliding window on every layer (the model's mask and the window argument both come from config)
        "mistral": lambda: T.MistralConfig(**_common(num_key_value_heads=2, sliding_window=WINDOW)),
        # layers from max_window_layers on slide: 0 full, 1..3 sliding
        "qwen2": lambda: T.Qwen2Config(**_common(num_key_value_heads=2, use_sliding_window=True,
                                                 sliding_window=WINDOW, max_window_layers=1)),
        # MoE with a shared expert; layer 0 slides (the window lives on the attention module, not in the call)
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**_common(
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            shared_expert_intermediate_size=64, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
        # per-expert checkpoint matrices that transformers fuses while loading
        "mixtral": lambda: T.MixtralConfig(**_common(num_key_value_heads=2, num_local_experts=4,
                                                     num_experts_per_tok=2)),
        # tied embeddings, multi-query attention, head size not hidden / heads
        "gemma": lambda: T.GemmaConfig(**_common(num_key_value_heads=1, head_dim=32)),
        # no SDPA in transformers (eager), logit soft-capping, sliding and full layers alternating
        "gemma2": lambda: T.Gemma2Config(**_common(num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                                                   query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                                                   final_logit_softcapping=3.0)),
        # fused qkv and gate_up projections; its default pad_token_id (32000) must be inside the vocabulary
        "phi3": lambda: T.Phi3Config(**_common(num_key_value_heads=2, pad_token_id=0, sliding_window=WINDOW)),
        # partial rotary embedding, parallel residual
        "gpt_neox": lambda: T.GPTNeoXConfig(**_common(rotary_pct=0.5)),
        # learned positions (offset by 2), queries scaled before the attention call (scaling 1.0)
        "opt": lambda: T.OPTConfig(hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                                   num_attention_heads=HEADS, vocab_size=VOCAB, max_position_embeddings=POSITIONS,
                                   word_embed_proj_dim=HIDDEN),
        # Conv1D projections, learned positions, tied head
        "gpt2": lambda: T.GPT2Config(n_embd=HIDDEN, n_inner=FFN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB,
                                     n_positions=POSITIONS),
        # biases everywhere, sliding window
        "starcoder2": lambda: T.Starcoder2Config(**_common(num_key_value_heads=2, sliding_window=WINDOW)),
        # partial rotary, no _supports_attention_backend flag (it still calls the interface)
        "stablelm": lambda: T.StableLmConfig(**_common(num_key_value_heads=2)),
        # computes attention itself: generation is refused
        "falcon": lambda: T.FalconConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         vocab_size=VOCAB),
        # builds with any attn_implementation and never calls it: generation is refused
        "bloom": lambda: T.BloomConfig(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, vocab_size=VOCAB),
        # attention sinks (a learned logit per head): generation is refused
        "gpt_oss": lambda: T.GptOssConfig(**_common(num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                                    num_experts_per_tok=2, sliding_window=WINDOW)),
        # a Mamba layer, then an attention layer: generation is refused
        "jamba": lambda: T.JambaConfig(**{**_common(num_key_value_heads=2), "num_hidden_layers": 2}, num_experts=2,
                                       attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                       use_mamba_kernels=False, mamba_d_state=8),
    }


def config(name: str, **overrides):
    cfg = _configs()[name]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save(folder: Path, cfg, *, dtype: torch.dtype = torch.float32, seed: int = 0, **save_kw) -> int:
    """A random model of ``cfg`` saved to ``folder`` in ``dtype``; returns its weights' bytes (tied ones once)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    model.save_pretrained(folder, **save_kw)
    return sum(p.numel() * p.element_size() for p in model.parameters())


WORDS = ["the", "a", "cat", "dog", "bird", "sat", "ran", "flew", "on", "under", "mat", "tree", "far", "away", "red",
         "blue", "big", "small", "is", "was", "and", "or", "to", "from", "hello", "world", "what", "where", "why",
         "how"]
SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def save_tokenizer(folder: Path, *, chat: bool) -> int:
    """A word-level tokenizer (whitespace split, a BOS added to every text) saved as tokenizer.json and
    tokenizer_config.json, with a chat template when ``chat``; returns its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS) + WORDS + ["user", "assistant", ":"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok.decoder = decoders.WordPiece(prefix="##")     # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return len(words)
