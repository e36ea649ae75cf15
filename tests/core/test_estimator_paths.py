"""The path-excluding lower bound for nested Monte Carlo channels (path_group)."""

import math

import torch
from torch import distributions as td

from stochmi import mi_from_conditional
from stochmi.core.kernel import LogDensityKernel


def _mixture(n=40, k=3, c=2, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, k * c, d, generator=g, dtype=torch.float64)
    scale = 0.3 + torch.rand(n, k * c, d, generator=g, dtype=torch.float64)
    logits = torch.randn(n, k, c, generator=g, dtype=torch.float64).log_softmax(-1)
    logits = (logits - math.log(k)).reshape(n, k * c)  # each path has weight 1/k
    return td.MixtureSameFamily(
        td.Categorical(logits=logits), td.Independent(td.Normal(loc, scale), 1)
    )


def test_diagonal_excluding_group_matches_explicit_mixture_of_other_paths():
    n, k, c = 40, 3, 2
    cond = _mixture(n, k, c)
    ker = LogDensityKernel(cond)
    t = ker.sample(2, torch.Generator().manual_seed(1))
    got = ker.diagonal_excluding_group(t, c)
    comp = ker.components // c  # path of each draw
    loc = cond.component_distribution.base_dist.loc
    scale = cond.component_distribution.base_dist.scale
    logw = cond.mixture_distribution.logits.log_softmax(-1)
    for r in range(2):
        for j in range(n):
            keep = [q for q in range(k * c) if q // c != comp[r, j]]
            lp = td.Independent(td.Normal(loc[j, keep], scale[j, keep]), 1).log_prob(t[r, j])
            w = logw[j, keep] - torch.logsumexp(logw[j, keep], 0)
            assert torch.allclose(got[r, j], torch.logsumexp(lp + w, 0), atol=1e-10)


def test_path_group_lower_bound_below_value():
    cond = _mixture(300, 4, 1, 2, seed=3)
    plain = mi_from_conditional(cond, seed=0)
    nested = mi_from_conditional(cond, seed=0, path_group=1)
    assert nested.value == plain.value and nested.upper == plain.upper
    assert nested.lower < nested.value  # excluding the drawing path can only lower the critic
