"""Ground-truth tasks: closed forms checked independently, conditionals, seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import stochmi
from stochmi import tasks as T


def _bivariate_gaussian_mi_numeric(rho: float) -> float:
    """I(X;T) = E log p(x,t)/(p(x)p(t)) for a standard bivariate Gaussian, 2-D quadrature."""
    det = 1.0 - rho**2

    def integrand(t, x):
        q = (x * x - 2 * rho * x * t + t * t) / det
        log_pxy = -0.5 * q - math.log(2 * math.pi) - 0.5 * math.log(det)
        log_px_pt = -0.5 * (x * x + t * t) - math.log(2 * math.pi)
        return math.exp(log_pxy) * (log_pxy - log_px_pt)

    val, _ = integrate.dblquad(integrand, -9, 9, -9, 9, epsabs=1e-10)
    return val


@pytest.mark.parametrize("rho", [0.3, 0.8])
def test_gaussian_closed_form_matches_quadrature(rho):
    task = T.gaussian_task(100, dim_x=1, dim_t=1, rho=rho, seed=0)
    assert task.true_mi == pytest.approx(-0.5 * math.log(1 - rho**2), rel=1e-12)
    assert task.true_mi == pytest.approx(_bivariate_gaussian_mi_numeric(rho), abs=1e-6)


def test_gaussian_dense_and_sparse_against_core_closed_form():
    dense = T.gaussian_task(50, dim_x=3, dim_t=2, correlation="dense", rho=0.4, seed=1)
    d = 5
    cov = 0.6 * np.eye(d) + 0.4 * np.ones((d, d))
    ref = stochmi.closed_form.gaussian_mi_from_cov(cov, [0, 1, 2], [3, 4])
    assert dense.true_mi == pytest.approx(ref, rel=1e-10)
    sparse = T.gaussian_task(50, dim_x=3, dim_t=4, rho=0.9, seed=1)
    assert sparse.true_mi == pytest.approx(-1.5 * math.log(1 - 0.81), rel=1e-12)


def test_gaussian_samples_have_the_covariance():
    task = T.gaussian_task(20000, dim_x=2, dim_t=2, rho=0.7, seed=3)
    z = torch.cat([task.x, task.t], 1).numpy()
    c = np.cov(z.T)
    expect = np.eye(4)
    expect[0, 2] = expect[2, 0] = expect[1, 3] = expect[3, 1] = 0.7
    assert np.abs(c - expect).max() < 0.05


def test_additive_gaussian_matches_linear_gaussian_formula():
    task = T.additive_gaussian_task(100, dim_x=3, dim_t=2, sigma=0.7, seed=2)
    a = task.params["A"]
    ref = stochmi.closed_form.linear_gaussian_mi(a, 1.0, 0.7)
    assert task.true_mi == pytest.approx(ref, rel=1e-10)
    cond = task.channel()
    assert cond.batch_shape == (100,) and cond.event_shape == (2,)
    assert torch.allclose(cond.mean, task.x @ torch.as_tensor(a).T)


@pytest.mark.parametrize("eps", [0.05, 0.3, 0.5, 0.8, 2.0])
def test_additive_uniform_closed_form_matches_numeric_entropy(eps):
    # h(T) by quadrature of the convolution density, I = h(T) - log(2 eps)
    def pdf(t):
        return max(0.0, min(t + eps, 1.0) - max(t - eps, 0.0)) / (2 * eps)

    breaks = sorted({-eps, eps, 1 - eps, 1 + eps, 0.0, 1.0})
    h = 0.0
    for a, b in zip(breaks[:-1], breaks[1:]):
        val, _ = integrate.quad(lambda t: -pdf(t) * math.log(pdf(t)) if pdf(t) > 0 else 0.0, a, b)
        h += val
    assert T.additive_uniform_mi(eps) == pytest.approx(h - math.log(2 * eps), abs=1e-8)


def test_additive_uniform_dims_add_and_support():
    task = T.additive_uniform_task(500, eps=0.2, dim=3, seed=0)
    assert task.true_mi == pytest.approx(3 * (0.2 - math.log(0.4)))
    assert torch.all((task.t - task.x).abs() <= 0.2)
    lp = task.channel().log_prob(task.t)
    assert torch.all(torch.isfinite(lp))
    assert lp[0] == pytest.approx(-3 * math.log(0.4))


def test_student_t_closed_form_matches_monte_carlo():
    # I = E[log p(x,t) - log p(x) - log p(t)] with exact scipy densities
    df, rho = 4.0, 0.6
    cov = np.array([[1.0, rho], [rho, 1.0]])
    n = 200_000
    z = stats.multivariate_t(loc=[0, 0], shape=cov, df=df).rvs(size=n, random_state=1)
    terms = (
        stats.multivariate_t(loc=[0, 0], shape=cov, df=df).logpdf(z)
        - stats.t(df).logpdf(z[:, 0])
        - stats.t(df).logpdf(z[:, 1])
    )
    mc, se = terms.mean(), terms.std() / math.sqrt(n)
    assert T.student_t_mi(cov, 1, df) == pytest.approx(mc, abs=5 * se)
    # correction is positive: uncorrelated Student-t still has positive MI
    assert T.student_t_mi(np.eye(2), 1, df) > 0.0


def test_student_t_conditional_is_the_exact_conditional():
    # log p(t | x) = log p(x, t) - log p(x) from scipy's joint density
    task = T.student_t_task(200, dim_x=2, dim_t=1, df=3.0, rho=0.5, seed=4)
    cov = np.eye(3)
    cov[0, 2] = cov[2, 0] = 0.5
    joint = stats.multivariate_t(loc=np.zeros(3), shape=cov, df=3.0)
    marg = stats.multivariate_t(loc=np.zeros(2), shape=cov[:2, :2], df=3.0)
    z = torch.cat([task.x, task.t], 1).numpy()
    ref = joint.logpdf(z) - marg.logpdf(z[:, :2])
    got = task.channel().log_prob(task.t).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", ["asinh", "half_cube", "wiggly"])
def test_transforms_invert_and_have_correct_jacobian(name):
    f = T.TRANSFORMS[name]()
    x = torch.linspace(-4, 4, 1001, dtype=torch.float64)
    x = x[x.abs() > 1e-3]  # half-cube has a zero derivative at 0
    y = f(x)
    assert torch.all(y[1:] > y[:-1])  # strictly increasing
    torch.testing.assert_close(f.inv(y), x, rtol=0, atol=1e-10)
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(xr).sum(), xr)
    torch.testing.assert_close(f.log_abs_det_jacobian(x, y), grad.log(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["asinh", "half_cube", "wiggly"])
def test_transformed_task_preserves_mi_and_conditional(name):
    base = T.gaussian_task(200, dim_x=2, dim_t=2, rho=0.8, seed=5)
    task = T.transformed_task(base, name)
    assert task.true_mi == base.true_mi
    f = T.TRANSFORMS[name]()
    torch.testing.assert_close(task.x, f(base.x))
    # change of variables: log p(t'|x') = log p(t|x) - sum log|g'(t)|
    lp_new = task.channel().log_prob(task.t)
    lp_old = base.channel().log_prob(base.t) - f.log_abs_det_jacobian(base.t, task.t).sum(-1)
    torch.testing.assert_close(lp_new, lp_old, rtol=1e-9, atol=1e-9)
    # the certified estimator sees the same channel: same number for the same seed
    a = stochmi.mi_from_conditional(task.channel(), seed=0).value
    b = stochmi.mi_from_conditional(base.channel(), seed=0).value
    assert a == pytest.approx(b, abs=1e-6)


def test_certified_estimator_recovers_every_benchmark_truth():
    for task in T.benchmark_tasks(600, seed=0, quick=True):
        est = stochmi.mi_from_conditional(task.channel(), seed=1)
        assert abs(est.value - task.true_mi) < 4 * est.stderr + 0.02, task.name


def test_seeds_reproduce_and_differ():
    for make in (
        lambda s: T.gaussian_task(64, seed=s),
        lambda s: T.additive_gaussian_task(64, seed=s),
        lambda s: T.additive_uniform_task(64, seed=s),
        lambda s: T.student_t_task(64, seed=s),
        lambda s: T.transformed_task(T.gaussian_task(64, seed=s), "wiggly"),
    ):
        a, b, c = make(7), make(7), make(8)
        assert torch.equal(a.x, b.x) and torch.equal(a.t, b.t)
        assert not torch.equal(a.x, c.x)


def test_no_global_rng_consumed():
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    T.student_t_task(50, seed=0)
    T.benchmark_tasks(50, seed=0)
    assert torch.equal(state, torch.get_rng_state())
    assert np.array_equal(np_state, np.random.get_state()[1])


def test_shapes_and_names():
    tasks = T.benchmark_tasks(40, seed=0)
    assert len({tk.name for tk in tasks}) == len(tasks)
    for tk in tasks:
        assert tk.x.dtype == torch.float64 and tk.x.shape == (40, tk.dim_x)
        assert tk.t.shape == (40, tk.dim_t) and len(tk) == 40
        assert tk.true_mi > 0
        cond = tk.channel()
        assert cond.batch_shape == (40,) and cond.event_shape == (tk.dim_t,)
        assert torch.all(torch.isfinite(cond.log_prob(tk.t)))


def test_bad_input():
    with pytest.raises(ValueError, match="n must be"):
        T.gaussian_task(1)
    with pytest.raises(ValueError, match="rho"):
        T.gaussian_task(10, rho=1.0)
    with pytest.raises(ValueError, match="rho"):
        T.gaussian_task(10, dim_x=2, dim_t=2, correlation="dense", rho=-0.5)
    with pytest.raises(ValueError, match="correlation"):
        T.gaussian_task(10, correlation="banded")
    with pytest.raises(ValueError, match="sigma"):
        T.additive_gaussian_task(10, sigma=0.0)
    with pytest.raises(ValueError, match="eps"):
        T.additive_uniform_task(10, eps=-1.0)
    with pytest.raises(ValueError, match="df"):
        T.student_t_task(10, df=0)
    with pytest.raises(ValueError, match="transform"):
        T.transformed_task(T.gaussian_task(10), "cube")
    with pytest.raises(ValueError, match="amplitude"):
        T.WigglyTransform(amplitude=1.0, omega=2.0)
    with pytest.raises(ValueError, match="shape"):
        T.gaussian_task(10, dim_x=2).conditional(torch.zeros(10, 3))
