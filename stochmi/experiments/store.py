"""Results on disk: per-cell records, resuming, and the assembled outputs.

Layout of a sweep folder ``DIR``::

    DIR/manifest.json            experiment name, file, SHA-256 of its text, cell ids
    DIR/experiment.toml          the experiment file, verbatim
    DIR/cells/<cell_id>.json     one record per finished cell (written atomically)
    DIR/cells/<cell_id>.error.txt  traceback of a failed cell (removed once it succeeds)
    DIR/results.nc               xarray Dataset (engine h5netcdf), dims config, seed, epoch, pair
    DIR/summary.csv              one row per cell x epoch x pair
    DIR/bayes_per_draw.nc        ArviZ InferenceData with I(X;T | W=w) per posterior draw
                                 (only when the experiment asks for conditional estimates)
    DIR/*.png                    plots (see stochmi.experiments.plots)

Every file is written to a temporary name in the same folder and moved into place
with :func:`os.replace`, so an interrupted run never leaves a half-written file.  A
cell record carries the SHA-256 of the cell's settings (:meth:`CellSpec.key`); a rerun
skips exactly the cells whose record is present with the same key.  The assembled
outputs are built from the records alone, in the experiment's order, so they are
identical whether the cells ran in one go, in several interrupted runs, or under
different executors.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import tomllib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stochmi.experiments.config import CellSpec, ExperimentConfig
from stochmi.models.spec import BAYESIAN_KINDS

__all__ = [
    "ResultStore",
    "ResumeError",
    "assemble",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_results",
    "stale_reason",
    "validate_record",
    "write_outputs",
]

MANIFEST = "manifest.json"
RESULTS_NC = "results.nc"
SUMMARY_CSV = "summary.csv"
PER_DRAW_NC = "bayes_per_draw.nc"

_EST_VARS = (
    "value",
    "stderr",
    "lower",
    "upper",
    "saturated",
    "dpi_ok",
    "k_paths",
    "n",
    "converged",
    "mc_bias",
)
_COND_VARS = ("value", "stderr", "lower", "upper")
_EPI_VARS = ("value", "stderr", "lower", "upper", "saturated", "converged", "closed_form")
_ENTROPY_VARS = ("predictive_entropy", "aleatoric_entropy")


class ResumeError(ValueError):
    """The output folder belongs to a different experiment (or to something else)."""


def _umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_via_tmp(path: Path, prefix: str, suffix: str, fill) -> None:
    """Create a temporary file next to ``path``, ``fill(fd, tmp_name)`` it, then
    :func:`os.replace` it onto ``path``; on any error the temporary file is removed.

    :func:`tempfile.mkstemp` creates files with mode 0600; the file gets the mode
    that :func:`open` would give it (0666 less the umask) before it is moved into place.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        fill(fd, tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _atomic_write(path: Path, write) -> None:
    path = Path(path)

    def fill(fd, _tmp):
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())

    _replace_via_tmp(path, f".{path.name}.", ".tmp", fill)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and :func:`os.replace`."""
    _atomic_write(Path(path), lambda fh: fh.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_via_tmpfile(path: Path, writer) -> None:
    """Atomic write for libraries that want a file name: ``writer(tmp_name)``."""
    path = Path(path)

    def fill(fd, tmp):
        os.close(fd)
        writer(tmp)

    _replace_via_tmp(path, f".{path.stem}.", path.suffix, fill)


LOCK = ".lock"


class ResultStore:
    """Per-cell records of one sweep folder.

    Parameters
    ----------
    out_dir : str or Path
        The sweep folder (created when missing).
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.cells_dir = self.out_dir / "cells"
        self._lock_fd: int | None = None

    # -- folder ownership -------------------------------------------------------------

    def writable(self) -> bool:
        """Whether files can be created in the folder (True when it does not exist yet)."""
        if not self.out_dir.exists():
            return True
        return os.access(self.out_dir, os.W_OK | os.X_OK) and (
            not self.cells_dir.exists() or os.access(self.cells_dir, os.W_OK | os.X_OK)
        )

    def check_folder(self) -> None:
        """Raise :class:`ResumeError` when ``out_dir`` cannot be a sweep folder (a file,
        or inside a file)."""
        for p in (self.out_dir, *self.out_dir.parents):
            if p.exists():
                if not p.is_dir():
                    raise ResumeError(f"--out {self.out_dir}: {p} is a file, not a folder")
                break

    def lock(self) -> None:
        """Take the folder's lock (``DIR/.lock``) for this process.

        Raises
        ------
        ResumeError
            Another process holds it (the message names its pid and host).
        """
        if self._lock_fd is not None:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no lock
            return
        self.check_folder()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / LOCK
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise ResumeError(
                f"{self.out_dir} is in use by another stochmi sweep ({holder}); wait for it "
                "to finish, or use another --out folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock taken by :meth:`lock` (the lock file stays)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.unlock()

    def _read_manifest(self, path: Path, force: bool) -> dict:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            if force:
                return {}
            raise ResumeError(
                f"{path} is corrupt ({exc}); the folder cannot be matched to an experiment. "
                f"If it holds results of this experiment, delete {path.name} and rerun "
                "(finished cells are checked against their settings and kept), or pass "
                "--force, or use another --out folder."
            ) from None

    def check_claim(self, config: ExperimentConfig, *, force=False) -> None:
        """Check, without creating or writing anything, that :meth:`open` would accept
        the folder for ``config``.

        A sweep calls this before :meth:`lock`, so a refused sweep leaves the folder
        exactly as it found it: no lock file created, none rewritten.

        Raises
        ------
        ResumeError
            As :meth:`open`.
        """
        self.check_folder()
        manifest_path = self.out_dir / MANIFEST
        if manifest_path.exists():
            old = self._read_manifest(manifest_path, force)
            if old.get("experiment_sha256") != config.sha256 and not force:
                raise ResumeError(
                    f"{self.out_dir} holds results of a different experiment file "
                    f"({old.get('experiment_name', '?')!r} from {old.get('experiment_file', '?')}"
                    f"); refusing to mix them. Use another --out folder, or pass --force to "
                    "reuse it (cells whose settings are unchanged are kept, the rest recomputed)."
                )
        elif self.out_dir.exists() and not force:
            if any(p.name != LOCK for p in self.out_dir.iterdir()):
                raise ResumeError(
                    f"{self.out_dir} is not empty and is not a stochmi sweep folder "
                    f"(no {MANIFEST}); choose an empty or new --out folder, or pass --force"
                )

    def open(self, config: ExperimentConfig, cells: Sequence[CellSpec], *, force=False) -> None:
        """Claim the folder for ``config``: check the manifest, then (re)write it.

        Files whose content is unchanged are not rewritten, so a finished sweep in a
        read-only folder can be opened again.

        Raises
        ------
        ResumeError
            When ``out_dir`` holds results of a different experiment file (different
            text), has a corrupt manifest, or is a non-empty folder that is not a sweep
            folder, unless ``force`` (then records whose cell settings are unchanged are
            reused and the others recomputed); when ``out_dir`` is a file.  Nothing is
            written then.
        """
        self.check_claim(config, force=force)
        manifest_path = self.out_dir / MANIFEST
        manifest = {
            "experiment_name": config.name,
            "experiment_file": config.path,
            "experiment_sha256": config.sha256,
            "cells": [c.cell_id for c in cells],
        }
        _write_if_changed(manifest_path, json.dumps(manifest, indent=1) + "\n")
        _write_if_changed(self.out_dir / "experiment.toml", config.text)
        if not self.cells_dir.is_dir():
            self.cells_dir.mkdir(parents=True, exist_ok=True)

    def open_read_only(self, config: ExperimentConfig) -> None:
        """Check, without writing, that the folder holds results of ``config``.

        Raises
        ------
        ResumeError
            No manifest, a corrupt one, or one of a different experiment file.
        """
        manifest_path = self.out_dir / MANIFEST
        if not manifest_path.is_file():
            raise ResumeError(f"{self.out_dir} is read-only and is not a stochmi sweep folder")
        old = self._read_manifest(manifest_path, force=False)
        if old.get("experiment_sha256") != config.sha256:
            raise ResumeError(
                f"{self.out_dir} is read-only and holds results of a different experiment "
                f"file ({old.get('experiment_name', '?')!r}); use another --out folder"
            )

    # -- records -----------------------------------------------------------------------

    def record_path(self, cell: CellSpec | str) -> Path:
        cell_id = cell if isinstance(cell, str) else cell.cell_id
        return self.cells_dir / f"{cell_id}.json"

    def error_path(self, cell: CellSpec | str) -> Path:
        cell_id = cell if isinstance(cell, str) else cell.cell_id
        return self.cells_dir / f"{cell_id}.error.txt"

    def check(self, cell: CellSpec) -> tuple[dict[str, Any] | None, str | None]:
        """``(record, None)`` for a finished, valid record of ``cell``; otherwise
        ``(None, reason)``, with reason ``None`` when there is no record at all."""
        path = self.record_path(cell)
        if not path.exists():
            return None, None
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            return None, f"unreadable record ({exc})"
        if not isinstance(rec, dict):
            return None, "the record is not a JSON object"
        if rec.get("key") != cell.key():
            return None, stale_reason(rec, cell)
        problem = validate_record(rec, cell)
        if problem:
            return None, f"invalid record: {problem}"
        return rec, None

    def load(self, cell: CellSpec) -> dict[str, Any] | None:
        """The finished record of ``cell``, or None (missing, unreadable, stale key or
        content that does not match what the cell must contain)."""
        return self.check(cell)[0]

    def is_done(self, cell: CellSpec) -> bool:
        return self.load(cell) is not None

    def write(self, record: dict[str, Any]) -> Path:
        """Write a finished cell's record atomically; removes its old error file."""
        path = self.record_path(record["cell_id"])
        atomic_write_text(path, json.dumps(record, indent=1, allow_nan=True) + "\n")
        try:
            self.error_path(record["cell_id"]).unlink()
        except FileNotFoundError:
            pass
        return path

    def write_failure(self, cell: CellSpec, error: str) -> Path:
        """Keep a failed cell's traceback next to the records."""
        path = self.error_path(cell)
        atomic_write_text(path, error)
        return path

    def records(self, cells: Sequence[CellSpec]) -> list[dict[str, Any]]:
        """Records of ``cells`` in their order; raises if any is not finished."""
        out = []
        for cell in cells:
            rec, reason = self.check(cell)
            if rec is None:
                why = f" ({reason})" if reason else ""
                raise FileNotFoundError(f"cell {cell.cell_id} has no finished record{why}")
            out.append(rec)
        return out


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically unless ``path`` already holds exactly that text."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, ValueError):
        pass
    atomic_write_text(path, text)


def stale_reason(record: dict[str, Any], cell: CellSpec) -> str:
    """Why a stored record's key differs from ``cell.key()``, in words."""
    old = record.get("fingerprint")
    new = cell.fingerprint()
    if not isinstance(old, dict):
        return "record written by an older stochmi without a fingerprint"
    changed = []
    for k in sorted(set(old) | set(new)):
        if old.get(k) != new.get(k):
            if k == "versions":
                a, b = old.get(k) or {}, new.get(k) or {}
                changed += [
                    f"{n} {a.get(n)} -> {b.get(n)}"
                    for n in sorted(set(a) | set(b))
                    if a.get(n) != b.get(n)
                ]
            elif k == "estimator_revision":
                changed.append(
                    f"estimator revision {old.get(k) or '(none recorded)'} -> {new.get(k)}"
                )
            elif k == "settings" and isinstance(record.get("cell"), dict):
                a, b = record["cell"], cell.to_dict()
                names = [n for n in sorted(set(a) | set(b)) if n not in ("device", "resources")]
                changed += [f"{n} changed" for n in names if a.get(n) != b.get(n)] or [
                    "cell settings changed"
                ]
            else:
                what = {"estimator": "estimator settings", "weight_estimator": "weight_mi settings"}
                changed.append(f"{what.get(k, k)} changed")
    return ", ".join(changed) or "cell settings changed"


def validate_record(rec: dict[str, Any], cell: CellSpec) -> str | None:
    """What is wrong with a record's content for ``cell``, or None when it is complete.

    A record must name the cell, hold at least one estimate per measured epoch (rows
    with ``epoch``, ``source``, ``target``, ``value``), one accuracy entry per measured
    epoch, and the data description fields that :func:`assemble` reads; with
    ``estimate.uncertainty``, a Bayesian cell also needs its ``uncertainty`` rows
    (``epoch``, ``target``, ``value``) for every measured epoch.
    """
    if rec.get("cell_id") != cell.cell_id:
        return f"cell_id {rec.get('cell_id')!r} is not {cell.cell_id!r}"
    for name, typ in (
        ("data_source", str),
        ("n_train", int),
        ("n_test", int),
        ("n_inputs", int),
        ("versions", dict),
    ):
        if not isinstance(rec.get(name), typ):
            return f"{name!r} missing or not a {typ.__name__}"
    epochs = set(cell.estimate.epochs)
    for name, fields in (
        ("estimates", ("epoch", "source", "target", "value")),
        ("accuracy", ("epoch",)),
    ):
        problem = _check_rows(rec.get(name), name, fields, epochs, required=True)
        if problem:
            return problem
    cond = rec.get("conditional", [])
    if not isinstance(cond, list) or any(
        not isinstance(r, dict)
        or any(f not in r for f in ("epoch", "source", "target"))
        or r["epoch"] not in epochs
        for r in cond
    ):
        return "'conditional' rows malformed"
    if cell.estimate.uncertainty:
        rows = rec.get("uncertainty")
        if not isinstance(rows, list):
            return "'uncertainty' missing (the experiment sets estimate.uncertainty = true)"
        required = cell_kind(cell) in BAYESIAN_KINDS
        return _check_rows(rows, "uncertainty", ("epoch", "target", "value"), epochs, required)
    return None


def _check_rows(rows, name: str, fields, epochs: set, required: bool) -> str | None:
    """Rows of a record: dicts with ``fields``, for the measured ``epochs`` only, and
    (``required``) for each of them."""
    if not isinstance(rows, list) or (required and not rows):
        return f"{name!r} missing or empty"
    for row in rows:
        if not isinstance(row, dict) or any(f not in row for f in fields):
            return f"a row of {name!r} lacks one of {', '.join(fields)}"
    got = {row["epoch"] for row in rows}
    if required and epochs - got:
        return f"{name!r} has no rows for epochs {sorted(epochs - got)}"
    if got - epochs:
        return f"{name!r} has rows for epochs that are not measured"
    return None


def cell_kind(cell: CellSpec) -> str:
    """The model kind of a cell (``[model] kind`` of its resolved spec)."""
    return str(tomllib.loads(cell.spec_toml).get("model", {}).get("kind", ""))


# -- assembling -------------------------------------------------------------------------


def _pairs_in_order(records: Sequence[dict]) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for rec in records:
        for row in rec["estimates"]:
            seen.setdefault((row["source"], row["target"]), None)
        for row in rec.get("conditional", []):
            seen.setdefault((row["source"], row["target"]), None)
    return list(seen)


def _epistemic_targets(records: Sequence[dict]) -> list[str]:
    """Targets of the epistemic rows (layers, then ``"Y"``) in order of appearance."""
    seen: dict[str, None] = {}
    for rec in records:
        for row in rec.get("uncertainty") or []:
            seen.setdefault(str(row["target"]), None)
    layers = [t for t in seen if t != "Y"]
    return layers + (["Y"] if "Y" in seen else [])


def _pair_kind(source: str, target: str) -> str:
    if source == "X":
        return "input"
    if target == "Y":
        return "label"
    return "layer"


def _as_float(v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, bool):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _override_coords(cells: Sequence[CellSpec], config_ids: list[str]) -> dict[str, Any]:
    """A coordinate per overridden spec key (``noise.sigma`` -> ``set_noise_sigma``)."""
    by_config = {c.config_id: dict(c.overrides) for c in cells}
    keys: dict[str, None] = {}
    for c in cells:
        for k, _ in c.overrides:
            keys.setdefault(k, None)
    coords = {}
    for k in keys:
        vals = [by_config[cid].get(k) for cid in config_ids]
        present = [v for v in vals if v is not None]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
            arr = np.array([math.nan if v is None else float(v) for v in vals])
        else:
            arr = np.array(["" if v is None else json.dumps(v) for v in vals], dtype=object)
        coords["set_" + k.replace(".", "_")] = ("config", arr)
    return coords


@dataclass
class _Grid:
    """The axes of the assembled outputs and the arrays filled from the records."""

    config_ids: list[str]
    first: dict[str, CellSpec]
    seeds: list[int]
    epochs: list[int]
    pairs: list[tuple[str, str]]
    targets: list[str]  # epistemic targets (layers, then "Y")
    est: dict[str, np.ndarray] = field(default_factory=dict)
    acc: dict[str, np.ndarray] = field(default_factory=dict)
    cond: dict[str, np.ndarray] = field(default_factory=dict)
    epi: dict[str, np.ndarray] = field(default_factory=dict)
    entropy: dict[str, np.ndarray] = field(default_factory=dict)
    draws: np.ndarray | None = None
    has_cond: bool = False

    @property
    def pair_names(self) -> list[str]:
        return [f"{s}->{t}" for s, t in self.pairs]

    @property
    def has_epi(self) -> bool:
        return bool(self.targets)

    def index(self, cell: CellSpec) -> tuple[int, int]:
        return self.config_ids.index(cell.config_id), self.seeds.index(cell.seed)


def _grid(config: ExperimentConfig, cells: Sequence[CellSpec], records: Sequence[dict]) -> _Grid:
    """Axes of the outputs, with NaN-filled arrays for every variable."""
    first: dict[str, CellSpec] = {}
    for c in cells:
        first.setdefault(c.config_id, c)
    g = _Grid(
        config_ids=list(first),
        first=first,
        seeds=list(config.seeds),
        epochs=list(config.estimate.epochs),
        pairs=_pairs_in_order(records),
        targets=_epistemic_targets(records),
    )
    shape = (len(g.config_ids), len(g.seeds), len(g.epochs), len(g.pairs))
    g.est = {k: np.full(shape, np.nan) for k in _EST_VARS}
    g.acc = {k: np.full(shape[:3], np.nan) for k in ("test_accuracy", "train_accuracy", "loss")}
    g.has_cond = any(rec.get("conditional") for rec in records)
    g.cond = {k: np.full(shape, np.nan) for k in (*_COND_VARS, "sd", "hdi_lower", "hdi_upper")}
    n_draws = max(
        (len(r["draws"]) for rec in records for r in rec.get("conditional", []) if r.get("draws")),
        default=0,
    )
    g.draws = np.full((*shape, n_draws), np.nan)
    g.epi = {k: np.full((*shape[:3], len(g.targets)), np.nan) for k in _EPI_VARS}
    g.entropy = {k: np.full(shape[:3], np.nan) for k in _ENTROPY_VARS}
    return g


def _fill_conditional(g: _Grid, i: int, j: int, rec: dict) -> None:
    for r in rec.get("conditional", []):
        k = g.epochs.index(r["epoch"])
        p = g.pairs.index((r["source"], r["target"]))
        for name in _COND_VARS:
            g.cond[name][i, j, k, p] = _as_float(r.get(name))
        d = r.get("draws")
        if d:
            arr = np.asarray(d, dtype=float)
            g.draws[i, j, k, p, : len(arr)] = arr
            g.cond["sd"][i, j, k, p] = float(np.std(arr, ddof=1)) if len(arr) > 1 else np.nan
            lo, hi = _hdi(arr)
            g.cond["hdi_lower"][i, j, k, p] = lo
            g.cond["hdi_upper"][i, j, k, p] = hi


def _fill_epistemic(g: _Grid, i: int, j: int, rec: dict) -> None:
    for r in rec.get("uncertainty") or []:
        k, t = g.epochs.index(r["epoch"]), g.targets.index(str(r["target"]))
        for name in _EPI_VARS:
            g.epi[name][i, j, k, t] = _as_float(r.get(name))
        if r["target"] == "Y":
            for name in _ENTROPY_VARS:
                g.entropy[name][i, j, k] = _as_float(r.get(name))


def _fill(g: _Grid, cells: Sequence[CellSpec], records: Sequence[dict]) -> None:
    """Copy every record's numbers into the arrays of ``g``."""
    for cell, rec in zip(cells, records):
        if rec["cell_id"] != cell.cell_id:
            raise ValueError(f"record {rec['cell_id']} does not belong to cell {cell.cell_id}")
        i, j = g.index(cell)
        for a in rec["accuracy"]:
            for name, arr in g.acc.items():
                arr[i, j, g.epochs.index(a["epoch"])] = _as_float(a.get(name))
        _fill_conditional(g, i, j, rec)
        _fill_epistemic(g, i, j, rec)
        for r in rec["estimates"]:
            k, p = g.epochs.index(r["epoch"]), g.pairs.index((r["source"], r["target"]))
            for name in _EST_VARS:
                g.est[name][i, j, k, p] = _as_float(r.get(name))


def _cell_columns(cell: CellSpec) -> dict[str, Any]:
    return {
        "cell_id": cell.cell_id,
        "config": cell.config_id,
        "label": cell.label,
        "spec": cell.spec,
        "sigma": cell.sigma,
        "overrides": json.dumps(dict(cell.overrides), sort_keys=True),
        "seed": cell.seed,
    }


def _pair_rows(g: _Grid, cell: CellSpec, rec: dict) -> list[dict[str, Any]]:
    """Summary rows of one cell's layer-MI estimates."""
    i, j = g.index(cell)
    accs = {a["epoch"]: a["test_accuracy"] for a in rec["accuracy"]}
    conds = {(r["epoch"], r["source"], r["target"]): r for r in rec.get("conditional", [])}
    rows = []
    for r in rec["estimates"]:
        k, p = g.epochs.index(r["epoch"]), g.pairs.index((r["source"], r["target"]))
        row = _cell_columns(cell)
        row.update(
            epoch=r["epoch"],
            pair=f"{r['source']}->{r['target']}",
            source=r["source"],
            target=r["target"],
            kind=_pair_kind(r["source"], r["target"]),
        )
        row.update({name: _as_float(r.get(name)) for name in _EST_VARS})
        row["test_accuracy"] = accs.get(r["epoch"], math.nan)
        if g.has_cond:
            c = conds.get((r["epoch"], r["source"], r["target"]))
            for name in _COND_VARS:
                row[f"cond_{name}"] = _as_float(c.get(name)) if c else math.nan
            for name in ("sd", "hdi_lower", "hdi_upper"):
                row[f"cond_{name}"] = float(g.cond[name][i, j, k, p])
        row["_p"] = p
        rows.append(row)
    return rows


def _epistemic_rows(g: _Grid, cell: CellSpec, rec: dict) -> list[dict[str, Any]]:
    """Summary rows of one cell's epistemic information: pair ``W->T|X``, kind
    ``epistemic``, value = I(T; W | X) (``T = Y``: BALD)."""
    accs = {a["epoch"]: a["test_accuracy"] for a in rec["accuracy"]}
    rows = []
    for r in rec.get("uncertainty") or []:
        t = str(r["target"])
        row = _cell_columns(cell)
        row.update(epoch=r["epoch"], pair=f"W->{t}|X", source="W", target=t, kind="epistemic")
        row.update({name: math.nan for name in _EST_VARS})
        row.update({name: _as_float(r.get(name)) for name in _EPI_VARS})
        row["n"] = float(rec["n_inputs"])
        row["test_accuracy"] = accs.get(r["epoch"], math.nan)
        row["_p"] = len(g.pairs) + g.targets.index(t)
        rows.append(row)
    return rows


def _summary(g: _Grid, cells: Sequence[CellSpec], records: Sequence[dict]):
    """One row per cell x epoch x pair (and x epistemic target), in the experiment's order."""
    import pandas as pd

    rows = []
    for cell, rec in zip(cells, records):
        rows += _pair_rows(g, cell, rec)
        rows += _epistemic_rows(g, cell, rec)
    summary = pd.DataFrame(rows)
    if not len(summary):
        return summary
    order = {c.cell_id: n for n, c in enumerate(cells)}
    summary["_c"] = summary["cell_id"].map(order)
    summary = summary.sort_values(["_c", "epoch", "_p"], kind="stable")
    return summary.drop(columns=["_c", "_p"]).reset_index(drop=True)


_DESCRIPTIONS = {
    "value": "dataset mutual information estimate (nats), weights marginalised",
    "stderr": "Monte Carlo standard error of value (nats)",
    "lower": "lower bound on the population MI (nats)",
    "upper": "upper bound on the population MI (nats)",
    "saturated": "1 when the lower bound is near log N (more inputs needed)",
    "dpi_ok": "1 when the data-processing inequalities hold for this pair",
    "k_paths": "forward paths per input for densities across layers (1: direct density)",
    "converged": "1 when the deep-layer density estimate met its tolerance",
    "mc_bias": "estimated remaining bias of the deep-layer estimate (nats)",
    "n": "number of inputs",
}

_EPI_DESCRIPTIONS = {
    "value": "epistemic information I(T; W | X) (nats; T = Y: BALD), dataset MI over the "
    "posterior weight draws averaged over the inputs (stochmi.weight_mi)",
    "stderr": "Monte Carlo standard error of epistemic_value (nats)",
    "lower": "lower bound on the epistemic information under the posterior (nats)",
    "upper": "upper bound (leave-one-out) on the epistemic information (nats)",
    "saturated": "1 when epistemic_value is near log M (more weight draws needed)",
    "converged": "1 when the deep-layer importance sampling passed its half-sample check",
    "closed_form": "first layer: exact population I(T_1; W | X) under the mean-field "
    "posterior (local reparameterisation), not limited by log M; nan otherwise",
}


def _data_vars(g: _Grid) -> dict[str, Any]:
    dims = ("config", "seed", "epoch", "pair")
    data_vars = {}
    for name in _EST_VARS:
        data_vars[name] = (dims, g.est[name], {"description": _DESCRIPTIONS[name]})
    data_vars["value"][2]["units"] = "nats"
    for name, text in (
        ("test_accuracy", "predictive accuracy on the held-out images"),
        ("train_accuracy", "predictive accuracy on the training images"),
        ("loss", "training loss (-ELBO per training example) of the epoch; nan at epoch 0"),
    ):
        data_vars[name] = (dims[:3], g.acc[name], {"description": text})
    if g.has_cond:
        for name in (*_COND_VARS, "sd", "hdi_lower", "hdi_upper"):
            data_vars[f"cond_{name}"] = (
                dims,
                g.cond[name],
                {"description": f"I(X;T | W=w) over posterior weight draws: {name} (nats)"},
            )
    if g.has_epi:
        epi_dims = (*dims[:3], "epistemic_target")
        for name in _EPI_VARS:
            attrs = {"description": _EPI_DESCRIPTIONS[name]}
            data_vars[f"epistemic_{name}"] = (epi_dims, g.epi[name], attrs)
        data_vars["epistemic_value"][2]["units"] = "nats"
        for name, text in (
            ("predictive_entropy", "total predictive entropy H[p(y|x)] (nats), input mean"),
            ("aleatoric_entropy", "E_W H[p(y|x,W)] (nats), input mean; total - aleatoric = BALD"),
        ):
            data_vars[name] = (dims[:3], g.entropy[name], {"description": text})
    return data_vars


def _coords(g: _Grid, cells: Sequence[CellSpec]) -> dict[str, Any]:
    first, ids = g.first, g.config_ids
    coords = {
        "config": np.array(ids, dtype=object),
        "seed": np.array(g.seeds, dtype=np.int64),
        "epoch": np.array(g.epochs, dtype=np.int64),
        "pair": np.array(g.pair_names, dtype=object),
        "label": ("config", np.array([first[c].label for c in ids], dtype=object)),
        "spec": ("config", np.array([first[c].spec for c in ids], dtype=object)),
        "sigma": ("config", np.array([first[c].sigma for c in ids], dtype=float)),
        "overrides": (
            "config",
            np.array(
                [json.dumps(dict(first[c].overrides), sort_keys=True) for c in ids],
                dtype=object,
            ),
        ),
        "source": ("pair", np.array([s for s, _ in g.pairs], dtype=object)),
        "target": ("pair", np.array([t for _, t in g.pairs], dtype=object)),
        "kind": ("pair", np.array([_pair_kind(s, t) for s, t in g.pairs], dtype=object)),
    }
    if g.has_epi:
        coords["epistemic_target"] = np.array(g.targets, dtype=object)
    coords.update(_override_coords(cells, ids))
    return coords


def _attrs(config: ExperimentConfig, cells: Sequence[CellSpec], records) -> dict[str, Any]:
    sources = sorted({rec["data_source"] for rec in records})
    return {
        "title": f"stochmi sweep: {config.name}",
        "experiment_name": config.name,
        "experiment_description": config.description,
        "experiment_file": config.path,
        "experiment_sha256": config.sha256,
        "experiment_text": config.text,
        "data_source": "; ".join(sources),
        "n_train": int(records[0]["n_train"]) if records else 0,
        "n_test": int(records[0]["n_test"]) if records else 0,
        "n_inputs": int(records[0]["n_inputs"]) if records else 0,
        "units": "nats",
        "estimate_settings": json.dumps(_settings_dict(config), sort_keys=True),
        "versions": json.dumps(records[0]["versions"] if records else {}, sort_keys=True),
        "cell_ids": json.dumps([c.cell_id for c in cells]),
    }


def assemble(config: ExperimentConfig, cells: Sequence[CellSpec], records: Sequence[dict]):
    """Build the outputs of a sweep from its cell records.

    Parameters
    ----------
    config : ExperimentConfig
    cells : sequence of CellSpec
        All cells of the experiment (order defines the output order).
    records : sequence of dict
        The finished records, one per cell, same order (from :func:`run_cell`).

    Returns
    -------
    ds : xarray.Dataset
        Dims ``config`` (grid points), ``seed``, ``epoch``, ``pair``.  Variables
        (NaN where a model has no such pair): ``value``, ``stderr``, ``lower``,
        ``upper`` (nats; weights marginalised), ``saturated``, ``dpi_ok`` (0/1),
        ``k_paths``, ``n``; ``test_accuracy``, ``train_accuracy``, ``loss``
        (config, seed, epoch); with
        conditional estimates also ``cond_value``, ``cond_stderr``, ``cond_lower``,
        ``cond_upper``, ``cond_sd``, ``cond_hdi_lower``, ``cond_hdi_upper`` (94% HDI
        over posterior draws); with ``estimate.uncertainty`` also ``epistemic_value``,
        ``epistemic_stderr``, ``epistemic_lower``, ``epistemic_upper``,
        ``epistemic_saturated``, ``epistemic_converged``, ``epistemic_closed_form``
        (config, seed, epoch, ``epistemic_target``: the layers, then ``"Y"``;
        I(T; W | X) in nats, BALD for ``"Y"``; NaN for models with fixed weights)
        and ``predictive_entropy``, ``aleatoric_entropy`` (config, seed, epoch).
        Coordinates: ``label``, ``spec``, ``sigma``,
        ``overrides`` and ``set_<key>`` per config; ``source``, ``target``,
        ``kind`` (input / layer / label) per pair.
    summary : pandas.DataFrame
        One row per cell x epoch x pair; with ``estimate.uncertainty`` also one row
        per cell x epoch x epistemic target (``pair = "W->h1|X"``, ``source = "W"``,
        ``kind = "epistemic"``, value/stderr/lower/upper of I(T; W | X)).
    idata : arviz.InferenceData or None
        Posterior group with variable ``mi`` (chain, draw, config, seed, epoch, pair)
        holding I(X;T | W = w) per weight draw; None without conditional estimates.
    """
    import xarray as xr

    if len(cells) != len(records):
        raise ValueError("assemble needs one record per cell")
    g = _grid(config, cells, records)
    _fill(g, cells, records)
    summary = _summary(g, cells, records)
    attrs = _attrs(config, cells, records)
    ds = xr.Dataset(_data_vars(g), coords=_coords(g, cells), attrs=attrs)
    idata = None
    if g.has_cond and g.draws.shape[-1]:
        idata = _per_draw_idata(g, attrs)
    return ds, summary, idata


def _settings_dict(config: ExperimentConfig) -> dict[str, Any]:
    e = config.estimate
    return {
        "epochs": list(e.epochs),
        "n_inputs": e.n_inputs,
        "n_paths": e.n_paths,
        "n_weight_draws": e.n_weight_draws,
        "conditional": e.conditional,
        "uncertainty": e.uncertainty,
    }


def _hdi(x: np.ndarray, prob: float = 0.94) -> tuple[float, float]:
    """94% highest-density interval of the finite draws (:func:`arviz.hdi`); NaNs when
    fewer than two draws are finite."""
    import arviz as az

    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return math.nan, math.nan
    lo, hi = az.hdi(x, hdi_prob=prob)
    return float(lo), float(hi)


def _per_draw_idata(g: _Grid, attrs: dict[str, Any]):
    import arviz as az

    keep = [
        i
        for i in range(len(g.config_ids))
        if np.isfinite(g.draws[i]).any()  # configs with a weight posterior
    ]
    arr = g.draws[keep]  # (config, seed, epoch, pair, draw)
    arr = np.moveaxis(arr, -1, 0)[None]  # (chain=1, draw, config, seed, epoch, pair)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer draws than ArviZ's diagnostics want
        idata = az.from_dict(
            posterior={"mi": arr},
            coords={
                "config": [g.config_ids[i] for i in keep],
                "seed": list(g.seeds),
                "epoch": list(g.epochs),
                "pair": list(g.pair_names),
            },
            dims={"mi": ["config", "seed", "epoch", "pair"]},
        )
    post = idata.posterior
    post.attrs.pop("created_at", None)  # reruns must give identical files
    post.attrs.update(
        {
            "description": "I(X;T | W=w) in nats for posterior weight draws w "
            "(stochmi.layer_mi weights='conditional'); chain 0, one draw per weight sample",
            "experiment_name": attrs["experiment_name"],
            "experiment_sha256": attrs["experiment_sha256"],
            "data_source": attrs["data_source"],
            "units": "nats",
        }
    )
    post["mi"].attrs["units"] = "nats"
    return idata


def write_outputs(out_dir: str | Path, ds, summary, idata=None) -> dict[str, Path]:
    """Write ``results.nc``, ``summary.csv`` and (if any) ``bayes_per_draw.nc`` atomically."""
    out = Path(out_dir)
    files = {}
    atomic_via_tmpfile(out / RESULTS_NC, lambda p: ds.to_netcdf(p, engine="h5netcdf"))
    files["results"] = out / RESULTS_NC
    atomic_write_text(out / SUMMARY_CSV, summary.to_csv(index=False))
    files["summary"] = out / SUMMARY_CSV
    if idata is not None:
        atomic_via_tmpfile(out / PER_DRAW_NC, lambda p: idata.to_netcdf(p, engine="h5netcdf"))
        files["per_draw"] = out / PER_DRAW_NC
    return files


def load_results(out_dir: str | Path):
    """Open ``DIR/results.nc`` as an :class:`xarray.Dataset` (loaded into memory)."""
    import xarray as xr

    path = Path(out_dir) / RESULTS_NC
    with xr.open_dataset(path, engine="h5netcdf") as ds:
        return ds.load()
