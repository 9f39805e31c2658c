"""One model behind a bounded queue: requests run one at a time, in order, in a worker thread.

The backends hold one sequence (one KV cache), so generations never overlap: a single worker thread takes
requests first come, first served, and at most ``max_queue`` wait behind the one running (more are
refused with 503). Each request gets a fresh ``Session`` over the shared backend, so the chat template,
stop strings and sampling are chat's, and the KV cache keeps the longest common prefix with the previous
request (a conversation resent with one more turn prefills only that turn). Events go back through
``emit`` (called from the worker thread); a request's ``cancel`` event, set when its client goes away,
stops generation before the next token, or skips the request if it has not started.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from llmctl.errors import LlmctlError, TemplateError, UsageError
from llmctl.runtime.backend import Backend
from llmctl.runtime.session import Notice, Piece, Reply, Session
from llmctl.server.protocol import ApiError, Request

log = logging.getLogger("llmctl.server")
DONE = object()  # the last event of every request


@dataclass(eq=False)
class Job:
    """A request's handle: ``stop()`` when its client is gone."""

    engine: Engine
    cancel: threading.Event = field(default_factory=threading.Event)
    started: bool = False
    abandoned: bool = False  # stopped before it started: its place in the queue is already given back

    def stop(self) -> None:
        self.engine.stop(self)


class Engine:
    def __init__(
        self,
        backend: Backend,
        *,
        max_queue: int,
        template: str | None = None,
        chat_completion_mode: bool = False,
    ) -> None:
        """``template``: a chat template to use instead of the model's; ``chat_completion_mode``: chat
        requests are continued as plain text (no template), as ``llmctl chat`` does for base models."""
        self.backend = backend
        self.max_queue = max_queue
        self.template = template
        self.chat_completion_mode = chat_completion_mode
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmctl-generate")
        self._lock = threading.RLock()  # re-entrant: cancel_all also runs from a signal handler
        self._jobs: set[Job] = set()
        self.waiting = 0
        self.running = 0
        self.served = 0

    def status(self) -> dict[str, int]:
        with self._lock:
            return {"running": self.running, "waiting": self.waiting, "max_queue": self.max_queue}

    def submit(self, request: Request, emit: Callable[[Any], None]) -> Job:
        """Queue ``request``; its events (``Piece``, then ``Reply`` or an ``ApiError``, then ``DONE``) go
        to ``emit``. Raises ``ApiError`` 503 when the queue is full."""
        job = Job(self)
        with self._lock:
            if self.running + self.waiting > self.max_queue:  # one runs, max_queue wait
                raise ApiError(
                    f"the server is busy: {self.running + self.waiting} request(s) running or queued "
                    f"(--max-queue {self.max_queue}); retry later",
                    status=503,
                    type="server_error",
                    code="queue_full",
                )
            self.waiting += 1
            self._jobs.add(job)
        try:
            self._executor.submit(self._run, request, job, emit)
        except RuntimeError:  # shutting down
            with self._lock:
                self.waiting -= 1
                self._jobs.discard(job)
            raise ApiError("the server is shutting down", status=503, type="server_error") from None
        return job

    def stop(self, job: Job) -> None:
        """Stop ``job`` before its next token; a job still queued leaves the queue now."""
        with self._lock:
            job.cancel.set()
            if not job.started and not job.abandoned:
                job.abandoned = True
                self.waiting -= 1
                self._jobs.discard(job)

    def _run(self, request: Request, job: Job, emit: Callable[[Any], None]) -> None:
        with self._lock:
            if job.abandoned:
                return
            job.started = True
            self.waiting -= 1
            self.running += 1
        try:
            for event in self._events(request, job):
                emit(event)
        except ApiError as e:
            emit(e)
        except UsageError as e:  # the request does not fit (e.g. its prompt is longer than the context)
            emit(ApiError(str(e), code="context_length_exceeded" if "context" in str(e) else None))
        except TemplateError as e:  # the chat template refuses these messages (e.g. roles out of turn)
            emit(ApiError(str(e), param="messages"))
        except LlmctlError as e:  # the model failed (e.g. NaN logits): the server's fault, not the request's
            emit(ApiError(str(e), status=500, type="server_error"))
        except Exception as e:  # never a traceback to the client; the log keeps it
            log.exception("generation failed")
            emit(ApiError(f"internal error: {type(e).__name__}", status=500, type="server_error"))
        finally:
            with self._lock:
                self.running -= 1
                self.served += 1
                self._jobs.discard(job)
            emit(DONE)

    def _events(self, request: Request, job: Job) -> Any:
        if request.logprobs is not None and not self.backend.gives_logprobs:
            raise ApiError(
                f"the {self.backend.name} backend gives no log-probabilities; leave logprobs out, or serve with "
                "--backend torch or llama.cpp",
                param="logprobs",
                code="unsupported_parameter",
            )
        if request.kind == "chat":
            messages = list(request.messages or [])
            system = messages.pop(0)["content"] if messages[0]["role"] == "system" else None
            completion = self.chat_completion_mode
            session = Session(
                self.backend,
                request.options,
                system=system,
                template=None if completion else self.template,
                completion=completion,
            )
            session.messages = messages[:-1]
            text = messages[-1]["content"]
        else:
            session = Session(self.backend, request.options, completion=True)
            text = request.prompt or ""
        events = session.reply(text, job.cancel.is_set, logprobs=request.logprobs)
        try:
            for event in events:
                if isinstance(event, Notice):  # chat would drop old turns; an API client is told instead
                    raise ApiError(
                        "the messages do not fit in the context with room for the reply; send fewer or "
                        "shorter messages, lower max_tokens, or restart the server with a larger --context",
                        param="messages",
                        code="context_length_exceeded",
                    )
                if isinstance(event, (Piece, Reply)):
                    yield event
        finally:
            events.close()

    def cancel_all(self) -> None:
        with self._lock:
            for job in list(self._jobs):
                job.cancel.set()

    def close(self) -> None:
        """Stop every queued and running request, wait for the worker, free the model."""
        self.cancel_all()
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.backend.close()
