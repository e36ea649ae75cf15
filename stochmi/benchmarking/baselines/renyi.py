"""Kernel (information-theoretic learning) MI estimators.

* :class:`MatrixRenyi`: matrix-based Renyi alpha-entropy MI (Sanchez Giraldo, Rao &
  Principe, IEEE Trans. Inf. Theory 2015; Yu et al., "Understanding convolutional
  neural networks with information theory", 2019).
* :class:`ParzenQMI`: Cauchy-Schwarz quadratic MI and quadratic Renyi MI with
  Parzen windows (Principe et al.; Hild, Erdogmus, Torkkola & Principe, TPAMI 2006),
  in closed form for Gaussian kernels.

All values in nats (natural logarithms; the papers use log2).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from stochmi.benchmarking.baselines.util import (
    as_2d_float,
    as_labels,
    check_pair,
    checked_estimate,
    is_label_array,
    scott_bandwidth,
    torch_threads,
)
from stochmi.core.estimate import MIEstimate

__all__ = ["MatrixRenyi", "ParzenQMI", "kernel_width", "renyi_matrix_entropy"]


def kernel_width(a: np.ndarray, rule: float | str) -> float:
    """Gaussian kernel width ``sigma`` for data ``a`` (N, d).

    ``rule``: a positive float (used as is), ``"scott"`` (``s N^(-1/(d+4))``, ``s`` the
    root mean per-coordinate variance) or ``"median"`` (median pairwise Euclidean
    distance over at most 1000 rows, divided by sqrt(2)).
    """
    if isinstance(rule, str):
        if rule == "scott":
            return scott_bandwidth(a)
        if rule == "median":
            z = torch.as_tensor(a[:1000], dtype=torch.float64)
            d = torch.cdist(z, z)
            iu = torch.triu_indices(len(z), len(z), offset=1)
            med = float(d[iu[0], iu[1]].median()) if len(z) > 1 else 1.0
            return med / math.sqrt(2.0) if med > 0 else 1.0
        raise ValueError(f"kernel width rule must be a float, 'scott' or 'median', got {rule!r}")
    sigma = float(rule)
    if not sigma > 0:
        raise ValueError(f"kernel width must be positive, got {sigma}")
    return sigma


def _gram(a: np.ndarray | None, labels: np.ndarray | None, sigma: float, *, scale: float = 2.0):
    """Gram matrix ``exp(-|a_i - a_j|^2 / (scale sigma^2))`` (float64), or the label kernel."""
    if labels is not None:
        y = torch.as_tensor(labels)
        return (y[:, None] == y[None, :]).double()
    z = torch.as_tensor(a, dtype=torch.float64)
    z = z - z.mean(0, keepdim=True)
    sq = (z * z).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * z @ z.T).clamp_(min=0.0)
    return torch.exp(-d2 / (scale * sigma**2))


def renyi_matrix_entropy(a: torch.Tensor, alpha: float) -> float:
    r"""Matrix-based Renyi alpha-entropy of a PSD matrix with unit trace (nats).

    ``S_alpha(A) = log(sum_i lambda_i(A)^alpha) / (1 - alpha)``; at ``alpha = 1`` the
    von Neumann entropy ``-sum_i lambda_i log lambda_i``.
    """
    lam = torch.linalg.eigvalsh(a).clamp(min=0.0)
    lam = lam / lam.sum()
    if alpha == 1.0:
        nz = lam[lam > 0]
        return float(-(nz * nz.log()).sum())
    return float(torch.log((lam**alpha).sum()) / (1.0 - alpha))


def _parse(a: Any, name: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    if is_label_array(a, name):
        return None, as_labels(a, name)
    return as_2d_float(a, name), None


def _parse_pair(x: Any, t: Any, sigma_x: float | str, sigma_t: float | str):
    """Parse ``x`` and ``t`` (features or labels) and their kernel widths.

    Returns ``(xa, xl, ta, tl, n, sx, st)``: for each side the float features
    ``(N, d)`` or ``None`` and the integer labels ``(N,)`` or ``None``, the common
    sample count ``N``, and the widths (1.0 for a label side, else :func:`kernel_width`).
    """
    xa, xl = _parse(x, "x")
    ta, tl = _parse(t, "t")
    n = check_pair((xa if xa is not None else xl[:, None]), (ta if ta is not None else tl[:, None]))
    sx = 1.0 if xa is None else kernel_width(xa, sigma_x)
    st = 1.0 if ta is None else kernel_width(ta, sigma_t)
    return xa, xl, ta, tl, n, sx, st


class MatrixRenyi:
    r"""Matrix-based Renyi alpha-order MI (Giraldo, Rao & Principe 2015; Yu et al. 2019).

    With Gaussian Gram matrices ``K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))`` normalised
    to unit trace, ``A_ij = K_ij / (N sqrt(K_ii K_jj))`` (and ``B`` likewise for ``t``),

    .. math::

        S_\alpha(A) &= \frac{1}{1-\alpha} \log \sum_i \lambda_i(A)^\alpha, \\
        I_\alpha(X;T) &= S_\alpha(A) + S_\alpha(B)
              - S_\alpha\!\Big(\frac{A \circ B}{\operatorname{tr}(A \circ B)}\Big),

    with ``∘`` the Hadamard product and ``lambda_i`` eigenvalues.  Integer labels use
    the kernel ``K_ij = [y_i = y_j]``.

    Parameters
    ----------
    alpha : float
        Renyi order (> 0; Yu et al. use 1.01; 1 gives the von Neumann entropy).
    sigma_x, sigma_t : float or {"scott", "median"}
        Kernel widths (see :func:`kernel_width`).
    num_threads : int or None
        torch threads for the eigendecompositions (restored afterwards).  LAPACK's
        symmetric eigensolver gains little from threads and loses 10x when the
        cores are busy; ``None`` keeps torch's setting.

    Notes
    -----
    O(N^2 d) memory-light Gram construction, O(N^3) eigendecompositions: N of a
    few thousand.  The value depends on the kernel widths; it is not Shannon MI and
    is at most ``log N``.  ``stderr`` is ``nan``.
    """

    name = "renyi"

    def __init__(
        self,
        alpha: float = 1.01,
        sigma_x: float | str = "scott",
        sigma_t: float | str = "scott",
        num_threads: int | None = 1,
    ) -> None:
        if not alpha > 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = float(alpha)
        self.sigma_x = sigma_x
        self.sigma_t = sigma_t
        self.num_threads = num_threads

    @checked_estimate
    def estimate(self, x: Any, t: Any, *, seed: int | None = None) -> MIEstimate:
        """Estimate ``I_alpha(X; T)`` in nats.

        Parameters
        ----------
        x : tensor or array, shape (N, dx), or integer labels (N,)
        t : tensor or array, shape (N, dt), or integer labels (N,)
        seed : ignored (deterministic)
        """
        xa, xl, ta, tl, n, sx, st = _parse_pair(x, t, self.sigma_x, self.sigma_t)
        kx = _gram(xa, xl, sx)
        kt = _gram(ta, tl, st)
        a = kx / n  # Gaussian / label kernels have unit diagonal
        b = kt / n
        ab = a * b
        ab = ab / ab.trace()
        with torch_threads(self.num_threads):
            hx = renyi_matrix_entropy(a, self.alpha)
            ht = renyi_matrix_entropy(b, self.alpha)
            hxt = renyi_matrix_entropy(ab, self.alpha)
        return MIEstimate(
            value=hx + ht - hxt,
            n=n,
            method=self.name,
            extra={
                "alpha": self.alpha,
                "sigma_x": sx,
                "sigma_t": st,
                "S_x": hx,
                "S_t": ht,
                "S_xt": hxt,
            },
        )


class ParzenQMI:
    r"""Quadratic MI with Parzen windows: Cauchy-Schwarz QMI (default) or Renyi-2 MI.

    With Gaussian Parzen windows of widths ``sigma_x``, ``sigma_t`` the integrals of
    products of density estimates are pairwise sums of Gaussians of variance
    ``2 sigma^2`` (the convolution of two windows).  Let
    ``Kx_ij = exp(-|x_i - x_j|^2 / (4 sigma_x^2))``, ``Kt`` likewise, and

    .. math::

        V_J = \frac{1}{N^2}\sum_{ij} Kx_{ij} Kt_{ij}, \quad
        V_M = \Big(\frac{1}{N^2}\sum_{ij} Kx_{ij}\Big)\Big(\frac{1}{N^2}\sum_{ij} Kt_{ij}\Big),
        \quad
        V_C = \frac{1}{N^3}\sum_i \Big(\sum_j Kx_{ij}\Big)\Big(\sum_j Kt_{ij}\Big).

    Then (Gaussian normalising constants cancel)

    .. math::

        I_{CS} = \log V_J + \log V_M - 2 \log V_C \;\ge 0, \qquad
        I_{R2} = H_2(X) + H_2(T) - H_2(X, T) = \log V_J - \log V_M,

    where ``H_2(Z) = -log int p_hat(z)^2 dz`` is Renyi's quadratic entropy of the
    Parzen estimate (Hild et al. 2006).  Integer labels use ``K_ij = [y_i = y_j]``.

    Parameters
    ----------
    kind : {"cs", "renyi2"}
    sigma_x, sigma_t : float or {"scott", "median"}
        Parzen window widths (see :func:`kernel_width`).
    chunk_size : int
        Rows per chunk (memory O(chunk * N)).

    Notes
    -----
    ``I_CS`` is a divergence between the joint and the product of marginals in the
    Cauchy-Schwarz sense, not Shannon MI; ``I_R2`` can be negative.  Both depend on
    the window widths.  ``stderr`` is ``nan``.
    """

    name = "cs_qmi"

    def __init__(
        self,
        kind: str = "cs",
        sigma_x: float | str = "scott",
        sigma_t: float | str = "scott",
        chunk_size: int = 1024,
    ) -> None:
        if kind not in ("cs", "renyi2"):
            raise ValueError(f"kind must be 'cs' or 'renyi2', got {kind!r}")
        self.kind = kind
        self.sigma_x = sigma_x
        self.sigma_t = sigma_t
        self.chunk_size = int(chunk_size)

    @staticmethod
    def _rows(a, labels, sigma, sl):
        if labels is not None:
            y = torch.as_tensor(labels)
            return (y[sl, None] == y[None, :]).double()
        z = a
        sq = (z * z).sum(1)
        d2 = (sq[sl, None] + sq[None, :] - 2.0 * z[sl] @ z.T).clamp_(min=0.0)
        return torch.exp(-d2 / (4.0 * sigma**2))

    @checked_estimate
    def estimate(self, x: Any, t: Any, *, seed: int | None = None) -> MIEstimate:
        """Estimate the quadratic MI of ``x`` and ``t`` in nats.

        Parameters
        ----------
        x : tensor or array, shape (N, dx), or integer labels (N,)
        t : tensor or array, shape (N, dt), or integer labels (N,)
        seed : ignored (deterministic)
        """
        xa, xl, ta, tl, n, sx, st = _parse_pair(x, t, self.sigma_x, self.sigma_t)
        zx = None if xa is None else torch.as_tensor(xa - xa.mean(0), dtype=torch.float64)
        zt = None if ta is None else torch.as_tensor(ta - ta.mean(0), dtype=torch.float64)
        vj = sum_x = sum_t = vc = 0.0
        for s0 in range(0, n, self.chunk_size):
            sl = slice(s0, min(s0 + self.chunk_size, n))
            kx = self._rows(zx, xl, sx, sl)
            kt = self._rows(zt, tl, st, sl)
            vj += float((kx * kt).sum())
            rx, rt = kx.sum(1), kt.sum(1)
            sum_x += float(rx.sum())
            sum_t += float(rt.sum())
            vc += float((rx * rt).sum())
        log_vj = math.log(vj) - 2 * math.log(n)
        log_vm = math.log(sum_x) + math.log(sum_t) - 4 * math.log(n)
        log_vc = math.log(vc) - 3 * math.log(n)
        if self.kind == "cs":
            value = log_vj + log_vm - 2.0 * log_vc
        else:
            value = log_vj - log_vm
        return MIEstimate(
            value=value,
            n=n,
            method=self.name if self.kind == "cs" else "renyi2_qmi",
            extra={
                "kind": self.kind,
                "sigma_x": sx,
                "sigma_t": st,
                "log_VJ": log_vj,
                "log_VM": log_vm,
                "log_VC": log_vc,
            },
        )
