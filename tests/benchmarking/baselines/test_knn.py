"""KSG k-NN estimator: accuracy on Gaussians, backends, labels variant, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stochmi.benchmarking.baselines import KSG
from stochmi.benchmarking.tasks import gaussian_task
from stochmi.core.closed_form import mixture_entropy_1d


@pytest.mark.parametrize(
    "dims,rho,k", [((1, 1), 0.8, 3), ((2, 2), 0.6, 5), ((1, 1), 0.3, 10), ((3, 1), 0.9, 3)]
)
def test_ksg_accurate_on_low_dimensional_gaussians(dims, rho, k):
    task = gaussian_task(3000, dim_x=dims[0], dim_t=dims[1], rho=rho, seed=11)
    est = KSG(k=k).estimate(task.x, task.t, seed=0)
    tol = max(0.1 * task.true_mi, 4 * est.stderr)
    assert abs(est.value - task.true_mi) < tol, (est.value, task.true_mi, tol)


def test_ksg_independent_is_near_zero():
    rng = np.random.default_rng(3)
    est = KSG(k=5).estimate(rng.standard_normal((2000, 2)), rng.standard_normal((2000, 2)))
    assert abs(est.value) < 4 * est.stderr + 0.01


def test_backends_agree_exactly():
    task = gaussian_task(500, dim_x=2, dim_t=2, rho=0.7, seed=2)
    a = KSG(k=4, backend="kdtree").estimate(task.x, task.t, seed=5)
    b = KSG(k=4, backend="brute").estimate(task.x, task.t, seed=5)
    assert a.value == pytest.approx(b.value, abs=1e-12)


def test_matches_scikit_learn_reference():
    mi_mod = pytest.importorskip("sklearn.feature_selection._mutual_info")
    if not hasattr(mi_mod, "_compute_mi_cc"):
        pytest.skip("scikit-learn private KSG helper not available")
    task = gaussian_task(800, dim_x=1, dim_t=1, rho=0.7, seed=4)
    x, t = task.x.numpy().ravel(), task.t.numpy().ravel()
    ref = mi_mod._compute_mi_cc(x, t, 3)
    ours = KSG(k=3, standardize=False, jitter=0.0).estimate(x, t).value
    assert ours == pytest.approx(ref, abs=1e-10)


def test_labels_variant_on_gaussian_mixture():
    # X | Y=y ~ N(+-1, 1), P(Y=1) = 1/2: I = h(X) - h(X|Y), h(X) by quadrature
    rng = np.random.default_rng(7)
    n = 3000
    y = rng.integers(0, 2, n)
    x = (2 * y - 1) + rng.standard_normal(n)

    def log_mix(z):
        nrm = torch.distributions.Normal(0.0, 1.0)
        return torch.logsumexp(
            torch.stack([nrm.log_prob(z - 1), nrm.log_prob(z + 1)]), 0
        ) - math.log(2)

    truth = mixture_entropy_1d(log_mix, -12, 12) - 0.5 * math.log(2 * math.pi * math.e)
    est = KSG(k=5).estimate(x[:, None], y, seed=0)
    assert abs(est.value - truth) < max(0.1 * truth, 4 * est.stderr), (est.value, truth)
    assert est.extra["variant"] == "Ross 2014"


def test_high_dimensional_brute_path_runs_and_seed_reproduces():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 40))
    t = x[:, :3] + 0.1 * rng.standard_normal((300, 3))
    a = KSG(k=3).estimate(x, t, seed=1)  # 43 dims: brute force under "auto"
    b = KSG(k=3).estimate(x, t, seed=1)
    assert a.value == b.value and np.isfinite(a.value)
    # true I(X;T) = 3 * 1/2 log(1 + 100) = 6.9 nats; in 43 dimensions KSG sees far less
    assert 0.1 < a.value < 3.0


def test_errors():
    with pytest.raises(ValueError, match="k must be"):
        KSG(k=0)
    with pytest.raises(ValueError, match="backend"):
        KSG(backend="ball")
    with pytest.raises(ValueError, match="at least"):
        KSG(k=5).estimate(np.zeros((4, 1)), np.zeros((4, 1)))
    with pytest.raises(ValueError, match="same number of rows"):
        KSG().estimate(np.zeros((10, 1)), np.zeros((9, 1)))
