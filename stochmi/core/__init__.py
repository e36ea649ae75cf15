"""The estimator core: pure torch, no Pyro, no pandas.

- :mod:`~stochmi.core.estimate`: :class:`MIEstimate`, the result type;
- :mod:`~stochmi.core.kernel`: log-density kernels of a conditional ``p(t | s_i)``
  (the Gaussian fast path and the generic ``log_prob`` path);
- :mod:`~stochmi.core.estimator`: :func:`mi_from_conditional`, :func:`mi_with_labels`;
- :mod:`~stochmi.core.bounds`: :func:`pairwise_bounds` (Kolchinsky-Tracey);
- :mod:`~stochmi.core.closed_form`: closed-form references;
- :mod:`~stochmi.core.rng`: every seed and generator helper of the package.
"""

from stochmi.core import closed_form
from stochmi.core.bounds import pairwise_bounds
from stochmi.core.estimate import MIEstimate
from stochmi.core.estimator import make_generator, mi_from_conditional, mi_with_labels

__all__ = [
    "MIEstimate",
    "mi_from_conditional",
    "mi_with_labels",
    "pairwise_bounds",
    "make_generator",
    "closed_form",
]
