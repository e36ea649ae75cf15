"""The estimator core: pure torch, no Pyro, no pandas.

- :mod:`~stochmi.core.estimate`: :class:`MIEstimate`, the result type;
- :mod:`~stochmi.core.kernel`: log-density kernels of a conditional ``p(t | s_i)``
  (the Gaussian fast path and the generic ``log_prob`` path);
- :mod:`~stochmi.core.estimator`: :func:`mi_from_conditional`, :func:`mi_with_labels`;
- :mod:`~stochmi.core.bounds`: :func:`pairwise_bounds` (Kolchinsky-Tracey);
- :mod:`~stochmi.core.closed_form`: closed-form references;
- :mod:`~stochmi.core.rng`: every seed and generator helper of the package;
- :data:`ESTIMATOR_REVISION`: the revision of the estimators' numbers.
"""

from stochmi.core import closed_form
from stochmi.core.bounds import pairwise_bounds
from stochmi.core.estimate import MIEstimate
from stochmi.core.estimator import make_generator, mi_from_conditional, mi_with_labels

#: Revision of the numbers the estimators return (this core, :func:`stochmi.layer_mi`,
#: :func:`stochmi.weight_mi` and the deep-layer densities behind them).  Every stored
#: sweep record carries it in its fingerprint
#: (:meth:`stochmi.experiments.config.CellSpec.fingerprint`), so a record computed
#: under another revision is recomputed, not reused.  Bump it whenever a change can
#: move a number: a method, a default, the numerics or the random streams (the
#: package version alone does not change between such edits).
ESTIMATOR_REVISION = "2026-12-07.4"

__all__ = [
    "ESTIMATOR_REVISION",
    "MIEstimate",
    "mi_from_conditional",
    "mi_with_labels",
    "pairwise_bounds",
    "make_generator",
    "closed_form",
]
