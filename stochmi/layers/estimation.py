"""Layer-to-layer mutual information for any Pyro model.

A Pyro model called as ``model(x)`` whose stochastic layers are latent
``pyro.sample`` sites inside the data plate defines a Markov chain

.. math:: X \\to T_1 \\to T_2 \\to \\dots \\to T_L,

each link a channel with a known density ``p(t_l | t_{l-1})`` (the site's
distribution given its parent).  :func:`layer_mi` traces the model, finds those
sites, and estimates with :func:`stochmi.mi_from_conditional`:

* ``I(X; T_1)`` from ``p(t_1 | x_i)`` directly;
* ``I(T_{l-1}; T_l)`` with sources ``t_{l-1}`` sampled from the chain;
* ``I(X; T_l)`` for ``l >= 2`` by nested Monte Carlo: ``p(t_l | x) =
  E[p(t_l | T_{l-1}) | x]`` is approximated by a ``K``-component mixture over
  ``K`` paths propagated from each input (``n_paths``).  Since ``t`` is drawn
  from the same ``K``-mixture it is evaluated under, the estimate is the MI of a
  channel that knows which path was taken more sharply than the true one: by the
  convexity of MI in the channel it *overstates* ``I(X; T_l)`` in expectation,
  and the excess shrinks as ``K`` grows.  The value with the first ``K/2`` paths
  is reported beside it (``attrs["path_convergence"]``) so convergence can be read off.
* ``I(T_l; Y)`` for labels by class-conditional mixtures
  (:func:`stochmi.mi_with_labels`) of ``p(t_l | x_i)``.

Global latent sites (no data dimension) are weights.  With ``weights="marginal"``
(predictive MI) weights are drawn independently per example: models that offer
``local_reparam_conditional(site, parent, guide)`` (our mean-field Bayesian
layers) give the exact Gaussian marginal ``p(t_l | t_{l-1})``; for any other
model ``p(t_l | t_{l-1}) ~ (1/K_w) sum_k p(t_l | t_{l-1}, W_k)`` over ``K_w``
weight draws (``n_weight_draws``).  With ``weights="conditional"`` the table is
computed for each posterior draw ``w`` of the weights, ``I(X; T | W = w)``, and
summarised over draws (mean, sd, HDI, ESS by ArviZ).
"""


from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import torch
from torch import distributions as td

from stochmi.core.estimate import MIEstimate
from stochmi.core.estimator import mi_from_conditional, mi_with_labels
from stochmi.core.kernel import DETERMINISTIC_MESSAGE, as_gaussian_mixture
from stochmi.layers.chain import Chain, cuda_devices
from stochmi.layers.sites import find_layers, trace_model

__all__ = ["layer_mi", "find_layers", "COLUMNS"]

COLUMNS = ["source", "target", "value", "stderr", "lower", "upper"]


# ---------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------
def _check_inputs(x, y):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] < 2:
        raise ValueError(
            f"layer_mi needs at least two inputs (x.shape[0] >= 2), got shape {tuple(x.shape)}"
        )
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf values")
    if y is not None:
        if not isinstance(y, torch.Tensor):
            y = torch.as_tensor(y)
        if y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
        if y.is_floating_point():
            raise TypeError("y must hold integer class labels")
    return y


def _seeds(seed: int | None, count: int) -> list[int]:
    if seed is None:
        seed = int.from_bytes(os.urandom(7), "little")
    ss = np.random.SeedSequence(seed)
    return [int(s.generate_state(1, np.uint64)[0] >> np.uint64(2)) for s in ss.spawn(count)]


def _weight_draws(model, guide, x, weight_sites, count, gen) -> list[dict]:
    """``count`` draws of the global latent sites, from the guide (or the prior)."""
    draws = []
    src = guide if guide is not None else model
    for _ in range(count):
        seed = int(torch.randint(0, 2**62, (1,), generator=gen).item())
        with torch.random.fork_rng(devices=cuda_devices(x)):
            torch.manual_seed(seed)
            with torch.no_grad():
                tr = trace_model(src, x[:2])
        missing = [w for w in weight_sites if w not in tr.nodes]
        if missing:
            raise ValueError(f"the guide does not sample the weight sites {missing}")
        draws.append({w: tr.nodes[w]["value"].detach() for w in weight_sites})
    return draws


def _default_pairs(layers: list[str], with_y: bool) -> list[tuple[str, str]]:
    pairs = [("X", name) for name in layers]
    pairs += [(a, b) for a, b in zip(layers[:-1], layers[1:])]
    if with_y:
        pairs += [(name, "Y") for name in layers]
    return pairs


def _path_group(chain: Chain, l: int) -> int | None:
    """Components per path in ``p(t_l | x)`` (for the path-excluding lower bound)."""
    if l == 0 or chain.k < 2:
        return None
    gm = as_gaussian_mixture(chain.conds[l])
    return gm.n_components if gm is not None else None


def _estimate_pairs(
    chain: Chain, layers, pairs, y, seeds, n_draws, chunk_size, device, progress
) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    pos = {name: i for i, name in enumerate(layers)}
    rows, conv = [], {}
    given_x_cache: dict[int, td.Distribution] = {}

    def gx(l):
        if l not in given_x_cache:
            given_x_cache[l] = chain.given_x(l) if l > 0 else chain.first_path(0)
        return given_x_cache[l]

    it = tqdm(list(enumerate(pairs)), desc="layer MI", disable=not progress, leave=False)
    for pi, (src, tgt) in it:
        it.set_postfix_str(f"{src}->{tgt}")
        k_used = 1
        if src == "X":
            l = pos[tgt]
            cond = gx(l)
            k_used = chain.k if l > 0 else 1
            group = _path_group(chain, l)
            est = mi_from_conditional(
                cond,
                n_draws=n_draws,
                seed=seeds[pi],
                chunk_size=chunk_size,
                device=device,
                path_group=group,
            )
            if l > 0 and chain.k >= 2:
                half = mi_from_conditional(
                    chain.given_x(l, chain.k // 2),
                    n_draws=n_draws,
                    seed=seeds[pi],
                    chunk_size=chunk_size,
                    device=device,
                )
                conv[f"X->{tgt}"] = {
                    "k": chain.k,
                    "value": est.value,
                    "k_half": chain.k // 2,
                    "value_half": half.value,
                }
        elif tgt == "Y":
            l = pos[src]
            cond = gx(l)
            k_used = chain.k if l > 0 else 1
            est = mi_with_labels(
                cond, y, n_draws=n_draws, seed=seeds[pi], chunk_size=chunk_size, device=device
            )
        else:
            ls, lt = pos[src], pos[tgt]
            if lt != ls + 1:
                raise ValueError(
                    f"pair ({src}, {tgt}): only consecutive layers have a known conditional "
                    "density; estimate non-adjacent layer pairs through X"
                )
            est = mi_from_conditional(
                chain.first_path(lt),
                n_draws=n_draws,
                seed=seeds[pi],
                chunk_size=chunk_size,
                device=device,
            )
        rows.append(_row(src, tgt, est, k_used))
    return rows, conv


def _row(src: str, tgt: str, est: MIEstimate, k: int) -> dict:
    return {
        "source": src,
        "target": tgt,
        "value": est.value,
        "stderr": est.stderr,
        "lower": est.lower,
        "upper": est.upper,
        "lower_stderr": est.lower_stderr,
        "upper_stderr": est.upper_stderr,
        "n": est.n,
        "k_paths": k,
        "saturated": est.saturated,
    }


def _dpi(
    df: pd.DataFrame, layers: list[str], z: float = 3.0, conv: dict | None = None
) -> list[dict]:
    """Data-processing inequalities ``A >= B`` broken by more than their error bars.

    The tolerance is ``z`` combined standard errors plus, for ``I(X; T_l)`` from
    ``K`` paths, the nested Monte Carlo excess estimated as ``|value(K/2) - value(K)|``.
    """
    conv = conv or {}
    val = {(r.source, r.target): (r.value, r.stderr) for r in df.itertuples()}

    def bias(pair):
        c = conv.get(f"{pair[0]}->{pair[1]}")
        return abs(c["value_half"] - c["value"]) if c else 0.0

    checks = []
    for a, b in zip(layers[:-1], layers[1:]):
        checks.append((("X", a), ("X", b)))
        checks.append(((a, b), ("X", b)))
    for name in layers:
        checks.append((("X", name), (name, "Y")))
    out = []
    for big, small in checks:
        if big in val and small in val:
            (vb, sb), (vs, ss) = val[big], val[small]
            excess = vs - vb
            tol = z * math.sqrt(sb**2 + ss**2) + bias(big) + bias(small)
            if excess > tol:
                out.append({"larger": big, "smaller": small, "excess": excess, "tolerance": tol})
    return out


def layer_mi(
    model: Callable,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    layers: list[str] | None = None,
    guide: Callable | None = None,
    weights: str = "marginal",
    seed: int | None = None,
    n_paths: int = 8,
    n_weight_draws: int = 16,
    n_draws: int = 1,
    pairs: list[tuple[str, str]] | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Mutual information between the stochastic layers of a Pyro model.

    Parameters
    ----------
    model : callable
        A Pyro model called as ``model(x)``.  Stochastic layers are latent
        continuous ``pyro.sample`` sites inside a plate over the ``N`` inputs,
        each with batch shape ``(N,)`` and event shape ``(d_l,)`` (or ``()``),
        in execution order.  Global latent sites are weights.
    x : Tensor, shape (N, ...)
        Inputs, ``N >= 2``.
    y : Tensor, shape (N,), optional
        Integer labels; adds the pairs ``(layer, "Y")``.
    layers : list of str, optional
        Layer site names (default: all found, in execution order).
    guide : callable, optional
        Posterior over the weight sites (called as ``guide(x)``); without it the
        weights are drawn from the model's prior.
    weights : {"marginal", "conditional"}
        ``"marginal"``: predictive MI with weights drawn per example;
        ``"conditional"``: ``I(. ; . | W = w)`` per posterior draw, summarised.
    seed : int, optional
        Seed for every draw (the global RNG is left as it was).
    n_paths : int, default 8
        ``K``, paths propagated per input for ``I(X; T_l)``, ``l >= 2``.
    n_weight_draws : int, default 16
        Weight draws: mixture components for the generic marginal, or posterior
        draws in conditional mode.
    n_draws : int, default 1
        Channel draws per source in each estimate.
    pairs : list of (str, str), optional
        Pairs to estimate; default ``("X", l)`` for every layer, ``(l, next)``,
        and ``(l, "Y")`` when ``y`` is given.
    chunk_size, device
        Passed to the core estimator.
    progress : bool
        Show a progress bar over pairs (and draws).

    Returns
    -------
    pandas.DataFrame
        One row per pair with columns ``source, target, value, stderr, lower,
        upper`` (nats) and ``lower_stderr, upper_stderr, n, k_paths, saturated,
        dpi_ok``.  ``attrs``: ``"layers"``, ``"weights"``, ``"mode"``,
        ``"dpi"`` (violations), ``"path_convergence"`` (K vs K/2), and in
        conditional mode ``"per_draw"`` (DataFrame, one row per draw and pair),
        ``"inference_data"`` (ArviZ) and ``"summary"`` (ArviZ summary).

    Raises
    ------
    ValueError
        Fewer than two inputs, NaN/inf inputs, label shape mismatch, unknown
        layer names, a deterministic layer (infinite MI) or no layers at all.
    TypeError
        Non-tensor inputs or float labels.
    """
    if weights not in ("marginal", "conditional"):
        raise ValueError(f"weights must be 'marginal' or 'conditional', got {weights!r}")
    for nm, v in (("n_paths", n_paths), ("n_weight_draws", n_weight_draws), ("n_draws", n_draws)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    y = _check_inputs(x, y)
    if device is not None:
        x = x.to(device)
        y = y.to(device) if y is not None else None
    master = _seeds(seed, 4)
    gen = torch.Generator().manual_seed(master[0])
    with torch.random.fork_rng(devices=cuda_devices(x)):
        torch.manual_seed(master[1])
        with torch.no_grad():
            sites = find_layers(model, x)
    if layers is None:
        layers = sites.layers
        if not layers:
            raise ValueError(
                "no stochastic layers found: the model has no latent continuous sample site "
                f"inside a plate over the {x.shape[0]} inputs. {DETERMINISTIC_MESSAGE}"
            )
    else:
        unknown = [s for s in layers if s not in sites.layers]
        if unknown:
            raise ValueError(
                f"unknown layer sites {unknown}; the model's stochastic layers are {sites.layers}"
            )
        layers = [s for s in sites.layers if s in layers]
    if pairs is None:
        pairs = _default_pairs(layers, y is not None)
    else:
        pairs = [tuple(p) for p in pairs]
        for a, b in pairs:
            if (a, b) == ("X", "Y") or a not in layers and a != "X" or b not in layers and b != "Y":
                raise ValueError(
                    f"pair ({a}, {b}): sources are 'X' or a layer, targets a layer or 'Y', and "
                    "at least one side is a layer; "
                    f"the layers are {layers}"
                )
            if b == "Y" and y is None:
                raise ValueError(f"pair ({a}, Y) needs labels y")
    pair_seeds = _seeds(master[2], len(pairs))
    # paths are needed only where p(t_l | x) is a mixture: X or Y paired with layer l >= 2
    k = (
        n_paths
        if any(layers.index(b if a == "X" else a) > 0 for a, b in pairs if a == "X" or b == "Y")
        else 1
    )

    has_weights = bool(sites.weights)
    if weights == "conditional" and has_weights:
        return _conditional(
            model,
            guide,
            x,
            y,
            layers,
            sites.weights,
            pairs,
            k,
            gen,
            n_weight_draws,
            pair_seeds,
            n_draws,
            chunk_size,
            device,
            progress,
        )
    if not has_weights:
        chain = Chain(model, x, layers, [], [], k, "single", guide, gen)
        mode = "noise"
    elif hasattr(model, "local_reparam_conditional") and guide is not None:
        chain = Chain(model, x, layers, sites.weights, [], k, "local_reparam", guide, gen)
        mode = "local_reparam"
    else:
        draws = _weight_draws(model, guide, x, sites.weights, n_weight_draws, gen)
        chain = Chain(model, x, layers, sites.weights, draws, k, "mixture", guide, gen)
        mode = f"mixture over {n_weight_draws} weight draws"
    rows, conv = _estimate_pairs(
        chain, layers, pairs, y, pair_seeds, n_draws, chunk_size, device, progress
    )
    return _finish(pd.DataFrame(rows), layers, weights, mode, conv)


def _finish(df: pd.DataFrame, layers, weights, mode, conv) -> pd.DataFrame:
    viol = _dpi(df, layers, conv=conv)
    bad = {p for v in viol for p in (v["larger"], v["smaller"])}
    df["dpi_ok"] = [(s, t) not in bad for s, t in zip(df["source"], df["target"])]
    df.attrs.update(
        {
            "layers": list(layers),
            "weights": weights,
            "mode": mode,
            "dpi": viol,
            "path_convergence": conv,
        }
    )
    return df


def _conditional(
    model,
    guide,
    x,
    y,
    layers,
    weight_sites,
    pairs,
    k,
    gen,
    n_w,
    pair_seeds,
    n_draws,
    chunk_size,
    device,
    progress,
) -> pd.DataFrame:
    import arviz as az
    from tqdm.auto import tqdm

    draws = _weight_draws(model, guide, x, weight_sites, n_w, gen)
    per = []
    for di, wv in enumerate(tqdm(draws, desc="weight draws", disable=not progress)):
        chain = Chain(model, x, layers, weight_sites, [wv], k, "single", guide, gen)
        rows, _ = _estimate_pairs(
            chain,
            layers,
            pairs,
            y,
            [s + di for s in pair_seeds],
            n_draws,
            chunk_size,
            device,
            False,
        )
        for r in rows:
            r["draw"] = di
        per.extend(rows)
    per_df = pd.DataFrame(per)
    out = []
    names = {}
    for (src, tgt), g in per_df.groupby(["source", "target"], sort=False):
        s = len(g)
        out.append(
            {
                "source": src,
                "target": tgt,
                "value": g["value"].mean(),
                "stderr": g["value"].std(ddof=1) / math.sqrt(s) if s > 1 else g["stderr"].iloc[0],
                "lower": g["lower"].mean(),
                "upper": g["upper"].mean(),
                "lower_stderr": g["lower"].std(ddof=1) / math.sqrt(s) if s > 1 else math.nan,
                "upper_stderr": g["upper"].std(ddof=1) / math.sqrt(s) if s > 1 else math.nan,
                "n": int(g["n"].iloc[0]),
                "k_paths": int(g["k_paths"].iloc[0]),
                "saturated": bool(g["saturated"].any()),
                "posterior_sd": g["value"].std(ddof=1),
            }
        )
        names[f"{src}->{tgt}"] = g["value"].to_numpy()[None, :]
    idata = az.from_dict(posterior=names)
    summary = None
    if len(draws) > 1:
        # draws come from one "chain" of independent guide samples: R-hat is undefined
        # there (ArviZ warns), ESS and HDI are what matter
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            summary = az.summary(idata, kind="all")
    df = pd.DataFrame(out)
    df = _finish(df, layers, "conditional", f"conditional on each of {n_w} weight draws", {})
    df.attrs.update({"per_draw": per_df, "inference_data": idata, "summary": summary})
    return df
