"""Hostile folders, hub ids and extension caches (docs/security.md, issue 17 items 5, 10, 11): files built
here by hand, each case proving the hole it closes.

* a C++ extension planted at the predictable name under ``TORCH_EXTENSIONS_DIR`` is loaded only from
  folders nobody else can write (its constructor would create a marker file);
* a hub revision is checked by git's ref rules before huggingface-hub turns it into ``refs/<revision>``;
* nested JSON, mistyped safetensors shapes, absurd config sizes, GGUF dimensions, NaN weights, contexts
  that do not fit in memory and out-of-range baseline token ids end in one ``error:`` line and exit 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_error_line
from test_bad_inputs import TINY_CONFIG, folder, listing, safetensors_blob
from test_gguf_file import V, _kv, _str, _tensor_info, gguf_bytes
from test_sources import _folder_files, make_hub_cache

from llmctl.errors import FormatError, SourceError, UsageError

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, timeout=300, cwd=cwd, input="",
        env=env or ENV,
    )  # fmt: skip




# ---- a tiny model the torch runtime can chat with: llmctl's own Transformer, a trained BPE tokenizer ------
# 2 layers x 2 kv heads x head_dim 16, fp32: 512 bytes of KV cache per position (2**31 positions: 1 TiB)
CHAT_CONFIG = {**TINY_CONFIG, "vocab_size": 320, "max_position_embeddings": 256, "tie_word_embeddings": True}


def chat_model(d: Path, *, nan: bool = False, **config) -> Path:
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llmctl.config import ModelConfig
    from llmctl.runtime.model import Transformer

    d.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(["hello world", "the quick brown fox"] * 10, trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_dict(CHAT_CONFIG))
    weights = {
        k: torch.randn_like(v) * 0.1 if v.ndim > 1 else v.clone() for k, v in model.state_dict().items()
    }
    if nan:
        weights["model.norm.weight"][3] = float("nan")  # one NaN: every logit is NaN
    save_file(weights, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({**CHAT_CONFIG, **config}))
    return d


# ---- item 5: the C++ extension cache --------------------------------------------------------------------
@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    """(extensions root, build folder, marker): a shared library at the name llmctl.quant.native loads,
    whose constructor creates the marker file when it is loaded, in private (0700) folders."""
    from llmctl.quant import native

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the planted library")
    root, marker = tmp_path / "ext", tmp_path / "LOADED"
    build = root / native._NAME
    build.mkdir(parents=True, mode=0o700)
    root.chmod(0o700)
    source = tmp_path / "planted.c"
    source.write_text(
        "#include <stdio.h>\n"
        "__attribute__((constructor)) static void planted(void) {\n"
        f'  FILE *f = fopen("{marker}", "w"); if (f) fclose(f);\n'
        "}\n"
    )
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(build / f"{native._NAME}.so"), str(source)], check=True)
    (build / f"{native._NAME}.so").chmod(0o755)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    monkeypatch.delenv("LLMCTL_NATIVE", raising=False)
    monkeypatch.setattr(native, "_module", None)
    monkeypatch.setattr(native, "_failed", False)
    return root, build, marker


def test_a_library_in_private_folders_is_loaded(planted: tuple[Path, Path, Path]) -> None:
    """The control: where only the caller can write, the cached build is trusted, and this library's code
    runs on load (it is no Python extension, so get() then falls back to eager torch)."""
    from llmctl.quant import native

    _, _, marker = planted
    assert native.get() is None
    assert marker.exists()


def _other_user(root: Path, build: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a folder to another user needs root")
    os.chown(build, 65534, 65534)


OPENINGS = {
    "build-folder-world-writable": (lambda root, build: build.chmod(0o707), "is writable by group or others (mode 707)"),
    "build-folder-group-writable": (lambda root, build: build.chmod(0o770), "is writable by group or others (mode 770)"),
    "extensions-root-world-writable": (lambda root, build: root.chmod(0o777), "is writable by group or others (mode 777)"),
    "library-world-writable": (lambda root, build: (build / f"{build.name}.so").chmod(0o757), "(mode 757)"),
    "build-folder-of-another-user": (_other_user, "is owned by user id 65534, not by you"),
}  # fmt: skip


@pytest.mark.parametrize("entry", ["get", "build"])
@pytest.mark.parametrize("opening", list(OPENINGS))
def test_a_library_others_could_have_planted_is_never_loaded(
    planted: tuple[Path, Path, Path], opening: str, entry: str
) -> None:
    from llmctl.quant import native

    root, build, marker = planted
    open_up, message = OPENINGS[opening]
    open_up(root, build)
    with pytest.raises(UsageError, match=r"refusing to load llmctl's C\+\+ kernels: .*" + re.escape(message)):
        getattr(native, entry)()  # build() refuses before it compiles anything
    assert not marker.exists()


def test_quantize_refuses_a_planted_library_in_one_line(
    planted: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    root, build, marker = planted
    build.chmod(0o777)
    model = chat_model(tmp_path / "model")
    env = {**ENV, "TORCH_EXTENSIONS_DIR": str(root)}
    env.pop("LLMCTL_NATIVE", None)
    p = run(["quantize", str(model), "-f", "int8", "-o", str(tmp_path / "out")], tmp_path, env)
    one_error_line(p, f"refusing to load llmctl's C++ kernels: {build} is writable by group or others")
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---- item 10: hub revisions -------------------------------------------------------------------------------
@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A real huggingface-hub cache with acme/tiny at main, and files outside refs/ that name the same
    commit: a revision that reached them would resolve."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = make_hub_cache(cache, "acme/tiny", _folder_files(tmp_path), commit="b" * 40)
    (cache / "x").write_text("b" * 40)  # models--acme--tiny/refs/../../x
    (snap.parent.parent / "x").write_text("b" * 40)  # models--acme--tiny/refs/refs/../../x
    return cache


@pytest.mark.parametrize(
    "revision,problem",
    [
        ("../../x", "contains '..'"),
        ("refs/../../x", "contains '..'"),
        ("main/../../../x", "contains '..'"),
        ("/main", "has an empty part"),
        ("main/", "has an empty part"),
        ("a//b", "contains '//'"),
        ("-main", "starts with '-'"),
        (".main", "starts with '.'"),
        ("a/.x", "starts with '.'"),
        ("main.lock", "ends with '.lock'"),
        ("main.", "ends with '.'"),
        ("main@{1}", "contains '@{'"),
        ("@", "is '@'"),
        ("", "is empty"),
        ("a\\b", "contains '\\\\'"),
        ("a b", "contains ' '"),
        ("a\tb", "contains '\\t'"),
        ("a\x7fb", "contains '\\x7f'"),
        *((f"a{c}b", f"contains '{c}'") for c in "~^?*["),  # a ':' starts the file part (test_hub_ids.py)
    ],
)
def test_revisions_git_refuses_are_refused(hub: Path, revision: str, problem: str) -> None:
    from llmctl.sources import resolve

    with pytest.raises(SourceError, match=f"revision .*{re.escape(problem)}.*, which git does not allow"):
        resolve(f"acme/tiny@{revision}")


@pytest.mark.parametrize("revision", ["main", "b" * 40, "v1.0", "refs/pr/1", "feature/x-y_z", "wörk"])
def test_revisions_git_accepts_still_resolve(hub: Path, revision: str) -> None:
    from llmctl.sources import resolve

    try:
        assert resolve(f"acme/tiny@{revision}").path.name == "b" * 40
    except SourceError as e:  # not in this cache: but never refused as a name
        assert "is not in the Hugging Face cache" in str(e) and revision not in ("main", "b" * 40)


def test_a_dotdot_revision_never_reads_outside_the_repository(hub: Path, tmp_path: Path) -> None:
    """huggingface-hub would read models--acme--tiny/refs/../../x, a file outside the repository that names
    a valid commit, and resolve to its snapshot; llmctl refuses the name first (here from the CLI)."""
    p = run(["estimate-memory", "acme/tiny@../../x"], tmp_path, {**ENV, "HF_HUB_CACHE": str(hub)})
    one_error_line(p, "acme/tiny: revision '../../x' contains '..', which git does not allow")


# ---- item 11: one line and exit 2, never a traceback --------------------------------------------------------
def deep(n: int) -> str:
    return "[" * n + "]" * n


def st_model(t: Path, header: dict | bytes, data: bytes = b"\0" * 256) -> Path:
    d = folder(t)
    blob = header if isinstance(header, bytes) else safetensors_blob(header, data)
    (d / "model.safetensors").write_bytes(blob)
    return d


def norm(**entry) -> dict:
    return {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256], **entry}}


def gguf_2_63(t: Path) -> Path:
    kvs = [_kv("general.architecture", V.STRING, _str("llama"))]
    kvs += [_kv(f"llama.{k}", V.UINT32, struct.pack("<I", v)) for k, v in (
        ("embedding_length", 64), ("feed_forward_length", 128), ("block_count", 1),
        ("attention.head_count", 4), ("vocab_size", 256), ("context_length", 128))]  # fmt: skip
    p = t / "m.gguf"
    p.write_bytes(
        gguf_bytes(kvs=kvs, infos=[_tensor_info("token_embd.weight", (2**63, 0), 0, 0)], data=b"\0" * 32)
    )
    return p


DEEP_HEADER = b'{"a": ' + deep(100_000).encode() + b"}"
QUANTIZE = ["-f", "int8", "-o"]

# (id, command line built in a folder, a phrase of the one error line)
# fmt: off
CASES = [
    ("config-nested-100000-deep", lambda t: ["estimate-memory", str(folder(t, '{"model_type": "llama", "x": ' + deep(100_000) + "}"))],
     "JSON nested too deeply"),
    ("safetensors-header-nested", lambda t: ["quantize", str(st_model(t, struct.pack("<Q", len(DEEP_HEADER)) + DEEP_HEADER)), *QUANTIZE, str(t / "o")],
     "safetensors header nests JSON too deeply"),
    ("safetensors-shape-string", lambda t: ["quantize", str(st_model(t, norm(shape=["64"]))), *QUANTIZE, str(t / "o")],
     "tensor 'model.norm.weight' has a malformed header entry"),
    ("safetensors-shape-float", lambda t: ["quantize", str(st_model(t, norm(shape=[64.5]))), *QUANTIZE, str(t / "o")],
     "tensor 'model.norm.weight' has a malformed header entry"),
    ("safetensors-shape-bool", lambda t: ["estimate-memory", str(st_model(t, norm(shape=[True], data_offsets=[0, 4]), b"\0" * 4))],
     "tensor 'model.norm.weight' has a malformed header entry"),
    ("safetensors-offset-float", lambda t: ["estimate-memory", str(st_model(t, norm(data_offsets=[0, 256.0])))],
     "tensor 'model.norm.weight' has a malformed header entry"),
    ("safetensors-dtype-list", lambda t: ["estimate-memory", str(st_model(t, norm(dtype=["F32"])))],
     "tensor 'model.norm.weight' has a malformed header entry"),
    ("max-position-embeddings-2-62", lambda t: ["estimate-memory", str(folder(t, {**TINY_CONFIG, "max_position_embeddings": 2**62}))],
     "max_position_embeddings is 4611686018427387904, above the sane limit 2147483648"),
    ("max-position-embeddings-0", lambda t: ["estimate-memory", str(folder(t, {**TINY_CONFIG, "max_position_embeddings": 0}))],
     "max_position_embeddings must be a positive integer"),
    ("rms-norm-eps-negative", lambda t: ["chat", str(chat_model(t / "m", rms_norm_eps=-1)), "--backend", "torch", "-p", "hi", "-n", "2"],
     "rms_norm_eps must be a positive number, got -1"),
    ("rms-norm-eps-zero", lambda t: ["estimate-memory", str(folder(t, {**TINY_CONFIG, "rms_norm_eps": 0}))],
     "rms_norm_eps must be a positive number, got 0"),
    ("gguf-dimension-2-63-beside-0", lambda t: ["estimate-memory", str(gguf_2_63(t))],
     "tensor 'token_embd.weight' has dimensions [9223372036854775808, 0]: it claims 9223372036854775808 elements"),
    ("context-beyond-memory", lambda t: ["chat", str(chat_model(t / "m", max_position_embeddings=2**31)), "--backend", "torch",
                                         "--context", "2147483647", "-p", "hi", "-n", "2"],
     "a KV cache of 2147483647 positions needs 1024.0 GiB but cpu has"),
]
# fmt: on


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_file_gives_one_line(case, tmp_path: Path) -> None:
    _, make, message = case
    args = make(tmp_path)
    before = listing(tmp_path)
    one_error_line(run(args, tmp_path), message)
    assert listing(tmp_path) == before, "files were created, changed or left behind"


@pytest.mark.parametrize(
    "sampling", [["--temperature", "0"], ["--seed", "1"], ["--seed", "1", "--top-k", "0"]]
)
def test_nan_weights_stop_chat_in_one_line(sampling: list[str], tmp_path: Path) -> None:
    model = chat_model(tmp_path / "m", nan=True)
    p = run(["chat", str(model), "--backend", "torch", "-p", "hi", "-n", "4", *sampling], tmp_path)
    one_error_line(p, "the model produced NaN logits", notices=True)
    assert p.stdout == ""


@pytest.mark.parametrize("top_k", [0, 3])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_sampler_refuses_nan_logits(top_k: int, temperature: float) -> None:
    """One NaN anywhere, even far below the top logits: argmax lands on it, softmax spreads it."""
    import torch

    from llmctl.runtime.sampler import Sampler, SamplingOptions

    logits = torch.arange(8, dtype=torch.float32)
    logits[1] = float("nan")
    sampler = Sampler(SamplingOptions(temperature=temperature, top_k=top_k, seed=3))
    with pytest.raises(FormatError, match="the model produced NaN logits"):
        sampler(logits, [1, 2])
    assert 0 <= sampler(torch.arange(8, dtype=torch.float32), [1, 2]) < 8


def test_a_kv_cache_that_does_not_fit_is_refused_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmctl.config import ModelConfig
    from llmctl.runtime import device as devices
    from llmctl.runtime import model as runtime_model

    m = runtime_model.Transformer(ModelConfig.from_dict(CHAT_CONFIG))
    assert m.make_cache(256).nbytes == 256 * 512
    monkeypatch.setattr(devices, "free_bytes", lambda device: 100 * 512)
    with pytest.raises(UsageError, match=r"KV cache of 256 positions needs 0.0 GiB .* \(about 100 fits\)"):
        m.make_cache(256)


@pytest.mark.parametrize(
    "tamper,message",
    [
        (lambda ids, meta: ids.fill_(10**6), "token ids outside the vocabulary (vocab_size '320'"),
        (lambda ids, meta: ids.fill_(-1), "token ids outside the vocabulary (vocab_size '320'"),
        (lambda ids, meta: meta.pop("vocab_size"), "token ids outside the vocabulary (vocab_size ''"),
        (
            lambda ids, meta: meta.update(vocab_size="320.0"),
            "token ids outside the vocabulary (vocab_size '320.0'",
        ),
    ],
)
def test_baseline_logits_with_foreign_token_ids(tamper, message: str, tmp_path: Path) -> None:
    """A --save-logits file of this very model and text, valid in every other way (same windows, same
    vocabulary size), with token ids no vocabulary has: refused before the model loads."""
    from safetensors.torch import save_file

    model, options, saved, meta, tensors = _saved_baseline(tmp_path)
    tamper(tensors["topk_ids"], meta)
    save_file(tensors, str(saved), metadata=meta)
    one_error_line(run(["eval", str(model), *options], tmp_path), message)


def _saved_baseline(tmp_path: Path):
    """A --save-logits file of a tiny model on a short text: (model, eval options using it, the file, its
    metadata, its tensors)."""
    from safetensors import safe_open

    from llmctl.runtime.perplexity import evaluate

    model = chat_model(tmp_path / "m")
    text = tmp_path / "text.txt"
    text.write_text("hello world, the quick brown fox. " * 40)
    saved = tmp_path / "base.safetensors"
    evaluate(str(model), str(text), context=64, chunks=2, save_logits_path=str(saved), batch_size=1)
    with safe_open(str(saved), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    options = ["--data", str(text), "--context", "64", "--chunks", "2", "--baseline-logits", str(saved)]
    return model, options, saved, meta, tensors


def test_baseline_logits_with_rows_cut_off(tmp_path: Path) -> None:
    """The same file with its last rows removed (the windows digest still matches): one line, exit 2."""
    from safetensors.torch import save_file

    model, options, saved, meta, tensors = _saved_baseline(tmp_path)
    rows = tensors["topk_ids"].shape[0]
    tensors = {k: (v[: rows - 5].contiguous() if v.shape[:1] == (rows,) else v) for k, v in tensors.items()}
    save_file(tensors, str(saved), metadata=meta)
    p = run(["eval", str(model), *options], tmp_path)
    one_error_line(p, f"holds {rows - 5} rows of log-probabilities for {rows} scored tokens")
