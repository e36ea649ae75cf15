"""A check that the unbridged deep densities reach the other sources: bridged draws on a
few queries at a few hundred sources.

The convergence rule of :func:`stochmi.layer_mi` reads the remaining bias of an
estimate of ``L[j, i] = log p(t_j | s_i)`` (:func:`stochmi.layers.deep.deep_log_density`)
off the difference between all draws and half of them.  That difference cannot show a
region of paths that neither proposal reaches: when the sources lie apart at the first
layer and the layers above it are informative about it (wide, noisy-then-precise
layers), the query proposal ``q_j`` stays near source ``j``'s path and source ``i``'s
forward paths rarely produce ``t_j``.  Both halves then miss the same mass, so they
agree, and ``p(t_j | s_i)`` is underestimated for ``i != j``: the MI comes out too high,
with a small half-versus-full difference.  The bridged proposal ``r_ji`` is linearised at
source ``i``'s own path and reaches that mass.

:func:`audit_densities` compares the two on a random set ``J`` of ``A`` queries.  Each
query ``j`` is evaluated at ``T_j``, its own source and its ``k`` largest entries in the
estimate under audit, and at ``R``, ``r`` uniformly drawn sources shared by all queries.
Both estimators run on the same sub-problem (the sources ``C``, the union of these),
the unbridged one at the settings of the estimate under audit, the bridged one at the
settings of a bridged round (twice the draws and ``n_bridge`` bridged draws per source).
For each, query ``j``'s MI term is

.. math:: \\hat L_{jj} - \\log \\frac{1}{N}\\Big(\\sum_{i \\in T_j} e^{\\hat L_{ji}}
          + \\frac{N - |T_j|}{|R \\setminus T_j|} \\sum_{i \\in R \\setminus T_j}
          e^{\\hat L_{ji}}\\Big),

a Horvitz-Thompson stand-in for the full marginal with the same sources and weights
for both estimators.  The paired differences ``d_j`` (unbridged minus bridged) have mean
``D`` and standard error ``se``.  ``D`` is not the remaining bias of the whole row: the
restricted marginal, with a few random sources at large weights, is noisier than the
full one, so its logarithm is biased lower, and more for the unbridged estimator.  On
the trained MNIST networks, whose rows are within a few percent, ``D`` comes out at
-0.1 to 0.45 nats with ``se`` 0.07-0.2 (32 queries).  The audit counts as missed when
``|D| - 3 se`` exceeds ``max(tolerance, 5% of the value)``: it catches gross misses
(a 20-96-64 linear chain whose first round is 27% high gives ``D`` = 0.9-1.4 nats), and
the half-versus-full rule handles the rest.  It costs two density estimates at a few
hundred sources, whatever ``N``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stochmi.layers.deep import deep_log_density

__all__ = ["Audit", "audit_densities"]

AUDIT_QUERIES = 32  # queries audited (A)
AUDIT_TOP = 8  # each query's largest entries of the audited estimate (k)
AUDIT_RANDOM = 64  # sources drawn uniformly, shared by the queries (r)
AUDIT_REL = 0.05  # share of the value a difference must exceed (beyond 3 se) to count


@dataclass
class Audit:
    """Result of :func:`audit_densities`.

    Attributes
    ----------
    queries, sources : int
        Queries audited and sources of the sub-problem.
    difference : float
        Mean over the queries of the unbridged minus the bridged MI term (nats).
    stderr : float
        Standard error of ``difference``.
    """

    queries: int
    sources: int
    difference: float
    stderr: float

    def missed(self, tolerance: float, value: float) -> bool:
        """Whether ``|difference|`` exceeds ``max(tolerance, AUDIT_REL * |value|)`` by more
        than 3 standard errors (``value``: the MI of the estimate under audit)."""
        return abs(self.difference) - 3 * self.stderr > max(tolerance, AUDIT_REL * abs(value))


def audit_densities(
    first_loc: torch.Tensor,
    first_scale: torch.Tensor,
    links: list,
    queries: torch.Tensor,
    anchors: list[torch.Tensor],
    L: torch.Tensor,
    *,
    n_is: int,
    n_fwd: int,
    n_bridge: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    rows: torch.Tensor | None = None,
) -> Audit:
    """Unbridged against bridged densities on a few queries (module docstring).

    Parameters
    ----------
    first_loc, first_scale, links, queries, anchors
        The problem, as for :func:`~stochmi.layers.deep.deep_log_density` (``N``
        sources; ``first_scale`` broadcastable to ``first_loc``).
    L : Tensor, shape (N, N)
        The estimate under audit (``-inf`` where not evaluated); it ranks each audited
        query's sources.
    n_is, n_fwd : int
        The settings of the estimate under audit; the bridged estimate uses twice each.
    n_bridge : int
        Bridged draws per source of the bridged estimate (even, >= 2).
    generator : torch.Generator
        Picks the queries and random sources and drives both estimates.
    dtype : torch.dtype
        Dtype the links are called with.
    rows : Tensor of int64, optional
        The queries the estimate covers (default: all ``N``); the audited ones are drawn
        from them.

    Returns
    -------
    Audit
    """
    n, dev = first_loc.shape[0], first_loc.device
    scale = torch.broadcast_to(first_scale, first_loc.shape)
    among = torch.arange(n, device=dev) if rows is None else rows
    pick = among[torch.randperm(len(among), generator=generator, device=dev)[:AUDIT_QUERIES]]
    a = len(pick)
    ar = torch.arange(a, device=dev)
    ranked = L[pick].clone()
    ranked[ar, pick] = -math.inf
    top = ranked.topk(min(AUDIT_TOP, n - 1), dim=1).indices  # (A, k)
    rand = torch.randperm(n, generator=generator, device=dev)[:AUDIT_RANDOM]
    cols = torch.unique(torch.cat([pick, top.flatten(), rand]))  # sorted
    pos = torch.searchsorted(cols, pick)
    logw = _weights(n, cols, pos, torch.searchsorted(cols, top), torch.searchsorted(cols, rand))
    sub = (first_loc[cols], scale[cols], links, queries[cols], [t[cols] for t in anchors])
    common = {"rows": pos, "n_top": None, "generator": generator, "dtype": dtype}
    terms = []
    for n_is_, n_fwd_, n_br in ((n_is, n_fwd, 0), (2 * n_is, 2 * n_fwd, n_bridge)):
        est = deep_log_density(*sub, n_is=n_is_, n_fwd=n_fwd_, n_bridge=n_br, **common)
        lr = est.L[pos]  # (A, |C|)
        marg = torch.logsumexp(lr + logw, 1) - math.log(n)
        terms.append(lr[ar, pos] - marg)
    d = terms[0] - terms[1]
    se = float(d.std(unbiased=True)) / math.sqrt(a) if a > 1 else math.inf
    return Audit(a, len(cols), float(d.mean()), se)


def _weights(n: int, cols, pos, top, rand) -> torch.Tensor:
    """``(A, |C|)`` log weights of the sub-problem's sources in each query's marginal:
    0 on ``T_j`` (the query's own source and ``top[j]``), ``log((N - |T_j|) / |R \\ T_j|)``
    on the random sources ``R`` outside ``T_j``, ``-inf`` elsewhere; with every source in
    the sub-problem, 0 everywhere."""
    a, c = len(pos), len(cols)
    dev = cols.device
    if c == n:
        return torch.zeros((a, c), dtype=torch.float64, device=dev)
    ar = torch.arange(a, device=dev)
    exact = torch.zeros((a, c), dtype=torch.bool, device=dev)
    exact[ar, pos] = True
    exact[ar[:, None], top] = True
    in_r = torch.zeros((a, c), dtype=torch.bool, device=dev)
    in_r[:, rand] = True
    in_r &= ~exact
    n_exact = exact.sum(1, keepdim=True)
    scale = (n - n_exact).to(torch.float64) / in_r.sum(1, keepdim=True).clamp(min=1)
    logw = torch.full((a, c), -math.inf, dtype=torch.float64, device=dev)
    logw[exact] = 0.0
    return torch.where(in_r, torch.log(scale).expand(a, c), logw)
