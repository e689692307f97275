"""Serving on the CPU backend: a tiny preset in float32, a pool small enough that sequences are preempted.

References: the resident model running each request alone (dense attention, no cache: an independent
implementation of the same math), and the same engine with every weight resident, which must make the same steps
and so compute bitwise the same tokens.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from stops import cut_at_stops

from memintent.cli import main
from memintent.compiler.hardware import BUILTIN
from memintent.compiler.planner import plan_generation
from memintent.engine import Engine
from memintent.engine.reference import reference_logits
from memintent.engine.requests import synthetic
from memintent.engine.sampling import SamplingParams
from memintent.ir.model import Residency
from memintent.ir.plan_file import save_plan
from memintent.models.plan_model import resident_model
from memintent.models.refs import resolve

CPU = BUILTIN["cpu"]
REQUESTS = 40


@pytest.fixture(scope="module")
def plan():
    # Weights are 3.4 MiB in float32; the budget leaves room for a few sequences' KV next to the streamed layers.
    p = plan_generation("tiny-llama", budget_bytes=3 << 20, hardware=CPU, context=48, prompt_len=8, gen_len=8,
                        quant="none", concurrency=3, kv_page_tokens=4, swap_pages=64, dtype="f32")
    assert any(b.residency == Residency.streamed for b in p.blocks), "the plan must stream some layers"
    return p


@pytest.fixture(scope="module")
def requests():
    return synthetic(REQUESTS, (2, 30), (1, 14), 512, seed=7)


@pytest.fixture(scope="module")
def alone(requests):
    """Each request's greedy tokens from the resident model run on it alone (dense, recomputing every step)."""
    src = resolve("tiny-llama", dtype="f32")
    model = resident_model(src, torch.device("cpu"))
    out = {}
    with torch.no_grad():
        for r in requests:
            toks = []
            for _ in range(r.max_new_tokens):
                logits = reference_logits(src, model, r.prompt_ids, toks + [0], torch.device("cpu"))   # (n+1, V)
                toks.append(int(logits[-1].argmax()))
            out[r.id] = toks
    return out


def _serve(plan, requests, **kw):
    with Engine(plan, "cpu", **kw) as eng:
        outs = {o.id: o for o in eng.generate(requests)}
        return outs, eng.stats


@pytest.mark.parametrize("policy", ["swap", "recompute"])
def test_preempted_requests_generate_what_each_alone_does(plan, requests, alone, policy):
    outs, stats = _serve(plan, requests, preempt=policy, check=True)
    kinds = {p.kind for p in stats.preemptions}
    assert kinds == {policy}, f"the pool must force {policy} preemptions (saw {kinds or 'none'})"
    for r in requests:
        assert outs[r.id].token_ids == alone[r.id], r.id
        assert outs[r.id].finish_reason == "length"
    assert max(s.sequences for s in stats.steps) > 1, "steps must pack several sequences"
    assert any(s.decode_tokens and s.prefill_tokens for s in stats.steps), "prompt chunks ride with decodes"


@pytest.mark.parametrize("policy", ["swap", "recompute"])
def test_streamed_engine_is_bitwise_the_resident_engine(plan, requests, policy):
    streamed, s1 = _serve(plan, requests, preempt=policy)
    resident, s2 = _serve(plan, requests, preempt=policy, resident=True)
    assert [s.tokens for s in s1.steps] == [s.tokens for s in s2.steps]
    assert {k: o.token_ids for k, o in streamed.items()} == {k: o.token_ids for k, o in resident.items()}


# ---- looking ahead: the next step launched before this one's tokens are read ------------------------------------
# On CUDA the engine launches step t + 1 before it reads step t's tokens (``Engine._step_ahead``); the CPU backend
# runs the same logic when asked, which is what these tests check: what is generated, where sequences stop, the pool.


@pytest.mark.parametrize("policy", ["swap", "recompute"])
def test_lookahead_generates_what_each_alone_does(plan, requests, alone, policy):
    outs, stats = _serve(plan, requests, preempt=policy, check=True, lookahead=True)
    assert {p.kind for p in stats.preemptions} == {policy}
    assert {k: o.token_ids for k, o in outs.items()} == alone
    assert all(o.finish_reason == "length" for o in outs.values())


def test_lookahead_stops_a_sequence_one_step_late_and_drops_that_step(plan, requests, alone):
    reqs, expect = cut_at_stops(requests, alone)
    ahead, s_ahead = _serve(plan, reqs, check=True, lookahead=True)
    plain, s_plain = _serve(plan, reqs, check=True, lookahead=False)
    for out in (ahead, plain):
        assert {k: (o.token_ids, o.finish_reason) for k, o in out.items()} == expect
    # The step launched ahead ran each stopped sequence once more (its token thrown away): more tokens ran.
    assert sum(s.tokens for s in s_ahead.steps) > sum(s.tokens for s in s_plain.steps)


def test_lookahead_draws_the_same_sampled_tokens_and_logprobs(plan, requests):
    params = SamplingParams(temperature=0.9, top_p=0.95, presence_penalty=0.5, seed=11, logprobs=2)
    reqs = [dataclasses.replace(r, sampling=params) for r in requests[:12]]
    ahead, _ = _serve(plan, reqs, lookahead=True)
    plain, _ = _serve(plan, reqs, lookahead=False)
    assert {k: (o.token_ids, o.logprobs) for k, o in ahead.items()} == \
        {k: (o.token_ids, o.logprobs) for k, o in plain.items()}


def test_lookahead_gives_back_every_page_of_a_run_given_up(plan, requests):
    with Engine(plan, "cpu", check=True, lookahead=True) as eng:
        for _ in eng.generate(requests[:8]):
            break                                # the caller stops waiting: the rest are cancelled
        assert eng.has_work, "the step launched ahead is still to be recorded"
        while eng.has_work:
            eng.step()
        assert eng.pool.used_pages == 0


def test_lookahead_aborts_a_request_in_flight_and_serves_the_others(plan, requests, alone):
    # A client that goes away while its sequence is in the step launched ahead (the server's abort): the sequence is
    # dropped when that step is recorded, nothing of it comes back, and the others generate what they do alone.
    mine = requests[:10]
    with Engine(plan, "cpu", check=True, lookahead=True) as eng:
        for r in mine:
            eng.add(r)
        outs = {}
        for _ in range(3):
            outs.update((o.id, o) for o in eng.step())
        in_flight = [c.seq.request.id for e in eng._inflight.values() for c in e.batch.chunks]
        assert in_flight, "a step was launched ahead"
        gone = in_flight[0]
        assert eng.abort(gone)
        while eng.has_work:
            outs.update((o.id, o) for o in eng.step())
        assert eng.pool.used_pages == 0
    assert gone not in outs
    assert {k: o.token_ids for k, o in outs.items()} == {r.id: alone[r.id] for r in mine if r.id != gone}


def test_cost_policy_logs_both_predicted_costs(plan, requests):
    lines = []
    outs, stats = _serve(plan, requests, log=lines.append)
    assert stats.preemptions and len(lines) == len(stats.preemptions)
    assert all("predicted swap" in ln and "recompute" in ln for ln in lines)
    for p in stats.preemptions:
        assert p.kind == ("swap" if p.swap_s < p.recompute_s else "recompute")


def test_checked_mode_poisons_freed_blocks(plan, requests):
    with Engine(plan, "cpu", check=True, preempt="recompute") as eng:
        list(eng.generate(requests[:6]))
        free = [eng.runners[0].views.page(b) for b in range(1, eng.pool.num_pages) if eng.pool.owner[b] is None]
        assert len(free) == eng.pool.num_pages - 1, "every block is back in the pool"
        poisoned = [bool((blk == 0xFF).all()) for blk in free]
        assert any(poisoned), "blocks that were used and returned are poisoned"
        assert all(p or not blk.any() for p, blk in zip(poisoned, free)), "the others were never written"
        assert not eng.runners[0].views.page(0).any(), "the null page stays zero"


def test_a_step_holds_no_logits_of_the_step_before(plan, requests):
    """The plan proves one step's activations: the previous step's logits (up to max_seqs x vocab) must be gone when
    the next step runs, or they sit in device memory beside what the proof counts (seen on an H200: 24.004 GiB
    measured against a 24 GiB budget)."""
    with Engine(plan, "cpu") as eng:
        held = []
        hook = eng.runners[0].model.register_forward_pre_hook(lambda m, a: held.append(eng.last_logits))
        list(eng.generate(requests[:6]))
        hook.remove()
        assert len(held) > 3 and eng.last_logits is not None
        assert all(h is None for h in held)


# ---- the command -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plan_file(plan, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "p.plan.json"
    save_plan(plan, path)
    return path


def test_generate_command_writes_one_line_per_request(plan_file, tmp_path, capsys):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text('{"id": "a", "prompt_ids": [1, 2, 3], "max_new_tokens": 4}\n\n'
                    '{"id": 7, "prompt_ids": [5, 6], "max_new_tokens": 3, "stop_token_ids": [1]}\n')
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(plan_file), "--device", "cpu", "--prompts", str(reqs), "--output", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a", 7]   # each id keeps its JSON type
    assert len(lines[0]["token_ids"]) == 4 and lines[0]["finish_reason"] == "length"
    assert set(lines[1]) == {"id", "token_ids", "finish_reason", "ttft_s", "tpot_s", "preemptions"}
    err = capsys.readouterr().err
    assert "time to first token" in err and "KV pool" in err and "preemptions" in err


def test_generate_synthetic_mix(plan_file, tmp_path):
    js = tmp_path / "rep.json"
    assert main(["generate", str(plan_file), "--device", "cpu", "--synthetic", "6", "--prompt-len", "4:20",
                 "--gen-len", "2:6", "--seed", "3", "--json", str(js)]) == 0
    rep = json.loads(js.read_text())
    assert rep["requests"] == 6 and rep["generated_tokens"] >= 12 and rep["steps"] >= 6


@pytest.mark.parametrize("line,expect", [
    ('{"id": 1, "prompt_ids": [1, 2]', "r.jsonl:2: not a JSON object"),
    ('{"id": 1, "prompt_ids": []}', "r.jsonl:2: request 1: the prompt is empty"),
    ('{"id": 1, "prompt_ids": [' + ", ".join(["3"] * 60) + "]}", "r.jsonl:2: request 1: the prompt has 60 tokens, "
                                                                   "more than the plan's context 48"),
    ('{"id": 1, "prompt_ids": [1], "stop_token_ids": [99999]}', "r.jsonl:2: request 1: stop token id 99999"),
    ('{"id": 1, "prompt": "hello"}', "r.jsonl:2: a text prompt needs a tokenizer"),
    ('{"id": 1, "prompt_ids": [1], "max_tokens": 3}', "r.jsonl:2: unknown key 'max_tokens'"),
    ('[1, 2]', "r.jsonl:2: a request line is a JSON object"),
])
def test_bad_request_lines_are_refused_before_anything_runs(plan_file, tmp_path, capsys, line, expect):
    reqs = tmp_path / "r.jsonl"
    reqs.write_text('{"id": 0, "prompt_ids": [1, 2]}\n' + line + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", str(plan_file), "--device", "cpu", "--prompts", str(reqs), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expect in err[0], err
    assert not out.exists(), "nothing may be half-written"


def test_trace_and_report_show_the_pool_and_preemptions(plan_file, tmp_path):
    trace, html = tmp_path / "serve.trace.json", tmp_path / "serve.html"
    assert main(["generate", str(plan_file), "--device", "cpu", "--synthetic", "12", "--prompt-len", "10:30",
                 "--gen-len", "8:14", "--preempt", "recompute", "--trace", str(trace)]) == 0
    events = json.loads(trace.read_text())["traceEvents"]
    kv = [e for e in events if e.get("name") == "KV pool (pages)"]
    pre = [e for e in events if e.get("cat") == "preemption"]
    assert kv and pre and all(e["args"]["kind"] == "recompute" for e in pre)
    assert all(e["args"]["used"] + e["args"]["free"] == plan_file_usable(plan_file) for e in kv)
    assert any(e.get("pid") == 2 for e in events), "the runtime's measured steps are in the trace too"
    assert main(["report", str(plan_file), "--trace", str(trace), "-o", str(html)]) == 0
    assert (tmp_path / "serve-kv.png").stat().st_size > 1000
    assert "KV pool over the run" in html.read_text() and "by recompute" in html.read_text()


def plan_file_usable(path) -> int:
    return json.loads(path.read_text())["kv_pool"]["num_pages"] - 1


def test_the_warm_step_leaves_no_trace_in_the_run(plan, requests, alone):
    # On CUDA the engine's start runs a step of the plan's full prompt tokens and a decode as throwaway requests
    # (``Engine._warm_step``); the CPU backend skips it, so it is called here: afterwards the statistics start
    # from zero, every page is back in the pool, and the run generates what each request alone does.
    with Engine(plan, "cpu") as eng:
        assert eng.warm_s == 0.0, "the CPU backend has no first uses to warm"
        assert eng._warm_step() > 0
        assert eng.stats.steps == [] and not eng.has_work
        assert eng.pool.used_pages == 0, "the warm requests returned their pages"
        outs = {o.id: o.token_ids for o in eng.generate(requests)}
        steps = eng.stats.steps
    assert outs == alone
    assert steps[0].start_s < 1.0, "the run's clock starts at its own first step"
