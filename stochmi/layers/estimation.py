"""Layer-to-layer mutual information for any Pyro model.

A Pyro model called as ``model(x)`` whose stochastic layers are latent
``pyro.sample`` sites inside the data plate defines a Markov chain

.. math:: X \\to T_1 \\to T_2 \\to \\dots \\to T_L,

each link a channel with a known density ``p(t_l | t_{l-1})`` (the site's
distribution given its parent).  :func:`layer_mi` traces the model, finds those
sites, and estimates each pair from ``L[j, i] = log p(t_j | s_i)`` as
:func:`stochmi.mi_from_conditional` does (value, bracket, standard errors):

* ``I(X; T_1)`` from ``p(t_1 | x_i)`` directly;
* ``I(T_{l-1}; T_l)`` with sources ``t_{l-1}`` sampled from the chain;
* ``I(X; T_l)`` for ``l >= 2``, non-adjacent pairs ``I(T_a; T_b)`` and ``I(T_l; Y)``
  for ``l >= 2`` from densities across several layers, ``p(t_b | s_i) =
  E[p(t_b | T_{b-1}) | s_i]``, which have no closed form.  Where every link after the
  first is a single Gaussian whose mean is differentiable in its parent (noise
  injection, local reparameterisation, fixed weight draws), each entry of
  ``L[j, i]`` is estimated by importance sampling over paths
  (:mod:`stochmi.layers.deep`, :ref:`deep-layers`).  The effort doubles until the
  difference between the estimate from all draws and from half of them, the estimated
  remaining bias (``mc_bias``), is within ``tolerance``, up to ``max_effort`` times;
  an unbridged round that meets it is audited against bridged draws on a few queries
  (:mod:`stochmi.layers.audit`), which catches mass that neither of its proposals
  reaches.  A row has ``converged`` False when it misses that, when the median effective number
  of terms behind the marginal ``sum_i p(t_j | s_i)`` is below
  :data:`MIN_MARGINAL_ESS`, or when its value is below ``-3`` standard errors.  The
  bracket of every row estimated this way is widened by ``mc_bias``.
* Other layer families (Laplace, Student-t, ...) and the generic mixture over weight
  draws have no importance sampler: ``I(X; T_l)`` and ``I(T_l; Y)`` for ``l >= 2``
  use nested Monte Carlo, ``p(t_l | x_i)`` as a mixture over ``n_paths`` paths
  propagated from each input, with ``converged`` False and ``mc_bias`` NaN (for
  ``I(X; T_l)`` the value from half the paths is in ``attrs["path_convergence"]``);
  non-adjacent layer pairs are refused (``ValueError``).
* ``I(T_1; Y)`` for labels by class-conditional mixtures
  (:func:`stochmi.mi_with_labels`) of ``p(t_1 | x_i)``.

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

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import distributions as td

from stochmi.core.estimate import MIEstimate
from stochmi.core.estimator import mi_from_conditional, mi_with_labels
from stochmi.core.from_matrix import label_bounds_from_log_density, mi_terms_from_log_density
from stochmi.core.kernel import as_gaussian_mixture
from stochmi.core.rng import draw_seed, resolve_seed, rng_context, spawn_seeds
from stochmi.layers.audit import Audit, audit_densities
from stochmi.layers.chain import Chain, cuda_devices
from stochmi.layers.deep import (
    NotGaussianLink,
    bridge_bytes,
    deep_log_density,
    memory_budget,
    normal_params,
    pooled,
)
from stochmi.layers.links import LocalReparamModel, model_links
from stochmi.layers.noisy import check_estimable
from stochmi.layers.sites import find_layers, no_layers_message, resolve_layers, trace_model

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


def _weight_draws(model, guide, x, weight_sites, count, gen) -> list[dict]:
    """``count`` draws of the global latent sites, from the guide (or the prior)."""
    draws = []
    src = guide if guide is not None else model
    for _ in range(count):
        with rng_context(draw_seed(gen), cuda_devices(x)), torch.no_grad():
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


#: Smallest median effective number of terms behind the marginal density
#: ``sum_i p(t_j | s_i)`` for a deep row to count as converged.  A heuristic: on an
#: untrained noisy_mlp (sigma 1) without bridged draws, where the off-diagonal
#: densities are out of reach of both proposals, the median is 6-9 (with them, 40-100);
#: after training 14-18; on linear chains > 400.
MIN_MARGINAL_ESS = 10.0


@dataclass
class DeepOptions:
    """Effort and accuracy settings of the deep-layer estimator (:mod:`stochmi.layers.deep`).

    Attributes
    ----------
    n_is : int
        Gauss-Newton proposal draws per query.
    n_fwd : int
        Forward paths per source (``n_paths``).
    tolerance : float
        A row is converged when its estimated remaining bias (full minus half-sample
        estimate) is at most ``max(tolerance, rel_tolerance * value)`` nats, and, for a
        round without bridged draws, when its audit (:mod:`stochmi.layers.audit`) does
        not find it off by more than that or 5% of the value, beyond 3 standard errors.
    rel_tolerance : float
        Relative part of that bound (a share of ``|value|``).
    max_effort : int
        Effort doubles (both sample sizes) until converged or this multiple of the
        starting sizes is reached.
    """

    n_is: int = 32
    n_fwd: int = 16
    tolerance: float = 0.02
    rel_tolerance: float = 0.01
    max_effort: int = 4

    def tolerance_at(self, value: float) -> float:
        """The tolerance of a row of this value: ``max(tolerance, rel_tolerance * |value|)``."""
        return max(self.tolerance, self.rel_tolerance * abs(value))

    def within(self, bias: float, value: float) -> bool:
        """Whether a remaining bias is within :meth:`tolerance_at` ``value``."""
        return bias <= self.tolerance_at(value)


#: ``(n_top, n_random)`` of :func:`stochmi.layers.deep.deep_log_density` in a round
#: without and with bridged draws: best sources taken whole per query, and random
#: sources per block of 16 queries that stand for all others (where ``N`` is large
#: enough that sources are subsampled).  A random source serves the block's 16 queries,
#: so it costs a sixteenth of one of a query's best sources.  A bridged round runs where
#: the first missed, where each query's density is spread over many sources far apart
#: at layer 1: the best sources hold less of the mass and the noise of the
#: Horvitz-Thompson sums (the class sums of an ``I(T; Y)`` row above all) is much of
#: the remaining bias, so bridged rounds take fewer best sources and relatively more
#: random ones: 192 with the mean-path score in the ranking, which puts more of the
#: mass among the best sources (about 384 are needed without it; :ref:`deep-layers`).
SUBSAMPLE = {False: (48, 128), True: (16, 192)}


#: Default ``n_queries`` of :func:`layer_mi`: queries behind a row across several layers.
#: The deep rows cost about linearly in their queries (each query's proposal, draws and
#: sources), so this bounds their time at large ``N``, and their standard error is then
#: that of a 2,048-input analysis (0.05 nats for I(X; h2) of the trained noisy_mlp at
#: N = 10,000, against 0.022 with every input a query).
DEEP_QUERIES = 2048


def _bridge_draws(n_fwd: int) -> int:
    """Bridged draws per source in a round with ``n_fwd`` forward paths: ``n_fwd / 8``."""
    return max(2, 2 * (n_fwd // 16))


class _Deep:
    """``L[j, i] = log p(t_b,j | s_i)`` for sources ``X`` (a = -1) or layer ``a`` and a
    later layer ``b``, estimated to tolerance; cached per pair of layer indices."""

    def __init__(self, chain: Chain, links, opts: DeepOptions, gen, dtype, progress, rows=None):
        self.chain, self.links, self.opts = chain, links, opts
        self.gen, self.dtype, self.progress = gen, dtype, progress
        self.rows = rows  # the queries estimated (None: all N)
        self.cache: dict[tuple[int, int], dict] = {}
        # labels, and the layers whose I(T; Y) rows come from the densities of X -> T:
        # their own remaining bias must meet the tolerance too (set by _estimate_pairs)
        self.labels, self.label_layers = None, frozenset()

    def get(self, a: int, b: int) -> dict:
        if (a, b) not in self.cache:
            self.cache[(a, b)] = self._run(a, b)
        return self.cache[(a, b)]

    def _once(self, a, b, n_is, n_fwd, n_br=0):
        # traced links sample the layer site from torch's global RNG: run them on a
        # private, seeded copy so the caller's RNG is untouched and numbers reproduce
        with rng_context(draw_seed(self.gen), cuda_devices(self.chain.values[b])):
            return self._once_inner(a, b, n_is, n_fwd, n_br)

    def _once_inner(self, a, b, n_is, n_fwd, n_br):
        from tqdm.auto import tqdm

        ch = self.chain
        bar = None
        if self.progress:
            desc = f"deep densities ({n_is}/{n_fwd}/{n_br} draws)"
            total = ch.n if self.rows is None else len(self.rows)
            bar = tqdm(total=total, desc=desc, leave=False)
        with bar if bar is not None else contextlib.nullcontext():
            return self._densities(a, b, n_is, n_fwd, n_br, bar)

    def _problem(self, a, b) -> tuple:
        """First-layer conditional, links, queries and anchors of the pair ``(a, b)``."""
        ch = self.chain
        loc, scale = normal_params(ch.conds[a + 1])
        links = [self.links[m] for m in range(a + 2, b + 1)]
        return loc, scale, links, ch.values[b], [ch.values[m] for m in range(a + 1, b)]

    def _densities(self, a, b, n_is, n_fwd, n_br, bar):
        n_top, n_random = SUBSAMPLE[bool(n_br)]
        return deep_log_density(
            *self._problem(a, b),
            n_is=n_is,
            n_fwd=n_fwd,
            n_bridge=n_br,
            generator=self.gen,
            dtype=self.dtype,
            progress=bar.update if bar is not None else None,
            rows=self.rows,
            n_top=n_top,
            n_random=n_random,
            # the class sums of an I(T; Y) row rest on the random share in bridged rounds
            # (broad mixtures): there it is stratified by class, blocks class by class;
            # first rounds keep blocks of mixed classes, whose larger union of best
            # sources serves the narrow mixtures of trained networks
            strata=self.labels if n_br and a == -1 and b in self.label_layers else None,
        )

    def _audit(self, a: int, b: int, res) -> Audit:
        """The bridged audit of the unbridged densities ``res`` (:mod:`.audit`)."""
        with rng_context(draw_seed(self.gen), cuda_devices(self.chain.values[b])):
            return audit_densities(
                *self._problem(a, b),
                res.L,
                n_is=res.n_is,
                n_fwd=res.n_fwd,
                n_bridge=_bridge_draws(2 * res.n_fwd),
                generator=self.gen,
                dtype=self.dtype,
                rows=self.rows,
            )

    def _run(self, a: int, b: int) -> dict:
        o = self.opts
        effort, bridge, stopped, done, audit = 1, False, None, None, None
        while True:
            # after a first round whose densities missed, the off-diagonal densities come
            # from bridged draws (n_fwd / 8 per source at twice the effort) and the
            # forward paths
            n_br = _bridge_draws(o.n_fwd * effort) if bridge else 0
            if done is None:
                res = self._once(a, b, o.n_is * effort, o.n_fwd * effort, n_br)
            else:  # a round again: fresh draws at the effort done, pooled with it
                res = pooled(done, self._once(a, b, done.n_is, done.n_fwd, done.n_bridge))
            ok, stats = self._check(res)
            if ok and not res.n_bridge:
                # unbridged densities that pass their own rule: bridged draws on a few
                # queries check that the paths reach the other sources (once per row)
                if audit is None:
                    audit = self._audit(a, b, res)
                ok = not audit.missed(o.tolerance_at(stats["value"]), stats["value"])
            label = _label_terms(res, self.labels) if a == -1 and b in self.label_layers else None
            labels_ok = label is None or o.within(label["own"], label["value"])
            if (ok and labels_ok) or effort * 2 > o.max_effort:
                break
            if bridge:  # a bridged round again at this effort, pooled with this one
                stopped = self._bridge_too_large(a, b, res.n_fwd, res.n_bridge)
                if stopped is not None:
                    break
                done = res
            else:
                if not ok:  # the densities missed: a bridged round at twice the effort
                    n_fwd = o.n_fwd * effort * 2
                    stopped = self._bridge_too_large(a, b, n_fwd, _bridge_draws(n_fwd))
                if ok or stopped is not None:
                    # only the I(T; Y) row missed (its class sums need more of the same
                    # draws), or the bridged round does not fit in memory: a fresh
                    # unbridged estimate at this effort pooled with this one
                    done = res
                else:
                    done, bridge = None, True
            effort *= 2
        return {
            "stopped": stopped,
            "res": res,
            "full": stats["full"],
            "loo": stats["loo"],
            "bias": stats["bias"],
            "converged": ok,
            "n_is": res.n_is,
            "n_fwd": res.n_fwd,
            "marg_ess": stats["marg_ess"],
            "label": label,
            "audit": audit,
        }

    def _bridge_too_large(self, a: int, b: int, n_fwd: int, n_br: int) -> str | None:
        """Why the bridged round (``n_fwd`` forward paths and ``n_br`` bridged draws per
        source) is not run: it would need more than :func:`memory_budget`, nine tenths
        of the memory available now.  None: it fits."""
        ch = self.chain
        widths = [int(ch.values[m].reshape(ch.n, -1).shape[1]) for m in range(a + 1, b)]
        d_last = int(ch.values[b].reshape(ch.n, -1).shape[1])
        n_top, n_random = SUBSAMPLE[True]
        need = bridge_bytes(
            ch.n, widths, d_last, n_bridge=n_br, n_fwd=n_fwd, n_top=n_top, n_random=n_random
        )
        budget = memory_budget(ch.values[b].device)
        if need <= budget:
            return None
        msg = (
            f"the bridged round of this row would need about {need / 2**30:.1f} GiB "
            f"(N = {ch.n} sources, query width {d_last}, intermediate widths {widths}), "
            f"more than the {budget / 2**30:.1f} GiB allowed (9/10 of the memory available "
            "now): the row goes on with unbridged rounds (fresh forward paths pooled with "
            "the rounds it ran) and is flagged if they do not converge (use fewer inputs, "
            "narrower noisy layers, or more noise)"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return msg

    def _check(self, res) -> tuple[bool, dict]:
        """Whether one estimate of the densities meets the convergence rule: remaining
        bias (full minus half-sample MI) within tolerance, enough effective terms
        behind the marginal density, and no significantly negative MI."""
        o = self.opts
        full, loo = mi_terms_from_log_density(res.L, rows=res.rows)
        half, _ = mi_terms_from_log_density(res.L_half, rows=res.rows)
        value = float(full.mean())
        bias = abs(float(half.mean()) - value)
        (marg,) = _estimated(res, res.marg_ess)
        marg_ess = float(marg.median())
        se = float(full.std()) / math.sqrt(len(full))
        ok = (
            bias <= o.tolerance_at(value)
            and marg_ess >= MIN_MARGINAL_ESS  # the marginal density rests on few draws
            and value >= -3 * se  # a dataset MI cannot be negative
        )
        return ok, {"full": full, "loo": loo, "bias": bias, "marg_ess": marg_ess, "value": value}


def _estimated(res, *terms: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-query terms of the queries that ``res`` (a :class:`DeepLogDensity`) estimated."""
    return tuple(t if res.rows is None else t[res.rows] for t in terms)


def _label_terms(res, y: torch.Tensor) -> dict:
    """``I(T; Y)`` from the densities ``res``: the per-query terms, Barber-Agakov and
    upper-bound terms and label entropy of :func:`label_bounds_from_log_density` (all
    draws), their mean ``value``, and ``own``, its remaining bias: the difference to the
    same from the first half of the draws."""
    terms, ba, up, h_y = label_bounds_from_log_density(res.L, y, rows=res.rows)
    half = label_bounds_from_log_density(res.L_half, y, rows=res.rows)[0]
    value = float(terms.mean())
    own = abs(float(half.mean()) - value)
    return {"terms": terms, "ba": ba, "up": up, "h_y": h_y, "value": value, "own": own}


def _conv_entry(d: dict) -> dict:
    half, _ = mi_terms_from_log_density(d["res"].L_half, rows=d["res"].rows)
    (diag_ess,) = _estimated(d["res"], d["res"].diag_ess)
    return {
        "k": d["n_fwd"],
        "n_is": d["n_is"],
        "value": float(d["full"].mean()),
        "k_half": d["n_fwd"] // 2,
        "value_half": float(half.mean()),
        "converged": d["converged"],
        "diag_ess_median": float(diag_ess.median()),
        "marginal_ess_median": d["marg_ess"],
        "n_bridge": d["res"].n_bridge,
        "queries": len(d["full"]),
        **({"audit": dataclasses.asdict(d["audit"])} if d.get("audit") is not None else {}),
        **({"stopped": d["stopped"]} if d.get("stopped") else {}),
    }


def _deep_row(src, tgt, d: dict, terms: torch.Tensor, lower, upper, n: int) -> dict:
    value = float(terms.mean())
    se = float(terms.std(unbiased=True)) / math.sqrt(len(terms))
    return {
        "source": src,
        "target": tgt,
        "value": value,
        "stderr": se,
        "lower": lower,
        "upper": upper,
        "lower_stderr": se,
        "upper_stderr": float(d["loo"].std(unbiased=True)) / math.sqrt(len(d["loo"])),
        "n": n,
        "k_paths": d["n_fwd"],
        "n_is": d["n_is"],
        "saturated": bool(lower > math.log(n) - 1.0),
        "converged": d["converged"],
        "mc_bias": d["bias"],
        "marginal_ess": d["marg_ess"],
    }


def _deep_xy_row(src, tgt, d: dict, n: int) -> dict:
    value = float(d["full"].mean())
    lower = max(0.0, value - d["bias"])
    upper = float(d["loo"].mean()) + d["bias"]
    return _deep_row(src, tgt, d, d["full"], lower, upper, n)


def _deep_label_row(src, d: dict, n: int, opts: DeepOptions) -> dict:
    """``I(T_l; Y)`` from the densities of ``X -> T_l`` (their label terms, ``d["label"]``,
    :func:`_label_terms`).  Its remaining bias is the larger of that row's and its own
    half-versus-full difference: the class-conditional sums rest on fewer terms than the
    marginal one (a tenth of the sources, and of the random share where sources are
    subsampled), so their logarithms are biased lower."""
    lab = d["label"]
    terms, ba, up, h_y, value, own = (lab[k] for k in ("terms", "ba", "up", "h_y", "value", "own"))
    bias = max(d["bias"], own)
    lower = math.nan
    if ba is not None:
        lower = max(0.0, h_y + float(ba.mean()) - bias)
    upper = min(h_y, float(up.mean()) + bias)
    row = _deep_row(src, "Y", d, terms, lower, upper, n)
    row["upper_stderr"] = float(up.std(unbiased=True)) / math.sqrt(len(up)) if upper < h_y else 0.0
    row["mc_bias"] = bias
    # converged: the densities' row is, and the rule of the deep rows holds for this
    # row's own bias; and I(T; Y) of the data set is never negative: a value below 0 by
    # more than its standard error and remaining bias allow means the class-conditional
    # densities are off
    row["converged"] = bool(
        row["converged"] and opts.within(own, value) and value >= -3 * row["stderr"] - bias
    )
    return row


def _estimate_pairs(
    chain: Chain, layers, pairs, y, seeds, n_draws, chunk_size, device, progress, deep=None
) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    pos = {name: i for i, name in enumerate(layers)}
    rows, conv = [], {}
    direct = _Direct(chain, pos, y, n_draws, chunk_size, device)
    n = chain.n
    if deep is not None and y is not None:
        deep.labels = y
        deep.label_layers = frozenset(pos[s] for s, t in pairs if t == "Y" and s != "X")
    it = tqdm(list(enumerate(pairs)), desc="layer MI", disable=not progress, leave=False)
    for pi, (src, tgt) in it:
        it.set_postfix_str(f"{src}->{tgt}")
        a = -1 if src == "X" else pos[src]
        b = None if tgt == "Y" else pos[tgt]
        if deep is not None and tgt == "Y" and a > 0:
            d = deep.get(-1, a)
            rows.append(_deep_label_row(src, d, n, deep.opts))
            conv[f"{src}->Y"] = _conv_entry(d)
        elif deep is not None and tgt != "Y" and b > a + 1:
            d = deep.get(a, b)
            rows.append(_deep_xy_row(src, tgt, d, n))
            conv[f"{src}->{tgt}"] = _conv_entry(d)
        else:
            rows.append(direct.row(src, tgt, seeds[pi], conv))
    return rows, conv


class _Direct:
    """Pairs whose conditional density is the chain's own (first layer, consecutive
    layers) or nested Monte Carlo over its paths (models without Gaussian links)."""

    def __init__(self, chain: Chain, pos, y, n_draws, chunk_size, device):
        self.chain, self.pos, self.y = chain, pos, y
        self.kw = {"n_draws": n_draws, "chunk_size": chunk_size, "device": device}
        self.given_x_cache: dict[int, td.Distribution] = {}

    def gx(self, l: int):
        if l not in self.given_x_cache:
            ch = self.chain
            self.given_x_cache[l] = ch.given_x(l) if l > 0 else ch.first_path(0)
        return self.given_x_cache[l]

    def row(self, src: str, tgt: str, seed, conv: dict) -> dict:
        chain, pos = self.chain, self.pos
        k_used = 1
        if src == "X":
            l = pos[tgt]
            k_used = chain.k if l > 0 else 1
            group = _path_group(chain, l)
            est = mi_from_conditional(self.gx(l), seed=seed, path_group=group, **self.kw)
            if l > 0 and chain.k >= 2:
                half = mi_from_conditional(chain.given_x(l, chain.k // 2), seed=seed, **self.kw)
                conv[f"X->{tgt}"] = {
                    "k": chain.k,
                    "value": est.value,
                    "k_half": chain.k // 2,
                    "value_half": half.value,
                }
        elif tgt == "Y":
            l = pos[src]
            k_used = chain.k if l > 0 else 1
            est = mi_with_labels(self.gx(l), self.y, seed=seed, **self.kw)
        else:
            ls, lt = pos[src], pos[tgt]
            if lt != ls + 1:
                raise ValueError(
                    f"pair ({src}, {tgt}): this model's layer family has no Gaussian links, so "
                    "only consecutive layers have a known conditional density here"
                )
            est = mi_from_conditional(chain.first_path(lt), seed=seed, **self.kw)
        row = _row(src, tgt, est, k_used)
        nested = (src == "X" and pos[tgt] > 0) or (tgt == "Y" and pos[src] > 0)
        row["converged"] = not nested
        row["mc_bias"] = 0.0 if not nested else math.nan
        return row


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

    The tolerance is ``z`` combined standard errors plus, for each side with an entry
    in ``conv`` (``attrs["path_convergence"]``: importance-sampled rows and nested Monte
    Carlo ``X -> T_l`` rows), ``|value_half - value|``, the half- against full-sample
    difference.
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
    n_paths: int = 16,
    n_is: int = 32,
    tolerance: float = 0.02,
    max_effort: int = 4,
    n_weight_draws: int = 16,
    n_draws: int = 1,
    n_queries: int | None = DEEP_QUERIES,
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
        Seed for every draw, under the rule of :mod:`stochmi.core.rng` (``None``: a
        fresh seed from the operating system); the seed used is ``attrs["seed"]``, and
        passing it back replays the run.  The global RNG is neither read nor changed.
    n_paths : int, default 16
        Forward paths per source for densities across several layers (``I(X; T_l)``,
        ``l >= 2``, non-adjacent layer pairs, ``I(T_l; Y)``); see
        :mod:`stochmi.layers.deep`.  Even.
    n_is : int, default 32
        Gauss-Newton proposal draws per query for the same densities.  Even.
    tolerance : float, default 0.02
        Target accuracy (nats) of those rows: the remaining bias, estimated as the
        difference between the estimate with all draws and with half of them, must be
        at most ``max(tolerance, 1% of the value)``; otherwise both sample sizes double,
        up to ``max_effort`` times the starting sizes.  Unconverged rows are flagged
        (``converged`` False) and their bracket is widened by the bias estimate.
    max_effort : int, default 4
        Largest multiple of ``n_paths`` / ``n_is`` tried.
    n_weight_draws : int, default 16
        Weight draws: mixture components for the generic marginal, or posterior
        draws in conditional mode.
    n_draws : int, default 1
        Channel draws per source in each estimate.
    n_queries : int or None, default 2048
        Queries of the rows across several layers: where ``N`` is larger, their
        per-query terms ``log p(t_j | s_j) - log mean_i p(t_j | s_i)`` are averaged over
        a uniform random subset of this many inputs (drawn from ``seed``), while each
        marginal ``mean_i`` still runs over all ``N`` inputs.  The value stays an
        unbiased estimate of the dataset MI; its ``stderr`` counts the queries used, so
        it grows by ``sqrt(N / n_queries)``, and the cost of those rows no longer grows
        with ``N`` in the number of queries.  ``None``: every input is a query.  In
        conditional mode the weight draws share out these queries.  Rows with a direct
        density (first layer, consecutive layers) always use all ``N``.
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
        upper`` (nats; ``value`` the dataset MI, ``[lower, upper]`` the bracket on the
        population MI) and

        - ``lower_stderr, upper_stderr``: standard errors of the bracket's ends;
        - ``n``: number of inputs ``N``;
        - ``k_paths``: forward paths per input behind the density (1 where it is
          direct; for importance-sampled rows ``n_paths`` times the effort reached);
        - ``saturated``: ``lower > log N - 1`` (more inputs needed);
        - ``converged``: True for direct densities and importance-sampled rows that met
          ``tolerance``; False for unconverged and nested Monte Carlo rows;
        - ``mc_bias``: estimated remaining bias (nats) of importance-sampled rows,
          ``|full - half-sample value|``; 0 for direct densities, NaN for nested Monte
          Carlo rows;
        - ``n_is``, ``marginal_ess`` (only when some row is importance-sampled; NaN on
          the others): proposal draws per query at the effort reached, and the median
          effective number of terms behind the marginal ``sum_i p(t_j | s_i)``;
        - ``dpi_ok``: False for the rows of a broken data-processing inequality.

        In conditional mode the columns are means over the weight draws (``stderr``
        and the bracket's standard errors across draws), with ``posterior_sd``
        (sd over draws of ``I(.;.|W=w)``, with the per-draw Monte Carlo variance
        removed: ``sqrt(max(0, var - mean stderr^2))``), ``converged`` (every draw
        converged) and ``mc_bias`` (largest over draws) and without ``n_is`` and
        ``marginal_ess``.  There, the rows across several layers of each draw average
        the terms ``log p(t_j | x_j, w) - log mean_i p(t_j | x_i, w)`` over a share of
        the queries only (``attrs["queries_per_draw"]``: ``max(ceil(N / n_weight_draws),
        64)``, at most ``N``; the draws' shares together cover every input), while
        the marginal density of each still sums over all ``N`` inputs.  Each draw's
        value is an unbiased estimate of its dataset MI, and all draws together cost
        about one table instead of one per draw; the per-draw ``stderr`` counts the
        queries it used.  Where ``N > n_queries``, the shares are cut from a random
        ``n_queries`` of the inputs instead.

        ``attrs``: ``"layers"``, ``"weights"``, ``"mode"`` (how the densities were
        obtained), ``"dpi"`` (violations: ``larger``, ``smaller``, ``excess``,
        ``tolerance``) and ``"path_convergence"``: for every importance-sampled row
        and every nested Monte Carlo ``X -> T_l`` row, ``"source->target"`` -> the
        dataset MI ``value`` with ``k`` paths and ``value_half`` with ``k_half``, and
        for importance-sampled rows also ``n_is``, ``n_bridge`` (bridged draws per
        source, 0 where no bridged round ran), ``queries`` (the number of queries the
        row averages over: ``min(N, n_queries)``), ``converged``, ``diag_ess_median`` and
        ``marginal_ess_median``, ``audit`` (``queries``, ``sources``, ``difference``,
        ``stderr`` of :class:`stochmi.layers.audit.Audit`) where an unbridged round
        was audited, and ``stopped`` (why no bridged round ran: it
        would need more than 9/10 of the memory available, so the effort went on in
        unbridged rounds; also a ``RuntimeWarning``) where that happened (a
        ``T_l -> Y`` entry describes the matrix ``log p(t_l | x_i)`` it shares with
        ``X -> T_l``; empty in conditional mode).
        In conditional mode also ``"per_draw"`` (DataFrame, one row per draw and pair,
        column ``draw``), ``"inference_data"`` (ArviZ, one variable per pair),
        ``"summary"`` (ArviZ summary; None for one draw) and ``"weight_draws"`` (the
        weight values, one dict per draw).

    Raises
    ------
    ValueError
        Fewer than two inputs, NaN/inf inputs, label shape mismatch, unknown
        layer names or pairs, a deterministic layer (infinite MI), no layers at all,
        an invalid setting (``n_paths`` or ``n_is`` odd or below 2, a non-positive
        ``tolerance``, ...), a non-adjacent layer pair in a model without Gaussian
        links, or a Gaussian link whose mean is not differentiable in its parent.
    TypeError
        Non-tensor inputs, float labels, or a generic marginal over weight draws
        (no ``local_reparam_conditional``) of layers that are not Normal.
    """
    opts = _check_options(
        weights, n_paths, n_is, tolerance, max_effort, n_weight_draws, n_draws, n_queries
    )
    y = _check_inputs(x, y)
    check_estimable(model)  # binary dropout, batch statistics
    if device is not None:
        x = x.to(device)
        y = y.to(device) if y is not None else None
    used_seed = resolve_seed(seed)
    master = spawn_seeds(used_seed, 4)
    gen = torch.Generator(device=x.device).manual_seed(master[0])
    with rng_context(master[1], cuda_devices(x)), torch.no_grad():
        sites = find_layers(model, x)
        if layers is None and not sites.layers:
            raise ValueError(no_layers_message(model, x))
    layers = resolve_layers(sites.layers, layers)
    check_estimable(model, layers)  # noisy networks, as traced: atoms, skipped sites
    pairs = _resolve_pairs(pairs, layers, y)
    pair_seeds = spawn_seeds(master[2], len(pairs))
    # nested Monte Carlo paths only for models without Gaussian links (generic marginal
    # over weight draws); every other model goes through stochmi.layers.deep
    k = (
        n_paths
        if any(layers.index(b if a == "X" else a) > 0 for a, b in pairs if a == "X" or b == "Y")
        else 1
    )

    has_weights = bool(sites.weights)
    if weights == "conditional" and has_weights:
        df = _conditional(
            model,
            guide,
            x,
            y,
            layers,
            sites.weights,
            pairs,
            opts,
            gen,
            n_weight_draws,
            n_queries,
            pair_seeds,
            n_draws,
            chunk_size,
            device,
            progress,
        )
        df.attrs["seed"] = used_seed
        return df
    chain, links, mode = _marginal_chain(
        model, guide, x, layers, sites.weights, k, gen, n_weight_draws
    )
    deep = None
    if links is not None:
        dtype = x.dtype if x.is_floating_point() else None
        queries = _deep_queries(chain.n, n_queries, gen)
        deep = _Deep(chain, links, opts, gen, dtype, progress, rows=queries)
    rows, conv = _run_pairs(
        chain, layers, pairs, y, pair_seeds, n_draws, chunk_size, device, progress, deep
    )
    df = _finish(pd.DataFrame(rows), layers, weights, mode, conv)
    df.attrs["seed"] = used_seed
    return df


def _check_options(
    weights, n_paths, n_is, tolerance, max_effort, n_weight_draws, n_draws, n_queries
):
    """Validate :func:`layer_mi`'s settings; the deep-layer ones as :class:`DeepOptions`."""
    if weights not in ("marginal", "conditional"):
        raise ValueError(f"weights must be 'marginal' or 'conditional', got {weights!r}")
    for nm, v in (
        ("n_paths", n_paths),
        ("n_is", n_is),
        ("max_effort", max_effort),
        ("n_weight_draws", n_weight_draws),
        ("n_draws", n_draws),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{nm} must be a positive int, got {v!r}")
    for nm, v in (("n_paths", n_paths), ("n_is", n_is)):
        if v < 2 or v % 2:
            raise ValueError(f"{nm} must be an even int >= 2, got {v!r}")
    if not isinstance(tolerance, int | float) or not tolerance > 0:
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")
    if n_queries is not None and (
        isinstance(n_queries, bool) or not isinstance(n_queries, int) or n_queries < 2
    ):
        raise ValueError(f"n_queries must be None or an int >= 2, got {n_queries!r}")
    return DeepOptions(n_is=n_is, n_fwd=n_paths, tolerance=float(tolerance), max_effort=max_effort)


def _deep_queries(n: int, n_queries: int | None, gen: torch.Generator) -> torch.Tensor | None:
    """The queries of the densities across several layers: ``None`` (all ``n``) where
    ``n <= n_queries``, else a uniform random ``n_queries`` of them, sorted.  No draw is
    taken from ``gen`` in the first case, so those runs do not depend on ``n_queries``."""
    if n_queries is None or n <= n_queries:
        return None
    return _query_sets(n, 1, gen, n_queries)[0]


def _resolve_pairs(pairs, layers: list[str], y) -> list[tuple[str, str]]:
    """The default pairs, or the user's pairs checked against the chain."""
    if pairs is None:
        return _default_pairs(layers, y is not None)
    pairs = [tuple(p) for p in pairs]
    for a, b in pairs:
        if (a, b) == ("X", "Y") or a not in layers and a != "X" or b not in layers and b != "Y":
            raise ValueError(
                f"pair ({a}, {b}): sources are 'X' or a layer, targets a layer or 'Y', and "
                "at least one side is a layer; "
                f"the layers are {layers}"
            )
        if a in layers and b in layers and layers.index(b) <= layers.index(a):
            raise ValueError(
                f"pair ({a}, {b}): the source must come before the target in the chain "
                f"{layers} (MI is symmetric: ask for ({b}, {a}))"
            )
        if b == "Y" and y is None:
            raise ValueError(f"pair ({a}, Y) needs labels y")
    return pairs


def _marginal_chain(model, guide, x, layers, weight_sites, k, gen, n_weight_draws):
    """The layer chain with weights marginalised, its Gaussian links (or None) and the
    mode string: noise only, local reparameterisation, or a mixture over weight draws
    (and nested Monte Carlo wherever a link is not Gaussian)."""
    if not weight_sites:
        chain = Chain(model, x, layers, [], [], 1, "single", guide, gen)
        links = model_links(model, x, layers, "noise")
        mode = "noise"
    elif isinstance(model, LocalReparamModel) and guide is not None:
        chain = Chain(model, x, layers, weight_sites, [], 1, "local_reparam", guide, gen)
        links = model_links(model, x, layers, "local_reparam", guide=guide)
        mode = "local_reparam"
    else:
        draws = _weight_draws(model, guide, x, weight_sites, n_weight_draws, gen)
        chain = Chain(model, x, layers, weight_sites, draws, k, "mixture", guide, gen)
        return (
            chain,
            None,
            f"mixture over {n_weight_draws} weight draws (nested Monte Carlo, {k} paths)",
        )
    if not _gaussian_links(chain):
        # generic families (Laplace, Student-t, ...): no Gauss-Newton proposal; paths
        # for the densities across layers come from nested Monte Carlo (flagged rows)
        if mode == "noise":
            chain = Chain(model, x, layers, [], [], k, "single", guide, gen)
        else:
            chain = Chain(model, x, layers, weight_sites, [], k, "local_reparam", guide, gen)
        return chain, None, mode + f" (non-Gaussian layers: nested Monte Carlo, {k} paths)"
    return chain, links, mode


def _gaussian_links(chain: Chain) -> bool:
    """Every layer after the first is a single Gaussian given its parent."""
    for cond in chain.conds[1:]:
        gm = as_gaussian_mixture(cond)
        if gm is None or gm.n_components != 1:
            return False
    return True


def _run_pairs(chain, layers, pairs, y, seeds, n_draws, chunk_size, device, progress, deep):
    """:func:`_estimate_pairs`, with a link that :mod:`stochmi.layers.deep` cannot use (a
    Gaussian whose mean is not differentiable in its parent) reported as ``ValueError``.

    Nested Monte Carlo for other layer families is chosen earlier, in
    :func:`_marginal_chain` (``deep`` is None then); nothing here falls back.
    """
    try:
        return _estimate_pairs(
            chain, layers, pairs, y, seeds, n_draws, chunk_size, device, progress, deep
        )
    except NotGaussianLink as err:
        raise ValueError(
            "densities across several layers need Gaussian layer sites (Normal or "
            f"Independent(Normal)) whose mean is differentiable in the parent: {err}. "
            "Restrict the pairs to X with the first layer and consecutive layers, or make "
            "the layers Gaussian."
        ) from err


def _combine_dpi_bounds(df: pd.DataFrame, layers) -> None:
    """Tighten brackets with data processing (in place, in chain order).

    ``lower I(X;T_l) >= max(0, lower I(T_l;Y))`` and ``upper I(X;T_l) <= min(upper
    I(X;T_{l-1}), upper I(T_{l-1};T_l))``; no bound is negative.  Each bound holds in
    expectation only, so two of them can cross by Monte Carlo error (an I(X;T_l) near 0
    whose upper end falls below the label row's lower end): then the upper end is
    raised to the lower one, the weaker of the two choices.
    """
    key = {(r.source, r.target): i for i, r in enumerate(df.itertuples())}
    lo = df["lower"].to_numpy(dtype=float).copy()
    hi = df["upper"].to_numpy(dtype=float).copy()
    lo = np.where(np.isnan(lo), lo, np.maximum(lo, 0.0))
    for l, name in enumerate(layers):
        i = key.get(("X", name))
        if i is None:
            continue
        j = key.get((name, "Y"))
        if j is not None and not math.isnan(lo[j]):
            lo[i] = max(lo[i], lo[j])
        if l > 0:
            for other in (key.get(("X", layers[l - 1])), key.get((layers[l - 1], name))):
                if other is not None and not math.isnan(hi[other]):
                    hi[i] = min(hi[i], hi[other])
    hi = np.where(np.isnan(hi), hi, np.maximum(hi, np.nan_to_num(lo, nan=0.0)))
    df["lower"], df["upper"] = lo, hi


def _finish(df: pd.DataFrame, layers, weights, mode, conv) -> pd.DataFrame:
    _combine_dpi_bounds(df, layers)
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


#: Fewest queries per weight draw for the densities across several layers in
#: conditional mode (all N when N is smaller).
MIN_QUERIES_PER_DRAW = 64


def _query_sets(
    n: int, n_w: int, gen: torch.Generator, n_queries: int | None = None
) -> list[torch.Tensor]:
    """The queries each weight draw estimates its densities across layers at.

    One random permutation of the ``n`` inputs; its first ``m = min(n, n_queries)``
    entries (all ``n`` for ``None``) are cut into ``n_w`` consecutive runs of
    ``max(ceil(m / n_w), MIN_QUERIES_PER_DRAW)`` (at most ``m``; runs wrap around and
    overlap when that exceeds ``m / n_w``), so each of those ``m`` inputs is a query of
    at least one draw and the draws together cost about one table of ``m`` queries.
    """
    m = n if n_queries is None else min(n, n_queries)
    n_q = min(m, max(-(-m // n_w), MIN_QUERIES_PER_DRAW))
    perm = torch.randperm(n, generator=gen, device=gen.device)
    offs = torch.arange(n_q, device=gen.device)
    return [perm[((d * m) // n_w + offs) % m].sort().values for d in range(n_w)]


def _posterior_sd(values: pd.Series, stderrs: pd.Series) -> float:
    """Spread of the per-draw MI over the posterior: the sd of the per-draw estimates
    with their mean squared Monte Carlo error removed, ``sqrt(max(0, var - mean se^2))``
    (method of moments; NaN for a single draw)."""
    if len(values) < 2:
        return math.nan
    var = float(values.var(ddof=1)) - float((stderrs**2).mean())
    return math.sqrt(max(0.0, var))


def _conditional(
    model,
    guide,
    x,
    y,
    layers,
    weight_sites,
    pairs,
    opts,
    gen,
    n_w,
    n_queries,
    pair_seeds,
    n_draws,
    chunk_size,
    device,
    progress,
) -> pd.DataFrame:
    import arviz as az
    from tqdm.auto import tqdm

    draws = _weight_draws(model, guide, x, weight_sites, n_w, gen)
    query_sets = _query_sets(x.shape[0], n_w, gen, n_queries)
    per = []
    for di, wv in enumerate(tqdm(draws, desc="weight draws", disable=not progress)):
        chain = Chain(model, x, layers, weight_sites, [wv], 1, "single", guide, gen)
        deep = None
        if _gaussian_links(chain):
            links = model_links(model, x, layers, "fixed", weight_values=wv)
            deep = _Deep(chain, links, opts, gen, x.dtype, False, rows=query_sets[di])
        else:
            chain = Chain(model, x, layers, weight_sites, [wv], opts.n_fwd, "single", guide, gen)
        rows, _ = _run_pairs(
            chain,
            layers,
            pairs,
            y,
            [s + di for s in pair_seeds],
            n_draws,
            chunk_size,
            device,
            False,
            deep,
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
                "posterior_sd": _posterior_sd(g["value"], g["stderr"]),
                "converged": bool(g["converged"].all()),
                "mc_bias": float(g["mc_bias"].max()),
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
    df.attrs.update(
        {
            "per_draw": per_df,
            "inference_data": idata,
            "summary": summary,
            "weight_draws": draws,
            "queries_per_draw": len(query_sets[0]),
        }
    )
    return df
