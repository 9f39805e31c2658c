"""The HTTP side of ``llmctl serve``: a Starlette app on uvicorn speaking OpenAI's API.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events with
``"stream": true``), ``GET /v1/models``, ``GET /health``. Every failure is answered with OpenAI's error
object (``{"error": {"message", "type", "param", "code"}}``), never a traceback. The body is read up to
``max_body`` bytes (413 past it, answered after the rest has been read and dropped, up to 16 × ``max_body``
or 64 MiB); with an API key, ``/v1/*`` needs ``Authorization: Bearer KEY`` (401).
Generation runs in the engine's worker thread, so the event loop keeps answering (``/health`` while a
reply is generated); a client that goes away cancels its request before the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from llmctl.runtime.session import Piece, Reply
from llmctl.server import protocol
from llmctl.server.engine import DONE, Engine, Job
from llmctl.server.protocol import ApiError, Request

DRAIN_BYTES = 64 * 1024 * 1024  # the least an oversized body is drained up to (see build_app)
POLL_S = 0.25  # how often a waiting request checks whether its client is still there


def error_response(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 503 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def build_app(
    engine: Engine, *, model_id: str, api_key: str | None, max_body: int, max_tokens: int
) -> Starlette:
    """``max_tokens``: the most a request may ask for, and what it gets when it names none."""
    created = int(time.time())
    # A body over max_body is still read (and dropped) up to this size before the 413 goes out: clients that
    # send the whole body before reading (urllib, requests, curl without Expect) otherwise meet a reset
    # connection instead of the answer. Past it the server does not spend the bandwidth.
    drain_limit = max(16 * max_body, DRAIN_BYTES)

    def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(
                "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the server's --api-key",
                status=401,
                code="invalid_api_key",
            )

    async def read_body(request: HttpRequest) -> bytes:
        too_big = ApiError(
            f"the request body exceeds this server's limit of {max_body} bytes (--max-body)",
            status=413,
            code="request_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise too_big
        if declared is not None and int(declared) > drain_limit:
            raise too_big  # refused unread: the connection closes under a client still sending
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > drain_limit:
                raise too_big
            if size <= max_body:
                chunks.append(part)
        if size > max_body:  # read to the end and dropped, so that the client, still sending, reads the 413
            raise too_big
        return b"".join(chunks)

    async def health(request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, **engine.status()})

    async def models(request: HttpRequest) -> Response:
        authorize(request)
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "llmctl"}],
            }
        )

    async def chat_completions(request: HttpRequest) -> Response:
        return await generate(request, "chat")

    async def completions(request: HttpRequest) -> Response:
        return await generate(request, "completion")

    async def generate(request: HttpRequest, kind: str) -> Response:
        authorize(request)
        body = protocol.parse_json(await read_body(request))
        req = protocol.parse(body, kind, max_tokens_limit=max_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        def emit(event: Any) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        job = engine.submit(req, emit)
        watch = _Watch(request, job)
        try:
            event = await _next(queue, watch)
            while not req.stream and event is not None and not isinstance(event, (Reply, ApiError)):
                event = await _next(queue, watch)  # a plain response: wait for the whole reply
        except BaseException:  # cancelled (the server stopping): so is the generation
            job.stop()
            raise
        if event is None:  # the client left while waiting
            return Response(status_code=499)
        if isinstance(event, ApiError):
            raise event
        rid = protocol.new_id(kind)
        if not req.stream:
            return JSONResponse(protocol.response(kind, rid, model_id, event))
        return StreamingResponse(
            _sse(kind, rid, model_id, req, event, queue, job),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def on_api_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_http_error(request: HttpRequest, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.url.path}; the API is under /v1 (chat/completions, completions, models)",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))  # fmt: skip
        return error_response(ApiError(message, status=exc.status_code, code=code))

    async def on_error(request: HttpRequest, exc: Exception) -> Response:
        # (Starlette re-raises it afterwards, so uvicorn's log keeps the traceback for the operator)
        return error_response(
            ApiError(f"internal error: {type(exc).__name__}", status=500, type="server_error")
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.cancel_all()  # shutting down: stop whatever is generating

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
        ],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_error, Exception: on_error},
        lifespan=lifespan,
    )
    return app


class _Watch:
    """Whether a client is still there, asked at most every ``POLL_S`` (each check reads the socket)."""

    def __init__(self, request: HttpRequest, job: Job) -> None:
        self.request, self.job, self.last = request, job, time.monotonic()

    async def gone(self) -> bool:
        if time.monotonic() - self.last < POLL_S:
            return False
        self.last = time.monotonic()
        if await self.request.is_disconnected():
            self.job.stop()
            return True
        return False


async def _next(queue: asyncio.Queue[Any], watch: _Watch) -> Any:
    """The request's next event; None (and the job cancelled) if its client disconnected meanwhile."""
    while True:
        if await watch.gone():
            return None
        try:
            return await asyncio.wait_for(queue.get(), POLL_S)
        except asyncio.TimeoutError:
            pass


async def _sse(
    kind: str, rid: str, model: str, req: Request, first: Any, queue: asyncio.Queue[Any], job: Job
) -> AsyncIterator[str]:
    def data(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    event, started, offset = first, False, 0
    try:
        if kind == "chat":
            yield data(protocol.chunk(kind, rid, model, first=True, text=""))
            started = True
        while event is not DONE:
            if isinstance(event, Piece):
                entries = None if req.logprobs is None else event.logprobs
                yield data(protocol.chunk(kind, rid, model, text=event.text, first=not started, entries=entries, offset=offset))
                started, offset = True, offset + len(event.text)
            elif isinstance(event, Reply):
                yield data(protocol.chunk(kind, rid, model, finish=event.finish_reason))
                if req.include_usage:
                    yield data(protocol.usage_chunk(kind, rid, model, event))
            elif isinstance(event, ApiError):  # after the headers: the error as the stream's last event
                yield data(event.body())
            event = await queue.get()
        yield "data: [DONE]\n\n"
    finally:  # the client went away (the response was cancelled) or the stream ended: stop generating
        job.stop()


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads so that a taken port fails at once."""
    from llmctl.errors import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(
            f"--host {host}: cannot resolve it ({e.strerror}); pass an address such as 127.0.0.1"
        ) from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise UsageError(
            f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host"
        ) from None
    sock.set_inheritable(True)
    return sock


class _Stopped(Exception):
    pass


def run(app: Starlette, sock: socket.socket, on_stop: Any = None) -> None:
    """Serve until Ctrl-C or SIGTERM, then return (uvicorn re-raises the signal it caught once it has shut
    down; here that ends this call instead of the process, so the caller can free the model).
    ``on_stop()`` is called as the signal arrives, so that streams still generating end at their next
    token instead of holding up the shutdown."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if on_stop is not None:
                on_stop()
            super().handle_exit(sig, frame)

    def stopped(signum: int, frame: Any) -> None:
        raise _Stopped

    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=3, http="h11"
    )
    previous = {sig: signal.signal(sig, stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        Server(config).run(sockets=[sock])
    except _Stopped:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
