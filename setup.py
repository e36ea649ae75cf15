"""Packages: ``stochmi`` and its subpackages, and the top-level ``models/`` folder.

``models/`` stays at the repository's top level, where people look for the reference
specs; here it becomes the package ``stochmi.models.specs`` (package data, TOML files),
found at run time with ``importlib.resources`` in editable and normal installs alike.
Everything else is in ``pyproject.toml``.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["stochmi", "stochmi.*"]), "stochmi.models.specs"],
    package_dir={"stochmi.models.specs": "models"},
    package_data={"stochmi.models.specs": ["*.toml"]},
)
