"""Pyro integration: layer-to-layer mutual information for any Pyro model.

- :mod:`~stochmi.layers.sites`: which sample sites are layers, which are weights
  (:func:`find_layers`);
- :mod:`~stochmi.layers.chain`: ``K`` paths through the layers and each layer's
  conditional density (:class:`~stochmi.layers.chain.Chain`);
- :mod:`~stochmi.layers.estimation`: :func:`layer_mi`, the MI table over layer pairs.
"""

from stochmi.layers.estimation import COLUMNS, layer_mi
from stochmi.layers.sites import find_layers

__all__ = ["layer_mi", "find_layers", "COLUMNS"]
