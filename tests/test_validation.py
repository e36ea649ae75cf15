"""stochmi.validation: the Key / Validator mechanism behind spec and experiment files."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from stochmi.validation import Key, Validator, did_you_mean, parse_assignment, parse_literal


class Bad(ValueError):
    pass


V = Validator("f.toml", Bad)


@pytest.mark.parametrize(
    ("value", "key", "message"),
    [
        (1.5, Key("int"), "f.toml: x must be an integer, got 1.5"),
        (True, Key("int"), "x must be an integer, got True"),
        (math.inf, Key("float"), "x must be a finite number, got inf"),
        (1, Key("bool"), "x must be true or false, got 1"),
        (3, Key("str"), "x must be a string, got 3"),
        ("c", Key("str", choices=("a", "b")), "x = 'c' is not one of 'a', 'b'"),
        (0, Key("float", minimum=0.0, strict_min=True), "x must be > 0.0, got 0"),
        (1, Key("int", minimum=2), "x must be >= 2, got 1"),
        ([], Key("int_list", nonempty=True), "x must be a non-empty list of integers, got []"),
        ([1, "a"], Key("int_list"), "x must contain integers only, got 'a'"),
        ([3, -1], Key("int_list", minimum=0), "x must be >= 0, got -1"),
        ([], Key("float_or_list"), "x must not be an empty list"),
        ([0.1, -1.0], Key("float_or_list", minimum=0.0), "x must be >= 0.0, got -1.0"),
        ("s", Key("table"), "x must be a table of 'key = value'"),
        ({"a": {"b": 1}}, Key("table"), "x.a: use dotted keys in quotes"),
        ({"a": []}, Key("grid"), "x.a must be a non-empty list of values"),
    ],
)
def test_check_messages(value, key, message):
    with pytest.raises(Bad) as info:
        V.check(value, key, "x")
    assert message in str(info.value) and str(info.value).startswith("f.toml: ")


def test_valid_values_pass_and_defaults():
    assert V.check([1, 2], Key("int_list", minimum=1), "x") == [1, 2]
    assert V.check(0.5, Key("float_or_list", minimum=0.0), "x") == 0.5
    assert V.read({}, "n", Key("int", 7), "sec.n") == 7
    with pytest.raises(Bad, match="missing required key 'sec.n'"):
        V.read({}, "n", Key("int", required=True), "sec.n")
    with pytest.raises(ValueError, match="unknown key type"):
        Key("complex")


def test_unknown_names_with_and_without_hint():
    with pytest.raises(
        Bad, match=r"unknown key 'lrr' \(did you mean 'lr'\?\); allowed: epochs, lr"
    ):
        V.check_names({"lrr": 1}, ["lr", "epochs"])
    with pytest.raises(Bad) as info:
        V.check_names({"qqqq": 1}, ["lr", "epochs"])
    assert "did you mean" not in str(info.value)
    assert (
        did_you_mean("nois", ["noise", "model"], lambda s: f"[{s}]") == " (did you mean [noise]?)"
    )


def test_parse_literal_and_assignment():
    assert parse_literal("[16, 8]") == [16, 8] and parse_literal("relu") == "relu"
    assert parse_assignment("data.n = 300") == ("data.n", 300)
    with pytest.raises(ValueError, match="must look like 'section.key=value'"):
        parse_assignment("data.n")
    with pytest.raises(ValueError, match="is not a TOML literal"):
        parse_assignment("model.hidden=[1, ")


def test_module_is_light():
    code = (
        "import sys, stochmi.validation; "
        "bad = [m for m in ('pyro', 'pandas', 'xarray') if m in sys.modules]; "
        "sys.exit(str(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
