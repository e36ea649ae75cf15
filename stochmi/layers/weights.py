"""Epistemic information: how much of what a layer carries is about the weights.

For a weight posterior ``q(W)`` and a fixed input ``x``,

.. math::

    I_q(T_l; W \\mid X = x) = E_{w \\sim q,\\, t \\sim p(t \\mid x, w)}
    \\big[\\log p(t \\mid x, w) - \\log p(t \\mid x)\\big],

averaged over the ``N`` inputs.  Two estimators, chosen by the model:

* **Closed-form weight marginal** (a :class:`~stochmi.layers.links.LocalReparamModel`
  with a guide or the prior, e.g. :class:`stochmi.models.nets.BayesMLP`):
  :func:`stochmi.layers.epistemic.posterior_layer`.  ``p(t | x)`` is the
  local-reparameterisation chain, ``p(t | x, w)`` the fixed-weight chain; the first
  layer's densities are exact, deeper ones come from
  :func:`stochmi.layers.deep.own_log_density`.  The value has no ``log M`` ceiling; its
  bracket is a sandwich of importance-sampling and posterior-sample estimates plus a
  variational upper end.
* **Otherwise** (posterior samples from NUTS, generic Pyro models): the ``M`` draws are
  the sources of a dataset MI, ``L[j, i] = log p(t_j | x, w_i)`` with ``t_j ~ p(t | x,
  w_j)``,

  .. math::

      \\hat I(x) = \\frac1M \\sum_j \\Big(L_{jj} - \\log\\frac1M\\sum_i e^{L_{ji}}\\Big)
      \\le I_{q}(T_l; W \\mid X = x) \\lesssim
      \\frac1M \\sum_j \\Big(L_{jj} - \\log\\frac1{M-1}\\sum_{i\\ne j} e^{L_{ji}}\\Big),

  at most ``log M`` (the ``method`` column says so and ``saturated`` flags values within
  1 nat of it).  Deeper layers use the same sampler
  (:func:`stochmi.layers.epistemic.dataset_deep_matrix`).

Every layer row has ``converged`` and ``mc_bias`` (the full-minus-half-sample difference)
as in :func:`stochmi.layer_mi`; ``dataset_mi`` is the estimate over the ``M`` draws as
sources where it was computed (a diagnostic, capped at ``log M``).

* **The prediction** (target ``"Y"``, a categorical label site in the data plate,
  observed or sampled): BALD, ``I(Y; W | X = x) = H[E_W p(y|x,W)] - E_W H[p(y|x,W)]``,
  exact over the ``M`` draws; ``p(y | x, w)`` averages ``n_noise`` draws of the layer
  noise.  Its leave-one-out counterpart is the upper bound.

Chain rule: ``I(X, W; T_l) = I(X; T_l) + I(W; T_l | X)``, with ``I(X; T_l)`` the
marginal-weights MI of :func:`stochmi.layer_mi` (``attrs["chain_rule"]``).

Information in the weights: :func:`weight_kl`, ``KL(q(W) || p(W))`` per weight site
(analytic for Normal/Normal, Monte Carlo otherwise), an upper bound on ``I(W; D)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import distributions as td

from stochmi.core.from_matrix import mi_terms_from_log_density
from stochmi.core.kernel import DETERMINISTIC_MESSAGE, is_delta
from stochmi.core.rng import draw_seed, resolve_seed, rng_context, spawn_seeds
from stochmi.layers.chain import as_batch_n, cuda_devices
from stochmi.layers.deep import normal_params
from stochmi.layers.epistemic import dataset_deep_matrix, posterior_layer, raise_effort
from stochmi.layers.links import LocalReparamModel
from stochmi.layers.noisy import check_estimable
from stochmi.layers.sites import find_layers, is_local, resolve_layers, sample_sites, trace_model

__all__ = ["weight_mi", "weight_kl", "COLUMNS"]

COLUMNS = ["target", "value", "stderr", "lower", "upper"]
_EXTRA = [
    "n_inputs",
    "n_weight_draws",
    "saturated",
    "method",
    "converged",
    "mc_bias",
    "dataset_mi",
    "n_queries",
]


# ---------------------------------------------------------------------------
# weight draws
# ---------------------------------------------------------------------------
def _trace(fn, x, seed: int, data: Mapping | None = None):
    import pyro.poutine as poutine

    if data:
        fn = poutine.condition(fn, data=dict(data))
    with rng_context(seed, cuda_devices(x)), torch.no_grad():
        return trace_model(fn, x)


def _as_sample_dict(samples) -> dict[str, torch.Tensor]:
    """NUTS draws: a dict of tensors/arrays, or an ArviZ InferenceData (its posterior)."""
    if hasattr(samples, "posterior"):
        post = samples.posterior
        return {
            str(k): torch.as_tensor(np.asarray(post[k].values)).flatten(0, 1)
            for k in post.data_vars
        }
    return {
        k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v
        for k, v in samples.items()
    }


def _weight_draws(model, guide, x, weight_sites, m, gen) -> list[dict]:
    """``m`` draws of the global latent sites from a guide, a dict of samples, or the prior."""
    if guide is not None and (isinstance(guide, Mapping) or hasattr(guide, "posterior")):
        samples = _as_sample_dict(guide)
        ref = _trace(model, x[:2], 0)
        missing = [w for w in weight_sites if w not in samples]
        if missing:
            raise ValueError(f"the samples have no entry for the weight sites {missing}")
        draws = None
        for w in weight_sites:
            shape = tuple(ref.nodes[w]["value"].shape)
            v = samples[w]
            lead = v.dim() - len(shape)
            if lead < 1 or tuple(v.shape[lead:]) != shape:
                raise ValueError(
                    f"samples of '{w}' have shape {tuple(v.shape)}; expected (S, *{shape})"
                )
            v = v.reshape(-1, *shape)
            if draws is None:
                s = v.shape[0]
                if s < 2:
                    raise ValueError("need at least two posterior draws")
                idx = torch.linspace(0, s - 1, min(m, s)).round().long()
                draws = [{} for _ in idx]
            for d, i in zip(draws, idx):
                d[w] = v[i].to(device=x.device, dtype=ref.nodes[w]["value"].dtype)
        return draws
    src = guide if guide is not None else model
    out = []
    for _ in range(m):
        seed = draw_seed(gen)
        try:
            tr = _trace(src, x, seed)
        except Exception:  # guides that take no arguments
            if src is model:
                raise
            tr = _trace(lambda *_: src(), x, seed)
        missing = [w for w in weight_sites if w not in tr.nodes]
        if missing:
            raise ValueError(f"the guide does not sample the weight sites {missing}")
        out.append({w: tr.nodes[w]["value"].detach() for w in weight_sites})
    return out


# ---------------------------------------------------------------------------
# site helpers
# ---------------------------------------------------------------------------
def _label_site(tr, n: int) -> str | None:
    for name, site in sample_sites(tr):
        if site["infer"].get("is_auxiliary"):
            continue
        if getattr(site["fn"].support, "is_discrete", False) and is_local(site, n):
            return name
    return None


def _class_probs(fn: td.Distribution) -> torch.Tensor:
    """``(B, C)`` class probabilities of a Categorical / Bernoulli label site."""
    base = fn
    while isinstance(base, td.Independent):
        base = base.base_dist
    if isinstance(base, td.Categorical):
        p = base.probs
    elif isinstance(base, td.Bernoulli):
        p1 = base.probs
        p = torch.stack([1 - p1, p1], -1)
    else:
        raise TypeError(
            f"the label site's distribution {type(base).__name__} is not Categorical or "
            "Bernoulli; BALD needs class probabilities"
        )
    return p.reshape(-1, p.shape[-1]).to(torch.float64)


def _check_layer(fn: td.Distribution, name: str, b: int) -> td.Distribution:
    if is_delta(fn):
        raise ValueError(
            f"layer '{name}' is deterministic given the weights, so I(T; W | X) is infinite: "
            f"{DETERMINISTIC_MESSAGE}"
        )
    return as_batch_n(fn, b, name)


# ---------------------------------------------------------------------------
# layer 1: exact log-density matrix
# ---------------------------------------------------------------------------
def _first_layer_L(fns: list[td.Distribution], queries: torch.Tensor) -> torch.Tensor:
    """``L[n, j, i] = log p(t_{n j} | x_n, w_i)``; ``queries`` ``(M, N, d)``."""
    m, n = queries.shape[:2]
    out = torch.empty(n, m, m, dtype=torch.float64, device=queries.device)
    for i, fn in enumerate(fns):
        out[:, :, i] = fn.log_prob(queries).to(torch.float64).T
    return out


# ---------------------------------------------------------------------------
# reductions
# ---------------------------------------------------------------------------
def _per_input(L: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-input value, MC variance of it, and leave-one-out upper from ``L`` ``(N, M, M)``."""
    vals, var, ups = [], [], []
    for Ln in L:
        full, loo = mi_terms_from_log_density(Ln)
        vals.append(float(full.mean()))
        var.append(float(full.var(unbiased=True)) / full.numel())
        ups.append(float(loo.mean()))
    return {"value": np.array(vals), "var": np.array(var), "upper": np.array(ups)}


def _summary_row(target, pi: dict, m: int, method: str) -> dict:
    """A row from per-input values over the draws as sources (exact or BALD: converged)."""
    n = len(pi["value"])
    value = float(pi["value"].mean())
    return {
        "target": target,
        "value": value,
        "stderr": float(math.sqrt(pi["var"].sum()) / n),
        "lower": value,
        "upper": float(pi["upper"].mean()),
        "n_inputs": n,
        "n_weight_draws": m,
        "saturated": bool(value > math.log(m) - 1.0),
        "method": method,
        "converged": True,
        "mc_bias": 0.0,
        "dataset_mi": value if target != "Y" else math.nan,
        "n_queries": n * m,
    }


def _bald(probs: torch.Tensor) -> dict:
    """BALD per input from ``probs`` ``(M, N, C)``: exact over the draws, plus LOO upper."""
    m = probs.shape[0]
    logp = torch.log(probs.clamp_min(1e-300))
    mean = probs.mean(0)
    total = -(mean * torch.log(mean.clamp_min(1e-300))).sum(-1)  # (N,)
    ent = -(probs * logp).sum(-1)  # (M, N)
    alea = ent.mean(0)
    terms = (probs * (logp - torch.log(mean.clamp_min(1e-300))[None])).sum(-1)  # (M, N)
    loo_mean = (mean[None] * m - probs) / (m - 1)
    loo = (probs * (logp - torch.log(loo_mean.clamp_min(1e-300)))).sum(-1)
    return {
        "value": (total - alea).numpy(),
        "var": (terms.var(0, unbiased=True) / m).numpy(),
        "upper": loo.mean(0).numpy(),
        "total": total.numpy(),
        "aleatoric": alea.numpy(),
    }


# ---------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------
def weight_mi(
    model: Callable,
    x: torch.Tensor,
    *,
    guide,
    layers: list[str] | None = None,
    seed: int | None = None,
    n_weight_draws: int = 64,
    n_is: int = 16,
    n_fwd: int = 16,
    n_noise: int = 16,
    tolerance: float = 0.02,
    max_effort: int = 4,
    min_queries: int = 256,
    chain_rule: bool = True,
    prediction: bool = True,
    chunk_size: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Epistemic information ``I(T_l; W | X)`` per stochastic layer and BALD for the prediction.

    Parameters
    ----------
    model : callable
        A Pyro model called as ``model(x)``: stochastic layers are latent continuous
        sample sites in the data plate, weights are global latent sites.
    x : Tensor, shape (N, ...)
        Inputs (``N >= 1``); every number is an average over them.
    guide : callable, dict or arviz.InferenceData
        The posterior of the weights: a guide (``AutoNormal``, the reference nets'
        ``MeanFieldGuide``, ...; called as ``guide(x)``), or posterior samples (NUTS)
        as ``{site: tensor (S, *shape)}`` or an InferenceData; ``None`` draws from the prior.
    layers : list of str, optional
        Layer sites (default: all, in execution order).
    seed : int, optional
        Seed of every draw, under the rule of :mod:`stochmi.core.rng` (``None``: a fresh
        seed from the operating system); the seed used is ``attrs["seed"]``, and passing
        it back replays the run.  The global RNG is neither read nor changed.
    n_weight_draws : int, default 64
        ``M``, posterior draws.  They carry the standard error of the posterior estimate
        (queries of one draw are dependent); over them as sources, the dataset MI is at
        most ``log M``.
    n_is, n_fwd : int, default 16
        Deeper layers: starting effort, proposal draws per query (times 4) and forward
        paths per query (even).
    n_noise : int, default 16
        Layer-noise draws per weight draw averaged in ``p(y | x, w)`` (BALD).
    tolerance : float, default 0.02
        Deeper layers (posterior estimate): converged when the full-minus-half-sample
        difference is at most ``max(tolerance, 0.01 |value|)`` nats; the effort doubles
        until then, up to ``max_effort`` times the start, and the row is flagged
        (``converged = False``, RuntimeWarning) if it is still above.
    max_effort : int, default 4
    min_queries : int, default 256
        Deeper layers (posterior estimate): fewest (input, weight draw) queries; each
        input gets ``min(M, max(1, ceil(min_queries / N)))`` draws.  The first layer uses
        all ``N M``.
    chain_rule : bool, default True
        Also compute ``I(X; T_l)`` with :func:`stochmi.layer_mi` (marginal weights)
        and report ``I(X, W; T_l)`` in ``attrs["chain_rule"]``.
    prediction : bool, default True
        Add the ``"Y"`` (BALD) row when the model has a label site.
    chunk_size : int, optional
        Queries per block of the deep-layer computation.
    progress : bool
        Progress bar over layers and blocks.

    Returns
    -------
    pandas.DataFrame
        One row per target (layer sites, then ``"Y"``), columns ``target, value,
        stderr, lower, upper`` (nats; ``value`` the estimate of ``I_q(T_l; W | X)``
        averaged over the inputs, ``stderr`` its Monte Carlo error, ``lower``/``upper``
        the bracket, each bound in expectation) and ``n_inputs, n_weight_draws,
        saturated, method, converged, mc_bias, dataset_mi, n_queries``.
        ``attrs``: ``per_input`` (DataFrame, one row per input, one column per
        target), ``decomposition`` (``{"per_input": DataFrame(total, aleatoric,
        epistemic), "mean": dict}``; None without a label site), ``chain_rule``
        (DataFrame; None with ``chain_rule=False``), ``convergence`` (per deeper layer:
        ``value`` and ``value_half``, the bracket's parts, ``diag_ess_median``,
        ``n_is``, ``n_fwd``), ``closed_form`` (first layer of a
        :class:`~stochmi.layers.links.LocalReparamModel`: the exact value per input),
        ``label_site``, ``layers``, ``n_weight_draws`` (``M``) and ``seed``.

    Raises
    ------
    ValueError
        Bad inputs, unknown layers, a layer deterministic given the weights, a model
        without weight sites.
    TypeError
        Deeper layers whose links are not Gaussian.
    """
    _check_weight_mi_args(x, n_weight_draws, n_noise, n_is, n_fwd)
    check_estimable(model)
    from tqdm.auto import tqdm

    used_seed = resolve_seed(seed)
    master = spawn_seeds(used_seed, 6)
    gen = torch.Generator(device=x.device).manual_seed(master[0])
    n = x.shape[0]
    sites = _weighted_sites(model, x, master[1])
    layers = resolve_layers(sites.layers, layers)
    draws = _weight_draws(model, guide, x, sites.weights, n_weight_draws, gen)
    m = len(draws)
    # one forward trace per draw: layer-1 conditionals, queries for every layer, labels
    traces = [_trace(model, x, draw_seed(gen), w) for w in draws]
    label = _label_site(traces[0], n) if prediction else None
    effort = {"n_is": n_is, "n_fwd": n_fwd, "chunk_size": chunk_size}
    rules = {"tolerance": (tolerance, 0.01), "max_effort": max_effort, "min_queries": min_queries}
    posterior = _has_weight_marginal(model, guide)
    st = _Setting(model, guide, x, sites.layers, draws, traces, master[2], posterior, effort, rules)
    rows, per_input, conv, closed = [], {}, {}, {}
    for name in tqdm(layers, desc="weight MI", disable=not progress, leave=False):
        row, per_input[name], c, cf = _layer_row(st, name)
        if c is not None:
            conv[name] = c
        if cf is not None:
            closed[name] = cf
        if not row["converged"]:
            warnings.warn(
                f"weight_mi: layer '{name}': the importance-sampling estimate has not "
                f"converged (estimated remaining bias {row['mc_bias']:.4f} nats); raise "
                "n_is / n_fwd or max_effort",
                RuntimeWarning,
                stacklevel=2,
            )
        rows.append(row)
    decomposition = None
    if label is not None:
        b = _bald(_label_probs(model, draws, x, label, sites.layers, n_noise, gen))
        rows.append(_summary_row("Y", b, m, "BALD"))
        per_input["Y"] = b["value"]
        decomposition = _bald_decomposition(b)
    df = pd.DataFrame(rows, columns=COLUMNS + _EXTRA)
    chain = None
    if chain_rule and layers:
        chain = _chain_rule(model, x, guide, layers, df, master[3])
    df.attrs.update(
        {
            "per_input": pd.DataFrame(per_input),
            "decomposition": decomposition,
            "chain_rule": chain,
            "convergence": conv,
            "closed_form": closed,
            "label_site": label,
            "layers": list(layers),
            "n_weight_draws": m,
            "seed": used_seed,
        }
    )
    return df


@dataclass
class _Setting:
    """What every layer row of :func:`weight_mi` shares."""

    model: Callable
    guide: object
    x: torch.Tensor
    layers: list[str]  # all layer sites of the model
    draws: list[dict]
    traces: list
    seed: int  # of the layers' generators (seed + layer index)
    posterior: bool  # closed-form weight marginal: the posterior estimate
    effort: dict
    rules: dict  # tolerance, max_effort, min_queries of the posterior estimate


def _layer_row(st: _Setting, name: str):
    """One layer's row, per-input values, convergence record (deeper layers) and closed
    form (first layer of a local-reparameterisation model) or None."""
    n, m = st.x.shape[0], len(st.draws)
    fns = [_check_layer(tr.nodes[name]["fn"], name, n) for tr in st.traces]
    l = st.layers.index(name)
    gen = torch.Generator(device=st.x.device).manual_seed(st.seed + l)
    cf, conv, pi = None, None, None
    if l == 0:
        queries = torch.stack([tr.nodes[name]["value"].reshape(n, -1) for tr in st.traces])
        cf = _first_layer_closed_form(st.model, name, st.x, st.guide, fns)
        pi = _per_input(_first_layer_L(fns, queries))
    elif not st.posterior:
        pi, conv = _dataset_deep(st, l, gen)
    if st.posterior:
        est = posterior_layer(
            st.model, st.guide, st.x, st.layers, l, st.draws, st.traces, gen,
            **st.rules, **st.effort,
        )  # fmt: skip
        return _posterior_row(name, est, pi, n, m), est["per_input"], est["convergence"], cf
    row = _summary_row(name, pi, m, "exact" if l == 0 else "importance sampling")
    row["method"] = f"dataset MI over {m} draws ({row['method']}; capped at log M)"
    if conv is not None:
        row["converged"] = conv["converged"]
        row["mc_bias"] = abs(conv["value"] - conv["value_half"])
    return row, pi["value"], conv, cf


def _has_weight_marginal(model, guide) -> bool:
    """The weight marginal of every layer has a closed form: a
    :class:`~stochmi.layers.links.LocalReparamModel` with a guide (or the prior), not
    posterior samples."""
    if not isinstance(model, LocalReparamModel):
        return False
    return not (isinstance(guide, Mapping) or hasattr(guide, "posterior"))


def _posterior_row(name: str, est: dict, pi: dict | None, n: int, m: int) -> dict:
    """A layer row of the posterior estimate (``pi``: the dataset MI over the draws, or
    None where it was not computed)."""
    return {
        "target": name,
        "value": est["value"],
        "stderr": est["stderr"],
        "lower": est["lower"],
        "upper": est["upper"],
        "n_inputs": n,
        "n_weight_draws": m,
        "saturated": False,
        "method": "exact densities" if est["convergence"] is None else "importance sampling",
        "converged": bool(est["converged"]),
        "mc_bias": est["mc_bias"],
        "dataset_mi": math.nan if pi is None else float(pi["value"].mean()),
        "n_queries": est["n_queries"],
    }


def _dataset_deep(st: _Setting, l: int, gen: torch.Generator) -> tuple[dict, dict]:
    """A deeper layer over the draws as sources: per-input values and the convergence
    record, the effort raised as in :func:`stochmi.layers.epistemic.raise_effort`."""

    def once(effort):
        kw = dict(st.effort, n_is=st.effort["n_is"] * effort, n_fwd=st.effort["n_fwd"] * effort)
        L, Lh, ess = dataset_deep_matrix(
            st.model, st.x, st.layers, l, st.draws, st.traces, gen, **kw
        )
        pi, half = _per_input(L), _per_input(Lh)
        return (pi, half, ess), float(pi["value"].mean()), float(half["value"].mean())

    (pi, half, ess), effort, ok, (v_full, v_half) = raise_effort(
        once, st.rules["tolerance"], st.rules["max_effort"]
    )
    conv = {
        "value": v_full,
        "value_half": v_half,
        "upper": float(pi["upper"].mean()),
        "upper_half": float(half["upper"].mean()),
        "diag_ess_median": ess,
        "n_is": st.effort["n_is"] * effort,
        "n_fwd": st.effort["n_fwd"] * effort,
        "converged": ok,
    }
    return pi, conv


def _check_weight_mi_args(x, n_weight_draws, n_noise, n_is, n_fwd) -> None:
    """The input and sample-size checks of :func:`weight_mi` (ValueError, TypeError)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have at least one input, got shape {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf values")
    for nm, v in (("n_weight_draws", n_weight_draws), ("n_noise", n_noise)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    if n_weight_draws < 2:
        raise ValueError("n_weight_draws must be >= 2 (the draws are the sources)")
    for nm, v in (("n_is", n_is), ("n_fwd", n_fwd)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 2 or v % 2:
            raise ValueError(f"{nm} must be an even int >= 2, got {v!r}")


def _weighted_sites(model, x: torch.Tensor, seed: int):
    """The model's layer and weight sites (:func:`find_layers`, traced with ``seed``).

    Raises ValueError when the model has no weight sites.
    """
    n = x.shape[0]
    xs = x if n >= 2 else x.repeat(2, *([1] * (x.dim() - 1)))  # site discovery needs N >= 2
    with rng_context(seed, cuda_devices(x)), torch.no_grad():
        sites = find_layers(model, xs)
    if not sites.weights:
        raise ValueError(
            "the model has no weight sites (global latent sample sites outside the data plate): "
            "with fixed weights I(T; W | X) = 0"
        )
    return sites


def _bald_decomposition(b: dict) -> dict:
    """``total = aleatoric + epistemic`` entropy of the prediction, per input and mean."""
    dec = pd.DataFrame({"total": b["total"], "aleatoric": b["aleatoric"], "epistemic": b["value"]})
    return {"per_input": dec, "mean": dec.mean().to_dict()}


def _first_layer_closed_form(model, name, x, guide, fns):
    """Population ``I(T_1; W | x)`` per input when the model is a
    :class:`~stochmi.layers.links.LocalReparamModel` (mean-field Gaussian weights
    entering linearly) with a guide (not posterior samples): given ``W`` the
    layer is ``N(W a + b, sigma^2)``, so ``I = 1/2 sum_i log(var_i / sigma_i^2)`` with
    ``var`` the weight-marginal variance.  ``None`` when not available."""
    if not _has_weight_marginal(model, guide):
        return None
    try:
        with torch.no_grad():
            lr = model.local_reparam_conditional(name, x, guide)
            var = normal_params(as_batch_n(lr, x.shape[0], name))[1] ** 2
            sig = normal_params(fns[0])[1] ** 2
    except Exception:
        return None
    return (0.5 * torch.log(var.double() / sig.double()).sum(1)).cpu().numpy()


def _label_probs(model, draws, x, label, layer_sites, n_noise, gen) -> torch.Tensor:
    """``p(y | x_n, w_m)`` ``(M, N, C)``, averaging ``n_noise`` layer-noise draws."""
    n = x.shape[0]
    k = n_noise if layer_sites else 1
    out = []
    for w in draws:
        xr = x.repeat(k, *([1] * (x.dim() - 1)))
        tr = _trace(model, xr, draw_seed(gen), w)
        p = _class_probs(tr.nodes[label]["fn"])
        out.append(p.reshape(k, n, -1).mean(0).cpu())
    return torch.stack(out)


def _chain_rule(model, x, guide, layers, df, seed) -> pd.DataFrame | None:
    """``I(X; T_l)`` (marginal weights) + ``I(W; T_l | X)`` = ``I(X, W; T_l)``."""
    from stochmi.layers.estimation import layer_mi

    if x.shape[0] < 2:
        return None
    g = guide
    if guide is not None and (isinstance(guide, Mapping) or hasattr(guide, "posterior")):
        # one draw per leading index: (chains, draws, ...) flattened to (S, ...)
        ref = _trace(model, x[:2], 0)
        g = _SampleGuide(
            {
                k: v.reshape(-1, *ref.nodes[k]["value"].shape) if k in ref.nodes else v
                for k, v in _as_sample_dict(guide).items()
            }
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tab = layer_mi(
                model,
                x,
                guide=g,
                weights="marginal",
                seed=seed,
                pairs=[("X", nm) for nm in layers],
            )
    except Exception as exc:  # keep the epistemic numbers; say why the chain rule is missing
        warnings.warn(f"weight_mi: chain rule not computed: {exc}", RuntimeWarning, stacklevel=3)
        return None
    wt = df.set_index("target")
    out = []
    for r in tab.itertuples():
        e = wt.loc[r.target]
        out.append(
            {
                "target": r.target,
                "I(X;T)": r.value,
                "I(X;T) stderr": r.stderr,
                "I(W;T|X)": e["value"],
                "I(W;T|X) stderr": e["stderr"],
                "I(X,W;T)": r.value + e["value"],
                "I(X,W;T) stderr": math.sqrt(r.stderr**2 + e["stderr"] ** 2),
            }
        )
    return pd.DataFrame(out)


class _SampleGuide:
    """A guide that replays a random one of a set of posterior samples."""

    def __init__(self, samples: dict[str, torch.Tensor]):
        self.samples = samples
        self.count = next(iter(samples.values())).shape[0]

    def __call__(self, *args, **kwargs):
        import pyro
        import pyro.distributions as dist

        i = int(torch.randint(0, self.count, (1,)))
        out = {}
        for k, v in self.samples.items():
            val = v[i]
            out[k] = pyro.sample(k, dist.Delta(val, event_dim=val.dim()))
        return out


# ---------------------------------------------------------------------------
# information in the weights
# ---------------------------------------------------------------------------
def _unwrap(d: td.Distribution) -> td.Distribution:
    while isinstance(d, td.Independent):
        d = d.base_dist
    return d


def _guide_normal(gtr, name) -> td.Normal | None:
    """The guide's Normal for a weight site (its own, or AutoNormal's unconstrained one
    when the transform is the identity)."""
    fn = _unwrap(gtr.nodes[name]["fn"])
    if isinstance(fn, td.Normal):
        return fn
    aux = gtr.nodes.get(name + "_unconstrained")
    if aux is not None and is_delta(gtr.nodes[name]["fn"]):
        afn = _unwrap(aux["fn"])
        if isinstance(afn, td.Normal) and torch.equal(aux["value"], gtr.nodes[name]["value"]):
            return afn
    return None


def weight_kl(
    model: Callable,
    guide,
    x: torch.Tensor | None = None,
    *,
    n_samples: int = 64,
    seed: int | None = 0,
) -> pd.DataFrame:
    """Information in the weights: ``KL(q(W) || p(W))`` per weight site and in total.

    Analytic where the guide's and the prior's site distributions are both Normal
    (``torch.distributions.kl_divergence``, summed over the site's entries); Monte Carlo
    ``E_q[log q(w) - log p(w)]`` over ``n_samples`` guide draws otherwise.  The total
    bounds the information the weights hold about the training data, ``I(W; D)``
    (PAC-Bayes; Achille & Soatto 2018).

    Parameters
    ----------
    model, guide : callables
        Called as ``model(x)`` and ``guide(x)``.
    x : Tensor, optional
        Any valid input (the priors must not depend on it); default
        ``zeros(2, model.input_dim)`` when the model has ``input_dim``.
    n_samples : int
        Monte Carlo draws for non-Normal sites.
    seed : int, optional

    Returns
    -------
    pandas.DataFrame
        Columns ``site, kl, stderr, method`` (nats; stderr 0 when analytic), one row per
        weight site; ``attrs["total"]`` and ``attrs["total_stderr"]``.
    """
    if x is None:
        if not hasattr(model, "input_dim"):
            raise ValueError("pass x (any valid input) to trace the model's priors")
        p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
        x = torch.zeros(2, int(model.input_dim), device=p.device if p is not None else "cpu")
    seeds = spawn_seeds(seed, 2 + n_samples)
    with rng_context(seeds[0], cuda_devices(x)), torch.no_grad():
        sites = find_layers(model, x)
    gtrs = []
    for s in range(max(1, n_samples)):
        try:
            gtrs.append(_trace(guide, x, seeds[2 + s]))
        except Exception:
            gtrs.append(_trace(lambda *_: guide(), x, seeds[2 + s]))
        if s == 0 and all(_guide_normal(gtrs[0], w) is not None for w in sites.weights):
            break
    rows = []
    for w in sites.weights:
        ptr = _trace(model, x, seeds[1], {w: gtrs[0].nodes[w]["value"]})
        prior = ptr.nodes[w]["fn"]
        q = _guide_normal(gtrs[0], w)
        pn = _unwrap(prior)
        if q is not None and isinstance(pn, td.Normal):
            shape = gtrs[0].nodes[w]["value"].shape
            qn = td.Normal(torch.broadcast_to(q.loc, shape), torch.broadcast_to(q.scale, shape))
            pp = td.Normal(torch.broadcast_to(pn.loc, shape), torch.broadcast_to(pn.scale, shape))
            with torch.no_grad():
                kl = float(td.kl_divergence(qn, pp).sum())
            rows.append({"site": w, "kl": kl, "stderr": 0.0, "method": "analytic"})
            continue
        vals = []
        for gtr in gtrs:
            lq = float(_guide_site_logq(gtr, w))
            ptr = _trace(model, x, seeds[1], {w: gtr.nodes[w]["value"]})
            lp = float(ptr.nodes[w]["fn"].log_prob(gtr.nodes[w]["value"]).sum())
            vals.append(lq - lp)
        v = np.array(vals)
        se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
        rows.append({"site": w, "kl": float(v.mean()), "stderr": se, "method": "monte carlo"})
    df = pd.DataFrame(rows, columns=["site", "kl", "stderr", "method"])
    df.attrs["total"] = float(df["kl"].sum())
    df.attrs["total_stderr"] = float(math.sqrt((df["stderr"].fillna(0) ** 2).sum()))
    return df


def _guide_site_logq(gtr, name) -> torch.Tensor:
    site = gtr.nodes[name]
    lq = site["fn"].log_prob(site["value"]).sum()
    aux = gtr.nodes.get(name + "_unconstrained")
    if aux is not None and is_delta(site["fn"]):
        lq = lq + aux["fn"].log_prob(aux["value"]).sum()
    return lq
