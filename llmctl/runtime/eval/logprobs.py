"""Log-probability rows and what is computed on them (torch): the top-k form that vLLM gives and a saved
baseline holds, KL divergence per row against a baseline (full or top-k), and ``score_windows``, the loop
that turns a scorer's rows into per-token results."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from llmctl.runtime.eval.windows import Window


# ---- top-k rows ------------------------------------------------------------------------------------
@dataclass
class TopK:
    """Compact log-probabilities per scored token (a saved baseline's, or vLLM's rows): top-k ids and
    log-probs (descending) and the log-prob of the correct token."""

    ids: torch.Tensor  # (n, k) int32
    logp: torch.Tensor  # (n, k) float32
    target_logp: torch.Tensor  # (n,) float32


def top_k_of(logp: torch.Tensor, targets: torch.Tensor, k: int) -> TopK:
    import torch

    vals, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return TopK(idx.to(torch.int32), vals.float(), logp.gather(-1, targets[:, None])[:, 0].float())


def _to_cpu(t: TopK) -> TopK:
    return TopK(t.ids.cpu(), t.logp.cpu(), t.target_logp.cpu())


# ---- per-row computations on log-probabilities (torch) ------------------------------------------------
def kl_rows(logp: torch.Tensor, base_logp: torch.Tensor) -> torch.Tensor:
    """KL(base || model) per row, both (n, vocab) log-probabilities: Σ p_base (log p_base - log p)."""
    import torch

    p = base_logp.exp()
    return torch.where(p > 0, p * (base_logp - logp), 0.0).sum(-1, dtype=torch.float64)


def kl_rows_topk(logp: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """KL(base || model) when only the baseline's top-k log-probs are known: the tokens outside its top k
    form one bucket in both distributions. This is a lower bound of the full KL (merging outcomes never
    increases it), exact when the baseline's tail holds no mass."""
    import torch

    q_top = logp.gather(-1, top_ids.long()).double()  # (n, k)
    p_top = top_logp.double()
    kl = (p_top.exp() * (p_top - q_top)).sum(-1)
    p_tail = (1 - p_top.exp().sum(-1)).clamp_min(0)
    q_tail = (1 - q_top.exp().sum(-1)).clamp_min(1e-30)
    # a tail below 1e-6 is float rounding of a top-k that holds the whole distribution
    tail = torch.where(p_tail > 1e-6, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), 0.0)
    return kl + tail


def kl_rows_topk_both(rows: TopK, base: TopK, targets: torch.Tensor) -> torch.Tensor:
    """KL(base || model) when only the top-k log-probs of both (and of the correct token) are known, as vLLM
    gives them: the tokens known in both distributions keep their own terms, every other token goes into
    one bucket in both. A lower bound of the full KL (merging outcomes never increases it), as
    ``kl_rows_topk``'s, and the same figure when the model's list holds the baseline's."""
    import torch

    def with_target(t: TopK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = t.ids.long()  # (n, k)
        listed = (ids == targets[:, None]).any(-1, keepdim=True)  # (n, 1): the correct token is in the list
        valid = torch.cat([torch.ones_like(ids, dtype=torch.bool), ~listed], dim=1)  # (n, k + 1)
        return torch.cat([ids, targets[:, None]], 1), torch.cat([t.logp, t.target_logp[:, None]], 1).double(), valid

    p_ids, p_lp, p_ok = with_target(base)
    q_ids, q_lp, q_ok = with_target(rows)
    match = (p_ids[:, :, None] == q_ids[:, None, :]) & p_ok[:, :, None] & q_ok[:, None, :]  # (n, kp+1, kq+1)
    known = match.any(-1)  # (n, kp + 1): the baseline's token is in the model's list too
    q_at = torch.where(match, q_lp[:, None, :], 0.0).sum(-1)  # (n, kp + 1) log q at the baseline's tokens
    pk = torch.where(known, p_lp.exp(), 0.0)
    qk = torch.where(known, q_at.exp(), 0.0)
    kl = torch.where(pk > 0, pk * (p_lp - q_at), 0.0).sum(-1)
    p_tail = (1 - pk.sum(-1)).clamp_min(0)
    q_tail = (1 - qk.sum(-1)).clamp_min(1e-30)
    tail = torch.where(p_tail > 1e-6, p_tail * (p_tail.clamp_min(1e-30).log() - q_tail.log()), 0.0)
    return kl + tail


@dataclass
class ScoredRows:
    """A baseline scored before the model (vLLM runs one engine at a time): its rows per window, in order."""

    parts: list[Any]
    vocab_size: int

    def rows(self, windows: Sequence[Window]) -> Iterator[Any]:
        return iter(self.parts)


# ---- the evaluation loop -------------------------------------------------------------------------
@dataclass
class TokenResults:
    """Per scored token, in order."""

    nll: np.ndarray  # float64
    top1: np.ndarray  # int64
    doc: np.ndarray  # int64
    kld: np.ndarray | None = None
    nll_base: np.ndarray | None = None
    top1_base: np.ndarray | None = None


Progress = Callable[[int, int], None]  # (tokens fed so far, total tokens to feed)


def score_windows(
    scorer: Any,
    windows: Sequence[Window],
    *,
    baseline: Any = None,
    save_top_k: int = 0,
    on_progress: Progress | None = None,
) -> tuple[TokenResults, list[TopK]]:
    """Score every window; ``baseline`` is another scorer (exact KL), ``SavedLogits`` (top-k KL) or
    ``ScoredRows``. The scorer yields full rows of log-probabilities, or ``TopK`` rows (vLLM; KL from both
    top-k lists). Returns per-token results and, when ``save_top_k``, this model's top-k log-probs per window."""
    import numpy as np
    import torch

    total = sum(len(w.ids) for w in windows)
    base_iter: Iterator[Any] | None = None
    if baseline is not None:
        base_iter = baseline.rows(windows) if hasattr(baseline, "rows") else baseline.log_probs(windows)
    nll, top1, docs, kld, nll_b, top1_b, saved = [], [], [], [], [], [], []
    fed = 0
    for w, logp in zip(windows, scorer.log_probs(windows), strict=True):
        targets = torch.tensor(w.targets, dtype=torch.long)
        docs.append(np.full(len(w.targets), w.doc))
        if isinstance(logp, TopK):  # vLLM: top-k rows and the correct token's log-prob
            nll.append(-logp.target_logp.double().numpy())
            top1.append(logp.ids[:, 0].long().numpy())
            if save_top_k:
                saved.append(TopK(logp.ids[:, :save_top_k], logp.logp[:, :save_top_k], logp.target_logp))
            if base_iter is not None:
                b = next(base_iter)
                if not isinstance(b, TopK):  # (both are scored by one backend; for completeness)
                    b = _to_cpu(top_k_of(b, targets.to(b.device), logp.ids.shape[1]))
                kld.append(kl_rows_topk_both(logp, b, targets).numpy())
                nll_b.append(-b.target_logp.double().numpy())
                top1_b.append(b.ids[:, 0].long().numpy())
            fed += len(w.ids)
            if on_progress is not None:
                on_progress(fed, total)
            continue
        targets = targets.to(logp.device)
        nll.append(-logp.gather(-1, targets[:, None])[:, 0].double().cpu().numpy())
        top1.append(logp.argmax(-1).cpu().numpy())
        if save_top_k:
            saved.append(_to_cpu(top_k_of(logp, targets, save_top_k)))
        if base_iter is not None:
            b = next(base_iter)
            if isinstance(b, TopK):
                ids = b.ids.to(logp.device)
                kld.append(kl_rows_topk(logp, ids, b.logp.to(logp.device)).cpu().numpy())
                nll_b.append(-b.target_logp.double().numpy())
                top1_b.append(b.ids[:, 0].long().numpy())
            else:
                b = b.to(logp.device)
                kld.append(kl_rows(logp, b).cpu().numpy())
                nll_b.append(-b.gather(-1, targets[:, None])[:, 0].double().cpu().numpy())
                top1_b.append(b.argmax(-1).cpu().numpy())
        del logp
        fed += len(w.ids)
        if on_progress is not None:
            on_progress(fed, total)
    results = TokenResults(np.concatenate(nll), np.concatenate(top1), np.concatenate(docs))
    if base_iter is not None:
        results.kld = np.maximum(np.concatenate(kld), 0.0)  # rounding can give -1e-9
        results.nll_base = np.concatenate(nll_b)
        results.top1_base = np.concatenate(top1_b)
    return results, saved
