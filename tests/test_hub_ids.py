"""Hub ids as a new user meets them (issue 4, items 6 and 9), with no network at all.

Each test lays out a real huggingface-hub cache in tmp, points huggingface-hub at it and at a hub that
refuses every connection (``HF_ENDPOINT=http://127.0.0.1:9``), and leaves ``HF_HUB_OFFLINE`` unset, as a
laptop on a train has it. Before: a cached config gave a 119-line ``ConnectError`` traceback (exit 1), an
uncached id ten lines of retries and 24 s before its error, a GGUF-only repository was "not in the cache"
and several GGUFs asked for a file name a hub id could not give; quantize named its output after the
snapshot's commit hash.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import one_error_line
from test_hostile_llamacpp import tiny_gguf
from test_sources import _folder_files, make_hub_cache

from llmctl.errors import SourceError

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, every connection is refused
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The cache; the commands run by ``cli`` see no HF_HUB_OFFLINE and an unreachable hub. Calls in this
    process see HF_HUB_OFFLINE=1: huggingface-hub reads HF_ENDPOINT once, at import, so only a subprocess
    can be sure where it would connect."""
    cache = tmp_path / "hub"
    cache.mkdir()
    for key, value in {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": UNREACHABLE, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(key, value)
    return cache


@pytest.fixture(scope="module")
def gguf_blob(tmp_path_factory) -> bytes:
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "m.gguf").read_bytes()


def cli(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``llmctl ARGS`` with this process's environment (the fixture's cache and hub); its wall time."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, timeout=120, cwd=cwd, input="",
        env=env,
    )  # fmt: skip
    return p, time.perf_counter() - t0


# ---- item 9: a cached config and no network ------------------------------------------------------------
def test_a_cached_config_estimates_without_the_network(hub: Path, tmp_path: Path) -> None:
    make_hub_cache(hub, "meta-llama/Llama-3.1-8B", {"config.json": json.dumps(LLAMA_31_8B).encode()},
                   commit="0123456789abcdef" * 2 + "01234567")  # fmt: skip
    p, _ = cli("estimate-memory", "meta-llama/Llama-3.1-8B", "-w", "int4", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "ConnectError" not in p.stdout + p.stderr
    assert "meta-llama/Llama-3.1-8B" in p.stdout
    assert "hub is unreachable: used the cached snapshot" in p.stdout + p.stderr


# ---- item 6: every command fails fast, in one line, when the hub is unreachable and the cache is empty -
@pytest.mark.parametrize(
    "args",
    [
        ("estimate-memory", "acme/absent", "-w", "int4"),
        ("chat", "acme/absent", "-p", "hi"),
        ("quantize", "acme/absent", "-f", "int4", "--dry-run"),
        ("eval", "acme/absent", "--data", "sotu"),
    ],
    ids=lambda a: a[0],
)
def test_an_unreachable_hub_is_one_line_at_once(hub: Path, tmp_path: Path, args: tuple[str, ...]) -> None:
    p, wall = cli(*args, cwd=tmp_path)
    one_error_line(
        p, f"cannot reach the Hugging Face hub ({UNREACHABLE}) for acme/absent and it is not in the cache"
    )
    assert "HF_HUB_OFFLINE=1" in p.stderr and "Retrying" not in p.stderr
    assert wall < 10, wall  # huggingface-hub's five retries with backoff took 24 s


# ---- item 9: default output names ------------------------------------------------------------------------
def test_the_default_output_is_named_after_the_repository(hub: Path, tmp_path: Path) -> None:
    make_hub_cache(
        hub, "acme/tiny-llama", _folder_files(tmp_path), commit="0123456789abcdef" * 2 + "01234567"
    )
    p, _ = cli("quantize", "acme/tiny-llama", "-f", "int4", "-g", "32", "--dry-run", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["out"] == "tiny-llama-int4"

    from llmctl.sources import resolve

    src = resolve("acme/tiny-llama")
    assert src.repo == "acme/tiny-llama" and src.path.name == "0123456789abcdef" * 2 + "01234567"
    assert src.out_stem == "tiny-llama"


# ---- item 9: repositories of GGUF files ------------------------------------------------------------------
def gguf_repo(hub: Path, blob: bytes, *names: str, commit: str = "d" * 40, ref: str = "main") -> Path:
    return make_hub_cache(hub, "acme/tiny-GGUF", {n: blob for n in names} | {"README.md": b"# tiny"},
                          commit=commit, ref=ref)  # fmt: skip


def test_a_repository_of_one_gguf_is_that_gguf(hub: Path, tmp_path: Path, gguf_blob: bytes) -> None:
    snap = gguf_repo(hub, gguf_blob, "tiny-Q8_0.gguf")
    p, _ = cli("estimate-memory", "acme/tiny-GGUF", cwd=tmp_path)
    assert p.returncode == 0, p.stderr  # was: "acme/tiny-GGUF is not in the Hugging Face cache"
    p, _ = cli("chat", "acme/tiny-GGUF", "-p", "hi", "-n", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr

    from llmctl.sources import resolve

    src = resolve("acme/tiny-GGUF")
    assert src.kind == "hub" and src.is_gguf and src.path == snap / "tiny-Q8_0.gguf"
    assert src.config.num_hidden_layers == 1 and src.out_stem == "tiny-Q8_0"


def test_several_ggufs_name_the_choices_and_the_syntax(hub: Path, tmp_path: Path, gguf_blob: bytes) -> None:
    gguf_repo(hub, gguf_blob, "tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf", "tiny-Q4_K_S.gguf")
    for command in ("chat", "estimate-memory"):
        p, _ = cli(command, "acme/tiny-GGUF", *(("-p", "hi") if command == "chat" else ()), cwd=tmp_path)
        line = one_error_line(p, "acme/tiny-GGUF holds 3 .gguf files in the cache")
        assert "tiny-Q4_K_M.gguf, tiny-Q4_K_S.gguf, tiny-Q8_0.gguf" in line
        assert "acme/tiny-GGUF:NAME.gguf" in line and "acme/tiny-GGUF:Q4_K_M" in line
    p, _ = cli("chat", "acme/tiny-GGUF:Q4_K_M", "-p", "hi", "-n", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize(
    "spec,name",
    [
        ("acme/tiny-GGUF:tiny-Q4_K_S.gguf", "tiny-Q4_K_S.gguf"),
        ("acme/tiny-GGUF:TINY-q4_k_s.GGUF", "tiny-Q4_K_S.gguf"),  # case-insensitive when nothing is exact
        ("acme/tiny-GGUF:Q4_K_M", "tiny-Q4_K_M.gguf"),
        ("acme/tiny-GGUF:q8_0", "tiny-Q8_0.gguf"),
        ("acme/tiny-GGUF:IQ4_XS", "tiny-IQ4_XS.gguf"),
        ("acme/tiny-GGUF@main:Q8_0", "tiny-Q8_0.gguf"),
    ],
)
def test_a_file_or_quant_tag_picks_one(hub: Path, gguf_blob: bytes, spec: str, name: str) -> None:
    from llmctl.sources import resolve

    snap = gguf_repo(
        hub, gguf_blob, "tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf", "tiny-Q4_K_S.gguf", "tiny-IQ4_XS.gguf"
    )
    for need_weights in (True, False):
        src = resolve(spec, need_weights=need_weights)
        assert src.path == snap / name and src.repo == "acme/tiny-GGUF"


def test_a_revision_and_a_file_compose(hub: Path, gguf_blob: bytes) -> None:
    from llmctl.sources import resolve

    gguf_repo(hub, gguf_blob, "tiny-Q8_0.gguf", "tiny-Q4_0.gguf")
    old = gguf_repo(hub, gguf_blob, "tiny-Q8_0.gguf", "tiny-F16.gguf", commit="e" * 40, ref="v1")
    src = resolve("acme/tiny-GGUF@v1:F16")
    assert src.path == old / "tiny-F16.gguf" and src.revision == "v1"
    with pytest.raises(SourceError, match=r"acme/tiny-GGUF@v1: no quant tag 'Q4_0' in the cache; it holds"):
        resolve("acme/tiny-GGUF@v1:Q4_0")


@pytest.mark.parametrize(
    "file,message",
    [
        ("Q4", "no quant tag 'Q4' in the cache; it holds tiny-Q4_K_M.gguf, tiny-Q4_K_S.gguf"),
        ("Q4_K", "no quant tag 'Q4_K'"),  # a tag is a whole part of the name, not a prefix
        ("other.gguf", "no file 'other.gguf' in the cache"),
        ("K_S", None),  # a whole part: matches tiny-Q4_K_S.gguf only
    ],
)
def test_a_file_that_picks_none_lists_the_files(
    hub: Path, gguf_blob: bytes, file: str, message: str | None
) -> None:
    from llmctl.sources import resolve

    gguf_repo(hub, gguf_blob, "tiny-Q4_K_M.gguf", "tiny-Q4_K_S.gguf")
    if message is None:
        assert resolve(f"acme/tiny-GGUF:{file}").path.name == "tiny-Q4_K_S.gguf"
        return
    with pytest.raises(SourceError, match=message):
        resolve(f"acme/tiny-GGUF:{file}")


def test_a_tag_matching_several_files_lists_them(hub: Path, gguf_blob: bytes) -> None:
    from llmctl.sources import resolve

    gguf_repo(hub, gguf_blob, "tiny-Q4_K_M-00001-of-00002.gguf", "tiny-Q4_K_M-00002-of-00002.gguf")
    with pytest.raises(
        SourceError, match=r"quant tag 'Q4_K_M' matches 2 files in the cache \(tiny-Q4_K_M-00001"
    ):
        resolve("acme/tiny-GGUF:Q4_K_M")


@pytest.mark.parametrize(
    "file,problem",
    [
        ("../tiny-Q8_0.gguf", "contains '/'"),
        ("sub/tiny-Q8_0.gguf", "contains '/'"),
        ("..\\tiny-Q8_0.gguf", "contains '\\\\'"),
        ("..", "starts with '.'"),
        (".hidden.gguf", "starts with '.'"),
        ("", "is empty"),
        ("a\x00b.gguf", "contains '\\x00'"),
        ("model.safetensors", "is not a .gguf file name or a quant tag"),
        ("config.json", "is not a .gguf file name or a quant tag"),
    ],
)
def test_a_file_part_is_a_plain_gguf_name(
    hub: Path, gguf_blob: bytes, tmp_path: Path, file: str, problem: str
) -> None:
    """The file part is checked before huggingface-hub sees it: it never reaches outside the snapshot."""
    from llmctl.sources import resolve

    gguf_repo(hub, gguf_blob, "tiny-Q8_0.gguf")
    (hub / "models--acme--tiny-GGUF" / "snapshots" / "tiny-Q8_0.gguf").write_bytes(gguf_blob)  # one folder up
    with pytest.raises(SourceError, match=f"acme/tiny-GGUF: file .* {re.escape(problem)}; pass a .gguf file"):
        resolve(f"acme/tiny-GGUF:{file}")


def test_a_file_part_from_the_cli(hub: Path, tmp_path: Path) -> None:
    p, _ = cli("chat", "acme/tiny-GGUF:../../x.gguf", "-p", "hi", cwd=tmp_path)
    one_error_line(p, "acme/tiny-GGUF: file '../../x.gguf' contains '/'")


def test_a_repository_of_neither_weights_nor_ggufs(hub: Path) -> None:
    from llmctl.sources import resolve

    make_hub_cache(hub, "acme/docs", {"README.md": b"# nothing here"})
    with pytest.raises(SourceError, match="acme/docs has neither config.json nor a .gguf file in the cache"):
        resolve("acme/docs")


def test_a_hub_that_answers_503_leaves_the_cache_to_answer(
    hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub that is up but failing (a real local server answering 503 to everything) is no hub either."""
    import http.server
    import threading

    class Down(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(503)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Down)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        make_hub_cache(hub, "meta-llama/Llama-3.1-8B", {"config.json": json.dumps(LLAMA_31_8B).encode()})
        p, _ = cli("estimate-memory", "meta-llama/Llama-3.1-8B", "-w", "int4", cwd=tmp_path)
        assert p.returncode == 0 and "hub is unreachable: used the cached snapshot" in p.stdout + p.stderr, (
            p.stderr
        )
        p, wall = cli("estimate-memory", "acme/absent", cwd=tmp_path)
        one_error_line(p, "cannot reach the Hugging Face hub (http://127.0.0.1:")
        assert wall < 10, wall  # huggingface-hub retries a 503 five times with backoff
    finally:
        server.shutdown()


# ---- with a hub: a real local HTTP server that speaks the part of the hub's protocol huggingface-hub uses --
class LocalHub:
    """Serves one repository: ``/api/models/REPO[/revision/REV]`` (its listing) and ``/REPO/resolve/REV/FILE``
    (HEAD and GET, with the commit and ETag headers huggingface-hub reads); records each request's path."""

    def __init__(self, repo: str, files: dict[str, bytes], commit: str = "f" * 40) -> None:
        import hashlib
        import http.server
        import threading

        hub, self.requests = self, []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self, body: bool) -> None:
                hub.requests.append(self.path)
                path = self.path.split("?")[0]
                if path in (f"/api/models/{repo}", f"/api/models/{repo}/revision/main"):
                    data = json.dumps({"id": repo, "sha": commit,
                                       "siblings": [{"rfilename": n} for n in files]}).encode()  # fmt: skip
                    headers = {"Content-Type": "application/json"}
                elif path.startswith(f"/{repo}/resolve/") and path.rsplit("/", 1)[-1] in files:
                    data = files[path.rsplit("/", 1)[-1]]
                    headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                else:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_GET(self) -> None:
                self._answer(True)

            def do_HEAD(self) -> None:
                self._answer(False)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def local_hub(hub: Path, gguf_blob: bytes, monkeypatch: pytest.MonkeyPatch):
    names = ("tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf", "tiny-Q4_K_S.gguf")
    server = LocalHub("acme/tiny-GGUF", {n: gguf_blob for n in names} | {"README.md": b"# tiny"})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    yield server
    server.server.shutdown()


def test_online_a_quant_tag_downloads_that_gguf_only(local_hub: LocalHub, hub: Path, tmp_path: Path) -> None:
    p, _ = cli("estimate-memory", "acme/tiny-GGUF", cwd=tmp_path)
    one_error_line(p, "acme/tiny-GGUF holds 3 .gguf files on the hub (tiny-Q4_K_M.gguf, tiny-Q4_K_S.gguf")
    p, _ = cli("estimate-memory", "acme/tiny-GGUF:Q4_K_M", cwd=tmp_path)  # never gigabytes for a header
    one_error_line(p, "acme/tiny-GGUF:tiny-Q4_K_M.gguf is not in the Hugging Face cache")
    assert "estimate-memory does not download weights" in p.stderr
    p, _ = cli("chat", "acme/tiny-GGUF:q4_k_m", "-p", "hi", "-n", "2", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    snap = hub / "models--acme--tiny-GGUF" / "snapshots" / ("f" * 40)
    assert [f.name for f in snap.iterdir()] == ["tiny-Q4_K_M.gguf"]  # the one file, nothing else
    assert not [r for r in local_hub.requests if "Q8_0" in r or "Q4_K_S" in r]
    p, _ = cli("estimate-memory", "acme/tiny-GGUF:Q4_K_M", cwd=tmp_path)  # cached now
    assert p.returncode == 0 and "unreachable" not in p.stdout + p.stderr, p.stderr
