"""The public names, and rules every library module keeps (checked on the source)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import stochmi

ROOT = Path(stochmi.__file__).parent
#: Longest function body allowed, in lines, docstring excluded (the issue's "about 80").
MAX_FUNCTION_LINES = 80


def test_every_public_name_resolves():
    for name in stochmi.__all__:
        assert getattr(stochmi, name) is not None, name


def test_unknown_attribute_raises():
    try:
        stochmi.no_such_name  # noqa: B018
    except AttributeError as e:
        assert "no_such_name" in str(e)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


# ---------------------------------------------------------------------------- source rules


def _modules() -> list[tuple[str, Path, ast.Module]]:
    """``(dotted name, path, tree)`` of every module under ``stochmi/``."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("stochmi",) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path, ast.parse(path.read_text(encoding="utf-8"))))
    return out


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from ...x import y`` inside ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ``["a", "b", "c"]``; None for anything but names and attributes."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def _private_uses(module: str, path: Path, tree: ast.Module, modules: set[str]) -> list[str]:
    """Where ``module`` reaches a private name (or private module) of another module."""
    bad = []
    bound: dict[str, str] = {}  # local name -> stochmi module it is bound to
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "stochmi":
                    if any(_is_private(p) for p in a.name.split(".")):
                        bad.append(f"line {node.lineno}: import {a.name}")
                    bound[a.asname or "stochmi"] = a.name if a.asname else "stochmi"
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, is_package, node)
            if source.split(".")[0] != "stochmi":
                continue
            private_module = any(_is_private(p) for p in source.split("."))
            names = [a.name for a in node.names if _is_private(a.name)]
            if private_module or names:
                shown = names or [a.name for a in node.names]
                bad.append(f"line {node.lineno}: from {source} import {', '.join(shown)}")
            for a in node.names:
                if f"{source}.{a.name}" in modules:
                    bound[a.asname or a.name] = f"{source}.{a.name}"
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
            continue
        chain = _dotted(node)
        if chain is None or chain[0] not in bound:
            continue
        full = ".".join([bound[chain[0]]] + chain[1:])
        owner = full.rsplit(".", 1)[0]
        if owner in modules and owner != module:
            bad.append(f"line {node.lineno}: {'.'.join(chain)} ({full})")
    return bad


def test_no_module_imports_private_names_of_another():
    """No ``from stochmi.x import _name``, ``from .x import _name``, ``import stochmi._x``
    or ``x._name`` on an imported stochmi module, anywhere in the library."""
    mods = _modules()
    names = {m for m, _, _ in mods}
    bad = [
        f"{path.relative_to(ROOT)}: {use}"
        for module, path, tree in mods
        for use in _private_uses(module, path, tree, names)
    ]
    assert not bad, "\n".join(bad)


def test_private_name_check_sees_every_form():
    src = (
        "import stochmi\n"
        "import stochmi.core._hidden\n"
        "from stochmi.core.rng import _seed\n"
        "from .sites import _walk, find_layers\n"
        "from .. import core\n"
        "from stochmi.layers import chain\n"
        "a = chain._private(1)\n"
        "b = stochmi.core.kernel._x\n"
        "c = core.rng._y\n"
        "d = chain.as_batch_n\n"
    )
    modules = {
        "stochmi",
        "stochmi.core",
        "stochmi.core.rng",
        "stochmi.core.kernel",
        "stochmi.layers",
        "stochmi.layers.chain",
        "stochmi.layers.sites",
        "stochmi.layers.example",
    }
    found = _private_uses("stochmi.layers.example", Path("example.py"), ast.parse(src), modules)
    lines = sorted(int(f.split(":")[0].split()[1]) for f in found)
    assert lines == [2, 3, 4, 7, 8, 9], found


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the end of the function."""
    body = fn.body
    if (
        len(body) > 1
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    return fn.end_lineno - body[0].lineno + 1


def _long_functions() -> list[str]:
    out = []
    for _, path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _body_lines(node)
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_function_length_is_measured_without_the_docstring():
    fn = ast.parse('def f():\n    """Doc.\n\n    More.\n    """\n    a = 1\n    return a\n').body[0]
    assert _body_lines(fn) == 2
    fn = ast.parse("def g():\n    return 1\n").body[0]
    assert _body_lines(fn) == 1


def test_no_function_longer_than_the_limit():
    """Every function in stochmi/ is at most MAX_FUNCTION_LINES long, docstring aside."""
    long = _long_functions()
    assert not long, "split these into named steps:\n" + "\n".join(long)


@pytest.mark.slow
def test_every_public_module_imports_by_its_public_name():
    """``import stochmi.<name>`` works for every module named in ``stochmi.__all__`` and
    gives the same object as the attribute (fresh interpreter, nothing imported yet)."""
    import subprocess
    import sys

    code = (
        "import importlib, types, stochmi\n"
        "mods = [n for n in stochmi.__all__ if isinstance(getattr(stochmi, n), types.ModuleType)]\n"
        "assert {'baselines', 'tasks', 'closed_form', 'experiments', 'replica'} <= set(mods)\n"
        "for n in mods:\n"
        "    assert importlib.import_module('stochmi.' + n) is getattr(stochmi, n), n\n"
        "print(len(mods))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # and in the form users write, before any attribute access
    code = "import stochmi.baselines, stochmi.tasks, stochmi.closed_form"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
