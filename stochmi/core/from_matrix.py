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


def _check(L: torch.Tensor) -> torch.Tensor:
    if not isinstance(L, torch.Tensor) or L.dim() != 2 or L.shape[0] != L.shape[1]:
        raise ValueError("L must be a square (N, N) tensor of log densities")
    if L.shape[0] < 2:
        raise ValueError("need at least two sources (N >= 2)")
    if bool(torch.isnan(L).any()):
        raise ValueError("L holds NaN entries")
    return L.to(torch.float64)


def _row_blocks(n: int):
    """Slices of rows with about ``2^22`` entries of an ``(n, n)`` matrix each: the
    reductions below work a block at a time (memory O(block * n), not a copy of ``L``)."""
    step = max(1, 2**22 // n)
    return [slice(r, min(n, r + step)) for r in range(0, n, step)]


def _diag_index(rows: slice, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of the diagonal entries inside the block ``L[rows]``."""
    ar = torch.arange(rows.stop - rows.start, device=device)
    return ar, ar + rows.start


def _class_sums(L: torch.Tensor, onehot: torch.Tensor, off_diagonal: bool):
    """``m_j = max_i L[j, i]`` and ``sum_{i: y_i = c} exp(L[j, i] - m_j)`` ``(N, C)``
    (over ``i != j`` with ``off_diagonal``), block by block of rows."""
    n = L.shape[0]
    m = torch.empty(n, 1, dtype=L.dtype, device=L.device)
    per_class = torch.empty(n, onehot.shape[1], dtype=L.dtype, device=L.device)
    for rows in _row_blocks(n):
        blk = L[rows]
        if off_diagonal:
            blk = blk.clone()
            blk[_diag_index(rows, L.device)] = -math.inf
        mb = blk.max(1, keepdim=True).values
        mb = torch.where(torch.isfinite(mb), mb, torch.zeros_like(mb))
        m[rows] = mb
        per_class[rows] = torch.exp(blk - mb) @ onehot
    return m, per_class


def mi_terms_from_log_density(L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query terms of the dataset MI and of its leave-one-out upper bound.

    Parameters
    ----------
    L : Tensor, shape (N, N)
        ``L[j, i] = log p(t_j | s_i)``, the query ``t_j`` drawn from source ``j``.

    Returns
    -------
    full, loo : Tensor, shape (N,)
        ``L[j,j] - logmeanexp_i L[j,i]`` and ``L[j,j] - logmeanexp_{i != j} L[j,i]``;
        their means are the dataset MI (= InfoNCE lower bound on the population MI)
        and the leave-one-out upper bound.
    """
    L = _check(L)
    n = L.shape[0]
    full = torch.empty(n, dtype=L.dtype, device=L.device)
    loo = torch.empty_like(full)
    for rows in _row_blocks(n):
        blk = L[rows]
        at = _diag_index(rows, L.device)
        diag = blk[at]
        full[rows] = diag - (torch.logsumexp(blk, 1) - math.log(n))
        off = blk.clone()
        off[at] = -math.inf
        loo[rows] = diag - (torch.logsumexp(off, 1) - math.log(n - 1))
    return full, loo


def label_terms_from_log_density(L: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-query terms of ``I(T; Y)``: ``log p(t_j | y_j) - log p(t_j)``.

    Parameters
    ----------
    L : Tensor, shape (N, N)
        ``L[j, i] = log p(t_j | s_i)``.
    y : Tensor, shape (N,)
        Integer labels of the sources.

    Returns
    -------
    Tensor, shape (N,)
    """
    L = _check(L)
    n = L.shape[0]
    y = y.to(L.device).long().reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} labels for {n} sources")
    classes, inv, counts = torch.unique(y, return_inverse=True, return_counts=True)
    onehot = torch.zeros(n, len(classes), dtype=L.dtype, device=L.device)
    onehot[torch.arange(n, device=L.device), inv] = 1.0
    m, per_class = _class_sums(L, onehot, off_diagonal=False)  # (N, 1), (N, C)
    own = per_class[torch.arange(n, device=L.device), inv]
    log_cond = torch.log(own) + m[:, 0] - torch.log(counts[inv].to(L.dtype))
    log_marg = torch.log(per_class.sum(1)) + m[:, 0] - math.log(n)
    return log_cond - log_marg


def label_bounds_from_log_density(
    L: torch.Tensor, y: torch.Tensor, eps: float = 1e-6
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
    As in :func:`stochmi.mi_with_labels`.

    Returns
    -------
    terms : Tensor, shape (N,)
    ba_terms : Tensor, shape (N,), or None when a class has fewer than two members
    upper_terms : Tensor, shape (N,)
    h_y : float
        Plug-in entropy of the labels (nats).
    """
    L = _check(L)
    n = L.shape[0]
    y = y.to(L.device).long().reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} labels for {n} sources")
    classes, inv, counts = torch.unique(y, return_inverse=True, return_counts=True)
    freq = counts.to(torch.float64) / n
    h_y = float(-(freq * torch.log(freq)).sum())
    idx = torch.arange(n, device=L.device)
    onehot = torch.zeros(n, len(classes), dtype=L.dtype, device=L.device)
    onehot[idx, inv] = 1.0
    # one pass over the off-diagonal entries; the diagonal is added back where a sum
    # includes it (a sum of positive terms, no cancellation)
    m, per_class = _class_sums(L, onehot, off_diagonal=True)
    diag = L[idx, idx]
    log_off = torch.log(per_class.sum(1)) + m[:, 0]
    log_loo = log_off - math.log(n - 1)
    log_cls = torch.logaddexp(torch.log(per_class[idx, inv]) + m[:, 0], diag)
    log_cls = log_cls - torch.log(counts[inv].to(L.dtype))
    terms = log_cls - (torch.logaddexp(log_off, diag) - math.log(n))
    upper_terms = log_cls - log_loo
    if bool((counts < 2).any()):
        return terms, None, upper_terms, h_y
    log_q = torch.log(per_class[idx, inv]) - torch.log(per_class.sum(1))
    k = len(classes)
    log_q = torch.logaddexp(log_q + math.log1p(-eps), torch.full_like(log_q, math.log(eps / k)))
    return terms, log_q, upper_terms, h_y
