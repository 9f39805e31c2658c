"""Chat under load: a 200-turn scripted conversation on the bundled SmolLM2 in a small context.

The context window must never be exceeded (old turns are dropped, the system prompt kept), the KV cache
stays the one allocated at the start, and memory stays flat: Python allocations and the process RSS do
not grow with the number of turns once the window is full.
"""

from __future__ import annotations

import gc
import resource
import tracemalloc

import pytest
from conftest import smollm2_path

from llmctl.runtime.sampler import SamplingOptions
from llmctl.runtime.session import Notice, Reply, Session, load_backend

pytestmark = pytest.mark.slow

TURNS = 200
CONTEXT = 256
TOPICS = ["the weather", "rivers", "bread", "trains", "the moon", "music", "bees", "winter", "maps", "tea"]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.mark.parametrize("backend", ["torch", "llama.cpp"])
def test_200_turns_stay_in_the_window_with_flat_memory(backend: str) -> None:
    be, _ = load_backend(str(smollm2_path()), backend, context=CONTEXT, threads=1)
    options = SamplingOptions(temperature=0.7, max_tokens=12, seed=7)
    session = Session(be, options, system="You are brief.")
    cache_bytes = be.kv_bytes()
    dropped = 0
    reasons: set[str] = set()
    samples: dict[int, tuple[float, int]] = {}
    tracemalloc.start()
    try:
        for turn in range(TURNS):
            text = f"Turn {turn}: tell me one short fact about {TOPICS[turn % len(TOPICS)]}."
            reply = None
            for event in session.reply(text):
                if isinstance(event, Notice):
                    assert "dropped" in event.text
                elif isinstance(event, Reply):
                    reply = event
            assert reply is not None
            reasons.add(reply.finish_reason)
            dropped += reply.dropped_turns
            assert reply.context_used <= CONTEXT and len(be.tokens) <= CONTEXT
            assert reply.prompt_tokens + reply.completion_tokens <= CONTEXT
            assert session.conversation()[0] == {"role": "system", "content": "You are brief."}
            assert be.kv_bytes() == cache_bytes  # the cache allocated at the start, never regrown
            if turn in (50, TURNS - 1):
                gc.collect()
                samples[turn] = (rss_mib(), tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
        be.close()
    assert dropped > 100, "the conversation should have outgrown the window many times"
    assert reasons <= {"stop", "length", "context"}
    rss_growth = samples[TURNS - 1][0] - samples[50][0]
    py_growth = samples[TURNS - 1][1] - samples[50][1]
    assert rss_growth < 32, f"RSS grew {rss_growth:.1f} MiB over 150 turns"
    assert py_growth < 4 * 2**20, f"Python allocations grew {py_growth / 2**20:.1f} MiB over 150 turns"
