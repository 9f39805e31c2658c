"""The GPU path on a CUDA machine, in one run (scripts/gpu-check.sh runs it with the .venv):

1. parity with transformers on both bundled models (SmolLM2 135M, Gemma 3 270M; the GGUFs' weights
   dequantized, so both engines run the same numbers): llmctl and transformers in fp32, bf16 and fp16
   against transformers in fp32, as max |Δlogit| / max |logit|, for the cache-free forward (is_causal
   attention) and for chunked prefill + decode through the KV cache (masked attention); llmctl passes in
   bf16/fp16 when its error is within twice transformers' own in that dtype (plus 1e-3), in fp32 below 1e-4;
2. every quantized format (``llmctl quantize`` of SmolLM2 into a temporary folder) loaded on CUDA: which
   kernels its weights run, its logits against the same model with those weights dequantized (both bf16),
   and 16 greedy tokens with their decode rate;
3. decode tok/s of llmctl (bf16) against transformers' ``generate`` with ``cache_implementation="static"``.

Prints one table; exits 1 when a parity or kernel check fails, 2 when there is no CUDA device.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT, CHUNK, DECODE = 64, 16, 8  # parity prompt length, prefill chunk, decode steps compared
QUANT_FORMATS = ("bf16", "int8", "int4", "int4-asym", "nf4", "fp8")
QUANT_LIMITS = {"bf16": 1e-3, "int4": 3e-2, "int4-asym": 3e-2}  # others 2e-2 (bf16 kernels vs bf16 dense)
ROWS: list[dict] = []
DEVICE = "cuda"  # --device cpu: a dry run of this script's code on a machine without a GPU (slow, no verdict)


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def row(check: str, model: str, variant: str, value: float | str, limit: str, ok: bool | None) -> None:
    status = "skip" if ok is None else "ok" if ok else "FAIL"
    ROWS.append(dict(check=check, model=model, variant=variant, value=value, limit=limit, status=status))


def rel(a, b) -> float:
    """max |a - b| / max |b| in float64 (inf when either holds a NaN or an infinity)."""
    import torch

    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).abs().max() / b.abs().max())


# ---- 1. parity with transformers ----------------------------------------------------------------------
def transformers_model(config, state):
    sys.path.insert(0, str(ROOT / "bench"))
    from decode import transformers_model as build  # the GGUF's config as transformers' class for it

    return build(config, state, None)


def llmctl_logits(model, tokens):
    """(cache-free logits (1, T, V), logits of the last DECODE positions fed one at a time through the KV
    cache after a prefill in chunks of CHUNK (1, DECODE, V))."""
    import torch

    with torch.no_grad():
        whole = model(tokens)
        cache = model.make_cache(tokens.shape[1])
        body = tokens.shape[1] - DECODE
        for s in range(0, body, CHUNK):
            model(tokens[:, s : min(s + CHUNK, body)], cache)
        steps = [model(tokens[:, t : t + 1], cache) for t in range(body, tokens.shape[1])]
    return whole, torch.cat(steps, dim=1)


def parity(name: str, path: Path) -> None:
    import copy

    import torch

    from llmctl.runtime.gguf_loader import load_gguf_state_dict
    from llmctl.runtime.loader import load_model

    config, state = load_gguf_state_dict(path)
    hf = transformers_model(config, state).to(DEVICE)
    del state
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (1, PROMPT), generator=g).to(DEVICE)
    with torch.no_grad():
        ref = hf(tokens).logits.float()  # fp32, TF32 off
    for dtype in ("fp32", "bf16", "fp16"):
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        with torch.no_grad():
            theirs = copy.deepcopy(hf).to(torch_dtype)(tokens).logits.float()  # hf itself stays fp32
        e_hf = rel(theirs, ref)
        model = load_model(path, dtype=dtype, device=DEVICE)
        whole, cached = llmctl_logits(model, tokens)
        del model
        limit = 1e-4 if dtype == "fp32" else 2 * e_hf + 1e-3
        for check, ours, want in (
            ("parity forward", whole, ref),
            ("parity cached", cached, ref[:, -DECODE:]),
        ):
            e = rel(ours.float(), want)
            if dtype != "fp32" and e_hf == float("inf"):  # transformers overflows too (Gemma in fp16)
                row(check, name, dtype, e, "transformers non-finite", None)
            else:
                row(check, name, dtype, e, f"<= {limit:.2e} (HF {e_hf:.2e})", e <= limit)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


# ---- 2. quantized formats on CUDA ---------------------------------------------------------------------
def quantize(src: Path, fmt: str, out: Path) -> None:
    cmd = [sys.executable, "-m", "llmctl", "quantize", str(src), "--format", fmt, "--out", str(out)]
    if fmt.startswith("int4"):
        cmd += ["--group-size", "64"]  # SmolLM2's rows (576) take 64, not int4's default 128
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def dense_copy(model):
    """The model with each quantized weight replaced by its dequantized parameter."""
    import torch

    from llmctl.quant.qlinear import QuantWeight

    for module in model.modules():
        for name, value in list(vars(module).items()):
            if isinstance(value, QuantWeight):
                delattr(module, name)
                if name == "head":
                    setattr(module, name, None)
                else:
                    setattr(module, name, torch.nn.Parameter(value.dequantize(), requires_grad=False))
    return model


def kernels_of(model) -> str:
    from llmctl.quant.qlinear import QuantWeight

    found = {v.kernel for m in model.modules() for v in vars(m).values() if isinstance(v, QuantWeight)}
    return ",".join(sorted(found)) or "dense"


def greedy_rate(model, prompt: list[int], n: int) -> tuple[list[int], float]:

    from llmctl.runtime.generate import greedy

    cache = model.make_cache(len(prompt) + n)
    tokens, t_first = [], 0.0
    for token in greedy(model, cache, prompt, n):
        if not tokens:
            sync()
            t_first = time.perf_counter()
        tokens.append(token)
    sync()
    return tokens, (n - 1) / (time.perf_counter() - t_first)


def start_quantizing(src: Path, workdir: Path) -> dict:
    """fmt -> future of its ``llmctl quantize`` run: CPU work, started first so that it overlaps parity."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=2)
    jobs = {fmt: pool.submit(quantize, src, fmt, workdir / fmt) for fmt in QUANT_FORMATS}
    pool.shutdown(wait=False)
    return jobs


def quantized_formats(src: Path, workdir: Path, jobs: dict) -> None:
    import torch

    from llmctl.runtime.loader import load_model

    g = torch.Generator().manual_seed(1)
    base = load_model(src, dtype="bf16", device=DEVICE)  # the GGUF's weights as the bf16 folder holds them
    tokens = torch.randint(0, base.config.vocab_size, (1, PROMPT), generator=g).to(DEVICE)
    prompt = tokens[0, :32].tolist()
    for fmt in QUANT_FORMATS:
        out = workdir / fmt
        try:
            jobs[fmt].result()
        except subprocess.CalledProcessError as e:
            last = ((e.stderr or "").strip().splitlines() or ["(no message)"])[-1][:60]
            row("quantize", "smollm2-135m", fmt, last, "runs", False)
            continue
        if fmt == "bf16":  # a conversion: the same numbers as the GGUF loaded in bf16
            model, reference = load_model(out, dtype="bf16", device=DEVICE), base
        else:  # auto dtype: bf16 on compute capability >= 8.0, else fp16
            model, reference = load_model(out, device=DEVICE), dense_copy(load_model(out, device=DEVICE))
        with torch.no_grad():
            e = rel(model(tokens).float(), reference(tokens).float())
        limit = QUANT_LIMITS.get(fmt, 2e-2)
        row(
            "kernels vs dequantized",
            "smollm2-135m",
            f"{fmt} [{kernels_of(model)}]",
            e,
            f"<= {limit:g}",
            e <= limit,
        )
        greedy_rate(model, prompt[:8], 4)  # warm-up
        new, rate = greedy_rate(model, prompt, 16)
        row("decode 16 tok/s", "smollm2-135m", fmt, rate, "16 tokens", len(new) == 16)
        del model, reference
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


# ---- 3. decode speed against transformers' static cache -----------------------------------------------
def decode_speed(src: Path, new_tokens: int) -> None:
    import torch

    from llmctl.runtime.gguf_loader import load_gguf_state_dict
    from llmctl.runtime.loader import load_model

    model = load_model(src, dtype="bf16", device=DEVICE)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (1, 32), generator=g)
    greedy_rate(model, prompt[0, :8].tolist(), 4)
    ours, rate = greedy_rate(model, prompt[0].tolist(), new_tokens)
    row("decode tok/s", "smollm2-135m", "llmctl bf16", rate, f"{new_tokens} tokens", None)
    config, state = load_gguf_state_dict(src)
    hf = transformers_model(config, state).to(DEVICE, torch.bfloat16)
    ids = prompt.to(DEVICE)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None, pad_token_id=0)
    try:
        with torch.no_grad():
            hf.generate(
                ids, max_new_tokens=new_tokens, cache_implementation="static", **kw
            )  # warm-up / compile
            times = []
            for n in (1, new_tokens):
                sync()
                t0 = time.perf_counter()
                out = hf.generate(
                    ids, max_new_tokens=n, min_new_tokens=n, cache_implementation="static", **kw
                )
                sync()
                times.append(time.perf_counter() - t0)
        hf_rate = (new_tokens - 1) / (times[1] - times[0])
        row("decode tok/s", "smollm2-135m", "transformers bf16 static", hf_rate, f"{new_tokens} tokens", None)
        row("decode vs HF", "smollm2-135m", "bf16", rate / hf_rate, "ratio", None)
        same = out[0, 32:].tolist()[:16] == ours[:16]
        row("greedy tokens", "smollm2-135m", "bf16 first 16 equal HF", str(same), "info (bf16 ties)", None)
    except Exception as e:  # a transformers / torch.compile problem is reported, not a parity failure
        row("decode tok/s", "smollm2-135m", "transformers bf16 static", f"error: {e}"[:60], "", None)


# ---- main -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="decode speed: tokens generated")
    parser.add_argument("--device", default="cuda", help="cpu: dry-run this script's code without a GPU")
    parser.add_argument(
        "--skip-quantized", action="store_true", help="skip section 2 (quantizing takes CPU time)"
    )
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device

    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "built without CUDA"
        print(f"gpu-check: no CUDA device (torch {torch.__version__}, {built}, sees none)", file=sys.stderr)
        return 2
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # fp32 references without TF32
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    import llama_cpp

    from llmctl.quant.cuda_kernels import bitsandbytes
    from llmctl.runtime.device import compute_dtype
    from llmctl.sources import BUNDLED, bundled_path

    if DEVICE == "cuda":
        index = torch.cuda.current_device()
        cap = torch.cuda.get_device_capability(index)
        gpu = f"{torch.cuda.get_device_name(index)}, compute capability {cap[0]}.{cap[1]}"
    else:
        gpu = f"{DEVICE} (a dry run of this script: no verdict on the GPU path)"
    print(
        f"{gpu}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), auto dtype {compute_dtype(torch.device(DEVICE))}, bitsandbytes "
        f"{'yes' if bitsandbytes() is not None else 'no'}, llama.cpp GPU offload "
        f"{'yes' if llama_cpp.llama_supports_gpu_offload() else 'no'}",
        flush=True,
    )
    paths = {name: bundled_path(BUNDLED[name]) for name in ("smollm2-135m", "gemma3-270m")}
    missing = [n for n, p in paths.items() if p is None]
    if missing:
        print(
            f"gpu-check: bundled model(s) {', '.join(missing)} not installed; run scripts/install.sh",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmctl-gpu-check-") as work:
        jobs = {} if args.skip_quantized else start_quantizing(paths["smollm2-135m"], Path(work))
        for name, path in paths.items():
            parity(name, path)
            print(f"parity {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        if jobs:
            quantized_formats(paths["smollm2-135m"], Path(work), jobs)
            print(f"quantized formats done ({time.perf_counter() - t0:.0f} s)", flush=True)
    decode_speed(paths["smollm2-135m"], args.new_tokens)

    print(f"\n{'check':<24} {'model':<14} {'variant':<40} {'value':>10}  {'limit':<30} status")
    for r in ROWS:
        v = r["value"]
        value = f"{v:.3g}" if isinstance(v, float) else str(v)
        print(
            f"{r['check']:<24} {r['model']:<14} {r['variant']:<40} {value:>10}  {r['limit']:<30} {r['status']}"
        )
    failed = [r for r in ROWS if r["status"] == "FAIL"]
    print(f"\n{len(failed)} failed of {len(ROWS)} rows ({time.perf_counter() - t0:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
