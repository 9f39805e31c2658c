"""MODEL resolution: local folders, bare configs, GGUF files, bundled names and a real hub cache layout."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from llmctl.catalog import list_models
from llmctl.checkpoint import read_folder_tensors, read_safetensors_header
from llmctl.errors import FormatError, SourceError
from llmctl.sources import BUNDLED, resolve

TINY = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def write_folder(folder: Path, config: dict = TINY, *, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((64, 32), dtype=np.float32).astype(np.float16),
        "model.norm.weight": np.ones(32, dtype=np.float16),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((32, 32), dtype=np.float32).astype(
            np.float16
        ),
    }
    if shards == 1:
        save_file(tensors, folder / "model.safetensors")
        return folder
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = {n: tensors[n] for n in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, folder / fname)
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


# ---- local sources ---------------------------------------------------------------------------------
def test_folder_single_and_sharded(tmp_path: Path) -> None:
    for shards in (1, 2):
        src = resolve(str(write_folder(tmp_path / f"m{shards}", shards=shards)))
        assert src.kind == "folder"
        assert src.config.hidden_size == 32
        tensors = {t.name: t for t in src.tensors()}
        assert tensors["model.embed_tokens.weight"].shape == (64, 32)
        assert tensors["model.embed_tokens.weight"].nbytes == 64 * 32 * 2
        assert len(tensors) == 3


def test_bare_config_only_where_allowed(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY))
    assert resolve(str(cfg), need_weights=False, allow_config=True).kind == "config"
    with pytest.raises(SourceError, match="a bare config.json has no weights"):
        resolve(str(cfg))


def test_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="folder has no config.json"):
        resolve(str(tmp_path))


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(SourceError, match="no \\*.safetensors weights"):
        resolve(str(tmp_path))
    assert resolve(str(tmp_path), need_weights=False).tensors() is None


def test_pickle_checkpoints_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(SourceError, match="pickle checkpoints are refused"):
        resolve(str(tmp_path))
    with pytest.raises(SourceError, match="pickle checkpoints are refused"):
        resolve(str(tmp_path / "pytorch_model.bin"))


def test_unknown_model_name() -> None:
    with pytest.raises(SourceError, match="not an existing file or folder, a bundled model"):
        resolve("no-such-model")


# ---- safetensors headers ---------------------------------------------------------------------------
def _raw_safetensors(path: Path, header: dict, data: bytes = b"", claimed: int | None = None) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data)
    return path


@pytest.mark.parametrize(
    ("header", "data", "claimed", "message"),
    [
        ({}, b"", 10**9, "header claims 1000000000 bytes but the file has"),
        (
            {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}},
            b"\0" * 8,
            None,
            "the file is truncated",
        ),
        (
            {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}},
            b"\0" * 16,
            None,
            "offsets span 12 bytes",
        ),
        ({"a": {"dtype": "Q9", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4, None, "unknown dtype 'Q9'"),
        (
            {
                "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]},
            },
            b"\0" * 24,
            None,
            "overlap in the data section",
        ),
        ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, b"\0" * 16, None, "negative shape"),
        ({"a": {"dtype": "F32"}}, b"", None, "malformed header entry"),
    ],
)
def test_bad_safetensors_headers(
    tmp_path: Path, header: dict, data: bytes, claimed: int | None, message: str
) -> None:
    path = _raw_safetensors(tmp_path / "model.safetensors", header, data, claimed)
    with pytest.raises(FormatError, match=message):
        read_safetensors_header(path)


def test_header_reader_agrees_with_safetensors(tmp_path: Path) -> None:
    write_folder(tmp_path)
    from safetensors import safe_open

    ours = {t.name: t for t in read_folder_tensors(tmp_path)}
    with safe_open(tmp_path / "model.safetensors", "np") as f:
        for name in f.keys():
            assert ours[name].shape == tuple(f.get_slice(name).get_shape())


def test_truncated_shard_detected(tmp_path: Path) -> None:
    write_folder(tmp_path)
    p = tmp_path / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(FormatError, match="truncated"):
        resolve(str(tmp_path)).tensors()


# ---- huggingface-hub cache, laid out on disk exactly as huggingface-hub writes it --------------------
def make_hub_cache(
    cache: Path, repo: str, files: dict[str, bytes], *, commit: str = "a" * 40, ref: str = "main"
) -> Path:
    """models--org--name/{blobs/<sha256>, refs/<ref>, snapshots/<commit>/<file> -> ../../blobs/<sha256>}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        digest = hashlib.sha256(content).hexdigest()
        (root / "blobs" / digest).write_bytes(content)
        (snap / name).symlink_to(os.path.relpath(root / "blobs" / digest, snap))
    return snap


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _folder_files(tmp_path: Path) -> dict[str, bytes]:
    folder = write_folder(tmp_path / "src")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_hub_cached_snapshot_offline(hub_cache: Path, tmp_path: Path) -> None:
    snap = make_hub_cache(hub_cache, "acme/tiny-llama", _folder_files(tmp_path))
    src = resolve("acme/tiny-llama")
    assert src.kind == "hub" and src.path == snap
    assert src.config.num_hidden_layers == 2
    assert {t.name for t in src.tensors()} >= {"model.embed_tokens.weight"}
    # estimate-memory needs only config.json and headers
    assert resolve("acme/tiny-llama", need_weights=False).config.vocab_size == 64


def test_hub_revision(hub_cache: Path, tmp_path: Path) -> None:
    make_hub_cache(hub_cache, "acme/tiny-llama", _folder_files(tmp_path), commit="b" * 40, ref="v1.0")
    assert resolve("acme/tiny-llama@v1.0").path.name == "b" * 40
    with pytest.raises(SourceError, match="acme/tiny-llama@v2.0 is not in the Hugging Face cache"):
        resolve("acme/tiny-llama@v2.0")


def test_hub_config_only_cache_for_estimate(hub_cache: Path) -> None:
    make_hub_cache(hub_cache, "acme/cfg-only", {"config.json": json.dumps(TINY).encode()})
    src = resolve("acme/cfg-only", need_weights=False)
    assert src.config.hidden_size == 32 and src.tensors() is None
    assert any("derived from config.json" in n for n in src.notes)
    with pytest.raises(SourceError, match="no \\*.safetensors weights"):
        resolve("acme/cfg-only")


def test_hub_missing_offline(hub_cache: Path) -> None:
    with pytest.raises(
        SourceError, match="acme/absent is not in the Hugging Face cache .* HF_HUB_OFFLINE is set"
    ):
        resolve("acme/absent", need_weights=False)


def test_models_listing_shows_bundled_and_cache(hub_cache: Path, tmp_path: Path) -> None:
    make_hub_cache(hub_cache, "acme/tiny-llama", _folder_files(tmp_path))
    entries = {e.name: e for e in list_models()}
    assert set(BUNDLED) <= set(entries)
    assert entries["acme/tiny-llama"].status == "cached"


# ---- bundled -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bundled_models_resolve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path))
    src = resolve(None)
    assert src.kind == "bundled" and src.spec == "smollm2-135m" and src.is_gguf
    gem = resolve("gemma3-270m")  # assembled into the llmctl cache on first use, atomically
    assert gem.path == tmp_path / "models" / "gemma-3-270m-q4_k_m.gguf"
    assert not list((tmp_path / "models").glob(".*tmp"))
    assert gem.config.model_type == "gemma3_text"
