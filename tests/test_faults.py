"""Faults during `llmctl quantize`: interrupted (SIGINT, SIGKILL), a size-limited file system, and two
runs racing for the same output. In every case the previous output survives intact or is replaced by
one complete output, and no partial output is left behind once a run has finished.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARGS = ["smollm2-135m", "--format", "int8", "--group-size", "64", "--force", "--json"]


def quantize(out: Path, *extra: str, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "llmctl", "quantize", *ARGS, "--out", str(out), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw,
    )  # fmt: skip


def digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != name)


@pytest.fixture(scope="module")
def previous(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A complete earlier output, and its file digests."""
    root = tmp_path_factory.mktemp("faults")
    out = root / "reference"
    p = quantize(out)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    return out, digest(out)


def wait_for_partial(parent: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the run has started writing tensor data into its temporary folder."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, proc.communicate()
        for d in parent.glob(".*partial*"):
            f = d / "model.safetensors"
            if f.exists() and f.stat().st_size > 1 << 20:
                return
        time.sleep(0.05)
    raise AssertionError("the run never started writing")


def copy_previous(previous, dest: Path) -> Path:
    import shutil

    shutil.copytree(previous[0], dest)
    return dest


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_keeps_the_previous_output(previous, tmp_path, sig):
    out = copy_previous(previous, tmp_path / "out")
    p = quantize(out)
    wait_for_partial(tmp_path, p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    assert digest(out) == previous[1], "the previous output was changed"
    if sig == signal.SIGINT:
        assert p.returncode == 130 and "Traceback" not in err, err
        assert leftovers(tmp_path, "out") == [], "Ctrl-C left a partial output"
    else:  # nothing can clean up after SIGKILL; the next run removes the dead run's partial folder
        assert p.returncode == -signal.SIGKILL
        assert leftovers(tmp_path, "out")
        q = quantize(out)
        _, err = q.communicate(timeout=600)
        assert q.returncode == 0, err
        assert leftovers(tmp_path, "out") == []
        assert digest(out) == previous[1]  # the same input and options give the same bytes


def _limit_file_size() -> None:  # runs in the child: files may not grow past 4 MiB
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))


def test_size_limited_file_system_gives_a_clean_error(previous, tmp_path):
    out = copy_previous(previous, tmp_path / "out")
    p = quantize(out, preexec_fn=_limit_file_size)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "File too large" in lines[0], err
    assert digest(out) == previous[1]
    assert leftovers(tmp_path, "out") == []


def test_tmpfs_full_disk_gives_a_clean_error(previous, tmp_path):
    """A real full file system where this machine lets us mount one (root); skipped elsewhere."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        p = quantize(mnt / "out")
        _, err = p.communicate(timeout=600)
        assert p.returncode == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], err
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_two_runs_to_the_same_output_do_not_corrupt_it(previous, tmp_path):
    out = tmp_path / "out"
    procs = [quantize(out), quantize(out)]
    results = [(p.wait(timeout=900), p.communicate()[1]) for p in procs]
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code in (0, 2) and "Traceback" not in err, err
    assert digest(out) == previous[1], "the output is not one complete run's output"
    assert leftovers(tmp_path, "out") == []
