"""Tiny random Hugging Face models of every family the torch runtime runs, saved as safetensors folders.

Each is built with transformers from a small config and a fixed seed (no network), with weights drawn
wide enough (norm weights included) that logits are far from uniform. Built once per test session.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

# Tests press Ctrl-C in llmctl (SIGINT). A test run started in the background (`cmd &`, nohup) inherits
# SIGINT ignored, and so would every llmctl it starts (Python then never raises KeyboardInterrupt): give
# this process a handler, which its children's exec turns back into the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

SEQ = 24  # test sequence length; sliding windows below are 8, so tests run past the window
WINDOW = 8

_COMMON = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.3,
)


# Gemma 3: local/global layers with their own RoPE bases, linear scaling on global layers, sandwich
# norms, (1 + w) norms, embedding scale, GELU-tanh, query_pre_attn_scalar, final logit soft-capping.
_GEMMA = dict(
    _COMMON,
    num_hidden_layers=3,
    head_dim=16,
    sliding_window=WINDOW,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"],
    query_pre_attn_scalar=24,
    final_logit_softcapping=30.0,
    rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
)


def _configs() -> dict:
    import transformers as T

    llama3_rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    return {
        # Llama 3.1: GQA, llama3 RoPE scaling.
        "llama": (T.LlamaForCausalLM, T.LlamaConfig(**_COMMON, rope_parameters=llama3_rope)),
        # SmolLM2: Llama with tied embeddings and plain RoPE.
        "smollm2": (T.LlamaForCausalLM, T.LlamaConfig(**_COMMON, tie_word_embeddings=True)),
        "mistral": (T.MistralForCausalLM, T.MistralConfig(**_COMMON, sliding_window=WINDOW)),
        # Qwen2: q/k/v bias, tied embeddings.
        "qwen2": (T.Qwen2ForCausalLM, T.Qwen2Config(**_COMMON, tie_word_embeddings=True)),
        # Qwen3: q/k RMSNorm per head, head_dim decoupled from hidden_size / heads.
        "qwen3": (T.Qwen3ForCausalLM, T.Qwen3Config(**_COMMON, head_dim=24)),
        "gemma3": (T.Gemma3ForCausalLM, T.Gemma3TextConfig(**_GEMMA)),
        # Untied Gemma 3: tied random Gemma models greedily repeat one token, this one does not.
        "gemma3_untied": (T.Gemma3ForCausalLM, T.Gemma3TextConfig(**_GEMMA, tie_word_embeddings=False)),
    }


FAMILIES = ["llama", "smollm2", "mistral", "qwen2", "qwen3", "gemma3", "gemma3_untied"]


def build_hf_model(family: str, seed: int = 0):
    import torch

    cls, config = _configs()[family]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # exercise the norm weights (Gemma's are offsets around 0)
                p.copy_(torch.randn_like(p) * 0.2 + (0.0 if family.startswith("gemma3") else 1.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def char_tokenizer(folder: Path) -> None:
    """tokenizer.json: one token per printable ASCII character (ids 1..95), BOS 0; the tiny models' vocab is 96."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {"<s>": 0, **{chr(32 + i): 1 + i for i in range(95)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=" "))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.add_special_tokens(["<s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "add_bos_token": True}))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """family -> (saved safetensors folder, the transformers model in fp32)."""
    out = {}
    for family in FAMILIES:
        model = build_hf_model(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder, safe_serialization=True)
        out[family] = (folder, model)
    return out


@pytest.fixture(scope="session")
def loaded(tiny_models) -> dict[str, object]:
    """family -> the same model loaded by llmctl (fp32, CPU)."""
    from llmctl.runtime.loader import load_model

    return {family: load_model(folder) for family, (folder, _) in tiny_models.items()}


@pytest.fixture(scope="session")
def tokens():
    """A (2, SEQ) batch of token ids."""
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, _COMMON["vocab_size"], (2, SEQ), generator=g)


# ---- the bundled real models (scripts/install.sh installs them: missing is a failure, not a skip) -----
def _bundled(name: str) -> Path:
    from llmctl.sources import BUNDLED, bundled_path

    path = bundled_path(BUNDLED[name])
    if path is None:
        pytest.fail(f"bundled model {name} is not installed: {BUNDLED[name].install_hint}")
    return path


def smollm2_path() -> Path:
    return _bundled("smollm2-135m")


def gemma3_path() -> Path:
    return _bundled("gemma3-270m")


# ---- the command line's promise for bad input -------------------------------------------------------
def one_error_line(p, message: str, *, notices: bool = False) -> str:
    """Exit 2, no traceback, one ``error:`` line naming ``message``; ``notices``: chat's own status lines
    (backend, template) may come before it, nothing after it."""
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr
    assert notices or len(lines) == 1, p.stderr
    assert message in errors[0], errors[0]
    return errors[0]


class ServerProcess:
    """An ``llmctl serve`` process started with ``argv`` (``--port 0``): waits, up to ``timeout`` s, for the
    line naming its URL on stderr (kept in ``log``); ``url`` ends in /v1, ``base`` is the server's root."""

    def __init__(self, tmp: Path, argv: list[str], *, timeout: float = 120, **popen) -> None:
        import re
        import subprocess
        import time

        self.log = tmp / "server.log"
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self.log.open("w"), **popen)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(r"at (http://\S+/v1) ", self.log.read_text())
            if m:
                self.url = m.group(1)
                self.base = self.url.removesuffix("/v1")
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"the server did not start:\n{self.log.read_text()[-3000:]}")

    def stop(self, wait: float = 15) -> None:
        import subprocess

        self.proc.terminate()
        try:
            self.proc.wait(wait)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
