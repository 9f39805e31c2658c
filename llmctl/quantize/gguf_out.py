"""GGUF output: ``llmctl quantize MODEL.gguf --format q8_0 --out x.gguf`` (or ``--layout gguf``).

Two ways a file is written:

* **By llmctl** — f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1: each source tensor dequantized to fp32,
  then quantized by gguf-py's own quantizers (``gguf.quants.quantize``, the reference implementations of
  ggml's block formats), or, for a type gguf-py cannot make (q6_k), by ggml's own C quantizer
  (``ggml_quantize_chunk`` in llama-cpp-python's libggml-base) — so the bytes are exactly ggml's. Which
  type each tensor gets (``tensor_types``) is what ``llama_model_quantize`` chooses for the same file type:
  for q8_0 … q5_1 its mix (llmctl.quant.recipes, llama.cpp's ``llama_tensor_get_type``: the output tensor,
  or token_embd when the embeddings are tied, q6_k — q8_0 when its rows are not a multiple of 256 —, a
  q8_0 file keeps q8_0), or with ``pure`` every 2-D tensor in the type, as ``llama-quantize --pure`` and
  llama.cpp's converter. 1-D tensors (norms, biases) stay F32; a 2-D tensor whose rows are not a multiple
  of its type's block falls back as llama.cpp's ``tensor_type_fallback`` does (F16 for the 32-blocks).
* **By llama.cpp** — its K-quant and i-quant mixes (q2_k, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k, iq4_xs,
  …), any type with an importance matrix (``--calibration``), and ``--by llama.cpp``: an f16 GGUF is
  written to a temporary file as above, then llama.cpp's own quantizer (``llama_model_quantize`` through
  llama-cpp-python) makes the output with its per-tensor rules; the intermediate file is removed whatever
  happens.

Sources, each a ``GGUFSource`` (llmctl.quantize.gguf_source: a GGUF file, its metadata copied key by key,
or a Hugging Face safetensors folder made as llama.cpp's converter makes it), so both feed the same writer,
llmctl.gguf.writer: it writes the header, the metadata (``general.file_type`` set for the new type,
``general.quantized_by`` naming llmctl), the tensor infos and each tensor's bytes with its error; this module
chooses each tensor's type and what encodes it. The output (and a mix's f16 intermediate) is written inside a
private ``.NAME.partial-PID`` folder beside it (``llmctl.atomic.private_dir``) and renamed into place when
complete; the folder is removed whatever happens.
"""

from __future__ import annotations

import functools
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
from llmctl.errors import QuantError, UsageError
from llmctl.gguf.writer import GGUFSource, GGUFTensor, write_file
from llmctl.quant.recipes import LLAMA_MIXES, PY_TYPES
from llmctl.quantize.gguf_source import open_source

FLOAT_TYPES = ("f32", "f16", "bf16")
ALIASES = {"fp32": "f32", "fp16": "f16"}
_WRITTEN_BY = {
    "python": "llmctl (gguf-py and ggml quantizers)",
    "llama.cpp": "llama.cpp (llama_model_quantize)",
}
_FILE_TYPES = {
    "f32": 0,
    "f16": 1,
    "bf16": 32,
    **{k: LLAMA_MIXES[k] for k in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")},
}


def gguf_format(name: str, by: str = "auto") -> tuple[str, str]:
    """(type or mix name, "python" | "llama.cpp") for ``--format`` with a GGUF output.

    q8_0/q4_0/q4_1/q5_0/q5_1 are written by llmctl by default, with llama.cpp's mix of that name
    (``tensor_types``); ``by="llama.cpp"`` has llama.cpp's quantizer make them (from an f16 intermediate)."""
    n = ALIASES.get(name.lower(), name.lower())
    if n in PY_TYPES and (by != "llama.cpp" or n not in LLAMA_MIXES):
        return n, "python"
    if n in LLAMA_MIXES:
        return n, "llama.cpp"
    raise UsageError(
        f"--format {name!r} cannot be written as GGUF; choose one of {', '.join(PY_TYPES)} (written by llmctl) "
        f"or {', '.join(k for k in LLAMA_MIXES if k not in PY_TYPES)} (llama.cpp's quantizer)"
    )


def gguf_request(fmt: str, by: str = "auto", pure: bool = False, calibration: Any = None) -> tuple[str, str]:
    """(type or mix name, who writes it) for a GGUF output, refusing what cannot be honoured: ``pure`` where
    it means nothing (float types, llama.cpp's K-quant / i-quant mixes) and ``calibration`` for float types.
    A calibrated file goes to llama.cpp's quantizer (gguf-py's quantizers take no importance matrix): its
    mix of the type, or every 2-D tensor in the type with ``pure``."""
    name, how = gguf_format(fmt, by)
    plain = [k for k in PY_TYPES if k not in FLOAT_TYPES]
    if pure and name in FLOAT_TYPES:
        raise UsageError(f"--pure applies to {', '.join(plain)}; with {name} every 2-D tensor is {name} "
                         "already: drop --pure")  # fmt: skip
    if pure and name not in plain:
        raise UsageError(f"--pure applies to {', '.join(plain)} (every 2-D tensor in the type instead of "
                         f"llama.cpp's mix); {name} is a llama.cpp mix: drop --pure, or set types with --override")  # fmt: skip
    if calibration is None:
        return name, how
    if name in FLOAT_TYPES:
        raise UsageError(
            f"--calibration applies to quantized types; drop it for {name}, or choose q8_0, q4_k_m, …"
        )
    return name, "llama.cpp"


def parse_overrides(overrides: Sequence[str], how: str) -> list[tuple[str, str]]:
    """``PATTERN=TYPE`` pairs for GGUF output: types llmctl writes (f32 … q5_1) when llmctl writes the file,
    any ggml type llama.cpp's quantizer makes (q6_k, iq4_xs, …) when it does. Patterns are regular
    expressions searched in llama.cpp's tensor names (``blk\\.1[0-7]\\.ffn_down``)."""
    from gguf import GGMLQuantizationType

    from llmctl.quantize.plan import split_override

    allowed = PY_TYPES if how == "python" else tuple(t.name.lower() for t in GGMLQuantizationType)
    out = []
    for o in overrides:
        compiled, kind = split_override(o, "PATTERN=TYPE, e.g. 'ffn_down=q8_0'")
        pattern, kind = compiled.pattern, ALIASES.get(kind.lower(), kind.lower())
        if kind not in allowed:
            where = "llmctl writes" if how == "python" else "llama.cpp's quantizer makes"
            hint = (
                " (or a llama.cpp mix such as q4_k_m, whose quantizer makes K-quants)"
                if how == "python"
                else ""
            )
            raise UsageError(
                f"--override {o!r}: {kind!r} is not a type {where}; choose one of {', '.join(allowed)}{hint}"
            )
        out.append((pattern, kind))
    return out


def tensor_type(
    name: str, shape: tuple[int, ...], want: str, overrides: Sequence[tuple[str, str]] = ()
) -> str:
    """The type a tensor of numpy ``shape`` (rows last dim) gets when every 2-D tensor is ``want`` (a float
    type, or ``pure``): the first matching ``--override`` replaces ``want`` for 2-D tensors; a row that is
    not a multiple of the type's block falls back as llama.cpp's (F16 for the 32-blocks)."""
    from llmctl.quant.recipes import gguf_fallback

    if _one_row(shape):
        return "f32"
    want = next((kind for pattern, kind in overrides if re.search(pattern, name)), want)
    return gguf_fallback(want, shape[-1])


def _one_row(shape: tuple[int, ...]) -> bool:
    return len(shape) < 2 or math.prod(shape[:-1]) == 1


def tensor_types(
    src: GGUFSource,
    name: str,
    rules: Sequence[tuple[str, str]] = (),
    *,
    pure: bool = False,
    imatrix: bool = False,
) -> list[str]:
    """Each tensor's type in a ``name`` file, in the source's order, as ``llama_model_quantize`` chooses it:
    every 2-D tensor ``name`` for float types and with ``pure`` (``tensor_type``); else llama.cpp's mix
    (llmctl.quant.recipes: its ``llama_tensor_get_type`` rules; ``imatrix``: its q4_0/q5_0 guard on the
    first ffn_down layers). ``rules``: parsed ``--override`` pairs, first match wins; as in llama.cpp a
    tensor they type is not counted by the mix's per-layer rules."""
    if pure or name in FLOAT_TYPES:
        return [tensor_type(n, shape, name, rules) for n, shape, _, _ in src.tensors]
    from llmctl.checkpoint import TensorInfo
    from llmctl.quant import recipes

    infos = [TensorInfo(n, shape, dtype, nbytes) for n, shape, nbytes, dtype in src.tensors]
    plain = recipes.assign_formats(infos, name, None, "f16", config=src.config)
    manual = {t.name for t, (_, kind) in zip(infos, plain, strict=True)  # tensors llama.cpp quantizes
              if recipes.is_quantized(kind) and any(re.search(p, t.name) for p, _ in rules)}  # fmt: skip
    mixed = recipes.assign_formats(
        infos, name, None, "f16", config=src.config, manual=manual, imatrix=imatrix
    )
    out = []
    for t, (_, kind) in zip(infos, mixed, strict=True):
        if t.name in manual:  # llama.cpp: the first matching override, then its fallback for the row
            kind = tensor_type(t.name, tuple(t.shape), name, rules)
        elif _one_row(tuple(t.shape)):  # ggml_n_dims 1: llama.cpp does not quantize it
            kind = "f32"
        out.append(kind)
    return out


@dataclass
class GGUFResult:
    source: str
    out: Path
    format: str
    by: str
    seconds: float
    source_bytes: int
    output_bytes: int
    tensors: list[GGUFTensor] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] | None = None
    pure: bool = False

    @property
    def params(self) -> int:
        return sum(t.params for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        from llmctl.quantize.convert import by_format, non_tensor

        measured = sorted((t for t in self.tensors if t.sqnr_db is not None), key=lambda t: t.sqnr_db or 0.0)
        return {
            "model": self.source,
            "out": str(self.out),
            "format": self.format,
            "layout": "gguf",
            "written_by": _WRITTEN_BY[self.by],
            "pure": self.pure,
            "source_bytes": self.source_bytes,
            "output_bytes": self.output_bytes,
            "params": self.params,
            "bits_per_weight": 8 * self.output_bytes / self.params if self.params else 0.0,
            "seconds": round(self.seconds, 3),
            "params_per_second": self.params / self.seconds if self.seconds else None,
            "calibration": self.calibration,
            "by_format": by_format(self.tensors),
            "non_tensor": non_tensor("metadata + tokenizer", self.source_bytes, self.output_bytes, self.tensors),
            "worst_sqnr": [
                {"name": t.name, "format": t.format, "sqnr_db": round(t.sqnr_db or 0.0, 2)}
                for t in measured[:5]
            ],
            "notes": self.notes,
        }


def write_gguf(
    source: Any,
    out: str | Path,
    fmt: str,
    *,
    by: str = "auto",
    pure: bool = False,
    force: bool = False,
    threads: int | None = None,
    progress: Callable[[Any], None] | None = None,
    overrides: Sequence[str] = (),
    calibration: dict[str, Any] | None = None,
) -> GGUFResult:
    """Write ``source`` (a resolved GGUF file or Hugging Face folder) as a GGUF of type/mix ``fmt`` to ``out``
    (see module doc).

    ``pure``: every 2-D tensor in the type (q8_0 … q5_1) instead of llama.cpp's mix. ``overrides``:
    ``PATTERN=TYPE`` strings (``parse_overrides``). ``calibration``: ``{"data": spec, "tokens": n}``; its
    statistics become llama.cpp's importance matrix, so the file is made by llama.cpp's quantizer
    (``gguf_request``)."""
    name, how = gguf_request(fmt, by, pure, calibration)
    rules = parse_overrides(overrides, how)
    out = Path(out)
    from llmctl.quantize.convert import check_out, remove_dead_runs

    check_out(out, force, file=True)
    src = open_source(source)  # refuses what cannot be written before anything is
    stats = None
    if calibration is not None:  # before anything is written: a bad text leaves no trace
        stats = _imatrix(source, src, calibration, progress)
    remove_dead_runs(out)
    try:  # a 0700 folder of our own: no link planted beside the output can redirect what is written
        work = atomic.private_dir(out, "partial")
    except OSError as e:
        raise QuantError(
            f"cannot write the output next to {out} ({e.strerror or e}); choose a writable folder with --out"
        ) from None
    tmp, f16 = work / out.name, work / "f16.gguf"  # f16: a mix's intermediate for llama.cpp's quantizer
    t0 = time.perf_counter()
    try:
        if how == "python":
            types = tensor_types(src, name, rules, pure=pure)
            tensors = _write_python(src, tmp, _FILE_TYPES[name], types, progress)
        else:
            tensors = _write_llama_cpp(src, f16, tmp, name, threads, progress, rules, stats, pure)
        out_bytes = tmp.stat().st_size
        os.replace(tmp, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    src_bytes = Path(source.path).stat().st_size if source.is_gguf else sum(n for _, _, n, _ in src.tensors)
    result = GGUFResult(source.display, out, name, how, time.perf_counter() - t0, src_bytes, out_bytes, tensors)
    result.pure = pure
    result.notes.extend(src.notes)
    if stats is not None:
        result.calibration = stats.describe()
        result.notes.append("calibrated: written by llama.cpp's quantizer with the importance matrix, "
                            + (f"every 2-D tensor {name} (pure)" if pure else f"its {name} mix"))  # fmt: skip
    moved = [t for t in tensors  # what the mix, not an --override, moved off the type
             if t.format not in (name, "f32", "f16") and not any(re.search(p, t.name) for p, _ in rules)]  # fmt: skip
    if moved and not pure and name not in FLOAT_TYPES:
        shown = ", ".join(f"{t.name} {t.format}" for t in moved[:3]) + (", …" if len(moved) > 3 else "")
        result.notes.append(f"llama.cpp's {name} mix: {shown}; --pure puts every 2-D tensor in {name}")
    if how == "python" and any(t.format == "f16" for t in tensors) and name not in FLOAT_TYPES:
        result.notes.append("tensors whose rows are not a multiple of their type's block are written as f16")
    return result


def _progress(progress, phase: str, done: int = 0, total: int | None = None, unit: str = "tensors", name: str = "",
              work_done: int | None = None, work_total: int | None = None) -> None:  # fmt: skip
    if progress is not None:
        from llmctl.quantize.convert import Progress

        progress(Progress(phase, done, total, unit, name, work_done, work_total))


def _imatrix(source: Any, src: GGUFSource, calibration: dict[str, Any], progress) -> Any:
    """The source's activation statistics (llmctl.quantize.calibrate) keyed by the output's GGUF tensor names."""
    from llmctl.gguf.names import gguf_to_hf_name
    from llmctl.quantize.calibrate import collect

    phase = f"calibrating on {calibration['data']}"

    def step(i: int, n: int) -> None:
        _progress(progress, phase, i, n, "layers")

    _progress(progress, phase)  # loading the text, the tokenizer and the embeddings first
    cal = collect(source, calibration["data"], tokens=calibration["tokens"], progress=step)
    names = {gguf_to_hf_name(name, src.arch): name for name, *_ in src.tensors}
    cal.importance = {names[hf]: v for hf, v in cal.importance.items() if hf in names}
    return cal


def _write_python(
    src: GGUFSource,
    dst: Path,
    file_type: int,
    types: Sequence[str],
    progress,
    extra: dict[str, Any] | None = None,
    phase: str = "quantizing",
) -> list[GGUFTensor]:
    """Every tensor of ``src`` quantized from fp32 to its entry in ``types`` (``tensor_types``) and written in
    the source's order by llmctl.gguf.writer: gguf-py's quantizers, ggml's (``ggml_quantize``) for the types
    gguf-py cannot make; ``file_type``: llama.cpp's ``general.file_type``; ``extra``: metadata keys to add
    (str or int values); ``phase``: what the progress calls it."""
    def step(i: int, n: int, name: str, done: int, total: int) -> None:
        _progress(progress, phase, i, n, "tensors", name, done, total)

    return write_file(src, dst, file_type, types, _encode, step, extra)


def _encode(x: Any, kind: str, qtype: Any) -> Any:
    """fp32 ``x`` as type ``kind``'s data: gguf-py's quantizer for the types llmctl writes, ggml's otherwise."""
    from gguf.quants import quantize

    return quantize(x, qtype) if kind in PY_TYPES else ggml_quantize(x, qtype)


@functools.cache
def _ggml_quantize_chunk() -> Any:
    """ggml's ``ggml_quantize_chunk`` from llama-cpp-python's libggml-base (the library llama.cpp runs)."""
    import ctypes

    from llmctl.runtime.llama_lib import ggml_base_library

    path = ggml_base_library()
    if not path.is_file():
        raise QuantError(f"ggml's quantizer is not where llama-cpp-python keeps it ({path}); reinstall it "
                         "with scripts/install.sh, or pass --pure to write every tensor with gguf-py")  # fmt: skip
    f = ctypes.CDLL(str(path)).ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]  # fmt: skip
    return f


def ggml_quantize(x: Any, qtype: Any) -> Any:
    """fp32 numpy rows (last dim a multiple of the block) quantized by ggml's own C code, without an
    importance matrix: the bytes ``llama_model_quantize`` writes for that tensor, as uint8 in gguf-py's
    byte shape."""
    import gguf
    import numpy as np

    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = math.prod(x.shape[:-1]), x.shape[-1]
    out = np.empty(gguf.quant_shape_to_byte_shape(x.shape, qtype), np.uint8)
    written = _ggml_quantize_chunk()(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    if written != out.nbytes:
        raise QuantError(
            f"ggml's quantizer wrote {written} bytes for {qtype.name} {list(x.shape)}, expected {out.nbytes}"
        )
    return out


def _write_llama_cpp(
    src: GGUFSource,
    f16: Path,
    dst: Path,
    mix: str,
    threads: int | None,
    progress,
    rules: Sequence[tuple[str, str]] = (),
    stats: Any = None,
    pure: bool = False,
) -> list[GGUFTensor]:
    """An f16 GGUF written to ``f16`` (the caller removes it) and quantized by llama.cpp's
    ``llama_model_quantize`` into ``dst``: ``rules`` become its tensor-type overrides, ``stats``
    (llmctl.quantize.calibrate.Calibration by GGUF name) its importance matrix, and ``pure`` its ``pure`` flag
    (every tensor the mix's base type).

    llama.cpp runs in a child process (``_llama_quantize_child``), so that Ctrl-C stops it at once: a call
    into C in this process would not see the interrupt until the whole file is written. Each step has its
    own progress phase and counter."""
    import multiprocessing

    import gguf

    extra = {}
    if stats is not None:  # the keys llama.cpp's llama-quantize writes for an importance matrix
        extra = {"quantize.imatrix.dataset": stats.data, "quantize.imatrix.entries_count": len(stats.importance),
                 "quantize.imatrix.chunks_count": stats.windows, "llmctl.calibration.tokens": stats.tokens}  # fmt: skip
    _write_python(src, f16, _FILE_TYPES["f16"], tensor_types(src, "f16"), progress, extra=extra,
                  phase="writing the f16 intermediate")  # fmt: skip
    phase = f"llama.cpp quantizing to {mix}"
    n = len(src.tensors)
    _progress(progress, phase, 0, n)
    request = {
        "f16": str(f16), "dst": str(dst), "ftype": LLAMA_MIXES[mix], "nthread": threads or (os.cpu_count() or 1),
        "pure": pure, "overrides": [(p, gguf.GGMLQuantizationType[k.upper()].value) for p, k in rules],
        "imatrix": None if stats is None else {k: v.float().contiguous().numpy() for k, v in stats.importance.items()},
    }  # fmt: skip
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no fork of this one's threads
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_llama_quantize_child, args=(request, send), daemon=True)
    child.start()
    send.close()
    status = None
    try:
        while status is None:
            try:
                msg = receive.recv()
            except EOFError:
                break
            if msg[0] == "tensor":  # llama.cpp starts tensor i of n: i - 1 are done
                _progress(progress, phase, msg[1] - 1, msg[2], "tensors", msg[3])
            else:
                status = msg[1]
        child.join()
    finally:  # Ctrl-C (or any failure here): the child stops too, before the caller removes its files
        if child.is_alive():
            child.kill()
            child.join()
        receive.close()
    if status is None and child.exitcode == -2:  # SIGINT reached the child first
        raise KeyboardInterrupt
    if status != 0:
        how = f"status {status}" if status is not None else f"its process ended with code {child.exitcode}"
        raise QuantError(f"llama.cpp's quantizer failed for {mix} ({how})")
    _progress(progress, phase, n, n)
    return _describe(dst, {name: nbytes for name, _, nbytes, _ in src.tensors})


def _llama_quantize_child(request: dict[str, Any], conn: Any) -> None:
    """In a child process: ``llama_model_quantize`` as ``_write_llama_cpp`` asks, its per-tensor log lines
    sent to ``conn`` as ("tensor", i, n, name), then ("status", code)."""
    import ctypes
    import signal

    from llmctl.runtime.llama_lib import load

    llama_cpp = load()

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # Ctrl-C ends it at once; the parent removes its files
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = request["ftype"]
    params.nthread = request["nthread"]
    params.pure = request["pure"]
    keep = []  # ctypes buffers the params point into, alive until the call returns
    rules = request["overrides"]
    if rules:
        overrides = (llama_cpp.llama_model_tensor_override * (len(rules) + 1))()
        for i, (pattern, kind) in enumerate(rules):
            keep.append(pattern.encode())
            overrides[i].pattern, overrides[i].type = keep[-1], kind
        params.tt_overrides = overrides  # the last entry's NULL pattern ends the list
    if request["imatrix"] is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(request["imatrix"]) + 1))()
        for i, (name, data) in enumerate(request["imatrix"].items()):
            keep += [name.encode(), data]
            entries[i].name, entries[i].size = keep[-2], data.size
            entries[i].data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries

    @llama_cpp.llama_log_callback
    def log(_level: int, text: bytes, _user: Any) -> None:  # "[  12/ 236]  blk.0.attn_q.weight - ..."
        m = re.match(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)", text.decode("utf-8", "replace"))
        if m:
            conn.send(("tensor", int(m.group(1)), int(m.group(2)), m.group(3)))

    llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
    status = llama_cpp.llama_model_quantize(request["f16"].encode(), request["dst"].encode(), ctypes.byref(params))
    conn.send(("status", status))
    conn.close()


def _describe(path: Path, source_bytes: dict[str, int]) -> list[GGUFTensor]:
    """The tensors of a written GGUF (type, size) against the source's sizes; no error measurement (read by
    llmctl.gguf.reader, which skips gguf-py's slow per-field parse of the vocabulary)."""
    from llmctl.gguf.reader import read_gguf

    info = read_gguf(path)
    return [
        GGUFTensor(t.name, info.ggml_type(t.name).name.lower(), math.prod(t.shape), source_bytes.get(t.name, 0),
                   t.nbytes, None)
        for t in info.tensors
    ]  # fmt: skip


def plan_gguf(
    source: Any,
    fmt: str,
    by: str = "auto",
    overrides: Sequence[str] = (),
    calibration: dict[str, Any] | None = None,
    pure: bool = False,
) -> dict[str, Any]:
    """The dry run: each tensor's type in the output and its bytes, by the rules the writer follows
    (``tensor_types``: llama.cpp's ``llama_tensor_get_type`` via llmctl.quant.recipes, the overrides and,
    with an importance matrix, llama.cpp's q4_0/q5_0 guard on the first ffn_down layers)."""
    from llmctl.quant import recipes

    name, how = gguf_request(fmt, by, pure, calibration)
    rules = parse_overrides(overrides, how)
    src = open_source(source)
    types = tensor_types(src, name, rules, pure=pure, imatrix=calibration is not None)
    rows = [{"name": n, "shape": list(shape), "from": dtype.lower(), "to": kind, "bytes": recipes.ggml_nbytes(kind, shape)}
            for (n, shape, _, dtype), kind in zip(src.tensors, types, strict=True)]  # fmt: skip
    return {
        "model": source.display, "format": name, "layout": "gguf", "pure": pure,
        "written_by": _WRITTEN_BY[how], "calibration": calibration,
        "tensors": rows, "tensor_bytes": sum(r["bytes"] for r in rows),
    }  # fmt: skip
