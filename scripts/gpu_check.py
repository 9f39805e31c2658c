"""The GPU path on a CUDA machine, in one run (scripts/gpu-check.sh runs it with the .venv):

1. parity with transformers on both bundled models (SmolLM2 135M, Gemma 3 270M; the GGUFs' weights
   dequantized, so both engines run the same numbers): llmctl and transformers in fp32, bf16 and fp16
   against transformers in fp32, as max |Δlogit| / max |logit|, for the cache-free forward (is_causal
   attention) and for chunked prefill + decode through the KV cache (masked attention); llmctl passes in
   bf16/fp16 when its error is within twice transformers' own in that dtype (plus 1e-3), in fp32 below 1e-4;
2. every quantized format (``llmctl quantize`` of SmolLM2 into a temporary folder) loaded on CUDA: which
   kernels its weights run, its logits against the same weights dequantized and run in fp32 (passing within
   twice the dequantized model's own error in the GPU's dtype, plus 1e-3: section 1's rule), and 16 greedy
   tokens with their decode rate;
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
ROWS: list[dict] = []
DEVICE = "cuda"  # --device cpu: a dry run of this script's code on a machine without a GPU (slow, no verdict)


def sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def row(check: str, model: str, variant: str, value: float | str, limit: str, ok: bool | None) -> None:
    status = "skip" if ok is None else "ok" if ok else "FAIL"
    ROWS.append(dict(check=check, model=model, variant=variant, value=value, limit=limit, status=status))
    # each row as it comes (a run cut short still shows what it measured); the table comes at the end
    print(f"  {check}, {model}, {variant}: {value} ({limit}) {status}", flush=True)


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
        # SmolLM2's rows (576) take 64, not int4's default 128; rtn: the kernels are checked against the same
        # weights dequantized, so the scales' method does not matter, and the search without llmctl's C++
        # kernels (not built on a bare GPU machine) takes minutes
        cmd += ["--group-size", "64", "--method", "rtn"]
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


def dense_copy_fp32(out: Path, tokens):
    """Logits of the quantized folder's weights dequantized (as its kernels see them) and run in fp32."""
    from llmctl.runtime.loader import load_model

    return dense_copy(load_model(out, dtype="fp32", device=DEVICE))(tokens).float()


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
            jobs[fmt].result(timeout=300)
        except TimeoutError:
            row("quantize", "smollm2-135m", fmt, "no result in 300 s", "runs", False)
            continue
        except subprocess.CalledProcessError as e:
            last = ((e.stderr or "").strip().splitlines() or ["(no message)"])[-1][:60]
            row("quantize", "smollm2-135m", fmt, last, "runs", False)
            continue
        if fmt == "bf16":  # a conversion: the same numbers as the GGUF loaded in bf16
            model = load_model(out, dtype="bf16", device=DEVICE)
            with torch.no_grad():
                e = rel(model(tokens).float(), base(tokens).float())
            limit, ok, kind = "<= 1e-3 (vs the GGUF in bf16)", e <= 1e-3, kernels_of(model)
        else:
            # auto dtype (bf16 on compute capability >= 8.0, else fp16) against the same weights dequantized
            # and run in fp32; passes within twice the dequantized model's own error in that dtype (+1e-3),
            # section 1's rule: two bf16 runs of 30 layers differ by about that much from rounding alone
            model = load_model(out, device=DEVICE)
            kind = kernels_of(model)
            with torch.no_grad():
                ours = model(tokens).float()
                dense = dense_copy(load_model(out, device=DEVICE))
                e_dense = rel(dense(tokens).float(), exact := dense_copy_fp32(out, tokens))
                del dense
                e = rel(ours, exact)
            limit, ok = f"<= {2 * e_dense + 1e-3:.2e} (dense {e_dense:.2e})", e <= 2 * e_dense + 1e-3
        row("kernels vs dequantized", "smollm2-135m", f"{fmt} [{kind}]", e, limit, ok)
        greedy_rate(model, prompt[:8], 4)  # warm-up
        new, rate = greedy_rate(model, prompt, 16)
        row("decode 16 tok/s", "smollm2-135m", fmt, rate, "16 tokens", len(new) == 16)
        del model
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


def section(name: str, run, *args) -> None:
    """Run one section; an exception is a failed row with its traceback printed, and the next section runs."""
    import traceback

    try:
        run(*args)
    except Exception as e:
        traceback.print_exc()
        row(name, "-", "raised", f"{type(e).__name__}: {e}"[:60], "no exception", False)


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
    parser.add_argument(
        "--parity",
        default="smollm2-135m,gemma3-270m",
        help="section 1: the models compared with transformers (comma-separated; empty: none)",
    )
    parser.add_argument("--skip-decode", action="store_true", help="skip section 3")
    parser.add_argument("--smollm2", type=Path, help="SmolLM2-135M Q4_1 GGUF (default: the bundled one)")
    parser.add_argument("--gemma", type=Path, help="Gemma-3-270M Q4_K_M GGUF (default: the bundled one)")
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

    try:  # optional here: only its offload support is reported
        import llama_cpp

        offload = "yes" if llama_cpp.llama_supports_gpu_offload() else "no"
    except ImportError:
        offload = "not installed"

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
        f"{offload}",
        flush=True,
    )
    given = {"smollm2-135m": args.smollm2, "gemma3-270m": args.gemma}
    wanted = [m for m in args.parity.split(",") if m]
    needed = set(wanted) | ({"smollm2-135m"} if not (args.skip_quantized and args.skip_decode) else set())
    paths = {name: given[name] or bundled_path(BUNDLED[name]) for name in given if name in needed}
    missing = [n for n, p in paths.items() if p is None]
    if missing:
        print(
            f"gpu-check: bundled model(s) {', '.join(missing)} not installed; run scripts/install.sh "
            "or name the GGUFs with --smollm2/--gemma",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="llmctl-gpu-check-") as work:
        jobs = {} if args.skip_quantized else start_quantizing(paths["smollm2-135m"], Path(work))
        for name in wanted:
            section(f"parity {name}", parity, name, paths[name])
            print(f"parity {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
        if jobs:
            section("quantized formats", quantized_formats, paths["smollm2-135m"], Path(work), jobs)
            print(f"quantized formats done ({time.perf_counter() - t0:.0f} s)", flush=True)
    if not args.skip_decode:
        section("decode speed", decode_speed, paths["smollm2-135m"], args.new_tokens)

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
