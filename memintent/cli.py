"""The ``memintent`` command: compile, explain, dump, check, run.

Every user error is a ``MemintentError``: one line on stderr, exit code 2, no traceback unless ``--debug``.
Ctrl-C exits 130 after the runtime has drained its streams.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from memintent.errors import MemintentError

EPILOG = "Run `memintent COMMAND -h` for a command's options. Sizes take units: 24GiB, 512MiB, 80GB."


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _out_console():
    from rich.console import Console

    # A pipe gets a wide table rather than rich's 80-column default.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


# ---------------------------------------------------------------------------------------------------------------
# compile


def cmd_compile(args: argparse.Namespace) -> int:
    from memintent.compiler.compile import compile_model
    from memintent.compiler.hardware import load_profile
    from memintent.ir.plan_file import save_plan
    from memintent.units import fmt_bytes, fmt_s, parse_bytes

    hw = load_profile(args.hw)
    budget = parse_bytes(args.budget, "--budget") if args.budget else None
    out = Path(args.output or f"{args.model.replace(':', '_').replace('/', '_').strip('_')}.plan.json")
    if not out.parent.exists():
        raise MemintentError(f"output folder {out.parent} does not exist")
    console = _console()
    with console.status(f"compiling {args.model}") as status:
        plan = compile_model(
            args.model, budget_bytes=budget, hardware=hw, batch=args.batch, seq=args.seq, kv_len=args.kv_len,
            kv_block_tokens=args.kv_block_tokens, dtype=args.dtype, allow_code=True, depth=args.depth,
            progress=lambda msg: status.update(f"{args.model}: {msg}"))
    save_plan(plan, out)
    pr = plan.prediction
    streamed = sum(1 for b in plan.blocks if b.residency.value == "streamed")
    console.print(
        f"wrote {out}: {len(plan.steps)} steps, {len(plan.blocks)} blocks ({streamed} streamed, depth "
        f"{pr.prefetch_depth}), peak {fmt_bytes(pr.peak_hbm_bytes)} of {fmt_bytes(plan.budget_bytes)}, "
        f"predicted {fmt_s(pr.step_time_s)} per forward (floor {fmt_s(pr.floor_s)}, binds: {pr.binding})")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# explain / dump / check


def _load_any(path: str):
    """A plan JSON file or IR text, told apart by the first non-blank character."""
    from memintent.ir.plan_file import load_plan, plan_from_json

    p = Path(path)
    if p.suffix == ".json":
        return load_plan(p)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise MemintentError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MemintentError(f"{path} cannot be read as text: {e}") from None
    if text.lstrip().startswith("{"):
        return plan_from_json(text, path)
    from memintent.ir.parser import parse

    return parse(text, source=path)


def cmd_explain(args: argparse.Namespace) -> int:
    from memintent.explain import explain

    explain(_load_any(args.plan), _out_console())
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    from memintent.ir.printer import dump

    sys.stdout.write(dump(_load_any(args.plan)))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from memintent.passes.verify import verify

    program = _load_any(args.file)
    if program.arena is None:
        _console().print(f"{args.file}: parses; it holds no plan yet, so there is nothing more to verify")
        return 0
    verify(program)
    pr = program.prediction
    _console().print(f"{args.file}: ok ({len(program.steps)} steps, {len(program.actions)} actions; peak "
                     f"{pr.peak_hbm_bytes if pr else '-'} B <= budget {program.budget_bytes} B)")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from memintent.compiler.models import PRESETS
    from memintent.units import fmt_bytes

    con = _out_console()
    for name, cfg in PRESETS.items():
        con.print(f"{name:14s} {cfg.n_layers:3d} layers  dim {cfg.dim:5d}  {cfg.num_params() / 1e9:7.2f}B params  "
                  f"{fmt_bytes(cfg.num_params() * (4 if cfg.dtype == 'f32' else 2)):>10s} {cfg.dtype}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# run


def cmd_run(args: argparse.Namespace) -> int:
    from memintent.run import run_plan

    return run_plan(args)


# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="memintent", description=__doc__.splitlines()[0] if __doc__ else None,
                                 epilog=EPILOG)
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", help="trace a model and write a verified plan file")
    c.add_argument("model", help="a preset (see `memintent presets`), hf:PATH or py:MODULE:FUNCTION")
    c.add_argument("--budget", help="HBM budget, e.g. 24GiB (default: the profile's whole card)")
    c.add_argument("--batch", type=int, default=1, help="sequences per forward (default 1)")
    c.add_argument("--seq", type=int, default=64, help="tokens per sequence in the traced forward (default 64)")
    c.add_argument("--kv-len", type=int, default=0, help="tokens of KV cache to reserve per sequence (default 0)")
    c.add_argument("--kv-block-tokens", type=int, default=64, help="tokens per KV block object (default 64)")
    c.add_argument("--hw", default="h100-sxm", help="hardware profile: h100-sxm, h200, a100-80g, rtx-4090 or FILE.json")
    c.add_argument("--dtype", help="weight dtype override (bf16, f16, f32)")
    c.add_argument("--depth", type=int, help="force this many stream slots (default: chosen by the cost model)")
    c.add_argument("-o", "--output", help="plan file to write (default MODEL.plan.json)")
    c.set_defaults(fn=cmd_compile)

    e = sub.add_parser("explain", help="a table of the plan's choices per block")
    e.add_argument("plan")
    e.set_defaults(fn=cmd_explain)

    d = sub.add_parser("dump", help="print the IR text of a plan")
    d.add_argument("plan")
    d.set_defaults(fn=cmd_dump)

    k = sub.add_parser("check", help="parse and verify a plan file or IR text (exit 0, or 2 with the reason)")
    k.add_argument("file")
    k.set_defaults(fn=cmd_check)

    pz = sub.add_parser("presets", help="list the built-in model presets")
    pz.set_defaults(fn=cmd_presets)

    r = sub.add_parser("run", help="execute a plan: forward passes with streaming (CUDA when present)")
    r.add_argument("plan")
    r.add_argument("--tokens", default=None, help="BATCHxSEQ of random token ids (default: the plan's shape)")
    r.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    r.add_argument("--forwards", type=int, default=3, help="forward passes to run (default 3)")
    r.add_argument("--check", action="store_true", help="poison freed slots with NaN to catch out-of-plan use")
    r.add_argument("--verify", action="store_true", help="also run the resident model and compare logits")
    r.add_argument("--allow-code", action="store_true", help="allow a py: model factory named by the plan to run")
    r.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    r.set_defaults(fn=cmd_run)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not getattr(args, "fn", None):
        ap.print_help()
        return 2
    try:
        return int(args.fn(args) or 0)
    except MemintentError as e:
        if args.debug:
            traceback.print_exc()
        print(f"memintent: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("memintent: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
