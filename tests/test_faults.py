"""Faults, tried on purpose: untrusted files, runtime faults injected on the CPU backend, Ctrl-C.

Every fault ends in one line on stderr and exit code 2 (130 for Ctrl-C), with the runtime detached (hooks removed,
in-flight copies waited for, arena released) and no half-written output file. Faults with no real cause on a CPU
machine (a failing copy, a short device, a failing pinned allocation) are injected by monkeypatching the call that
would fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import memintent.runtime as runtime
from memintent.commands import run as run_command
from memintent.engine import runner as engine_runner
from memintent.passes.verify import prove
from memintent.cli import main
from memintent.compiler.compile import compile_model
from memintent.compiler.hardware import BUILTIN
from memintent.errors import MemintentError, RuntimeFault
from memintent.ir.model import Residency
from memintent.ir.plan_file import load_plan, save_plan, write_atomic

ROOT = Path(__file__).resolve().parents[1]
TOY = f"py:{ROOT / 'examples' / 'toy_mlp.py'}:mlp_stack"
CPU = BUILTIN["cpu"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memintent: error: "), err
    assert "Traceback" not in err[0]
    return err[0]


def no_leftovers(folder: Path, name: str) -> None:
    """Neither the output file nor a temporary file of an atomic write is left in ``folder``."""
    assert not (folder / name).exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(f".{name}.")], list(folder.iterdir())


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plans") / "tiny.plan.json"
    save_plan(compile_model("tiny-llama", budget_bytes=1 << 20, hardware=CPU, batch=1, seq=16, depth=2), path)
    return path


@pytest.fixture(scope="module")
def gen_plan(tmp_path_factory) -> Path:
    from memintent.compiler.planner import plan_generation

    path = tmp_path_factory.mktemp("plans") / "gen.plan.json"
    plan = plan_generation("tiny-llama", budget_bytes=3 << 20, hardware=CPU, context=32, prompt_len=8, gen_len=6,
                           objective="latency", quant="none", dtype="f32")
    assert any(b.residency == Residency.streamed for b in plan.blocks)
    save_plan(plan, path)
    return path


class Spy:
    """Wraps ``attach`` where `run` and the engine's runner call it: records the handles, optionally adds a hook to
    the attached model."""

    def __init__(self, monkeypatch, hook=None):
        self.handles, self.models, self._attach, self._hook = [], [], runtime.attach, hook
        for module in (run_command, engine_runner):
            monkeypatch.setattr(module, "attach", self)

    def __call__(self, model, program, device, **kw):
        h = self._attach(model, prove(program), device, **kw)
        self.handles.append(h)
        self.models.append(model)
        if self._hook is not None:
            self._hook(model)
        return h

    def assert_released(self) -> None:
        assert self.handles, "the runtime was never attached"
        for h, m in zip(self.handles, self.models):
            assert not h.attached and h.arena.released
            assert all(not x._forward_pre_hooks and not x._forward_hooks for x in m.modules())


# ---------------------------------------------------------------------------------------------------------------
# Untrusted files: plans and IR are data; code runs only with --allow-code; weights come from safetensors only
# ---------------------------------------------------------------------------------------------------------------

def test_loaders_hold_no_code_execution():
    """The plan loader is pydantic over json.loads and the IR parser is lark plus int/float/json.loads: neither
    module evaluates, imports or unpickles anything."""
    for f in ("ir/plan_file.py", "ir/parser.py", "ir/model.py", "passes/verify.py"):
        src = (ROOT / "memintent" / f).read_text()
        for word in ("pickle", "__import__", "importlib", "torch.load", "import_module"):
            assert word not in src, f"{f} contains {word}"
        assert not re.search(r"(?<![\w.])(eval|exec|compile)\(", src), f"{f} calls eval, exec or compile"


EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")
import torch
def build():
    Path({marker!r}).write_text("ran")
    return torch.nn.Linear(2, 2), (torch.zeros(1, 2),)
"""


def _naming(plan: Path, ref: str, kind: str, out: Path) -> Path:
    """``plan`` with its model reference replaced by ``ref`` of ``kind``."""
    raw = json.loads(plan.read_text())
    raw["model"].update(ref=ref, kind=kind)
    out.write_text(json.dumps(raw))
    return out


@pytest.mark.parametrize("kind", ["py", "preset"])
def test_py_plan_runs_no_code_without_allow_code(tiny_plan, gen_plan, tmp_path, capsys, kind):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.py"
    evil.write_text(EVIL.format(marker=str(marker)))
    ref = f"py:{evil}:build"   # kind "preset" lies about the kind: still refused
    plan = _naming(tiny_plan, ref, kind, tmp_path / "evil.plan.json")
    gen = _naming(gen_plan, ref, kind, tmp_path / "evil.gen.plan.json")   # generate needs a generation plan
    mir = tmp_path / "evil.mir"
    assert main(["dump", str(plan)]) == 0
    mir.write_text(capsys.readouterr().out)
    for argv in (["check", str(plan)], ["check", str(mir)], ["explain", str(plan)], ["simulate", str(plan)],
                 ["check", str(gen)]):
        assert main(argv) == 0, argv
    capsys.readouterr()
    for cmd, path in (("run", plan), ("generate", gen)):
        assert main([cmd, str(path), "--device", "cpu"]) == 2
        line = one_line_error(capsys)
        # a py: kind is refused by the plan's own kind, a lying one by resolving the reference
        assert ref in line and "pass --allow-code" in line, (cmd, line)
    assert not marker.exists(), "loading, checking or refusing a plan ran its factory"
    # with --allow-code the factory does run (and the model, a different one, is refused by its fingerprint)
    for cmd, path in (("generate", gen), ("run", plan)):
        marker.unlink(missing_ok=True)
        assert main([cmd, str(path), "--device", "cpu", "--allow-code"]) == 2
        assert "does not match the plan" in one_line_error(capsys)
        assert marker.exists(), cmd


@pytest.fixture(scope="module")
def hf_plan(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny Llama saved with save_pretrained(safe_serialization=True) and a streaming plan compiled for it."""
    transformers = pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)).to(torch.bfloat16)
    model.save_pretrained(base / "llama", safe_serialization=True)
    plan = compile_model(f"hf:{base / 'llama'}", budget_bytes=200 << 10, hardware=CPU, batch=1, seq=16)
    assert any(b.residency == Residency.streamed for b in plan.blocks)
    save_plan(plan, base / "llama.plan.json")
    return base / "llama", base / "llama.plan.json"


def _hf_copy(hf_plan, tmp_path) -> tuple[Path, Path]:
    folder, plan = hf_plan
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    raw = json.loads(plan.read_text())
    raw["model"]["ref"] = f"hf:{dst}"
    (tmp_path / "plan.json").write_text(json.dumps(raw))
    return dst, tmp_path / "plan.json"


def _rewrite_tensor(folder: Path, name: str, value: torch.Tensor) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    tensors = load_file(f)
    tensors[name] = value
    save_file(tensors, f, metadata={"format": "pt"})


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if a HostStore or a device arena is created: errors must come before any allocation."""
    def refuse(*a, **k):
        raise AssertionError("allocated host or device memory before refusing the input")

    monkeypatch.setattr(runtime, "HostStore", refuse)
    monkeypatch.setattr(runtime, "attach", refuse)


def test_hf_intact_folder_runs(hf_plan, tmp_path, capsys):
    _, plan = _hf_copy(hf_plan, tmp_path)
    assert main(["run", str(plan), "--device", "cpu", "--forwards", "1", "--verify"]) == 0
    assert "bitwise identical" in capsys.readouterr().out


@pytest.mark.parametrize("damage, match", [
    ("truncate", "model.safetensors is truncated or malformed"),
    ("header", "model.safetensors is truncated or malformed"),
    ("header_size", "model.safetensors is truncated or malformed"),
    ("empty", "model.safetensors is truncated or malformed"),
    ("shape", r"model.norm.weight in model.safetensors has shape \(65,\): the plan expects \(64,\)"),
    ("dtype", "model.norm.weight in model.safetensors is torch.int32: the plan expects torch.bfloat16"),
    ("missing", "model.norm.weight is missing from the safetensors files"),
    ("config", "does not match the plan.*first differences: model.layers.0.mlp.down_proj.weight: model 64x96 bf16, "
               "plan 64x128 bf16"),
    ("pickle", r"no \*.safetensors files .*pytorch_model.bin.*does not unpickle"),
])
def test_hf_bad_weights_refused_before_allocation(hf_plan, tmp_path, capsys, no_allocation, damage, match):
    folder, plan = _hf_copy(hf_plan, tmp_path)
    f = folder / "model.safetensors"
    raw = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(raw[: len(raw) - 1000])
    elif damage == "header":
        f.write_bytes(raw[:20] + b"\xff" * 10 + raw[30:])
    elif damage == "header_size":
        f.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    elif damage == "empty":
        f.write_bytes(b"")
    elif damage == "shape":
        _rewrite_tensor(folder, "model.norm.weight", torch.ones(65, dtype=torch.bfloat16))
    elif damage == "dtype":
        _rewrite_tensor(folder, "model.norm.weight", torch.ones(64, dtype=torch.int32))
    elif damage == "missing":
        from safetensors.torch import load_file, save_file

        t = load_file(f)
        del t["model.norm.weight"]
        save_file(t, f, metadata={"format": "pt"})
    elif damage == "config":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["intermediate_size"] = 96
        (folder / "config.json").write_text(json.dumps(cfg))
    elif damage == "pickle":
        f.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not unpickled")
    assert main(["run", str(plan), "--device", "cpu", "--json", str(tmp_path / "out.json")]) == 2
    assert re.search(match, one_line_error(capsys)), match
    no_leftovers(tmp_path, "out.json")


def test_plan_for_another_model_is_refused(tiny_plan, tmp_path, capsys, no_allocation):
    raw = json.loads(tiny_plan.read_text())
    raw["model"]["ref"] = "llama-3-8b"
    plan = tmp_path / "other.plan.json"
    plan.write_text(json.dumps(raw))
    assert main(["run", str(plan), "--device", "cpu"]) == 2
    assert "does not match the plan" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------------------------
# Bad CLI input: one line, exit 2
# ---------------------------------------------------------------------------------------------------------------

def test_bad_cli_input_is_one_line_exit_2(tiny_plan, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"schema_version": 1, ')
    (tmp_path / "bad.mir").write_text("program @x {\n  schema 1\n  model preset ")
    (tmp_path / "folder").mkdir()
    tiny = load_plan(tiny_plan)
    lowered = tiny.model_copy(update={"budget_bytes": tiny.arena.size_bytes // 2})
    save_plan(lowered, tmp_path / "lowered.plan.json")
    cases = [
        (["compile", "no-such-model"], "unknown model 'no-such-model'"),
        (["compile", f"hf:{tmp_path / 'absent'}"], "does not exist"),
        (["compile", f"hf:{tmp_path / 'folder'}"], "no config.json"),
        (["compile", "tiny-llama", "--hw", "cpu", "--budget", "10KiB", "-o", str(tmp_path / "x.json")],
         r"below the smallest feasible budget .* \(\d+ bytes\)"),
        (["compile", "tiny-llama", "--budget", "lots"], "is not a size"),
        (["compile", "tiny-llama", "-o", str(tmp_path / "no" / "x.json")], "does not exist"),
        (["check", str(tmp_path / "bad.json")], r"bad.json:1:\d+: not JSON"),
        (["check", str(tmp_path / "bad.mir")], r"bad.mir:3:\d+: unexpected end of text"),
        (["check", str(tmp_path / "absent.json")], "does not exist"),
        (["check", str(tmp_path / "folder")], "cannot be read"),
        (["check", str(tmp_path / "lowered.plan.json")],
         r"plan verification failed: budget \d+\.\d\d KiB is below the plan's peak \d+\.\d\d KiB \(arena "),
        (["run", str(tmp_path / "lowered.plan.json"), "--device", "cpu"], "is below the plan's peak"),
        (["run", str(tiny_plan), "--device", "tpu"], "use cpu or cuda"),
        (["run", str(tiny_plan), "--device", "cpu", "--tokens", "4by4"], "is not BATCHxSEQ"),
        (["run", str(tiny_plan), "--device", "cpu", "--json", str(tmp_path / "no" / "r.json")], "does not exist"),
        (["generate", str(tiny_plan), "--device", "cpu"], "is not a generation plan"),
    ]
    if not torch.cuda.is_available():
        cases.append((["run", str(tiny_plan), "--device", "cuda"], "CUDA is not available"))
    for argv, match in cases:
        assert main(argv) == 2, argv
        line = one_line_error(capsys)
        assert re.search(match, line), (argv, line)


# ---------------------------------------------------------------------------------------------------------------
# Runtime faults
# ---------------------------------------------------------------------------------------------------------------

def _short_device(monkeypatch, free_bytes: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


def test_arena_larger_than_free_device_memory(monkeypatch, tiny_plan):
    from memintent.runtime.arena import DeviceArena, check_fits

    _short_device(monkeypatch, 100 << 10)
    devices = []
    real_empty = torch.empty

    def spy_empty(*a, **k):
        devices.append(str(k.get("device")))
        return real_empty(*a, **k)

    monkeypatch.setattr(torch, "empty", spy_empty)
    with pytest.raises(MemintentError, match=r"arena needs 1.00 MiB but cuda:0 has 100.00 KiB free .* short by "
                                             r"924.00 KiB; compile the plan for a smaller budget"):
        check_fits(1 << 20, torch.device("cuda", 0))
    program = load_plan(tiny_plan)
    with pytest.raises(MemintentError, match="short by") as e:
        DeviceArena(program.arena, torch.device("cuda", 0))
    assert "\n" not in str(e.value)
    # through attach: refused after validating the plan and before allocating anything on the device
    from memintent.models.refs import resolve

    model = resolve("tiny-llama").build("meta")
    with pytest.raises(MemintentError, match="short by"):
        runtime.attach(model, prove(program), "cuda:0")
    assert not any("cuda" in d for d in devices)
    assert all(not m._forward_pre_hooks for m in model.modules())
    # activations that do not fit beside an arena that does: a warning, not an error
    _short_device(monkeypatch, (1 << 20) + 1000)
    with pytest.warns(UserWarning, match="may run out of memory"):
        check_fits(1 << 20, torch.device("cuda", 0), extra_bytes=1 << 20)


def test_pinned_registration_failure_falls_back_with_a_warning(monkeypatch, tiny_plan):
    """cudaHostRegister failing: the store warns and uses PyTorch's pinned allocator; the run still matches."""
    import memintent.runtime.host_store as hs
    from memintent.models.refs import resolve

    class Cudart:
        def cudaHostRegister(self, ptr, size, flags):
            return 2   # cudaErrorMemoryAllocation

    monkeypatch.setattr(hs, "_cudart", lambda: Cudart())
    pinned = []
    real_empty = torch.empty

    def empty(*a, pin_memory=False, **k):   # PyTorch's pinned allocator, simulated on a machine without CUDA
        pinned.append(pin_memory)
        return real_empty(*a, **k)

    monkeypatch.setattr(torch, "empty", empty)
    program = load_plan(tiny_plan)
    src = resolve("tiny-llama")
    with pytest.warns(UserWarning, match="cudaHostRegister failed"):
        store = runtime.HostStore(program, pin="register")
    assert store.pin == "alloc" and store.pinned and any(pinned)
    store.fill(src.fill_weights)
    monkeypatch.setattr(torch, "empty", real_empty)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    ref = src.build("cpu")
    src.fill_weights(dict(ref.named_parameters()) | dict(ref.named_buffers()))
    with torch.no_grad():
        want = ref(ids)
    model = src.build("meta")
    h = runtime.attach(model, prove(program), "cpu", host_store=store)
    try:
        with torch.no_grad():
            assert torch.equal(model(ids), want)
    finally:
        h.detach()


def test_pinned_allocation_failure_falls_back_to_pageable(monkeypatch, tiny_plan):
    real_empty = torch.empty

    def empty(*a, pin_memory=False, **k):
        if pin_memory:
            raise RuntimeError("CUDA error: out of memory (pinned host allocation)")
        return real_empty(*a, **k)

    monkeypatch.setattr(torch, "empty", empty)
    with pytest.warns(UserWarning, match="pageable"):
        store = runtime.HostStore(load_plan(tiny_plan), pin="alloc")
    assert not store.pinned


def _fail_nth_copy(monkeypatch, n: int, exc: BaseException) -> list[int]:
    from memintent.runtime.copy_engine import CpuBackend

    calls = [0]
    real = CpuBackend.copy

    def copy(self, dst, src, after):
        calls[0] += 1
        if calls[0] == n:
            raise exc
        return real(self, dst, src, after)

    monkeypatch.setattr(CpuBackend, "copy", copy)
    return calls


@pytest.mark.parametrize("exc", [RuntimeError("simulated DMA failure\nsecond line"),
                                 torch.OutOfMemoryError("simulated out of memory\nsecond line"),
                                 RuntimeFault("simulated fault")])
def test_copy_failing_mid_run(monkeypatch, tiny_plan, tmp_path, capsys, exc):
    spy = Spy(monkeypatch)
    calls = _fail_nth_copy(monkeypatch, 9, exc)   # during the second forward
    out = tmp_path / "run.json"
    assert main(["run", str(tiny_plan), "--device", "cpu", "--forwards", "3", "--json", str(out)]) == 2
    line = one_line_error(capsys)
    assert "simulated" in line
    if not isinstance(exc, RuntimeFault):
        assert "streamed forward 1" in line
    if isinstance(exc, torch.OutOfMemoryError):
        assert "ran out of device memory" in line
    assert calls[0] == 9
    spy.assert_released()
    no_leftovers(tmp_path, "run.json")


def test_copy_failing_in_the_api_is_a_clean_fault_after_reset(monkeypatch, tiny_plan):
    """Through the Python API the copy's own exception propagates; the handle recovers on the next forward."""
    from memintent.models.refs import resolve

    src = resolve("tiny-llama")
    program = load_plan(tiny_plan)
    model = src.build("meta")
    h = runtime.attach(model, prove(program), "cpu", fill=src.fill_weights)
    ids = torch.zeros(1, 16, dtype=torch.long)
    with torch.no_grad():
        want = model(ids)
        _fail_nth_copy(monkeypatch, 2, RuntimeError("simulated"))
        with pytest.raises(RuntimeError, match="simulated"):
            model(ids)
        monkeypatch.undo()
        assert torch.equal(model(ids), want)   # the aborted forward's state was reset
    h.detach()
    assert all(not m._forward_pre_hooks for m in model.modules())


def _interrupt_at(layer: str, nth: int):
    def install(model):
        calls = [0]

        def hook(module, args):
            calls[0] += 1
            if calls[0] == nth:
                handle.remove()   # so that the test sees only what the runtime left behind
                raise KeyboardInterrupt

        handle = model.get_submodule(layer).register_forward_pre_hook(hook)
    return install


def test_ctrl_c_during_run(monkeypatch, tiny_plan, tmp_path, capsys):
    spy = Spy(monkeypatch, _interrupt_at("layers.2", 2))   # mid-forward, in the second forward
    out = tmp_path / "run.json"
    assert main(["run", str(tiny_plan), "--device", "cpu", "--forwards", "3", "--json", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["memintent: interrupted"]
    spy.assert_released()
    no_leftovers(tmp_path, "run.json")


def test_ctrl_c_during_generate(monkeypatch, gen_plan, tmp_path, capsys):
    spy = Spy(monkeypatch, _interrupt_at("layers.1", 3))   # in the second decode step
    out = tmp_path / "gen.json"
    assert main(["generate", str(gen_plan), "--device", "cpu", "--json", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["memintent: interrupted"]
    spy.assert_released()
    no_leftovers(tmp_path, "gen.json")


def test_copy_failing_during_generate(monkeypatch, gen_plan, tmp_path, capsys):
    spy = Spy(monkeypatch)
    _fail_nth_copy(monkeypatch, 6, RuntimeError("simulated DMA failure"))   # a few steps in
    out = tmp_path / "gen.json"
    assert main(["generate", str(gen_plan), "--device", "cpu", "--json", str(out)]) == 2
    assert "simulated DMA failure" in one_line_error(capsys)
    spy.assert_released()
    no_leftovers(tmp_path, "gen.json")


def test_generate_runs_clean(gen_plan, tmp_path, capsys):
    out = tmp_path / "gen.json"
    assert main(["generate", str(gen_plan), "--device", "cpu", "--verify", "--json", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["agreement"] == 1.0 and rep["verified_requests"] >= 1


ORDER = """
import torch
from torch import nn

REVERSED = {reversed}


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(4))
        self.head = nn.Linear(64, 8)

    def forward(self, x):
        for layer in (reversed(self.layers) if REVERSED else self.layers):
            x = layer(x)
        return self.head(x)


def build():
    torch.manual_seed(0)
    return Stack(), (torch.randn(2, 64),)
"""


def test_model_running_blocks_out_of_plan_order(tmp_path, capsys):
    factory = tmp_path / "order.py"
    factory.write_text(ORDER.format(reversed=False))
    plan = tmp_path / "order.plan.json"
    save_plan(compile_model(f"py:{factory}:build", budget_bytes=48 << 10, hardware=CPU), plan)
    assert any(b.residency == Residency.streamed for b in load_plan(plan).blocks)
    assert main(["run", str(plan), "--device", "cpu", "--allow-code", "--verify", "--forwards", "1"]) == 0
    capsys.readouterr()
    factory.write_text(ORDER.format(reversed=True))   # same weights, the layers run in the opposite order
    assert main(["run", str(plan), "--device", "cpu", "--allow-code", "--json", str(tmp_path / "o.json")]) == 2
    line = one_line_error(capsys)
    assert "plan order violated at stage 0: the model ran module 'layers.3' (block 'layers.3')" in line
    assert "expected module 'layers.0'" in line
    no_leftovers(tmp_path, "o.json")


# ---------------------------------------------------------------------------------------------------------------
# Output files: atomic
# ---------------------------------------------------------------------------------------------------------------

def test_interrupted_write_leaves_the_old_file(monkeypatch, tmp_path):
    target = tmp_path / "plan.json"
    target.write_text("old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_failed_write_is_one_line_error(monkeypatch, tmp_path):
    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(MemintentError, match="cannot write .*out.json: No space left on device"):
        write_atomic(tmp_path / "out.json", "x")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MemintentError, match="absent does not exist"):
        write_atomic(tmp_path / "absent" / "out.json", "x")


def test_ctrl_c_during_compile_writes_nothing(monkeypatch, tmp_path, capsys):
    """A real SIGINT, delivered while the compiler is inside its prefetch pass (after tracing and the residency
    search): the CLI exits 130 and leaves no output file."""
    import signal

    import memintent.passes.prefetch as prefetch

    real = prefetch.schedule_of
    calls = []

    def interrupted(p):
        calls.append(p.name)
        os.kill(os.getpid(), signal.SIGINT)   # Python raises KeyboardInterrupt at the next bytecode
        return real(p)

    monkeypatch.setattr(prefetch, "schedule_of", interrupted)
    # Python's own SIGINT handler, whatever the test process carries (a CI run once saw the compile finish, exit 0,
    # in an xdist worker): the CLI's promise is about the KeyboardInterrupt that handler raises.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "p.json"
    try:
        rc = main(["compile", "tiny-llama", "--hw", "cpu", "--budget", "1MiB", "-o", str(out)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert calls, "the compile never reached the prefetch pass"
    assert rc == 130, f"SIGINT handler before the test: {previous!r}"
    assert capsys.readouterr().err.strip().splitlines() == ["memintent: interrupted"]
    no_leftovers(tmp_path, "p.json")
