"""User-facing errors. Anything raised as ``MemintentError`` is bad input or an impossible request: the CLI prints
its one-line message and exits 2 (no traceback unless ``--debug``)."""

from __future__ import annotations


class MemintentError(Exception):
    """Bad input or an infeasible request, reported in one line: what is wrong and what would be right."""

    exit_code = 2

    def __init__(self, message: str):
        # One line, always: the CLI prints it as is.
        super().__init__(" ".join(str(message).split("\n")))


class PlanVerificationError(MemintentError):
    """A plan breaks one of its invariants (budget, arrival before use, slot reuse); names the step and object."""


class IRParseError(MemintentError):
    """IR text that does not parse; the message starts with ``line:column``."""

    def __init__(self, message: str, line: int, column: int, source: str = "<ir>"):
        self.line, self.column = line, column
        super().__init__(f"{source}:{line}:{column}: {message}")


class RuntimeFault(MemintentError):
    """A fault while executing a plan (model ran blocks out of plan order, a copy failed, memory short)."""
