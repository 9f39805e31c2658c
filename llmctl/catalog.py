"""Every model llmctl knows of, for ``llmctl models``: the bundled ones (installed or not), the model
repositories in the Hugging Face cache, and the outputs ``llmctl quantize`` wrote that still exist."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmctl.outputs import recorded
from llmctl.sources import BUNDLED, bundled_path, hub_cache_dir, package_dir, size_on_disk


@dataclass(frozen=True)
class ModelEntry:
    name: str
    kind: str
    status: str
    path: str
    size_bytes: int
    description: str


def list_models() -> list[ModelEntry]:
    """Bundled models (installed or not), the model repositories in the Hugging Face cache, and the outputs
    `llmctl quantize` wrote (``llmctl.outputs``) that still exist."""
    out: list[ModelEntry] = []
    for m in BUNDLED.values():
        pkg = package_dir(m.module)
        path = bundled_path(m, assemble=False)
        if path is not None:
            status = "ready"
        elif pkg is not None and m.assembled:
            status = "installed (assembled on first use)"
        else:
            status = f"not installed: {m.install_hint}"
        size = path.stat().st_size if path else 0
        out.append(ModelEntry(m.name, "bundled", status, str(path or ""), size, m.description))
    cache = hub_cache_dir()
    if cache.is_dir():
        for repo_dir in sorted(cache.glob("models--*")):
            snaps = sorted((repo_dir / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
            if not snaps:
                continue
            repo = repo_dir.name[len("models--") :].replace("--", "/")
            snap = snaps[-1]
            size = size_on_disk(snap)
            has_weights = bool(list(snap.glob("*.safetensors")) or list(snap.glob("*.gguf")))
            status = "cached" if has_weights else "config only"
            out.append(ModelEntry(repo, "hub cache", status, str(snap), size, ""))
    for o in recorded():
        p = Path(o.path)
        out.append(
            ModelEntry(
                p.name,
                "quantized",
                f"{o.format} of {o.source}",
                o.path,
                size_on_disk(p),
                f"written {o.written}",
            )
        )
    return out
