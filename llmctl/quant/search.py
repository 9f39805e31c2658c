"""The scale search: per group, the scale among candidates with the smallest weighted squared error.

The scale search (``method="search"``, ``llmctl quantize``'s default for int4/int8; llama.cpp's K-quant
rmse search and HQQ do the same kind of thing) keeps, per group, the candidate with the smallest weighted
squared reconstruction error, round to nearest first (kept on ties, so never worse than it by that
measure). Asymmetric groups: the range [min, max] shrunk by 1 - j * SEARCH_DELTA for j < SEARCH_STEPS
(down to 0.67 of it). Symmetric groups: the integer range is lopsided (-8..7 for int4), so the candidates
send the group's largest-magnitude value, sign kept, to the long end, -2^(b-1), as llama.cpp's q4_0 does
(a negative scale when that value is positive), at 1 + (SEARCH_WIDEN - j) * SEARCH_DELTA of it for
j < SEARCH_SIGNED_STEPS (1.15 down to 0.76); then the winner's least-squares scale (sum w·x·q / sum w·q²,
as llama.cpp's make_qx_quants refines), SEARCH_REFITS rounds, each kept only when it lowers the error.
On Gemma-3-270M's linear weights, int4 g32, that weighted error is 0.72 of round to nearest's (the same
search with positive scales only, shrinking to 0.67, two refits: 0.87); a second refit gained < 0.2%, and
the calibrated search needs the list down to 0.76 (stopping at 0.88 left its g128 KLD at 0.35, not 0.29).
The weights are llama.cpp's for K-quants without an importance matrix, rms(group) + |x| (plain squared
error clips Gemma-3's outlier weights: its int4 g128 KL divergence went 0.49 -> 0.70), or with
``--calibration`` the mean x² of each input channel (llmctl.quantize.calibrate). docs/formats.md has what
each buys on Gemma-3-270M.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmctl.errors import QuantError

if TYPE_CHECKING:
    import torch

METHODS = ("rtn", "search")
SEARCH_DELTA = 0.03
SEARCH_STEPS = 12  # asymmetric groups: ranges 1 - j * delta, j < 12
SEARCH_WIDEN = 5  # symmetric groups: 1 + (5 - j) * delta of the largest value, j < 14
SEARCH_SIGNED_STEPS = 14
SEARCH_REFITS = 1  # symmetric groups: rounds of the winner's least-squares scale, each kept only if better


def _search_on(opts: dict[str, Any]) -> bool:
    """Whether ``quantize`` runs the scale search: ``method="search"``, or calibration statistics given."""
    method = opts.get("method") or "rtn"
    if method not in METHODS:
        raise QuantError(f"unknown --method {method!r}; choose rtn (round to nearest) or search (scale search)")
    return method == "search" or opts.get("importance") is not None


def _search_weights(x: torch.Tensor, importance: Any) -> torch.Tensor:
    """Error weights for groups ``x`` (..., group): the calibration statistics of each value's input channel
    (``importance``, already shaped to broadcast), or llama.cpp's rms(group) + |x|."""
    if importance is not None:
        return importance
    return x.double().square().mean(-1, keepdim=True).sqrt_().float().add(x.abs())


def _best_scale(x: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, roundtrip: Callable[[Any, Any], Any]) -> Any:
    """The scale search of the formats without a native one (nf4, fp8): per group of ``x`` (..., group), the
    scale among ``scale`` · (1 - j * SEARCH_DELTA), j < SEARCH_STEPS, whose ``roundtrip(x, s)`` (the values
    as stored and read back) has the smallest weighted squared error; ``scale`` itself wins ties."""
    import torch

    best_s, best = scale, None
    for j in range(SEARCH_STEPS):
        s = scale if j == 0 else scale * float(torch.tensor(1.0 - j * SEARCH_DELTA, dtype=torch.float32))
        err = (roundtrip(x, s.unsqueeze(-1)) - x).square_().mul_(weight).sum(-1)
        if best is None:
            best = err
            continue
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
    return best_s



def _tiny() -> float:
    return 1.1754943508222875e-38  # smallest normal fp32: a zero scale divides without NaN

