"""The bridged audit of unbridged deep densities (stochmi.layers.audit)."""

from __future__ import annotations

import math

import pytest
import torch

from stochmi import layer_mi
from stochmi.core.from_matrix import mi_terms_from_log_density
from stochmi.layers import deep
from stochmi.layers.audit import _weights, audit_densities
from stochmi.layers.deep import deep_log_density
from tests.layers.test_deep import LinearChain, _problem, _separated_chain, _x


def test_audit_weights_stand_in_for_every_source():
    """Each query's weights add up to N: a constant density gets its exact marginal."""
    n = 50
    cols = torch.tensor([0, 3, 4, 7, 9, 12, 20, 31, 40, 45])
    pos = torch.tensor([0, 2])  # queries 0 and 4
    top = torch.tensor([[1, 3], [2, 5]])  # positions in cols
    rand = torch.tensor([3, 6, 7, 8, 9])
    w = _weights(n, cols, pos, top, rand).exp()
    assert torch.allclose(w.sum(1), torch.full((2,), float(n), dtype=w.dtype))
    assert float(w[0, 4]) == 0.0  # another query's top source, not in R: no weight
    every = _weights(len(cols), cols, pos, top, rand)  # the sub-problem holds every source
    assert torch.equal(every, torch.zeros(2, len(cols), dtype=torch.float64))


def _audited_first_round(m: LinearChain, x: torch.Tensor):
    """An unbridged first round at the defaults of ``layer_mi`` and its audit; also the
    round's MI value."""
    prob = _problem(m, x, 5)
    gen = torch.Generator().manual_seed(0)
    plain = deep_log_density(*prob, n_is=32, n_fwd=16, generator=gen, dtype=torch.float64)
    audit = audit_densities(
        *prob, plain.L, n_is=32, n_fwd=16, n_bridge=4, generator=gen, dtype=torch.float64
    )
    return audit, float(mi_terms_from_log_density(plain.L)[0].mean())


def test_audit_finds_the_mass_the_unbridged_proposals_miss(monkeypatch):
    """Without pair sources (shifted draws), ``q_j`` and the forward paths miss most of
    the other sources' mass on the separated chain: the audit finds it."""
    monkeypatch.setattr(deep, "_PAIR_SOURCES", 0)
    audit, value = _audited_first_round(_separated_chain(), _x(400, 20, 13))
    assert audit.queries == 32 and audit.sources < 400
    assert audit.difference > 0  # the unbridged estimate is too high
    assert audit.missed(0.01 * value, value)


@pytest.mark.slow
def test_audit_passes_densities_both_proposals_reach():
    """4-6-5, noise 2 then 0.25: the first round is right; the audit finds no difference
    beyond its standard error."""
    audit, value = _audited_first_round(LinearChain([4, 6, 5], [2.0, 0.25], 1), _x(600, 4, 13))
    assert abs(audit.difference) <= 3 * audit.stderr
    assert not audit.missed(0.02, value)


@pytest.mark.slow
def test_layer_mi_bridges_a_first_round_that_the_audit_finds_off(monkeypatch):
    """Without pair sources, the first round of I(X; h2) passes the half-versus-full rule
    at 5.39 nats, where the data set's MI is 4.24: the audit sends the row to the
    bridged round."""
    monkeypatch.setattr(deep, "_PAIR_SOURCES", 0)
    m = _separated_chain()
    x = _x(400, 20, 13)
    df = layer_mi(m, x, seed=1, pairs=[("X", "h2")])
    r, conv = df.iloc[0], df.attrs["path_convergence"]["X->h2"]
    assert conv["n_bridge"] > 0 and conv["audit"]["difference"] > 0
    truth, (ref, ref_se) = m.reference(r, x, 101)
    assert abs(r.value - ref) <= 3 * math.hypot(r.stderr, ref_se) + r.mc_bias
    assert r.lower - 3 * r.lower_stderr <= truth <= r.upper + 3 * r.upper_stderr
    assert r.converged
