"""How well the rankings of subsampled sources find each query's most likely sources.

For ``X -> h2`` of ``noisy_mlp`` (sigma 1, the checkpoints of ``bench_ratio.py``:
trained for 3 epochs, or at initialisation) on N MNIST test images, the densities
``log p(t_j | x_i)`` at every source from one bridged round without subsampling
(``n_is`` 64, ``n_fwd`` 32, 4 bridged draws) stand in for the truth.  Three rankings of
the other sources, as :func:`stochmi.layers.deep._rank_sources` builds them from the
same draws of the chain:

- ``first``: the larger of the layer-1 density of the query's own path and the nested
  Monte Carlo value of the forward paths, each relative to its best source;
- ``mean path``: the query layer's density around each source's mean path
  (:class:`stochmi.layers.deep._MeanPathScore`);
- ``interleaved``: the two interleaved, as ``deep_log_density`` ranks them.

For each it prints the share of each query's 16 most likely other sources among its 64
best ranked, and, for each ``(n_top, n_random)`` given (default: a first round's, a
bridged round's before and after the mean-path score joined the ranking), the relative
variance of a query's Horvitz-Thompson marginal ``sum_i p(t_j | x_i)``
(computed exactly from the reference densities: the union of a block of 16 queries'
``n_top`` best taken whole, ``n_random`` of the others drawn uniformly) and the
sources per block.  Median and mean over queries.

    python benchmarks/bench_ranking.py --n 1000
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _reference(model, x, seed: int):
    """The chain's draws, the first-layer conditional and the reference densities."""
    import torch

    from stochmi.layers import deep
    from stochmi.layers.chain import Chain

    with torch.no_grad():
        chain = Chain(
            model, x, model.layer_sites, [], [], 1, "single", None,
            torch.Generator().manual_seed(seed),
        )
    link = [lambda p, s=model.layer_sites[1]: model.conditional(s, p)]
    loc, scale = deep.normal_params(chain.conds[0])
    t0 = time.perf_counter()
    ref = deep.deep_log_density(
        loc, scale, link, chain.values[1], [chain.values[0]], n_is=64, n_fwd=32,
        n_bridge=4, n_top=None, generator=torch.Generator().manual_seed(seed + 1),
    )
    print(f"reference densities: {time.perf_counter() - t0:.1f} s", flush=True)
    return loc, scale, link, chain.values[1], chain.values[0], ref.L


def _rankings(loc, scale, link, t, anchor, k: int, seed: int) -> dict:
    """``(N, k)`` best other sources of every query under each ranking."""
    import torch

    from stochmi.layers import deep

    pb = deep._Problem(loc, scale, link, t, torch.Generator().manual_seed(seed + 2), t.dtype)
    pool = deep._Pool(pb, 16)
    rows = torch.arange(pb.n)
    log_g = pool.fin(pb.t, low=True)
    score = deep._MeanPathScore(pb)
    mp = score(rows).double()
    mp[rows, rows] = -math.inf
    return {
        "first": deep._rank_sources(pb, pool, [anchor], rows, log_g, k),
        "mean path": torch.topk(mp, k, 1).indices,
        "interleaved": deep._rank_sources(pb, pool, [anchor], rows, log_g, k, score),
    }


def _block_variance(p, top, n_random: int, seed: int) -> tuple[float, float, float]:
    """Relative variance of each query's Horvitz-Thompson marginal (median, mean) and
    the mean sources per block, blocks of 16 queries in a random order."""
    import torch

    n = p.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    rel, size = [], []
    for c in range(0, n, 16):
        r = order[c : c + 16]
        whole = torch.zeros(n, dtype=torch.bool)
        whole[top[r].reshape(-1)] = True
        whole[r] = True
        rest = ~whole
        n_rest = int(rest.sum())
        m = min(n_random, n_rest)
        size.append(int(whole.sum()) + m)
        for j in r:
            v = p[j][rest]
            # sampling without replacement: N_r^2 / m (1 - m / N_r) S^2
            var = n_rest**2 / m * (1 - m / n_rest) * float(v.var()) if m > 1 else 0.0
            rel.append(var / float(p[j].sum()) ** 2)
    rel_t = torch.tensor(rel)
    return float(rel_t.median()), float(rel_t.mean()), sum(size) / len(size)


def main() -> None:
    import torch

    import stochmi

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", nargs="+", default=["48,128", "16,384", "16,192"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = os.path.join(os.path.dirname(__file__), "out")
    x = stochmi.load_mnist("shared-test", n=args.n, seed=0).x[: args.n]
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    head = "".join(f" rel. var. {a}, {b} (median, mean) | sources |" for a, b in sizes)
    print("| case | ranking | 16 most likely in 64 best |" + head)
    print("|---|---|---|" + "---|---|" * len(sizes))
    for case, epochs in (("trained", 3), ("untrained", 0)):
        path = os.path.join(out, f"bench_ratio_noisy_mlp_s1_e{epochs}.pt")
        if not os.path.exists(path):
            sys.exit(f"{path} is missing: run benchmarks/bench_ratio.py first")
        model = stochmi.load_checkpoint(path)[0]
        loc, scale, link, t, anchor, L = _reference(model, x, args.seed)
        off = L.clone()
        off.fill_diagonal_(-math.inf)
        p = torch.exp(off - off.max(1, keepdim=True).values)  # each row up to a factor
        best16 = torch.topk(off, 16, 1).indices
        for name, top in _rankings(loc, scale, link, t, anchor, 64, args.seed).items():
            found = float((best16[:, :, None] == top[:, None, :]).any(2).float().mean())
            cells = []
            for n_top, n_random in sizes:
                med, mean, size = _block_variance(p, top[:, :n_top], n_random, args.seed)
                cells += [f"{med:.4f}, {mean:.4f}", f"{size:.0f}"]
            print(f"| {case} | {name} | {found:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
