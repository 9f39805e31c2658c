"""``llmctl quantize`` carried out: ``run_plan`` streams the tensors of a plan (llmctl.quantize.plan),
quantizes them in row chunks, writes them and renames the output into place.

Streaming: every input tensor is read in row chunks with positioned reads, quantized, converted to the
layout's entries and written at its place in the output file, whose header was written first from the
plan. Peak memory is a chunk (~4 M values) and its temporaries, plus the small per-tensor buffers NF4
double quantization needs, whatever the model size; with ``--method gptq``, also one decoder layer of the
calibration's model and its Hessians (llmctl.quantize.calibrate.LayerStream). The output is built in a
hidden sibling folder and renamed when complete; an error or Ctrl-C removes it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl import atomic
from llmctl.errors import QuantError
from llmctl.gguf.writer import sqnr_db
from llmctl.quant.formats import PER_TENSOR, REGISTRY, QTensor, find_format
from llmctl.quant.layouts import FLOATS, Layout, TensorPlan
from llmctl.quantize.inputs import TensorInput, open_input
from llmctl.quantize.plan import CHUNK_VALUES, TOKENIZER_FILES, Plan, side_file


def open_calibration(plan: Plan, progress: Callable[[Progress], None] | None = None) -> None:
    """Collect the plan's activation statistics (``--calibration``) unless it has them; progress by layer.
    A GPTQ plan only opens the stream here (the text read, its windows embedded: a bad text fails before
    anything is written); its layers run as ``_write_all`` reaches them."""
    from llmctl.quantize.calibrate import LayerStream

    if plan.calibration_spec is None or plan.calibration is not None:
        return
    if not plan.searches:  # nothing would use it (the plan notes so)
        return
    phase = f"calibrating on {plan.calibration_spec['data']}"

    def step(i: int, n: int) -> None:
        if progress is not None:
            progress(Progress(phase, i, n, "layers"))

    if progress is not None:  # loading the text, the tokenizer and the embeddings first
        progress(Progress(phase))
    gptq = [t.name for t in plan.tensors if t.opts.get("method") == "gptq"]
    stream = LayerStream(
        plan.source, plan.calibration_spec["data"], tokens=plan.calibration_spec["tokens"], progress=step, hessians=gptq
    )
    if gptq:
        stream.progress = None  # its layers count in the "quantizing (gptq)" phase from here
        plan.stream = stream
    else:
        stream.run()
    plan.calibration = stream.calibration
    plan.calibration_spec = plan.calibration.describe()
    plan.config.setdefault("llmctl", {})["calibration"] = plan.calibration_spec


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
            "calibration": self.plan.calibration_spec,
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
    open_calibration(plan, progress)  # before anything is written: a bad text leaves no trace
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
    from llmctl.quant.safetensors_io import Writer

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
    align = math.lcm(align, REGISTRY[tp.format].chunk_alignment(cols, tp.group_size))  # blocks, bytes
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

    from llmctl.quant.nf4 import double_quantize

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
    if tp.group_size == PER_TENSOR:  # one scale (fp8): the absmax of the whole tensor first
        amax = torch.zeros(())
        for chunk in inp.read(tp.name, rows_per):
            amax = torch.maximum(amax, chunk.float().abs().amax())
        if not bool(torch.isfinite(amax)):
            raise QuantError(f"{tp.name}: the tensor holds NaN or infinite values; the checkpoint is corrupt")
        opts["amax"] = amax
    dq = fmt.double_quant  # nf4-dq: quantized as nf4, its absmaxes quantized again at the end
    qfmt = REGISTRY[find_format(family=fmt.family, bits=fmt.bits, double_quant=False)] if dq else fmt
    absmax: list[Any] = []
    seen: set[str] = set()
    const = set(fmt.constant_parts) | (
        {"scale"} if tp.group_size == PER_TENSOR else set()
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


def _write_side_files(plan: Plan, tmp: Path, progress: Callable[[Progress], None] | None = None) -> None:
    (tmp / "config.json").write_text(json.dumps(plan.config, indent=2) + "\n")
    src = plan.source
    if src.is_gguf:
        _gguf_tokenizer(src.path, tmp, plan, progress)
        return
    for name in TOKENIZER_FILES:
        if (f := side_file(src.path, name)) is not None:
            shutil.copyfile(f, tmp / name)


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
