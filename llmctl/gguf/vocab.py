"""The tokenizer in GGUF metadata (``tokenizer.ggml.*``), as llama.cpp reads it: written from a Hugging Face
tokenizer.json as llama.cpp's converter (convert_hf_to_gguf.py) writes it, and checked before llama.cpp
loads it.

**Writing** (from ``tokenizer.json``; special ids, add_bos/add_eos, merges and chat template through
gguf-py's ``SpecialVocab``, which reads tokenizer.json, tokenizer_config.json, config.json and
chat_template.jinja):

- byte-level BPE → ``tokenizer.ggml.model = "gpt2"``: tokens, token types, merges, and
  ``tokenizer.ggml.pre``, llama.cpp's name for the pre-tokenizer, read off tokenizer.json's
  ``pre_tokenizer`` (see ``PRE_TOKENIZERS``); one llmctl does not know is refused rather than guessed;
- SentencePiece-style BPE (byte fallback, "▁" for spaces) → ``"llama"``: tokens, token types and
  scores. tokenizer.json has merges, not SentencePiece scores; llama.cpp's SPM tokenizer merges the
  adjacent pair whose *result* scores highest, so each token gets minus the rank of the first merge
  that makes it (the order the merges apply in), added tokens −1000 and byte tokens 0 as the converter
  gives them.

**Checking** (``check_vocabulary``): what llama.cpp's ``llama-vocab.cpp`` would abort on is refused in one line.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmctl.errors import FormatError, UsageError

if TYPE_CHECKING:
    from llmctl.gguf.reader import GGUFInfo

ADDED_TOKEN_SCORE = -1000.0  # the converter's score for added (control / user-defined) tokens

# tokenizer.json pre-tokenizers → llama.cpp's pre-tokenizer name (tokenizer.ggml.pre). A byte-level BPE's
# pre-tokenizer is a ByteLevel step, alone (GPT-2's split) or after a Digits or regex Split step; these are
# the Split patterns of the published tokenizers (Llama 3, Qwen2, Mistral's Tekken) and the names llama.cpp
# gives them. tests/test_quant_gguf_hf.py checks each against transformers' GGUF table and llama.cpp.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("ByteLevel(regex)",): "gpt-2",
    ("Digits(individual)", "ByteLevel(regex)"): "smollm",  # llama.cpp: \p{N} split, then GPT-2's
    ("Split(" + _LLAMA3_SPLIT + ")", "ByteLevel"): "llama-bpe",
    ("Split(" + _QWEN2_SPLIT + ")", "ByteLevel"): "qwen2",
    ("Split(" + _TEKKEN_SPLIT + ")", "ByteLevel"): "tekken",
}


# ---- writing -----------------------------------------------------------------------------------------
def read_tokenizer(folder: Path) -> dict[str, Any]:
    """The folder's tokenizer.json, refused unless llmctl can write it as a GGUF tokenizer."""
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UsageError(
            f"{folder / 'tokenizer.json'}: a {model.get('type')!r} tokenizer; llmctl writes GGUF tokenizers "
            "for BPE models (byte-level or SentencePiece-style)"
        )
    if not model.get("byte_fallback"):
        pre_tokenizer_name(tok, folder / "tokenizer.json")
    return tok


def add_tokenizer(writer: Any, folder: Path, tok: dict[str, Any], n_vocab: int) -> None:
    """tokenizer.ggml.* and the chat template from the folder's tokenizer files (see module doc)."""
    import gguf

    model = tok["model"]
    tokens, types = _vocab(tok, n_vocab, folder)
    quiet = logging.getLogger("gguf.vocab")  # library code never prints: gguf-py warns through logging
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(folder, load_merges=not model.get("byte_fallback"), n_vocab=n_vocab)
    finally:
        quiet.setLevel(level)
    for key in ("bos", "eos"):  # a tokenizer.json that adds no such token: say so, not llama.cpp's default
        special.add_special_token.setdefault(key, False)
    if model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_spm_scores(tokens, types, _merges(model)))  # it ranks by scores, not merges
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(tok))
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(tok, folder / "tokenizer.json"))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(tok))
    special.add_to_gguf(writer, quiet=True)


def _vocab(tok: dict[str, Any], n_vocab: int, folder: Path) -> tuple[list[str], list[int]]:
    """Tokens by id (padded with ``[PAD{i}]`` up to the embedding's rows, as the converter does) and their
    llama.cpp token types."""
    import gguf

    T = gguf.TokenType
    by_id: dict[int, str] = {int(i): t for t, i in tok["model"]["vocab"].items()}
    added = {int(a["id"]): a for a in tok.get("added_tokens") or []}
    by_id.update((i, a["content"]) for i, a in added.items())
    if by_id and max(by_id) >= n_vocab:
        raise UsageError(
            f"{folder / 'tokenizer.json'}: token id {max(by_id)} is past the embedding's {n_vocab} rows; "
            "the tokenizer does not belong to these weights"
        )
    unk = tok["model"].get("unk_token")
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(T.CONTROL if added[i].get("special") else T.USER_DEFINED)
        else:
            tokens.append(t)
            byte = tok["model"].get("byte_fallback") and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t)
            types.append(T.BYTE if byte else T.UNKNOWN if t == unk else T.NORMAL)
    return tokens, [int(t) for t in types]


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    """tokenizer.json's merges, "a b" strings or [a, b] pairs, as pairs."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges") or []]


def _spm_scores(tokens: list[str], types: list[int], merges: list[tuple[str, str]]) -> list[float]:
    """SentencePiece-style scores from BPE merges: minus the rank of the first merge that makes a token
    (normal tokens no merge makes rank after every merge); added tokens −1000, bytes 0."""
    import gguf

    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    last = float(len(merges))
    scores = []
    for t, kind in zip(tokens, types, strict=True):
        if kind in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.UNUSED):
            scores.append(ADDED_TOKEN_SCORE)
        elif kind in (gguf.TokenType.BYTE, gguf.TokenType.UNKNOWN):
            scores.append(0.0)
        else:
            scores.append(-float(first.get(t, last)))
    return scores


def _adds_space_prefix(tok: dict[str, Any]) -> bool:
    """Whether the tokenizer puts a space before the text: a "▁" Prepend normalizer, a Metaspace that
    prepends, or a ByteLevel step with add_prefix_space."""

    def steps(node: Any, key: str) -> list[dict[str, Any]]:
        if not isinstance(node, dict):
            return []
        return (
            [s for sub in node.get(key, []) for s in steps(sub, key)]
            if node.get("type") == "Sequence"
            else [node]
        )

    norm = steps(tok.get("normalizer"), "normalizers")
    pre = steps(tok.get("pre_tokenizer"), "pretokenizers")
    return any(s.get("type") == "Prepend" for s in norm) or any(
        (s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never")
        or (s.get("type") == "ByteLevel" and s.get("add_prefix_space"))
        for s in pre
    )


def pre_tokenizer_name(tok: dict[str, Any], folder: Path | str = "tokenizer.json") -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json, from its pre_tokenizer."""
    node = tok.get("pre_tokenizer") or {}
    steps = node.get("pretokenizers", []) if node.get("type") == "Sequence" else [node]
    key = tuple(_step(s) for s in steps)
    if key not in PRE_TOKENIZERS:
        raise UsageError(
            f"{folder}: llmctl does not know llama.cpp's name for this pre-tokenizer ({' + '.join(key) or 'none'}); "
            "convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    return PRE_TOKENIZERS[key]


def _step(s: dict[str, Any]) -> str:
    kind = s.get("type", "?")
    if kind == "ByteLevel":
        return "ByteLevel(regex)" if s.get("use_regex", True) else "ByteLevel"
    if kind == "Digits":
        return "Digits(individual)" if s.get("individual_digits") else "Digits"
    if kind == "Split" and s.get("behavior") == "Isolated" and not s.get("invert"):
        return f"Split({(s.get('pattern') or {}).get('Regex')})"
    return kind


# ---- checking, as llama.cpp's loader needs it ----------------------------------------------------------
TOKENIZER_MODELS = ("llama", "gpt2")  # SentencePiece and byte-level BPE: what every family llmctl runs uses


def check_vocabulary(info: GGUFInfo) -> None:
    """Refuse tokenizer metadata that llama.cpp would abort on (``llama-vocab.cpp``): llama.cpp reports some
    problems as errors, but asserts on others and kills the process with no message.

    * ``tokenizer.ggml.model`` must be one of ``TOKENIZER_MODELS`` (WordPiece, Unigram and RWKV vocabularies
      have their own aborts, e.g. a BYTE-type token in a WordPiece vocabulary);
    * ``tokenizer.ggml.tokens`` must be unique as llama.cpp reads them: cut at the first NUL byte, an empty
      token renamed ``[EMPTY_<id>]`` (``GGML_ASSERT(id_to_token.size() == token_to_id.size())``);
    * ``scores`` and ``token_type`` have an entry per token, ``merges`` are strings;
    * the BOS and EOS ids lie inside the vocabulary;
    * a SentencePiece vocabulary spells every byte (``<0x00>`` … ``<0xFF>``): llama.cpp throws an uncaught
      exception, and aborts, when it tokenizes a character it cannot spell otherwise.
    """
    meta = info.metadata

    def fail(
        what: str, fix: str = "the file is corrupt — re-download it or convert the model again"
    ) -> FormatError:
        return FormatError(f"{info.path}: {what}; {fix}")

    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise fail("tokenizer.ggml.tokens is not an array of strings")
    n = len(tokens)
    if n == 0:
        raise fail("tokenizer.ggml.tokens is empty")
    model = meta.get("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise fail(
            f"tokenizer.ggml.model is {model!r}, not a tokenizer of the model families llmctl runs "
            f"({', '.join(TOKENIZER_MODELS)})",
            "use a GGUF of a Llama, Mistral, Qwen or Gemma model",
        )
    words = set(tokens)
    if len(words) < n or "" in words or "\0" in "".join(tokens):  # the slow path, as llama.cpp reads them
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            word = t.partition("\0")[0] or f"[EMPTY_{i}]"
            if word in seen:
                raise fail(f"tokenizer.ggml.tokens holds {word!r:.60} twice (ids {seen[word]} and {i})")
            seen[word] = i
    for key, kind in (("scores", (int, float)), ("token_type", int)):
        values = meta.get(f"tokenizer.ggml.{key}")
        if values is None:
            continue
        if not isinstance(values, list) or not all(isinstance(v, kind) for v in values):
            raise fail(f"tokenizer.ggml.{key} is not an array of numbers")
        if len(values) < n:
            raise fail(f"tokenizer.ggml.{key} has {len(values)} entries for {n} tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and (not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
        raise fail("tokenizer.ggml.merges is not an array of strings")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        v = meta.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < n):
            raise fail(f"{key} is {v!r}, outside the vocabulary of {n} tokens")
    if model == "llama":
        missing = [
            b for b in range(256) if f"<0x{b:02X}>" not in words and not (0 < b < 128 and chr(b) in words)
        ]
        if missing:
            raise fail(
                f"the SentencePiece vocabulary lacks the byte token <0x{missing[0]:02X}> "
                f"({len(missing)} of 256 missing)"
            )
