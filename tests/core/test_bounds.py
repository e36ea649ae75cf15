"""Tests of stochmi.core.bounds.pairwise_bounds (Kolchinsky-Tracey pairwise-distance bounds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import distributions as td

import stochmi
from stochmi import pairwise_bounds
from tests.helpers import gen as _gen
from tests.helpers import load_textbook

F64 = torch.float64
Z = 4.0


textbook = load_textbook()


def _scales(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    u = 0.4 + torch.rand(n, d, generator=_gen(seed), dtype=F64)
    return {
        "iso": torch.full((n, d), 0.8, dtype=F64),
        "per_dim": u[0].expand(n, d),
        "per_source_iso": u[:, :1].expand(n, d),
        "per_source_diag": u,
    }[kind]


KINDS = ["iso", "per_dim", "per_source_iso", "per_source_diag"]


@pytest.mark.parametrize("kind", KINDS)
def test_equals_brute_force_pairwise_computation(kind):
    n, d = 12, 3
    loc = 1.5 * torch.randn(n, d, generator=_gen(1), dtype=F64)
    scale = _scales(kind, n, d, 2)
    lo, hi = pairwise_bounds(loc, scale)
    ref_lo, ref_hi = textbook.brute_force_pairwise_bounds(loc.numpy(), scale.numpy())
    assert lo == pytest.approx(ref_lo, rel=1e-12, abs=1e-12)
    assert hi == pytest.approx(ref_hi, rel=1e-12, abs=1e-12)
    assert lo <= hi


def test_scale_forms_agree():
    n, d = 30, 4
    loc = torch.randn(n, d, generator=_gen(3), dtype=F64)
    full = pairwise_bounds(loc, torch.full((n, d), 0.6, dtype=F64))
    assert pairwise_bounds(loc, 0.6) == pytest.approx(full, rel=1e-12)
    assert pairwise_bounds(loc, torch.full((d,), 0.6, dtype=F64)) == pytest.approx(full, rel=1e-12)
    # 1-D means with per-source scales
    s = 0.3 + torch.rand(n, generator=_gen(4), dtype=F64)
    one_d = pairwise_bounds(loc[:, 0], s)
    ref = textbook.brute_force_pairwise_bounds(loc[:, :1].numpy(), s[:, None].numpy())
    assert one_d == pytest.approx(ref, rel=1e-12)


def test_matches_information_plane_kde_code():
    # Kolchinsky's kde.py (Saxe et al.) with var = sigma^2 gives the same KL upper bound
    n, d, sigma = 300, 10, 0.9
    loc = torch.randn(n, d, generator=_gen(5), dtype=F64)
    lo, hi = pairwise_bounds(loc, sigma)
    kde_lo, kde_hi = textbook.kde_pairwise_mi(loc.numpy(), sigma**2, lower=True)
    assert hi == pytest.approx(kde_hi, rel=1e-10)
    assert lo == pytest.approx(kde_lo, rel=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_bracket_the_dataset_mi(kind):
    n, d = 500, 4
    loc = 1.2 * torch.randn(n, d, generator=_gen(6), dtype=F64)
    scale = _scales(kind, n, d, 7)
    lo, hi = pairwise_bounds(loc, scale)
    est = stochmi.mi_from_conditional(
        td.Independent(td.Normal(loc, scale), 1), n_draws=4, seed=8, bounds=True
    )
    assert est.extra["pairwise_lower"] == pytest.approx(lo, rel=1e-12)
    assert est.extra["pairwise_upper"] == pytest.approx(hi, rel=1e-12)
    # both bounds hold for the dataset MI, which value estimates to within its stderr
    assert lo - Z * est.stderr <= est.value <= hi + Z * est.stderr
    assert hi - lo > 4 * est.stderr  # the bracket is wider than the noise: not vacuous


def test_limits_identical_and_separated_means():
    n, d = 50, 3
    same = torch.zeros(n, d, dtype=F64)
    assert pairwise_bounds(same, 1.0) == pytest.approx((0.0, 0.0), abs=1e-12)
    far = 1e3 * torch.randn(n, d, generator=_gen(9), dtype=F64)
    lo, hi = pairwise_bounds(far, 1.0)
    assert lo == pytest.approx(math.log(n), abs=1e-9)
    assert hi == pytest.approx(math.log(n), abs=1e-9)
    # per-source scales: identical means, two widths. Only the group is identifiable, and
    # within a group D = 0, so both bounds lie in (0, log 2]
    s = torch.tensor([0.1, 10.0], dtype=F64).repeat(n // 2)[:, None].expand(n, d)
    lo2, hi2 = pairwise_bounds(same, s)
    assert 0 < lo2 <= hi2 <= math.log(2) + 1e-12


@pytest.mark.parametrize("kind", ["iso", "per_source_diag"])
def test_deterministic_and_chunk_independent(kind):
    n, d = 64, 5
    loc = torch.randn(n, d, generator=_gen(10), dtype=F64)
    scale = _scales(kind, n, d, 11)
    a = pairwise_bounds(loc, scale)
    assert pairwise_bounds(loc, scale) == a  # no Monte Carlo: bit-identical
    for c in (1, 7, n):
        assert pairwise_bounds(loc, scale, chunk_size=c) == pytest.approx(a, abs=1e-12)


def test_large_magnitude_means():
    n, d, sigma = 200, 6, 1e-2
    loc = 100.0 + 3 * sigma * torch.randn(n, d, generator=_gen(12), dtype=F64)
    lo, hi = pairwise_bounds(loc, sigma)
    ref_lo, ref_hi = textbook.brute_force_pairwise_bounds(loc[:40].numpy(), np.full((40, d), sigma))
    lo40, hi40 = pairwise_bounds(loc[:40], sigma)
    assert lo40 == pytest.approx(ref_lo, rel=1e-9)
    assert hi40 == pytest.approx(ref_hi, rel=1e-9)
    assert 0 < lo < hi < math.log(n)


def test_rejects_bad_input():
    loc = torch.zeros(10, 3)
    with pytest.raises(ValueError, match="N >= 2"):
        pairwise_bounds(torch.zeros(1, 3), 1.0)
    with pytest.raises(ValueError, match="N >= 2"):
        pairwise_bounds(torch.zeros(2, 3, 4), 1.0)
    with pytest.raises(ValueError, match="positive"):
        pairwise_bounds(loc, 0.0)
    with pytest.raises(ValueError, match="finite"):
        pairwise_bounds(loc, math.inf)
    bad = loc.clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="finite"):
        pairwise_bounds(bad, 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        pairwise_bounds(loc, 1.0, chunk_size=0)


def test_scale_shape_mismatch_is_a_clear_value_error():
    """Scale (55, 3) against loc (60, 3): a ValueError naming both shapes, not torch's
    broadcasting RuntimeError."""
    loc = torch.randn(60, 3, generator=_gen(13), dtype=F64)
    with pytest.raises(ValueError, match=r"scale of shape \(55, 3\) does not match loc"):
        pairwise_bounds(loc, torch.ones(55, 3, dtype=F64))
    with pytest.raises(ValueError, match=r"scale of shape \(4,\) does not match"):
        pairwise_bounds(loc, torch.ones(4, dtype=F64))


def test_negative_scale_is_reported_as_negative():
    """A negative scale is reported as negative, not as a zero-noise channel."""
    loc = torch.randn(10, 3, generator=_gen(14), dtype=F64)
    scale = torch.ones(10, 3, dtype=F64)
    scale[2, 1] = -2.0
    with pytest.raises(ValueError, match="negative values") as info:
        pairwise_bounds(loc, scale)
    assert "zero-noise" not in str(info.value)
