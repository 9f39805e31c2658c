"""Activation statistics for ``llmctl quantize --calibration TEXT``.

The model runs (llmctl's torch runtime, in bf16 for a bf16 checkpoint and fp32 otherwise, one decoder layer
at a time: ``LayerStream``) over the first ``tokens`` tokens of a text (a file, a folder, ``sotu:…``,
``shakespeare:…``: any corpus ``llmctl eval --data`` takes), cut into windows of ``context`` tokens that
each start with BOS, as llama.cpp's ``llama-imatrix`` does. For every linear weight it keeps
the mean of x² per input channel over all those rows: llama.cpp's importance matrix. A weight error in
column j reaches the layer's output scaled by x_j, so E[x_j²] is how much that column's error costs.

They weight the scale search of llmctl's int4/int8 formats (llmctl.quant.formats) and are handed to
llama.cpp's quantizer as its importance matrix for GGUF K-quants (llmctl.quantize.gguf_out).

The statistics are read where the runtime multiplies: a ``TorchFunctionMode`` sees each ``F.linear`` call
and its weight; weights that are views of one fused matrix (q/k/v, gate/up) share that call's input.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from llmctl.errors import UsageError

DEFAULT_TOKENS = 4096
CONTEXT = 512
# rows of Σ xxᵀ per product: only the blocks on and right of the diagonal are computed (symmetric), 1.6x
# faster than the whole matrix at 640-2048 columns
GRAM_BLOCK = 256


@dataclass
class Calibration:
    """Per-input-channel mean x² (float32, (in_features,)) for each linear weight, by Hugging Face name."""

    data: str  # the corpus spec, as given
    tokens: int  # tokens run through the model (BOS included)
    windows: int
    context: int
    importance: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    # ``hessians=`` names: Σ xxᵀ over all rows (float32, (in_features, in_features)), GPTQ's H up to a
    # factor; weights that share an input (fused q/k/v, gate/up) share one tensor
    hessians: dict[str, Any] = field(default_factory=dict)
    prepared: dict[int, Any] = field(default_factory=dict)  # GPTQ's factored Hessian, reused by the weights sharing it

    def describe(self) -> dict[str, Any]:
        return {"data": self.data, "tokens": self.tokens, "windows": self.windows, "context": self.context}


def check_tokens(tokens: int) -> None:
    if tokens < 2:
        raise UsageError(f"--calibration-tokens must be at least 2, got {tokens}")


def text_windows(path: Any, data: str, tokens: int, context: int = CONTEXT) -> list[list[int]]:
    """The calibration windows of ``data`` for the model at ``path`` (its tokenizer; see calibration_windows)."""
    from llmctl.runtime.corpus import encode_prefix, load_corpus
    from llmctl.runtime.tokenizer import load_tokenizer

    check_tokens(tokens)
    docs = load_corpus(data)
    tok = load_tokenizer(path)
    windows = calibration_windows(encode_prefix(tok.encode, docs, tokens + 1), tok.bos_id, tokens, context)
    if not windows:
        raise UsageError(f"--calibration {data}: the text has no tokens; pass a longer text")
    return windows


# Tokenizing in a child process (prefetch_windows): what it was asked for → the process.
_PREFETCH: dict[tuple[str, str, int, int], Any] = {}


def prefetch_windows(path: Any, data: str, tokens: int, context: int = CONTEXT) -> None:
    """Start computing ``text_windows(path, data, tokens, context)`` in a child process, which LayerStream
    then takes instead of tokenizing itself. Loading a tokenizer holds the GIL (Gemma-3's 33 MB
    tokenizer.json: ~1 s), so a thread gains nothing; a process runs it beside this one's torch import and
    weight reading. Any failure there (a bad text, no tokenizer) leaves LayerStream to tokenize in-process
    and report it."""
    import atexit
    import subprocess
    import sys

    key = (str(path), data, tokens, context)
    if key in _PREFETCH:
        return
    # -c, not -m: -m would put the working directory first on the child's sys.path, so a json.py or
    # tokenizers.py in a downloaded model's folder would run; -c's '' entry is dropped before any import
    code = "import sys; sys.path[:] = [p for p in sys.path if p]; from llmctl.quantize.calibrate import _child; _child()"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(path), data, str(tokens), str(context)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
    except OSError:
        return
    if not _PREFETCH:
        atexit.register(_drop_prefetched)
    _PREFETCH[key] = proc


def _take_prefetched(path: Any, data: str, tokens: int, context: int) -> list[list[int]] | None:
    """The child's windows for these arguments, or None (none started, or it failed)."""
    import json

    proc = _PREFETCH.pop((str(path), data, tokens, context), None)
    if proc is None:
        return None
    out, _ = proc.communicate()
    if proc.returncode != 0:
        return None
    try:
        windows = json.loads(out)
    except ValueError:
        return None
    if not (isinstance(windows, list) and windows and all(isinstance(w, list) for w in windows)):
        return None
    return windows


def _drop_prefetched() -> None:
    """Stop children nobody took (the run failed or asked for other windows)."""
    for proc in _PREFETCH.values():
        proc.kill()
        proc.wait()
    _PREFETCH.clear()


def calibration_windows(ids: list[int], bos: int | None, tokens: int, context: int) -> list[list[int]]:
    """The first ``tokens`` tokens of ``ids`` (without its own leading BOS) in windows of ``context``,
    each starting with ``bos`` when the model has one; the last window may be shorter."""
    if bos is not None and ids[:1] == [bos]:
        ids = ids[1:]
    step = context - (bos is not None)
    head = [bos] if bos is not None else []
    out, left = [], tokens
    for start in range(0, len(ids), step):
        if left <= len(head):
            break
        w = head + ids[start : start + min(step, left - len(head))]
        out.append(w)
        left -= len(w)
    return out


def collect(
    model: Any,
    data: str,
    *,
    tokens: int = DEFAULT_TOKENS,
    context: int = CONTEXT,
    progress: Callable[[int, int], None] | None = None,
    hessians: Collection[str] = (),
) -> Calibration:
    """Run ``model`` (a resolved llmctl.sources.ModelSource, or a folder or .gguf path) over ``data`` and
    return its statistics; for the weights named in ``hessians`` also Σ xxᵀ of their inputs (GPTQ).
    ``progress(i, n)``: decoder layers done."""
    stream = LayerStream(model, data, tokens=tokens, context=context, progress=progress, hessians=hessians)
    stream.run()
    return stream.calibration


def compute_dtype(infos: list[tuple[str, tuple[int, ...], str, int]]) -> Any:
    """The dtype the calibration runs in for a checkpoint of these tensors (llmctl.quantize.inputs' infos):
    bf16 when every tensor is bf16, else fp32."""
    import torch

    return torch.bfloat16 if infos and all(d == "BF16" for _, _, d, _ in infos) else torch.float32


@contextmanager
def _exact_bf16_products(on: bool = True) -> Iterator[None]:
    """fp32 matrix products on bf16 values (``on``), computed by oneDNN from bf16 copies with fp32
    accumulation (torch's ``mkldnn`` matmul ``fp32_precision = "bf16"``): the copies are exact, so the
    result is the fp32 product's, 2-3x faster on CPUs with bf16 units (AMX, AVX-512 BF16). Where torch's
    oneDNN has no bf16 (plain AVX2) the setting is ignored and MKL's fp32 GEMM runs, same products."""
    import torch

    if not on:
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    old = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = old


def _gram_kernel() -> Any:
    """llmctl's kernels when they have ``gram_bf16`` (AVX512-BF16) and the CPU has no AMX, else None.

    ``gram_bf16`` sums the exact products of bf16 inputs in fp32 with ``vdpbf16ps`` at the CPU's bf16 rate:
    on an AMD EPYC (AVX-512 BF16, no AMX) 3x torch's fp32-from-bf16 GEMM by blocks (Σ xxᵀ of 4096 × 2048:
    71 against 213 ms). Where the CPU has AMX, oneDNN's bf16 GEMM (``_exact_bf16_products``) uses it."""
    from llmctl.quant import native

    if "amx_bf16" in native.cpu_flags():
        return None
    kernels = native.get()
    if kernels is None or not hasattr(kernels, "gram_bf16") or not kernels.gram_bf16_available():
        return None
    return kernels


class LayerStream:
    """The calibration windows pushed through the model one decoder layer at a time, in the checkpoint's
    dtype when it is bf16 (as the model runs, and as llm-compressor calibrates), else in fp32.

    Only the embeddings, then one layer at a time, then the final norm and head are read from the source
    and held (and the windows' hidden states, tokens × hidden), so memory does not grow with depth: an 8B
    model is calibrated with one of its layers in memory, not all of them. Every layer computes as in the
    runtime's forward over a window (llmctl.runtime.model, same modules and masks), so the statistics are
    those of the whole model run window by window. Windows of one length run as one batch.

    Σ xxᵀ sums exact products in fp32 (bf16 inputs through oneDNN's bf16 GEMM: ``_exact_bf16_products``),
    as llm-compressor does, its upper triangle by blocks and the lower mirrored once the layer is done; Σ x²
    is summed in float64, or read off the diagonal of the input's Σ xxᵀ.

    ``run(layer)`` advances through decoder layer ``layer`` (None: to the end, the head included); the
    statistics of the weights passed so far are in ``calibration`` (``importance`` for every linear weight,
    ``hessians`` for those named in ``hessians``, until ``drop``). Advancing is one way: ask for layers in
    order (llmctl.quantize.convert writes a GPTQ plan layer by layer).
    """

    def __init__(
        self,
        model: Any,
        data: str,
        *,
        tokens: int = DEFAULT_TOKENS,
        context: int = CONTEXT,
        progress: Callable[[int, int], None] | None = None,
        hessians: Collection[str] = (),
    ) -> None:
        import torch

        from llmctl.quantize.inputs import open_input
        from llmctl.runtime.loader import empty_model
        from llmctl.sources import ModelSource, resolve

        check_tokens(tokens)
        self.t0 = time.perf_counter()
        source = model if isinstance(model, ModelSource) else resolve(str(model))
        windows = _take_prefetched(source.path, data, tokens, context)
        if windows is None:
            windows = text_windows(source.path, data, tokens, context)
        self.calibration = Calibration(data, sum(map(len, windows)), len(windows), context)
        self.progress = progress
        self.wanted = set(hessians)
        inp = open_input(source)
        self.read = inp.tensor  # one tensor at a time, by name
        self.dtype = compute_dtype(inp.infos)
        self.model = empty_model(source.config)
        self.layers = len(self.model.model.layers)
        self.next = 0  # the next decoder layer to run; layers + 1 once the head is done
        self.peak_hessian_bytes = 0  # the most Σ xxᵀ bytes held at once (tests, bench)
        self._sums: dict[str, Any] = {}  # Σ x² per weight (float64)
        self._seen: dict[str, int] = {}  # its rows
        self._grams: dict[str, Any] = {}  # weights whose Σ x² is the diagonal of this Σ xxᵀ (this layer's)
        m = self.model
        self._load(["model.embed_tokens.weight"])
        by_length: dict[int, list[list[int]]] = {}  # windows of one length run as one batch
        for w in windows:
            by_length.setdefault(len(w), []).append(w)
        with torch.no_grad():
            self.x = [m.embed(torch.tensor(b, dtype=torch.long)) for b in by_length.values()]  # (B, T, hidden)
            self.pos = {T: m.positions(0, T) for T in by_length}  # before the embedding leaves
        self._unload(["model.embed_tokens.weight"])

    def run(self, layer: int | None = None) -> None:
        """Advance through decoder layer ``layer`` (None: every layer and the head)."""
        import torch

        end = self.layers if layer is None else min(layer + 1, self.layers)
        with torch.no_grad():
            while self.next < end:
                i = self.next
                block = self.model.model.layers[i]
                names = [f"model.layers.{i}.{n}" for n, _ in block.named_parameters()]
                self._load(names)
                block.self_attn.fuse()  # as the runtime runs it: q/k/v and gate/up one matrix, one input each
                block.mlp.fuse()
                kind, win = self.model.kinds[i], self.model.windows[i]
                with self._observe(block, f"model.layers.{i}."):
                    for k, x in enumerate(self.x):
                        rope, masks = self.pos[x.shape[1]]
                        self.x[k] = block(x, rope[kind], masks.get(win), None, i)
                self._settle()
                block.self_attn.qkv = block.mlp.gate_up = None
                self._unload(names)
                self.next += 1
                if self.progress is not None:
                    self.progress(self.next, self.layers)
            if layer is None and self.next == self.layers:
                self._head()
                self.next += 1
        cal = self.calibration
        cal.importance = {n: (s / max(self._seen[n], 1)).float() for n, s in self._sums.items()}
        cal.seconds = time.perf_counter() - self.t0

    def drop(self, name: str) -> None:
        """Forget ``name``'s Hessian (written); a matrix shared by fused weights goes with the last of them."""
        self.calibration.hessians.pop(name, None)

    def _head(self) -> None:
        """The statistics of an untied ``lm_head`` (a linear of its own), without computing the logits."""
        m = self.model
        if m.lm_head is not None:  # tied: the logits multiply the embeddings, which are no linear's weight
            norm = [n for n, _ in m.model.norm.named_parameters(prefix="model.norm")]
            self._load(norm)
            self._record(["lm_head.weight"], [m.model.norm(x) for x in self.x], m.config.hidden_size)
            self._settle()
            self._unload(norm)
        self.x = []

    def _observe(self, block: Any, prefix: str) -> Any:
        """A torch function mode that records the input of every ``F.linear`` on ``block``'s weights."""
        import torch.nn.functional as F
        from torch import nn
        from torch.overrides import TorchFunctionMode

        by_storage: dict[int, list[str]] = {}  # fused q/k/v and gate/up are views of one matrix
        for n, mod in block.named_modules(prefix=prefix.rstrip(".")):
            if isinstance(mod, nn.Linear):
                by_storage.setdefault(mod.weight.untyped_storage().data_ptr(), []).append(f"{n}.weight")
        stream = self

        class Observe(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is F.linear:
                    names = by_storage.get(args[1].untyped_storage().data_ptr())
                    if names:
                        stream._record(names, [args[0]], args[0].shape[-1])
                return func(*args, **(kwargs or {}))

        return Observe()

    def _record(self, names: list[str], xs: list[Any], cols: int) -> None:
        """Add the rows of ``xs`` to the statistics of ``names`` (weights that share one input)."""
        import torch

        cal = self.calibration
        gram = None
        if self.wanted.intersection(names):
            gram = next((cal.hessians[n] for n in names if n in cal.hessians), None)
            if gram is None:
                gram = torch.zeros(cols, cols)
                held = {id(h): h.numel() * 4 for h in cal.hessians.values()}
                self.peak_hessian_bytes = max(self.peak_hessian_bytes, sum(held.values()) + gram.numel() * 4)
            for n in names:
                if n in self.wanted:
                    cal.hessians[n] = gram
        for x in xs:
            x2 = x.reshape(-1, cols)
            if gram is not None and x2.dtype == torch.bfloat16 and (kernel := _gram_kernel()) is not None:
                kernel.gram_bf16(x2.contiguous(), gram)  # its upper triangle; ``_settle`` completes it
            elif gram is not None:  # its upper triangle, by blocks of rows; ``_settle`` completes it
                xf = x2.float()
                with _exact_bf16_products(x2.dtype == torch.bfloat16):
                    for i in range(0, cols, GRAM_BLOCK):
                        gram[i : i + GRAM_BLOCK, i:].addmm_(xf[:, i : i + GRAM_BLOCK].T, xf[:, i:])
            else:
                s = x2.double().square().sum(0)
                for n in names:
                    self._sums[n] = self._sums[n] + s if n in self._sums else s
            for n in names:
                self._seen[n] = self._seen.get(n, 0) + x2.shape[0]
        if gram is not None:
            self._grams.update(dict.fromkeys(names, gram))

    def _settle(self) -> None:
        """Once all their rows are in: each Σ xxᵀ made symmetric (its lower triangle from the upper), and Σ x²
        of the inputs that have one, its diagonal."""
        for gram in {id(g): g for g in self._grams.values()}.values():
            gram.triu_()
            gram += gram.triu(1).T
        for n, gram in self._grams.items():
            self._sums[n] = gram.diagonal().double()
        self._grams = {}

    def _load(self, names: list[str]) -> None:
        from llmctl.runtime.loader import assign

        for n in names:
            assign(self.model, n, self.read(n).to(self.dtype))

    def _unload(self, names: list[str]) -> None:
        import torch

        from llmctl.runtime.loader import assign

        for n in names:
            p = self.model.get_parameter(n)
            assign(self.model, n, torch.empty(p.shape, dtype=p.dtype, device="meta"))


def _child() -> None:
    """prefetch_windows' child: argv PATH DATA TOKENS CONTEXT; the windows as JSON on stdout."""
    import json
    import sys

    _, path, data, tokens, context = sys.argv
    json.dump(text_windows(path, data, int(tokens), int(context)), sys.stdout, separators=(",", ":"))
