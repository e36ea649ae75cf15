"""Closed-form mutual information of Gaussian models, for checking estimators.

All results are in nats.
"""

from __future__ import annotations

import math

import torch

__all__ = ["linear_gaussian_mi", "gaussian_mi_from_cov", "mixture_entropy_1d"]


def _as64(x) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float64)


def linear_gaussian_mi(A, cov_x=1.0, sigma_n=1.0) -> float:
    """I(X; T) for ``T = A X + sigma_n Z`` with ``X ~ N(0, cov_x)``, ``Z ~ N(0, I)``.

    .. math:: I = \\tfrac12 \\log\\det\\big(I + A \\Sigma_x A^\\top / \\sigma_n^2\\big)

    Parameters
    ----------
    A : array-like, shape (d_t, d_x) (a scalar is a 1 x 1 map)
    cov_x : float or array-like, shape (d_x,) (variances) or (d_x, d_x)
    sigma_n : float
        Noise standard deviation (> 0).
    """
    A = _as64(A)
    if A.dim() == 0:
        A = A.reshape(1, 1)
    if A.dim() != 2:
        raise ValueError(f"A must be a matrix, got shape {tuple(A.shape)}")
    if sigma_n <= 0:
        raise ValueError("sigma_n must be positive (zero noise gives infinite MI)")
    c = _as64(cov_x)
    if c.dim() == 0:
        c = c * torch.eye(A.shape[1], dtype=torch.float64)
    elif c.dim() == 1:
        c = torch.diag(c)
    m = torch.eye(A.shape[0], dtype=torch.float64) + A @ c @ A.T / sigma_n**2
    return 0.5 * float(torch.linalg.slogdet(m)[1])


def gaussian_mi_from_cov(cov, idx_x, idx_y) -> float:
    """I(X; Y) for jointly Gaussian ``(X, Y)`` with joint covariance ``cov``.

    .. math::

        I = \\tfrac12\\big(\\log\\det\\Sigma_{XX} + \\log\\det\\Sigma_{YY}
            - \\log\\det\\Sigma\\big)

    Parameters
    ----------
    cov : array-like, shape (D, D)
        Joint covariance (positive definite on the selected coordinates).
    idx_x, idx_y : sequence of int
        Disjoint coordinate indices of X and Y.
    """
    cov = _as64(cov)
    ix, iy = list(idx_x), list(idx_y)
    if set(ix) & set(iy):
        raise ValueError("idx_x and idx_y must be disjoint")
    both = ix + iy
    sub = cov[both][:, both]
    ld = lambda m: float(torch.linalg.slogdet(m)[1])  # noqa: E731
    return 0.5 * (ld(cov[ix][:, ix]) + ld(cov[iy][:, iy]) - ld(sub))


def mixture_entropy_1d(log_density, lo: float, hi: float, n_grid: int = 200_001) -> float:
    """Differential entropy ``-int p log p`` of a 1-D density by the trapezoid rule.

    Parameters
    ----------
    log_density : callable
        Maps a float64 tensor of points, shape (G,), to ``log p`` at those points.
    lo, hi : float
        Integration range (must hold essentially all the mass).
    n_grid : int
        Grid points.
    """
    x = torch.linspace(lo, hi, n_grid, dtype=torch.float64)
    lp = log_density(x)
    integrand = torch.where(torch.isfinite(lp), -lp.exp() * lp, torch.zeros_like(lp))
    mass = float(torch.trapezoid(lp.exp(), x))
    if abs(mass - 1.0) > 1e-6:
        raise ValueError(f"density integrates to {mass:.8f} on [{lo}, {hi}]; widen the range")
    return float(torch.trapezoid(integrand, x))


LOG2 = math.log(2.0)
