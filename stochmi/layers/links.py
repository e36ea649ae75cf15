"""The links ``p(t_l | t_{l-1} = parent)`` of a Pyro model as functions of the parent.

:mod:`stochmi.layers.deep` evaluates each layer's conditional at parents that the
model never produced (draws of an importance-sampling proposal).  A link is a callable
``parent (B, d_{l-1}) -> Distribution`` with batch ``(B,)`` and event ``(d_l,)``.

Where they come from, fastest first:

* a model method ``conditional(site, parent)`` (the reference noise-injected nets), or
  ``conditional(site, parent, weights)`` for fixed weights (the reference Bayesian MLP);
* ``local_reparam_conditional(site, parent, guide)``, the :class:`LocalReparamModel`
  protocol (mean-field Bayesian layers with weights drawn per example, the exact
  Gaussian marginal);
* any other Pyro model: the model is traced with the previous layer's site (and, in
  conditional mode, the weights) conditioned on the given values; the layer site's
  distribution is the link.  This runs the whole model once per call, so it is slower
  but needs nothing from the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch import distributions as td

from stochmi.layers.chain import as_batch_n
from stochmi.layers.sites import trace_model

__all__ = ["LocalReparamModel", "model_links"]


@runtime_checkable
class LocalReparamModel(Protocol):
    """A Pyro model whose layers have a closed-form weight-marginal channel.

    Implemented by models with weights drawn independently per example from a
    mean-field posterior that enter each layer linearly, so that the layer given its
    parent is Gaussian once the weights are integrated out (local reparameterisation,
    Kingma et al. 2015).  :func:`stochmi.layer_mi` with ``weights="marginal"`` and a
    guide then uses this channel as the exact link ``p(t_l | t_{l-1})`` instead of a
    mixture over weight draws, and :func:`stochmi.layers.weights.weight_mi` uses it
    for the closed-form population ``I(T_1; W | x)``.  Any model with this method
    matches (structural typing, ``isinstance`` works at run time);
    :class:`stochmi.models.nets.BayesMLP` is the reference implementation.
    """

    def local_reparam_conditional(self, site: str, parent: torch.Tensor, guide: Any) -> Any:
        """The channel ``p(t_l | t_{l-1} = parent)`` with the weights integrated out.

        Parameters
        ----------
        site : str
            A layer site of the model (``"h1"``, ``"h2"``, ...).
        parent : torch.Tensor, shape (B, ...)
            For the first layer the inputs ``x`` (``(B, *input_shape)``), else
            ``(B, d_{l-1})`` values of the previous layer site.
        guide : object or None
            The weight posterior the marginal is taken under (the model's own guide
            type, e.g. :class:`stochmi.models.nets.MeanFieldGuide`); ``None`` for the
            prior.

        Returns
        -------
        torch.distributions.Distribution
            Batch shape ``(B,)``, event shape ``(d_l,)`` (the flattened site value).
        """
        ...


def _conditional_arity(model) -> int | None:
    """Required arguments of the model's ``conditional`` method: 2 for
    ``conditional(site, parent)`` (noise only), 3 for ``conditional(site, parent,
    weights)`` (fixed weights); None without one."""
    fn = getattr(model, "conditional", None)
    if fn is None or not callable(fn):
        return None
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    return len([p for p in params if p.default is inspect.Parameter.empty])


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
        Noise-only model, per-example weights with a local-reparameterised marginal
        (the model must be a :class:`LocalReparamModel`), or weights fixed at
        ``weight_values``.
    guide : optional
        The weight posterior passed to ``local_reparam_conditional``.
    weight_values : dict, optional
        Fixed weight values (traced links).

    Raises
    ------
    TypeError
        ``mode="local_reparam"`` with a model that is not a :class:`LocalReparamModel`.
    """
    if mode == "local_reparam" and not isinstance(model, LocalReparamModel):
        raise TypeError(
            f"mode 'local_reparam' needs a model with local_reparam_conditional "
            f"(LocalReparamModel), got {type(model).__name__}"
        )
    links: list = [None]
    for l in range(1, len(layers)):
        site = layers[l]
        if mode == "local_reparam":
            links.append(
                lambda p, s=site: as_batch_n(
                    model.local_reparam_conditional(s, p, guide), p.shape[0], s
                )
            )
        elif mode == "noise" and _conditional_arity(model) == 2:
            links.append(lambda p, s=site: as_batch_n(model.conditional(s, p), p.shape[0], s))
        elif mode == "fixed" and weight_values and _conditional_arity(model) == 3:
            links.append(
                lambda p, s=site: as_batch_n(model.conditional(s, p, weight_values), p.shape[0], s)
            )
        else:
            links.append(_traced_link(model, x, layers, l, weight_values or {}))
    return links
