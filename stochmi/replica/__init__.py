"""The replica formula of Gabrie et al. (2018) as an oracle for layer entropies and MI.

For a feed-forward network with i.i.d. inputs and independent, orthogonally-invariant
random weights,

    t_0 = x,    t_l = phi_l(W_l t_{l-1} + xi_l),    xi_l ~ N(0, noise_l I),

the replica formula gives ``lim H(T_l) / n_0`` from the fixed point of a few scalar
equations.  :func:`mutual_information` is the entry point; ``network`` builds the Pyro
model of the same network for the sampling estimators (imported on first use).

Conventions, the same as the paper's and its reference implementation's: ``noise_l``
is the *variance* of the Gaussian noise, added *before* the activation (a noisy ReLU
unit is ``relu(h + xi)``, with an atom at 0); entropies of outputs with atoms are taken
with respect to Lebesgue measure plus counting measure on the atoms, and
``H(T_l | T_{l-1})`` in the same reference, so the mutual information does not depend
on that choice.  On the reference implementation's single-layer test cases
(``W = randn(100, 50) / sqrt(50)`` from NumPy seed 42, noise variance 0.01; normal,
bimodal and spike-slab priors; linear, ReLU and probit layers) the values agree with
its published ones to 3e-7 nats per input unit, and to 2.3e-5 for the bimodal prior
with a probit layer.  The one-dimensional averages over the pre-activation resolve the
width ``sqrt(noise_l)`` of the noise around each kink of the activation, which is much
narrower than the spread of the pre-activation when the noise is small.

Public names
------------
mutual_information    per-layer entropy and MI table (pandas.DataFrame)
solve                 the fixed point for one network (low level)
empirical_spectrum, marchenko_pastur, orthogonal_spectrum   weight spectra
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stochmi.replica.channels import make_activation, make_prior
from stochmi.replica.solver import FixedPoint, solve
from stochmi.replica.spectra import (
    Spectrum,
    empirical_spectrum,
    marchenko_pastur,
    orthogonal_spectrum,
)

__all__ = [
    "mutual_information",
    "solve",
    "FixedPoint",
    "Spectrum",
    "empirical_spectrum",
    "marchenko_pastur",
    "orthogonal_spectrum",
    "network",
]

_INNER = ("linear", "relu", "hardtanh", "leaky_relu")


def _per_layer(value: Any, n_layers: int, name: str) -> list[float]:
    if np.ndim(value) == 0:
        return [float(value)] * n_layers
    out = [float(v) for v in value]
    if len(out) != n_layers:
        raise ValueError(f"{name} has {len(out)} entries for {n_layers} layers")
    return out


def mutual_information(
    widths: Sequence[int],
    activations: Sequence[str] | str,
    noise: float | Sequence[float],
    *,
    prior: str | tuple = "normal",
    weights: Sequence[Any] | None = None,
    ensemble: str = "gaussian",
    weight_scale: float | Sequence[float] = 1.0,
    leaky_slope: float = 0.01,
    tol: float = 1e-9,
    max_iter: int = 1000,
):
    r"""Replica-formula entropy and mutual information of every layer.

    The network is ``t_0 = x`` (i.i.d. entries from ``prior``) and, for ``l = 1..L``,
    ``t_l = phi_l(W_l t_{l-1} + xi_l)`` with ``xi_l ~ N(0, noise_l I)`` drawn afresh
    for every input.  The formula (Gabrie et al., NeurIPS 2018, Claim 1) gives the
    large-width limit of ``H(T_l) / n_0`` for independent orthogonally-invariant
    ``W_l``; it is solved here in its expectation-consistent (ML-VAMP state
    evolution) parametrisation, with the weights entering only through the spectrum
    of ``W_l W_l^T``.

    Parameters
    ----------
    widths : sequence of int
        ``[n_0, n_1, ..., n_L]``.
    activations : str or sequence of str
        One per layer: ``"linear"``, ``"relu"``, ``"hardtanh"``, ``"leaky_relu"``
        (slope ``leaky_slope``), or ``"probit"`` (``t = sign(h + xi)``, last layer only).
    noise : float or sequence of float
        Variance ``noise_l`` of the Gaussian noise added *before* the activation of
        each layer (``0`` allowed for inner layers: a deterministic layer).
    prior : {"normal", "bimodal"} or ("spike_slab", rho)
        Input law per coordinate: ``N(0, 1)``; ``+-1`` with probability 1/2 each;
        ``0`` with probability ``1 - rho`` else ``N(0, 1)``.
    weights : sequence of array_like, optional
        The actual matrices ``W_l``, shape ``(n_l, n_{l-1})`` (numpy or torch); their
        empirical spectra are used (exact for linear-Gaussian networks whose earlier
        layers produce isotropic inputs).  Default: the large-width limit of
        ``ensemble``.
    ensemble : {"gaussian", "orthogonal"}
        Used when ``weights`` is None: i.i.d. ``N(0, weight_scale**2 / n_{l-1})``
        entries (Marchenko-Pastur spectrum), or a scaled matrix with orthonormal rows
        or columns and the same Frobenius norm.
    weight_scale : float or sequence of float
        Multiplies the default weights (ignored when ``weights`` is given).
    tol, max_iter
        Convergence of the fixed-point iteration (largest change of a log-precision).

    Returns
    -------
    pandas.DataFrame
        One row per layer ``l = 1..L`` with columns

        ``layer``
            ``l``.
        ``quantity``
            What ``mi`` is: ``"I(X;T_l)"`` when every layer before ``l`` is noiseless
            (then ``T_{l-1}`` is a function of ``X`` and, by the Markov property,
            ``I(X; T_l) = I(T_{l-1}; T_l)``); otherwise ``"I(T_{l-1};T_l)"``.  The
            formula gives ``H(T_l) - H(T_l | T_{l-1})``, which is ``I(T_{l-1}; T_l)``;
            with noisy earlier layers it is **not** ``I(X; T_l)`` (it is an upper
            bound on it, by data processing).
        ``entropy_per_unit``
            ``H(T_l) / n_0`` in nats.  For outputs with atoms (ReLU, hardtanh with
            noise before the activation) the entropy is taken with respect to
            Lebesgue measure plus counting measure on the atoms; for probit, Shannon
            entropy.  ``NaN`` for a noiseless continuous layer.
        ``cond_entropy_per_unit``
            ``H(T_l | T_{l-1}) / n_0 = (n_l / n_0) E_h H(phi(h + xi) | h)``,
            ``h ~ N(0, E[h^2])``, same reference measure.
        ``mi_per_unit``
            ``(H(T_l) - H(T_l | T_{l-1})) / n_0``, nats; ``inf`` for a noiseless
            continuous layer.
        ``mi``
            ``n_0 * mi_per_unit``: total nats for this ``n_0`` (the large-width
            prediction for a network of exactly these widths).
        ``converged``
            Whether the fixed-point iteration of the chosen extremum converged.
        ``n_iter``
            Iterations used.

    Notes
    -----
    Several initial conditions are iterated (uninformative to informed); among the
    converged fixed points the one with the largest free entropy (smallest mutual
    information) is kept, as the formula's extremum prescribes.  The entropy of an
    inner layer ``l`` is the formula applied to the network truncated at ``l``.

    Examples
    --------
    >>> from stochmi import replica
    >>> replica.mutual_information([500, 500], ["linear"], 0.1)  # doctest: +SKIP
    """
    import pandas as pd

    widths = [int(w) for w in widths]
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"widths must be [n_0, n_1, ..., n_L] with positive entries, got {widths}")
    L = len(widths) - 1
    activations = _check_activations(activations, L)
    noise = _per_layer(noise, L, "noise")
    if any(d < 0 or not np.isfinite(d) for d in noise):
        raise ValueError(f"noise variances must be finite and >= 0, got {noise}")
    pri = make_prior(prior)
    acts = [make_activation(a, slope=leaky_slope) for a in activations]
    specs = _weight_spectra(widths, weights, ensemble, weight_scale)
    rows = _layer_rows(widths, pri, specs, acts, noise, tol, max_iter)
    df = pd.DataFrame(rows)
    df.attrs.update(
        widths=widths,
        activations=activations,
        noise=noise,
        prior=prior,
        weights="given" if weights is not None else ensemble,
    )
    return df


def _check_activations(activations: Sequence[str] | str, n_layers: int) -> list[str]:
    """One known activation name per layer (a single name applies to all); probit last only."""
    if isinstance(activations, str):
        activations = [activations] * n_layers
    activations = list(activations)
    if len(activations) != n_layers:
        raise ValueError(f"{len(activations)} activations for {n_layers} layers")
    for l, name in enumerate(activations, 1):
        if name == "probit" and l != n_layers:
            raise ValueError("'probit' is allowed on the last layer only")
        if name not in _INNER + ("probit",):
            raise ValueError(f"unknown activation {name!r}: use one of {_INNER + ('probit',)}")
    return activations


def _weight_spectra(
    widths: list[int], weights, ensemble: str, weight_scale: float | Sequence[float]
) -> list[Spectrum]:
    """The spectrum of every ``W_l W_l^T``: empirical from ``weights``, else of ``ensemble``."""
    L = len(widths) - 1
    if weights is not None:
        if len(weights) != L:
            raise ValueError(f"{len(weights)} weight matrices for {L} layers")
        specs = []
        for l, w in enumerate(weights, 1):
            s = empirical_spectrum(w)
            if (s.n_out, s.n_in) != (widths[l], widths[l - 1]):
                raise ValueError(
                    f"W_{l} has shape {(s.n_out, s.n_in)}, expected {(widths[l], widths[l - 1])}"
                )
            specs.append(s)
        return specs
    scales = _per_layer(weight_scale, L, "weight_scale")
    if ensemble == "gaussian":
        return [marchenko_pastur(widths[l], widths[l - 1], scales[l - 1]) for l in range(1, L + 1)]
    if ensemble == "orthogonal":
        return [
            orthogonal_spectrum(widths[l], widths[l - 1], scales[l - 1]) for l in range(1, L + 1)
        ]
    raise ValueError(f"ensemble must be 'gaussian' or 'orthogonal', got {ensemble!r}")


def _layer_rows(widths, pri, specs, acts, noise, tol: float, max_iter: int) -> list[dict]:
    """One row of :func:`mutual_information`'s table per layer ``l = 1..L``.

    The second moment of ``t_{l-1}`` is propagated layer by layer; layer ``l``'s
    entropy comes from the fixed point of the network truncated at ``l``.
    """
    n0 = widths[0]
    rows = []
    rho_t = pri.second_moment
    for l in range(1, len(widths)):
        spec, act, delta = specs[l - 1], acts[l - 1], noise[l - 1]
        rho_h = spec.trace() / spec.n_out * rho_t
        cond = widths[l] * act.cond_entropy(rho_h, delta)
        noiseless_before = all(d == 0 for d in noise[: l - 1])
        quantity = f"I(X;T_{l})" if (l == 1 or noiseless_before) else f"I(T_{l - 1};T_{l})"
        if delta == 0 and not act.discrete:
            ent, conv, it, mi = np.nan, True, 0, np.inf
        else:
            fp = solve(pri, specs[:l], acts[:l], noise[:l], tol=tol, max_iter=max_iter)
            ent, conv, it = fp.entropy, fp.converged, fp.n_iter
            mi = ent - cond
        rows.append(
            dict(
                layer=l,
                quantity=quantity,
                entropy_per_unit=ent / n0,
                cond_entropy_per_unit=cond / n0,
                mi_per_unit=mi / n0,
                mi=mi,
                converged=bool(conv),
                n_iter=int(it),
            )
        )
        rho_t = act.second_moment(rho_h, delta)
    return rows


def __getattr__(name: str):
    if name == "network":  # pulls in torch/pyro
        import importlib

        return importlib.import_module("stochmi.replica.network")
    raise AttributeError(f"module 'stochmi.replica' has no attribute {name!r}")
