"""Plots from a results Dataset (built here with the layout a sweep writes)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from stochmi.experiments.plots import (
    plot_all,
    plot_information_plane,
    plot_layer_to_layer,
    plot_mi_vs_noise,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _dataset(sigmas=(0.5, 1.0, 2.0), seeds=(0, 1), epochs=(0, 1, 3)):
    pairs = ["X->h1", "X->h2", "h1->h2", "h1->Y", "h2->Y"]
    rng = np.random.default_rng(0)
    shape = (len(sigmas), len(seeds), len(epochs), len(pairs))
    value = rng.uniform(0.5, 4.0, shape)
    ds = xr.Dataset(
        {
            "value": (("config", "seed", "epoch", "pair"), value),
            "stderr": (("config", "seed", "epoch", "pair"), np.full(shape, 0.05)),
        },
        coords={
            "config": [f"noisy_noise.sigma={s}" for s in sigmas],
            "seed": list(seeds),
            "epoch": list(epochs),
            "pair": pairs,
            "label": ("config", ["noisy"] * len(sigmas)),
            "sigma": ("config", np.array(sigmas, dtype=float)),
            "source": ("pair", [p.split("->")[0] for p in pairs]),
            "target": ("pair", [p.split("->")[1] for p in pairs]),
            "kind": ("pair", ["input", "input", "layer", "label", "label"]),
        },
        attrs={"experiment_name": "synthetic", "n_inputs": 100},
    )
    return ds


def test_all_plots_written(tmp_path):
    files = plot_all(_dataset(), tmp_path)
    assert set(files) == {"information_plane", "mi_vs_noise", "layer_to_layer"}
    for path in files.values():
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))


def test_degenerate_inputs_return_none(tmp_path):
    one = _dataset(sigmas=(1.0,), seeds=(0,))
    assert plot_mi_vs_noise(one, tmp_path / "a.png") is None  # one noise level
    assert plot_information_plane(one, tmp_path / "b.png").is_file()
    no_sigma = _dataset()
    no_sigma = no_sigma.assign_coords(sigma=("config", [np.nan] * 3))
    assert plot_mi_vs_noise(no_sigma, tmp_path / "c.png") is None
    no_layer_pairs = _dataset().isel(pair=[0, 1, 3, 4])
    assert plot_layer_to_layer(no_layer_pairs, tmp_path / "d.png") is None
    no_labels = _dataset().isel(pair=[0, 1, 2])
    assert plot_information_plane(no_labels, tmp_path / "e.png") is None
    assert not (tmp_path / "a.png").exists()


def test_missing_values_tolerated(tmp_path):
    ds = _dataset()
    v = ds.value.values.copy()
    v[0, :, :, 1] = np.nan  # a model without layer h2
    ds["value"] = (ds.value.dims, v)
    files = plot_all(ds, tmp_path)
    assert len(files) == 3


def test_unconverged_points_are_open_markers(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from matplotlib import pyplot as plt

    from stochmi.experiments.plots import _mean_err, _plane_panel

    ds = _dataset(sigmas=(1.0,), seeds=(0, 1))
    conv = np.ones(ds.value.shape)
    conv[0, 1, 0, 1] = 0  # X->h2 at epoch 0, in one seed only
    ds["converged"] = (ds.value.dims, conv)
    mean, err = _mean_err(ds)
    fig, ax = plt.subplots()
    _plane_panel(ax, ds, 0, ["h1", "h2"], mean, err, colormaps["viridis"])
    open_pts = [
        c
        for c in ax.collections
        if len(c.get_facecolors()) and np.allclose(c.get_facecolors()[:, :3], 1.0)
    ]
    assert len(open_pts) == 1 and len(open_pts[0].get_offsets()) == 1
    h2_x = mean.isel(config=0, pair=1).values[0]
    assert open_pts[0].get_offsets()[0][0] == h2_x
    plt.close(fig)
    path = plot_information_plane(ds, tmp_path / "p.png")
    assert path.read_bytes()[:8] == PNG
