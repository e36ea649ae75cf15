"""``log p(t_b | s_i)`` across several stochastic layers, by importance sampling over paths.

For a chain ``S -> T_1 -> ... -> T_L`` whose links ``p(t_k | t_{k-1})`` are Gaussian
(``Normal(m_k(t_{k-1}), diag s_k(t_{k-1})^2)``), the density of the last layer given a
source has no closed form:

.. math:: p(t_L \\mid s_i) = \\int p(t_1 \\mid s_i) \\prod_{k=2}^{L} p(t_k \\mid t_{k-1})
          \\, dt_1 \\dots dt_{L-1}.

The old estimator (``K`` forward paths per source, the query drawn from one of them) is
biased up by roughly ``exp(I(T_{L-1}; T_L | S)) / K``.  Here every entry of the matrix
``L[j, i] = log p(t_j | s_i)`` is an unbiased importance-sampling estimate of the
density (biased only through the logarithm, by ``-Var/2`` to first order), combined from
two proposals by the balance heuristic (Veach & Guibas 1995):

1. **Gauss-Newton posterior proposal** ``q_j``, one per query.  The path that produced
   ``t_j`` (the anchor) is an exact draw from ``p(path | t_j, s_j)``.  Starting there,
   ``n_gn`` Gauss-Newton steps on ``-log p(path, t_j | s_j)`` (links linearised,
   ``m_k(t) ~ m_k(a) + J_k (t - a)``) give a mode and the Gauss-Newton precision ``H``
   (block tridiagonal, dense here); ``q_j = N(mode, H^{-1})``.  ``n_is`` draws from it
   serve *every* source ``i``: only ``p(t_1 | s_i)`` depends on ``i``, so one layer-1
   kernel row per draw is all a source costs.  For linear-Gaussian chains ``q_j`` is the
   exact posterior of source ``j`` and its diagonal estimate has zero variance.
2. **Forward paths**: ``n_fwd`` fresh paths per source (independent of every query),
   which cover sources whose posterior lies far from ``q_j``.

For source ``i`` and a draw ``z`` from either proposal, the weight is
``p_i(z) p(t_j | z) / (M q_j(z) + K p_i(z))`` with ``p_i(z) = p(t_1 | s_i) prod_k
p(t_k | t_{k-1})``, ``M = n_is``, ``K = n_fwd``.  ``q_j`` at forward paths is evaluated
for the ``top_r`` paths with the largest ``p(t_j | z)`` per query and taken as 0 for the
rest (their contribution to the sum is negligible where ``q_j`` is not).

Convergence is read off by recomputing every entry with the first half of both sample
sets: the estimator's bias falls like ``1 / (number of draws)``, so the half-versus-full
difference estimates the remaining bias of the full estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import distributions as td

from stochmi.core.kernel import as_gaussian_mixture

__all__ = ["DeepLogDensity", "NotGaussianLink", "deep_log_density", "normal_params"]

_LOG2PI = math.log(2 * math.pi)
_FULL_Q_DIM = 64  # path dimension up to which q_j is evaluated at every forward path


class NotGaussianLink(TypeError):
    """A link's conditional is not a single Gaussian (no Gauss-Newton proposal)."""


def normal_params(dist: td.Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)``, each ``(B, d)``, of a Normal / Independent(Normal) conditional.

    Raises
    ------
    NotGaussianLink
        For any other family (mixtures included).
    """
    gm = as_gaussian_mixture(dist)
    if gm is None or gm.n_components != 1:
        raise NotGaussianLink(f"{type(dist).__name__} is not a single Gaussian")
    return gm.loc[:, 0], gm.scale[:, 0]


def _normal_params_grad(dist: td.Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """Like :func:`normal_params` but keeps the autograd graph (dtype unchanged)."""
    base = dist
    while isinstance(base, td.Independent):
        base = base.base_dist
    if not isinstance(base, td.Normal):
        raise NotGaussianLink(f"{type(dist).__name__} is not a single Gaussian")
    loc = base.loc.reshape(base.loc.shape[0], -1)
    scale = torch.broadcast_to(base.scale, base.loc.shape).reshape(loc.shape)
    return loc, scale


def _diag_gauss_kernel(t: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``log N(t_r; loc_c, diag scale_c^2)`` for all rows r and columns c: ``(R, C)``.

    Matrix-product form in float64, ``t`` and ``loc`` centred together first.
    """
    centre = loc.mean(0, keepdim=True)
    t = t - centre
    loc = loc - centre
    prec = scale.pow(-2)  # (C, d)
    quad = (t * t) @ prec.T - 2.0 * t @ (loc * prec).T + (loc * loc * prec).sum(1)[None, :]
    norm = torch.log(scale).sum(1)[None, :] + 0.5 * t.shape[1] * _LOG2PI
    return -0.5 * quad.clamp_min(0) - norm


def _row_gauss_logpdf(t: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    z = (t - loc) / scale
    return -0.5 * (z * z).sum(-1) - torch.log(scale).sum(-1) - 0.5 * t.shape[-1] * _LOG2PI


Link = Callable[[torch.Tensor], td.Distribution]


def _link_params(link: Link, parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return normal_params(link(parent))


def _link_jacobian(link: Link, parent: torch.Tensor):
    """Mean, scale and Jacobian ``d mean / d parent`` ``(B, d_out, d_in)`` of a link."""
    p = parent.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loc, scale = _normal_params_grad(link(p))
        if not loc.requires_grad:
            raise NotGaussianLink("the link's mean does not depend differentiably on its parent")
        d_out = loc.shape[1]
        eye = torch.eye(d_out, dtype=loc.dtype, device=loc.device)
        grads = eye[:, None, :].expand(d_out, loc.shape[0], d_out)
        try:
            (jac,) = torch.autograd.grad(loc, p, grad_outputs=grads, is_grads_batched=True)
        except RuntimeError:  # an op without a batching rule: one backward pass per output
            jac = torch.stack(
                [
                    torch.autograd.grad(loc[:, o].sum(), p, retain_graph=True)[0]
                    for o in range(d_out)
                ]
            )
    return (
        loc.detach().to(torch.float64),
        scale.detach().to(torch.float64),
        jac.permute(1, 0, 2).to(torch.float64),
    )


@dataclass
class DeepLogDensity:
    """Estimated ``L[j, i] = log p(t_j | s_i)`` and its convergence diagnostics.

    Attributes
    ----------
    L : Tensor, shape (N, N), float64
        With all draws.
    L_half : Tensor, shape (N, N), float64
        With the first half of the draws of both proposals.
    diag_ess : Tensor, shape (N,)
        Effective sample size of the Gauss-Newton draws for the query's own source.
    n_is, n_fwd : int
        Draws per query from ``q_j`` and forward paths per source.
    """

    L: torch.Tensor
    L_half: torch.Tensor
    diag_ess: torch.Tensor
    n_is: int
    n_fwd: int


class _Problem:
    """Shared state: first-layer conditional over sources, links, queries."""

    def __init__(self, first_loc, first_scale, links, queries, gen, dtype):
        self.loc1 = first_loc.to(torch.float64)
        self.scale1 = torch.broadcast_to(first_scale.to(torch.float64), self.loc1.shape)
        self.links = links
        self.t = queries.to(torch.float64)
        self.gen = gen
        self.dtype = dtype  # the model's dtype, for calling links
        self.n = self.loc1.shape[0]

    def call(self, k: int, parent: torch.Tensor):
        return _link_params(self.links[k], parent.to(self.dtype))

    def randn(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.gen, dtype=torch.float64, device=self.loc1.device)

    # -- forward pool -------------------------------------------------------------------
    def forward_pool(self, k_paths: int):
        """``k_paths`` paths per source; row ``k * N + i`` is path ``k`` of source ``i``."""
        n = self.n
        src = torch.arange(n, device=self.loc1.device).repeat(k_paths)
        loc, scale = self.loc1[src], self.scale1[src]
        t = loc + scale * self.randn(loc.shape)
        path = [t]
        first = _row_gauss_logpdf(t, loc, scale)
        chain = torch.zeros_like(first)
        for k in range(len(self.links) - 1):
            loc, scale = self.call(k, path[-1])
            t = loc + scale * self.randn(loc.shape)
            chain = chain + _row_gauss_logpdf(t, loc, scale)
            path.append(t)
        fin_loc, fin_scale = self.call(len(self.links) - 1, path[-1])
        return torch.cat(path, 1), first, chain, fin_loc, fin_scale

    # -- Gauss-Newton proposal ----------------------------------------------------------
    def _objective_parts(self, z: list[torch.Tensor], rows: torch.Tensor):
        """Residuals, Jacobians wrt parents, and the negative log joint per query."""
        r0 = (z[0] - self.loc1[rows]) / self.scale1[rows]
        res, jacs, scales = [r0], [], []
        for k in range(len(self.links)):
            tgt = z[k + 1] if k + 1 < len(z) else self.t[rows]
            loc, scale, jac = _link_jacobian(self.links[k], z[k].to(self.dtype))
            res.append((tgt - loc) / scale)
            jacs.append(-jac / scale[:, :, None])
            scales.append(scale)
        obj = sum(0.5 * (r * r).sum(1) for r in res)
        return res, jacs, scales, obj

    def _hessian(self, z, rows):
        res, jacs, scales, obj = self._objective_parts(z, rows)
        dims = [t.shape[1] for t in z]
        off = [0]
        for d in dims:
            off.append(off[-1] + d)
        b, dd = z[0].shape[0], off[-1]
        h = torch.zeros(b, dd, dd, dtype=torch.float64, device=z[0].device)
        g = torch.zeros(b, dd, dtype=torch.float64, device=z[0].device)
        s0 = self.scale1[rows]
        h[:, off[0] : off[1], off[0] : off[1]] += torch.diag_embed(s0.pow(-2))
        g[:, off[0] : off[1]] += res[0] / s0
        for k, jp in enumerate(jacs):
            a0, a1 = off[k], off[k + 1]
            r = res[k + 1]
            jt = jp.transpose(1, 2)
            h[:, a0:a1, a0:a1] += jt @ jp
            g[:, a0:a1] += (jt @ r[:, :, None])[:, :, 0]
            if k + 1 < len(z):  # the child t_{k+1} is a free variable too
                b0, b1 = off[k + 1], off[k + 2]
                inv = 1.0 / scales[k]
                h[:, b0:b1, b0:b1] += torch.diag_embed(inv * inv)
                h[:, a0:a1, b0:b1] += jt * inv[:, None, :]
                h[:, b0:b1, a0:a1] += jp * inv[:, :, None]
                g[:, b0:b1] += r * inv
        return h, g, obj, off

    def gauss_newton(self, anchors: list[torch.Tensor], rows: torch.Tensor, n_steps: int):
        z = [a.to(torch.float64) for a in anchors]
        h, g, obj, off = self._hessian(z, rows)
        for _ in range(n_steps):
            step = torch.linalg.solve(h + 1e-9 * torch.eye(h.shape[1], dtype=h.dtype), g)
            flat = torch.cat(z, 1) - step
            z_new = [flat[:, off[i] : off[i + 1]] for i in range(len(z))]
            h_new, g_new, obj_new, _ = self._hessian(z_new, rows)
            ok = obj_new <= obj  # keep the old point where the step did not improve
            z = [torch.where(ok[:, None], zn, zo) for zn, zo in zip(z_new, z)]
            h = torch.where(ok[:, None, None], h_new, h)
            g = torch.where(ok[:, None], g_new, g)
            obj = torch.where(ok, obj_new, obj)
        chol, info = torch.linalg.cholesky_ex(h)
        if bool((info != 0).any()):
            jitter = 1e-6 * torch.diagonal(h, dim1=1, dim2=2).mean(1)
            chol = torch.linalg.cholesky(h + jitter[:, None, None] * torch.eye(h.shape[1]))
        return torch.cat(z, 1), chol, off

    # -- log densities of paths ----------------------------------------------------------
    def path_rest(self, flat: torch.Tensor, off, rows: torch.Tensor):
        """``sum_{k>=2} log p(t_k | t_{k-1})`` within the path and ``log p(t_j | t_{L-1})``."""
        parts = [flat[:, off[i] : off[i + 1]] for i in range(len(off) - 1)]
        rest = torch.zeros(flat.shape[0], dtype=torch.float64, device=flat.device)
        for k in range(len(self.links) - 1):
            loc, scale = self.call(k, parts[k])
            rest = rest + _row_gauss_logpdf(parts[k + 1], loc, scale)
        loc, scale = self.call(len(self.links) - 1, parts[-1])
        return rest, _row_gauss_logpdf(self.t[rows], loc, scale)

    def layer1(self, t1: torch.Tensor) -> torch.Tensor:
        """``log p(t1_r | s_i)`` for all rows and sources: ``(R, N)``."""
        return _diag_gauss_kernel(t1, self.loc1, self.scale1)


def _log_q(flat: torch.Tensor, mode: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """``log N(flat; mode, H^{-1})`` with ``H = chol chol^T``; flat (B, R, D) -> (B, R)."""
    u = (flat - mode[:, None, :]) @ chol  # rows of (z - m)^T L
    d = flat.shape[-1]
    logdet = torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
    return -0.5 * (u * u).sum(-1) + logdet[:, None] - 0.5 * d * _LOG2PI


def deep_log_density(
    first_loc: torch.Tensor,
    first_scale: torch.Tensor,
    links: list[Link],
    queries: torch.Tensor,
    anchors: list[torch.Tensor],
    *,
    n_is: int = 32,
    n_fwd: int = 16,
    generator: torch.Generator,
    n_gn: int = 2,
    top_r: int = 64,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress=None,
) -> DeepLogDensity:
    """Estimate ``L[j, i] = log p(t_j | s_i)`` through ``len(links)`` Gaussian links.

    Parameters
    ----------
    first_loc, first_scale : Tensor, shape (N, d_1)
        ``p(t_1 | s_i) = N(first_loc[i], diag first_scale[i]^2)``.
    links : list of callables
        ``links[k](parent)``, parent ``(B, d_{k+1})``, returns the Gaussian conditional of
        the next layer with batch ``(B,)`` and event ``(d_{k+2},)``; the last link's
        output is the query layer.  Its mean must be differentiable in the parent.
    queries : Tensor, shape (N, d_L)
        ``t_j``, drawn through the chain from source ``j``.
    anchors : list of Tensor, shapes (N, d_1) ... (N, d_{L-1})
        The intermediate layers of the path that produced each query.
    n_is : int
        Draws per query from the Gauss-Newton proposal (even, >= 2).
    n_fwd : int
        Forward paths per source (even, >= 2).
    generator : torch.Generator
    n_gn : int
        Gauss-Newton steps from the anchor.
    top_r : int
        Forward paths per query at which the proposal density is evaluated.
    chunk_size : int, optional
        Queries per block (memory ``O(chunk * (n_is + n_fwd) * N)``).
    dtype : torch.dtype
        Dtype the links are called with (the model's).
    progress : callable, optional
        Called with the number of queries finished after each block.

    Returns
    -------
    DeepLogDensity
    """
    if len(links) < 1 or len(anchors) != len(links):
        raise ValueError("need one anchor layer per link")
    for name, v in (("n_is", n_is), ("n_fwd", n_fwd)):
        if v < 2 or v % 2:
            raise ValueError(f"{name} must be an even int >= 2, got {v}")
    pb = _Problem(first_loc, first_scale, links, queries, generator, dtype)
    n = pb.n
    pool, first, chain, fin_loc, fin_scale = pb.forward_pool(n_fwd)
    pool_own = (first + chain).reshape(n_fwd, n)  # log p_i(z) for the paths of source i
    d1 = first_loc.shape[1]
    if chunk_size is None:
        chunk_size = max(1, min(n, int(2e7 // max(1, (n_is + n_fwd) * n))))
    out = torch.empty(n, n, dtype=torch.float64)
    half = torch.empty(n, n, dtype=torch.float64)
    ess = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(n, start + chunk_size), device=pb.loc1.device)
        full_b, half_b, ess_b = _block(
            pb,
            rows,
            anchors,
            (pool, d1, chain, pool_own, fin_loc, fin_scale),
            n_is,
            n_fwd,
            n_gn,
            top_r,
        )
        out[rows] = full_b
        half[rows] = half_b
        ess[rows] = ess_b
        if progress is not None:
            progress(len(rows))
    return DeepLogDensity(out, half, ess, n_is, n_fwd)


def _block(pb, rows, anchors, pool_state, n_is, n_fwd, n_gn, top_r):
    pool, d1, chain, pool_own, fin_loc, fin_scale = pool_state
    n, b = pb.n, len(rows)
    mode, chol, off = pb.gauss_newton([a[rows] for a in anchors], rows, n_gn)
    d = mode.shape[1]
    # draws from q_j: z = mode + L^{-T} eps
    eps = pb.randn((b, d, n_is))
    dz = torch.linalg.solve_triangular(chol.transpose(1, 2), eps, upper=True)
    draws = (mode[:, :, None] + dz).transpose(1, 2)  # (B, M, D)
    logq_is = (
        -0.5 * (eps * eps).sum(1)
        + torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)[:, None]
        - 0.5 * d * _LOG2PI
    )  # (B, M)
    flat = draws.reshape(b * n_is, d)
    rows_rep = rows.repeat_interleave(n_is)
    rest, log_g = pb.path_rest(flat, off, rows_rep)
    rest, log_g = rest.reshape(b, n_is), log_g.reshape(b, n_is)
    k1 = pb.layer1(flat[:, : off[1]]).reshape(b, n_is, n)  # log p(t_1 | s_i)
    lp = k1 + rest[:, :, None]  # log p_i(z)
    # forward paths: log p(t_j | z) for every pool path
    log_g_pool = _diag_gauss_kernel(pb.t[rows], fin_loc, fin_scale)  # (B, K*N)
    # q_j is evaluated where source j's unnormalised posterior p_j(z) p(t_j | z) is largest
    score = (
        log_g_pool
        + chain[None, :]
        + _diag_gauss_kernel(pool[:, :d1], pb.loc1[rows], pb.scale1[rows]).T
    )
    if d <= _FULL_Q_DIM:  # small paths: q_j at every forward path
        logq_pool = torch.cat(
            [
                _log_q(pool[None, c : c + 4096].expand(b, -1, -1), mode, chol)
                for c in range(0, pool.shape[0], 4096)
            ],
            1,
        )
    else:
        logq_pool = torch.full_like(log_g_pool, -math.inf)
        r = min(top_r, log_g_pool.shape[1])
        top = torch.topk(score, r, dim=1).indices  # (B, r)
        logq_pool.scatter_(1, top, _log_q(pool[top], mode, chol))
    res = []
    for m_used, k_used in ((n_is, n_fwd), (n_is // 2, n_fwd // 2)):
        lm, lk = math.log(m_used), math.log(k_used)
        num = lp[:, :m_used] + log_g[:, :m_used, None]
        den = torch.logaddexp(lm + logq_is[:, :m_used, None], lk + lp[:, :m_used])
        is_term = torch.logsumexp(num - den, 1)  # (B, N)
        g_pool = log_g_pool.reshape(b, n_fwd, n)[:, :k_used]
        q_pool = logq_pool.reshape(b, n_fwd, n)[:, :k_used]
        own = pool_own[:k_used][None]
        den_f = torch.logaddexp(lm + q_pool, lk + own)
        fwd_term = torch.logsumexp(own + g_pool - den_f, 1)
        res.append(torch.logaddexp(is_term, fwd_term))
        if m_used == n_is:
            w = (num - den)[torch.arange(b), :, rows]  # own source, (B, M)
            ess = torch.exp(2 * torch.logsumexp(w, 1) - torch.logsumexp(2 * w, 1))
    return res[0], res[1], ess
