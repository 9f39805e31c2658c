"""Log-probabilities of generated tokens (``Session.reply(logprobs=N)``, what ``llmctl serve`` returns for
OpenAI's ``logprobs``): each is the log-softmax of the logits the token was drawn from, before penalties,
filters and temperature. Checked against the same model run again: llama-cpp-python's own ``logits_all``
scores for the llama.cpp backend (evaluated as the backend does, the prompt at once and then token by
token: llama.cpp's batched and single-token kernels differ by up to 0.12 in a log-probability), and
llmctl's model over the whole sequence without KV reuse for the torch backend (that model equals
transformers' logits on the same weights: tests/test_interop.py)."""

from __future__ import annotations

import numpy as np
import pytest

from llmctl.errors import UsageError
from llmctl.runtime.backend import logprobs_of
from llmctl.runtime.sampler import SamplingOptions
from llmctl.runtime.session import Reply, Session, load_backend

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
PROMPT = "Name three colors."


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max(-1, keepdims=True) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)))


def reply(backend, top: int, **options) -> tuple[Reply, list[int]]:
    session = Session(backend, SamplingOptions(max_tokens=8, seed=3, **options))
    prompt = session.encode([{"role": "user", "content": PROMPT}])
    *_, last = session.reply(PROMPT, logprobs=top)
    assert isinstance(last, Reply) and last.logprobs is not None
    return last, prompt


def check(last: Reply, prompt: list[int], reference: np.ndarray, top: int, atol: float) -> None:
    """``reference``: log-softmax rows (positions, vocab) of the whole sequence run at once."""
    n = len(prompt)
    assert len(last.logprobs) == last.completion_tokens > 0
    assert "".join(e.text for e in last.logprobs) == last.text  # no stop string in these replies
    for i, e in enumerate(last.logprobs):
        row = reference[n - 1 + i]  # the position before the token predicts it
        assert e.logprob == pytest.approx(row[e.token], abs=atol)
        assert len(e.top) == top
        assert [v for _, _, v in e.top] == sorted((v for _, _, v in e.top), reverse=True)
        best = np.sort(row)[::-1][:top]
        np.testing.assert_allclose([v for _, _, v in e.top], best, atol=atol)


@pytest.fixture(scope="module")
def llama():
    b, _ = load_backend(MODEL, "llama.cpp", context=512, threads=1)
    yield b
    b.close()


@pytest.fixture(scope="module")
def torch_backend():
    b, _ = load_backend(MODEL, "torch", context=512, threads=1)
    yield b
    b.close()


def test_llama_cpp_logprobs_are_the_model_distribution(llama) -> None:
    import llama_cpp

    from llmctl.runtime.llama_lib import captured_native_output, load_guard
    from llmctl.sources import resolve

    greedy, prompt = reply(llama, 5, temperature=0)
    sampled, prompt2 = reply(llama, 5, temperature=1.5, top_k=20)  # filters and temperature: not in the logprobs
    assert prompt2 == prompt
    with captured_native_output(), load_guard():
        ref = llama_cpp.Llama(str(resolve(MODEL).path), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
    try:
        for last in (greedy, sampled):
            ids = prompt + [e.token for e in last.logprobs]
            ref.reset()
            ref.eval(prompt)  # as the backend runs it: the prompt in one batch, then one token at a time
            for t in ids[len(prompt) :]:
                ref.eval([t])
            check(last, prompt, log_softmax(np.asarray(ref.scores[: len(ids)])), 5, atol=1e-4)
    finally:
        ref.close()
    assert all(e.top[0][0] == e.token for e in greedy.logprobs)  # greedy takes the likeliest


def test_torch_logprobs_are_the_model_distribution(torch_backend) -> None:
    import torch

    greedy, prompt = reply(torch_backend, 3, temperature=0)
    sampled, _ = reply(torch_backend, 3, temperature=1.5, top_p=0.5, repeat_penalty=1.3)
    model = torch_backend.model
    for last in (greedy, sampled):
        ids = prompt + [e.token for e in last.logprobs]
        with torch.no_grad():
            logits = model(torch.tensor([ids]), model.make_cache(len(ids) + 1))[0]  # (T, vocab), no reuse
        check(last, prompt, log_softmax(logits.float().numpy()), 3, atol=2e-3)
    assert all(e.top[0][0] == e.token for e in greedy.logprobs)


def test_no_logprobs_unless_asked_and_bounds(torch_backend) -> None:
    session = Session(torch_backend, SamplingOptions(max_tokens=4, temperature=0))
    *pieces, last = session.reply(PROMPT)
    assert last.logprobs is None and all(p.logprobs == [] for p in pieces)
    for bad in (-1, 21, True, 2.0):
        with pytest.raises(UsageError, match="logprobs must be between 0 and 20"):
            next(session.reply(PROMPT, logprobs=bad))


def test_logprobs_of_is_a_log_softmax() -> None:
    x = np.array([1.0, 3.0, 3.0, -2.0, 0.5], dtype=np.float32)
    lp, top = logprobs_of(x, 0, 3)
    ref = log_softmax(x)
    assert lp == pytest.approx(ref[0]) and np.exp(ref).sum() == pytest.approx(1.0)
    assert top == [(1, pytest.approx(ref[1])), (2, pytest.approx(ref[2])), (0, pytest.approx(ref[0]))]  # ties by id
    assert logprobs_of(x, 3, 0)[1] == [] and len(logprobs_of(x, 3, 9)[1]) == 5
