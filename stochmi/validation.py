"""One validation mechanism for the TOML files stochmi reads: model specs and experiments.

Both file kinds are described by a schema, ``{section: {key: Key}}``, and checked by a
:class:`Validator`, which raises the caller's error class with the file (or spec) name
in front of the message:

- unknown sections and keys are named with a "did you mean" hint
  (:func:`difflib.get_close_matches`) and the list of allowed names;
- values are checked against their :class:`Key`: type, choices, minimum;
- missing required keys are named.

What only one file kind has (the spec's model kinds and noise rules, the experiment's
``[[model]]`` grids) stays with that file's parser and raises through the same
:meth:`Validator.fail`.  Standard library only: importing this module loads neither
torch, Pyro nor pandas.
"""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Key", "Validator", "did_you_mean", "parse_literal", "parse_assignment"]

#: value types a :class:`Key` can declare
TYPES = ("int", "float", "str", "bool", "int_list", "float_or_list", "table", "grid")


@dataclass(frozen=True)
class Key:
    """What one key of a schema accepts.

    Attributes
    ----------
    type : str
        ``"int"``, ``"float"`` (finite), ``"str"``, ``"bool"``, ``"int_list"``,
        ``"float_or_list"`` (a finite number or a non-empty list of them),
        ``"table"`` (``key = value`` pairs) or ``"grid"`` (``key = [values]`` pairs).
    default : object
        Value when the key is absent (None: unset).
    choices : tuple, optional
        The allowed values.
    minimum : float, optional
        Smallest allowed number (each element of a list).
    strict_min : bool
        ``minimum`` itself is not allowed.
    kinds : tuple
        Model kinds the key applies to (model specs; empty: not restricted).
    help : str
        One line for the generated reference.
    required : bool
        The key must be present.
    nonempty : bool
        Lists must have at least one element.
    """

    type: str
    default: Any = None
    choices: tuple | None = None
    minimum: float | None = None
    strict_min: bool = False
    kinds: tuple = ()
    help: str = ""
    required: bool = False
    nonempty: bool = False

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"unknown key type {self.type!r}; one of {', '.join(TYPES)}")


def did_you_mean(word: str, candidates: Iterable[str], fmt: Callable[[str], str] = repr) -> str:
    """``" (did you mean 'x'?)"`` for the closest candidate, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(word), sorted(map(str, candidates)), n=1)
    return f" (did you mean {fmt(close[0])}?)" if close else ""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


class Validator:
    """Checks for one file; every error is ``error(f"{origin}: {message}")``.

    Parameters
    ----------
    origin : str
        The file or spec name that starts every message.
    error : type
        The exception class to raise (``SpecError``, ``ConfigError``, ...).
    """

    def __init__(self, origin: str, error: type[Exception] = ValueError) -> None:
        self.origin = origin
        self.error = error

    def fail(self, message: str) -> Exception:
        """The exception for ``message`` (raise it: ``raise v.fail(...)``)."""
        return self.error(f"{self.origin}: {message}")

    # -- names ---------------------------------------------------------------------------

    def check_names(
        self,
        table: Mapping,
        allowed: Iterable[str],
        *,
        what: str = "key",
        shown: Callable[[str], str] = repr,
        where: str = "",
        listing: str | None = None,
        suggest: Callable[[str], str] | None = None,
    ) -> None:
        """Raise for the first name of ``table`` that is not in ``allowed``.

        The message is ``unknown {what} {shown(name)}{where} (did you mean
        {suggest(close)}?); allowed: {listing}`` (``suggest`` defaults to ``shown``,
        ``listing`` to the sorted allowed names).
        """
        allowed = list(allowed)
        for name in table:
            if name not in allowed:
                hint = did_you_mean(name, allowed, suggest or shown)
                shown_all = listing if listing is not None else ", ".join(sorted(allowed))
                raise self.fail(f"unknown {what} {shown(name)}{where}{hint}; allowed: {shown_all}")

    # -- values --------------------------------------------------------------------------

    def read(self, table: Mapping, name: str, key: Key, where: str) -> Any:
        """``table[name]`` checked against ``key`` (``key.default`` when absent).

        ``where`` names the key in messages (``"estimate.n_inputs"``,
        ``"[noise].sigma"``)."""
        if name not in table:
            if key.required:
                raise self.fail(f"missing required key {where!r}")
            return key.default
        return self.check(table[name], key, where)

    def check(self, value: Any, key: Key, where: str) -> Any:
        """``value`` when it satisfies ``key``; otherwise the error names ``where``."""
        checker = getattr(self, f"_check_{key.type}")
        checker(value, key, where)
        return value

    def _choices_and_minimum(self, v: Any, key: Key, where: str) -> None:
        if key.choices is not None and v not in key.choices:
            raise self.fail(f"{where} = {v!r} is not one of {', '.join(map(repr, key.choices))}")
        if key.minimum is not None and _is_num(v):
            if v < key.minimum or (key.strict_min and v == key.minimum):
                rel = ">" if key.strict_min else ">="
                raise self.fail(f"{where} must be {rel} {key.minimum}, got {v!r}")

    def _check_int(self, v: Any, key: Key, where: str) -> None:
        if not _is_int(v):
            raise self.fail(f"{where} must be an integer, got {v!r}")
        self._choices_and_minimum(v, key, where)

    def _check_float(self, v: Any, key: Key, where: str) -> None:
        if not _is_num(v) or not math.isfinite(v):
            raise self.fail(f"{where} must be a finite number, got {v!r}")
        self._choices_and_minimum(v, key, where)

    def _check_bool(self, v: Any, key: Key, where: str) -> None:
        if not isinstance(v, bool):
            raise self.fail(f"{where} must be true or false, got {v!r}")

    def _check_str(self, v: Any, key: Key, where: str) -> None:
        if not isinstance(v, str):
            raise self.fail(f"{where} must be a string, got {v!r}")
        self._choices_and_minimum(v, key, where)

    def _check_int_list(self, v: Any, key: Key, where: str) -> None:
        if not isinstance(v, list) or (key.nonempty and not v):
            what = "a non-empty list" if key.nonempty else "a list"
            raise self.fail(f"{where} must be {what} of integers, got {v!r}")
        for x in v:
            if not _is_int(x):
                raise self.fail(f"{where} must contain integers only, got {x!r}")
            self._choices_and_minimum(x, key, where)

    def _check_float_or_list(self, v: Any, key: Key, where: str) -> None:
        if isinstance(v, list) and not v:
            raise self.fail(f"{where} must not be an empty list")
        for x in v if isinstance(v, list) else [v]:
            if not _is_num(x) or not math.isfinite(x):
                raise self.fail(f"{where} must be a finite number (or list), got {v!r}")
            self._choices_and_minimum(x, key, where)

    def _check_table(self, v: Any, key: Key, where: str) -> None:
        if not isinstance(v, dict):
            raise self.fail(f"{where} must be a table of 'key = value'")
        for k, x in v.items():
            if isinstance(x, dict):
                raise self.fail(
                    f"{where}.{k}: use dotted keys in quotes, "
                    f'e.g. {where.rsplit(".", 1)[-1]} = {{ "noise.sigma" = 0.1 }}'
                )

    def _check_grid(self, v: Any, key: Key, where: str) -> None:
        if not isinstance(v, dict):
            raise self.fail(f"{where} must be a table of 'key = [values]'")
        for k, vals in v.items():
            if not isinstance(vals, list) or not vals:
                raise self.fail(f"{where}.{k} must be a non-empty list of values, got {vals!r}")
            if any(isinstance(x, dict) for x in vals):
                raise self.fail(f"{where}.{k}: values must not be tables")


_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.+\-]*$")


def parse_literal(text: str) -> Any:
    """A value written on a command line: a TOML literal (``0.1``, ``[16, 8]``,
    ``true``, ``"x"``), else a bare word (``relu``, ``shared-test``) as a string.

    Raises
    ------
    tomllib.TOMLDecodeError
        Neither a TOML literal nor a bare word.
    """
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if _BARE.match(text.strip()):
            return text.strip()
        raise


def parse_assignment(item: str) -> tuple[str, Any]:
    """``"section.key=value"`` -> ``("section.key", value)`` (value by :func:`parse_literal`).

    Raises
    ------
    ValueError
        No ``=``, or a value that is not a TOML literal (the message says which).
    """
    if not isinstance(item, str) or "=" not in item:
        raise ValueError(f"{item!r} must look like 'section.key=value'")
    key, text = item.split("=", 1)
    try:
        return key.strip(), parse_literal(text)
    except tomllib.TOMLDecodeError:
        raise ValueError(f"{item!r}: value {text!r} is not a TOML literal") from None
