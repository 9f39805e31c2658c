"""Serving speed: `llmctl serve` against llama-cpp-python's own server on the same GGUF, 1, 4 and 8 clients.

    python bench/serve.py [MODEL] [--threads 2] [--clients 1 4 8] [--requests 2] [--max-tokens 32]
                          [--no-reference] [--json out.json]

MODEL defaults to the bundled smollm2-135m (a GGUF; both servers run it with llama.cpp). Each client sends
``--requests`` streamed greedy chat requests one after the other (distinct prompts, ``max_tokens`` as
given) through the official ``openai`` client; all clients start together. Reported per server and
client count: wall time, **aggregate tokens/s** (completion tokens of all requests / wall time; tokens
from ``usage`` when the server streams it, else one per streamed chunk) and **TTFT** (request sent →
first content chunk; median and worst), which under concurrency includes the wait in the queue: both
servers generate one request at a time.

The reference is ``python -m llama_cpp.server`` (with ``--interrupt_requests False``: by default a new
request interrupts the one streaming). It needs llama-cpp-python's server extra (fastapi,
pydantic-settings, sse-starlette, starlette-context): ``pip install 'llama-cpp-python[server]'``, or put
them on ``PYTHONPATH``. Without it only llmctl is measured, and the output says so. The CPU model is
printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"the server did not answer {url} within {timeout:.0f} s")


def start(kind: str, model: str, gguf: Path, threads: int, context: int, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tmp / f"{kind}.log"
    if kind == "llmctl serve":
        cmd = [sys.executable, "-m", "llmctl", "serve", model, "--port", str(port), "--threads", str(threads),
               "--context", str(context), "--max-queue", "64"]  # fmt: skip
    else:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
               "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(context),
               "--interrupt_requests", "False"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    base = f"http://127.0.0.1:{port}"
    wait_ready(base + ("/health" if kind == "llmctl serve" else "/v1/models"), proc, log)
    return proc, base + "/v1"


def one_request(client, model: str, prompt: str, max_tokens: int) -> tuple[float, int]:
    """(TTFT seconds, completion tokens) of one streamed greedy chat request."""
    t0 = time.perf_counter()
    ttft, chunks, usage = None, 0, None
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    for c in stream:
        if c.usage is not None:
            usage = c.usage.completion_tokens
        if c.choices and c.choices[0].delta.content:
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
    return (ttft if ttft is not None else time.perf_counter() - t0), (usage if usage is not None else chunks)


def measure(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    def client_run(i: int) -> list[tuple[float, int]]:
        c = openai.OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
        return [one_request(c, model, f"Write two sentences about topic number {i * requests + j}.", max_tokens)
                for j in range(requests)]  # fmt: skip

    one_request(openai.OpenAI(base_url=url, api_key="bench", max_retries=0), model, "Warm up.", 4)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client_run, range(clients)) for r in rs]
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "wall_s": round(wall, 3),
        "tokens": tokens,
        "tok_s": round(tokens / wall, 2),
        "ttft_median_s": round(statistics.median(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--no-reference", action="store_true", help="measure llmctl serve only")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from llmctl.sources import resolve

    source = resolve(args.model)
    if not source.is_gguf:
        raise SystemExit(f"{source.display} is not a GGUF file; the comparison runs both servers on llama.cpp")
    servers = ["llmctl serve"]
    note = None
    if not args.no_reference:
        try:
            import llama_cpp.server.app  # noqa: F401
        except ImportError as e:
            note = f"llama_cpp.server not measured: {e}; pip install 'llama-cpp-python[server]'"
        else:
            servers.append("llama_cpp.server")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in servers:
            proc, url = start(kind, args.model, Path(source.path), args.threads, args.context, Path(tmp))
            try:
                for n in args.clients:
                    row = {"server": kind, **measure(url, source.display, n, args.requests, args.max_tokens)}
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                proc.wait(30)
    header = f"{source.display} on {cpu_name()}, {args.threads} threads, max_tokens {args.max_tokens}, greedy"
    print(header)
    print(f"{'server':<18}{'clients':>8}{'requests':>9}{'wall s':>9}{'tok/s':>9}{'TTFT med':>10}{'TTFT max':>10}")
    for r in rows:
        print(f"{r['server']:<18}{r['clients']:>8}{r['requests']:>9}{r['wall_s']:>9.2f}{r['tok_s']:>9.1f}"
              f"{r['ttft_median_s']:>10.3f}{r['ttft_max_s']:>10.3f}")  # fmt: skip
    if note:
        print(note)
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "cpu": cpu_name(), "rows": rows, "note": note}, indent=2))


if __name__ == "__main__":
    main()
