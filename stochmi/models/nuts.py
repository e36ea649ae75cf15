"""NUTS on the small Bayesian net, and a comparison with SVI on the same net.

The reference small net (``models/bayes_small.toml``) maps MNIST images to their
first 10 principal components (a fixed, deterministic projection), then one
tanh layer of 5 units, then 10 logits, with a ``Normal(0, 1)`` prior on every
weight: about 115 weights, few enough for Hamiltonian Monte Carlo.

:func:`run_nuts` samples the exact weight posterior ``p(W | x, y)`` with Pyro's
``NUTS`` (chains run one after another, each seeded from ``seed``) and returns
an ``arviz.InferenceData``; :func:`nuts_summary` gives R-hat and effective
sample sizes.  :func:`compare_nuts_svi` trains the same network by SVI (mean-field
Gaussian guide) and compares posterior-predictive accuracy and log predictive
density on held-out images: a check of how much the mean-field approximation
loses on this net.

NUTS needs ``noise.sigma = 0``: with injected noise every example would carry
its own latent layer values (N x d extra dimensions) and the sampler would have
to explore them as well.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from stochmi.core.rng import chain_seeds, resolve_seed, rng_context
from stochmi.data.mnist import MNISTData
from stochmi.models.nets import BayesMLP, build_model
from stochmi.models.spec import ModelSpec, load_spec
from stochmi.models.training import TrainResult, predictive_from_draws, predictive_log_proba, train

__all__ = [
    "run_nuts",
    "nuts_summary",
    "nuts_predictive_log_proba",
    "compare_nuts_svi",
    "NutsSviComparison",
]


def _check_nuts_model(model: BayesMLP) -> None:
    if not isinstance(model, BayesMLP):
        raise TypeError(f"NUTS needs a bayes_mlp network, got {type(model).__name__}")
    if any(s > 0 for s in model.sigmas):
        raise ValueError(
            f"spec {model.spec.name!r} has injected noise sigma={model.sigmas}; NUTS needs "
            "noise.sigma = 0 (with noise each example's layer values would be extra latent "
            "variables to sample). Override with noise.sigma=0."
        )


def run_nuts(
    data: MNISTData,
    *,
    spec: str | ModelSpec = "bayes_small",
    num_samples: int | None = None,
    warmup_steps: int | None = None,
    num_chains: int | None = None,
    seed: int | None = 0,
    max_tree_depth: int | None = None,
    model: BayesMLP | None = None,
    progress: bool = False,
):
    """Sample the weight posterior of a small Bayesian net with NUTS.

    Parameters
    ----------
    data : MNISTData
        Training images ``(N, 784)`` and labels; the full posterior
        ``p(W | x_{1:N}, y_{1:N})`` is sampled (no subsampling).
    spec : str or ModelSpec
        A ``bayes_mlp`` spec with ``noise.sigma = 0`` (default ``"bayes_small"``).
    num_samples, warmup_steps, num_chains, max_tree_depth : int, optional
        Default to the spec's ``[nuts]`` section.
    seed : int or None
        Chain ``c`` uses a seed derived from ``seed`` (``numpy.random.SeedSequence``;
        ``None``: a fresh seed, recorded in ``attrs["seed"]``); torch's global RNG is
        forked and restored.
    model : BayesMLP, optional
        The network (default ``build_model(spec)``).
    progress : bool
        Show Pyro's progress bar per chain.

    Returns
    -------
    arviz.InferenceData
        ``posterior`` with one variable per weight site (dims ``chain, draw, ...``),
        ``sample_stats`` (``diverging``), ``observed_data`` (``y``);
        ``attrs`` record the spec, data source, seed and settings.
    """
    import arviz as az
    from pyro.infer import MCMC, NUTS

    if not isinstance(data, MNISTData):
        raise TypeError(f"data must be MNISTData, got {type(data).__name__}")
    spec = load_spec(spec) if model is None else model.spec
    model = build_model(spec) if model is None else model
    _check_nuts_model(model)
    num_samples = int(spec.get("nuts.num_samples") if num_samples is None else num_samples)
    warmup_steps = int(spec.get("nuts.warmup_steps") if warmup_steps is None else warmup_steps)
    num_chains = int(spec.get("nuts.num_chains") if num_chains is None else num_chains)
    depth = int(spec.get("nuts.max_tree_depth") if max_tree_depth is None else max_tree_depth)
    if num_samples < 1 or warmup_steps < 0 or num_chains < 1 or depth < 1:
        raise ValueError("num_samples, num_chains, max_tree_depth must be >= 1, warmup >= 0")

    buf = next(iter(model.buffers()))
    x, y = data.x.to(buf.device), data.y.to(buf.device)
    kwargs = {"register_layers": False}
    if model.input_transform is not None:
        with torch.no_grad():
            x = model.input_transform(x)
        kwargs["transformed_input"] = True
    used_seed = resolve_seed(seed)
    idatas = []
    threads = torch.get_num_threads()
    try:
        # The potential of this tiny net is latency bound: one intra-op thread is
        # faster than several, and much faster on a loaded machine (restored below).
        torch.set_num_threads(1)
        for chain_seed in chain_seeds(used_seed, num_chains):
            with rng_context(chain_seed, buf.device):
                kernel = NUTS(model, max_tree_depth=depth, jit_compile=False)
                mcmc = MCMC(
                    kernel,
                    num_samples=num_samples,
                    warmup_steps=warmup_steps,
                    num_chains=1,
                    disable_progbar=not progress,
                )
                mcmc.run(x, y, **kwargs)
                idatas.append(az.from_pyro(mcmc, log_likelihood=False))
    finally:
        torch.set_num_threads(threads)
    idata = idatas[0] if len(idatas) == 1 else az.concat(*idatas, dim="chain")
    idata.attrs.update(
        {
            "stochmi_spec": spec.name,
            "stochmi_spec_toml": spec.to_toml(),
            "data_source": data.source,
            "n_train": len(data),
            "seed": used_seed,
            "num_samples": num_samples,
            "warmup_steps": warmup_steps,
            "num_chains": num_chains,
            "max_tree_depth": depth,
        }
    )
    return idata


def nuts_summary(idata):
    """R-hat, bulk/tail ESS and MCSE per weight entry (``arviz.summary``, diagnostics).

    Returns
    -------
    pandas.DataFrame
        Columns ``mcse_mean, mcse_sd, ess_bulk, ess_tail, r_hat``; one row per
        scalar weight.  R-hat needs at least 2 chains to be meaningful.
    """
    import arviz as az

    return az.summary(idata, kind="diagnostics")


def _posterior_draws(idata, device) -> tuple[list[dict[str, torch.Tensor]], int]:
    post = idata.posterior
    names = list(post.data_vars)
    arrays = {n: post[n].values for n in names}
    n_chain, n_draw = arrays[names[0]].shape[:2]
    draws = []
    for c in range(n_chain):
        for d in range(n_draw):
            draws.append(
                {
                    n: torch.as_tensor(arrays[n][c, d], dtype=torch.float32, device=device)
                    for n in names
                }
            )
    return draws, len(draws)


def nuts_predictive_log_proba(
    model: BayesMLP, idata, x: torch.Tensor, *, seed: int | None = 0, batch_size: int = 4096
) -> torch.Tensor:
    """Log posterior-predictive probabilities from NUTS draws.

    ``log p(y | x, D) ~= log (1/S) sum_s softmax(f(x; W_s))`` over all ``S``
    posterior draws (chains x draws) in ``idata``.

    Returns
    -------
    torch.Tensor
        ``(N, n_classes)`` float64.
    """
    buf = next(iter(model.buffers()))
    draws, s = _posterior_draws(idata, buf.device)
    with rng_context(resolve_seed(seed), buf.device), torch.no_grad():
        return predictive_from_draws(model, x.to(buf.device), draws, s, batch_size)


def _scores(log_proba: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    y = y.to(log_proba.device)
    acc = float((log_proba.argmax(-1) == y).double().mean())
    lpd = float(log_proba.gather(1, y[:, None]).mean())
    return acc, lpd


@dataclass
class NutsSviComparison:
    """Posterior-predictive comparison of NUTS and SVI on the same network.

    Attributes
    ----------
    nuts_accuracy, svi_accuracy : float
        Test accuracy of the posterior-predictive mean.
    nuts_lpd, svi_lpd : float
        Mean log predictive density of the test labels (nats per example;
        higher is better).
    n_test : int
    idata : arviz.InferenceData
        The NUTS run.
    summary : pandas.DataFrame
        :func:`nuts_summary` of it.
    svi : TrainResult
        The SVI run.
    """

    nuts_accuracy: float
    svi_accuracy: float
    nuts_lpd: float
    svi_lpd: float
    n_test: int
    idata: Any = field(repr=False)
    summary: Any = field(repr=False)
    svi: TrainResult = field(repr=False)

    @property
    def max_r_hat(self) -> float:
        """Largest R-hat over all weights (nan with one chain)."""
        return float(np.nanmax(self.summary["r_hat"].to_numpy())) if len(self.summary) else math.nan

    @property
    def min_ess_bulk(self) -> float:
        """Smallest bulk effective sample size over all weights."""
        return float(np.nanmin(self.summary["ess_bulk"].to_numpy()))

    def as_dict(self) -> dict[str, float]:
        """Scalar results as a flat dict."""
        return {
            "nuts_accuracy": self.nuts_accuracy,
            "svi_accuracy": self.svi_accuracy,
            "nuts_lpd": self.nuts_lpd,
            "svi_lpd": self.svi_lpd,
            "n_test": self.n_test,
            "max_r_hat": self.max_r_hat,
            "min_ess_bulk": self.min_ess_bulk,
        }


def compare_nuts_svi(
    train_data: MNISTData,
    test_data: MNISTData,
    *,
    spec: str | ModelSpec = "bayes_small",
    num_samples: int | None = None,
    warmup_steps: int | None = None,
    num_chains: int | None = None,
    svi_epochs: int | None = None,
    svi_samples: int = 64,
    seed: int | None = 0,
    progress: bool = False,
) -> NutsSviComparison:
    """Fit the same small net by NUTS and by SVI; compare predictive performance.

    Parameters
    ----------
    train_data, test_data : MNISTData
    spec : str or ModelSpec
        A ``bayes_mlp`` spec with ``noise.sigma = 0`` (default ``"bayes_small"``).
    num_samples, warmup_steps, num_chains : int, optional
        NUTS settings (default: the spec's ``[nuts]``).
    svi_epochs : int, optional
        SVI epochs (default: ``training.epochs``).
    svi_samples : int
        Guide draws for the SVI predictive.
    seed : int or None
    progress : bool

    Returns
    -------
    NutsSviComparison
    """
    spec = load_spec(spec)
    model = build_model(spec)
    idata = run_nuts(
        train_data,
        model=model,
        num_samples=num_samples,
        warmup_steps=warmup_steps,
        num_chains=num_chains,
        seed=seed,
        progress=progress,
    )
    lp_nuts = nuts_predictive_log_proba(model, idata, test_data.x, seed=seed)
    svi_model = build_model(spec)
    result = train(svi_model, train_data, spec, epochs=svi_epochs, seed=seed, progress=progress)
    lp_svi = predictive_log_proba(
        result.model, result.guide, test_data.x, n_samples=svi_samples, seed=seed
    )
    nuts_acc, nuts_lpd = _scores(lp_nuts, test_data.y)
    svi_acc, svi_lpd = _scores(lp_svi, test_data.y)
    return NutsSviComparison(
        nuts_accuracy=nuts_acc,
        svi_accuracy=svi_acc,
        nuts_lpd=nuts_lpd,
        svi_lpd=svi_lpd,
        n_test=len(test_data),
        idata=idata,
        summary=nuts_summary(idata),
        svi=result,
    )
