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
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import distributions as td

from stochmi.core import mi_from_conditional, mi_with_labels
from stochmi.estimate import MIEstimate
from stochmi.kernel import DETERMINISTIC_MESSAGE, as_gaussian_mixture

__all__ = ["layer_mi", "find_layers"]

COLUMNS = ["source", "target", "value", "stderr", "lower", "upper"]


# ---------------------------------------------------------------------------
# site discovery
# ---------------------------------------------------------------------------
@dataclass
class _Sites:
    layers: list[str]
    weights: list[str]


def _trace(fn: Callable, *args, **kwargs):
    import pyro
    import pyro.poutine as poutine

    # argument validation off while tracing, so a zero-noise layer reaches our own
    # check (which explains why its MI is infinite) instead of a constraint error
    with pyro.validation_enabled(False):
        return poutine.trace(fn).get_trace(*args, **kwargs)


def _sample_sites(tr):
    from pyro.poutine.util import site_is_subsample

    for name, site in tr.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _is_local(site, n: int) -> bool:
    frames = site["cond_indep_stack"]
    if any(f.vectorized and f.size == n for f in frames):
        return True
    return not frames and tuple(site["fn"].batch_shape)[:1] == (n,)


def find_layers(model: Callable, x: torch.Tensor) -> _Sites:
    """Stochastic layers and weight sites of a Pyro model, in execution order.

    Layers are latent, continuous sample sites inside a plate of size ``N``
    (``x.shape[0]``); weights are latent sites outside any data plate.
    Discrete latent sites (such as a label site sampled because no labels were
    passed) and observed sites are not layers.
    """
    n = x.shape[0]
    tr = _trace(model, x)
    layers, weights = [], []
    for name, site in _sample_sites(tr):
        if site["is_observed"] or site["infer"].get("is_auxiliary"):
            continue
        if getattr(site["fn"].support, "is_discrete", False):
            continue
        (layers if _is_local(site, n) else weights).append(name)
    return _Sites(layers, weights)


# ---------------------------------------------------------------------------
# conditionals: normalising site distributions, regrouping rows into mixtures
# ---------------------------------------------------------------------------
def _as_batch_n(fn: td.Distribution, m: int, name: str) -> td.Distribution:
    """Reinterpret a site distribution so its batch shape is ``(m,)`` and event rank <= 1."""
    bs = tuple(fn.batch_shape)
    if not bs or bs[0] != m:
        raise ValueError(
            f"layer site '{name}' has batch shape {bs}; expected its first dimension to be the "
            f"data dimension of size {m} (declare the site inside pyro.plate over the inputs)"
        )
    if len(bs) > 1:
        fn = td.Independent(fn, len(bs) - 1)
    if type(fn).__name__ == "Delta" or (
        isinstance(fn, td.Independent) and type(fn.base_dist).__name__ == "Delta"
    ):
        raise ValueError(f"layer '{name}': {DETERMINISTIC_MESSAGE}")
    if len(fn.event_shape) > 1:
        gm = as_gaussian_mixture(_flat_normal(fn))
        if gm is None:
            raise ValueError(
                f"layer '{name}' has event shape {tuple(fn.event_shape)}; only Normal layers "
                "are flattened automatically - flatten the site to (N, d) in the model"
            )
        fn = _flat_normal(fn)
    return fn


def _flat_normal(fn: td.Distribution) -> td.Distribution:
    base = fn
    while isinstance(base, td.Independent):
        base = base.base_dist
    if not isinstance(base, td.Normal):
        return fn
    m = fn.batch_shape[0]
    loc = base.loc.reshape(m, -1)
    scale = torch.broadcast_to(base.scale, base.loc.shape).reshape(m, -1)
    return td.Independent(td.Normal(loc, scale), 1)


class _Regrouped(td.Distribution):
    """Uniform mixture ``p_i(t) = (1/K) sum_k base[index[i, k]](t)`` for a generic base.

    ``base`` has batch shape ``(M,)``; the result has batch shape ``(N,)``.
    Used when the base family has no fast path; memory per ``log_prob`` call is
    ``O(B * M * d)`` for ``B`` query rows.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, base: td.Distribution, index: torch.Tensor) -> None:
        self.base = base
        self.index = index
        super().__init__(torch.Size([index.shape[0]]), base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape)
        n, k = self.index.shape
        reps = math.prod(shape) if shape else 1
        draws = self.base.sample((reps,))  # (reps, M, *event)
        pick = torch.randint(0, k, (reps, n), device=self.index.device)
        rows = self.index[torch.arange(n, device=self.index.device), pick]  # (reps, n)
        out = torch.stack([draws[r, rows[r]] for r in range(reps)])
        return out.reshape(shape + self.batch_shape + self.event_shape)

    def log_prob(self, value):
        ev = len(self.event_shape)
        lead = value.shape[: value.dim() - ev - 1]
        q = value.shape[value.dim() - ev - 1]
        n, k = self.index.shape
        m = self.base.batch_shape[0]
        v = value.reshape(-1, q, *self.event_shape)
        if q == 1:
            full = v.expand(v.shape[0], m, *self.event_shape)
            lp = self.base.log_prob(full)  # (B, M)
            out = lp[:, self.index]  # (B, n, k)
        else:
            if q != n:
                raise ValueError(f"value has {q} rows, expected 1 or {n}")
            vv = torch.zeros(v.shape[0], m, *self.event_shape, dtype=v.dtype, device=v.device)
            out = torch.empty(v.shape[0], n, k, dtype=v.dtype, device=v.device)
            for j in range(k):
                vv[:, self.index[:, j]] = v
                out[:, :, j] = self.base.log_prob(vv)[:, self.index[:, j]]
        res = torch.logsumexp(out.to(torch.float64), dim=-1) - math.log(k)
        return res.reshape(*lead, n)


def _regroup(cond: td.Distribution, index: torch.Tensor) -> td.Distribution:
    """Mixture over rows ``index[i, :]`` of ``cond`` (batch (M,)) -> batch (N,).

    Gaussian conditionals (and mixtures of them) stay on the fast path as a
    ``MixtureSameFamily`` of ``Independent(Normal)``; other families are wrapped.
    """
    gm = as_gaussian_mixture(cond)
    n, k = index.shape
    if gm is None:
        return _Regrouped(cond, index)
    loc = gm.loc[index].reshape(n, k * gm.n_components, gm.dim)
    scale = gm.scale[index].reshape(n, k * gm.n_components, gm.dim)
    logw = (gm.logw[index] - math.log(k)).reshape(n, k * gm.n_components)
    if k * gm.n_components == 1:
        return td.Independent(td.Normal(loc[:, 0], scale[:, 0]), 1)
    comp = td.Independent(td.Normal(loc, scale), 1)
    return td.MixtureSameFamily(td.Categorical(logits=logw), comp)


def _mixture_over_draws(conds: list[td.Distribution]) -> td.Distribution:
    """``(1/K) sum_k conds[k]`` for conditionals with the same batch (M,)."""
    if len(conds) == 1:
        return conds[0]
    gms = [as_gaussian_mixture(c) for c in conds]
    if all(g is not None for g in gms):
        loc = torch.cat([g.loc for g in gms], dim=1)
        scale = torch.cat([g.scale for g in gms], dim=1)
        logw = torch.cat([g.logw for g in gms], dim=1) - math.log(len(conds))
        comp = td.Independent(td.Normal(loc, scale), 1)
        return td.MixtureSameFamily(td.Categorical(logits=logw), comp)
    raise TypeError(
        "Monte Carlo over weight draws needs Normal layer sites for the generic (non "
        "local-reparameterised) marginal; this model's layer family "
        f"{type(conds[0]).__name__} is not supported with weights='marginal' - use "
        "weights='conditional'"
    )


def _cuda_devices(*objs) -> list:
    """CUDA devices among tensors/distributions, for ``fork_rng``."""
    from stochmi.kernel import _first_tensor

    out = []
    for o in objs:
        t = o if isinstance(o, torch.Tensor) else _first_tensor(o)
        if t is not None and t.device.type == "cuda" and t.device not in out:
            out.append(t.device)
    return out


def _sample_rows(cond: td.Distribution, gen: torch.Generator) -> torch.Tensor:
    """One draw per batch row, shape (M, *event), from ``gen`` (fork_rng for generic)."""
    gm = as_gaussian_mixture(cond)
    if gm is not None:
        if gm.loc.device != gen.device:  # e.g. CUDA tensors, CPU master generator
            seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
            gen = torch.Generator(device=gm.loc.device).manual_seed(seed)
        t = gm.sample(1, gen)[0]
        return t.squeeze(-1) if len(cond.event_shape) == 0 else t
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
    with torch.random.fork_rng(devices=_cuda_devices(cond)):
        torch.manual_seed(seed)
        return cond.sample()


# ---------------------------------------------------------------------------
# the chain
# ---------------------------------------------------------------------------
class _Chain:
    """Samples ``K`` paths through the layers and the conditionals along them.

    ``values[l]`` has shape (K*N, d_l) with row ``k*N + i`` = path ``k`` of input ``i``;
    ``conds[l]`` has batch (K*N,): ``p(t_l | t_{l-1}[row])`` (``t_0 = x``).
    """

    def __init__(self, model, x, layers, weight_sites, weight_values, k, mode, guide, gen):
        self.n = x.shape[0]
        self.k = k
        xk = x.repeat(k, *([1] * (x.dim() - 1)))
        self.values: list[torch.Tensor] = []
        self.conds: list[td.Distribution] = []
        import pyro.poutine as poutine

        if mode == "local_reparam":
            parent = xk
            for name in layers:
                cond = model.local_reparam_conditional(name, parent, guide)
                cond = _as_batch_n(cond, parent.shape[0], name)
                t = _sample_rows(cond, gen).to(parent.dtype)
                self.conds.append(cond)
                self.values.append(t)
                parent = t
            return
        if mode == "single":  # noise only, or one fixed weight draw: one trace has it all
            wv = weight_values[0] if weight_values else {}
            tr = self._run(poutine.condition(model, data=wv), xk, gen)
            for name in layers:
                site = tr.nodes[name]
                self.conds.append(_as_batch_n(site["fn"], xk.shape[0], name))
                self.values.append(site["value"].reshape(xk.shape[0], -1))
            return
        # mode == "mixture": per-example weight draws, K_w traces per layer
        parent = None
        for li, name in enumerate(layers):
            conds = []
            for wv in weight_values:
                data = dict(wv)
                if li > 0:
                    data[layers[li - 1]] = parent
                tr = self._run(poutine.condition(model, data=data), xk, gen)
                conds.append(_as_batch_n(tr.nodes[name]["fn"], xk.shape[0], name))
            cond = _mixture_over_draws(conds)
            t = _sample_rows(cond, gen)
            self.conds.append(cond)
            self.values.append(t.reshape(xk.shape[0], -1))
            parent = t.reshape(tr.nodes[name]["value"].shape).to(tr.nodes[name]["value"].dtype)

    @staticmethod
    def _run(model, xk, gen):
        seed = int(torch.randint(0, 2**62, (1,), generator=gen).item())
        with torch.random.fork_rng(devices=_cuda_devices(xk)):
            torch.manual_seed(seed)
            with torch.no_grad():
                return _trace(model, xk)

    def first_path(self, l: int) -> td.Distribution:
        """``p(t_l | t_{l-1})`` on path 0 (batch N)."""
        idx = torch.arange(self.n, device=self.values[l].device)[:, None]
        return _regroup(self.conds[l], idx)

    def given_x(self, l: int, k: int | None = None) -> td.Distribution:
        """``p(t_l | x_i)`` as a mixture over the first ``k`` paths (batch N)."""
        k = self.k if k is None else k
        n = self.n
        idx = (torch.arange(k)[None, :] * n + torch.arange(n)[:, None]).to(self.values[l].device)
        return _regroup(self.conds[l], idx)


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
        with torch.random.fork_rng(devices=_cuda_devices(x)):
            torch.manual_seed(seed)
            with torch.no_grad():
                tr = _trace(src, x[:2])
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


def _path_group(chain: _Chain, l: int) -> int | None:
    """Components per path in ``p(t_l | x)`` (for the path-excluding lower bound)."""
    if l == 0 or chain.k < 2:
        return None
    gm = as_gaussian_mixture(chain.conds[l])
    return gm.n_components if gm is not None else None


def _estimate_pairs(
    chain: _Chain, layers, pairs, y, seeds, n_draws, chunk_size, device, progress
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
    with torch.random.fork_rng(devices=_cuda_devices(x)):
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
        chain = _Chain(model, x, layers, [], [], k, "single", guide, gen)
        mode = "noise"
    elif hasattr(model, "local_reparam_conditional") and guide is not None:
        chain = _Chain(model, x, layers, sites.weights, [], k, "local_reparam", guide, gen)
        mode = "local_reparam"
    else:
        draws = _weight_draws(model, guide, x, sites.weights, n_weight_draws, gen)
        chain = _Chain(model, x, layers, sites.weights, draws, k, "mixture", guide, gen)
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
        chain = _Chain(model, x, layers, weight_sites, [wv], k, "single", guide, gen)
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
