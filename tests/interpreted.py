"""Running code in a child process under Triton's interpreter, for the tests of the Triton kernels on the CPU.

Triton decides whether it interprets when it is first imported, and an earlier test in the same process may have
imported it; so each of these tests runs its kernels in a child started with TRITON_INTERPRET=1 and checks the
outputs in its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(argv: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    """``python *argv`` in the repository root under the interpreter (one thread: the tests run in parallel);
    asserts that it exits 0 and returns it, its stdout and stderr as text."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, *argv], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout_s, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return run
