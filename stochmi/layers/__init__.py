"""Pyro integration: layer-to-layer mutual information for any Pyro model.

- :mod:`~stochmi.layers.sites`: which sample sites are layers, which are weights
  (:func:`find_layers`);
- :mod:`~stochmi.layers.chain`: samples of the layers and each layer's conditional
  density given its parent (:class:`~stochmi.layers.chain.Chain`; ``K`` paths per
  input only where densities across layers come from nested Monte Carlo);
- :mod:`~stochmi.layers.links`: each layer's conditional as a function of its parent,
  for parents the model never produced;
- :mod:`~stochmi.layers.deep`: densities across several Gaussian layers by importance
  sampling over paths;
- :mod:`~stochmi.layers.audit`: a check of those densities against bridged draws on a
  few queries;
- :mod:`~stochmi.layers.heap`: the heap settings (glibc) under which those densities'
  temporaries are reused instead of faulted in afresh;
- :mod:`~stochmi.layers.estimation`: :func:`layer_mi`, the MI table over layer pairs;
- :mod:`~stochmi.layers.weights`: :func:`stochmi.weight_mi`, the epistemic information
  ``I(T_l; W | X)`` and BALD.
"""

from stochmi.layers.estimation import COLUMNS, layer_mi
from stochmi.layers.sites import find_layers

__all__ = ["layer_mi", "find_layers", "COLUMNS"]
