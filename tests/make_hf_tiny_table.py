"""Writes tests/hf_tiny_table.json: a tiny random config for every decoder-only causal LM that the installed
transformers builds, and what memintent does with it (generates as transformers does, or refuses in one line).

Run by hand after a transformers upgrade (minutes on a CPU; tests read the table and never regenerate it):

    OMP_NUM_THREADS=1 python tests/make_hf_tiny_table.py [MODEL_TYPE ...]

Each config is the config class's defaults shrunk generically (hidden 64, 4 layers, 4 heads, 2 KV heads, vocabulary
128, windows of 8 tokens, 4 experts of which 2 per token); ``OVERRIDES`` holds what an architecture needs beyond that.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path

TABLE = Path(__file__).with_name("hf_tiny_table.json")

# canonical name -> tiny value; applied to every field the config has (under its own name or attribute_map's)
SHRINK = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 64,
    "sliding_window": 8, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "num_shared_experts": 1, "moe_topk": 2, "top_k": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "ffn_dim": 128, "n_inner": 128, "word_embed_proj_dim": 64, "max_window_layers": 1, "expert_ffn_hidden_size": 64,
    "global_attn_every_n_layers": 2, "num_mtp_layers": 0, "num_nextn_predict_layers": 0,
    "dff": 128, "rotary_dim": 8, "n_ctx": 64,
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")
OVERRIDES: dict[str, dict] = {
    # its per-layer attention kinds must list every layer: global and local (window 8) alternating
    "gpt_neo": dict(attention_types=[[["global", "local"], 2]], window_size=8),
    # attention and experts live in sub-configs the generic shrink does not reach
    "dbrx": dict(attn_config=dict(kv_n_heads=2, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=128, moe_num_experts=4, moe_top_k=2)),
    "zaya": dict(num_experts_per_tok=1),                       # its only supported routing
    "nemotron": dict(num_key_value_heads=2, head_dim=16),      # defaults of None that its layers divide by
    "dots1": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1),
    # hybrids whose Mamba sizes and per-layer kind lists the generic shrink leaves at the full model's
    "falcon_h1": dict(mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_chunk_size=16,
                      head_dim=16),
    "mamba2": dict(num_heads=4, head_dim=32, expand=2, state_size=16, n_groups=1, chunk_size=16),
    "zamba2": dict(layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"],
                   hybrid_layer_ids=[1, 3], n_mamba_heads=2, mamba_headdim=64, mamba_d_state=16,
                   attention_head_dim=16, num_key_value_heads=4),
    # latent attention: the rotary part of a head is qk_rope_head_dim (8), which head_dim names in these configs
    **{name: dict(head_dim=8) for name in ("deepseek_v3", "deepseek_v32", "longcat_flash", "youtu", "axk1", "axk2",
                                           "glm_moe_dsa")},
    "deepseek_v2": dict(head_dim=8, num_experts_per_tok=2),
    # a hybrid: its layer list must have num_hidden_layers entries
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
    # rotary parameters per layer type, none by default
    "cohere_compass_text": dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    # linear attention, an indexer and n-gram embeddings sized for the full model
    "qwen4_exp_text": dict(linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                           linear_num_value_heads=4, hc_lowrank=16, ngram_vocab_size_base=1024, split_ngram_parts=4,
                           heads_per_ngram=2, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=16,
                           indexer_budget=16, indexer_compress_ratio=4),
    # per-layer inputs and global layers of their own head size (as the real models': 512 against 256)
    **{name: dict(global_head_dim=32, hidden_size_per_layer_input=16, vocab_size_per_layer_input=128,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
       for name in ("gemma4_text", "gemma4_unified_text")},
    # the last layers reuse earlier layers' keys and values, as the real models' (15 of 35)
    "gemma3n_text": dict(layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                         num_kv_shared_layers=2, activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0],
                         vocab_size_per_layer_input=128, hidden_size_per_layer_input=16, laurel_rank=8,
                         altup_num_inputs=2),
    # latent attention in both kinds of layer; the sliding layers' sizes come as swa_* arguments
    "dots3_note_text": dict(num_key_value_heads=4, swa_num_attention_heads=4, swa_num_key_value_heads=4,
                            swa_q_lora_rank=32, swa_kv_lora_rank=16, swa_head_dim=16, swa_qk_nope_head_dim=8,
                            swa_v_head_dim=16, index_head_dim=16, index_n_heads=2, index_topk=16, head_dim=16,
                            shared_experts_intermediate_size=64),
    # a head padded past the vocabulary (120 of 128, as 200058 of 201024) and sliding layers' own sizes
    **{name: dict(unpadded_vocab_size=120, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                  rel_extent=16, d_rel=4, log_scaling_n_floor=64, n_layers_per_attn_res_block=2)
       for name in ("inkling2_text", "inkling2_loop_text")},
    # one attention module shared by its hybrid layers: two of them, as the real model's
    "zamba": dict(layers_block_type=["linear_attention", "hybrid", "linear_attention", "hybrid"],
                  use_mamba_kernels=False, attention_head_dim=16, num_key_value_heads=4),
    # four models in one (patcher, local encoder and decoder, global transformer) and its hashed byte n-grams
    "blt": dict(encoder_hash_byte_group_vocab=256, encoder_hash_byte_group_size=[3, 4], local_attention_window_len=8,
                patcher_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                    max_position_embeddings=64),
                encoder_config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                                    max_position_embeddings=64),
                decoder_config=dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, intermediate_size=128,
                                    max_position_embeddings=64),
                global_config=dict(hidden_size=128, num_attention_heads=4, num_hidden_layers=2,
                                   intermediate_size=128, max_position_embeddings=64)),
}


def _fields(cfg) -> set[str]:
    names = {f.name for f in dataclasses.fields(cfg)} if dataclasses.is_dataclass(cfg) else set()
    return names | set(cfg.to_dict())


def _present(cfg, name: str) -> bool:
    """Whether the config sets ``name``; a per-layer attribute (Gemma 4's head_dim), which configs refuse to read
    globally, counts as set: its global value is the layers' default."""
    try:
        return getattr(cfg, name, None) is not None
    except Exception:   # transformers' AmbiguousGlobalPerLayerAttributeError
        return True


def tiny_kwargs(model_type: str) -> dict:
    """The config kwargs of ``model_type``'s tiny config (JSON-able)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    have, amap = _fields(default), getattr(cls, "attribute_map", {}) or {}
    kw = {}
    for name, value in SHRINK.items():
        real = amap.get(name, name)
        if real in have and (_present(default, real) or name in ("head_dim",)):
            kw[real] = value
    for name in TOKEN_IDS:   # ids past the tiny vocabulary: the first ids instead
        v = getattr(default, name, None)
        if isinstance(v, int) and v >= SHRINK["vocab_size"]:
            kw[name] = 0
        elif isinstance(v, list):
            kw[name] = [x if x < SHRINK["vocab_size"] else 0 for x in v]
    kw.update(OVERRIDES.get(model_type, {}))
    return kw


# Model types outside the matrix, with why: not a decoder-only causal LM of text.
OUT_OF_SCOPE = {
    "bert-generation": "the decoder of an encoder-decoder pair (cross-attention)",
    "trocr": "the decoder of an image-to-text encoder-decoder (cross-attention)",
    "xlnet": "a permutation language model, not a causal decoder",
    "moshi": "a speech model (audio encoder, depth decoder)",
    "moss_transcribe_diarize": "a speech-to-text model",
    "phi4_multimodal": "a multimodal model (vision and audio encoders)",
    "gemma4_assistant": "a draft model that predicts from another model's hidden states",
    "gemma4_unified_assistant": "a draft model that predicts from another model's hidden states",
}


def out_of_scope(model_type: str) -> str | None:
    """Why ``model_type`` is not in the matrix, or None when it is a decoder-only causal LM of text."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto as auto

    if model_type in OUT_OF_SCOPE:
        return OUT_OF_SCOPE[model_type]
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "an encoder (masked LM) that can run as a decoder"
    if model_type in auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return "a multimodal model (its text model is in the matrix where transformers has one)"
    try:
        default = CONFIG_MAPPING[model_type]()
    except Exception as e:   # a config without defaults (a draft model of another): nothing to shrink
        return f"its config has no usable defaults ({type(e).__name__})"
    if default.is_encoder_decoder:
        return "an encoder-decoder model"
    return None


def tiny_config(model_type: str, kw: dict | None = None):
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](**(tiny_kwargs(model_type) if kw is None else kw))


def classify(model_type: str, base: Path) -> dict:
    """What memintent does with ``model_type``'s tiny folder: {"outcome": "generates"} when its streamed plan
    generates transformers' tokens, {"outcome": "refused", "error": line} when planning refuses it, anything else
    {"outcome": "fails", "error": ...} (a bug to fix or a config to override)."""
    import hf_tiny
    import test_hf_generate as th

    from memintent.engine import Engine
    from memintent.errors import MemintentError

    folder = base / model_type
    kw = tiny_kwargs(model_type)
    row = {"config": kw}
    try:
        weight_bytes = hf_tiny.save(folder, tiny_config(model_type, kw))
    except Exception as e:
        return {**row, "outcome": "unbuildable", "error": f"{type(e).__name__}: {str(e)[:300]}"}
    try:
        plan = th.tiny_plan(folder, weight_bytes)
    except MemintentError as e:
        if str(e).startswith("no concurrency fits the budget"):   # the shrink left a part full-size: not a refusal
            return {**row, "outcome": "unbuildable", "error": f"not tiny: {str(e)[:300]}"}
        return {**row, "outcome": "refused", "error": str(e).replace(str(folder), "{folder}")}
    except Exception as e:
        return {**row, "outcome": "fails", "error": f"plan: {type(e).__name__}: {str(e)[:300]}"}
    try:
        with Engine(plan, "cpu") as eng:
            outs = {o.id: o.token_ids for o in eng.generate(th.requests())}
        got = [outs[str(i)] for i in range(len(th.PROMPTS))]
        want = th.hf_generate(folder, th.PROMPTS, stop=True)
    except Exception as e:
        return {**row, "outcome": "fails", "error": f"generate: {type(e).__name__}: {str(e)[:300]}"}
    if got != want:
        return {**row, "outcome": "fails", "error": f"tokens differ: {got} != {want}"}
    return {**row, "outcome": "generates"}


def main(argv: list[str]) -> None:
    import signal
    import tempfile

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    table = json.loads(TABLE.read_text()) if TABLE.is_file() else {}
    table["transformers"] = transformers.__version__
    names = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if argv and argv[0] == "--from":   # resume after a crash
        names = [n for n in names if n >= argv[1]]
    elif argv:
        names = argv

    def timeout(*_):
        raise TimeoutError("over 60 s")

    signal.signal(signal.SIGALRM, timeout)
    with tempfile.TemporaryDirectory() as base:
        for name in names:
            t0 = time.perf_counter()
            why = out_of_scope(name)
            signal.alarm(60)
            try:
                row = {"outcome": "out of scope", "why": why} if why else classify(name, Path(base))
            except Exception as e:   # the shrunk config itself fails (a timeout included): needs an override
                row = {"outcome": "unbuildable", "error": f"{type(e).__name__}: {str(e)[:300]}"}
            signal.alarm(0)
            table.setdefault("models", {})[name] = row
            print(f"{name}: {row['outcome']} {time.perf_counter() - t0:.1f}s {row.get('error', '')[:200]}",
                  flush=True)
            TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    write_readme(table)



README = Path(__file__).parents[1] / "README.md"
MARK = "<!-- refused architectures -->"


def _reason(error: str) -> str:
    """A refusal's line as the README gives it: without the folder, the architecture's name and the advice."""
    why = re.sub(r"^hf:\{folder\}: (the \w+ architecture's )?", "", error)
    why = re.sub(r"(: \[.*\]|! .*)$", "", why)    # the weights' or shapes' list: the folder's details
    return re.sub(r" \((plain forwards work|a model must be|the layers are not identical)[^)]*\)$", "", why)


def write_readme(table: dict) -> None:
    """The README's list of refused architectures (between two MARK lines), one line each, from the table."""
    rows = sorted((n, r) for n, r in table["models"].items() if r["outcome"] == "refused")
    lines = [f"- `{n}`: {_reason(r['error'])}" for n, r in rows]
    head, _, rest = README.read_text().partition(MARK + "\n")
    _, _, tail = rest.partition(MARK + "\n")
    README.write_text(head + MARK + "\n" + "\n".join(lines) + "\n" + MARK + "\n" + tail)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(sys.argv[1:])
