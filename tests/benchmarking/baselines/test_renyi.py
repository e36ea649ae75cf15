"""Matrix-based Renyi MI and Parzen quadratic MI against hand-computed small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stochmi.benchmarking.baselines import MatrixRenyi, ParzenQMI

X = np.array([[0.0], [0.5], [1.5], [3.0]])
T = np.array([[0.0, 1.0], [0.2, 0.8], [1.0, -1.0], [2.0, 0.5]])
Y = np.array([0, 0, 1, 1])


def _gauss_gram(a, sigma, denom):
    n = len(a)
    k = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            k[i, j] = math.exp(-float(np.sum((a[i] - a[j]) ** 2)) / (denom * sigma**2))
    return k


def _renyi(mat, alpha):
    lam = np.clip(np.linalg.eigvalsh(mat), 0, None)
    lam = lam / lam.sum()
    if alpha == 1.0:
        lam = lam[lam > 0]
        return float(-(lam * np.log(lam)).sum())
    return float(np.log((lam**alpha).sum()) / (1 - alpha))


@pytest.mark.parametrize("alpha", [1.01, 2.0, 1.0])
def test_matrix_renyi_hand_case(alpha):
    sx, st = 0.7, 1.3
    a = _gauss_gram(X, sx, 2.0) / 4
    b = _gauss_gram(T, st, 2.0) / 4
    ab = a * b / np.trace(a * b)
    expected = _renyi(a, alpha) + _renyi(b, alpha) - _renyi(ab, alpha)
    got = MatrixRenyi(alpha=alpha, sigma_x=sx, sigma_t=st).estimate(X, T)
    assert got.value == pytest.approx(expected, abs=1e-10)
    assert got.n == 4 and math.isnan(got.stderr)


def test_matrix_renyi_alpha2_closed_form_and_labels():
    # alpha = 2: S_2(A) = -log tr(A^2) = -log sum_ij A_ij^2
    sx = 0.9
    a = _gauss_gram(X, sx, 2.0) / 4
    b = (Y[:, None] == Y[None, :]).astype(float) / 4
    ab = a * b / np.trace(a * b)
    s2 = lambda m: -math.log(float((m * m).sum()))  # noqa: E731
    expected = s2(a) + s2(b) - s2(ab)
    got = MatrixRenyi(alpha=2.0, sigma_x=sx).estimate(X, Y)
    assert got.value == pytest.approx(expected, abs=1e-10)


def test_matrix_renyi_orders_dependence_but_depends_on_width():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 2))
    z = rng.standard_normal((300, 2))
    indep_values = []
    for s in (0.5, 1.0, 2.0):
        est = MatrixRenyi(sigma_x=s, sigma_t=s)
        same, noisy, indep = (est.estimate(x, b).value for b in (x, x + 0.5 * z, z))
        assert math.log(300) >= same > noisy > indep > -1e-9
        indep_values.append(indep)
    # independent variables: the value is a kernel-width artefact that shrinks with the width
    assert indep_values[0] > 1.0 > 0.1 > indep_values[2]


@pytest.mark.parametrize("kind", ["cs", "renyi2"])
def test_parzen_qmi_hand_case(kind):
    sx, st = 0.8, 1.1
    kx = _gauss_gram(X, sx, 4.0)  # two windows of variance s^2 convolve to 2 s^2
    kt = _gauss_gram(T, st, 4.0)
    n = 4
    vj = sum(kx[i, j] * kt[i, j] for i in range(n) for j in range(n)) / n**2
    vm = (kx.sum() / n**2) * (kt.sum() / n**2)
    vc = sum(kx[i].sum() * kt[i].sum() for i in range(n)) / n**3
    expected = math.log(vj * vm / vc**2) if kind == "cs" else math.log(vj / vm)
    got = ParzenQMI(kind=kind, sigma_x=sx, sigma_t=st).estimate(X, T)
    assert got.value == pytest.approx(expected, abs=1e-12)


def test_parzen_qmi_normalising_constants_cancel():
    # renyi2 = H2(X) + H2(T) - H2(X,T) with the *normalised* Parzen quadratic entropies
    sx, st = 0.6, 0.9
    n = len(X)

    def h2(a, s):
        d = a.shape[1]
        c = (4 * math.pi * s**2) ** (-d / 2)  # N(0, 2 s^2 I) density at 0
        return -math.log(c * _gauss_gram(a, s, 4.0).sum() / n**2)

    cx = (4 * math.pi * sx**2) ** (-0.5)
    ct = (4 * math.pi * st**2) ** (-1.0)
    joint = cx * ct * (_gauss_gram(X, sx, 4.0) * _gauss_gram(T, st, 4.0)).sum() / n**2
    expected = h2(X, sx) + h2(T, st) + math.log(joint)
    got = ParzenQMI(kind="renyi2", sigma_x=sx, sigma_t=st).estimate(X, T).value
    assert got == pytest.approx(expected, abs=1e-12)


def test_parzen_cs_nonnegative_and_chunking_invariant():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((257, 3))
    t = x[:, :2] + 0.5 * rng.standard_normal((257, 2))
    a = ParzenQMI(chunk_size=1000).estimate(x, t).value
    b = ParzenQMI(chunk_size=17).estimate(x, t).value
    assert a == pytest.approx(b, rel=1e-12)
    assert a > 0
    lab = ParzenQMI().estimate(x, (x[:, 0] > 0).astype(int))
    assert lab.value > 0


def test_kernel_width_rules_and_errors():
    with pytest.raises(ValueError, match="alpha"):
        MatrixRenyi(alpha=0)
    with pytest.raises(ValueError, match="kind"):
        ParzenQMI(kind="kl")
    with pytest.raises(ValueError, match="kernel width"):
        MatrixRenyi(sigma_x="silly").estimate(X, T)
    with pytest.raises(ValueError, match="positive"):
        ParzenQMI(sigma_x=-1.0).estimate(X, T)
    with pytest.raises(ValueError, match="same number of rows"):
        MatrixRenyi().estimate(X, T[:3])
    v_med = MatrixRenyi(sigma_x="median", sigma_t="median").estimate(X, T)
    assert np.isfinite(v_med.value)
