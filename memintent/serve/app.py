"""The OpenAI-compatible HTTP API over one engine (FastAPI on uvicorn).

    POST /v1/completions          text or token-id prompts (one, or a list: one choice each, times n)
    POST /v1/chat/completions     messages through the model folder's chat template
    GET  /v1/models               the one model served
    GET  /health                  200, or 503 once the engine has failed
    GET  /metrics                 Prometheus text (``metrics.py``)

``stream: true`` answers with server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``); a streamed
choice's text adds up to what the same request returns unstreamed (``text.TextStream``). Every request of every
client goes to the one engine thread (``loop.EngineLoop``), which steps all of them together. A client that
disconnects has its sequences aborted: their KV pages are free before the next step.

Errors are OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``): 400 for a malformed body, an
unknown model, a prompt (plus ``max_tokens``) past the plan's context, or a field this server does not implement;
401 without the API key (``/v1/...`` only, when the server has one); 503 with ``Retry-After`` when the requests in
flight would exceed the plan's sequences at once plus ``max_waiting``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from memintent.engine.requests import encode
from memintent.engine.sampling import SamplingParams, TokenLogprobs
from memintent.engine.sequence import Request as EngineRequest
from memintent.errors import MemintentError
from memintent.serve import protocol as P
from memintent.serve.loop import Delta, EngineLoop
from memintent.serve.text import TextStream

RETRY_AFTER_S = 1
COMPLETIONS_DEFAULT_MAX_TOKENS = 16     # OpenAI's default for /v1/completions (chat: up to the context)


class ApiError(Exception):
    """An HTTP error answered as OpenAI's error JSON."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def _error_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 503: "service_unavailable"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")


class Server:
    """What the handlers share: the engine loop, the model's name, tokenizer and context, the limits, the key."""

    def __init__(self, loop: EngineLoop, *, model_name: str, tokenizer=None, api_key: str | None = None,
                 max_waiting: int = 1024):
        eng = loop.engine
        self.loop, self.model_name, self.tokenizer, self.api_key = loop, model_name, tokenizer, api_key
        self.context = eng.program.generation.context
        self.capacity = eng.program.generation.max_seqs + max_waiting
        self.in_flight = 0                  # engine requests submitted and not finished (event loop thread only)
        self.created = int(time.time())

    @property
    def metrics(self):
        return self.loop.metrics

    # -- checks -----------------------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise ApiError(400, f"model {name!r} does not exist: this server serves {self.model_name!r}",
                           code="model_not_found", param="model")

    def admit(self, n: int) -> None:
        if self.loop.failed is not None:
            raise ApiError(503, f"the engine stopped: {self.loop.failed}")
        if self.in_flight + n > self.capacity:
            raise ApiError(503, f"the server is full: {self.in_flight} requests in flight, at most {self.capacity} "
                                f"(the plan's sequences at once plus --max-waiting); retry later",
                           headers={"Retry-After": str(RETRY_AFTER_S)})

    # -- prompts ----------------------------------------------------------------------------------------------
    def completion_prompts(self, prompt) -> list[tuple[int, ...]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) or not prompt:
            prompt = [prompt]
        return [self._ids(p) for p in prompt]

    def _ids(self, p) -> tuple[int, ...]:
        if not isinstance(p, str):
            return tuple(p)
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: give the prompt as token ids", param="prompt")
        return encode(self.tokenizer, p, chat=False)

    def chat_prompt(self, messages: list[P.ChatMessage]) -> tuple[int, ...]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template (chat_template.jinja, or a chat_template in "
                                "tokenizer_config.json): use /v1/completions", param="messages")
        msgs = [{"role": m.role, "content": _content_text(m.content)} for m in messages]
        try:
            ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as e:      # the template's own checks (roles out of order, ...)
            raise ApiError(400, f"the chat template refused the messages: {e}", param="messages") from None
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return tuple(int(t) for t in ids)

    # -- engine requests --------------------------------------------------------------------------------------
    def jobs(self, rid: str, body, prompts: list[tuple[int, ...]], logprobs: int | None, chat: bool) -> list[_Job]:
        """One engine request per choice, each checked against the plan."""
        out = []
        for p, ids in enumerate(prompts):
            max_new = self._max_new(body, len(ids), chat)
            for j in range(body.n):
                req = EngineRequest(id=f"{rid}-{len(out)}", prompt_ids=ids, max_new_tokens=max_new,
                                    stop_token_ids=tuple(body.stop_token_ids or ()),
                                    sampling=_sampling(body, logprobs, j))
                try:
                    self.loop.engine.validate(req)
                except MemintentError as e:
                    raise ApiError(400, str(e)) from None
                out.append(_Job(index=p * body.n + j, request=req, text=TextStream(self.tokenizer,
                                                                                    req.sampling.stop)))
        return out

    def _max_new(self, body, prompt_len: int, chat: bool) -> int:
        asked = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        room = self.context - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens, which leaves no room in the model's context of "
                                f"{self.context} tokens: shorten it", param="messages" if chat else "prompt")
        if asked is None:
            return room if chat else min(COMPLETIONS_DEFAULT_MAX_TOKENS, room)
        if asked > room:
            raise ApiError(400, f"the prompt has {prompt_len} tokens and max_tokens is {asked}: together more than "
                                f"the model's context of {self.context} tokens; lower max_tokens", param="max_tokens")
        return asked

    def submit(self, job: _Job, sink) -> None:
        self.in_flight += 1

        def deliver(d: Delta) -> None:          # on the event loop
            if (d.finish_reason is not None or d.error is not None) and not job.done:
                job.done = True
                self.in_flight -= 1
            sink(job, d)
        self.loop.submit(job.request, deliver)

    def cancel(self, job: _Job) -> None:
        if not job.done:
            job.done = True
            self.in_flight -= 1
            self.loop.abort(job.request.id)


def _content_text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    bad = next((c.type for c in content if c.type != "text"), None)
    if bad is not None:
        raise ApiError(400, f"message content of type {bad!r} is not supported: this model reads text",
                       param="messages")
    return "".join(c.text or "" for c in content)


def _sampling(body, logprobs: int | None, j: int) -> SamplingParams:
    stop = body.stop if body.stop is not None else ()
    try:
        return SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p or 0.0,
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            seed=None if body.seed is None else body.seed + j, logprobs=logprobs, stop=stop,
            ignore_eos=body.ignore_eos)
    except MemintentError as e:
        raise ApiError(400, str(e).removeprefix("sampling: ")) from None


def _refuse_unsupported(body) -> None:
    checks = [(bool(body.logit_bias), "logit_bias"), (getattr(body, "echo", False), "echo"),
              (getattr(body, "suffix", None) is not None, "suffix"),
              ((getattr(body, "best_of", None) or body.n) > body.n, "best_of"), (bool(getattr(body, "tools", None)),
                                                                               "tools"),
              ((getattr(body, "response_format", None) or {}).get("type", "text") != "text", "response_format")]
    bad = next((name for is_bad, name in checks if is_bad), None)
    if bad is not None:
        raise ApiError(400, f"{bad} is not supported by this server: leave it out", param=bad)


# ---------------------------------------------------------------------------------------------------------------
# One HTTP request's choices


def _finish(reason: str | None) -> str | None:
    """The engine's finish reason, as OpenAI names it (the plan's context full is "length")."""
    return None if reason is None else "stop" if reason == "stop" else "length"


@dataclass(slots=True)
class _Job:
    """One choice: an engine request and what it has given so far."""

    index: int
    request: EngineRequest
    text: TextStream
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    done: bool = False

    def absorb(self, d: Delta) -> str:
        """Take a delta; returns the text it makes sendable."""
        if d.error is not None:
            raise ApiError(d.status, d.error)
        piece = self.text.push(d.token_ids, finished=d.finish_reason is not None, stop_text=d.stop_text)
        self.logprobs += d.logprobs or []
        self.finish_reason = _finish(d.finish_reason)
        return piece


class _Run:
    """The engine requests of one HTTP request, submitted at once; their deltas arrive on one queue."""

    def __init__(self, srv: Server, body, jobs: list[_Job], rid: str, chat: bool):
        self.srv, self.body, self.jobs, self.id, self.chat = srv, body, jobs, rid, chat
        self.queue: asyncio.Queue = asyncio.Queue()
        self.prompt_tokens = sum(len(j.request.prompt_ids) for j in jobs[::body.n])
        for j in jobs:
            srv.submit(j, lambda job, d: self.queue.put_nowait((job, d)))

    @property
    def unfinished(self) -> bool:
        return any(j.finish_reason is None for j in self.jobs)

    def cancel(self) -> None:
        for j in self.jobs:
            self.srv.cancel(j)

    def usage(self) -> P.Usage:
        done = sum(len(j.text.token_ids) for j in self.jobs)
        return P.Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done,
                       total_tokens=self.prompt_tokens + done)

    def token_ids(self, ids: list[int]) -> list[int] | None:
        return ids if self.body.return_token_ids or self.srv.tokenizer is None else None

    # -- answered at once -------------------------------------------------------------------------------------
    async def collect(self, request: Request) -> Response:
        gone = asyncio.ensure_future(_disconnected(request))
        gone.add_done_callback(lambda _: self.queue.put_nowait((None, None)))
        try:
            while self.unfinished:
                job, d = await self.queue.get()
                if job is None:                 # the client went away: nobody to answer
                    return Response(status_code=499)
                job.absorb(d)
            out = self._response()
        finally:
            gone.cancel()
            self.cancel()
        return Response(out.json_text(), media_type="application/json")

    def _response(self) -> P.CompletionResponse | P.ChatResponse:
        if self.chat:
            return P.ChatResponse(id=self.id, model=self.srv.model_name, usage=self.usage(), choices=[
                P.ChatChoice(index=j.index, message=P.AssistantMessage(content=j.text.text),
                             logprobs=self._chat_logprobs(j, j.logprobs), finish_reason=j.finish_reason,
                             token_ids=self.token_ids(j.text.token_ids)) for j in self.jobs])
        return P.CompletionResponse(id=self.id, model=self.srv.model_name, usage=self.usage(), choices=[
            P.CompletionChoice(index=j.index, text=j.text.text, logprobs=self._completion_logprobs(j, j.logprobs),
                               finish_reason=j.finish_reason, token_ids=self.token_ids(j.text.token_ids))
            for j in self.jobs])

    # -- streamed ---------------------------------------------------------------------------------------------
    async def events(self):
        """The server-sent events; a client that goes away cancels this generator, which aborts its requests."""
        try:
            if self.chat:
                yield _sse(P.ChatChunk(id=self.id, model=self.srv.model_name, choices=[
                    P.ChatStreamChoice(index=j.index, delta=P.ChatDelta(role="assistant", content=""))
                    for j in self.jobs]))
            while self.unfinished:
                job, d = await self.queue.get()
                try:
                    piece = job.absorb(d)
                except ApiError as e:
                    yield _sse(P.ErrorResponse(error=P.ErrorBody(message=e.message, type=_error_type(e.status))))
                    return
                chunk = self._chunk(job, d, piece)
                if chunk is not None:
                    yield _sse(chunk)
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                cls = P.ChatChunk if self.chat else P.CompletionResponse
                yield _sse(cls(id=self.id, model=self.srv.model_name, choices=[], usage=self.usage()))
            yield "data: [DONE]\n\n"
        finally:
            self.cancel()

    def _chunk(self, job: _Job, d: Delta, piece: str):
        lps = d.logprobs if job.request.sampling.logprobs is not None else None
        if not piece and not lps and job.finish_reason is None and self.token_ids(d.token_ids) is None:
            return None
        ids = self.token_ids(d.token_ids)
        if self.chat:
            return P.ChatChunk(id=self.id, model=self.srv.model_name, choices=[P.ChatStreamChoice(
                index=job.index, delta=P.ChatDelta(content=piece), logprobs=self._chat_logprobs(job, lps),
                finish_reason=job.finish_reason, token_ids=ids)])
        return P.CompletionResponse(id=self.id, model=self.srv.model_name, choices=[P.CompletionChoice(
            index=job.index, text=piece, logprobs=self._completion_logprobs(job, lps), finish_reason=job.finish_reason,
            token_ids=ids)])

    # -- log-probabilities ------------------------------------------------------------------------------------
    def _chat_logprobs(self, job: _Job, lps) -> P.ChatLogprobs | None:
        if job.request.sampling.logprobs is None or lps is None:
            return None
        t = job.text.token_text

        def entry(tok: int, lp: float) -> dict:
            s = t(tok)
            return dict(token=s, logprob=lp, bytes=list(s.encode()))
        toks = job.text.token_ids[len(job.text.token_ids) - len(lps):]     # the tokens these are of: the last ones
        return P.ChatLogprobs(content=[P.ChatTokenLogprob(**entry(tok, lp.logprob), top_logprobs=[
            P.TopLogprob(**entry(i, v)) for i, v in lp.top]) for tok, lp in zip(toks, lps)])

    def _completion_logprobs(self, job: _Job, lps) -> P.CompletionLogprobs | None:
        if job.request.sampling.logprobs is None or lps is None:
            return None
        t = job.text.token_text
        first = len(job.text.token_ids) - len(lps)                          # the tokens these are of: the last ones
        toks = job.text.token_ids[first:]
        texts = [t(tok) for tok in toks]
        offsets, at = [], len(job.text.decode(job.text.token_ids[:first])) if first else 0
        for s in texts:
            offsets.append(at)
            at += len(s)
        return P.CompletionLogprobs(tokens=texts, token_logprobs=[lp.logprob for lp in lps],
                                    top_logprobs=[{t(i): v for i, v in lp.top} for lp in lps], text_offset=offsets)


def _sse(model) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the request's body was read already, so this is all that can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------------------------------------------------------
# The application


def _error_response(srv: Server, status: int, message: str, code: str | None = None, param: str | None = None,
                    headers: dict | None = None) -> JSONResponse:
    srv.metrics.rejected[status] += 1
    body = P.ErrorResponse(error=P.ErrorBody(message=message, type=_error_type(status), code=code, param=param))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request body is not valid", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid" or not loc:
        return (f"the request body is not a JSON object ({e.get('msg', 'invalid')}): send one with the API's "
                "fields, and Content-Type: application/json"), None
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{'.'.join(loc)}: {e.get('msg', 'invalid')}{more}", loc[0]


def create_app(srv: Server) -> FastAPI:
    """The FastAPI application over ``srv``; its lifespan starts the engine loop and closes it at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        srv.loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(srv.loop.close)

    app = FastAPI(title="memintent", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv
    _handlers(app, srv)
    _routes(app, srv)
    return app


def _handlers(app: FastAPI, srv: Server) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return _error_response(srv, e.status, e.message, e.code, e.param, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        message, param = _validation_message(e)
        return _error_response(srv, 400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        return _error_response(srv, e.status_code, str(e.detail), headers=getattr(e, "headers", None))


def _routes(app: FastAPI, srv: Server) -> None:
    async def authorized(request: Request) -> None:
        if srv.api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), srv.api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if srv.loop.failed is not None:
            raise ApiError(503, f"the engine stopped: {srv.loop.failed}")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(srv.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        card = P.ModelCard(id=srv.model_name, created=srv.created, max_model_len=srv.context)
        return Response(P.ModelList(data=[card]).json_text(), media_type="application/json")

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(body: P.CompletionRequest, request: Request):
        srv.check_model(body.model)
        _refuse_unsupported(body)
        return await _respond(srv, request, body, srv.completion_prompts(body.prompt), body.logprobs, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        srv.check_model(body.model)
        _refuse_unsupported(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _respond(srv, request, body, [srv.chat_prompt(body.messages)], logprobs, chat=True)


async def _respond(srv: Server, request: Request, body, prompts, logprobs: int | None, chat: bool) -> Response:
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    jobs = srv.jobs(rid, body, prompts, logprobs, chat)
    srv.admit(len(jobs))
    run = _Run(srv, body, jobs, rid, chat)
    if body.stream:
        return StreamingResponse(run.events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await run.collect(request)
