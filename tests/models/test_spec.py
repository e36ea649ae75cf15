"""Tests for stochmi.models.spec: loading, validation, overrides, TOML round-trip."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from stochmi.models.spec import (
    ModelSpec,
    SpecError,
    dumps_toml,
    list_specs,
    load_spec,
    models_dir,
    spec_from_toml,
)

REFERENCE = ["bayes_mlp", "bayes_small", "noisy_cnn", "noisy_mlp"]


def test_reference_specs_are_shipped_and_load():
    assert set(REFERENCE) <= set(list_specs())
    kinds = {name: load_spec(name).kind for name in REFERENCE}
    assert kinds == {
        "bayes_mlp": "bayes_mlp",
        "bayes_small": "bayes_mlp",
        "noisy_cnn": "noisy_cnn",
        "noisy_mlp": "noisy_mlp",
    }
    s = load_spec("noisy_mlp")
    assert s.name == "noisy_mlp" and s.path == models_dir() / "noisy_mlp.toml"
    assert s.get("model.hidden") == [256, 128, 64]
    assert s.get("model.activation") == "tanh"
    assert s.get("noise.sigma") == 0.1
    assert load_spec("bayes_small").get("noise.sigma") == 0.0


@pytest.mark.parametrize("name", REFERENCE)
def test_to_toml_round_trips(name):
    s = load_spec(name)
    text = s.to_toml()
    assert tomllib.loads(text) == s.data
    s2 = spec_from_toml(text, name)
    assert s2.data == s.data and s2.name == name


def test_dumps_toml_handles_awkward_values():
    data = {
        "top": 1,
        "a": {
            "s": 'quote " back \\ tab\t newline\n unicode é ∑ \x7f',
            "f": [1.5, -0.0, 1e-300, 1e16, math.inf, -math.inf],
            "b": True,
            "empty": [],
            "nested": [[1, 2], ["x"]],
            "weird key": 3,
            "sub": {"deep": {"x": 1}},
        },
        "only_subtables": {"t": {"k": "v"}},
    }
    back = tomllib.loads(dumps_toml(data))
    assert back == data
    nan_back = tomllib.loads(dumps_toml({"x": {"v": math.nan}}))
    assert math.isnan(nan_back["x"]["v"])
    with pytest.raises(TypeError):
        dumps_toml({"x": object()})


def test_overrides_as_strings_and_dicts():
    s = load_spec(
        "noisy_mlp",
        [
            "noise.sigma=0.2",
            "model.activation=relu",
            "model.hidden=[32, 16]",
            'data.source="shared-test"',
            "training.epochs=2",
        ],
    )
    assert s.get("noise.sigma") == 0.2
    assert s.get("model.activation") == "relu"
    assert s.get("model.hidden") == [32, 16]
    assert s.get("data.source") == "shared-test"
    assert s.get("training.epochs") == 2
    d = load_spec("noisy_mlp", {"noise.sigma": [0.1, 0.2, 0.3]})
    assert d.sigmas(3) == [0.1, 0.2, 0.3]
    # bare word with a hyphen falls back to a string
    assert load_spec("noisy_mlp", ["data.source=shared-test"]).get("data.source") == "shared-test"
    # original untouched
    assert load_spec("noisy_mlp").get("noise.sigma") == 0.1
    # round trip after overrides
    assert spec_from_toml(s.to_toml(), "x").data == s.data


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["noise.sigma=-0.1"], r"\[noise\]\.sigma must be >= 0"),
        (["noise.sigma=0"], r"deterministic.*infinite"),
        (["noise.sigma=[0.1, 0.0, 0.1]"], r"deterministic"),
        (["noise.sigma=[0.1, 0.2]"], r"2 entries but the network has 3"),
        (["model.activation=gelu"], r"\[model\]\.activation = 'gelu' is not one of"),
        (["model.depth=3"], r"unknown key 'depth' in \[model\]"),
        (["optimiser.lr=0.1"], r"unknown section \[optimiser\]"),
        (["training.epochs=1.5"], r"\[training\]\.epochs must be an integer"),
        (["training.lr=0"], r"\[training\]\.lr must be > 0"),
        (["model.hidden=[32, -1]"], r"\[model\]\.hidden"),
        (["model.hidden=[]"], r"no stochastic layer"),
        (["prior.scale=1.0"], r"\[prior\]\.scale does not apply to kind 'noisy_mlp'"),
        (["model.kind=resnet"], r"\[model\]\.kind = 'resnet'"),
        (["noise.where=inside"], r"\[noise\]\.where"),
        (["model.activation=1"], r"must be a string"),
        (["sigma=0.1"], r"section\.key"),
        (["noise.sigma=[1, "], r"not a TOML literal"),
    ],
)
def test_invalid_specs_name_file_and_key(overrides, pattern):
    with pytest.raises(SpecError, match=pattern) as info:
        load_spec("noisy_mlp", overrides)
    assert "noisy_mlp.toml" in str(info.value)


def test_bayes_specific_rules():
    s = load_spec("bayes_mlp", ["noise.sigma=0"])  # allowed: stochastic through weights
    assert s.get("noise.sigma") == 0
    with pytest.raises(SpecError, match="pre-activation"):
        load_spec("bayes_mlp", ["noise.where=post-activation"])
    with pytest.raises(SpecError, match="post-activation"):
        load_spec("noisy_cnn", ["noise.where=pre-activation"])
    with pytest.raises(SpecError, match=r"\[prior\]\.scale must be > 0"):
        load_spec("bayes_mlp", ["prior.scale=0.0"])
    with pytest.raises(SpecError, match="true or false"):
        load_spec("bayes_mlp", ["prior.fan_in=1"])


def test_defaults_and_get():
    s = spec_from_toml('[model]\nkind = "bayes_mlp"\n', "tiny")
    assert s.get("model.hidden") == [128, 64]
    assert s.get("noise.where") == "pre-activation"
    assert s.get("training.optimizer") == "clipped_adam"
    assert s.get("guide.init_scale") == 0.01
    assert s.get("training.epochs", 99) == 99
    with pytest.raises(SpecError, match="unknown key"):
        s.get("model.nope")
    n = spec_from_toml('[model]\nkind = "noisy_mlp"\n', "tiny")
    assert n.get("noise.sigma") == 0.1 and n.get("training.optimizer") == "adam"


def test_a_bare_cnn_spec_is_the_shipped_network_and_its_sigma_list_must_fit():
    bare = spec_from_toml('[model]\nkind = "noisy_cnn"\n', "bare")
    shipped = load_spec("noisy_cnn")
    for key in [
        "model.conv_channels",
        "model.hidden",
        "model.activation",
        "noise.sigma",
        "training.epochs",
        "training.lr",
    ]:
        assert bare.get(key) == shipped.get(key), key
    with pytest.raises(SpecError, match=r"3 entries \(the noisy_cnn default.*has 4 stochastic"):
        spec_from_toml('[model]\nkind = "noisy_cnn"\nhidden = [64, 32]\n', "deeper")
    deeper = spec_from_toml(
        '[model]\nkind = "noisy_cnn"\nhidden = [64, 32]\n[noise]\nsigma = 1.0\n', "ok"
    )
    assert deeper.sigmas(4) == [1.0] * 4


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="available: .*noisy_mlp"):
        load_spec("no_such_model")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nkind = 1")
    with pytest.raises(SpecError, match=r"bad\.toml: invalid TOML"):
        load_spec(bad)
    nokind = tmp_path / "nokind.toml"
    nokind.write_text("[noise]\nsigma = 0.1\n")
    with pytest.raises(SpecError, match=r"nokind\.toml: \[model\]\.kind is required"):
        load_spec(str(nokind))
    with pytest.raises(TypeError):
        load_spec(42)


def test_user_file_by_path_and_save(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('[model]\nkind = "noisy_mlp"\nhidden = [20]\n[noise]\nsigma = 0.5\n')
    s = load_spec(p, ["noise.sigma=0.25"])
    assert s.name == "mine" and s.get("noise.sigma") == 0.25 and s.get("model.hidden") == [20]
    out = s.save(tmp_path / "saved.toml")
    assert load_spec(out).data == s.data
    assert load_spec(s) is s
    assert isinstance(load_spec(s, {"noise.sigma": 0.3}), ModelSpec)


def test_specs_found_as_package_data_from_any_cwd(tmp_path, monkeypatch):
    """``models/`` is the package ``stochmi.models.specs`` (importlib.resources)."""
    from importlib.resources import files

    monkeypatch.chdir(tmp_path)
    assert models_dir() == Path(str(files("stochmi.models.specs")))
    assert load_spec("noisy_mlp").path == models_dir() / "noisy_mlp.toml"


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["model.hiden=[16]"], r"unknown key 'hiden' in \[model\] \(did you mean 'hidden'\?\)"),
        (["noize.sigma=0.1"], r"unknown section \[noize\] \(did you mean \[noise\]\?\)"),
        (["training.epoch=2"], r"\(did you mean 'epochs'\?\); allowed: epochs, batch_size"),
    ],
)
def test_unknown_spec_names_get_a_hint(overrides, pattern):
    with pytest.raises(SpecError, match=pattern) as info:
        load_spec("noisy_mlp", overrides)
    assert "noisy_mlp.toml" in str(info.value)


def test_hint_in_spec_files_and_get(tmp_path):
    p = tmp_path / "typo.toml"
    p.write_text('[model]\nkind = "noisy_mlp"\nactivaton = "relu"\n')
    with pytest.raises(SpecError, match=r"typo\.toml: .*'activaton'.*did you mean 'activation'"):
        load_spec(p)
    p.write_text('[model]\nkind = "noisy_mlp"\nzzzzqq = 1\n')
    with pytest.raises(SpecError) as info:
        load_spec(p)
    assert "unknown key 'zzzzqq'" in str(info.value) and "did you mean" not in str(info.value)
    s = load_spec("noisy_mlp")
    with pytest.raises(SpecError, match=r"unknown key 'noise.sigm' \(did you mean 'noise.sigma'"):
        s.get("noise.sigm")


def test_spec_and_experiment_share_one_validation_mechanism():
    """Both schemas are made of stochmi.validation.Key and checked by
    stochmi.validation.Validator."""
    from stochmi.experiments import config
    from stochmi.models import spec
    from stochmi.validation import Key

    for schema in (spec.SCHEMA, config.SCHEMA):
        assert all(isinstance(k, Key) for keys in schema.values() for k in keys.values())
    assert "_Validator" not in vars(config) and "_check_scalar" not in vars(spec)


def test_cnn_geometry_is_checked_against_the_defaults_it_leaves_out():
    # 28 -> 12 -> 4 -> 0 pixels with the default kernel 5 and pool 2
    with pytest.raises(SpecError, match="below 1 pixel"):
        spec_from_toml(
            '[model]\nkind = "noisy_cnn"\nconv_channels = [8, 4, 2]\n[noise]\nsigma = 1.0\n', "deep"
        )
    with pytest.raises(SpecError, match=r"input_dim = 100 must equal image_size\^2 = 784"):
        spec_from_toml('[model]\nkind = "noisy_cnn"\ninput_dim = 100\n', "dim")
    spec_from_toml(
        '[model]\nkind = "noisy_cnn"\nimage_size = 10\ninput_dim = 100\n'
        "kernel_size = 3\nconv_channels = [4]\nhidden = [8]\n[noise]\nsigma = 1.0\n",
        "small",
    )
