"""GPTQ for llmctl's int4/int8 formats (``llmctl quantize --method gptq --calibration TEXT``).

GPTQ (Frantar et al., 2022) quantizes a linear weight W (rows, cols) one column at a time and spreads each
column's rounding error over the columns not yet quantized, through the inverse of the layer's input
Hessian H = 2 XᵀX (X: the calibration inputs of that linear, llmctl.quantize.calibrate). It minimises
‖XWᵀ − XŴᵀ‖² column by column; rows are independent, so a tensor is done in row chunks like any other.

As in the paper's reference code:
- damping: ``damp`` × mean(diag H) added to the diagonal (raised tenfold while the Cholesky fails); inputs
  that never fire (diag 0) get 1 on the diagonal and their weights zeroed;
- the upper Cholesky factor U of H⁻¹ gives every update: column i's error (w − ŵ) / U[i, i] times U[i, j>i];
- lazy batches: inside a block of ``BLOCK`` columns the updates are rank-1, the rest of the row gets the
  block's errors in one matrix product (Err (rows, B) @ U[block, after]);
- groups: a group's scale (and zero-point) is chosen when its first column is reached, from the weights
  as updated so far; here by llmctl's own scale search (llmctl.quant.formats, symmetric with the
  lopsided grid or asymmetric with zero-points), its errors weighed by diag H — E[x²] of each input;
- activation order (``act_order``): columns in decreasing diag H, with static groups (every group's scale
  chosen from the weights before any update), so the stored layout is the usual one.

The column sweep runs in llmctl's C++ kernels when they are built (llmctl.quant.native: ``gptq_sweep``, the
rows in parallel, a group's run of columns a call, the scale search natively between runs), else in eager
torch a column at a time (``_sweep``). Each rounds every fp32 operation on its own and the calibrated scale
search ranks its candidates in float64 in both, so the two give the same bits (tests/test_gptq.py).

The output is the format's own QTensor: codes, fp16 scales (and packed zero-points), written by the same
layouts as round to nearest and the search.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from llmctl.errors import QuantError

BLOCK = 128  # columns per lazy batch
DAMP = 0.01  # of the mean of diag H
ACT_ORDER = False  # the default of --act-order/--no-act-order


def check_damp(damp: float) -> float:
    import math

    if not (math.isfinite(damp) and 0 < damp <= 1):
        raise QuantError(f"--gptq-damp must be in (0, 1] (a fraction of the Hessian's mean diagonal), got {damp}")
    return float(damp)


@dataclass
class Prepared:
    """One weight's H-derived state, shared by its row chunks."""

    u: Any  # (cols, cols) upper Cholesky factor of H⁻¹, in processing order
    perm: Any  # (cols,) processing order → original column, or None (natural order)
    dead: Any  # (cols,) bool: inputs that never fired
    diag: Any  # (cols,) diag H (original order): the scale search's error weights


def prepare(h: Any, *, damp: float = DAMP, act_order: bool = False) -> Prepared:
    """Damp ``h`` (cols, cols; any positive multiple of XᵀX), order its columns and factor its inverse."""
    import torch

    h = h.to(torch.float32)
    diag = torch.diagonal(h).clone()
    dead = diag <= 0
    kept = torch.where(dead, 1.0, diag)  # a dead input's diagonal becomes 1
    perm = None
    if act_order:
        perm = torch.argsort(kept, descending=True, stable=True)
    mean = float(kept.mean())
    lam = damp * (mean if mean > 0 else 1.0)
    # With J the reversal, J H J = L Lᵀ gives H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J), J L⁻¹ J upper triangular with a
    # positive diagonal: the upper Cholesky factor of H⁻¹ from one factorisation and one triangular inverse
    # (torch.cholesky_inverse and a second Cholesky took 10-50x longer here). At most four n × n matrices
    # are alive at once (0.8 GB each for an 8B down_proj's 14336 columns).
    rev = torch.arange(h.shape[0] - 1, -1, -1) if perm is None else perm.flip(0)
    for _ in range(6):
        a = h.flip(0, 1) if perm is None else h[rev][:, rev]  # J H J in processing order
        a.diagonal().copy_(kept[rev]).add_(lam)
        if _cholesky_(a):
            inv = _lower_inverse(a)
            del a
            u = inv.flip(0, 1)
            del inv
            if bool(torch.isfinite(u).all()):
                return Prepared(u, perm, dead, diag.clamp_min(0))
            del u
        lam *= 10
    raise QuantError("the calibration Hessian is not positive definite even damped; raise --gptq-damp")


# columns per step of the Cholesky factorisation and the triangular inverse; 256 was as fast on an idle
# machine but takes twice the steps, each a wait for every thread (slow when another process holds a core)
FACTOR_BLOCK = 512


def _cholesky_(a: Any) -> bool:
    """Overwrite the lower triangle of ``a`` (n, n; symmetric, only its lower triangle read) with its
    Cholesky factor L (a = L Lᵀ); False where ``a`` is not positive definite.

    Left-looking by blocks of ``FACTOR_BLOCK`` columns: each block column gets the earlier ones' updates in
    one matrix product, then its diagonal block is factored and the rows below solved against it. Mostly
    matrix products: about twice as fast as LAPACK's potrf (torch.linalg.cholesky) on 1024-2048 columns
    with MKL here."""
    import torch

    n = a.shape[0]
    for j in range(0, n, FACTOR_BLOCK):
        e = min(j + FACTOR_BLOCK, n)
        if j:
            a[j:, j:e].addmm_(a[j:, :j], a[j:e, :j].T, alpha=-1)
        l11, info = torch.linalg.cholesky_ex(a[j:e, j:e])
        if int(info):
            return False
        a[j:e, j:e] = l11
        if e < n:
            a[e:, j:e] = torch.linalg.solve_triangular(l11.T, a[e:, j:e], upper=True, left=False)
    return True


# columns at which _lower_inverse solves against the identity instead of halving again
INVERSE_LEAF = 256


def _lower_inverse(low: Any) -> Any:
    """L⁻¹ of a lower triangular ``low`` (n, n; its upper triangle not read), zero above the diagonal.

    By halves, [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]: the two halves' inverses first, then the
    corner as two matrix products, down to ``INVERSE_LEAF`` columns solved against the identity. Matrix
    products run at GEMM speed where triangular solves do not (2048 columns on an AMD EPYC, 2 threads:
    40 ms against 48 ms with the corner solved, and 2-2.5x faster than one solve against the identity)."""
    import torch

    n = low.shape[0]
    if n <= INVERSE_LEAF:
        return torch.linalg.solve_triangular(low, torch.eye(n), upper=False)
    k = n // 2
    out = torch.zeros(n, n)
    a_inv = _lower_inverse(low[:k, :k])
    c_inv = _lower_inverse(low[k:, k:])
    out[:k, :k] = a_inv
    out[k:, k:] = c_inv
    out[k:, :k] = (c_inv @ (low[k:, :k] @ a_inv)).neg_()
    return out


def _group_params(cls: Any, w: Any, g: int, weight: Any) -> tuple[Any, Any, Any]:
    """(stored fp16 scale, scale as used (fp32, sign kept), zero-point) per row of the group ``w``
    (rows, g), by the format's scale search weighed by ``weight`` (g,)."""
    import torch

    q = cls.quantize(w, g, method="search", importance=weight)
    scale = q.parts["scale"][:, 0]
    zp = cls.zero_points(q)
    tiny = 1.1754943508222875e-38
    sf = scale.float()
    s = torch.where(sf < 0, sf.clamp(max=-tiny), sf.clamp(min=tiny))
    z = zp[:, 0].float() if zp is not None else torch.zeros_like(s)
    return scale, s, z


def quantize(cls: Any, w: Any, group_size: int, prep: Prepared) -> Any:
    """GPTQ of rows ``w`` (rows, cols) into ``cls`` (an int format of llmctl.quant.formats) with groups of
    ``group_size`` (cols: one per row): the format's QTensor."""
    import torch

    from llmctl.quant import native

    bits = int(cls.bits)
    w2 = w.reshape(-1, w.shape[-1]).float()
    rows, cols = w2.shape
    g = group_size
    ng = cols // g
    if prep.u.shape[0] != cols:
        raise QuantError(f"internal error: a Hessian of {prep.u.shape[0]} columns for a row of {cols}")
    W = w2.clone()
    W[:, prep.dead] = 0
    scales = torch.empty(rows, ng, dtype=torch.float16)
    s_all = torch.empty(ng, rows)  # by group: the sweep reads one group's scales and zero-points contiguous
    z_all = torch.zeros(ng, rows)

    def params(k: int, values: Any) -> None:
        scales[:, k], s_all[k], z_all[k] = _group_params(cls, values, g, prep.diag[k * g : (k + 1) * g])

    order = prep.perm
    if order is not None:  # static groups: every scale from the weights before any update
        for k in range(ng):
            params(k, W[:, k * g : (k + 1) * g])
        W = W[:, order]
        group_of = order // g
    else:
        group_of = torch.arange(cols) // g
    if not prep.u.is_contiguous():  # row by row for the sweeps: made so once, for every row chunk
        prep.u = prep.u.contiguous()
    u = prep.u
    block = _block(g)
    kernels = native.get()
    sweep = _sweep if kernels is None else partial(_native_sweep, kernels)
    codes = sweep(W, u, g, block, group_of, order is None, params, s_all, z_all, bits)
    if order is not None:
        out = torch.empty_like(codes)
        out[:, order] = codes
        codes = out
    return cls._pack(tuple(w.shape), g, codes, scales, z_all.T.to(torch.int8) if cls.zero_bits else None)


def _block(g: int) -> int:
    """Columns per lazy batch for groups of ``g``: blocks hold whole groups (g ≤ BLOCK) or start them
    (g > BLOCK), so a group's scale always sees its columns as updated so far."""
    return g * max(1, BLOCK // g) if g <= BLOCK else BLOCK if g % BLOCK == 0 else g


def _native_sweep(kernels: Any, W: Any, u: Any, g: int, block: int, group_of: Any, dynamic: bool, params: Any,
                  s_all: Any, z_all: Any, bits: int) -> Any:
    """The column sweep by the native kernel (llmctl.quant.kernels.gptq), every row at once, a run of one
    group's columns (``dynamic``: the group's scale chosen first from ``W`` as updated so far) or a whole
    block (static groups) a call: what ``_sweep`` computes, to the bit."""
    import torch

    rows, cols = W.shape
    codes = torch.empty(rows, cols, dtype=torch.int8)
    group_of = group_of.contiguous()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        err = torch.empty(i2 - i1, rows)  # (block, rows), as the eager sweep's
        a = i1
        while a < i2:
            b = min(i2, (a // g + 1) * g) if dynamic else i2
            if dynamic and a % g == 0:  # the group's first column: its scale from the updated weights
                params(a // g, W[:, a : a + g])
            kernels.gptq_sweep(W, u, s_all, z_all, group_of, codes, err, i1, i2, a, b, bits)
            a = b
        if i2 < cols:
            W[:, i2:].addmm_(err.T, u[i1:i2, i2:], alpha=-1)
    return codes


def _sweep(W: Any, u: Any, g: int, block: int, group_of: Any, dynamic: bool, params: Any, s_all: Any, z_all: Any,
           bits: int) -> Any:
    """GPTQ's column sweep in eager torch (without the native kernels) over ``W`` (rows, cols), in processing
    order: the codes (rows, cols); ``W`` left holding each column as it was quantized. Group ``k``'s scales
    and zero-points are ``s_all[k]``, ``z_all[k]``, set by ``params(k, values)`` at the group's first column
    (``dynamic``) or beforehand. Every operation rounds on its own (the rank-1 update is a product, then a
    difference: ``addr_`` fuses the two on some CPUs), as the native kernel does."""
    import torch

    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    rows, cols = W.shape
    codes = torch.empty(cols, rows, dtype=torch.int8)  # by column
    threads = torch.get_num_threads()
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        wt = W[:, i1:i2].T.contiguous()  # (block, rows): each column contiguous for the rank-1 updates
        err = torch.empty(i2 - i1, rows)
        # The column sweep is thousands of small operations: one thread. Split across threads, each waits for
        # the others at every operation, and with another process on the second core one 4096-value round
        # took 330 us instead of 17 (the "slow outliers" of an 8B run). The block's matrix product below,
        # rows × block × the columns after, keeps every thread.
        torch.set_num_threads(1)
        try:
            for i in range(i2 - i1):
                col = i1 + i
                k = int(group_of[col])
                if dynamic and col % g == 0:  # the group's first column: its scale from the updated weights
                    values = wt[i : i + g].T if col + g <= i2 else W[:, col : col + g]
                    params(k, values)
                s, z = s_all[k], z_all[k]
                x = wt[i]
                q = torch.round(x / s).add_(z).clamp_(qmin, qmax)
                codes[col] = q.to(torch.int8)
                e = (x - (q - z).mul_(s)).div_(u[col, col])
                err[i] = e
                if i + 1 < i2 - i1:
                    wt[i + 1 :].sub_(torch.outer(u[col, col + 1 : i2], e))
        finally:
            torch.set_num_threads(threads)
        W[:, i1:i2] = wt.T
        if i2 < cols:
            W[:, i2:].addmm_(err.T, u[i1:i2, i2:], alpha=-1)
    return codes.T
