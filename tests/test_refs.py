import importlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from memintent.models import preset as models
from memintent.models.refs import resolve
from memintent.errors import MemintentError

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "examples" / "toy_mlp.py"


def _empty_like_model(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Fresh CPU tensors for every weight of a (meta) model, shared tensors once under their first name."""
    seen, out = set(), {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        out[name] = torch.full(t.shape, 7, dtype=t.dtype) if t.is_floating_point() else torch.zeros(t.shape, dtype=t.dtype)
    return out


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny Hugging Face folders written by transformers; every hf: test needs it, so only they skip without
    transformers (the preset and py: tests run anyway)."""
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, LlamaConfig, MixtralConfig, OPTConfig

    base = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    llama = AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)).to(torch.bfloat16)
    llama.save_pretrained(base / "llama", safe_serialization=True)
    opt = AutoModelForCausalLM.from_config(OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
        max_position_embeddings=128, word_embed_proj_dim=64))
    opt.save_pretrained(base / "opt", safe_serialization=True)
    llama.save_pretrained(base / "sharded", safe_serialization=True, max_shard_size="40KB")
    mixtral = AutoModelForCausalLM.from_config(MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, num_local_experts=4, num_experts_per_tok=2))
    mixtral.save_pretrained(base / "mixtral", safe_serialization=True)
    return base


def _copy(hf_dirs, name, tmp_path) -> Path:
    dst = tmp_path / name
    shutil.copytree(hf_dirs / name, dst)
    return dst


# -- presets ------------------------------------------------------------------------------------------------------

def test_preset_build_fill_forward():
    src = resolve("tiny-llama")
    assert (src.kind, src.dtype, src.num_layers, src.layers_path) == ("preset", "bf16", 4, "layers")
    assert (src.n_kv_heads, src.head_dim, src.vocab_size) == (2, 32, 512)
    assert src.forward_kwargs() == {}
    m = src.build()
    assert not m.training and next(m.parameters()).device.type == "meta"
    named = _empty_like_model(m)
    assert "output.weight" in named and "rope_cos" in named
    src.init_device = "cpu"
    src.fill_weights(named)
    # every weight is init_weight's value for its name (a tied head: the embedding's), the RoPE tables rope_tables'
    for name, t in named.items():
        if name.startswith("rope_"):
            continue
        want = models.init_weight("embed.weight" if name == "output.weight" and src.config.tie_embeddings else name,
                                  t.shape, t.dtype, "cpu", 0)
        assert torch.equal(t, want), name
    cos, sin = models.rope_tables(src.config)
    assert torch.equal(named["rope_cos"], cos) and torch.equal(named["rope_sin"], sin)
    real = src.build("cpu")
    real.load_state_dict({k: v for k, v in named.items() if not k.startswith("rope")}, strict=False)
    with torch.inference_mode():
        out = src.logits(real(*src.example_inputs(2, 16, "cpu"), **src.forward_kwargs()))
    assert out.shape == (2, 512) and torch.isfinite(out).all()
    assert src.build(num_layers=1).layers.__len__() == 1
    assert src.model_ref().kind == "preset"


def test_preset_tied_and_dtype_override():
    src = resolve("opt-13b", dtype="bf16")
    assert src.dtype == "bf16" and src.layers_path == "layers" and src.build().embed.weight.dtype == torch.bfloat16
    small = resolve("tiny-llama", dtype="float32")
    assert small.dtype == "f32"
    with pytest.raises(MemintentError, match="dtype 'int3'"):
        resolve("tiny-llama", dtype="int3")


def test_preset_build_70b_allocates_nothing():
    # What makes building a 70B preset cheap: every weight is on meta (no storage), whatever the machine's load.
    src = resolve("llama-3-70b")
    m = src.build()
    tensors = list(m.parameters()) + list(m.buffers())
    assert tensors and all(t.is_meta for t in tensors)
    assert len(m.layers) == 80 and sum(p.numel() for p in m.parameters()) == models.ModelConfig.from_name(
        "llama-3-70b").num_params()


def test_preset_fill_rejects_bad_targets():
    src = resolve("tiny-llama")
    with pytest.raises(MemintentError, match="layers.0.nope.weight is not a weight"):
        src.fill_weights({"layers.0.nope.weight": torch.empty(2)})
    with pytest.raises(MemintentError, match="norm.weight has shape .3,.*expected .128,."):
        src.fill_weights({"norm.weight": torch.empty(3, dtype=torch.bfloat16)})


def test_unknown_preset_message():
    with pytest.raises(MemintentError, match="unknown model 'llama-9'.*tiny-llama.*hf:PATH.*py:MODULE:FUNCTION"):
        resolve("llama-9")


# -- hf: ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "opt", "sharded"])
def test_hf_round_trip(hf_dirs, name):
    src = resolve(f"hf:{hf_dirs / name}")
    assert src.kind == "hf" and src.num_layers == 2
    assert src.layers_path == ("model.decoder.layers" if name == "opt" else "model.layers")
    assert src.dtype == ("f32" if name == "opt" else "bf16")
    assert src.vocab_size == 256 and src.head_dim == 16 and src.n_kv_heads == (4 if name == "opt" else 2)
    if name == "sharded":
        assert (hf_dirs / name / "model.safetensors.index.json").is_file()
    m = src.build()
    named = _empty_like_model(m)
    src.fill_weights(named)
    saved = {}
    for f in sorted((hf_dirs / name).glob("*.safetensors")):
        saved.update(load_file(f))
    for k, v in saved.items():
        assert torch.equal(named[k], v), k
    extra = set(named) - set(saved)
    if name == "opt":
        assert m.lm_head.weight is m.model.decoder.embed_tokens.weight and "lm_head.weight" not in saved
        assert extra == set()
    else:
        assert extra == {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
        # computed buffers come from the model's own init: RoPE frequencies for head size 16 and Llama's default
        # theta 10000 (the fixture sets none)
        inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
        assert torch.allclose(named["model.rotary_emb.inv_freq"], inv)
        assert torch.allclose(named["model.rotary_emb.original_inv_freq"], inv)


def test_hf_forward_matches_transformers(hf_dirs):
    from transformers import AutoModelForCausalLM

    src = resolve(f"hf:{hf_dirs / 'opt'}")
    named = _empty_like_model(src.build())
    src.fill_weights(named)
    real = src.build("cpu")
    real.load_state_dict(named, strict=False)
    ref = AutoModelForCausalLM.from_pretrained(str(hf_dirs / "opt")).eval()
    x = src.example_inputs(2, 8, "cpu")
    with torch.inference_mode():
        a = src.logits(real(*x, **src.forward_kwargs()))
        b = ref(*x).logits[:, -1]
    assert a.shape == (2, 256) and torch.allclose(a, b, atol=1e-5)


def test_hf_converted_layout_matches_from_pretrained(hf_dirs):
    # transformers 5 saves Mixtral experts one matrix per expert but builds them fused (experts.gate_up_proj):
    # fill_weights applies transformers' own conversion table.
    from transformers import AutoModelForCausalLM

    src = resolve(f"hf:{hf_dirs / 'mixtral'}")
    named = _empty_like_model(src.build())
    assert any(k.endswith("experts.gate_up_proj") for k in named)
    src.fill_weights(named)
    ref = AutoModelForCausalLM.from_pretrained(str(hf_dirs / "mixtral"))
    want = dict(ref.named_parameters())
    want.update(ref.named_buffers())
    for k, v in named.items():
        assert torch.equal(v, want[k]), k


def _without_conversion_table(monkeypatch):
    """Make transformers look like a 4.x release: no transformers.conversion_mapping module."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers.conversion_mapping" else find_spec(name, *a))


def test_hf_without_conversion_table_loads_by_name(hf_dirs, monkeypatch):
    # transformers 4 has no conversion table: a checkpoint whose names are the model's loads by name ...
    _without_conversion_table(monkeypatch)
    src = resolve(f"hf:{hf_dirs / 'llama'}")
    named = _empty_like_model(src.build())
    src.fill_weights(named)
    saved = load_file(hf_dirs / "llama" / "model.safetensors")
    assert all(torch.equal(named[k], v) for k, v in saved.items())
    # ... and one that needs converting is refused naming the weight, rather than loaded wrong
    src = resolve(f"hf:{hf_dirs / 'mixtral'}")
    with pytest.raises(MemintentError, match=r"weight model\.layers\.0\.mlp\.\S+ is missing from the safetensors "
                                             r"files"):
        src.fill_weights(_empty_like_model(src.build()))


def test_hf_conversion_table_failure_is_an_error(hf_dirs, monkeypatch):
    conversion_mapping = importlib.import_module("transformers.conversion_mapping")

    def broken(model, *a, **k):
        raise RuntimeError("no table\nsecond line")

    monkeypatch.setattr(conversion_mapping, "get_model_conversion_mapping", broken)
    src = resolve(f"hf:{hf_dirs / 'mixtral'}")
    with pytest.raises(MemintentError, match=r"^hf:.*mixtral: transformers \S+ cannot give the checkpoint conversions "
                                             r"of MixtralForCausalLM \(RuntimeError: no table\), so its checkpoint "
                                             r"cannot be mapped onto the model's weights$"):
        src.fill_weights(_empty_like_model(src.build()))


def test_hf_check_checkpoint_reads_headers_only(hf_dirs, tmp_path):
    # check_checkpoint compares the headers with what a plan expects: a changed shape or dtype is refused, a
    # matching checkpoint passes, converted (fused expert) weights are left to fill_weights.
    src = resolve(f"hf:{hf_dirs / 'mixtral'}")
    want = {n: (tuple(t.shape), t.dtype) for n, t in _empty_like_model(src.build()).items()}
    src.check_checkpoint(want)
    key = "model.layers.0.self_attn.q_proj.weight"
    wrong = dict(want, **{key: ((1, 2), want[key][1])})
    with pytest.raises(MemintentError, match=rf"tensor {key} in model.safetensors has shape .*: the plan expects "
                                             r"\(1, 2\)"):
        src.check_checkpoint(wrong)
    wrong = dict(want, **{key: (want[key][0], torch.int32)})
    with pytest.raises(MemintentError, match=rf"tensor {key} in model.safetensors is torch.float32: the plan "
                                             r"expects torch.int32"):
        src.check_checkpoint(wrong)


def test_hf_num_layers_override(hf_dirs):
    src = resolve(f"hf:{hf_dirs / 'llama'}")
    m = src.build(num_layers=1)
    assert len(m.model.layers) == 1 and m.config.num_hidden_layers == 1
    assert len(src.build(num_layers=3).model.layers) == 3
    assert len(src.build().model.layers) == 2  # the source's own config is untouched


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_hf_export_on_meta(hf_dirs, name):
    src = resolve(f"hf:{hf_dirs / name}")
    assert "use_cache" in src.forward_kwargs() and src.forward_kwargs().get("logits_to_keep") == 1
    ep = torch.export.export(src.build(), src.example_inputs(2, 8), kwargs=src.forward_kwargs(), strict=False)
    out = [n for n in ep.graph.nodes if n.op == "output"][0].args[0][0]
    assert tuple(out.meta["val"].shape) == (2, 1, 256)


def test_hf_dtype_override_converts(hf_dirs):
    src = resolve(f"hf:{hf_dirs / 'llama'}", dtype="f32")
    named = _empty_like_model(src.build())
    assert named["model.norm.weight"].dtype == torch.float32
    src.fill_weights(named)
    saved = load_file(hf_dirs / "llama" / "model.safetensors")
    assert torch.equal(named["model.embed_tokens.weight"], saved["model.embed_tokens.weight"].float())


def test_hf_errors(hf_dirs, tmp_path):
    with pytest.raises(MemintentError, match="does not exist"):
        resolve(f"hf:{tmp_path / 'absent'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MemintentError, match="no config.json"):
        resolve(f"hf:{tmp_path / 'empty'}")

    d = _copy(hf_dirs, "llama", tmp_path)
    (d / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(MemintentError, match="config.json is malformed JSON"):
        resolve(f"hf:{d}")

    d = tmp_path / "vit"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(MemintentError, match="'vit' is not a decoder-only causal LM"):
        resolve(f"hf:{d}")

    d = tmp_path / "t5"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(MemintentError, match="'t5' is not a decoder-only causal LM"):
        resolve(f"hf:{d}")

    d = tmp_path / "weird"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(MemintentError, match="not a config transformers can read"):
        resolve(f"hf:{d}")

    d = _copy(hf_dirs, "llama", tmp_path / "nost")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(MemintentError, match="no \\*.safetensors files.*pytorch_model.bin.*does not unpickle"):
        resolve(f"hf:{d}")

    d = _copy(hf_dirs, "llama", tmp_path / "trunc")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(MemintentError, match="model.safetensors is truncated or malformed"):
        resolve(f"hf:{d}")
    f.write_bytes(b"\x05")
    with pytest.raises(MemintentError, match="model.safetensors is truncated or malformed"):
        resolve(f"hf:{d}")

    with pytest.raises(MemintentError, match="hf: needs a folder"):
        resolve("hf:")

    d = _copy(hf_dirs, "llama", tmp_path / "remote")
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MemintentError, match="custom model code.*--allow-code"):
        resolve(f"hf:{d}", allow_code=False)


def _rewrite(d: Path, edit) -> None:
    f = d / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_hf_weight_errors(hf_dirs, tmp_path):
    d = _copy(hf_dirs, "llama", tmp_path / "missing")
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    src = resolve(f"hf:{d}")
    with pytest.raises(MemintentError, match="weight model.layers.1.mlp.up_proj.weight is missing .* not tied"):
        src.fill_weights(_empty_like_model(src.build()))

    d = _copy(hf_dirs, "llama", tmp_path / "shape")
    _rewrite(d, lambda t: t.__setitem__("model.norm.weight", torch.ones(65, dtype=torch.bfloat16)))
    src = resolve(f"hf:{d}")
    with pytest.raises(MemintentError, match=r"model.norm.weight in model.safetensors has shape \(65,\).*\(64,\)"):
        src.fill_weights(_empty_like_model(src.build()))

    d = _copy(hf_dirs, "llama", tmp_path / "dtype")
    _rewrite(d, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.float16)))
    src = resolve(f"hf:{d}")
    with pytest.raises(MemintentError, match="model.norm.weight in model.safetensors is torch.float16: the model "
                                             "expects torch.bfloat16"):
        src.fill_weights(_empty_like_model(src.build()))

    src = resolve(f"hf:{hf_dirs / 'llama'}")
    with pytest.raises(MemintentError, match="model.nope is not a weight"):
        src.fill_weights({"model.nope": torch.empty(1)})


def test_hf_tied_weight_found_under_other_name(hf_dirs, tmp_path):
    # A checkpoint that stores the tied matrix under the head's name only.
    d = _copy(hf_dirs, "opt", tmp_path)
    _rewrite(d, lambda t: t.__setitem__("lm_head.weight", t.pop("model.decoder.embed_tokens.weight")))
    src = resolve(f"hf:{d}")
    named = _empty_like_model(src.build())
    src.fill_weights(named)
    assert torch.equal(named["model.decoder.embed_tokens.weight"], load_file(d / "model.safetensors")["lm_head.weight"])


# -- py: ----------------------------------------------------------------------------------------------------------

def test_py_factory():
    src = resolve(f"py:{TOY}:mlp_stack")
    assert (src.kind, src.dtype, src.num_layers, src.layers_path) == ("py", "f32", 6, "layers")
    m = src.build()
    assert next(m.parameters()).device.type == "meta" and len(m.layers) == 6
    named = _empty_like_model(m)
    src.fill_weights(named)
    assert named["layers.0.0.weight"].std() > 0 and named["head.bias"].shape == (10,)


def test_py_factory_values_and_module_form(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    src = resolve("py:examples.toy_mlp:mlp_stack")
    ref, inputs = src.factory()
    named = _empty_like_model(src.build())
    src.fill_weights(named)
    for k, v in ref.state_dict().items():
        assert torch.equal(named[k], v), k
    (x,) = src.example_inputs(2, 16, "cpu")
    assert torch.equal(x, inputs[0])
    real = src.build("cpu")
    assert torch.equal(real(x), ref(x))
    with pytest.raises(MemintentError, match="cannot build 3"):
        src.build(num_layers=3)
    assert src.build(num_layers=6) is not None


def test_py_refused_without_allow_code():
    with pytest.raises(MemintentError, match="--allow-code"):
        resolve(f"py:{TOY}:mlp_stack", allow_code=False)


def test_py_errors(tmp_path):
    with pytest.raises(MemintentError, match="is not py:MODULE:FUNCTION"):
        resolve("py:justaname")
    with pytest.raises(MemintentError, match="cannot import no_such_module_xyz"):
        resolve("py:no_such_module_xyz:f")
    with pytest.raises(MemintentError, match="has no function nope"):
        resolve(f"py:{TOY}:nope")
    with pytest.raises(MemintentError, match="does not exist"):
        resolve(f"py:{tmp_path / 'absent.py'}:f")
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    return 3\n\ndef g():\n    raise RuntimeError('boom')\n")
    with pytest.raises(MemintentError, match="must return \\(nn.Module, example_inputs_tuple\\)"):
        resolve(f"py:{bad}:f")
    with pytest.raises(MemintentError, match="factory raised RuntimeError: boom"):
        resolve(f"py:{bad}:g")
