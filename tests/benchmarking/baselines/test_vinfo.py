"""V-information: Gaussian limit, label cases, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stochmi.benchmarking.baselines import VInfoLinear, VInfoMLP, VInformation
from stochmi.benchmarking.tasks import additive_gaussian_task, gaussian_task


def test_linear_probe_recovers_gaussian_mi():
    # linear-Gaussian family with a full covariance is the true model family
    task = additive_gaussian_task(3000, dim_x=3, dim_t=2, sigma=0.6, seed=0)
    est = VInfoLinear().estimate(task.x, task.t, seed=0)
    assert abs(est.value - task.true_mi) < 4 * est.stderr + 0.03, (est.value, task.true_mi)


def test_mlp_probe_close_on_gaussian():
    task = gaussian_task(2000, dim_x=1, dim_t=1, rho=0.8, seed=1)
    est = VInfoMLP().estimate(task.x, task.t, seed=0)
    assert abs(est.value - task.true_mi) < 4 * est.stderr + 0.05


def test_labels_fully_predictable_and_independent():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1500, 3))
    y = (x[:, 0] > 0).astype(int)  # deterministic, linearly separable: I_V -> H(Y) = log 2
    est = VInfoLinear().estimate(x, y, seed=0)
    assert est.value == pytest.approx(math.log(2), abs=0.08)
    y_indep = rng.integers(0, 3, 1500)
    est0 = VInfoLinear().estimate(x, y_indep, seed=0)
    assert abs(est0.value) < 4 * est0.stderr + 0.01
    assert est0.extra["weight_decay"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def test_mlp_beats_linear_on_nonlinear_labels():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2000, 2))
    y = (x[:, 0] * x[:, 1] > 0).astype(int)  # XOR: invisible to a linear probe
    lin = VInfoLinear().estimate(x, y, seed=0)
    mlp = VInfoMLP().estimate(x, y, seed=0)
    assert lin.value < 0.05
    assert mlp.value > 0.3


def test_seed_reproducible():
    task = gaussian_task(500, dim_x=2, dim_t=2, rho=0.5, seed=2)
    a = VInfoMLP().estimate(task.x, task.t, seed=3)
    b = VInfoMLP().estimate(task.x, task.t, seed=3)
    assert a.value == b.value


def test_errors():
    with pytest.raises(ValueError, match="probe"):
        VInformation(probe="tree")
    with pytest.raises(ValueError, match="weight_decay"):
        VInfoLinear(weight_decay=-1.0)
    with pytest.raises(ValueError, match="at least 10"):
        VInfoLinear().estimate(np.zeros((5, 1)), np.zeros((5, 1)))
