"""One tokenizer interface over two implementations.

* ``HFTokenizer``: a Hugging Face folder's ``tokenizer.json`` (the ``tokenizers`` library) with
  ``tokenizer_config.json``, ``config.json``/``generation_config.json`` for special ids and the chat template
  (``tokenizer_config.json``'s ``chat_template`` or ``chat_template.jinja``).
* ``GGUFTokenizer``: llama.cpp's own tokenizer through llama-cpp-python, loaded with ``vocab_only=True``
  (no weights), after ``read_gguf`` and ``check_vocabulary`` have validated the file and a forked child has
  loaded it once (where llama.cpp aborts, only the child dies). Its log chatter is captured, never printed
  (those helpers: ``runtime/llama_lib``, the one module that imports llama-cpp-python).

Both give token ids identical to transformers' ``AutoTokenizer`` (tests/test_tokenizer.py).

Conventions:

* ``encode(text, add_bos)`` parses special tokens written in the text (``<|im_start|>`` becomes one id, as in
  transformers) and adds nothing but the BOS token: ``add_bos=None`` follows the model (``add_bos_default``:
  tokenizer_config's ``add_bos_token``, else whether the post-processor prepends BOS; GGUF:
  ``tokenizer.ggml.add_bos_token``).
* ``decode(ids)`` renders special tokens as text unless ``skip_special=True``.
* ``eos_ids`` is every id that ends a turn: EOS plus end-of-turn tokens (``<|im_end|>``, ``<end_of_turn>``,
  ``<|eot_id|>``, ...) the model has; generation stops on any of them.
* ``StreamDecoder`` turns ids into text pieces for streaming; the pieces concatenate to ``decode(ids)``
  and never split a UTF-8 character.
"""

from __future__ import annotations

import abc
import json
import operator
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from llmctl.errors import FormatError, SourceError, UsageError

# End-of-turn token texts across families; each counts as EOS when the model has it as a special token.
END_OF_TURN_TOKENS = (
    "<|im_end|>",  # ChatML: SmolLM, Qwen
    "<end_of_turn>",  # Gemma
    "<|eot_id|>",  # Llama 3
    "<|eom_id|>",  # Llama 3.1 tool calls
    "<|end|>",  # Phi 3
    "<|endoftext|>",
    "<|end_of_text|>",
    "</s>",
)


class Tokenizer(abc.ABC):
    """The interface. Subclasses implement ``_encode`` (no BOS added), ``decode`` and ``special_tokens``
    and set the attributes below."""

    source: str = ""
    bos_id: int | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    eos_ids: frozenset[int] = frozenset()
    vocab_size: int = 0
    chat_template: str | None = None
    add_bos_default: bool = False

    # ---- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with special tokens parsed and nothing added."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of ``ids``; special tokens are rendered unless ``skip_special``."""

    @property
    @abc.abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Control tokens (text -> id): BOS/EOS/PAD, chat markers and the like."""

    # ---- shared -------------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens in the text are parsed. ``add_bos=None``: the model's
        default (``add_bos_default``)."""
        if not isinstance(text, str):
            raise UsageError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._encode(text)
        if add_bos is None:
            add_bos = self.add_bos_default
        if add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The conversation rendered with the model's chat template (the ChatML fallback if it has none)."""
        return self._chat_template_obj.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Render and encode a conversation. BOS is prepended when the model adds one by default and the
        template did not already write it (templates such as Gemma's start with ``{{ bos_token }}``)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        has_bos = bool(self.bos_token) and text.startswith(self.bos_token or "")
        return self.encode(text, add_bos=self.add_bos_default and not has_bos)

    @cached_property
    def _chat_template_obj(self):
        from llmctl.runtime.chat_template import ChatTemplate

        return ChatTemplate(self.chat_template)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        """Plain ints inside the vocabulary (numpy and torch integers accepted): llama.cpp would read
        out of bounds otherwise."""
        out = []
        for i in ids:
            try:
                j = operator.index(i)
            except TypeError:
                raise UsageError(f"token ids must be integers, got {type(i).__name__}") from None
            if not 0 <= j < self.vocab_size:
                raise UsageError(f"token id {j} is outside the vocabulary (0..{self.vocab_size - 1})")
            out.append(j)
        return out

    def close(self) -> None:
        """Free native resources (llama.cpp; subclasses extend this) and the compiled chat template."""
        self.__dict__.pop("_chat_template_obj", None)


class StreamDecoder:
    """Incremental detokenization: ``push(id)`` returns the new text ('' while a character or a merge is
    incomplete), ``flush()`` what is left. The pieces concatenate to ``tokenizer.decode(ids)``.

    It decodes a short window of recent ids twice, with and without the new one, and emits the difference
    once it does not end in U+FFFD (a partial UTF-8 sequence): the window keeps context such as
    SentencePiece's leading-space rule, and the cost per token stays constant.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # ids before this are emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special=self.skip_special)
        now = decode(self.ids[self._prefix :], skip_special=self.skip_special)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """The text of ids still held back (a trailing partial character decodes as U+FFFD)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special=self.skip_special)
        now = decode(self.ids[self._prefix :], skip_special=self.skip_special)
        self._prefix = self._read = len(self.ids)
        return now[len(before) :]

    def feed(self, ids: Iterable[int]) -> Iterator[str]:
        """Yield the non-empty pieces for ``ids``, then the flushed rest."""
        for i in ids:
            piece = self.push(i)
            if piece:
                yield piece
        rest = self.flush()
        if rest:
            yield rest


# ---- Hugging Face folder -------------------------------------------------------------------------
class HFTokenizer(Tokenizer):
    """``tokenizer.json`` + ``tokenizer_config.json`` (+ ``config.json``, ``generation_config.json``)."""

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        folder = Path(folder)
        self.source = str(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise SourceError(
                f"{folder}: no tokenizer.json; llmctl reads fast-tokenizer files (save the tokenizer with "
                "transformers' save_pretrained to create one)"
            )
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exception for malformed files
            raise FormatError(
                f"{path}: cannot load ({e}); the file is corrupt or from a newer tokenizers"
            ) from None
        cfg = _read_json(folder / "tokenizer_config.json")
        model_cfg = _read_json(folder / "config.json")
        gen_cfg = _read_json(folder / "generation_config.json")
        self._config = cfg
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._specials = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

        self.bos_token = _token_text(cfg.get("bos_token"))
        self.bos_id = self._id(self.bos_token)
        if self.bos_id is None and isinstance(model_cfg.get("bos_token_id"), int):
            self.bos_id = model_cfg["bos_token_id"]
            self.bos_token = self._tok.id_to_token(self.bos_id)
        self.eos_token = _token_text(cfg.get("eos_token"))
        eos: set[int] = set()
        if self._id(self.eos_token) is not None:
            eos.add(self._id(self.eos_token))  # type: ignore[arg-type]
        for c in (model_cfg, gen_cfg):
            v = c.get("eos_token_id")
            eos.update(x for x in (v if isinstance(v, list) else [v]) if isinstance(x, int))
        eos.update(self._specials[t] for t in END_OF_TURN_TOKENS if t in self._specials)
        self.eos_ids = frozenset(i for i in eos if 0 <= i < self.vocab_size)
        if self.eos_token is None and self.eos_ids:
            self.eos_token = self._tok.id_to_token(min(self.eos_ids))

        add_bos = cfg.get("add_bos_token")
        if isinstance(add_bos, bool):
            self.add_bos_default = add_bos
        else:  # does tokenizer.json's post-processor prepend BOS?
            with_specials = self._tok.encode("a", add_special_tokens=True).ids
            self.add_bos_default = (
                self.bos_id is not None
                and with_specials[:1] == [self.bos_id]
                and len(with_specials) > len(self._tok.encode("a", add_special_tokens=False).ids)
            )
        self._cleanup = cfg.get("clean_up_tokenization_spaces") is True
        self.chat_template = _hf_chat_template(folder, cfg)

    def _id(self, text: str | None) -> int | None:
        return None if text is None else self._tok.token_to_id(text)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    def _encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        text = self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special)
        return _clean_up_spaces(text) if self._cleanup else text


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: cannot read as JSON ({e}); fix or re-download it") from None
    return d if isinstance(d, dict) else {}


def _token_text(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping) and isinstance(v.get("content"), str):  # serialized AddedToken
        return v["content"]
    return None


def chat_template_of(path: str | Path) -> str | None:
    """The chat template a model file or folder carries (GGUF metadata, or the folder's
    tokenizer_config.json / chat_template.jinja / chat_template.json), without loading its tokenizer."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        from llmctl.gguf.reader import read_gguf

        t = read_gguf(path).metadata.get("tokenizer.chat_template")
    else:
        folder = path if path.is_dir() else path.parent  # a bare config.json: its folder's files
        t = _hf_chat_template(folder, _read_json(folder / "tokenizer_config.json"))
    return t if isinstance(t, str) and t.strip() else None


def _hf_chat_template(folder: Path, cfg: Mapping[str, Any]) -> str | None:
    t = cfg.get("chat_template")
    if isinstance(t, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, Mapping)}
        t = named.get("default", next(iter(named.values()), None))
    if isinstance(t, str):
        return t
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = _read_json(folder / "chat_template.json").get("chat_template")
    return t if isinstance(t, str) else None


def _clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop spaces before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(a, b)
    return text


# ---- GGUF through llama.cpp ----------------------------------------------------------------------
class GGUFTokenizer(Tokenizer):
    """llama.cpp's tokenizer for a GGUF file (llama-cpp-python, ``vocab_only=True``: no weights loaded)."""

    def __init__(self, path: str | Path) -> None:
        from llmctl.gguf.reader import read_gguf
        from llmctl.gguf.vocab import check_vocabulary
        from llmctl.runtime.llama_lib import (
            captured_native_output,
            close_quietly,
            load,
            load_guard,
            log_detail,
            probe_vocabulary,
        )

        llama_cpp = load()

        path = Path(path)
        self.source = str(path)
        info = read_gguf(path)  # validates the file before llama.cpp parses it
        meta = info.metadata
        if not isinstance(meta.get("tokenizer.ggml.tokens"), list):
            raise FormatError(
                f"{path}: the GGUF has no tokenizer (tokenizer.ggml.tokens); use one that embeds it"
            )
        check_vocabulary(info)  # what llama.cpp asserts on, refused in one line
        probe_vocabulary(path)  # and anything else it still dies of, found in a child process
        with captured_native_output() as log, load_guard():
            try:
                self._llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
            except (ValueError, RuntimeError, OSError) as e:
                err: Exception | None = e
            else:
                err = None
        if err is not None:
            detail = log_detail(log.text) or str(err)
            raise FormatError(f"{path}: llama.cpp cannot load the vocabulary ({detail})") from None
        # Close the model when the tokenizer goes away or, at the latest, at interpreter exit (while
        # llama_cpp's module globals still exist; its own __del__ fails during shutdown).
        self._finalizer = weakref.finalize(self, close_quietly, self._llm)
        self._lib = llama_cpp
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(self._vocab)
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types = meta.get("tokenizer.ggml.token_type") or []
        self._token_texts = tokens
        self._control = [i for i, t in enumerate(types) if t == 3]  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL

        def text(i: int) -> str | None:
            return tokens[i] if 0 <= i < min(len(tokens), self.vocab_size) else None

        bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.bos_token = text(bos)
        self.bos_id = bos if self.bos_token is not None else None
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        self.eos_token = text(eos)
        # llama.cpp's end-of-generation set: EOS, EOT and the known end-of-turn tokens it recognizes.
        candidates = {eos, llama_cpp.llama_vocab_eot(self._vocab), *self._control}
        candidates.update(i for i, t in enumerate(tokens) if t in END_OF_TURN_TOKENS)
        self.eos_ids = frozenset(
            i for i in candidates if 0 <= i < self.vocab_size and llama_cpp.llama_vocab_is_eog(self._vocab, i)
        )
        self.add_bos_default = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        template = meta.get("tokenizer.chat_template")
        self.chat_template = template if isinstance(template, str) and template.strip() else None

    @property
    def special_tokens(self) -> dict[str, int]:
        return {self._token_texts[i]: i for i in self._control}

    def _live(self) -> Any:
        if not self._finalizer.alive:
            raise UsageError(f"{self.source}: the tokenizer was closed; load it again")
        return self._lib

    def _encode(self, text: str) -> list[int]:
        lib = self._live()
        data = text.encode("utf-8")
        n_max = len(data) + 16
        for _ in range(2):
            buf = (lib.llama_token * n_max)()
            n = lib.llama_tokenize(self._vocab, data, len(data), buf, n_max, False, True)
            if n >= 0:
                return list(buf[:n])
            n_max = -n
        raise UsageError(f"llama.cpp could not tokenize a text of {len(data)} bytes")

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        import ctypes

        lib = self._live()
        ids = self._check_ids(ids)
        if not ids:
            return ""
        arr = (lib.llama_token * len(ids))(*ids)
        size = 8 * len(ids) + 64
        for _ in range(2):
            buf = (ctypes.c_char * size)()
            n = lib.llama_detokenize(self._vocab, arr, len(ids), buf, size, False, not skip_special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n
        raise UsageError(f"llama.cpp could not detokenize {len(ids)} tokens")

    def close(self) -> None:
        super().close()
        self._finalizer()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer for a ``.gguf`` file or a Hugging Face folder (``tokenizer.json``)."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return GGUFTokenizer(path)
    if path.is_dir():
        return HFTokenizer(path)
    raise SourceError(f"{path}: not a .gguf file or a folder with tokenizer.json; pass one of those")
