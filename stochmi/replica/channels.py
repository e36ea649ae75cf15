"""Scalar pieces of the replica formula: the input prior and the layer channels.

Every function here is a one-dimensional (or, for inner noisy layers, a small fixed
three-dimensional) integral, done by Gauss-Hermite / Gauss-Legendre quadrature with
all inner integrals over the piecewise-linear activations in closed form through
(truncated) Gaussian moments.  Where the integrand changes on a scale much narrower
than the Gaussian it is averaged against (near a kink of the activation, within a few
noise standard deviations; near 0 for the spike-slab prior), the rule is a composite
Gauss-Legendre one with panels refined there (:func:`_gauss_nodes`): the conditional
entropy, the last layer's terms and the spike-slab prior's terms.  Linear channels
and the normal prior are closed form.

Conventions (all per unit, natural logs):

- Prior ``x ~ P0`` seen through ``R = x + N(0, 1/b)``:
  ``prior_terms(b) -> (E log p(R), E Var(x | R))``.
- Channel ``t = phi(u)``, ``u = h + xi``, ``xi ~ N(0, delta)``, where the replica
  decoupling gives ``h = r + z``, ``r ~ N(0, q)``, ``z ~ N(0, 1/a)`` (``q = rho_h - 1/a``),
  so that ``u | r ~ N(r, V)``, ``V = 1/a + delta``.

  * last layer (``t`` observed): ``E log p(t | r)`` and ``E Var(h | r, t)``;
  * inner layer (``t`` seen through ``R = t + N(0, 1/b)``): ``E log p(R | r)``,
    ``E Var(h | r, R)`` and ``E Var(t | r, R)``.

  Densities of outputs with atoms (ReLU, hardtanh, sign with noise before the
  activation) are taken with respect to Lebesgue measure plus counting measure on the
  atoms; the conditional entropy ``H(t | h)`` uses the same reference, so their
  difference (a mutual information) does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.special import log_ndtr

__all__ = ["Prior", "Activation", "make_prior", "make_activation"]

_LOG2PI = np.log(2.0 * np.pi)


def _gauss_hermite(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights for E f(Z), Z ~ N(0, 1)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / np.sqrt(2.0 * np.pi)


_GH = {n: _gauss_hermite(n) for n in (16, 24, 32, 48, 64, 96)}
_GL = {n: np.polynomial.legendre.leggauss(n) for n in (6, 8, 12, 16, 24, 32, 48, 64)}


#: panel edges around a kink, in units of the width of the feature there
_KINK_EDGES = np.array([-40.0, -20.0, -10.0, -6.0, -4.0, -2.5, -1.5, -0.75, 0.0,
                        0.75, 1.5, 2.5, 4.0, 6.0, 10.0, 20.0, 40.0])  # fmt: skip


def _gauss_nodes(var: float, kinks, width: float, n: int = 16, span: float = 12.0):
    """Nodes and weights for ``E f(h)``, ``h ~ N(0, var)``, where ``f`` is smooth except
    within a few ``width`` of each point in ``kinks``.

    Composite ``n``-point Gauss-Legendre on ``[-span sd, span sd]`` (``sd = sqrt(var)``;
    the Gaussian mass outside is below 1e-32), with panel edges at every ``sd`` and,
    around each kink ``k``, at ``k + width * _KINK_EDGES``.  A Gauss-Hermite rule on
    ``h`` alone misses features much narrower than ``sd``.
    """
    if var <= 0:
        return np.zeros(1), np.ones(1)
    sd = np.sqrt(var)
    lo, hi = -span * sd, span * sd
    edges = [np.linspace(lo, hi, int(2 * span) + 1)]
    edges += [k + width * _KINK_EDGES for k in kinks]
    e = np.unique(np.clip(np.concatenate(edges), lo, hi))
    x, w = _GL[n]
    mid, half = 0.5 * (e[1:] + e[:-1]), 0.5 * (e[1:] - e[:-1])
    h = (mid[:, None] + half[:, None] * x[None, :]).ravel()
    wt = (half[:, None] * w[None, :]).ravel() * np.exp(-0.5 * h**2 / var) / np.sqrt(2 * np.pi * var)
    return h, wt


def _gauss_expect(f, var: float, kinks, width: float) -> float:
    """``E f(h)``, ``h ~ N(0, var)``, on the nodes of :func:`_gauss_nodes`."""
    h, w = _gauss_nodes(var, kinks, width)
    return float(w @ f(h))


def _log_phi_diff(alpha, beta):
    """log(Phi(beta) - Phi(alpha)) for alpha <= beta, accurate in both tails."""
    alpha, beta = np.broadcast_arrays(np.asarray(alpha, float), np.asarray(beta, float))
    flip = alpha > 0
    a = np.where(flip, -beta, alpha)
    b = np.where(flip, -alpha, beta)
    lb, la = log_ndtr(b), log_ndtr(a)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = lb + np.log1p(-np.exp(np.minimum(la - lb, 0.0)))
    return np.where(b <= a, -np.inf, out)


def _trunc_moments(m, v, lo, hi):
    """log mass, mean and variance of N(m, v) restricted to [lo, hi]."""
    s = np.sqrt(v)
    al, be = (lo - m) / s, (hi - m) / s
    logz = _log_phi_diff(al, be)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        pa = np.where(np.isfinite(al), np.exp(-0.5 * al**2 - 0.5 * _LOG2PI - logz), 0.0)
        pb = np.where(np.isfinite(be), np.exp(-0.5 * be**2 - 0.5 * _LOG2PI - logz), 0.0)
        apa = np.where(np.isfinite(al), al * pa, 0.0)
        bpb = np.where(np.isfinite(be), be * pb, 0.0)
        mean = m + s * (pa - pb)
        var = v * np.maximum(1.0 + apa - bpb - (pa - pb) ** 2, 0.0)
    ok = np.isfinite(logz)
    mid = np.clip(m, lo, hi)
    return logz, np.where(ok, mean, mid), np.where(ok, var, 0.0)


# --------------------------------------------------------------------------- priors


@dataclass(frozen=True)
class Prior:
    """I.i.d. input law: ``normal`` (N(0,1)), ``bimodal`` (+-1) or ``spike_slab`` (rho)."""

    kind: str
    rho: float = 1.0  # spike-slab density

    @property
    def second_moment(self) -> float:
        return self.rho if self.kind == "spike_slab" else 1.0

    def terms(self, b: float) -> tuple[float, float]:
        """``(E log p(R), E Var(x | R))`` for ``R = x + N(0, 1/b)``."""
        s2 = 1.0 / b
        if self.kind == "normal":
            return -0.5 * np.log(2 * np.pi * np.e * (1.0 + s2)), 1.0 / (1.0 + b)
        z, w = _GH[96]
        if self.kind == "bimodal":
            r = 1.0 + np.sqrt(s2) * z  # by symmetry condition on x = +1
            logp = (
                np.logaddexp(-0.5 * (r - 1) ** 2 / s2, -0.5 * (r + 1) ** 2 / s2)
                - np.log(2)
                - 0.5 * np.log(2 * np.pi * s2)
            )
            return float(w @ logp), float(1.0 - w @ np.tanh(r / s2) ** 2)
        if self.kind == "spike_slab":
            rho = self.rho
            out_lp, out_mmse = 0.0, 0.0
            for p_comp, var_r in ((1 - rho, s2), (rho, 1.0 + s2)):
                if p_comp <= 0:
                    continue
                # the posterior switches from spike to slab within a few sqrt(s2) of 0
                r, w = _gauss_nodes(var_r, (0.0,), np.sqrt(s2))
                l0 = (
                    np.log1p(-rho) - 0.5 * np.log(2 * np.pi * s2) - 0.5 * r**2 / s2
                    if rho < 1
                    else -np.inf * r
                )
                l1 = np.log(rho) - 0.5 * np.log(2 * np.pi * (1 + s2)) - 0.5 * r**2 / (1 + s2)
                lp = np.logaddexp(l0, l1)
                pi = np.exp(l1 - lp)
                m1 = r / (1 + s2)  # E[x | R, slab] = R * 1/(1 + s2)
                v1 = s2 / (1 + s2)
                ex, ex2 = pi * m1, pi * (v1 + m1**2)
                out_lp += p_comp * float(w @ lp)
                out_mmse += p_comp * float(w @ (ex2 - ex**2))
            return out_lp, out_mmse
        raise ValueError(self.kind)


def make_prior(prior) -> Prior:
    if isinstance(prior, Prior):
        return prior
    if prior in ("normal", "gaussian"):
        return Prior("normal")
    if prior == "bimodal":
        return Prior("bimodal")
    if isinstance(prior, (tuple, list)) and len(prior) == 2 and prior[0] == "spike_slab":
        rho = float(prior[1])
        if not 0.0 < rho <= 1.0:
            raise ValueError(f"spike_slab density rho must be in (0, 1], got {rho}")
        return Prior("spike_slab", rho)
    raise ValueError(f"prior must be 'normal', 'bimodal' or ('spike_slab', rho); got {prior!r}")


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class Activation:
    """A piecewise-linear activation: atoms ``(value, u_lo, u_hi)`` and pieces
    ``(slope, offset, u_lo, u_hi)`` (``t = slope * u + offset`` on ``(u_lo, u_hi)``)."""

    name: str
    atoms: tuple = field(default_factory=tuple)
    pieces: tuple = field(default_factory=tuple)

    @property
    def is_linear(self) -> bool:
        return self.name == "linear"

    @property
    def discrete(self) -> bool:
        return not self.pieces

    def __call__(self, u: np.ndarray) -> np.ndarray:
        out = np.zeros_like(u, dtype=float)
        for c, lo, hi in self.atoms:
            out = np.where((u > lo) & (u <= hi), c, out)
        for s, o, lo, hi in self.pieces:
            out = np.where((u > lo) & (u <= hi), s * u + o, out)
        return out

    # ---- second moment of the output, for rho of the next layer
    def second_moment(self, rho_h: float, delta: float) -> float:
        v = rho_h + delta
        if self.is_linear:
            return v
        z, w = _GH[96]
        u = np.sqrt(v) * z
        # exact alternative for the kinks: integrate each region separately
        tot = 0.0
        for c, lo, hi in self.atoms:
            tot += c**2 * float(np.exp(_log_phi_diff(lo / np.sqrt(v), hi / np.sqrt(v))))
        for s, o, lo, hi in self.pieces:
            logz, m, var = _trunc_moments(0.0, v, lo, hi)
            p = np.exp(logz)
            tot += float(p * (s**2 * (var + m**2) + 2 * s * o * m + o**2))
        del u, w
        return tot

    # ---- -E log p(t | r) for u ~ N(r, V), as a function of r (vector)
    def _neg_logp_given_r(self, r: np.ndarray, v: float) -> np.ndarray:
        """Entropy of phi(u), u ~ N(r, v), w.r.t. Lebesgue + atoms, for each r."""
        s_ = np.sqrt(v)
        h = np.zeros_like(r)
        for _, lo, hi in self.atoms:
            lp = _log_phi_diff((lo - r) / s_, (hi - r) / s_)
            h -= np.where(np.isfinite(lp), np.exp(lp) * lp, 0.0)
        for s, _, lo, hi in self.pieces:
            al, be = (lo - r) / s_, (hi - r) / s_
            lp = _log_phi_diff(al, be)
            p = np.where(np.isfinite(lp), np.exp(lp), 0.0)
            with np.errstate(invalid="ignore", over="ignore"):
                pa = np.where(np.isfinite(al), al * np.exp(-0.5 * al**2) / np.sqrt(2 * np.pi), 0.0)
                pb = np.where(np.isfinite(be), be * np.exp(-0.5 * be**2) / np.sqrt(2 * np.pi), 0.0)
            ez2 = p + pa - pb  # E[z^2; z in (al, be)]
            h += 0.5 * np.log(2 * np.pi * v) * p + 0.5 * ez2 + np.log(abs(s)) * p
        return h

    def cond_entropy(self, rho_h: float, delta: float) -> float:
        """``E_h H(phi(h + xi) | h)``, ``h ~ N(0, rho_h)``, per unit (``-inf`` if noiseless
        and not discrete).

        ``H(phi(h + xi) | h)`` changes within a few noise standard deviations
        ``sqrt(delta)`` of each kink of ``phi`` (for a ReLU, where the atom at 0 takes
        over), which is much narrower than ``sqrt(rho_h)`` when the noise is small, so
        the average is a composite Gauss-Legendre rule with panels refined around the
        kinks (:func:`_gauss_expect`), not a Gauss-Hermite rule on ``h``.
        """
        if delta <= 0:
            return 0.0 if self.discrete else -np.inf
        if self.is_linear:
            return 0.5 * np.log(2 * np.pi * np.e * delta)
        return _gauss_expect(
            lambda r: self._neg_logp_given_r(r, delta), rho_h, self.kinks, np.sqrt(delta)
        )

    @property
    def kinks(self) -> tuple[float, ...]:
        """The finite points of ``u`` where ``phi`` changes piece."""
        ends = [e for _, lo, hi in self.atoms for e in (lo, hi)]
        ends += [e for _, _, lo, hi in self.pieces for e in (lo, hi)]
        return tuple(sorted({float(e) for e in ends if np.isfinite(e)}))

    # ---- last layer: t observed
    def last_terms(self, a: float, rho_h: float, delta: float) -> tuple[float, float]:
        """``(E log p(t | r), E Var(h | r, t))`` for the last layer."""
        ia = 1.0 / a
        q = max(rho_h - ia, 0.0)
        v = ia + delta
        kappa = ia / v
        vh_u = ia - ia * kappa  # Var(h | u)
        if self.is_linear:
            return -0.5 * np.log(2 * np.pi * np.e * v), vh_u
        r, w = _gauss_nodes(q, self.kinks, np.sqrt(v))
        logp = -self._neg_logp_given_r(r, v)
        mm = np.zeros_like(r)
        for _, lo, hi in self.atoms:
            logz, _, var_u = _trunc_moments(r, v, lo, hi)
            p = np.where(np.isfinite(logz), np.exp(logz), 0.0)
            mm += p * (vh_u + kappa**2 * var_u)
        for _, _, lo, hi in self.pieces:
            p = np.exp(_log_phi_diff((lo - r) / np.sqrt(v), (hi - r) / np.sqrt(v)))
            mm += p * vh_u
        return float(w @ logp), float(w @ mm)

    # ---- inner layer: t seen through R = t + N(0, 1/b)
    def inner_terms(
        self,
        a: float,
        b: float,
        rho_h: float,
        delta: float,
        *,
        n_r: int = 32,
        n_u: int = 6,
        n_e: int = 24,
    ) -> tuple[float, float, float]:
        """``(E log p(R | r), E Var(h | r, R), E Var(t | r, R))`` for an inner layer."""
        ia, ib = 1.0 / a, 1.0 / b
        q = max(rho_h - ia, 0.0)
        v = ia + delta
        if self.is_linear:
            tot = v + ib
            return (-0.5 * np.log(2 * np.pi * np.e * tot), ia - ia**2 / tot, v - v**2 / tot)
        zr, wr = _GH[n_r]
        ze, we = _GH[n_e]
        xg, wg = _GL[n_u]
        r_nodes = np.sqrt(q) * zr
        sv = np.sqrt(v)
        # points (r, R) with weights, built component by component
        rs, Rs, ws = [], [], []
        for c, lo, hi in self.atoms:
            p = np.exp(_log_phi_diff((lo - r_nodes) / sv, (hi - r_nodes) / sv))  # (n_r,)
            rr = np.repeat(r_nodes, n_e)
            RR = (c + np.sqrt(ib) * ze)[None, :].repeat(n_r, 0).ravel()
            ww = (wr * p)[:, None] * we[None, :]
            rs.append(rr), Rs.append(RR), ws.append(ww.ravel())
        for s, o, lo, hi in self.pieces:
            # standardised coordinate z = (u - r) / sqrt(V) on [max(lo, -9), min(hi, 9)],
            # cut into unit-scale sub-intervals plus graded ones next to a finite end of
            # the piece (there the posterior switches between atom and piece on the
            # scale of the R-noise); n_u Gauss-Legendre nodes in each
            za = np.maximum((lo - r_nodes) / sv, -9.0)
            zb = np.minimum((hi - r_nodes) / sv, 9.0)
            zb = np.maximum(zb, za)
            eps = np.sqrt(ib) / abs(s) / sv
            cuts = [za, zb] + [
                np.clip(np.full_like(za, g), za, zb) for g in np.arange(-6.0, 6.1, 2.0)
            ]
            for k in (0.25, 1.0, 4.0, 16.0, 64.0):
                if np.isfinite(lo):
                    cuts.append(np.clip(za + k * eps, za, zb))
                if np.isfinite(hi):
                    cuts.append(np.clip(zb - k * eps, za, zb))
            cuts = np.sort(np.stack(cuts, 1), axis=1)  # (n_r, n_cuts)
            c0, c1 = cuts[:, :-1, None], cuts[:, 1:, None]
            zz = 0.5 * (c0 + c1) + 0.5 * (c1 - c0) * xg[None, None, :]
            wz = 0.5 * (c1 - c0) * wg[None, None, :] * np.exp(-0.5 * zz**2) / np.sqrt(2 * np.pi)
            u = r_nodes[:, None] + sv * zz.reshape(n_r, -1)
            wu = wz.reshape(n_r, -1)
            t = s * u + o
            RR = t[:, :, None] + np.sqrt(ib) * ze[None, None, :]
            ww = wr[:, None, None] * wu[:, :, None] * we[None, None, :]
            rs.append(np.broadcast_to(r_nodes[:, None, None], RR.shape).ravel())
            Rs.append(RR.ravel()), ws.append(ww.ravel())
        r_all, R_all, w_all = np.concatenate(rs), np.concatenate(Rs), np.concatenate(ws)
        logp, var_h, var_t = self._posterior(r_all, R_all, a, b, delta)
        return float(w_all @ logp), float(w_all @ var_h), float(w_all @ var_t)

    def _posterior(self, r, R, a, b, delta):
        """log p(R | r) and posterior variances of h and t, closed form."""
        ia, ib = 1.0 / a, 1.0 / b
        v = ia + delta
        kappa = ia / v
        vh_u = ia - ia * kappa
        logw, et, et2, eh, eh2 = [], [], [], [], []

        def h_moments(eu, eu2):
            base = r * (1 - kappa)
            return base + kappa * eu, vh_u + base**2 + 2 * base * kappa * eu + kappa**2 * eu2

        for c, lo, hi in self.atoms:
            logz, mu, vu = _trunc_moments(r, v, lo, hi)
            lw = logz - 0.5 * (R - c) ** 2 / ib - 0.5 * np.log(2 * np.pi * ib)
            m1, m2 = h_moments(mu, vu + mu**2)
            logw.append(lw), et.append(np.full_like(r, c)), et2.append(np.full_like(r, c * c))
            eh.append(m1), eh2.append(m2)
        for s, o, lo, hi in self.pieces:
            prec = 1.0 / v + s * s * b
            vj = 1.0 / prec
            mj = vj * (r / v + s * b * (R - o))
            tot = s * s * v + ib
            lmarg = -0.5 * (R - s * r - o) ** 2 / tot - 0.5 * np.log(2 * np.pi * tot)
            logz, mu, vu = _trunc_moments(mj, vj, lo, hi)
            eu2 = vu + mu**2
            m1, m2 = h_moments(mu, eu2)
            (
                logw.append(lmarg + logz),
                et.append(s * mu + o),
                et2.append(s * s * eu2 + 2 * s * o * mu + o * o),
            )
            eh.append(m1), eh2.append(m2)
        logw = np.stack(logw)
        lp = np.logaddexp.reduce(logw, axis=0)
        pw = np.exp(logw - lp)
        Et, Et2 = (pw * np.stack(et)).sum(0), (pw * np.stack(et2)).sum(0)
        Eh, Eh2 = (pw * np.stack(eh)).sum(0), (pw * np.stack(eh2)).sum(0)
        return lp, np.maximum(Eh2 - Eh**2, 0.0), np.maximum(Et2 - Et**2, 0.0)


_INF = np.inf


def make_activation(name: str, *, slope: float = 0.01) -> Activation:
    if name == "linear":
        return Activation("linear", (), ((1.0, 0.0, -_INF, _INF),))
    if name == "relu":
        return Activation("relu", ((0.0, -_INF, 0.0),), ((1.0, 0.0, 0.0, _INF),))
    if name == "hardtanh":
        return Activation(
            "hardtanh", ((-1.0, -_INF, -1.0), (1.0, 1.0, _INF)), ((1.0, 0.0, -1.0, 1.0),)
        )
    if name == "leaky_relu":
        return Activation("leaky_relu", (), ((slope, 0.0, -_INF, 0.0), (1.0, 0.0, 0.0, _INF)))
    if name == "probit":
        return Activation("probit", ((-1.0, -_INF, 0.0), (1.0, 0.0, _INF)), ())
    raise ValueError(
        f"unknown activation {name!r}: use linear, relu, hardtanh, leaky_relu or probit "
        "(last layer)"
    )
