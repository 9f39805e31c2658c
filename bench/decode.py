"""Decode and prefill speed: llmctl's torch runtime (fp32, bf16) against transformers' generate (fp32)
and, for a GGUF, llama.cpp (llama-cpp-python) on the file's own quantized weights.

    python bench/decode.py [MODEL] [--threads 2] [--prompt-len 128] [--new-tokens 64] [--repeats 5]

MODEL is a Hugging Face safetensors folder, a .gguf file or a bundled model name (default
smollm2-135m; GGUFs are dequantized to float, so every engine runs the same weights). All engines run in
this process with the same thread count, alternating run by run so that load from other processes hits
them alike. The best run is reported (on a shared machine other processes only ever slow a run down;
with 2 threads and one core taken, a run can be 10x slower), with the median decode rate alongside.
The prompt is random token ids; both engines decode greedily and ignore end-of-sequence, and the script
checks that they produce the same tokens in fp32.

Reported per engine: TTFT (prompt in, first token out), prefill tok/s (prompt length / TTFT) and decode
tok/s (tokens after the first / their time). transformers' TTFT is generate(max_new_tokens=1); its decode
rate comes from the difference with generate(max_new_tokens=N). llama.cpp runs ``Llama.generate`` greedily
(top_k=1) with the same thread count; it reads the GGUF's quantized weights (e.g. Q4_1, ~4.5x fewer bytes
than fp32), so it is the speed reference, not a same-weights comparison.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path


def load_weights(spec: str):
    """(ModelConfig, fp32 state dict or None, folder or None) for a MODEL argument."""
    from llmctl.sources import resolve

    source = resolve(spec)
    if source.is_gguf:
        from llmctl.runtime.gguf_loader import load_gguf_state_dict

        config, state = load_gguf_state_dict(source.path)
        return config, state, None
    return source.config, None, source.path


def llmctl_model(config, state, folder, dtype: str):
    from llmctl.runtime.loader import load_model, load_state_dict

    if folder is not None:
        return load_model(folder, dtype=dtype, device="cpu")
    return load_state_dict(config, state, dtype=dtype, device="cpu")


def transformers_model(config, state, folder):
    import torch
    import transformers

    if folder is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    fields = {k: v for k, v in config.to_dict().items() if k != "architectures"}
    if config.model_type == "gemma3_text":  # transformers' names and types for the same settings
        fields["hidden_activation"] = fields.pop("hidden_act")
        fields["query_pre_attn_scalar"] = int(fields["query_pre_attn_scalar"])
        fields["layer_types"] = config.layer_kinds()
    hf_config = transformers.AutoConfig.for_model(**fields)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    result = model.load_state_dict(state, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - allowed or result.unexpected_keys:
        sys.exit(f"transformers model does not match the weights: {result}")
    return model


def run_llmctl(model, prompt, new_tokens: int) -> tuple[float, float, list[int]]:
    """(TTFT seconds, decode seconds for new_tokens - 1 tokens, tokens)."""
    from llmctl.runtime.generate import greedy

    cache = model.make_cache(prompt.shape[1] + new_tokens)
    t0 = time.perf_counter()
    tokens, t_first = [], 0.0
    for token in greedy(model, cache, prompt[0].tolist(), new_tokens):
        if not tokens:
            t_first = time.perf_counter()
        tokens.append(token)
    return t_first - t0, time.perf_counter() - t_first, tokens


def run_llmctl_unfused(model, prompt, new_tokens: int) -> tuple[float, float, list[int]]:
    """run_llmctl with the Python layers (``LLMCTL_FUSED_DECODE=0``): the runtime before the fused step."""
    import os

    from llmctl.runtime.fused import ENV

    old = os.environ.get(ENV)
    os.environ[ENV] = "0"
    try:
        return run_llmctl(model, prompt, new_tokens)
    finally:
        if old is None:
            del os.environ[ENV]
        else:
            os.environ[ENV] = old


def run_transformers(model, prompt, new_tokens: int) -> tuple[float, float, list[int]]:
    import torch

    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, **kwargs)
        t1 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) - (t1 - t0), out[0, prompt.shape[1] :].tolist()


class LlamaCpp:
    """llama-cpp-python on the GGUF file, with its native logging silenced."""

    def __init__(self, path, n_ctx: int, threads: int) -> None:
        import llama_cpp

        from llmctl.runtime.llama_lib import load_guard  # llama.cpp's AMX path crashes here

        with load_guard():
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False,
            )  # fmt: skip


def run_llama_cpp(engine: LlamaCpp, prompt, new_tokens: int) -> tuple[float, float, list[int]]:
    llm = engine.llm
    llm.reset()  # forget the previous run's tokens, or generate() would reuse them as a cached prefix
    t0 = time.perf_counter()
    tokens, t_first = [], 0.0
    for token in llm.generate(prompt[0].tolist(), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
        if not tokens:
            t_first = time.perf_counter()
        tokens.append(token)
        if len(tokens) == new_tokens:
            break
    return t_first - t0, time.perf_counter() - t_first, tokens


def requantized_gguf(path: Path, kind: str, cache: Path) -> Path:
    """``path`` re-quantized to llama.cpp file type ``kind`` (Q8_0, Q4_0, ...) by llama.cpp's own quantizer
    (``llama_model_quantize``, allowing re-quantization: it dequantizes the file's weights first), kept
    under ``cache``."""
    import llama_cpp

    out = cache / f"{Path(path).stem}-{kind}.gguf"
    if not out.exists():
        ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind.upper()}", None)
        if ftype is None:
            raise SystemExit(f"--llama-types: llama.cpp has no file type {kind}")
        cache.mkdir(parents=True, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = ftype, True, 2
        tmp = out.with_suffix(".tmp")
        if llama_cpp.llama_model_quantize(str(path).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"llama.cpp could not quantize {path} to {kind}")
        tmp.replace(out)
    return out


def quantized_models(spec: str, formats: str, cache: Path) -> dict[str, object]:
    """llmctl's runtime on ``spec`` quantized to each of ``formats`` (``FORMAT[:GROUP]``, comma-separated),
    written once under ``cache`` (reused when present)."""
    from llmctl.quantize.convert import run_plan
    from llmctl.quantize.plan import make_plan
    from llmctl.runtime.loader import load_model

    out = {}
    for item in filter(None, formats.split(",")):
        fmt, _, group = item.partition(":")
        folder = cache / f"{Path(spec).name}-{fmt}-g{group or 'default'}"
        cache.mkdir(parents=True, exist_ok=True)
        if not (folder / "config.json").exists():
            run_plan(make_plan(spec, fmt, group_size=int(group) if group else None), folder, measure_error=False)
        out[f"llmctl {item}"] = load_model(folder, device="cpu")
    return out


def streamed_bytes(model) -> int:
    """Bytes of weights one decode step reads: every linear layer's (quantized) weight and the logits' matrix
    (the embedding lookup reads one row)."""
    import torch

    from llmctl.quant.qlinear import QuantWeight

    def size(w) -> int:
        return w.quantized_nbytes if isinstance(w, QuantWeight) else w.numel() * w.element_size()

    total = sum(size(m.weight) for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and name != "lm_head")  # fmt: skip
    head = model.head if getattr(model, "head", None) is not None else (
        model.model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight)  # fmt: skip
    return total + size(head)


class Ceiling:
    """The bandwidth a decode step in a dtype cannot beat, measured right before each run of an engine
    (``measure``): the faster of ``torch.mv`` streaming a matrix of that dtype (4096 columns) and
    ``torch.sum`` reading an fp32 tensor of as many bytes (every byte read once with the least work a byte;
    on the AMD EPYC seen here torch.mv reaches 21 GB/s in fp32 and 12 in bf16 where the sum reads at 35, so
    torch.mv alone is no ceiling there). Measured run by run because a VM's bandwidth drifts: the same sum
    read 28 to 41 GB/s within one minute there."""

    def __init__(self, nbytes: int):
        import torch

        cols = 4096
        self.matrices = {d: torch.randn(max(1, nbytes // (cols * torch.finfo(t).bits // 8)), cols).to(t)
                         for d, t in (("fp32", torch.float32), ("bf16", torch.bfloat16))}  # fmt: skip
        self.vectors = {d: torch.randn(cols).to(w.dtype) for d, w in self.matrices.items()}
        self.flat = torch.randn(max(1, nbytes // 4))

    def measure(self, dtype: str, repeats: int = 3) -> tuple[float, float]:
        """(torch.mv GB/s in ``dtype``, read GB/s), best of ``repeats`` each."""
        import torch

        w, x = self.matrices[dtype], self.vectors[dtype]
        mv = w.numel() * w.element_size() / _best(lambda: torch.mv(w, x), repeats) / 1e9
        read = self.flat.numel() * 4 / _best(lambda: self.flat.sum(), repeats) / 1e9
        return mv, read


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _dense_dtype(engine: str) -> str | None:
    """"fp32" / "bf16" for llmctl's dense engines ("llmctl bf16", "llmctl fp32 unfused"), else None."""
    d = engine.removeprefix("llmctl ").removesuffix(" unfused")
    return d if engine.startswith("llmctl ") and d in ("fp32", "bf16") else None


def _cpu() -> str:
    """The CPU's model name and the vector extensions that matter here."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")
    return f"{name} ({' '.join(f for f in wanted if f in flags)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtypes", default="fp32,bf16", help="llmctl compute dtypes, comma-separated")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp (GGUF models only)")
    parser.add_argument("--formats", default="", help="also llmctl on MODEL quantized to these, e.g. "
                        "int4-asym:32,int8,nf4,fp8 (FORMAT[:GROUP]; written once under --cache)")
    parser.add_argument("--llama-types", default="", help="also llama.cpp on the GGUF re-quantized by its own "
                        "quantizer to these types, e.g. Q8_0,Q4_0 (anchors at other bits; written once under --cache)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/llmctl/bench",
                        help="where --formats folders are kept")
    parser.add_argument("--unfused", action="store_true", help="also each llmctl engine with the Python "
                        "layers (LLMCTL_FUSED_DECODE=0: the runtime before the fused decode step), same models")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    import torch

    from llmctl.runtime.device import set_threads

    set_threads(args.threads)
    config, state, folder = load_weights(args.model)
    engines = {
        f"llmctl {d}": (run_llmctl, llmctl_model(config, state, folder, d)) for d in args.dtypes.split(",")
    }
    for name, model in quantized_models(args.model, args.formats, args.cache).items():
        engines[name] = (run_llmctl, model)
    if args.unfused:
        for name, (_, model) in list(engines.items()):
            engines[f"{name} unfused"] = (run_llmctl_unfused, model)
    streamed = {name: streamed_bytes(model) for name, (run, model) in engines.items()}
    if not args.no_transformers:
        engines["transformers fp32"] = (run_transformers, transformers_model(config, state, folder))
    del state
    from llmctl.sources import resolve

    source = resolve(args.model)
    if source.is_gguf and not args.no_llama_cpp:
        n_ctx = args.prompt_len + args.new_tokens + 16
        engines["llama.cpp (GGUF)"] = (run_llama_cpp, LlamaCpp(source.path, n_ctx, args.threads))
        for kind in filter(None, args.llama_types.split(",")):
            path = requantized_gguf(source.path, kind, args.cache)
            engines[f"llama.cpp {kind}"] = (run_llama_cpp, LlamaCpp(path, n_ctx, args.threads))

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=g)
    for run, model in engines.values():  # warm-up
        run(model, prompt[:, :16], 4)
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    tokens: dict[str, list[int]] = {}
    dense = {name: d for name in engines if (d := _dense_dtype(name))}
    ceiling = Ceiling(max(streamed.values())) if dense else None
    measured: dict[str, list[tuple[float, float]]] = {name: [] for name in dense}  # (torch.mv, read) GB/s
    for _ in range(args.repeats):
        for name, (run, model) in engines.items():
            if name in dense:
                measured[name].append(ceiling.measure(dense[name]))
            ttft, decode, tokens[name] = run(model, prompt, args.new_tokens)
            samples[name].append((ttft, decode))
    del ceiling

    rows = []
    for name, runs in samples.items():
        ttft = min(r[0] for r in runs)
        decode = [(args.new_tokens - 1) / r[1] for r in runs]
        rows.append(
            {
                "engine": name,
                "ttft_s": ttft,
                "prefill_tok_s": args.prompt_len / ttft,
                "decode_tok_s": max(decode),
                "decode_tok_s_median": statistics.median(decode),
            }
        )
    # A dense engine's ratio to its ceiling run by run (each run against the ceiling measured just before
    # it), then the median of those ratios; the best run's ratio alongside.
    for r in rows:
        name = r["engine"]
        if name in streamed:
            r["streamed_mb"] = streamed[name] / 1e6
            r["gb_s"] = streamed[name] * r["decode_tok_s"] / 1e9
        if name in dense:
            ratios = [streamed[name] * (args.new_tokens - 1) / d / 1e9 / max(c)
                      for (_, d), c in zip(samples[name], measured[name], strict=True)]  # fmt: skip
            r["ceiling_gb_s"] = [max(c) for c in measured[name]]
            r["torch_mv_gb_s"] = [c[0] for c in measured[name]]
            r["vs_ceiling"] = statistics.median(ratios)
            r["vs_ceiling_best"] = max(ratios)
    base = next((r["decode_tok_s"] for r in rows if r["engine"] == "transformers fp32"), None)
    anchor = next((r["decode_tok_s"] for r in rows if r["engine"] == "llama.cpp (GGUF)"), None)
    cpu = _cpu()
    print(
        f"{args.model}: prompt {args.prompt_len} tokens, {args.new_tokens} new, {args.threads} threads, "
        f"best of {args.repeats} runs (median decode alongside)\nCPU: {cpu}"
    )
    for r in rows:
        if "ceiling_gb_s" in r:
            print(f"ceiling before each run of {r['engine']} (the faster of torch.mv in its dtype and a plain "
                  f"read), GB/s: {' '.join(f'{c:.1f}' for c in r['ceiling_gb_s'])} (torch.mv: "
                  f"{' '.join(f'{c:.1f}' for c in r['torch_mv_gb_s'])})")  # fmt: skip
    print("vs ceiling: the median over runs of each run's GB/s over the ceiling measured just before it (best run's)")
    print(
        f"{'engine':<30} {'TTFT ms':>9} {'prefill tok/s':>14} {'decode tok/s':>13} {'median':>7} {'vs HF':>6} "
        f"{'vs llama.cpp':>12} {'MB/token':>9} {'GB/s':>6} {'vs ceiling':>16}"
    )
    for r in rows:
        ratio = f"{r['decode_tok_s'] / base:.2f}x" if base else ""
        vs = f"{r['decode_tok_s'] / anchor:.2f}x" if anchor else ""
        mb = f"{r['streamed_mb']:.0f}" if "streamed_mb" in r else ""
        gbs = f"{r['gb_s']:.1f}" if "gb_s" in r else ""
        ceil = f"{r['vs_ceiling']:.2f}x ({r['vs_ceiling_best']:.2f}x)" if "vs_ceiling" in r else ""
        print(
            f"{r['engine']:<30} {r['ttft_s'] * 1e3:>9.1f} {r['prefill_tok_s']:>14.1f} "
            f"{r['decode_tok_s']:>13.2f} {r['decode_tok_s_median']:>7.2f} {ratio:>6} {vs:>12} {mb:>9} {gbs:>6} {ceil:>16}"
        )
    if "llmctl fp32" in tokens and "transformers fp32" in tokens:
        same = tokens["llmctl fp32"] == tokens["transformers fp32"]
        print(f"greedy tokens identical (llmctl fp32 vs transformers): {'yes' if same else 'NO'}")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json), "cache": str(args.cache)}, "cpu": cpu,
                        "results": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
