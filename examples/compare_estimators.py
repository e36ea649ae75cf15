"""Compare the MI estimators people use today with stochmi's certified estimator.

Runs every estimator in ``stochmi.benchmarking.baselines`` and ``stochmi.mi_from_conditional`` on
ground-truth tasks (estimate vs truth), then on the layers of a small deterministic
tanh MLP trained on MNIST, sweeping the knobs (bins, kernel width, k) of the
histogram / KDE / KSG estimators next to the certified estimate of the same net with
injected Gaussian noise.  Writes CSV tables and PNG plots to ``--out`` and prints the
tables.

    python examples/compare_estimators.py --quick            # about a minute
    python examples/compare_estimators.py --out results/full # several minutes
"""

from __future__ import annotations

import argparse

from stochmi.benchmarking.compare import run_comparison


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/compare", help="output folder (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="small sizes for a fast run")
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument("--no-mnist", action="store_true", help="skip the MNIST part")
    p.add_argument("--quiet", action="store_true", help="no progress bars / printed tables")
    args = p.parse_args(argv)
    df = run_comparison(
        args.out, quick=args.quick, seed=args.seed, progress=not args.quiet, mnist=not args.no_mnist
    )
    print(f"\nwrote {', '.join(df.attrs['files'].values())}")


if __name__ == "__main__":
    main()
