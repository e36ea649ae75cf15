"""The public names."""

import stochmi


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


def test_no_module_imports_private_names_of_another():
    """``from stochmi.x import _name`` (or from a ``_module``) nowhere in the library."""
    import ast
    from pathlib import Path

    root = Path(stochmi.__file__).parent
    bad = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stochmi"):
                private_module = any(p.startswith("_") for p in node.module.split("."))
                names = [a.name for a in node.names if a.name.startswith("_")]
                if private_module or names:
                    bad.append(f"{path.relative_to(root)}: from {node.module} import {names}")
    assert not bad, "\n".join(bad)
