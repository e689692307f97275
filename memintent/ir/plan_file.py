"""The plan file: a ``Program`` as JSON, loaded as data only (pydantic validation, never code)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from pydantic import ValidationError

from memintent.errors import MemintentError
from memintent.ir.model import SCHEMA_VERSION, Program


def load_plan(path: str | os.PathLike) -> Program:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise MemintentError(f"plan file {path} does not exist: write one with `memintent compile MODEL -o {path}`") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MemintentError(f"plan file {path} cannot be read: {e}") from None
    return plan_from_json(text, str(path))


def plan_from_json(text: str, source: str = "<plan>") -> Program:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise MemintentError(f"{source}:{e.lineno}:{e.colno}: not JSON ({e.msg}); a plan file is the JSON that "
                             "`memintent compile` writes") from None
    if not isinstance(raw, dict):
        raise MemintentError(f"{source}: a plan file holds a JSON object, found {type(raw).__name__}")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise MemintentError(f"{source}: plan schema_version {version!r} is not {SCHEMA_VERSION}: recompile the "
                             "plan with this version of memintent")
    try:
        return Program.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(map(str, first["loc"])) or "plan"
        raise MemintentError(f"{source}: {where}: {first['msg']} ({e.error_count()} problem(s); "
                             "the plan file is not what `memintent compile` writes)") from None


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted write never leaves a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_plan(program: Program, path: str | os.PathLike) -> None:
    write_atomic(path, program.model_dump_json(indent=1) + "\n")


def plan_json_schema() -> str:
    schema = Program.model_json_schema()
    schema["$id"] = f"https://memintent.dev/plan.schema.v{SCHEMA_VERSION}.json"
    schema["title"] = "memintent plan"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
