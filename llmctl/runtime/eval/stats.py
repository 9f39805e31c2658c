"""Statistics over per-token results (pure, numpy), as perplexity.cpp computes them.

Statistics follow perplexity.cpp: PPL ± ``ppl * sqrt((<nll²> - <nll>²) / (N - 1))``; with a baseline, mean
KLD ± its standard error, median and percentiles (linear interpolation), ln(PPL/PPL_base) and PPL - PPL_base
with the covariance of the two nll series, "same top" and Δp = p(correct) - p_base(correct).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmctl.errors import UsageError

if TYPE_CHECKING:
    import numpy as np


def perplexity_stats(nll: np.ndarray) -> tuple[float, float]:
    """(PPL, its standard error) as perplexity.cpp prints them."""
    import numpy as np

    n = len(nll)
    if n == 0:
        raise UsageError("nothing was scored; pass more text")
    mean = float(np.mean(nll))
    ppl = math.exp(mean)
    var = float(np.mean(np.square(nll))) - mean * mean
    return ppl, (ppl * math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0)


def mean_and_uncertainty(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error; perplexity.cpp's rule: no error below 11 values."""
    import numpy as np

    n = len(values)
    if n < 1:
        return 0.0, 0.0
    f = float(np.mean(values))
    df = float(np.mean(np.square(values))) - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


def covariance_of_means(a: np.ndarray, b: np.ndarray) -> float:
    import numpy as np

    n = len(a)
    if n < 10:
        return 0.0
    return (float(np.mean(a * b)) - float(np.mean(a)) * float(np.mean(b))) / (n - 1)


def percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """perplexity.cpp's percentile: linear interpolation between neighbours of a sorted array."""
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[-1])
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    p -= i
    return float((1 - p) * sorted_values[i] + p * sorted_values[min(i + 1, len(sorted_values) - 1)])


@dataclass
class KLStats:
    """A model against a baseline on the same tokens (perplexity.cpp's --kl-divergence statistics)."""

    mean: float
    mean_stderr: float
    median: float
    p90: float
    p99: float
    maximum: float
    ppl: float
    ppl_base: float
    ppl_stderr: float
    ppl_base_stderr: float
    ln_ppl_ratio: float
    ln_ppl_ratio_stderr: float
    delta_ppl: float
    delta_ppl_stderr: float
    same_top: float  # fraction of tokens where both models' most likely token is the same
    same_top_stderr: float
    delta_p_mean: float  # mean of p(correct) - p_base(correct)
    delta_p_stderr: float
    delta_p_median: float
    delta_p_rms: float
    tokens: int
    approximate: bool = False  # KL from a saved top-k baseline: the tail summed into one bucket


def kl_stats(
    kld: np.ndarray, nll: np.ndarray, nll_base: np.ndarray, same_top: np.ndarray, *, approximate: bool = False
) -> KLStats:
    import numpy as np

    n = len(kld)
    ks = np.sort(kld)
    log_ppl, log_ppl_unc = mean_and_uncertainty(nll)
    log_base, log_base_unc = mean_and_uncertainty(nll_base)
    cov = covariance_of_means(nll, nll_base)
    ppl, ppl_base = math.exp(log_ppl), math.exp(log_base)
    ppl_unc, ppl_base_unc = ppl * log_ppl_unc, ppl_base * log_base_unc
    ratio_unc2 = log_ppl_unc**2 + log_base_unc**2 - 2 * cov
    diff_unc2 = ppl_unc**2 + ppl_base_unc**2 - 2 * ppl * ppl_base * cov
    kl_mean, kl_unc = mean_and_uncertainty(kld)
    p_diff = np.exp(-nll) - np.exp(-nll_base)
    dp_mean, dp_unc = mean_and_uncertainty(p_diff)
    top = float(np.mean(same_top))
    return KLStats(
        mean=kl_mean,
        mean_stderr=kl_unc,
        median=percentile(ks, 0.5),
        p90=percentile(ks, 0.90),
        p99=percentile(ks, 0.99),
        maximum=float(ks[-1]),
        ppl=ppl,
        ppl_base=ppl_base,
        ppl_stderr=ppl_unc,
        ppl_base_stderr=ppl_base_unc,
        ln_ppl_ratio=log_ppl - log_base,
        ln_ppl_ratio_stderr=math.sqrt(max(ratio_unc2, 0.0)),
        delta_ppl=ppl - ppl_base,
        delta_ppl_stderr=math.sqrt(max(diff_unc2, 0.0)),
        same_top=top,
        same_top_stderr=math.sqrt(top * (1 - top) / (n - 1)) if n > 1 else 0.0,
        delta_p_mean=dp_mean,
        delta_p_stderr=dp_unc,
        delta_p_median=percentile(np.sort(p_diff), 0.5),
        delta_p_rms=float(np.sqrt(np.mean(np.square(p_diff)))),
        tokens=n,
        approximate=approximate,
    )


def word_count(text: str) -> int:
    """Words as lm-evaluation-harness counts them for word perplexity."""
    return len(re.split(r"\s+", text))
