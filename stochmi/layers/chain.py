"""The layer chain: samples of the layers and the conditional of each layer given its parent.

:func:`stochmi.layer_mi` takes ``p(t_1 | x_i)``, ``p(t_l | t_{l-1})`` and the samples
that serve as sources and queries from here; densities across several Gaussian layers
come from :mod:`stochmi.layers.deep`.  The chain runs ``K > 1`` paths per input only
where those densities come from nested Monte Carlo instead (layer families other than
Gaussian, the generic mixture over weight draws): then ``p(t_l | x_i)`` is the
mixture over the ``K`` paths (:meth:`Chain.given_x`).

Also the helpers that bring a site's distribution to batch ``(N,)`` and regroup rows
into mixtures (``p(t_l | x_i)`` over paths, the Monte Carlo marginal over weight draws).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import distributions as td

from stochmi.core.kernel import DETERMINISTIC_MESSAGE, as_gaussian_mixture, is_delta
from stochmi.core.rng import draw_seed, rng_context
from stochmi.layers.sites import trace_model

if TYPE_CHECKING:  # stochmi.layers.links imports this module
    from stochmi.layers.links import LocalReparamModel

__all__ = [
    "Chain",
    "as_batch_n",
    "regroup",
    "mixture_over_draws",
    "cuda_devices",
    "sample_rows",
]


# ---------------------------------------------------------------------------
# conditionals: normalising site distributions, regrouping rows into mixtures
# ---------------------------------------------------------------------------
def as_batch_n(fn: td.Distribution, m: int, name: str) -> td.Distribution:
    """Reinterpret a site distribution so its batch shape is ``(m,)`` and event rank <= 1."""
    bs = tuple(fn.batch_shape)
    if not bs or bs[0] != m:
        raise ValueError(
            f"layer site '{name}' has batch shape {bs}; expected its first dimension to be the "
            f"data dimension of size {m} (declare the site inside pyro.plate over the inputs)"
        )
    if len(bs) > 1:
        fn = td.Independent(fn, len(bs) - 1)
    if is_delta(fn):
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


def regroup(cond: td.Distribution, index: torch.Tensor) -> td.Distribution:
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


def mixture_over_draws(conds: list[td.Distribution]) -> td.Distribution:
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


def cuda_devices(*objs) -> list:
    """CUDA devices among tensors/distributions, for :func:`stochmi.core.rng.rng_context`."""
    from stochmi.core.kernel import first_tensor

    out = []
    for o in objs:
        t = o if isinstance(o, torch.Tensor) else first_tensor(o)
        if t is not None and t.device.type == "cuda" and t.device not in out:
            out.append(t.device)
    return out


def sample_rows(cond: td.Distribution, gen: torch.Generator) -> torch.Tensor:
    """One draw per batch row, shape (M, *event), from ``gen`` (generic families:
    ``cond.sample`` inside :func:`~stochmi.core.rng.rng_context` seeded from ``gen``)."""
    gm = as_gaussian_mixture(cond)
    if gm is not None:
        if gm.loc.device != gen.device:  # e.g. CUDA tensors, CPU master generator
            gen = torch.Generator(device=gm.loc.device).manual_seed(draw_seed(gen))
        t = gm.sample(1, gen)[0]
        return t.squeeze(-1) if len(cond.event_shape) == 0 else t
    with rng_context(draw_seed(gen), cuda_devices(cond)):
        return cond.sample()


# ---------------------------------------------------------------------------
# the chain
# ---------------------------------------------------------------------------
class Chain:
    """Samples ``K`` paths through the layers (``K = 1`` unless nested Monte Carlo needs
    more) and the conditionals along them.

    ``values[l]`` has shape (K*N, d_l) with row ``k*N + i`` = path ``k`` of input ``i``;
    ``conds[l]`` has batch (K*N,): ``p(t_l | t_{l-1}[row])`` (``t_0 = x``).

    ``mode``: ``"local_reparam"`` (the model is a
    :class:`~stochmi.layers.links.LocalReparamModel`: per-example weights integrated
    out, one path), ``"single"`` (noise only, or one fixed weight draw: one trace) or
    ``"mixture"`` (per-example weights as a mixture over ``weight_values`` draws).
    """

    def __init__(self, model, x, layers, weight_sites, weight_values, k, mode, guide, gen):
        self.n = x.shape[0]
        self.k = k
        xk = x.repeat(k, *([1] * (x.dim() - 1)))
        self.values: list[torch.Tensor] = []
        self.conds: list[td.Distribution] = []
        import pyro.poutine as poutine

        if mode == "local_reparam":
            lr_model: LocalReparamModel = model
            parent = xk
            for name in layers:
                cond = lr_model.local_reparam_conditional(name, parent, guide)
                cond = as_batch_n(cond, parent.shape[0], name)
                t = sample_rows(cond, gen).to(parent.dtype)
                self.conds.append(cond)
                self.values.append(t)
                parent = t
            return
        if mode == "single":  # noise only, or one fixed weight draw: one trace has it all
            wv = weight_values[0] if weight_values else {}
            tr = self._run(poutine.condition(model, data=wv), xk, gen)
            for name in layers:
                site = tr.nodes[name]
                self.conds.append(as_batch_n(site["fn"], xk.shape[0], name))
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
                conds.append(as_batch_n(tr.nodes[name]["fn"], xk.shape[0], name))
            cond = mixture_over_draws(conds)
            t = sample_rows(cond, gen)
            self.conds.append(cond)
            self.values.append(t.reshape(xk.shape[0], -1))
            parent = t.reshape(tr.nodes[name]["value"].shape).to(tr.nodes[name]["value"].dtype)

    @staticmethod
    def _run(model, xk, gen):
        with rng_context(draw_seed(gen), cuda_devices(xk)), torch.no_grad():
            return trace_model(model, xk)

    def first_path(self, l: int) -> td.Distribution:
        """``p(t_l | t_{l-1})`` on path 0 (batch N)."""
        idx = torch.arange(self.n, device=self.values[l].device)[:, None]
        return regroup(self.conds[l], idx)

    def given_x(self, l: int, k: int | None = None) -> td.Distribution:
        """``p(t_l | x_i)`` as a mixture over the first ``k`` paths (batch N)."""
        k = self.k if k is None else k
        n = self.n
        dev = self.values[l].device
        idx = torch.arange(k, device=dev)[None, :] * n + torch.arange(n, device=dev)[:, None]
        return regroup(self.conds[l], idx)
