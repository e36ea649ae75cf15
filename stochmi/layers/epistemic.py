"""Per-layer epistemic information ``I_q(T_l; W | X)`` for a weight posterior ``q(W)``.

For a fixed input ``x``,

.. math::

    I_q(T_l; W \\mid X = x) = E_{w \\sim q,\\, t \\sim p(t \\mid x, w)}
    \\big[\\log p(t \\mid x, w) - \\log p(t \\mid x)\\big],
    \\qquad p(t \\mid x) = E_q\\, p(t \\mid x, W).

:func:`posterior_layer` estimates it with no ``log M`` ceiling when the weight marginal
has a closed form, i.e. the model is a :class:`~stochmi.layers.links.LocalReparamModel`
(mean-field Gaussian weights entering each layer linearly).  For a single input the
layers given their parents are then exactly Gaussian once the weights are integrated
out, layer by layer, because the weights of different layers and of different units are
independent under ``q``: ``p(t_1, .., t_l | x)`` is the local-reparameterisation chain.

* **Queries.** ``M`` posterior draws ``w_m``; for every input ``n`` a set of draws
  ``m``, and ``t`` and its path ``z = (t_1, .., t_{l-1})`` from one forward pass under
  ``w_m`` (all ``N M`` pairs for the first layer, ``max(1, ceil(min_queries / N))``
  draws per input for deeper ones).
* **Densities.** Layer 1: both exact (the site's Gaussian under ``w_m``; the
  local-reparameterisation Gaussian).  Deeper: :func:`stochmi.layers.deep.own_log_density`
  on the fixed-weight chain under ``w_m`` and on the marginal chain, each with the
  query's own path as the posterior draw of its upper estimate.
* **Value** ``mean(log p_hat(t|x,w) - log p_hat(t|x))``, each density unbiased.
* **Lower end** ``mean(log p_hat(t|x,w) - log p_hat_up(t|x))``: ``E log p_hat <= log p``
  and ``E log p_hat_up >= log p`` (Jensen and the posterior-sample bound), so it is below
  ``I_q`` in expectation.
* **Upper end**, the smaller of two bounds in expectation: the same sandwich the other way
  round, ``mean(log p_hat_up(t|x,w) - log p_hat(t|x))``, and the variational bound
  ``mean(log p_hat_up(t|x,w) - log r(t|x))``, which holds for any density ``r``
  (``I_q + KL(p(t|x) || r)``) and needs no sampling of the marginal: ``r`` is the
  Gaussian with the mean and covariance of fresh paths of the marginal chain (for the
  first layer the exact marginal, so the bracket closes).
* **Standard error**: the queries of one weight draw share it, so the error of the mean
  is taken over draws (a cluster-robust sandwich).  It also counts the spread between
  inputs and so is conservative for the ``N`` given inputs.
* **Convergence** (deeper layers): as in :func:`stochmi.layer_mi`, the estimate with the
  first half of the draws; effort doubles until the difference is within tolerance.

:func:`dataset_deep_matrix` is the estimate over the ``M`` draws as sources (a dataset
MI, at most ``log M``) for models without a closed-form weight marginal: ``L[n, j, i] =
log p(t_{n j} | x_n, w_i)`` from the same sampler, every query at every draw.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import distributions as td

from stochmi.core.rng import draw_seed, rng_context
from stochmi.layers.chain import as_batch_n, cuda_devices
from stochmi.layers.deep import (
    OwnLogDensity,
    mean_path,
    normal_params,
    own_log_density,
    row_gauss_logpdf,
)
from stochmi.layers.links import model_links

__all__ = ["posterior_layer", "dataset_deep_matrix", "draw_clustered_se", "raise_effort"]


def _gaussian(fn: td.Distribution, n: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)`` ``(N, d)`` float64 of a Gaussian layer site's distribution."""
    try:
        loc, scale = normal_params(as_batch_n(fn, n, name))
        return loc.to(torch.float64), scale.to(torch.float64)
    except TypeError as err:
        raise TypeError(f"deeper layers need Gaussian layer sites; layer '{name}': {err}") from err


def _pairs(n: int, m: int, l: int, min_queries: int, gen: torch.Generator):
    """Input and draw index of every query: all pairs for the first layer; for deeper
    ones ``r = min(m, max(1, ceil(min_queries / n)))`` draws per input, evenly spaced
    from a random offset."""
    dev = gen.device
    if l == 0:
        q_m, q_n = torch.meshgrid(
            torch.arange(m, device=dev), torch.arange(n, device=dev), indexing="ij"
        )
        return q_n.reshape(-1), q_m.reshape(-1)
    r = min(m, max(1, -(-min_queries // n)))
    off = torch.randint(0, m, (n,), generator=gen, device=dev)
    q_m = (off[:, None] + (torch.arange(r, device=dev) * m) // r) % m  # (n, r)
    return torch.arange(n, device=dev).repeat_interleave(r), q_m.reshape(-1)


def draw_clustered_se(terms: torch.Tensor, draw: torch.Tensor) -> float:
    """Standard error of ``terms.mean()`` when the terms of one draw are dependent:
    ``sqrt(G / (G - 1) sum_g (sum_{q in g} (d_q - mean))^2) / Q`` over the ``G`` draws."""
    t = terms.to(torch.float64)
    e = t - t.mean()
    groups = torch.zeros(int(draw.max()) + 1, dtype=torch.float64, device=t.device)
    groups.index_add_(0, draw, e)
    g = int((torch.bincount(draw) > 0).sum())
    if g < 2:
        return math.nan
    return float(torch.sqrt(g / (g - 1) * (groups**2).sum()) / len(t))


class _Posterior:
    """The densities of one layer's queries under the fixed-weight and marginal chains."""

    def __init__(self, model, guide, x, layers, l, draws, traces, gen, dtype, opts):
        self.model, self.guide, self.x, self.layers, self.l = model, guide, x, layers, l
        self.chunk_size = opts["chunk_size"]
        self.draws, self.traces, self.gen, self.dtype = draws, traces, gen, dtype
        n = x.shape[0]
        self.q_n, self.q_m = _pairs(n, len(draws), l, opts["min_queries"], gen)
        vals = [
            torch.stack([tr.nodes[nm]["value"].reshape(n, -1) for tr in traces])
            for nm in layers[: l + 1]
        ]  # (M, N, d_k) per layer
        self.t = vals[-1][self.q_m, self.q_n].to(torch.float64)
        self.paths = [v[self.q_m, self.q_n] for v in vals[:-1]]
        with torch.no_grad():
            lr1 = model.local_reparam_conditional(layers[0], x, guide)
        self.lr_loc, self.lr_scale = _gaussian(lr1, n, layers[0])

    def exact(self) -> dict:
        """First layer: both densities exact."""
        name, n = self.layers[0], self.x.shape[0]
        cond = torch.empty(len(self.t), dtype=torch.float64, device=self.t.device)
        for mi, tr in enumerate(self.traces):
            sel = torch.nonzero(self.q_m == mi)[:, 0]
            loc, scale = _gaussian(tr.nodes[name]["fn"], n, name)
            cond[sel] = row_gauss_logpdf(self.t[sel], loc[self.q_n[sel]], scale[self.q_n[sel]])
        marg = row_gauss_logpdf(self.t, self.lr_loc[self.q_n], self.lr_scale[self.q_n])
        d = cond - marg
        return {"value": d, "half": d, "lower": d, "upper_is": d, "upper_var": d, "ess": None}

    def sampled(self, n_is: int, n_fwd: int, n_r: int) -> dict:
        """Deeper layer: importance-sampled densities at effort ``(n_is, n_fwd)``."""
        c = self._conditional(n_is, n_fwd)
        m = self._marginal(n_is, n_fwd)
        log_r = self._moment_gaussian(n_r)
        return {
            "value": c.value - m.value,
            "half": c.half - m.half,
            "lower": c.value - m.upper,
            "upper_is": c.upper - m.value,
            "upper_var": c.upper - log_r,
            "ess": torch.minimum(c.ess, m.ess),
        }

    def _own(self, loc, scale, links, rows, n_is, n_fwd):
        paths = [p[rows] for p in self.paths]
        anchors = mean_path(loc, links, self.dtype)
        with rng_context(draw_seed(self.gen), cuda_devices(self.x)):
            return own_log_density(
                loc, scale, links, self.t[rows], anchors, paths=paths, n_is=n_is,
                n_fwd=n_fwd, generator=self.gen, dtype=self.dtype, chunk_size=self.chunk_size,
                groups=self.q_n[rows],
            )  # fmt: skip

    def _conditional(self, n_is, n_fwd):
        n, name = self.x.shape[0], self.layers[0]
        dev = self.t.device
        out = {k: torch.empty(len(self.t), dtype=torch.float64, device=dev) for k in "vhue"}
        for mi in torch.unique(self.q_m).tolist():
            rows = torch.nonzero(self.q_m == mi)[:, 0]
            loc, scale = _gaussian(self.traces[mi].nodes[name]["fn"], n, name)
            links = model_links(
                self.model, self.x, self.layers, "fixed", weight_values=self.draws[mi]
            )[1 : self.l + 1]
            inputs = self.q_n[rows]
            res = self._own(loc[inputs], scale[inputs], links, rows, n_is, n_fwd)
            for k, v in zip("vhue", (res.value, res.half, res.upper, res.ess)):
                out[k][rows] = v
        return OwnLogDensity(out["v"], out["h"], out["u"], out["e"], n_is, n_fwd)

    def _marginal(self, n_is, n_fwd):
        links = self._lr_links()
        rows = torch.arange(len(self.t), device=self.t.device)
        return self._own(self.lr_loc[self.q_n], self.lr_scale[self.q_n], links, rows, n_is, n_fwd)

    def _lr_links(self):
        links = model_links(self.model, self.x, self.layers, "local_reparam", guide=self.guide)
        return links[1 : self.l + 1]

    def _moment_gaussian(self, n_r: int) -> torch.Tensor:
        """``log r(t_q | x_n)`` with ``r`` the Gaussian fitted (mean, covariance plus a
        1e-6 ridge) to ``n_r`` fresh paths of the marginal chain from each input."""
        links = self._lr_links()
        dev = self.t.device
        out = torch.empty(len(self.t), dtype=torch.float64, device=dev)
        inputs = torch.unique(self.q_n)
        d = self.t.shape[1]
        step = max(1, int(4e6 // (n_r * max(d, self.lr_loc.shape[1]))))
        for c in range(0, len(inputs), step):
            ins = inputs[c : c + step]
            b = len(ins)
            loc = self.lr_loc[ins].repeat_interleave(n_r, 0)
            t = loc + self.lr_scale[ins].repeat_interleave(n_r, 0) * torch.randn(
                loc.shape, generator=self.gen, dtype=loc.dtype, device=dev
            )
            for link in links:
                with torch.no_grad():
                    mu, sd = normal_params(link(t.to(self.dtype)))
                t = mu + sd * torch.randn(mu.shape, generator=self.gen, dtype=mu.dtype, device=dev)
            t = t.to(torch.float64).reshape(b, n_r, d)
            mean = t.mean(1)
            cen = t - mean[:, None]
            cov = cen.transpose(1, 2) @ cen / (n_r - 1)
            ridge = 1e-6 * torch.diagonal(cov, dim1=1, dim2=2).mean(1).clamp_min(1e-12)
            cov = cov + ridge[:, None, None] * torch.eye(d, dtype=torch.float64, device=dev)
            chol = torch.linalg.cholesky(cov)
            where = torch.full((self.x.shape[0],), -1, dtype=torch.long, device=dev)
            where[ins] = torch.arange(b, device=dev)
            sel = torch.nonzero(where[self.q_n] >= 0)[:, 0]
            k = where[self.q_n[sel]]
            out[sel] = td.MultivariateNormal(mean[k], scale_tril=chol[k]).log_prob(self.t[sel])
        return out


def raise_effort(once, tolerance: tuple[float, float], max_effort: int):
    """Run ``once(effort)`` at effort 1, 2, 4, ... until its estimate with all draws and
    with the first half differ by at most ``max(tolerance[0], tolerance[1] |value|)``, or
    the next effort would pass ``max_effort``.

    ``once(effort)`` returns ``(result, value, value_half)``.  Returns ``(result, effort,
    converged, (value, value_half))`` of the last run.
    """
    effort = 1
    while True:
        res, value, half = once(effort)
        ok = abs(value - half) <= max(tolerance[0], tolerance[1] * abs(value))
        if ok or effort * 2 > max_effort:
            return res, effort, ok, (value, half)
        effort *= 2


def posterior_layer(
    model, guide, x, layers, l, draws, traces, gen, *, n_is, n_fwd, tolerance, max_effort,
    min_queries=256, chunk_size=None,
) -> dict:  # fmt: skip
    """``I_q(T_l; W | X)`` for layer ``layers[l]`` of a local-reparameterisation model.

    Parameters
    ----------
    model : LocalReparamModel
    guide : callable or None
        The weight posterior the marginal is taken under (``None``: the prior).
    x : Tensor, shape (N, ...)
    layers : list of str
        All layer sites of the model in execution order (the chain up to ``l``).
    l : int
        Index of the target layer.
    draws : list of dict
        ``M`` posterior weight draws.
    traces : list
        One forward trace of the model on ``x`` per draw (the queries and their paths).
    gen : torch.Generator
    n_is, n_fwd : int
        Starting effort of the deeper-layer densities.
    tolerance : tuple of float
        ``(absolute, relative)``: converged when ``|value - half| <= max(abs, rel |value|)``.
    max_effort : int
        Effort doubles until converged or this multiple of the starting sizes.
    min_queries : int
        Deeper layers: fewest queries; draws per input are raised to reach it (at most
        ``M``).
    chunk_size : int, optional
        Queries per block of :func:`stochmi.layers.deep.own_log_density`.

    Returns
    -------
    dict
        ``value, stderr, lower, upper, converged, mc_bias`` (floats), ``per_input``
        (ndarray ``(N,)``, the mean over each input's queries), ``convergence`` (dict, or
        None for the first layer) and ``n_queries``.
    """
    dtype = x.dtype if x.is_floating_point() else torch.float32
    opts = {"chunk_size": chunk_size, "min_queries": min_queries}
    post = _Posterior(model, guide, x, layers, l, draws, traces, gen, dtype, opts)
    conv = None
    if l == 0:
        r = post.exact()
        ok, bias = True, 0.0
    else:
        d = post.t.shape[1]

        def once(effort):
            r = post.sampled(n_is * effort, n_fwd * effort, max(256, 4 * d))
            return r, float(r["value"].mean()), float(r["half"].mean())

        r, effort, ok, (value, half) = raise_effort(once, tolerance, max_effort)
        bias = abs(value - half)
        conv = {
            "value": value,
            "value_half": half,
            "upper": float(r["upper_is"].mean()),
            "upper_variational": float(r["upper_var"].mean()),
            "lower": float(r["lower"].mean()),
            "diag_ess_median": float(r["ess"].median()),
            "n_is": n_is * effort,
            "n_fwd": n_fwd * effort,
        }
    n = x.shape[0]
    per = torch.zeros(n, dtype=torch.float64, device=post.t.device)
    per.index_add_(0, post.q_n, r["value"])
    per = per / torch.bincount(post.q_n, minlength=n).clamp_min(1)
    return {
        "value": float(r["value"].mean()),
        "stderr": draw_clustered_se(r["value"], post.q_m),
        "lower": float(r["lower"].mean()),
        "upper": min(float(r["upper_is"].mean()), float(r["upper_var"].mean())),
        "converged": ok,
        "mc_bias": bias,
        "per_input": per.cpu().numpy(),
        "convergence": conv,
        "n_queries": len(post.t),
    }


def dataset_deep_matrix(model, x, layers, l, draws, traces, gen, *, n_is, n_fwd, chunk_size=None):
    """``L[n, j, i] = log p(t_{n j} | x_n, w_i)`` and its half-sample version, ``(N, M, M)``
    each, for a deeper layer ``layers[l]``: the queries of all draws at the fixed-weight
    chain of each draw ``i`` (:func:`stochmi.layers.deep.own_log_density`, linearised at
    draw ``i``'s mean path, ``n_is`` proposal draws and ``n_fwd`` forward paths per
    pair), and the median effective sample size."""
    n, m = x.shape[0], len(draws)
    dtype = x.dtype if x.is_floating_point() else torch.float32
    # n_is proposal draws per (query, draw) pair, not own_log_density's 4 n_is: there are
    # N M^2 pairs, and a model without a closed-form marginal has traced links, which
    # run the whole network for every path
    draws_is = max(2, 2 * (n_is // 8))
    name = layers[l]
    t = torch.stack([tr.nodes[name]["value"].reshape(n, -1) for tr in traces])  # (M, N, d)
    queries = t.transpose(0, 1).reshape(n * m, -1).to(torch.float64)  # row n * M + j
    inputs = torch.arange(n, device=x.device).repeat_interleave(m)
    L = torch.empty(n, m, m, dtype=torch.float64, device=x.device)
    Lh = torch.empty_like(L)
    ess = []
    for i in range(m):
        loc, scale = _gaussian(traces[i].nodes[layers[0]]["fn"], n, layers[0])
        links = model_links(model, x, layers, "fixed", weight_values=draws[i])[1 : l + 1]
        anchors = [a[inputs] for a in mean_path(loc, links, dtype)]
        with rng_context(draw_seed(gen), cuda_devices(x)):
            res = own_log_density(
                loc[inputs], scale[inputs], links, queries, anchors,
                n_is=draws_is, n_fwd=n_fwd, generator=gen, dtype=dtype, chunk_size=chunk_size,
                groups=inputs,
            )  # fmt: skip
        L[:, :, i] = res.value.reshape(n, m)
        Lh[:, :, i] = res.half.reshape(n, m)
        ess.append(res.ess.cpu())
    return L, Lh, float(np.median(torch.cat(ess).numpy()))
