"""`llmctl serve [MODEL]`: an OpenAI-compatible HTTP server (``llmctl.server``) over chat's backends."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from llmctl.commands.render.chat import chat_notice, serve_started
from llmctl.errors import UsageError

MAX_BODY = 1024 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def serve(
    model: str = typer.Argument(
        None, help="Folder, .gguf, hub id org/name[@rev][:FILE.gguf] or bundled name (default: smollm2-135m)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs --api-key or --insecure."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port, shown on start)."),
    api_key: str = typer.Option(None, "--api-key", envvar="LLMCTL_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (or set LLMCTL_API_KEY, which keeps it out of the process list)."),
    insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without an API key."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests that may wait behind the one generating; more get HTTP 503."),
    max_tokens: int = typer.Option(1024, "--max-tokens", "-n", help="Most tokens a request may ask for (and its default)."),
    max_body: int = typer.Option(MAX_BODY, "--max-body", help="Largest request body in bytes; larger gets HTTP 413."),
    backend: str = typer.Option("auto", "--backend", help="auto (llama.cpp for GGUF, else torch), torch, llama.cpp, vllm (pip install 'llmctl[vllm]')."),
    tensor_parallel: int = typer.Option(None, "--tensor-parallel", "--tp", help="vllm: GPUs to split the model across (vLLM's tensor_parallel_size)."),
    context: int = typer.Option(None, "--context", "-c", help="Context tokens to allocate (default: the model's limit, at most 4096)."),
    device: str = typer.Option(None, "--device", help="torch: auto, cpu, cuda, cuda:N, mps."),
    gpu_layers: int = typer.Option(None, "--gpu-layers", "-ngl", help="llama.cpp: layers to offload to the GPU (-1 all, 0 none)."),
    dtype: str = typer.Option(None, "--dtype", help="torch compute dtype: fp32, bf16, fp16."),
    threads: int = typer.Option(None, "--threads", "-t", help="CPU threads (default: the idle physical cores)."),
    template: Path = typer.Option(None, "--template", help="Jinja chat template file to use instead of the model's."),
    raw: bool = typer.Option(False, "--raw", help="Chat requests are continued as plain text, no chat template (the default for models without one)."),
    chat_mode: bool = typer.Option(False, "--chat", help="Chat with the ChatML fallback when the model has no chat template."),
) -> None:
    """Serve a model over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models, /health)."""
    from llmctl.commands.chat import _read_template

    if not is_loopback(host) and not api_key and not insecure:
        raise UsageError(
            f"--host {host} exposes the server beyond this machine; pass --api-key KEY (or set LLMCTL_API_KEY), "
            "or --insecure to serve without one"
        )
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty; pass a secret clients will send as 'Authorization: Bearer KEY'")
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535, got {port}")
    if max_queue < 0:
        raise UsageError(f"--max-queue must be >= 0 (0: refuse requests while one generates), got {max_queue}")
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {max_tokens}")
    if max_body < 1024:
        raise UsageError(f"--max-body must be at least 1024 bytes, got {max_body}")
    if raw and (chat_mode or template is not None):
        raise UsageError("--raw (completion mode) excludes --chat and --template; pass one of them")
    template_text = _read_template(template) if template is not None else None

    from llmctl.runtime.session import load_backend
    from llmctl.server.app import bind, build_app, run
    from llmctl.server.engine import Engine

    sock = bind(host, port)
    try:
        engine_backend, line = load_backend(
            model, backend, context=context, device=device, dtype=dtype, threads=threads, gpu_layers=gpu_layers,
            tensor_parallel=tensor_parallel,
        )
        source = engine_backend.source
        has_template = template_text is not None or bool((engine_backend.tokenizer.chat_template or "").strip())
        completion = raw or (not has_template and not chat_mode)
        engine = Engine(
            engine_backend, max_queue=max_queue, template=template_text, chat_completion_mode=completion
        )
        try:
            app = build_app(
                engine, model_id=source.display, api_key=api_key, max_body=max_body, max_tokens=max_tokens
            )
            bound_host, bound_port = sock.getsockname()[:2]
            serve_started(
                line,
                url=f"http://{_url_host(bound_host)}:{bound_port}/v1",
                model=source.display,
                chat_mode="completion (no chat template)" if completion else "chat template",
                auth=api_key is not None,
                max_queue=max_queue,
            )
            run(app, sock, on_stop=engine.cancel_all)
        finally:
            engine.close()
    finally:
        sock.close()
    chat_notice("server stopped")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
