"""KDE (pairwise-distance) estimator: hand case, bounds around the exact dataset MI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import stochmi
from stochmi.benchmarking.baselines import KDE
from stochmi.benchmarking.baselines.kde import pairwise_log_mean_kernel


def test_hand_case_three_points():
    t = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    var = 0.5
    d2 = np.array([[0, 1, 4], [1, 0, 5], [4, 5, 0]], dtype=float)
    kl = -np.mean(np.log(np.mean(np.exp(-d2 / (2 * var)), axis=1)))
    bd = -np.mean(np.log(np.mean(np.exp(-d2 / (8 * var)), axis=1)))
    est = KDE(noise_variance=var).estimate(np.zeros((3, 1)), t)
    assert est.value == pytest.approx(kl, abs=1e-12)
    assert est.upper == pytest.approx(kl, abs=1e-12)
    assert est.lower == pytest.approx(bd, abs=1e-12)


def test_bounds_bracket_the_exact_dataset_mi():
    # the same quantity estimated by the certified estimator: T = t_i + sigma Z, i uniform
    rng = np.random.default_rng(0)
    t = torch.as_tensor(rng.standard_normal((400, 3)))
    for var in (0.05, 0.5, 5.0):
        est = KDE(noise_variance=var).estimate(t, t)
        cond = torch.distributions.Independent(torch.distributions.Normal(t, math.sqrt(var)), 1)
        exact = stochmi.mi_from_conditional(cond, n_draws=8, seed=0)
        assert est.lower - 4 * exact.stderr <= exact.value <= est.upper + 4 * exact.stderr
        assert est.lower < est.upper  # Bhattacharyya below KL for distinct components


def test_value_grows_as_imagined_noise_shrinks():
    rng = np.random.default_rng(1)
    t = rng.standard_normal((300, 4))
    vals = [KDE(noise_variance=v).estimate(t, t).value for v in (10.0, 1.0, 0.1, 0.001)]
    assert all(b > a for a, b in zip(vals, vals[1:]))
    assert vals[-1] == pytest.approx(math.log(300), abs=1e-3)


def test_chunking_and_centering_invariance():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((203, 5))
    full = pairwise_log_mean_kernel(a, 1.3, chunk_size=1000)
    small = pairwise_log_mean_kernel(a, 1.3, chunk_size=7)
    shifted = pairwise_log_mean_kernel(a + 1e4, 1.3, chunk_size=64)
    torch.testing.assert_close(full, small, rtol=0, atol=1e-12)
    torch.testing.assert_close(full, shifted, rtol=0, atol=1e-7)


def test_labels_mode_hand_case():
    t = np.array([[0.0], [0.3], [2.0], [2.4]])
    y = np.array([0, 0, 1, 1])
    var = 0.2

    def h(z):
        d2 = (z[:, None, 0] - z[None, :, 0]) ** 2
        return -np.mean(np.log(np.mean(np.exp(-d2 / (2 * var)), axis=1)))

    expected = h(t) - 0.5 * h(t[:2]) - 0.5 * h(t[2:])
    got = KDE(noise_variance=var).estimate(t, y)
    assert got.value == pytest.approx(expected, abs=1e-12)
    assert math.isnan(got.lower)


def test_errors():
    with pytest.raises(ValueError, match="noise_variance"):
        KDE(noise_variance=0.0)
    with pytest.raises(ValueError, match="same number of rows"):
        KDE().estimate(np.zeros((4, 1)), np.zeros((3, 1)))
