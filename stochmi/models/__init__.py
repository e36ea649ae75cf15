"""Reference models: declarative specs, the Pyro networks they describe, training, NUTS.

- :mod:`~stochmi.models.spec`: :func:`load_spec` reads a spec by name (the TOML files
  shipped in :mod:`stochmi.models.specs`, from the repository's ``models/`` folder) or
  by path, and validates it;
- :mod:`~stochmi.models.nets`: :func:`build_model`, the Pyro networks;
- :mod:`~stochmi.models.training`: SVI training, accuracy, checkpoints;
- :mod:`~stochmi.models.nuts`: the NUTS reference posterior of the small Bayesian net.
"""

from stochmi.models.nets import build_model
from stochmi.models.nuts import run_nuts
from stochmi.models.spec import ModelSpec, SpecError, list_specs, load_spec
from stochmi.models.training import accuracy, load_checkpoint, save_checkpoint, train

__all__ = [
    "ModelSpec",
    "SpecError",
    "load_spec",
    "list_specs",
    "build_model",
    "train",
    "accuracy",
    "save_checkpoint",
    "load_checkpoint",
    "run_nuts",
]
