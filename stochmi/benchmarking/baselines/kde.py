"""Kernel (pairwise-distance) estimator on deterministic activations with added noise.

Kolchinsky & Tracey (Entropy 2017) / Saxe et al. (ICLR 2018): pretend that the
layer is ``T + sigma Z`` with ``Z ~ N(0, I)`` and the input uniform over the N
samples.  The noisy layer is then a mixture of N Gaussians and its entropy has
pairwise-distance bounds; the MI with the sample index is bracketed without any
Monte Carlo.
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
)
from stochmi.core.estimate import MIEstimate

__all__ = ["KDE", "pairwise_log_mean_kernel"]


def pairwise_log_mean_kernel(
    a: np.ndarray | torch.Tensor, scale2: float, *, chunk_size: int = 1024
) -> torch.Tensor:
    r"""Row-wise ``log mean_j exp(-|a_i - a_j|^2 / scale2)``, chunked, float64.

    Parameters
    ----------
    a : array, shape (N, d)
    scale2 : float
        Divisor of the squared Euclidean distance (``2 sigma^2`` for the KL bound,
        ``8 sigma^2`` for the Bhattacharyya bound).
    chunk_size : int
        Rows per chunk; memory is O(chunk_size * N).

    Returns
    -------
    Tensor, shape (N,), float64
    """
    if scale2 <= 0:
        raise ValueError(f"scale2 must be positive, got {scale2}")
    z = torch.as_tensor(a, dtype=torch.float64)
    z = z - z.mean(dim=0, keepdim=True)  # centring guards |a|^2 + |b|^2 - 2ab cancellation
    n = z.shape[0]
    sq = (z * z).sum(dim=1)
    out = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        zc = z[start : start + chunk_size]
        d2 = sq[start : start + chunk_size, None] + sq[None, :] - 2.0 * (zc @ z.T)
        d2.clamp_(min=0.0)
        out[start : start + chunk_size] = torch.logsumexp(-d2 / scale2, dim=1) - math.log(n)
    return out


class KDE:
    r"""Pairwise-distance (KDE) MI of a deterministic layer with added Gaussian noise.

    With the input uniform over the N samples and ``T_noisy = t_i + sigma Z``
    (``sigma^2 = noise_variance``), ``T_noisy`` is the mixture
    ``(1/N) sum_i N(t_i, sigma^2 I)`` and
    ``I(X; T_noisy) = H(T_noisy) - H(noise)``.  Kolchinsky & Tracey's bounds on the
    mixture entropy give

    .. math::

        I_{\rm KL} &= -\frac1N \sum_i \log \frac1N \sum_j
                      \exp\!\Big(-\frac{\lVert t_i - t_j\rVert^2}{2\sigma^2}\Big)
                      \quad(\text{upper bound}),\\
        I_{\rm BD} &= -\frac1N \sum_i \log \frac1N \sum_j
                      \exp\!\Big(-\frac{\lVert t_i - t_j\rVert^2}{8\sigma^2}\Big)
                      \quad(\text{lower bound}).

    ``value`` is the KL upper bound (what Saxe et al. report); ``lower`` / ``upper``
    are the two bounds.  With integer labels as ``t`` (``x`` is then the layer) the
    estimate is ``I(T; Y) = H(T) - sum_y p(y) H(T | Y = y)`` with each mixture
    entropy replaced by its KL bound (a difference of bounds, not a bound; ``lower``
    and ``upper`` are ``nan``).

    Parameters
    ----------
    noise_variance : float
        ``sigma^2`` of the imagined noise.  The result depends on it strongly: it
        is a choice of channel, not a property of the deterministic network.
    chunk_size : int
        Rows per chunk of the pairwise distance computation (memory O(chunk * N)).

    Notes
    -----
    Both bounds lie in ``[0, log N]``.  The first argument ``x`` of
    :meth:`estimate` only fixes N and the pairing (the input is the sample index):
    on a task where ``T`` is not a deterministic function of ``X`` this is not an
    estimate of ``I(X; T)``.  ``stderr`` is ``nan`` (deterministic).
    """

    name = "kde"

    def __init__(self, noise_variance: float = 0.1, chunk_size: int = 1024) -> None:
        if not noise_variance > 0:
            raise ValueError(f"noise_variance must be positive, got {noise_variance}")
        self.noise_variance = float(noise_variance)
        self.chunk_size = int(chunk_size)

    def _bound(self, t: np.ndarray, factor: float) -> float:
        lm = pairwise_log_mean_kernel(t, factor * self.noise_variance, chunk_size=self.chunk_size)
        return float(-lm.mean())

    @checked_estimate
    def estimate(self, x: Any, t: Any, *, seed: int | None = None) -> MIEstimate:
        """Estimate ``I(X; T + noise)`` (or ``I(T + noise; Y)`` for labels) in nats.

        Parameters
        ----------
        x : tensor or array, shape (N, dx)
            Input (only its pairing with ``t`` matters), or the layer when ``t``
            holds labels.
        t : tensor or array, shape (N, dt), or integer labels (N,)
        seed : ignored (deterministic)
        """
        if is_label_array(t):
            layer = as_2d_float(x, "x")
            y = as_labels(t, "t")
            n = check_pair(layer, y[:, None])
            h_all = self._bound(layer, 2.0)
            h_cond = 0.0
            for c in np.unique(y):
                members = layer[y == c]
                if len(members) > 1:
                    h_cond += len(members) / n * self._bound(members, 2.0)
            return MIEstimate(
                value=h_all - h_cond,
                n=n,
                method=self.name,
                extra={"noise_variance": self.noise_variance, "target": "I(T;Y)"},
            )
        layer = as_2d_float(t, "t")
        n = check_pair(as_2d_float(x, "x") if not is_label_array(x, "x") else layer, layer)
        upper = self._bound(layer, 2.0)
        lower = self._bound(layer, 8.0)
        return MIEstimate(
            value=upper,
            lower=lower,
            upper=upper,
            n=n,
            method=self.name,
            extra={"noise_variance": self.noise_variance, "target": "I(X;T)"},
        )
