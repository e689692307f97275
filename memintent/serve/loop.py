"""The engine loop: one thread owns the engine and steps it while there is work; the web server talks to it only
through a thread-safe inbox.

    loop = EngineLoop(engine)
    loop.start(asyncio.get_running_loop())
    loop.submit(request, sink)        # sink(delta) runs on the event loop after each step that gave the request
                                      # tokens; the last delta has a finish_reason (or an error)
    loop.abort(request.id)            # its client went away: its KV pages are free before the next step
    loop.close()                      # cancels what is left, closes the engine

Requests join the running batch at the step after they arrive (the scheduler admits them as its budgets allow).
After each step every live request's new tokens go back in one ``call_soon_threadsafe`` call for the whole step,
so a step of hundreds of streams costs the event loop one wake-up.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from dataclasses import dataclass
from typing import Callable

from memintent.engine.sampling import TokenLogprobs
from memintent.engine.sequence import Request, Sequence, State
from memintent.errors import MemintentError
from memintent.serve.metrics import ServerMetrics


@dataclass(slots=True)
class Delta:
    """What one step gave one request."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None      # set on the last delta: "stop", "length" or "context"
    stop_text: str | None = None          # with "stop" by a stop string: the whole text, cut before it
    error: str | None = None              # the request failed (refused, or the engine stopped): no more deltas
    status: int = 500                     # with ``error``: the HTTP status it answers


@dataclass(slots=True)
class _Live:
    seq: Sequence
    sink: Callable[[Delta], None]
    sent: int = 0                         # generated tokens delivered so far


class EngineLoop:
    """Steps ``engine`` on its own thread. ``metrics``: updated after every step. ``keep_steps``: keep every step's
    record in ``step_log`` (a benchmark's; a server keeps none)."""

    def __init__(self, engine, metrics: ServerMetrics | None = None, keep_steps: bool = False):
        self.engine = engine
        self.step_log: list | None = [] if keep_steps else None
        self.metrics = metrics or ServerMetrics(num_pages=engine.pool.num_pages)
        self.failed: str | None = None            # why the engine stopped serving (then every request is refused)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}
        self._aloop = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()

    # -- any thread -------------------------------------------------------------------------------------------
    def start(self, aloop) -> None:
        """Start stepping; deltas are delivered on the asyncio loop ``aloop``."""
        self._aloop = aloop
        self._thread = threading.Thread(target=self._run, name="memintent-engine", daemon=True)
        self._thread.start()

    def submit(self, request: Request, sink: Callable[[Delta], None]) -> None:
        self._inbox.put(("add", request, sink))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run ``fn(engine)`` on the engine thread between steps (the pool's state, read consistently)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, fut))
        return fut

    def cancel_all(self, why: str, status: int = 503) -> None:
        """End every request in flight now, each with the error ``why`` (a server shutting down)."""
        self._inbox.put(("cancel", why, status))

    def close(self, timeout_s: float | None = None) -> None:
        """Cancel what is in flight, close the engine and end the thread (it finishes its current step first)."""
        if self._thread is None:
            if not self._closed.is_set():
                self._closed.set()
                self.engine.close()
            return
        self._inbox.put(("close",))
        self._thread.join(timeout_s)

    @property
    def in_flight(self) -> int:
        return len(self._live)

    # -- the engine thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while self._take(block=not self.engine.has_work or self.failed is not None):
                if self.engine.has_work and self.failed is None:
                    self._step()
        finally:
            self._on_cancel("the server is shutting down", 503)
            self._refuse_arrivals("the server is shutting down", 503)
            self._closed.set()
            self.engine.close()

    def _take(self, block: bool) -> bool:
        """Handle what arrived (waiting for something when ``block``); False once asked to close."""
        while True:
            try:
                msg = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if msg[0] == "close":
                return False
            getattr(self, f"_on_{msg[0]}")(*msg[1:])

    def _on_add(self, request: Request, sink) -> None:
        if self.failed is not None:
            self._post([(sink, Delta([], error=f"the engine stopped: {self.failed}", status=503))])
            return
        try:
            seq = self.engine.add(request)
        except MemintentError as e:
            self._post([(sink, Delta([], error=str(e), status=400))])
            return
        self._live[request.id] = _Live(seq, sink)
        self.metrics.prompt_tokens += len(request.prompt_ids)

    def _on_abort(self, request_id: str) -> None:
        if self._live.pop(request_id, None) is not None and self.engine.abort(request_id):
            self.metrics.finished["cancelled"] += 1

    def _on_call(self, fn, fut: concurrent.futures.Future) -> None:
        try:
            fut.set_result(fn(self.engine))
        except Exception as e:      # the caller gets it
            fut.set_exception(e)

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as e:      # the engine cannot go on: every request is told, and the server is unhealthy
            self.failed = f"{type(e).__name__}: {e}"
            self._on_cancel(f"the engine stopped: {self.failed}", 500)
            return
        out, generated = [], 0
        for rid, live in list(self._live.items()):
            delta = self._delta(live)
            if delta is None:
                continue
            generated += len(delta.token_ids)
            out.append((live.sink, delta))
            if delta.finish_reason is not None:
                del self._live[rid]
                self.metrics.finished[delta.finish_reason] += 1
        records, self.engine.stats.steps = self.engine.stats.steps, []      # a server keeps no history of steps
        if self.step_log is not None:
            self.step_log += records
        self.metrics.observe(records, self.engine.scheduler, self.engine.pool, generated)
        self.engine.scheduler.forget_finished()
        self._post(out)

    @staticmethod
    def _delta(live: _Live) -> Delta | None:
        seq = live.seq
        new = seq.generated[live.sent:]
        done = seq.state == State.finished
        if not new and not done:
            return None
        lps = seq.logprobs[live.sent:] if seq.request.sampling.logprobs is not None else None
        live.sent += len(new)
        return Delta(new, lps, finish_reason=seq.finish_reason if done else None, stop_text=seq.stop_text)

    def _on_cancel(self, why: str, status: int) -> None:
        out = []
        for rid, live in self._live.items():
            try:
                self.engine.abort(rid)
            except Exception:       # the engine already failed; the requests are told either way
                pass
            out.append((live.sink, Delta([], error=why, status=status)))
        self._live.clear()
        self._post(out)

    def _refuse_arrivals(self, why: str, status: int) -> None:
        """Requests that arrived after the loop stopped taking them are told so."""
        out = []
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if msg[0] == "add":
                out.append((msg[2], Delta([], error=why, status=status)))
            elif msg[0] == "call":
                msg[2].cancel()
        self._post(out)

    def _post(self, out: list) -> None:
        if not out or self._aloop is None:
            return
        try:
            self._aloop.call_soon_threadsafe(_deliver, out)
        except RuntimeError:        # the event loop is closed: nobody is listening any more
            pass


def _deliver(out: list) -> None:
    for sink, delta in out:
        sink(delta)
