"""Histogram estimators: plug-in maths on hand cases, and the binning failure on MNIST."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stochmi.benchmarking.baselines import Binning, NaiveHistogram
from stochmi.benchmarking.baselines.histogram import bin_codes


def _plugin_mi(a, b):
    """I = sum p(a,b) log p(a,b) / (p(a) p(b)) from counts (independent formula)."""
    n = len(a)
    out = 0.0
    for u in set(a):
        for v in set(b):
            c = sum(1 for i in range(n) if a[i] == u and b[i] == v)
            if c:
                pa = sum(1 for i in range(n) if a[i] == u) / n
                pb = sum(1 for i in range(n) if b[i] == v) / n
                out += c / n * math.log((c / n) / (pa * pb))
    return out


def test_bin_codes_hand_case():
    a = np.array([[0.0, 1.0], [0.24, 1.0], [0.26, 0.0], [1.0, 0.5]])
    # 4 bins over [0, 1]: bin width 0.25 -> per-coordinate indices (0,3), (0,3), (1,0), (3,2)
    codes = bin_codes(a, 4)
    assert codes[0] == codes[1] and len(set(codes.tolist())) == 3
    fixed = bin_codes(np.array([[-5.0], [0.1], [5.0]]), 2, (-1.0, 1.0))  # clipped to end bins
    assert fixed.tolist() == [0, 1, 1]


def test_naive_matches_plugin_formula_on_labels():
    x = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    t = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    got = NaiveHistogram().estimate(x, t).value
    assert got == pytest.approx(_plugin_mi(x.tolist(), t.tolist()), abs=1e-12)


def test_naive_on_continuous_equals_plugin_of_bin_indices():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 1))
    t = x + 0.5 * rng.standard_normal((300, 1))
    est = NaiveHistogram(n_bins=6).estimate(x, t)
    bx = np.clip(np.floor((x - x.min()) / ((x.max() - x.min()) / 6)), 0, 5).ravel()
    bt = np.clip(np.floor((t - t.min()) / ((t.max() - t.min()) / 6)), 0, 5).ravel()
    assert est.value == pytest.approx(_plugin_mi(bx.tolist(), bt.tolist()), abs=1e-12)


def test_binning_labels_hand_case():
    layer = np.array([[0.1], [0.2], [0.9], [0.8], [0.15], [0.85]])
    y = np.array([0, 0, 1, 1, 1, 0])
    # 2 bins over [0, 1]: T_b = [0, 0, 1, 1, 0, 1]
    tb = [0, 0, 1, 1, 0, 1]
    expected = _plugin_mi(tb, y.tolist())
    got = Binning(n_bins=2, value_range=(0.0, 1.0)).estimate(layer, y)
    assert got.value == pytest.approx(expected, abs=1e-12)
    assert got.extra["target"] == "I(T;Y)"


def test_binning_input_as_discrete_variable():
    # repeated inputs with different layer values: H(T_b | X) > 0 is subtracted
    x = np.array([[0.0], [0.0], [1.0], [1.0]])
    t = np.array([[0.1], [0.9], [0.1], [0.1]])
    got = Binning(n_bins=2, value_range=(0, 1)).estimate(x, t).value
    assert got == pytest.approx(_plugin_mi([0, 0, 1, 1], [0, 1, 0, 0]), abs=1e-12)


def test_binning_of_deterministic_mnist_layer_grows_with_bins(mnist_layer):
    """Documented failure: for a deterministic layer the value is set by the bin count."""
    x, t = mnist_layer
    values = [
        Binning(n_bins=b, value_range=(-1, 1)).estimate(x, t).value for b in (2, 4, 8, 32, 256)
    ]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:])), values
    assert values[-1] - values[0] > 2.0
    assert values[-1] == pytest.approx(math.log(len(x)), abs=0.05)  # every image its own bin
    naive = [NaiveHistogram(n_bins=b).estimate(x, t).value for b in (2, 256)]
    assert naive[1] - naive[0] > 2.0


@pytest.fixture(scope="module")
def mnist_layer():
    from stochmi.data.mnist import load_mnist

    data = load_mnist("shared-test", n=400, seed=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lin = torch.nn.Linear(784, 4)  # a narrow (bottleneck-like) layer
    with torch.no_grad():
        t = torch.tanh(lin(data.x))
    return data.x, t


def test_errors():
    with pytest.raises(ValueError, match="n_bins"):
        NaiveHistogram(n_bins=0)
    with pytest.raises(ValueError, match="high > low"):
        Binning(value_range=(1.0, 0.0))
    with pytest.raises(ValueError, match="value_range"):
        Binning(value_range="fixed")
    with pytest.raises(ValueError, match="same number of rows"):
        NaiveHistogram().estimate(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        Binning().estimate(np.zeros((5, 2)), np.full((5, 2), np.nan))
    with pytest.raises(TypeError, match="torch.Tensor, numpy array, pandas DataFrame"):
        Binning().estimate("abc", np.zeros((5, 2)))
