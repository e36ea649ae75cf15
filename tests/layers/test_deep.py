"""Deep layers: I(X;T_l), non-adjacent pairs and I(T_l;Y) against truths.

Each row is checked twice.  Its value estimates the dataset MI (sources uniform over the
N given values): it must agree with an independent estimate of that quantity from the
exact conditional density within 3 combined standard errors plus the row's reported
``mc_bias`` (the estimated remaining bias of a deep-layer density).  Its bracket
targets the population MI: the closed-form or grid truth must lie inside it, widened by
3 of its standard errors.
"""

import dataclasses
import math

import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from stochmi.core.from_matrix import label_bounds_from_log_density, mi_terms_from_log_density
from stochmi.layers import deep
from stochmi.layers.audit import audit_densities
from stochmi.layers.deep import deep_log_density, mean_path, own_log_density, pooled
from stochmi.layers.estimation import layer_mi
from tests.helpers import gaussian_dataset_mi


def _logdet(m):
    return float(torch.linalg.slogdet(m)[1])


class LinearChain:
    """x ~ N(0, I); h_k = A_k h_{k-1} + s_k Z (Pyro model, traced links)."""

    def __init__(self, widths, sigmas, seed):
        g = torch.Generator().manual_seed(seed)
        self.A = [
            torch.randn(widths[k + 1], widths[k], generator=g, dtype=torch.float64)
            / math.sqrt(widths[k])
            for k in range(len(widths) - 1)
        ]
        self.s = list(sigmas)
        self.names = [f"h{k + 1}" for k in range(len(self.A))]

    def __call__(self, x):
        h = x
        with pyro.plate("data", x.shape[0]):
            for name, a, s in zip(self.names, self.A, self.s):
                h = pyro.sample(name, dist.Normal(h @ a.T, s).to_event(1))
        return h

    def _link(self, a, b_):
        """Map and noise covariance of h_b given h_a (a < b, 1-based; a = 0 is x)."""
        d = self.A[a].shape[1]
        m = torch.eye(d, dtype=torch.float64)
        noise = torch.zeros(d, d, dtype=torch.float64)
        for aa, s in zip(self.A[a:b_], self.s[a:b_]):
            m = aa @ m
            noise = aa @ noise @ aa.T + s**2 * torch.eye(aa.shape[0], dtype=torch.float64)
        return m, noise

    def _cov_layer(self, a):
        """Cov(h_a) (a >= 1; x ~ N(0, I))."""
        b, noise = self._link(0, a)
        return b @ b.T + noise

    def mi_x(self, l):
        b, noise = self._link(0, l)
        return 0.5 * (_logdet(b @ b.T + noise) - _logdet(noise))

    def mi_layers(self, a, b_):
        """I(h_a; h_b), a < b (1-based)."""
        cov_a = self._cov_layer(a)
        m, noise = self._link(a, b_)
        return 0.5 * (_logdet(m @ cov_a @ m.T + noise) - _logdet(noise))

    def dataset_mi_x(self, l, x, seed):
        """Independent estimate (value, stderr) of the dataset I(X; h_l) for these x, from
        the exact Gaussian p(h_l | x_i) (8 draws per source)."""
        m, noise = self._link(0, l)
        return gaussian_dataset_mi(x @ m.T, noise, n_draws=8, seed=seed)

    def dataset_mi_layers(self, a, b_, n, seed, reps=4):
        """Independent estimate (value, stderr) of the dataset I(h_a; h_b) expected for
        ``n`` sources drawn from the population of h_a: the mean over ``reps`` source
        sets of estimates from the exact Gaussian p(h_b | h_a)."""
        chol = torch.linalg.cholesky(self._cov_layer(a))
        m, noise = self._link(a, b_)
        g = torch.Generator().manual_seed(seed)
        vals, ses = [], []
        for r in range(reps):
            src = torch.randn(n, chol.shape[0], generator=g, dtype=torch.float64) @ chol.T
            v, se = gaussian_dataset_mi(src @ m.T, noise, n_draws=2, seed=seed + 1 + r)
            vals.append(v)
            ses.append(se)
        return sum(vals) / reps, math.sqrt(sum(se**2 for se in ses)) / reps

    def reference(self, r, x, seed):
        """Population truth and independent dataset estimate of the row ``r``."""
        if r.source == "X":
            l = self.names.index(r.target) + 1
            return self.mi_x(l), self.dataset_mi_x(l, x, seed)
        a, b = self.names.index(r.source) + 1, self.names.index(r.target) + 1
        return self.mi_layers(a, b), self.dataset_mi_layers(a, b, x.shape[0], seed)


def _x(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_row(r, truth, ref):
    """``truth``: the population MI; ``ref``: (value, stderr) of an independent estimate
    of the dataset MI."""
    ref_value, ref_se = ref
    bias = 0.0 if math.isnan(r.mc_bias) else r.mc_bias
    tol = 3 * math.hypot(r.stderr, ref_se) + bias
    assert abs(r.value - ref_value) <= tol, (r.source, r.target, r.value, ref_value, tol)
    assert r.lower - 3 * r.lower_stderr <= truth <= r.upper + 3 * r.upper_stderr, (
        r.source,
        r.target,
        r.lower,
        r.upper,
        truth,
    )
    if r.value < math.log(r.n) - 1:
        assert r.upper - r.lower <= 0.25 * r.value
    assert r.converged


@pytest.mark.parametrize(
    "widths, sigmas, seed, n",
    [
        pytest.param([5, 8, 6, 5, 4], [0.6, 0.9, 0.7, 0.5], 0, 1000, marks=pytest.mark.slow),
        # very noisy first layer, then a precise one
        pytest.param([4, 6, 5], [2.0, 0.25], 1, 1000, marks=pytest.mark.slow),
        ([3, 4, 3], [0.5, 0.8], 2, 800),
    ],
)
def test_linear_chains_match_closed_forms(widths, sigmas, seed, n):
    m = LinearChain(widths, sigmas, seed)
    x = _x(n, widths[0], seed + 10)
    df = layer_mi(m, x, seed=seed)
    for r in df.itertuples():
        _check_row(r, *m.reference(r, x, seed + 100))
    assert df.attrs["dpi"] == []


@pytest.mark.slow
def test_wide_chain_whose_sources_separate_needs_bridged_draws():
    """20-96-64, noise 1: I(X; h1) = 9.6 nats (every source apart at layer 1) and
    I(T1; T2 | X) = 9.2 nats.  Neither the query's proposal nor forward paths reach
    other sources' posteriors; the first round is flagged, the bridged round (effort 2)
    is right."""
    m = LinearChain([20, 96, 64], [1.0, 1.0], 3)
    m.A = [a * 0.6 for a in m.A]
    x = _x(400, 20, 13)
    first = layer_mi(m, x, seed=1, pairs=[("X", "h2")], max_effort=1).iloc[0]
    assert not first.converged  # without bridged draws: 3.4 nats, flagged
    r = layer_mi(m, x, seed=1, pairs=[("X", "h2")]).iloc[0]
    assert r.k_paths == 32 and r.converged
    _check_row(r, *m.reference(r, x, 101))


def test_non_adjacent_pairs():
    m = LinearChain([4, 6, 5, 4], [0.7, 0.8, 0.6], 3)
    pairs = [("h1", "h3"), ("X", "h3"), ("h2", "h3")]
    x = _x(600, 4, 13)
    df = layer_mi(m, x, seed=0, pairs=pairs)
    for r in df.itertuples():
        _check_row(r, *m.reference(r, x, 100))
    with pytest.raises(ValueError, match="before the target"):
        layer_mi(m, _x(20, 4, 1), pairs=[("h3", "h1")])


def _grid_truth_tanh_chain(s1, s2, gain=3.0):
    """Population I(X;T2) and I(T2;Y), Y = 1[x > 0], for x ~ N(0,1),
    t1 = tanh(gain x) + s1 Z, t2 = tanh(gain t1) + s2 Z, on fine grids."""
    xs = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    px = torch.exp(-0.5 * xs**2)
    px = px / px.sum()
    t1 = torch.linspace(-1 - 7 * s1, 1 + 7 * s1, 3001, dtype=torch.float64)
    t2 = torch.linspace(-1 - 8 * s2, 1 + 8 * s2, 6001, dtype=torch.float64)
    dt1, dt2 = float(t1[1] - t1[0]), float(t2[1] - t2[0])
    k1 = torch.exp(-0.5 * ((t1[None] - torch.tanh(gain * xs)[:, None]) / s1) ** 2) / (
        s1 * math.sqrt(2 * math.pi)
    )
    k2 = torch.exp(-0.5 * ((t2[None] - torch.tanh(gain * t1)[:, None]) / s2) ** 2) / (
        s2 * math.sqrt(2 * math.pi)
    )
    p2x = (k1 @ k2) * dt1  # p(t2 | x), (X, T2)

    def ent(p):
        return float(-(p * torch.log(p.clamp_min(1e-300))).sum(-1).mul(dt2).sum())

    h_given_x = sum(float(px[i]) * ent(p2x[i]) for i in range(len(xs)))
    p2 = px @ p2x
    mi_x = ent(p2) - h_given_x
    pos = xs > 0
    py1 = float(px[pos].sum())
    p2y1 = (px[pos] @ p2x[pos]) / py1
    p2y0 = (px[~pos] @ p2x[~pos]) / (1 - py1)
    mi_y = ent(p2) - py1 * ent(p2y1) - (1 - py1) * ent(p2y0)
    return mi_x, mi_y


def _grid_dataset_tanh_chain(x, y, s1, s2, seed, reps=2, gain=3.0):
    """Independent estimates (value, stderr) of the dataset I(X;T2) and I(T2;Y) of the
    1-D tanh chain for these x: fresh draws of t2, and ``p(t2_j | x_i)`` by quadrature
    over t1 on a fine grid; the mean over ``reps`` sets of draws."""
    g = torch.Generator().manual_seed(seed)
    xs = x[:, 0]
    t1 = torch.linspace(-1 - 7 * s1, 1 + 7 * s1, 3001, dtype=torch.float64)
    dt1 = float(t1[1] - t1[0])
    log_k1 = dist.Normal(torch.tanh(gain * xs)[:, None], s1).log_prob(t1[None])  # (N, G)
    m1 = log_k1.max(1, keepdim=True).values
    est = {"x": [], "y": []}
    for _ in range(reps):
        h1 = torch.tanh(gain * xs) + s1 * torch.randn(len(xs), generator=g, dtype=torch.float64)
        t2 = torch.tanh(gain * h1) + s2 * torch.randn(len(xs), generator=g, dtype=torch.float64)
        log_k2 = dist.Normal(torch.tanh(gain * t1)[:, None], s2).log_prob(t2[None])  # (G, N)
        m2 = log_k2.max(0, keepdim=True).values
        prod = torch.exp(log_k1 - m1) @ torch.exp(log_k2 - m2)  # (source i, query j)
        L = (torch.log(prod) + m1 + m2 + math.log(dt1)).T  # L[j, i] = log p(t2_j | x_i)
        full, _ = mi_terms_from_log_density(L)
        terms_y = label_bounds_from_log_density(L, y)[0]
        for key, terms in (("x", full), ("y", terms_y)):
            est[key].append((float(terms.mean()), float(terms.std()) / math.sqrt(len(xs))))
    return tuple(
        (
            sum(v for v, _ in est[key]) / reps,
            math.sqrt(sum(se**2 for _, se in est[key])) / reps,
        )
        for key in ("x", "y")
    )


@pytest.mark.slow
def test_nonlinear_1d_chain_against_grid():
    s1, s2 = 0.8, 0.05
    truth_x, truth_y = _grid_truth_tanh_chain(s1, s2)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            h1 = pyro.sample("h1", dist.Normal(torch.tanh(3 * x), s1).to_event(1))
            pyro.sample("h2", dist.Normal(torch.tanh(3 * h1), s2).to_event(1))

    x = _x(1500, 1, 21)
    y = (x[:, 0] > 0).long()
    df = layer_mi(model, x, y, seed=1, pairs=[("X", "h2"), ("h2", "Y")])
    rx, ry = df.iloc[0], df.iloc[1]
    ref_x, ref_y = _grid_dataset_tanh_chain(x, y, s1, s2, seed=7)
    _check_row(rx, truth_x, ref_x)
    _check_row(ry, truth_y, ref_y)


def _separated_chain() -> LinearChain:
    """20-96-64, noise 1 then 0.4, gains x0.6: the sources lie apart at layer 1 and
    layer 2 is precise about it; I(X; h2) = 4.78 nats in the population."""
    m = LinearChain([20, 96, 64], [1.0, 0.4], 3)
    m.A = [a * 0.6 for a in m.A]
    return m


def _problem(m: LinearChain, x: torch.Tensor, seed: int):
    """First-layer conditional, the link and a query with its anchor, drawn from ``m``."""
    gen = torch.Generator().manual_seed(seed)
    loc1 = x @ m.A[0].T
    t1 = loc1 + m.s[0] * torch.randn(loc1.shape, generator=gen, dtype=loc1.dtype)
    loc2 = t1 @ m.A[1].T
    t2 = loc2 + m.s[1] * torch.randn(loc2.shape, generator=gen, dtype=loc2.dtype)

    def link(parent):
        return dist.Normal(parent @ m.A[1].T, m.s[1]).to_event(1)

    return loc1, torch.full_like(loc1, m.s[0]), [link], t2, [t1]


def test_first_round_pair_sources_reach_the_mass_of_the_separated_chain():
    """With each query's pair sources, ranked by the linearised evidence (for a linear
    chain the exact density) and given shifted draws, the first round is within 3
    standard errors of the dataset MI that it overshoots by 28% without them, and the
    audit finds no difference beyond the tolerance."""
    m, x = _separated_chain(), _x(400, 20, 13)
    prob = _problem(m, x, 5)
    gen = torch.Generator().manual_seed(0)
    plain = deep_log_density(*prob, n_is=32, n_fwd=16, generator=gen, dtype=torch.float64)
    terms = mi_terms_from_log_density(plain.L)[0]
    value, se = float(terms.mean()), float(terms.std()) / math.sqrt(len(terms))
    _, (ref, ref_se) = m.reference(pd.Series({"source": "X", "target": "h2"}), x, 101)
    assert abs(value - ref) <= 3 * math.hypot(se, ref_se)
    audit = audit_densities(
        *prob, plain.L, n_is=32, n_fwd=16, n_bridge=4, generator=gen, dtype=torch.float64
    )
    assert not audit.missed(0.02, value)


def _exact_h2(m: LinearChain, loc1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """``log p(t2_j | x_i)`` of a two-link linear chain, ``(N, N)``."""
    a2 = m.A[1]
    cov = m.s[0] ** 2 * a2 @ a2.T + m.s[1] ** 2 * torch.eye(a2.shape[0], dtype=torch.float64)
    zero = torch.zeros(a2.shape[0], dtype=torch.float64)
    gauss = torch.distributions.MultivariateNormal(zero, cov)
    return gauss.log_prob(t2[:, None, :] - (loc1 @ a2.T)[None])


def test_pair_entries_are_unbiased_where_the_query_proposal_misses(monkeypatch):
    """Separated chain: each query's pair sources (largest linearised evidence, for a
    linear chain its largest exact densities, among the candidates of its first layer)
    carry most of its off-diagonal mass.  With their shifted draws (here the exact
    posterior of the source's path), those entries average the exact density (ratio 1
    within 3 standard errors); without them, the same entries fall short by more than 3
    standard errors."""
    m, x = _separated_chain(), _x(400, 20, 13)
    prob = _problem(m, x, 5)
    exact = _exact_h2(m, prob[0], prob[3])
    off = exact.clone()
    off.fill_diagonal_(-math.inf)
    pb = deep._Problem(*prob[:4], torch.Generator().manual_seed(0), torch.float64)
    rows = torch.arange(len(x))
    k_pairs = deep._PAIR_SOURCES
    pairs = deep._pair_sources(pb, deep._Guided(pb, rows, prob[4]), rows, prob[4], k_pairs)
    share = torch.exp(torch.logsumexp(off.gather(1, pairs), 1) - torch.logsumexp(off, 1))
    assert float(share.median()) > 0.8
    ratios = {}
    for k in (k_pairs, 0):
        monkeypatch.setattr(deep, "_PAIR_SOURCES", k)
        gen = torch.Generator().manual_seed(0)
        res = deep_log_density(*prob, n_is=32, n_fwd=16, generator=gen, dtype=torch.float64)
        ratios[k] = torch.exp(res.L.gather(1, pairs) - exact.gather(1, pairs)).flatten()
    for k, r in ratios.items():
        se = float(r.std()) / math.sqrt(len(r))
        if k:
            assert abs(float(r.mean()) - 1) < 3 * se
        else:
            assert float(r.mean()) < 1 - 3 * se


def _two_layer_linear(n, s1, s2, seed):
    """x ~ N(0, I_5), t1 = A1 x + s1 Z, t2 = A2 t1 + s2 Z: the generator (for the
    estimator), the layer-1 means, both layers, the exact ``log p(t2_j | x_i)`` (N, N)
    and the link of t2 given t1."""
    g = torch.Generator().manual_seed(seed)
    a1 = torch.randn(8, 5, generator=g, dtype=torch.float64) / 2
    a2 = torch.randn(6, 8, generator=g, dtype=torch.float64) / 3
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    mu1 = x @ a1.T
    t1 = mu1 + s1 * torch.randn(mu1.shape, generator=g, dtype=torch.float64)
    t2 = t1 @ a2.T + s2 * torch.randn(n, 6, generator=g, dtype=torch.float64)
    cov = s1**2 * a2 @ a2.T + s2**2 * torch.eye(6, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(
        torch.zeros(6, dtype=torch.float64), cov
    ).log_prob(t2[:, None, :] - (mu1 @ a2.T)[None])
    return g, mu1, t1, t2, exact, [lambda p: dist.Normal(p @ a2.T, s2).to_event(1)]


@pytest.mark.parametrize("n_bridge", [0, 4])
def test_deep_log_density_unbiased_for_linear_chain(n_bridge):
    """Entry by entry against the exact Gaussian p(t2 | x_i), with and without the
    bridged draws (which then carry every off-diagonal entry)."""
    n = 300
    g, mu1, t1, t2, exact, link = _two_layer_linear(n, 0.6, 0.9, seed=0)
    res = deep_log_density(
        mu1,
        torch.tensor(0.6),
        link,
        t2,
        [t1],
        n_is=32,
        n_fwd=16,
        n_bridge=n_bridge,
        generator=g,
        dtype=torch.float64,
    )
    idx = torch.arange(n)
    # one hidden layer of a linear chain: the proposal is the exact posterior, so the
    # diagonal is exact up to the forward paths mixed in by the balance heuristic
    derr = res.L[idx, idx] - exact[idx, idx]
    assert abs(derr.mean()) < 0.01 and derr.std() < 0.1
    assert (res.diag_ess > 0.5 * 32).float().mean() > 0.9
    # the marginal density over the other sources, sum_{i != j} p(t_j | x_i), is
    # unbiased: its ratio to the exact sum averages to 1 within 3 standard errors
    off, ex = res.L.clone(), exact.clone()
    off[idx, idx] = ex[idx, idx] = -math.inf
    row = torch.exp(torch.logsumexp(off, 1) - torch.logsumexp(ex, 1))
    assert abs(float(row.mean()) - 1) < 3 * float(row.std()) / math.sqrt(n)
    if n_bridge:
        # with bridged draws every single off-diagonal entry is close to unbiased; without
        # them far-off entries rest on rare heavy-tailed weights (their sample mean
        # ratio sits near 0.9) while the sums above stay unbiased
        ratio = (res.L - exact).exp()
        ratio[idx, idx] = float("nan")
        assert abs(ratio.nanmean().item() - 1) < 0.05
    f_est, _ = mi_terms_from_log_density(res.L)
    f_ex, _ = mi_terms_from_log_density(exact)
    assert abs(f_est.mean() - f_ex.mean()) < 3 * (f_est - f_ex).std() / math.sqrt(n) + 0.01


def test_pooled_estimates_are_unbiased_with_half_their_variance():
    """Two independent bridged estimates of a linear chain's densities, pooled: every
    entry stays unbiased against the exact Gaussian density, the error of the log
    marginal density shrinks to about half its variance, and the half-sample estimate of
    the pool is the first estimate."""
    n = 300
    g, mu1, t1, t2, exact, link = _two_layer_linear(n, 0.6, 0.9, seed=5)
    kw = dict(n_is=16, n_fwd=8, n_bridge=2, generator=g, dtype=torch.float64)
    first, second = (
        deep_log_density(mu1, torch.tensor(0.6), link, t2, [t1], **kw) for _ in range(2)
    )
    both = pooled(first, second)
    assert torch.equal(both.L_half, first.L)
    assert (both.n_is, both.n_fwd, both.n_bridge) == (32, 16, 4)
    marg_exact = torch.logsumexp(exact, 1)
    row = torch.exp(torch.logsumexp(both.L, 1) - marg_exact)
    assert abs(float(row.mean()) - 1) < 3 * float(row.std()) / math.sqrt(n)
    err = [torch.logsumexp(r.L, 1) - marg_exact for r in (first, second, both)]
    single = (float(err[0].var()) + float(err[1].var())) / 2
    assert float(err[2].var()) < 0.75 * single
    # the effective number of terms grows with the pooled draws
    assert float(both.marg_ess.median()) > 1.5 * float(first.marg_ess.median())
    with pytest.raises(ValueError, match="log_sums"):
        pooled(first, dataclasses.replace(second, log_sums=None))


def test_deep_log_density_on_a_subset_of_queries():
    """``rows``: only those queries are estimated, each at every source.  Their marginal
    densities are unbiased against the exact Gaussian ones and their dataset-MI terms
    average to the exact terms' mean within 3 standard errors; every other row is
    ``-inf`` with NaN diagnostics."""
    n = 300
    g, mu1, t1, t2, exact, link = _two_layer_linear(n, 0.6, 0.9, seed=4)
    rows = torch.arange(5, n, 3)
    kw = dict(n_is=32, n_fwd=16, generator=g, dtype=torch.float64)
    res = deep_log_density(mu1, torch.tensor(0.6), link, t2, [t1], rows=rows, **kw)
    other = torch.ones(n, dtype=torch.bool)
    other[rows] = False
    assert torch.equal(res.rows, rows)
    assert bool(torch.isinf(res.L[other]).all()) and bool(torch.isnan(res.marg_ess[other]).all())
    assert bool(torch.isfinite(res.L[rows]).all()) and bool(
        torch.isfinite(res.diag_ess[rows]).all()
    )
    ratio = torch.exp(torch.logsumexp(res.L[rows], 1) - torch.logsumexp(exact[rows], 1))
    assert abs(float(ratio.mean()) - 1) < 3 * float(ratio.std()) / math.sqrt(len(rows))
    f_est = mi_terms_from_log_density(res.L)[0][rows]
    f_ex = mi_terms_from_log_density(exact)[0][rows]
    assert abs(f_est.mean() - f_ex.mean()) < 3 * (f_est - f_ex).std() / math.sqrt(len(rows))
    for bad in (torch.tensor([0, 0]), torch.tensor([n]), torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match="rows"):
            deep_log_density(mu1, torch.tensor(0.6), link, t2, [t1], rows=bad, **kw)


def _tanh_links(widths, gains, sigmas, seed):
    g = torch.Generator().manual_seed(seed)
    ws = [
        gain * torch.randn(b, a, generator=g, dtype=torch.float64) / math.sqrt(a)
        for a, b, gain in zip(widths[:-1], widths[1:], gains)
    ]
    return [
        (lambda p, w=w, s=s: dist.Normal(torch.tanh(p @ w.T), s).to_event(1))
        for w, s in zip(ws, sigmas)
    ]


@pytest.mark.parametrize("widths", [[5, 4, 2], [5, 2]])
def test_bridged_density_at_forward_paths_matches_direct_evaluation(widths):
    """``log r_ji`` at source i's forward paths, evaluated as a quadratic in t_j, equals
    the density of the proposal's steps evaluated directly (tanh chains with two steps
    and with one, where the step next to the query is also the first), up to the
    float32 rounding bound of the steps' quadratic forms (``_F32_TOL / 2`` nats per
    step and evaluation)."""
    from stochmi.layers.deep import _F32_TOL, _Bridge, _Pool, _Problem

    g = torch.Generator().manual_seed(0)
    n, k = 6, 4
    steps = len(widths) - 1
    links = _tanh_links(widths, [1.5] * steps, [0.7, 0.5][:steps], 1)
    loc1 = torch.randn(n, 5, generator=g, dtype=torch.float64)
    tq = torch.randn(n, widths[-1], generator=g, dtype=torch.float64)
    pb = _Problem(loc1, torch.full((n, 5), 0.8, dtype=torch.float64), links, tq, g, torch.float64)
    pool = _Pool(pb, k)
    bridge = _Bridge(pb, 2, pool)
    fast = bridge.at_pool(pb, torch.arange(n))  # (B, K, N)
    tol = len(bridge.q.steps) * _F32_TOL

    def first_mean(i, j):  # the first step's mean, linear in the query: a0 + t_j G
        return (bridge.a0[i] + tq[j] @ bridge.q.steps[0].gain_t[i])[None, None]

    for j in range(n):
        for i in range(n):
            direct = 0.0
            for m, (step, t, prior) in enumerate(zip(bridge.q.steps, pool.layers, pool.priors)):
                t_i, prior_i = (v.reshape(k, n, -1)[:, i][None] for v in (t, prior))
                mean = first_mean(i, j) if m == 0 else step.mean(prior_i, tq[j][None, None], [i])
                r = t_i - mean
                wr = r @ step.w[i].T
                quad = (r * r / step.s2[i]).sum(-1) + (wr * wr).sum(-1)
                direct = direct - 0.5 * quad - step.norm[i]
            assert torch.allclose(fast[j, :, i], direct[0], atol=tol, rtol=0)
    # and at paths drawn from each query's own proposal (the q_j draws)
    from stochmi.layers.deep import _Guided

    rows = torch.arange(n)
    q = _Guided(pb, rows, [t[:n] for t in pool.layers])
    layers, _, _, priors = q.sample(3)
    fast = bridge.at_draws(pb, rows, layers, priors)  # (B, 3, N)
    for j in range(n):
        for i in range(n):
            direct = 0.0
            for k, step in enumerate(bridge.q.steps):
                mean = (
                    first_mean(i, j)
                    if k == 0
                    else step.mean(priors[k][j][None], tq[j][None, None], [i])
                )
                direct = direct + step.logpdf(layers[k][j][None], mean, torch.tensor([i]))
            assert torch.allclose(fast[j, :, i], direct[0], atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_factor_with_jitter_only_where_a_factor_fails(dtype):
    """A positive definite matrix gets its exact factor; a singular one in the same
    batch gets the factor of itself plus ``_JITTER`` times its mean diagonal."""
    from stochmi.layers.deep import _JITTER, _cholesky

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    h = torch.stack([a @ a.T + torch.eye(4, dtype=torch.float64), a @ a.T])
    h[1, 3, :] = h[1, :, 3] = 0.0  # singular: a zero pivot
    chol = _cholesky(h, dtype)
    assert chol.dtype == dtype and bool(torch.isfinite(chol).all())
    back = (chol @ chol.transpose(1, 2)).to(torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = float(h.abs().max())
    assert torch.allclose(back[0], h[0], atol=tol * scale, rtol=0)
    jitter = _JITTER[dtype] * torch.diagonal(h[1]).mean()
    assert torch.allclose(back[1], h[1] + jitter * torch.eye(4, dtype=h.dtype), atol=tol * scale)
    assert not torch.allclose(back[1], h[1], atol=0.1 * float(jitter), rtol=0)


def test_broadcast_scales_give_the_same_densities_bit_for_bit():
    """A noise scale broadcast to every row (a fixed sigma, one per unit, one per row)
    stays unmaterialised in float64 and gives the same ``row_gauss_logpdf``, to the
    bit, as the materialised float64 scale."""
    from stochmi.layers.deep import _to64, row_gauss_logpdf

    g = torch.Generator().manual_seed(1)
    t = torch.randn(3, 5, 4, generator=g, dtype=torch.float64)
    loc = torch.randn(5, 4, generator=g, dtype=torch.float64)
    scales = [
        torch.tensor(0.7).expand(5, 4),
        (torch.rand(4, generator=g) + 0.5).expand(5, 4),
        (torch.rand(5, 1, generator=g) + 0.5).expand(5, 4),
        torch.rand(5, 4, generator=g) + 0.5,
    ]
    for s in scales:
        s64 = _to64(s)
        assert s64.dtype == torch.float64 and s64.stride() == s.stride()
        dense = s.to(torch.float64).contiguous()
        assert torch.equal(row_gauss_logpdf(t, loc, s64), row_gauss_logpdf(t, loc, dense))


def test_squared_norm_of_product_within_its_rounding_bound():
    """``|w r|^2`` from the float32 product is within ``_F32_TOL`` of float64 where the
    bound allows it, and is the float64 value itself (batch by batch) where it does not."""
    from stochmi.layers.deep import _F32_TOL, _sq_norm_of_product

    g = torch.Generator().manual_seed(3)
    r = torch.randn(3, 50, 64, generator=g, dtype=torch.float64)
    w = torch.randn(3, 8, 64, generator=g, dtype=torch.float64) / 8
    exact = ((r @ w.transpose(1, 2)) ** 2).sum(-1)
    got = _sq_norm_of_product(r, w)
    assert (got - exact).abs().max() <= _F32_TOL
    assert not torch.equal(got, exact)  # the float32 product ran
    w_big = w.clone()
    w_big[1] *= 1e3  # batch 1's bound is far over the tolerance
    exact_big = ((r @ w_big.transpose(1, 2)) ** 2).sum(-1)
    got_big = _sq_norm_of_product(r, w_big)
    assert torch.equal(got_big[1], exact_big[1])
    assert torch.equal(got_big[0], got[0]) and torch.equal(got_big[2], got[2])
    # one batch of r against many of w (the bridged draws' layout)
    got_b = _sq_norm_of_product(r[:1], w)
    assert got_b.shape == (3, 50)
    assert (got_b - ((r[:1] @ w.transpose(1, 2)) ** 2).sum(-1)).abs().max() <= _F32_TOL


@pytest.mark.slow
def test_bridged_draws_against_quadrature_on_a_nonlinear_chain():
    """A tanh chain whose first layer is 2-D, so that p(t2 | x_i) has a quadrature truth
    on a fine grid.  What the MI uses is the marginal ``log sum_i p(t_j | x_i)`` of each
    query: with bridged draws its error is centred on 0 (each entry is an unbiased
    density estimate) and small; without them it is several times larger."""
    g = torch.Generator().manual_seed(2)
    n, s1, s2 = 120, 0.7, 0.5
    (link,) = _tanh_links([2, 3], [1.0], [s2], 5)
    mu1 = 1.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    t1 = mu1 + s1 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    d2 = link(t1)
    t2 = d2.mean + d2.stddev * torch.randn(d2.mean.shape, generator=g, dtype=torch.float64)
    axis = torch.linspace(-8.0, 8.0, 401, dtype=torch.float64)  # covers every prior
    grid = torch.cartesian_prod(axis, axis)  # (G, 2)
    lg = link(grid).log_prob(t2[:, None, :])  # (N queries, G)
    lp = dist.Normal(mu1[:, None, :], s1).to_event(1).log_prob(grid[None])  # (N sources, G)
    mg, mp = lg.max(1, keepdim=True).values, lp.max(1, keepdim=True).values
    prod = torch.exp(lg - mg) @ torch.exp(lp - mp).T  # (j, i), O(N * G) memory
    exact = torch.log(prod) + mg + mp.T + 2 * math.log(float(axis[1] - axis[0]))
    errs = {}
    for n_bridge in (0, 16):
        res = deep_log_density(
            mu1,
            torch.tensor(s1),
            [link],
            t2,
            [t1],
            n_is=16,
            n_fwd=8,
            n_bridge=n_bridge,
            generator=g,
            dtype=torch.float64,
        )
        errs[n_bridge] = torch.logsumexp(res.L, 1) - torch.logsumexp(exact, 1)
    err = errs[16]
    assert abs(float(err.mean())) < 3 * float(err.std()) / math.sqrt(n) + 0.01
    assert float(err.std()) < 0.03
    assert float(errs[0].std()) > 2 * float(err.std())


class BayesChain:
    """Global weights W_k ~ N(M_k, S^2) (fixed guide); h_k = W_k h_{k-1} + s_k Z."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.M = [
            torch.randn(4, 3, generator=g, dtype=torch.float64) / 2,
            torch.randn(3, 4, generator=g, dtype=torch.float64) / 2,
        ]
        self.S, self.s = 0.3, (0.6, 0.5)

    def __call__(self, x):
        w1 = pyro.sample("w1", dist.Normal(torch.zeros_like(self.M[0]), 1.0).to_event(2))
        w2 = pyro.sample("w2", dist.Normal(torch.zeros_like(self.M[1]), 1.0).to_event(2))
        with pyro.plate("data", x.shape[0]):
            h1 = pyro.sample("h1", dist.Normal(x @ w1.T, self.s[0]).to_event(1))
            pyro.sample("h2", dist.Normal(h1 @ w2.T, self.s[1]).to_event(1))

    def guide(self, x):
        pyro.sample("w1", dist.Normal(self.M[0], self.S).to_event(2))
        pyro.sample("w2", dist.Normal(self.M[1], self.S).to_event(2))

    def local_reparam_conditional(self, site, parent, guide):
        m = self.M[0 if site == "h1" else 1]
        var = (parent**2).sum(1, keepdim=True) * self.S**2 + self.s[0 if site == "h1" else 1] ** 2
        return dist.Normal(parent @ m.T, var.sqrt().expand(-1, m.shape[0])).to_event(1)


@pytest.mark.slow
def test_bayesian_chain_conditional_mode_matches_per_draw_closed_form():
    m = BayesChain()
    x = _x(1000, 3, 31)
    df = layer_mi(m, x, guide=m.guide, weights="conditional", seed=0, n_weight_draws=4)
    per = df.attrs["per_draw"]
    # the per-draw truth: a linear-Gaussian chain with that draw's weights
    draws = df.attrs["weight_draws"]
    for di, wv in enumerate(draws):
        chain = LinearChain([3, 4, 3], m.s, 0)
        chain.A = [wv["w1"].double(), wv["w2"].double()]
        r = per[(per.draw == di) & (per.source == "X") & (per.target == "h2")].iloc[0]
        _check_row(r, *chain.reference(r, x, 100 + di))
    row = df[(df.source == "X") & (df.target == "h2")].iloc[0]
    assert bool(row.converged)


def test_conditional_mode_splits_the_queries_between_weight_draws():
    """Conditional mode: each weight draw's deep rows use a share of the queries (the
    shares cover every input), and each draw's X -> h2 value agrees with that draw's
    linear-Gaussian dataset MI within 3 combined standard errors plus its mc_bias."""
    from stochmi.layers.estimation import _query_sets

    sets = _query_sets(10, 4, torch.Generator().manual_seed(0))
    assert [len(q) for q in sets] == [10] * 4  # under 64 queries: every draw takes all
    sets = _query_sets(1000, 8, torch.Generator().manual_seed(0))
    assert [len(q) for q in sets] == [125] * 8
    assert len(torch.cat(sets).unique()) == 1000

    m = BayesChain()
    x = _x(600, 3, 33)
    df = layer_mi(m, x, guide=m.guide, weights="conditional", seed=0, n_weight_draws=4)
    assert df.attrs["queries_per_draw"] == 150
    per = df.attrs["per_draw"]
    for di, wv in enumerate(df.attrs["weight_draws"]):
        chain = LinearChain([3, 4, 3], m.s, 0)
        chain.A = [wv["w1"].double(), wv["w2"].double()]
        r = per[(per.draw == di) & (per.source == "X") & (per.target == "h2")].iloc[0]
        ref_value, ref_se = chain.dataset_mi_x(2, x, 200 + di)
        tol = 3 * math.hypot(r.stderr, ref_se) + r.mc_bias
        assert abs(r.value - ref_value) <= tol, (di, r.value, ref_value, tol)
        assert r.converged


@pytest.mark.slow
def test_deep_rows_on_a_random_subset_of_queries_stay_unbiased():
    """``n_queries`` below N: the deep row averages its per-query terms over that many
    random queries (each marginal still over all N sources).  It agrees with the exact
    dataset MI within 3 combined standard errors plus its mc_bias, its stderr counts the
    queries used (about twice the all-query stderr at a quarter of them), and the
    first-layer row, a direct density, is the same as with every query."""
    m = LinearChain([3, 4, 3], [0.5, 0.8], 2)
    x = _x(800, 3, 12)
    pairs = [("X", "h1"), ("X", "h2")]
    sub = layer_mi(m, x, seed=4, pairs=pairs, n_queries=200)
    full = layer_mi(m, x, seed=4, pairs=pairs, n_queries=None)
    assert sub.attrs["path_convergence"]["X->h2"]["queries"] == 200
    assert full.attrs["path_convergence"]["X->h2"]["queries"] == 800
    r = sub.iloc[1]
    _check_row(r, *m.reference(r, x, 102))
    # sqrt(800 / 200) = 2, up to the sampling error of the two standard deviations
    assert 1.5 < r.stderr / full.iloc[1].stderr < 2.7
    assert sub.iloc[0].value == full.iloc[0].value


def test_queries_subset_only_where_n_exceeds_it():
    """At N <= n_queries every input is a query and no draw is taken for the subset, so
    the numbers are those of ``n_queries=None``; the subset is sorted, without repeats,
    and the same for the same generator state."""
    from stochmi.layers.estimation import _deep_queries

    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    assert _deep_queries(100, 100, g) is None and _deep_queries(100, None, g) is None
    assert torch.equal(g.get_state(), state)
    rows = _deep_queries(1000, 300, g)
    assert len(rows) == 300 and len(rows.unique()) == 300
    assert torch.equal(rows, rows.sort().values)
    assert torch.equal(rows, _deep_queries(1000, 300, torch.Generator().manual_seed(5)))

    m = LinearChain([3, 4, 3], [0.5, 0.8], 2)
    x = _x(150, 3, 14)
    a = layer_mi(m, x, seed=6, pairs=[("X", "h2")], n_queries=150)
    b = layer_mi(m, x, seed=6, pairs=[("X", "h2")], n_queries=None)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ValueError, match="n_queries"):
        layer_mi(m, x, pairs=[("X", "h2")], n_queries=1)


def test_conditional_mode_shares_out_a_capped_set_of_queries():
    """With ``n_queries < N`` the weight draws' shares are cut from that many inputs."""
    from stochmi.layers.estimation import _query_sets

    sets = _query_sets(1000, 8, torch.Generator().manual_seed(0), 400)
    assert [len(q) for q in sets] == [64] * 8  # ceil(400 / 8) = 50, at least 64
    assert len(torch.cat(sets).unique()) == 400
    sets = _query_sets(5000, 4, torch.Generator().manual_seed(0), 2048)
    assert [len(q) for q in sets] == [512] * 4 and len(torch.cat(sets).unique()) == 2048
    same = _query_sets(1000, 8, torch.Generator().manual_seed(0))
    assert all(
        torch.equal(p, q)
        for p, q in zip(same, _query_sets(1000, 8, torch.Generator().manual_seed(0), 1000))
    )


def test_bayesian_chain_marginal_mode_deep_rows_converge_and_respect_dpi():
    m = BayesChain()
    x = _x(800, 3, 32)
    df = layer_mi(m, x, guide=m.guide, weights="marginal", seed=0)
    assert df.attrs["mode"] == "local_reparam"
    assert df["converged"].all()
    v = {(r.source, r.target): r for r in df.itertuples()}
    assert v[("X", "h2")].value <= v[("X", "h1")].value + 3 * v[("X", "h1")].stderr
    assert df.attrs["dpi"] == []


def test_data_processing_bounds_that_cross_are_reconciled():
    """Each bound holds in expectation only: when I(X;T)'s upper end falls below the
    label row's lower end (an I(X;T) near 0), the combined bracket stays ordered and no
    upper end is negative."""
    import pandas as pd

    from stochmi.layers.estimation import _combine_dpi_bounds

    df = pd.DataFrame(
        {
            "source": ["X", "X", "h1", "h2"],
            "target": ["h1", "h2", "Y", "Y"],
            "lower": [1.0, -0.01, 0.3, 0.04],
            "upper": [2.0, -0.002, 0.5, 0.09],
        }
    )
    _combine_dpi_bounds(df, ["h1", "h2"])
    assert (df["lower"] <= df["upper"]).all() and (df["upper"] >= 0).all()
    assert df.loc[1, "lower"] == 0.04 and df.loc[1, "upper"] == 0.04
    assert df.loc[0, "lower"] == 1.0 and df.loc[0, "upper"] == 2.0


def test_subsampled_sources_match_the_exact_marginal_density():
    """Sources subsampled per block (each query's best sources whole, a uniform random
    share for the rest, Horvitz-Thompson weights): the marginal density sum_i p(t_j | x_i)
    against the exact Gaussian values of a linear chain, and the dataset MI within 3
    standard errors plus its remaining bias as the estimator reports it (half-versus-full
    difference: the logarithm of the unbiased marginal is biased low by about half its
    relative variance)."""
    n = 800
    g, mu1, t1, t2, exact, link = _two_layer_linear(n, 0.4, 0.3, seed=3)
    kw = dict(n_is=32, n_fwd=16, generator=g, dtype=torch.float64)
    res = deep_log_density(mu1, torch.tensor(0.4), link, t2, [t1], n_top=8, n_random=64, **kw)
    assert res.n_sources < 0.5 * n  # the subsampled path ran
    assert torch.isinf(res.L).float().mean() > 0.4  # most entries were not evaluated
    # the marginal density of every query: unbiased, so the mean ratio is 1 within 3 se
    ratio = torch.exp(torch.logsumexp(res.L, 1) - torch.logsumexp(exact, 1))
    assert abs(float(ratio.mean()) - 1) < 3 * float(ratio.std()) / math.sqrt(n)
    f_est, _ = mi_terms_from_log_density(res.L)
    f_ex, _ = mi_terms_from_log_density(exact)
    f_half, _ = mi_terms_from_log_density(res.L_half)
    remaining = abs(float(f_half.mean() - f_est.mean()))
    diff = f_est - f_ex
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / math.sqrt(n) + remaining


def test_mean_path_score_ranks_the_sources_a_projecting_link_brings_together():
    """A 64-wide first layer with much noise read by a precise 16-wide query layer:
    sources far apart at layer 1 give nearly the same density to a query, which the
    layer-1 density of the query's own path cannot see and 16 forward paths per source
    estimate poorly.  Without the mean-path score, each query's 16 ranked sources miss
    about two in five of its 8 most likely other sources (closed form); interleaved with
    its ranking they hold far more of them and of the other sources' mass."""
    n, d1, d2, s1, s2 = 600, 64, 16, 0.8, 0.2
    g = torch.Generator().manual_seed(0)
    a1 = torch.randn(d1, 6, generator=g, dtype=torch.float64) / math.sqrt(6)
    a2 = torch.randn(d2, d1, generator=g, dtype=torch.float64) / math.sqrt(d1)
    mu1 = torch.randn(n, 6, generator=g, dtype=torch.float64) @ a1.T
    t1 = mu1 + s1 * torch.randn(mu1.shape, generator=g, dtype=torch.float64)
    t2 = t1 @ a2.T + s2 * torch.randn(n, d2, generator=g, dtype=torch.float64)
    cov = s1**2 * a2 @ a2.T + s2**2 * torch.eye(d2, dtype=torch.float64)
    exact = torch.distributions.MultivariateNormal(
        torch.zeros(d2, dtype=torch.float64), cov
    ).log_prob(t2[:, None, :] - (mu1 @ a2.T)[None])
    exact.fill_diagonal_(-math.inf)
    links = [lambda p: dist.Normal(p @ a2.T, s2).to_event(1)]
    scale = torch.full((n, d1), s1, dtype=torch.float64)
    pb = deep._Problem(mu1, scale, links, t2, torch.Generator().manual_seed(1), torch.float64)
    pool = deep._Pool(pb, 16)
    rows = torch.arange(n)
    log_g = pool.fin(pb.t, low=True)
    best = torch.topk(exact, 8, 1).indices
    weight = torch.softmax(exact, 1)  # each query's share of the other sources' mass
    found, mass = {}, {}
    for name, score in (("without", None), ("with", deep._MeanPathScore(pb))):
        top = deep._rank_sources(pb, pool, [t1], rows, log_g, 16, score)
        assert not bool((top == rows[:, None]).any())  # never the query's own source
        assert not bool((top.sort(1).values.diff(dim=1) == 0).any())  # 16 distinct sources
        found[name] = float((best[:, :, None] == top[:, None, :]).any(2).float().mean())
        mass[name] = float(weight.gather(1, top).sum(1).mean())
    assert found["without"] <= 0.7  # the chain is one where the first ranking misses
    assert found["with"] >= found["without"] + 0.15
    assert mass["with"] >= mass["without"] + 0.1


@pytest.mark.slow
def test_bridged_factors_gathered_one_source_at_a_time_give_the_same_densities(monkeypatch):
    """With subsampled sources a block reads its sources' bridged factors a chunk at a
    time (``_GATHER_ELEMS``): chunks of one source give the densities of chunks of all
    of them, with and without strata, up to rounding: products of other shapes sum in
    another order, so the entries may differ within the rounding error the estimator
    accepts for its kernel rows (``_F32_TOL``); a source read in the wrong place moves
    them by far more."""
    from stochmi.layers import deep

    n = 300
    y = torch.arange(n) % 3
    for strata in (None, y):
        out = []
        for elems in (deep._GATHER_ELEMS, 1):
            monkeypatch.setattr(deep, "_GATHER_ELEMS", elems)
            g, mu1, t1, t2, _, link = _two_layer_linear(n, 0.4, 0.3, seed=5)
            kw = dict(n_is=8, n_fwd=8, n_bridge=2, generator=g, dtype=torch.float64)
            kw.update(n_top=2, n_random=8, strata=strata)
            out.append(deep_log_density(mu1, torch.tensor(0.4), link, t2, [t1], **kw))
        full, one = out
        assert full.n_sources < 0.5 * n  # subsampled
        for a, b in ((full.L, one.L), (full.L_half, one.L_half)):
            assert torch.equal(torch.isinf(a), torch.isinf(b))
            fin = torch.isfinite(a)
            assert float((a[fin] - b[fin]).abs().max()) < deep._F32_TOL


def test_random_share_stratified_by_class_keeps_the_class_sums_unbiased_and_tighter():
    """With ``strata`` (9 classes by a layer-1 coordinate, one of them smaller than the
    per-class share and so taken whole), the random share draws from each block's own
    class separately: the class-conditional sums
    ``sum_{i: y_i = y_j} p(t_j | x_i)`` and the marginal ones stay unbiased against the
    exact Gaussian values, and the error of the log class sums has under half the
    variance of the uniform share's, drawn from the same chain."""
    n = 800
    g, mu1, t1, t2, exact, link = _two_layer_linear(n, 0.4, 0.3, seed=3)
    edges = torch.quantile(mu1[:, 0], torch.linspace(0, 1, 9, dtype=torch.float64)[1:-1])
    y = torch.bucketize(mu1[:, 0].contiguous(), edges)
    y[torch.nonzero(y == 7)[:20, 0]] = 8  # a class of 20, under m = 32: taken whole
    same = y[:, None] == y[None, :]

    def class_sums(L):
        return torch.logsumexp(L.masked_fill(~same, -math.inf), 1)

    kw = dict(n_is=32, n_fwd=16, generator=g, dtype=torch.float64, n_top=8, n_random=64)
    err = {}
    for name, strata in (("uniform", None), ("stratified", y)):
        res = deep_log_density(mu1, torch.tensor(0.4), link, t2, [t1], strata=strata, **kw)
        assert res.n_sources < 0.5 * n  # the subsampled path ran
        err[name] = class_sums(res.L) - class_sums(exact)
        if strata is None:
            continue
        for e in (err[name], torch.logsumexp(res.L, 1) - torch.logsumexp(exact, 1)):
            ratio = torch.exp(e)
            assert abs(float(ratio.mean()) - 1) < 3 * float(ratio.std()) / math.sqrt(n)
    assert float(err["stratified"].var()) < 0.5 * float(err["uniform"].var())
    with pytest.raises(ValueError, match="strata"):
        deep_log_density(mu1, torch.tensor(0.4), link, t2, [t1], strata=y[:-1], **kw)


@pytest.mark.parametrize("kw", [{"n_top": 0}, {"n_random": 3}, {"n_random": 0}])
def test_bad_subsampling_settings_are_refused(kw):
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(10, 2, generator=g, dtype=torch.float64)
    link = [lambda p: dist.Normal(p, 0.5).to_event(1)]
    with pytest.raises(ValueError, match="n_top must be"):
        deep_log_density(loc, torch.tensor(0.5), link, loc, [loc], generator=g, **kw)


def test_link_jacobian_falls_back_to_one_backward_pass_per_row(monkeypatch):
    """When the batched backward pass fails (an op without a batching rule, or memory),
    the Jacobian comes from one backward pass per output row, with the same values."""
    from stochmi.layers import deep

    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 5, generator=g, dtype=torch.float64)
    (link,) = [lambda p: dist.Normal(torch.tanh(p @ w.T), 0.5).to_event(1)]
    p = torch.randn(4, 5, generator=g, dtype=torch.float64)
    batched = deep._link_jacobian(link, p)[2]
    real_grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):  # run one pass as a failing call may, then fail
            first = kwargs["grad_outputs"][0]
            real_grad(*args, grad_outputs=first, retain_graph=kwargs.get("retain_graph"))
            raise RuntimeError("batching rule not implemented")
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(deep.torch.autograd, "grad", no_batching)
    per_row = deep._link_jacobian(link, p)[2]
    expected = (1 - torch.tanh(p @ w.T) ** 2)[:, :, None] * w[None]
    assert torch.allclose(batched, expected) and torch.allclose(per_row, expected)


def _storages(obj, seen):
    """Distinct tensor storages reachable from ``obj`` (lists, tuples, attributes;
    the shared problem ``pb`` left out): ``{data_ptr: nbytes}``."""
    if torch.is_tensor(obj):
        seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    elif isinstance(obj, list | tuple):
        for v in obj:
            _storages(v, seen)
    elif hasattr(obj, "__dict__"):
        for k, v in vars(obj).items():
            if k != "pb":
                _storages(v, seen)
    return seen


@pytest.mark.parametrize("widths, chunk", [([5, 6, 4, 3], None), ([5, 6, 4, 3], 7), ([5, 9, 2], 4)])
def test_bridge_memory_model_counts_every_tensor_the_bridge_keeps(widths, chunk):
    """The held part of ``bridge_bytes`` is the exact size of the bridged factors, built
    in one piece or chunk by chunk of sources; the chunks give the same factors."""
    from stochmi.layers import deep

    g = torch.Generator().manual_seed(0)
    n, k, n_br = 23, 4, 6
    links = _tanh_links(widths, [1.5] * (len(widths) - 1), [0.7] * (len(widths) - 1), 1)
    loc1 = torch.randn(n, widths[0], generator=g, dtype=torch.float64)
    tq = torch.randn(n, widths[-1], generator=g, dtype=torch.float64)
    scale = torch.full((n, widths[0]), 0.8, dtype=torch.float64)

    def build(c):
        pb = deep._Problem(loc1, scale, links, tq, torch.Generator().manual_seed(1), torch.float64)
        return deep._Bridge(pb, n_br, deep._Pool(pb, k), chunk=c)

    bridge = build(chunk)
    held = sum(_storages(bridge, {}).values())
    assert held == deep._bridge_held_bytes(n, widths[:-1], widths[-1], n_br, k)
    whole = build(None)
    for name in ("zeta", "stack", "log_r", "pool_v", "pool_quad", "wgp0_a"):
        a, b = getattr(bridge, name), getattr(whole, name)
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.allclose(u, v, rtol=1e-12, atol=1e-12), name


def test_bridged_round_that_would_not_fit_in_memory_is_replaced_by_unbridged_rounds(monkeypatch):
    """A row whose first round misses the tolerance goes on to the bridged round, unless
    that round would need more than 9/10 of the memory available: then the row goes on
    with fresh unbridged forward paths pooled with its first round, says why (a warning
    and ``path_convergence[...]["stopped"]``) and is flagged where that does not
    converge (here the sources are apart at layer 1, which without pair sources only
    the bridge reaches)."""
    from stochmi.layers import estimation

    monkeypatch.setattr(deep, "_PAIR_SOURCES", 0)
    m = LinearChain([20, 96, 64], [1.0, 1.0], 3)  # sources apart at layer 1 (see above)
    m.A = [a * 0.6 for a in m.A]
    x = _x(150, 20, 13)
    kw = dict(seed=1, pairs=[("X", "h2")], max_effort=2)
    need = deep.bridge_bytes(150, [96], 64, n_bridge=4, n_fwd=32)  # effort 2 of 16 paths
    monkeypatch.setattr(estimation, "memory_budget", lambda device: need - 1)
    with pytest.warns(RuntimeWarning, match="bridged round"):
        df = layer_mi(m, x, **kw)
    r, conv = df.iloc[0], df.attrs["path_convergence"]["X->h2"]
    assert not r.converged and r.k_paths == 32 and "GiB" in conv["stopped"]
    assert conv["n_bridge"] == 0
    monkeypatch.setattr(estimation, "memory_budget", lambda device: need)
    df = layer_mi(m, x, **kw)  # fits: the bridged rounds run up to max_effort
    assert df.iloc[0].k_paths == 32 and "stopped" not in df.attrs["path_convergence"]["X->h2"]


def test_posterior_sd_removes_the_per_draw_monte_carlo_variance():
    """Per-draw estimates = the draw's true MI (sd 0.3 over the posterior) + Monte Carlo
    noise of known sd 0.4: the sd over draws is 0.5, the posterior sd 0.3 (within 3 of
    its standard errors, about sd / sqrt(2 n) for the variance estimate)."""
    import pandas as pd

    from stochmi.layers.estimation import _posterior_sd

    g = torch.Generator().manual_seed(5)
    n = 4000
    true = 1.0 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    values = pd.Series((true + 0.4 * torch.randn(n, generator=g, dtype=torch.float64)).numpy())
    stderrs = pd.Series([0.4] * n)
    sd = _posterior_sd(values, stderrs)
    se_var = 0.5**2 * math.sqrt(2 / n)  # standard error of the sample variance
    assert abs(sd**2 - 0.3**2) <= 3 * se_var
    assert abs(float(values.std()) - 0.5) < 0.02  # the raw sd over draws is not it
    assert math.isnan(_posterior_sd(values[:1], stderrs[:1]))
    assert _posterior_sd(pd.Series([1.0, 1.1]), pd.Series([1.0, 1.0])) == 0.0


def _own_chain(nonlinear: bool, q: int, seed: int):
    """A 3-4-2 chain with queries drawn from their own sources, and ``log p(t | s)`` by
    averaging 10^5 forward paths (float64)."""
    g = torch.Generator().manual_seed(seed)
    w2, w3 = torch.randn(4, 3, generator=g).double(), torch.randn(2, 4, generator=g).double()
    act = torch.tanh if nonlinear else (lambda a: a)

    def link2(p):
        return dist.Normal(act(p) @ w2.T, 0.3).to_event(1)

    def link3(p):
        return dist.Normal(act(p) @ w3.T, 0.2).to_event(1)

    loc1 = 2 * torch.randn(q, 3, generator=g).double()
    t1 = loc1 + 0.7 * torch.randn(q, 3, generator=g).double()
    t2 = t1.tanh() @ w2.T if nonlinear else t1 @ w2.T
    t2 = t2 + 0.3 * torch.randn(q, 4, generator=g).double()
    t3 = act(t2) @ w3.T + 0.2 * torch.randn(q, 2, generator=g).double()
    truth = []
    for j in range(q):
        z1 = loc1[j] + 0.7 * torch.randn(100_000, 3, generator=g).double()
        z2 = act(z1) @ w2.T + 0.3 * torch.randn(100_000, 4, generator=g).double()
        lp = dist.Normal(act(z2) @ w3.T, 0.2).to_event(1).log_prob(t3[j])
        truth.append(torch.logsumexp(lp, 0) - math.log(len(lp)))
    return loc1, [link2, link3], t3, [t1, t2], torch.stack(truth)


@pytest.mark.parametrize("nonlinear", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_own_log_density_brackets_the_density(nonlinear):
    """value is unbiased for the density (E log <= log p) and upper, with the query's own
    path among the draws, is above log p in expectation; for a linear chain the proposal
    linearised at the mean path is the exact posterior, so both are exact."""
    loc1, links, t, paths, truth = _own_chain(nonlinear, 150, seed=3)
    res = own_log_density(
        loc1, torch.full_like(loc1, 0.7), links, t, mean_path(loc1, links, torch.float64),
        paths=paths, generator=torch.Generator().manual_seed(4), dtype=torch.float64,
    )  # fmt: skip
    for est, sign in ((res.value, -1), (res.upper, 1), (res.half, -1)):
        diff = est - truth
        se = float(diff.std()) / math.sqrt(len(diff))
        if not nonlinear:  # only the brute force's own error is left
            assert abs(float(diff.mean())) < 0.01
        else:  # on the right side of the truth, or within 3 se of it
            assert sign * float(diff.mean()) > -3 * se
