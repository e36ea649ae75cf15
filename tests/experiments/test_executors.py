"""Executors: process pool and Ray give the in-process results; failures; resume.

The Ray tests start a local Ray (2 CPUs) for this module and stop it afterwards.  They
carry the ``ray`` marker, which the default run excludes; ``python -m pytest -m ray``
selects them (``.ci/run`` does).  Ray is an optional extra (``pip install -e ".[ray]"``);
where it is missing these tests are skipped with a visible reason, except when ``CI`` or
``STOCHMI_REQUIRE_RAY`` is set in the environment, where its absence is an error.
"""

from __future__ import annotations

import os
import sys

import pytest
import xarray as xr

from stochmi.experiments.cells import run_cell
from stochmi.experiments.executors import (
    RAY_INSTALL_HINT,
    InProcessExecutor,
    ProcessExecutor,
    RayExecutor,
    make_executor,
)
from stochmi.experiments.store import load_results
from stochmi.experiments.sweep import run_sweep
from tests.helpers import SHARED_TINY

TINY = SHARED_TINY  # [resources] cpus = 1

FAIL_ID = "noisy_noise.sigma=0.5_seed=1"


def failing_cell(cell, progress=False):
    """run_cell, except that one cell raises (runs in worker processes too)."""
    if cell.cell_id == FAIL_ID:
        raise RuntimeError("injected failure in a worker")
    return run_cell(cell, progress=progress)


def _sweep(exp, out, **kw):
    return run_sweep(exp, out, progress=False, log=None, plots=False, **kw)


@pytest.fixture
def exp_file(tiny_sweep):
    return tiny_sweep.exp


@pytest.fixture
def reference(tiny_sweep):
    """The results of the session's in-process sweep of TINY."""
    return load_results(tiny_sweep.out)


def test_make_executor():
    assert isinstance(make_executor(), InProcessExecutor)
    assert isinstance(make_executor(workers=1), InProcessExecutor)
    ex = make_executor(workers=2)
    assert isinstance(ex, ProcessExecutor) and ex.workers == 2 and ex.threads is None
    with pytest.raises(ValueError, match="unknown executor"):
        make_executor("threads")
    with pytest.raises(ValueError, match="--executor ray"):
        make_executor("process", ray_address="auto")
    with pytest.raises(ValueError, match="positive"):
        ProcessExecutor(0)


def test_inprocess_threads_set_and_restored(exp_file):
    import torch

    from stochmi.experiments.config import load_experiment

    cell = load_experiment(exp_file).cells()[0]
    before = torch.get_num_threads()

    def threads(c, progress=False):
        return {"threads": torch.get_num_threads()}

    (out,) = list(InProcessExecutor(threads=3).run(threads, [cell]))
    assert out.result == {"threads": 3} and torch.get_num_threads() == before
    # default: the cell's [resources] cpus
    (out,) = list(InProcessExecutor().run(threads, [cell]))
    assert out.result == {"threads": 1} and torch.get_num_threads() == before
    assert make_executor(workers=2, threads=1).threads == 1
    with pytest.raises(ValueError, match="threads"):
        InProcessExecutor(threads=0)


def test_ray_missing_gives_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RuntimeError) as exc:
        RayExecutor()
    assert str(exc.value) == RAY_INSTALL_HINT and 'pip install -e ".[ray]"' in str(exc.value)


@pytest.mark.slow
def test_process_pool_matches_inprocess_reports_failure_and_resumes(exp_file, reference, tmp_path):
    """Two spawned workers: one cell fails in a worker, the other three are written as they
    arrive; a rerun (here in-process) runs only the failed cell, and the assembled results
    equal the in-process reference exactly."""
    out = tmp_path / "out"
    res = _sweep(exp_file, out, executor="process", workers=2, cell_fn=failing_cell)
    assert "2 workers" in res.executor
    assert [c for c, _ in res.failures] == [FAIL_ID]
    assert "injected failure in a worker" in res.failures[0][1]
    assert res.n_run == 3 and res.dataset is None
    assert len(list((out / "cells").glob("*.json"))) == 3
    res = _sweep(exp_file, out)
    assert res.complete and res.n_run == 1 and res.n_skipped == 3
    xr.testing.assert_identical(load_results(out), reference)


# -- Ray ---------------------------------------------------------------------------------


def _import_ray():
    try:
        import ray
    except ImportError:
        if os.environ.get("CI") or os.environ.get("STOCHMI_REQUIRE_RAY"):
            raise
        pytest.skip(
            'Ray is not installed (pip install -e ".[ray]"); required when CI is set',
        )
    return ray


@pytest.fixture(scope="module")
def local_ray():
    ray = _import_ray()
    if ray.is_initialized():  # pragma: no cover - left over from elsewhere
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # the failing cell function lives in this test module, which Ray workers cannot
    # import by name: ship it by value
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield ray
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()


@pytest.mark.ray
def test_ray_identical_to_inprocess(exp_file, reference, local_ray, tmp_path):
    out = tmp_path / "out"
    res = _sweep(exp_file, out, executor="ray")
    assert res.complete and res.n_run == 4 and res.executor.startswith("ray")
    xr.testing.assert_identical(load_results(out), reference)
    assert local_ray.is_initialized()  # an existing Ray is used and left running


@pytest.mark.ray
def test_ray_failure_then_resume(exp_file, reference, local_ray, tmp_path):
    out = tmp_path / "out"
    res = _sweep(exp_file, out, executor="ray", cell_fn=failing_cell)
    assert [c for c, _ in res.failures] == [FAIL_ID]
    assert "injected failure in a worker" in res.failures[0][1]
    assert len(list((out / "cells").glob("*.json"))) == 3
    res = _sweep(exp_file, out, executor="ray")
    assert res.complete and res.n_run == 1 and res.n_skipped == 3
    xr.testing.assert_identical(load_results(out), reference)


@pytest.mark.ray
def test_ray_resource_hints_reach_tasks(local_ray, exp_file):
    """[resources] cpus becomes the task's Ray CPU request and its torch thread count."""
    import dataclasses

    from stochmi.experiments.config import Resources, load_experiment

    cell = load_experiment(exp_file).cells()[0]
    cells = [
        dataclasses.replace(cell, resources=Resources(cpus=2.0, gpus=0.0)),
        dataclasses.replace(cell, cell_id="half", resources=Resources(cpus=0.5, gpus=0.0)),
    ]

    def echo(c, progress=False):
        import ray
        import torch

        assigned = ray.get_runtime_context().get_assigned_resources()
        return {"threads": torch.get_num_threads(), "CPU": assigned.get("CPU")}

    with RayExecutor() as ex:
        got = {o.cell.cell_id: o.result for o in ex.run(echo, cells)}
    assert got[cell.cell_id] == {"threads": 2, "CPU": 2.0}
    assert got["half"] == {"threads": 1, "CPU": 0.5}
