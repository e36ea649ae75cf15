"""Precision-adaptive kernel: float32 cross terms where a rounding-error bound
allows, float64 per block where it does not, with the same answers as float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as td

import stochmi
from stochmi.core import kernel as kmod
from stochmi.core.kernel import AUTO_MIN_WORK, LogDensityKernel
from tests.helpers import gen as _gen
from tests.helpers import load_textbook

F64 = torch.float64
textbook = load_textbook()


def _ordinary(n: int = 1500, d: int = 64, seed: int = 0) -> td.Distribution:
    # the benchmark's channel: mu ~ N(0, I), sigma = sqrt(d) / 2 (MI about 2 nats)
    loc = torch.randn(n, d, generator=_gen(seed), dtype=F64)
    return td.Independent(td.Normal(loc, 0.5 * math.sqrt(d)), 1)


def _fields(e):
    return (e.value, e.stderr, e.lower, e.upper, e.lower_stderr, e.upper_stderr)


def test_auto_uses_float32_on_ordinary_case_and_matches_float64():
    cond = _ordinary()
    assert 1500 * 1500 * 64 >= AUTO_MIN_WORK
    a = stochmi.mi_from_conditional(cond, n_draws=2, seed=3)
    f = stochmi.mi_from_conditional(cond, n_draws=2, seed=3, precision="float64")
    assert a.extra["precision"] == "auto" and f.extra["precision"] == "float64"
    assert a.extra["blocks"].get("float32", 0) > 0 and "float64" not in a.extra["blocks"]
    assert f.extra["blocks"] == {"float64": f.extra["blocks"]["float64"]}
    assert 0 < a.extra["precision_bound"] <= 1e-3 and f.extra["precision_bound"] == 0.0
    for x, y in zip(_fields(a), _fields(f)):
        assert abs(x - y) <= 1e-3
        assert abs(x - y) <= a.extra["precision_bound"]  # the bound holds
    assert 1.0 < a.value < math.log(1500) - 1  # not saturated


@pytest.mark.parametrize("structure", ["iso", "diag", "mixture"])
def test_auto_float32_other_structures_match_float64(structure):
    n, d = 1200, 24
    g = _gen(1)
    loc = torch.randn(n, d, generator=g, dtype=F64)
    u = 1.0 + torch.rand(n, d, generator=g, dtype=F64)
    cond = {
        "iso": td.Independent(td.Normal(loc, 2 * u[:, :1].expand(n, d)), 1),
        "diag": td.Independent(td.Normal(loc, 2 * u), 1),
        "mixture": td.MixtureSameFamily(
            td.Categorical(logits=torch.randn(n, 2, generator=g, dtype=F64)),
            td.Independent(td.Normal(torch.stack([loc, -loc], 1), 2.0), 1),
        ),
    }[structure]
    a = stochmi.mi_from_conditional(cond, seed=4, precision="auto")
    f = stochmi.mi_from_conditional(cond, seed=4, precision="float64")
    assert a.extra["blocks"].get("float32", 0) > 0, a.extra
    for x, y in zip(_fields(a), _fields(f)):
        assert abs(x - y) <= 1e-3


def test_labels_auto_matches_float64():
    cond = _ordinary(1200, 32, seed=5)
    y = torch.arange(1200) % 4
    a = stochmi.mi_with_labels(cond, y, seed=6)
    f = stochmi.mi_with_labels(cond, y, seed=6, precision="float64")
    assert a.extra["blocks"].get("float32", 0) > 0
    for x, y_ in zip((a.value, a.lower, a.upper), (f.value, f.lower, f.upper)):
        assert abs(x - y_) <= 1e-3


@pytest.mark.parametrize("structure", ["shared", "per_dim", "iso", "diag"])
def test_cancellation_cases_fall_back_to_float64_exactly(monkeypatch, structure):
    # the large-magnitude / tiny-noise case of test_estimator, with "auto" allowed to
    # consider float32 at any size: the bound must refuse it and the answer equal float64
    monkeypatch.setattr(kmod, "AUTO_MIN_WORK", 0)
    n, d, sigma = 400, 6, 1e-2
    g = _gen(21)
    centers = 100.0 + torch.randn(8, d, generator=g, dtype=F64)
    loc = centers[torch.arange(n) % 8] + 1.5 * sigma * torch.randn(n, d, generator=g, dtype=F64)
    u = 0.5 + torch.rand(n, d, generator=g, dtype=F64)
    scale = {
        "shared": torch.tensor(sigma, dtype=F64),
        "per_dim": sigma * u[0],
        "iso": sigma * u[:, :1].expand(n, d),
        "diag": sigma * u,
    }[structure]
    cond = td.Independent(td.Normal(loc, scale), 1)
    a = stochmi.mi_from_conditional(cond, n_draws=2, seed=1, chunk_size=100)
    f = stochmi.mi_from_conditional(cond, n_draws=2, seed=1, chunk_size=100, precision="float64")
    assert a.extra["blocks"] == {"float64": 8}
    for x, y in zip(_fields(a), _fields(f)):
        assert abs(x - y) <= 1e-6
    # forcing float32 on the same case misses the 1e-6 agreement: the fallback matters
    bad = stochmi.mi_from_conditional(cond, n_draws=2, seed=1, precision="float32")
    assert bad.extra["precision_bound"] > 1e-3
    assert max(abs(x - y) for x, y in zip(_fields(bad), _fields(f))) > 1e-6


def test_fallback_is_per_block():
    # three groups of sources: near 0, at +R e_1, at -R e_1 (centre stays near 0).
    # Rows of the first group have small norms (bound under 1e-3: float32), rows of the
    # outer groups large ones (bound over 1e-3: float64), one group per block.
    n_grp, d, r = 600, 16, 40.0
    g = _gen(7)
    loc = torch.randn(3 * n_grp, d, generator=g, dtype=F64)
    loc[n_grp : 2 * n_grp, 0] += r
    loc[2 * n_grp :, 0] -= r
    cond = td.Independent(td.Normal(loc, 1.0), 1)
    a = stochmi.mi_from_conditional(cond, seed=8, chunk_size=n_grp)
    f = stochmi.mi_from_conditional(cond, seed=8, chunk_size=n_grp, precision="float64")
    assert a.extra["blocks"] == {"float32": 1, "float64": 2}
    assert 0 < a.extra["precision_bound"] < 1e-3 / 3
    for x, y in zip(_fields(a), _fields(f)):
        assert abs(x - y) <= 1e-3


def _kernel_cases():
    g = _gen(11)
    n, d = 300, 40
    loc = 3 * torch.randn(n, d, generator=g, dtype=F64)
    u = 0.5 + torch.rand(n, d, generator=g, dtype=F64)
    return {
        "shared": td.Independent(td.Normal(loc, 1.5), 1),
        "per_dim": td.Independent(td.Normal(loc, 2 * u[0]), 1),
        "iso": td.Independent(td.Normal(loc, 2 * u[:, :1].expand(n, d)), 1),
        "diag": td.Independent(td.Normal(loc, 2 * u), 1),
        "large_magnitude": td.Independent(td.Normal(100 + 0.01 * loc, 0.01), 1),
        "mixture": td.MixtureSameFamily(
            td.Categorical(logits=torch.randn(n, 3, generator=g, dtype=F64)),
            td.Independent(td.Normal(torch.stack([loc, loc + 1, -loc], 1), 2.0), 1),
        ),
    }


@pytest.mark.parametrize("name", list(_kernel_cases()))
def test_row_bound_holds_entrywise(name):
    cond = _kernel_cases()[name]
    k32 = LogDensityKernel(cond, precision="float32")
    t = k32.sample(1, _gen(12))[0]
    exact = k32.block(t)  # float64 path, independent of precision
    torch.testing.assert_close(exact, textbook.broadcast_log_prob_matrix(cond, t))
    blk, off = k32.shifted_block(t)
    assert blk.dtype == torch.float32 and k32.counts["float32"] == 1
    err = (blk.to(F64) + off[:, None] - exact).abs()
    # entries within 100 nats of the row maximum (where float32 exp/sum can matter) lie
    # within 100 + log M of the row's log-sum-exp; the bound bounds every component there
    m = k32.n * k32.gauss.n_components
    bound = k32.row_bounds(t, window=100 + math.log(m))
    near = exact > exact.amax(1, keepdim=True) - 100
    row_err = torch.where(near, err, torch.zeros_like(err)).amax(1)
    assert bool((row_err <= bound).all()), float((row_err / bound).max())


def test_small_problems_stay_float64_and_bit_identical():
    cond = _ordinary(200, 8)
    a = stochmi.mi_from_conditional(cond, seed=2)
    f = stochmi.mi_from_conditional(cond, seed=2, precision="float64")
    assert a.extra["blocks"] == f.extra["blocks"] and "float32" not in a.extra["blocks"]
    assert _fields(a) == _fields(f)


def test_tolerance_controls_the_choice():
    cond = _ordinary(1000, 64, seed=9)
    strict = LogDensityKernel(cond, tolerance=1e-9)
    t = strict.sample(1, _gen(1))[0]
    blk, off = strict.shifted_block(t[:50])
    assert blk.dtype == F64 and strict.counts == {"float64": 1, "float32": 0, "tf32": 0}
    assert torch.equal(off, torch.zeros(50, dtype=F64))


def test_generic_path_ignores_precision():
    loc = torch.randn(300, 60, generator=_gen(3), dtype=F64)
    cond = td.Independent(td.Laplace(loc, 1.0), 1)
    a = stochmi.mi_from_conditional(cond, seed=0, precision="float32")
    f = stochmi.mi_from_conditional(cond, seed=0, precision="float64")
    assert _fields(a) == _fields(f) and "float32" not in a.extra["blocks"]


@pytest.mark.parametrize("bad", ["half", "fp32", None, 32])
def test_rejects_unknown_precision(bad):
    cond = _ordinary(50, 2)
    with pytest.raises(ValueError, match="precision"):
        stochmi.mi_from_conditional(cond, seed=0, precision=bad)
    with pytest.raises(ValueError, match="precision"):
        stochmi.mi_with_labels(cond, torch.arange(50) % 2, seed=0, precision=bad)


@pytest.mark.parametrize("bad", [0.0, -1e-3, math.inf, math.nan, True])
def test_rejects_bad_tolerance(bad):
    with pytest.raises(ValueError, match="tolerance"):
        LogDensityKernel(_ordinary(50, 2), tolerance=bad)


@pytest.mark.parametrize("name", ["shared", "iso", "diag", "mixture"])
def test_row_bound_holds_entrywise_with_the_diagonal_shift(name):
    # the product that iter_exp_blocks runs: shift = exact diagonal - offset, in float32,
    # as one more inner column; the bound covers the shifted entries near the row's lse
    cond = _kernel_cases()[name]
    k32 = LogDensityKernel(cond, precision="float32")
    t = k32.sample(1, _gen(13))[0]
    exact = k32.block(t)
    diag = k32.diagonal(t[None])[0]
    a, _, off, _ = k32._aug_rows(t)
    shift = (diag - off).to(torch.float32)
    a[:, -1] = -shift
    y = k32._mm32(a, False)
    if k32.gauss.n_components > 1:
        y = torch.logsumexp(y.view(t.shape[0], k32.n, -1), dim=-1)
    err = (y.to(F64) + off[:, None] + shift.to(F64)[:, None] - exact).abs()
    m = k32.n * k32.gauss.n_components
    bound = k32.row_bounds(t, shift=shift, window=100 + math.log(m))
    near = exact > exact.amax(1, keepdim=True) - 100
    row_err = torch.where(near, err, torch.zeros_like(err)).amax(1)
    assert bool((row_err <= bound).all()), float((row_err / bound).max())


@pytest.mark.parametrize("offset", [-300.0, 300.0])
def test_a_wrong_shift_is_rescued_per_row(offset):
    # shifts 300 nats off: every entry overflows (-300) or underflows (+300) in float32;
    # those rows are recomputed with their row maximum and the sums stay right
    cond = _ordinary(600, 16, seed=14)
    kernel = LogDensityKernel(cond, precision="float32", chunk_size=200)
    t = kernel.sample(1, _gen(15))
    diag = kernel.diagonal(t)
    bad = diag.clone()
    bad[0, 100:150] += offset  # 50 rows of the first block: under a quarter of it
    bad[0, 200:] += offset  # every row of the later blocks
    ref = textbook.broadcast_log_prob_matrix(cond, t[0])
    ref[torch.arange(600), torch.arange(600)] = -math.inf
    want = torch.logsumexp(ref, dim=1)
    got = torch.empty(600, dtype=F64)
    for sl, _src, _e, shift, loo in kernel.iter_exp_blocks(t, bad):
        got[sl] = shift + torch.log(loo)
    assert kernel.rescued_rows >= 50 + 200  # the 50, then the whole second block
    assert not kernel._speculate  # more than a quarter of a block: speculation stops
    assert float((got - want).abs().max()) <= kernel.mean_bound


def test_well_separated_float32_rows_are_rescued_and_match_float64():
    # 2-D grid, 15 sigma apart: every off-diagonal entry is over 100 nats below the
    # diagonal, so the diagonal shift underflows every leave-one-out sum in float32
    xy = torch.stack(torch.meshgrid(torch.arange(14.0), torch.arange(14.0), indexing="ij"), -1)
    loc = 15.0 * (xy.reshape(-1, 2) - 6.5).to(F64)
    cond = td.Independent(td.Normal(loc, 1.0), 1)
    a = stochmi.mi_from_conditional(cond, seed=16, precision="float32")
    f = stochmi.mi_from_conditional(cond, seed=16, precision="float64")
    assert a.extra["rescued_rows"] > 0 and a.extra["blocks"] == {"float32": 1}
    assert a.value == pytest.approx(math.log(196), abs=1e-9)
    assert math.isfinite(a.upper) and a.upper > 100
    assert abs(a.upper - f.upper) <= a.extra["precision_bound"]
    assert abs(a.value - f.value) <= 1e-9


def test_block_failing_the_bound_after_the_product_is_redone_in_float64(monkeypatch):
    # the a-posteriori check (with the row sums) can send a block back to float64
    monkeypatch.setattr(kmod, "AUTO_MIN_WORK", 0)
    real = LogDensityKernel._bounds

    def strict_after(self, fnorm, rho, s_abs, g_abs, tf32, window=None):
        bound = real(self, fnorm, rho, s_abs, g_abs, tf32, window)
        return bound * 1e6 if isinstance(g_abs, torch.Tensor) else bound

    monkeypatch.setattr(LogDensityKernel, "_bounds", strict_after)
    cond = _ordinary(300, 16, seed=17)
    a = stochmi.mi_from_conditional(cond, seed=18, chunk_size=100)
    f = stochmi.mi_from_conditional(cond, seed=18, chunk_size=100, precision="float64")
    assert a.extra["blocks"] == {"float64": 3} and a.extra["precision_bound"] == 0.0
    for x, y in zip(_fields(a), _fields(f)):
        assert abs(x - y) <= 1e-12


def test_saturated_rows_are_repaired_in_float32_and_match_float64():
    # sources 11 sigma apart on average (d = 64, sigma 1/4): the value sits at log N and
    # the a-priori float32 bound (5e-3 nats) is over the tolerance, but each row's sum
    # rests on a few entries, which are redone in float64
    loc = torch.randn(2000, 64, generator=_gen(5), dtype=F64)
    cond = td.Independent(td.Normal(loc, 0.25), 1)
    a = stochmi.mi_from_conditional(cond, seed=2)
    f = stochmi.mi_from_conditional(cond, seed=2, precision="float64")
    forced = stochmi.mi_from_conditional(cond, seed=2, precision="float32")
    assert forced.extra["precision_bound"] > 1e-3  # unrepaired, the bound would refuse it
    assert a.extra["blocks"] == {"float32": 1} and a.extra["repaired_rows"] == 2000
    assert a.extra["rescued_rows"] == 0  # the probe turned the diagonal shift off first
    assert 0 < a.extra["precision_bound"] <= 1e-3
    assert a.value == pytest.approx(math.log(2000), abs=1e-9) and a.upper > 500
    for x, y in zip(_fields(a), _fields(f)):
        assert abs(x - y) <= a.extra["precision_bound"]


def test_repair_declined_where_many_entries_carry_the_row_sums():
    # d = 1,024, sigma 4: the float32 bound is over the tolerance and each row's sum is
    # spread over many sources; the probe declines the repair and the block is float64
    loc = torch.randn(2000, 1024, generator=_gen(5), dtype=F64)
    cond = td.Independent(td.Normal(loc, 4.0), 1)
    kernel = LogDensityKernel(cond)
    t = kernel.sample(1, _gen(2))
    list(kernel.iter_exp_blocks(t, kernel.diagonal(t), repair=True))
    assert kernel.counts["float64"] > 0 and kernel.counts["float32"] == 0
    assert kernel.repaired_rows == 0 and kernel._repair_ok is False
