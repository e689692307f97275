"""``generate --output``: each request's result line is written as the request finishes, so a stopped run keeps
what it finished.

A regular file (or a new path) ``OUT``: the lines go to ``OUT.partial`` in the order requests finish, each with
one ``write`` call on an unbuffered descriptor, so a killed process (SIGKILL, the OOM killer) leaves whole lines
only; a failed write (a full disk) is cut back to the last whole line. When every request is done, ``OUT`` is
written atomically with every request's line once, in request order, and ``OUT.partial`` is removed. A run that
fails or is interrupted leaves ``OUT.partial`` and says how many results it holds. ``--resume`` serves only the
requests whose ids neither ``OUT.partial`` nor an existing ``OUT`` holds, and keeps those lines as they are.

Stdout (``-``), a character device or a FIFO: the lines are written there directly, in the order requests finish
(there is nothing to rename, and nothing to resume from).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from memintent.engine.sequence import RequestId
from memintent.errors import MemintentError
from memintent.ir.plan_file import STDOUT, check_writable, output_target, write_atomic

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path) + PARTIAL_SUFFIX)


def _result_id(line: str, where: str) -> RequestId:
    """The id of a result line that an earlier run wrote."""
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError):
        raw = None
    rid = raw.get("id") if isinstance(raw, dict) else None
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise MemintentError(f"{where}: not a result line of memintent generate (a JSON object with an \"id\"): "
                             "fix or delete the line, or delete the file to serve every request again")
    return rid


def read_results(path: Path) -> dict[RequestId, str]:
    """Id -> line (with its newline) of each whole result line in ``path`` (none if it does not exist); a last
    line without its newline (the write was cut off) does not count."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise MemintentError(f"--resume: {path} cannot be read as results: {getattr(e, 'strerror', None) or e}") \
            from None
    out: dict[RequestId, str] = {}
    for n, line in enumerate(text.split("\n")[:-1], 1):     # the piece after the last newline is not a line
        if line.strip():
            out.setdefault(_result_id(line, f"{path}:{n}"), line + "\n")
    return out


class Results:
    """Where ``generate`` writes results: ``open`` before the run (returns the requests still to serve), ``add``
    each result as it finishes, ``finish`` after the run; ``note`` says what a stopped run kept."""

    def __init__(self, path: str, *, resume: bool = False, inputs: dict | None = None):
        check_writable(path, "--output", inputs)
        self.path, self.resume = path, resume
        self.kind = output_target(path, "--output").kind
        self.partial = partial_path(path) if self.kind == "file" else None
        if self.partial is not None:
            check_writable(self.partial, "--output's partial file", inputs)
        elif resume:
            raise MemintentError(f"--resume reads the results back from --output, and {path} is not a regular file: "
                                 "name a file")
        self.done: dict[RequestId, str] = {}      # results of earlier runs (--resume), kept as they were written
        self.in_output = 0                        # --resume: results an existing OUT holds (not in the partial)
        self._fd: int | None = None
        self._stream = None
        self._created = False

    def open(self, requests: list) -> list:
        """Start writing; returns the requests whose results are not on disk yet (all of them without --resume)."""
        if self.partial is None:
            self._stream = sys.stdout if self.path == STDOUT else open(self.path, "w")   # noqa: SIM115
            return list(requests)
        if self.partial.exists() and not self.resume:
            raise MemintentError(f"{self.partial} holds the results of a run that did not finish: pass --resume to "
                                 "serve only the requests it lacks, or delete it to start again")
        if self.resume:
            self._take_earlier(requests)
        self._created = not self.partial.exists()
        try:
            self._fd = os.open(self.partial, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            self._cut_to_whole_lines()
        except OSError as e:
            raise MemintentError(f"cannot write {self.partial}: {e.strerror or e}") from None
        return [r for r in requests if r.id not in self.done]

    def _take_earlier(self, requests: list) -> None:
        """--resume: the results ``OUT`` and ``OUT.partial`` hold (``OUT``'s first), each for one of ``requests``."""
        earlier = read_results(Path(self.path)) if Path(self.path).is_file() else {}
        in_partial = read_results(self.partial)
        self.in_output = len(set(earlier) - set(in_partial))
        ids = {r.id for r in requests}
        for rid, line in [*earlier.items(), *in_partial.items()]:
            if rid not in ids:
                raise MemintentError(f"--resume: {self.path if rid in earlier else self.partial} holds a result for id "
                                     f"{rid!r}, which is not among the requests: resume with the requests that "
                                     "started the run")
            self.done.setdefault(rid, line)

    def _cut_to_whole_lines(self) -> None:
        """A partial file whose last write was cut off (a crash of the machine) ends in a piece of a line: drop it,
        so that the next line starts a line of its own."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        with open(self.partial, "rb") as f:
            data = f.read()
        if not data.endswith(b"\n"):
            os.ftruncate(self._fd, data.rfind(b"\n") + 1)

    def add(self, out_json: dict) -> None:
        """One finished request's result, on disk when this returns."""
        line = json.dumps(out_json) + "\n"
        if self._stream is not None:
            try:
                self._stream.write(line)
                self._stream.flush()
            except OSError as e:
                raise MemintentError(f"cannot write {self.path}: {e.strerror or e}") from None
            return
        data = line.encode()
        size = os.fstat(self._fd).st_size
        try:
            while data:                        # one call unless the disk fills: then cut back to whole lines
                data = data[os.write(self._fd, data):]
        except OSError as e:
            os.ftruncate(self._fd, size)
            raise MemintentError(f"cannot write {self.partial}: {e.strerror or e}") from None

    def finish(self, requests: list) -> None:
        """Every request is done: ``OUT`` gets each one's line once, in request order, and the partial file goes."""
        self._close()
        if self.partial is None:
            return
        got = read_results(self.partial)
        text = "".join(self.done.get(r.id) or got[r.id] for r in requests)
        try:
            write_atomic(self.path, text, "--output")
        except MemintentError as e:       # a full disk at the very end: the results are still in the partial file
            e.add_note(self.note(len(requests)) or "")
            raise
        self.partial.unlink(missing_ok=True)

    def note(self, total: int) -> str | None:
        """After a failure or an interrupt: what is on disk, in one clause (None when nothing was kept)."""
        self._close()
        if self.partial is None or not self.partial.exists():
            return None
        n = len(read_results(self.partial))   # counted on disk: a signal may land between a write and any count
        if n == 0 and self._created:
            self.partial.unlink(missing_ok=True)
            return None
        kept = f"{n} of {total} results are in {self.partial}"
        if self.in_output:
            kept = (f"{n + self.in_output} of {total} results are in {self.partial} ({n}) and {self.path} "
                    f"({self.in_output})")
        return f"{kept}; run the same command with --resume to serve the rest"

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._stream is not None and self._stream is not sys.stdout:
            self._stream.close()
        self._stream = None
