"""Shared test plumbing: the fuzz tests' tally of inputs tried, reported at the end of the session."""

from __future__ import annotations

import collections

import pytest



class FuzzTally(collections.Counter):
    """target -> inputs tried this session; ``outcomes``: verified / rejected / parsed -> count."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: collections.Counter[str] = collections.Counter()


# tests/test_fuzz.py adds to it through the ``fuzz_tally`` fixture
FUZZ_TALLY = FuzzTally()


@pytest.fixture(scope="session")
def fuzz_tally():
    yield FUZZ_TALLY
    print(f"\n{fuzz_summary()}")   # at session teardown; seen with -s (the terminal summary below shows it always)


def fuzz_summary() -> str:
    parts = ", ".join(f"{k} {v}" for k, v in sorted(FUZZ_TALLY.items()))
    outcomes = ", ".join(f"{v} {k}" for k, v in sorted(FUZZ_TALLY.outcomes.items()))
    return f"fuzz: {sum(FUZZ_TALLY.values())} inputs tried ({parts}); outcomes: {outcomes or '-'}"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    # Shown in plain `pytest -q` output too (a print in a fixture finalizer is captured unless -s).
    if FUZZ_TALLY:
        terminalreporter.write_line(fuzz_summary())
