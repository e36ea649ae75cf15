"""Plots of sweep results (PNG, drawn with matplotlib's object API, no pyplot state).

All functions take the Dataset written by a sweep (``results.nc``; dims ``config``,
``seed``, ``epoch``, ``pair``) and average over seeds.  Error bars: with several
seeds, the standard error of the mean across seeds (which already contains the
Monte Carlo noise of each estimate); with one seed, that estimate's Monte Carlo
standard error.

- :func:`plot_information_plane`: I(X;T_l) against I(T_l;Y), one trajectory over
  the measured epochs per layer, one panel per configuration (noise level), with
  error bars on both axes and, with ``bracket=True``, the population bracket.
- :func:`plot_mi_vs_noise`: I(X;T_l) and I(T_l;Y) at the last measured epoch
  against the noise level sigma, one line per layer and model; with several seeds a
  band spans the seeds' smallest to largest value.
- :func:`plot_layer_to_layer`: I(T_{l-1};T_l) over the epochs, one panel per layer
  pair, one line per configuration, seeds as bands.
- :func:`plot_epistemic` (``estimate.uncertainty``): the epistemic information
  I(T_l;W|X) of each layer and BALD I(Y;W|X) over the epochs, one panel per target, one
  line per noise level, and the last epoch against the noise level.

Every figure carries a caption with the number of MI inputs N, the noise levels, the
estimator settings (``n_paths``, the starting number of forward paths per input for
densities across several layers, and weight draws) and the number of seeds.
In the information plane and the epistemic plot, a point flagged as not converged
(``converged`` or ``epistemic_converged`` 0 in some seed) is an open marker.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

__all__ = [
    "plot_all",
    "plot_epistemic",
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


def _mean_err(ds, var: str = "value", stderr: str = "stderr"):
    """Mean over seeds and its error bar (see module docstring); dims config, epoch, pair."""
    v = ds[var]
    n = v.notnull().sum("seed")
    mean = v.mean("seed", skipna=True)
    sd = v.std("seed", ddof=1, skipna=True)
    se_seeds = sd / np.sqrt(n.where(n > 0))
    mc = ds[stderr].mean("seed", skipna=True)
    err = se_seeds.where(n > 1, mc)
    return mean, err


def _seed_band(ds, var: str = "value"):
    """Smallest and largest value over seeds (dims config, epoch, pair), or None for one seed."""
    if ds.sizes.get("seed", 1) < 2:
        return None
    v = ds[var]
    return v.min("seed", skipna=True), v.max("seed", skipna=True)


def _caption(ds, *, err: bool = True) -> str:
    """N, noise levels, estimator settings and seeds of the results, for a figure caption."""
    try:
        settings = json.loads(ds.attrs.get("estimate_settings") or "{}")
    except (TypeError, ValueError):
        settings = {}
    n = ds.attrs.get("n_inputs") or settings.get("n_inputs")
    sig = np.asarray(ds["sigma"].values, dtype=float) if "sigma" in ds else np.array([])
    sig = sorted({float(x) for x in sig[np.isfinite(sig)]})
    parts = []
    if n:
        parts.append(f"N = {int(n)} held-out inputs")
    if sig:
        parts.append("noise sigma = " + ", ".join(f"{x:g}" for x in sig))
    if settings.get("n_paths"):
        parts.append(f"n_paths = {settings['n_paths']} for densities across layers")
    specs = " ".join(map(str, ds["spec"].values)) if "spec" in ds.coords else ""
    if settings.get("n_weight_draws") and "bayes" in specs:
        parts.append(f"{settings['n_weight_draws']} weight draws")
    seeds = ds.sizes.get("seed", 1)
    parts.append(f"{seeds} seed{'s' if seeds != 1 else ''}")
    if err:
        parts.append(
            "error bars: s.e. of the mean over seeds"
            if seeds > 1
            else "error bars: Monte Carlo s.e."
        )
    return "; ".join(parts)


def _add_caption(fig, text: str) -> None:
    import textwrap

    width = max(60, int(fig.get_figwidth() * 14))
    fig.supxlabel("\n".join(textwrap.wrap(text, width)), fontsize=7, color="0.3")


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


def plot_information_plane(ds, path: str | Path, *, bracket: bool = False) -> Path | None:
    """Information plane: I(X;T_l) (x) against I(T_l;Y) (y) over training.

    Parameters
    ----------
    ds : xarray.Dataset
        Sweep results (needs pairs ``X->T`` and ``T->Y``).
    path : str or Path
        PNG file to write.
    bracket : bool
        Also draw the population bracket ``[lower, upper]`` of each point (mean over
        seeds) as a thin line along each axis; upper bounds beyond the panel (vacuous,
        see :ref:`saturation`) are cut at its edge.

    Returns
    -------
    Path or None
        ``path``, or None when no layer has both pairs (nothing to draw).
    """
    layers = _layers(ds)
    if not layers:
        return None
    from matplotlib import colormaps

    mean, err = _mean_err(ds)
    n_cfg = ds.sizes["config"]
    ncols = min(4, n_cfg)
    nrows = math.ceil(n_cfg / ncols)
    fig, axes = _figure(nrows, ncols)
    epochs = ds["epoch"].values
    cmap = colormaps["viridis"]
    brackets: list = []
    for i in range(n_cfg):
        ax = axes[i // ncols][i % ncols]
        brackets += _plane_panel(ax, ds, i, layers, mean, err, cmap)
        _mark_log_n(ax, ds.attrs.get("n_inputs"))
        ax.set_title(_config_title(ds, i), fontsize=9)
        ax.set_xlabel("I(X; T_l)  [nats]")
        ax.set_ylabel("I(T_l; Y)  [nats]")
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=8, title="layer", title_fontsize=8)
    if bracket:
        _draw_brackets(ds, brackets)
    for j in range(n_cfg, nrows * ncols):
        axes[j // ncols][j % ncols].set_visible(False)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    sm = ScalarMappable(norm=Normalize(epochs.min(), epochs.max()), cmap=cmap)
    fig.colorbar(sm, ax=axes, label="epoch", shrink=0.8)
    seeds = ds.sizes["seed"]
    over = f", mean over {seeds} seeds" if seeds > 1 else ""
    fig.suptitle(f"Information plane ({ds.attrs.get('experiment_name', '')}{over})")
    caption = _caption(ds)
    if bracket:
        caption += "; shaded bars: population bracket [lower, upper]"
    if any(_unconverged(ds, i, *range(ds.sizes["pair"])).any() for i in range(n_cfg)):
        caption += "; open markers: not converged (converged = 0)"
    _add_caption(fig, caption)
    return _save(fig, path)


def _plane_panel(ax, ds, i: int, layers: list[str], mean, err, cmap) -> list:
    """One configuration's trajectories, a line per layer with error bars on both axes
    and points coloured by epoch; returns what :func:`_draw_brackets` needs."""
    from matplotlib import colormaps

    pairs = list(ds["pair"].values)
    epochs = ds["epoch"].values
    norm_epochs = (epochs - epochs.min()) / max(1, epochs.max() - epochs.min())
    layer_colors = colormaps["tab10"]
    drawn = []
    for li, layer in enumerate(layers):
        px, py = pairs.index(f"X->{layer}"), pairs.index(f"{layer}->Y")
        xs = mean.isel(config=i, pair=px).values
        ys = mean.isel(config=i, pair=py).values
        ok = np.isfinite(xs) & np.isfinite(ys)
        if not ok.any():
            continue
        color = layer_colors(li % 10)
        ax.plot(xs[ok], ys[ok], "-", color=color, lw=1.5, label=layer)
        ax.errorbar(
            xs[ok],
            ys[ok],
            xerr=np.nan_to_num(err.isel(config=i, pair=px).values[ok]),
            yerr=np.nan_to_num(err.isel(config=i, pair=py).values[ok]),
            fmt="none",
            ecolor=color,
            elinewidth=1.0,
            capsize=2,
            zorder=2,
        )
        drawn.append((ax, color, xs[ok], ys[ok], i, px, py, ok))
        colors = cmap(norm_epochs[ok])
        bad = _unconverged(ds, i, px, py)[ok]  # open markers: flagged estimates
        ax.scatter(
            xs[ok][~bad], ys[ok][~bad], c=colors[~bad], s=28, zorder=3, edgecolors="k", lw=0.4
        )
        if bad.any():
            ax.scatter(
                xs[ok][bad],
                ys[ok][bad],
                s=28,
                zorder=3,
                facecolors="white",
                edgecolors=colors[bad],
                lw=1.4,
            )
        ax.annotate(
            f"{layer}",
            (xs[ok][-1], ys[ok][-1]),
            fontsize=8,
            xytext=(3, 3),
            textcoords="offset points",
        )
    return drawn


def _unconverged(ds, i: int, *pairs: int) -> np.ndarray:
    """Per epoch: True where any of ``pairs`` (indices) has ``converged = 0`` in some
    seed of configuration ``i`` (all False without the variable)."""
    if "converged" not in ds:
        return np.zeros(ds.sizes["epoch"], dtype=bool)
    conv = ds["converged"].isel(config=i, pair=list(pairs)).min(("seed", "pair"))
    return conv.values < 1


def _mark_log_n(ax, n_inputs) -> None:
    """A dashed line at log N, the most a dataset MI over N inputs can be."""
    if not n_inputs:
        return
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


def _draw_brackets(ds, brackets: list) -> None:
    """The population bracket of each point as shaded bars along both axes, cut at the
    panel's edges (which stay as they were)."""
    lower = ds["lower"].mean("seed", skipna=True)
    upper = ds["upper"].mean("seed", skipna=True)
    for ax, color, xs, ys, i, px, py, ok in brackets:
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        xl = np.clip(lower.isel(config=i, pair=px).values[ok], x0, x1)
        xu = np.clip(upper.isel(config=i, pair=px).values[ok], x0, x1)
        yl = np.clip(lower.isel(config=i, pair=py).values[ok], y0, y1)
        yu = np.clip(upper.isel(config=i, pair=py).values[ok], y0, y1)
        ax.hlines(ys, xl, xu, colors=[color], lw=3, alpha=0.25, zorder=1)
        ax.vlines(xs, yl, yu, colors=[color], lw=3, alpha=0.25, zorder=1)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)


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
    band = _seed_band(sub)
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
                if band is not None:
                    ax.fill_between(
                        sigma[order],
                        band[0].isel(config=order, pair=p).values,
                        band[1].isel(config=order, pair=p).values,
                        color=colors(li % 10),
                        alpha=0.18,
                        lw=0,
                    )
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
    seeds = ds.sizes.get("seed", 1)
    fig.suptitle(f"MI against noise level at epoch {epoch} (mean over seeds)")
    _add_caption(fig, _caption(ds) + ("; bands: smallest to largest seed" if seeds > 1 else ""))
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
    band = _seed_band(ds)
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
            color = colors(i / max(1, n_cfg - 1))
            if band is not None:
                ax.fill_between(
                    epochs,
                    band[0].isel(config=i, pair=p).values,
                    band[1].isel(config=i, pair=p).values,
                    color=color,
                    alpha=0.18,
                    lw=0,
                )
            ax.errorbar(
                epochs,
                y,
                yerr=np.nan_to_num(err.isel(config=i, pair=p).values),
                marker="o",
                ms=4,
                capsize=2,
                color=color,
                label=_config_title(ds, i),
            )
        src, tgt = pair.split("->")
        ax.set_title(f"I({src}; {tgt})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    seeds = ds.sizes.get("seed", 1)
    fig.suptitle("Layer-to-layer MI over training (mean over seeds)")
    _add_caption(fig, _caption(ds) + ("; bands: smallest to largest seed" if seeds > 1 else ""))
    return _save(fig, path)


def _epistemic_configs(ds) -> list[int]:
    """Configurations with a finite epistemic estimate (the Bayesian ones)."""
    if "epistemic_value" not in ds:
        return []
    finite = np.isfinite(ds["epistemic_value"].values)
    return [i for i in range(ds.sizes["config"]) if finite[i].any()]


def _epistemic_panel(ax, ds, mean, err, band, t: int, configs: list[int]) -> None:
    """One target's panel: epistemic information over the epochs, a line per config."""
    from matplotlib import colormaps

    colors = colormaps["viridis"]
    epochs = ds["epoch"].values
    for n, i in enumerate(configs):
        y = mean.isel(config=i, epistemic_target=t).values
        if not np.isfinite(y).any():
            continue
        color = colors(n / max(1, len(configs) - 1))
        if band is not None:
            lo = band[0].isel(config=i, epistemic_target=t).values
            hi = band[1].isel(config=i, epistemic_target=t).values
            ax.fill_between(epochs, lo, hi, color=color, alpha=0.18, lw=0)
        ax.errorbar(
            epochs,
            y,
            yerr=np.nan_to_num(err.isel(config=i, epistemic_target=t).values),
            marker="o",
            ms=4,
            capsize=2,
            color=color,
            label=_config_title(ds, i),
        )
        if "epistemic_converged" in ds:  # open markers: not converged in some seed
            conv = ds["epistemic_converged"].isel(config=i, epistemic_target=t).min("seed")
            bad = np.isfinite(y) & (conv.values < 1)
            ax.scatter(epochs[bad], y[bad], s=36, facecolors="white", edgecolors=[color], zorder=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats")
    ax.grid(alpha=0.3)


def _epistemic_vs_noise(ax, ds, mean, err, configs: list[int]) -> bool:
    """Last epoch's epistemic information against sigma, one line per target."""
    from matplotlib import colormaps

    sigma = ds["sigma"].values.astype(float)
    with_sigma = [i for i in configs if np.isfinite(sigma[i])]
    if len({float(sigma[i]) for i in with_sigma}) < 2:
        return False
    colors = colormaps["tab10"]
    for t, name in enumerate(ds["epistemic_target"].values):
        for lab in dict.fromkeys(ds["label"].values[with_sigma]):
            idx = [i for i in with_sigma if ds["label"].values[i] == lab]
            order = sorted(idx, key=lambda i: sigma[i])
            y = mean.isel(config=order, epistemic_target=t, epoch=-1).values
            e = err.isel(config=order, epistemic_target=t, epoch=-1).values
            ax.errorbar(
                sigma[order],
                y,
                yerr=np.nan_to_num(e),
                marker="o",
                ms=4,
                capsize=2,
                color=colors(t % 10),
                label=f"{name} ({lab})",
            )
    ax.set_xscale("log")
    ticks = np.unique(sigma[with_sigma])
    ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel("noise sigma")
    ax.set_ylabel("nats")
    ax.set_title(f"against noise level, epoch {int(ds['epoch'].values[-1])}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return True


def plot_epistemic(ds, path: str | Path) -> Path | None:
    """Epistemic information I(T_l; W | X) per layer and BALD I(Y; W | X) over training.

    One panel per target (the layers, then the prediction ``Y``) with the measured
    epochs on the x axis and one line per configuration (noise level) with a weight
    posterior; with two or more noise levels a last panel shows the last epoch's
    values against sigma.  Layer panels mark ``log M`` (M weight draws), the most a
    dataset MI over the draws can be.

    Returns
    -------
    Path or None
        None when the results have no epistemic estimates (``estimate.uncertainty``
        unset, or no Bayesian model).
    """
    configs = _epistemic_configs(ds)
    if not configs:
        return None
    targets = [str(t) for t in ds["epistemic_target"].values]
    mean, err = _mean_err(ds, "epistemic_value", "epistemic_stderr")
    band = _seed_band(ds, "epistemic_value")
    ncols = len(targets) + 1
    fig, axes = _figure(1, ncols)
    try:
        m = int(json.loads(ds.attrs.get("estimate_settings") or "{}").get("n_weight_draws", 0))
    except (TypeError, ValueError):
        m = 0
    for t, name in enumerate(targets):
        ax = axes[0][t]
        _epistemic_panel(ax, ds, mean, err, band, t, configs)
        if name == "Y":
            ax.set_title("BALD  I(Y; W | X)", fontsize=9)
        else:
            ax.set_title(f"I({name}; W | X)", fontsize=9)
            if m > 1:
                ax.axhline(math.log(m), color="0.5", ls="--", lw=0.8)
                ax.annotate(
                    "log M",
                    (0.02, math.log(m)),
                    xycoords=("axes fraction", "data"),
                    fontsize=7,
                    color="0.4",
                    va="bottom",
                )
        if t == 0:
            ax.legend(fontsize=7)
    if not _epistemic_vs_noise(axes[0][-1], ds, mean, err, configs):
        axes[0][-1].set_visible(False)
    seeds = ds.sizes.get("seed", 1)
    fig.suptitle("Epistemic information over training (mean over seeds)")
    caption = _caption(ds) + ("; bands: smallest to largest seed" if seeds > 1 else "")
    if m and "weight draws" not in caption:
        caption += f"; M = {m} posterior weight draws"
    if "epistemic_converged" in ds and bool((ds["epistemic_converged"] == 0).any()):
        caption += "; open markers: importance sampling not converged (epistemic_converged = 0)"
    _add_caption(fig, caption)
    return _save(fig, path)


def plot_all(ds, out_dir: str | Path) -> dict[str, Path]:
    """Write every plot that the results support into ``out_dir``; returns name -> path."""
    out = Path(out_dir)
    made = {
        "information_plane": plot_information_plane(ds, out / "information_plane.png"),
        "mi_vs_noise": plot_mi_vs_noise(ds, out / "mi_vs_noise.png"),
        "layer_to_layer": plot_layer_to_layer(ds, out / "layer_to_layer.png"),
        "epistemic": plot_epistemic(ds, out / "epistemic.png"),
    }
    return {k: v for k, v in made.items() if v is not None}
