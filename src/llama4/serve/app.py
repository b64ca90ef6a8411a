"""The HTTP server: OpenAI-compatible endpoints, the web chat page, health and metrics.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``
(both with ``stream`` as server-sent events ending in ``data: [DONE]``), ``GET /health``,
``GET /metrics`` (Prometheus text), ``GET /`` (the chat page) and ``/static/*``. The request
and response schemas are the pydantic models of ``protocol.py`` (``/openapi.json``, ``/docs``).

Request handlers run on the event loop; tokenization and image decoding go to a worker
thread; generation is the scheduler's (``scheduler.py``), whose thread hands events back
through ``loop.call_soon_threadsafe`` into one asyncio queue per request. A client that goes
away (a closed stream, or a dropped non-streaming request) cancels its jobs, and the
scheduler frees their cache slots at its next step.

Every client mistake is a 4xx with ``{"error": {"message", "type", "param", "code"}}``:
malformed JSON and schema violations (400), semantic errors from ``inputs.py`` (400), a
missing or wrong API key (401), an unknown model (404), a body over the size limit (413),
a full queue (429 with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama4.engine.engine import Event
from llama4.serve import protocol as P
from llama4.serve.inputs import Prepared, RequestError, ServedModel, prepare_chat, prepare_completion
from llama4.serve.metrics import Registry
from llama4.serve.outputs import ChatChoiceStream, CompletionLogprobs, build_chat_message, chat_logprob
from llama4.serve.scheduler import Job, QueueFull, Scheduler, SchedulerStopped

log = logging.getLogger("llama4.serve")
STATIC = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_BODY_BYTES = 32 << 20
BEARER = HTTPBearer(auto_error=False, description="required when the server has an API key")
# OpenAPI responses of the two generation routes: JSON, or server-sent events with stream=true
SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "JSON, or SSE chunks when stream is true",
    }
}


# ----- metrics -------------------------------------------------------------------------------------


class ServeMetrics:
    """The /metrics registry; the scheduler calls the ``on_*`` hooks from its thread."""

    def __init__(self, scheduler_stats: Callable[[], Any]) -> None:
        r = self.registry = Registry()
        self.http = r.counter("http_requests_total", "HTTP requests by route and status code.")
        self.requests = r.counter("requests_total", "Generation jobs (one per choice) by how they ended.")
        self.prompt_tokens = r.counter("prompt_tokens_total", "Prompt tokens of admitted jobs.")
        self.cached_tokens = r.counter(
            "prompt_tokens_cached_total", "Prompt tokens reused from the prefix cache."
        )
        self.generation_tokens = r.counter("generation_tokens_total", "Tokens generated.")
        self.steps = r.counter("scheduler_steps_total", "Scheduler steps with a decode forward.")
        self.ttft = r.histogram(
            "time_to_first_token_seconds",
            "From submission to the first token.",
            [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
        )
        self.batch = r.histogram(
            "decode_batch_size", "Rows per decode forward.", [1, 2, 4, 8, 16, 32, 64, 128]
        )
        s = scheduler_stats
        r.gauge("queue_depth", "Jobs waiting for a cache slot.", lambda: s().waiting)
        r.gauge("running_requests", "Jobs holding a cache slot.", lambda: s().running)
        r.gauge("batch_size", "Rows in the last decode forward.", lambda: s().batch_size)
        r.gauge("kv_cache_slots", "Cache slots (the largest batch).", lambda: s().slots)
        r.gauge("kv_cache_slots_used", "Cache slots held by running jobs.", lambda: s().running)
        r.gauge("kv_cache_capacity_tokens", "Tokens the cache holds at most (slots x context).",
                lambda: s().slots * s().max_len)  # fmt: skip
        r.gauge("kv_cache_used_tokens", "Tokens in the cache for running jobs.", lambda: s().kv_tokens)
        r.gauge(
            "kv_cache_cached_tokens",
            "Tokens kept in free slots for prefix reuse.",
            lambda: s().kv_cached_tokens,
        )
        r.gauge("kv_cache_usage_ratio", "Used tokens / capacity.",
                lambda: s().kv_tokens / max(1, s().slots * s().max_len))  # fmt: skip

    def on_admit(self, job: Job, cached: int) -> None:
        self.prompt_tokens.inc(len(job.prompt))
        self.cached_tokens.inc(cached)

    def on_token(self, job: Job, first: bool) -> None:
        self.generation_tokens.inc()
        if first:
            self.ttft.observe(time.monotonic() - job.submitted)

    def on_finish(self, job: Job, reason: str) -> None:
        self.requests.inc(outcome=reason)

    def on_step(self, batch: int) -> None:
        if batch:
            self.steps.inc()
            self.batch.observe(batch)


# ----- errors --------------------------------------------------------------------------------------


def error_response(
    status: int,
    message: str,
    *,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


_UNION_TAGS = {"system", "developer", "user", "assistant", "tool", "ipython", "text", "image_url"}
_UNION_MEMBERS = {"str", "int", "float", "bool", "none", "dict"}


def _param(loc: Sequence[Any]) -> str:
    """``messages.0.content`` from pydantic's location, without the union bookkeeping it adds
    (member names like ``list[str]``, discriminator tags after a list index)."""
    out: list[str] = []
    prev: Any = None
    for x in loc:
        skip = x == "body" and prev is None
        if isinstance(x, str) and (
            "[" in x or x in _UNION_MEMBERS or (x in _UNION_TAGS and isinstance(prev, int))
        ):
            skip = True
        if not skip:
            out.append(str(x))
        prev = x
    return ".".join(out)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """The most useful of pydantic's errors as one OpenAI-style 400. A value outside a union
    produces one error per union member; a value error (out of range, unknown field, bad tag)
    says more than "should be a string", and the deepest location is the most precise."""
    errors = list(exc.errors()) or [{"loc": (), "msg": "invalid request", "type": ""}]
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return error_response(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    if first.get("type") == "missing" and not _param(first.get("loc", ())):
        return error_response(400, "the request needs a JSON body", code="invalid_json")
    value_errors = [e for e in errors if not str(e.get("type", "")).endswith("_type")]
    pool = value_errors or errors
    best = max(pool, key=lambda e: len(_param(e.get("loc", ())).split(".")))
    param = _param(best.get("loc", ())) or None
    if value_errors:
        msg = best.get("msg", "invalid value")
    else:  # only type mismatches: list what the field accepts
        msgs = [e["msg"] for e in errors if _param(e.get("loc", ())) == (param or "")]
        msg = " or ".join(dict.fromkeys(m.removeprefix("Input should be ") for m in msgs))
        msg = f"Input should be {msg}" if msgs and all(m.startswith("Input should be") for m in msgs) else msg
    if best.get("type") == "extra_forbidden":
        msg = "unknown field (not part of this API; see /docs)"
    msg = msg.removeprefix("Value error, ")
    if param is None and (m := re.match(r"(\w+): ", msg)):  # a model-level check naming its field
        param, msg = m.group(1), msg[m.end() :]
    message = f"{param}: {msg}" if param else msg
    return error_response(400, message, param=param, code="invalid_value")


_ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


class BodyLimitAndMetrics:
    """ASGI middleware: refuse bodies over `max_bytes` (413) and count responses by status."""

    def __init__(self, app: Any, max_bytes: int, metrics: ServeMetrics) -> None:
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 0}

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        path = scope["path"]
        route = path if path in _ROUTES else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        try:
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                return await self._too_large(scope, counting_send)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                # Read the body here (bounded), then replay it: a chunked body cannot exceed the limit either.
                chunks, size = [], 0
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        return await self._too_large(scope, counting_send)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
                body = b"".join(chunks)
                replayed = False

                async def replay() -> dict:
                    nonlocal replayed
                    if not replayed:
                        replayed = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()  # after the body: wait for the disconnect

                return await self.app(scope, replay, counting_send)
            return await self.app(scope, receive, counting_send)
        finally:
            self.metrics.http.inc(route=route, code=str(status["code"] or 499))

    async def _too_large(self, scope: dict, send: Callable) -> None:
        response = error_response(
            413, f"the request body is larger than {self.max_bytes} bytes", code="request_too_large"
        )
        await response(scope, None, send)


# ----- the app -------------------------------------------------------------------------------------


def create_app(
    served: ServedModel,
    scheduler: Scheduler,
    *,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    metrics: ServeMetrics | None = None,
) -> FastAPI:
    """The FastAPI app serving `served` through `scheduler` (started and stopped with the app)."""
    metrics = metrics or ServeMetrics(lambda: scheduler.stats)
    if scheduler.metrics is None:
        scheduler.metrics = metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()

        def deliver(pairs: list) -> None:
            for sink, item in pairs:
                sink(item)

        def dispatch(pairs: list) -> None:  # scheduler thread -> event loop, once per forward
            try:
                loop.call_soon_threadsafe(deliver, pairs)
            except RuntimeError:  # the loop is closed: the server is going down
                pass

        scheduler.dispatch = dispatch
        if not scheduler.alive:
            scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(
        title="llama4 serve",
        version="0.1.0",
        description="OpenAI-compatible API for a Llama 4 model, with continuous batching.",
        lifespan=lifespan,
    )
    app.state.served, app.state.scheduler, app.state.metrics = served, scheduler, metrics
    app.add_middleware(BodyLimitAndMetrics, max_bytes=max_body_bytes, metrics=metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    async def check_key(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if api_key is None:
            return
        if creds is None:
            raise RequestError(
                "missing API key: send 'Authorization: Bearer <key>'",
                status=401,
                code="invalid_api_key",
                type="authentication_error",
            )
        if not secrets.compare_digest(creds.credentials.encode(), api_key.encode()):
            raise RequestError(
                "invalid API key", status=401, code="invalid_api_key", type="authentication_error"
            )

    def check_model(name: str | None) -> None:
        if name is not None and name != served.id:
            raise RequestError(
                f"the model {name!r} does not exist; this server serves {served.id!r}",
                param="model",
                code="model_not_found",
                status=404,
            )

    # -- error handlers --

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(RequestError)
    async def _on_request_error(request: Request, exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(
            exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=headers
        )

    @app.exception_handler(QueueFull)
    async def _on_queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(
            429,
            str(exc),
            type="rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(exc.retry_after)},
        )

    @app.exception_handler(SchedulerStopped)
    async def _on_stopped(request: Request, exc: SchedulerStopped) -> JSONResponse:
        return error_response(
            503, str(exc), type="server_error", code="unavailable", headers={"Retry-After": "5"}
        )

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(
            exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal server error: {type(exc).__name__}", type="server_error")

    # -- pages and probes --

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health", summary="Liveness: 200 while the scheduler runs")
    async def health() -> JSONResponse:
        st = scheduler.stats
        ok = scheduler.alive
        body = {"status": "ok" if ok else "scheduler stopped", "model": served.id, "running": st.running,
                "waiting": st.waiting}  # fmt: skip
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=[Depends(check_key)], response_class=PlainTextResponse,
             summary="Prometheus metrics")  # fmt: skip
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.registry.render(), media_type="text/plain; version=0.0.4")

    # -- models --

    def card() -> P.ModelCard:
        return P.ModelCard(id=served.id, created=served.created, max_model_len=served.max_len,
                           vision=served.vision is not None)  # fmt: skip

    @app.get("/v1/models", response_model=P.ModelList, dependencies=[Depends(check_key)])
    async def list_models() -> P.ModelList:
        return P.ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard, dependencies=[Depends(check_key)])
    async def get_model(model_id: str) -> P.ModelCard:
        check_model(model_id)
        return card()

    # -- generation --

    def submit(prepared: Prepared) -> tuple[list[Job], asyncio.Queue]:
        most = scheduler.max_queue + scheduler.engine.slots  # what it runs and queues at once
        if len(prepared.params) > most:
            raise RequestError(
                f"{len(prepared.params)} choices in one request, more than this server holds at once "
                f"({scheduler.engine.slots} running + {scheduler.max_queue} queued); lower n or send fewer prompts",
                param="n",
            )
        queue: asyncio.Queue = asyncio.Queue()
        sink = queue.put_nowait  # called on the event loop (see dispatch in lifespan)
        n = len(prepared.params) // len(prepared.prompts)
        jobs = []
        for index, params in enumerate(prepared.params):
            prompt = prepared.prompts[index // n]
            jobs.append(
                Job(prompt, params, sink, index=index, images=prepared.images, image_keys=prepared.image_keys)
            )
        scheduler.submit(jobs)
        return jobs, queue

    async def collect(request: Request, jobs: list[Job], queue: asyncio.Queue) -> list[list[Event]] | None:
        """All events per job, or None if the client went away first (checked twice a second).

        Whatever way it ends, the jobs are cancelled (a no-op for finished jobs)."""
        try:
            events: list[list[Event]] = [[] for _ in jobs]
            live = len(jobs)
            next_check = time.monotonic() + 0.5
            while live:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    ev = None
                if time.monotonic() >= next_check:
                    if await request.is_disconnected():
                        return None
                    next_check = time.monotonic() + 0.5
                if ev is None:
                    continue
                if isinstance(ev, BaseException):
                    raise ev
                events[ev.index].append(ev)
                if ev.finish_reason is not None:
                    live -= 1
            return events
        finally:
            scheduler.cancel(jobs)

    def usage(prepared: Prepared, n_out: int) -> dict[str, int]:
        n_prompt = sum(len(p) for p in prepared.prompts)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def sse_response(chunks: AsyncIterator[str]) -> StreamingResponse:
        return StreamingResponse(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    def sse_error(exc: BaseException) -> str:
        return sse({"error": {"message": f"generation failed: {exc}", "type": "server_error", "param": None,
                              "code": None}})  # fmt: skip

    @app.post(
        "/v1/chat/completions",
        response_model=P.ChatCompletion,
        dependencies=[Depends(check_key)],
        responses=SSE_RESPONSES,
        summary="Chat completion (OpenAI compatible)",
    )
    async def chat_completions(req: P.ChatCompletionRequest, request: Request) -> Any:
        check_model(req.model)
        prepared = await run_in_threadpool(prepare_chat, req, served)
        jobs, queue = submit(prepared)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return sse_response(_stream_chat(req, prepared, jobs, queue, rid, created))
        events = await collect(request, jobs, queue)
        if events is None:
            return Response(status_code=499)
        choices, n_out = [], 0
        for i, evs in enumerate(events):
            text = "".join(e.text for e in evs)
            n_out += sum(e.token is not None for e in evs)
            message, finish = build_chat_message(text, prepared.tool_names)
            lps = [chat_logprob(served.tokenizer, e.logprob) for e in evs if e.logprob is not None]
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "logprobs": {"content": lps} if req.logprobs else None,
                    "finish_reason": finish or evs[-1].finish_reason,
                }
            )
        return {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": served.id,
            "choices": choices,
            "usage": usage(prepared, n_out),
        }

    async def _stream_chat(
        req: P.ChatCompletionRequest,
        prepared: Prepared,
        jobs: list[Job],
        queue: asyncio.Queue,
        rid: str,
        created: int,
    ) -> AsyncIterator[str]:
        head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served.id}

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return sse({**head, "choices": [choice]})

        streams = [ChatChoiceStream(prepared.tool_names) for _ in jobs]
        live, n_out = len(jobs), 0
        try:
            for i in range(len(jobs)):
                yield chunk(i, {"role": "assistant", "content": ""})
            while live:
                ev = await queue.get()
                if isinstance(ev, BaseException):
                    yield sse_error(ev)
                    break
                i, st = ev.index, streams[ev.index]
                n_out += ev.token is not None
                content = st.add(ev.text)
                lp = (
                    {"content": [chat_logprob(served.tokenizer, ev.logprob)]}
                    if ev.logprob is not None
                    else None
                )
                if ev.finish_reason is None:
                    if content or lp:
                        yield chunk(i, {"content": content}, logprobs=lp)
                    continue
                live -= 1
                rest, calls = st.finish()
                content += rest
                if content or lp:
                    yield chunk(i, {"content": content}, logprobs=lp)
                if calls:
                    deltas = [{"index": k, **c} for k, c in enumerate(calls)]
                    yield chunk(i, {"tool_calls": deltas})
                yield chunk(i, {}, "tool_calls" if calls else ev.finish_reason)
            else:
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield sse({**head, "choices": [], "usage": usage(prepared, n_out)})
            yield "data: [DONE]\n\n"
        finally:
            scheduler.cancel(jobs)

    @app.post(
        "/v1/completions",
        response_model=P.Completion,
        dependencies=[Depends(check_key)],
        responses=SSE_RESPONSES,
        summary="Text completion (OpenAI compatible, legacy)",
    )
    async def completions(req: P.CompletionRequest, request: Request) -> Any:
        check_model(req.model)
        prepared = await run_in_threadpool(prepare_completion, req, served)
        jobs, queue = submit(prepared)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n = req.n
        if req.stream:
            return sse_response(_stream_completion(req, prepared, jobs, queue, rid, created))
        events = await collect(request, jobs, queue)
        if events is None:
            return Response(status_code=499)
        choices, n_out = [], 0
        for i, evs in enumerate(events):
            prefix = prepared.prompt_texts[i // n] if req.echo else ""
            text = prefix + "".join(e.text for e in evs)
            n_out += sum(e.token is not None for e in evs)
            lps = None
            if req.logprobs is not None:
                acc = CompletionLogprobs(served.tokenizer, offset=len(prefix))
                for e in evs:
                    if e.logprob is not None:
                        acc.add(e.logprob)
                lps = acc.to_dict()
            choices.append(
                {"index": i, "text": text, "logprobs": lps, "finish_reason": evs[-1].finish_reason}
            )
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": served.id,
            "choices": choices,
            "usage": usage(prepared, n_out),
        }

    async def _stream_completion(
        req: P.CompletionRequest,
        prepared: Prepared,
        jobs: list[Job],
        queue: asyncio.Queue,
        rid: str,
        created: int,
    ) -> AsyncIterator[str]:
        head = {"id": rid, "object": "text_completion", "created": created, "model": served.id}
        n = req.n
        accs = [
            CompletionLogprobs(served.tokenizer, len(prepared.prompt_texts[i // n]) if req.echo else 0)
            for i in range(len(jobs))
        ]

        def chunk(index: int, text: str, finish: str | None = None, logprobs: Any = None) -> str:
            return sse({**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                              "finish_reason": finish}]})  # fmt: skip

        live, n_out = len(jobs), 0
        try:
            if req.echo:
                for i in range(len(jobs)):
                    yield chunk(i, prepared.prompt_texts[i // n])
            while live:
                ev = await queue.get()
                if isinstance(ev, BaseException):
                    yield sse_error(ev)
                    break
                n_out += ev.token is not None
                lp = accs[ev.index].add(ev.logprob) if ev.logprob is not None else None
                if ev.finish_reason is not None:
                    live -= 1
                if ev.text or lp or ev.finish_reason:
                    yield chunk(ev.index, ev.text, ev.finish_reason, lp)
            else:
                if req.stream_options is not None and req.stream_options.include_usage:
                    yield sse({**head, "choices": [], "usage": usage(prepared, n_out)})
            yield "data: [DONE]\n\n"
        finally:
            scheduler.cancel(jobs)

    return app
