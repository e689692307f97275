"""Hugging Face folders under generation plans, on the CPU backend.

The reference is transformers itself: the folder loaded with ``from_pretrained`` (eager attention, the one every
architecture has, and the only one with Gemma 2's soft-capping) generating greedily from each prompt alone. The
engine serves all the prompts at once, packed into shared steps, with a plan that streams some of the weights; in
float32 it must generate the same tokens.
"""

from __future__ import annotations

import json
import shutil
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hf_tiny

from memintent.cli import main
from memintent.compiler.hardware import BUILTIN
from memintent.compiler.planner import plan_generation
from memintent.models.hf import HFSource
from memintent.models.hf import _Shards
from memintent.models.refs import resolve
from memintent.engine import Engine
from memintent.engine.reference import compare
from memintent.kv import attention
from memintent.engine.sequence import Request
from memintent.errors import MemintentError
from memintent.ir.model import Residency
from memintent.ir.plan_file import save_plan

CPU = BUILTIN["cpu"]
GEN = 12
# Different lengths, longer than the sliding window (8); four of them for a plan of three sequences at once.
PROMPTS = [(5, 9, 17), tuple(range(3, 24)), (40, 41, 2, 99, 7, 8, 60, 61, 62, 63), (77, 12, 12, 100, 101, 6)]
MATRIX = ["llama", "mistral", "qwen2", "qwen2_moe", "mixtral", "gemma", "gemma2", "phi3", "gpt_neox", "opt",
          "gpt2", "starcoder2", "stablelm"]
PLAN = {"context": 48, "prompt_len": 8, "gen_len": 8, "quant": "none", "concurrency": 3, "kv_page_tokens": 4,
        "dtype": "f32", "max_step_tokens": 64}
BUDGET_FRACTION = 0.85   # of the weights' bytes: too little for all of them next to the KV pool, enough to stream


def tiny_plan(folder, weight_bytes: int, **plan):
    """The generation plan the tests make of a tiny folder: ``PLAN`` (with ``plan``'s overrides) under
    ``BUDGET_FRACTION`` of its weights' bytes."""
    return plan_generation(f"hf:{folder}", budget_bytes=int(BUDGET_FRACTION * weight_bytes), hardware=CPU,
                           **{**PLAN, **plan})


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one intra-op thread for this module


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


class Folders:
    """Each architecture's folder and plan, made on first use and kept for the module."""

    def __init__(self, base):
        self.base = base
        self.folders: dict[str, tuple] = {}
        self.plans: dict[str, object] = {}

    def folder(self, name: str):
        if name not in self.folders:
            path = self.base / name
            # llama is saved in shards, so the matrix also loads through model.safetensors.index.json
            kw = {"max_shard_size": "300KB"} if name == "llama" else {}
            self.folders[name] = (path, hf_tiny.save(path, hf_tiny.config(name), **kw))
        return self.folders[name]

    def plan(self, name: str):
        if name not in self.plans:
            path, weight_bytes = self.folder(name)
            self.plans[name] = tiny_plan(path, weight_bytes)
        return self.plans[name]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return Folders(tmp_path_factory.mktemp("hf"))


def hf_generate(folder, prompts, n: int = GEN, dtype=torch.float32, stop: bool = False) -> list[list[int]]:
    """transformers' own greedy generate of each prompt alone. Without ``stop``, end-of-sequence is disabled so
    every output has ``n`` tokens; with it, each output stops where transformers stops (its end-of-sequence token
    included), as the engine does at the folder's end-of-sequence ids."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
    if not stop:
        model.generation_config.eos_token_id = None
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False, pad_token_id=0)
            out.append(ids[0, len(p):].tolist())
    return out


def requests(prompts=PROMPTS, n: int = GEN) -> list[Request]:
    return [Request(id=str(i), prompt_ids=tuple(p), max_new_tokens=n) for i, p in enumerate(prompts)]


# ---- the matrix -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MATRIX)
def test_streamed_plan_generates_what_transformers_generates(hf, name):
    folder, _ = hf.folder(name)
    plan = hf.plan(name)
    layers = resolve(f"hf:{folder}").layers_path
    assert any(b.residency == Residency.streamed and b.module.startswith(layers + ".") for b in plan.blocks), \
        "the budget must make decoder layers stream"
    assert any(b.residency == Residency.resident for b in plan.blocks)
    assert plan.model.attention == attention.ENGINE_ATTENTION
    with Engine(plan, "cpu") as eng:
        outs = {o.id: o.token_ids for o in eng.generate(requests())}
        steps = eng.stats.steps
    assert max(s.sequences for s in steps) > 1, "prompts of different lengths share steps"
    assert all(s.bytes_copied > 0 for s in eng.runners[0].forward_stats), "every step streams weights"
    assert [outs[str(i)] for i in range(len(PROMPTS))] == hf_generate(folder, PROMPTS)


def _expected_windows(cfg) -> list[int | None]:
    """Each layer's sliding window as the model's own mask applies it: the layers ``layer_types`` marks sliding, or
    every layer when the config has a window and no per-layer types (Mistral, Phi-3, Starcoder2)."""
    n = cfg.num_hidden_layers
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return [cfg.sliding_window if t == "sliding_attention" else None for t in types]
    return [getattr(cfg, "sliding_window", None)] * n


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen2_moe", "gemma2", "phi3", "starcoder2", "llama"])
def test_each_layer_attends_within_its_own_window(hf, name, monkeypatch):
    folder, _ = hf.folder(name)
    plan = hf.plan(name)
    seen: dict[int, int | None] = {}
    paged = attention.paged_attention

    def record(q, k, v, layer, **kw):
        seen.setdefault(layer, kw.get("window"))
        return paged(q, k, v, layer, **kw)

    monkeypatch.setattr(attention, "paged_attention", record)
    with Engine(plan, "cpu") as eng:
        list(eng.generate(requests(PROMPTS[:1], 1)))
    want = _expected_windows(transformers.AutoConfig.from_pretrained(folder))
    assert [seen[i] for i in range(len(want))] == want
    if name in ("qwen2", "qwen2_moe", "gemma2"):
        assert None in want and hf_tiny.WINDOW in want, "sliding and full layers alternate"


@pytest.mark.parametrize("name", ["gemma2", "qwen2_moe", "gpt2"])
def test_generate_command_verify_passes(hf, name, tmp_path, capsys):
    plan_file = tmp_path / "p.plan.json"
    save_plan(hf.plan(name), plan_file)
    prompts = tmp_path / "r.jsonl"
    prompts.write_text("".join(json.dumps({"id": i, "prompt_ids": list(p), "max_new_tokens": GEN}) + "\n"
                               for i, p in enumerate(PROMPTS)))
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(plan_file), "--device", "cpu", "--prompts", str(prompts), "--output", str(out),
                 "--verify"]) == 0
    assert "100.00% of generated tokens agree" in capsys.readouterr().err
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["token_ids"] for x in lines] == hf_generate(hf.folder(name)[0], PROMPTS)


# ---- text in, text out ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A Llama folder with its own tokenizer and chat template; the model's vocabulary is the tokenizer's."""
    folder = tmp_path_factory.mktemp("tok") / "llama-chat"
    vocab = hf_tiny.save_tokenizer(folder, chat=True)
    weight_bytes = hf_tiny.save(folder, hf_tiny.config("llama", vocab_size=vocab, bos_token_id=2, eos_token_id=3,
                                                       pad_token_id=0), seed=1)   # seed 1 generates words
    plan = tiny_plan(folder, weight_bytes)
    path = folder.parent / "chat.plan.json"
    save_plan(plan, path)
    return folder, path


TEXTS = ["the cat sat on the mat", "hello world", "where is the big red dog and the small blue bird"]


@pytest.mark.parametrize("chat", [False, True])
def test_text_prompts_in_text_out(chat_folder, tmp_path, chat):
    folder, plan = chat_folder
    prompts = tmp_path / "r.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"t{i}", "prompt": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(plan), "--device", "cpu", "--prompts", str(prompts), "--output", str(out),
                 "--gen-len", str(GEN)] + (["--chat"] if chat else [])) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    if chat:
        ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"] for t in TEXTS]
        assert all(p[:4] == tok.convert_tokens_to_ids(["<s>", "user", ":", TEXTS[i].split()[0]])
                   for i, p in enumerate(ids)), "the template wraps the text as a user turn"
    else:
        ids = [tok(t)["input_ids"] for t in TEXTS]
        assert all(p[0] == tok.bos_token_id for p in ids)
    assert [x["id"] for x in lines] == ["t0", "t1", "t2"]
    assert [x["token_ids"] for x in lines] == hf_generate(folder, ids)
    for x in lines:
        assert x["text"] == tok.decode(x["token_ids"], skip_special_tokens=True)
    assert any(x["text"] for x in lines), "some output is words, not only special tokens"


def test_chat_without_a_template_is_refused(chat_folder, tmp_path, capsys):
    folder, plan = chat_folder
    plain = tmp_path / "plain"
    shutil.copytree(folder, plain)
    (plain / "chat_template.jinja").unlink()
    assert "chat_template" not in json.loads((plain / "tokenizer_config.json").read_text())
    raw = json.loads(plan.read_text())
    raw["model"]["ref"] = f"hf:{plain}"
    plan = tmp_path / "p.plan.json"
    plan.write_text(json.dumps(raw))
    prompts = tmp_path / "r.jsonl"
    prompts.write_text('{"id": 1, "prompt": "hello world"}\n')
    assert main(["generate", str(plan), "--device", "cpu", "--prompts", str(prompts), "--chat"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--chat" in err[0] and "no chat template" in err[0] and "leave --chat out" in err[0]
    assert main(["generate", str(plan), "--device", "cpu", "--prompts", str(prompts)]) == 0, "text without --chat"


# ---- attention fallback and architectures that bypass the attention interface ---------------------------------

def test_only_the_embedding_and_head_stay_int8_where_a_layer_matrix_has_their_shape(hf):
    # llama's tiny config: an untied head, and gate/up projections of (FFN, HIDDEN) = (VOCAB, HIDDEN), the
    # embedding's shape; they are layer matrices and take the 4-bit policy's width, only the vocabulary blocks int8
    assert (hf_tiny.FFN, hf_tiny.VOCAB) == (128, 128)
    path, weight_bytes = hf.folder("llama")
    p = tiny_plan(path, weight_bytes, quant="int4g")
    widths = {b.name: b.quant.value for b in p.blocks if b.residency == Residency.streamed}
    assert {n for n, w in widths.items() if w == "int8"} <= {"model.embed_tokens", "lm_head"}
    assert {w for n, w in widths.items() if n.startswith("model.layers.")} == {"int4g"}


def test_an_untied_vocabulary_is_read_in_place_from_host_memory(hf):
    # llama's tiny config unties its head: under a 4-bit policy the int8 embedding and head are mapped (read in place
    # from the host store, no slot), through transformers' own nn.Embedding and nn.Linear modules. A wrong read would
    # give other tokens: the greedy tokens agree with the float32 model's as far as the int4g layers allow (43 of 48
    # observed), and every logit is within the quantization's error (0.05 observed).
    path, weight_bytes = hf.folder("llama")
    p = plan_generation(f"hf:{path}", budget_bytes=weight_bytes, hardware=CPU, **{**PLAN, "quant": "int4g"})
    assert {b.name for b in p.blocks if b.residency == Residency.mapped} == {"model.embed_tokens", "lm_head"}
    rs = requests()
    with Engine(p, "cpu") as eng:
        eng.track = {r.id for r in rs}
        outs = list(eng.generate(rs))
    a = compare(eng.src, torch.device("cpu"), rs, outs, eng.tracked_logits)
    assert a.tokens == len(rs) * GEN and a.agreeing >= 0.8 * a.tokens
    assert a.max_logit_error < 0.25


def test_architecture_without_sdpa_compiles_with_eager(hf, tmp_path, capsys):
    for name, want in (("gemma2", "eager"), ("llama", "sdpa")):
        folder, weight_bytes = hf.folder(name)
        plan = tmp_path / f"{name}.plan.json"
        assert main(["compile", f"hf:{folder}", "--hw", "cpu", "--budget", str(2 * weight_bytes), "--batch", "1",
                     "--seq", "16", "-o", str(plan)]) == 0
        capsys.readouterr()
        assert main(["explain", str(plan)]) == 0
        assert f"attention {want}" in capsys.readouterr().out, name


@pytest.mark.parametrize("name, arch, where", [
    ("falcon", "Falcon", ""),       # looks attention implementations up in a table of its own
    ("bloom", "Bloom", ""),         # builds with any attn_implementation and never calls it
    ("jamba", "Jamba", " in 1 of its 2 layers"),   # a Mamba layer before the attention one: seen in the trace
])
def test_generation_refused_where_attention_bypasses_the_interface(hf, name, arch, where, tmp_path, capsys):
    folder, _ = hf.folder(name)
    capsys.readouterr()
    assert main(["compile", f"hf:{folder}", "--objective", "throughput", "--hw", "cpu", "--context", "48",
                 "--prompt-len", "8", "--gen-len", "8", "-o", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == (f"memintent: error: hf:{folder}: the {arch} architecture's attention does not go through "
                      f"transformers' attention interface{where}, which generation plans need (plain forwards "
                      "work: compile without --objective)")
    assert not (tmp_path / "g.json").exists()


def test_generation_refused_for_attention_sinks(hf, tmp_path, capsys):
    folder, _ = hf.folder("gpt_oss")
    capsys.readouterr()
    assert main(["compile", f"hf:{folder}", "--objective", "throughput", "--hw", "cpu", "--context", "48",
                 "--prompt-len", "8", "--gen-len", "8", "-o", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"memintent: error: hf:{folder}: the GptOss architecture's attention adds learned sink logits "
                    "(GPT-OSS's s_aux), which the serving engine's attention does not compute (plain forwards work: "
                    "compile without --objective)")]
    # and the attention function refuses them too, whatever built the model
    module = transformers.AutoModelForCausalLM.from_pretrained(folder).model.layers[0].self_attn
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(MemintentError, match="GptOssAttention passes attention sinks"):
        attention.hf_attention(module, q, q[:, :2], q[:, :2], None, s_aux=module.sinks)
    assert not (tmp_path / "g.json").exists()


@pytest.mark.parametrize("name", ["falcon", "bloom"])
def test_plain_forward_plans_work_where_generation_is_refused(hf, name, tmp_path):
    folder, weight_bytes = hf.folder(name)
    plan = tmp_path / "f.json"
    assert main(["compile", f"hf:{folder}", "--hw", "cpu", "--budget", str(weight_bytes), "--batch", "1", "--seq",
                 "16", "-o", str(plan)]) == 0
    assert main(["run", str(plan), "--device", "cpu", "--forwards", "1", "--verify"]) == 0


# ---- weights from the folder ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sharded_tied_checkpoint_fills_like_from_pretrained(tmp_path, dtype):
    folder = tmp_path / "gpt2"
    hf_tiny.save(folder, hf_tiny.config("gpt2"), dtype=dtype, max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file()
    src = resolve(f"hf:{folder}")
    assert src.torch_dtype == dtype
    model = src.build("meta")
    assert model.lm_head.weight is model.transformer.wte.weight
    named = {n: torch.empty(t.shape, dtype=t.dtype) for n, t in model.state_dict().items()}
    src.fill_weights(named)
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).state_dict()
    assert set(named) == set(ref)
    for n, t in named.items():
        assert t.dtype == dtype and torch.equal(t, ref[n]), n


@pytest.mark.parametrize("how", ["host store", "one call"])
def test_filling_never_holds_the_checkpoint_twice(hf, monkeypatch, how):
    """Filling reads one tensor at a time, and converts one group of expert matrices at a time: the tensors read
    from the files or converted that are alive at any moment are at most one decoder layer's bytes, whether the
    host store fills block by block or one call fills the whole model (the resident reference of --verify)."""
    from memintent.models.fingerprint import named_weights
    from memintent.runtime import HostStore

    plan = hf.plan("mixtral")
    src = resolve(plan.model.ref, dtype=plan.model.dtype)
    alive: list[weakref.ref] = []
    peak_bytes = [0]

    def track(tensors):
        alive.extend(weakref.ref(t) for t in tensors)
        held = sum(t.numel() * t.element_size() for r in alive if (t := r()) is not None)
        peak_bytes[0] = max(peak_bytes[0], held)

    read, convert = _Shards.read, HFSource._convert
    monkeypatch.setattr(_Shards, "read", lambda self, key: (t := read(self, key), track([t]))[0])
    monkeypatch.setattr(HFSource, "_convert", lambda self, *a: (d := convert(self, *a), track(d.values()))[0])
    if how == "host store":
        HostStore(plan, pin="none").fill(src.fill_weights)
    else:
        src.fill_weights(named_weights(src.build("meta").to_empty(device="cpu")))
    layer_bytes = max(b.size_bytes for b in plan.blocks if b.module.startswith("model.layers."))
    assert 0 < peak_bytes[0] <= layer_bytes < hf.folder("mixtral")[1] / 3


# ---- bad folders: one line naming the file and what would be right, exit 2 ------------------------------------

def _bad_folder(hf, tmp_path, kind: str):
    if kind == "no config":
        folder = tmp_path / "noconfig"
        shutil.copytree(hf.folder("gpt2")[0], folder)
        (folder / "config.json").unlink()
        return folder, [f"no config.json in {folder}", "config.json that save_pretrained writes"]
    if kind == "unknown architecture":
        folder = tmp_path / "unknown"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "hidden_size": 8}))
        return folder, [f"{folder / 'config.json'} is not a config transformers can read",
                        "'no-such-arch' is not an architecture transformers", "use a folder of a decoder-only"]
    if kind == "encoder-decoder":
        folder = tmp_path / "t5"
        transformers.T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64).save_pretrained(folder)
        return folder, [f"{folder / 'config.json'}: model_type 't5' is not a decoder-only causal LM",
                        "encoder-decoder", "use a folder of one (llama"]
    if kind == "missing shard":
        folder = tmp_path / "missing"
        shutil.copytree(hf.folder("llama")[0], folder)
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shard = max(index["weight_map"].values())
        (folder / shard).unlink()
        return folder, [f"{folder / 'model.safetensors.index.json'} names {shard}, which is not in {folder}",
                        "copy that shard into the folder"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["no config", "unknown architecture", "encoder-decoder", "missing shard"])
def test_bad_folders_are_refused_in_one_line(hf, tmp_path, capsys, kind):
    folder, parts = _bad_folder(hf, tmp_path, kind)
    capsys.readouterr()
    assert main(["compile", f"hf:{folder}", "--objective", "throughput", "--hw", "cpu", "--context", "48",
                 "--prompt-len", "8", "--gen-len", "8", "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memintent: error: "), err
    for part in parts:
        assert part in err[0], (part, err[0])
    assert not (tmp_path / "p.json").exists()


def test_shard_with_a_wrong_dtype_is_refused_before_serving(hf, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "llama"
    shutil.copytree(hf.folder("llama")[0], folder)
    raw = json.loads(hf.plan("llama").model_dump_json())
    raw["model"]["ref"] = f"hf:{folder}"
    plan = tmp_path / "p.plan.json"
    plan.write_text(json.dumps(raw))
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = index["model.norm.weight"]
    tensors = load_file(folder / shard)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    prompts = tmp_path / "r.jsonl"
    prompts.write_text('{"id": 1, "prompt_ids": [1, 2, 3]}\n')
    capsys.readouterr()
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(plan), "--device", "cpu", "--prompts", str(prompts), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert (f"tensor model.norm.weight in {shard} is torch.int32: the plan expects torch.float32 for "
            "model.norm.weight" in err[0]), err[0]
    assert not out.exists()


# ---- a streamed block holding plain buffers (issue 20: Gemma 2 in float32) -------------------------------------

def test_streaming_every_block_with_buffers_runs_forward_after_forward(hf):
    """Every block streams, the rotary embedding's buffers (inv_freq) included: its second visit rebinds a plain
    buffer, which once met a slot view turned into the meta tensor ('set_data ... incompatible tensor type')."""
    import memintent
    from memintent.compiler.compile import trace_ref
    from memintent.ir.model import RunShape
    from memintent.passes import ACTIONS, COSTS, LIFETIMES, PREFETCH, VERIFY, run_passes
    from memintent.passes.residency import forced_resident, given_residency_pass

    folder, _ = hf.folder("gemma2")
    program = run_passes(trace_ref(f"hf:{folder}", RunShape(batch=1, seq=16)).model_copy(
        update={"budget_bytes": 1 << 30, "hardware": CPU}), (LIFETIMES, COSTS))
    streamed = {v.block for v in program.visits} - forced_resident(program)
    assert any(b.name in streamed and any(w.endswith("inv_freq") for w in b.weights) for b in program.blocks)
    plan = run_passes(program, (given_residency_pass(streamed, 2), PREFETCH, ACTIONS, VERIFY))
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model, handle = memintent.load(plan, device="cpu")
    try:
        with torch.no_grad():
            for seed in range(3):
                ids = torch.randint(0, hf_tiny.VOCAB, (1, 16), generator=torch.Generator().manual_seed(seed))
                torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    finally:
        handle.detach()
