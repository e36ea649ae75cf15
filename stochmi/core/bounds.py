"""Pairwise-distance bounds on the MI of a Gaussian channel (Kolchinsky & Tracey 2017).

For sources uniform over ``N`` values and ``p(t | s_i) = N(mu_i, diag(s_i^2))`` the
output is a Gaussian mixture, and for any premetric ``D`` between components

.. math::

    I_D = -\\frac{1}{N} \\sum_i \\log \\frac{1}{N} \\sum_j e^{-D(p_i, p_j)}

is an upper bound on the dataset MI when ``D`` is the KL divergence and a lower
bound when ``D`` is the Bhattacharyya distance.  For diagonal Gaussians

.. math::

    \\mathrm{KL}(p_i \\| p_j) = \\tfrac12 \\sum_d \\Big[
        \\frac{s_{id}^2 + (\\mu_{id}-\\mu_{jd})^2}{s_{jd}^2}
        - 1 + \\log\\frac{s_{jd}^2}{s_{id}^2}\\Big],

    \\mathrm{BD}(p_i, p_j) = \\sum_d \\Big[\\frac{(\\mu_{id}-\\mu_{jd})^2}{4 (s_{id}^2 + s_{jd}^2)}
        + \\tfrac12 \\log\\frac{s_{id}^2 + s_{jd}^2}{2 s_{id} s_{jd}}\\Big].

With one scale shared by all sources they reduce to ``|mu_i - mu_j|^2 / (2 s^2)``
and ``|mu_i - mu_j|^2 / (8 s^2)`` (after dividing by a per-dimension scale), which
are computed as matrix products.  Both are deterministic: no Monte Carlo.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pairwise_bounds"]

_BUDGET = 64 * 2**20


def _lme_rows(neg_d: torch.Tensor) -> torch.Tensor:
    """log mean_j exp(-D[i, j]) per row, float64."""
    return torch.logsumexp(neg_d, dim=1) - math.log(neg_d.shape[1])


def pairwise_bounds(
    loc: torch.Tensor,
    scale: torch.Tensor | float,
    *,
    chunk_size: int | None = None,
) -> tuple[float, float]:
    """Kolchinsky-Tracey bounds ``(lower, upper)`` on the dataset MI of a Gaussian channel.

    Parameters
    ----------
    loc : Tensor, shape (N, d) or (N,)
        Means ``mu_i`` of ``p(t | s_i)``.
    scale : float or Tensor broadcastable to (N, d)
        Standard deviations: a scalar, per-dimension ``(d,)``, or per-source ``(N, d)``.
    chunk_size : int, optional
        Rows per block (memory ``O(chunk_size * N)``, times a block of ``d`` for
        per-source scales).

    Returns
    -------
    (lower, upper) : tuple of float
        Bhattacharyya lower bound and KL upper bound, in nats.
    """
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    loc = torch.as_tensor(loc, dtype=torch.float64)
    if loc.dim() == 1:
        loc = loc[:, None]
    if loc.dim() != 2 or loc.shape[0] < 2:
        raise ValueError(f"loc must have shape (N, d) with N >= 2, got {tuple(loc.shape)}")
    scale = torch.as_tensor(scale, dtype=torch.float64, device=loc.device)
    if scale.dim() == 1 and loc.shape[1] == 1 and scale.shape[0] == loc.shape[0]:
        scale = scale[:, None]
    try:
        scale = torch.broadcast_to(scale, loc.shape)
    except RuntimeError:
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} does not match loc of shape "
            f"{tuple(loc.shape)}: give a scalar, a per-dimension ({loc.shape[1]},) or a "
            f"per-source ({loc.shape[0]}, {loc.shape[1]}) scale"
        ) from None
    if not (torch.isfinite(loc).all() and torch.isfinite(scale).all()):
        raise ValueError("loc and scale must be finite")
    if (scale < 0).any():
        raise ValueError(
            f"scale must be positive, got negative values (smallest {float(scale.min()):.3g})"
        )
    if (scale == 0).any():
        raise ValueError("scale must be positive: a zero-noise channel has infinite MI")
    n, d = loc.shape
    shared = bool((scale == scale[:1]).all())
    if shared:
        # -D/2 = <z_i, z_j> - |z_i|^2/2 - |z_j|^2/2 in one addmm per block
        z = (loc - loc.mean(0)) / scale[0]
        half_sq = 0.5 * (z * z).sum(1)
        zt = z.T.contiguous()
        b = chunk_size or max(16, _BUDGET // (8 * 2 * n))
        lo_terms, up_terms = [], []
        for s in range(0, n, b):
            neg_half = torch.addmm(-half_sq, z[s : s + b], zt)
            neg_half.sub_(half_sq[s : s + b, None]).clamp_(max=0.0)
            up_terms.append(_lme_rows(neg_half))  # exp(-KL) = exp(-D/2)
            lo_terms.append(_lme_rows(neg_half.mul_(0.25)))  # exp(-BD) = exp(-D/8)
        return float(-torch.cat(lo_terms).mean()), float(-torch.cat(up_terms).mean())
    var = scale * scale
    logvar = torch.log(var)
    db = max(1, min(d, _BUDGET // (8 * n * 16)))
    # rows capped by the memory budget whatever chunk_size says: a block is (b, N, db)
    b = min(chunk_size or n, max(1, _BUDGET // (8 * n * db * 4)))
    lo_terms, up_terms = [], []
    for s in range(0, n, b):
        kl = torch.zeros(min(b, n - s), n, dtype=torch.float64, device=loc.device)
        bd = torch.zeros_like(kl)
        for e in range(0, d, db):
            mi, vi, li = (
                loc[s : s + b, None, e : e + db],
                var[s : s + b, None, e : e + db],
                logvar[s : s + b, None, e : e + db],
            )
            mj, vj, lj = (
                loc[None, :, e : e + db],
                var[None, :, e : e + db],
                logvar[None, :, e : e + db],
            )
            diff2 = (mi - mj) ** 2
            kl += 0.5 * ((vi + diff2) / vj - 1.0 + lj - li).sum(-1)
            vs = vi + vj
            bd += (diff2 / (4.0 * vs) + 0.5 * (torch.log(0.5 * vs) - 0.5 * (li + lj))).sum(-1)
        up_terms.append(_lme_rows(-kl))
        lo_terms.append(_lme_rows(-bd))
    return float(-torch.cat(lo_terms).mean()), float(-torch.cat(up_terms).mean())
