"""stochmi: finite, certified mutual information between layers of stochastic networks."""

from stochmi.estimate import MIEstimate

__all__ = ["MIEstimate"]
__version__ = "0.1.0"
