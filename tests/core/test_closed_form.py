"""Tests of stochmi.core.closed_form: the references the estimator tests rely on."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as td

from stochmi.core.closed_form import gaussian_mi_from_cov, linear_gaussian_mi, mixture_entropy_1d

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _joint_cov(a: torch.Tensor, cov_x: torch.Tensor, sigma_n: float) -> torch.Tensor:
    """Covariance of (X, T) for T = A X + sigma_n Z."""
    d_t, d_x = a.shape
    top = torch.cat([cov_x, cov_x @ a.T], 1)
    bottom = torch.cat([a @ cov_x, a @ cov_x @ a.T + sigma_n**2 * torch.eye(d_t, dtype=F64)], 1)
    return torch.cat([top, bottom], 0)


@pytest.mark.parametrize("d_t,d_x", [(1, 1), (3, 3), (5, 2), (2, 6), (20, 20)])
@pytest.mark.parametrize("cov_kind", ["scalar", "vector", "matrix"])
def test_linear_gaussian_equals_joint_covariance_formula(d_t, d_x, cov_kind):
    g = _gen(d_t * 100 + d_x)
    a = torch.randn(d_t, d_x, generator=g, dtype=F64)
    v = 0.5 + torch.rand(d_x, generator=g, dtype=F64)
    b = torch.randn(d_x, d_x, generator=g, dtype=F64)
    cov_arg, cov_x = {
        "scalar": (2.5, 2.5 * torch.eye(d_x, dtype=F64)),
        "vector": (v, torch.diag(v)),
        "matrix": (b @ b.T + 0.1 * torch.eye(d_x, dtype=F64),) * 2,
    }[cov_kind]
    sigma = 0.7
    cov = _joint_cov(a, cov_x, sigma)
    ref = gaussian_mi_from_cov(cov, range(d_x), range(d_x, d_x + d_t))
    assert linear_gaussian_mi(a, cov_arg, sigma) == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("a,s_x,s_n", [(1.0, 1.0, 1.0), (2.0, 0.5, 0.1), (-3.0, 2.0, 5.0)])
def test_one_dimensional_formula(a, s_x, s_n):
    truth = 0.5 * math.log1p(a**2 * s_x**2 / s_n**2)
    # cov_x is a variance
    assert linear_gaussian_mi(a, s_x**2, s_n) == pytest.approx(truth, rel=1e-12)
    assert linear_gaussian_mi([[a]], [s_x**2], s_n) == pytest.approx(truth, rel=1e-12)


def test_independent_channels_add():
    a = torch.diag(torch.tensor([1.0, 2.0, 0.5], dtype=F64))
    total = linear_gaussian_mi(a, 1.0, 0.3)
    parts = sum(0.5 * math.log1p(float(x) ** 2 / 0.09) for x in (1.0, 2.0, 0.5))
    assert total == pytest.approx(parts, rel=1e-12)
    assert linear_gaussian_mi(torch.zeros(3, 3), 1.0, 1.0) == 0.0


def test_gaussian_mi_from_cov_correlation():
    for rho in (0.0, 0.3, -0.9, 0.999):
        cov = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=F64)
        assert gaussian_mi_from_cov(cov, [0], [1]) == pytest.approx(
            -0.5 * math.log1p(-(rho**2)), abs=1e-12
        )
        assert gaussian_mi_from_cov(cov, [1], [0]) == gaussian_mi_from_cov(cov, [0], [1])


def test_gaussian_mi_from_cov_ignores_other_coordinates():
    g = _gen(1)
    b = torch.randn(6, 6, generator=g, dtype=F64)
    cov = b @ b.T + torch.eye(6, dtype=F64)
    sub = cov[[0, 1, 4]][:, [0, 1, 4]]
    assert gaussian_mi_from_cov(cov, [0, 1], [4]) == pytest.approx(
        gaussian_mi_from_cov(sub, [0, 1], [2]), rel=1e-12
    )


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="sigma_n"):
        linear_gaussian_mi(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="matrix"):
        linear_gaussian_mi(torch.ones(2, 2, 2), 1.0, 1.0)
    with pytest.raises(ValueError, match="disjoint"):
        gaussian_mi_from_cov(torch.eye(3), [0, 1], [1, 2])


@pytest.mark.parametrize(
    "dist,lo,hi",
    [
        (td.Normal(torch.tensor(0.3, dtype=F64), torch.tensor(0.7, dtype=F64)), -10, 10),
        (td.Laplace(torch.tensor(1.0, dtype=F64), torch.tensor(0.5, dtype=F64)), -20, 20),
        (td.Gumbel(torch.tensor(0.0, dtype=F64), torch.tensor(1.5, dtype=F64)), -15, 60),
    ],
)
def test_mixture_entropy_1d_of_known_entropies(dist, lo, hi):
    h = mixture_entropy_1d(dist.log_prob, lo, hi)
    assert h == pytest.approx(float(dist.entropy()), abs=1e-6)


def test_mixture_entropy_1d_of_separated_mixture():
    # two far-apart equal-weight components: h = h(component) + log 2
    locs = torch.tensor([-20.0, 20.0], dtype=F64)

    def log_density(x):
        return torch.logsumexp(td.Normal(locs, 1.0).log_prob(x[:, None]), 1) - math.log(2)

    h = mixture_entropy_1d(log_density, -40, 40)
    assert h == pytest.approx(0.5 * math.log(2 * math.pi * math.e) + math.log(2), abs=1e-6)


def test_mixture_entropy_1d_rejects_truncated_range():
    with pytest.raises(ValueError, match="widen"):
        mixture_entropy_1d(td.Normal(torch.tensor(0.0, dtype=F64), 1.0).log_prob, -2, 2)
