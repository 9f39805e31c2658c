"""What ``llmctl models`` and ``llmctl show`` print: the models table and one model's facts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from llmctl.commands.render import human_bytes, out


# ---- llmctl models ---------------------------------------------------------------------------------
def models_table(entries: Sequence[Any]) -> None:
    table = Table(title="Models available to llmctl", title_justify="left")
    for col in ("name", "kind", "status", "size", "path"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(
            e.name, e.kind, e.status, human_bytes(e.size_bytes) if e.size_bytes else "-", e.path or "-"
        )
    out().print(table)
    if not entries:
        out().print("no models found")


def model_info(info: dict[str, Any]) -> None:
    m, a, w, q, t = info["model"], info["architecture"], info["weights"], info["quantization"], info["tokenizer"]
    rows: list[tuple[str, str]] = [
        ("model", f"{m['name']} ({m['kind']}{', ' + m['title'] if m['title'] else ''})"),
        ("path", m["path"]),
        ("size on disk", human_bytes(m["size_bytes"])),
        ("family", a["family"]),
        ("parameters", _count(a["parameters"])),
        ("layers", str(a["layers"])),
        ("hidden size", f"{a['hidden_size']} (MLP {a['intermediate_size']})"),
        ("attention heads", f"{a['attention_heads']} ({a['kv_heads']} KV heads, head dim {a['head_dim']})"),
        ("context length", f"{a['context_length']:,}"),
        ("vocabulary", f"{a['vocab_size']:,}"),
        ("rope theta", f"{a['rope_theta']:g}" + (f", scaling {a['rope_scaling'].get('rope_type', a['rope_scaling'].get('type', '?'))}" if a["rope_scaling"] else "")),
        ("sliding window", f"{a['sliding_window']:,} tokens" if a["sliding_window"] else "none"),
        ("tied embeddings", "yes" if a["tied_embeddings"] else "no"),
        ("weights stored as", w["stored"]),
    ]  # fmt: skip
    if q:
        rows.append(("quantization", ", ".join(f"{k} {v}" for k, v in q.items() if v is not None)))
    template = f"yes ({t['chat_template_chars']:,} characters; --template prints it)" if t["chat_template"] else "none"
    rows += [("chat template", template), ("chat mode", t["mode"]), ("license", info["license"] or "not stated")]
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(k, v)
    out().print(table)
    if w["by_type"]:
        types = Table(title="tensors by stored type", title_justify="left")
        for col in ("type", "tensors", "size"):
            types.add_column(col, justify="left" if col == "type" else "right")
        for name, d in w["by_type"].items():
            types.add_row(name, str(d["tensors"]), human_bytes(d["bytes"]))
        out().print(types)


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f} {unit} ({n:,})"
    return f"{n:,}"
