"""The sampler on hand-built distributions, each filter checked by hand and against llama.cpp's own
samplers (``llama_sampler_apply`` from llama-cpp-python on the same logits): the oracle for semantics
and for the order of the chain."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from llmctl.errors import UsageError
from llmctl.runtime.sampler import (
    Sampler,
    SamplingOptions,
    apply_penalties,
    apply_temperature,
    min_p_filter,
    parse_option,
    top_k_filter,
    top_p_filter,
)

LOGITS = [1.0, -1.0, 2.0, 0.5, 3.0, -0.25, 0.0, 1.5]


def kept(x: torch.Tensor) -> dict[int, float]:
    """token id -> logit of the tokens a filter left."""
    return {i: float(v) for i, v in enumerate(x) if v != -math.inf}


# ---- llama.cpp as the oracle -----------------------------------------------------------------------
def llama_apply(make, logits: list[float], accept: list[int] = ()) -> dict[int, float]:
    """Run llama.cpp sampler(s) over ``logits``; token id -> logit of what is left."""
    import llama_cpp as L

    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    for s in make(L, len(logits)):
        L.llama_sampler_chain_add(chain, s)
    for t in accept:
        L.llama_sampler_accept(chain, t)
    arr = (L.llama_token_data * len(logits))()
    for i, x in enumerate(logits):
        arr[i].id, arr[i].logit, arr[i].p = i, x, 0.0
    cur = L.llama_token_data_array(data=arr, size=len(logits), selected=-1, sorted=False)
    L.llama_sampler_apply(chain, ctypes.byref(cur))
    out = {cur.data[i].id: cur.data[i].logit for i in range(cur.size)}
    L.llama_sampler_free(chain)
    return {k: v for k, v in out.items() if v != -math.inf}


def approx(a: dict[int, float], b: dict[int, float]) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-5 for k in a)


# ---- penalties -------------------------------------------------------------------------------------
def test_repeat_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    x = apply_penalties(torch.tensor(LOGITS), [2, 1, 2], repeat_penalty=2.0)
    expected = list(LOGITS)
    expected[2] = 2.0 / 2  # positive: divided (once, however often it occurred)
    expected[1] = -1.0 * 2  # negative: multiplied, so it still goes down
    assert x.tolist() == expected


def test_frequency_and_presence_penalties_are_subtracted_per_count() -> None:
    x = apply_penalties(
        torch.tensor(LOGITS), [4, 4, 4, 0], frequency_penalty=0.5, presence_penalty=0.25
    ).tolist()
    assert x[4] == pytest.approx(3.0 - 3 * 0.5 - 0.25)
    assert x[0] == pytest.approx(1.0 - 1 * 0.5 - 0.25)
    assert [x[i] for i in (1, 2, 3, 5, 6, 7)] == [LOGITS[i] for i in (1, 2, 3, 5, 6, 7)]


def test_penalties_only_look_at_the_last_n_tokens_like_llama_cpp() -> None:
    history = [6, 6, 1, 1, 2, 3, 0, 1]
    for last_n in (1, 4, 8, 0):
        s = Sampler(
            SamplingOptions(
                repeat_penalty=1.7, frequency_penalty=0.4, presence_penalty=0.3, repeat_last_n=last_n
            )
        )
        ours = s._penalised(torch.tensor(LOGITS), history)
        oracle = llama_apply(lambda L, n, k=last_n: [L.llama_sampler_init_penalties(n, k, 1.7, 0.4, 0.3)],
                             LOGITS, history)  # fmt: skip
        assert approx(kept(ours), oracle), (last_n, kept(ours), oracle)
    # 4: only [2, 3, 0, 1] count, so 6 (seen twice, earlier) is untouched
    s = Sampler(SamplingOptions(repeat_penalty=1.7, repeat_last_n=4))
    assert s._penalised(torch.tensor(LOGITS), history)[6] == LOGITS[6]
    # -1: the whole history
    s = Sampler(SamplingOptions(frequency_penalty=0.5, repeat_last_n=-1))
    assert s._penalised(torch.tensor(LOGITS), history)[6] == pytest.approx(LOGITS[6] - 2 * 0.5)


# ---- filters ---------------------------------------------------------------------------------------
def test_top_k() -> None:
    assert kept(top_k_filter(torch.tensor(LOGITS), 3)) == {4: 3.0, 2: 2.0, 7: 1.5}
    assert kept(top_k_filter(torch.tensor(LOGITS), 0)) == kept(torch.tensor(LOGITS))  # 0 = off
    for k in (1, 3, 5):
        oracle = llama_apply(lambda L, n, k=k: [L.llama_sampler_init_top_k(k)], LOGITS)
        assert approx(kept(top_k_filter(torch.tensor(LOGITS), k)), oracle)


def test_top_p_keeps_the_token_that_crosses_the_threshold() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = torch.tensor([math.log(p) for p in probs])
    assert set(kept(top_p_filter(logits, 0.5))) == {0}  # 0.5 reaches 0.5
    assert set(kept(top_p_filter(logits, 0.6))) == {0, 1}  # 0.5 < 0.6 <= 0.8
    assert set(kept(top_p_filter(logits, 0.81))) == {0, 1, 2}
    assert set(kept(top_p_filter(logits, 0.0))) == {0}  # never empty
    assert set(kept(top_p_filter(logits, 1.0))) == {0, 1, 2, 3}  # 1 = off
    for p in (0.1, 0.5, 0.9, 0.95):
        oracle = llama_apply(lambda L, n, p=p: [L.llama_sampler_init_top_p(p, 1)], LOGITS)
        assert approx(kept(top_p_filter(torch.tensor(LOGITS), p)), oracle), p


def test_min_p_is_relative_to_the_top_token() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()
    assert set(kept(min_p_filter(logits, 0.3))) == {0, 1, 2}  # 0.15 >= 0.3 * 0.5
    assert set(kept(min_p_filter(logits, 0.31))) == {0, 1}
    assert set(kept(min_p_filter(logits, 0.0))) == {0, 1, 2, 3}
    for p in (0.05, 0.3, 0.7):
        oracle = llama_apply(lambda L, n, p=p: [L.llama_sampler_init_min_p(p, 1)], LOGITS)
        assert approx(kept(min_p_filter(torch.tensor(LOGITS), p)), oracle), p


def test_temperature() -> None:
    assert apply_temperature(torch.tensor(LOGITS), 0.5).tolist() == [2 * v for v in LOGITS]
    assert kept(apply_temperature(torch.tensor(LOGITS), 0.0)) == {4: 3.0}
    for t in (0.0, 0.5, 1.3):
        oracle = llama_apply(lambda L, n, t=t: [L.llama_sampler_init_temp(t)], LOGITS)
        assert approx(kept(apply_temperature(torch.tensor(LOGITS), t)), oracle), t


# ---- the chain -------------------------------------------------------------------------------------
CHAINS = [
    dict(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repeat_penalty=1.3, frequency_penalty=0.2),
    dict(temperature=1.5, top_k=0, top_p=0.8, min_p=0.0, presence_penalty=0.5, repeat_last_n=3),
    dict(temperature=0.3, top_k=3, top_p=1.0, min_p=0.2),
    dict(temperature=2.0, top_k=6, top_p=0.5, min_p=0.05, repeat_penalty=0.8),
]


@pytest.mark.parametrize("opts", CHAINS)
def test_chain_matches_llama_cpp_default_order(opts: dict) -> None:
    """penalties → top-k → top-p → min-p → temperature, as llama.cpp's common sampler chains them."""
    o = SamplingOptions(**opts)
    history = [4, 4, 2, 7, 0]

    def chain(L, n):
        return [
            L.llama_sampler_init_penalties(n, o.repeat_last_n, o.repeat_penalty, o.frequency_penalty,
                                           o.presence_penalty),
            L.llama_sampler_init_top_k(o.top_k),
            L.llama_sampler_init_top_p(o.top_p, 1),
            L.llama_sampler_init_min_p(o.min_p, 1),
            L.llama_sampler_init_temp(o.temperature),
        ]  # fmt: skip

    oracle = llama_apply(chain, LOGITS, history)
    ids = list(oracle)
    expected = torch.softmax(torch.tensor([oracle[i] for i in ids]), dim=-1)
    probs = Sampler(o).distribution(torch.tensor(LOGITS), history)
    assert {i for i, p in enumerate(probs.tolist()) if p > 0} == set(ids)
    assert torch.allclose(probs[ids], expected, atol=1e-5)


def test_order_matters_top_p_sees_untempered_probabilities() -> None:
    """Temperature comes last: a high temperature does not let more tokens through top-p."""
    base = dict(top_k=0, min_p=0.0, top_p=0.6)
    cold = Sampler(SamplingOptions(temperature=0.1, **base)).distribution(torch.tensor(LOGITS))
    hot = Sampler(SamplingOptions(temperature=5.0, **base)).distribution(torch.tensor(LOGITS))
    assert (cold > 0).tolist() == (hot > 0).tolist()
    assert int((hot > 0).sum()) == 2  # 3.0 and 2.0: 0.55 < 0.6 <= 0.75


def test_greedy_is_argmax_after_penalties() -> None:
    s = Sampler(SamplingOptions(temperature=0))
    assert s(torch.tensor(LOGITS)) == 4
    s = Sampler(SamplingOptions(temperature=0, repeat_penalty=2.5))
    assert s(torch.tensor(LOGITS), [4]) == 2  # 3.0 / 2.5 < 2.0
    assert s(torch.tensor(LOGITS), [4, 2]) == 7  # then 1.5 wins
    assert s.distribution(torch.tensor(LOGITS), [4, 2]).tolist() == [float(i == 7) for i in range(8)]


def test_seed_reproduces_and_draws_follow_the_distribution() -> None:
    o = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    logits = torch.tensor(LOGITS)
    draws = [Sampler(o)(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # a fresh sampler with the same seed draws the same token
    a = Sampler(o)
    b = Sampler(o)
    seq_a = [a(logits) for _ in range(50)]
    assert seq_a == [b(logits) for _ in range(50)]
    c = Sampler(o.with_(seed=99))
    assert [c(logits) for _ in range(50)] != seq_a
    n = 20000
    counts = torch.bincount(torch.tensor([a(logits) for _ in range(n)]), minlength=8).float() / n
    assert torch.allclose(counts, torch.softmax(logits, -1), atol=0.015)


def test_top_k_survivors_are_mapped_back_to_token_ids() -> None:
    vocab = torch.full((1000,), -10.0)
    vocab[[17, 400, 999]] = torch.tensor([5.0, 4.0, 4.5])
    s = Sampler(SamplingOptions(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=0))
    assert {s(vocab) for _ in range(200)} == {17, 400, 999}


# ---- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,message",
    [
        ("top_p", 1.5, "--top-p must be between 0 and 1 (1 = off), got 1.5"),
        ("temperature", -0.1, "--temperature must be >= 0 (0 = greedy), got -0.1"),
        ("top_k", -3, "--top-k must be an integer >= 0 (0 = off), got -3"),
        ("top_k", 2.5, "--top-k must be an integer >= 0"),
        ("min_p", -0.01, "--min-p must be between 0 and 1"),
        ("repeat_penalty", 0, "--repeat-penalty must be > 0 (1 = off)"),
        ("repeat_last_n", -2, "--repeat-last-n must be an integer >= -1"),
        ("presence_penalty", 2.5, "--presence-penalty must be between -2 and 2"),
        ("frequency_penalty", float("nan"), "--frequency-penalty must be between -2 and 2"),
        ("seed", -1, "--seed must be an integer between 0 and 4294967294"),
        ("max_tokens", 0, "--max-tokens must be an integer >= 1"),
        ("temperature", "hot", "--temperature must be >= 0"),
        ("stop", ("",), "stop strings must be non-empty"),
    ],
)
def test_invalid_options_are_refused_with_the_valid_range(field: str, value, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SamplingOptions(**{field: value})


def test_parse_option_for_set() -> None:
    assert parse_option("temperature", "0.3") == ("temperature", 0.3)
    assert parse_option("top-k", "7") == ("top_k", 7)
    assert parse_option("--top-p", "0.5") == ("top_p", 0.5)
    assert parse_option("temp", "1") == ("temperature", 1.0)
    assert parse_option("seed", "random") == ("seed", None)
    assert parse_option("stop", "END") == ("stop", ("END",))
    assert parse_option("stop", "none") == ("stop", ())
    with pytest.raises(UsageError, match="unknown sampling option 'warmth'; options: temperature, top_k"):
        parse_option("warmth", "1")
    with pytest.raises(UsageError, match="top-k must be an integer >= 0"):
        parse_option("top-k", "many")
    with pytest.raises(UsageError, match="unknown sampling option 'colour'"):
        SamplingOptions().with_(colour=1)
