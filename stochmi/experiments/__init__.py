"""Scripted experiments: experiment files, cells, executors, stored results, plots.

The pieces, in the order a sweep uses them:

- :mod:`~stochmi.experiments.config`: parse and validate an experiment TOML file
  (:func:`load_experiment`) and expand it into cells (:class:`CellSpec`);
- :mod:`~stochmi.experiments.cells`: :func:`run_cell` trains one cell and measures
  layer MI at chosen epochs;
- :mod:`~stochmi.experiments.executors`: in-process, process pool or Ray;
- :mod:`~stochmi.experiments.store`: atomic per-cell records, resume, and the
  assembled ``results.nc`` / ``summary.csv`` / ArviZ per-draw file;
- :mod:`~stochmi.experiments.plots`: information plane, MI against noise, layer-to-layer;
- :mod:`~stochmi.experiments.sweep`: :func:`run_sweep`, the driver;
- :mod:`~stochmi.experiments.demo`: :func:`run_demo`, the ``stochmi demo`` command.
"""

from stochmi.experiments.cells import run_cell
from stochmi.experiments.config import (
    CellSpec,
    ConfigError,
    ExperimentConfig,
    load_experiment,
    parse_experiment,
)
from stochmi.experiments.demo import run_demo
from stochmi.experiments.executors import (
    InProcessExecutor,
    ProcessExecutor,
    RayExecutor,
    make_executor,
)
from stochmi.experiments.store import ResumeError, load_results
from stochmi.experiments.sweep import SweepResult, run_sweep

__all__ = [
    "CellSpec",
    "ConfigError",
    "ExperimentConfig",
    "InProcessExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "ResumeError",
    "SweepResult",
    "load_experiment",
    "load_results",
    "make_executor",
    "parse_experiment",
    "run_cell",
    "run_demo",
    "run_sweep",
]
