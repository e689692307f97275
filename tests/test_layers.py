"""The house rules of the code itself: layers import only downward (the import-linter contract in pyproject.toml),
and an import inside a function only defers a heavy optional dependency, saying so."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Heavy and optional: imported where they are used (memintent.commands.serve brings FastAPI and uvicorn, the serve
# extra).
DEFERRABLE = ("transformers", "triton", "matplotlib", "memintent.commands.serve")
IR_DEFERRABLE = ("torch",)      # the IR and the passes run without torch; an IR dtype becomes a torch one on demand


def test_layers_import_only_downward():
    # lint-imports reads pyproject.toml's contract; grimp sees imports inside functions as well as module-level ones.
    out = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; "
                          "lint_imports_command()"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout


def function_level_imports() -> list[tuple[str, int, str, str]]:
    """(file, line, imported module, the line's text) of every import inside a function of the package."""
    found = []
    for path in sorted((ROOT / "memintent").rglob("*.py")):
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, (ast.Import, ast.ImportFrom)):
                    module = sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
                    found.append((str(path.relative_to(ROOT)), sub.lineno, module or "", lines[sub.lineno - 1]))
    return found


def test_imports_inside_functions_only_defer_heavy_optional_dependencies():
    def allowed(f: str, module: str) -> bool:
        root = module.split(".")[0]
        return (root in DEFERRABLE or module in DEFERRABLE
                or (f.startswith("memintent/ir/") and root in IR_DEFERRABLE))

    bad = [f"{f}:{n}: {text.strip()}" for f, n, module, text in function_level_imports()
           if not allowed(f, module) or "# deferred" not in text]
    assert not bad, "imports inside functions that are not a commented heavy optional dependency:\n" + "\n".join(bad)


def test_generate_verifies_its_plan_once_and_resolves_its_model_once(tmp_path, monkeypatch):
    """One `generate`: the plan is proven once (the verifier's symbolic run of the actions counts the proofs) and its
    model resolved once (a preset source built once), however many layers (engine, runner, runtime) use them."""
    from memintent.cli import main
    from memintent.models import preset
    from memintent.passes import verify as verify_module

    plan = tmp_path / "tiny.plan.json"
    assert main(["compile", "tiny-llama", "--hw", "cpu", "--budget", "3MiB", "--objective", "throughput",
                 "--context", "64", "--prompt-len", "16", "--gen-len", "4", "-o", str(plan)]) == 0
    proofs, sources = [], []
    run_trace, init = verify_module.run_trace, preset.PresetSource.__init__
    monkeypatch.setattr(verify_module, "run_trace", lambda *a: (proofs.append(1), run_trace(*a))[1])
    monkeypatch.setattr(preset.PresetSource, "__init__", lambda self, *a, **k: (sources.append(1), init(self, *a, **k))[1])
    assert main(["generate", str(plan), "--device", "cpu", "--synthetic", "3", "--output", str(tmp_path / "o.jsonl")]) == 0
    assert (len(proofs), len(sources)) == (1, 1)
