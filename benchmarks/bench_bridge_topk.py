"""How much of the bridged round's correction sits in each query's k best sources.

A design measurement for bridging only a few (query, source) pairs.  On the
``bench_ratio.py`` checkpoints of ``noisy_mlp`` (sigma 1, trained 3 epochs or
untrained), N shared MNIST test images and one draw of every layer, three independent
estimates of ``L[j, i] = log p(t_j | s_i)`` for ``X -> h2`` and ``X -> h3``, every query
at every source (no subsampling):

* ``L_first``: an unbridged first round (32 proposal draws, 16 forward paths);
* ``L_bridged``: a bridged round at every pair (64 / 32 draws, 4 bridged per source);
* ``L_rank``: another unbridged first round, which only ranks each query's sources
  (so the ranking is independent of both estimates; ranking by ``L_first`` itself
  would pick the entries whose noise is up).

For each k the table gives the MI of ``L_first`` with each query's k best other
sources (by ``L_rank``) taken from ``L_bridged``, and the median share of the
bridged off-diagonal marginal density that those k sources carry.  Where the share
reaches 1 the mixed MI reaches the bridged one: bridging those pairs would be enough.

    python benchmarks/bench_bridge_topk.py                         # N = 300 and 1,000
    python benchmarks/bench_bridge_topk.py --n 300 --cases untrained
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_ratio import _checkpoint  # noqa: E402

import stochmi  # noqa: E402
from stochmi.core.from_matrix import mi_terms_from_log_density  # noqa: E402
from stochmi.layers.chain import Chain  # noqa: E402
from stochmi.layers.deep import deep_log_density, normal_params  # noqa: E402

KS = (4, 8, 16, 32, 64, 128)


def _mi(log_density: torch.Tensor) -> float:
    return float(mi_terms_from_log_density(log_density)[0].mean())


def _run(args, seed: int, effort: int = 1, n_bridge: int = 0) -> tuple[torch.Tensor, float]:
    """``L`` of one ``deep_log_density`` call at every source, and its seconds."""
    t0 = time.perf_counter()
    res = deep_log_density(
        *args,
        n_is=32 * effort,
        n_fwd=16 * effort,
        n_bridge=n_bridge,
        n_top=None,
        generator=torch.Generator().manual_seed(seed),
    )
    return res.L, time.perf_counter() - t0


def _case(trained: bool, n: int) -> None:
    model, _, _ = stochmi.load_checkpoint(_checkpoint(trained))
    x = stochmi.load_mnist("shared-test", n=n, seed=0).x
    with torch.no_grad():
        chain = Chain(
            model, x, model.layer_sites, [], [], 1, "single", None, torch.Generator().manual_seed(0)
        )
    links = [lambda p, s=s: model.conditional(s, p) for s in model.layer_sites[1:]]
    loc, scale = normal_params(chain.conds[0])
    label = "trained 3 epochs" if trained else "untrained"
    for l, name in ((1, "h2"), (2, "h3")):
        args = (loc, scale, links[:l], chain.values[l], chain.values[:l])
        first, t_first = _run(args, 1)
        bridged, t_bridged = _run(args, 2, effort=2, n_bridge=4)
        rank, _ = _run(args, 3)
        rank.fill_diagonal_(-math.inf)
        order = torch.argsort(rank, 1, descending=True)
        off = bridged.clone()
        off.fill_diagonal_(-math.inf)
        total = torch.logsumexp(off, 1)
        cells = []
        for k in KS:
            idx = order[:, : min(k, n - 1)]
            mixed = first.clone()
            mixed.scatter_(1, idx, bridged.gather(1, idx))
            share = torch.exp(torch.logsumexp(off.gather(1, idx), 1) - total).median()
            cells.append(f"{_mi(mixed):.3f} ({float(share):.2f})")
        print(
            f"| {label} | {n:,} | I(X;{name}) | {_mi(first):.3f} ({t_first:.0f} s) "
            f"| {_mi(bridged):.3f} ({t_bridged:.0f} s) | " + " | ".join(cells) + " |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--cases", nargs="+", default=["trained", "untrained"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, load {os.getloadavg()[0]:.1f}\n")
    head = " | ".join(f"k = {k}" for k in KS)
    print(f"| network | N | pair | first round | bridged, every pair | {head} |")
    print("|---|---|---|---|---|" + "---|" * len(KS))
    for n in args.n:
        for case in args.cases:
            _case(case == "trained", n)


if __name__ == "__main__":
    main()
