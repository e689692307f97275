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


def interpreted_outputs(test_module: str, jobs, tmp_path: Path, timeout_s: float = 600):
    """``tests/<test_module>.kernel_outputs(jobs, "cpu")`` computed in a child under the interpreter: the jobs go to
    it, and its outputs come back, through ``torch.save`` files in ``tmp_path``."""
    import torch

    jobs_path, out_path = tmp_path / "jobs.pt", tmp_path / "out.pt"
    torch.save(jobs, jobs_path)
    child = (f"import sys, torch; sys.path.insert(0, {str(ROOT / 'tests')!r}); import {test_module} as t; "
             f"torch.save(t.kernel_outputs(torch.load({str(jobs_path)!r}, weights_only=False), 'cpu'), "
             f"{str(out_path)!r})")
    run_interpreted(["-c", child], timeout_s=timeout_s)
    return torch.load(out_path, weights_only=False)
