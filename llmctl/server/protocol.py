"""The OpenAI wire format: request bodies checked and turned into llmctl's ``SamplingOptions`` and
messages, and the response, chunk and error objects built from a ``Reply``. No HTTP here.

Every field a request may carry is listed below: supported ones are mapped to llmctl's sampler (as
llama.cpp's server maps them), a few of OpenAI's are accepted when they ask for the default only (``n``
of 1, ``logit_bias`` empty …), and anything else is refused with an ``ApiError`` naming the field.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from llmctl.errors import UsageError
from llmctl.runtime.backend import MAX_TOP_LOGPROBS
from llmctl.runtime.sampler import SamplingOptions

MAX_STOPS = 4  # OpenAI's limit
# JSON name -> SamplingOptions field (OpenAI's names, plus llama.cpp server's extensions)
SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "seed": "seed",
}
# OpenAI fields accepted only with these values (their defaults): anything else needs a feature llmctl
# does not have. Values are tuples of what is accepted.
DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}
IGNORED = ("user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key")
COMMON = {"model", "stream", "stream_options", "max_tokens", "stop", *SAMPLING, *IGNORED}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens", "n", "logprobs", "top_logprobs", "logit_bias",
                        "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
                        "response_format"}  # fmt: skip
COMPLETION_FIELDS = COMMON | {"prompt", "n", "logprobs", "logit_bias", "echo", "best_of", "suffix"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    """A request the server refuses: HTTP ``status`` with OpenAI's error object."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """One checked request: ``messages`` for chat, ``prompt`` for a completion."""

    kind: str  # "chat" or "completion"
    options: SamplingOptions
    stream: bool
    include_usage: bool
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        detail = str(e) if not isinstance(e, RecursionError) else "nested too deeply"
        raise ApiError(f"the request body is not valid JSON ({detail})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(
            f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json"
        )
    return body


def parse(body: dict[str, Any], kind: str, *, max_tokens_limit: int) -> Request:
    """Check ``body`` of a chat (``kind="chat"``) or completion request; raise ``ApiError`` (400) on the
    first thing wrong, naming the field."""
    allowed = CHAT_FIELDS if kind == "chat" else COMPLETION_FIELDS
    for key in body:
        if key not in allowed:
            raise ApiError(f"unknown parameter {key!r}", param=key, code="unknown_parameter")
    for key, accepted in DEFAULT_ONLY.items():
        if key in allowed and key in body and not any(_same(body[key], a) for a in accepted):
            raise ApiError(
                f"{key}={json.dumps(body[key])[:60]} is not supported by llmctl serve; leave {key} out",
                param=key,
                code="unsupported_parameter",
            )
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError("model must be a string", param="model", code="invalid_type")
    stream = _flag(body, "stream")
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict) or set(so) - {"include_usage", "include_obfuscation"}:
            raise ApiError('stream_options must be {"include_usage": true|false}', param="stream_options")
        include_usage = _flag(so, "include_usage", "stream_options.include_usage")
    options = _options(body, kind, max_tokens_limit)
    logprobs = _logprobs(body, kind)
    if kind == "chat":
        messages = _messages(body.get("messages"))
        return Request(kind, options, stream, include_usage, messages=messages, logprobs=logprobs)
    return Request(kind, options, stream, include_usage, prompt=_prompt(body.get("prompt")), logprobs=logprobs)


def _count(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOP_LOGPROBS):
        raise ApiError(
            f"{key} must be an integer between 0 and {MAX_TOP_LOGPROBS}, got {json.dumps(value)[:40]}",
            param=key,
            code="invalid_value",
        )
    return value


def _logprobs(body: dict[str, Any], kind: str) -> int | None:
    """Chat: ``logprobs`` true, with ``top_logprobs`` alternatives (0 unless given); completions: ``logprobs``
    is the number of alternatives (0: the chosen token's only). None: not asked for."""
    if kind == "completion":
        return _count(body, "logprobs")
    top = _count(body, "top_logprobs")
    if not _flag(body, "logprobs"):
        if top:
            raise ApiError("top_logprobs needs logprobs set to true", param="top_logprobs", code="invalid_value")
        return None
    return top or 0


def _same(value: Any, accepted: Any) -> bool:
    return (type(value) is type(accepted) and value == accepted) or (value is None and accepted is None)


def _flag(body: dict[str, Any], key: str, name: str | None = None) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(
            f"{name or key} must be true or false, got {json.dumps(value)[:40]}", param=name or key
        )
    return value


def _options(body: dict[str, Any], kind: str, limit: int) -> SamplingOptions:
    fields: dict[str, Any] = {}
    for key, name in SAMPLING.items():
        if body.get(key) is not None:
            fields[name] = body[key]
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    n = body.get(key)
    if n is None:
        n = limit
    elif isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit:
        raise ApiError(
            f"{key} must be an integer between 1 and {limit} (this server's --max-tokens), got {json.dumps(n)[:40]}",
            param=key,
            code="invalid_value",
        )
    fields["max_tokens"] = n
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or len(stops) > MAX_STOPS
            or not all(isinstance(s, str) and s for s in stops)
        ):
            raise ApiError(
                f"stop must be a string or a list of at most {MAX_STOPS} non-empty strings", param="stop"
            )
        fields["stop"] = tuple(stops)
    try:
        return SamplingOptions(**fields)
    except UsageError as e:  # "--top-p must be between 0 and 1 …": name the JSON field instead of the flag
        message = str(e)
        flag = message.split(" ", 1)[0]
        param = flag.removeprefix("--").replace("-", "_") if flag.startswith("--") else None
        if param is not None:
            message = param + message[len(flag) :]
        raise ApiError(message, param=param, code="invalid_value") from None


def _text(content: Any, where: str) -> str:
    """Message content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise ApiError(f"{where}: only text content parts are supported", param=where)
            parts.append(p["text"])
        return "".join(parts)
    raise ApiError(f"{where} must be a string or a list of text parts", param=where)


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(f"{where} must be an object with role and content", param=where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise ApiError(
                f"{where}: unknown field {sorted(extra)[0]!r}", param=where, code="unknown_parameter"
            )
        role = ROLES.get(m.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise ApiError(
                f"{where}.role must be system, developer, user or assistant, got {json.dumps(m.get('role'))[:40]}",
                param=f"{where}.role",
            )
        out.append({"role": role, "content": _text(m.get("content"), f"{where}.content")})
    if out[-1]["role"] != "user":
        raise ApiError(
            "the last message must be the user's (the reply continues the conversation)", param="messages"
        )
    if not out[-1]["content"].strip():
        raise ApiError("the last message is empty", param=f"messages[{len(out) - 1}].content")
    return out


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError("prompt must be a string (one prompt per request)", param="prompt")
    if not prompt.strip():
        raise ApiError("prompt is empty", param="prompt")
    return prompt


# ---- responses ---------------------------------------------------------------------------------------
FINISH = {"stop": "stop", "length": "length", "context": "length"}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(reply: Any) -> dict[str, int]:
    return {
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }


def logprobs(kind: str, entries: list[Any] | None, offset: int = 0) -> dict[str, Any] | None:
    """OpenAI's ``logprobs`` object of a choice (or chunk) from llmctl's ``TokenLogprob`` entries: chat's
    ``content`` list, or the completions API's parallel lists (``text_offset`` counted from ``offset``,
    the characters of the reply before these tokens)."""
    if entries is None:
        return None
    if kind == "chat":

        def one(text: str, lp: float) -> dict[str, Any]:
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {
            "content": [{**one(e.text, e.logprob), "top_logprobs": [one(t, v) for _, t, v in e.top]} for e in entries],
            "refusal": None,
        }
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: v for _, t, v in reversed(e.top)} for e in entries],
        "text_offset": offsets,
    }


def response(kind: str, rid: str, model: str, reply: Any) -> dict[str, Any]:
    finish = FINISH.get(reply.finish_reason, "stop")
    lp = logprobs(kind, reply.logprobs)
    if kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": reply.text},
            "logprobs": lp,
            "finish_reason": finish,
        }
    else:
        choice = {"index": 0, "text": reply.text, "logprobs": lp, "finish_reason": finish}
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": f"llmctl-seed-{reply.seed}",
        "choices": [choice],
        "usage": usage(reply),
    }


def chunk(
    kind: str,
    rid: str,
    model: str,
    *,
    text: str | None = None,
    first: bool = False,
    finish: str | None = None,
    entries: list[Any] | None = None,
    offset: int = 0,
) -> dict[str, Any]:
    """One streamed piece (``text``, with its tokens' log-probabilities ``entries`` when asked for; ``offset``:
    the reply's characters before it), or the last one (``finish``: llmctl's finish reason)."""
    reason = None if finish is None else FINISH.get(finish, "stop")
    lp = logprobs(kind, entries, offset)
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": reason}
    return {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }


def usage_chunk(kind: str, rid: str, model: str, reply: Any) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, the counts."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(reply),
    }
