"""A small mean-field Bayesian chain with a closed-form weight marginal, for the tests.

``h_l = W_l a_{l-1} + b_l + sigma_l Z`` with ``a_0 = x`` and ``a_l = act(h_l)``; the
guide draws every weight independently from ``N(loc, scale^2)``.  The model implements
:class:`stochmi.layers.links.LocalReparamModel` and the fixed-weight channel
``conditional(site, parent, weights)``.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch


class MeanFieldGuide:
    """Independent Normal weights: ``params[name] = (loc, scale)``."""

    def __init__(self, params: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.params = params

    def __call__(self, *args, **kwargs):
        return {
            k: pyro.sample(k, dist.Normal(loc, scale).to_event(loc.dim()))
            for k, (loc, scale) in self.params.items()
        }


class MeanFieldChain:
    """Bayesian chain with dimensions ``dims = [d_in, d_1, .., d_L]`` (weights ``W{l}``,
    biases ``b{l}``, layer sites ``h{l}``), unit prior, noise ``sigmas``."""

    def __init__(self, dims, sigmas, act=None):
        self.dims, self.sigmas = list(dims), list(sigmas)
        self.act = act if act is not None else (lambda a: a)
        self.sites = [f"h{l + 1}" for l in range(len(dims) - 1)]

    def __call__(self, x):
        ws = []
        for l, (a, b) in enumerate(zip(self.dims[:-1], self.dims[1:])):
            w = pyro.sample(f"W{l + 1}", dist.Normal(torch.zeros(b, a), 1.0).to_event(2))
            bias = pyro.sample(f"b{l + 1}", dist.Normal(torch.zeros(b), 1.0).to_event(1))
            ws.append((w, bias))
        with pyro.plate("data", x.shape[0]):
            a = x
            for l, (w, bias) in enumerate(ws):
                h = pyro.sample(
                    self.sites[l], dist.Normal(a @ w.T + bias, self.sigmas[l]).to_event(1)
                )
                a = self.act(h)

    def _parent(self, l, parent):
        return parent if l == 0 else self.act(parent)

    def local_reparam_conditional(self, site, parent, guide):
        l = self.sites.index(site)
        a = self._parent(l, parent)
        if guide is None:
            m = torch.zeros(self.dims[l + 1], self.dims[l], dtype=a.dtype)
            mb = torch.zeros(self.dims[l + 1], dtype=a.dtype)
            s, sb = torch.ones_like(m), torch.ones_like(mb)
        else:
            m, s = guide.params[f"W{l + 1}"]
            mb, sb = guide.params[f"b{l + 1}"]
        var = (a * a) @ (s * s).T + sb * sb + self.sigmas[l] ** 2
        return dist.Normal(a @ m.T + mb, var.sqrt()).to_event(1)

    def conditional(self, site, parent, weights):
        l = self.sites.index(site)
        a = self._parent(l, parent)
        mean = a @ weights[f"W{l + 1}"].T + weights[f"b{l + 1}"]
        return dist.Normal(mean, self.sigmas[l]).to_event(1)


def make_guide(dims, loc_scale: float, scale: float, seed: int) -> MeanFieldGuide:
    """Guide with ``loc ~ N(0, loc_scale^2)`` entries and a common ``scale``."""
    g = torch.Generator().manual_seed(seed)
    params = {}
    for l, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        params[f"W{l + 1}"] = (
            loc_scale * torch.randn(b, a, generator=g),
            torch.full((b, a), scale),
        )
        params[f"b{l + 1}"] = (loc_scale * torch.randn(b, generator=g), torch.full((b,), scale))
    return MeanFieldGuide(params)
