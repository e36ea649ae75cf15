"""Reductions of a log-density matrix restricted to some queries (``rows``)."""

from __future__ import annotations

import math

import pytest
import torch

from stochmi.core.from_matrix import (
    label_bounds_from_log_density,
    label_terms_from_log_density,
    mi_terms_from_log_density,
)


def _gaussian_channel(n: int, seed: int):
    """``L[j, i] = log N(t_j; x_i, 0.5^2 I)`` of a 3-d Gaussian channel, and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    t = x + 0.5 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    d2 = ((t[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    L = -0.5 * d2 / 0.25 - 3 * math.log(0.5) - 1.5 * math.log(2 * math.pi)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return L, y


@pytest.mark.parametrize("n", [7, 3000])  # 3000: rows span several reduction blocks
def test_rows_give_the_same_terms_as_all_rows(n):
    L, y = _gaussian_channel(n, seed=1)
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(2))[: max(2, n // 3)]
    full, loo = mi_terms_from_log_density(L)
    f_r, l_r = mi_terms_from_log_density(L, rows=rows)
    torch.testing.assert_close(f_r, full[rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(l_r, loo[rows], rtol=0, atol=1e-12)
    torch.testing.assert_close(
        label_terms_from_log_density(L, y, rows=rows),
        label_terms_from_log_density(L, y)[rows],
        rtol=0,
        atol=1e-12,
    )
    every = label_bounds_from_log_density(L, y)
    some = label_bounds_from_log_density(L, y, rows=rows)
    for a, b in zip(some[:3], every[:3]):
        torch.testing.assert_close(a, b[rows], rtol=0, atol=1e-12)
    assert some[3] == every[3]  # the label entropy is over all sources


def test_rows_not_taken_are_not_read():
    L, y = _gaussian_channel(12, seed=3)
    rows = torch.tensor([0, 4, 5])
    L[7] = math.nan  # a row no query reads
    full, _ = mi_terms_from_log_density(L, rows=rows)
    assert bool(torch.isfinite(full).all())
    with pytest.raises(ValueError, match="NaN"):
        mi_terms_from_log_density(L, rows=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="row indices"):
        mi_terms_from_log_density(L, rows=torch.tensor([0, 12]))
