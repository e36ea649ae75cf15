"""The heap settings around the deep-layer estimator's rounds."""

import pyro.distributions as dist
import pytest
import torch

from stochmi.layers import heap


class _RecordingLibc:
    """Stands for glibc: records mallopt and malloc_trim calls in order."""

    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def _expected(thresholds):
    mmap, trim = thresholds
    return [("mallopt", heap._M_MMAP_THRESHOLD, mmap), ("mallopt", heap._M_TRIM_THRESHOLD, trim)]


def test_thresholds_raised_inside_and_settled_after_even_on_error(monkeypatch):
    libc = _RecordingLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    with heap.heap_for_temporaries():
        assert libc.calls == _expected(heap.DURING)
    assert libc.calls == _expected(heap.DURING) + _expected(heap.AFTER) + [("malloc_trim", 0)]
    libc.calls.clear()
    with pytest.raises(RuntimeError), heap.heap_for_temporaries():
        raise RuntimeError("inside a round")
    assert libc.calls == _expected(heap.DURING) + _expected(heap.AFTER) + [("malloc_trim", 0)]
    assert heap.DURING[0] > heap.AFTER[0] and heap.DURING[1] > heap.AFTER[1]


def _tanh_problem(n: int, d: int, seed: int):
    """A two-layer tanh chain: layer-1 means, scale, links, queries and anchors."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(d - 1, d, generator=g, dtype=torch.float64)

    def link(p):
        return dist.Normal(torch.tanh(p @ w.T), 0.5).to_event(1)

    t1 = loc + torch.randn(n, d, generator=g, dtype=torch.float64)
    return loc, torch.ones(n, d), [link], link(t1).sample(), [t1]


def _densities(problem, **kw):
    from stochmi.layers import deep

    gen = torch.Generator().manual_seed(5)
    return deep.deep_log_density(
        *problem, n_is=4, n_fwd=4, generator=gen, dtype=torch.float64, **kw
    )


def test_deep_log_density_runs_inside_the_heap_settings(monkeypatch):
    from stochmi.layers import deep

    libc = _RecordingLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    seen = []
    real = deep._Pool

    def pool(*args, **kwargs):  # called inside the round: the thresholds are raised
        seen.append(list(libc.calls))
        return real(*args, **kwargs)

    monkeypatch.setattr(deep, "_Pool", pool)
    _densities(_tanh_problem(12, 3, seed=0))
    assert seen == [_expected(heap.DURING)]
    assert libc.calls[-1] == ("malloc_trim", 0)


def test_without_glibc_the_body_runs_alone(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    ran = []
    with heap.heap_for_temporaries():
        ran.append(True)
    assert ran == [True]


def test_same_numbers_with_and_without_the_heap_settings(monkeypatch):
    """Where memory comes from does not change any number (glibc here, or a no-op)."""
    problem = _tanh_problem(20, 4, seed=1)
    with_settings = _densities(problem, n_bridge=2).L
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert torch.equal(_densities(problem, n_bridge=2).L, with_settings)
