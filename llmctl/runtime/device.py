"""Device, compute dtype and thread count for the torch runtime."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from llmctl.errors import UsageError

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
}


def pick_device(name: str | torch.device | None = None) -> torch.device:
    """``None``/"auto": CUDA if available, else MPS, else CPU. An explicit device must be available."""
    import torch

    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name!r} requested but this torch has no usable CUDA; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"device {name!r} requested but MPS is not available; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype from fp32/bf16/fp16, their long names, or a torch floating dtype."""
    import torch

    if isinstance(name, torch.dtype):
        if name not in (torch.float32, torch.bfloat16, torch.float16):
            raise UsageError(f"compute dtype {name} is not supported; use fp32, bf16 or fp16")
        return name
    key = str(name).lower().removeprefix("torch.")
    if key not in DTYPE_NAMES:
        raise UsageError(f"unknown compute dtype {name!r}; use fp32, bf16 or fp16")
    return getattr(torch, DTYPE_NAMES[key])


def native_bf16(device: torch.device) -> bool:
    """Whether the CUDA device computes bf16 in hardware: compute capability 8.0 (Ampere) or later.
    ``torch.cuda.is_bf16_supported()`` also says yes where bf16 is only emulated (slowly), and asks about
    the current device rather than ``cuda:N``."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= (8, 0)


def compute_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The dtype to compute in: ``dtype`` if given ("auto" = default), else fp32 on CPU, bf16 on CUDA
    devices with native bf16 (compute capability >= 8.0; fp16 below), fp16 on MPS."""
    import torch

    if dtype is not None and dtype != "auto":
        chosen = parse_dtype(dtype)
        if chosen == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UsageError(f"{device} does not support bf16; use fp16 or fp32")
        return chosen
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def physical_cores() -> int:
    """Physical cores this process may run on: its CPU affinity, less hyper-threading siblings (two logical
    CPUs of one core share its vector units, so a second thread there gains little for matrix work)."""
    import os

    try:
        logical = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        logical = os.cpu_count() or 1
    try:
        info = open("/proc/cpuinfo", encoding="utf-8", errors="replace").read()
    except OSError:
        return max(1, logical)
    siblings = [int(line.split(":")[1]) for line in info.splitlines() if line.startswith("siblings")]
    cores = [int(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu cores")]
    per_core = max(1, siblings[0] // cores[0]) if siblings and cores and cores[0] > 0 else 1
    return max(1, logical // per_core)


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """The CPU thread count to run with, and why (shown to the user). ``requested`` as given; otherwise the
    physical cores this process may use, less those other processes keep busy (the 1-minute load average,
    rounded): a thread on a core another process holds stalls every parallel step until the scheduler
    gives it back. Measured on a 2-core machine with one core busy: the torch runtime decoded at 35 tok/s on
    1 thread and ~1 tok/s on 2, llama.cpp at 88–91 tok/s on 1 and 10.6–19.8 on 2; quiet, 2 threads win."""
    global _chosen
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested <= 0:
            raise UsageError(f"thread count must be a positive integer, got {requested!r}")
        return requested, "--threads"
    if _chosen is None:  # once per process: a baseline and its model run with the same count
        _chosen = _idle_cores()
    return _chosen


_chosen: tuple[int, str] | None = None


def _idle_cores() -> tuple[int, str]:
    import os

    cores = physical_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    busy = round(load)
    n = max(1, min(cores, cores - busy))
    if busy and n < cores:
        return n, f"{cores} cores, {min(busy, cores)} busy with other work (load {load:.1f}); --threads to override"
    return n, f"{cores} physical core{'s' if cores > 1 else ''}"


def set_threads(n: int | None) -> int:
    """Use ``n`` CPU threads for torch ops (None: leave torch's choice); returns the count in effect."""
    import torch

    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise UsageError(f"thread count must be a positive integer, got {n!r}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def describe(device: torch.device, dtype: Any) -> str:
    """A short label such as ``cpu fp32 (2 threads)``."""
    import torch

    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    threads = f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else ""
    return f"{device} {short}{threads}"


def free_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take: free CUDA memory, else the system's available memory
    (MPS shares it; the total where the available is unknown); None when nothing is known."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
