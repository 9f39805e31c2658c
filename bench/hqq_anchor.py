"""HQQ (half-quadratic quantization, PyPI ``hqq``) on a Hugging Face folder: the calibration-free anchor of
bench/quality.py's search rows (issue 22).

Every linear layer but ``lm_head`` (and the tied embedding) is quantized by ``hqq.core.quantize.Quantizer``
— ``nbits`` bits, asymmetric, groups of ``group_size`` along the input dimension (``axis=1``, as llmctl's
groups), its zero-point optimisation on (``optimize=True``), scales and zero-points kept in fp16 — then
dequantized back, and the folder is saved in fp32: the weights HQQ would compute with, in a layout every
engine loads, so ``llmctl eval OUT --baseline-logits ...`` scores it like any other row. Bits per weight:
``nbits`` + 32 / ``group_size`` (fp16 scale and zero-point per group). Run it in a venv with hqq and
transformers (``~/.cache/llmctl/llmcompressor-venv`` has both):

    ~/.cache/llmctl/llmcompressor-venv/bin/python bench/hqq_anchor.py SRC --out OUT [--group-size 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--nbits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from hqq.core.quantize import Quantizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
    t0, n = time.perf_counter(), 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name.endswith("lm_head"):
                continue
            w = module.weight.data
            q, meta = Quantizer.quantize(
                w, nbits=args.nbits, group_size=args.group_size, optimize=True, axis=1, bitpack=False,
                compute_dtype=torch.float16, device="cpu",
            )  # fmt: skip
            module.weight.data = Quantizer.dequantize(q, meta).reshape(w.shape).to(torch.float32)
            n += 1
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.src).save_pretrained(args.out)
    print(json.dumps({"out": str(args.out), "linears": n, "seconds": round(seconds, 1), "nbits": args.nbits,
                      "group_size": args.group_size, "bits_per_weight": args.nbits + 32 / args.group_size}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
