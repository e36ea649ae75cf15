"""The benchmarking side: sample-only baseline estimators, ground-truth tasks, comparison.

- :mod:`~stochmi.benchmarking.baselines`: the MI estimators in common use, one protocol;
- :mod:`~stochmi.benchmarking.tasks`: tasks with known MI;
- :mod:`~stochmi.benchmarking.compare`: the comparison harness (``stochmi compare``),
  imported on first use (it needs pandas and matplotlib).
"""

from stochmi.benchmarking import baselines, tasks

__all__ = ["baselines", "tasks", "compare"]


def __getattr__(name: str):
    if name == "compare":
        import importlib

        return importlib.import_module("stochmi.benchmarking.compare")
    raise AttributeError(f"module 'stochmi.benchmarking' has no attribute {name!r}")
