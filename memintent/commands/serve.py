"""``memintent serve``: an OpenAI-compatible HTTP server over a generation plan (``memintent.serve``).

Everything that can be refused is refused before the host store is filled: a plan that does not verify, a pipeline
file, a port that cannot be listened on. The port is announced once the engine is ready (the socket is listening
from the start, so a client that connects early waits in the backlog). Ctrl-C stops accepting, lets in-flight
requests finish for ``--shutdown-timeout`` seconds, cancels the rest, releases the engine and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import threading
from pathlib import Path

import uvicorn
from rich.console import Console

from memintent.engine.core import Engine, RunOptions
from memintent.errors import MemintentError
from memintent.ir.model import Program
from memintent.ir.proven import Proven
from memintent.passes.verify import prove
from memintent.progress import status
from memintent.runtime.device import pick_device
from memintent.runtime.profile import measure_h2d_gbps
from memintent.serve.app import Server, create_app
from memintent.serve.loop import EngineLoop
from memintent.serve.metrics import ServerMetrics

API_KEY_ENV = "MEMINTENT_API_KEY"


def _load(path: str) -> Proven:
    """The plan, verified once (a plan file is untrusted input: run only what verifies); one plan, not a pipeline."""
    proven = prove(path).generation_plan(path)
    if proven.pipeline is not None:
        raise MemintentError(f"{path} is a pipeline of {proven.parts} parts: serve runs one plan on one GPU; "
                             "compile without --gpus, or serve the pipeline's requests with generate")
    return proven


def model_name(program: Program) -> str:
    """The name clients ask for: an hf: folder's name, else the plan's model reference."""
    ref = program.model.ref
    return Path(ref[3:]).name if ref.startswith("hf:") else ref


def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise MemintentError(f"--port {port} is not a port: use 1-65535 (0: any free port)")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        raise MemintentError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}): choose "
                             "another --port or --host") from None
    return sock


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _floor_s(program: Program, device) -> float:
    """A step's PCIe floor, the bytes it moves over the host link (streamed copies and mapped reads) / pinned H2D
    measured now (before the arena takes its memory)."""

    link = program.prediction.link_bytes
    if not link:
        return 0.0
    return link / (measure_h2d_gbps(device, nbytes=256 << 20) * 1e9)


def run_serve(args) -> int:
    """The CLI command."""
    proven = _load(args.plan)
    program = proven.program
    device = pick_device(args.device)
    sock = _listen(args.host, args.port)
    con = _console()
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    floor_s = _floor_s(program, device)
    with status(f"loading {program.name} for serving", console=con):
        engine = Engine(proven, options=RunOptions(device=device, check=args.check, allow_code=args.allow_code,
                                                   preempt=args.preempt))
    g = program.generation
    metrics = ServerMetrics(num_pages=program.kv_pool.num_pages, floor_s=floor_s, predicted_step_s=g.decode_step_s)
    loop = EngineLoop(engine, metrics)
    try:
        srv = Server(loop, model_name=args.model_name or model_name(program), tokenizer=engine.src.tokenizer(),
                     api_key=api_key, max_waiting=args.max_waiting)
        server = _Graceful(uvicorn.Config(create_app(srv), log_level="warning", access_log=False,
                                          timeout_graceful_shutdown=args.shutdown_timeout + 5, lifespan="on"),
                           loop, args.shutdown_timeout)
    except BaseException:
        loop.close()
        raise
    host, port = sock.getsockname()[:2]
    con.print(f"serving {srv.model_name} ({g.max_seqs} sequences at once, context {g.context}, {device.type}) on "
              f"http://{host}:{port}/v1{' (API key required)' if api_key else ''}; Ctrl-C stops")
    if not _loopback(host) and not api_key:
        con.print(f"[yellow]listening on {host} without an API key: anyone who reaches this port can use it "
                  f"(--api-key KEY or ${API_KEY_ENV})[/yellow]")
    try:
        server.run(sockets=[sock])
    finally:
        loop.close()    # the lifespan closed it already, unless uvicorn stopped before its shutdown
        sock.close()
    con.print("memintent serve: stopped")
    return 0


class _Graceful(uvicorn.Server):
    """A uvicorn server whose shutdown gives in-flight requests ``grace_s`` seconds to finish and then has the engine
    cancel them, so that each response still ends properly: a stream with an error event, an unstreamed request with
    a 503 (uvicorn's own timeout, 5 s later, would cut the tasks with a traceback). Ctrl-C and SIGTERM start that
    shutdown; once it is done the command returns 0 (uvicorn itself raises the signal again on the way out, which
    would interrupt its own event loop's last tasks)."""

    def __init__(self, config, loop, grace_s: float):
        super().__init__(config)
        self.engine_loop, self.grace_s = loop, grace_s

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets=None):
        timer = asyncio.get_running_loop().call_later(self.grace_s, self.engine_loop.cancel_all,
                                                      "the server is shutting down")
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


def _console():
    return Console(stderr=True, highlight=False, soft_wrap=True)
