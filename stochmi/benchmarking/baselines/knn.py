"""k-nearest-neighbour MI estimators: KSG (Kraskov, Stögbauer & Grassberger 2004).

Vectorised: a k-d tree (``scipy.spatial.cKDTree``, max-norm) for low dimensions,
chunked brute force in torch (``torch.cdist(p=inf)``, memory O(chunk * N)) for high
dimensions.  No Python loop over samples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.special import digamma

from stochmi.benchmarking.baselines.util import (
    as_2d_float,
    as_labels,
    check_pair,
    checked_estimate,
    is_label_array,
    standardize,
)
from stochmi.core.estimate import MIEstimate
from stochmi.core.rng import numpy_generator

__all__ = ["KSG", "knn_radius", "count_within"]

_INF = float("inf")


def _use_tree(d: int, backend: str) -> bool:
    if backend == "auto":
        return d <= 16
    return backend == "kdtree"


def knn_radius(
    a: np.ndarray, k: int, *, backend: str = "auto", chunk_size: int = 512
) -> np.ndarray:
    """Max-norm distance from each row of ``a`` to its k-th nearest *other* row.

    Parameters
    ----------
    a : ndarray, shape (N, d)
    k : int, 1 <= k < N
    backend : {"auto", "kdtree", "brute"}

    Returns
    -------
    ndarray, shape (N,)
    """
    n = a.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    if _use_tree(a.shape[1], backend):
        dist, _ = cKDTree(a).query(a, k=k + 1, p=_INF)
        return dist[:, -1]
    z = torch.as_tensor(a, dtype=torch.float64)
    out = np.empty(n)
    for s in range(0, n, chunk_size):
        d = torch.cdist(z[s : s + chunk_size], z, p=_INF)
        # k+1 smallest includes the point itself (distance 0)
        out[s : s + chunk_size] = torch.topk(d, k + 1, dim=1, largest=False).values[:, -1].numpy()
    return out


def count_within(
    a: np.ndarray, r: np.ndarray, *, backend: str = "auto", chunk_size: int = 512
) -> np.ndarray:
    """Number of rows ``j`` (itself included) with ``max|a_j - a_i| < r_i`` (strict).

    Parameters
    ----------
    a : ndarray, shape (N, d)
    r : ndarray, shape (N,)
        Per-row radii (strict inequality).
    backend : {"auto", "kdtree", "brute"}

    Returns
    -------
    ndarray of int64, shape (N,)
    """
    if _use_tree(a.shape[1], backend):
        rr = np.nextafter(r, 0.0)  # query_ball_point counts <= r; make it strict
        return np.asarray(
            cKDTree(a).query_ball_point(a, r=rr, p=_INF, return_length=True), dtype=np.int64
        )
    z = torch.as_tensor(a, dtype=torch.float64)
    rt = torch.as_tensor(r, dtype=torch.float64)
    out = np.empty(a.shape[0], dtype=np.int64)
    for s in range(0, a.shape[0], chunk_size):
        d = torch.cdist(z[s : s + chunk_size], z, p=_INF)
        out[s : s + chunk_size] = (d < rt[s : s + chunk_size, None]).sum(dim=1).numpy()
    return out


class KSG:
    r"""Kraskov-Stögbauer-Grassberger estimator 1 (max-norm), with a labels variant.

    For each sample ``i`` let ``eps_i`` be the max-norm distance to its k-th nearest
    neighbour in the joint space ``(x, t)`` (max-norm of the concatenation, i.e.
    ``max(|dx|_inf, |dt|_inf)``), and ``n_x(i)``, ``n_t(i)`` the numbers of *other*
    samples strictly within ``eps_i`` in the marginal spaces.  Then

    .. math::

        \hat I(X;T) = \psi(k) + \psi(N)
          - \frac1N \sum_i \big[\psi(n_x(i) + 1) + \psi(n_t(i) + 1)\big].

    With integer labels as ``t`` (``x`` continuous) the mixed estimator of Ross
    (PLoS ONE 2014) is used: ``d_i`` = distance to the k-th neighbour among samples
    of the same class (``k`` capped at ``N_c - 1``), ``m_i`` = number of samples of
    any class strictly within ``d_i``, itself included (equivalently, the other
    samples within ``d_i``, the k-th neighbour included):

    .. math::

        \hat I(X;Y) = \psi(N) - \langle\psi(N_{y_i})\rangle + \langle\psi(k_i)\rangle
                      - \langle\psi(m_i)\rangle .

    Parameters
    ----------
    k : int
        Number of neighbours (3-10 typical; larger k: less variance, more bias).
    standardize : bool
        Scale every coordinate to unit variance first (the estimator is not
        invariant to per-coordinate scale at finite N); coordinates with a
        standard deviation below 0.1 x the mean one are scaled by that floor
        instead, so near-constant coordinates are not inflated.
    jitter : float
        Standard deviation (relative to each coordinate's std) of seeded Gaussian
        noise added to break ties (Kraskov et al. recommend ~1e-10); 0 disables.
    backend : {"auto", "kdtree", "brute"}
        k-d tree for total dimension <= 16 under "auto", else chunked brute force.

    Notes
    -----
    ``stderr`` is ``std(per-sample terms) / sqrt(N)``: cheap, but the terms are not
    independent, so it is an indication rather than a guaranteed error bar.  KSG is
    consistent for finite MI; for a deterministic layer (infinite MI) it returns a
    number that grows as ``k`` decreases and is capped near ``psi(N) - psi(k)``.
    """

    name = "ksg"

    def __init__(
        self, k: int = 3, standardize: bool = True, jitter: float = 1e-10, backend: str = "auto"
    ) -> None:
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if backend not in ("auto", "kdtree", "brute"):
            raise ValueError(f"backend must be 'auto', 'kdtree' or 'brute', got {backend!r}")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.k = int(k)
        self.standardize = bool(standardize)
        self.jitter = float(jitter)
        self.backend = backend

    def _prepare(self, a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.standardize:
            a = standardize(a)
        sd = a.std(axis=0)
        sd[sd == 0] = 1.0
        if self.jitter > 0:
            a = a + self.jitter * sd * rng.standard_normal(a.shape)
        return a

    @checked_estimate
    def estimate(self, x: Any, t: Any, *, seed: int | None = None) -> MIEstimate:
        """Estimate ``I(X; T)`` in nats.

        Parameters
        ----------
        x : tensor or array, shape (N, dx)
        t : tensor or array, shape (N, dt), or integer labels (N,)
        seed : int or None
            Seed of the tie-breaking jitter.
        """
        rng = numpy_generator(seed)
        xa = self._prepare(as_2d_float(x, "x"), rng)
        if is_label_array(t):
            return self._estimate_labels(xa, as_labels(t, "t"))
        ta = self._prepare(as_2d_float(t, "t"), rng)
        n = check_pair(xa, ta, min_n=self.k + 1)
        joint = np.hstack([xa, ta])
        eps = knn_radius(joint, self.k, backend=self.backend)
        nx = count_within(xa, eps, backend=self.backend) - 1
        nt = count_within(ta, eps, backend=self.backend) - 1
        terms = digamma(self.k) + digamma(n) - digamma(nx + 1) - digamma(nt + 1)
        return MIEstimate(
            value=float(terms.mean()),
            stderr=float(terms.std(ddof=1) / math.sqrt(n)),
            n=n,
            method=self.name,
            extra={"k": self.k},
        )

    def _estimate_labels(self, xa: np.ndarray, y: np.ndarray) -> MIEstimate:
        n = check_pair(xa, y[:, None])
        radius = np.zeros(n)
        k_all = np.zeros(n, dtype=np.int64)
        n_class = np.zeros(n, dtype=np.int64)
        for c in np.unique(y):
            mask = y == c
            cnt = int(mask.sum())
            n_class[mask] = cnt
            if cnt > 1:
                kc = min(self.k, cnt - 1)
                radius[mask] = knn_radius(xa[mask], kc, backend=self.backend)
                k_all[mask] = kc
        keep = n_class > 1  # singletons carry no neighbour information (as in sklearn)
        if keep.sum() < 2:
            raise ValueError("every class has a single sample; the labels estimator needs more")
        xa, radius, k_all, n_class = xa[keep], radius[keep], k_all[keep], n_class[keep]
        # strictly inside d_i, itself included: itself + its k-1 closer same-class
        # neighbours + other classes; equals Ross's count of *other* points within
        # d_i (k-th neighbour included).  The max guards against ties.
        m = np.maximum(count_within(xa, radius, backend=self.backend), k_all)
        n_eff = int(keep.sum())
        terms = digamma(n_eff) - digamma(n_class) + digamma(k_all) - digamma(m)
        return MIEstimate(
            value=float(terms.mean()),
            stderr=float(terms.std(ddof=1) / math.sqrt(n_eff)),
            n=n,
            method=self.name,
            extra={"k": self.k, "target": "I(X;Y)", "variant": "Ross 2014"},
        )
