"""The plan file: a ``Program`` as JSON, loaded as data only (pydantic validation, never code)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import ValidationError

from memintent.errors import MemintentError
from memintent.ir.model import SCHEMA_VERSION, Pipeline, Program
from memintent.ir.parser import parse


def _read_text(path: Path, what: str, hint: str = "") -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise MemintentError(f"{what} {path} does not exist{hint}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MemintentError(f"{what} {path} cannot be read as text: {e}") from None


def load_plan(path: str | os.PathLike) -> Program:
    path = Path(path)
    text = _read_text(path, "plan file", f": write one with `memintent compile MODEL -o {path}`")
    return plan_from_json(text, str(path))


def load_program(path: str | os.PathLike) -> Program:
    """A plan JSON file or IR text (``memintent dump``), told apart by the suffix or the first character."""
    path = Path(path)
    text = _read_text(path, "file")
    if path.suffix == ".json" or text.lstrip().startswith("{"):
        return plan_from_json(text, str(path))

    return parse(text, source=str(path))


def plan_from_json(text: str, source: str = "<plan>") -> Program:
    plan = plan_or_pipeline_from_json(text, source)
    if isinstance(plan, Pipeline):
        raise MemintentError(f"{source} is a pipeline of {len(plan.parts)} parts (`compile --gpus`): name one "
                             "plan, or give the pipeline to `generate`, `explain` or `check`")
    return plan


def load_plan_or_pipeline(path: str | os.PathLike) -> Program | Pipeline:
    """A plan file, a pipeline file (``compile --gpus``) or IR text."""
    path = Path(path)
    text = _read_text(path, "file")
    if path.suffix == ".json" or text.lstrip().startswith("{"):
        return plan_or_pipeline_from_json(text, str(path))

    return parse(text, source=str(path))


def plan_or_pipeline_from_json(text: str, source: str = "<plan>") -> Program | Pipeline:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise MemintentError(f"{source}:{e.lineno}:{e.colno}: not JSON ({e.msg}); a plan file is the JSON that "
                             "`memintent compile` writes") from None
    except ValueError as e:   # an integer of more digits than Python converts
        raise MemintentError(f"{source}: not a plan: {str(e).split(';')[0]}") from None
    except RecursionError:
        raise MemintentError(f"{source}: not a plan: JSON nested too deeply") from None
    if not isinstance(raw, dict):
        raise MemintentError(f"{source}: a plan file holds a JSON object, found {type(raw).__name__}")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MemintentError(f"{source}: plan schema_version {version!r} is not {SCHEMA_VERSION}: recompile the "
                             "plan with this version of memintent")
    try:
        return (Pipeline if raw.get("kind") == "pipeline" else Program).model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "plan"
        raise MemintentError(f"{source}: {where}: {first['msg']} ({e.error_count()} problem(s); "
                             "the plan file is not what `memintent compile` writes)") from None


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` once its folder exists and is writable and it is not a folder: checked before long work, so a run
    does not fail at its very end."""
    out = Path(path)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise MemintentError(f"{what} {out}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MemintentError(f"{what} {out}: folder {folder} is not writable")
    if out.is_dir():
        raise MemintentError(f"{what} {out} is a folder: name a file")
    return out


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted or failed write (Ctrl-C, disk full) never leaves a
    half-written file: the target is either untouched or complete. An OS error is a one-line ``MemintentError``."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.",
                                   suffix=".tmp")
    except OSError as e:
        raise MemintentError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        # mkstemp makes it 0600: keep the mode of the file it replaces, else the one a plain open() would give
        if path.exists():
            mode = path.stat().st_mode & 0o777
        else:
            umask = os.umask(0o022)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise MemintentError(f"cannot write {path}: {e.strerror or e}") from None
        raise


def save_plan(program: Program | Pipeline, path: str | os.PathLike) -> None:
    write_atomic(path, program.model_dump_json(indent=1) + "\n")


def plan_json_schema() -> str:
    schema = Program.model_json_schema()
    schema["$id"] = f"urn:memintent:plan:v{SCHEMA_VERSION}"
    schema["title"] = "memintent plan"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
