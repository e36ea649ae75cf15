"""stochmi: finite, certified mutual information between layers of stochastic networks.

Public names
------------
MIEstimate            result type (value, stderr, lower, upper, ...)
mi_from_conditional   I(S; T) from a conditional density p(t | s_i), batch (N,)
mi_with_labels        I(T; Y) for discrete labels via class-conditional mixtures
pairwise_bounds       Kolchinsky-Tracey bounds for Gaussian channels
closed_form           module of closed-form references (linear-Gaussian MI, ...)
"""

from stochmi import closed_form
from stochmi.bounds import pairwise_bounds
from stochmi.core import mi_from_conditional, mi_with_labels
from stochmi.estimate import MIEstimate

__all__ = [
    "MIEstimate",
    "mi_from_conditional",
    "mi_with_labels",
    "pairwise_bounds",
    "closed_form",
]
__version__ = "0.1.0"
