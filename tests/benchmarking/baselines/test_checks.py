"""Baseline checks: divergence flags, discrete inputs announced, shared input checks,
and the seed used returned in ``extra``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from stochmi.benchmarking import baselines
from stochmi.benchmarking.baselines.neural import NWJ, InfoNCE, divergence_reason

FAST = {"max_steps": 60, "eval_every": 20, "batch_size": 64, "eval_repeats": 1}


def _gauss(n=400, seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 1))
    return x, x + r.normal(size=(n, 1))


def test_divergence_is_flagged_and_warned(monkeypatch):
    """Item 12: a -1.7e7 nats result comes with extra['diverged'] and a warning."""
    x, t = _gauss()
    est = NWJ(**FAST)
    real = est._evaluate

    def exploding(f, xs, ts, repeats, gen):
        v, terms = real(f, xs, ts, repeats, gen)
        return -1.7e7, terms * 1e8

    monkeypatch.setattr(est, "_evaluate", exploding)
    with pytest.warns(RuntimeWarning, match="nwj: the critic diverged"):
        res = est.estimate(x, t, seed=0)
    assert res.extra["diverged"] is True and "exploding" in res.extra["divergence"]


def test_divergence_reason():
    ok = torch.tensor([0.1, -0.2])
    assert divergence_reason(0.3, ok, [(1, 0.2)]) == ""
    assert "far below 0" in divergence_reason(-31.8, ok, [(1, 0.2)])
    assert "non-finite" in divergence_reason(math.nan, ok, [])
    assert "step 7" in divergence_reason(0.1, ok, [(7, math.inf)])


def test_no_divergence_flag_on_healthy_run():
    x, t = _gauss()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = InfoNCE(**FAST).estimate(x, t, seed=1)
    assert res.extra["diverged"] is False and res.extra["divergence"] == ""


@pytest.mark.parametrize("name", ["ksg", "kde", "binning"])
def test_discrete_choice_is_announced(name):
    """Item 13: integer arrays are taken as labels, and the result says so."""
    r = np.random.default_rng(0)
    x = r.normal(size=(300, 2))
    labels = r.integers(0, 3, size=300)
    est = baselines.get(name)
    assert est.estimate(x, labels, seed=0).extra["t_discrete"] is True
    as_float = est.estimate(x, labels.astype(float), seed=0).extra
    assert as_float["t_discrete"] is False and as_float["x_discrete"] is False


def test_binning_rejects_nan_and_3d_like_the_others():
    """Item 14."""
    x, t = _gauss(200)
    bad = x.copy()
    bad[3, 0] = np.nan
    for name in ("binning", "ksg"):
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            baselines.get(name).estimate(bad, t)
        with pytest.raises(ValueError, match=r"x must have shape \(N, d\) or \(N,\)"):
            baselines.get(name).estimate(x.reshape(200, 1, 1), t)


@pytest.mark.parametrize("name", ["cs_qmi", "renyi", "kde", "naive", "infonce"])
def test_dataframe_inputs_work(name):
    """A pandas DataFrame as x is accepted like an array."""
    x, t = _gauss(200)
    kw = FAST if name == "infonce" else {}
    a = baselines.get(name, **kw).estimate(pd.DataFrame(x, columns=["a"]), t, seed=0)
    b = baselines.get(name, **kw).estimate(x, t, seed=0)
    assert a.value == pytest.approx(b.value)


def test_unsupported_input_names_the_right_argument():
    x, t = _gauss(50)
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor, numpy array, pandas"):
        baselines.get("kde").estimate({"a": 1}, t)


def test_ksg_empty_input_error_without_numpy_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="need at least 2 samples, got 0"):
            baselines.get("ksg").estimate(np.zeros((0, 1)), np.zeros((0, 1)))


def test_seed_used_is_returned_and_replays():
    """Item 15: seed=None is nondeterministic, but the seed used comes back in extra."""
    x, t = _gauss()
    first = InfoNCE(**FAST).estimate(x, t)
    seed = first.extra["seed"]
    assert isinstance(seed, int)
    again = InfoNCE(**FAST).estimate(x, t, seed=seed)
    assert again.value == first.value
    assert baselines.get("ksg").estimate(x, t).extra["seed"] >= 0
