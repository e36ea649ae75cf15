"""Plots of sweep results (PNG, drawn with matplotlib's object API, no pyplot state).

All functions take the Dataset written by a sweep (``results.nc``; dims ``config``,
``seed``, ``epoch``, ``pair``) and average over seeds.  Error bars: with several
seeds, the standard error of the mean across seeds (which already contains the
Monte Carlo noise of each estimate); with one seed, that estimate's Monte Carlo
standard error.

- :func:`plot_information_plane`: I(X;T_l) against I(T_l;Y), one trajectory over
  the measured epochs per layer, one panel per configuration (noise level).
- :func:`plot_mi_vs_noise`: I(X;T_l) and I(T_l;Y) at the last measured epoch
  against the noise level sigma, one line per layer and model.
- :func:`plot_layer_to_layer`: I(T_{l-1};T_l) over the epochs, one panel per layer
  pair, one line per configuration.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = [
    "plot_all",
    "plot_information_plane",
    "plot_layer_to_layer",
    "plot_mi_vs_noise",
]


def _figure(nrows: int, ncols: int, *, panel=(4.2, 3.4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: str | Path) -> Path:
    from stochmi.experiments.store import atomic_via_tmpfile

    path = Path(path)
    atomic_via_tmpfile(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    return path


def _mean_err(ds, var: str = "value"):
    """Mean over seeds and its error bar (see module docstring); dims config, epoch, pair."""
    v = ds[var]
    n = v.notnull().sum("seed")
    mean = v.mean("seed", skipna=True)
    sd = v.std("seed", ddof=1, skipna=True)
    se_seeds = sd / np.sqrt(n.where(n > 0))
    mc = ds["stderr"].mean("seed", skipna=True)
    err = se_seeds.where(n > 1, mc)
    return mean, err


def _layers(ds) -> list[str]:
    """Layers with both an input pair X->T and a label pair T->Y, in pair order."""
    src = list(ds["source"].values)
    tgt = list(ds["target"].values)
    inputs = [t for s, t in zip(src, tgt) if s == "X"]
    labelled = {s for s, t in zip(src, tgt) if t == "Y"}
    return [t for t in inputs if t in labelled]


def _config_title(ds, i: int) -> str:
    label = str(ds["label"].values[i])
    sigma = float(ds["sigma"].values[i])
    s = label if math.isnan(sigma) else f"{label}, sigma={sigma:g}"
    grid = str(ds["config"].values[i])[len(label) :].strip("_")
    extra = [p for p in grid.split("_") if p and not p.startswith("noise.sigma=")]
    return s + (f" ({', '.join(extra)})" if extra else "")


def plot_information_plane(ds, path: str | Path) -> Path | None:
    """Information plane: I(X;T_l) (x) against I(T_l;Y) (y) over training.

    Parameters
    ----------
    ds : xarray.Dataset
        Sweep results (needs pairs ``X->T`` and ``T->Y``).
    path : str or Path
        PNG file to write.

    Returns
    -------
    Path or None
        ``path``, or None when no layer has both pairs (nothing to draw).
    """
    layers = _layers(ds)
    if not layers:
        return None
    from matplotlib import colormaps

    mean, _ = _mean_err(ds)
    pairs = list(ds["pair"].values)
    epochs = ds["epoch"].values
    n_cfg = ds.sizes["config"]
    ncols = min(4, n_cfg)
    nrows = math.ceil(n_cfg / ncols)
    fig, axes = _figure(nrows, ncols)
    layer_colors = colormaps["tab10"]
    norm_epochs = (epochs - epochs.min()) / max(1, epochs.max() - epochs.min())
    cmap = colormaps["viridis"]
    for i in range(n_cfg):
        ax = axes[i // ncols][i % ncols]
        for li, layer in enumerate(layers):
            xs = mean.isel(config=i, pair=pairs.index(f"X->{layer}")).values
            ys = mean.isel(config=i, pair=pairs.index(f"{layer}->Y")).values
            ok = np.isfinite(xs) & np.isfinite(ys)
            if not ok.any():
                continue
            ax.plot(xs[ok], ys[ok], "-", color=layer_colors(li % 10), lw=1.5, label=layer)
            ax.scatter(
                xs[ok], ys[ok], c=cmap(norm_epochs[ok]), s=28, zorder=3, edgecolors="k", lw=0.4
            )
            ax.annotate(
                f"{layer}",
                (xs[ok][-1], ys[ok][-1]),
                fontsize=8,
                xytext=(3, 3),
                textcoords="offset points",
            )
        n_inputs = ds.attrs.get("n_inputs")
        if n_inputs:
            lo, hi = ax.get_xlim()
            ax.set_xlim(lo, max(hi, math.log(n_inputs) + 0.03 * (hi - lo)))
            ax.axvline(math.log(n_inputs), color="0.5", ls="--", lw=0.8)
            ax.annotate(
                "log N",
                (math.log(n_inputs), 0.02),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color="0.4",
                xytext=(-3, 0),
                textcoords="offset points",
                ha="right",
            )
        ax.set_title(_config_title(ds, i), fontsize=9)
        ax.set_xlabel("I(X; T_l)  [nats]")
        ax.set_ylabel("I(T_l; Y)  [nats]")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8, title="layer", title_fontsize=8)
    for j in range(n_cfg, nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(epochs.min(), epochs.max()), cmap=cmap)
    fig.colorbar(sm, ax=axes, label="epoch", shrink=0.8)
    seeds = ds.sizes["seed"]
    over = f", mean over {seeds} seeds" if seeds > 1 else ""
    fig.suptitle(f"Information plane ({ds.attrs.get('experiment_name', '')}{over})")
    return _save(fig, path)


def plot_mi_vs_noise(ds, path: str | Path, *, epoch: int | None = None) -> Path | None:
    """I(X;T_l) and I(T_l;Y) against the noise level sigma, with error bars.

    Parameters
    ----------
    ds : xarray.Dataset
        Sweep results.
    path : str or Path
        PNG file to write.
    epoch : int, optional
        Measured epoch to show (default: the last).

    Returns
    -------
    Path or None
        None when fewer than two configurations have a finite sigma.
    """
    sigma = ds["sigma"].values.astype(float)
    if np.isfinite(sigma).sum() < 2:
        return None
    epoch = int(ds["epoch"].values[-1]) if epoch is None else int(epoch)
    sub = ds.sel(epoch=epoch)
    mean, err = _mean_err(sub)
    pairs = list(ds["pair"].values)
    src, tgt = list(ds["source"].values), list(ds["target"].values)
    input_layers = [t for s, t in zip(src, tgt) if s == "X"]
    label_layers = [s for s, t in zip(src, tgt) if t == "Y"]
    fig, axes = _figure(1, 2, panel=(5.0, 3.8))
    from matplotlib import colormaps

    colors = colormaps["tab10"]
    markers = "osD^v<>ph*"
    labels = list(dict.fromkeys(ds["label"].values))
    for ax, layers, fmt in (
        (axes[0][0], input_layers, "X->{}"),
        (axes[0][1], label_layers, "{}->Y"),
    ):
        for li, layer in enumerate(layers):
            p = pairs.index(fmt.format(layer))
            for mi, lab in enumerate(labels):
                idx = np.where((ds["label"].values == lab) & np.isfinite(sigma))[0]
                if len(idx) == 0:
                    continue
                order = idx[np.argsort(sigma[idx])]
                y = mean.isel(config=order, pair=p).values
                e = err.isel(config=order, pair=p).values
                if not np.isfinite(y).any():
                    continue
                ax.errorbar(
                    sigma[order],
                    y,
                    yerr=np.nan_to_num(e),
                    marker=markers[mi % len(markers)],
                    color=colors(li % 10),
                    ls="-" if len(order) > 1 else "none",
                    capsize=3,
                    ms=5,
                    label=f"{layer} ({lab})" if len(labels) > 1 else layer,
                )
        ax.set_xscale("log")
        ticks = np.unique(sigma[np.isfinite(sigma)])
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("noise sigma")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("I(X; T_l)  [nats]")
    axes[0][1].set_ylabel("I(T_l; Y)  [nats]")
    fig.suptitle(f"MI against noise level at epoch {epoch} (mean over seeds, error bars: s.e.)")
    return _save(fig, path)


def plot_layer_to_layer(ds, path: str | Path) -> Path | None:
    """I(T_{l-1}; T_l) over the measured epochs, one panel per layer pair.

    Returns
    -------
    Path or None
        None when the results have no layer-to-layer pair.
    """
    kinds = list(ds["kind"].values)
    pairs = [p for p, k in zip(ds["pair"].values, kinds) if k == "layer"]
    if not pairs:
        return None
    mean, err = _mean_err(ds)
    allpairs = list(ds["pair"].values)
    from matplotlib import colormaps

    colors = colormaps["viridis"]
    n_cfg = ds.sizes["config"]
    fig, axes = _figure(1, len(pairs))
    epochs = ds["epoch"].values
    for ax, pair in zip(axes[0], pairs):
        p = allpairs.index(pair)
        for i in range(n_cfg):
            y = mean.isel(config=i, pair=p).values
            if not np.isfinite(y).any():
                continue
            ax.errorbar(
                epochs,
                y,
                yerr=np.nan_to_num(err.isel(config=i, pair=p).values),
                marker="o",
                ms=4,
                capsize=2,
                color=colors(i / max(1, n_cfg - 1)),
                label=_config_title(ds, i),
            )
        src, tgt = pair.split("->")
        ax.set_title(f"I({src}; {tgt})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Layer-to-layer MI over training (mean over seeds)")
    return _save(fig, path)


def plot_all(ds, out_dir: str | Path) -> dict[str, Path]:
    """Write every plot that the results support into ``out_dir``; returns name -> path."""
    out = Path(out_dir)
    made = {
        "information_plane": plot_information_plane(ds, out / "information_plane.png"),
        "mi_vs_noise": plot_mi_vs_noise(ds, out / "mi_vs_noise.png"),
        "layer_to_layer": plot_layer_to_layer(ds, out / "layer_to_layer.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
