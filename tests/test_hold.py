"""Holding up under a demanding user (issue 21): a stopped batch keeps what it finished, outputs never clobber what
they must not, a plan that ``check`` accepts never crashes ``generate``, bad input is one clean line, and the
``Engine`` API refuses misuse.

Every CLI case asserts the exit code, the one line on stderr and the files left on disk. The SIGTERM and SIGKILL
cases run a real ``memintent generate`` process; everything else calls ``memintent.cli.main`` in this process.
"""

from __future__ import annotations

import copy
import errno
import gzip
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import memintent.runtime as runtime
from memintent.cli import main
from memintent.commands.results import Results
from memintent.compiler.hardware import BUILTIN
from memintent.compiler.planner import plan_generation
from memintent.errors import MemintentError
from memintent.ir.plan_file import save_plan, write_atomic

ROOT = Path(__file__).resolve().parents[1]
CPU = BUILTIN["cpu"]
N = 16   # requests in the batch the stop-and-resume tests serve


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    """A tiny generation plan: up to 8 sequences at once in a pool of 12 pages of 4 tokens, 8 pages of swap."""
    path = tmp_path_factory.mktemp("hold") / "gen.plan.json"
    save_plan(plan_generation("tiny-llama", budget_bytes=3 << 20, hardware=CPU, context=32, prompt_len=8, gen_len=4,
                              objective="throughput", quant="none", dtype="f32", concurrency=4, kv_page_tokens=4,
                              swap_pages=8), path)
    return path


def write_requests(path: Path, n: int = N) -> list:
    """``n`` requests with ids of both JSON types and outputs of 2 to 7 tokens (so they finish at different steps)."""
    ids = [i if i % 2 else f"r{i}" for i in range(n)]
    path.write_text("".join(json.dumps({"id": rid, "prompt_ids": [1 + i, 2, 3, 4][: 2 + i % 3],
                                        "max_new_tokens": 2 + i % 6}) + "\n" for i, rid in enumerate(ids)))
    return ids


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memintent: "), err
    return err[0]


def said(capsys) -> str:
    """What the command printed on stderr, as one line (the console wraps long lines)."""
    return " ".join(capsys.readouterr().err.split())


def ids_of(path: Path) -> list:
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def gen(plan: Path, *extra: str) -> list[str]:
    return ["generate", str(plan), "--device", "cpu", *extra]


@pytest.fixture
def no_allocation(monkeypatch):
    """Fail the test if the host store is created: refusals must come before the work."""
    def refuse(*a, **k):
        raise AssertionError("the run started before the input was refused")

    monkeypatch.setattr(runtime, "HostStore", refuse)


# ---------------------------------------------------------------------------------------------------------------
# 1. A stopped batch loses nothing
# ---------------------------------------------------------------------------------------------------------------

# A long batch, compressed: each engine step sleeps first, so the test can stop the run between two results.
SLOW_RUN = """
import sys, time
from memintent.engine.core import Engine
step = Engine.step
Engine.step = lambda self: (time.sleep(0.15), step(self))[1]
from memintent.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(plan: Path, prompts: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", SLOW_RUN, *gen(plan, "--prompts", str(prompts), "--output",
                                                                  str(out))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop_after_first_result(proc: subprocess.Popen, partial: Path, sig: int) -> tuple[int, str]:
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.read_bytes().count(b"\n") >= 1):
        assert proc.poll() is None, f"the run ended before its first result: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no result within 120 s"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_sigterm_keeps_finished_results_and_resume_serves_the_rest(plan, tmp_path, capsys):
    prompts, out = tmp_path / "r.jsonl", tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    ids = write_requests(prompts)
    rc, err = _stop_after_first_result(_start(plan, prompts, out), partial, signal.SIGTERM)
    assert rc == 143, err
    last = err.strip().splitlines()[-1]
    m = re.fullmatch(rf"memintent: terminated \(SIGTERM\): (\d+) of {N} results are in {re.escape(str(partial))}; "
                     r"run the same command with --resume to serve the rest", last)
    assert m, err[-2000:]
    assert "Traceback" not in err
    kept = partial.read_text().splitlines()
    assert 1 <= int(m[1]) == len(kept) < N, "the run was stopped midway, and the line counts what is on disk"
    assert not out.exists(), "the output appears only once every request is done"
    assert len(set(ids_of(partial))) == len(kept) and set(ids_of(partial)) <= set(ids)
    # without --resume the partial file is not clobbered
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out))) == 2
    assert "holds the results of a run that did not finish: pass --resume" in one_line(capsys)
    assert partial.read_text().splitlines() == kept
    # --resume serves only what is missing; the output holds every id once, in request order
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out), "--resume")) == 0
    assert "serving" not in capsys.readouterr().out
    assert ids_of(out) == ids
    assert set(kept) <= set(out.read_text().splitlines()), "the kept lines are in the output as they were"
    assert not partial.exists()


def test_sigkill_leaves_whole_lines_and_resume_finishes(plan, tmp_path, capsys):
    prompts, out = tmp_path / "r.jsonl", tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    ids = write_requests(prompts)
    rc, _ = _stop_after_first_result(_start(plan, prompts, out), partial, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    data = partial.read_bytes()
    assert data.endswith(b"\n") and all(json.loads(line)["id"] in ids for line in data.splitlines())
    assert not out.exists()
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out), "--resume")) == 0
    assert ids_of(out) == ids and not partial.exists()


def _fail_step(monkeypatch, n: int, exc: BaseException) -> None:
    """The ``n``-th engine step (from 1) raises ``exc``."""
    from memintent.engine.core import Engine

    real, calls = Engine.step, [0]

    def step(self):
        calls[0] += 1
        if calls[0] == n:
            raise exc
        return real(self)

    monkeypatch.setattr(Engine, "step", step)


@pytest.mark.parametrize("exc, code, head", [
    (KeyboardInterrupt(), 130, "memintent: interrupted"),
    (RuntimeError("simulated device fault"), 2, r"memintent: error: serving \(engine step \d+\) failed: RuntimeError: "
                                                r"simulated device fault"),
])
def test_a_stopped_run_says_where_its_results_are(plan, tmp_path, capsys, monkeypatch, exc, code, head):
    prompts, out = tmp_path / "r.jsonl", tmp_path / "out.jsonl"
    ids = write_requests(prompts)
    _fail_step(monkeypatch, 5, exc)
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out))) == code
    partial = tmp_path / "out.jsonl.partial"
    n = len(partial.read_text().splitlines())
    assert re.fullmatch(rf"{head}; {n} of {N} results are in {re.escape(str(partial))}; run the same command with "
                        "--resume to serve the rest", one_line(capsys))
    assert 0 < n < N and not out.exists()
    monkeypatch.undo()
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out), "--resume")) == 0
    assert ids_of(out) == ids and not partial.exists()


def test_a_run_stopped_before_any_result_leaves_no_partial_file(plan, tmp_path, capsys, monkeypatch):
    prompts, out = tmp_path / "r.jsonl", tmp_path / "out.jsonl"
    write_requests(prompts)
    _fail_step(monkeypatch, 1, KeyboardInterrupt())
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out))) == 130
    assert one_line(capsys) == "memintent: interrupted"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


def test_resume_merges_an_earlier_output_and_refuses_foreign_results(plan, tmp_path, capsys):
    prompts, out = tmp_path / "r.jsonl", tmp_path / "out.jsonl"
    write_requests(prompts, 4)
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out))) == 0
    first = out.read_text().splitlines()
    ids = write_requests(prompts, 6)          # two more requests: --resume serves those two only
    capsys.readouterr()
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out), "--resume")) == 0
    assert "tiny-llama: 2 requests" in said(capsys)
    assert ids_of(out) == ids and out.read_text().splitlines()[:4] == first
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out), "--resume")) == 0
    assert f"all {len(ids)} results were already there" in said(capsys)
    write_requests(prompts, 3)                # the output holds results of requests no longer asked for
    before = out.read_bytes()
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out), "--resume")) == 2
    assert re.search(r"--resume: .*out.jsonl holds a result for id 3, which is not among the requests",
                     one_line(capsys))
    assert out.read_bytes() == before
    assert main(gen(plan, "--synthetic", "2", "--resume")) == 2
    assert "--resume finishes the results of an earlier run: name its file with --output" in one_line(capsys)


def test_a_cut_line_is_dropped_on_resume(plan, tmp_path):
    """A partial file whose last line lacks its newline (the machine went down mid-write) resumes from its whole
    lines: the cut piece neither counts nor glues itself to the next line."""
    prompts, out = tmp_path / "r.jsonl", tmp_path / "out.jsonl"
    ids = write_requests(prompts, 4)
    (tmp_path / "out.jsonl.partial").write_text(json.dumps({"id": "r0", "token_ids": [5]}) + '\n{"id": 1, "tok')
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out), "--resume")) == 0
    assert ids_of(out) == ids
    assert json.loads(out.read_text().splitlines()[0])["token_ids"] == [5], "the earlier result is kept as it was"


def test_a_full_disk_cuts_the_partial_file_back_to_whole_lines(tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    results = Results(str(out))
    results.open([])
    results.add({"id": 1, "token_ids": [1, 2]})
    real = os.write

    def half_then_full(fd, data):
        if len(data) > 10:
            return real(fd, data[:10])        # a short write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(MemintentError, match=r"cannot write .*out.jsonl.partial: No space left on device"):
        results.add({"id": 2, "token_ids": [3, 4, 5, 6]})
    monkeypatch.undo()
    assert results.note(2).startswith(f"1 of 2 results are in {out}.partial")
    assert (tmp_path / "out.jsonl.partial").read_text() == '{"id": 1, "token_ids": [1, 2]}\n'


# ---------------------------------------------------------------------------------------------------------------
# 2. Output kinds: what --output (and -o, --json, --trace) may name
# ---------------------------------------------------------------------------------------------------------------

def test_a_symlink_output_writes_its_target(plan, tmp_path):
    prompts, target, link = tmp_path / "r.jsonl", tmp_path / "data" / "out.jsonl", tmp_path / "out.jsonl"
    target.parent.mkdir()
    target.write_text("old\n")
    link.symlink_to(target)
    ids = write_requests(prompts, 3)
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(link))) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert ids_of(target) == ids
    report = tmp_path / "rep.json"
    report.symlink_to(tmp_path / "data" / "rep.json")     # a dangling link: its target is created
    write_atomic(report, "{}\n")
    assert report.is_symlink() and (tmp_path / "data" / "rep.json").read_text() == "{}\n"


def test_stdout_a_device_and_a_fifo_are_written_directly(plan, tmp_path, capsys):
    prompts = tmp_path / "r.jsonl"
    ids = write_requests(prompts, 3)
    assert main(gen(plan, "--prompts", str(prompts), "--output", "-")) == 0
    assert sorted(map(str, (json.loads(x)["id"] for x in capsys.readouterr().out.splitlines()))) == \
        sorted(map(str, ids))   # in the order requests finish
    assert main(gen(plan, "--prompts", str(prompts), "--output", os.devnull, "--json", os.devnull)) == 0
    assert os.path.exists(os.devnull) and not Path(os.devnull).is_file(), "the device stays a device"
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(fifo.read_text().splitlines()))
    reader.start()
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(fifo))) == 0
    reader.join(timeout=30)
    assert sorted(map(str, (json.loads(x)["id"] for x in got))) == sorted(map(str, ids))
    assert fifo.is_fifo() and sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "r.jsonl"]
    capsys.readouterr()
    assert main(gen(plan, "--prompts", str(prompts), "--output", "-", "--resume")) == 2
    assert "--resume reads the results back from --output, and - is not a regular file" in one_line(capsys)


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_output_naming_the_prompts_is_refused_before_the_work(plan, tmp_path, capsys, no_allocation, how):
    prompts = tmp_path / "r.jsonl"
    write_requests(prompts, 3)
    before = prompts.read_bytes()
    out = {"same path": prompts, "symlink": tmp_path / "link.jsonl", "hard link": tmp_path / "hard.jsonl"}[how]
    if how == "symlink":
        out.symlink_to(prompts)
    elif how == "hard link":
        os.link(prompts, out)
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out))) == 2
    assert re.fullmatch(rf"memintent: error: --output {re.escape(str(out))} is the same file as --prompts "
                        rf"{re.escape(str(prompts))}: writing it would destroy what --prompts names; write to another "
                        "file", one_line(capsys))
    assert prompts.read_bytes() == before
    assert not (tmp_path / f"{out.name}.partial").exists()


@pytest.mark.parametrize("argv, match", [
    (["--output", ""], r'--output "": name a file \(or - for stdout\)'),
    (["--json", ""], r'--json "": name a file'),
    (["--output", "/proc/self/status"], r"--output /proc/self/status: .* is under /proc, /sys, the kernel's own files"),
    (["--output", "/sys/kernel/new.jsonl"], r"is under /proc, /sys"),
    (["--trace", "/proc/sys/vm/x.json"], r"--trace /proc/sys/vm/x.json: .* is under /proc"),
    (["--output", "{tmp}"], r"--output .* is a folder: name a file"),
    (["--output", "{tmp}/a.jsonl", "--json", "{tmp}/a.jsonl"], r"--output .*a.jsonl is the same file as --json"),
    (["--output", "{plan}"], r"--output .* is the same file as plan"),
    (["--synthetic", "2", "--prompts", "{tmp}/r.jsonl"], r"--prompts and --synthetic both name the requests"),
])
def test_bad_outputs_and_flags_are_refused_before_the_work(plan, tmp_path, capsys, no_allocation, argv, match):
    write_requests(tmp_path / "r.jsonl", 2)
    argv = [a.format(tmp=tmp_path, plan=plan) for a in argv]
    if "--prompts" not in argv and "--synthetic" not in argv:
        argv += ["--prompts", str(tmp_path / "r.jsonl")]
    assert main(gen(plan, *argv)) == 2
    assert re.search(match, one_line(capsys)), match
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


def test_every_command_follows_the_output_rule(plan, tmp_path, capsys):
    assert main(["compile", "tiny-llama", "--hw", "cpu", "--budget", "1MiB", "-o", ""]) == 2
    assert 'name a file' in one_line(capsys)
    assert main(["compile", "tiny-llama", "--hw", "cpu", "--budget", "1MiB", "-o", "/proc/self/x.json"]) == 2
    assert "is under /proc" in one_line(capsys)
    assert main(["simulate", str(plan), "--trace", str(plan)]) == 2
    assert "is the same file as plan" in one_line(capsys)
    assert main(["report", str(plan), "-o", "-"]) == 2
    assert "report writes its figures beside the page: name a file" in one_line(capsys)


# ---------------------------------------------------------------------------------------------------------------
# 3. A plan that check accepts does not crash generate
# ---------------------------------------------------------------------------------------------------------------

FUZZ_VALUES = (0, -1, 10**6, 10**18)


def numeric_fields(raw) -> dict[str, list]:
    """Each numeric field of a plan, once: field path with list positions as ``*`` -> the path of its last
    instance (the last element of a list, where an edit to 0 is not a no-op)."""
    found: dict[str, list] = {}

    def walk(v, path):
        if isinstance(v, bool):
            return
        if isinstance(v, (int, float)):
            found[".".join("*" if isinstance(k, int) else k for k in path)] = path
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(x, [*path, k])
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, [*path, i])

    walk(raw, [])
    return found


@pytest.fixture
def fast_generate(monkeypatch):
    """``generate`` minus what no plan edit reaches: the pinned-copy rate is not measured (a constant), and a host
    store is built and filled once per distinct set of blocks and weights (a store depends on nothing else)."""
    import memintent.runtime.profile as profile
    from memintent.runtime.host_store import HostStore

    monkeypatch.setattr(profile, "measure_h2d_gbps", lambda device: 10.0)
    stores: dict[str, HostStore] = {}
    filled: set[int] = set()

    def store(program, **kw):
        key = program.model_dump_json(include={"model", "blocks", "objects"})
        if key not in stores:
            stores[key] = HostStore(program, **kw)
        return stores[key]

    real_fill = HostStore.fill

    def fill(self, *a, **k):
        if id(self) not in filled:
            real_fill(self, *a, **k)
            filled.add(id(self))

    monkeypatch.setattr(runtime, "HostStore", store)
    monkeypatch.setattr(HostStore, "fill", fill)


def _outcome(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("value", FUZZ_VALUES)
def test_check_and_generate_agree_on_every_edited_field(value, plan, tmp_path, capsys, fast_generate):
    """Each numeric field set to ``value`` (0, -1, 10**6 and 10**18: one test each, so that pytest-xdist's workers
    share them): either ``check`` accepts and ``generate`` serves, or both refuse with the same one line
    (``generate`` runs the same proof)."""
    raw = json.loads(plan.read_text())
    fields = numeric_fields(raw)
    assert len(fields) > 60 and "kv_pool.swap_pages" in fields
    edited = tmp_path / "edited.plan.json"
    tally = {"served": 0, "refused": 0}
    for name, path in fields.items():
        d = copy.deepcopy(raw)
        holder = d
        for k in path[:-1]:
            holder = holder[k]
        holder[path[-1]] = value
        edited.write_text(json.dumps(d))
        check = _outcome(["check", str(edited)], capsys)
        run = _outcome(gen(edited, "--synthetic", "1", "--prompt-len", "2", "--gen-len", "2"), capsys)
        case = f"{name} = {value}: check {check}, generate {run}"
        if check[0] == 0:
            assert run[0] == 0 and not any("Traceback" in line for line in run[1]), case
            tally["served"] += 1
        else:
            assert check[0] == run[0] == 2 and len(check[1]) == 1 and run[1] == check[1], case
            tally["refused"] += 1
    # for every value both outcomes occur (of 84 fields 40-45 are served, 19 for -1, on this plan); over the four
    # values at least the 50 served and 100 refused the single test used to require
    assert tally["served"] >= 15 and tally["refused"] >= 30, tally
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_edited_swap_space_is_refused_by_check(plan, tmp_path, capsys):
    raw = json.loads(plan.read_text())
    raw["kv_pool"]["swap_pages"] = 10**18
    edited = tmp_path / "swap.plan.json"
    edited.write_text(json.dumps(raw))
    assert main(["check", str(edited)]) == 2
    assert re.search(r"plan verification failed: the plan states \d+ bytes of pinned host memory, but its streamed "
                     r"blocks .* \+ KV swap space .* need \d+ bytes", one_line(capsys))


# ---------------------------------------------------------------------------------------------------------------
# 4. Request files
# ---------------------------------------------------------------------------------------------------------------

def test_jsonl_lines_end_at_newline_only_and_a_bom_is_skipped(plan, tmp_path, capsys):
    prompts, out = tmp_path / "r.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"id": f"a{sep}b", "prompt_ids": [1, 2], "max_new_tokens": 2}, ensure_ascii=False)
             for sep in ("\u2028", "\u2029", "\u0085", "\x0c")]
    prompts.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    assert main(gen(plan, "--prompts", str(prompts), "--output", str(out))) == 0
    assert ids_of(out) == ["a\u2028b", "a\u2029b", "a\u0085b", "a\x0cb"]


def test_prompts_from_stdin(plan, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"id": 1, "prompt_ids": [3, 4]}\n'
                                                                   b'{"id": "b", "prompt_ids": [5]}\n')))
    assert main(gen(plan, "--prompts", "-", "--output", str(out))) == 0
    assert ids_of(out) == [1, "b"]


def test_bad_request_files_are_one_line(plan, tmp_path, capsys, monkeypatch):
    gz, latin, bad = tmp_path / "r.jsonl.gz", tmp_path / "latin.jsonl", tmp_path / "bad.jsonl"
    gz.write_bytes(gzip.compress(b'{"id": 1, "prompt_ids": [1]}\n'))
    latin.write_bytes(b'{"id": "caf\xe9", "prompt_ids": [1]}\n')
    bad.write_text('{"id": 1, "prompt_ids": [1]}\n{"id": 2, "prompt_ids": [1.5]}\n')
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"id": 1, "prompt_ids": "123"}\n')))
    for argv, match in (
            (["--prompts", str(gz)], r"--prompts .*r.jsonl.gz is gzip-compressed: decompress it first"),
            (["--prompts", str(latin)], r"--prompts .*latin.jsonl is not UTF-8 text \(byte 0xe9 at offset 11\)"),
            (["--prompts", str(bad)], r"bad.jsonl:2: request 2: prompt_ids must hold integer token ids: 1.5 is a float"),
            (["--prompts", "-"], r"stdin:1: request 1: prompt_ids must be a list of integer token ids, not str '123'"),
            (["--prompts", ""], r'--prompts "": name a JSON-lines file, or - for stdin')):
        assert main(gen(plan, *argv, "--output", str(tmp_path / "out.jsonl"))) == 2, argv
        assert re.search(match, one_line(capsys)), match
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out.jsonl.partial").exists()


# ---------------------------------------------------------------------------------------------------------------
# 5. The Engine API
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def engine(plan):
    from memintent.engine import Engine

    with Engine(plan, device="cpu") as e:
        yield e


@pytest.mark.parametrize("fields, match", [
    (dict(prompt_ids="123"), r"request 'a': prompt_ids must be a list of integer token ids, not str '123'"),
    (dict(prompt_ids=(1.0, 2.0)), r"request 'a': prompt_ids must hold integer token ids: 1.0 is a float"),
    (dict(prompt_ids=(1, True)), r"prompt_ids must hold integer token ids: True is a bool"),
    (dict(prompt_ids=None), r"prompt_ids must be a list of integer token ids, not NoneType"),
    (dict(max_new_tokens="ten"), r"request 'a': max_new_tokens must be a positive integer, not str 'ten'"),
    (dict(max_new_tokens=2.5), r"max_new_tokens must be a positive integer, not float 2.5"),
    (dict(max_new_tokens=0), r"max_new_tokens must be a positive integer, not int"),
    (dict(stop_token_ids=5), r"stop_token_ids must be a list of integer token ids, not int"),
    (dict(id=1.5), r"a request: id must be a string or an integer, not float 1.5"),
    (dict(id=True), r"a request: id must be a string or an integer, not bool True"),
    (dict(prompt=b"hi"), r"prompt must be a string \(the prompt's text\) or None, not bytes"),
])
def test_a_request_checks_its_fields_when_built(fields, match):
    from memintent.engine import Request

    with pytest.raises(MemintentError, match=match) as e:
        Request(**{"id": "a", "prompt_ids": (1, 2), "max_new_tokens": 3, **fields})
    assert "\n" not in str(e.value)


def test_a_request_takes_token_ids_as_a_list_or_a_1d_tensor():
    import numpy as np
    import torch

    from memintent.engine import Request

    r = Request(7, torch.tensor([1, 2, 3]), max_new_tokens=np.int64(2), stop_token_ids=[4])
    assert (r.id, r.prompt_ids, r.max_new_tokens, r.stop_token_ids) == (7, (1, 2, 3), 2, (4,))
    assert type(r.max_new_tokens) is int and all(type(t) is int for t in r.prompt_ids)
    with pytest.raises(MemintentError, match=r"request 7: prompt_ids must be 1-D token ids, not a 2-D Tensor of shape "
                                             r"\(1, 3\): give one request per prompt"):
        Request(7, torch.tensor([[1, 2, 3]]), max_new_tokens=2)


def test_engine_refuses_duplicate_ids_and_work_after_close(engine):
    from memintent.engine import Request

    r = Request("a", (1, 2), max_new_tokens=2)
    with pytest.raises(MemintentError, match=r"request 'a' appears twice \(in this call\)"):
        list(engine.generate([r, Request("a", (3,), max_new_tokens=2)]))
    assert not engine.has_work, "a refused call queues nothing"
    engine.add(Request(1, (1, 2), max_new_tokens=2))
    with pytest.raises(MemintentError, match=r"request 1 appears twice \(in this call and queued already\)"):
        list(engine.generate([Request(1, (3,), max_new_tokens=2)]))
    assert [o.id for o in engine.generate([r])] in (["a", 1], [1, "a"])
    with pytest.raises(MemintentError, match="the engine serves Request objects, not dict"):
        engine.add({"id": "b", "prompt_ids": [1]})
    engine.close()
    for call in (lambda: list(engine.generate([Request("b", (1,), max_new_tokens=1)])), engine.step):
        with pytest.raises(MemintentError, match=r"the engine is closed \(its arena was released\): make a new Engine"):
            call()


def test_breaking_out_of_generate_cancels_what_it_queued(engine):
    from memintent.engine import Request

    free = engine.pool.free_pages
    requests = [Request(i, (1 + i, 2, 3), max_new_tokens=2 + i) for i in range(10)]
    first = None
    for out in engine.generate(requests):
        first = out
        break
    assert first is not None and first.id in range(10)
    assert not engine.has_work and engine.pool.free_pages == free, "every page went back"
    engine.pool.check()
    assert [o.id for o in engine.generate([Request("next", (4, 5), max_new_tokens=2)])] == ["next"], \
        "no result of the abandoned call comes out of the next one"


def test_breaking_out_of_a_pipelines_generate_cancels_what_it_queued():
    """A pipeline's sequence may be in a micro-batch still in flight when the caller stops: it is dropped when that
    batch leaves, and nothing of the abandoned call comes out later."""
    from memintent.engine.core import Engine

    from memintent.compiler.pipeline import plan_pipeline
    from memintent.engine import Request

    pl = plan_pipeline("tiny-llama", parts=2, budget_bytes=2 << 20, hardware=CPU, context=32, prompt_len=8,
                       gen_len=4, dtype="f32")
    with Engine(pl, "cpu") as engine:
        free = engine.pool.free_pages
        for _ in engine.generate([Request(i, (1 + i, 2, 3), max_new_tokens=2 + i) for i in range(10)]):
            break
        assert engine._inflight, "a micro-batch was in flight when the caller stopped"
        left = [o.id for o in engine.generate([Request("next", (4, 5), max_new_tokens=2)])]
        assert left == ["next"] and not engine.has_work
        assert engine.pool.free_pages == free
        engine.pool.check()
