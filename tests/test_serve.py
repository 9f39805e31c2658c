"""`llmctl serve` as a client meets it: a real server process on 127.0.0.1 (the bundled smollm2-135m GGUF,
llama.cpp backend, one thread), driven with the official ``openai`` client, raw HTTP (urllib) and curl."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ServerProcess

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
KEY = "test-key-1234"
LONG = "1, 2, 3, 4,"  # greedy continues counting: a reply that only max_tokens ends
LIMIT = 2048  # the servers' --max-tokens


class Server(ServerProcess):
    def __init__(self, tmp: Path, *args: str, model: str = MODEL) -> None:
        super().__init__(
            tmp,
            [sys.executable, "-m", "llmctl", "serve", model, "--port", "0", "--threads", "1",
             "--max-tokens", str(LIMIT), *args],
        )  # fmt: skip

    def client(self, key: str = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, **{"max_retries": 0, "timeout": 60, **kw})

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def health(self) -> dict:
        with urllib.request.urlopen(self.base + "/health", timeout=10) as r:
            return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"))
    yield s
    s.stop()
    assert "Traceback" not in s.log.read_text(), s.log.read_text()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A second server: an API key, and a queue of one."""
    s = Server(tmp_path_factory.mktemp("serve-key"), "--api-key", KEY, "--max-queue", "1")
    yield s
    s.stop()


def post(base: str, path: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_openai_error(status: int, body: dict, code: int, param: str | None = "") -> dict:
    assert status == code, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert err["message"] and "Traceback" not in err["message"]
    if code < 500:
        assert err["type"] == "invalid_request_error"
    if param != "":
        assert err["param"] == param, err
    return err


def chat(client, prompt: str, **kw) -> str:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], **kw)
    return r.choices[0].message.content


def stream_text(client, prompt: str, **kw) -> tuple[str, str | None]:
    text, finish = "", None
    for c in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True, **kw
    ):
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
    return text, finish


# ---- the API -----------------------------------------------------------------------------------------
def test_models_and_health(server) -> None:
    ids = [m.id for m in server.client().models.list()]
    assert ids == [MODEL]
    h = server.health()
    assert h["status"] == "ok" and h["model"] == MODEL and h["max_queue"] == 16


def test_greedy_chat_equals_llmctl_chat(server) -> None:
    prompt = "Name three colors."
    p = subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", MODEL, "--temperature", "0", "--json", "-n", "32",
         "--threads", "1", "-p", prompt],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    expected = json.loads(p.stdout)
    r = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=32
    )
    assert r.choices[0].message.content == expected["reply"]
    assert r.choices[0].finish_reason == "stop" == expected["finish_reason"]
    assert r.usage.prompt_tokens == expected["prompt_tokens"]
    assert r.usage.completion_tokens == expected["completion_tokens"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # streamed: the same text, piece by piece
    text, finish = stream_text(server.client(), prompt, temperature=0, max_tokens=32)
    assert (text, finish) == (expected["reply"], "stop")


def test_completions_streaming_and_not(server) -> None:
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=LONG, temperature=0, max_tokens=12)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    assert r.choices[0].text.startswith(" 5, 6")
    pieces = [ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=LONG, temperature=0, max_tokens=12, stream=True)]  # fmt: skip
    assert len(pieces) > 2 and "".join(pieces) == r.choices[0].text


def test_usage_in_the_stream(server) -> None:
    chunks = list(server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0, max_tokens=8,
        stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[0].choices[0].delta.role == "assistant"


def test_stop_strings(server) -> None:
    c = server.client()
    r = c.completions.create(model=MODEL, prompt=LONG, temperature=0, max_tokens=40, stop=["8", "zzz"])
    assert r.choices[0].text == " 5, 6, 7, " and r.choices[0].finish_reason == "stop"
    pieces = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt=LONG, temperature=0, max_tokens=40, stop="8", stream=True))  # fmt: skip
    assert pieces == " 5, 6, 7, "


def test_seeds_are_reproducible(server) -> None:
    c = server.client()
    kw = dict(temperature=1.0, max_tokens=24)
    a = chat(c, "Write a story.", seed=11, **kw)
    assert a == chat(c, "Write a story.", seed=11, **kw)
    assert stream_text(c, "Write a story.", seed=11, **kw)[0] == a
    assert any(chat(c, "Write a story.", seed=s, **kw) != a for s in (12, 13, 14))


def test_a_conversation_with_a_system_prompt(server) -> None:
    c = server.client()
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [{"type": "text", "text": "And of Italy?"}]},
    ]
    r = c.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
    assert r.choices[0].message.content.strip() and r.usage.prompt_tokens > 30


BAD = [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b"[" * 200_000, None),  # nested past the parser's recursion limit
    (b"\xff\xfe{}", None),  # not UTF-8
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1e400}', "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "bogus": 1}, "bogus"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": -2}, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "min_p": 2}, "min_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 3}, "presence_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": -9}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -1}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**40}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": LIMIT + 1}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": 3}, "logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi", "extra": 1}]}, "messages[0]"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi " * 5000}]}, None),  # longer than the context
]


@pytest.mark.parametrize("body,param", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_chat_requests_get_400_with_an_openai_error(server, body, param) -> None:
    status, out = post(server.base, "/v1/chat/completions", body)
    assert_openai_error(status, out, 400, param)


@pytest.mark.parametrize(
    "body,param",
    [({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": [1, 2]}, "prompt"), ({"prompt": "a", "echo": True}, "echo"),
     ({"prompt": "a", "messages": []}, "messages"), ({"prompt": "a", "best_of": 3}, "best_of"),
     ({"prompt": "a", "logprobs": True}, "logprobs"), ({"prompt": "a", "logprobs": 21}, "logprobs"),
     ({"prompt": "a", "top_logprobs": 2}, "top_logprobs")],
)  # fmt: skip
def test_bad_completion_requests_get_400(server, body, param) -> None:
    assert_openai_error(*post(server.base, "/v1/completions", body), 400, param)


# ---- log-probabilities ---------------------------------------------------------------------------------
def check_chat_logprobs(content: list, text: str, top: int) -> None:
    """Greedy: each token is the likeliest of its alternatives; the tokens spell the reply."""
    assert "".join(t.token for t in content) == text
    for t in content:
        assert t.logprob <= 0 and t.bytes == list(t.token.encode())
        alts = [a.logprob for a in t.top_logprobs]
        assert len(alts) == top and alts == sorted(alts, reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob


def test_chat_logprobs_streamed_and_not(server) -> None:
    c = server.client()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Name three colors."}], temperature=0,
              max_tokens=16, logprobs=True, top_logprobs=3)  # fmt: skip
    r = c.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens  # ended by max_tokens or a end-of-turn token
    check_chat_logprobs(content, r.choices[0].message.content, 3)
    streamed = [t for ch in c.chat.completions.create(stream=True, **kw) if ch.choices and ch.choices[0].logprobs
                for t in ch.choices[0].logprobs.content]  # fmt: skip
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]
    plain = c.chat.completions.create(**{**kw, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    only = c.chat.completions.create(**{**kw, "top_logprobs": None})  # logprobs alone: no alternatives
    assert [t.top_logprobs for t in only.choices[0].logprobs.content] == [[]] * len(content)


def test_completion_logprobs_in_the_legacy_layout(server) -> None:
    r = server.client().completions.create(model=MODEL, prompt=LONG, temperature=0, max_tokens=8, logprobs=2)
    lp, text = r.choices[0].logprobs, r.choices[0].text
    assert "".join(lp.tokens) == text and len(lp.tokens) == len(lp.token_logprobs) == 8
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(8)]
    for tok, v, alts in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(alts) <= 2 and max(alts.values()) == v and alts[tok] == v  # greedy: the likeliest
    streamed = [ch.choices[0].logprobs for ch in server.client().completions.create(
        model=MODEL, prompt=LONG, temperature=0, max_tokens=8, logprobs=2, stream=True) if ch.choices[0].logprobs]  # fmt: skip
    assert [t for x in streamed for t in x.tokens] == lp.tokens
    assert [o for x in streamed for o in x.text_offset] == lp.text_offset


def test_the_openai_client_sees_a_bad_request_error(server) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        chat(server.client(), "hi", temperature=-0.5)
    assert e.value.status_code == 400 and "temperature must be >= 0" in e.value.message


def test_oversized_body_is_refused(server) -> None:
    # urllib sends the whole body before it reads: the 413 must wait for it, or the client meets a reset
    # connection (a broken pipe) instead of the answer. Several tries, since that was a race.
    for size in (1024 * 1024 + 10, 3 * 1024 * 1024, 8 * 1024 * 1024):
        body = {"messages": [{"role": "user", "content": "x" * size}]}
        assert_openai_error(*post(server.base, "/v1/chat/completions", body), 413, None)
    assert server.health()["status"] == "ok"


def test_a_chunked_oversized_body_is_refused_too(server) -> None:
    chunks = (b"x" * 65536 for _ in range(20))  # no Content-Length: the limit counts what arrives
    req = urllib.request.Request(server.base + "/v1/completions", data=chunks, method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert_openai_error(e.value.code, json.loads(e.value.read()), 413, None)


def test_a_body_past_the_drain_limit_is_refused_unread(server) -> None:
    host, port = server.base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:  # declares 10 GB, sends none of it
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {10**10}\r\n\r\n".encode())  # fmt: skip
        head = s.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413"), head
    assert server.health()["status"] == "ok"


def test_unknown_routes_and_methods_get_openai_errors(server) -> None:
    assert_openai_error(*post(server.base, "/v1/embeddings", {}), 404, None)
    req = urllib.request.Request(server.base + "/v1/chat/completions", method="GET")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert_openai_error(e.value.code, json.loads(e.value.read()), 405, None)


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")
def test_curl(server) -> None:
    def curl(*args: str) -> str:
        p = subprocess.run(["curl", "-sS", *args], capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout

    body = {"model": MODEL, "prompt": LONG, "temperature": 0, "max_tokens": 6}
    out = json.loads(
        curl(server.url + "/completions", "-H", "Content-Type: application/json", "-d", json.dumps(body))
    )
    assert out["choices"][0]["text"].startswith(" 5, 6")
    sse = curl("-N", server.url + "/completions", "-d", json.dumps({**body, "stream": True}))
    events = [line.removeprefix("data: ") for line in sse.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == out["choices"][0]["text"]
    bad = json.loads(curl(server.url + "/chat/completions", "-d", "{"))
    assert bad["error"]["type"] == "invalid_request_error"


# ---- disconnects, the queue, keys ------------------------------------------------------------------------
def _wait_for(cond, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_client_that_disconnects_mid_stream_frees_the_slot(server) -> None:
    # 2000 counting tokens would take half a minute on one thread; the client leaves after three chunks
    stream = server.client().completions.create(
        model=MODEL, prompt=LONG, temperature=0, max_tokens=2000, stream=True
    )
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    assert server.health()["running"] == 1
    stream.close()
    _wait_for(lambda: server.health()["running"] == 0, timeout=10)
    assert chat(server.client(timeout=10), "hi", temperature=0, max_tokens=4)


def test_health_answers_while_generating(server) -> None:
    stream = server.client().completions.create(
        model=MODEL, prompt=LONG, temperature=0, max_tokens=2000, stream=True
    )
    next(iter(stream))
    try:
        for _ in range(5):
            assert server.health()["running"] == 1
    finally:
        stream.close()
    _wait_for(lambda: server.health()["running"] == 0, timeout=10)


def test_api_key(guarded) -> None:
    with pytest.raises(openai.AuthenticationError):
        guarded.client("wrong").models.list()
    status, body = post(
        guarded.base, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}
    )
    assert assert_openai_error(status, body, 401, None)["code"] == "invalid_api_key"
    assert [m.id for m in guarded.client(KEY).models.list()] == [MODEL]
    assert chat(guarded.client(KEY), "hi", temperature=0, max_tokens=4)
    assert guarded.health()["status"] == "ok"  # health needs no key


def raw_request(base: str, path: str, body: dict, key: str | None = None) -> socket.socket:
    """Send a request on a bare socket and return it unread: closing it is a client that went away."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)  # fmt: skip
    return s


def test_a_client_that_leaves_a_plain_request_frees_the_slot(server) -> None:
    s = raw_request(server.base, "/v1/completions", {"prompt": LONG, "temperature": 0, "max_tokens": 2000})
    _wait_for(lambda: server.health()["running"] == 1)
    s.close()
    _wait_for(lambda: server.health()["running"] == 0, timeout=10)


def test_a_full_queue_answers_503_and_disconnects_free_it(guarded) -> None:
    c = guarded.client(KEY)
    running = c.completions.create(model=MODEL, prompt=LONG, temperature=0, max_tokens=2000, stream=True)
    next(iter(running))
    queued = raw_request(guarded.base, "/v1/completions", {"prompt": "hi", "stream": True}, KEY)
    _wait_for(lambda: guarded.health()["waiting"] == 1)
    status, body = post(guarded.base, "/v1/completions", {"prompt": "hi", "max_tokens": 2},
                        {"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert assert_openai_error(status, body, 503, None)["code"] == "queue_full"
    queued.close()  # a queued client that leaves gives its place back while the first still generates
    _wait_for(lambda: guarded.health()["waiting"] == 0, timeout=10)
    assert guarded.health()["running"] == 1
    waiting: list = []
    t = threading.Thread(target=lambda: waiting.append(
        c.completions.create(model=MODEL, prompt=LONG, temperature=0, max_tokens=8)))  # fmt: skip
    t.start()
    _wait_for(lambda: guarded.health()["waiting"] == 1)
    running.close()  # the queued request gets the model, promptly
    t.join(timeout=20)
    assert not t.is_alive() and waiting[0].choices[0].text.startswith(" 5, 6")
    _wait_for(lambda: guarded.health() == {**guarded.health(), "running": 0, "waiting": 0}, timeout=10)


def test_stopping_the_server_mid_stream_is_clean(tmp_path) -> None:
    s = Server(tmp_path)
    stream = s.client().completions.create(
        model=MODEL, prompt=LONG, temperature=0, max_tokens=2000, stream=True
    )
    next(iter(stream))
    s.proc.terminate()
    assert s.proc.wait(20) == 0
    log = s.log.read_text()
    assert "Traceback" not in log and "server stopped" in log, log


def test_concurrent_streams_get_their_own_replies(server) -> None:
    """The load test: 8 clients x 20 streamed greedy requests at once (160 requests, ~40 s on 2 busy cores):
    all complete without an error, each equal to the same request alone, and the server's RSS stays flat."""
    prompts = [f"Say something about the number {i}." for i in range(8)]
    client = server.client()
    alone = {p: stream_text(client, p, temperature=0, max_tokens=6)[0] for p in prompts}
    before = server.rss_kib()

    def worker(p: str) -> list[str]:
        c = server.client()
        return [stream_text(c, p, temperature=0, max_tokens=6)[0] for _ in range(20)]

    with ThreadPoolExecutor(8) as pool:
        results = dict(zip(prompts, pool.map(worker, prompts), strict=True))
    for p in prompts:
        assert results[p] == [alone[p]] * 20, p
    after = server.rss_kib()
    assert after < before + 64 * 1024, (before, after)  # KiB: no per-request growth to speak of
    assert server.health()["running"] == 0


# ---- start-up --------------------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, timeout=60)


def assert_one_line_error(p: subprocess.CompletedProcess, message: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr


def test_a_public_host_needs_a_key_or_insecure() -> None:
    assert_one_line_error(run_cli("serve", "--host", "0.0.0.0"), "pass --api-key KEY")
    assert_one_line_error(run_cli("serve", "--host", "example.invalid"), "--insecure")


def test_bad_serve_options() -> None:
    assert_one_line_error(run_cli("serve", "--max-queue", "-1"), "--max-queue must be >= 0")
    assert_one_line_error(run_cli("serve", "--max-tokens", "0"), "--max-tokens must be >= 1")
    assert_one_line_error(run_cli("serve", "--api-key", " "), "--api-key is empty")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line_error(run_cli("serve", "--port", str(port)), f"cannot listen on 127.0.0.1:{port}")


# ---- the other backend, and a model without a chat template --------------------------------------------
def test_the_torch_backend_serves_the_same_api(server, tmp_path) -> None:
    s = Server(tmp_path, "--backend", "torch")
    try:
        messages = [{"role": "user", "content": "Name three colors."}]
        r = s.client().chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
        ref = server.client().chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=16
        )
        assert r.usage.prompt_tokens == ref.usage.prompt_tokens  # the same template and tokenizer
        assert r.choices[0].message.content.strip() and r.choices[0].finish_reason in ("stop", "length")
        assert (
            stream_text(s.client(), "Name three colors.", temperature=0, max_tokens=16)[0]
            == r.choices[0].message.content
        )
    finally:
        s.stop()


def test_a_base_model_continues_chat_messages_as_plain_text(tmp_path) -> None:
    """gemma3-270m has no chat template: as `llmctl chat`, chat requests are continued as written."""
    s_model = "gemma3-270m"
    s = Server(tmp_path, "--context", "512", model=s_model)
    try:
        assert "completion (no chat template)" in s.log.read_text()
        c = s.client()
        prompt = "The capital of France is"
        r = c.chat.completions.create(
            model=s_model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=8
        )
        ref = c.completions.create(model=s_model, prompt=prompt, temperature=0, max_tokens=8)
        assert r.choices[0].message.content == ref.choices[0].text and ref.choices[0].text.strip()
    finally:
        s.stop()
