"""Site discovery: which sample sites of a Pyro model are layers and which are weights.

A stochastic layer is a latent, continuous ``pyro.sample`` site inside the data plate
(batch dimension ``N``); a global latent site (no data dimension) is a weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Sites",
    "find_layers",
    "is_local",
    "no_layers_message",
    "resolve_layers",
    "sample_sites",
    "trace_model",
]


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


def resolve_layers(found: list[str], requested: list[str] | None) -> list[str]:
    """The requested layer sites in execution order (all ``found`` ones when None).

    Raises
    ------
    ValueError
        A requested name is not one of the model's stochastic layers.
    """
    if requested is None:
        return list(found)
    unknown = [s for s in requested if s not in found]
    if unknown:
        raise ValueError(
            f"unknown layer sites {unknown}; the model's stochastic layers are {found}"
        )
    return [s for s in found if s in requested]


def no_layers_message(model: Callable, x: torch.Tensor) -> str:
    """Why :func:`find_layers` found no layer in ``model``, in words.

    The zero-noise explanation (infinite MI) is given only when the model has
    deterministic sites (``pyro.deterministic`` or a ``Delta``); a site that has the
    data dimension but is declared outside ``pyro.plate`` gets the plate advice.
    """
    from stochmi.core.kernel import DETERMINISTIC_MESSAGE, is_delta

    n = x.shape[0]
    tr = trace_model(model, x)
    outside, deterministic = [], []
    for name, site in sample_sites(tr):
        fn = base = site["fn"]
        while hasattr(base, "base_dist") and not is_delta(base):  # Masked, Independent
            base = base.base_dist
        if is_delta(base):
            deterministic.append(name)
        elif not site["is_observed"] and not is_local(site, n):
            shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
            if shape[:1] == (n,):
                outside.append(name)
    msg = (
        "no stochastic layers found: the model has no latent continuous sample site "
        f"inside a plate over the {n} inputs."
    )
    if outside:
        msg += (
            f" Sites {outside} have a first dimension of size {n} but are not inside "
            "pyro.plate over the inputs, so they are taken as global weights: declare each "
            "layer inside `with pyro.plate('data', x.shape[0]):`."
        )
    if deterministic:
        msg += f" Sites {deterministic} are deterministic: {DETERMINISTIC_MESSAGE}"
    if not outside and not deterministic:
        msg += " Declare each stochastic layer with pyro.sample inside pyro.plate over the inputs."
    return msg
