"""The chat engine on the bundled models with both backends: KV reuse (counted), greedy parity with
transformers, seeds, stop strings, end-of-turn, context trimming, templates, interrupts, transcripts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from conftest import smollm2_path

from llmctl.errors import TemplateError, UsageError
from llmctl.runtime.backend import common_prefix
from llmctl.runtime.sampler import SamplingOptions
from llmctl.runtime.session import (
    FALLBACK_STOPS,
    Notice,
    Piece,
    Reply,
    Session,
    StopMatcher,
    load_backend,
)

GREEDY = SamplingOptions(temperature=0, max_tokens=16)


# ---- stop strings (pure) ---------------------------------------------------------------------------
def test_stop_matcher_never_emits_part_of_a_stop_string() -> None:
    m = StopMatcher(["</end>", "STOP"])
    assert m.push("Hello <") == ("Hello ", False)  # "<" could start "</end>": held back
    assert m.push("/e") == ("", False)
    assert m.push("x") == ("</ex", False)  # not a stop string after all: released
    assert m.push(" and ST") == (" and ", False)
    assert m.push("OP here") == ("", True)  # found: the text ends before it
    m = StopMatcher(["ab"])
    assert m.push("xa") == ("x", False)
    assert m.flush() == "a"  # the end of the reply releases what was held
    assert StopMatcher([]).push("anything") == ("anything", False)
    m = StopMatcher(["aab"])
    assert m.push("aaab") == ("a", True)


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


# ---- backends on SmolLM2 -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_backend():
    b, _ = load_backend(str(smollm2_path()), "torch", context=1024, threads=1)
    yield b
    b.close()


@pytest.fixture(scope="module")
def llama_backend():
    b, _ = load_backend(str(smollm2_path()), "llama.cpp", context=1024, threads=1)
    yield b
    b.close()


def run(session: Session, text: str) -> tuple[Reply, list[Notice], str]:
    pieces, notices, reply = [], [], None
    for e in session.reply(text):
        if isinstance(e, Piece):
            pieces.append(e.text)
        elif isinstance(e, Notice):
            notices.append(e)
        else:
            reply = e
    assert reply is not None and "".join(pieces) == reply.text
    return reply, notices, "".join(pieces)


@pytest.mark.slow
def test_torch_kv_cache_is_reused_across_turns(torch_backend) -> None:
    """Count the tokens that actually go through the model: turn 2 computes only its new tokens."""
    model = torch_backend.model
    fed: list[int] = []
    hook = model.register_forward_pre_hook(lambda m, args: fed.append(args[0].shape[1]))
    try:
        torch_backend.reset()
        s = Session(torch_backend, GREEDY.with_(max_tokens=12))
        r1, _, _ = run(s, "What is the capital of France?")
        assert r1.prefilled_tokens == r1.prompt_tokens == fed[0]  # the whole prompt, in one chunk
        assert set(fed[1:]) == {1}  # then one token per step
        cached = list(torch_backend.tokens)
        fed.clear()
        ids2 = s.encode([*s.conversation(), {"role": "user", "content": "And of Germany?"}])
        r2, _, text2 = run(s, "And of Germany?")
        reused = common_prefix(cached, ids2)
        assert reused >= r1.prompt_tokens  # the whole first turn came from the cache
        assert r2.prefilled_tokens == len(ids2) - reused == r2.prompt_tokens - reused
        assert r2.prefilled_tokens < 20 < r2.prompt_tokens
        # tokens run through the model this turn: the new ones, then one per generated token after the first
        decoded = r2.completion_tokens - (r2.finish_reason == "length")
        assert sum(fed) == r2.prefilled_tokens + decoded
    finally:
        hook.remove()
    # The reused cache gives the same reply as computing the whole conversation from scratch.
    messages = s.messages[:-1]
    torch_backend.reset()
    fresh = Session(torch_backend, GREEDY.with_(max_tokens=12))
    fresh.messages = messages[:-1]
    r3, _, text3 = run(fresh, messages[-1]["content"])
    assert r3.prefilled_tokens == r3.prompt_tokens
    assert text3 == text2


@pytest.mark.slow
def test_llama_cpp_kv_cache_is_reused_across_turns(llama_backend) -> None:
    llama_backend.reset()
    s = Session(llama_backend, GREEDY.with_(max_tokens=12))
    r1, _, _ = run(s, "What is the capital of France?")
    assert r1.prefilled_tokens == r1.prompt_tokens
    cached = list(llama_backend.tokens)
    assert llama_backend.llm.n_tokens == len(cached) == r1.prompt_tokens + r1.completion_tokens - 1 + (
        r1.finish_reason == "stop"
    )
    ids2 = s.encode([*s.conversation(), {"role": "user", "content": "And of Germany?"}])
    r2, _, _ = run(s, "And of Germany?")
    assert r2.prefilled_tokens == len(ids2) - common_prefix(cached, ids2) < 20 < r2.prompt_tokens
    # The state a reused cache gives is the state a fresh prefill gives: the next-token logits agree. (Not
    # the greedy text: llama.cpp's batched and one-token kernels round differently, and this small model's
    # top two logits are often closer than that — on AVX2 CPUs the texts part at the first token.)
    import numpy as np

    lib, llm = llama_backend._lib, llama_backend.llm

    def next_logits() -> np.ndarray:
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(llama_backend.n_vocab,)).copy()

    llama_backend.reset()
    llm.eval(ids2[:-7])
    kept = llama_backend._keep(ids2)  # the prefix is reused, the rest evaluated
    assert kept == len(ids2) - 7
    llm.eval(ids2[kept:])
    reused = next_logits()
    llama_backend.reset()
    llm.eval(ids2)
    fresh = next_logits()
    assert np.abs(reused - fresh).max() <= 0.02 * np.abs(fresh).max()
    assert fresh[reused.argmax()] >= fresh.max() - 0.04 * np.abs(fresh).max()


@pytest.mark.slow
def test_torch_greedy_reply_matches_transformers(torch_backend) -> None:
    """32 greedy tokens of the torch backend = transformers' greedy generate on the same GGUF (loaded and
    dequantized by transformers' own GGUF reader) and the same prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    torch_backend.reset()
    s = Session(torch_backend, SamplingOptions(temperature=0, max_tokens=32))
    question = "Write a long story about a dragon who learns to paint."
    ids = s.encode([{"role": "user", "content": question}])
    reply, _, _ = run(s, question)
    assert reply.finish_reason == "length" and reply.completion_tokens == 32
    ours = torch_backend.tokens[len(ids) :]  # 31 ids: the last generated one is not fed back yet

    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    rendered = ref_tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)  # fmt: skip
    assert ids == ref_tok(rendered, add_special_tokens=False).input_ids
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                          pad_token_id=0, attention_mask=torch.ones(1, len(ids), dtype=torch.long))  # fmt: skip
    theirs = out[0, len(ids) :].tolist()
    assert ours == theirs[:31]
    assert reply.text == ref_tok.decode(theirs, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["torch", "llama"])
def test_same_seed_same_text(which: str, torch_backend, llama_backend) -> None:
    backend = torch_backend if which == "torch" else llama_backend
    opts = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=16)
    texts = []
    for seed in (11, 11, 12):
        backend.reset()
        s = Session(backend, opts.with_(seed=seed))
        texts.append(run(s, "Tell me a fun fact.")[2])
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


@pytest.mark.slow
def test_end_of_turn_and_stop_strings(llama_backend) -> None:
    llama_backend.reset()
    s = Session(llama_backend, GREEDY.with_(max_tokens=200))
    r, _, text = run(s, "Say hello.")
    assert r.finish_reason == "stop" and r.completion_tokens < 200  # <|im_end|> ended it
    assert "<|im_end|>" not in text and text.strip()
    # Stop on a word of that reply: the reply ends right before it, nothing of it printed.
    words = text.split()
    stop = words[len(words) // 2]
    llama_backend.reset()
    s = Session(llama_backend, GREEDY.with_(max_tokens=200, stop=(stop,)))
    r2, _, text2 = run(s, "Say hello.")
    assert r2.finish_reason == "stop" and text2 == text[: text.index(stop)]
    assert s.messages[-1] == {"role": "assistant", "content": text2}
    r3, _, _ = run(s, "Again.")  # the cache held tokens past the stop string: rolled back, no error
    assert r3.prefilled_tokens < r3.prompt_tokens


@pytest.mark.slow
def test_max_tokens_and_interrupt(llama_backend) -> None:
    llama_backend.reset()
    s = Session(llama_backend, GREEDY.with_(max_tokens=5))
    r, _, _ = run(s, "Count from one to twenty in words.")
    assert r.finish_reason == "length" and r.completion_tokens == 5
    s.options = s.options.with_(max_tokens=100)
    events = s.reply("Write a long story about a dragon who learns to fly.")  # a reply of 100 tokens
    first = next(e for e in events if isinstance(e, Piece))
    events.close()  # what Ctrl-C in the REPL does
    assert s.last.finish_reason == "interrupted"
    assert s.messages[-1] == {"role": "assistant", "content": first.text}
    r2, _, _ = run(s, "Thanks.")
    assert r2.finish_reason in ("stop", "length") and r2.prefilled_tokens < r2.prompt_tokens
    polls = iter(range(100))  # the REPL's Ctrl-C flag: raised at the fourth token
    events = list(s.reply("Count from forty to sixty in words.", lambda: next(polls) >= 3))
    assert events[-1].finish_reason == "interrupted" and events[-1].completion_tokens == 3


@pytest.mark.slow
def test_context_trimming_keeps_the_system_prompt(llama_backend) -> None:
    from llmctl.runtime.llamacpp import LlamaCppBackend

    small = LlamaCppBackend(smollm2_path(), 128, threads=1)
    try:
        s = Session(small, GREEDY.with_(max_tokens=8), system="Answer briefly.")
        dropped, turns = [], []
        for i in range(10):
            r, notices, _ = run(s, f"Question number {i}: name a fruit.")
            dropped += notices
            turns.append((bool(notices), r))
            assert r.context_used <= 128 and r.prompt_tokens <= 128 - 8
        assert dropped and "dropped the" in dropped[0].text and "system prompt kept" in dropped[0].text
        # A trim frees half of the room, so the turn after it reuses the cache again.
        after = [r for (trimmed, _), (again, r) in itertools.pairwise(turns) if trimmed and not again]
        assert after and all(r.prefilled_tokens < r.prompt_tokens for r in after)
        assert all(r.prompt_tokens <= (128 - 8) // 2 for trimmed, r in turns if trimmed)
        conv = s.conversation()
        assert conv[0] == {"role": "system", "content": "Answer briefly."}
        assert conv[1]["role"] == "user" and "Question number 0" not in json.dumps(conv)
        assert len(s.encode(conv)) <= 128
        with pytest.raises(UsageError, match="the context holds 128 with 8 kept for the reply"):
            s.complete("word " * 200)
        assert s.messages[-1]["role"] == "assistant"  # the refused message was not kept
    finally:
        small.close()


@pytest.mark.slow
def test_template_override_fallback_and_sandbox(llama_backend) -> None:
    custom = "{% for m in messages %}{{ m.role | upper }}: {{ m.content }}\n{% endfor %}ASSISTANT:"
    s = Session(llama_backend, GREEDY, template=custom)
    assert not s.uses_fallback_template
    ids = s.encode([{"role": "user", "content": "Hi"}])
    assert s.tokenizer.decode(ids) == "USER: Hi\nASSISTANT:"
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    s = Session(llama_backend, GREEDY, template=evil)
    with pytest.raises(TemplateError, match="templates may not reach Python internals"):
        s.complete("Hi")
    assert s.messages == []
    evil2 = "{{ cycler.__init__.__globals__.os.system('echo owned') }}"
    with pytest.raises(TemplateError, match="unsafe"):
        Session(llama_backend, GREEDY, template=evil2).complete("Hi")
    # No template: the ChatML fallback, whose end marker also stops a reply written as plain text.
    s = Session(llama_backend, GREEDY, template="")
    assert s.uses_fallback_template
    assert s.tokenizer.decode(s.encode([{"role": "user", "content": "Hi"}])).endswith(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert set(FALLBACK_STOPS) == {"<|im_end|>", "<|im_start|>"}
    # Completion mode: the system text, then each turn as written, no template; no fallback stops.
    s = Session(llama_backend, GREEDY, system="A story.", completion=True)
    assert not s.uses_fallback_template and s.template_name == "none (completion)"
    turns = [{"role": "system", "content": "A story."}, {"role": "user", "content": "Once upon"},
             {"role": "assistant", "content": " a time"}, {"role": "user", "content": " there was"}]  # fmt: skip
    tok = s.tokenizer
    assert s.encode(turns) == tok.encode("A story.\n\nOnce upon a time there was", add_bos=tok.add_bos_default)
    reply = s.complete("Once upon a time")
    assert reply.completion_tokens > 0 and s.stats()["template"] == "none (completion)"
    with pytest.raises(UsageError, match="a chat template and completion mode exclude each other"):
        Session(llama_backend, GREEDY, template=custom, completion=True)


@pytest.mark.slow
def test_save_and_load_transcripts(tmp_path: Path, llama_backend) -> None:
    llama_backend.reset()
    s = Session(llama_backend, GREEDY.with_(max_tokens=8), system="Be kind.")
    run(s, "Hello!")
    path = s.save(tmp_path / "t.json")
    data = json.loads(path.read_text())
    assert data["format"] == "llmctl-chat-transcript" and data["system"] == "Be kind."
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert not list(tmp_path.glob(".*.tmp"))
    other = Session(llama_backend, GREEDY.with_(max_tokens=8))
    assert other.load(path) == 2
    assert other.messages == s.messages and other.system == "Be kind."
    r, _, _ = run(other, "And goodbye.")  # continues on the cached prefix of the same conversation
    assert r.prefilled_tokens < r.prompt_tokens
    llama_backend.reset()  # /stats after /load on an empty cache: the loaded turns count as to prefill
    fresh = Session(llama_backend, GREEDY.with_(max_tokens=8))
    fresh.load(path)
    st = fresh.stats()
    assert st["context_used"] == 0 and st["context_pending"] == len(fresh.encode(fresh.conversation())) > 10
    (tmp_path / "openai.json").write_text(json.dumps({"messages": [{"role": "system", "content": "S"},
                                                                    {"role": "user", "content": "U"}]}))  # fmt: skip
    assert other.load(tmp_path / "openai.json") == 1 and other.system == "S"
    for content, message in [
        ("not json", "not a JSON transcript"),
        ('{"messages": 3}', 'no "messages" list'),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "message 0 must be"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"}]}',
         "a system message may only come first"),
    ]:  # fmt: skip
        bad = tmp_path / "bad.json"
        bad.write_text(content)
        with pytest.raises(UsageError, match=message):
            other.load(bad)
    with pytest.raises(UsageError, match="no such file"):
        other.load(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="cannot write"):
        other.save(tmp_path / "no" / "such" / "dir.json")


def test_backend_choice_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--backend must be one of auto, torch, llama.cpp, vllm, got 'tgi'"):
        load_backend(None, "tgi")
    with pytest.raises(UsageError, match="--context must be between 64 and the model's limit of 8192"):
        load_backend(None, "auto", context=100000)
    with pytest.raises(UsageError, match="--device cuda: the llama.cpp backend runs on the CPU"):
        load_backend(None, "llama.cpp", device="cuda")
    with pytest.raises(UsageError, match="--threads must be a positive integer"):
        load_backend(None, "auto", threads=0)


def test_llama_cpp_refuses_non_gguf(tiny_models) -> None:
    folder, _ = tiny_models["llama"]
    with pytest.raises(UsageError, match="the llama.cpp backend runs .gguf files only"):
        load_backend(str(folder), "llama.cpp")


@pytest.mark.parametrize("family", ["smollm2", "gemma3_untied"])
def test_torch_backend_reuse_equals_fresh_prefill_past_the_sliding_window(family: str, loaded) -> None:
    """Multi-turn reuse on tiny random models, Gemma's sliding window (8) wrapped many times: continuing
    from the cache gives the same greedy tokens as prefilling the whole sequence into a new cache, and
    prefills only the new part; a turn that must roll back further than the ring holds starts over."""
    import torch

    from llmctl.runtime.torch_backend import TorchBackend

    model = loaded[family]
    g = torch.Generator().manual_seed(3)
    greedy = SamplingOptions(temperature=0, max_tokens=1)
    reused = TorchBackend(model, None, 400)
    prompt = torch.randint(0, 96, (150,), generator=g).tolist()
    for turn in range(3):
        gen = reused.generate(prompt, greedy, 0)
        out = [next(gen) for _ in range(20)]
        gen.close()
        assert reused.prefilled == (150 if turn == 0 else 31)  # 30 new tokens + the last reply token
        fresh = TorchBackend(model, None, 400)
        gen = fresh.generate(prompt, greedy, 0)
        assert [next(gen) for _ in range(20)] == out, turn
        gen.close()
        prompt = prompt + out + torch.randint(0, 96, (30,), generator=g).tolist()
    # Diverging 100 tokens back: past the sliding layers' ring (8 + 64 slots), so the cache starts over.
    prompt = [*prompt[:-100], 1, 2, 3]
    gen = reused.generate(prompt, greedy, 0)
    first = next(gen)
    gen.close()
    expected = len(prompt) if family.startswith("gemma3") else 3
    assert reused.prefilled == expected
    fresh = TorchBackend(model, None, 400)
    gen = fresh.generate(prompt, greedy, 0)
    assert next(gen) == first
    gen.close()
