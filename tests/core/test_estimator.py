"""Tests of stochmi.core.estimator: mi_from_conditional and mi_with_labels.

Truths come from closed forms (linear-Gaussian channels) or from quadrature of
1-D mixture entropies; every tolerance is a multiple ``Z`` of a reported standard
error (plus, where the estimand differs from the truth, the reported bracket width).
All seeds are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import math

import pyro.distributions as pdist
import pytest
import torch
from torch import distributions as td

import stochmi
from stochmi.core.bounds import pairwise_bounds
from stochmi.core.closed_form import gaussian_mi_from_cov, linear_gaussian_mi
from stochmi.core.kernel import DeterministicLayerError
from tests.helpers import gen as _gen
from tests.helpers import load_textbook

#: number of standard errors allowed (P(|N(0,1)| > 4) = 6e-5 per assertion)
Z = 4.0
F64 = torch.float64


textbook = load_textbook()


# --------------------------------------------------------------------------- helpers
def _scaled_map(d_t: int, d_x: int, sigma: float, target: float, seed: int) -> torch.Tensor:
    """A random (d_t, d_x) matrix rescaled so that I(X; AX + sigma Z) = target.

    I(c A) = 0.5 sum_k log(1 + c^2 lambda_k / sigma^2) over the eigenvalues of A A^T;
    the gain c is found by bisection on that sum (the test then checks the closed form).
    """
    a0 = torch.randn(d_t, d_x, generator=_gen(seed), dtype=F64) / math.sqrt(d_x)
    lam = [float(v) for v in torch.linalg.eigvalsh(a0 @ a0.T).clamp(min=0.0)]

    def mi(c):
        return 0.5 * sum(math.log1p(c * c * v / sigma**2) for v in lam)

    lo, hi = 1e-6, 1e6
    for _ in range(200):  # MI is increasing in the gain
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if mi(mid) < target else (lo, mid)
    return math.sqrt(lo * hi) * a0


def _linear_gaussian_channel(d_t, d_x, sigma, target, n, seed):
    a = _scaled_map(d_t, d_x, sigma, target, seed)
    x = torch.randn(n, d_x, generator=_gen(seed + 1), dtype=F64)
    return td.Independent(td.Normal(x @ a.T, sigma), 1), linear_gaussian_mi(a, 1.0, sigma)


def _sinh_grid(
    lo_core: float, hi_core: float, reach: float, n_grid: int, kinks: torch.Tensor | None = None
) -> torch.Tensor:
    """Grid dense around [lo_core, hi_core] and geometric in the tails out to +-reach.

    ``kinks`` (points where a density is not differentiable, e.g. Laplace locations) are
    added to the grid so the trapezoid rule keeps its O(h^2) accuracy there.
    """
    c = 0.5 * (lo_core + hi_core)
    half = 0.5 * (hi_core - lo_core)
    u = torch.linspace(-math.asinh(reach), math.asinh(reach), n_grid, dtype=F64)
    core = torch.linspace(-half, half, n_grid, dtype=F64)
    extra = kinks.reshape(-1).to(F64) if kinks is not None else torch.zeros(0, dtype=F64)
    return torch.unique(torch.cat([c + torch.sinh(u), c + core, extra]))


def _dataset_mi_by_quadrature(cond: td.Distribution, grid: torch.Tensor) -> float:
    """h(mixture) - mean_i h(p_i) for a 1-D conditional with batch (N,), by the trapezoid rule.

    Checks that every component and the mixture integrate to 1 within 1e-5, so the
    range and resolution of ``grid`` are adequate (the entropy error is then O(1e-5),
    far below the Monte Carlo errors it is compared with).
    """
    lps = [cond.log_prob(grid[s : s + 2000, None]).to(F64) for s in range(0, grid.numel(), 2000)]
    lp = torch.cat(lps)  # (G, N)
    n = lp.shape[1]

    def neg_plogp(l):
        p = l.exp()
        return p, torch.where(p > 0, -p * l, torch.zeros_like(p))

    p, f = neg_plogp(lp)
    mass_i = torch.trapezoid(p, grid, dim=0)
    h_i = torch.trapezoid(f, grid, dim=0)
    lm = torch.logsumexp(lp, 1) - math.log(n)
    pm, fm = neg_plogp(lm)
    mass = torch.trapezoid(pm, grid)
    assert float((mass_i - 1).abs().max()) < 1e-5, "quadrature grid misses mass"
    assert abs(float(mass) - 1) < 1e-5, "quadrature grid misses mass"
    return float(torch.trapezoid(fm, grid) - h_i.mean())


# --------------------------------------------------------------------------- linear Gaussian
LG_N = 1000
LG_CASES = [
    # (d_t, d_x, target MI in nats)
    (1, 1, 0.1),
    (1, 1, 2.0),
    (2, 2, 1.0),
    (3, 3, 4.0),
    (10, 10, 1.0),
    (10, 10, 3.5),
    (20, 5, 2.0),
    (50, 50, 3.0),
    (100, 100, 0.1),
    (100, 100, 2.0),
    (5, 5, 12.0),  # beyond log N = 6.9
    (100, 100, 15.0),  # beyond log N, high dimension
]


@pytest.mark.parametrize("d_t,d_x,target", LG_CASES)
def test_linear_gaussian_bracket_contains_population_mi(d_t, d_x, target):
    seed = 10 * d_t + int(target * 10)
    cond, truth = _linear_gaussian_channel(d_t, d_x, 0.5, target, LG_N, seed)
    assert truth == pytest.approx(target, rel=1e-9)
    est = stochmi.mi_from_conditional(cond, seed=seed)
    log_n = math.log(LG_N)
    assert est.n == LG_N and est.n_draws == 1 and est.extra["fast_path"]
    # the bracket holds in expectation over the sources; here for one fixed draw of them
    assert est.lower - Z * est.lower_stderr <= truth <= est.upper + Z * est.upper_stderr
    assert est.lower <= est.upper
    if truth < log_n - 3:
        # the value estimates the dataset MI: inside its deterministic pairwise-distance
        # bounds (Kolchinsky-Tracey, from the channel's means and scale) within Z stderr
        kt_lo, kt_hi = pairwise_bounds(cond.mean, cond.stddev)
        assert kt_lo - Z * est.stderr <= est.value <= kt_hi + Z * est.stderr
        assert est.upper - est.lower < 0.25 * max(truth, 1.0)  # the bracket is informative
        assert not est.saturated
    if truth > log_n:
        assert est.saturated
        assert est.value > log_n - 0.1  # pinned at the ceiling


# --------------------------------------------------------------------------- quadrature truths
QN = 200


def _sources(seed=5):
    return 2.0 * torch.randn(QN, generator=_gen(seed), dtype=F64)


def _mix_logits(seed):
    return torch.randn(QN, 2, generator=_gen(seed), dtype=F64)


def _quad_cases():
    s = _sources()
    two = torch.stack([s - 1.0, s + 1.0], 1)
    comp_scale = torch.tensor([0.3, 0.7], dtype=F64).expand(QN, 2)
    hetero = 0.2 + torch.rand(QN, generator=_gen(6), dtype=F64)
    return {
        # name: (cond, expect fast path, reach of the quadrature grid); kinks: see _kinks
        "normal": (td.Normal(s, 0.5), True, 30.0),
        "normal_heteroscedastic": (td.Normal(s, hetero), True, 30.0),
        "laplace": (td.Laplace(s, 0.5), False, 60.0),
        "student_t": (td.StudentT(5.0, s, 0.5), False, 4000.0),
        "mixture_normal": (
            td.MixtureSameFamily(td.Categorical(logits=_mix_logits(7)), td.Normal(two, comp_scale)),
            True,
            30.0,
        ),
        "mixture_laplace": (
            td.MixtureSameFamily(
                td.Categorical(logits=_mix_logits(8)), td.Laplace(two, comp_scale)
            ),
            False,
            60.0,
        ),
    }


@pytest.mark.parametrize("name", list(_quad_cases()))
def test_dataset_mi_matches_quadrature(name):
    cond, fast, reach = _quad_cases()[name]
    s = _sources()
    kinks = {"laplace": s, "mixture_laplace": torch.stack([s - 1.0, s + 1.0])}.get(name)
    grid = _sinh_grid(float(s.min()) - 4, float(s.max()) + 4, reach, 8001, kinks)
    truth = _dataset_mi_by_quadrature(cond, grid)
    est = stochmi.mi_from_conditional(cond, n_draws=40, seed=11)
    assert est.extra["fast_path"] is fast
    assert est.n_draws == 40
    assert abs(est.value - truth) <= Z * est.stderr
    assert est.stderr < 0.05


def test_value_stderr_tracks_monte_carlo_error_with_draws():
    """The reported stderr of the dataset MI should be its Monte Carlo error given the sources.

    Measured directly as the spread of ``value`` over independent seeds (same sources).
    A stderr of sd(per-source means)/sqrt(N) would keep the between-source spread and stop
    shrinking with n_draws (a ratio near 2.7 at 10 draws).
    """
    cond = td.Normal(_sources(), 0.5)
    ests = [stochmi.mi_from_conditional(cond, n_draws=10, seed=k) for k in range(30)]
    values = torch.tensor([e.value for e in ests], dtype=F64)
    stderr = torch.tensor([e.stderr for e in ests], dtype=F64)
    ratio = float(stderr.median() / values.std())
    # 30 seeds estimate the sd within ~13 % (1 sd); a factor of 2 either way is far outside
    assert 0.5 < ratio < 2.0, f"reported stderr / actual seed-to-seed sd = {ratio:.2f}"


# --------------------------------------------------------------------------- exact cases
@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("n_draws", [1, 3])
def test_duplicated_well_separated_inputs_give_log_m(family, n_draws):
    m, reps, d, sigma = 10, 30, 3, 0.1
    centers = 100.0 * sigma * torch.randn(m, d, generator=_gen(3), dtype=F64)
    # separation >> sigma: check it, so the truth is log M up to exp(-gap^2/(8 sigma^2))
    gaps = torch.cdist(centers, centers) + torch.eye(m, dtype=F64) * 1e9
    assert float(gaps.min()) > 40 * sigma
    loc = centers.repeat(reps, 1)  # (M * reps, d)
    base = td.Normal(loc, sigma) if family == "normal" else td.Laplace(loc, sigma)
    est = stochmi.mi_from_conditional(td.Independent(base, 1), n_draws=n_draws, seed=0)
    assert est.value == pytest.approx(math.log(m), abs=1e-6)
    assert est.stderr < 1e-6
    # leave-one-out keeps reps - 1 duplicates among N - 1 sources
    assert est.upper == pytest.approx(math.log((m * reps - 1) / (reps - 1)), abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("structure", ["shared", "per_dim", "iso", "diag"])
def test_large_magnitude_small_noise_matches_exact_reference(dtype, structure):
    n, d, sigma = 400, 6, 1e-2
    g = _gen(21)
    centers = 100.0 + torch.randn(8, d, generator=g, dtype=F64)
    # clusters O(1) apart, members 1.5 sigma apart: MI strictly between log 8 and log N
    loc = centers[torch.arange(n) % 8] + 1.5 * sigma * torch.randn(n, d, generator=g, dtype=F64)
    u = 0.5 + torch.rand(n, d, generator=g, dtype=F64)
    scale = {
        "shared": torch.tensor(sigma, dtype=F64),
        "per_dim": sigma * u[0],
        "iso": sigma * u[:, :1].expand(n, d),
        "diag": sigma * u,
    }[structure]
    cond = td.Independent(td.Normal(loc.to(dtype), scale.to(dtype)), 1)
    est = stochmi.mi_from_conditional(cond, n_draws=2, seed=1)
    t = textbook.estimator_draws(cond, 2, 1).reshape(2 * n, d)
    ref = textbook.gaussian_log_prob_direct(loc.to(dtype), scale.to(dtype), t)
    value, upper = textbook.mi_from_matrix(ref, 2)
    assert math.log(8) + 0.5 < value < math.log(n) - 0.2  # not saturated, not trivial
    assert est.value == pytest.approx(value, rel=1e-6)
    assert est.upper == pytest.approx(upper, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_magnitude_well_separated_gives_log_n(dtype):
    n, d, sigma = 500, 4, 1e-2
    loc = 100.0 + torch.randn(n, d, generator=_gen(4), dtype=F64)
    nn = torch.cdist(loc, loc) + 1e9 * torch.eye(n, dtype=F64)
    assert float(nn.min()) > 8 * sigma  # closest pair 8 sigma apart: overlap < exp(-8)/N
    est = stochmi.mi_from_conditional(td.Independent(td.Normal(loc.to(dtype), sigma), 1), seed=2)
    assert est.value == pytest.approx(math.log(n), abs=1e-4)
    assert est.saturated


# --------------------------------------------------------------------------- chunking, seeds
def _chunk_conds():
    n = 60
    g = _gen(9)
    loc = torch.randn(n, 3, generator=g, dtype=F64)
    return n, {
        "fast": td.Independent(td.Normal(loc, 0.7), 1),
        "fast_diag": td.Independent(td.Normal(loc, 0.3 + torch.rand(n, 3, generator=g)), 1),
        "mixture": td.MixtureSameFamily(
            td.Categorical(logits=torch.randn(n, 2, generator=g, dtype=F64)),
            td.Independent(td.Normal(torch.stack([loc, loc + 1], 1), 0.5), 1),
        ),
        "generic": td.Independent(td.Laplace(loc, 0.7), 1),
    }


@pytest.mark.parametrize("kind", ["fast", "fast_diag", "mixture", "generic"])
def test_result_independent_of_chunk_size(kind):
    n, conds = _chunk_conds()
    cond = conds[kind]
    ests = [stochmi.mi_from_conditional(cond, n_draws=2, seed=5, chunk_size=c) for c in (1, 7, n)]
    for e in ests[1:]:
        for field in ("value", "stderr", "upper", "upper_stderr"):
            assert getattr(e, field) == pytest.approx(getattr(ests[0], field), abs=1e-10)
    assert ests[0].extra["chunk_size"] == 1 and ests[1].extra["chunk_size"] == 7


def test_labels_result_independent_of_chunk_size():
    n, conds = _chunk_conds()
    y = torch.arange(n) % 3
    ests = [stochmi.mi_with_labels(conds["fast"], y, seed=5, chunk_size=c) for c in (1, 7, n)]
    for e in ests[1:]:
        for field in ("value", "lower", "upper"):
            assert getattr(e, field) == pytest.approx(getattr(ests[0], field), abs=1e-10)


@pytest.mark.parametrize("kind", ["fast", "mixture", "generic"])
def test_seeds_reproducible_and_global_rng_untouched(kind):
    _, conds = _chunk_conds()
    cond = conds[kind]
    state = torch.get_rng_state()
    a = stochmi.mi_from_conditional(cond, seed=123)
    b = stochmi.mi_from_conditional(cond, seed=123)
    c = stochmi.mi_from_conditional(cond, seed=124)
    lab = stochmi.mi_with_labels(cond, torch.arange(cond.batch_shape[0]) % 2, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert lab.extra["seed"] == 3
    assert a.as_dict() == b.as_dict()
    assert a.extra["seed"] == 123
    assert a.value != c.value
    # an omitted seed is drawn from OS entropy (not the global RNG) and recorded
    d = stochmi.mi_from_conditional(cond)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(d.extra["seed"], int)
    again = stochmi.mi_from_conditional(cond, seed=d.extra["seed"])
    assert again.value == d.value


# --------------------------------------------------------------------------- errors
def test_rejects_non_distribution():
    with pytest.raises(TypeError, match="Distribution"):
        stochmi.mi_from_conditional(torch.randn(10, 3))


def test_rejects_single_source():
    with pytest.raises(ValueError, match="at least two"):
        stochmi.mi_from_conditional(td.Independent(td.Normal(torch.zeros(1, 3), 1.0), 1))


def test_rejects_batch_shape_without_event():
    with pytest.raises(ValueError, match="batch shape"):
        stochmi.mi_from_conditional(td.Normal(torch.zeros(10, 3), 1.0))


def test_rejects_event_of_rank_two():
    with pytest.raises(ValueError, match="event shape"):
        stochmi.mi_from_conditional(td.Independent(td.Normal(torch.zeros(10, 3, 4), 1.0), 2))


def test_rejects_nan_loc():
    loc = torch.zeros(10, 3)
    loc[2, 1] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        stochmi.mi_from_conditional(
            td.Independent(td.Normal(loc, 1.0, validate_args=False), 1), seed=0
        )
    # with argument validation on, torch itself refuses: still a ValueError
    with pytest.raises(ValueError):
        stochmi.mi_from_conditional(td.Independent(td.Normal(loc, 1.0), 1), seed=0)


def test_rejects_inf_scale():
    scale = torch.ones(10, 3)
    scale[0, 0] = math.inf
    with pytest.raises(ValueError, match="inf"):
        stochmi.mi_from_conditional(td.Independent(td.Normal(torch.zeros(10, 3), scale), 1))


@pytest.mark.parametrize("where", ["one", "all"])
def test_zero_scale_explains_infinite_mi(where):
    scale = torch.ones(10, 3)
    if where == "one":
        scale[4, 2] = 0.0
    else:
        scale.zero_()
    cond = td.Independent(td.Normal(torch.randn(10, 3), scale, validate_args=False), 1)
    with pytest.raises(ValueError, match="infinite") as info:
        stochmi.mi_from_conditional(cond, seed=0)
    assert isinstance(info.value, DeterministicLayerError)
    assert "noise" in str(info.value)


@pytest.mark.parametrize("to_event", [False, True])
def test_delta_distribution_is_deterministic(to_event):
    v = torch.randn(10, 3)
    cond = pdist.Delta(v).to_event(1) if to_event else pdist.Delta(v[:, 0])
    with pytest.raises(ValueError, match="infinite"):
        stochmi.mi_from_conditional(cond, seed=0)


@pytest.mark.parametrize("n_draws", [0, -1, 1.5, True])
def test_rejects_bad_n_draws(n_draws):
    with pytest.raises(ValueError, match="n_draws"):
        stochmi.mi_from_conditional(td.Normal(torch.zeros(10), 1.0), n_draws=n_draws)


@pytest.mark.parametrize("seed", [1.0, "3", True])
def test_rejects_bad_seed_type(seed):
    with pytest.raises(TypeError, match="seed"):
        stochmi.mi_from_conditional(td.Normal(torch.zeros(10), 1.0), seed=seed)


def test_rejects_bad_labels():
    cond = td.Normal(torch.zeros(10), 1.0)
    with pytest.raises(ValueError, match="shape"):
        stochmi.mi_with_labels(cond, torch.zeros(9, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        stochmi.mi_with_labels(cond, torch.zeros(10, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        stochmi.mi_with_labels(cond, torch.zeros(10))


def test_bounds_option_needs_single_gaussian():
    with pytest.raises(ValueError, match="Gaussian"):
        stochmi.mi_from_conditional(td.Laplace(torch.zeros(10), 1.0), seed=0, bounds=True)


# --------------------------------------------------------------------------- labels
def _two_class_channel(n=300, seed=2):
    g = _gen(seed)
    y = (torch.rand(n, generator=g) < 0.35).long()
    s = torch.where(y == 1, 1.0, -1.0).to(F64) + 0.8 * torch.randn(n, generator=g, dtype=F64)
    return s, y


def test_label_mi_matches_quadrature():
    s, y = _two_class_channel()
    sigma = 0.6
    grid = _sinh_grid(float(s.min()) - 4, float(s.max()) + 4, 30.0, 8001)

    def mixture_entropy(idx):
        lp = td.Normal(s[idx], sigma).log_prob(grid[:, None])
        lm = torch.logsumexp(lp, 1) - math.log(len(idx))
        assert abs(float(torch.trapezoid(lm.exp(), grid)) - 1) < 1e-6
        return float(torch.trapezoid(-lm.exp() * lm, grid))

    p1 = float(y.to(F64).mean())
    h_t = mixture_entropy(torch.arange(len(y)))
    h_t_y = sum(
        p * mixture_entropy(torch.nonzero(y == k).squeeze(1)) for k, p in ((0, 1 - p1), (1, p1))
    )
    truth = h_t - h_t_y
    h_y = -(p1 * math.log(p1) + (1 - p1) * math.log(1 - p1))
    est = stochmi.mi_with_labels(td.Normal(s, sigma), y, n_draws=20, seed=4)
    assert abs(est.value - truth) <= Z * est.stderr
    assert est.extra["label_entropy"] == pytest.approx(h_y, rel=1e-12)
    assert est.extra["n_classes"] == 2
    assert est.upper <= h_y + 1e-12
    # lower is a population bound (Barber-Agakov with a leave-one-out classifier)
    assert est.lower - Z * est.lower_stderr <= est.value
    assert est.value <= est.upper + Z * est.upper_stderr
    assert est.lower > 0.5 * truth  # the bound is informative here


def test_label_bracket_contains_population_truth_and_upper_is_tight():
    """Population truth: Y ~ Bernoulli(0.35), S | Y ~ N(+-1, 0.8^2), T | S ~ N(S, 0.6^2),
    so T | Y ~ N(+-1, 1) and I(T;Y) = h(T) - h(T|Y) by quadrature.  Over independent
    data sets the bracket holds in expectation; the upper end (chain rule
    I(S;T) - I(S;T|Y)) sits far below the data-processing one, I(S;T)."""
    grid = torch.linspace(-12, 12, 24001, dtype=F64)
    p1 = 0.35
    dens = p1 * td.Normal(1.0, 1.0).log_prob(grid).exp() + (1 - p1) * td.Normal(
        -1.0, 1.0
    ).log_prob(grid).exp()
    h_t = float(torch.trapezoid(-dens * torch.log(dens), grid))
    truth = h_t - 0.5 * math.log(2 * math.pi * math.e)
    ups, los, dpi = [], [], []
    for seed in range(6):
        s, y = _two_class_channel(n=600, seed=10 + seed)
        est = stochmi.mi_with_labels(td.Normal(s, 0.6), y, n_draws=4, seed=seed)
        st = stochmi.mi_from_conditional(td.Normal(s, 0.6), n_draws=4, seed=seed)
        ups.append(est.upper)
        los.append(est.lower)
        dpi.append(st.upper)
    ups, los = torch.tensor(ups), torch.tensor(los)
    assert float(ups.mean()) >= truth - Z * float(ups.std()) / math.sqrt(len(ups))
    assert float(los.mean()) <= truth + Z * float(los.std()) / math.sqrt(len(los))
    assert max(u - truth for u in ups.tolist()) < 0.5 * (min(dpi) - truth)


def test_label_upper_terms_from_matrix_match_their_formula():
    """label_bounds_from_log_density's upper terms against an explicit loop."""
    from stochmi.core.from_matrix import label_bounds_from_log_density

    g = _gen(3)
    n = 40
    L = torch.randn(n, n, generator=g, dtype=F64) * 3
    y = torch.arange(n) % 3
    _, _, up, _ = label_bounds_from_log_density(L, y)
    for j in range(n):
        same = [i for i in range(n) if y[i] == y[j]]
        other = [i for i in range(n) if i != j]
        ref = (torch.logsumexp(L[j, same], 0) - math.log(len(same))) - (
            torch.logsumexp(L[j, other], 0) - math.log(n - 1)
        )
        assert float(up[j]) == pytest.approx(float(ref), abs=1e-12)


def test_label_mi_of_perfectly_separated_classes_is_label_entropy():
    # three well separated classes in 2-D with unequal sizes: I(T; Y) = H(Y)
    counts = [5, 20, 35]
    y = torch.cat([torch.full((c,), k) for k, c in enumerate(counts)])
    centers = torch.tensor([[0.0, 0.0], [50.0, 0.0], [0.0, 50.0]], dtype=F64)
    loc = centers[y] + torch.randn(len(y), 2, generator=_gen(1), dtype=F64)
    est = stochmi.mi_with_labels(td.Independent(td.Normal(loc, 1.0), 1), y, seed=0)
    p = torch.tensor(counts, dtype=F64) / sum(counts)
    h_y = float(-(p * p.log()).sum())
    assert est.value == pytest.approx(h_y, abs=1e-8)
    # the classifier is mixed with 1e-6 of the uniform one (documented), which costs <= 1e-6
    assert est.lower == pytest.approx(h_y, abs=2e-6)
    assert est.upper == pytest.approx(h_y, abs=1e-12)


def test_label_lower_is_nan_with_singleton_class():
    s, y = _two_class_channel(n=50)
    y = y.clone()
    y[0] = 7  # a class with one member has no leave-one-out classifier
    est = stochmi.mi_with_labels(td.Normal(s, 0.6), y, seed=0)
    assert math.isnan(est.lower)
    assert math.isfinite(est.value) and est.extra["n_classes"] == 3


# --------------------------------------------------------------------------- consistency
def test_data_processing_on_a_linear_gaussian_markov_chain():
    """X -> T1 -> T2 with T1 = A1 X + s1 Z1, T2 = A2 T1 + s2 Z2.

    Closed forms: I(X;T1) >= I(X;T2) and I(T1;T2) >= I(X;T2). Estimates: the same order
    holds for the brackets, and each bracket contains its truth.
    """
    n, dx, d1, d2, s1, s2 = 1000, 4, 6, 3, 0.5, 0.7
    g = _gen(17)
    a1 = torch.randn(d1, dx, generator=g, dtype=F64)
    a2 = torch.randn(d2, d1, generator=g, dtype=F64) / 2
    x = torch.randn(n, dx, generator=g, dtype=F64)
    t1 = x @ a1.T + s1 * torch.randn(n, d1, generator=g, dtype=F64)
    # joint covariance of (X, T1, T2)
    c11 = a1 @ a1.T + s1**2 * torch.eye(d1, dtype=F64)
    c22 = a2 @ c11 @ a2.T + s2**2 * torch.eye(d2, dtype=F64)
    cov = torch.zeros(dx + d1 + d2, dx + d1 + d2, dtype=F64)
    ix, i1, i2 = range(dx), range(dx, dx + d1), range(dx + d1, dx + d1 + d2)
    cov[:dx, :dx] = torch.eye(dx, dtype=F64)
    cov[:dx, dx : dx + d1] = a1.T
    cov[:dx, dx + d1 :] = a1.T @ a2.T
    cov[dx : dx + d1, dx : dx + d1] = c11
    cov[dx : dx + d1, dx + d1 :] = c11 @ a2.T
    cov[dx + d1 :, dx + d1 :] = c22
    cov = torch.triu(cov) + torch.triu(cov, 1).T
    i_x1 = linear_gaussian_mi(a1, 1.0, s1)
    i_x2 = gaussian_mi_from_cov(cov, ix, i2)
    i_12 = linear_gaussian_mi(a2, c11, s2)
    assert i_x1 == pytest.approx(gaussian_mi_from_cov(cov, ix, i1), rel=1e-10)
    assert i_12 == pytest.approx(gaussian_mi_from_cov(cov, i1, i2), rel=1e-10)
    assert i_x1 > i_x2 and i_12 > i_x2
    # p(t2 | x) = N(A2 A1 x, s1^2 A2 A2^T + s2^2 I): full covariance, generic path
    cov_21 = s1**2 * a2 @ a2.T + s2**2 * torch.eye(d2, dtype=F64)
    e_x1 = stochmi.mi_from_conditional(td.Independent(td.Normal(x @ a1.T, s1), 1), seed=1)
    e_x2 = stochmi.mi_from_conditional(
        td.MultivariateNormal(x @ (a2 @ a1).T, covariance_matrix=cov_21), seed=2
    )
    e_12 = stochmi.mi_from_conditional(td.Independent(td.Normal(t1 @ a2.T, s2), 1), seed=3)
    assert not e_x2.extra["fast_path"]
    for est, truth in ((e_x1, i_x1), (e_x2, i_x2), (e_12, i_12)):
        assert est.lower - Z * est.lower_stderr <= truth <= est.upper + Z * est.upper_stderr
    assert e_x1.upper + Z * e_x1.upper_stderr >= e_x2.lower - Z * e_x2.lower_stderr
    assert e_12.upper + Z * e_12.upper_stderr >= e_x2.lower - Z * e_x2.lower_stderr
    se = math.hypot(e_x1.stderr, e_x2.stderr)
    assert e_x1.value >= e_x2.value - Z * se
