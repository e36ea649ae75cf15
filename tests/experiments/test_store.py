"""Stored results: record validation, cell keys, corrupt manifests, file modes, the lock."""

from __future__ import annotations

import json
import os
import stat

import pytest

from stochmi.experiments import config as config_mod
from stochmi.experiments.cells import run_cell
from stochmi.experiments.config import parse_experiment
from stochmi.experiments.store import ResultStore, ResumeError, atomic_write_text
from stochmi.experiments.sweep import run_sweep
from tests.helpers import SHARED_TINY, copy_sweep

TINY = SHARED_TINY


@pytest.fixture
def finished(tiny_sweep):
    """The session's finished sweep of TINY (read it; ``_copy`` it to write into it)."""
    return tiny_sweep.exp, tiny_sweep.out


def _copy(finished, tmp_path):
    exp, out = finished
    return exp, copy_sweep(out, tmp_path)


def _spy(calls):
    def fn(cell, progress=False):
        calls.append(cell.cell_id)
        return run_cell(cell, progress=progress)

    return fn


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda rec: rec.update(estimates=[]), "'estimates' missing or empty"),
        (lambda rec: rec.pop("estimates"), "'estimates' missing or empty"),
        (lambda rec: rec.update(accuracy=rec["accuracy"][:1]), "'accuracy' has no rows"),
        (lambda rec: rec["estimates"][0].pop("value"), "lacks one of"),
    ],
)
def test_invalid_record_is_recomputed_and_reported(finished, tmp_path, damage, reason):
    """A record that parses but lacks content is not counted as done."""
    exp, out = _copy(finished, tmp_path)
    cell_file = out / "cells" / "noisy_noise.sigma=0.5_seed=0.json"
    rec = json.loads(cell_file.read_text())
    damage(rec)
    cell_file.write_text(json.dumps(rec))
    lines, calls = [], []
    res = run_sweep(exp, out, progress=False, log=lines.append, plots=False, cell_fn=_spy(calls))
    assert calls == ["noisy_noise.sigma=0.5_seed=0"] and res.complete
    assert any("recomputing" in line and reason in line for line in lines), lines
    assert not res.dataset["value"].isnull().all(dim="pair").any()
    assert json.loads(cell_file.read_text())["estimates"]


def test_cell_key_includes_versions_and_estimator_defaults(monkeypatch, finished):
    """An upgrade of stochmi (or torch, pyro) or a changed estimator default changes
    the key, and the reason is named."""
    exp, out = finished
    cell = parse_experiment(TINY).cells()[0]
    key = cell.key()
    store = ResultStore(out)
    assert store.check(cell)[0] is not None
    new = dict(config_mod._numeric_versions())
    new["stochmi"] = "99.0"
    monkeypatch.setattr(config_mod, "_numeric_versions", lambda: tuple(new.items()))
    assert cell.key() != key
    rec, reason = store.check(cell)
    assert rec is None and "stochmi" in reason and "-> 99.0" in reason
    monkeypatch.undo()
    defaults = dict(config_mod._estimator_defaults())
    defaults["n_is"] = "12345"
    monkeypatch.setattr(config_mod, "_estimator_defaults", lambda: tuple(defaults.items()))
    assert cell.key() != key
    assert "estimator settings changed" in store.check(cell)[1]


def test_changed_estimator_revision_invalidates_stored_records(monkeypatch, finished, tmp_path):
    """Records written under another estimator revision are recomputed, never reused,
    and the log names the revision change."""
    import stochmi.core

    exp, out = _copy(finished, tmp_path)
    cells = parse_experiment(TINY).cells()
    store = ResultStore(out)
    assert all(store.check(c)[0] is not None for c in cells)
    old = stochmi.core.ESTIMATOR_REVISION
    monkeypatch.setattr(stochmi.core, "ESTIMATOR_REVISION", old + "-next")
    lines, calls = [], []
    res = run_sweep(exp, out, progress=False, log=lines.append, plots=False, cell_fn=_spy(calls))
    assert sorted(calls) == sorted(c.cell_id for c in cells) and res.complete
    reasons = [line for line in lines if "recomputing" in line]
    assert len(reasons) == len(cells)
    assert all(f"estimator revision {old} -> {old}-next" in line for line in reasons), reasons
    for c in cells:
        rec = json.loads(store.record_path(c).read_text())
        assert rec["fingerprint"]["estimator_revision"] == old + "-next"
    monkeypatch.undo()  # back at the old revision, the new records are stale in turn
    assert all("estimator revision" in store.check(c)[1] for c in cells)


def test_truncated_manifest_is_reported_as_corrupt(finished, tmp_path):
    """A truncated manifest is reported as corrupt, and --force takes the folder over."""
    exp, out = _copy(finished, tmp_path)
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text()[:20])
    with pytest.raises(ResumeError, match="manifest.json is corrupt") as exc:
        run_sweep(exp, out, progress=False, log=None, plots=False, cell_fn=_spy([]))
    assert "different experiment" not in str(exc.value) and "delete manifest.json" in str(exc.value)
    # --force takes the folder over; the stored cells are still reused
    calls = []
    res = run_sweep(
        exp, out, force=True, progress=False, log=None, plots=False, cell_fn=_spy(calls)
    )
    assert calls == [] and res.complete


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_respect_umask(tmp_path, mask):
    """Files get 0666 less the umask (mkstemp alone gives 0600)."""
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask


def test_sweep_outputs_readable_by_group_and_others(finished):
    exp, out = finished
    mask = os.umask(0o022)
    os.umask(mask)
    for name in ("results.nc", "summary.csv", "manifest.json", "experiment.toml"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o666 & ~mask, name
    for p in (out / "cells").glob("*.json"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask


def test_second_sweep_on_same_folder_is_refused(finished, tmp_path):
    """A sweep holds a lock on its folder; a second one names it."""
    exp, out = _copy(finished, tmp_path)
    holder = ResultStore(out)
    holder.lock()
    try:
        calls = []
        with pytest.raises(
            ResumeError, match=rf"in use by another stochmi sweep \(pid {os.getpid()}"
        ):
            run_sweep(exp, out, progress=False, log=None, plots=False, cell_fn=_spy(calls))
        assert calls == []
    finally:
        holder.unlock()
    res = run_sweep(exp, out, progress=False, log=None, plots=False, cell_fn=_spy(calls))
    assert res.complete and calls == []


def test_rerun_into_read_only_finished_folder(finished, tmp_path, monkeypatch):
    """A finished sweep in a read-only folder reruns without writing."""
    import stochmi.experiments.store as store_mod

    exp, out = _copy(finished, tmp_path)
    real_access = os.access

    def access(path, mode, **kw):
        if str(path).startswith(str(out)) and mode & os.W_OK:
            return False
        return real_access(path, mode, **kw)

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(out))

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(store_mod, "_replace_via_tmp", refuse)
    lines = []
    res = run_sweep(exp, out, progress=False, log=lines.append, plots=False, cell_fn=_spy([]))
    assert res.complete and res.n_skipped == 4 and res.dataset is not None
    assert any("read-only" in line for line in lines)
    # with a cell left to run, a clear refusal instead
    (out / "cells" / "noisy_noise.sigma=0.5_seed=0.json").unlink()
    with pytest.raises(ResumeError, match="read-only and the sweep is not finished"):
        run_sweep(exp, out, progress=False, log=None, plots=False, cell_fn=_spy([]))
