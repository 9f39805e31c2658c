"""Chat speed per backend: time to first token (cold and with the KV cache reused) and tokens/s.

    python bench/chat.py [MODEL ...] [--threads 2] [--max-tokens 64] [--repeats 3] [--json out.json]

MODELs default to the bundled smollm2-135m and gemma3-270m. For each model, every engine runs the same
two-turn conversation through ``llmctl.runtime.session.Session`` (what `llmctl chat` runs), with the
default sampler (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05) and a fixed seed:

* turn 1: a fresh cache, the whole prompt is prefilled → **TTFT cold**;
* turn 2: a follow-up question; only its new tokens are prefilled → **TTFT reused** (and the count);
* **decode tok/s**: tokens after the first / their time, over both turns.

Engines: ``llama.cpp`` (llmctl's llama.cpp backend), ``torch fp32`` (llmctl's torch runtime on the
dequantized GGUF) and, as the anchor for the llama.cpp backend's own overhead, ``llama-cpp-python``: the
same prompt tokens through ``Llama.generate`` with the same sampler settings (its turn-2 TTFT uses its
own prefix matching). Engines alternate run by run so that load from other processes hits them alike;
the best run is reported (other processes only slow a run down) with the median decode rate alongside.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

TURNS = (
    "Write a short story about a lighthouse keeper and a storm.",
    "Now tell the same story from the point of view of the storm.",
)


def llmctl_engine(model: str, backend: str, threads: int, context: int, dtype: str | None = None):
    from llmctl.runtime.session import load_backend

    b, _ = load_backend(model, backend, context=context, threads=threads, dtype=dtype)
    return b


def run_llmctl(backend, max_tokens: int, seed: int) -> list[dict]:
    """Both turns through a Session; per turn: ttft, prefilled, prompt, tokens, decode seconds."""
    from llmctl.runtime.sampler import SamplingOptions
    from llmctl.runtime.session import Session

    backend.reset()
    s = Session(backend, SamplingOptions(seed=seed, max_tokens=max_tokens))
    out = []
    for text in TURNS:
        r = s.complete(text)
        out.append(
            dict(ttft=r.ttft_s, prefilled=r.prefilled_tokens, prompt=r.prompt_tokens,
                 tokens=r.completion_tokens, decode_s=r.total_s - r.ttft_s)
        )  # fmt: skip
    return out


class RawLlama:
    """llama-cpp-python's own generation loop on the same token ids (the anchor)."""

    def __init__(self, model: str, threads: int, context: int, tokenizer) -> None:
        import llama_cpp

        from llmctl.runtime.llama_lib import load_guard
        from llmctl.sources import resolve

        with load_guard():
            self.llm = llama_cpp.Llama(
                model_path=str(resolve(model).path), n_ctx=context, n_threads=threads,
                n_threads_batch=threads, verbose=False, n_gpu_layers=0,
            )  # fmt: skip
        self.tokenizer = tokenizer

    def run(self, max_tokens: int, seed: int) -> list[dict]:
        from llmctl.runtime.backend import common_prefix

        tok = self.tokenizer
        self.llm.reset()
        self.llm.set_seed(seed)
        messages: list[dict] = []
        out = []
        for text in TURNS:
            messages.append({"role": "user", "content": text})
            ids = tok.encode_chat(messages)
            cached = list(self.llm.input_ids[: self.llm.n_tokens])
            reused = min(common_prefix(cached, ids), len(ids) - 1)
            t0 = time.perf_counter()
            got: list[int] = []
            t_first = t0
            for t in self.llm.generate(ids, temp=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.0):
                if not got:
                    t_first = time.perf_counter()
                if t in tok.eos_ids:
                    break
                got.append(t)
                if len(got) >= max_tokens:
                    break
            t1 = time.perf_counter()
            messages.append({"role": "assistant", "content": tok.decode(got, skip_special=True)})
            out.append(dict(ttft=t_first - t0, prefilled=len(ids) - reused, prompt=len(ids), tokens=len(got),
                            decode_s=t1 - t_first))  # fmt: skip
        return out

    def close(self) -> None:
        self.llm.close()


def bench_model(model: str, args) -> list[dict]:
    engines = {}
    engines["llama.cpp"] = llmctl_engine(model, "llama.cpp", args.threads, args.context)
    for d in args.dtypes.split(","):
        if d:
            engines[f"torch {d}"] = llmctl_engine(model, "torch", args.threads, args.context, d)
    runners = {name: (lambda b=b: run_llmctl(b, args.max_tokens, args.seed)) for name, b in engines.items()}
    raw = None
    if not args.no_anchor:
        raw = RawLlama(model, args.threads, args.context, engines["llama.cpp"].tokenizer)
        runners["llama-cpp-python (anchor)"] = lambda: raw.run(args.max_tokens, args.seed)
    for run in runners.values():  # warm-up
        run()
    samples: dict[str, list[list[dict]]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            samples[name].append(run())
    rows = []
    for name, runs in samples.items():
        rates = []
        for turns in runs:
            n = sum(t["tokens"] - 1 for t in turns if t["tokens"] > 1)
            secs = sum(t["decode_s"] for t in turns if t["tokens"] > 1)
            rates.append(n / secs if secs else 0.0)
        last = runs[-1]
        rows.append(
            {
                "model": model,
                "engine": name,
                "prompt_tokens": last[0]["prompt"],
                "ttft_cold_s": min(r[0]["ttft"] for r in runs),
                "turn2_prompt_tokens": last[1]["prompt"],
                "turn2_prefilled": last[1]["prefilled"],
                "ttft_reused_s": min(r[1]["ttft"] for r in runs),
                "decode_tok_s": max(rates),
                "decode_tok_s_median": statistics.median(rates),
                "tokens": [t["tokens"] for t in last],
            }
        )
    for b in engines.values():
        b.close()
    if raw is not None:
        raw.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtypes", default="fp32", help="torch compute dtypes, comma-separated ('' = none)")
    parser.add_argument("--no-anchor", action="store_true", help="skip llama-cpp-python's own loop")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from llmctl.runtime.device import set_threads

    set_threads(args.threads)
    rows = []
    for model in args.models:
        rows += bench_model(model, args)
    print(
        f"chat speed: 2 turns, up to {args.max_tokens} tokens each, {args.threads} threads, default sampler, "
        f"best of {args.repeats} runs (median decode alongside)"
    )
    print(
        f"{'model':<14} {'engine':<27} {'prompt':>6} {'TTFT cold':>10} {'turn 2 new/all':>15} "
        f"{'TTFT reused':>12} {'tok/s':>7} {'median':>7}"
    )
    for r in rows:
        print(
            f"{r['model']:<14} {r['engine']:<27} {r['prompt_tokens']:>6} {r['ttft_cold_s'] * 1e3:>8.0f}ms "
            f"{r['turn2_prefilled']:>7}/{r['turn2_prompt_tokens']:<7} {r['ttft_reused_s'] * 1e3:>10.0f}ms "
            f"{r['decode_tok_s']:>7.1f} {r['decode_tok_s_median']:>7.1f}"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)}, "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
