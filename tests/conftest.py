"""Shared test plumbing: the fuzz tests' tally of inputs tried, reported at the end of the session."""

from __future__ import annotations

import collections

import pytest

# target -> inputs tried this session (tests/test_fuzz.py adds to it through the ``fuzz_tally`` fixture)
FUZZ_TALLY: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="session")
def fuzz_tally() -> collections.Counter[str]:
    return FUZZ_TALLY


def fuzz_summary() -> str:
    parts = ", ".join(f"{k} {v}" for k, v in sorted(FUZZ_TALLY.items()))
    return f"fuzz: {sum(FUZZ_TALLY.values())} inputs tried ({parts})"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    # Shown in plain `pytest -q` output too (a print in a fixture finalizer is captured unless -s).
    if FUZZ_TALLY:
        terminalreporter.write_line(fuzz_summary())
