"""Histogram (plug-in) estimators: "flatten, bin, subtract entropies".

Two conventions that information-plane studies use on deterministic layers:

* :class:`NaiveHistogram` bins *both* arguments and returns
  ``H(X_b) + H(T_b) - H(X_b, T_b)`` from whole-vector bin codes;
* :class:`Binning` (Shwartz-Ziv & Tishby 2017) bins the layer per unit and treats
  the input as a discrete variable uniform over the distinct inputs, so that for a
  deterministic network ``I(X; T) = H(T_b)`` and ``I(T; Y) = H(T_b) - H(T_b | Y)``.

Both return finite numbers for a quantity that is infinite for a deterministic
network with continuous input: the value is a property of the bins (it grows with
the bin count until every input has its own bin, where it reaches ``log N``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stochmi.benchmarking.baselines.util import (
    as_2d_float,
    as_labels,
    check_pair,
    checked_estimate,
    entropy_from_codes,
    is_label_array,
    row_codes,
    to_numpy,
)
from stochmi.core.estimate import MIEstimate

__all__ = ["NaiveHistogram", "Binning", "bin_codes"]


def _parse_range(value_range: Any) -> tuple[float, float] | None:
    if value_range is None or (isinstance(value_range, str) and value_range == "adaptive"):
        return None
    if isinstance(value_range, str):
        raise ValueError(
            f"value_range must be 'adaptive' or a (low, high) pair, got {value_range!r}"
        )
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must have high > low, got ({lo}, {hi})")
    return lo, hi


def bin_codes(a: np.ndarray, n_bins: int, value_range: Any = "adaptive") -> np.ndarray:
    """Bin every coordinate of ``a`` into ``n_bins`` equal-width bins; return row codes.

    Parameters
    ----------
    a : ndarray, shape (N, d)
        Values (one row per sample).
    n_bins : int
        Number of bins per coordinate (shared edges for all coordinates).
    value_range : "adaptive" or (low, high)
        ``"adaptive"``: edges span ``[min(a), max(a)]`` over the whole array (the
        flattened layer).  A pair fixes the edges (e.g. ``(-1, 1)`` for tanh);
        values outside are clipped into the first / last bin.

    Returns
    -------
    ndarray of int64, shape (N,)
        Equal codes for rows whose bin index vectors are equal.
    """
    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    rng = _parse_range(value_range)
    lo, hi = (float(a.min()), float(a.max())) if rng is None else rng
    width = (hi - lo) / n_bins
    if width <= 0.0:
        return np.zeros(a.shape[0], dtype=np.int64)
    idx = np.floor((a - lo) / width).astype(np.int64)
    np.clip(idx, 0, n_bins - 1, out=idx)
    return row_codes(idx)


def _codes_of(a: Any, name: str, n_bins: int, value_range: Any) -> np.ndarray:
    if is_label_array(a, name):
        return as_labels(a, name)
    return bin_codes(as_2d_float(a, name), n_bins, value_range)


class _BinnedEstimator:
    """Shared constructor of the binning estimators: ``n_bins`` and ``value_range``."""

    def __init__(self, n_bins: int = 30, value_range: Any = "adaptive") -> None:
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = int(n_bins)
        self.value_range = value_range
        _parse_range(value_range)


class NaiveHistogram(_BinnedEstimator):
    r"""Plug-in MI from joint histograms of whole-vector bin codes ("naive").

    What people do when they flatten each layer, histogram it and subtract:

    .. math::

        \hat I(X;T) = \hat H(X_b) + \hat H(T_b) - \hat H(X_b, T_b),
        \qquad \hat H(Z) = -\sum_c \hat p_c \log \hat p_c,

    where ``X_b``, ``T_b`` are the vectors of per-coordinate bin indices (equal-width
    bins over the range of the whole array), each distinct index vector a symbol of
    the histogram, and ``p_c`` the empirical frequencies.  Integer labels are used as
    symbols directly.

    Parameters
    ----------
    n_bins : int
        Bins per coordinate.
    value_range : "adaptive" or (low, high)
        Bin edges; see :func:`bin_codes`.

    Notes
    -----
    The plug-in entropy is biased low (Miller-Madow bias ~ (K-1)/(2N) for K
    occupied bins) and the estimate cannot exceed ``log N``.  For a deterministic
    layer of a network with continuous input the true ``I(X;T)`` is infinite; the
    number returned is set by ``n_bins``.  ``stderr`` is ``nan`` (no natural one).
    """

    name = "naive"

    @checked_estimate
    def estimate(self, x: Any, t: Any, *, seed: int | None = None) -> MIEstimate:
        """Estimate ``I(X; T)`` in nats.

        Parameters
        ----------
        x : tensor or array, shape (N, dx) or (N,)
        t : tensor or array, shape (N, dt) or (N,); integer labels allowed
        seed : ignored (deterministic)
        """
        cx = _codes_of(x, "x", self.n_bins, self.value_range)
        ct = _codes_of(t, "t", self.n_bins, self.value_range)
        n = check_pair(cx[:, None], ct[:, None])
        hx = entropy_from_codes(cx)
        ht = entropy_from_codes(ct)
        hxt = entropy_from_codes(row_codes(np.stack([cx, ct], axis=1)))
        return MIEstimate(
            value=hx + ht - hxt,
            n=n,
            method=self.name,
            extra={"H_x": hx, "H_t": ht, "H_xt": hxt, "n_bins": self.n_bins, "log_n": math.log(n)},
        )


class Binning(_BinnedEstimator):
    r"""Shwartz-Ziv & Tishby (2017) binning of a layer, input taken as discrete.

    Each unit of the layer is binned into ``n_bins`` equal-width bins (shared edges,
    a fixed range such as ``(-1, 1)`` for tanh, or the layer's own min / max); the
    vector of bin indices is the discrete ``T_b``.  The input is a discrete variable
    uniform over the *distinct* rows of ``x`` (the data set), so

    .. math::

        \hat I(X;T) = \hat H(T_b) - \hat H(T_b \mid X) = \hat H(T_b)
        \quad\text{for a deterministic network}

    (``H(T_b | X) = 0`` when ``T`` is a function of ``X``; it is computed anyway, so
    repeated inputs with different ``t`` are handled).  With integer labels as ``t``
    the continuous argument ``x`` is the layer and

    .. math::

        \hat I(T;Y) = \hat H(T_b) - \sum_y \hat p(y)\, \hat H(T_b \mid Y = y).

    Parameters
    ----------
    n_bins : int
        Bins per unit (Shwartz-Ziv & Tishby use 30).
    value_range : "adaptive" or (low, high)
        ``"adaptive"``: the layer's min / max; a pair fixes the edges.

    Notes
    -----
    A documented failure: for a deterministic layer the value grows with
    ``n_bins`` towards ``log N`` (every input in its own bin); it measures the
    resolution of the bins, not information.  ``stderr`` is ``nan``.
    """

    name = "binning"

    @checked_estimate
    def estimate(self, x: Any, t: Any, *, seed: int | None = None) -> MIEstimate:
        """Estimate ``I(X; T)`` (or ``I(T; Y)`` when ``t`` holds labels) in nats.

        Parameters
        ----------
        x : tensor or array, shape (N, dx)
            The input (treated as discrete, by distinct rows), or the layer when
            ``t`` holds labels.
        t : tensor or array, shape (N, dt), or integer labels (N,)
            The layer (binned), or labels.
        seed : ignored (deterministic)
        """
        if is_label_array(t):
            layer = as_2d_float(x, "x")
            cond = as_labels(t, "t")
            target = "I(T;Y)"
        else:
            layer = as_2d_float(t, "t")
            xa = to_numpy(x, "x")
            if xa.ndim == 0:
                raise ValueError("x must have shape (N, dx) or (N,)")
            cond = row_codes(xa.reshape(xa.shape[0], -1))
            target = "I(X;T)"
        n = check_pair(layer, cond[:, None])
        ct = bin_codes(layer, self.n_bins, self.value_range)
        h_t = entropy_from_codes(ct)
        h_t_given = 0.0
        groups, inv, counts = np.unique(cond, return_inverse=True, return_counts=True)
        if len(groups) < n:  # some groups have more than one member
            order = np.argsort(inv, kind="stable")
            splits = np.cumsum(counts)[:-1]
            for members, c in zip(np.split(order, splits), counts):
                if c > 1:
                    h_t_given += (c / n) * entropy_from_codes(ct[members])
        return MIEstimate(
            value=h_t - h_t_given,
            n=n,
            method=self.name,
            extra={
                "H_t": h_t,
                "H_t_given": h_t_given,
                "n_bins": self.n_bins,
                "target": target,
                "log_n": math.log(n),
            },
        )
