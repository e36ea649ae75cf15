"""Training, evaluation and checkpoints for the reference networks.

Objective
---------
Both families are trained with Pyro's ``Trace_ELBO`` on the *same* model
function that :func:`stochmi.layer_mi` traces, called with
``register_layers=False`` (layer noise drawn by reparameterised sampling, no
``h`` sites) and a subsampled ``pyro.plate("data", size=N_train, subsample=...)``
so that the minibatch log-likelihood is scaled by ``N_train / B``:

* ``bayes_mlp``: the guide is a :class:`~stochmi.models.nets.MeanFieldGuide` and
  ``-ELBO = -E_{q(W), noise}[ sum_i log p(y_i | x_i, W, noise) ] + KL(q(W) || p(W))``.
* ``noisy_mlp`` / ``noisy_cnn``: no global latents, so ``-ELBO`` reduces to the
  expected negative log-likelihood ``-E_noise sum_i log p(y_i | x_i, noise)``
  (cross-entropy through the noisy layers), optimised by Adam on the
  network's own parameters.

The loss in the history is ``-ELBO / N_train`` (nats per training example),
averaged over the epoch's minibatches.  Parameters live in the model and guide
modules (never in Pyro's global param store) and are optimised with
``torch.optim`` (``Adam``, ``SGD``) or Pyro's ``ClippedAdam`` optimiser.

Randomness: minibatch order comes from a private ``torch.Generator``; the noise
and weight draws use torch's global RNG inside :func:`stochmi.core.rng.rng_context`
seeded with ``seed``, so the caller's RNG is untouched and the same seed gives the
same history.  ``seed=None`` draws a fresh seed (the rule of :mod:`stochmi.core.rng`),
which :attr:`TrainResult.seed` records.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam
from tqdm.auto import tqdm

from stochmi.core.rng import make_generator, resolve_seed, rng_context
from stochmi.data.mnist import MNISTData, load_mnist, train_test_split
from stochmi.models.nets import StochasticNet, build_model
from stochmi.models.spec import ModelSpec, load_spec, spec_from_toml

__all__ = [
    "TrainResult",
    "train",
    "accuracy",
    "predictive_log_proba",
    "save_checkpoint",
    "load_checkpoint",
    "load_training_data",
]

_CHECKPOINT_FORMAT = "stochmi-checkpoint"
_CHECKPOINT_VERSION = 1


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    model : StochasticNet
        The trained network.
    guide : MeanFieldGuide or None
        The trained guide (Bayesian nets), None for noisy nets.
    history : list of dict
        One record per epoch, epoch 0 being the untrained network:
        ``epoch``, ``loss`` (-ELBO per training example; nan at epoch 0),
        ``train_acc`` (predictive accuracy on up to ``train_eval_size``
        training images), ``test_acc`` (nan without a test set), ``seconds``
        (training time of the epoch), ``kl`` (Bayesian nets: ``KL(q(W) || p(W))``
        in nats, :func:`stochmi.layers.weights.weight_kl`), plus whatever the
        callback returned.
    spec : ModelSpec
    seed : int
        The seed used (a fresh one when :func:`train` got ``seed=None``); passing it
        back replays the run.
    """

    model: StochasticNet
    guide: Any
    history: list[dict] = field(default_factory=list)
    spec: ModelSpec | None = None
    seed: int | None = None

    @property
    def final(self) -> dict:
        """The last history record."""
        return self.history[-1]


def _empty_guide(*args, **kwargs):
    return None


def _make_optimizer(spec: ModelSpec, params):
    name = spec.get("training.optimizer")
    lr = float(spec.get("training.lr"))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "clipped_adam":
        return ClippedAdam(params, lr=lr, clip_norm=float(spec.get("training.clip_norm")))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}")  # pragma: no cover - spec validates


def _check_data(data, name: str) -> None:
    if not isinstance(data, MNISTData):
        raise TypeError(f"{name} must be MNISTData, got {type(data).__name__}")
    if len(data) == 0:
        raise ValueError(f"{name} is empty")


def train(
    model: StochasticNet,
    data: MNISTData,
    spec: ModelSpec | None = None,
    *,
    test: MNISTData | None = None,
    epochs: int | None = None,
    seed: int | None = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    callback: Callable | None = None,
    guide=None,
    train_eval_size: int | None = 2000,
) -> TrainResult:
    """Train a reference network by stochastic variational inference.

    Parameters
    ----------
    model : StochasticNet
        From :func:`stochmi.models.nets.build_model`.
    data : MNISTData
        Training images, ``N_train`` of them.
    spec : ModelSpec, optional
        Training recipe (``[training]``); defaults to ``model.spec``.
    test : MNISTData, optional
        Evaluated after every epoch (``test_acc`` in the history).
    epochs : int, optional
        Overrides ``training.epochs``.
    seed : int or None
        Seeds minibatch order, noise and weight draws, and the guide's
        initialisation.  Same seed, same history; ``None`` draws a fresh seed
        (recorded in :attr:`TrainResult.seed`).  The global RNG is left as it was.
    device : str or torch.device
        Where to train; the model (and guide) are moved there.
    progress : bool
        Show a tqdm progress bar over the minibatches.
    callback : callable, optional
        ``callback(epoch, model, guide)``, called for epoch 0 (before training)
        and after every epoch, with a private RNG (it cannot perturb training).
        If it returns a mapping, its items are added to that epoch's record
        (e.g. MI estimates for an information-plane plot).
    guide : MeanFieldGuide, optional
        Continue training this guide instead of a fresh ``model.make_guide(seed=seed)``.
    train_eval_size : int or None
        ``train_acc`` is measured on a fixed seeded subset of this many
        training images (None: all of them); evaluation with
        ``training.eval_samples`` draws per image otherwise costs more than an
        epoch of training.

    Returns
    -------
    TrainResult
    """
    _check_train_inputs(model, data, test)
    spec = model.spec if spec is None else load_spec(spec)
    n_epochs = int(spec.get("training.epochs") if epochs is None else epochs)
    if n_epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {n_epochs}")
    batch_size = int(spec.get("training.batch_size"))
    dev = torch.device(device)
    model.to(dev)
    x, y = data.x.to(dev), data.y.to(dev)
    n = len(data)
    seed = resolve_seed(seed)
    gen = make_generator(seed)[0]
    eval_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    train_eval = data
    if train_eval_size is not None and train_eval_size < n:
        train_eval = data.subset(int(train_eval_size), seed=eval_seed)

    history: list[dict] = []
    with rng_context(seed, dev):
        guide, guide_fn, optimizer = _setup_guide_and_optimizer(model, spec, guide, seed, dev)
        elbo = Trace_ELBO(num_particles=int(spec.get("training.num_particles")))
        evaluator = _EpochEvaluator(
            model=model,
            guide=guide,
            train_eval=train_eval,
            test=test,
            eval_samples=int(spec.get("training.eval_samples")),
            eval_seed=eval_seed,
            x=x,
            callback=callback,
            device=dev,
        )
        history.append(evaluator(0, math.nan, 0.0))
        n_batches = math.ceil(n / batch_size)
        bar = tqdm(
            total=n_epochs * n_batches,
            disable=not progress,
            desc=f"train {spec.name}",
            unit="batch",
            leave=False,
        )
        try:
            for epoch in range(1, n_epochs + 1):
                t0 = time.perf_counter()
                perm = torch.randperm(n, generator=gen).to(dev)
                loss = _train_epoch(
                    model, guide_fn, elbo, optimizer, x, y, perm, batch_size, epoch, bar
                )
                history.append(evaluator(epoch, loss, time.perf_counter() - t0))
                last = history[-1]
                bar.set_postfix(epoch=epoch, loss=f"{last['loss']:.4f}", test=last["test_acc"])
        finally:
            bar.close()
    return TrainResult(model, guide, history, spec, seed)


def _check_train_inputs(model, data, test) -> None:
    """Type and emptiness checks of :func:`train`'s model and data sets."""
    if not isinstance(model, StochasticNet):
        raise TypeError(f"model must be a StochasticNet (build_model), got {type(model).__name__}")
    _check_data(data, "data")
    if test is not None:
        _check_data(test, "test")


def _setup_guide_and_optimizer(model: StochasticNet, spec: ModelSpec, guide, seed, dev):
    """The guide (fresh unless given, on ``dev``), the callable SVI uses as guide, the optimizer.

    Runs inside :func:`train`'s RNG context: a fresh guide's initialisation draws from it.
    The optimizer is None when there is nothing to optimise.
    """
    if guide is None:
        guide = model.make_guide(seed=seed)
    if guide is not None:
        guide.to(dev)
    guide_fn = guide if guide is not None else _empty_guide
    params = list(model.parameters()) + (list(guide.parameters()) if guide is not None else [])
    optimizer = _make_optimizer(spec, params) if params else None
    return guide, guide_fn, optimizer


@dataclass
class _EpochEvaluator:
    """Builds one history record of :func:`train` (see :class:`TrainResult`)."""

    model: StochasticNet
    guide: Any
    train_eval: MNISTData
    test: MNISTData | None
    eval_samples: int
    eval_seed: int
    x: torch.Tensor
    callback: Callable | None
    device: torch.device

    def __call__(self, epoch: int, loss: float, seconds: float) -> dict:
        model, guide = self.model, self.guide
        rec = {
            "epoch": epoch,
            "loss": loss,
            "train_acc": accuracy(
                model, guide, self.train_eval, n_samples=self.eval_samples, seed=self.eval_seed
            ),
            "test_acc": (
                accuracy(model, guide, self.test, n_samples=self.eval_samples, seed=self.eval_seed)
                if self.test is not None
                else math.nan
            ),
            "seconds": seconds,
        }
        if guide is not None:  # information in the weights, KL(q(W) || p(W)) in nats
            from stochmi.layers.weights import weight_kl

            rec["kl"] = weight_kl(model, guide, self.x[:2]).attrs["total"]
        if self.callback is not None:
            with rng_context(None, self.device):
                extra = self.callback(epoch, model, guide)
            if isinstance(extra, Mapping):
                rec.update(extra)
        return rec


def _train_epoch(model, guide_fn, elbo, optimizer, x, y, perm, batch_size, epoch, bar) -> float:
    """One pass over the minibatches in ``perm`` order; the mean ``-ELBO / N_train``."""
    n = x.shape[0]
    n_batches = math.ceil(n / batch_size)
    total = 0.0
    for b in range(n_batches):
        idx = perm[b * batch_size : (b + 1) * batch_size]
        loss = elbo.differentiable_loss(
            model, guide_fn, x[idx], y[idx], n_total=n, register_layers=False
        )
        if optimizer is not None:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        value = float(loss.detach()) / n
        if not math.isfinite(value):
            raise FloatingPointError(
                f"loss became {value} at epoch {epoch}, batch {b}; lower training.lr"
            )
        total += value
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{value:.4f}")
    return total / n_batches


# ----------------------------------------------------------------------------- prediction


def _weight_draws(guide, n_samples: int):
    """Yield one weight sample dict per predictive draw (None for noisy nets)."""
    for _ in range(n_samples):
        if guide is None:
            yield None
        else:
            trace = poutine.trace(guide).get_trace()
            yield {
                name: site["value"].detach()
                for name, site in trace.nodes.items()
                if site["type"] == "sample"
            }


def predictive_from_draws(model, x, draws, n_draws: int, batch_size: int) -> torch.Tensor:
    """log of the mean predictive probabilities over ``draws``: ``(N, C)`` float64."""
    acc = None
    for w in draws:
        fn = model if w is None else poutine.condition(model, data=w)
        parts = []
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            with poutine.block():
                logits = fn(xb, None, register_layers=False)
            parts.append(torch.log_softmax(logits.double(), dim=-1))
        lp = torch.cat(parts)
        acc = lp if acc is None else torch.logaddexp(acc, lp)
    return acc - math.log(n_draws)


def predictive_log_proba(
    model: StochasticNet,
    guide,
    x: torch.Tensor,
    *,
    n_samples: int = 8,
    seed: int | None = 0,
    batch_size: int = 2048,
) -> torch.Tensor:
    """Log posterior-predictive class probabilities.

    ``log p(y | x) ~= log (1/S) sum_s softmax(f(x; W_s, noise_s))``, with
    ``W_s ~ q(W)`` (one weight draw shared by all inputs in draw ``s``) and the
    layer noise drawn per input.

    Parameters
    ----------
    model : StochasticNet
    guide : MeanFieldGuide or None
    x : torch.Tensor
        ``(N, input_dim)``.
    n_samples : int
        ``S``, number of predictive draws.
    seed : int or None
        Seed for the draws (``None``: a fresh one); the global RNG is forked and the
        caller's state restored.
    batch_size : int
        Inputs per forward pass (bounds memory).  It changes the order in which
        the layer noise is drawn, so the numbers (not their distribution)
        depend on it; weight draws are shared across batches.

    Returns
    -------
    torch.Tensor
        ``(N, n_classes)`` float64 log-probabilities.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    dev = next(iter(model.buffers()), next(iter(model.parameters()), None))
    device = dev.device if dev is not None else torch.device("cpu")
    x = x.to(device)
    with rng_context(resolve_seed(seed), device), torch.no_grad():
        return predictive_from_draws(
            model, x, _weight_draws(guide, n_samples), n_samples, batch_size
        )


def accuracy(
    model: StochasticNet,
    guide,
    data: MNISTData,
    *,
    n_samples: int = 8,
    seed: int | None = 0,
) -> float:
    """Predictive accuracy: share of ``argmax_c p(c | x)`` equal to the label.

    ``p(c | x)`` is the mean of ``n_samples`` softmax outputs with fresh noise
    (and, with a guide, fresh weights) each; see :func:`predictive_log_proba`.
    """
    _check_data(data, "data")
    lp = predictive_log_proba(model, guide, data.x, n_samples=n_samples, seed=seed)
    return float((lp.argmax(-1).cpu() == data.y.cpu()).double().mean())


# ----------------------------------------------------------------------------- data & checkpoints


def load_training_data(spec, *, seed: int | None = 0) -> tuple[MNISTData, MNISTData]:
    """The train and test sets a spec's ``[data]`` section describes.

    ``source`` / ``n_train`` give the training images (``n_train = 0``: all);
    ``test_source`` the test images (``"split"``: a seeded ``test_fraction``
    split of the training source), ``n_test`` a seeded subset of them.
    """
    spec = load_spec(spec)
    source = spec.get("data.source")
    n_train = int(spec.get("data.n_train")) or None
    n_test = int(spec.get("data.n_test")) or None
    test_source = spec.get("data.test_source")
    full = load_mnist(source)
    if test_source == "split":
        train_data, test_data = train_test_split(
            full, test_fraction=float(spec.get("data.test_fraction")), seed=seed
        )
    else:
        train_data, test_data = full, load_mnist(test_source)
    if n_train is not None and n_train < len(train_data):
        train_data = train_data.subset(n_train, seed=seed)
    if n_test is not None and n_test < len(test_data):
        test_data = test_data.subset(n_test, seed=seed)
    return train_data, test_data


def save_checkpoint(path: str | os.PathLike, result_or_model, guide=None, spec=None) -> Path:
    """Save a network, its guide and its spec to one file (``torch.save``).

    Parameters
    ----------
    path : path
        Output file.
    result_or_model : TrainResult or StochasticNet
        A :class:`TrainResult` supplies model, guide, spec and history.
    guide : MeanFieldGuide, optional
    spec : ModelSpec, optional
        Defaults to ``model.spec``.

    The file holds the spec as TOML text, the model's and the guide's
    ``state_dict`` (the guide's parameters live in the guide module, not in
    Pyro's global param store), and the training history if any.
    """
    history = None
    if isinstance(result_or_model, TrainResult):
        model = result_or_model.model
        guide = result_or_model.guide if guide is None else guide
        spec = result_or_model.spec if spec is None else spec
        history = result_or_model.history
    else:
        model = result_or_model
    if not isinstance(model, StochasticNet):
        raise TypeError(f"expected a TrainResult or StochasticNet, got {type(model).__name__}")
    spec = model.spec if spec is None else load_spec(spec)
    payload = {
        "format": _CHECKPOINT_FORMAT,
        "version": _CHECKPOINT_VERSION,
        "spec_name": spec.name,
        "spec_toml": spec.to_toml(),
        "model_state": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "guide_state": (
            {k: v.detach().cpu() for k, v in guide.state_dict().items()}
            if guide is not None
            else None
        ),
        "history": _plain_history(history),
    }
    p = Path(path)
    torch.save(payload, p)
    return p


def _plain_history(history):
    if history is None:
        return None
    out = []
    for rec in history:
        out.append(
            {
                k: (float(v) if isinstance(v, float | np.floating) else v)
                for k, v in rec.items()
                if isinstance(v, int | float | str | bool | np.floating | np.integer)
            }
        )
    return out


def load_checkpoint(path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """Load what :func:`save_checkpoint` wrote.

    Returns
    -------
    (model, guide, spec)
        The rebuilt network with its trained state, its guide (None for noisy
        nets) and the spec.  The saved history is in ``model.history``.
    """
    try:
        payload = torch.load(Path(path), map_location=device, weights_only=True)
    except OSError:
        raise
    except Exception as exc:  # torch raises IndexError, RuntimeError, UnpicklingError, ...
        raise ValueError(
            f"{path} is not a stochmi checkpoint (torch.load failed: {type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); write one with `stochmi train`"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a stochmi checkpoint; write one with `stochmi train`")
    spec = spec_from_toml(payload["spec_toml"], payload["spec_name"])
    model = build_model(spec, seed=0).to(device)
    model.load_state_dict(payload["model_state"])
    guide = None
    if payload["guide_state"] is not None:
        guide = model.make_guide(seed=0)
        guide.load_state_dict(payload["guide_state"])
        guide.to(device)
    model.history = payload.get("history")
    return model, guide, spec
