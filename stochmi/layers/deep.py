"""``log p(t_b | s_i)`` across several stochastic layers, by importance sampling over paths.

For a chain ``S -> T_1 -> ... -> T_L`` whose links ``p(t_k | t_{k-1})`` are Gaussian
(``Normal(m_k(t_{k-1}), diag s_k(t_{k-1})^2)``), the density of the last layer given a
source has no closed form:

.. math:: p(t_L \\mid s_i) = \\int p(t_1 \\mid s_i) \\prod_{k=2}^{L} p(t_k \\mid t_{k-1})
          \\, dt_1 \\dots dt_{L-1}.

Nested Monte Carlo (``K`` forward paths per source, the query drawn from one of them)
is biased up by roughly ``exp(I(T_{L-1}; T_L | S)) / K``.  Here every entry of the matrix
``L[j, i] = log p(t_j | s_i)`` is an unbiased importance-sampling estimate of the
density (biased only through the logarithm, by ``-Var/2`` to first order), combined from
proposals by the balance heuristic (Veach & Guibas 1995):

1. **Guided proposal** ``q_j``, one per query.  The path that produced ``t_j`` (the
   anchor ``a``) is an exact draw from ``p(path | t_j, s_j)``.  Every link is
   linearised at the anchor (Gauss-Newton: ``m_k(t) ~ f_k + J_k (t - a_{k-1})``).
   Backwards from the query this gives the linearised likelihood of ``t_j`` given each
   intermediate layer, ``N(t_j - c_k; M_k t_k, R_k)`` with ``M_{L-1} = J_L``,
   ``R_{L-1} = diag s_L^2``, ``M_k = M_{k+1} J_{k+1}`` and ``R_k = R_{k+1} + M_{k+1}
   diag(s_{k+1}^2) M_{k+1}^T``.  Forwards from the query's own source, each layer is
   drawn from its true conditional mean given the drawn parent combined with that
   likelihood (Kalman form: one ``d_L x d_L`` factor per layer and query; Matheron
   draws).  For a linear-Gaussian chain of any depth ``q_j`` is the exact posterior of
   the path given ``t_j`` and ``s_j``.  ``n_is`` draws serve *every* source ``i``: only
   ``p(t_1 | s_i)`` depends on ``i``, so one layer-1 kernel row per draw is all a source
   costs.
2. **Forward paths**: ``n_fwd`` fresh paths per source (independent of every query),
   which cover sources whose posterior lies far from ``q_j``.  ``q_j`` at forward paths
   is evaluated at all of them when the paths are short (intermediate widths summing to
   at most 64) and otherwise at the query's own source's paths and the ``top_r`` paths
   with the largest ``p_j(z) p(t_j | z)`` (``-inf`` elsewhere, which slightly
   overweights forward paths that ``q_j`` would also have covered).
3. **Bridged proposal** ``r_ji`` (``n_bridge`` draws per source, off by default;
   :func:`stochmi.layer_mi` turns it on from its second round when the first did not
   converge): the construction of ``q_j`` linearised at a fresh forward path of
   *source* ``i`` (not at the query's anchor) and started from ``s_i``, i.e. the
   linearised posterior of source ``i``'s path given ``t_j``.  Its covariances and
   gains depend on ``i`` only and ``t_j`` enters its means linearly, so one set of
   factors serves every query, and ``log r_ji`` at any path is a quadratic in ``t_j``
   (cheap at the forward paths and at ``q_j``'s draws).  When the sources are far apart
   at layer 1 and the layers above carry much information about it (wide,
   noisy-then-precise layers; networks early in training, whose posterior of ``t_1``
   stays near source ``i``'s own region, where the links' Jacobians differ from those
   at the query's path), neither ``q_j`` nor forward paths reach the other sources'
   posteriors and ``p(t_j | s_i)`` is underestimated; ``r_ji`` reaches them.  With it,
   the off-diagonal entries balance ``r_ji``, the forward paths and the first
   ``_BRIDGE_Q`` (4) draws of ``q_j``, which cover sources whose posterior is pinned
   near the query's path (trained networks with precise layers, where ``r_ji`` alone
   is heavy-tailed).  It costs ``O(n_bridge N^2)`` link evaluations and three or five
   ``(N, d_L, d_k)`` factors per intermediate layer, built a chunk of sources at a
   time (:func:`bridge_bytes` estimates the whole call's memory).
4. **Shifted proposal** ``s_ji`` (``_PAIR_DRAWS`` (8) draws per pair, in rounds without
   bridged draws, for each query's ``_PAIR_SOURCES`` (8) *pair sources*: those of
   largest linearised evidence ``N(t_j; M mu_i + c, C)`` under ``q_j``'s linearisation
   among the ``_PAIR_CANDIDATES`` (128) sources under which the query's own first layer
   is most likely; scores of the data alone, not of any draw, and for a linear chain the
   evidence is ``log p(t_j | s_i)`` itself): ``q_j`` with its first step started from
   source ``i``'s mean instead of the query's own.  ``q_j``'s first step is a Kalman
   update of the source's mean; its later steps depend on the drawn parent only, so
   ``s_ji`` and ``q_j`` differ in the first step's mean alone and each is evaluated at
   the other's draws for the price of that step.  For a linear-Gaussian chain whose
   first layers share one scale ``s_ji`` is the exact posterior of source ``i``'s path
   given ``t_j``.  The pairs' entries balance ``q_j``, source ``i``'s forward paths and
   ``s_ji``.  On trained networks they hold most of the off-diagonal mass that ``q_j``
   and the forward paths miss (sources close to the query whose posterior still lies
   off ``q_j``'s), so rounds without bridged draws reach it, at about 1.5 times their
   cost without pairs.

**Subsampled sources** (large ``N``; :func:`_rank_sources`, :func:`_select_sources`): a
block of queries is evaluated at the union of every query's ``n_top`` most likely
sources (two rankings by cheap proxies, interleaved: the larger of the layer-1 density
of the query's path and the forward paths' nested Monte Carlo value, and the query
layer's density around each source's mean path, :class:`_MeanPathScore`), its pair
sources and a uniform random set of
``n_random`` sources that stands for all others with Horvitz-Thompson weight ``N /
n_random``; every other entry of ``L`` is ``-inf``. Each row's marginal ``sum_i p(t_j |
s_i)`` stays unbiased, and the cost per query no longer grows with ``N`` except for the
ranking, three matrix products against column features computed once. With ``strata``
(class labels), blocks are taken stratum by stratum and ``U`` is stratified: ``n_random
/ 2`` sources of the block's own stratum and ``n_random`` of the others, each at its
stratum's weight, so the class-conditional sums of ``I(T; Y)`` rest on far more random
sources at the cost of ``n_random / 2`` more per block.

For source ``i`` and a draw ``z`` from any proposal of an entry, the weight is ``p_i(z)
p(t_j | z) / (M q_j(z) + K p_i(z))`` (``+ n_bridge r_ji(z)`` off the diagonal with
bridging, ``M = 4`` there; ``+ _PAIR_DRAWS s_ji(z)`` at a pair source without it) with
``p_i(z) = p(t_1 | s_i) prod_k p(t_k | t_{k-1})``: every entry is an unbiased estimate
of ``p(t_j | s_i)``. Where the network is strongly nonlinear over the posterior's
spread, the linearisations are poor, the estimate does not settle and the caller flags
the row.

Bias direction: each density is unbiased, so ``log`` of it is biased low by about
``Var / (2 mean^2)``; the MI estimate ``mean_j (L[j,j] - logmeanexp_i L[j,i])`` takes
the difference of two such logs, so its bias can have either sign.  It shrinks like
``1 / (n_is, n_fwd)``.  Measured against closed forms and grids (``benchmarks/
bench_deep.py``) it stays within 3% of the truth at the default effort.

Convergence is read off by recomputing every entry with the first half of both sample
sets: the estimator's bias falls like ``1 / (number of draws)``, so the half-versus-full
difference estimates the remaining bias of the full estimate.  :func:`pooled` averages
two independent estimates at the same effort (each entry stays unbiased); the first is
then the half-sample estimate.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import distributions as td

from stochmi.core.kernel import as_gaussian_mixture
from stochmi.layers.heap import DURING, heap_for_temporaries

__all__ = [
    "DeepLogDensity",
    "NotGaussianLink",
    "OwnLogDensity",
    "bridge_bytes",
    "deep_log_density",
    "mean_path",
    "memory_budget",
    "normal_params",
    "own_log_density",
    "pooled",
    "row_gauss_logpdf",
]

_LOG2PI = math.log(2 * math.pi)
_U32 = 2.0**-24  # unit roundoff of float32
_F32_TOL = 1e-3  # nats: largest rounding-error bound of a float32 kernel row
_DIAG_FACTOR = 4  # draws for the query's own source, as a multiple of n_is
_FULL_Q_DIM = 64  # total path width up to which q_j is evaluated at every forward path
_BRIDGE_Q = 4  # with bridging, draws of q_j per query that also serve the other sources
_PAIR_SOURCES = 8  # without bridging, sources per query given shifted draws (s_ji)
_PAIR_DRAWS = 8  # shifted draws per such (query, source) pair
_PAIR_CANDIDATES = 128  # sources per query whose linearised evidence ranks the pair sources
_BLOCK = 16  # queries per block when the sources are subsampled (they share U)
_RANK_STEP = 256  # queries ranked together when the sources are subsampled
# (part of the estimator: the float32-or-float64 choice of the ranking table and of the
# layer-1 scores is made per step, so another step size moves numbers)
_SUBSAMPLE_FRACTION = 0.5  # subsample only when a block's sources are under this share of N
# elements of one (sources, d_L, sum d_k) factor built at a time: 32 MB temporaries, under
# the mmap threshold of heap_for_temporaries, so each chunk reuses the last one's heap
_BRIDGE_CHUNK = 4e6
# measured (benchmarks/bench_bridge_memory.py): (S, d_L, sum d_k) temporaries of a build
# chunk, and float64 elements of a subsampled block's bridged temporaries
_BRIDGE_BUILD_TEMPS = 8
_BRIDGE_BLOCK_ELEMS = 6 * 10**7
_GATHER_ELEMS = 4e6  # elements of per-source bridged factors gathered at a time


def bridge_bytes(
    n: int,
    widths: list[int],
    d_last: int,
    *,
    n_bridge: int = 8,
    n_fwd: int = 64,
    n_top: int | None = 48,
    n_random: int = 128,
) -> int:
    """Peak memory in bytes of a bridged call of :func:`deep_log_density` beyond what
    its caller holds, for ``N`` sources, intermediate widths ``d_k`` (``D = sum d_k``)
    and a query layer of width ``d_L``; all float64:

    - the bridged factors (:class:`_Bridge`), per source: each step's gain ``G``, the
      map ``M`` of every step above the first and the stacked products of
      :meth:`_Bridge.at_draws` (``2 d_L d_k`` per step, ``d_L d_k`` more in every
      step above the first and ``d_L d_k`` less in the step next to the query), three
      ``d_L x d_L`` products per step above the first (two in the step next to the
      query) and one summed over the steps, the draws' noise (``n_bridge D``) and the
      terms of ``log r`` at the ``K = n_fwd`` forward paths (``K d_L``);
    - the larger of their build, about eight ``(S, d_L, D)`` temporaries for a chunk
      of ``S`` sources (:func:`_bridge_chunk`) and the standard normals of the draws,
      and of what a block with subsampled sources (``16 (n_top + 1) + 3 n_random / 2``
      of them) holds: their terms of ``log r`` and small per-source terms
      (:class:`_BridgeCols`, ``(K + d_L) d_L + K + d_1 + 2 d_L + n_bridge`` each), one
      chunk of gathered factors (``_GATHER_ELEMS``) and the block's temporaries
      (``_BRIDGE_BLOCK_ELEMS``);
    - the forward paths, ``K`` per source (each layer and its parent's mean, the
      query layer's mean, scale and two column features, float32 features of the
      first and the query layer) and, when sources are subsampled, two ranking scores
      of ``_RANK_STEP`` queries at every path;
    - the ``N x N`` estimate and its half-sample twin;
    - the free heap glibc keeps during the round (the trim threshold of
      :func:`~stochmi.layers.heap.heap_for_temporaries`) and one temporary under its
      mmap threshold.

    Measured peaks of ``noisy_mlp`` and ``noisy_cnn`` layers (N = 250 to 4,000) lie
    between 0.69 and 0.97 times this figure (``benchmarks/bench_bridge_memory.py``).
    """
    d, big, steps = d_last, sum(widths), len(widths)
    held = _bridge_held_bytes(n, widths, d_last, n_bridge, n_fwd)
    chunk = min(n, _bridge_chunk(d, widths))
    build = 8 * (_BRIDGE_BUILD_TEMPS * chunk * d * big + n * n_bridge * (big + steps * d))
    block = 0
    if n_top is not None and _BLOCK * (n_top + 1) + n_random < _SUBSAMPLE_FRACTION * n:
        per_source = (n_fwd + d) * d + n_fwd + widths[0] + 2 * d + n_bridge
        n_block = _BLOCK * (n_top + 1) + 3 * n_random // 2
        block = 8 * (n_block * per_source + int(_GATHER_ELEMS) + _BRIDGE_BLOCK_ELEMS)
    paths = n * n_fwd * (8 * (2 * big + 4 * d) + 4 * 2 * (widths[0] + d))
    if block:  # the ranking scores of _RANK_STEP queries at every forward path
        paths += 2 * 8 * _RANK_STEP * n_fwd * n
    return int(held + max(build, block) + paths + 16 * n * n + sum(DURING))


def _bridge_held_bytes(n: int, widths: list[int], d_last: int, n_bridge: int, n_fwd: int) -> int:
    """Bytes of the tensors a :class:`_Bridge` keeps (see :func:`bridge_bytes`)."""
    d, big, steps = d_last, sum(widths), len(widths)
    below = int(steps > 1)  # whether there are steps below the top one
    per_source = (
        d * (5 * big - 2 * widths[0] - widths[-1])  # M above the first step, G, the stacks
        + d * d * (3 * (steps - 1) - below + 1)  # vq above the first step, pool_quad
        + (n_bridge + 1) * big  # zeta, s2
        + widths[0]  # a0
        + (3 + below) * d  # y of the first step, wgp0_a, rinv
        + d * (steps - 1)  # y above the first step
        + 1 * steps  # norm
        + n_bridge  # log_r
        + n_fwd * (d + 1)  # pool_v, pool_base
    )
    return 8 * n * per_source


def _bridge_chunk(d_last: int, widths: list[int]) -> int:
    """Sources whose bridged factors are built together: about ``_BRIDGE_CHUNK``
    elements in each of their ``(S, d_L, sum d_k)`` temporaries."""
    return max(1, int(_BRIDGE_CHUNK // (d_last * sum(widths))))


def memory_budget(device: torch.device) -> int:
    """Nine tenths of the memory available now on ``device``, in bytes: on a GPU the
    free memory plus what torch's allocator holds unused; on the CPU ``MemAvailable``
    of ``/proc/meminfo`` (Linux), elsewhere three quarters of the physical memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return (free + cached) * 9 // 10
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 * 9 // 10
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 3 // 4
    except (ValueError, OSError, AttributeError):  # not available: no limit
        return 2**62


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


class _GaussCols:
    """Column features of ``log N(t_r; loc_c, diag scale_c^2)`` for a fixed set of
    columns ``c``, computed once and reused for every block of rows.

    With ``t`` and ``loc`` centred on the columns' mean ``o``, ``P_c = scale_c^{-2}``:
    ``-2 log N = (t-o)^2 . P_c - 2 (t-o) . ((loc_c-o) P_c) + (loc_c-o)^2 . P_c + const_c``:
    two matrix products per block.  They run in float32 where a probabilistic
    rounding-error bound, ``5 sqrt(d) u (sqrt(a_r) + sqrt(max_c b_c))^2 / 2`` nats with
    ``a_r = (t_r-o)^2 . max P``, ``b_c = (loc_c-o)^2 . P_c`` and ``u = 2^-24``, stays
    under ``_F32_TOL`` for the row; other rows are computed in float64.
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, centre=None):
        loc = loc.to(torch.float64)
        scale = torch.broadcast_to(scale.to(torch.float64), loc.shape)
        self.centre = loc.mean(0, keepdim=True) if centre is None else centre
        lc = loc - self.centre
        self.prec = scale.pow(-2)  # (C, d)
        self.lp = lc * self.prec
        self.quad_c = (lc * self.lp).sum(1)  # b_c
        self.norm = torch.log(scale).sum(1) + 0.5 * loc.shape[1] * _LOG2PI
        # one precision vector for every column (noise of a fixed scale): the first
        # product reduces to a row sum
        self.shared = bool((self.prec == self.prec[:1]).all())
        self._maxima()
        self._f32 = None

    def _maxima(self) -> None:
        """The column maxima the rounding bound uses: ``max P`` and ``max_c b_c``."""
        self.pmax = self.prec.max()
        self.qmax = self.quad_c.max().clamp_min(0)

    def take(self, idx) -> _GaussCols:
        out = object.__new__(_GaussCols)
        out.centre, out.shared = self.centre, self.shared
        out.prec, out.lp = self.prec[idx], self.lp[idx]
        out.quad_c, out.norm = self.quad_c[idx], self.norm[idx]
        out._maxima()
        out._f32 = None
        return out

    def __call__(self, t: torch.Tensor, low: bool = False) -> torch.Tensor:
        """``log N(t_r; loc_c, diag scale_c^2)``: ``(R, C)`` float64, or with ``low``
        float32 where the bound allows (for large tables of the forward paths)."""
        t = t.to(torch.float64) - self.centre
        t2 = t * t
        d = t.shape[1]
        mag = ((t2.sum(1) * self.pmax).sqrt() + self.qmax.sqrt()).pow(2)
        bound = 2.5 * math.sqrt(d) * _U32 * mag
        use32 = bool((bound <= _F32_TOL).all())
        if use32 and self._f32 is None:
            self._f32 = (self.prec.to(torch.float32), self.lp.to(torch.float32))
        if use32 and low:
            p32, lp32 = self._f32
            t32 = t.to(torch.float32)
            quad = -2.0 * t32 @ lp32.T
            if self.shared:
                quad += (t2 @ self.prec[0]).to(torch.float32)[:, None]
            else:
                quad += (t32 * t32) @ p32.T
            quad += self.quad_c.to(torch.float32)[None, :]
            quad.clamp_(min=0).mul_(-0.5)
            return quad.sub_(self.norm.to(torch.float32)[None, :])
        if use32:
            p32, lp32 = self._f32
            quad = (-2.0 * t.to(torch.float32) @ lp32.T).double()
        else:
            quad = -2.0 * t @ self.lp.T
        # in place: (R, C) passes over one buffer
        if self.shared:
            quad += (t2 @ self.prec[0])[:, None]
        elif use32:
            quad += (t2.to(torch.float32) @ p32.T).double()
        else:
            quad += t2 @ self.prec.T
        quad += self.quad_c[None, :]
        return quad.clamp_min_(0).mul_(-0.5).sub_(self.norm[None, :])


def row_gauss_logpdf(t: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``log N(t; loc, diag scale^2)`` over the last dimension (broadcasting the rest)."""
    z = (t - loc) / scale
    return -0.5 * (z * z).sum(-1) - _log_sum(scale) - 0.5 * t.shape[-1] * _LOG2PI


def _unexpanded(x: torch.Tensor, last: bool = True) -> torch.Tensor:
    """``x`` with its broadcast dimensions (stride 0) cut to size 1, so that ``x`` is
    the result expanded to ``x.shape`` (``last=False``: the last dimension kept whole)."""
    dims = x.stride() if last else x.stride()[:-1]
    if 0 not in dims:
        return x
    return x[tuple(slice(0, 1) if st == 0 else slice(None) for st in dims)]


def _log_sum(scale: torch.Tensor) -> torch.Tensor:
    """``log(scale).sum(-1)``, with the logarithms taken once per distinct row where
    ``scale`` is broadcast (a fixed noise scale expanded to every row)."""
    return torch.log(_unexpanded(scale, last=False)).sum(-1).expand(scale.shape[:-1])


def _to64(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float64, its broadcast dimensions left unmaterialised."""
    return _unexpanded(x).to(torch.float64).expand(x.shape)


Link = Callable[[torch.Tensor], td.Distribution]


def _link_params(link: Link, parent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return normal_params(link(parent))


def _link_jacobian(link: Link, parent: torch.Tensor, rows: torch.Tensor | None = None):
    """Mean, scale and Jacobian ``J = d mean / d parent`` ``(B, d_out, d_in)`` of a link,
    or with ``rows`` ``(B, R, d_out)`` only ``rows @ J`` ``(B, R, d_in)`` (``R``
    vector-Jacobian products instead of ``d_out``)."""
    p = parent.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loc, scale = _normal_params_grad(link(p))
        if not loc.requires_grad:
            raise NotGaussianLink("the link's mean does not depend differentiably on its parent")
        if rows is None:
            d_out = loc.shape[1]
            eye = torch.eye(d_out, dtype=loc.dtype, device=loc.device)
            grads = eye[:, None, :].expand(d_out, loc.shape[0], d_out)
        else:
            grads = rows.transpose(0, 1).to(loc.dtype)  # (R, B, d_out)
        try:
            (jac,) = torch.autograd.grad(
                loc, p, grad_outputs=grads, is_grads_batched=True, retain_graph=True
            )
        except RuntimeError:  # an op without a batching rule: one backward pass per row
            jac = torch.stack(
                [torch.autograd.grad(loc, p, grad_outputs=g, retain_graph=True)[0] for g in grads]
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
        self.cols1 = _GaussCols(self.loc1, self.scale1)
        self._checked: set[int] = set()  # links whose output normal_params has checked

    def call(self, k: int, parent: torch.Tensor):
        """``(loc, scale)`` in float64 of link ``k`` at ``parent``: the link's first call
        in this problem goes through the checks of :func:`normal_params` (finite values,
        positive scales), later calls read the Normal's parameters directly."""
        parent = parent.to(self.dtype)
        if k not in self._checked:
            out = _link_params(self.links[k], parent)
            self._checked.add(k)
            return out
        with torch.no_grad():
            loc, scale = _normal_params_grad(self.links[k](parent))
        return loc.to(torch.float64), _to64(scale)

    def randn(self, shape) -> torch.Tensor:
        """Standard normals in float64, drawn in float32 (4-6x faster on the CPU; each draw
        is still evaluated exactly under its proposal, in float64)."""
        z = torch.randn(shape, generator=self.gen, dtype=torch.float32, device=self.loc1.device)
        return z.to(torch.float64)

    def layer1(self, t1: torch.Tensor) -> torch.Tensor:
        """``log p(t1_r | s_i)`` for all rows and sources: ``(R, N)``."""
        return self.cols1(t1)

    def take(self, cols: torch.Tensor) -> _Problem:
        """The same problem with only the sources ``cols`` (queries unchanged)."""
        out = object.__new__(_Problem)
        out.__dict__.update(self.__dict__)
        out.loc1, out.scale1, out.n = self.loc1[cols], self.scale1[cols], len(cols)
        out.cols1 = self.cols1.take(cols)
        return out


def _sq_norm_of_product(r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``|w_b r_bk|^2`` for ``r`` ``(B, R, d)`` and ``w`` ``(B, e, d)`` (either batch may
    be 1): ``(B, R)`` float64.

    The product runs in float32; entries whose probabilistic rounding-error bound
    exceeds ``_F32_TOL`` nats are recomputed in float64 (the batches that hold them).
    Each entry ``l`` of ``w r`` is off by about ``sqrt(d) u |r| |w_l|`` (``u = 2^-24``),
    so the squared norm by at most ``2 |w r| sqrt(d) u |r| max_l |w_l|``; the bound
    taken is 2.5 times that, as for the kernel rows (:class:`_GaussCols`).  An error of
    ``e`` in a log density moves every density estimate built on it by a factor within
    ``exp(+-e / 2)``.
    """
    wr = r.to(torch.float32) @ w.to(torch.float32).transpose(1, 2)
    sq = (wr * wr).sum(-1).to(torch.float64)
    w_max = w.norm(dim=-1).max(-1).values  # (B,)
    bound = 5.0 * math.sqrt(r.shape[-1]) * _U32 * sq.sqrt() * r.norm(dim=-1) * w_max[:, None]
    bad = (bound > _F32_TOL).any(-1)  # (B,)
    if bool(bad.any()):
        sq = sq.expand(torch.broadcast_shapes(sq.shape, bound.shape)).clone()
        idx = torch.nonzero(bad)[:, 0]
        r_b = r[idx] if r.shape[0] > 1 else r
        w_b = w[idx] if w.shape[0] > 1 else w
        wr64 = r_b @ w_b.transpose(1, 2)
        sq[idx] = (wr64 * wr64).sum(-1)
    return sq


def _stacked_mm(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``f_s @ x`` for every ``s``: ``f`` ``(S, e, d)``, ``x`` ``(d, R)`` -> ``(S, e, R)``
    (a transposed view), as one ``(R, d) @ (d, S e)`` product: no copy of ``x`` per
    ``s``, and with the few columns ``R`` as the product's rows, which runs about 1.6x
    faster in float64 than ``(S e, d) @ (d, R)`` on the CPU."""
    s, e, d = f.shape
    return (x.T @ f.reshape(s * e, d).T).T.reshape(s, e, -1)


#: diagonal jitter of a Cholesky factor that fails, relative to the mean diagonal
_JITTER = {torch.float32: 1e-5, torch.float64: 1e-12}


def _cholesky(h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Batched Cholesky factor in ``dtype`` (float32 or float64), with diagonal jitter
    (``_JITTER``) where a factor fails."""
    h = h.to(dtype)
    chol, info = torch.linalg.cholesky_ex(h)
    if bool((info != 0).any()):
        eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
        jitter = _JITTER[dtype] * torch.diagonal(h, dim1=1, dim2=2).mean(1)
        chol = torch.linalg.cholesky(h + jitter[:, None, None] * eye)
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
    n_sources : float
        Mean number of sources a query was evaluated at (``N`` without subsampling).
    rows : Tensor of int64, shape (R,), or None
        The queries that were estimated (``None``: all ``N``).  The other rows of ``L``
        and ``L_half`` are ``-inf`` and the other entries of ``diag_ess`` and
        ``marg_ess`` NaN.
    log_sums : Tensor, shape (N, 4), optional
        ``log sum w`` and ``log sum w^2`` of the importance weights behind the marginal
        density and behind the diagonal (the two effective sample sizes), for
        :func:`pooled`.
    n_bridge : int
        Bridged draws per source.
    """

    L: torch.Tensor
    L_half: torch.Tensor
    diag_ess: torch.Tensor
    marg_ess: torch.Tensor
    n_is: int
    n_fwd: int
    n_sources: float
    rows: torch.Tensor | None = None
    log_sums: torch.Tensor | None = None
    n_bridge: int = 0


def pooled(first: DeepLogDensity, second: DeepLogDensity) -> DeepLogDensity:
    """Two independent estimates of the same densities, at the same effort, as one at
    twice the effort.

    Each entry of ``L`` is an unbiased importance-sampling estimate of ``p(t_j | s_i)``,
    so their mean ``(exp L_1 + exp L_2) / 2`` is one too, with the draws of both (each
    weight halved).  ``L_half`` of the result is ``first.L``: an estimate from half of
    the draws, as the convergence rule needs.  The effective sample sizes are those of
    the union of both sets of weights.
    """
    if first.log_sums is None or second.log_sums is None:
        raise ValueError("pooled needs estimates from deep_log_density (with log_sums)")
    log2 = math.log(2.0)
    sums = torch.logaddexp(first.log_sums, second.log_sums)
    sums = sums - torch.tensor([log2, 2 * log2] * 2, dtype=sums.dtype, device=sums.device)
    return DeepLogDensity(
        torch.logaddexp(first.L, second.L) - log2,
        first.L,
        _ess(sums[:, 2:]),
        _ess(sums[:, :2]),
        first.n_is + second.n_is,
        first.n_fwd + second.n_fwd,
        (first.n_sources + second.n_sources) / 2,
        first.rows,
        sums,
        first.n_bridge + second.n_bridge,
    )


class _Pool:
    """Forward paths, ``k`` per source; row ``k * N + i`` is path ``k`` of source ``i``.

    ``layers[m]`` are the values of intermediate layer ``m + 1`` (``(K*N, d)``),
    ``priors[m]`` the conditional mean of that layer given the path's parent (the
    source's ``first_loc`` for ``m = 0``), ``first`` is ``log p(t_1 | s_own)``, ``chain``
    the sum of the link log densities inside the path (layers 2 .. L-1) and
    ``fin_loc/fin_scale`` the conditional of the query layer.
    """

    def __init__(self, pb: _Problem, k_paths: int):
        n = pb.n
        src = torch.arange(n, device=pb.loc1.device).repeat(k_paths)
        loc, scale = pb.loc1[src], pb.scale1[src]
        t = loc + scale * pb.randn(loc.shape)
        self.layers, self.priors = [t], [loc]
        self.first = row_gauss_logpdf(t, loc, scale)
        self.chain = torch.zeros_like(self.first)
        for k in range(len(pb.links) - 1):
            loc, scale = pb.call(k, self.layers[-1])
            t = loc + scale * pb.randn(loc.shape)
            self.chain = self.chain + row_gauss_logpdf(t, loc, scale)
            self.layers.append(t)
            self.priors.append(loc)
        self.fin_loc, self.fin_scale = pb.call(len(pb.links) - 1, self.layers[-1])
        self.own = (self.first + self.chain).reshape(k_paths, n)  # log p_i(z), own source
        self.fin = _GaussCols(self.fin_loc, self.fin_scale)
        self._z1 = None  # float32 features of the first layer, for first_at
        self._zsq_p = None

    @property
    def n_paths(self) -> int:
        return self.own.numel()

    @property
    def width(self) -> int:
        return sum(t.shape[1] for t in self.layers)

    def at(self, idx: torch.Tensor):
        """Layers and parents' means of the paths ``idx`` (any shape)."""
        return [t[idx] for t in self.layers], [p[idx] for p in self.priors]

    def first_at(self, loc: torch.Tensor, scale: torch.Tensor, idx=None) -> torch.Tensor:
        """``log N(t_1 of path r; loc_b, diag scale_b^2)``, ``(B, K*N)`` (with ``idx``
        only at the paths ``idx``: ``(B, len(idx))``), in float32 from features of the
        paths computed once (a ranking score, not part of an estimate)."""
        if self._z1 is None:
            z = self.layers[0]
            self._c1 = z.mean(0, keepdim=True)
            zc = z - self._c1
            self._z1 = (zc.to(torch.float32), (zc * zc).to(torch.float32))
        zc32, zsq32 = self._z1
        if idx is not None:
            zc32 = zc32.index_select(0, idx)
        loc = loc.to(torch.float64) - self._c1
        prec = torch.broadcast_to(scale.to(torch.float64), loc.shape).pow(-2)
        quad = -2.0 * (loc * prec).to(torch.float32) @ zc32.T
        if bool((prec == prec[:1]).all()):  # one scale for every source: a row sum
            cached = self._zsq_p
            if cached is None or not torch.equal(cached[0], prec[0]):
                rs = (self._z1[1].double() @ prec[0]).float()[None, :]  # every path's
                self._zsq_p = cached = (prec[0], rs)
            quad += cached[1] if idx is None else cached[1][:, idx]
        else:
            quad += prec.to(torch.float32) @ (zsq32 if idx is None else zsq32[idx]).T
        quad += (loc * loc * prec).sum(1).to(torch.float32)[:, None]
        norm = -0.5 * torch.log(prec).sum(1) + 0.5 * loc.shape[1] * _LOG2PI
        return quad.clamp_(min=0).mul_(-0.5).sub_(norm.to(torch.float32)[:, None])

    def take(self, cols: torch.Tensor) -> _PoolView:
        """The paths of the sources ``cols`` only (row ``k * len(cols) + c``)."""
        return _PoolView(self, cols)


class _PoolView:
    """The forward paths of a subset ``cols`` of the sources, without copies of the
    paths themselves: path ``k * len(cols) + c`` is path ``k * N + cols[c]`` of the pool."""

    def __init__(self, base: _Pool, cols: torch.Tensor):
        k_paths, n = base.own.shape
        self.base = base
        ks = torch.arange(k_paths, device=cols.device)[:, None]
        self.idx = (ks * n + cols[None, :]).reshape(-1)
        self.own = base.own[:, cols]
        self.chain = base.chain[self.idx]
        self.width = base.width
        self._fin = None

    @property
    def n_paths(self) -> int:
        return self.own.numel()

    @property
    def fin(self) -> _GaussCols:
        if self._fin is None:
            self._fin = self.base.fin.take(self.idx)
        return self._fin

    def at(self, idx: torch.Tensor):
        return self.base.at(self.idx[idx])

    def first_at(self, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.base.first_at(loc, scale, self.idx)


class _Step:
    """Proposal for one intermediate layer ``t_k`` given its parent's conditional mean
    ``m``: ``N(m, S) x N(y; M t, R)`` normalised, where ``N(y; M t, R)`` is the
    linearised likelihood of the query given ``t_k`` (``S`` diagonal; ``R`` full,
    ``(B, d_L, d_L)``, or for the step next to the query, whose ``R`` is the query
    link's diagonal noise, that diagonal ``(B, d_L)``, kept so in ``chol_r``).

    Kalman form (a ``d_L x d_L`` factor per query): ``C = R + M S M^T``, gain
    ``K^T = C^{-1} M S``, mean ``m + (y - M m) K^T``; the covariance does not depend on
    ``m``.  ``w = chol(R)^{-1} M`` whitens the likelihood term of the precision
    ``S^{-1} + M^T R^{-1} M``.  ``C`` is factored in float32 unless ``exact``: the
    covariance that Matheron's rule (:meth:`noise`) then samples differs from the
    precision's inverse only at second order in the gain's rounding error.  With
    ``exact`` the factor is float64, and the gain satisfies ``G P = R^{-1} M`` (``G =
    K^T``, ``P`` the precision) to float64 rounding, which :class:`_Bridge` uses.
    """

    def __init__(self, pb: _Problem, s2, m, r, y, exact: bool = False):
        self.pb, self.s2, self.y = pb, s2, y
        self.m = m
        ms = m * s2[:, None, :]
        c = ms @ m.transpose(1, 2)
        if r.dim() == 2:  # a diagonal R, (B, d_L): the query's own link, the top step
            chol_r = r.sqrt()  # kept as its diagonal
            self.w = m / chol_r[:, :, None]  # (B, d_L, d)
            c.diagonal(dim1=1, dim2=2).add_(r)
            logdet_r = 2 * torch.log(chol_r).sum(1)
        else:
            chol_r = torch.linalg.cholesky(r)
            self.w = torch.linalg.solve_triangular(chol_r, m, upper=False)  # (B, d_L, d)
            c += r
            logdet_r = 2 * torch.log(torch.diagonal(chol_r, dim1=1, dim2=2)).sum(1)
        self.chol_r = chol_r  # (B, d_L, d_L), or (B, d_L) for a diagonal R
        # exact: a float64 factor, so that the gain is C^-1 M S to float64 rounding and
        # G P = R^-1 M holds (used by _Bridge); else a float32 one
        chol_c = _cholesky(c, torch.float64 if exact else torch.float32).to(torch.float64)
        self.gain_t = torch.cholesky_solve(ms, chol_c)  # (B, d_L, d)
        logdet_c = 2 * torch.log(torch.diagonal(chol_c, dim1=1, dim2=2)).sum(1)
        self.logdet_cov = torch.log(s2).sum(1) + logdet_r - logdet_c
        self.d = s2.shape[1]
        self.norm = 0.5 * self.logdet_cov + 0.5 * self.d * _LOG2PI  # (B,)

    def mean(self, prior_loc: torch.Tensor, tq=None, idx=None) -> torch.Tensor:
        """``m + (y - M m) K^T`` for parent means ``(B, R, d)``; with ``idx`` only the
        rows ``idx`` of this step (``B = len(idx)``), with ``tq`` (``(B or 1, R, d_L)``)
        the observation ``y + tq`` (a step built with zero queries, :class:`_Bridge`)."""
        m, g, y = (
            (self.m, self.gain_t, self.y)
            if idx is None
            else (self.m[idx], self.gain_t[idx], self.y[idx])
        )
        innov = y[:, None, :] - prior_loc @ m.transpose(1, 2)
        if tq is not None:
            innov = innov + tq
        return prior_loc + innov @ g

    def logpdf(self, t: torch.Tensor, mean: torch.Tensor, idx=None) -> torch.Tensor:
        """Log density at ``t`` ``(B, R, d)`` (with ``idx``: rows ``idx`` of this step)."""
        w, s2, norm = (
            (self.w, self.s2, self.norm)
            if idx is None
            else (self.w[idx], self.s2[idx], self.norm[idx])
        )
        r = t - mean
        quad = (r * r / s2[:, None, :]).sum(-1) + _sq_norm_of_product(r, w)
        return -0.5 * quad - norm[:, None]

    #: the factors :meth:`mean` needs, with the diagonal and normaliser
    MEAN = ("s2", "y", "m", "gain_t", "norm")
    ALL = ("s2", "y", "m", "chol_r", "w", "gain_t", "logdet_cov", "norm")

    def take(self, idx: torch.Tensor, fields=ALL) -> _Step:
        """The step's rows ``idx`` of ``fields`` (the other factors are left out)."""
        out = object.__new__(_Step)
        out.pb, out.d = self.pb, self.d
        for name in fields:
            setattr(out, name, getattr(self, name)[idx])
        return out

    def noise(self, shape, normals=None) -> torch.Tensor:
        """``zeta ~ N(0, Cov)``, ``(B, R, d)`` (Matheron's rule), from standard normals
        ``(B, R, d)`` and ``(B, R, d_L)`` drawn here or given as ``normals``."""
        if normals is None:
            b, r = shape[0], shape[1]
            normals = (self.pb.randn((b, r, self.d)), self.pb.randn((b, r, self.y.shape[1])))
        t = self.s2.sqrt()[:, None, :] * normals[0]
        if self.chol_r.dim() == 2:  # a diagonal R
            e = normals[1] * self.chol_r[:, None, :]
        else:
            e = normals[1] @ self.chol_r.transpose(1, 2)
        return t - (t @ self.m.transpose(1, 2) + e) @ self.gain_t


class _Guided:
    """Proposal ``q_j`` over whole paths for a block of queries.

    Every link is linearised at the anchor path ``a`` (Gauss-Newton:
    ``m_k(t) ~ f_k + J_k (t - a_{k-1})``, noise ``s_k`` at the anchor).  Backwards from
    the query, the linearised likelihood of ``t_j`` given layer ``k`` is
    ``N(t_j - c_k; M_k t_k, R_k)``, with ``M_{L-1} = J_L``, ``R_{L-1} = diag s_L^2`` and
    ``M_k = M_{k+1} J_{k+1}``, ``R_k = R_{k+1} + M_{k+1} diag(s_{k+1}^2) M_{k+1}^T``.
    Forwards, each layer is drawn from its true conditional mean given the drawn parent
    combined with that likelihood (:class:`_Step`).  For a linear-Gaussian chain this is
    the exact posterior of the path given ``t_j`` and ``s_j``.  With ``tq`` (the
    queries' part of the observation, default ``t_j``) set to zero and source mean
    paths as anchors, the same recursion gives the steps of :class:`_Bridge` (with
    ``exact``: float64 gains, see :class:`_Step`).
    """

    def __init__(
        self, pb: _Problem, rows: torch.Tensor, anchors: list[torch.Tensor], tq=None, exact=False
    ):
        self.pb, self.rows = pb, rows
        n_int = len(anchors)  # intermediate layers t_1 .. t_{L-1}
        a = [anchors[k][rows].to(torch.float64) for k in range(n_int)]
        f, sig, jac = _link_jacobian(pb.links[-1], anchors[-1][rows].to(pb.dtype))
        m = jac
        r = sig.pow(2)  # the diagonal of R_{L-1} (_Step takes it as a vector)
        tq = pb.t[rows] if tq is None else tq
        y = tq - f + (jac @ a[-1][:, :, None])[:, :, 0]
        steps = [None] * n_int
        for k in range(n_int - 1, -1, -1):
            if k == 0:
                steps[k] = _Step(pb, pb.scale1[rows].pow(2), m, r, y, exact)
                break
            # link into t_k at the anchor's parent; only M J is needed (d_L pullbacks)
            f_k, s_k, mj = _link_jacobian(pb.links[k - 1], anchors[k - 1][rows].to(pb.dtype), m)
            steps[k] = _Step(pb, s_k.pow(2), m, r, y, exact)
            y = y - (m @ f_k[:, :, None])[:, :, 0] + (mj @ a[k - 1][:, :, None])[:, :, 0]
            ms = m * s_k.pow(2)[:, None, :]
            r = (torch.diag_embed(r) if r.dim() == 2 else r) + ms @ m.transpose(1, 2)
            m = mj
        self.steps = steps

    def take(self, idx) -> _Guided:
        """The proposals of the queries ``rows[idx]`` only (a slice or index tensor)."""
        out = object.__new__(_Guided)
        out.pb, out.rows = self.pb, self.rows[idx]
        out.steps = [st.take(idx) for st in self.steps]
        return out

    def sample(self, m: int, starts: torch.Tensor | None = None):
        """``m`` paths per query from ``q_j``: the layers (each ``(B, m, d_k)``), ``log q``
        and the link log densities inside the path (``(B, m)`` each), and each layer's
        conditional mean given its drawn parent (``None`` for the first layer).

        With ``starts`` (``(B, m, d_1)``), path ``r`` starts from the first-layer mean
        ``starts[:, r]`` instead of the query's own source's: the shifted proposal
        ``s_ji`` of :func:`_shifted_pairs` (``log q`` is then ``log s_ji``)."""
        pb, b = self.pb, len(self.rows)
        if starts is None:
            mean = self.steps[0].mean(pb.loc1[self.rows][:, None, :]).expand(b, m, -1)
        else:
            mean = self.steps[0].mean(starts)
        t = mean + self.steps[0].noise((b, m))
        layers, priors = [t], [None]
        logq = self.steps[0].logpdf(t, mean)
        chain = torch.zeros_like(logq)
        for k in range(1, len(self.steps)):
            loc, scale = (v.reshape(b, m, -1) for v in pb.call(k - 1, t.reshape(b * m, -1)))
            mean = self.steps[k].mean(loc)
            t = mean + self.steps[k].noise((b, m))
            logq = logq + self.steps[k].logpdf(t, mean)
            chain = chain + row_gauss_logpdf(t, loc, scale)
            layers.append(t)
            priors.append(loc)
        return layers, logq, chain, priors

    def log_q_at(self, layers: list[torch.Tensor], priors: list[torch.Tensor]):
        """``log q_j`` at given paths ``(B, R, d_k)`` with parent means ``priors`` (the
        first is ignored: ``q_j`` starts from the query's own source)."""
        b = len(self.rows)
        start = self.pb.loc1[self.rows][:, None, :]
        out = self.steps[0].logpdf(layers[0], self.steps[0].mean(start))
        return (out + self.log_q_above(layers, priors)).reshape(b, -1)

    def log_q_above(self, layers: list[torch.Tensor], priors: list[torch.Tensor]):
        """The steps after the first of :meth:`log_q_at` (0 for a one-step chain): the
        part of ``log q_j`` that does not depend on the source the path starts from."""
        out = 0.0
        for k in range(1, len(self.steps)):
            out = out + self.steps[k].logpdf(layers[k], self.steps[k].mean(priors[k]))
        return out


@heap_for_temporaries()
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
    n_top: int | None = 48,
    n_random: int = 128,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress=None,
    rows: torch.Tensor | None = None,
    strata: torch.Tensor | None = None,
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
        than 64 dimensions (all of them otherwise), besides the query's own source's.
    n_bridge : int
        Bridged draws per source (even; 0: none).
    n_top : int or None
        Sources per query taken whole, ranked by cheap proxies (:func:`_rank_sources`);
        ``None``: every query at every source (no subsampling).
    n_random : int
        Random sources per block of queries that stand for all the others, with
        Horvitz-Thompson weights (even).  Subsampling runs only where a block's sources
        would be under half of ``N``.
    chunk_size : int, optional
        Queries per block (memory ``O(chunk * (n_is + n_fwd) * S)`` for ``S`` sources).
    dtype : torch.dtype
        Dtype the links are called with (the model's).
    progress : callable, optional
        Called with the number of queries finished after each block.
    rows : Tensor of int64, shape (R,), optional
        Estimate only the rows ``L[rows, :]`` (queries ``rows``, at every source; the
        forward paths and bridged factors still cover all ``N`` sources).  Default: all.
    strata : Tensor of int, shape (N,), optional
        A stratum per source (class labels, for ``I(T; Y)``).  Where sources are
        subsampled, queries are taken in blocks ordered by stratum and the random share
        is stratified (:func:`_select_sources`), so a sum over the sources of a query's
        own stratum rests on ``n_random / 2`` random sources, not ``n_random / C``.

    Returns
    -------
    DeepLogDensity
    """
    _check_settings(links, anchors, n_is, n_fwd, n_bridge, n_top, n_random)
    pb = _Problem(first_loc, first_scale, links, queries, generator, dtype)
    n, dev = pb.n, pb.loc1.device
    selected = _check_rows(rows, n, dev)  # the loop below reuses the name rows per block
    all_rows = torch.arange(n, device=dev) if selected is None else selected
    strata = _check_strata(strata, n, dev)
    pool = _Pool(pb, n_fwd)
    bridge = _Bridge(pb, n_bridge, pool) if n_bridge else None
    # without bridging, each query's pair sources (_pair_sources) get shifted draws
    n_pair = _n_pair(n, n_bridge)
    subsample = n_top is not None and _BLOCK * (n_top + 1) + n_random < _SUBSAMPLE_FRACTION * n
    mean_score = _MeanPathScore(pb) if subsample else None
    if subsample and strata is not None:  # blocks of one stratum share its random draw
        all_rows = all_rows[torch.argsort(strata[all_rows], stable=True)]
    if chunk_size is None:
        chunk_size = _default_chunk(
            n, anchors, queries, n_is, n_fwd, n_bridge, top_r, n_top, n_random, subsample
        )
    out = torch.full((n, n), -math.inf, dtype=torch.float64, device=dev)
    half = torch.full((n, n), -math.inf, dtype=torch.float64, device=dev)
    # log sum w and log sum w^2 of the marginal's terms and of the diagonal's draws
    sums = torch.full((n, 4), math.nan, dtype=torch.float64, device=dev)
    n_cols = []
    # with subsampling, queries are ranked _RANK_STEP at a time (log p(t_j | z) at every
    # forward path, kept for the blocks of those queries), then estimated in blocks
    outer = _RANK_STEP if subsample else chunk_size
    # queries whose proposals are built together: a multiple of chunk_size with at most
    # ~2e6 elements in each (queries, d_L, d_k) factor
    widest = max(t.shape[1] for t in anchors)
    q_group = chunk_size * max(
        1, min(outer // chunk_size, int(2e6 // (chunk_size * widest * queries.shape[1])))
    )
    for ostart in range(0, len(all_rows), outer):
        orows = all_rows[ostart : ostart + outer]
        if subsample:
            g_all = pool.fin(pb.t[orows], low=True)  # (B_outer, K*N)
            top = _rank_sources(pb, pool, anchors, orows, g_all, n_top, mean_score)
        for start in range(0, len(orows), chunk_size):
            loc = slice(start, min(len(orows), start + chunk_size))
            rows = orows[loc]
            if start % q_group == 0:
                # the proposals of several blocks' queries at once (one batched Jacobian
                # per link instead of one per block), sliced per block below
                q_start = start
                q_all = _Guided(pb, orows[start : start + q_group], anchors)
            q = q_all.take(slice(start - q_start, loc.stop - q_start))
            best = _pair_sources(pb, q, rows, anchors, n_pair) if n_pair else None
            if subsample:
                cols, logw, pos, pairs = _block_sources(pb, rows, top[loc], best, n_random, strata)
                sp, pool_b = pb.take(cols), pool.take(cols)
                bridge_b = bridge.take(cols) if bridge is not None else None
                log_g = g_all[loc][:, pool_b.idx].to(torch.float64)
            else:
                cols, logw, pos, log_g, pairs = None, None, rows, None, best
                sp, pool_b, bridge_b = pb, pool, bridge
            f, h, sums[rows] = _block(
                pb, sp, rows, pos, q, pool_b, n_is, n_fwd, top_r, bridge_b, logw, log_g, pairs
            )
            if cols is None:
                out[rows], half[rows] = f, h
            else:
                out[rows[:, None], cols[None, :]] = f
                half[rows[:, None], cols[None, :]] = h
            n_cols.append(n if cols is None else len(cols))
            if progress is not None:
                progress(len(rows))
    n_sources = float(sum(n_cols) / len(n_cols))
    return DeepLogDensity(
        out,
        half,
        _ess(sums[:, 2:]),
        _ess(sums[:, :2]),
        n_is,
        n_fwd,
        n_sources,
        selected,
        sums,
        n_bridge,
    )


def _check_settings(links, anchors, n_is, n_fwd, n_bridge, n_top, n_random) -> None:
    """The ``ValueError`` of :func:`deep_log_density` for inconsistent settings."""
    if len(links) < 1 or len(anchors) != len(links):
        raise ValueError("need one anchor layer per link")
    for name, v in (("n_is", n_is), ("n_fwd", n_fwd)):
        if v < 2 or v % 2:
            raise ValueError(f"{name} must be an even int >= 2, got {v}")
    if n_bridge < 0 or n_bridge % 2:
        raise ValueError(f"n_bridge must be an even int >= 0, got {n_bridge}")
    if n_top is not None and (n_top < 1 or n_random < 2 or n_random % 2):
        raise ValueError(
            f"n_top must be >= 1 and n_random an even int >= 2, got {n_top} and {n_random}"
        )


def _check_rows(rows, n: int, dev) -> torch.Tensor | None:
    """``rows`` as distinct int64 query indices in ``[0, n)`` on ``dev`` (None stays)."""
    if rows is None:
        return None
    rows = torch.as_tensor(rows, dtype=torch.long, device=dev).reshape(-1)
    if len(rows) < 1 or bool(((rows < 0) | (rows >= n)).any()) or len(rows.unique()) < len(rows):
        raise ValueError(f"rows must be distinct query indices in [0, {n})")
    return rows


def _check_strata(strata, n: int, dev) -> torch.Tensor | None:
    """``strata`` as an int64 tensor of ``n`` entries on ``dev`` (None stays)."""
    if strata is None:
        return None
    strata = torch.as_tensor(strata, device=dev).long().reshape(-1)
    if len(strata) != n:
        raise ValueError(f"strata must hold one int per source ({n}), got {len(strata)}")
    return strata


def _n_pair(n: int, n_bridge: int) -> int:
    """Pair sources per query (:func:`_pair_sources`): ``_PAIR_SOURCES``, at most the
    ``n - 1`` other sources, and none in a round with bridged draws."""
    return 0 if n_bridge else min(_PAIR_SOURCES, n - 1)


def _default_chunk(n, anchors, queries, n_is, n_fwd, n_bridge, top_r, n_top, n_random, subsample):
    """Queries per block: ~2e7 float64 elements per block for each large tensor (at most
    ``_BLOCK`` when the sources are subsampled)."""
    widest = max(t.shape[1] for t in anchors)
    n_src = min(n, _BLOCK * (n_top + 1) + n_random) if subsample else n
    per_row = max(
        (n_is + n_fwd) * n_src,  # kernel rows of the proposal draws and forward paths
        widest * max(widest, queries.shape[1]),  # Jacobians and whitened maps
        _DIAG_FACTOR * n_is * widest,  # the draws themselves
        top_r * anchors[-1].shape[1],
        (n_is + n_bridge) * n_src,  # bridged weights
        # the shifted draws' pairs: the first layer of every draw, for each pair source
        _n_pair(n, n_bridge) * (n_is + n_fwd + _PAIR_DRAWS) * widest,
    )
    chunk_size = max(1, min(n, int(2e7 // per_row)))
    if subsample:
        chunk_size = min(chunk_size, _BLOCK)
    return chunk_size


class _MeanPathScore:
    """A cheap proxy of ``log p(t_j | s_i)`` from each source's mean path: ``log N(t_j;
    m_i, diag v)`` up to a constant, with ``m_i`` the query layer's conditional mean at
    the mean path of source ``i`` (:func:`mean_path`) and ``v`` the per-coordinate
    variance of the residuals ``t_i - m_i`` over all sources, which stands in for the
    spread that every layer's noise adds.  It depends on the data alone (no draw),
    costs one ``(B, d_L) x (d_L, N)`` product per block of queries, and unlike the
    layer-1 density of the query's own path it follows the sources through the links,
    which can map first layers far apart to nearby query layers (networks early in
    training).  A full residual covariance instead of ``v`` would make the score exact
    for a linear-Gaussian chain with one scale per layer, but ranked the sources of
    ``noisy_mlp`` less well (``benchmarks/README.md``)."""

    def __init__(self, pb: _Problem):
        path = mean_path(pb.loc1, pb.links, pb.dtype)
        m, _ = _link_params(pb.links[-1], path[-1].to(pb.dtype))
        m = m.to(torch.float64)
        inv_sd = (pb.t - m).var(0).clamp_min(torch.finfo(torch.float32).tiny).rsqrt()
        self.t = (pb.t * inv_sd).to(torch.float32)
        self.m = (m * inv_sd).to(torch.float32)
        self.m_sq = (self.m * self.m).sum(1)

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """``-|t_j - m_i|^2 / 2`` in coordinates scaled by ``v^-1/2``, up to a per-row
        constant: ``(B, N)`` float32 (a ranking, not part of an estimate)."""
        return self.t[rows] @ self.m.T - 0.5 * self.m_sq[None, :]


def _rank_sources(pb: _Problem, pool: _Pool, anchors, rows, log_g, n_top: int, mean_score=None):
    """Each query's ``n_top`` most likely other sources: ``(B, n_top)`` indices.

    Two cheap proxies of ``log p(t_j | s_i)``, each relative to its best source, give
    a first ranking by the larger of the two: the layer-1 density of the query's own
    path, ``log N(a_j; mu_i, diag s_i^2)``, and the nested Monte Carlo estimate ``log
    mean_k p(t_j | z_ik)`` from the forward paths of source ``i`` (``log_g``, ``log
    p(t_j | z)`` at every forward path, ``(B, K*N)``).  With ``mean_score`` (a
    :class:`_MeanPathScore`) its ranking is the second, and the two are interleaved
    (first of each, then second of each, ...), each source kept at its first place,
    up to ``n_top`` sources: each ranking brings its best sources whatever the spread
    of the other's scores (the mean-path score is much flatter than the layer-1
    density, so a maximum of relative scores would let it crowd out sources that the
    layer-1 density ranks first).
    """
    n, b, dev = pb.n, len(rows), pb.loc1.device
    k_paths = pool.own.shape[0]
    s1 = pb.layer1(anchors[0][rows])  # (B, N)
    g = torch.logsumexp(log_g.reshape(b, k_paths, n), 1)
    score = torch.maximum(s1 - s1.max(1, keepdim=True).values, g - g.max(1, keepdim=True).values)
    ar = torch.arange(b, device=dev)
    score[ar, rows] = -math.inf
    k = min(n_top, n - 1)
    if mean_score is None:
        return torch.topk(score, k, dim=1).indices
    e = mean_score(rows)
    e[ar, rows] = -math.inf
    idx = torch.stack([torch.topk(score, k, 1).indices, torch.topk(e, k, 1).indices], 2)
    idx = idx.reshape(b, 2 * k)  # interleaved: first of each ranking, second of each, ...
    earlier = torch.ones(2 * k, 2 * k, dtype=torch.bool, device=dev).tril(-1)
    seen = ((idx[:, :, None] == idx[:, None, :]) & earlier[None]).any(2)
    keep = torch.argsort(seen.to(torch.uint8), dim=1, stable=True)[:, :k]
    return idx.gather(1, keep)


def _select_sources(pb: _Problem, rows, top: torch.Tensor, n_random: int, strata=None):
    """The sources a block of queries is evaluated at, and their weights.

    The union ``D`` of every query's ``n_top`` best sources (``top``, from
    :func:`_rank_sources`) and of the queries' own sources is taken whole (weight 1).
    A random subset ``U``, drawn independently of everything else, stands for the rest.
    Without ``strata``, ``U`` holds ``n_random`` of all ``N`` sources drawn uniformly
    without replacement, and a source of ``U`` not in ``D`` gets weight ``N / n_random``
    (Horvitz-Thompson), so that ``sum_{i in D} p_ji + (N / n_random) sum_{i in U \\ D}
    p_ji`` is unbiased for ``sum_i p_ji`` whatever ``D`` is.  With ``strata`` (one int
    per source), the draw is stratified: ``m = n_random / 2`` (rounded to even) sources
    from each stratum ``s`` of the block's queries, at weight ``N_s / m``, and
    ``n_random`` from all other sources together, at weight ``N_rest / n_random``; a
    stratum of at most ``m`` sources is taken whole.  Every stratum's sum stays
    unbiased, so the marginal's does too, and the sum over the queries' own stratum
    (the class-conditional density of ``I(T; Y)``) rests on ``m`` random sources instead
    of ``n_random N_s / N``.  The half-sample weights use the first half of each
    stratum's draw at twice its weight.

    Returns
    -------
    cols : Tensor, shape (S,)
        Source indices, ``D`` first.
    logw : Tensor, shape (2, B, S)
        Log weights (all draws, first half), ``-inf`` where a source is not used.
    pos : Tensor, shape (B,)
        Position of each query's own source in ``cols``.
    """
    n, b, dev = pb.n, len(rows), pb.loc1.device
    in_d = torch.zeros(n, dtype=torch.bool, device=dev)
    in_d[top.reshape(-1)] = True
    in_d[rows] = True
    if strata is None:
        groups = [(None, n_random)]
    else:
        own = torch.unique(strata[rows])
        m_own = 2 * max(1, n_random // 4)
        groups = [((strata == s).nonzero()[:, 0], m_own) for s in own]
        groups.append(((~torch.isin(strata, own)).nonzero()[:, 0], n_random))
    rand, w_full, w_half = [], [], []
    for members, m in groups:
        n_s = n if members is None else len(members)
        if n_s <= m:  # a small stratum is taken whole
            in_d[members] = True
            continue
        pick = torch.randperm(n_s, generator=pb.gen, device=dev)[:m]
        if members is not None:
            pick = members[pick]
        keep = ~in_d[pick]
        first = (torch.arange(m, device=dev) < m // 2)[keep]
        rand.append(pick[keep])
        w_full.append(torch.full(first.shape, math.log(n_s / m), dtype=torch.float64, device=dev))
        w_half.append(torch.where(first, math.log(2 * n_s / m), -math.inf).to(torch.float64))
    det = torch.nonzero(in_d)[:, 0]
    cols = torch.cat([det, *rand])
    w = torch.cat([torch.zeros(len(det), dtype=torch.float64, device=dev), *w_full])
    w_h = torch.cat([torch.zeros(len(det), dtype=torch.float64, device=dev), *w_half])
    logw = torch.stack([w, w_h])[:, None, :].expand(2, b, len(cols))
    where = torch.full((n,), -1, dtype=torch.long, device=dev)
    where[cols] = torch.arange(len(cols), device=dev)
    return cols, logw, where[rows]


def _block_sources(pb: _Problem, rows, top, best, n_random: int, strata=None):
    """:func:`_select_sources` for a block whose queries' ``n_top`` best sources are
    ``top`` and whose pair sources are ``best`` (``(B, k)`` source indices, or None):
    both are taken whole.  Returns ``cols``, ``logw``, ``pos`` and the pair sources'
    positions among ``cols`` (None without them)."""
    whole = top if best is None else torch.cat([top, best], 1)
    cols, logw, pos = _select_sources(pb, rows, whole, n_random, strata)
    if best is None:
        return cols, logw, pos, None
    where = torch.full((pb.n,), -1, dtype=torch.long, device=cols.device)
    where[cols] = torch.arange(len(cols), device=cols.device)
    return cols, logw, pos, where[best]


def _pool_logq(sp, q: _Guided, pool, rows, pos, top_r, log_g=None):
    """``log q_j`` at forward paths ``(B, K*S)``: at every path when the paths are short
    (intermediate widths summing to at most ``_FULL_Q_DIM``), else at the query's own
    source's paths and the ``top_r`` paths where source ``j``'s unnormalised posterior
    is largest, ``-inf`` elsewhere; also ``log p(t_j | z)`` at every forward path
    (``log_g``, when the caller has it).  ``sp`` and ``pool`` hold the block's ``S``
    sources, ``pos`` the queries' own sources among them."""
    b = len(rows)
    if log_g is None:
        log_g = pool.fin(sp.t[rows])  # (B, K*S)
    n_paths = pool.n_paths
    if pool.width <= _FULL_Q_DIM:
        return _q_at_pool(q, pool, b, n_paths), log_g
    first_j = pool.first_at(q.pb.loc1[rows], q.pb.scale1[rows])
    score = log_g + pool.chain[None, :] + first_j
    idx = torch.topk(score, min(top_r, n_paths), dim=1).indices
    # and always at the query's own source's paths (the diagonal's forward draws)
    k_paths = n_paths // sp.n
    own = pos[:, None] + sp.n * torch.arange(k_paths, device=rows.device)[None, :]
    idx = torch.cat([idx, own], 1)
    vals = q.log_q_at(*pool.at(idx))
    logq = torch.full_like(log_g, -math.inf)
    logq.scatter_(1, idx, vals)
    return logq, log_g


def _q_at_pool(q: _Guided, pool: _Pool, b: int, n_paths: int):
    """``log q_j`` at the first ``n_paths`` forward paths, in chunks: ``(B, n_paths)``."""
    out = torch.empty(b, n_paths, dtype=torch.float64, device=pool.own.device)
    width = pool.width
    layers, priors = pool.at(torch.arange(n_paths, device=pool.own.device))
    step = max(1, int(4e6 // max(1, b * width)))
    for c in range(0, n_paths, step):
        sl = slice(c, min(n_paths, c + step))
        out[:, sl] = q.log_q_at(
            [t[sl][None].expand(b, -1, -1) for t in layers],
            [p[sl][None].expand(b, -1, -1) for p in priors],
        )
    return out


def _log_g(pb, rows, t_last: torch.Tensor) -> torch.Tensor:
    """``log p(t_j | t_{L-1})`` for paths ``(B, R, d)`` of each query: ``(B, R)``."""
    b, r = t_last.shape[0], t_last.shape[1]
    loc, scale = pb.call(len(pb.links) - 1, t_last.reshape(b * r, -1))
    shape = (b, r, -1)
    return row_gauss_logpdf(pb.t[rows][:, None, :], loc.reshape(shape), scale.reshape(shape))


def _pair_sources(pb: _Problem, q: _Guided, rows, anchors, k: int) -> torch.Tensor:
    """Each query's ``k`` sources (not its own) of largest linearised evidence among its
    ``_PAIR_CANDIDATES`` sources under which its own path's first layer is most likely:
    ``(B, k)`` indices.

    ``q_j``'s first step linearises the chain at the query's path: ``t_j`` given layer 1
    is ``N(y; M t_1, R)``, so given source ``i`` it is ``N(y; M mu_i, C)`` with ``C = R +
    M S M^T``.  With ``w = chol(R)^-1 M`` and ``G = I + w S w^T = chol(R)^-1 C
    chol(R)^-T``, ``-2 log N = |chol(G)^-1 (chol(R)^-1 y - w mu_i)|^2 + const``.  For a
    linear-Gaussian chain this is ``log p(t_j | s_i)`` itself.  Its candidates come from
    one layer-1 kernel row at the query's path, ``log N(a_j; mu_i, diag s_i^2)``, which
    costs ``d_1`` per source against the evidence's ``d_1 d_L``.  Both scores depend on
    the data and the linearisation only, not on any draw of the estimate."""
    b, dev = len(rows), rows.device
    ar = torch.arange(b, device=dev)
    s1 = pb.layer1(anchors[0][rows])  # (B, N)
    s1[ar, rows] = -math.inf
    cand = torch.topk(s1, min(_PAIR_CANDIDATES, pb.n - 1), dim=1).indices  # (B, C)
    st = q.steps[0]
    if st.chol_r.dim() == 2:  # a diagonal R
        y = st.y / st.chol_r
    else:
        y = torch.linalg.solve_triangular(st.chol_r, st.y[:, :, None], upper=False)[:, :, 0]
    # a ranking, not part of an estimate: float32
    w32 = st.w.to(torch.float32)
    g = (w32 * st.s2[:, None, :].to(torch.float32)) @ w32.transpose(1, 2)
    g.diagonal(dim1=1, dim2=2).add_(1.0)
    lg = _cholesky(g, torch.float32)
    w32 = torch.linalg.solve_triangular(lg, w32, upper=False)  # chol(G)^-1 w, (B, d_L, d_1)
    y = torch.linalg.solve_triangular(lg, y[:, :, None].to(torch.float32), upper=False)
    u = y - w32 @ pb.loc1[cand].transpose(1, 2).to(torch.float32)  # (B, d_L, C)
    best = torch.topk(-(u * u).sum(1), k, dim=1).indices
    return cand.gather(1, best)


def _shifted_pairs(pb, sp, q: _Guided, rows, pairs, pool, log_g_pool, draws, n_s: int):
    """Terms of the entries ``(j, i)`` of each query's pair sources under the shifted
    proposal ``s_ji``: ``q_j`` with its first step started from source ``i``'s mean
    instead of the query's own.

    ``q_j``'s first step is the Kalman update of a prior mean ``mu`` (the source's) by
    the linearised likelihood of ``t_j``; its later steps depend on the drawn parent
    only.  So ``s_ji`` and ``q_j`` differ in the first step's mean alone, and ``log
    s_ji(z) = log q_j(z) - log N_1(z_1; m_j) + log N_1(z_1; m_ji)`` at any path, with
    ``N_1`` the first step's Gaussian and ``m_ji`` its mean from ``mu_i``.  For a
    linear-Gaussian chain whose first layers share one scale, ``s_ji`` is the exact
    posterior of source ``i``'s path given ``t_j``.

    ``pairs`` (``(B, k)``) are positions among the block's sources ``sp``; ``draws`` are
    ``q_j``'s draws that serve every source: their first layer ``(B, m, d_1)``, ``log
    q_j`` and ``log p(t_j | z)`` (``(B, m)``) and ``log p_i(z)`` (``(B, m, S)``).
    Returns, for the ``m`` draws of ``q_j``, the ``K`` forward paths of source ``i`` and
    ``n_s`` draws of ``s_ji`` (in that order), ``(log p_i(z) + log p(t_j | z), log
    q_j(z), log p_i(z), log s_ji(z))``, each ``(B, k, m or K or n_s)``.
    """
    z1_q, logq_q, lg_q, lp_q = draws
    b, k = pairs.shape
    m = z1_q.shape[1]
    st0 = q.steps[0]
    w_t = st0.w.transpose(1, 2)  # (B, d_1, d_L)
    inv = 1.0 / st0.s2[:, None, None, :]  # (B, 1, 1, d_1)
    mean_j = st0.mean(pb.loc1[rows][:, None, :])  # (B, 1, d_1)
    mu, sc = sp.loc1[pairs], sp.scale1[pairs]  # (B, k, d_1)
    mean_s = st0.mean(mu)  # (B, k, d_1)
    means = torch.cat([mean_j, mean_s], 1)  # (B, 1 + k, d_1)
    w_means = (means @ w_t)[:, :, None, :]  # (B, 1 + k, 1, d_L)
    means = means[:, :, None, :]

    def first(z):
        """``log N_1(z; m_j)`` and ``log N_1(z; m_ji)`` for points ``z`` (``(B, k or 1,
        r, d_1)``: pair ``c``'s points in row ``c``, or the same points for every pair):
        ``(B, 1 or k, r)`` and ``(B, k, r)``.  One product per point (``w z``); each mean
        then costs an elementwise pass."""
        wz = (z.reshape(b, -1, z.shape[-1]) @ w_t).reshape(*z.shape[:3], -1)  # (B, ., r, d_L)
        out = []
        for sl in (slice(0, 1), slice(1, None)):
            r, wr = z - means[:, sl], wz - w_means[:, sl]
            out.append(-0.5 * ((r * r * inv).sum(-1) + (wr * wr).sum(-1)) - st0.norm[:, None, None])
        return out

    # q_j's draws
    l0_j, l0_s = first(z1_q[:, None])
    lp_i = lp_q.gather(2, pairs[:, None, :].expand(b, m, k)).transpose(1, 2)  # (B, k, m)
    lq_j = logq_q[:, None, :].expand(b, k, m)
    at_q = (lp_i + lg_q[:, None, :], lq_j, lp_i, lq_j - l0_j + l0_s)
    # the forward paths of each pair's source (path c * S + i of the block's pool)
    k_paths = pool.n_paths // sp.n
    ks = torch.arange(k_paths, device=rows.device)
    idx = (ks[None, None, :] * sp.n + pairs[:, :, None]).reshape(b, k * k_paths)
    lay, pri = pool.at(idx)
    above = q.log_q_above(lay, pri)
    l0_j, l0_s = first(lay[0].reshape(b, k, k_paths, -1))
    if torch.is_tensor(above):
        above = above.reshape(b, k, k_paths)
    own = pool.own[:, pairs].permute(1, 2, 0)  # (B, k, K)
    lg = log_g_pool.gather(1, idx).reshape(b, k, k_paths)
    at_fwd = (own + lg, l0_j + above, own, l0_s + above)
    # draws of s_ji
    starts = mu[:, :, None].expand(b, k, n_s, -1).reshape(b, k * n_s, -1)
    lay, lq_s, chain, _ = q.sample(k * n_s, starts)
    lg = _log_g(pb, rows, lay[-1])
    l0_j, l0_s = first(lay[0].reshape(b, k, n_s, -1))
    lq_s = lq_s.reshape(b, k, n_s)
    lp_s = row_gauss_logpdf(lay[0], starts, sc.repeat_interleave(n_s, 1)) + chain
    lp_s = lp_s.reshape(b, k, n_s)
    at_s = (lp_s + lg.reshape(b, k, n_s), lq_s - l0_s + l0_j, lp_s, lq_s)
    return at_q, at_fwd, at_s


def _draws(pb, q: _Guided, rows, m: int):
    """``m`` draws of ``q_j`` per query: ``log q``, ``log p(t_j | z)``, the link terms
    inside the path, the layers and their parents' means (:meth:`_Guided.sample`)."""
    layers, logq, chain, priors = q.sample(m)
    return logq, _log_g(pb, rows, layers[-1]), chain, layers, priors


@dataclass
class _StepList:
    steps: list


class _Bridge:
    """Bridged proposal ``r_ji``: the construction of :class:`_Guided` linearised at a
    fresh forward path of each source instead of at the query's anchor, and started
    from source ``i``.

    For source ``i`` every step's covariance and gain depend on ``i`` only; the query
    enters the means linearly (observation ``y_i + t_j``).  So one set of steps serves
    all queries, and draw ``k`` of source ``i`` uses the same noise ``zeta_ik`` for every
    query (common random numbers), at which ``log r_ji`` is the same for every ``j``.
    For a linear chain ``r_ji`` is the exact posterior of source ``i``'s path given
    ``t_j``.  Memory: the gain of every step, the map of every step above the first
    and the stacked products of :meth:`at_draws`, three ``(N, d_L, d_k)`` tensors in
    the first step and five above it, one fewer in the step next to the query (see
    :meth:`_build`), filled a chunk of sources at a time
    (:func:`_bridge_held_bytes`).  A block of queries with subsampled sources reads
    them through :meth:`take`, which gathers a few sources' factors at a time where
    they are used, only those the product reads (:class:`_BridgeCols`).
    """

    def __init__(self, pb: _Problem, n_br: int, pool: _Pool, chunk: int | None = None):
        # linearisation points: one fresh forward path per source (not one of the pool's,
        # at which r_ji is evaluated, so that r_ji stays independent of those draws)
        path = [pb.loc1 + pb.scale1 * pb.randn(pb.loc1.shape)]
        for k in range(len(pb.links) - 1):
            loc, scale = pb.call(k, path[-1])
            path.append(loc + scale * pb.randn(loc.shape))
        n, d_l, dev = pb.n, pb.t.shape[1], pb.loc1.device
        widths = [t.shape[1] for t in path]
        self.n_br = n_br
        # the standard normals of every step's draws, in the order of one pass over all
        # sources (the factors below are built chunk by chunk of sources)
        normals = [(pb.randn((n, n_br, d)), pb.randn((n, n_br, d_l))) for d in widths]
        k_paths = pool.layers[0].shape[0] // n
        pool_t = [v.reshape(k_paths, n, -1) for v in pool.layers]
        pool_p = [v.reshape(k_paths, n, -1) for v in pool.priors]
        step = chunk or _bridge_chunk(d_l, widths)
        parts: dict = {}
        for c in range(0, n, step):
            cols = slice(c, min(n, c + step))
            got = self._build(
                pb,
                path,
                torch.arange(cols.start, cols.stop, device=dev),
                [(a[cols], b[cols]) for a, b in normals],
                [v[:, cols].transpose(0, 1) for v in pool_t],
                [v[:, cols].transpose(0, 1) for v in pool_p],
            )
            for name, v in got.items():  # one preallocated tensor per factor, filled in
                if name not in parts:
                    parts[name] = torch.empty((n, *v.shape[1:]), dtype=v.dtype, device=dev)
                parts[name][cols] = v
        steps = []
        for k, d in enumerate(widths):
            st = object.__new__(_Step)
            st.pb, st.d = pb, d
            for name in _Bridge.kept(k):
                setattr(st, name, parts[(name, k)])
            st.w = parts[("stack", k)].split(d_l, 1)[1 if k else 0]  # a view into the stack
            steps.append(st)
        self.q = _StepList(steps)
        self.zeta = [parts[("zeta", k)] for k in range(len(widths))]  # (N, n_br, d_k)
        self.stack = [parts[("stack", k)] for k in range(len(widths))]
        top = len(widths) - 1
        self.vq = [None] + [
            tuple(parts[(f, k)] for f in ("qw" if k == top else "qwg")) for k in range(1, top + 1)
        ]
        for name in ("a0", "wgp0_a", "rinv", "log_r", "pool_base", "pool_v", "pool_quad"):
            setattr(self, name, parts[name])

    @staticmethod
    def kept(k: int) -> tuple:
        """The fields of step ``k`` a bridge keeps: those :meth:`_Step.mean` needs, but
        the first step's map (its mean comes from ``a0`` and the gain, its residuals
        from the stack, once the factors are built)."""
        return tuple(f for f in _Step.MEAN if k or f != "m")

    @staticmethod
    def _build(pb: _Problem, path, rows, normals, pool_t, pool_p) -> dict:
        """The factors of the sources ``rows`` (``normals``: their steps' standard normals,
        ``pool_t`` / ``pool_p``: their forward paths' layers and parents' means,
        ``(S, K, d_k)`` each), by name (a step's by ``(name, k)``).

        ``log r_ji`` at source ``i``'s forward paths is a quadratic in ``t_j``: with ``u``
        the path minus the step mean at ``t_j = 0``, ``P`` the step precision and ``G``
        its gain, ``t - mean = u - G^T t_j``, so each step adds ``-(u'Pu)/2 - norm +
        t_j'(G P u) - t_j'(G P G^T) t_j / 2`` (``pool_base``, ``pool_v``, ``pool_quad``).
        For :meth:`at_draws`, each step's factors that multiply the same vector are
        stacked (one product per chunk): ``w`` and ``G P`` in the first step, ``G S^-1``,
        ``w`` and ``G P`` above it, with the ``d_L x d_L`` terms of
        ``v = prior M^T - y`` in ``q``, ``w``, ``g``.  In the step next to the query
        ``R`` is diagonal and the gain is exact to float64 rounding (:class:`_Step`), so
        ``G P = R^-1 M = chol(R)^-1 w``: that step stacks no ``G P`` and keeps no
        ``g``, and its ``G P`` products are ``w``'s scaled by ``rinv = chol(R)^-1``."""
        q = _Guided(pb, rows, path, tq=torch.zeros_like(pb.t[rows]), exact=True)
        out: dict = {}
        zeta = [st.noise(None, normals=e) for st, e in zip(q.steps, normals)]
        out["log_r"] = sum(st.logpdf(z, torch.zeros_like(z)) for st, z in zip(q.steps, zeta))
        # the first step's mean at t_j = 0, started from each source: (S, d_1)
        out["a0"] = q.steps[0].mean(pb.loc1[rows][:, None, :])[:, 0]
        top = len(q.steps) - 1  # the step next to the query, whose R is diagonal
        base, pool_v, quad = 0.0, 0.0, 0.0
        for k, st in enumerate(q.steps):
            for name in _Bridge.kept(k):
                out[(name, k)] = getattr(st, name)
            out[("zeta", k)] = zeta[k]
            mean0 = st.mean(pool_p[k])
            u = pool_t[k] - mean0  # (S, K, d_k)
            base = base + st.logpdf(pool_t[k], mean0)
            g_t = st.gain_t.transpose(1, 2)
            gs = st.gain_t / st.s2[:, None, :]
            if k > 0 or k < top:  # G w^T, (S, d_L, d_L): for vq, and G P below the top
                gw = st.gain_t @ st.w.transpose(1, 2)
            if k == top:  # G P = R^-1 M = chol(R)^-1 w (float64 gain, see _Step)
                gp = st.w / st.chol_r[:, :, None]
            else:
                gp = gs + gw @ st.w  # G P, (S, d_L, d_k)
            gpg = gp @ g_t  # G P G^T, (S, d_L, d_L)
            pool_v = pool_v + u @ gp.transpose(1, 2)  # (S, K, d_L)
            quad = quad + gpg
            # the factors that multiply the same vector in at_draws, stacked: G S^-1 above
            # the first step, w, and G P below the top step (the top's is w scaled)
            stack = ([gs] if k else []) + [st.w] + ([gp] if k != top else [])
            out[("stack", k)] = torch.cat(stack, 1) if len(stack) > 1 else st.w
            if k:
                out[("q", k)], out[("w", k)] = gs @ g_t, gw.transpose(1, 2)
                if k != top:
                    out[("g", k)] = gpg
        out["pool_base"], out["pool_v"], out["pool_quad"] = base, pool_v, quad
        out["rinv"] = 1.0 / q.steps[top].chol_r  # chol(R)^-1 of the top step, (S, d_L)
        # the first step's stack times its mean at t_j = 0: (S, d_L or 2 d_L)
        out["wgp0_a"] = (out[("stack", 0)] @ out["a0"][:, :, None])[:, :, 0]
        return out

    def take(self, cols: torch.Tensor) -> _BridgeCols:
        """The sources ``cols`` only: the small per-source terms copied, the per-step
        factors gathered a chunk of sources at a time where they are used."""
        return _BridgeCols(self, cols)

    def chunk(self, start: int, stop: int, use: str) -> _BridgeChunk:
        """The factors that ``use`` (``"draws"`` or ``"at_draws"``) reads, of sources
        ``start .. stop - 1`` (views)."""
        return _BridgeChunk(self, slice(start, stop), use)

    def step(self, step: int, use: str) -> int:
        """Sources per chunk: ``step`` (the factors are views, nothing is copied)."""
        return step

    def at_pool(self, pb: _Problem, rows: torch.Tensor) -> torch.Tensor:
        """``log r_ji`` at source ``i``'s forward paths for queries ``rows``: ``(B, K, N)``."""
        tq = pb.t[rows]
        lin = torch.einsum("bl,nkl->bkn", tq, self.pool_v)
        quad = torch.empty(len(rows), pb.n, dtype=torch.float64, device=tq.device)
        step = max(1, int(4e6 // max(1, len(rows) * tq.shape[1])))
        for c in range(0, pb.n, step):
            qc = self.pool_quad[c : c + step]  # (S, d_L, d_L)
            quad[:, c : c + step] = ((tq[None] @ qc) * tq[None]).sum(-1).T
        return self.pool_base.T[None] + lin - 0.5 * quad[:, None, :]

    def at_draws(self, pb: _Problem, rows, layers, priors) -> torch.Tensor:
        """``log r_ji`` at paths drawn for each query (``layers[k]`` ``(B, m, d_k)``,
        ``priors[k]`` their parents' means, ``priors[0]`` unused) for every source ``i``:
        ``(B, m, N)``, by the same quadratic in ``t_j`` as :meth:`at_pool`.

        Every term is a matrix product against per-source factors, without a
        ``(sources, paths, d_k)`` residual.  With ``r = z - mean`` the residual of a step
        at ``t_j = 0`` and ``P = S^-1 + w^T w`` its precision: in the first layer the mean
        ``a_i`` is fixed per source, so ``r^T S^-1 r`` expands into products of ``z`` and
        ``z^2`` with ``S^-1`` and ``a_i S^-1``, and ``w r = w z - w a_i``.  Above it the
        parent's mean ``p`` is the path's, ``r = u + v G`` with ``u = z - p`` (shared by
        all sources) and ``v = p M^T - y_i`` (``d_L`` per source and path), so
        ``r^T S^-1 r = u^T S^-1 u + 2 v . (G S^-1 u) + v^T (G S^-1 G^T) v`` and
        ``w r = w u + (w G^T) v``.  The term linear in ``t_j`` is ``t_j . (G P r)``.
        """
        b, m = layers[0].shape[:2]
        bm = b * m
        tq = pb.t[rows]
        tq_r = tq.repeat_interleave(m, 0).T  # (d_L, B*m): the query of each path
        out = torch.empty(b, m, pb.n, dtype=torch.float64, device=tq.device)
        z = [t.reshape(bm, -1) for t in layers]
        u = [None] + [z[k] - priors[k].reshape(bm, -1) for k in range(1, len(z))]
        width = max(tq.shape[1], *(st.d for st in self.q.steps))
        step = max(1, int(1.6e7 // max(1, bm * width)))
        step = self.step(step, "at_draws")
        d_l = tq.shape[1]
        for c in range(0, pb.n, step):
            cols = slice(c, min(pb.n, c + step))
            part = self.chunk(cols.start, cols.stop, "at_draws")  # these sources' factors
            val = 0.0
            for k, st in enumerate(part.q.steps):
                inv = 1.0 / st.s2  # (S, d_k)
                if k == 0:
                    a = part.a0  # (S, d_1)
                    diag = (
                        inv @ (z[0] * z[0]).T
                        - 2.0 * (a * inv) @ z[0].T
                        + (a * a * inv).sum(1, keepdim=True)
                    )  # (S, B*m)
                    # w (and G P below the top step) in one product: (S, 1 or 2 d_L, B*m)
                    both = _stacked_mm(part.stack[0], z[0].T) - part.wgp0_a[:, :, None]
                    wr, *gpr = both.split(d_l, 1)  # (S, d_L, B*m) each
                else:
                    qq, wg, *gpg = part.vq[k]
                    prior = priors[k].reshape(bm, -1)
                    v = _stacked_mm(st.m, prior.T) - st.y[:, :, None]  # (S, d_L, B*m)
                    # G S^-1, w (and G P below the top step): (S, 2 or 3 d_L, B*m)
                    gsu, wu, *gpr = _stacked_mm(part.stack[k], u[k].T).split(d_l, 1)
                    diag = inv @ (u[k] * u[k]).T + 2.0 * (gsu * v).sum(1) + ((qq @ v) * v).sum(1)
                    wr = wu + wg @ v
                    if gpr:  # below the top step: G P r = G P u + (G P G^T) v
                        gpr[0] = gpr[0] + gpg[0] @ v
                # lin = G P r; at the top step (no G P stacked) R^-1 M r = chol(R)^-1 (w r)
                lin = gpr[0] if gpr else wr * part.rinv[:, :, None]
                val = (
                    val
                    - 0.5 * (diag + (wr * wr).sum(1))
                    - st.norm[:, None]
                    + (lin * tq_r[None]).sum(1)
                )
            quad = ((tq[None] @ part.pool_quad) * tq[None]).sum(-1)  # (S, B)
            val = val - 0.5 * quad.repeat_interleave(m, 1)  # (S, B*m)
            out[:, :, cols] = val.T.reshape(b, m, -1)
        return out

    def draws(self, pb: _Problem, rows: torch.Tensor, q: _Guided):
        """At the bridged draws ``z`` (``(B, n_br, N)`` each): ``log p_i(z) + log p(t_j |
        z)``, ``log p_i(z)`` and ``log q_j(z)`` (``log r_ji(z)`` is ``log_r[i, k]``)."""
        b, n, nb = len(rows), pb.n, self.n_br
        tq = pb.t[rows]
        tq_r = tq.repeat_interleave(nb, 0)[None]  # (1, B*nb, d_L), row order (query, draw)
        out = [torch.empty(b, nb, n, dtype=torch.float64, device=pb.loc1.device) for _ in "pgq"]
        q_mean0 = q.steps[0].mean(q.pb.loc1[q.rows][:, None, :])  # (B, 1, d_1)
        width = max(tq.shape[1], *(st.d for st in self.q.steps))
        step = max(1, int(4e6 // max(1, b * nb * width)))
        step = self.step(step, "draws")
        for c in range(0, n, step):
            cols = slice(c, min(n, c + step))
            part = self.chunk(cols.start, cols.stop, "draws")  # these sources' factors
            s = cols.stop - cols.start

            def draw(k, mean, part=part, s=s):  # mean (S, B, 1 or nb, d)
                return (mean + part.zeta[k][:, None]).reshape(s, b * nb, -1)

            def by_query(v, s=s):  # (S, B*nb, d) -> (B, S*nb, d)
                return v.reshape(s, b, nb, -1).transpose(0, 1).reshape(b, s * nb, -1)

            # (S, B, d_1): the first step's mean, linear in the query
            mean = part.a0[:, None, :] + tq[None] @ part.q.steps[0].gain_t
            t = draw(0, mean[:, :, None, :])
            lp = row_gauss_logpdf(t, pb.loc1[cols][:, None, :], pb.scale1[cols][:, None, :])
            lq = q.steps[0].logpdf(by_query(t), q_mean0)  # (B, S*nb)
            for k in range(1, len(part.q.steps)):
                loc, scale = (v.reshape(s, b * nb, -1) for v in pb.call(k - 1, t.flatten(0, 1)))
                t = draw(k, part.q.steps[k].mean(loc, tq_r).reshape(s, b, nb, -1))
                lp = lp + row_gauss_logpdf(t, loc, scale)
                lq = lq + q.steps[k].logpdf(by_query(t), q.steps[k].mean(by_query(loc)))
            loc, scale = (
                v.reshape(s, b * nb, -1) for v in pb.call(len(pb.links) - 1, t.flatten(0, 1))
            )
            lg = row_gauss_logpdf(tq_r, loc, scale)
            out[0][:, :, cols] = (lp + lg).reshape(s, b, nb).permute(1, 2, 0)
            out[1][:, :, cols] = lp.reshape(s, b, nb).permute(1, 2, 0)
            out[2][:, :, cols] = lq.reshape(b, s, nb).transpose(1, 2)
        return out[0], out[1], out[2]


#: the per-step factors and per-source terms each product of :class:`_Bridge` reads:
#: ``(fields of the first step, fields of the steps above it, other factors)``
_CHUNK_FIELDS = {
    "draws": (("gain_t",), ("y", "m", "gain_t"), ("zeta",)),
    "at_draws": (("s2", "norm"), ("s2", "y", "m", "norm"), ("stack", "vq")),
}
_SMALL = ("a0", "wgp0_a", "rinv", "pool_quad")  # per-source terms of a chunk: at most d_L^2 each


class _BridgeChunk:
    """The factors of :class:`_Bridge` that :meth:`_Bridge.draws` or
    :meth:`_Bridge.at_draws` (``use``) reads, for the sources ``idx`` of ``big`` (a
    slice: views; an index tensor: copies), and the small per-source terms ``_SMALL``
    at ``small_idx`` of ``small`` (default: ``big`` at ``idx``)."""

    def __init__(self, big: _Bridge, idx, use: str, small=None, small_idx=None):
        first, above, other = _CHUNK_FIELDS[use]
        self.q = _StepList(
            [st.take(idx, above if k else first) for k, st in enumerate(big.q.steps)]
        )
        if "zeta" in other:
            self.zeta = [z[idx] for z in big.zeta]
        if "stack" in other:
            self.stack = [f[idx] for f in big.stack]
            self.vq = [None] + [tuple(f[idx] for f in fs) for fs in big.vq[1:]]
        small, small_idx = (big, idx) if small is None else (small, small_idx)
        for name in _SMALL:
            setattr(self, name, getattr(small, name)[small_idx])


class _BridgeCols(_Bridge):
    """:class:`_Bridge` restricted to the sources ``cols`` of a block, without a copy
    of the per-step factors: :meth:`chunk` gathers the ones its product reads a few
    sources at a time (about ``_GATHER_ELEMS`` elements), which the products then read
    from the cache, instead of one copy of every source's factors per block.  The terms
    of ``log r`` at the forward paths and at the bridged draws and the small
    per-source terms (``_SMALL``) are copied whole."""

    def __init__(self, base: _Bridge, cols: torch.Tensor):
        self.base, self.cols = base, cols
        self.n_br, self.q = base.n_br, base.q  # q: the steps' widths
        for name in ("log_r", "pool_base", "pool_v", *_SMALL):
            setattr(self, name, getattr(base, name)[cols])
        self._most = {}
        for use, (first, above, other) in _CHUNK_FIELDS.items():
            per_source = sum(
                getattr(st, f)[0].numel()
                for k, st in enumerate(base.q.steps)
                for f in (above if k else first)
            )
            if "zeta" in other:
                per_source += sum(z[0].numel() for z in base.zeta)
            if "stack" in other:
                per_source += sum(f[0].numel() for f in base.stack)
                per_source += sum(f[0].numel() for fs in base.vq[1:] for f in fs)
            self._most[use] = max(1, int(_GATHER_ELEMS // per_source))

    def chunk(self, start: int, stop: int, use: str) -> _BridgeChunk:
        return _BridgeChunk(self.base, self.cols[start:stop], use, self, slice(start, stop))

    def step(self, step: int, use: str) -> int:
        """Sources per chunk: at most ``step``, and about ``_GATHER_ELEMS`` elements of
        the factors ``use`` reads."""
        return min(step, self._most[use])


def _block(pb, sp, rows, pos, q, pool, n_is, n_fwd, top_r, bridge, logw, log_g=None, pairs=None):
    """``(B, S)`` log densities of the block's queries ``rows`` at its ``S`` sources
    (``sp``, ``pool`` and ``bridge`` restricted to them; ``pos``: each query's own
    source among them), with all draws and with the first half, each off-diagonal
    entry plus its source weight ``logw[0]`` / ``logw[1]`` ``(B, S)``.  Without
    bridging, the entries at ``pairs`` (``(B, k)`` positions) also balance the shifted
    draws of :func:`_shifted_pairs`."""
    n, b = sp.n, len(rows)
    ar = torch.arange(b, device=rows.device)
    # the query's own source gets DIAG_FACTOR * n_is draws of q_j; the first m of them
    # also serve every other source (one layer-1 kernel row each): n_is without
    # bridging, _BRIDGE_Q with it (where r_ji must also be evaluated at them)
    logq_d, log_g_d, chain_d, layers_d, priors_d = _draws(pb, q, rows, _DIAG_FACTOR * n_is)
    first_d = layers_d[0]
    loc_j, scale_j = pb.loc1[rows][:, None], pb.scale1[rows][:, None]
    lp_d = row_gauss_logpdf(first_d, loc_j, scale_j) + chain_d
    logq_pool, log_g_pool = _pool_logq(sp, q, pool, rows, pos, top_r, log_g)
    m = n_is if bridge is None else min(n_is, _BRIDGE_Q)
    k1 = sp.layer1(first_d[:, :m].reshape(b * m, -1)).reshape(b, m, n)
    lp = k1 + chain_d[:, :m, None]  # log p_i(z) at the q_j draws
    pair_sets = None
    if pairs is not None and bridge is None:
        draws = (first_d[:, :m], logq_d[:, :m], log_g_d[:, :m], lp)
        pair_sets = _shifted_pairs(pb, sp, q, rows, pairs, pool, log_g_pool, draws, _PAIR_DRAWS)
    if bridge is not None:
        r_at_q = bridge.at_draws(
            sp, rows, [t[:, :m] for t in layers_d], [p if p is None else p[:, :m] for p in priors_d]
        )
        lpg_br, lp_br, lq_br = bridge.draws(sp, rows, q)
        r_pool = bridge.at_pool(sp, rows)  # (B, K, S)
    res = []
    for frac in (1, 2):
        k_used, md, mu = n_fwd // frac, _DIAG_FACTOR * n_is // frac, max(1, m // frac)
        lk, lm = math.log(k_used), math.log(mu)
        g_pool = log_g_pool.reshape(b, n_fwd, n)[:, :k_used]
        q_pool = logq_pool.reshape(b, n_fwd, n)[:, :k_used]
        own = pool.own[:k_used][None]
        num = lp[:, :mu] + log_g_d[:, :mu, None]  # q_j's draws for every source
        if bridge is None:  # off the diagonal: balance of q_j and the forward paths
            den = torch.logaddexp(lm + logq_d[:, :mu, None], lk + lp[:, :mu])
            off = [num - den, own + g_pool - torch.logaddexp(lm + q_pool, lk + own)]
        else:  # off the diagonal: balance of q_j, the bridged draws and the forward paths
            nb = bridge.n_br // frac
            lb, lr = math.log(nb), bridge.log_r.T[None, :nb]

            def den3(lq, lr_, lp_, lm=lm, lb=lb, lk=lk):
                return _logsumexp_parts([lm + lq, lb + lr_, lk + lp_])

            off = [
                num - den3(logq_d[:, :mu, None], r_at_q[:, :mu], lp[:, :mu]),
                lpg_br[:, :nb] - den3(lq_br[:, :nb], lr, lp_br[:, :nb]),
                own + g_pool - den3(q_pool, r_pool[:, :k_used], own),
            ]
        if logw is not None:  # sources standing for a random share of the others
            off = [t + logw[frac - 1][:, None, :] for t in off]
        pair_terms = []
        if pair_sets is not None:  # the pairs balance q_j, the forward paths and s_ji
            counts = (mu, k_used, _PAIR_DRAWS // frac)
            lc = [math.log(c) for c in counts]
            for (f, lq_j, lp_i, lq_s), use in zip(pair_sets, counts):
                f, lq_j, lp_i, lq_s = (v[..., :use] for v in (f, lq_j, lp_i, lq_s))
                den = _logsumexp_parts([lc[0] + lq_j, lc[1] + lp_i, lc[2] + lq_s])
                pair_terms.append(f - den)
            if logw is not None:
                w_p = logw[frac - 1].gather(1, pairs)[:, :, None]
                pair_terms = [t + w_p for t in pair_terms]
            is_pair = torch.zeros(b, n, dtype=torch.bool, device=rows.device)
            is_pair[ar[:, None], pairs] = True
            off = [t.masked_fill(is_pair[:, None, :], -math.inf) for t in off]
        out = _logsumexp_parts([torch.logsumexp(t, 1) for t in off])  # (B, S)
        if pair_terms:
            out[ar[:, None], pairs] = _logsumexp_parts([torch.logsumexp(t, 2) for t in pair_terms])
        # the diagonal with all of its draws
        w_d = lp_d[:, :md] + log_g_d[:, :md]
        w_d = w_d - torch.logaddexp(math.log(md) + logq_d[:, :md], lk + lp_d[:, :md])
        own_j = own[0][:, pos].T  # (B, k_used): paths of the query's own source
        den_fd = torch.logaddexp(math.log(md) + q_pool[ar, :, pos], lk + own_j)
        fwd_d = torch.logsumexp(own_j + g_pool[ar, :, pos] - den_fd, 1)
        out[ar, pos] = torch.logaddexp(torch.logsumexp(w_d, 1), fwd_d)
        res.append(out)
        if frac == 1:
            sums = torch.stack([_log_sums(*off, *pair_terms, w_d), _log_sums(w_d)], 1)
            sums = sums.flatten(1)
    return res[0], res[1], sums


def _logsumexp_parts(parts: list[torch.Tensor]) -> torch.Tensor:
    """``log sum exp`` across tensors of one shape, elementwise (pairwise, no stack)."""
    out = parts[0]
    for p in parts[1:]:
        out = torch.logaddexp(out, p)
    return out


def _log_sums(*ws: torch.Tensor) -> torch.Tensor:
    """``log sum w`` and ``log sum w^2`` over each row of the log weights ``ws`` taken
    together (``(B, ...)`` each, the dimensions after the first flattened): ``(B, 2)``,
    without concatenating them."""
    ws = [w.flatten(1) for w in ws]
    return torch.stack(
        [
            _logsumexp_parts([torch.logsumexp(w, 1) for w in ws]),
            _logsumexp_parts([torch.logsumexp(2 * w, 1) for w in ws]),
        ],
        1,
    )


def _ess(log_sums: torch.Tensor) -> torch.Tensor:
    """Effective sample size ``(sum w)^2 / sum w^2`` from :func:`_log_sums`."""
    return torch.exp(2 * log_sums[..., 0] - log_sums[..., 1])


@dataclass
class OwnLogDensity:
    """Estimated ``log p(t_j | s_j)``, each query at its own source only.

    Attributes
    ----------
    value : Tensor, shape (Q,), float64
        With all draws (unbiased for the density; ``E[value] <= log p``).
    half : Tensor, shape (Q,), float64
        With the first half of the draws of both proposals.
    upper : Tensor, shape (Q,), float64
        With the path that produced the query among the draws: ``E[upper] >= log p``
        (NaN when no such paths were given).
    ess : Tensor, shape (Q,)
        Effective sample size of the proposal draws.
    n_is, n_fwd : int
        The settings used: each query had ``4 n_is`` draws of ``q_j`` (as the diagonal of
        :func:`deep_log_density`) and ``n_fwd`` forward paths of its source.
    """

    value: torch.Tensor
    half: torch.Tensor
    upper: torch.Tensor
    ess: torch.Tensor
    n_is: int
    n_fwd: int


def own_log_density(
    first_loc: torch.Tensor,
    first_scale: torch.Tensor,
    links: list[Link],
    queries: torch.Tensor,
    anchors: list[torch.Tensor],
    *,
    paths: list[torch.Tensor] | None = None,
    groups: torch.Tensor | None = None,
    n_is: int = 32,
    n_fwd: int = 16,
    generator: torch.Generator,
    chunk_size: int | None = None,
    dtype: torch.dtype = torch.float32,
    progress=None,
) -> OwnLogDensity:
    """Estimate ``log p(t_j | s_j)`` through ``len(links)`` Gaussian links, query by query.

    The diagonal of :func:`deep_log_density` without the other sources: query ``j`` has
    its own first layer ``N(first_loc[j], diag first_scale[j]^2)`` and is estimated by
    the balance heuristic over ``M = 4 n_is`` draws of the guided proposal ``q_j`` and
    ``K = n_fwd`` forward paths of its source,

    .. math:: \\hat p_j = \\sum_{z} \\frac{p_j(z)\\, p(t_j \\mid z)}
              {M q_j(z) + K p_j(z)},

    an unbiased estimate of the density, so ``E log \\hat p_j <= log p(t_j | s_j)``.

    **Upper estimate** (with ``paths``).  When ``paths[j]`` is an exact draw ``z*`` from
    the path's posterior ``p(z | t_j, s_j)`` (the path that produced ``t_j``) and the
    proposals do not depend on it, one draw of a stratum chosen with probability
    ``M q_j(z*) / (M q_j(z*) + K p_j(z*))`` (``q_j``; otherwise the forward paths) is
    replaced by ``z*``.  The draws then come from the extended target whose ratio to the
    proposals' joint density is ``p_hat / p``, so ``E log p_hat_up - log p`` is a
    Kullback-Leibler divergence and ``E log p_hat_up >= log p(t_j | s_j)`` (the
    posterior-sample half of bidirectional Monte Carlo; Grosse et al. 2015).  A proposal
    linearised at ``z*`` itself would break this, so ``anchors`` must not be ``paths``:
    the source's mean path (each layer at the mean given its parent's mean) serves.

    Parameters
    ----------
    first_loc, first_scale : Tensor, shape (Q, d_1)
        Layer-1 conditional of each query's source.
    links : list of callables
        As for :func:`deep_log_density` (shared by every query).
    queries : Tensor, shape (Q, d_L)
    anchors : list of Tensor, shapes (Q, d_1) ... (Q, d_{L-1})
        A path through the intermediate layers per query, the linearisation point of
        ``q_j``.
    paths : list of Tensor, shapes as ``anchors``, optional
        The path that produced each query, for ``upper`` (NaN without it).
    groups : Tensor of int64, shape (Q,), optional
        Queries with the same group have the same source (the same first layer) and, in
        one block, share its forward paths (default: every query its own).
    n_is, n_fwd : int
        Even, >= 2.
    generator : torch.Generator
    chunk_size : int, optional
        Queries per block (default: about ``2e7`` elements per large tensor).
    dtype : torch.dtype
        Dtype the links are called with.
    progress : callable, optional
        Called with the number of queries finished after each block.

    Returns
    -------
    OwnLogDensity
    """
    _check_settings(links, anchors, n_is, n_fwd, 0, None, 2)
    pb = _Problem(first_loc, first_scale, links, queries, generator, dtype)
    n, dev = pb.n, pb.loc1.device
    md = _DIAG_FACTOR * n_is
    widest = max(max(t.shape[1] for t in anchors), queries.shape[1])
    if chunk_size is None:
        chunk_size = max(1, min(n, int(2e7 // ((md + n_fwd) * widest + widest * widest))))
    out = {k: torch.empty(n, dtype=torch.float64, device=dev) for k in ("v", "h", "u", "e")}
    for start in range(0, n, chunk_size):
        rows = torch.arange(start, min(n, start + chunk_size), device=dev)
        for key, val in zip("vhue", _own_block(pb, rows, anchors, paths, md, n_fwd, groups)):
            out[key][rows] = val
        if progress is not None:
            progress(len(rows))
    return OwnLogDensity(out["v"], out["h"], out["u"], out["e"], n_is, n_fwd)


def _path_terms(pb: _Problem, q: _Guided, rows, paths):
    """At one given path per query: ``log p_j(z) + log p(t_j | z)``, ``log p_j(z)`` and
    ``log q_j(z)``, each ``(B,)``."""
    a = [t[rows].to(torch.float64) for t in paths]
    lp = row_gauss_logpdf(a[0], pb.loc1[rows], pb.scale1[rows])
    priors = [None]
    for k in range(1, len(a)):
        loc, scale = pb.call(k - 1, a[k - 1])
        lp = lp + row_gauss_logpdf(a[k], loc, scale)
        priors.append(loc[:, None, :])
    loc, scale = pb.call(len(a) - 1, a[-1])
    lg = row_gauss_logpdf(pb.t[rows], loc, scale)
    lq = q.log_q_at([t[:, None, :] for t in a], priors)[:, 0]
    return lp + lg, lp, lq


def _own_block(pb: _Problem, rows, anchors, paths, md: int, n_fwd: int, groups=None):
    """Full, half and upper estimates and the ESS of :func:`own_log_density` for ``rows``."""
    b = len(rows)
    q = _Guided(pb, rows, anchors)
    logq_d, log_g_d, chain_d, layers_d, _ = _draws(pb, q, rows, md)
    lp_d = row_gauss_logpdf(layers_d[0], pb.loc1[rows][:, None], pb.scale1[rows][:, None])
    lp_d = lp_d + chain_d
    # forward paths per source: one set for the queries of a block that share a group
    grp = rows if groups is None else groups[rows]
    uniq, inv = torch.unique(grp, return_inverse=True)
    rep = torch.empty(len(uniq), dtype=torch.long, device=rows.device).scatter_(0, inv, rows)
    pool = _Pool(pb.take(rep), n_fwd)  # path k of group u is row k * U + u
    idx = torch.arange(n_fwd, device=rows.device)[None, :] * len(uniq) + inv[:, None]  # (B, K)
    lay, pri = pool.at(idx)
    q_f = q.log_q_at(lay, pri)  # (B, K)
    g_f = row_gauss_logpdf(pb.t[rows][:, None, :], pool.fin_loc[idx], pool.fin_scale[idx])
    own = pool.own.T[inv]  # (B, K): log p_j(z) at the forward paths
    upper = torch.full((b,), math.nan, dtype=torch.float64, device=rows.device)
    if paths is not None:
        f_a, p_a, q_a = _path_terms(pb, q, rows, paths)
    res = []
    for frac in (1, 2):
        m_u, k_u = md // frac, n_fwd // frac
        lm, lk = math.log(m_u), math.log(k_u)
        w_d = lp_d[:, :m_u] + log_g_d[:, :m_u]
        w_d = w_d - torch.logaddexp(lm + logq_d[:, :m_u], lk + lp_d[:, :m_u])
        w_f = own[:, :k_u] + g_f[:, :k_u]
        w_f = w_f - torch.logaddexp(lm + q_f[:, :k_u], lk + own[:, :k_u])
        res.append(torch.logaddexp(torch.logsumexp(w_d, 1), torch.logsumexp(w_f, 1)))
        if frac == 1:
            ess = torch.exp(2 * torch.logsumexp(w_d, 1) - torch.logsumexp(2 * w_d, 1))
        if frac == 1 and paths is not None:
            # the query's own path replaces the last draw of a stratum chosen in proportion
            # to that stratum's share of the mixture density at the path
            w_a = f_a - torch.logaddexp(lm + q_a, lk + p_a)
            p_q = torch.sigmoid((lm + q_a) - (lk + p_a))
            u = torch.rand(b, generator=pb.gen, dtype=torch.float64, device=rows.device)
            in_q = (u < p_q)[:, None]
            w_d_up, w_f_up = w_d.clone(), w_f.clone()
            w_d_up[:, -1] = torch.where(in_q[:, 0], w_a, w_d[:, -1])
            w_f_up[:, -1] = torch.where(in_q[:, 0], w_f[:, -1], w_a)
            upper = torch.logaddexp(torch.logsumexp(w_d_up, 1), torch.logsumexp(w_f_up, 1))
    return res[0], res[1], upper, ess


def mean_path(first_loc: torch.Tensor, links: list[Link], dtype=torch.float32) -> list:
    """The intermediate layers of each source's mean path (float64 tensors of shapes
    ``(Q, d_1)`` to ``(Q, d_{L-1})``): ``first_loc``, then each link's mean at the
    previous layer's value.

    A linearisation point for :func:`own_log_density` that depends on the source only.
    """
    path = [first_loc.to(torch.float64)]
    for k in range(len(links) - 1):
        loc, _ = _link_params(links[k], path[-1].to(dtype))
        path.append(loc)
    return path
