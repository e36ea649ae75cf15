"""Spectra of the weight matrices that the replica formula needs.

The formula sees a weight matrix ``W`` of shape ``(n_out, n_in)`` only through the
eigenvalues of ``W W^T`` (equivalently the nonzero ones of ``W^T W``).  A
:class:`Spectrum` stores the nonzero eigenvalues as a weighted discrete measure
(``values``, ``counts``; the counts add up to the number of nonzero eigenvalues,
``min(n_out, n_in)`` for a full-rank matrix) and the two dimensions, so that the
zero eigenvalues are implied.  Three sources:

- :func:`empirical_spectrum`: the actual matrix (exact for that matrix);
- :func:`marchenko_pastur`: i.i.d. Gaussian entries of variance ``scale**2 / n_in``
  in the large-width limit (Marchenko-Pastur law, integrated by Gauss-Legendre in
  the angle variable, which removes the square-root edges);
- :func:`orthogonal_spectrum`: a scaled matrix with orthonormal rows or columns,
  same Frobenius norm as the Gaussian one (all nonzero eigenvalues equal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Spectrum", "empirical_spectrum", "marchenko_pastur", "orthogonal_spectrum"]


@dataclass(frozen=True)
class Spectrum:
    """Nonzero eigenvalues of ``W W^T`` as a weighted measure.

    Attributes
    ----------
    values : ndarray, shape (k,)
        Nonzero eigenvalues (or quadrature nodes of their limiting law).
    counts : ndarray, shape (k,)
        How many eigenvalues each value stands for (may be fractional).
    n_out, n_in : int
        Shape of ``W``.
    """

    values: np.ndarray
    counts: np.ndarray
    n_out: int
    n_in: int

    @property
    def n_nonzero(self) -> float:
        return float(self.counts.sum())

    def trace(self) -> float:
        """``tr(W W^T)``, the squared Frobenius norm."""
        return float(np.dot(self.counts, self.values))

    def sum_over_out(self, f_nonzero, f_zero) -> float:
        """Sum over the ``n_out`` eigenvalues of ``W W^T`` of ``f``."""
        return float(
            np.dot(self.counts, f_nonzero(self.values)) + (self.n_out - self.n_nonzero) * f_zero
        )

    def sum_over_in(self, f_nonzero, f_zero) -> float:
        """Sum over the ``n_in`` eigenvalues of ``W^T W`` of ``f``."""
        return float(
            np.dot(self.counts, f_nonzero(self.values)) + (self.n_in - self.n_nonzero) * f_zero
        )


def empirical_spectrum(w, *, rtol: float = 1e-12) -> Spectrum:
    """Spectrum of an actual matrix ``w`` of shape ``(n_out, n_in)``."""
    w = np.asarray(w.detach().cpu().numpy() if hasattr(w, "detach") else w, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"a weight matrix must be 2-D (n_out, n_in), got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight matrix has NaN or inf entries")
    n_out, n_in = w.shape
    g = w @ w.T if n_out <= n_in else w.T @ w
    ev = np.linalg.eigvalsh(g)
    keep = ev > rtol * max(float(ev.max(initial=0.0)), 1e-300)
    ev = ev[keep]
    return Spectrum(ev, np.ones_like(ev), n_out, n_in)


def marchenko_pastur(n_out: int, n_in: int, scale: float = 1.0, *, n_nodes: int = 256) -> Spectrum:
    """Large-width spectrum of ``W W^T`` for i.i.d. ``N(0, scale**2 / n_in)`` entries.

    With ``k = min(n_out, n_in)``, ``K = max(n_out, n_in)`` and ``c = k / K``, the ``k``
    nonzero eigenvalues are ``scale**2 * K / n_in`` times a Marchenko-Pastur variable of
    ratio ``c`` (support ``[(1 - sqrt c)^2, (1 + sqrt c)^2]``, mean 1).
    """
    k, big = min(n_out, n_in), max(n_out, n_in)
    c = k / big
    lo, hi = (1 - np.sqrt(c)) ** 2, (1 + np.sqrt(c)) ** 2
    nodes, wts = np.polynomial.legendre.leggauss(n_nodes)
    theta = 0.5 * np.pi * (nodes + 1.0)
    x = 0.5 * (lo + hi) + 0.5 * (hi - lo) * np.cos(theta)
    # density sqrt((hi-x)(x-lo)) / (2 pi c x) dx, with dx = (hi-lo)/2 sin(theta) dtheta
    dens = (0.5 * (hi - lo)) ** 2 * np.sin(theta) ** 2 / (2 * np.pi * c * x)
    w = dens * wts * 0.5 * np.pi
    w = w / w.sum()
    values = scale**2 * big / n_in * x
    return Spectrum(values, k * w, n_out, n_in)


def orthogonal_spectrum(n_out: int, n_in: int, scale: float = 1.0) -> Spectrum:
    """Spectrum of a scaled matrix with orthonormal rows (or columns).

    Same squared Frobenius norm as the Gaussian ensemble, ``scale**2 * n_out``:
    the ``min(n_out, n_in)`` nonzero eigenvalues all equal ``scale**2 * n_out / min``.
    """
    k = min(n_out, n_in)
    return Spectrum(np.array([scale**2 * n_out / k]), np.array([float(k)]), n_out, n_in)
