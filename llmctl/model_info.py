"""What a model is, read from its config, tensor table and metadata: the facts `llmctl show` prints.

A pure reading of headers and small files (no weights loaded, no tokenizer built), shared by the text and
JSON outputs so the two always agree.
"""

from __future__ import annotations

import json
from typing import Any

from llmctl.memory.report import gguf_file_type_name
from llmctl.sources import ModelSource, size_on_disk

_CT_FIELDS = ("num_bits", "type", "symmetric", "strategy", "group_size")


def model_info(source: ModelSource) -> dict[str, Any]:
    """{model, architecture, weights, quantization, tokenizer, license}: see docs/cli.md (`llmctl show`)."""
    from llmctl.memory.report import stored_format
    from llmctl.runtime.tokenizer import chat_template_of
    from llmctl.tensors import count_parameters

    c = source.config
    tensors = source.tensors() or []
    meta = source.gguf.metadata if source.is_gguf else {}
    file_type = meta.get("general.file_type")
    by_dtype: dict[str, dict[str, int]] = {}
    for t in tensors:
        d = by_dtype.setdefault(t.dtype.lower(), {"tensors": 0, "bytes": 0})
        d["tensors"] += 1
        d["bytes"] += t.nbytes
    template = chat_template_of(source.path)
    sliding = c.sliding_window if c.sliding_window else None
    return {
        "model": {
            "name": source.display,
            "kind": source.kind,
            "path": str(source.path),
            "size_bytes": size_on_disk(source.path),
            "title": _text(meta.get("general.name")),
        },
        "architecture": {
            "family": c.model_type,
            "parameters": count_parameters(c),
            "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "attention_heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "context_length": c.max_position_embeddings,
            "vocab_size": c.vocab_size,
            "rope_theta": c.rope_theta,
            "rope_scaling": c.rope_scaling,
            "sliding_window": sliding,
            "tied_embeddings": c.tie_word_embeddings,
        },
        "weights": {
            "stored": stored_format(tensors or None, c, file_type if isinstance(file_type, int) else None),
            "by_type": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]["bytes"])),
        },
        "quantization": _quantization(source),
        "tokenizer": {
            "chat_template": template is not None,
            "chat_template_chars": len(template) if template else 0,
            "mode": "chat" if template else "completion (no chat template)",
        },
        "license": _text(meta.get("general.license")),
    }


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) and v.strip() else None


def _quantization(source: ModelSource) -> dict[str, Any] | None:
    """How a folder's weights were quantized (its config.json), or a GGUF's declared file type."""
    if source.is_gguf:
        meta = source.gguf.metadata
        if not isinstance(meta.get("general.file_type"), int):
            return None
        ft = meta["general.file_type"]
        return {"method": "gguf", "file_type": gguf_file_type_name(ft) or f"unknown ({ft})",
                "quantized_by": _text(meta.get("general.quantized_by"))}  # fmt: skip
    cfg_path = source.path / "config.json" if source.path.is_dir() else source.path
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # the config was read once already (source.config); nothing more to say
    q = raw.get("quantization") if isinstance(raw, dict) else None
    if isinstance(q, dict) and q.get("layout") == "llmctl":
        return {"method": "llmctl", **{k: v for k, v in q.items() if isinstance(v, (str, int, float, bool))}}
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if not isinstance(qc, dict):
        return None
    out: dict[str, Any] = {"method": qc.get("quant_method")}
    if isinstance(qc.get("format"), str):
        out["format"] = qc["format"]
    groups = qc.get("config_groups")
    if isinstance(groups, dict):
        for g in groups.values():
            w = g.get("weights") if isinstance(g, dict) else None
            if isinstance(w, dict):
                out.update({k: w[k] for k in _CT_FIELDS if k in w})
                break
    for k in ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant"):
        if k in qc:
            out[k] = qc[k]
    return out
