"""Hugging Face safetensors folders, GGUF files (or any HF-named state dict) → ``Transformer``.

The model is built on the meta device (no memory, no random init); each tensor is then read from the
memory-mapped safetensors files (or dequantized from the GGUF file), converted to the compute dtype and
placed on the device one at a time, so peak memory is the converted model plus one tensor. Pickle
checkpoints (``.bin``) are never opened.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.checkpoint import read_safetensors_header, safetensors_files
from llmctl.config import ModelConfig
from llmctl.errors import FormatError, SourceError, UsageError

if TYPE_CHECKING:
    import torch

    from llmctl.runtime.model import Transformer

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
# Tensors some checkpoints carry that the model computes itself.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def empty_model(config: ModelConfig) -> Transformer:
    """The model's structure with parameters on the meta device, waiting for ``assign``."""
    import torch

    from llmctl.runtime.model import Transformer

    with torch.device("meta"):
        return Transformer(config)


def _expected(model: Transformer) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def check_names(model: Transformer, found: Mapping[str, tuple[int, ...]], where: str) -> list[str]:
    """Names of ``found`` to load; FormatError naming missing, unexpected or mis-shaped tensors."""
    expected = _expected(model)
    tied = model.lm_head is None
    use = [n for n in found if n in expected]
    unexpected = [
        n
        for n in found
        if n not in expected and not n.endswith(IGNORED_SUFFIXES) and not (tied and n == "lm_head.weight")
    ]
    missing = [n for n in expected if n not in found]
    problems = []
    if missing:
        problems.append(f"missing {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {_names(unexpected)}")
    shapes = [
        f"{n} is {list(found[n])}, expected {list(expected[n])}"
        for n in use
        if tuple(found[n]) != expected[n]
    ]
    if shapes:
        problems.append("wrong shapes: " + "; ".join(shapes[:5]) + (" …" if len(shapes) > 5 else ""))
    if problems:
        arch = model.config.architecture
        raise FormatError(
            f"{where}: tensors do not match a {arch} with this config.json: {'; '.join(problems)}; "
            "the checkpoint is incomplete, quantized in a layout llmctl cannot run, or of another architecture"
        )
    return use


def _names(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def assign(model: Transformer, name: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter ``name`` (no copy, no gradient)."""
    import torch

    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    setattr(module, leaf, torch.nn.Parameter(tensor, requires_grad=False))


def load_state_dict(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    dtype: Any = None,
    device: Any = None,
) -> Transformer:
    """A model from a Hugging Face-named state dict (e.g. the GGUF loader's), converted to ``dtype``."""
    shapes = {n: tuple(t.shape) for n, t in state_dict.items()}
    return load_tensors(config, shapes, state_dict.items(), dtype, device)


def load_tensors(
    config: ModelConfig,
    shapes: Mapping[str, tuple[int, ...]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    dtype: Any = None,
    device: Any = None,
) -> Transformer:
    """A model from (name, tensor) pairs produced one at a time (their names and ``shapes`` known up
    front): each is converted to ``dtype``, placed on ``device`` and dropped before the next, so a source
    that makes its tensors lazily (the GGUF dequantizer) never holds more than one."""
    from llmctl.runtime.device import compute_dtype, pick_device

    device = pick_device(device)
    dtype = compute_dtype(device, dtype)
    model = empty_model(config)
    where = config.source or "state dict"
    use = set(check_names(model, shapes, where))
    for name, tensor in tensors:
        if name not in use:
            continue
        if not tensor.is_floating_point():
            raise FormatError(f"{where}: tensor {name} is {tensor.dtype}, not floating point")
        assign(model, name, tensor.to(device=device, dtype=dtype))
        del tensor
    return model.fuse_projections().eval()


def load_model(path: Any, dtype: Any = None, device: Any = None) -> Transformer:
    """Load a Hugging Face folder (config.json + model.safetensors, or shards with their index), or a
    .gguf file through the GGUF loader (dequantized). ``path``: a path, or a ``ModelSource`` resolved
    already (not resolved again)."""
    from safetensors import safe_open

    from llmctl.runtime.device import compute_dtype, pick_device
    from llmctl.sources import ModelSource, resolve

    if isinstance(path, ModelSource):
        source = path
    else:
        path = Path(path)
        if not path.exists():
            raise SourceError(f"{path}: no such file or folder; pass a Hugging Face model folder or a .gguf file")
        source = resolve(str(path))  # checks config.json and weights are there; refuses pickle checkpoints
    if source.is_gguf:  # dequantized tensor by tensor, straight into the model
        from llmctl.runtime.gguf_loader import hf_shapes, iter_gguf_tensors

        info = source.gguf
        return load_tensors(info.config, hf_shapes(info), iter_gguf_tensors(info), dtype, device)
    folder, config = source.path, source.config
    if (quantized := quantized_layout(folder)) is not None:  # llmctl quantize's layouts
        return load_quantized(folder, quantized[1], quantized[0], dtype=dtype, device=device)
    device = pick_device(device)
    dtype = compute_dtype(device, dtype)
    model = empty_model(config)

    files = safetensors_files(folder)
    where: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        for info in read_safetensors_header(file)[0]:  # validated against the file size
            if info.name in where:
                raise FormatError(
                    f"{folder}: tensor {info.name} is in both {where[info.name].name} and {file.name}"
                )
            if info.dtype not in FLOAT_DTYPES and not info.name.endswith(IGNORED_SUFFIXES):
                raise FormatError(
                    f"{file}: tensor {info.name} is {info.dtype}; the torch runtime loads floating-point "
                    "checkpoints only (use the GGUF path or a bf16/fp16/fp32 export)"
                )
            where[info.name], shapes[info.name] = file, info.shape
    use = set(check_names(model, shapes, str(folder)))
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:  # memory-mapped
            for name in [n for n in f.keys() if n in use]:
                assign(model, name, f.get_tensor(name).to(device=device, dtype=dtype))
    return model.fuse_projections().eval()


# ---- llmctl quantize's layouts (compressed-tensors, bitsandbytes, llmctl) -------------------------------
def quantized_layout(folder: Path) -> tuple[str, dict[str, Any]] | None:
    """(layout, config.json) when the folder holds quantized weights llmctl loads; None for a float one."""
    from llmctl.config import read_config_json
    from llmctl.errors import ConfigError
    from llmctl.quant.layouts import detect

    try:
        cfg = read_config_json(folder / "config.json")
    except ConfigError:
        return None
    layout = detect(cfg) if isinstance(cfg, dict) else None
    return None if layout is None else (layout, cfg)


def load_quantized(
    folder: Path, config_json: dict[str, Any], layout: str, dtype: Any = None, device: Any = None
):
    """A ``Transformer`` from a folder in one of llmctl's layouts (compressed-tensors, bnb, llmctl)."""
    from safetensors import safe_open

    from llmctl.quant.layouts import read_quantized
    from llmctl.quant.qlinear import QuantWeight, lossless_int8
    from llmctl.quant.registry import QTensor
    from llmctl.runtime.device import compute_dtype, pick_device

    device = pick_device(device)
    if device.type not in ("cpu", "cuda", "meta"):  # meta: sizes only (tests, planning)
        raise UsageError(
            f"{folder}: quantized weights run on the CPU or CUDA in llmctl's runtime, not {device.type}; "
            "pass --device cpu or cuda"
        )
    dtype = compute_dtype(device, dtype)
    config = ModelConfig.from_dict(config_json, source=str(folder / "config.json"))
    model = empty_model(config)
    handles = {}
    where: dict[str, Any] = {}
    for file in safetensors_files(folder):
        h = safe_open(str(file), framework="pt", device="cpu")
        handles[file] = h
        for k in h.keys():
            where[k] = h
    used: set[str] = set()

    def fetch(name: str) -> torch.Tensor:
        if name not in where:
            raise FormatError(f"{folder}: tensor {name} is missing; the quantized checkpoint is incomplete")
        used.add(name)
        return where[name].get_tensor(name)

    quantized = read_quantized(layout, config_json, set(where), fetch)
    head = "model.embed_tokens.weight" if model.lm_head is None else "lm_head.weight"  # the logits' matrix
    shapes = {n: tuple(where[n].get_slice(n).get_shape()) for n in where if n not in used}
    shapes.update({n: tuple(q.shape) for n, q in quantized.items()})
    for name in check_names(model, shapes, str(folder)):
        if name in quantized:
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            delattr(module, leaf)
            q = quantized[name]
            if device.type != "cpu":  # the parts go to the device first: its kernels are chosen there
                q = QTensor(
                    q.format, q.shape, q.group_size, {k: v.to(device) for k, v in q.parts.items()}, q.meta
                )
            setattr(module, leaf, QuantWeight(q, dtype))
        else:
            t = fetch(name)
            if not t.is_floating_point():
                raise FormatError(f"{folder}: tensor {name} is {t.dtype}, not floating point")
            assign(model, name, t.to(device=device, dtype=dtype))
            if name == head and device.type == "cpu":
                model.head = lossless_int8(t, dtype)
    # q/k/v and gate/up on llmctl's int4 kernel join into one call each; other kernels stay one per weight
    return model.fuse_projections().eval()
