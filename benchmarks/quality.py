"""What quantization costs a real model: perplexity of SmolLM2-135M-Instruct on two public-domain texts (CPU).

Each row scores the same tokens, in windows of ``--window`` tokens (each window on its own, its first token
unscored), with the model run the way the product runs it:

* ``transformers``: the folder loaded with ``from_pretrained`` in float32 (the reference);
* ``memintent, unquantized`` / ``int8`` / ``int4`` / ``int4g``: a forward plan that streams every block it can
  (every decoder layer and the embedding, which the head shares) at that bit width, except that the planner keeps
  the embedding at int8 under int4/int4g (``passes.residency.block_quant``), run through ``memintent.load``: the
  runtime packs, copies and unpacks each block as on a GPU;
* ``engine, f32 KV`` / ``engine, int8 KV``: a generation plan (weights unquantized, all resident) whose serving
  engine prefills each window in its own steps of ``--step`` tokens: every step's attention reads the earlier
  steps' keys and values from the KV pool (int8 with one scale per token and head in the second row).

    python benchmarks/quality.py --out $OUT                 # both texts whole (~8k tokens each): minutes
    python benchmarks/quality.py --tokens 512 --rows transformers int8 int4g kv-int8

Prints a table last and writes ``quality.json`` under ``--out``. The texts are kept in benchmarks/data/ (origin and
license in each file's header). tests/test_quality.py runs a short slice with the acceptance bounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATA = Path(__file__).resolve().parent / "data"
TEXTS = {"sqlite3.h": DATA / "sqlite3_h.txt", "KJV Genesis": DATA / "kjv_genesis.txt"}
# row -> what it says in the table
ROWS = {"transformers": "transformers, float32", "none": "memintent, streamed, unquantized",
        "int8": "int8 streamed weights", "int4": "int4 streamed weights (symmetric, groups of 128; embedding int8)",
        "int4g": "int4g streamed weights (scale and min per 32; embedding int8)", "kv-f32": "engine, f32 KV pool",
        "kv-int8": "engine, int8 KV pool"}
WEIGHT_ROWS = {"none": "none", "int8": "int8", "int4": "int4", "int4g": "int4g"}   # row -> --quant
KV_ROWS = {"kv-f32": "none", "kv-int8": "int8"}                                      # row -> --kv-quant


def read_text(path: Path) -> str:
    """The scored text: everything after the header's closing line of three dashes."""
    head, sep, text = path.read_text().partition("\n---\n")
    if not sep:
        raise ValueError(f"{path}: no '---' line ends the header")
    return text


def windows(ids: list[int], window: int) -> list[torch.Tensor]:
    """Consecutive windows of ``window`` tokens (a shorter last one is dropped unless it is the only one)."""
    n = max(1, len(ids) // window)
    return [torch.tensor(ids[i * window:(i + 1) * window]) for i in range(n)]


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed negative log-likelihood of ``ids[1:]`` under ``logits[:-1]`` (T, vocab), in float64."""
    return torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="sum").item()


# ---- the rows -------------------------------------------------------------------------------------------------

def transformers_nll(folder: Path, wins: list[torch.Tensor]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        return sum(nll_sum(model(w[None]).logits[0], w) for w in wins)


@functools.lru_cache(maxsize=4)
def _costed_trace(folder: Path, window: int):
    """The model traced for one window and costed (the slow part of compiling), shared by the weight rows."""
    from memintent.compiler.compile import trace_ref
    from memintent.compiler.hardware import BUILTIN
    from memintent.ir.model import RunShape
    from memintent.passes import COSTS, LIFETIMES, run_passes

    program = trace_ref(f"hf:{folder}", RunShape(batch=1, seq=window)).model_copy(
        update={"budget_bytes": 1 << 40, "hardware": BUILTIN["cpu"]})
    return run_passes(program, (LIFETIMES, COSTS))


def forward_plan(folder: Path, window: int, quant: str):
    """A forward plan of one window that streams every block a hook can wait for, at bit width ``quant``."""
    from memintent.ir.model import Quant
    from memintent.passes import ACTIONS, PREFETCH, VERIFY, run_passes
    from memintent.passes.residency import forced_resident, given_residency_pass

    program = _costed_trace(folder, window).model_copy(deep=True)
    visited = {v.block for v in program.visits}
    streamed = visited - forced_resident(program)
    return run_passes(program, (given_residency_pass(streamed, 2, Quant(quant)), PREFETCH, ACTIONS, VERIFY))


def memintent_nll(folder: Path, wins: list[torch.Tensor], quant: str) -> float:
    import memintent

    plan = forward_plan(folder, len(wins[0]), quant)
    model, handle = memintent.load(plan, device="cpu")
    try:
        with torch.no_grad():
            return sum(nll_sum(model(w[None]).logits[0], w) for w in wins)
    finally:
        handle.detach()


def generation_plan(folder: Path, window: int, step: int, kv_quant: str):
    from memintent.compiler.hardware import BUILTIN
    from memintent.compiler.planner import plan_generation

    return plan_generation(f"hf:{folder}", budget_bytes=8 << 30, hardware=BUILTIN["cpu"], context=window + 1,
                           prompt_len=window, gen_len=1, quant="none", kv_quant=kv_quant, concurrency=1,
                           dtype="f32", max_step_tokens=step)


def engine_nll(folder: Path, wins: list[torch.Tensor], kv_quant: str, step: int) -> float:
    """Each window as one request's prompt, prefilled by the engine's own scheduler in steps of ``step`` tokens;
    each step runs the runner's forward with the logits of every row kept (the engine keeps only the last)."""
    from memintent.engine import Engine
    from memintent.engine.sequence import Request

    total = 0.0
    with Engine(generation_plan(folder, len(wins[0]), step, kv_quant), "cpu") as eng:
        run = eng.runners[0]
        for i, w in enumerate(wins):
            eng.add(Request(id=str(i), prompt_ids=tuple(w.tolist()), max_new_tokens=1))
            rows = []
            while eng.has_work:
                batch = eng.scheduler.schedule()
                run.move_pages(batch)
                ids, positions, sample_rows, meta = run.inputs(run.lists(batch))
                logits = run.run_model(ids, positions, torch.arange(ids.shape[1]), meta)   # (T, vocab): every row
                rows.append(logits[:sum(c.length for c in batch.chunks if c.start < len(w))])
                eng.scheduler.postprocess(batch, logits[sample_rows].argmax(-1).tolist(), 0.0)
            total += nll_sum(torch.cat(rows)[:len(w)], w)
    return total


# ---- the table ------------------------------------------------------------------------------------------------

def measure(folder: Path, *, tokens: int | None = None, window: int = 1024, step: int = 256,
            rows=ROWS, texts=tuple(TEXTS), progress=print) -> dict:
    """``{"texts": {name: tokens scored}, "rows": {row: {text: perplexity}}}`` for the rows and texts asked."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    out = {"model": str(folder), "window": window, "step": step, "texts": {}, "rows": {r: {} for r in rows}}
    for name in texts:
        ids = tok(read_text(TEXTS[name]))["input_ids"][:tokens]
        wins = windows(ids, min(window, len(ids)))
        scored = sum(len(w) - 1 for w in wins)
        out["texts"][name] = scored
        for row in rows:
            t0 = time.perf_counter()
            if row == "transformers":
                nll = transformers_nll(folder, wins)
            elif row in WEIGHT_ROWS:
                nll = memintent_nll(folder, wins, WEIGHT_ROWS[row])
            else:
                nll = engine_nll(folder, wins, KV_ROWS[row], step)
            out["rows"][row][name] = math.exp(nll / scored)
            progress(f"{name}: {row}: perplexity {out['rows'][row][name]:.3f} ({time.perf_counter() - t0:.0f} s)")
    return out


def table(result: dict) -> str:
    texts = list(result["texts"])
    base = result["rows"].get("transformers", {})
    head = "| | " + " | ".join(f"{t} ({result['texts'][t]} tokens)" for t in texts) + " |"
    lines = [head, "|---" * (len(texts) + 1) + "|"]
    for row, ppl in result["rows"].items():
        cells = []
        for t in texts:
            rel = f" ({100 * (ppl[t] / base[t] - 1):+.2f} %)" if t in base and row != "transformers" else ""
            cells.append(f"{ppl[t]:.2f}{rel}")
        lines.append(f"| {ROWS[row]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_folder() -> Path:
    """The converted SmolLM2 folder (MEMINTENT_TEST_CACHE/smollm2 when set), converted on first use."""
    from memintent.models.gguf import convert

    cache = os.environ.get("MEMINTENT_TEST_CACHE")
    folder = Path(cache) / "smollm2" if cache else Path.home() / ".cache" / "memintent" / "smollm2"
    if not (folder / "config.json").is_file():
        convert("smollm2", folder)
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="an hf: folder (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=None, help="score only the first N tokens of each text")
    ap.add_argument("--window", type=int, default=1024, help="tokens per scored window (1024)")
    ap.add_argument("--step", type=int, default=256, help="engine rows: prompt tokens per step (256)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                    help=f"what to score (default all): {', '.join(ROWS)}")
    ap.add_argument("--out", default=None, help="folder for quality.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    folder = args.model or default_folder()
    result = measure(folder, tokens=args.tokens, window=args.window, step=args.step, rows=args.rows)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "quality.json").write_text(json.dumps(result, indent=1))
    print(f"\nperplexity, {folder.name}, float32, windows of {result['window']} tokens")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
