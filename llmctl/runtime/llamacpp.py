"""The llama.cpp backend: a GGUF file run by llama-cpp-python behind the ``Backend`` interface.

llama.cpp keeps its own KV cache; as in ``Llama.generate``, a new prompt keeps the longest common prefix
with the tokens it holds (``llama_memory_seq_rm`` from there on) and only the rest is evaluated. If the
cache cannot drop that range (sliding-window caches past their window), it is cleared and the prompt
evaluated whole.

Sampling uses llama.cpp's own samplers, chained in the order and with the semantics of
``llmctl.runtime.sampler``: penalties → top-k → top-p → min-p → temperature → draw (``dist``, seeded), or
penalties → greedy at temperature 0. As in llama.cpp's CLI and server, the prompt's last
``repeat_last_n`` tokens are accepted into the penalty window before the first draw. llama.cpp's log
output is captured, never printed.

Models load without llama.cpp's CPU "extra" buffer types (AMX / repacked weights): on AMX-capable Xeons
under a VM (this project's machines) the AMX matmul kills the process with SIGSEGV at the first
multi-token decode. llama-cpp-python has no keyword for ``use_extra_bufts``, so the default model
parameters are wrapped while the model loads; and it never sees the file's chat templates, which it would
compile outside llmctl's sandbox (``llama_lib.load_guard``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llmctl.errors import FormatError, UsageError
from llmctl.runtime.backend import Backend, common_prefix
from llmctl.runtime.sampler import SamplingOptions

GPU_DEVICES = ("cuda", "gpu", "mps")  # --device values that ask llama.cpp to offload to its GPU backend


def gpu_layers(device: str | None, layers: int | None = None, *, offload: bool | None = None) -> int:
    """llama.cpp's ``n_gpu_layers`` for ``--device`` and ``--gpu-layers``.

    Without ``--gpu-layers``: -1 (every layer on the GPU) when this llama-cpp-python was built with GPU
    offload (``llama_supports_gpu_offload``: CUDA, Metal, Vulkan …) and the device is auto or a GPU, else 0
    (CPU). ``--gpu-layers N`` offloads the first N layers (-1: all, 0: none, as llama.cpp's ``-ngl``);
    N > 0 or -1 on a build without offload, with ``--device cpu``, or a GPU asked for by name on such a
    build, or a device llama.cpp cannot be pointed at, is a UsageError. ``offload`` overrides the build
    check (for tests of the rule itself)."""
    if offload is None:
        from llmctl.runtime.llama_lib import load

        offload = bool(load().llama_supports_gpu_offload())
    if layers is not None and (isinstance(layers, bool) or not isinstance(layers, int) or layers < -1):
        raise UsageError(f"--gpu-layers must be -1 (all), 0 (none) or a number of layers, got {layers!r}")
    if device not in (None, "auto", "cpu", *GPU_DEVICES):
        raise UsageError(
            f"--device {device}: the llama.cpp backend takes auto, cpu or {', '.join(GPU_DEVICES)} "
            "(choose the GPU with CUDA_VISIBLE_DEVICES); or use --backend torch"
        )
    if device == "cpu":
        if layers:
            raise UsageError(f"--gpu-layers {layers} offloads to a GPU and --device cpu keeps every layer on the CPU; drop one")
        return 0
    if not offload:
        if device in GPU_DEVICES:
            raise UsageError(
                f"--device {device}: the llama.cpp backend runs on the CPU here (this llama-cpp-python was built "
                "without GPU offload); drop --device, reinstall llama-cpp-python with CUDA "
                "(CMAKE_ARGS=-DGGML_CUDA=on), or use --backend torch"
            )
        if layers:
            raise UsageError(
                f"--gpu-layers {layers}: this llama-cpp-python was built without GPU offload, so every layer runs "
                "on the CPU; drop --gpu-layers or reinstall llama-cpp-python with CUDA (CMAKE_ARGS=-DGGML_CUDA=on)"
            )
        return 0
    return -1 if layers is None else layers


def offload_text(n_gpu_layers: int) -> str:
    if n_gpu_layers == 0:
        return "cpu"
    return "gpu (all layers offloaded)" if n_gpu_layers < 0 else f"gpu ({n_gpu_layers} layers offloaded, the rest on the cpu)"


class LlamaCppBackend(Backend):
    name = "llama.cpp"

    def __init__(
        self,
        path: str | Path,
        n_ctx: int,
        *,
        threads: int | None = None,
        n_batch: int = 512,
        device: str | None = None,
        gpu_layers_: int | None = None,
    ) -> None:
        from llmctl.runtime.llama_lib import captured_native_output, load, load_guard, log_detail
        from llmctl.runtime.tokenizer import load_tokenizer

        llama_cpp = load()

        n_gpu_layers = gpu_layers(device, gpu_layers_)
        path = Path(path)
        self.tokenizer = load_tokenizer(path)  # validates the GGUF before llama.cpp parses it
        self.n_ctx = n_ctx
        self.threads = threads
        self.n_gpu_layers = n_gpu_layers
        self._lib = llama_cpp
        kwargs: dict[str, Any] = dict(
            model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_gpu_layers=n_gpu_layers, verbose=False
        )
        threads = threads or os.cpu_count() or 1  # llama-cpp-python's own default is half the cores
        kwargs.update(n_threads=threads, n_threads_batch=threads)
        with captured_native_output() as log, load_guard():
            try:
                self.llm = llama_cpp.Llama(**kwargs)
            except (ValueError, RuntimeError, OSError) as e:
                err: Exception | None = e
            else:
                err = None
        if err is not None:
            self.tokenizer.close()
            raise FormatError(f"{path}: llama.cpp cannot load the model ({log_detail(log.text) or err})")
        self.n_vocab = self.llm.n_vocab()

    @property
    def tokens(self) -> list[int]:
        return [int(t) for t in self.llm.input_ids[: self.llm.n_tokens]]

    def describe(self) -> str:
        return f"llama.cpp, {offload_text(self.n_gpu_layers)} (threads: {self.llm.n_threads})"

    def last_logits(self) -> Any:
        """The last evaluated position's logits, which the sampler read (llama.cpp keeps them until the next
        ``eval``)."""
        import numpy as np

        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def reset(self) -> None:
        L = self._lib
        L.llama_memory_clear(L.llama_get_memory(self.llm.ctx), True)
        self.llm.n_tokens = 0

    def _keep(self, prompt: Sequence[int]) -> int:
        L = self._lib
        n = min(common_prefix(self.tokens, prompt), len(prompt) - 1)
        if not L.llama_memory_seq_rm(L.llama_get_memory(self.llm.ctx), -1, n, -1):
            self.reset()
            n = 0
        self.llm.n_tokens = n
        return n

    def _sampler(self, options: SamplingOptions, seed: int) -> Any:
        L, o = self._lib, options
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        last_n = self.n_ctx if o.repeat_last_n < 0 else o.repeat_last_n
        for s in (
            L.llama_sampler_init_penalties(
                self.n_vocab, last_n, o.repeat_penalty, o.frequency_penalty, o.presence_penalty
            ),
            *(
                [L.llama_sampler_init_greedy()]
                if o.greedy
                else [
                    L.llama_sampler_init_top_k(o.top_k),
                    L.llama_sampler_init_top_p(o.top_p, 1),
                    L.llama_sampler_init_min_p(o.min_p, 1),
                    L.llama_sampler_init_temp(o.temperature),
                    L.llama_sampler_init_dist(seed),
                ]
            ),
        ):
            L.llama_sampler_chain_add(chain, s)  # the chain owns (and frees) its samplers
        return chain

    def generate(self, prompt: Sequence[int], options: SamplingOptions, seed: int) -> Iterator[int]:
        L, llm = self._lib, self.llm
        self.check_prompt(prompt)
        prompt = [int(t) for t in prompt]
        n = self._keep(prompt)
        self.prefilled = len(prompt) - n
        llm.eval(prompt[n:])
        chain = self._sampler(options, seed)
        try:
            last_n = len(prompt) if options.repeat_last_n < 0 else options.repeat_last_n
            for t in prompt[len(prompt) - last_n :] if last_n else ():
                L.llama_sampler_accept(chain, t)
            while True:
                token = int(L.llama_sampler_sample(chain, llm.ctx, -1))  # also accepts it
                yield token
                if llm.n_tokens + 1 > self.n_ctx:
                    return
                llm.eval([token])
        finally:
            L.llama_sampler_free(chain)

    def close(self) -> None:
        from llmctl.runtime.llama_lib import captured_native_output

        with captured_native_output():
            self.llm.close()
        super().close()
