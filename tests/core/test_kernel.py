"""Tests of stochmi.core.kernel: the pairwise log-density blocks L[j, i] = log p(t_j | s_i).

Every block is compared with an independent reference: torch's own broadcast
``log_prob`` (benchmarks/textbook.py) or exact float64 differences.
"""

from __future__ import annotations

import math

import pyro.distributions as pdist
import pytest
import torch
from torch import distributions as td

import stochmi
from stochmi.core.estimator import make_generator
from stochmi.core.kernel import (
    DEFAULT_CHUNK_BYTES,
    DeterministicLayerError,
    LogDensityKernel,
    as_gaussian_mixture,
)
from tests.helpers import gen as _gen
from tests.helpers import load_textbook

F64 = torch.float64


textbook = load_textbook()


_NO_SHAPE = torch.Size()


class Opaque(td.Distribution):
    """A distribution that only delegates ``log_prob`` and ``sample``: forces the generic path."""

    arg_constraints: dict = {}

    def __init__(self, inner: td.Distribution) -> None:
        self.inner = inner
        super().__init__(inner.batch_shape, inner.event_shape, validate_args=False)

    def log_prob(self, value):
        return self.inner.log_prob(value)

    def sample(self, sample_shape=_NO_SHAPE):
        return self.inner.sample(sample_shape)


N, D = 40, 5


def _rows(cond: td.Distribution, m: int = 23, seed: int = 0) -> torch.Tensor:
    """Draws from the conditional of the first m sources, shape (m, *event)."""
    gen = _gen(seed)
    kernel = LogDensityKernel(cond)
    return kernel.sample(1, gen)[0, :m]


def _structures():
    g = _gen(1)
    loc = torch.randn(N, D, generator=g, dtype=F64)
    u = 0.3 + torch.rand(N, D, generator=g, dtype=F64)
    return {
        # name: (cond, expected structure)
        "shared_scalar": (td.Independent(td.Normal(loc, 0.7), 1), "shared"),
        "per_dim": (td.Independent(td.Normal(loc, u[0]), 1), "shared"),
        "per_source_iso": (td.Independent(td.Normal(loc, u[:, :1].expand(N, D)), 1), "iso"),
        "per_source_diag": (td.Independent(td.Normal(loc, u), 1), "diag"),
        "scalar_event_shared": (td.Normal(loc[:, 0], 0.4), "shared"),
        "scalar_event_per_source": (td.Normal(loc[:, 0], u[:, 0]), "iso"),
        "pyro_to_event": (pdist.Normal(loc, u).to_event(1), "diag"),
        "mixture_shared": (
            td.MixtureSameFamily(
                td.Categorical(logits=torch.randn(N, 3, generator=g, dtype=F64)),
                td.Independent(td.Normal(torch.stack([loc, loc + 1, loc - 2], 1), 0.5), 1),
            ),
            "shared",
        ),
        "mixture_diag": (
            td.MixtureSameFamily(
                td.Categorical(logits=torch.randn(2, dtype=F64)),  # weights shared by sources
                td.Normal(torch.stack([loc[:, 0], loc[:, 1]], 1), u[:, :2]),
            ),
            "iso",
        ),
    }


@pytest.mark.parametrize("name", list(_structures()))
def test_gaussian_block_equals_textbook_broadcast_log_prob(name):
    cond, structure = _structures()[name]
    kernel = LogDensityKernel(cond)
    assert kernel.is_gaussian
    assert kernel.gauss.structure == structure
    rows = _rows(cond)
    ref = textbook.broadcast_log_prob_matrix(cond, rows)
    blk = kernel.block(rows)
    assert blk.shape == (rows.shape[0], N) and blk.dtype == F64
    torch.testing.assert_close(blk, ref, rtol=1e-12, atol=1e-9)


def test_gaussian_block_equals_direct_differences_in_float64():
    # same check against a reference that shares no code with torch.distributions
    g = _gen(2)
    loc = torch.randn(N, D, generator=g, dtype=F64)
    scale = 0.2 + torch.rand(N, D, generator=g, dtype=F64)
    cond = td.Independent(td.Normal(loc, scale), 1)
    rows = _rows(cond)
    ref = textbook.gaussian_log_prob_direct(loc, scale, rows)
    torch.testing.assert_close(LogDensityKernel(cond).block(rows), ref, rtol=1e-12, atol=1e-9)


def _generic_twins():
    """Pairs (fast conditional, the same density through the generic path)."""
    g = _gen(3)
    loc = torch.randn(N, D, generator=g, dtype=F64)
    u = 0.3 + torch.rand(N, D, generator=g, dtype=F64)
    shared = td.Independent(td.Normal(loc, u[0]), 1)
    diag = td.Independent(td.Normal(loc, u), 1)
    mix = td.MixtureSameFamily(
        td.Categorical(logits=torch.randn(N, 2, generator=g, dtype=F64)),
        td.Independent(td.Normal(torch.stack([loc, -loc], 1), torch.stack([u, 2 * u], 1)), 1),
    )
    return {
        "mvn_diagonal": (shared, td.MultivariateNormal(loc, scale_tril=torch.diag(u[0]))),
        "mvn_per_source": (diag, td.MultivariateNormal(loc, scale_tril=torch.diag_embed(u))),
        "opaque_diag": (diag, Opaque(diag)),
        "opaque_mixture": (mix, Opaque(mix)),
        "opaque_scalar_event": (
            td.Normal(loc[:, 0], u[:, 0]),
            Opaque(td.Normal(loc[:, 0], u[:, 0])),
        ),
    }


@pytest.mark.parametrize("name", list(_generic_twins()))
def test_fast_path_equals_generic_path_on_the_same_draws(name):
    fast, generic = _generic_twins()[name]
    kf, kg = LogDensityKernel(fast), LogDensityKernel(generic)
    assert kf.is_gaussian and not kg.is_gaussian
    t = kf.sample(2, _gen(4))  # (2, N, *event)
    rows = t.reshape(2 * N, *t.shape[2:])
    torch.testing.assert_close(kf.block(rows), kg.block(rows), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(kf.diagonal(t), kg.diagonal(t), rtol=1e-12, atol=1e-9)


def test_generic_block_keeps_float64_for_wrapped_distributions():
    """Independent/MixtureSameFamily hide their tensors one level down; the generic path
    must still evaluate float64 samples in float64."""
    g = _gen(5)
    loc = 100.0 + 1e-2 * torch.randn(N, 3, generator=g, dtype=F64)
    scale = torch.full((N, 3), 1e-3, dtype=F64)
    conds = [
        td.Independent(td.Laplace(loc, scale), 1),
        td.MixtureSameFamily(
            td.Categorical(logits=torch.zeros(N, 2, dtype=F64)),
            td.Independent(td.Laplace(torch.stack([loc, loc + 1e-2], 1), scale[:, None]), 1),
        ),
    ]
    rows = loc[:7] + 1e-3 * torch.randn(7, 3, generator=g, dtype=F64)
    for cond in conds:
        kernel = LogDensityKernel(cond)
        assert not kernel.is_gaussian
        ref = cond.log_prob(rows[:, None])
        torch.testing.assert_close(kernel.block(rows), ref, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_magnitude_small_noise_blocks_are_exact(dtype):
    n, d, sigma = 300, 8, 1e-2
    g = _gen(6)
    loc = (100.0 + torch.randn(n, d, generator=g, dtype=F64)).to(dtype)
    neighbours = loc.to(F64) + 2 * sigma * torch.randn(n, d, generator=g, dtype=F64)
    loc = torch.cat([loc, neighbours.to(dtype)])  # pairs 2 sigma apart: O(1) off-diagonals
    scale = torch.tensor(sigma, dtype=dtype)
    cond = td.Independent(td.Normal(loc, scale), 1)
    kernel = LogDensityKernel(cond)
    t = kernel.sample(1, _gen(7))[0]
    ref = textbook.gaussian_log_prob_direct(loc, scale, t)
    blk = torch.cat([kernel.block(t[s : s + 64]) for s in range(0, t.shape[0], 64)])
    # entries that matter (within 50 nats of the row max) to 1e-6 relative
    near = ref > ref.amax(1, keepdim=True) - 50
    assert int(near.sum()) > 1.5 * t.shape[0]  # most rows have an off-diagonal that matters
    torch.testing.assert_close(blk[near], ref[near], rtol=1e-6, atol=0)
    # negative control: the naive expansion |t|^2 + |mu|^2 - 2 t.mu without centring, in
    # float32, is off by many nats on the same entries, so the check above has teeth
    t32, mu32 = t.to(torch.float32), loc.to(torch.float32)
    naive_d2 = (t32 * t32).sum(1)[:, None] + (mu32 * mu32).sum(1)[None] - 2 * t32 @ mu32.T
    naive = (
        -0.5 * naive_d2.to(F64) / sigma**2 - d * math.log(sigma) - 0.5 * d * math.log(2 * math.pi)
    )
    assert float((naive[near] - ref[near]).abs().max()) > 1.0


@pytest.mark.parametrize("name", list(_structures()))
def test_diagonal_equals_log_prob_for_every_structure(name):
    # one scale for all (a fused distance), one per source, per dimension, mixtures
    cond = _structures()[name][0]
    kernel = LogDensityKernel(cond)
    t = kernel.sample(2, _gen(16))
    torch.testing.assert_close(kernel.diagonal(t), cond.log_prob(t), rtol=1e-12, atol=1e-9)


def test_diagonal_is_exact_for_own_draws():
    g = _gen(8)
    loc = 1e3 + torch.randn(N, D, generator=g, dtype=F64)
    scale = 1e-4 * (1 + torch.rand(N, D, generator=g, dtype=F64))
    cond = td.Independent(td.Normal(loc, scale), 1)
    kernel = LogDensityKernel(cond)
    t = kernel.sample(3, _gen(9))
    torch.testing.assert_close(kernel.diagonal(t), cond.log_prob(t), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("exact_shift", [False, True])
@pytest.mark.parametrize("name", ["per_source_diag", "mixture_shared"])
def test_iter_exp_blocks_covers_every_row_once(name, precision, exact_shift):
    cond = _structures()[name][0]
    kernel = LogDensityKernel(cond, chunk_size=7, precision=precision)
    t = kernel.sample(2, _gen(10))
    diag = kernel.diagonal(t)
    seen = torch.zeros(2 * N, dtype=torch.long)
    flat = t.reshape(2 * N, D)
    rtol = 1e-12 if precision == "float64" else 1e-4
    for sl, src, e, shift, loo in kernel.iter_exp_blocks(t, diag, exact_shift=exact_shift):
        assert e.shape == (sl.stop - sl.start, N) and shift.dtype == loo.dtype == F64
        assert torch.equal(src, torch.arange(sl.start, sl.stop) % N)
        seen[sl] += 1
        ar = torch.arange(e.shape[0])
        assert bool((e[ar, src] == 0).all())
        torch.testing.assert_close(loo, e.to(F64).sum(1), rtol=1e-5, atol=0)
        ref = textbook.broadcast_log_prob_matrix(cond, flat[sl])
        ref[ar, src] = -math.inf
        want = torch.exp(ref - shift[:, None])
        # relative to each entry, or (entries flushed to zero in float32) to the row sum
        assert bool(((e.to(F64) - want).abs() <= rtol * (want + 1e-3 * loo[:, None])).all())
    assert torch.equal(seen, torch.ones_like(seen))
    assert kernel.counts[precision] == math.ceil(2 * N / 7)


def test_sample_shapes_and_private_generator():
    vec = _structures()["per_dim"][0]
    sca = _structures()["scalar_event_shared"][0]
    gen = _gen(11)
    state = torch.get_rng_state()
    assert LogDensityKernel(vec).sample(3, gen).shape == (3, N, D)
    assert LogDensityKernel(sca).sample(3, gen).shape == (3, N)
    assert LogDensityKernel(Opaque(vec)).sample(2, gen).shape == (2, N, D)
    assert torch.equal(torch.get_rng_state(), state)
    a = LogDensityKernel(Opaque(vec)).sample(2, _gen(12))
    b = LogDensityKernel(Opaque(vec)).sample(2, _gen(12))
    assert torch.equal(a, b)


def test_gaussian_samples_have_the_right_moments():
    # 4000 draws per source of a 2-source diagonal Gaussian: mean within 5 se, sd within 5 %
    loc = torch.tensor([[0.0, 10.0], [-3.0, 2.0]], dtype=F64)
    scale = torch.tensor([[1.0, 0.5], [2.0, 0.1]], dtype=F64)
    t = LogDensityKernel(td.Independent(td.Normal(loc, scale), 1)).sample(4000, _gen(13))
    assert ((t.mean(0) - loc).abs() < 5 * scale / math.sqrt(4000)).all()
    assert ((t.std(0) / scale - 1).abs() < 0.05).all()
    mix = td.MixtureSameFamily(
        td.Categorical(probs=torch.tensor([[0.2, 0.8], [0.5, 0.5]], dtype=F64)),
        td.Normal(torch.tensor([[-5.0, 5.0], [0.0, 1.0]], dtype=F64), 0.1),
    )
    tm = LogDensityKernel(mix).sample(4000, _gen(14))
    frac = (tm[:, 0] > 0).to(F64).mean()
    assert abs(float(frac) - 0.8) < 5 * math.sqrt(0.8 * 0.2 / 4000)


def test_default_chunk_respects_memory_budget():
    loc = torch.zeros(50_000, 16, dtype=F64)
    k = LogDensityKernel(td.Independent(td.Normal(loc, 1.0), 1))
    assert 16 <= k.chunk_size <= 4096
    # float32 blocks (4 bytes an entry); float64 fallback blocks in steps within the budget
    assert k._lowp and k.chunk_size * 50_000 * 4 <= DEFAULT_CHUNK_BYTES
    assert k._rows64 <= k.chunk_size and k._rows64 * 50_000 * 8 <= DEFAULT_CHUNK_BYTES
    k64 = LogDensityKernel(td.Independent(td.Normal(loc, 1.0), 1), precision="float64")
    assert 16 <= k64.chunk_size and k64.chunk_size * 50_000 * 8 <= DEFAULT_CHUNK_BYTES
    kg = LogDensityKernel(Opaque(td.Independent(td.Normal(loc, 1.0), 1)))
    # generic: the (chunk, N, d) broadcast fits the budget, or the chunk is at its floor of 16
    assert kg.chunk_size * 50_000 * 16 * 8 <= DEFAULT_CHUNK_BYTES or kg.chunk_size <= 16


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_chunk_size_must_be_positive(bad):
    """A chunk size that is not a positive int is refused, not used silently."""
    cond = td.Normal(torch.randn(20, dtype=F64), 1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        LogDensityKernel(cond, chunk_size=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        stochmi.mi_from_conditional(cond, seed=0, chunk_size=bad)


def test_non_gaussian_families_are_not_recognised():
    loc = torch.zeros(N, D)
    assert as_gaussian_mixture(td.Independent(td.Laplace(loc, 1.0), 1)) is None
    assert as_gaussian_mixture(td.MultivariateNormal(loc, torch.eye(D))) is None
    assert as_gaussian_mixture(pdist.Delta(loc).to_event(1)) is None


def test_point_masses_raise_deterministic_error():
    loc = torch.zeros(N, D)
    for cond in (pdist.Delta(loc).to_event(1), pdist.Delta(loc[:, 0])):
        with pytest.raises(DeterministicLayerError, match="infinite"):
            LogDensityKernel(cond)
    zero = td.Independent(td.Normal(loc, torch.zeros(N, D), validate_args=False), 1)
    with pytest.raises(DeterministicLayerError, match="infinite"):
        LogDensityKernel(zero)
    assert issubclass(DeterministicLayerError, ValueError)


def test_generator_seed_round_trip():
    gen, seed = make_generator(42)
    assert seed == 42
    assert torch.equal(torch.randn(5, generator=gen), torch.randn(5, generator=_gen(42)))
    state = torch.get_rng_state()
    _, s2 = make_generator(None)
    assert isinstance(s2, int) and torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------ NaN mixture weights and negative scales
@pytest.mark.parametrize("family", ["normal", "laplace"])
@pytest.mark.parametrize("param", ["logits", "probs"])
def test_nan_mixture_weights_give_a_clear_error(family, param):
    """NaN mixture weights give a ValueError that names them, not torch's RuntimeError
    'probability tensor contains either inf, nan or element < 0'."""
    loc = torch.randn(N, D, generator=_gen(30), dtype=F64)
    w = torch.full((N, 2), 0.5, dtype=F64)
    w[3, 1] = math.nan
    comp_cls = td.Normal if family == "normal" else td.Laplace
    comp = td.Independent(comp_cls(torch.stack([loc, loc + 1], 1), 1.0), 1)
    mix = td.MixtureSameFamily(
        td.Categorical(validate_args=False, **{param: w}), comp, validate_args=False
    )
    with pytest.raises(ValueError, match="mixture weights contain NaN"):
        stochmi.mi_from_conditional(mix, seed=0)
    with pytest.raises(ValueError, match="mixture weights contain NaN"):
        stochmi.mi_with_labels(mix, torch.arange(N) % 2, seed=0)


def test_zero_weight_components_are_still_accepted():
    loc = torch.randn(N, D, generator=_gen(31), dtype=F64)
    probs = torch.tensor([1.0, 0.0], dtype=F64).expand(N, 2)
    mix = td.MixtureSameFamily(
        td.Categorical(probs=probs), td.Independent(td.Normal(torch.stack([loc, loc], 1), 1.0), 1)
    )
    plain = td.Independent(td.Normal(loc, 1.0), 1)
    a = stochmi.mi_from_conditional(mix, seed=0)
    assert math.isfinite(a.value)
    assert a.value == pytest.approx(stochmi.mi_from_conditional(plain, seed=0).value, abs=0.2)


@pytest.mark.parametrize("event", ["scalar", "vector"])
def test_negative_scale_is_reported_as_negative(event):
    """A negative scale is reported as negative, not as 'a point mass: zero noise scale'."""
    loc = torch.randn(N, D, generator=_gen(32), dtype=F64)
    scale = torch.ones(N, D, dtype=F64)
    scale[5, 2] = -0.5
    cond = (
        td.Normal(loc[:, 0], scale[:, 2], validate_args=False)
        if event == "scalar"
        else td.Independent(td.Normal(loc, scale, validate_args=False), 1)
    )
    with pytest.raises(ValueError, match="negative") as info:
        stochmi.mi_from_conditional(cond, seed=0)
    assert not isinstance(info.value, DeterministicLayerError)
    assert "point mass" not in str(info.value) and "-0.5" in str(info.value)


def test_prefetched_draws_are_the_same_numbers():
    # the normals drawn on a second thread during the set-up: same generator, same calls
    cond = _structures()["per_dim"][0]
    g1, g2 = _gen(17), _gen(17)
    plain = LogDensityKernel(cond).sample(3, g1)
    kernel = LogDensityKernel(cond, prefetch=(3, g2))
    assert kernel._prefetch is not None
    assert torch.equal(kernel.sample(3, g2), plain)
    assert kernel._prefetch is None
    # the generators are in the same state afterwards
    assert torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2))
    # a different request than the prefetched one draws afresh (and joins the thread)
    g3 = _gen(17)
    other = LogDensityKernel(cond, prefetch=(2, g3))
    assert torch.equal(other.sample(3, _gen(17)), plain)


def test_estimates_do_not_depend_on_prefetching(monkeypatch):
    from stochmi.core import kernel as kmod

    cond = _structures()["shared_scalar"][0]
    a = stochmi.mi_from_conditional(cond, n_draws=2, seed=3)
    monkeypatch.setattr(kmod, "_PREFETCH", False)
    b = stochmi.mi_from_conditional(cond, n_draws=2, seed=3)
    assert (a.value, a.stderr, a.upper) == (b.value, b.stderr, b.upper)
