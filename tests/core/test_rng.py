"""One seed rule everywhere: stochmi.core.rng and its users."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stochmi.core import rng


@pytest.mark.parametrize("seed", [0, 7, 2**63, np.int64(5), np.uint32(9), -1, -(2**63)])
def test_accepted_seeds(seed):
    value = rng.check_seed(seed)
    assert isinstance(value, int) and 0 <= value < 2**64
    gen, used = rng.make_generator(seed)
    assert used == value and gen.initial_seed() == value


def test_negative_seed_is_its_twos_complement_everywhere():
    assert rng.check_seed(-1) == 2**64 - 1
    assert rng.spawn_seeds(-1, 3) == rng.spawn_seeds(2**64 - 1, 3)
    assert rng.derive_seed(-5, 1) == rng.derive_seed(2**64 - 5, 1)
    assert rng.chain_seeds(-2, 2) == rng.chain_seeds(2**64 - 2, 2)
    a = torch.rand(3, generator=rng.make_generator(-3)[0])
    b = torch.rand(3, generator=torch.Generator().manual_seed(-3))
    assert torch.equal(a, b)  # the same value torch itself gives a negative seed


@pytest.mark.parametrize(
    "seed, exc",
    [
        ("1", TypeError),
        (1.0, TypeError),
        (True, TypeError),
        (np.bool_(True), TypeError),
        ([1], TypeError),
        (2**64, ValueError),
        (-(2**63) - 1, ValueError),
    ],
)
def test_rejected_seeds_one_message(seed, exc):
    for fn in (
        rng.check_seed,
        rng.make_generator,
        rng.numpy_generator,
        lambda s: rng.spawn_seeds(s, 2),
        lambda s: rng.derive_seed(s, 1),
        lambda s: rng.chain_seeds(s, 2),
        lambda s: rng.rng_context(s).__enter__(),
    ):
        with pytest.raises(exc, match=r"seed must be None or an integer in \[-2\*\*63, 2\*\*64\)"):
            fn(seed)


def test_none_draws_a_fresh_seed_and_reports_it():
    _, a = rng.make_generator(None)
    _, b = rng.make_generator(None)
    assert a != b and 0 <= a < 2**56
    assert rng.spawn_seeds(None, 2) != rng.spawn_seeds(None, 2)


def test_derived_seeds_unchanged_for_non_negative_seeds():
    """The rule changes nothing for the seeds that worked before (stored results stay valid)."""
    ss = np.random.SeedSequence([3, 1, 2]).generate_state(1)
    assert rng.derive_seed(3, 1, 2) == int(ss[0] & 0x7FFFFFFF)
    spawned = [
        int(s.generate_state(1, np.uint64)[0] >> np.uint64(2))
        for s in np.random.SeedSequence(11).spawn(3)
    ]
    assert rng.spawn_seeds(11, 3) == spawned


def test_rng_context_restores_global_state():
    before = torch.random.get_rng_state()
    with rng.rng_context(-7):
        x = torch.rand(2)
    with rng.rng_context(2**64 - 7):
        y = torch.rand(2)
    assert torch.equal(x, y) and torch.equal(torch.random.get_rng_state(), before)


def test_users_share_the_rule():
    """mi_from_conditional, the data subsets, baselines and model builders: same rule."""
    from stochmi import mi_from_conditional
    from stochmi.benchmarking.baselines.util import make_generator as baseline_generator
    from stochmi.data.mnist import _generator as data_generator

    cond = torch.distributions.Independent(torch.distributions.Normal(torch.randn(20, 2), 1.0), 1)
    a = mi_from_conditional(cond, seed=-1)
    b = mi_from_conditional(cond, seed=2**64 - 1)
    assert a.value == b.value
    for make in (baseline_generator, data_generator):
        assert make(-1).initial_seed() == 2**64 - 1
        with pytest.raises(TypeError, match="seed must be None or an integer"):
            make("1")
    with pytest.raises(TypeError, match="seed must be None or an integer"):
        mi_from_conditional(cond, seed="1")


def test_draw_seed_is_a_62_bit_draw_from_the_private_generator():
    gen = torch.Generator().manual_seed(4)
    before = torch.random.get_rng_state()
    seeds = [rng.draw_seed(gen) for _ in range(3)]
    assert torch.equal(torch.random.get_rng_state(), before)
    assert all(isinstance(s, int) and 0 <= s < 2**62 for s in seeds)
    assert len(set(seeds)) == 3  # the generator advances
    again = torch.Generator().manual_seed(4)
    assert seeds == [rng.draw_seed(again) for _ in range(3)]


def test_rng_context_takes_a_list_of_devices_and_seeds_like_manual_seed():
    with rng.rng_context(11, [torch.device("cpu"), "cpu"]):
        a = torch.rand(3)
    b = torch.rand(3, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a, b)
