"""The links ``p(t_l | t_{l-1} = parent)`` of a Pyro model as functions of the parent.

:mod:`stochmi.layers.deep` evaluates each layer's conditional at parents that the
model never produced (draws of an importance-sampling proposal).  A link is a callable
``parent (B, d_{l-1}) -> Distribution`` with batch ``(B,)`` and event ``(d_l,)``.

Where they come from, fastest first:

* a model method ``conditional(site, parent)`` (the reference noise-injected nets);
* ``local_reparam_conditional(site, parent, guide)`` (mean-field Bayesian layers with
  weights drawn per example, the exact Gaussian marginal);
* any other Pyro model: the model is traced with the previous layer's site (and, in
  conditional mode, the weights) conditioned on the given values; the layer site's
  distribution is the link.  This runs the whole model once per call, so it is slower
  but needs nothing from the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import distributions as td

from stochmi.layers.chain import as_batch_n
from stochmi.layers.sites import trace_model

__all__ = ["model_links"]


def _has_plain_conditional(model) -> bool:
    fn = getattr(model, "conditional", None)
    if fn is None or not callable(fn):
        return False
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.default is inspect.Parameter.empty]
    return len(required) == 2


def _traced_link(model, x, layers, l, weight_values) -> Callable:
    import pyro.poutine as poutine

    prev, site = layers[l - 1], layers[l]
    shapes: dict[str, torch.Size] = {}

    def link(parent: torch.Tensor) -> td.Distribution:
        b = parent.shape[0]
        xb = x[torch.zeros(b, dtype=torch.long, device=x.device)]
        if prev not in shapes:
            with torch.no_grad():
                tr0 = trace_model(poutine.condition(model, data=dict(weight_values)), x[:2])
            shapes[prev] = tr0.nodes[prev]["value"].shape[1:]
        data = dict(weight_values)
        data[prev] = parent.reshape(b, *shapes[prev])
        tr = trace_model(poutine.condition(model, data=data), xb)
        return as_batch_n(tr.nodes[site]["fn"], b, site)

    return link


def model_links(model, x, layers, mode: str, guide=None, weight_values=None) -> list:
    """``links[l](parent) = p(t_l | t_{l-1} = parent)`` for ``l >= 1`` (``links[0]`` is None).

    Parameters
    ----------
    model : callable
        The Pyro model.
    x : Tensor, shape (N, ...)
        Inputs (only used to satisfy the model's plate in traced links).
    layers : list of str
        Layer sites in execution order.
    mode : {"noise", "local_reparam", "fixed"}
        Noise-only model, per-example weights with a local-reparameterised marginal,
        or weights fixed at ``weight_values``.
    """
    links: list = [None]
    for l in range(1, len(layers)):
        site = layers[l]
        if mode == "local_reparam":
            links.append(
                lambda p, s=site: as_batch_n(
                    model.local_reparam_conditional(s, p, guide), p.shape[0], s
                )
            )
        elif mode == "noise" and _has_plain_conditional(model):
            links.append(lambda p, s=site: as_batch_n(model.conditional(s, p), p.shape[0], s))
        else:
            links.append(_traced_link(model, x, layers, l, weight_values or {}))
    return links
