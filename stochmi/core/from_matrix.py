"""Mutual information from a precomputed log-density matrix.

When ``p(t | s_i)`` has no closed form (a deep layer, ``p(t_l | x_i)``) the matrix
``L[j, i] = log p(t_j | s_i)`` is estimated elsewhere (:mod:`stochmi.layers.deep`);
the same reductions as :func:`stochmi.mi_from_conditional` then give the dataset MI
and the population bracket:

.. math::

    \\hat I = \\frac1N \\sum_j \\Big( L_{jj} - \\log \\frac1N \\sum_i e^{L_{ji}} \\Big),
    \\qquad
    U = \\frac1N \\sum_j \\Big( L_{jj} - \\log \\frac1{N-1} \\sum_{i \\ne j} e^{L_{ji}} \\Big),

and, for discrete labels ``y``, ``I(T; Y) = mean_j (log p(t_j | y_j) - log p(t_j))``
with ``p(t | y) = mean_{i: y_i = y} p(t | s_i)``.  Reductions are logsumexp in float64.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "mi_terms_from_log_density",
    "label_terms_from_log_density",
    "label_bounds_from_log_density",
]


def _check(L: torch.Tensor, rows=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``L`` in float64 and ``rows`` as int64 row indices in ``[0, N)`` (None: every
    row).  NaN entries are looked for in the rows read, block by block
    (:func:`_row_blocks`)."""
    if not isinstance(L, torch.Tensor) or L.dim() != 2 or L.shape[0] != L.shape[1]:
        raise ValueError("L must be a square (N, N) tensor of log densities")
    n = L.shape[0]
    if n < 2:
        raise ValueError("need at least two sources (N >= 2)")
    if rows is not None:
        rows = torch.as_tensor(rows, dtype=torch.long, device=L.device).reshape(-1)
        if len(rows) < 1 or bool(((rows < 0) | (rows >= n)).any()):
            raise ValueError(f"rows must be row indices in [0, {n})")
    return L.to(torch.float64), rows


def _row_blocks(L: torch.Tensor, rows: torch.Tensor | None = None):
    """Blocks of rows of ``L`` with about ``2^22`` entries each, as ``(block, rows of
    L, entries of the output)``: slices, or with ``rows`` an index tensor of those rows
    in order and the slice of the output (one entry per row taken).  The reductions
    below work a block at a time (memory O(block * n), not a copy of ``L``); a block
    holding a NaN raises ``ValueError``."""
    n = L.shape[0]
    step = max(1, 2**22 // n)
    if rows is None:
        blocks = [(slice(r, min(n, r + step)),) * 2 for r in range(0, n, step)]
    else:
        blocks = [(rows[r : r + step], slice(r, r + step)) for r in range(0, len(rows), step)]
    for sel, out in blocks:
        blk = L[sel]
        if bool(torch.isnan(blk).any()):
            raise ValueError("L holds NaN entries")
        yield blk, sel, out


def _diag_index(rows, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the diagonal entries inside the block ``L[rows]``
    (``rows`` a slice or an index tensor)."""
    if isinstance(rows, slice):
        ar = torch.arange(rows.stop - rows.start, device=device)
        return ar, ar + rows.start
    return torch.arange(len(rows), device=device), rows


def _class_sums(L: torch.Tensor, onehot: torch.Tensor, off_diagonal: bool, rows=None):
    """``m_j = max_i L[j, i]`` and ``sum_{i: y_i = c} exp(L[j, i] - m_j)`` ``(R, C)``
    for the rows ``rows`` (default all, ``R = N``; over ``i != j`` with
    ``off_diagonal``), block by block of rows."""
    r = L.shape[0] if rows is None else len(rows)
    m = torch.empty(r, 1, dtype=L.dtype, device=L.device)
    per_class = torch.empty(r, onehot.shape[1], dtype=L.dtype, device=L.device)
    for blk, sel, out in _row_blocks(L, rows):
        if off_diagonal:
            blk = blk.clone()
            blk[_diag_index(sel, L.device)] = -math.inf
        mb = blk.max(1, keepdim=True).values
        mb = torch.where(torch.isfinite(mb), mb, torch.zeros_like(mb))
        m[out] = mb
        per_class[out] = torch.exp(blk - mb) @ onehot
    return m, per_class


def mi_terms_from_log_density(L: torch.Tensor, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query terms of the dataset MI and of its leave-one-out upper bound.

    Parameters
    ----------
    L : Tensor, shape (N, N)
        ``L[j, i] = log p(t_j | s_i)``, the query ``t_j`` drawn from source ``j``.
    rows : Tensor of int64, shape (R,), optional
        The queries whose terms are wanted, in this order (default: all ``N``); the
        other rows of ``L`` are not read.

    Returns
    -------
    full, loo : Tensor, shape (N,) or (R,)
        ``L[j,j] - logmeanexp_i L[j,i]`` and ``L[j,j] - logmeanexp_{i != j} L[j,i]``;
        their means are the dataset MI (= InfoNCE lower bound on the population MI)
        and the leave-one-out upper bound.
    """
    L, rows = _check(L, rows)
    n = L.shape[0]
    full = torch.empty(n if rows is None else len(rows), dtype=L.dtype, device=L.device)
    loo = torch.empty_like(full)
    for blk, sel, out in _row_blocks(L, rows):
        at = _diag_index(sel, L.device)
        diag = blk[at]
        full[out] = diag - (torch.logsumexp(blk, 1) - math.log(n))
        off = blk.clone()
        off[at] = -math.inf
        loo[out] = diag - (torch.logsumexp(off, 1) - math.log(n - 1))
    return full, loo


def _labels(L: torch.Tensor, y: torch.Tensor):
    """The labels' one-hot matrix ``(N, C)`` on ``L``'s device, each source's class
    index ``(N,)`` and the class sizes ``(C,)``."""
    n = L.shape[0]
    y = y.to(L.device).long().reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} labels for {n} sources")
    classes, inv, counts = torch.unique(y, return_inverse=True, return_counts=True)
    onehot = torch.zeros(n, len(classes), dtype=L.dtype, device=L.device)
    onehot[torch.arange(n, device=L.device), inv] = 1.0
    return onehot, inv, counts


def label_terms_from_log_density(L: torch.Tensor, y: torch.Tensor, rows=None) -> torch.Tensor:
    """Per-query terms of ``I(T; Y)``: ``log p(t_j | y_j) - log p(t_j)``.

    Parameters
    ----------
    L : Tensor, shape (N, N)
        ``L[j, i] = log p(t_j | s_i)``.
    y : Tensor, shape (N,)
        Integer labels of the sources.
    rows : Tensor of int64, shape (R,), optional
        The queries whose terms are wanted (default: all).

    Returns
    -------
    Tensor, shape (N,) or (R,)
    """
    L, rows = _check(L, rows)
    n = L.shape[0]
    onehot, inv, counts = _labels(L, y)
    m, per_class = _class_sums(L, onehot, off_diagonal=False, rows=rows)  # (R, 1), (R, C)
    inv_q = inv if rows is None else inv[rows]
    own = per_class[torch.arange(len(inv_q), device=L.device), inv_q]
    log_cond = torch.log(own) + m[:, 0] - torch.log(counts[inv_q].to(L.dtype))
    log_marg = torch.log(per_class.sum(1)) + m[:, 0] - math.log(n)
    return log_cond - log_marg


def label_bounds_from_log_density(
    L: torch.Tensor, y: torch.Tensor, eps: float = 1e-6, rows=None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, float]:
    """``I(T; Y)`` terms, Barber-Agakov lower-bound terms, upper-bound terms and the
    label entropy.

    The lower bound is ``H(Y) + mean_j log q(y_j | t_j)`` with the leave-one-out
    mixture classifier ``q(y | t_j) ∝ sum_{i != j, y_i = y} p(t_j | s_i)`` (fixed for the
    pair ``(t_j, y_j)``), mixed with ``eps`` of the uniform classifier so it stays finite.
    The upper bound is ``I(S;T) - I(S;T | Y)`` (chain rule, ``Y - S - T``) with the
    leave-one-out upper bound on ``I(S;T)`` and the InfoNCE lower bound on each class's
    ``I(S;T | Y=y)``; the ``L[j, j]`` cancel, leaving
    ``mean_j (logmeanexp_{i: y_i = y_j} L[j,i] - logmeanexp_{i != j} L[j,i])``.
    As in :func:`stochmi.mi_with_labels`.  With ``rows`` (int64 ``(R,)``) only those
    queries' terms are computed, in that order (``R`` entries instead of ``N``).

    Returns
    -------
    terms : Tensor, shape (N,) or (R,)
    ba_terms : Tensor, shape (N,) or (R,), or None when a class has fewer than two members
    upper_terms : Tensor, shape (N,) or (R,)
    h_y : float
        Plug-in entropy of the labels (nats), over all ``N`` sources.
    """
    L, rows = _check(L, rows)
    n = L.shape[0]
    onehot, inv, counts = _labels(L, y)
    freq = counts.to(torch.float64) / n
    h_y = float(-(freq * torch.log(freq)).sum())
    idx = torch.arange(n, device=L.device) if rows is None else rows
    inv_q = inv[idx]
    at = torch.arange(len(idx), device=L.device)
    # one pass over the off-diagonal entries; the diagonal is added back where a sum
    # includes it (a sum of positive terms, no cancellation)
    m, per_class = _class_sums(L, onehot, off_diagonal=True, rows=rows)
    diag = L[idx, idx]
    log_off = torch.log(per_class.sum(1)) + m[:, 0]
    log_loo = log_off - math.log(n - 1)
    log_cls = torch.logaddexp(torch.log(per_class[at, inv_q]) + m[:, 0], diag)
    log_cls = log_cls - torch.log(counts[inv_q].to(L.dtype))
    terms = log_cls - (torch.logaddexp(log_off, diag) - math.log(n))
    upper_terms = log_cls - log_loo
    if bool((counts < 2).any()):
        return terms, None, upper_terms, h_y
    log_q = torch.log(per_class[at, inv_q]) - torch.log(per_class.sum(1))
    k = counts.numel()
    log_q = torch.logaddexp(log_q + math.log1p(-eps), torch.full_like(log_q, math.log(eps / k)))
    return terms, log_q, upper_terms, h_y
