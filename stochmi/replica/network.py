"""The random-weight network of the replica formula, as a Pyro model and a sampler.

``t_0 = x`` (i.i.d. prior), ``t_l = phi_l(W_l t_{l-1} + xi_l)``, ``xi_l ~ N(0, noise_l)``.
Layers with ``noise_l > 0`` are ``pyro.sample`` sites inside the data plate, so
:func:`stochmi.layer_mi` sees exactly the channels the formula describes:

- linear: ``Normal(h, sqrt(noise))``;
- ReLU / hardtanh with the noise before the activation: :class:`CensoredNormal`,
  whose law has atoms at the clipping points; ``log_prob`` is the log-density with
  respect to Lebesgue measure plus counting measure on the atoms (log of the atom's
  mass at the atom, Gaussian log-density between them), the same reference measure
  as :func:`stochmi.replica.mutual_information`, so the core estimator applies.

Layers with ``noise_l = 0`` are deterministic (no site).  The configuration that
makes the sampled quantity and the formula's the same number is *noiseless inner
layers and a noisy last layer*: the model then has one stochastic site ``t{L}`` and
``I(X; T_L)`` is estimated directly from ``p(t_L | x_i)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import distributions as td
from torch.distributions import constraints

from stochmi.core.rng import make_generator

__all__ = [
    "CensoredNormal",
    "random_weights",
    "sample_inputs",
    "forward",
    "conditional",
    "make_model",
]


class CensoredNormal(td.Distribution):
    """``clip(N(loc, scale^2), low, high)``: atoms at ``low`` / ``high`` (if finite).

    ``log_prob`` is with respect to Lebesgue measure plus counting measure on the
    finite clipping points.  ``low=0, high=inf`` is the rectified Gaussian of a ReLU
    unit with noise before the activation; ``low=-1, high=1`` the hardtanh unit.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.real
    has_rsample = False

    def __init__(self, loc, scale, low: float = 0.0, high: float = math.inf, validate_args=None):
        self.loc, self.scale = torch.broadcast_tensors(
            torch.as_tensor(loc), torch.as_tensor(scale, dtype=torch.as_tensor(loc).dtype)
        )
        self.low, self.high = float(low), float(high)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return CensoredNormal(
            self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.low, self.high
        )

    def sample(self, sample_shape=torch.Size()):  # noqa: B008 - torch convention
        with torch.no_grad():
            shape = self._extended_shape(sample_shape)
            u = self.loc.expand(shape) + self.scale.expand(shape) * torch.randn(
                shape, dtype=self.loc.dtype, device=self.loc.device
            )
            return u.clamp(self.low, self.high)

    def log_prob(self, value):
        z = (value - self.loc) / self.scale
        normal = -0.5 * z**2 - torch.log(self.scale) - 0.5 * math.log(2 * math.pi)
        out = normal
        if math.isfinite(self.low):
            at_low = torch.special.log_ndtr((self.low - self.loc) / self.scale)
            out = torch.where(value <= self.low, at_low, out)
            out = torch.where(value < self.low, torch.full_like(out, -math.inf), out)
        if math.isfinite(self.high):
            at_high = torch.special.log_ndtr((self.loc - self.high) / self.scale)
            out = torch.where(value >= self.high, at_high, out)
            out = torch.where(value > self.high, torch.full_like(out, -math.inf), out)
        return out


_CLIP = {"relu": (0.0, math.inf), "hardtanh": (-1.0, 1.0)}


def _phi(name: str, u: torch.Tensor, slope: float) -> torch.Tensor:
    if name == "linear":
        return u
    if name == "relu":
        return torch.relu(u)
    if name == "hardtanh":
        return u.clamp(-1.0, 1.0)
    if name == "leaky_relu":
        return torch.nn.functional.leaky_relu(u, slope)
    if name == "probit":
        return torch.sign(u)
    raise ValueError(f"unknown activation {name!r}")


def random_weights(
    widths: Sequence[int],
    *,
    weight_scale=1.0,
    ensemble: str = "gaussian",
    seed: int | None = None,
    dtype=torch.float64,
) -> list[torch.Tensor]:
    """Weights ``W_l`` of shape ``(n_l, n_{l-1})``: i.i.d. ``N(0, scale^2 / n_{l-1})`` or
    scaled orthonormal rows/columns with the same Frobenius norm.

    ``seed`` follows the rule of :mod:`stochmi.core.rng` (``None``: a fresh seed from
    the operating system); the draws come from a private generator, so the global
    RNG is neither read nor changed.
    """
    gen = make_generator(seed)[0]
    L = len(widths) - 1
    scales = (
        [float(weight_scale)] * L
        if np.ndim(weight_scale) == 0
        else [float(s) for s in weight_scale]
    )
    out = []
    for l in range(1, L + 1):
        n_out, n_in = widths[l], widths[l - 1]
        g = torch.randn(n_out, n_in, generator=gen, dtype=dtype)
        if ensemble == "gaussian":
            w = g / math.sqrt(n_in)
        elif ensemble == "orthogonal":
            q, r = torch.linalg.qr(g if n_out >= n_in else g.T)
            q = q * torch.sign(torch.diagonal(r))
            q = q if n_out >= n_in else q.T
            w = q * math.sqrt(n_out / min(n_out, n_in))
        else:
            raise ValueError(f"ensemble must be 'gaussian' or 'orthogonal', got {ensemble!r}")
        out.append(scales[l - 1] * w)
    return out


def sample_inputs(
    n: int, n0: int, prior="normal", *, seed: int | None = None, dtype=torch.float64
) -> torch.Tensor:
    """``n`` inputs of width ``n0`` with i.i.d. coordinates from ``prior``.

    ``seed`` follows the rule of :mod:`stochmi.core.rng` (``None``: a fresh seed from
    the operating system); the global RNG is neither read nor changed.
    """
    gen = make_generator(seed)[0]
    if prior in ("normal", "gaussian"):
        return torch.randn(n, n0, generator=gen, dtype=dtype)
    if prior == "bimodal":
        return torch.randint(0, 2, (n, n0), generator=gen).to(dtype) * 2 - 1
    if isinstance(prior, (tuple, list)) and prior[0] == "spike_slab":
        keep = torch.rand(n, n0, generator=gen, dtype=dtype) < float(prior[1])
        return torch.randn(n, n0, generator=gen, dtype=dtype) * keep
    raise ValueError(f"unknown prior {prior!r}")


def forward(
    x: torch.Tensor,
    weights,
    activations,
    noise,
    *,
    leaky_slope: float = 0.01,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Sample every layer ``[t_1, ..., t_L]`` for inputs ``x`` (shape ``(N, n0)``).

    The noise comes from ``generator`` (default: a private generator with a fresh
    seed, :func:`stochmi.core.rng.make_generator`); the global RNG is not used.
    """
    if generator is None:
        generator = make_generator(None, x.device)[0]
    t, out = x, []
    for w, name, d in zip(weights, activations, noise):
        h = t @ w.T
        if d > 0:
            h = h + math.sqrt(d) * torch.randn(
                h.shape, generator=generator, dtype=h.dtype, device=h.device
            )
        t = _phi(name, h, leaky_slope)
        out.append(t)
    return out


def conditional(
    t_prev: torch.Tensor, w: torch.Tensor, activation: str, noise: float
) -> td.Distribution:
    """``p(t_l | t_{l-1})`` with batch ``(N,)`` and event ``(n_l,)`` for a noisy layer."""
    if noise <= 0:
        raise ValueError("a noiseless layer has no density: MI with it is infinite")
    h = t_prev @ w.T
    scale = torch.full_like(h, math.sqrt(noise))
    if activation == "linear":
        return td.Independent(td.Normal(h, scale), 1)
    if activation in _CLIP:
        lo, hi = _CLIP[activation]
        return td.Independent(CensoredNormal(h, scale, lo, hi), 1)
    raise NotImplementedError(
        f"no conditional density implemented for a noisy {activation!r} layer"
    )


def _pyro_conditional(t_prev, w, activation, noise):
    """:func:`conditional` as a Pyro distribution (callable by ``pyro.sample``)."""
    import pyro.distributions as pd
    from pyro.distributions.torch_distribution import TorchDistributionMixin

    global _PyroCensoredNormal
    if _PyroCensoredNormal is None:

        class _PyroCensoredNormal(CensoredNormal, TorchDistributionMixin):  # noqa: N801
            def expand(self, batch_shape, _instance=None):
                return _PyroCensoredNormal(
                    self.loc.expand(batch_shape),
                    self.scale.expand(batch_shape),
                    self.low,
                    self.high,
                )

    if noise <= 0:
        raise ValueError("a noiseless layer has no density: MI with it is infinite")
    h = t_prev @ w.T
    scale = torch.full_like(h, math.sqrt(noise))
    if activation == "linear":
        return pd.Normal(h, scale).to_event(1)
    if activation in _CLIP:
        return _PyroCensoredNormal(h, scale, *_CLIP[activation]).to_event(1)
    raise NotImplementedError(
        f"no conditional density implemented for a noisy {activation!r} layer"
    )


_PyroCensoredNormal = None


def make_model(weights, activations, noise, *, leaky_slope: float = 0.01):
    """Pyro model ``model(x)`` of the network: one site ``t{l}`` per noisy layer."""
    import pyro

    weights = [torch.as_tensor(w) for w in weights]

    def model(x):
        t = x
        with pyro.plate("data", x.shape[0]):
            for l, (w, name, d) in enumerate(zip(weights, activations, noise), 1):
                w = w.to(t.dtype)
                if d > 0:
                    t = pyro.sample(f"t{l}", _pyro_conditional(t, w, name, d))
                else:
                    t = _phi(name, t @ w.T, leaky_slope)
        return t

    return model
