"""A built-in table of common accelerators and their memory, and lookup by a forgiving name.

VRAM is what the vendor sells, in bytes: "24 GB" GeForce cards have 24 GiB of GDDR; data-center
parts are listed with their marketed capacity converted the same way (an "80 GB" H100 has 80 GiB; an
H200's "141 GB" is 141 GiB here, MI300X's 192 GB likewise). The driver reserves a little of it; that is
part of the estimate's overhead, not of this table. Apple M-series entries are the unified memory of a
common configuration; macOS lets the GPU use about 75% of it by default (``recommendedMaxWorkingSetSize``),
which ``usable_fraction`` records.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmctl.errors import UsageError

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    vram_bytes: int
    vendor: str = ""
    aliases: tuple[str, ...] = ()
    usable_fraction: float = 1.0  # of vram_bytes a process may use (Apple unified memory: ~0.75)

    @property
    def usable_bytes(self) -> int:
        return int(self.vram_bytes * self.usable_fraction)


def _g(name: str, gib: float, vendor: str, *aliases: str, usable: float = 1.0) -> GPU:
    return GPU(name, int(gib * GIB), vendor, aliases, usable)


GPUS: tuple[GPU, ...] = (
    _g("RTX 3060", 12, "NVIDIA", "3060"),
    _g("RTX 3080 10GB", 10, "NVIDIA", "3080", "rtx 3080"),
    _g("RTX 3080 12GB", 12, "NVIDIA", "3080 12gb"),
    _g("RTX 3090", 24, "NVIDIA", "3090", "rtx 3090 ti", "3090 ti"),
    _g("RTX 4060", 8, "NVIDIA", "4060"),
    _g("RTX 4060 Ti 16GB", 16, "NVIDIA", "4060 ti", "rtx 4060 ti", "4060ti"),
    _g("RTX 4070", 12, "NVIDIA", "4070"),
    _g("RTX 4080", 16, "NVIDIA", "4080"),
    _g("RTX 4090", 24, "NVIDIA", "4090"),
    _g("RTX 5090", 32, "NVIDIA", "5090"),
    _g("T4", 16, "NVIDIA", "tesla t4"),
    _g("A10", 24, "NVIDIA", "a10g"),
    _g("L4", 24, "NVIDIA"),
    _g("A100 40GB", 40, "NVIDIA", "a100-40", "a100 40"),
    _g("A100 80GB", 80, "NVIDIA", "a100", "a100-80", "a100 80"),
    _g("L40S", 48, "NVIDIA", "l40"),
    _g("H100 80GB", 80, "NVIDIA", "h100", "h100 sxm", "h100 pcie"),
    _g("H200", 141, "NVIDIA", "h200 141gb"),
    _g("B200", 192, "NVIDIA"),
    _g("MI300X", 192, "AMD", "instinct mi300x"),
    _g("Apple M2 Max 96GB", 96, "Apple", "m2 max", usable=0.75),
    _g("Apple M3 Max 128GB", 128, "Apple", "m3 max", usable=0.75),
    _g("Apple M4 Max 128GB", 128, "Apple", "m4 max", usable=0.75),
    _g("Apple M2 Ultra 192GB", 192, "Apple", "m2 ultra", usable=0.75),
    _g("Apple M3 Ultra 512GB", 512, "Apple", "m3 ultra", usable=0.75),
    _g("Apple M4 Pro 48GB", 48, "Apple", "m4 pro", usable=0.75),
)


def _key(s: str) -> str:
    """Case-, space- and punctuation-insensitive key, without vendor prefixes: 'RTX 4090' → '4090'."""
    k = re.sub(r"[^a-z0-9]", "", s.lower())
    for prefix in ("nvidia", "geforce", "amd", "apple", "rtx", "tesla"):
        k = k.removeprefix(prefix)
    return k


def _index() -> dict[str, GPU]:
    idx: dict[str, GPU] = {}
    for gpu in GPUS:
        for name in (gpu.name, *gpu.aliases):
            idx.setdefault(_key(name), gpu)
    return idx


def find_gpu(name: str) -> GPU:
    """The GPU called ``name`` ("RTX 4090", "rtx4090", "4090", "h100", "A100 40GB", ...).

    Raises UsageError listing the known names when none matches.
    """
    key = _key(name)
    gpu = _index().get(key) if key else None
    if gpu is None:
        known = ", ".join(g.name for g in GPUS)
        raise UsageError(f"unknown GPU {name!r}; known GPUs: {known} (or give the memory with --vram GiB)")
    return gpu
