"""Progress of long steps on stderr: a live display on a terminal, a plain line every few seconds anywhere else.

Why two modes: rich's live displays draw only on a terminal. Piped into a file or a log (CI, ``nohup``, a batch
job) they print nothing, so compiling or filling the host store of a 70B model sat silent for minutes. Off a
terminal, this module writes one plain line every ``interval_s`` seconds (from a background thread, so a single
long call such as ``torch.export`` still shows that the process is alive) and one closing line when the step
succeeds, if it wrote any; a step shorter than ``interval_s`` writes nothing. The lines look like::

    compiling llama-3-70b: tracing the decode step (12 s)
    filling host weights: 12.3 of 40.8 GB, 9.1 GB/s, 3 s left
    filling host weights: 40.8 GB in 4.5 s, 9.1 GB/s

API (the compile command, ``HostStore.fill`` and ``profile`` use it; any long step may)::

    from memintent.progress import bar, status

    with status("compiling llama-3-70b") as s:          # a step of unknown length: a spinner and a message
        plan_generation(..., progress=s.update)          # s.update(message) replaces the message
    with bar("filling host weights", total_bytes=n) as b:  # a step counted in bytes: bar, rate, time left
        b.advance(nbytes)

Both take ``enabled`` (False: a reporter that shows nothing, so callers need no second code path), ``console``
(default: a rich Console on stderr; its ``is_terminal`` picks the mode), ``interval_s`` (default: the module's
``INTERVAL_S``, 5 s or ``MEMINTENT_PROGRESS_INTERVAL_S``, read at each call) and ``clock`` (seconds, default ``time.monotonic``; tests pass their own).
``Reporter.line()`` is the plain line of the current state, in either mode.

Amounts and rates are printed in decimal units (kB, MB, GB: 1e3, 1e6, 1e9 bytes), the units of "GB/s" elsewhere
in memintent, so amount and rate read in one unit.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

# Seconds between plain lines off a terminal; MEMINTENT_PROGRESS_INTERVAL_S sets another (a quieter log, or none).
INTERVAL_S = float(os.environ.get("MEMINTENT_PROGRESS_INTERVAL_S", "5"))
_DECIMAL_UNITS = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


def fmt_duration(t_s: float) -> str:
    """Whole seconds for people: 3 s, 2 min 05 s, 1 h 02 min."""
    s = round(max(t_s, 0.0))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def decimal_unit(n_bytes: float) -> tuple[str, float]:
    """The decimal unit a quantity of ``n_bytes`` reads best in, with its size in bytes."""
    for name, scale in _DECIMAL_UNITS:
        if n_bytes >= scale:
            return name, scale
    return "B", 1.0


class Reporter:
    """The state of one step and its plain line. ``update`` and ``advance`` are cheap: nothing is printed from
    them; the terminal display refreshes itself and the plain log is written by a timer."""

    def __init__(self, description: str, total_bytes: int | None, clock: Callable[[], float]):
        self.description = description
        self.message = description
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self._clock = clock
        self._t0_s = clock()
        self._live = None          # the rich Status or (Progress, task id) on a terminal

    def update(self, message: str) -> None:
        """Replace the message shown (a status step)."""
        self.message = message
        if self._live is not None and self.total_bytes is None:
            self._live.update(message)

    def advance(self, n_bytes: int) -> None:
        """Count ``n_bytes`` more as done (a bar step)."""
        self.done_bytes += n_bytes
        if self._live is not None and self.total_bytes is not None:
            prog, task = self._live
            prog.advance(task, n_bytes)

    def elapsed_s(self) -> float:
        return self._clock() - self._t0_s

    def line(self) -> str:
        """The plain line of the current state."""
        elapsed = self.elapsed_s()
        if self.total_bytes is None:
            return f"{self.message} ({fmt_duration(elapsed)})"
        unit, scale = decimal_unit(self.total_bytes)
        rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
        left = (f"{fmt_duration((self.total_bytes - self.done_bytes) / rate)} left" if rate > 0
                else "time left unknown")
        return (f"{self.description}: {self.done_bytes / scale:.1f} of {self.total_bytes / scale:.1f} {unit}, "
                f"{rate / scale:.1f} {unit}/s, {left}")

    def closing_line(self) -> str:
        """The plain line written when a step that logged ends."""
        elapsed = self.elapsed_s()
        if self.total_bytes is None:
            return f"{self.description}: done in {fmt_duration(elapsed)}"
        unit, scale = decimal_unit(self.total_bytes)
        rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
        return (f"{self.description}: {self.done_bytes / scale:.1f} {unit} in {fmt_duration(elapsed)}, "
                f"{rate / scale:.1f} {unit}/s")


def _stderr_console():
    return Console(stderr=True, highlight=False)


@contextlib.contextmanager
def _plain_log(rep: Reporter, console, interval_s: float) -> Iterator[None]:
    """Write ``rep.line()`` every ``interval_s`` seconds while the block runs, and its closing line if it wrote."""
    stop = threading.Event()
    wrote = [False]

    def say(text: str) -> None:
        # soft_wrap: one log line per report, whatever the console width
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    def tick() -> None:
        while not stop.wait(interval_s):
            say(rep.line())
            wrote[0] = True

    thread = threading.Thread(target=tick, name="memintent-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
    if wrote[0]:   # only when the step succeeded: a failed one is followed by its error line instead
        say(rep.closing_line())


@contextlib.contextmanager
def _report(description: str, total_bytes: int | None, *, enabled: bool, console, interval_s: float | None,
            clock: Callable[[], float]) -> Iterator[Reporter]:
    rep = Reporter(description, total_bytes, clock)
    if not enabled:
        yield rep
        return
    console = console if console is not None else _stderr_console()
    if not console.is_terminal:
        with _plain_log(rep, console, INTERVAL_S if interval_s is None else interval_s):
            yield rep
        return
    if total_bytes is None:
        with console.status(description) as st:
            rep._live = st
            yield rep
        return

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as prog:
        rep._live = (prog, prog.add_task(description, total=total_bytes))
        yield rep


def status(description: str, *, enabled: bool = True, console=None, interval_s: float | None = None,
           clock: Callable[[], float] = time.monotonic):
    """A context manager for a step of unknown length; yields a ``Reporter`` whose ``update(message)`` replaces the
    message (pass it as a ``progress`` callback)."""
    return _report(description, None, enabled=enabled, console=console, interval_s=interval_s, clock=clock)


def bar(description: str, total_bytes: int, *, enabled: bool = True, console=None, interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic):
    """A context manager for a step of ``total_bytes`` bytes; yields a ``Reporter`` whose ``advance(n_bytes)``
    counts bytes done."""
    return _report(description, total_bytes, enabled=enabled, console=console, interval_s=interval_s, clock=clock)
