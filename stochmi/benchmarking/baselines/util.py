"""Shared input handling and numerics for the baseline estimators (private)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from stochmi.core import rng

__all__ = [
    "as_2d_float",
    "as_labels",
    "checked_estimate",
    "check_pair",
    "entropy_from_codes",
    "is_label_array",
    "row_codes",
    "make_generator",
    "split_indices",
    "scott_bandwidth",
    "torch_threads",
    "standardize",
]


def to_numpy(a: Any, name: str) -> np.ndarray:
    """``a`` as a NumPy array: tensors, arrays, pandas DataFrames/Series, (nested) lists."""
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    if isinstance(a, np.ndarray):
        return a
    if isinstance(a, (list, tuple)):
        return np.asarray(a)
    if hasattr(a, "to_numpy") and hasattr(a, "shape"):  # pandas DataFrame / Series
        return np.array(a.to_numpy())
    raise TypeError(
        f"{name} must be a torch.Tensor, numpy array, pandas DataFrame/Series or (nested) "
        f"list, got {type(a).__name__}"
    )


def checked_estimate(method):
    """Wrap an estimator's ``estimate(x, t, *, seed=None)`` with the checks every
    baseline shares, and announce what it did in ``extra``.

    Before the estimator runs: ``x`` and ``t`` must be arrays of shape (N,) or (N, d)
    with the same N >= 2 and no NaN/inf (one message for every estimator); ``seed=None``
    is replaced by a fresh seed (:func:`stochmi.core.rng.resolve_seed`).  Afterwards
    ``extra["seed"]`` holds the seed used (pass it back to replay the run) and
    ``extra["x_discrete"]``/``extra["t_discrete"]`` say whether an input was taken as
    class labels (integer or bool dtype, shape (N,) or (N, 1)); float arrays are always
    taken as continuous.
    """

    @functools.wraps(method)
    def estimate(self, x: Any, t: Any, *, seed: int | None = None, **kwargs: Any):
        arrays = {name: to_numpy(a, name) for name, a in (("x", x), ("t", t))}
        for name, arr in arrays.items():
            if arr.ndim not in (1, 2):
                raise ValueError(f"{name} must have shape (N, d) or (N,), got {arr.shape}")
            if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
                raise ValueError(f"{name} contains NaN or inf values")
        check_pair(arrays["x"], arrays["t"])
        used = rng.resolve_seed(seed)
        result = method(self, x, t, seed=used, **kwargs)
        result.extra.setdefault("seed", used)
        result.extra["x_discrete"] = is_label_array(arrays["x"])
        result.extra["t_discrete"] = is_label_array(arrays["t"])
        return result

    return estimate


def is_label_array(a: Any, name: str = "t") -> bool:
    """True when ``a`` holds integer class labels of shape (N,) or (N, 1)."""
    arr = to_numpy(a, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    return arr.ndim == 1 and (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_)


def as_labels(a: Any, name: str = "t") -> np.ndarray:
    """Integer labels (N,) as a contiguous int64 array, relabelled to 0..C-1."""
    arr = to_numpy(a, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name}: labels must have shape (N,), got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(f"{name}: labels must be integers, got dtype {arr.dtype}")
    _, inv = np.unique(arr, return_inverse=True)
    return inv.astype(np.int64).reshape(-1)


def as_2d_float(a: Any, name: str) -> np.ndarray:
    """Float64 array of shape (N, d); 1-D input becomes (N, 1).  Rejects NaN/inf."""
    arr = to_numpy(a, name)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (N, d) or (N,), got {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf values")
    return arr


def check_pair(x: np.ndarray, t: np.ndarray, *, min_n: int = 2) -> int:
    """Check that x and t have the same number of rows (at least ``min_n``); return N."""
    if x.shape[0] != t.shape[0]:
        raise ValueError(
            f"x and t must have the same number of rows, got {x.shape[0]} and {t.shape[0]}"
        )
    n = int(x.shape[0])
    if n < min_n:
        raise ValueError(f"need at least {min_n} samples, got {n}")
    return n


def row_codes(a: np.ndarray) -> np.ndarray:
    """Integer code per row: equal rows get equal codes (``np.unique`` over rows), shape (N,)."""
    if a.ndim == 1:
        a = a[:, None]
    _, inv = np.unique(np.ascontiguousarray(a), axis=0, return_inverse=True)
    return inv.reshape(-1).astype(np.int64)


def entropy_from_codes(codes: np.ndarray) -> float:
    """Plug-in (maximum-likelihood) Shannon entropy in nats of a discrete sample.

    ``H = -sum_c p_c log p_c`` with ``p_c = count_c / N``.
    """
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by the rule of :mod:`stochmi.core.rng`."""
    return rng.make_generator(seed)[0]


def split_indices(
    n: int, holdout: float, rng: np.random.Generator, *, min_each: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Random train / held-out split of ``range(n)``; returns (train_idx, test_idx)."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    n_test = int(round(holdout * n))
    n_test = min(max(n_test, min_each), n - min_each)
    if n_test < min_each:
        raise ValueError(f"too few samples ({n}) for a train / held-out split")
    perm = rng.permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def scott_bandwidth(a: np.ndarray) -> float:
    """Scott's rule Gaussian kernel width for (N, d) data: ``s * N^(-1/(d+4))``.

    ``s`` is the root mean per-coordinate variance (a single isotropic width).
    Returns 1.0 for constant data.
    """
    n, d = a.shape
    s = math.sqrt(float(np.mean(np.var(a, axis=0))))
    if s == 0.0:
        s = 1.0
    return s * n ** (-1.0 / (d + 4))


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(n)``, restoring the old value after.

    Small-network training (B x 64 matrices) is fastest single-threaded, and with
    more threads than free cores it slows down by orders of magnitude.  ``None``
    leaves torch's setting alone.  The setting is process-wide while the block runs.
    """
    if n is None:
        yield
        return
    if int(n) < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {n}")
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def standardize(a: np.ndarray, fit: np.ndarray | None = None, *, floor: float = 0.1) -> np.ndarray:
    """``(a - mean) / sd`` with the statistics of the rows ``fit`` (default: all rows).

    Per-coordinate standard deviations below ``floor`` times their mean are raised
    to that floor, so that nearly constant coordinates (e.g. border pixels of
    MNIST that are non-zero in one image) are not blown up to unit variance.
    """
    ref = a if fit is None else a[fit]
    mu = ref.mean(0)
    sd = ref.std(0)
    scale = float(sd.mean())
    sd = np.maximum(sd, floor * scale) if scale > 0 else np.ones_like(sd)
    return (a - mu) / sd
