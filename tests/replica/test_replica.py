"""Validation of stochmi.replica against exact answers and independent evaluations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats
from scipy.special import ndtr

from stochmi import replica
from stochmi.replica.channels import make_activation, make_prior
from stochmi.replica.solver import solve
from stochmi.replica.spectra import marchenko_pastur

COLUMNS = {"layer", "quantity", "entropy_per_unit", "mi_per_unit", "mi", "converged"}


def _logdet(c):
    sign, ld = np.linalg.slogdet(c)
    assert sign > 0
    return ld


def _orth(n, seed, scale=1.0):
    return stats.ortho_group.rvs(n, random_state=seed) * scale


# ----------------------------------------------------------------- linear-Gaussian, exact


@pytest.mark.parametrize("n1", [200, 450])
def test_linear_single_layer_matches_logdet(n1):
    rng = np.random.default_rng(0)
    n0, delta = 300, 0.1
    w = rng.normal(size=(n1, n0)) / math.sqrt(n0)
    df = replica.mutual_information([n0, n1], ["linear"], delta, weights=[w])
    h = 0.5 * _logdet(2 * np.pi * np.e * (delta * np.eye(n1) + w @ w.T))
    mi = 0.5 * _logdet(np.eye(n1) + w @ w.T / delta)
    assert df.converged.all()
    assert abs(df.entropy_per_unit[0] - h / n0) < 1e-4
    assert abs(df.mi_per_unit[0] - mi / n0) < 1e-4
    assert df.quantity[0] == "I(X;T_1)"


def test_linear_two_layers_isotropic_first_layer_matches_logdet():
    # W1 a scaled orthogonal matrix: T_1 is isotropic Gaussian, so the formula is exact
    # for any W2 (here Gaussian, wide to narrow)
    rng = np.random.default_rng(1)
    n0, n2, d1, d2 = 300, 150, 0.2, 0.05
    w1 = _orth(n0, 1, 1.3)
    w2 = rng.normal(size=(n2, n0)) / math.sqrt(n0)
    df = replica.mutual_information([n0, n0, n2], ["linear", "linear"], [d1, d2], weights=[w1, w2])
    c2 = w2 @ (w1 @ w1.T + d1 * np.eye(n0)) @ w2.T
    h2 = 0.5 * _logdet(2 * np.pi * np.e * (c2 + d2 * np.eye(n2)))
    i12 = 0.5 * _logdet(np.eye(n2) + c2 / d2) - 0.5 * _logdet(np.eye(n2) + w2 @ w2.T * d1 / d2)
    assert abs(df.entropy_per_unit[1] - h2 / n0) < 1e-4
    # the formula's second row is I(T_1; T_2) = H(T_2) - H(T_2 | T_1)
    assert df.quantity[1] == "I(T_1;T_2)"
    assert abs(df.mi[1] - (h2 - n2 * 0.5 * math.log(2 * math.pi * math.e * d2))) < 1e-4 * n0
    assert df.mi[1] > i12  # I(T_1;T_2) >= I(X;T_2), the latter not what the row is


def test_linear_two_gaussian_layers_finite_size():
    # both layers i.i.d. Gaussian: the formula assumes freely independent W1, W2, so at
    # n0 = 300 it differs from the exact log-det by O(1/n0) per unit (measured ~1.5e-3)
    rng = np.random.default_rng(0)
    n0, n1, n2, d1, d2 = 300, 300, 150, 0.2, 0.05
    w1 = rng.normal(size=(n1, n0)) / math.sqrt(n0)
    w2 = rng.normal(size=(n2, n1)) / math.sqrt(n1)
    df = replica.mutual_information([n0, n1, n2], "linear", [d1, d2], weights=[w1, w2])
    c = w2 @ (w1 @ w1.T + d1 * np.eye(n1)) @ w2.T + d2 * np.eye(n2)
    h2 = 0.5 * _logdet(2 * np.pi * np.e * c)
    assert abs(df.entropy_per_unit[1] - h2 / n0) < 5e-3


def test_bimodal_prior_orthogonal_linear_layer_exact():
    # H(W x + xi) = H(x + W^T xi) = n H(x_1 + xi_1) for orthogonal W and isotropic noise
    n, delta = 100, 0.3
    df = replica.mutual_information(
        [n, n], ["linear"], delta, prior="bimodal", weights=[_orth(n, 3)]
    )
    s = math.sqrt(delta)
    dens = lambda r: 0.5 * (stats.norm.pdf(r, 1, s) + stats.norm.pdf(r, -1, s))  # noqa: E731
    h = -integrate.quad(lambda r: dens(r) * math.log(dens(r)), -1 - 12 * s, 1 + 12 * s, limit=200)[
        0
    ]
    assert abs(df.entropy_per_unit[0] - h) < 1e-6


# ----------------------------------------------------------------- nonlinear, independent


def _censored_entropy(m, v, lo, hi):
    """Entropy of clip(N(m, v), lo, hi) w.r.t. Lebesgue + atoms, by direct quadrature."""
    s = math.sqrt(v)
    h = 0.0
    for p in ([ndtr((lo - m) / s)] if math.isfinite(lo) else []) + (
        [ndtr((m - hi) / s)] if math.isfinite(hi) else []
    ):
        if p > 0:
            h -= p * math.log(p)
    f = lambda t: -stats.norm.pdf(t, m, s) * stats.norm.logpdf(t, m, s)  # noqa: E731
    a, b = max(lo, m - 14 * s), min(hi, m + 14 * s)
    if b > a:
        h += integrate.quad(f, a, b, limit=200)[0]
    return h


@pytest.mark.parametrize("act,lo,hi", [("relu", 0.0, math.inf), ("hardtanh", -1.0, 1.0)])
def test_single_layer_orthogonal_decouples_exactly(act, lo, hi):
    # Gaussian input and square orthogonal W: W x has i.i.d. N(0, 1) entries, so the
    # layer factorises: H(T) = n H(phi(N(0, 1 + delta))), I = n (H - E_h H(phi(h + xi)|h))
    n, delta = 120, 0.3
    df = replica.mutual_information([n, n], [act], delta, weights=[_orth(n, 2)])
    h = _censored_entropy(0.0, 1.0 + delta, lo, hi)
    cond = integrate.quad(
        lambda z: stats.norm.pdf(z) * _censored_entropy(z, delta, lo, hi), -9, 9, limit=100
    )[0]
    assert abs(df.entropy_per_unit[0] - h) < 1e-6
    assert abs(df.mi_per_unit[0] - (h - cond)) < 1e-6
    assert df.converged[0]


@pytest.mark.slow
def test_inner_noisy_relu_layer_exact():
    # t1 = relu(W1 x + xi1) with W1 orthogonal (i.i.d. units), t2 = t1 + xi2 (W2 = I):
    # H(T2) = n H(relu(u) + e), u ~ N(0, 1 + d1), e ~ N(0, d2), by 1-D quadrature
    n, d1, d2 = 80, 0.2, 0.1
    df = replica.mutual_information(
        [n, n, n], ["relu", "linear"], [d1, d2], weights=[_orth(n, 4), np.eye(n)]
    )
    v, s2 = 1 + d1, math.sqrt(d2)
    p0 = ndtr(0.0)

    def dens(r):  # atom at 0 smoothed by e, plus N(0, v) on t > 0 convolved with e
        vv = v + d2
        m = v * r / vv
        cont = stats.norm.pdf(r, 0, math.sqrt(vv)) * ndtr(m / math.sqrt(v * d2 / vv))
        return p0 * stats.norm.pdf(r, 0, s2) + cont

    h = -integrate.quad(
        lambda r: dens(r) * math.log(dens(r)),
        -12 * s2,
        12 * math.sqrt(v + d2),
        limit=400,
        points=[0.0],
    )[0]
    assert abs(df.entropy_per_unit[1] - h) < 1e-5


def _glm_gaussian_weights(alpha, delta):
    """Free entropy Phi for t = relu(W x + xi), i.i.d. Gaussian W, Gaussian x, by the
    Gaussian-weight GLM formula (Barbier et al. 2019) with r eliminated:
    Phi(q) = log(1 - q)/2 + q/2 + alpha Psi(q), maximised over q; H(T)/n0 = -Phi."""
    z, wz = np.polynomial.legendre.leggauss(80)
    z, wz = 8 * z, 8 * wz * stats.norm.pdf(8 * z)

    def psi(q):  # E_V -H(relu(N(sqrt(q) V, 1 - q + delta)))
        return -sum(
            w * _censored_entropy(math.sqrt(q) * v, 1 - q + delta, 0.0, math.inf)
            for v, w in zip(z, wz)
        )

    res = optimize.minimize_scalar(
        lambda q: -(0.5 * math.log(1 - q) + 0.5 * q + alpha * psi(q)),
        bounds=(0.0, 0.99),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return -res.fun


@pytest.mark.slow
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_relu_gaussian_weights_matches_glm_formula(alpha):
    # independent evaluation: the (proved) Gaussian-weight single-layer formula,
    # written in its own parametrisation with scipy quadrature, vs the solver on the
    # Marchenko-Pastur spectrum
    n0, delta = 1000, 0.2
    n1 = int(alpha * n0)
    fp = solve(make_prior("normal"), [marchenko_pastur(n1, n0)], [make_activation("relu")], [delta])
    phi = _glm_gaussian_weights(alpha, delta)
    assert fp.converged
    assert abs(fp.entropy / n0 - (-phi)) < 2e-5


# ----------------------------------------------------------------- the reference implementation

#: the single-layer test values of the paper's reference implementation (dnner,
#: ``tests/test_layers.py``): I(X; T) / n0 for W = randn(100, 50) / sqrt(50) drawn
#: after NumPy seed 42, noise variance 0.01 before the activation
REFERENCE = [
    ("normal", "linear", 2.501166),
    ("bimodal", "linear", 0.693147),
    (("spike_slab", 0.2), "linear", 0.890864),
    ("normal", "probit", 0.897281),
    ("bimodal", "probit", 0.692927),
    (("spike_slab", 0.2), "probit", 0.559198),
    ("normal", "relu", 2.021801),
    ("bimodal", "relu", 0.693147),
    (("spike_slab", 0.2), "relu", 0.799361),
]


@pytest.mark.parametrize("prior, act, expected", REFERENCE)
def test_single_layer_matches_the_reference_implementation(prior, act, expected):
    # the same matrix as numpy.random.seed(42); randn(100, 50), without the global RNG.
    # Measured differences: at most 3.4e-7, except 2.3e-5 for bimodal/probit.  A
    # 96-node Gauss-Hermite rule over the pre-activation gives 2.0397 for normal/relu:
    # at this noise the entropy changes within 0.1 of the kink
    w = np.random.RandomState(42).randn(100, 50) / np.sqrt(50)
    df = replica.mutual_information([50, 100], [act], 0.01, prior=prior, weights=[w])
    assert df.converged[0]
    assert abs(df.mi_per_unit[0] - expected) < 1e-4


def _clipped_noise_entropy(z, s, lo, hi):
    """H(clip(z + s e, lo, hi)), e ~ N(0, 1), w.r.t. Lebesgue + atoms, in closed form:
    atoms -p log p, and on (lo, hi) the Gaussian part
    P log(sqrt(2 pi) s) + E[u^2; a < u < b] / 2 with E[u^2; a<u<b] = P + a phi(a) - b phi(b)."""
    a, b = (lo - z) / s, (hi - z) / s
    p_lo, p_hi = (ndtr(a) if math.isfinite(lo) else 0.0), (ndtr(-b) if math.isfinite(hi) else 0.0)
    mid = 1.0 - p_lo - p_hi
    apa = a * stats.norm.pdf(a) if math.isfinite(lo) else 0.0
    bpb = b * stats.norm.pdf(b) if math.isfinite(hi) else 0.0
    h = sum(-p * math.log(p) for p in (p_lo, p_hi) if p > 0)
    return h + mid * math.log(math.sqrt(2 * math.pi) * s) + 0.5 * (mid + apa - bpb)


@pytest.mark.parametrize("act, lo, hi", [("relu", 0.0, math.inf), ("hardtanh", -1.0, 1.0)])
@pytest.mark.parametrize("delta", [0.3, 1e-2, 1e-4])
def test_conditional_entropy_resolves_small_noise(act, lo, hi, delta):
    # E_h H(phi(h + xi) | h), h ~ N(0, rho): adaptive quadrature of the closed-form
    # entropy, split at the kinks; the integrand changes within sqrt(delta) of them
    rho, s = 0.9, math.sqrt(delta)
    kinks = [k for k in (lo, hi) if math.isfinite(k)]
    pts = sorted({k + j * s for k in kinks for j in (-6, -2, 0, 2, 6)})
    exact = integrate.quad(
        lambda h: stats.norm.pdf(h, 0, math.sqrt(rho)) * _clipped_noise_entropy(h, s, lo, hi),
        -14 * math.sqrt(rho),
        14 * math.sqrt(rho),
        points=pts,
        limit=500,
        epsabs=1e-13,
        epsrel=1e-12,
    )[0]
    assert abs(make_activation(act).cond_entropy(rho, delta) - exact) < 1e-9


# ----------------------------------------------------------------- sampling check (core estimator)


@pytest.mark.slow
def test_relu_single_layer_against_certified_estimate():
    # ReLU with noise before the activation: the law has an atom at 0 (CensoredNormal,
    # log-density w.r.t. Lebesgue + atom); stochmi's bracket at moderate size vs the
    # replica value for the same matrix (finite-size allowance 0.1 nats)
    import stochmi
    from stochmi.replica import network as net

    n0, n1, noise, n = 30, 20, 2.0, 2000
    (w,) = net.random_weights([n0, n1], seed=0)
    x = net.sample_inputs(n, n0, seed=1)
    est = stochmi.mi_from_conditional(net.conditional(x, w, "relu", noise), seed=0)
    rep = replica.mutual_information([n0, n1], ["relu"], noise, weights=[w]).mi[0]
    assert est.lower - 3 * est.stderr - 0.1 <= rep <= est.upper + 3 * est.stderr + 0.1


@pytest.mark.slow
def test_pyro_model_has_one_site_when_inner_layers_are_noiseless():
    import stochmi
    from stochmi.replica import network as net

    widths, acts, noise = [60, 60, 8], ["relu", "linear"], [0.0, 1.0]
    ws = net.random_weights(widths, seed=0)
    x = net.sample_inputs(1000, widths[0], seed=1)
    tab = stochmi.layer_mi(net.make_model(ws, acts, noise), x, seed=0)
    assert list(tab.target) == ["t2"]
    rep = replica.mutual_information(widths, acts, noise, weights=ws)
    assert rep.quantity[1] == "I(X;T_2)"
    est = tab.iloc[0]
    assert est.lower - 3 * est.stderr - 0.15 <= rep.mi[1] <= est.upper + 3 * est.stderr + 0.15


# ----------------------------------------------------------------- API


@pytest.mark.slow
def test_table_columns_and_semantics():
    df = replica.mutual_information(
        [200, 100, 50], ["hardtanh", "probit"], [0.0, 0.1], prior=("spike_slab", 0.5)
    )
    assert COLUMNS <= set(df.columns)
    assert list(df.layer) == [1, 2]
    assert df.quantity.tolist() == ["I(X;T_1)", "I(X;T_2)"]
    assert math.isinf(df.mi[0]) and np.isnan(df.entropy_per_unit[0])
    assert 0 < df.mi[1] <= 50 * math.log(2) + 1e-9  # probit output: at most n2 bits
    assert abs(df.mi[1] - 200 * df.mi_per_unit[1]) < 1e-9
    noisy = replica.mutual_information([200, 100, 50], ["relu", "linear"], [0.1, 0.1])
    assert noisy.quantity.tolist() == ["I(X;T_1)", "I(T_1;T_2)"]
    assert noisy.converged.all()


def test_table_fast_linear_probit():
    df = replica.mutual_information([200, 100, 50], ["linear", "probit"], [0.0, 0.1])
    assert COLUMNS <= set(df.columns)
    assert df.quantity.tolist() == ["I(X;T_1)", "I(X;T_2)"]
    assert math.isinf(df.mi[0])
    assert 0 < df.mi[1] <= 50 * math.log(2) and df.converged[1]


def test_orthogonal_ensemble_and_scale():
    a = replica.mutual_information([300, 300], ["relu"], 0.3, ensemble="orthogonal")
    b = replica.mutual_information([300, 300], ["relu"], 0.3, weights=[_orth(300, 5)])
    assert abs(a.entropy_per_unit[0] - b.entropy_per_unit[0]) < 1e-9
    lo = replica.mutual_information([300, 300], ["linear"], 0.3, weight_scale=0.5)
    hi = replica.mutual_information([300, 300], ["linear"], 0.3, weight_scale=2.0)
    assert hi.mi[0] > lo.mi[0] > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(widths=[10], activations=[], noise=0.1), "widths"),
        (dict(widths=[10, 5, 5], activations=["probit", "linear"], noise=0.1), "last layer"),
        (dict(widths=[10, 5], activations=["tanh"], noise=0.1), "unknown activation"),
        (dict(widths=[10, 5], activations=["relu"], noise=-1.0), "noise"),
        (dict(widths=[10, 5], activations=["relu"], noise=0.1, prior="laplace"), "prior"),
        (
            dict(widths=[10, 5], activations=["relu"], noise=0.1, weights=[np.ones((4, 10))]),
            "shape",
        ),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        replica.mutual_information(**kwargs)


@pytest.mark.slow
def test_hardtanh_small_weights_behaves_linearly():
    # at weight scale 0.1 a hardtanh unit is linear with probability ~1: the two networks
    # must give the same I(X;T_2) (a coarse quadrature gives a negative MI here)
    kw = dict(widths=[100, 100, 10], noise=[0.0, 2.0], weight_scale=[0.1, 1.0])
    ht = replica.mutual_information(activations=["hardtanh", "linear"], **kw).mi[1]
    lin = replica.mutual_information(activations=["linear", "linear"], **kw).mi[1]
    assert 0 < ht and abs(ht - lin) < 1e-3 * max(lin, 1e-3) + 1e-6
