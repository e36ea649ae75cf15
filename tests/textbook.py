"""Reference ("textbook") implementations used by the benchmarks and the tests.

Nothing here is clever: each function is the formula as people usually write it,
so that the stochmi kernel can be checked against it and timed against it.

* :func:`broadcast_log_prob_matrix` -- ``L[j, i] = log p(t_j | s_i)`` by broadcasting
  ``cond.log_prob(t[:, None])`` over all pairs (the ``N x N x d`` intermediate that the
  textbook code materialises), chunked over rows only when asked to.
* :func:`gaussian_log_prob_direct` -- the same matrix for diagonal Gaussians from direct
  differences ``(t_jd - mu_id) / s_id`` in float64 (no ``|t|^2 + |mu|^2 - 2 t.mu``
  expansion, hence no cancellation): the exact reference for large-magnitude inputs.
* :func:`mi_from_matrix` -- dataset MI and leave-one-out upper bound from a full ``L``.
* :func:`kde_pairwise_mi` -- the pairwise-distance code of information-plane studies
  (Kolchinsky & Tracey 2017; Saxe et al. 2018, ``kde.py``), in numpy float64.
* :func:`brute_force_pairwise_bounds` -- Kolchinsky-Tracey bounds by explicit double loops
  over pairs of diagonal Gaussians (small N only).
* :func:`estimator_draws` -- the channel draws that :func:`stochmi.mi_from_conditional`
  uses for a given seed, so references see the same samples.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import logsumexp
from torch import distributions as td

__all__ = [
    "estimator_draws",
    "broadcast_log_prob_matrix",
    "gaussian_log_prob_direct",
    "mi_from_matrix",
    "kde_pairwise_mi",
    "brute_force_pairwise_bounds",
]

_LOG_2PI = math.log(2.0 * math.pi)


def estimator_draws(cond: td.Distribution, n_draws: int, seed: int) -> torch.Tensor:
    """The draws ``t`` that ``mi_from_conditional(cond, n_draws=n_draws, seed=seed)`` uses.

    Returns
    -------
    Tensor, shape (n_draws, N, *event)
        Row ``t[r, j]`` is drawn from ``p(t | s_j)``.
    """
    from stochmi.core.estimator import make_generator
    from stochmi.core.kernel import LogDensityKernel

    kernel = LogDensityKernel(cond)
    gen, _ = make_generator(seed, kernel.device)
    return kernel.sample(n_draws, gen)


def broadcast_log_prob_matrix(
    cond: td.Distribution, t: torch.Tensor, chunk_rows: int | None = None
) -> torch.Tensor:
    """``L[j, i] = cond.log_prob(t[:, None])[j, i]`` by plain broadcasting.

    This is the textbook implementation: ``t`` of shape ``(M, *event)`` is viewed as
    ``(M, 1, *event)`` and broadcast against the batch ``(N,)`` of ``cond``, which builds
    an ``(M, N, *event)`` intermediate.  ``chunk_rows`` splits the ``M`` rows only to
    fit memory.

    Parameters
    ----------
    cond : Distribution, batch shape (N,)
    t : Tensor, shape (M, *event)
    chunk_rows : int, optional
        Rows per broadcast (all ``M`` at once when omitted).

    Returns
    -------
    Tensor, shape (M, N), float64
    """
    m = t.shape[0]
    b = chunk_rows or m
    out = torch.empty(m, cond.batch_shape[0], dtype=torch.float64)
    for s in range(0, m, b):
        out[s : s + b] = cond.log_prob(t[s : s + b].unsqueeze(1)).to(torch.float64)
    return out


def gaussian_log_prob_direct(
    loc: torch.Tensor, scale: torch.Tensor | float, t: torch.Tensor, chunk_rows: int = 64
) -> torch.Tensor:
    """``log N(t_j; mu_i, diag(s_i^2))`` from direct differences, in float64.

    .. math::

        L_{ji} = -\\tfrac12 \\sum_d \\Big(\\frac{t_{jd} - \\mu_{id}}{s_{id}}\\Big)^2
                 - \\sum_d \\log s_{id} - \\tfrac{d}{2}\\log 2\\pi

    Parameters
    ----------
    loc : Tensor, shape (N, d) or (N,)
    scale : float or Tensor broadcastable to ``loc``
    t : Tensor, shape (M, d) or (M,)

    Returns
    -------
    Tensor, shape (M, N), float64
    """
    loc = torch.as_tensor(loc).to(torch.float64)
    if loc.dim() == 1:
        loc = loc[:, None]
    scale = torch.as_tensor(scale).to(torch.float64)
    if scale.dim() == 1 and loc.shape[1] == 1 and scale.shape[0] == loc.shape[0]:
        scale = scale[:, None]
    scale = torch.broadcast_to(scale, loc.shape)
    t = torch.as_tensor(t).to(torch.float64)
    if t.dim() == 1:
        t = t[:, None]
    d = loc.shape[1]
    norm = -torch.log(scale).sum(1) - 0.5 * d * _LOG_2PI  # (N,)
    out = torch.empty(t.shape[0], loc.shape[0], dtype=torch.float64)
    for s in range(0, t.shape[0], chunk_rows):
        z = (t[s : s + chunk_rows, None, :] - loc[None]) / scale[None]
        out[s : s + chunk_rows] = -0.5 * (z * z).sum(-1) + norm
    return out


def mi_from_matrix(lmat: torch.Tensor, n_draws: int = 1) -> tuple[float, float]:
    """Dataset MI and leave-one-out upper bound from the full matrix ``L``.

    Rows are draw-major: row ``r * N + j`` is a draw from source ``j``.

    .. math::

        \\hat I = \\operatorname{mean}_j \\big(L_{jj} - \\log\\tfrac1N \\sum_i e^{L_{ji}}\\big),

        U = \\operatorname{mean}_j \\big(L_{jj}
            - \\log\\tfrac1{N-1} \\sum_{i\\ne j} e^{L_{ji}}\\big)

    Parameters
    ----------
    lmat : Tensor, shape (n_draws * N, N)

    Returns
    -------
    (value, upper) : tuple of float
    """
    lmat = lmat.to(torch.float64)
    n = lmat.shape[1]
    rows = torch.arange(lmat.shape[0])
    src = rows % n
    diag = lmat[rows, src]
    value = (diag - torch.logsumexp(lmat, 1) + math.log(n)).mean()
    masked = lmat.clone()
    masked[rows, src] = -math.inf
    upper = (diag - torch.logsumexp(masked, 1) + math.log(n - 1)).mean()
    return float(value), float(upper)


def _pairwise_sq_dists(x: np.ndarray) -> np.ndarray:
    """``|x_i - x_j|^2`` as in ``kde.py``: ``x2 + x2.T - 2 x x^T``."""
    x2 = (x**2).sum(axis=1)[:, None]
    return x2 + x2.T - 2.0 * x.dot(x.T)


def _entropy_estimator_kl(x: np.ndarray, var: float) -> float:
    """KL upper bound on the entropy of the mixture ``(1/N) sum_i N(x_i, var I)`` (kde.py)."""
    n, dims = x.shape
    dists = _pairwise_sq_dists(x)
    dists2 = dists / (2.0 * var)
    normconst = (dims / 2.0) * np.log(2.0 * np.pi * var)
    lprobs = logsumexp(-dists2, axis=1) - np.log(n) - normconst
    h = -np.mean(lprobs)
    return dims / 2.0 + h


def _entropy_estimator_bd(x: np.ndarray, var: float) -> float:
    """Bhattacharyya lower bound on the same mixture entropy (kde.py)."""
    dims = x.shape[1]
    return _entropy_estimator_kl(x, 4.0 * var) + np.log(0.25) * dims / 2.0


def _kde_condentropy(x: np.ndarray, var: float) -> float:
    """Entropy of one component ``N(0, var I)`` in nats (kde.py)."""
    dims = x.shape[1]
    return (dims / 2.0) * (np.log(2.0 * np.pi * var) + 1.0)


def kde_pairwise_mi(x: np.ndarray, var: float, lower: bool = False) -> float | tuple[float, float]:
    """MI bounds of the pairwise-distance code used in information-plane studies.

    Written as in Kolchinsky's ``kde.py`` (Saxe et al. 2018, ibsgd): the KL upper
    bound on the entropy of ``(1/N) sum_i N(x_i, var I)`` minus the entropy of one
    component, all in numpy float64 with the full ``N x N`` distance matrix.

    Parameters
    ----------
    x : ndarray, shape (N, d)
        Component means (the activations).
    var : float
        Noise variance ``sigma^2``.
    lower : bool
        Also return the Bhattacharyya lower bound.

    Returns
    -------
    float, or (lower, upper) when ``lower=True``
    """
    x = np.asarray(x, dtype=np.float64)
    h_cond = _kde_condentropy(x, var)
    upper = _entropy_estimator_kl(x, var) - h_cond
    if not lower:
        return float(upper)
    return float(_entropy_estimator_bd(x, var) - h_cond), float(upper)


def brute_force_pairwise_bounds(loc: np.ndarray, scale: np.ndarray) -> tuple[float, float]:
    """Kolchinsky-Tracey ``(lower, upper)`` by an explicit loop over pairs.

    For diagonal Gaussians ``p_i = N(mu_i, diag(s_i^2))``:

    .. math::

        \\mathrm{KL}(p_i\\|p_j) = \\tfrac12 \\big[\\operatorname{tr}(\\Sigma_j^{-1}\\Sigma_i)
           + \\Delta^\\top \\Sigma_j^{-1} \\Delta - d
           + \\log\\det\\Sigma_j - \\log\\det\\Sigma_i\\big],

        \\mathrm{BD}(p_i, p_j) = \\tfrac18 \\Delta^\\top \\bar\\Sigma^{-1} \\Delta
           + \\tfrac12 \\log\\frac{\\det\\bar\\Sigma}{\\sqrt{\\det\\Sigma_i\\det\\Sigma_j}},
        \\quad \\bar\\Sigma = \\tfrac12(\\Sigma_i + \\Sigma_j),

    and ``I_D = -(1/N) sum_i log (1/N) sum_j exp(-D(p_i, p_j))``.  Uses dense
    covariance matrices and ``numpy.linalg`` on purpose (independent of the vectorised code).

    Parameters
    ----------
    loc : ndarray, shape (N, d)
    scale : ndarray, shape (N, d)

    Returns
    -------
    (lower, upper) : tuple of float
    """
    loc = np.asarray(loc, dtype=np.float64)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float64), loc.shape)
    n, d = loc.shape
    kl = np.zeros((n, n))
    bd = np.zeros((n, n))
    for i in range(n):
        si = np.diag(scale[i] ** 2)
        for j in range(n):
            sj = np.diag(scale[j] ** 2)
            delta = loc[i] - loc[j]
            sj_inv = np.linalg.inv(sj)
            kl[i, j] = 0.5 * (
                np.trace(sj_inv @ si)
                + delta @ sj_inv @ delta
                - d
                + np.linalg.slogdet(sj)[1]
                - np.linalg.slogdet(si)[1]
            )
            sbar = 0.5 * (si + sj)
            bd[i, j] = 0.125 * delta @ np.linalg.inv(sbar) @ delta + 0.5 * (
                np.linalg.slogdet(sbar)[1]
                - 0.5 * (np.linalg.slogdet(si)[1] + np.linalg.slogdet(sj)[1])
            )
    lower = -np.mean(logsumexp(-bd, axis=1) - np.log(n))
    upper = -np.mean(logsumexp(-kl, axis=1) - np.log(n))
    return float(lower), float(upper)
