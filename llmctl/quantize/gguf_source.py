"""A resolved MODEL as the ``GGUFSource`` the GGUF writer reads (llmctl.gguf.writer): a GGUF file through
``llmctl.gguf.writer.file_source``, a Hugging Face safetensors folder through ``folder_source`` — here, not in
llmctl.gguf, because its tensors are read through llmctl.quantize.inputs (torch).

A folder of a family the runtime runs (llama, mistral, qwen2, qwen3, gemma3) is made as llama.cpp's converter
(convert_hf_to_gguf.py) makes it: hyper-parameters (``llmctl.gguf.metadata``), tokenizer
(``llmctl.gguf.vocab``), tensor names and layout (``llmctl.gguf.names``: Q/K permuted for GGUF ``llama``,
Gemma norms + 1; a tied ``lm_head`` is not written). Refused (``UsageError``, nothing written): families the
runtime does not run, a folder without tokenizer.json, an already-quantized folder, settings llama.cpp's
loader cannot represent (``llmctl.gguf.metadata.check_representable``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmctl.config import ModelConfig
from llmctl.errors import UsageError
from llmctl.gguf import metadata, names, vocab
from llmctl.gguf.writer import GGUFSource, file_source


def open_source(source: Any) -> GGUFSource:
    """A resolved MODEL (GGUF file or Hugging Face folder) as a GGUFSource."""
    if source.is_gguf:
        return file_source(source.gguf)
    if source.kind == "config":
        raise UsageError(f"{source.path}: a bare config.json has no weights to write")
    return folder_source(source)


def folder_config(source: Any) -> ModelConfig:
    """The resolved folder's ModelConfig (its config.json as ``source`` read it), refusing what cannot
    become a GGUF (see module doc)."""
    from llmctl.config import RUNTIME_FAMILIES

    folder = Path(source.path)
    raw = source.raw_config
    if isinstance(raw, dict) and raw.get("quantization_config"):
        raise UsageError(
            f"{folder}: the model is already quantized (config.json has quantization_config); "
            "write GGUF from the bf16/fp16/fp32 original"
        )
    cfg = source.config
    if cfg.model_type not in RUNTIME_FAMILIES:
        raise UsageError(
            f"{folder}: GGUF output supports {', '.join(RUNTIME_FAMILIES)} folders, not {cfg.model_type}; "
            "convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    if not (folder / "tokenizer.json").is_file():
        raise UsageError(
            f"{folder}: no tokenizer.json; a GGUF carries its tokenizer, so add the model's tokenizer.json "
            "(and tokenizer_config.json) to the folder"
        )
    metadata.check_representable(folder, cfg)
    return cfg


def tensor_names(cfg: ModelConfig, hf_names: list[str], folder: Path) -> list[tuple[str, str]]:
    """(HF name, GGUF name) for every tensor written (``llmctl.gguf.names``); refuses unknown names."""
    arch = metadata.GGUF_ARCH[cfg.model_type]
    pairs, unknown = names.gguf_names(hf_names, arch, cfg)
    if unknown:
        raise UsageError(
            f"{folder}: tensor(s) {', '.join(unknown[:3])} have no llama.cpp name for architecture {arch}; "
            "the folder is not a plain text model of its family"
        )
    return pairs


def folder_source(source: Any) -> GGUFSource:
    """The folder of ``source`` (resolved) as a ``GGUFSource``: architecture, metadata writer, tensors
    (names, shapes) and a reader yielding each as fp32 numpy in GGUF layout (read by llmctl.quantize.inputs,
    which refuses a checkpoint that is not floating point)."""
    from llmctl.quantize.inputs import open_input

    folder = Path(source.path)
    cfg = folder_config(source)
    inp = open_input(source)
    entries = {n: (shape, nbytes, dtype) for n, shape, dtype, nbytes in inp.infos}
    arch = metadata.GGUF_ARCH[cfg.model_type]
    pairs = tensor_names(cfg, list(entries), folder)
    tok = vocab.read_tokenizer(folder)  # refused here, so that --dry-run refuses it too
    embed = entries.get("model.embed_tokens.weight")
    n_vocab = embed[0][0] if embed is not None else cfg.vocab_size
    tensors = [(g, tuple(entries[hf][0]), entries[hf][1], entries[hf][2].lower()) for hf, g in pairs]
    rope = (cfg.rope_scaling or {}).get("rope_type")
    if rope == "llama3":
        tensors.append(("rope_freqs.weight", (cfg.head_dim // 2,), 0, "f32"))
    notes: list[str] = []

    def add_metadata(writer: Any) -> None:
        writer.add_name(folder.resolve().name)
        notes.extend(metadata.add_arch_metadata(writer, cfg, n_vocab))
        vocab.add_tokenizer(writer, folder, tok, n_vocab)

    def read() -> Iterator[Any]:
        import numpy as np

        for hf, g in pairs:
            w = inp.tensor(hf).float().numpy()
            yield names.to_gguf_layout(w, hf, g, arch, cfg).astype(np.float32, copy=False)
        if rope == "llama3":
            yield metadata.llama3_rope_factors(cfg)

    return GGUFSource(arch, add_metadata, tensors, read, cfg, notes)
