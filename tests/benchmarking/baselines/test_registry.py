"""The baseline protocol and registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stochmi import baselines
from stochmi.core.estimate import MIEstimate

EXPECTED = {
    "naive", "binning", "kde", "ksg", "mine", "nwj", "infonce", "smile",
    "renyi", "cs_qmi", "vinfo_linear", "vinfo_mlp",
}  # fmt: skip
FAST = {"max_steps": 20, "eval_every": 10}


def test_registry_holds_every_family():
    assert set(baselines.REGISTRY) == EXPECTED
    for name, cls in baselines.REGISTRY.items():
        assert cls.name == name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_estimator_follows_the_protocol(name):
    params = FAST if name in ("mine", "nwj", "infonce", "smile") else {}
    est = baselines.get(name, **params)
    assert isinstance(est, baselines.MIEstimator)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 2, generator=g)
    t = x[:, :1] + 0.5 * torch.randn(120, 1, generator=g)
    out = est.estimate(x, t, seed=0)
    assert isinstance(out, MIEstimate) and np.isfinite(out.value)
    assert out.n == 120
    # numpy input gives the same number as torch input, and the seed reproduces
    again = est.estimate(x.numpy(), t.numpy(), seed=0)
    assert again.value == pytest.approx(out.value, rel=1e-6, abs=1e-6)
    # integer labels as t are accepted
    y = (x[:, 0] > 0).long()
    assert np.isfinite(est.estimate(x, y, seed=0).value)


def test_get_unknown_name_and_bad_params():
    with pytest.raises(KeyError, match="known: "):
        baselines.get("histogramme")
    with pytest.raises(TypeError):
        baselines.get("ksg", bins=3)
