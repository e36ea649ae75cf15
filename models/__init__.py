"""The reference model specs (one TOML file each), installed as ``stochmi.models.specs``.

This folder stays at the repository's top level; ``setup.py`` maps it into the package,
and :func:`stochmi.models.spec.models_dir` finds it with ``importlib.resources``.
"""
