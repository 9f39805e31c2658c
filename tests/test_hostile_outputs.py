"""Outputs a hostile neighbour cannot redirect, and model folders that cannot leak or run code (issue 17,
items 4, 6, 7, 8 and 9): temporary files through planted links (folders and GGUF files), a
tokenizer_config.json auto_map beside a GGUF, tokenizer files linking out of the model folder, a GGUF
vocabulary of 2M tokens copied in bounded memory, and --force killed between its renames."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import smollm2_path

from llmctl import atomic
from llmctl.errors import SourceError
from llmctl.quantize.convert import remove_dead_runs, run_plan
from llmctl.quantize.plan import make_plan

LLMCTL = [sys.executable, "-m", "llmctl"]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*LLMCTL, *args], capture_output=True, text=True, env=env, timeout=600, **kw)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# ---- item 4: temporary files through planted links ---------------------------------------------------------
def test_write_text_never_follows_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    target = tmp_path / "t.json"
    for name in (f".t.json.{os.getpid()}.tmp", ".t.json.tmp", f".t.json.partial-{os.getpid()}"):
        (tmp_path / name).symlink_to(victim)  # every name a predictable temporary file once had
    atomic.write_text(target, "new")
    assert victim.read_text() == "precious" and target.read_text() == "new"
    assert not target.is_symlink()


def test_private_dir_refuses_a_planted_link(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    (tmp_path / f".out.partial-{os.getpid()}").symlink_to(elsewhere)
    with pytest.raises(FileExistsError):
        atomic.private_dir(out, "partial")
    assert not any(elsewhere.iterdir())


def test_quantize_output_never_written_through_a_planted_link(tiny_models, tmp_path):
    """A link at the temporary folder's name is refused (one line, exit 2); nothing lands at its target."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    # the CLI's PID is not known in advance: plant the link for this process and call the library
    (tmp_path / f".out.partial-{os.getpid()}").symlink_to(elsewhere)
    with pytest.raises(Exception, match="cannot write the output"):
        run_plan(make_plan(str(tiny_models["llama"][0]), "int8"), out)
    assert not any(elsewhere.iterdir()) and not out.exists()


def test_gguf_output_never_written_through_a_planted_link(tmp_path):
    """GGUF output (and a llama.cpp mix's f16 intermediate) is written inside a private folder: a link at
    any name the writer once used (``.NAME.partial-PID``, ``.NAME.f16-PID``) redirects nothing."""
    from test_hostile_llamacpp import tiny_gguf

    from llmctl.quantize.gguf_out import write_gguf
    from llmctl.sources import resolve

    src = resolve(str(tiny_gguf(tmp_path / "tiny.gguf")))
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    out = tmp_path / "out.gguf"
    (tmp_path / f".out.gguf.f16-{os.getpid()}").symlink_to(victim)  # the old intermediate's name
    write_gguf(src, out, "q4_k_m")  # by llama.cpp's quantizer, from an f16 intermediate
    assert victim.read_bytes() == b"precious" and out.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f".out.gguf.f16-{os.getpid()}",
        "out.gguf",
        "tiny.gguf",
        "victim",
    ]

    planted = tmp_path / f".again.gguf.partial-{os.getpid()}"
    planted.symlink_to(victim)
    with pytest.raises(Exception, match="cannot write the output"):
        write_gguf(src, tmp_path / "again.gguf", "q8_0")
    assert victim.read_bytes() == b"precious" and not (tmp_path / "again.gguf").exists()


# ---- item 8: GGUF to GGUF bounded by the model, not by gguf-py's view of the vocabulary ----------------------
@pytest.mark.slow
def test_gguf_to_gguf_with_a_two_million_token_vocabulary(tmp_path):
    """A 43 MB GGUF whose vocabulary has 2M tokens: gguf-py's reader took 4.4 GB and 138 s to copy its
    metadata (5.6 GB in the issue's file); llmctl's reader takes ~270 MB and 8 s, and the copy keeps every
    key, value and type (the files compared byte for byte with the old path's when this was written)."""
    from test_hostile_llamacpp import run, tiny_gguf

    from llmctl.gguf.reader import read_gguf

    n = 2_000_000
    src = tiny_gguf(
        tmp_path / "big.gguf",
        tokenizer__ggml__tokens=lambda t: t + [f"tok{i}" for i in range(n - len(t))],
        tokenizer__ggml__token_type=lambda t: t + [1] * (n - len(t)),
    )
    out = tmp_path / "out.gguf"
    p, peak_mb, _ = run(["quantize", str(src), "-f", "q8_0", "--out", str(out)], tmp_path)
    assert p.returncode == 0, p.stderr
    assert peak_mb < 800, f"peak RSS {peak_mb:.0f} MB"
    a, b = read_gguf(src), read_gguf(out)
    assert b.metadata["general.file_type"] == 7 and b.metadata["general.quantized_by"].startswith("llmctl")
    for key, value in a.metadata.items():
        if key not in ("general.file_type",):
            assert b.metadata[key] == value and b.metadata_types[key] == a.metadata_types[key], key


# ---- item 6: no repository code beside a GGUF ----------------------------------------------------------------
def test_gguf_tokenizer_ignores_the_folders_auto_map(tmp_path, monkeypatch):
    """transformers would offer to run ``evil.py`` (auto_map in tokenizer_config.json beside the GGUF) and
    run it on "y": llmctl converts the tokenizer in a folder holding the GGUF alone, never asking."""
    import builtins

    from llmctl.quantize.convert import _gguf_tokenizer

    folder = tmp_path / "model"
    folder.mkdir()
    gguf = folder / "model.gguf"
    gguf.symlink_to(smollm2_path())
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "EvilTokenizer"}
        )
    )
    asked = []
    monkeypatch.setattr(builtins, "input", lambda *a: asked.append(a) or "y")
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path / "cache"))  # no cached conversion: transformers runs
    out = tmp_path / "out"
    out.mkdir()
    plan = SimpleNamespace(notes=[])
    _gguf_tokenizer(gguf, out, plan)
    assert not marker.exists() and not asked
    assert (out / "tokenizer.json").is_file(), plan.notes
    assert "EvilTokenizer" not in (out / "tokenizer_config.json").read_text()


# ---- item 7: tokenizer files linking out of the model folder --------------------------------------------
@pytest.fixture()
def folder_with_link(tiny_models, tmp_path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"][0], folder)
    secret = tmp_path / "environ"
    secret.write_text("HF_TOKEN=hf_secret")
    (folder / "special_tokens_map.json").symlink_to(secret)
    return folder


def test_a_tokenizer_file_linking_outside_is_refused(folder_with_link, tmp_path):
    with pytest.raises(
        SourceError, match=r"special_tokens_map.json: resolves to .* not a regular file inside"
    ):
        make_plan(str(folder_with_link), "int8")
    r = _cli("quantize", str(folder_with_link), "-f", "int8", "-g", "32", "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error:") and "hf_secret" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_proc_links_are_refused(tiny_models, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models["llama"][0], folder)
    (folder / "tokenizer_config.json").symlink_to("/proc/self/environ")
    with pytest.raises(SourceError, match="not a regular file inside"):
        make_plan(str(folder), "int8")


def test_hub_snapshot_links_into_blobs_are_followed(tiny_models, tmp_path):
    """The hub cache's own layout (snapshots/REV/NAME -> ../../blobs/HASH) is what it should be."""
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in Path(tiny_models["llama"][0]).iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copyfile(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "blobs" / "blob-tok").write_text('{"bos_token": "<s>"}')
    (snap / "special_tokens_map.json").symlink_to(Path("../../blobs/blob-tok"))
    out = tmp_path / "out"
    run_plan(make_plan(str(snap), "int8", group_size=32), out)
    assert json.loads((out / "special_tokens_map.json").read_text()) == {"bos_token": "<s>"}
    assert not (out / "special_tokens_map.json").is_symlink()


# ---- item 9: --force killed between its renames --------------------------------------------------------
def test_force_replaces_in_one_step(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old-marker").write_text("old")
    run_plan(make_plan(str(tiny_models["llama"][0]), "int8", group_size=32), out, force=True)
    assert (out / "config.json").is_file() and not (out / "old-marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old / .partial left


def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic.exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this kernel / file system")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_an_orphaned_old_output_is_restored(tmp_path):
    """A run killed between the two renames (where there is no exchange) left ``.out.old-PID`` and no
    ``out``: the next run puts it back instead of deleting it."""
    out = tmp_path / "out"
    old = tmp_path / f".out.old-{_dead_pid()}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    remove_dead_runs(out)
    assert (out / "config.json").read_text() == "{}" and not old.exists()
    # with the output in place, a dead run's .old is only rubbish
    again = tmp_path / f".out.old-{_dead_pid()}"
    again.mkdir()
    remove_dead_runs(out)
    assert not again.exists() and (out / "config.json").is_file()
