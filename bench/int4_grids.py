"""Which int4 g128 grids close the gap to HQQ (issue 22): candidate quantizers scored by mean KLD on Gemma-3-270M.

Every projection weight of bench/quality.py's source folder (WORKDIR/src: the bundled Gemma-3-270M GGUF
dequantized to bf16, so losses are relative to the GGUF's own weights) goes through one candidate, in groups
of 128 along the input dimension, and back; the folder is saved with those weights in fp32 and scored by
``llmctl eval --baseline-logits`` exactly as bench/quality.py's rows (run that first, e.g. with
``--rows '^int4-g128-asym-search$'``, to make WORKDIR). Candidates, all 4-bit with an fp16 scale per group:

- ``rtn``: llmctl's int4-asym round to nearest (integer zero-point; 4.156 bits/weight).
- ``search``: llmctl's int4-asym ``--method search`` (the format's own quantize; 4.156).
- ``hqq``: HQQ's zero-point optimisation re-implemented (its ``optimize_weights_proximal_legacy``: grid on
  [min, max], ℓ0.7 half-quadratic updates of a *fractional* zero-point, β 10, κ 1.01, ≤ 20 iterations,
  stopping when the mean |error| of the tensor stops falling), scale and zero-point in fp16 (4.25).
- ``hqq-minmax``: the same grid before any optimisation: [min, max] in 15 steps, fractional zero (4.25).
- ``hqq-int-zero``: ``hqq`` with its zero-point rounded to an integer, as int4-asym stores it (4.156).
- ``search-debias``: ``search``, then the codes nearest a rounding boundary moved one step so each group's
  summed error is at most half a step (HQQ's groups have ~13x smaller mean errors than the search's; 4.156).
- ``extreme``: the integer-zero grids that put the group's largest-magnitude value exactly on a code (15
  scales), the one with the smallest rms + |x| weighted squared error (4.156).

    python bench/int4_grids.py [--workdir /tmp/llmctl-quality] [--threads 2] CANDIDATE ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HF_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight$")
G, QMIN, QMAX = 128, -8, 7


def _fp16_up(x):
    import torch

    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h).float()


def _int_grid(x, s, zp):
    import torch

    q = (torch.round(x / s[:, None]) + zp[:, None]).clamp(QMIN, QMAX)
    return q, (q - zp[:, None]) * s[:, None]


def hqq(x, iters: int = 20, p: float = 0.7, beta: float = 10.0, kappa: float = 1.01, int_zero: bool = False):
    import torch

    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    inv = (15 / (hi - lo)).clamp(max=2e4).half().float()  # HQQ's convention: q = round(x · inv + zero), 0..15
    zero = -lo * inv
    best = float("inf")
    for _ in range(iters):
        q = torch.round(x * inv + zero).clamp(0, 15)
        r = (q - zero) / inv
        err = (x - r).abs().mean().item()
        if err >= best:
            break
        best = err
        e = x - r
        a = e.abs()
        e = torch.sign(e) * (a - a.pow(p - 1) / beta).clamp_min(0)  # ℓp shrinkage of the residual
        zero = (q - (x - e) * inv).mean(-1, keepdim=True)
        beta *= kappa
    zero = zero.half().float()
    if int_zero:
        zero = torch.round(zero).clamp(0, 15)
    q = torch.round(x * inv + zero).clamp(0, 15)
    return (q - zero) * (1 / inv).half().float()


def llmctl_int4_asym(x, method: str):
    from llmctl.quant.formats import REGISTRY

    return REGISTRY["int4-asym"].quantize(x, G, method=method).dequantize().reshape(x.shape)


def search_debias(x):
    import torch

    from llmctl.quant.formats import REGISTRY

    fmt = REGISTRY["int4-asym"]
    qt = fmt.quantize(x, G, method="search")
    s = qt.parts["scale"].float().reshape(-1)
    zp = fmt.codes(qt)[1].float().reshape(-1)
    q, r = _int_grid(x, s, zp)
    e = r - x
    k = torch.round(e.sum(-1) / s)[:, None]  # > 0: the group's values sum k steps too high
    ninf = torch.full_like(e, -float("inf"))
    # the k values rounded up the most move down a step (the -k rounded down the most move up)
    down = torch.where(q > QMIN, e, ninf).argsort(-1, descending=True).argsort(-1) < k
    up = torch.where(q < QMAX, -e, ninf).argsort(-1, descending=True).argsort(-1) < -k
    q = q - (down & (q > QMIN)).float() + (up & (q < QMAX)).float()
    return (q - zp[:, None]) * s[:, None]


def extreme(x):
    import torch

    lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
    pos = hi >= -lo
    ext = torch.where(pos, hi, -lo)
    w = x.square().mean(-1, keepdim=True).sqrt() + x.abs()
    best = bs = bz = None
    for m in range(1, 16):  # the extreme m steps from 0, on the last code of its side
        s = _fp16_up(ext / m).clamp_min(1e-38)
        zp = torch.where(pos, torch.full_like(s, QMAX - m), torch.full_like(s, QMIN + m))
        err = ((_int_grid(x, s, zp)[1] - x).square() * w).sum(-1)
        if best is None:
            best, bs, bz = err, s, zp
            continue
        b = err < best
        best, bs, bz = torch.where(b, err, best), torch.where(b, s, bs), torch.where(b, zp, bz)
    return _int_grid(x, bs, bz)[1]


CANDIDATES = {
    "rtn": (lambda x: llmctl_int4_asym(x, "rtn"), 4 + 16 / G + 4 / G),
    "search": (lambda x: llmctl_int4_asym(x, "search"), 4 + 16 / G + 4 / G),
    "hqq": (hqq, 4 + 32 / G),
    "hqq-minmax": (lambda x: hqq(x, iters=0), 4 + 32 / G),
    "hqq-int-zero": (lambda x: hqq(x, int_zero=True), 4 + 16 / G + 4 / G),
    "search-debias": (search_debias, 4 + 16 / G + 4 / G),
    "extreme": (extreme, 4 + 16 / G + 4 / G),
}


def run(name: str, work: Path, threads: int) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    fn, bits = CANDIDATES[name]
    src, out = work / "src", work / "grids" / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    t0 = time.perf_counter()
    with torch.no_grad():
        for f in sorted(src.glob("*.safetensors")):
            state = load_file(f)
            for k, w in state.items():
                if HF_LINEAR.search(k):
                    state[k] = fn(w.float().reshape(-1, G)).reshape(w.shape).float().contiguous()
            save_file(state, out / f.name, metadata={"format": "pt"})
    seconds = time.perf_counter() - t0
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "llmctl", "eval", str(out), "--data", str(work / "text-5"), "--context", "512",
           "--chunks", "5", "--threads", str(threads), "--backend", "torch", "--baseline-logits",
           str(work / "src-5.logits"), "--json"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    if p.returncode:
        raise SystemExit(f"llmctl eval failed for {name}:\n{p.stderr[-2000:]}")
    ev = json.loads(p.stdout)
    kl = ev["kl"]
    return {"candidate": name, "bits_per_linear_weight": bits, "ppl": ev["perplexity"], "kld_mean": kl["mean"],
            "kld_mean_stderr": kl["mean_stderr"], "top1": kl["same_top"], "quantize_s": seconds}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("candidates", nargs="+", choices=sorted(CANDIDATES))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "llmctl-quality")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if not (args.workdir / "src-5.logits").is_file():
        raise SystemExit(
            f"{args.workdir} has no source logits; run bench/quality.py --workdir {args.workdir} first"
        )
    import torch

    torch.set_num_threads(args.threads)
    for name in args.candidates:
        r = run(name, args.workdir, args.threads)
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
