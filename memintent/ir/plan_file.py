"""The plan file: a ``Program`` as JSON, loaded as data only (pydantic validation, never code)."""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from dataclasses import dataclass
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


# ---- output files -----------------------------------------------------------------------------------------
# One rule for every command's outputs (-o, --output, --json, --trace): what a path may name and how it is written.

STDOUT = "-"
SYSTEM_FOLDERS = ("/proc", "/sys")   # kernel interfaces: writing there changes the machine, not a file


@dataclass(frozen=True, slots=True)
class OutputTarget:
    """Where an output goes. ``kind``: ``"stdout"`` (``-``); ``"stream"`` (an existing character device or FIFO,
    such as /dev/null or a named pipe: written directly, in place); ``"file"`` (a regular file or a new path:
    written atomically at ``path``, which for a symbolic link is its target, so the link stays a link)."""

    given: str
    path: Path
    kind: str


def _system_path(real: Path) -> bool:
    return any(real == Path(f) or Path(f) in real.parents for f in SYSTEM_FOLDERS)


def output_target(path: str | os.PathLike, what: str = "output") -> OutputTarget:
    """Classify ``path`` as an output, or refuse it in one line: an empty path, a folder, a block device or a
    socket, a path under /proc or /sys, a missing or read-only folder."""
    text = os.fspath(path)
    if text == "":
        raise MemintentError(f'{what} "": name a file (or - for stdout)')
    if text == STDOUT:
        return OutputTarget(text, Path(text), "stdout")
    given = Path(text)
    try:
        st = os.stat(given)                       # follows symbolic links
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise MemintentError(f"{what} {given}: {e.strerror or e}") from None
    if st is not None and (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
        return OutputTarget(text, given, "stream")
    real = Path(os.path.realpath(given))          # a dangling link: the target it would create
    if _system_path(real):
        raise MemintentError(f"{what} {given}: {real} is under {', '.join(SYSTEM_FOLDERS)}, the kernel's own "
                             "files, not a place for outputs: name a file elsewhere")
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise MemintentError(f"{what} {given} is a folder: name a file")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise MemintentError(f"{what} {given} is a block device or a socket: name a regular file, a character "
                             "device or FIFO, or - for stdout")
    folder = real.parent if given.is_symlink() else (given.parent if str(given.parent) else Path("."))
    if not folder.is_dir():
        raise MemintentError(f"{what} {given}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise MemintentError(f"{what} {given}: folder {folder} is not writable")
    return OutputTarget(text, real, "file")


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: through symbolic or hard links too."""
    try:
        return os.path.samefile(a, b)
    except OSError:   # one does not exist yet: the same path once links are resolved
        return os.path.realpath(a) == os.path.realpath(b)


def check_writable(path: str | os.PathLike, what: str = "output",
                   inputs: dict[str, str | os.PathLike | None] | None = None) -> Path:
    """``path`` once it may be written (``output_target``) and, when it is a file, names none of ``inputs`` (flag ->
    path: the files the command reads or also writes, which writing it would destroy): checked before long work, so
    a run does not fail at its very end or overwrite what it reads."""
    target = output_target(path, what)
    if target.kind == "file":      # a device or FIFO is no file to destroy: /dev/null may take two outputs
        for flag, other in (inputs or {}).items():
            if other not in (None, "", STDOUT) and same_file(path, other):
                raise MemintentError(f"{what} {path} is the same file as {flag} {other}: writing it would destroy "
                                     f"what {flag} names; write to another file")
    return Path(target.given)


def write_atomic(path: str | os.PathLike, data: str | bytes, what: str = "output") -> None:
    """Write ``data`` where ``output_target`` says: a regular file (or a new path, or a link's target) via a
    temporary file and rename, so an interrupted or failed write (Ctrl-C, disk full) never leaves a half-written
    file; stdout, a character device or a FIFO directly. An OS error is a one-line ``MemintentError``."""
    target = output_target(path, what)
    if target.kind == "stdout":
        stream = sys.stdout.buffer if isinstance(data, bytes) else sys.stdout
        stream.write(data)
        stream.flush()
        return
    if target.kind == "stream":
        try:
            with open(target.path, "wb" if isinstance(data, bytes) else "w") as f:
                f.write(data)
        except OSError as e:
            raise MemintentError(f"cannot write {path}: {e.strerror or e}") from None
        return
    _replace(target.path, data.encode() if isinstance(data, str) else data, shown=path)


def _replace(path: Path, data: bytes, shown) -> None:
    """The atomic write of a regular file: a temporary file beside it, renamed over it."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise MemintentError(f"cannot write {shown}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
            raise MemintentError(f"cannot write {shown}: {e.strerror or e}") from None
        raise


def save_plan(program: Program | Pipeline, path: str | os.PathLike) -> None:
    write_atomic(path, program.model_dump_json(indent=1) + "\n")


def plan_json_schema() -> str:
    schema = Program.model_json_schema()
    schema["$id"] = f"urn:memintent:plan:v{SCHEMA_VERSION}"
    schema["title"] = "memintent plan"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
