"""Site discovery: which sample sites of a Pyro model are layers and which are weights.

A stochastic layer is a latent, continuous ``pyro.sample`` site inside the data plate
(batch dimension ``N``); a global latent site (no data dimension) is a weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["Sites", "find_layers", "trace_model", "sample_sites", "is_local"]


# ---------------------------------------------------------------------------
# site discovery
# ---------------------------------------------------------------------------
@dataclass
class Sites:
    layers: list[str]
    weights: list[str]


def trace_model(fn: Callable, *args, **kwargs):
    import pyro
    import pyro.poutine as poutine

    # argument validation off while tracing, so a zero-noise layer reaches our own
    # check (which explains why its MI is infinite) instead of a constraint error
    with pyro.validation_enabled(False):
        return poutine.trace(fn).get_trace(*args, **kwargs)


def sample_sites(tr):
    from pyro.poutine.util import site_is_subsample

    for name, site in tr.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def is_local(site, n: int) -> bool:
    frames = site["cond_indep_stack"]
    if any(f.vectorized and f.size == n for f in frames):
        return True
    return not frames and tuple(site["fn"].batch_shape)[:1] == (n,)


def find_layers(model: Callable, x: torch.Tensor) -> Sites:
    """Stochastic layers and weight sites of a Pyro model, in execution order.

    Layers are latent, continuous sample sites inside a plate of size ``N``
    (``x.shape[0]``); weights are latent sites outside any data plate.
    Discrete latent sites (such as a label site sampled because no labels were
    passed) and observed sites are not layers.
    """
    n = x.shape[0]
    tr = trace_model(model, x)
    layers, weights = [], []
    for name, site in sample_sites(tr):
        if site["is_observed"] or site["infer"].get("is_auxiliary"):
            continue
        if getattr(site["fn"].support, "is_discrete", False):
            continue
        (layers if is_local(site, n) else weights).append(name)
    return Sites(layers, weights)


