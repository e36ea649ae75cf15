"""The estimator core stays pure torch, and ``import stochmi`` stays light."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("pyro", "pandas", "matplotlib", "xarray", "arviz")


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return {m.split(".")[0] for m in out.stdout.split()}


def test_core_imports_neither_pyro_nor_pandas():
    loaded = _modules_after(
        "import stochmi.core, stochmi.core.estimator, stochmi.core.kernel, "
        "stochmi.core.bounds, stochmi.core.closed_form, stochmi.core.estimate"
    )
    assert not loaded & {"pyro", "pandas"}, sorted(loaded & {"pyro", "pandas"})


def test_import_stochmi_is_light():
    loaded = _modules_after("import stochmi")
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_public_names_load_on_first_use():
    import stochmi

    for name in stochmi.__all__:
        assert getattr(stochmi, name) is not None, name
    assert set(stochmi.__all__) <= set(dir(stochmi))
