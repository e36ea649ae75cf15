"""stochmi.noisy: torch networks as noise-injected Pyro models, against closed forms,
quadrature and the same network written by hand."""

import math

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import stochmi
from stochmi.layers.links import model_links
from stochmi.layers.noisy import NoisyNetwork, noisy
from stochmi.layers.sites import find_layers, trace_model
from tests.helpers import gaussian_dataset_mi

Z = 4.0  # z-score of the tolerances against independent references (as in test_layer_mi)


def _seeded(build, seed=0):
    """``build()`` with the global torch RNG seeded inside ``fork_rng`` (module
    initialisation draws from it; the caller's state is left as it was)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def _x(n, d, seed=1, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _linear_stack(widths, seed=0):
    """nn.Sequential of Linear layers (float64) with fixed seeded weights."""
    g = torch.Generator().manual_seed(seed)
    net = nn.Sequential(*[nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:])]).double()
    with torch.no_grad():
        for lin in net:
            w = torch.randn(lin.weight.shape, generator=g, dtype=torch.float64)
            lin.weight.copy_(0.6 * w)
            lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=torch.float64))
    return net


class _LinearTruth:
    """t_l = A_l t_{l-1} + b_l + s_l Z_l: every layer given x, and given the layer before,
    is Gaussian with a closed-form mean and covariance."""

    def __init__(self, net, sigmas):
        self.A = [lin.weight.detach() for lin in net]
        self.b = [lin.bias.detach() for lin in net]
        self.s = list(sigmas)

    def given_x(self, x, l):
        """Mean ``(N, d_l)`` and covariance of ``t_l`` given ``x`` (``l`` from 0)."""
        loc, cov = x, torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        for k in range(l + 1):
            loc = loc @ self.A[k].T + self.b[k]
            eye = torch.eye(self.A[k].shape[0], dtype=torch.float64)
            cov = self.A[k] @ cov @ self.A[k].T + self.s[k] ** 2 * eye
        return loc, cov

    def population(self, l):
        """Population MI ``I(X; T_l)`` and ``I(T_{l-1}; T_l)`` for ``X ~ N(0, I)``."""
        d0 = self.A[0].shape[1]
        tot = torch.eye(d0, dtype=torch.float64)
        noise = torch.zeros(d0, d0, dtype=torch.float64)
        for k in range(l + 1):
            eye = torch.eye(self.A[k].shape[0], dtype=torch.float64)
            tot = self.A[k] @ tot @ self.A[k].T + self.s[k] ** 2 * eye
            noise = self.A[k] @ noise @ self.A[k].T + self.s[k] ** 2 * eye
        d_l = self.A[l].shape[0]
        ld = lambda m: float(torch.linalg.slogdet(m)[1])  # noqa: E731
        return 0.5 * (ld(tot) - ld(noise)), 0.5 * (ld(tot) - d_l * math.log(self.s[l] ** 2))

    def dataset_reference(self, pair, names, x, seed, reps=4):
        """Independent estimate (value, stderr) of the dataset MI of ``pair``: the exact
        Gaussian given these x for X rows; for consecutive layers, whose sources are
        draws of ``t_{l-1}`` given these x, the mean over ``reps`` fresh source sets."""
        src, tgt = pair
        l = names.index(tgt)
        if src == "X":
            loc, cov = self.given_x(x, l)
            return gaussian_dataset_mi(loc, cov, n_draws=8, seed=seed)
        loc, cov = self.given_x(x, l - 1)
        chol = torch.linalg.cholesky(cov)
        g = torch.Generator().manual_seed(seed)
        eye = torch.eye(self.A[l].shape[0], dtype=torch.float64)
        ests = []
        for r in range(reps):
            parent = loc + torch.randn(loc.shape, generator=g, dtype=torch.float64) @ chol.T
            mean = parent @ self.A[l].T + self.b[l]
            ests.append(gaussian_dataset_mi(mean, self.s[l] ** 2 * eye, n_draws=2, seed=seed + r))
        return sum(v for v, _ in ests) / reps, math.sqrt(sum(se**2 for _, se in ests)) / reps


# ---------------------------------------------------------------------------
# truths
# ---------------------------------------------------------------------------
def test_linear_sequential_matches_linear_gaussian_chain_every_default_pair():
    net = _linear_stack((3, 4, 3, 2))
    sigmas = {"0": 0.7, "1": 0.5, "2": 0.4}
    model = noisy(net, sigmas)
    assert model.layers == ["0", "1", "2"]
    x = _x(400, 3)
    df = stochmi.layer_mi(model, x, seed=0)
    pairs = [tuple(p) for p in df[["source", "target"]].values]
    assert pairs == [("X", "0"), ("X", "1"), ("X", "2"), ("0", "1"), ("1", "2")]
    truth = _LinearTruth(net, sigmas.values())
    for r in df.itertuples():
        l = model.layers.index(r.target)
        pop = truth.population(l)[0 if r.source == "X" else 1]
        # the population MI lies in the bracket within its standard errors
        assert r.lower - Z * r.lower_stderr <= pop <= r.upper + Z * r.upper_stderr, (r, pop)
        # the value estimates the dataset MI: within Z combined se plus the row's mc_bias
        ref, ref_se = truth.dataset_reference((r.source, r.target), model.layers, x, seed=100)
        assert abs(r.value - ref) <= Z * math.hypot(r.stderr, ref_se) + r.mc_bias, (r, ref)
        assert bool(r.converged)
    assert df.attrs["dpi"] == [] and df["dpi_ok"].all()


def _dropout_dataset_mi(f, sigma, n_grid=40001):
    """Dataset MI of t = f_i (1 + sigma Z) over the sources f_i (all nonzero), by the
    trapezoid rule on a grid covering +-12 standard deviations of every component."""
    lo = float((f - 12 * sigma * f.abs()).min())
    hi = float((f + 12 * sigma * f.abs()).max())
    t = torch.linspace(lo, hi, n_grid, dtype=torch.float64)
    comp = torch.distributions.Normal(f[:, None], sigma * f.abs()[:, None])
    logp = comp.log_prob(t[None, :])  # (N, G)
    logmix = torch.logsumexp(logp, 0) - math.log(f.shape[0])
    integrand = (logp.exp() * (logp - logmix)).mean(0)
    return float(torch.trapezoid(integrand, t))


def test_gaussian_dropout_on_affine_map_matches_quadrature():
    net = nn.Sequential(nn.Linear(1, 1)).double()
    with torch.no_grad():
        net[0].weight.fill_(1.5)
        net[0].bias.fill_(0.4)
    sigma = 0.3
    model = noisy(net, sigma, layers=["0"], kind="multiplicative")
    x = torch.rand(400, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2
    df = stochmi.layer_mi(model, x, seed=0, n_draws=8)
    r = df.iloc[0]
    truth = _dropout_dataset_mi((1.5 * x + 0.4)[:, 0], sigma)
    assert abs(r.value - truth) <= 3 * r.stderr + r.mc_bias, (r.value, r.stderr, truth)
    # the channel is the Gaussian-dropout density, scale sigma |f|
    tr = trace_model(model, x[:5])
    fn = tr.nodes["0"]["fn"]
    f = 1.5 * x[:5] + 0.4
    assert torch.allclose(fn.base_dist.loc, f) and torch.allclose(fn.base_dist.scale, sigma * f)


class _HandWritten:
    """The network of :func:`_tanh_net` with noise after each Tanh, as a Pyro model."""

    def __init__(self, net, sigma):
        self.net, self.sigma = net, sigma

    def __call__(self, x):
        n = self.net
        with pyro.plate("data", x.shape[0]):
            h1 = pyro.sample("1", dist.Normal(torch.tanh(n[0](x)), self.sigma).to_event(1))
            h2 = pyro.sample("3", dist.Normal(torch.tanh(n[2](h1)), self.sigma).to_event(1))
        return n[4](h2)


def _tanh_net(seed=0):
    return _seeded(
        lambda: nn.Sequential(
            nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)
        ).double(),
        seed,
    )


def test_wrapped_network_and_hand_written_pyro_model_give_the_same_table():
    net = _tanh_net()
    model = noisy(net, 0.4)
    assert model.layers == ["1", "3"]  # default: after every activation module
    x = _x(300, 3)
    y = net(x).argmax(1)
    a = stochmi.layer_mi(model, x, y, seed=5)
    b = stochmi.layer_mi(_HandWritten(net, 0.4), x, y, seed=5)
    assert len(a) == 5  # X->1, X->3, 1->3, 1->Y, 3->Y
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------
# the model: sites, shapes, links
# ---------------------------------------------------------------------------
class _SmallConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 3 * 3, 4)
        self.act2 = nn.Tanh()
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.pool(self.act(self.conv(x.view(-1, 1, 8, 8))))
        return self.out(self.act2(self.fc(h.flatten(1))))


def test_conv_feature_map_is_flattened_into_the_event_and_restored():
    net = _seeded(lambda: _SmallConv().double())
    model = noisy(net, {"pool": 0.3, "act2": 0.2})
    x = _x(6, 64)
    tr = trace_model(model, x)
    assert tuple(tr.nodes["pool"]["value"].shape) == (6, 27)
    assert tuple(tr.nodes["pool"]["fn"].event_shape) == (27,)
    assert [f.name for f in tr.nodes["pool"]["cond_indep_stack"]] == ["data"]
    assert tuple(tr.nodes["_RETURN"]["value"].shape) == (6, 2)
    assert find_layers(model, x).layers == ["pool", "act2"]
    # the link runs the modules between the sites only; it equals the link that
    # conditions the whole model on the parent (the generic traced link)
    parent = _x(7, 27, seed=4)
    own = model.conditional("act2", parent)
    traced = model_links(_Plain(model), x, ["pool", "act2"], "fixed")[1](parent)
    expect = torch.tanh(net.fc(parent))
    assert torch.allclose(own.base_dist.loc, expect) and torch.allclose(own.mean, traced.mean)
    assert torch.allclose(own.base_dist.scale, torch.full_like(expect, 0.2))


class _Plain:
    """The same Pyro model without the ``conditional`` method (a plain callable)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, x):
        return self.model(x)


def test_multiplicative_noise_after_relu_is_refused_and_before_it_runs():
    net = _seeded(lambda: nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 2)).double())
    x = _x(200, 2)
    with pytest.raises(ValueError, match="exactly 0.*point mass"):
        stochmi.layer_mi(noisy(net, 0.5, kind="multiplicative"), x, seed=0)
    df = stochmi.layer_mi(noisy(net, 0.5, layers=["0", "2"], kind="multiplicative"), x, seed=0)
    assert list(df["target"]) == ["0", "2", "2"] and df["value"].notna().all()


def test_training_with_a_torch_loop_moves_the_parameters_and_leaves_the_module_deterministic():
    net = _seeded(lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
    model = noisy(net, 0.5)
    x = _x(64, 4, dtype=torch.float32)
    y = torch.arange(64) % 3
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
        opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    with torch.no_grad():
        assert torch.equal(net(x), net(x))  # the wrapped module: no noise, no hooks left
        assert not torch.equal(model(x), model(x))  # the model: noise at the ReLU
        assert torch.equal(net(x), net[2](net[1](net[0](x))))


def test_construction_leaves_the_global_rng_alone_and_estimates_are_reproducible():
    net = _tanh_net()
    state = torch.get_rng_state()
    model = noisy(net, 0.4)
    assert torch.equal(state, torch.get_rng_state())
    x = _x(100, 3)
    a = stochmi.layer_mi(model, x, seed=3, pairs=[("X", "1"), ("1", "3")])
    assert torch.equal(state, torch.get_rng_state())
    b = stochmi.layer_mi(model, x, seed=3, pairs=[("X", "1"), ("1", "3")])
    pd.testing.assert_frame_equal(a, b)


# ---------------------------------------------------------------------------
# refusals
# ---------------------------------------------------------------------------
def _dropout_net():
    return _seeded(
        lambda: nn.Sequential(
            nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 4), nn.Tanh()
        ).double()
    )


def test_binary_dropout_in_training_mode_is_refused_and_eval_mode_runs():
    model = noisy(_dropout_net(), 0.5)
    x = _x(100, 3)
    assert model.training
    for fn in (
        lambda: stochmi.layer_mi(model, x, seed=0),
        lambda: stochmi.weight_mi(model, x, guide=None, seed=0),
    ):
        with pytest.raises(
            ValueError, match="binary dropout makes the mutual information infinite"
        ):
            fn()
    with pytest.raises(ValueError, match=r"model\.eval\(\).*kind='multiplicative'"):
        stochmi.layer_mi(model, x, seed=0)
    model.eval()
    df = stochmi.layer_mi(model, x, seed=0, pairs=[("X", "1"), ("1", "4")])
    assert df["value"].notna().all() and (df["value"] > 0).all()
    # eval-mode dropout is the identity: the table equals that of the net without it
    net = _dropout_net()
    plain = nn.Sequential(net[0], net[1], nn.Identity(), net[3], net[4])
    ref = stochmi.layer_mi(
        noisy(plain, 0.5, layers=["1", "4"]), x, seed=0, pairs=[("X", "1"), ("1", "4")]
    )
    pd.testing.assert_frame_equal(df, ref)


def test_batch_norm_in_training_mode_is_refused():
    net = _seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).double())
    with pytest.raises(ValueError, match="batch normalisation"):
        stochmi.layer_mi(noisy(net, 0.5), _x(50, 3), seed=0)
    net.eval()
    assert stochmi.layer_mi(noisy(net, 0.5), _x(50, 3), seed=0)["value"].notna().all()


def test_layers_that_skip_a_noise_site_are_refused():
    model = noisy(_tanh_net(), 0.4)
    with pytest.raises(ValueError, match="leave out noise sites"):
        stochmi.layer_mi(model, _x(50, 3), seed=0, layers=["3"])
    df = stochmi.layer_mi(model, _x(50, 3), seed=0, layers=["1"])
    assert list(df["target"]) == ["1"]


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"sigma": 0.0}, ValueError, "positive finite"),
        ({"sigma": -1.0}, ValueError, "positive finite"),
        ({"sigma": {"1": 0.3}}, ValueError, "exactly the layers"),
        ({"sigma": 0.3, "layers": ["9"]}, ValueError, "unknown submodules"),
        ({"sigma": 0.3, "layers": [""]}, ValueError, "unknown submodules"),
        ({"sigma": 0.3, "layers": "1"}, TypeError, "list"),
        ({"sigma": 0.3, "layers": []}, ValueError, "empty"),
        ({"sigma": 0.3, "kind": "dropout"}, ValueError, "kind"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    net = _tanh_net()
    sigma = kwargs.pop("sigma")
    if isinstance(sigma, dict):
        kwargs["layers"] = ["1", "3"]
    with pytest.raises(exc, match=match):
        noisy(net, sigma, **kwargs)


def test_no_activation_module_and_a_reused_module_are_explained():
    with pytest.raises(ValueError, match="no activation modules"):
        noisy(nn.Sequential(nn.Linear(2, 2)), 0.3)
    act = nn.Tanh()
    net = nn.Sequential(nn.Linear(2, 3), act, nn.Linear(3, 3), act).double()
    with pytest.raises(ValueError, match="runs more than once"):
        noisy(net, 0.3)(_x(4, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        noisy(lambda x: x, 0.3)


def test_noisy_is_exported():
    assert "noisy" in stochmi.__all__ and stochmi.noisy is noisy
    assert isinstance(noisy(_tanh_net(), 0.3), NoisyNetwork)
