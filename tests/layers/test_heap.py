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
    g = torch.Generator().manual_seed(0)
    n = 12
    loc = torch.randn(n, 3, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64)

    def link(p):
        return dist.Normal(torch.tanh(p @ w.T), 0.5).to_event(1)

    t1 = loc + torch.randn(n, 3, generator=g, dtype=torch.float64)
    t2 = link(t1).sample()
    deep.deep_log_density(
        loc, torch.ones(n, 3), [link], t2, [t1], n_is=4, n_fwd=4, generator=g, dtype=torch.float64
    )
    assert seen == [_expected(heap.DURING)]
    assert libc.calls[-1] == ("malloc_trim", 0)


def test_without_glibc_nothing_is_called(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    with heap.heap_for_temporaries():
        pass
    heap.release_free_heap()


def test_same_numbers_with_and_without_the_heap_settings(monkeypatch):
    """Where memory comes from does not change any number (glibc here, or a no-op)."""
    from stochmi.layers import deep

    g = torch.Generator().manual_seed(1)
    n = 20
    loc = torch.randn(n, 4, generator=g, dtype=torch.float64)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)

    def link(p):
        return dist.Normal(torch.tanh(p @ w.T), 0.4).to_event(1)

    t1 = loc + torch.randn(n, 4, generator=g, dtype=torch.float64)
    t2 = link(t1).sample()

    def run():
        gen = torch.Generator().manual_seed(5)
        return deep.deep_log_density(
            loc,
            torch.ones(n, 4),
            [link],
            t2,
            [t1],
            n_is=4,
            n_fwd=4,
            n_bridge=2,
            generator=gen,
            dtype=torch.float64,
        ).L

    with_settings = run()
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert torch.equal(run(), with_settings)
