"""Subsample sizes of the deep rows' rounds: time and convergence per round.

``layer_mi`` on ``X -> h2`` and ``h2 -> Y`` of ``noisy_mlp`` (sigma 1, the checkpoints
of ``bench_ratio.py``: trained for 3 epochs, or at initialisation), N MNIST test
images, with the ``(n_top, n_random)`` of the bridged rounds set to each size given
(:data:`stochmi.layers.estimation.SUBSAMPLE`; first rounds keep theirs).  For every
round it prints the sources per block of queries, the time, the value of ``I(X; h2)``,
its remaining bias (half-versus-full difference) and the remaining bias of
``I(h2; Y)``; then the total time and the final values.  One fresh process per size
and seed, 2 threads.

    python benchmarks/bench_subsample.py                           # untrained, seeds 0-2
    python benchmarks/bench_subsample.py --sizes 48,128 16,384 --seeds 0 --cases trained
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _child(case: str, n: int, n_top: int, n_random: int, seed: int) -> None:
    import torch

    import stochmi
    from stochmi.layers import estimation

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_ratio import _checkpoint

    torch.set_num_threads(2)
    sizes = dict(estimation.SUBSAMPLE)
    sizes[True] = (n_top, n_random)
    estimation.SUBSAMPLE = sizes
    rounds = []
    once = estimation._Deep._once

    def timed(self, a, b, n_is, n_fwd, n_br=0):
        t0 = time.perf_counter()
        res = once(self, a, b, n_is, n_fwd, n_br)
        _, st = self._check(res)
        lab = estimation._label_terms(res, self.labels) if b in self.label_layers else None
        rounds.append(
            {
                "pair": f"{a}->{b}",
                "bridged": bool(n_br),
                "sources": round(res.n_sources),
                "time": round(time.perf_counter() - t0, 1),
                "value": round(st["value"], 4),
                "bias": round(st["bias"], 4),
                "label_bias": None if lab is None else round(lab["own"], 4),
            }
        )
        return res

    estimation._Deep._once = timed
    model, guide, _ = stochmi.load_checkpoint(_checkpoint(case == "trained"))
    test = stochmi.load_mnist("shared-test", n=n, seed=0)
    t0 = time.perf_counter()
    df = stochmi.layer_mi(
        model, test.x, test.y, guide=guide, seed=seed, pairs=[("X", "h2"), ("h2", "Y")]
    )
    total = time.perf_counter() - t0
    final = {
        f"{r.source}->{r.target}": [round(r.value, 4), bool(r.converged)] for r in df.itertuples()
    }
    print(json.dumps({"rounds": rounds, "total": round(total, 1), "final": final}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["48,128", "16,384"], help="n_top,n_random")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--cases", nargs="+", default=["untrained"])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        case, n_top, n_random, seed = args._child.split(":")
        _child(case, args.n, int(n_top), int(n_random), int(seed))
        return
    print(f"noisy_mlp sigma 1, N = {args.n}, pairs X -> h2 and h2 -> Y, 2 threads\n")
    print(
        "| case | bridged sizes | seed | rounds: bridged? sources, time (s), I(X;h2), its bias, "
        "I(h2;Y) bias | total (s) | I(X;h2) | I(h2;Y) | load |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        for seed in args.seeds:
            for size in args.sizes:
                n_top, n_random = (int(v) for v in size.split(","))
                cmd = [sys.executable, __file__, "--n", str(args.n)]
                cmd += ["--_child", f"{case}:{n_top}:{n_random}:{seed}"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                rounds = "; ".join(
                    f"{'B' if x['bridged'] else 'U'} {x['sources']}, {x['time']}, "
                    f"{x['value']}, {x['bias']}, {x['label_bias']}"
                    for x in r["rounds"]
                )
                (xv, xc), (yv, yc) = r["final"]["X->h2"], r["final"]["h2->Y"]
                print(
                    f"| {case} | {n_top}, {n_random} | {seed} | {rounds} | {r['total']} | "
                    f"{xv}{'' if xc else ' (flagged)'} | {yv}{'' if yc else ' (flagged)'} | "
                    f"{os.getloadavg()[0]:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
