"""The OpenAI-compatible server (``memintent serve``) with the real chat model on the CPU, through the official
``openai`` client: streamed and unstreamed answers, many clients at once, clients that go away, the error codes,
and the command itself (a tiny preset, started and stopped with Ctrl-C as a user would)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn

from memintent.compiler.hardware import BUILTIN
from memintent.compiler.planner import plan_generation
from memintent.engine import Engine, Request
from memintent.engine.pages import PagePool, SwapSpace
from memintent.engine.scheduler import Costs, Scheduler
from memintent.engine.sequence import State
from memintent.ir.plan_file import save_plan
from memintent.serve.app import Server, create_app
from memintent.serve.loop import EngineLoop

KEY = "test-key"
PROMPTS = ["The capital of France is", "Once upon a time", "The best way to learn", "My favourite food is",
           "In 1492,", "Water boils at", "The sun is", "Cats are", "A good book", "Python is a",
           "The ocean", "Music makes", "On Monday I", "The first rule of", "Mountains are", "Coffee or tea?"]


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest: one intra-op thread for this module


def _start(app) -> tuple[uvicorn.Server, threading.Thread, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    return server, thread, sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(smollm2_plan):
    """The real model behind the HTTP API in this process: the API key ``KEY``, no waiting room beyond the plan's
    sequences at once (so that the 503 is reachable), the pool checked after every step."""
    engine = Engine(smollm2_plan, "cpu", check=True)
    loop = EngineLoop(engine)
    srv = Server(loop, model_name="smollm2", tokenizer=engine.src.tokenizer(), api_key=KEY, max_waiting=0)
    server, thread, port = _start(create_app(srv))
    base = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(base=base, srv=srv, loop=loop, engine=engine,
                          client=openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=300))
    server.should_exit = True
    thread.join(60)


def _idle(served, timeout_s: float = 120) -> None:
    """Wait until nothing is in flight, then check the pool's invariants on the engine thread."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = served.loop.call(lambda e: (e.has_work, e.pool.used_pages)).result(timeout=60)
        if served.srv.in_flight == 0 and state == (False, 0):
            break
        assert time.monotonic() < deadline, f"still busy: {state}, {served.srv.in_flight} in flight"
        time.sleep(0.05)
    served.loop.call(lambda e: e.pool.check()).result(timeout=60)


def _streamed(client, **kw) -> tuple[str, str | None]:
    text, reason = "", None
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            reason = c.finish_reason or reason
    return text, reason


def test_models_health_and_metrics(served):
    assert [m.id for m in served.client.models.list().data] == ["smollm2"]
    assert httpx.get(f"{served.base}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{served.base}/metrics").text
    total = served.engine.pool.num_pages - 1
    assert f"memintent_kv_pool_pages_total {total}" in metrics.splitlines()
    assert "# TYPE memintent_generated_tokens_total counter" in metrics


def test_sixteen_clients_streamed_text_is_the_unstreamed_text(served):
    def one(i: int) -> tuple:
        kw = dict(model="smollm2", prompt=PROMPTS[i], max_tokens=10, temperature=0)
        if i % 4 == 1:
            kw["stop"] = ["\n", " the"]                 # stop strings: the stream holds back what they could cut
        whole = served.client.completions.create(**kw).choices[0]
        return (whole.text, whole.finish_reason), _streamed(served.client, **kw)

    before = httpx.get(f"{served.base}/metrics").text
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(16)))
    for i, (whole, streamed) in enumerate(results):
        assert streamed == whole, PROMPTS[i]
        assert whole[0] or i % 4 == 1, f"an empty answer to {PROMPTS[i]!r}"
    assert any(w[1] == "stop" and w[0] for w, _ in results[1::4]), "a stop string must cut one of them"
    steps = _metric(httpx.get(f"{served.base}/metrics").text, "steps_total") - _metric(before, "steps_total")
    generated = sum(len(w[0]) > 0 for w, _ in results)
    assert steps < 10 * 2 * generated, "the clients' requests must share steps"
    _idle(served)


def _metric(text: str, name: str) -> float:
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(f"memintent_{name} ")))


def test_chat_streamed_is_unstreamed_and_stops_at_end_of_sequence(served):
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
              temperature=0)
    whole = served.client.chat.completions.create(**kw).choices[0]
    assert whole.message.content == "The capital of France is Paris." and whole.finish_reason == "stop"
    text = ""
    for chunk in served.client.chat.completions.create(stream=True, **kw):
        text += "".join(c.delta.content or "" for c in chunk.choices)
    assert text == whole.message.content
    _idle(served)


def test_a_client_dropped_mid_stream_frees_its_blocks(served):
    m = served.loop.metrics
    before = (m.generated_tokens, m.finished["cancelled"])
    with httpx.Client(timeout=300) as http:
        body = dict(model="smollm2", prompt="Once upon a time", max_tokens=200, stream=True, ignore_eos=True)
        with http.stream("POST", f"{served.base}/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            events = (line for line in r.iter_lines() if line.startswith("data:"))
            for _ in range(3):
                next(events)                 # three tokens arrive; then the client goes away
    _idle(served)                        # the pool's invariants hold, and every block came back
    assert m.finished["cancelled"] == before[1] + 1
    assert m.generated_tokens - before[0] < 200, "generation must stop when its client goes away"


def test_error_codes(served):
    c = served.client
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="gpt-4", prompt="hi")
    assert e.value.status_code == 400 and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="context of 256 tokens"):
        c.completions.create(model="smollm2", prompt=[7] * 300)
    with pytest.raises(openai.BadRequestError, match="context of 256 tokens; lower max_tokens"):
        c.completions.create(model="smollm2", prompt="hi", max_tokens=1000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model="smollm2", prompt="hi", extra_body={"temperature": "hot"})
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{served.base}/v1/completions", content=b"{not json", headers=auth)
    assert r.status_code == 400 and "not a JSON object" in r.json()["error"]["message"]
    r = httpx.post(f"{served.base}/v1/chat/completions", json={"model": "smollm2"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("messages: Field required")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.base}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{served.base}/v1/models").status_code == 401
    _idle(served)


def test_a_full_server_answers_503_with_retry_after(served):
    cap = served.srv.capacity
    body = dict(model="smollm2", prompt="Tell me a story", max_tokens=200, stream=True, ignore_eos=True)
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=300, limits=httpx.Limits(max_connections=cap + 4)) as http:
        with contextlib.ExitStack() as stack:
            for _ in range(cap):
                r = stack.enter_context(http.stream("POST", f"{served.base}/v1/completions", json=body,
                                                    headers=headers))
                assert r.status_code == 200
            full = http.post(f"{served.base}/v1/completions", json={**body, "stream": False}, headers=headers)
            assert full.status_code == 503
            assert full.headers["Retry-After"] == "1"
            assert "the server is full" in full.json()["error"]["message"]
    _idle(served)                        # all the streams went away: every block is back


def test_seeded_sampling_repeats_through_the_server(served):
    kw = dict(model="smollm2", prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.95)
    a, b, other = (served.client.completions.create(seed=s, **kw).choices[0].text for s in (5, 5, 6))
    assert a == b
    assert a != other
    _idle(served)


# ---- abort, unit --------------------------------------------------------------------------------------------

def test_abort_frees_blocks_and_swap_slots_in_every_state():
    costs = Costs(page_tokens=4, step_tokens=16, evict_page_s=1.0, swap_in_page_s=0.5, recompute_page_s=1.0,
                  copy_idle_s=100.0, compute_slack_s=0.0, urgency_s=10.0)
    pool, swap = PagePool(7), SwapSpace(8, 16, pin=False)
    sched = Scheduler(pool, swap, costs, max_seqs=3, step_tokens=16, context=40, preempt="swap")
    for i in range(4):
        sched.add(Request(f"r{i}", tuple(range(1, 9)), max_new_tokens=20))
    while not sched.swapped:                      # run until one is swapped out; the fourth still waits
        plan = sched.schedule()
        sched.postprocess(plan, [5] * sum(c.sample for c in plan.chunks), 0.0)
    states = {s.request.id: s.state for s in sched.sequences}
    assert State.swapped in states.values() and State.waiting in states.values()
    for rid in sorted(states, key=lambda r: states[r].value):
        assert sched.abort(rid) is not None
        pool.check()
    assert sched.abort("r0") is None, "a finished request is not aborted twice"
    assert not sched.has_work and pool.used_pages == 0 and swap.free_pages == 8
    assert {s.finish_reason for s in sched.sequences} == {"cancelled"}


# ---- the command --------------------------------------------------------------------------------------------

def test_serve_command_answers_then_stops_on_ctrl_c(tmp_path):
    plan = plan_generation("tiny-llama", budget_bytes=3 << 20, hardware=BUILTIN["cpu"], context=48, prompt_len=8,
                           gen_len=8, quant="none", concurrency=3, kv_page_tokens=4, dtype="f32")
    path = tmp_path / "tiny.plan.json"
    save_plan(plan, path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "memintent", "serve", str(path), "--port", "0", "--device", "cpu",
                             "--api-key", KEY, "--shutdown-timeout", "1"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        while "serving" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited before serving"
        base = line.split(" on ")[1].split("/v1")[0]
        assert base.startswith("http://127.0.0.1:"), "it binds to this machine only unless told otherwise"
        headers = {"Authorization": f"Bearer {KEY}"}
        r = httpx.post(f"{base}/v1/completions", json=dict(model="tiny-llama", prompt=[3, 4, 5], max_tokens=4,
                                                              temperature=0), headers=headers, timeout=120)
        assert r.status_code == 200
        choice = r.json()["choices"][0]
        assert len(choice["token_ids"]) == 4 and choice["text"] == "", "a model without a tokenizer answers in ids"
        with httpx.stream("POST", f"{base}/v1/completions", headers=headers, timeout=120, json=dict(
                model="tiny-llama", prompt=[3, 4, 5], max_tokens=40, stream=True, ignore_eos=True)) as s:
            events = s.iter_lines()
            assert next(e for e in events if e.startswith("data:"))
            proc.send_signal(signal.SIGINT)
            rest = [e for e in events if e.startswith("data:")]
        assert rest[-1] == "data: [DONE]" or "shutting down" in json.loads(rest[-1][5:])["error"]["message"]
        assert proc.wait(timeout=60) == 0
        assert "memintent serve: stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
