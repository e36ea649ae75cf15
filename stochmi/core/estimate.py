"""The result type of the core estimators and the baselines.

:func:`stochmi.mi_from_conditional`, :func:`stochmi.mi_with_labels` and every
baseline's ``estimate`` (:mod:`stochmi.baselines`) return an :class:`MIEstimate`.
:func:`stochmi.layer_mi` and :func:`stochmi.weight_mi` return a ``pandas.DataFrame``
whose rows carry the main fields (``value, stderr, lower, upper``, ...) as columns;
:func:`stochmi.replica.mutual_information` returns a table of its own (entropies and
MI per unit, no Monte Carlo error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MIEstimate"]


@dataclass(frozen=True)
class MIEstimate:
    """A mutual-information estimate in nats, with its error bar and bounds.

    Attributes
    ----------
    value : float
        Point estimate of the mutual information (nats).  For
        :func:`stochmi.mi_from_conditional` this is the *dataset* MI (source
        uniform over the N given values), unbiased up to Monte Carlo error.
    stderr : float
        Monte Carlo standard error of ``value`` (``nan`` if the estimator has none).
    lower, upper : float
        Bracket on the *population* MI (source drawn i.i.d. from its
        distribution).  Both hold in expectation; ``nan`` where an estimator
        gives no bound.
    lower_stderr, upper_stderr : float
        Monte Carlo standard errors of ``lower`` and ``upper``.
    saturated : bool
        True when ``lower`` sits near ``log N`` (for :func:`stochmi.mi_from_conditional`
        within its ``saturation_margin``, 1 nat by default): the InfoNCE bound cannot
        exceed ``log N``, so the bracket is loose and more samples are needed.
    n : int
        Number of source values N.
    n_draws : int
        Number of channel draws per source value.
    method : str
        Name of the estimator that produced the number.
    extra : dict
        Estimator-specific diagnostics (for example pairwise-distance bounds).
    """

    value: float
    stderr: float = math.nan
    lower: float = math.nan
    upper: float = math.nan
    lower_stderr: float = math.nan
    upper_stderr: float = math.nan
    saturated: bool = False
    n: int = 0
    n_draws: int = 1
    method: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def log_n(self) -> float:
        """``log N``, the ceiling of the dataset MI and of the InfoNCE lower bound."""
        return math.log(self.n) if self.n > 0 else math.nan

    def as_dict(self) -> dict[str, Any]:
        """Flat dictionary of the scalar fields (``extra`` left out)."""
        return {
            "value": self.value,
            "stderr": self.stderr,
            "lower": self.lower,
            "upper": self.upper,
            "lower_stderr": self.lower_stderr,
            "upper_stderr": self.upper_stderr,
            "saturated": self.saturated,
            "n": self.n,
            "n_draws": self.n_draws,
            "method": self.method,
        }

    def __str__(self) -> str:  # pragma: no cover - formatting only
        s = f"{self.value:.4f} ± {self.stderr:.4f} nats"
        if not math.isnan(self.lower):
            s += f"  bracket [{self.lower:.4f}, {self.upper:.4f}]"
        if self.saturated:
            s += "  (lower bound saturated near log N)"
        return s
