"""Replica formula vs stochmi vs sample-only baselines (Gabrie et al. 2018, Fig. 2 setting).

Two-layer networks ``t1 = phi(sigma * W1 x)`` (noiseless, phi = ReLU or hardtanh) and
``t2 = W2 t1 + xi`` (``xi ~ N(0, noise I)``), Gaussian input, i.i.d. Gaussian weights
of variance ``1/n_in``.  Only ``t2`` is stochastic, so ``I(X; T2)`` is finite and is
what every method estimates:

- replica: :func:`stochmi.replica.mutual_information` with the large-width (Marchenko-
  Pastur) spectrum (curve) and with the actual matrices of the sampled network (points);
- stochmi: :func:`stochmi.layer_mi` on the Pyro model of the same network, value and
  bracket (sizes and noise chosen so that the MI stays well below ``log N``);
- KDE (Kolchinsky-Tracey upper bound, imagined noise = the true noise), KSG (k = 5) and
  per-unit binning (30 bins) on the same samples ``(x, t2)``.

Run: ``python examples/replica_fig2.py [--quick]``; writes docs/img/replica_fig2.png and
prints the table and the mean absolute difference replica - stochmi.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import stochmi
from stochmi import baselines, replica
from stochmi.replica import network as net

ROOT = Path(__file__).resolve().parents[1]


def run(
    widths=(100, 100, 10),
    noise=2.0,
    n=3000,
    sigmas=(0.25, 0.5, 1.0, 1.5, 2.0, 3.0),
    curve=np.linspace(0.1, 3.0, 12),  # noqa: B008 - read-only default
    seed=0,
):
    rows, curves = [], []
    base = net.random_weights(widths, seed=seed)
    x = net.sample_inputs(n, widths[0], seed=seed + 1)
    ests = {
        "KDE": baselines.get("kde", noise_variance=noise),
        "KSG": baselines.get("ksg", k=5),
        "binning": baselines.get("binning", n_bins=30),
    }
    for act in ("relu", "hardtanh"):
        acts, nz = [act, "linear"], [0.0, noise]
        for s in curve:
            r = replica.mutual_information(list(widths), acts, nz, weight_scale=[s, 1.0])
            curves.append(
                dict(
                    activation=act, sigma=s, replica=r.mi[1], entropy_per_unit=r.entropy_per_unit[1]
                )
            )
        for s in sigmas:
            ws = [base[0] * s, base[1]]
            t0 = time.perf_counter()
            rep = replica.mutual_information(list(widths), acts, nz, weights=ws)
            t_rep = time.perf_counter() - t0
            t0 = time.perf_counter()
            tab = stochmi.layer_mi(net.make_model(ws, acts, nz), x, seed=seed)
            t_smi = time.perf_counter() - t0
            e = tab.iloc[0]
            t2 = net.forward(x, ws, acts, nz, generator=torch.Generator().manual_seed(seed + 2))[-1]
            row = dict(
                activation=act,
                sigma=s,
                replica=rep.mi[1],
                replica_converged=bool(rep.converged[1]),
                stochmi=e.value,
                stderr=e.stderr,
                lower=e.lower,
                upper=e.upper,
                t_replica=t_rep,
                t_stochmi=t_smi,
            )
            for name, est in ests.items():
                row[name] = est.estimate(x, t2, seed=seed).value
            rows.append(row)
            print(
                f"{act:8s} sigma={s:4.2f}  replica={row['replica']:.3f}  stochmi={e.value:.3f}"
                f" [{e.lower:.3f}, {e.upper:.3f}] +-{e.stderr:.3f}  KDE={row['KDE']:.2f}"
                f" KSG={row['KSG']:.2f} bin={row['binning']:.2f}",
                flush=True,
            )
    return pd.DataFrame(rows), pd.DataFrame(curves)


def plot(df, cv, widths, noise, n, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, act in zip(axes, ("relu", "hardtanh")):
        d, c = df[df.activation == act], cv[cv.activation == act]
        ax.plot(c.sigma, c.replica, "k-", label="replica (large width)")
        ax.plot(d.sigma, d.replica, "ko", mfc="none", label="replica (these weights)")
        ax.errorbar(
            d.sigma,
            d.stochmi,
            yerr=[d.stochmi - d.lower + 2 * d.stderr, d.upper - d.stochmi + 2 * d.stderr],
            fmt="s",
            color="C0",
            capsize=3,
            label="stochmi (bracket +- 2 se)",
        )
        ax.plot(d.sigma, d.KDE, "^--", color="C1", label="KDE upper (imagined noise)")
        ax.plot(d.sigma, d.KSG, "v--", color="C2", label="KSG k=5")
        ax.plot(d.sigma, d.binning, "d--", color="C3", label="binning (30 bins)")
        ax.axhline(math.log(n), color="grey", lw=0.8, ls=":", label="log N")
        ax.set_title(f"{act}: t1 = {act}(sigma W1 x), t2 = W2 t1 + N(0, {noise})")
        ax.set_xlabel("weight scale sigma of layer 1")
    axes[0].set_ylabel(f"I(X; T2)  [nats],  widths {list(widths)}, N = {n}")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three weight scales, N = 1000")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img" / "replica_fig2.png"))
    args = ap.parse_args()
    widths, noise = (100, 100, 10), 2.0
    kw = dict(n=1000, sigmas=(0.5, 1.0, 2.0), curve=np.linspace(0.1, 3.0, 6)) if args.quick else {}
    t0 = time.perf_counter()
    df, cv = run(widths, noise, **kw)
    n = kw.get("n", 3000)
    plot(df, cv, widths, noise, n, Path(args.out))
    diff = df.replica - df.stochmi
    outside = (
        (df.replica < df.lower - 2 * df.stderr) | (df.replica > df.upper + 2 * df.stderr)
    ).sum()
    pd.set_option("display.width", 160)
    print(
        df[
            [
                "activation",
                "sigma",
                "replica",
                "stochmi",
                "stderr",
                "lower",
                "upper",
                "KDE",
                "KSG",
                "binning",
            ]
        ]
        .round(3)
        .to_string(index=False)
    )
    print(
        f"mean |replica - stochmi| = {diff.abs().mean():.3f} nats over {len(df)} points"
        f" (+- {diff.abs().std(ddof=1) / math.sqrt(len(df)):.3f} standard error of the mean;"
        f" mean signed difference {diff.mean():+.3f}"
        f" +- {diff.std(ddof=1) / math.sqrt(len(df)):.3f};"
        f" mean stochmi stderr {df.stderr.mean():.3f});"
        f" replica outside stochmi's bracket +- 2 se at {outside} of {len(df)} points"
    )
    print(
        f"figure: {args.out}   total time {time.perf_counter() - t0:.0f} s"
        f" (replica {df.t_replica.sum():.0f} s, stochmi {df.t_stochmi.sum():.0f} s at the points)"
    )


if __name__ == "__main__":
    main()
