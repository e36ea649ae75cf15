"""Fixed point of the replica formula of Gabrie et al. (2018) and its free entropy.

Model: ``t_0 = x`` with i.i.d. entries from the prior, and for ``l = 1..L``
``t_l = phi_l(W_l t_{l-1} + xi_l)``, ``xi_l ~ N(0, delta_l I)``.  The replica-symmetric
(equivalently, expectation-consistent / ML-VAMP state-evolution) potential for
orthogonally-invariant ``W_l`` is written on the chain of variables
``t_0, h_1, t_1, ..., t_{L-1}, h_L`` (``h_l = W_l t_{l-1}``).  Every variable ``v``
carries two scalar precisions: ``a_v`` (prior-side message: ``v = r + N(0, 1/a_v)``)
and ``b_v`` (data-side message: ``r' = v + N(0, 1/b_v)``).  The potential is

    Phi = n_0 E log p(R_0)                                   (prior, observed at b_{t_0})
        + sum_l  -1/2 sum_{mu in spec(W_l W_l^T)} log 2 pi e (mu / a_{t_{l-1}} + 1 / b_{h_l})
        + sum_{l<L} n_l E log p(R_l | r)                     (inner channels)
        + n_L E log p(t_L | r)                                 (last channel)
        + sum_v n_v / 2 log 2 pi e (1/a_v + 1/b_v),

and its stationary points are the fixed points of the variance-matching equations
``Var_left(v) = Var_right(v) = 1 / (a_v + b_v)`` (each factor's posterior variance,
averaged).  ``H(T_L) / n_0 = -Phi / n_0`` at the stationary point with the largest
``Phi`` (smallest mutual information), which is the extremum the formula prescribes.
The linear factors enter only through the spectrum of ``W_l W_l^T``: the empirical
one for given matrices, Marchenko-Pastur for i.i.d. Gaussian weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stochmi.replica.channels import Activation, Prior
from stochmi.replica.spectra import Spectrum

__all__ = ["FixedPoint", "solve"]

_LO, _HI = 1e-10, 1e10


@dataclass
class FixedPoint:
    """Result of :func:`solve` for one network (entropy of its last layer)."""

    entropy: float  # H(T_L), nats (total)
    free_entropy: float
    converged: bool
    n_iter: int
    a_t: np.ndarray
    b_t: np.ndarray
    a_h: np.ndarray
    b_h: np.ndarray
    candidates: list  # (init, free entropy, converged) for every initial condition


def _linear_block(spec: Spectrum, a: float, b: float) -> tuple[float, float, float]:
    """(log Z, mean posterior var of t, mean posterior var of h) of ``h = W t``."""
    vt = spec.sum_over_in(lambda lam: 1.0 / (a + b * lam), 1.0 / a) / spec.n_in
    vh = spec.sum_over_in(lambda lam: lam / (a + b * lam), 0.0) / spec.n_out
    logz = -0.5 * spec.sum_over_out(
        lambda mu: np.log(2 * np.pi * np.e * (mu / a + 1.0 / b)), np.log(2 * np.pi * np.e / b)
    )
    return logz, vt, vh


def _clip(x):
    return float(np.clip(x, _LO, _HI))


def _inv(v):
    return 1.0 / max(float(v), 1e-300)


class _Chain:
    def __init__(
        self, prior: Prior, specs: list[Spectrum], acts: list[Activation], deltas: list[float]
    ):
        self.prior, self.specs, self.acts, self.deltas = prior, specs, acts, deltas
        self.L = len(specs)
        self.n = [specs[0].n_in] + [s.n_out for s in specs]
        rho_t = [prior.second_moment]
        rho_h = [np.nan]
        for l in range(1, self.L + 1):
            rho_h.append(specs[l - 1].trace() / specs[l - 1].n_out * rho_t[l - 1])
            rho_t.append(acts[l - 1].second_moment(rho_h[l], deltas[l - 1]))
        self.rho_t, self.rho_h = rho_t, rho_h

    def inner(self, l, a, b):
        return self.acts[l - 1].inner_terms(a, b, self.rho_h[l], self.deltas[l - 1])

    def last(self, a):
        return self.acts[-1].last_terms(a, self.rho_h[self.L], self.deltas[-1])

    def sweep(self, a_t, b_t, a_h, b_h, damp):
        L = self.L
        new = lambda old, val: _clip(old ** (1 - damp) * _clip(val) ** damp)  # noqa: E731
        _, v0 = self.prior.terms(b_t[0])
        a_t[0] = new(a_t[0], _inv(v0) - b_t[0])
        for l in range(1, L + 1):
            _, _, vh = _linear_block(self.specs[l - 1], a_t[l - 1], b_h[l])
            a_h[l] = new(a_h[l], _inv(vh) - b_h[l])
            if l < L:
                _, _, vt = self.inner(l, a_h[l], b_t[l])
                a_t[l] = new(a_t[l], _inv(vt) - b_t[l])
        _, vh = self.last(a_h[L])
        b_h[L] = new(b_h[L], _inv(vh) - a_h[L])
        for l in range(L, 0, -1):
            _, vt, _ = _linear_block(self.specs[l - 1], a_t[l - 1], b_h[l])
            b_t[l - 1] = new(b_t[l - 1], _inv(vt) - a_t[l - 1])
            if l - 1 >= 1:
                _, vh, _ = self.inner(l - 1, a_h[l - 1], b_t[l - 1])
                b_h[l - 1] = new(b_h[l - 1], _inv(vh) - a_h[l - 1])

    def free_entropy(self, a_t, b_t, a_h, b_h) -> float:
        L, n = self.L, self.n
        gauss = lambda a, b: 0.5 * np.log(2 * np.pi * np.e * (1.0 / a + 1.0 / b))  # noqa: E731
        phi = n[0] * self.prior.terms(b_t[0])[0] + n[0] * gauss(a_t[0], b_t[0])
        for l in range(1, L + 1):
            phi += _linear_block(self.specs[l - 1], a_t[l - 1], b_h[l])[0]
            phi += n[l] * gauss(a_h[l], b_h[l])
            if l < L:
                phi += n[l] * self.inner(l, a_h[l], b_t[l])[0] + n[l] * gauss(a_t[l], b_t[l])
        phi += n[L] * self.last(a_h[L])[0]
        return float(phi)


def solve(
    prior: Prior,
    specs: list[Spectrum],
    acts: list[Activation],
    deltas: list[float],
    *,
    tol: float = 1e-9,
    max_iter: int = 1000,
    damping: float = 0.7,
    inits: tuple[float, ...] = (1e-6, 1.0, 1e6),
) -> FixedPoint:
    """Iterate the fixed point from several initial conditions; keep the largest ``Phi``.

    Each initial condition sets every data-side precision ``b`` to the given value
    (small: uninformative start; large: informed start).  Iteration stops when no
    log-precision moves by more than ``tol``; ``damping`` is the weight of the new
    value in a geometric mean with the old one.
    """
    chain = _Chain(prior, specs, acts, deltas)
    L = chain.L
    results = []
    for b0 in inits:
        a_t, b_t = np.ones(L), np.full(L, b0)
        a_h, b_h = np.ones(L + 1), np.full(L + 1, b0)
        a_h[0] = b_h[0] = np.nan
        for l in range(1, L + 1):
            a_h[l] = 1.0 / max(chain.rho_h[l], 1e-12)
        for l in range(L):
            a_t[l] = 1.0 / max(chain.rho_t[l], 1e-12)
        converged, it = False, 0
        for it in range(1, max_iter + 1):  # noqa: B007 - it is read after the loop
            old = np.log(np.concatenate([a_t, b_t, a_h[1:], b_h[1:]]))
            chain.sweep(a_t, b_t, a_h, b_h, damping)
            cur = np.log(np.concatenate([a_t, b_t, a_h[1:], b_h[1:]]))
            if np.max(np.abs(cur - old)) < tol:
                converged = True
                break
        phi = chain.free_entropy(a_t, b_t, a_h, b_h)
        results.append((b0, phi, converged, it, a_t.copy(), b_t.copy(), a_h.copy(), b_h.copy()))
    ok = [r for r in results if np.isfinite(r[1])]
    best = max(ok, key=lambda r: (r[2], r[1])) if ok else results[0]
    # among converged candidates, the largest free entropy; unconverged only if none converged
    conv = [r for r in ok if r[2]]
    if conv:
        best = max(conv, key=lambda r: r[1])
    _, phi, converged, it, a_t, b_t, a_h, b_h = best
    return FixedPoint(
        -phi, phi, converged, it, a_t, b_t, a_h, b_h, [(r[0], r[1], r[2]) for r in results]
    )
