"""Sample-only MI estimators that people use today, for comparison with stochmi.

Every estimator is a class with a ``name`` and an ``estimate(x, t, *, seed=None)``
method returning :class:`stochmi.core.estimate.MIEstimate` (nats).  ``x`` is (N, dx),
``t`` is (N, dt) or, for estimators that accept it, integer labels (N,); torch
tensors and numpy arrays are both accepted.  None of them needs a conditional
density: they see samples only, which is exactly why, on deterministic layers,
their numbers are artefacts of bins, kernel widths, k or training time.

=================  ==========================================================
``naive``          whole-vector histograms, ``H(X_b) + H(T_b) - H(X_b, T_b)``
``binning``        Shwartz-Ziv & Tishby per-unit binning, ``H(T_b) - H(T_b|X)``
``kde``            Kolchinsky-Tracey / Saxe pairwise bounds with imagined noise
``ksg``            Kraskov-Stögbauer-Grassberger k-NN (estimator 1, max-norm)
``mine``           Donsker-Varadhan with moving-average gradient correction
``nwj``            Nguyen-Wainwright-Jordan bound
``infonce``        InfoNCE / CPC bound (at most log batch size)
``smile``          Song & Ermon clipped DV bound
``renyi``          matrix-based Renyi alpha-entropy MI (Giraldo et al.)
``cs_qmi``         Cauchy-Schwarz / quadratic Renyi MI with Parzen windows (Hild et al.)
``vinfo_linear``   V-information with linear probes (Xu et al.)
``vinfo_mlp``      V-information with MLP probes
=================  ==========================================================

Examples
--------
>>> from stochmi import baselines
>>> est = baselines.get("ksg", k=5)
>>> est.estimate(x, t, seed=0).value  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from stochmi.benchmarking.baselines.histogram import Binning, NaiveHistogram
from stochmi.benchmarking.baselines.kde import KDE
from stochmi.benchmarking.baselines.knn import KSG
from stochmi.benchmarking.baselines.neural import MINE, NWJ, SMILE, InfoNCE
from stochmi.benchmarking.baselines.renyi import MatrixRenyi, ParzenQMI
from stochmi.benchmarking.baselines.vinfo import VInfoLinear, VInfoMLP, VInformation
from stochmi.core.estimate import MIEstimate

__all__ = [
    "MIEstimator",
    "REGISTRY",
    "get",
    "NaiveHistogram",
    "Binning",
    "KDE",
    "KSG",
    "MINE",
    "NWJ",
    "InfoNCE",
    "SMILE",
    "MatrixRenyi",
    "ParzenQMI",
    "VInformation",
    "VInfoLinear",
    "VInfoMLP",
]


@runtime_checkable
class MIEstimator(Protocol):
    """What every baseline estimator provides.

    Attributes
    ----------
    name : str
        Registry name.

    Methods
    -------
    estimate(x, t, *, seed=None) -> MIEstimate
        ``x``: (N, dx); ``t``: (N, dt) or integer labels (N,).  Value in nats.
    """

    name: str

    def estimate(self, x: Any, t: Any, *, seed: int | None = None) -> MIEstimate: ...


REGISTRY: dict[str, type] = {
    cls.name: cls
    for cls in (
        NaiveHistogram,
        Binning,
        KDE,
        KSG,
        MINE,
        NWJ,
        InfoNCE,
        SMILE,
        MatrixRenyi,
        ParzenQMI,
        VInfoLinear,
        VInfoMLP,
    )
}


def get(name: str, **params: Any) -> MIEstimator:
    """Instantiate the estimator registered under ``name`` with ``params``.

    Raises
    ------
    KeyError
        Unknown name (the message lists the known ones).
    """
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown estimator {name!r}; known: {', '.join(sorted(REGISTRY))}"
        ) from None
    return cls(**params)
