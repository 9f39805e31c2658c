"""The models `llmctl quantize` wrote, remembered so `llmctl models` can list them (as ``ollama list`` does).

One small JSON file in llmctl's cache (``outputs.json``): a list of {path, format, source, written}. It is
rewritten whole through ``atomic.write_text`` under an advisory lock, so two quantize runs finishing at
once both land. Reading it trusts nothing: a missing, corrupt or foreign file reads as empty, entries of
the wrong shape are skipped, and outputs that no longer exist are not listed (and are dropped at the next
write). Remembering is best-effort: a cache that cannot be written never fails the quantize that made
the output.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from llmctl.atomic import write_text
from llmctl.sources import llmctl_cache_dir

MAX_ENTRIES = 1000  # oldest dropped beyond this: the file stays small however long llmctl is used
_MAX_BYTES = 4 << 20


@dataclass(frozen=True)
class Output:
    path: str
    format: str
    source: str
    written: str  # ISO 8601, UTC


def record_file() -> Path:
    return llmctl_cache_dir() / "outputs.json"


def recorded() -> list[Output]:
    """The remembered outputs that still exist, newest first."""
    return [o for o in _read(record_file()) if Path(o.path).exists()]


def remember(path: str | Path, fmt: str, source: str) -> bool:
    """Add (or refresh) one output; False when the cache cannot be written (the caller carries on)."""
    entry = Output(str(Path(path).resolve()), fmt, source, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    file = record_file()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with _locked(file):
            kept = [o for o in _read(file) if o.path != entry.path and Path(o.path).exists()]
            write_text(file, json.dumps([asdict(o) for o in [entry, *kept][:MAX_ENTRIES]], indent=1) + "\n")
    except OSError:
        return False
    return True


def _read(file: Path) -> list[Output]:
    try:
        if file.stat().st_size > _MAX_BYTES:
            return []
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return []
    if not isinstance(data, list):
        return []
    fields = Output.__dataclass_fields__
    return [
        Output(**{k: d[k] for k in fields})
        for d in data
        if isinstance(d, dict) and all(isinstance(d.get(k), str) for k in fields)
    ]


@contextlib.contextmanager
def _locked(file: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: last writer wins
        yield
        return
    with open(file.with_name(file.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
