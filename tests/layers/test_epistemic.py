"""I_q(T_l; W | X) for the posterior (stochmi.layers.epistemic through weight_mi) against
closed forms, a brute force over weight draws and 1-D quadrature."""

from __future__ import annotations

import math

import pytest
import torch

from stochmi.layers.epistemic import draw_clustered_se
from stochmi.layers.weights import weight_mi
from tests.layers.meanfield import MeanFieldChain, make_guide


def _draw(guide, g, size=()):
    """Weight draws from the guide in float64, with leading shape ``size``."""
    return {
        k: loc.double() + scale.double() * torch.randn(*size, *loc.shape, generator=g).double()
        for k, (loc, scale) in guide.params.items()
    }


def _truth_mc(x, guide, per_input, log_cond, log_marg, seed):
    """``mean over inputs and (w, t) draws of log p(t | x, w) - log p(t | x)`` and its se:
    ``log_cond(x_n, w, g)`` draws ``t`` for a batch of weight draws ``w`` and returns it
    with its density, ``log_marg(x_n, t)`` the marginal density of a batch of ``t``."""
    g = torch.Generator().manual_seed(seed)
    vals = []
    for xn in x.double():
        t, lc = log_cond(xn, _draw(guide, g, (per_input,)), g)
        vals.append(lc - log_marg(xn, t))
    v = torch.cat(vals)
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


def _assert_matches(row, truth: float, se_truth: float) -> None:
    """A converged importance-sampled row against a Monte Carlo truth: value within 3
    combined standard errors (plus the row's own estimate of its remaining bias), and
    the bracket around the truth to the same tolerance."""
    tol = 3 * math.hypot(row["stderr"], se_truth)
    assert abs(row["value"] - truth) < tol + row["mc_bias"], (row["value"], truth, tol)
    assert row["lower"] - tol <= truth <= row["upper"] + tol
    assert row["converged"]


def test_wide_mean_field_linear_layer_closed_form_beyond_log_m():
    """40 outputs, posterior wide against the noise: 52 nats, where log M = 2.8."""
    dims, sig = [4, 40], 0.3
    model, guide = MeanFieldChain(dims, [sig]), make_guide(dims, 1.0, 0.5, 0)
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    df = weight_mi(model, x, guide=guide, seed=0, n_weight_draws=16, chain_rule=False)
    row = df.set_index("target").loc["h1"]
    # given x, each output is N(m x + m_b, s^2 (|x|^2 + 1) + sig^2) against N(w x + b, sig^2)
    var = 0.25 * ((x.double() ** 2).sum(1) + 1) + sig**2
    truth = float((0.5 * 40 * torch.log(var / sig**2)).mean())
    assert truth > 10 and row["dataset_mi"] <= math.log(16) + 1e-9
    assert abs(row["value"] - truth) < 3 * row["stderr"]
    assert row["lower"] - 3 * row["stderr"] <= truth <= row["upper"] + 3 * row["stderr"]
    assert abs(df.attrs["closed_form"]["h1"].mean() - truth) < 1e-6 * truth  # float32 model
    assert row["converged"] and row["value"] > 5 * math.log(16)


def _linear_chain(xn, w, sig):
    """``p(t_2 | x, w)`` of the linear chain for a batch of weight draws ``w``."""
    m1 = (w["W1"] @ xn) + w["b1"]
    mean = (w["W2"] @ m1[..., None])[..., 0] + w["b2"]
    cov = sig[0] ** 2 * w["W2"] @ w["W2"].transpose(-1, -2) + sig[1] ** 2 * torch.eye(2)
    return torch.distributions.MultivariateNormal(mean, cov)


@pytest.mark.slow
def test_two_layer_linear_chain_against_brute_force():
    """Bayesian 2-3-2 linear chain: p(t_2 | x) by averaging 10^5 weight draws."""
    dims, sig = [2, 3, 2], [0.5, 0.3]
    model, guide = MeanFieldChain(dims, sig), make_guide(dims, 1.0, 0.4, 1)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(2))
    df = weight_mi(
        model, x, guide=guide, seed=3, n_weight_draws=256, min_queries=2048, chain_rule=False
    )
    row = df.set_index("target").loc["h2"]
    big = _draw(guide, torch.Generator().manual_seed(11), (100_000,))

    def log_cond(xn, w, g):
        d = _linear_chain(xn, w, sig)
        t = (
            d.loc
            + (d.scale_tril @ torch.randn(d.loc.shape, generator=g).double()[..., None])[..., 0]
        )
        return t, d.log_prob(t)

    def log_marg(xn, t):
        d = _linear_chain(xn, big, sig)
        lp = d.log_prob(t[:, None, :])  # (S, 10^5)
        return torch.logsumexp(lp, 1) - math.log(lp.shape[1])

    _assert_matches(row, *_truth_mc(x, guide, 120, log_cond, log_marg, seed=5))


def _normal_logpdf(t, loc, var):
    var = torch.as_tensor(var, dtype=torch.float64)
    return -0.5 * ((t - loc) ** 2 / var + torch.log(2 * math.pi * var))


def _quad_log_density(t, mu1, var1, mean2, var2):
    """``log int N(h; mu1, var1) N(t; mean2(h), var2(h)) dh`` on a 4001-point grid over
    ``mu1 +- 10 sd`` (trapezoid rule), for batches ``t``, ``mu1``, ``var1`` of shape (S,)."""
    z = torch.linspace(-10, 10, 4001, dtype=torch.float64)
    h = mu1[:, None] + var1.sqrt()[:, None] * z[None]
    lw = _normal_logpdf(h, mu1[:, None], var1[:, None]) + _normal_logpdf(
        t[:, None], mean2(h), var2(h)
    )
    dz = (z[1] - z[0]) * var1.sqrt()
    ends = torch.zeros_like(z)
    ends[[0, -1]] = math.log(0.5)
    return torch.logsumexp(lw + ends, 1) + torch.log(dz)


def test_tanh_chain_against_quadrature():
    """1-1-1 Bayesian chain with tanh: both densities of t_2 by 1-D quadrature over h_1."""
    dims, sig = [1, 1, 1], [0.3, 0.1]
    model = MeanFieldChain(dims, sig, act=torch.tanh)
    guide = make_guide(dims, 1.0, 0.5, 4)
    x = 1.5 * torch.randn(24, 1, generator=torch.Generator().manual_seed(6))
    df = weight_mi(
        model, x, guide=guide, seed=7, n_weight_draws=256, min_queries=2048, chain_rule=False
    )
    row = df.set_index("target").loc["h2"]
    p = {
        k: (loc.double().reshape(()), s.double().reshape(()))
        for k, (loc, s) in guide.params.items()
    }

    def log_cond(xn, w, g):
        w1, b1, w2, b2 = (w[k].reshape(-1) for k in ("W1", "b1", "W2", "b2"))
        h1 = w1 * xn + b1 + sig[0] * torch.randn(len(w1), generator=g).double()
        t = w2 * torch.tanh(h1) + b2 + sig[1] * torch.randn(len(w1), generator=g).double()
        lc = _quad_log_density(
            t, w1 * xn + b1, torch.full_like(t, sig[0] ** 2),
            lambda h: w2[:, None] * torch.tanh(h) + b2[:, None], lambda h: sig[1] ** 2,
        )  # fmt: skip
        return t, lc

    def log_marg(xn, t):
        (m1, s1), (mb1, sb1), (m2, s2), (mb2, sb2) = (p[k] for k in ("W1", "b1", "W2", "b2"))
        mu1 = (m1 * xn + mb1).expand_as(t)
        var1 = (s1**2 * xn**2 + sb1**2 + sig[0] ** 2).expand_as(t)
        return _quad_log_density(
            t, mu1, var1, lambda h: m2 * torch.tanh(h) + mb2,
            lambda h: s2**2 * torch.tanh(h) ** 2 + sb2**2 + sig[1] ** 2,
        )  # fmt: skip

    _assert_matches(row, *_truth_mc(x, guide, 400, log_cond, log_marg, seed=8))


def test_draw_clustered_se_matches_the_spread_of_repeated_estimates():
    """Terms sharing a weight draw share an offset: the se must count it (the naive
    sd / sqrt(Q) would be about 3x too small here)."""
    g = torch.Generator().manual_seed(0)
    draw = torch.arange(32).repeat_interleave(20)  # 32 draws, 20 queries each
    means, ses = [], []
    for _ in range(400):
        terms = torch.randn(32, generator=g)[draw] + torch.randn(len(draw), generator=g)
        means.append(float(terms.mean()))
        ses.append(draw_clustered_se(terms, draw))
    true_sd = math.sqrt(1 / 32 + 1 / len(draw))
    emp_sd = float(torch.tensor(means).std())
    # the sd of 400 estimates is within about 3.5% of the truth (1 se = sd / sqrt(800))
    assert abs(emp_sd / true_sd - 1) < 0.11
    # mean of 400 se^2, each with relative sd sqrt(2 / 31): 1.3% on the mean, 0.6% on the root
    assert abs(float(torch.tensor(ses).pow(2).mean().sqrt()) / true_sd - 1) < 0.03
