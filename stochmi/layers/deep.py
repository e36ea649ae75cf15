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

1. **Guided proposal** ``q_j``, one per query.  The path that produced ``t_j`` (the
   anchor ``a``) is an exact draw from ``p(path | t_j, s_j)``.  Layers ``1 .. L-2`` are
   drawn forward from the query's own source; the last intermediate layer ``t_{L-1}``
   from the Gaussian that combines its conditional given the drawn parent with the last
   link linearised at the anchor (Gauss-Newton: ``m_L(t) ~ m_L(a) + J (t - a)``), i.e. the
   locally optimal proposal of sequential Monte Carlo with a linearised observation.
   ``n_is`` draws from it serve *every* source ``i``: only ``p(t_1 | s_i)`` depends on
   ``i``, so one layer-1 kernel row per draw is all a source costs.  For a linear-Gaussian
   chain with one intermediate layer ``q_j`` is the exact posterior of source ``j``.
2. **Forward paths**: ``n_fwd`` fresh paths per source (independent of every query),
   which cover sources whose posterior lies far from ``q_j`` (and layers that carry
   little information about the query).

For source ``i`` and a draw ``z`` from either proposal, the weight is
``p_i(z) p(t_j | z) / (M q_j(z) + K p_i(z))`` with ``p_i(z) = p(t_1 | s_i) prod_k
p(t_k | t_{k-1})``, ``M = n_is``, ``K = n_fwd``: every entry is an unbiased estimate of
``p(t_j | s_i)``.  ``q_j`` at forward paths is evaluated at all of them when the last
intermediate layer is narrow (``<= 32`` units) and otherwise at the ``top_r`` paths with
the largest ``p_j(z) p(t_j | z)`` per query (``-inf`` elsewhere, which slightly
overweights forward paths that ``q_j`` would also have covered).

Bias direction: each density is unbiased, so ``log`` of it is biased low by about
``Var / (2 mean^2)``; the MI estimate ``mean_j (L[j,j] - logmeanexp_i L[j,i])`` takes
the difference of two such logs, so its bias can have either sign.  It shrinks like
``1 / (n_is, n_fwd)``.  Measured against closed forms and grids (``benchmarks/
bench_deep.py``) it stays within 3% of the truth at the default effort.

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
_DIAG_FACTOR = 8  # draws for the query's own source, as a multiple of n_is
_FULL_Q_DIM = 32  # last-layer width up to which q_j is evaluated at every forward path


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

    def layer1(self, t1: torch.Tensor) -> torch.Tensor:
        """``log p(t1_r | s_i)`` for all rows and sources: ``(R, N)``."""
        return _diag_gauss_kernel(t1, self.loc1, self.scale1)


def _cholesky32(h: torch.Tensor) -> torch.Tensor:
    """Batched float32 Cholesky factor, with diagonal jitter where a factor fails."""
    h32 = h.to(torch.float32)
    chol, info = torch.linalg.cholesky_ex(h32)
    if bool((info != 0).any()):
        eye = torch.eye(h32.shape[1], dtype=h32.dtype, device=h32.device)
        jitter = 1e-5 * torch.diagonal(h32, dim1=1, dim2=2).mean(1)
        chol = torch.linalg.cholesky(h32 + jitter[:, None, None] * eye)
    return chol


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
        Effective sample size of the proposal draws for the query's own source.
    marg_ess : Tensor, shape (N,)
        Effective number of terms (draws x sources) behind ``sum_i p(t_j | s_i)``: near 1
        when the marginal density rests on a single draw, i.e. is unreliable.
    n_is, n_fwd : int
        Draws per query from ``q_j`` and forward paths per source.
    """

    L: torch.Tensor
    L_half: torch.Tensor
    diag_ess: torch.Tensor
    marg_ess: torch.Tensor
    n_is: int
    n_fwd: int


class _Pool:
    """Forward paths, ``k`` per source; row ``k * N + i`` is path ``k`` of source ``i``.

    ``layers[m]`` are the values of intermediate layer ``m`` (``(K*N, d)``), ``first``
    is ``log p(t_1 | s_own)``, ``chain`` the sum of the link log densities inside the
    path (layers 2 .. L-1), ``chain_before_last`` the same without the last intermediate
    layer, ``prior_loc/prior_scale`` the conditional of the last intermediate layer given
    its parent, ``fin_loc/fin_scale`` the conditional of the query layer.
    """

    def __init__(self, pb: _Problem, k_paths: int):
        n = pb.n
        src = torch.arange(n, device=pb.loc1.device).repeat(k_paths)
        loc, scale = pb.loc1[src], pb.scale1[src]
        t = loc + scale * pb.randn(loc.shape)
        self.layers = [t]
        self.first = _row_gauss_logpdf(t, loc, scale)
        self.chain = torch.zeros_like(self.first)
        self.chain_before_last = self.chain
        self.prior_loc, self.prior_scale = loc, scale
        for k in range(len(pb.links) - 1):
            loc, scale = pb.call(k, self.layers[-1])
            t = loc + scale * pb.randn(loc.shape)
            self.chain_before_last = self.chain
            self.chain = self.chain + _row_gauss_logpdf(t, loc, scale)
            self.prior_loc, self.prior_scale = loc, scale
            self.layers.append(t)
        self.fin_loc, self.fin_scale = pb.call(len(pb.links) - 1, self.layers[-1])
        self.own = (self.first + self.chain).reshape(k_paths, n)  # log p_i(z), own source
        # log density of the layers before t_{L-1} (none when t_{L-1} = t_1)
        self.prefix = (
            self.first + self.chain_before_last
            if len(pb.links) >= 2
            else torch.zeros_like(self.first)
        )


class _Guided:
    """Proposal ``q_j`` for a block of queries.

    Layers ``1 .. L-2`` are drawn forward from the query's own source ``s_j``; the last
    intermediate layer ``t_{L-1}`` from the Gaussian that combines its conditional
    ``N(m(t_{L-2}), diag s^2)`` with the last link linearised at the anchor ``a``:
    ``t_j ~ N(f(a) + J (t - a), diag sigma^2)``.  Precision
    ``P = diag(1 / s_a^2) + J^T diag(1 / sigma^2) J`` (``s_a``: the conditional's scale
    at the anchor's parent), mean ``P^{-1} (m(t_{L-2}) / s_a^2 + J^T (t_j - f(a) + J a)
    / sigma^2)``.  For linear-Gaussian chains with ``L = 2`` this is the exact posterior.
    """

    def __init__(self, pb: _Problem, rows: torch.Tensor, anchors: list[torch.Tensor]):
        self.pb, self.rows = pb, rows
        a_last = anchors[-1][rows].to(torch.float64)
        if len(anchors) >= 2:
            _, s_a = pb.call(len(pb.links) - 2, anchors[-2][rows].to(torch.float64))
        else:
            s_a = pb.scale1[rows]
        f_a, sig, jac = _link_jacobian(pb.links[-1], a_last.to(pb.dtype))
        # linear-Gaussian update in observation space (Kalman form): only a d_L x d_L
        # factorisation per query.  y = t_j - f(a) + J a ~ N(J t, diag sigma^2).
        self.s2, self.sig2, self.jac = s_a.pow(2), sig.pow(2), jac
        self.y = pb.t[rows] - f_a + (jac @ a_last[:, :, None])[:, :, 0]
        js = jac * self.s2[:, None, :]  # J S, (B, d_L, d)
        c = torch.diag_embed(self.sig2) + js @ jac.transpose(1, 2)  # Sigma + J S J^T
        chol_c = _cholesky32(c).to(torch.float64)
        self.gain_t = torch.cholesky_solve(js, chol_c)  # K^T = C^{-1} J S, (B, d_L, d)
        # log |Cov| = sum log s^2 + sum log sigma^2 - log |C|
        logdet_c = 2 * torch.log(torch.diagonal(chol_c, dim1=1, dim2=2)).sum(1)
        self.logdet_cov = torch.log(self.s2).sum(1) + torch.log(self.sig2).sum(1) - logdet_c
        self.d = a_last.shape[1]

    def mean(self, prior_loc: torch.Tensor) -> torch.Tensor:
        """Proposal mean ``m + K (y - J m)`` for parent-conditional means ``m`` ``(B, R, d)``."""
        innov = self.y[:, None, :] - prior_loc @ self.jac.transpose(1, 2)
        return prior_loc + innov @ self.gain_t

    def _logpdf(self, t: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """``log N(t; mean, Cov)`` with ``Cov^{-1} = S^{-1} + J^T Sigma^{-1} J``."""
        r = t - mean
        quad = (r * r / self.s2[:, None, :]).sum(-1)
        jr = r @ self.jac.transpose(1, 2)
        quad = quad + (jr * jr / self.sig2[:, None, :]).sum(-1)
        return -0.5 * quad - 0.5 * self.logdet_cov[:, None] - 0.5 * self.d * _LOG2PI

    def log_last(self, t: torch.Tensor, prior_loc: torch.Tensor) -> torch.Tensor:
        """``log q(t_{L-1} | t_{L-2})`` for values ``t`` ``(B, R, d)``."""
        return self._logpdf(t, self.mean(prior_loc))

    def log_last_shared(self, t: torch.Tensor, prior_loc: torch.Tensor | None):
        """As :meth:`log_last` for values ``t`` ``(R, d)`` shared by every query, with
        parent means ``prior_loc`` ``(R, d)`` (or ``None``: the query's own source)."""
        b = len(self.rows)
        if prior_loc is None:
            own = self.pb.loc1[self.rows][:, None, :]
            return self._logpdf(t[None].expand(b, -1, -1), self.mean(own))
        return self.log_last(t[None].expand(b, -1, -1), prior_loc[None].expand(b, -1, -1))

    def draw(self, prior_loc: torch.Tensor) -> torch.Tensor:
        """Exact draws (Matheron's rule): a prior draw corrected by the gain."""
        t = prior_loc + self.s2.sqrt()[:, None, :] * self.pb.randn(prior_loc.shape)
        e = self.sig2.sqrt()[:, None, :] * self.pb.randn((*prior_loc.shape[:2], self.y.shape[1]))
        innov = self.y[:, None, :] - t @ self.jac.transpose(1, 2) - e
        return t + innov @ self.gain_t

    def sample(self, m: int):
        """``m`` paths per query: flat ``(B, M, D)``, ``log q``, chain sum, ``t_1``."""
        pb, rows = self.pb, self.rows
        b = len(rows)
        src = rows.repeat_interleave(m)
        loc, scale = pb.loc1[src], pb.scale1[src]
        parts, logq = [], torch.zeros(b * m, dtype=torch.float64, device=loc.device)
        chain = torch.zeros_like(logq)
        if len(pb.links) >= 2:
            t = loc + scale * pb.randn(loc.shape)
            logq = logq + _row_gauss_logpdf(t, loc, scale)
            parts.append(t)
            for k in range(len(pb.links) - 2):
                loc, scale = pb.call(k, parts[-1])
                t = loc + scale * pb.randn(loc.shape)
                lp = _row_gauss_logpdf(t, loc, scale)
                logq, chain = logq + lp, chain + lp
                parts.append(t)
            loc, scale = pb.call(len(pb.links) - 2, parts[-1])
        t_last = self.draw(loc.reshape(b, m, -1))
        self.last_q = self.log_last(t_last, loc.reshape(b, m, -1))  # (B, M)
        logq = logq.reshape(b, m) + self.last_q
        chain = chain.reshape(b, m)
        self.last_link = torch.zeros_like(chain)
        if len(pb.links) >= 2:  # the link into t_{L-1} is part of the path density
            self.last_link = _row_gauss_logpdf(
                t_last, loc.reshape(b, m, -1), scale.reshape(b, m, -1)
            )
            chain = chain + self.last_link
        parts.append(t_last.reshape(b * m, -1))
        first = parts[0].reshape(b, m, -1)
        return parts, logq, chain, first


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
    top_r: int = 64,
    n_bridge: int = 0,
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
        Draws per query from the proposal ``q_j`` (even, >= 2).
    n_fwd : int
        Forward paths per source (even, >= 2).
    generator : torch.Generator
    top_r : int
        Forward paths per query at which ``q_j`` is evaluated when the path is longer
        than 64 dimensions (all of them otherwise).
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
    if n_bridge < 0 or n_bridge % 2 or n_bridge > n_fwd:
        raise ValueError(f"n_bridge must be an even int in [0, n_fwd], got {n_bridge}")
    pb = _Problem(first_loc, first_scale, links, queries, generator, dtype)
    n = pb.n
    pool = _Pool(pb, n_fwd)
    if chunk_size is None:  # ~2e7 float64 elements per block for each large tensor
        widest = max(t.shape[1] for t in anchors)
        per_row = max(
            (n_is + n_fwd) * n,  # kernel rows of the proposal draws and forward paths
            queries.shape[1] * anchors[-1].shape[1],  # Jacobian of the last link
            _DIAG_FACTOR * n_is * widest,  # the draws themselves
            top_r * anchors[-1].shape[1],
            n_bridge * n * max(anchors[-1].shape[1], queries.shape[1]) // 4,
        )
        chunk_size = max(1, min(n, int(2e7 // per_row)))
    out = torch.empty(n, n, dtype=torch.float64)
    half = torch.empty(n, n, dtype=torch.float64)
    ess = torch.empty(n, dtype=torch.float64)
    marg = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(n, start + chunk_size), device=pb.loc1.device)
        out[rows], half[rows], ess[rows], marg[rows] = _block(
            pb, rows, anchors, pool, n_is, n_fwd, top_r, n_bridge
        )
        if progress is not None:
            progress(len(rows))
    return DeepLogDensity(out, half, ess, marg, n_is, n_fwd)


def _pool_logq(pb, q: _Guided, pool: _Pool, rows, top_r):
    """``log q_j`` at forward paths ``(B, K*N)``: exact at the ``top_r`` paths where
    source ``j``'s unnormalised posterior is largest (all paths for short paths), else
    ``-inf``; also ``log p(t_j | z)`` at every forward path and the first layers' part
    of ``log q_j``, ``log p_j(t_1 .. t_{L-2})`` (``(B, K*N)``)."""
    b = len(rows)
    log_g = _diag_gauss_kernel(pb.t[rows], pool.fin_loc, pool.fin_scale)  # (B, K*N)
    first_j = _diag_gauss_kernel(pool.layers[0], pb.loc1[rows], pb.scale1[rows]).T
    fwd_part = pool.chain_before_last[None, :] + (first_j if len(pb.links) >= 2 else 0.0)
    fwd_part = fwd_part.expand(b, -1)
    t_last = pool.layers[-1]
    logq = torch.full_like(log_g, -math.inf)
    if t_last.shape[1] <= _FULL_Q_DIM:  # narrow last layer: q_j at every forward path
        step = max(1, int(4e6 // max(1, b * t_last.shape[1])))
        prior_all = pool.prior_loc if len(pb.links) >= 2 else None
        for c in range(0, t_last.shape[0], step):
            sl = slice(c, c + step)
            prior = prior_all[sl] if prior_all is not None else None
            logq[:, sl] = fwd_part[:, sl] + q.log_last_shared(t_last[sl], prior)
        return logq, log_g, fwd_part
    score = log_g + pool.chain[None, :] + first_j
    idx = torch.topk(score, min(top_r, score.shape[1]), dim=1).indices
    if len(pb.links) >= 2:
        prior = pool.prior_loc[idx]
    else:  # t_{L-1} = t_1: its prior is the query's own source
        prior = pb.loc1[rows][:, None, :].expand(b, idx.shape[1], -1)
    last = q.log_last(t_last[idx], prior)
    vals = torch.gather(fwd_part, 1, idx) + last
    logq.scatter_(1, idx, vals)
    return logq, log_g, fwd_part


def _cross_quad(q: _Guided, z, jz, mu, jmu) -> torch.Tensor:
    """``(z_m - mu_i)^T Cov_j^{-1} (z_m - mu_i)`` for all ``m, i``: ``(B, M, N)``.

    ``z`` ``(B, M, d)``, ``mu`` ``(B, N, d)`` and their images ``jz``, ``jmu`` under the
    query's Jacobian; expanded into matrix products (``Cov^{-1} = S^{-1} + J^T
    Sigma^{-1} J``), so no ``(B, M, N, d)`` tensor is formed.
    """
    out = 0.0
    for a, c, w in ((z, mu, 1 / q.s2), (jz, jmu, 1 / q.sig2)):
        w = w[:, None, :]
        out = out + (a * a * w).sum(-1)[:, :, None] + (c * c * w).sum(-1)[:, None, :]
        out = out - 2 * (a * w) @ c.transpose(1, 2)
    return out.clamp_min(0)


def _bridge(pb, q: _Guided, pool: _Pool, rows, n_br: int, fwd_part, first):
    """Bridged draws for every source, and the bridged proposal at the ``q_j`` draws.

    For source ``i`` the bridged proposal is ``r_ji(z) = p_i(t_1 .. t_{L-2})
    q_last(t_{L-1} | t_{L-2})``: the first ``n_br`` forward paths of source ``i`` with
    ``t_{L-1}`` redrawn from the query's linearised last-layer posterior given the
    path's own parent (with one intermediate layer, the parent is the source: ``r_ji``
    is then the linearised posterior of source ``i``, exact for a linear chain).  It
    reaches sources whose posterior given ``t_j`` lies far from ``q_j`` and beyond
    their own forward paths.  ``q_last`` has a covariance that does not depend on the
    parent, so a draw is ``mean(parent) + zeta_k``, ``zeta_k ~ N(0, Cov_j)`` shared by
    path ``k`` of every source (common random numbers; every entry stays unbiased).

    Returns
    -------
    list of Tensor, each (B, n_br, N)
        ``log p_i(z)``, ``log p(t_j | z)``, ``log q_j(z)``, ``log r_ji(z)`` at the
        bridged draws.
    Tensor, shape (B, M, N)
        ``log r_ji`` at the ``M`` draws of ``q_j`` (:meth:`_Guided.sample` called last).
    """
    b, n = len(rows), pb.n
    d = pool.layers[-1].shape[1]
    dev = pb.loc1.device
    zero = torch.zeros(b, n_br, d, dtype=torch.float64, device=dev)
    zeta = q.draw(zero) - q.mean(zero)  # (B, n_br, d) ~ N(0, Cov_j)
    norm = 0.5 * q.logdet_cov[:, None] + 0.5 * d * _LOG2PI
    log_r_last = (
        -0.5
        * _cross_quad(
            q, zeta, zeta @ q.jac.transpose(1, 2), zero[:, :1], zero[:, :1, : q.y.shape[1]]
        )[:, :, 0]
        - norm
    )  # (B, n_br)
    out = [torch.empty(b, n_br, n, dtype=torch.float64, device=dev) for _ in range(4)]
    tq = pb.t[rows][:, None, :]
    one_layer = len(pb.links) == 1
    if one_layer:  # the parent of t_1 is the source: one mean per source, shared by k
        mu = q.mean(pb.loc1[None].expand(b, -1, -1))  # (B, N, d)
        jmu = mu @ q.jac.transpose(1, 2)
        mu_j, jmu_j = mu[torch.arange(b), rows][:, None], jmu[torch.arange(b), rows][:, None]
        jzeta = zeta @ q.jac.transpose(1, 2)
        # log q_j at mu_i + zeta_k: the Gaussian around the query's own source
        q_at = -0.5 * _cross_quad(q, zeta, jzeta, mu_j - mu, jmu_j - jmu) - norm[:, :, None]
        z_q = first  # (B, M, d): t_1 of the q_j draws
        r_at_q = -0.5 * _cross_quad(q, z_q, z_q @ q.jac.transpose(1, 2), mu, jmu)
        r_at_q = r_at_q - norm[:, :, None]
    else:  # r_ji at q_j draws: source i's first layers, q_j's own last-layer factor
        r_at_q = None
    step = max(1, int(4e6 // max(1, b * max(d, pb.t.shape[1]))))
    for k in range(n_br):
        for c in range(0, n, step):
            cols = slice(c, min(n, c + step))
            sl = slice(k * n + cols.start, k * n + cols.stop)
            prior_loc = pool.prior_loc[sl]
            if one_layer:
                z = mu[:, cols] + zeta[:, k : k + 1]
            else:
                z = q.mean(prior_loc[None].expand(b, -1, -1)) + zeta[:, k : k + 1]
            link = _row_gauss_logpdf(z, prior_loc[None], pool.prior_scale[sl][None])
            pre = pool.prefix[sl][None]
            out[0][:, k, cols] = pre + link  # log p_i(z)
            loc, scale = pb.call(len(pb.links) - 1, z.reshape(-1, d))
            shape = (b, z.shape[1], -1)
            out[1][:, k, cols] = _row_gauss_logpdf(tq, loc.reshape(shape), scale.reshape(shape))
            if one_layer:
                out[2][:, k, cols] = q_at[:, k, cols]
            else:  # q_j shares the last-layer factor with r_ji
                out[2][:, k, cols] = fwd_part[:, sl] + log_r_last[:, k : k + 1]
            out[3][:, k, cols] = pre + log_r_last[:, k : k + 1]
    return out, r_at_q


def _draws(pb, q: _Guided, rows, m: int):
    """``m`` proposal draws per query: paths, ``log q``, ``log p(t_j | z)``, chain, ``t_1``."""
    b = len(rows)
    parts, logq, chain, first = q.sample(m)
    loc, scale = pb.call(len(pb.links) - 1, parts[-1])
    log_g = _row_gauss_logpdf(pb.t[rows].repeat_interleave(m, 0), loc, scale).reshape(b, m)
    return logq, log_g, chain, first


def _block(pb, rows, anchors, pool: _Pool, n_is, n_fwd, top_r, n_br=0):
    n, b = pb.n, len(rows)
    ar = torch.arange(b, device=rows.device)
    q = _Guided(pb, rows, anchors)
    logq_is, log_g, chain, first = _draws(pb, q, rows, n_is)
    k1 = pb.layer1(first.reshape(b * n_is, -1)).reshape(b, n_is, n)  # log p(t_1 | s_i)
    lp = k1 + chain[:, :, None]  # log p_i(z)
    if n_br:
        if len(pb.links) >= 2:  # r_ji at q_j draws: p_i(first layers) q_last(last)
            r_at_q = lp + (q.last_q - q.last_link)[:, :, None]
        logq_pool, log_g_pool, fwd_part = _pool_logq(pb, q, pool, rows, top_r)
        br, r_l2 = _bridge(pb, q, pool, rows, n_br, fwd_part, first)
        if r_l2 is not None:
            r_at_q = r_l2
    # the query's own source gets DIAG_FACTOR times the draws: they cost no kernel row
    logq_x, log_g_x, chain_x, first_x = _draws(pb, q, rows, (_DIAG_FACTOR - 1) * n_is)
    lp_own_x = _row_gauss_logpdf(first_x, pb.loc1[rows][:, None], pb.scale1[rows][:, None])
    lp_d = torch.cat([lp[ar, :, rows], lp_own_x + chain_x], 1)
    logq_d, log_g_d = torch.cat([logq_is, logq_x], 1), torch.cat([log_g, log_g_x], 1)
    if not n_br:
        logq_pool, log_g_pool, _ = _pool_logq(pb, q, pool, rows, top_r)
    res = []
    for frac in (1, 2):
        m_used, k_used, md = n_is // frac, n_fwd // frac, _DIAG_FACTOR * n_is // frac
        lm, lk = math.log(m_used), math.log(k_used)
        num = lp[:, :m_used] + log_g[:, :m_used, None]
        g_pool = log_g_pool.reshape(b, n_fwd, n)[:, :k_used]
        q_pool = logq_pool.reshape(b, n_fwd, n)[:, :k_used]
        own = pool.own[:k_used][None]
        if n_br:  # off the diagonal: balance of q_j (M draws) and r_ji (n_br per source)
            b_used = n_br // frac
            lb = math.log(b_used)
            den = torch.logaddexp(lm + logq_is[:, :m_used, None], lb + r_at_q[:, :m_used])
            lp_b, g_b, q_b, r_b = (t[:, :b_used] for t in br)  # (B, b_used, N)
            other = lp_b + g_b - torch.logaddexp(lm + q_b, lb + r_b)
        else:  # off the diagonal: balance of q_j and the forward paths
            den = torch.logaddexp(lm + logq_is[:, :m_used, None], lk + lp[:, :m_used])
            other = own + g_pool - torch.logaddexp(lm + q_pool, lk + own)
        is_term = torch.logsumexp(num - den, 1)  # (B, N)
        out = torch.logaddexp(is_term, torch.logsumexp(other, 1))
        # the diagonal with all of its draws
        w_d = lp_d[:, :md] + log_g_d[:, :md]
        w_d = w_d - torch.logaddexp(math.log(md) + logq_d[:, :md], lk + lp_d[:, :md])
        own_j = own[0][:, rows].T  # (B, k_used): paths of the query's own source
        den_fd = torch.logaddexp(math.log(md) + q_pool[ar, :, rows], lk + own_j)
        fwd_d = torch.logsumexp(own_j + g_pool[ar, :, rows] - den_fd, 1)
        out[ar, rows] = torch.logaddexp(torch.logsumexp(w_d, 1), fwd_d)
        res.append(out)
        if frac == 1:
            ess = torch.exp(2 * torch.logsumexp(w_d, 1) - torch.logsumexp(2 * w_d, 1))
            terms = torch.cat([(num - den).flatten(1), other.flatten(1), w_d], 1)
            marg = torch.exp(2 * torch.logsumexp(terms, 1) - torch.logsumexp(2 * terms, 1))
    return res[0], res[1], ess, marg
