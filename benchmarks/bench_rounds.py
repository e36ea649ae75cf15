"""Where a layer_mi call spends its time, round by round: wall, user and system seconds
and minor page faults of every round of the deep-layer estimator.

On a machine where first touching memory is expensive (a virtual machine whose host
backs the guest's pages on demand), the system seconds show how much of a round goes
to faulting in fresh pages rather than to arithmetic.  One process, the checkpoints of
``bench_ratio.py`` (``noisy_mlp`` at sigma 1, trained 3 epochs or at initialisation),
N shared MNIST test images, ``layer_mi`` with labels at its defaults.

    python benchmarks/bench_rounds.py --n 10000 --case untrained --pairs X-h2
    python benchmarks/bench_rounds.py --n 10000 --case untrained --pairs X-h2 --first-bridged

``--first-bridged`` stops after the first bridged round (its time is what most
changes of the bridged round move).  Prints a markdown table and, for a whole call,
the rows of the result.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import stochmi  # noqa: E402
from stochmi.layers import estimation  # noqa: E402


class _Stop(Exception):
    """Raised after the first bridged round with ``--first-bridged``."""


def _usage() -> tuple[float, float, int, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt, time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--case", default="untrained", choices=["trained", "untrained"])
    ap.add_argument("--pairs", default=None, help="e.g. X-h2,h2-Y (default: all pairs)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--first-bridged", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(__file__))
    from bench_ratio import _checkpoint

    model, _, _ = stochmi.load_checkpoint(_checkpoint(args.case == "trained"))
    test = stochmi.load_mnist("shared-test", n=args.n, seed=0)
    pairs = None if args.pairs is None else [tuple(p.split("-")) for p in args.pairs.split(",")]
    rows = []
    real = estimation._Deep._once

    def timed(self, a, b, n_is, n_fwd, n_br=0):
        u0, s0, f0, t0 = _usage()
        res = real(self, a, b, n_is, n_fwd, n_br)
        u1, s1, f1, t1 = _usage()
        rows.append((a, b, n_is, n_fwd, n_br, t1 - t0, u1 - u0, s1 - s0, f1 - f0))
        if n_br and args.first_bridged:
            raise _Stop
        return res

    estimation._Deep._once = timed
    start = _usage()
    df = None
    try:
        df = stochmi.layer_mi(model, test.x, test.y, seed=args.seed, pairs=pairs)
    except _Stop:
        pass
    finally:
        estimation._Deep._once = real
    end = _usage()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{args.case} noisy_mlp, N = {args.n}, seed {args.seed}, {args.threads} threads, "
        f"load {os.getloadavg()[0]:.1f}, peak {peak:,.0f} MiB"
    )
    print(
        "| round (layers a -> b) | n_is / n_fwd / n_bridge | wall (s) | user (s) | system (s) "
        "| minor faults |"
    )
    print("|---|---|---|---|---|---|")
    for a, b, n_is, n_fwd, n_br, wall, user, system, faults in rows:
        print(
            f"| {a} -> {b} | {n_is} / {n_fwd} / {n_br} | {wall:.1f} | {user:.0f} "
            f"| {system:.0f} | {faults:,} |"
        )
    print(
        f"| whole call | | {end[3] - start[3]:.1f} | {end[0] - start[0]:.0f} "
        f"| {end[1] - start[1]:.0f} | {end[2] - start[2]:,} |"
    )
    if df is not None:
        cols = ["source", "target", "value", "stderr", "lower", "upper", "converged"]
        print(df[cols].to_string(index=False))


if __name__ == "__main__":
    main()
