"""The default CPU thread count (issue 19, item 1): the physical cores other processes leave idle, by the
1-minute load average, and the choice shown when chat and eval start. On a 2-core machine with one core
busy, one thread decoded 3–9x faster than two on both backends (measured: llama.cpp 88–91 vs 10.6–19.8
tok/s, torch 35 vs ~1); on a quiet machine two win."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmctl.errors import UsageError
from llmctl.runtime import device


@pytest.mark.parametrize(
    "cores,load,want,why",
    [
        (2, 0.2, 2, "2 physical cores"),
        (2, 0.6, 1, "2 cores, 1 busy with other work (load 0.6)"),
        (2, 1.4, 1, "2 cores, 1 busy with other work (load 1.4)"),
        (2, 7.0, 1, "2 cores, 2 busy with other work (load 7.0)"),
        (8, 2.2, 6, "8 cores, 2 busy with other work (load 2.2)"),
        (1, 3.0, 1, "1 physical core"),  # nothing to give up
    ],
)
def test_idle_physical_cores_are_chosen(monkeypatch, cores, load, want, why):
    monkeypatch.setattr(device, "physical_cores", lambda: cores)
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    monkeypatch.setattr(device, "_chosen", None)
    n, reason = device.choose_threads()
    assert n == want and reason.startswith(why)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # the load changes: the choice stays
    assert device.choose_threads() == (n, reason)


def test_an_explicit_count_is_kept_and_checked():
    assert device.choose_threads(3) == (3, "--threads")
    for bad in (0, -1, True, 1.5):
        with pytest.raises(UsageError, match="thread count must be a positive integer"):
            device.choose_threads(bad)


def test_physical_cores_count_this_processes_cpus_once_per_core():
    n = device.physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))
    info = open("/proc/cpuinfo").read()
    if "siblings" in info and "cpu cores" in info:
        siblings = int(next(line for line in info.splitlines() if line.startswith("siblings")).split(":")[1])
        cores = int(next(line for line in info.splitlines() if line.startswith("cpu cores")).split(":")[1])
        assert n == max(1, len(os.sched_getaffinity(0)) // max(1, siblings // cores))


@pytest.mark.parametrize("backend", ["llama.cpp", "torch"])
def test_chat_shows_the_threads_it_chose(backend):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "llmctl", "chat", "--backend", backend, "--max-tokens", "2", "--prompt", "Hi"]
    p = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    line = next(line for line in p.stderr.splitlines() if line.startswith("backend:"))
    assert "threads: " in line and ("physical core" in line or "busy with other work" in line), line
    p = subprocess.run([*args, "--threads", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert "threads: --threads" in next(line for line in p.stderr.splitlines() if line.startswith("backend:"))
