"""Neural-critic bounds: formulas on a fixed score matrix, InfoNCE cap, sanity on an easy task."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stochmi.benchmarking.baselines import MINE, NWJ, SMILE, InfoNCE
from stochmi.benchmarking.baselines.neural import dv_terms, infonce_terms, js_fgan, nwj_terms
from stochmi.benchmarking.tasks import additive_gaussian_task, gaussian_task

FAST = {"max_steps": 400, "eval_every": 50, "patience": 4, "eval_repeats": 2}


@pytest.fixture(scope="module")
def scores():
    g = torch.Generator().manual_seed(0)
    return torch.randn(5, 5, generator=g, dtype=torch.float64) + 2 * torch.eye(5)


def test_bound_formulas_on_a_score_matrix(scores):
    s = scores.numpy()
    b = s.shape[0]
    off = ~np.eye(b, dtype=bool)
    nce = np.mean(np.diag(s) - np.log(np.exp(s).sum(1))) + math.log(b)
    nwj = np.mean(np.diag(s)) - np.mean(np.exp(s[off] - 1))
    dv = np.mean(np.diag(s)) - math.log(np.mean(np.exp(s[off])))
    sc = np.clip(s, -1.5, 1.5)
    smile = np.mean(np.diag(s)) - math.log(np.mean(np.exp(sc[off])))
    sp = np.log1p(np.exp(s))
    js = -np.mean(np.log1p(np.exp(-np.diag(s)))) - sp[off].mean()
    assert float(infonce_terms(scores)[0]) == pytest.approx(nce, abs=1e-12)
    assert float(nwj_terms(scores)[0]) == pytest.approx(nwj, abs=1e-12)
    assert float(dv_terms(scores)[0]) == pytest.approx(dv, abs=1e-12)
    assert float(dv_terms(scores, 1.5)[0]) == pytest.approx(smile, abs=1e-12)
    assert float(js_fgan(scores)) == pytest.approx(js, abs=1e-12)
    # row terms average to the value for the per-sample bounds
    assert float(infonce_terms(scores)[1].mean()) == pytest.approx(nce, abs=1e-12)
    assert float(nwj_terms(scores)[1].mean()) == pytest.approx(nwj, abs=1e-12)


def test_infonce_saturates_at_log_batch_size():
    # 4 channels with SNR 400: I = 4 * 1/2 log(1 + A A^T / sigma^2) ~ 10 nats >> log 16
    task = additive_gaussian_task(1200, dim_x=4, dim_t=4, sigma=0.05, A=np.eye(4), seed=0)
    assert task.true_mi > 10
    est = InfoNCE(batch_size=16, **FAST).estimate(task.x, task.t, seed=0)
    assert est.extra["batch_size"] == 16
    assert est.value > math.log(16) - 0.5  # saturated: the bound, not the MI, is the limit
    # a larger batch lifts the limit, and the estimate with it
    big = InfoNCE(batch_size=64, **FAST).estimate(task.x, task.t, seed=0)
    assert big.value > math.log(16) + 3 * big.stderr, (big.value, big.stderr)


@pytest.mark.parametrize("cls", [MINE, NWJ, SMILE, InfoNCE])
def test_bounds_finite_and_below_truth_on_easy_task(cls):
    task = gaussian_task(1500, dim_x=1, dim_t=1, rho=0.8, seed=1)
    est = cls(**FAST).estimate(task.x, task.t, seed=0)
    assert np.isfinite(est.value) and np.isfinite(est.stderr) and est.stderr > 0
    assert est.value < task.true_mi + 4 * est.stderr
    assert est.value > 0.5 * task.true_mi  # it does learn something
    assert est.extra["n_heldout"] == 300 and est.extra["steps"] <= 400


def test_seed_reproduces_and_global_rng_untouched():
    task = gaussian_task(600, dim_x=2, dim_t=2, rho=0.6, seed=2)
    state = torch.get_rng_state()
    a = MINE(**FAST).estimate(task.x, task.t, seed=3)
    b = MINE(**FAST).estimate(task.x, task.t, seed=3)
    c = MINE(**FAST).estimate(task.x, task.t, seed=4)
    assert torch.equal(state, torch.get_rng_state())
    assert a.value == b.value and a.extra["history"] == b.extra["history"]
    assert a.value != c.value


def test_thread_setting_restored_and_labels_accepted():
    before = torch.get_num_threads()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 600)
    x = y[:, None] + 0.3 * rng.standard_normal((600, 2))
    est = SMILE(tau=1.0, **FAST).estimate(x, y, seed=0)
    assert torch.get_num_threads() == before
    assert 0.3 < est.value <= math.log(3) + 4 * est.stderr


def test_concat_critic_runs():
    task = gaussian_task(400, dim_x=1, dim_t=1, rho=0.8, seed=1)
    est = NWJ(critic="concat", hidden=(16,), max_steps=60, eval_every=30).estimate(
        task.x, task.t, seed=0
    )
    assert np.isfinite(est.value)


def test_errors():
    with pytest.raises(ValueError, match="batch_size"):
        InfoNCE(batch_size=1)
    with pytest.raises(ValueError, match="critic kind"):
        NWJ(critic="bilinear")
    with pytest.raises(ValueError, match="tau"):
        SMILE(tau=0)
    with pytest.raises(ValueError, match="ema_rate"):
        MINE(ema_rate=0)
    with pytest.raises(ValueError, match="at least 8"):
        InfoNCE().estimate(np.zeros((5, 1)), np.zeros((5, 1)))
