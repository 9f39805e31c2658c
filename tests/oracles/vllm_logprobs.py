"""Prompt log-probabilities from vLLM (CPU build), for tests/test_vllm_oracle.py.

Run with the python of the venv that scripts/vllm-venv.sh makes; llmctl's venv never imports it:

    $VLLM_PYTHON tests/oracles/vllm_logprobs.py SPEC.json   # or the spec on stdin

SPEC: a list of ``{"folder": PATH, "token_ids": [[int, ...], ...], "int4_kernel": "auto"}``. Every folder is
loaded in this one process, one after the other, in bf16. Prints one JSON object on stdout (vLLM's own
logging goes to stderr):

    {"native_int4": bool, "results": [{"folder", "int4_kernel", "seconds",
                                       "logprobs": [[float, ...], ...]  or  "error": TEXT}, ...]}

``logprobs``: per sequence, the log-probability of each token after the first, given the tokens before it.
``error``: the exception vLLM raised when it refused the folder (with the exceptions it wraps).

``int4_kernel``: vLLM's CPU int4 kernel (``cpu_gemm_wna16``) exists only in its AVX-512 builds of ``_C``; on
an AVX2-only CPU the folder loads and the first forward pass fails. ``native_int4`` says whether this CPU has
it. ``"native"`` always runs vLLM's kernel; ``"emulated"`` replaces that kernel's two methods (and nothing
else: the config parsing, the scheme and kernel choice, the parameter shapes, the loading of q/k/v and
gate/up into vLLM's fused layers stay vLLM's) by a dequantization with vLLM's own unpacking helper and a
float32 matmul; ``"auto"`` emulates on every CPU: vLLM's native kernel (AVX-512 builds) computes in bf16
and put SmolLM2's NLL 1–3 % from llmctl's reading of the same files (2026-12-04, a Xeon with AVX-512), beyond
the agreement tolerances, so the agreement tests read what the file means and ``"native"`` is asked for by
name (``test_vllm_int4_kernel_on_this_cpu``).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback


def _error_text(e: BaseException | None) -> str:
    """The exception and those it wraps, outermost first: vLLM often wraps the reason it refused a model."""
    parts, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return " <- ".join(parts)


class _Int4Emulation:
    """Swaps CPUWNA16LinearKernel's weight processing and matmul for a dequantize-then-matmul in torch."""

    def __init__(self) -> None:
        from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel

        self.cls = CPUWNA16LinearKernel
        self.native = (CPUWNA16LinearKernel.process_weights_after_loading, CPUWNA16LinearKernel.apply_weights)

    def set(self, on: bool) -> None:
        process, apply = (_emulated_process, _emulated_apply) if on else self.native
        self.cls.process_weights_after_loading = process
        self.cls.apply_weights = apply


def _emulated_process(self, layer) -> None:
    import torch
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32

    w_q, w_s, w_zp = self._get_weight_params(layer)
    # compressed-tensors layout as vLLM loaded it: codes (out, in / 8) int32 packed along the input,
    # scales (out, groups), zero-points (out / 8, groups) packed along the output
    codes = unpack_quantized_values_into_int32(w_q.data, self.config.weight_type, w_q.packed_dim)  # (out, in)
    if self.config.zero_points:
        zp = unpack_quantized_values_into_int32(w_zp.data, self.config.weight_type, w_zp.packed_dim)
        offset = zp[: codes.shape[0]]  # (out, groups)
    else:  # symmetric: the type's bias (uint4b8: stored = value + 8)
        offset = torch.full_like(w_s.data, self.config.weight_type.bias, dtype=torch.int32)
    group = codes.shape[1] // w_s.shape[1]
    values = codes - offset.repeat_interleave(group, dim=1)  # (out, in)
    layer.emulated_weight = values.float() * w_s.data.float().repeat_interleave(group, dim=1)
    for name in (self.w_q_name, self.w_s_name, self.w_zp_name):
        if name and getattr(layer, name, None) is not None:
            getattr(layer, name).data = torch.empty(0)


def _emulated_apply(self, layer, x, bias=None):
    import torch

    out = torch.nn.functional.linear(x.float(), layer.emulated_weight, None if bias is None else bias.float())
    return out.to(x.dtype)


def _native_int4() -> bool:
    import torch
    import vllm._custom_ops  # noqa: F401  (loads the _C library of this CPU's ISA)

    return hasattr(torch.ops._C, "cpu_gemm_wna16")


def _prompt_logprobs(llm, token_ids: list[list[int]]) -> list[list[float]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params, use_tqdm=False)
    result = []
    for ids, out in zip(token_ids, outs, strict=True):
        # prompt_logprobs[0] is None (no context); position i holds {token: Logprob} with the prompt's token
        result.append(
            [float(pos[tok].logprob) for tok, pos in zip(ids[1:], out.prompt_logprobs[1:], strict=True)]
        )
    return result


def run(spec: list[dict]) -> dict:
    from vllm import LLM

    native = _native_int4()
    emulation = _Int4Emulation()
    longest = max((len(ids) for item in spec for ids in item["token_ids"]), default=1)
    results = []
    for item in spec:
        folder, token_ids = item["folder"], item["token_ids"]
        kernel = item.get("int4_kernel", "auto")
        if kernel == "auto":  # the file's meaning: vLLM's loading, the stand-in's float32 matmul, on every CPU
            kernel = "emulated"
        emulation.set(kernel == "emulated")
        result: dict = {"folder": folder, "int4_kernel": kernel}
        t0 = time.perf_counter()
        llm = None
        try:
            llm = LLM(
                model=folder,
                dtype="bfloat16",
                enforce_eager=True,
                max_model_len=max(64, longest + 8),
                max_num_seqs=max(1, len(token_ids)),
                enable_prefix_caching=False,
                skip_tokenizer_init=True,  # prompts are token ids; the tiny test models have no tokenizer
                seed=0,
            )
            result["logprobs"] = _prompt_logprobs(llm, token_ids)
        except Exception as e:  # the refusal is the result; its traceback goes to stderr for a reader
            traceback.print_exc(file=sys.stderr)
            result["error"] = _error_text(e)
        result["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(result)
        del llm
        gc.collect()
    return {"native_int4": native, "results": results}


if __name__ == "__main__":
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    # the engine in this process: a refusal raises here with its own text, and one LLM is freed before the next
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raw = open(sys.argv[1]).read() if len(sys.argv) > 1 and sys.argv[1] != "-" else sys.stdin.read()
    # vLLM logs to stdout: keep the real stdout for the JSON and send everything else to stderr
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    out.write(json.dumps(run(json.loads(raw))) + "\n")
    out.close()
