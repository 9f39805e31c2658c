"""scripts/install.sh chooses torch's build on purpose (scripts/torch-build.sh): CPU without an NVIDIA GPU,
CUDA with one. The GPU is stood in for by an `nvidia-smi` on PATH (this machine has none); the installed
torch is checked against the real choice here."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "torch-build.sh"


def choose(tmp_path: Path, nvidia_smi: str | None = None, **env: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi is not None:
        tool = bin_dir / "nvidia-smi"
        tool.write_text("#!/bin/sh\n" + nvidia_smi + "\n")
        tool.chmod(0o755)
    path = f"{bin_dir}:/usr/bin:/bin"  # no other nvidia-smi than the one planted here
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30,
                          env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp"), **env})  # fmt: skip


@pytest.mark.parametrize(
    "nvidia_smi, expected",
    [
        (None, "cpu"),  # no driver tools at all
        ("echo 'GPU 0: NVIDIA H200 (UUID: GPU-0)'", "cuda"),
        ("echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9", "cpu"),
        ("echo 'No devices were found'; exit 6", "cpu"),
    ],
)
def test_the_build_follows_the_gpu(tmp_path, nvidia_smi, expected) -> None:
    p = choose(tmp_path, nvidia_smi)
    assert p.returncode == 0 and p.stdout.strip() == expected, (p.stdout, p.stderr)


def test_the_choice_can_be_forced_and_a_bad_one_is_refused(tmp_path) -> None:
    assert choose(tmp_path, "echo 'GPU 0: X'", LLMCTL_TORCH="cpu").stdout.strip() == "cpu"
    assert choose(tmp_path, None, LLMCTL_TORCH="cuda").stdout.strip() == "cuda"
    p = choose(tmp_path, None, LLMCTL_TORCH="rocm")
    assert p.returncode == 2 and p.stderr.strip().startswith("error: LLMCTL_TORCH must be cpu, cuda or auto")


def test_the_installed_torch_is_the_build_chosen_here() -> None:
    import torch

    choice = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=30).stdout.strip()
    if os.environ.get("LLMCTL_TORCH") in (None, "", "auto"):
        assert (choice == "cpu") == (torch.version.cuda is None), (choice, torch.__version__)
    if choice == "cpu":
        assert torch.__version__.endswith("+cpu"), torch.__version__
