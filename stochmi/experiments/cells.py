"""One cell of an experiment: train a model spec at one seed, measuring layer MI on the way.

A cell is a model spec with overrides (one grid point) and a seed.  :func:`run_cell`
loads the data, builds the network, trains it with :func:`stochmi.models.training.train`
and, through the training callback, calls :func:`stochmi.layer_mi` and
:func:`stochmi.models.training.accuracy` at the epochs named in the experiment file.

Everything random is derived from the cell's seed (weight initialisation, training,
the Monte Carlo draws of each estimate, predictive accuracy), and the whole cell runs
inside :func:`stochmi.core.rng.rng_context` seeded from it and in a private Pyro parameter
store.  A cell's numbers therefore depend only on its configuration and seed, not on
which executor ran it, in which process, or after which other cell.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import time
import warnings
from functools import lru_cache
from typing import Any

import numpy as np

from stochmi.core.rng import derive_seed, rng_context
from stochmi.experiments.config import CellSpec, DataSettings

__all__ = [
    "run_cell",
    "derive_seed",
    "package_versions",
    "load_cell_data",
    "epistemic_rows",
    "noisy_layers",
]


# tags for derive_seed
TAG_INIT, TAG_TRAIN, TAG_MI, TAG_MI_COND, TAG_WEIGHT_MI = 1, 2, 3, 4, 5


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine the numbers (recorded with results)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("stochmi", "torch", "pyro-ppl", "numpy", "pandas", "xarray", "arviz"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:  # pragma: no cover - all are dependencies
            out[name] = "not installed"
    return out


@lru_cache(maxsize=4)
def _load_split(data: DataSettings):
    from stochmi.data.mnist import load_mnist, train_test_split

    full = load_mnist(data.source, root=data.root, n=data.n, seed=data.split_seed)
    if data.test_source == "split":
        train, test = train_test_split(full, test_fraction=data.test_fraction, seed=data.split_seed)
        return full.source, train, test
    test = load_mnist(data.test_source)
    return f"training: {full.source}; held-out: {test.source}", full, test


def load_cell_data(data: DataSettings, n_inputs: int):
    """Load the data of an experiment: ``(source, train, test, eval_inputs)``.

    Parameters
    ----------
    data : DataSettings
        Source, size and split of the images (``test_source = "split"``: a seeded
        ``test_fraction`` split of the source; otherwise all of the source is for
        training and the held-out images come from ``test_source``).
    n_inputs : int
        Number of held-out images used as X for the MI estimates; a seeded subset
        (``data.split_seed``) of the test part, the same for every cell.

    Returns
    -------
    source : str
        Where the images came from (as reported by :func:`stochmi.data.load_mnist`).
    train, test, inputs : MNISTData
        Training part, held-out part, and the MI inputs (``n_inputs`` of ``test``).
    """
    source, train, test = _load_split(data)
    if n_inputs > len(test):
        raise ValueError(
            f"estimate.n_inputs = {n_inputs} is more than the {len(test)} held-out images "
            f"({source}, test_fraction={data.test_fraction}); lower n_inputs or raise "
            "data.test_fraction / data.n"
        )
    inputs = test.subset(n_inputs, seed=data.split_seed) if n_inputs < len(test) else test
    return source, train, test, inputs


@contextlib.contextmanager
def _quiet_logger(name: str):
    if name == "arviz":  # ArviZ logs through its own Logger instance, not the registry
        import arviz

        logger = getattr(arviz, "_log", logging.getLogger(name))
    else:
        logger = logging.getLogger(name)
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(old)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:
        return v.item()
    if isinstance(v, bool | int | float | str) or v is None:
        return v
    return str(v)


def _pair_name(col: Any) -> str:
    if isinstance(col, tuple) and len(col) == 2:
        return f"{col[0]}->{col[1]}"
    return str(col)


def _per_draw_values(per_draw) -> dict[str, list[float]]:
    """``{"source->target": [I(.;. | W = w_k) for k]}`` from ``attrs["per_draw"]``.

    Accepts the long format (columns ``source, target, value, draw``; one row per
    draw and pair) and the wide format (one column per pair, one row per draw).
    """
    if per_draw is None:
        return {}
    cols = set(per_draw.columns)
    if {"source", "target", "value"} <= cols:
        out: dict[str, list[float]] = {}
        df = per_draw.sort_values("draw", kind="stable") if "draw" in cols else per_draw
        for (src, tgt), g in df.groupby(["source", "target"], sort=False):
            out[f"{src}->{tgt}"] = [float(v) for v in g["value"].to_numpy()]
        return out
    return {_pair_name(c): [float(v) for v in per_draw[c].to_numpy()] for c in per_draw.columns}


def _rows(df, epoch: int) -> list[dict[str, Any]]:
    keep = [
        "value",
        "stderr",
        "lower",
        "upper",
        "n",
        "k_paths",
        "saturated",
        "dpi_ok",
        "converged",
        "mc_bias",
    ]
    rows = []
    for rec in df.to_dict(orient="records"):
        row = {"epoch": epoch, "source": str(rec["source"]), "target": str(rec["target"])}
        for k in keep:
            if k in rec:
                row[k] = _jsonable(rec[k])
        for k in ("value", "stderr", "lower", "upper"):
            x = row.get(k)
            row[k] = math.nan if x is None else float(x)
        rows.append(row)
    return rows


def _guide_device(guide):
    p = next(iter(guide.parameters()), None) if hasattr(guide, "parameters") else None
    return p.device if p is not None else "cpu"


def noisy_layers(model) -> list[str] | None:
    """The layer sites with injected noise (``sigma > 0``), or None when the model does
    not say (then every layer).  A layer without noise is deterministic given the
    weights, so its epistemic information ``I(T_l; W | X)`` is infinite."""
    sites, sigmas = getattr(model, "layer_sites", None), getattr(model, "sigmas", None)
    if sites is None or sigmas is None:
        return None
    return [s for s, sig in zip(sites, sigmas) if sig > 0]


def _weight_mi_converged(df) -> dict[str, int]:
    """1/0 per target: the ``converged`` column of :func:`stochmi.weight_mi`."""
    return {str(r.target): int(bool(r.converged)) for r in df.itertuples()}


def epistemic_rows(df, epoch: int) -> list[dict[str, Any]]:
    """Rows of a :func:`stochmi.weight_mi` table for a cell record: ``epoch, target,
    value, stderr, lower, upper, saturated, converged, closed_form, method`` and, for
    the prediction (``"Y"``), ``predictive_entropy`` and ``aleatoric_entropy`` (means over
    the inputs)."""
    converged = _weight_mi_converged(df)
    closed = df.attrs.get("closed_form") or {}
    dec = (df.attrs.get("decomposition") or {}).get("mean") or {}
    rows = []
    for rec in df.to_dict(orient="records"):
        t = str(rec["target"])
        row = {"epoch": epoch, "target": t}
        for k in ("value", "stderr", "lower", "upper"):
            row[k] = float(rec[k])
        row["saturated"] = bool(rec["saturated"])
        row["converged"] = converged[t]
        cf = closed.get(t)
        row["closed_form"] = float(np.mean(cf)) if cf is not None else math.nan
        row["method"] = str(rec["method"])
        if t == "Y":
            row["predictive_entropy"] = float(dec.get("total", math.nan))
            row["aleatoric_entropy"] = float(dec.get("aleatoric", math.nan))
        rows.append(row)
    return rows


class _Measurements:
    """The training callback of a cell: at each measured epoch, the layer MI (marginal
    weights; per posterior draw with ``estimate.conditional``) and, with
    ``estimate.uncertainty``, the epistemic information; rows collected in ``records``."""

    def __init__(self, cell: CellSpec, inputs) -> None:
        self.cell = cell
        self.est = cell.estimate
        self.x, self.y = inputs.x, inputs.y
        self.records: dict[str, Any] = {
            "estimates": [],
            "conditional": [],
            "uncertainty": [] if self.est.uncertainty else None,
            "accuracy": [],
            "dpi_violations": {},
        }

    def __call__(self, epoch: int, model, guide) -> None:
        if epoch not in self.est.epochs:
            return
        self._marginal(epoch, model, guide)
        if self.est.conditional and guide is not None:
            self._conditional(epoch, model, guide)
        if self.est.uncertainty and guide is not None:
            self._uncertainty(epoch, model, guide)

    def _layer_mi(self, model, guide, weights: str, tag: int, epoch: int):
        from stochmi.layers.estimation import layer_mi

        return layer_mi(
            model,
            self.x,
            self.y,
            guide=guide,
            weights=weights,
            seed=derive_seed(self.cell.seed, tag, epoch),
            n_paths=self.est.n_paths,
            tolerance=self.est.tolerance,
            n_weight_draws=self.est.n_weight_draws,
            device=self.cell.device,
        )

    def _marginal(self, epoch: int, model, guide) -> None:
        df = self._layer_mi(model, guide, "marginal", TAG_MI, epoch)
        self.records["estimates"].extend(_rows(df, epoch))
        dpi = df.attrs.get("dpi")
        if dpi:
            self.records["dpi_violations"][str(epoch)] = _jsonable(dpi)

    def _conditional(self, epoch: int, model, guide) -> None:
        # layer_mi also builds an ArviZ summary of the draws (unused here), whose
        # chain diagnostics warn for a single chain of few draws: keep that quiet
        with warnings.catch_warnings(), _quiet_logger("arviz"):
            warnings.simplefilter("ignore", RuntimeWarning)
            dfc = self._layer_mi(model, guide, "conditional", TAG_MI_COND, epoch)
        draws = _per_draw_values(dfc.attrs.get("per_draw"))
        for row in _rows(dfc, epoch):
            row["draws"] = draws.get(f"{row['source']}->{row['target']}")
            self.records["conditional"].append(row)

    def _uncertainty(self, epoch: int, model, guide) -> None:
        from stochmi.layers.weights import weight_mi

        with warnings.catch_warnings():  # non-convergence is recorded per row
            warnings.filterwarnings("ignore", "weight_mi: layer", RuntimeWarning)
            dfw = weight_mi(
                model,
                self.x.to(_guide_device(guide)),
                guide=guide,
                layers=noisy_layers(model),
                seed=derive_seed(self.cell.seed, TAG_WEIGHT_MI, epoch),
                n_weight_draws=self.est.n_weight_draws,
                n_is=self.est.n_paths,
                n_fwd=self.est.n_paths,
                chain_rule=False,  # I(X;T_l) is in the estimates already
            )
        self.records["uncertainty"].extend(epistemic_rows(dfw, epoch))

    def add_accuracy(self, history: list[dict]) -> None:
        """Accuracy and loss of each measured epoch from the training history."""
        by_epoch = {int(h["epoch"]): h for h in history}
        measured = set(self.est.epochs)
        missing = measured - {r["epoch"] for r in self.records["estimates"]}
        if missing or not measured <= set(by_epoch):
            raise RuntimeError(
                f"cell {self.cell.cell_id}: training never reached epochs {sorted(missing)} "
                f"(history has epochs {sorted(by_epoch)})"
            )
        for epoch in sorted(measured):
            h = by_epoch[epoch]
            self.records["accuracy"].append(
                {
                    "epoch": epoch,
                    "test_accuracy": float(h.get("test_acc", math.nan)),
                    "train_accuracy": float(h.get("train_acc", math.nan)),
                    "loss": float(h.get("loss", math.nan)),
                }
            )


def _cell_spec(cell: CellSpec):
    """The cell's spec, loaded with its overrides; it must be the one validated."""
    from stochmi.models.spec import load_spec

    spec = load_spec(cell.spec, dict(cell.overrides) if cell.overrides else None)
    if spec.to_toml() != cell.spec_toml:
        raise RuntimeError(
            f"cell {cell.cell_id}: the spec {cell.spec!r} resolved here differs from the one "
            "validated when the experiment was expanded (models/ changed, or a worker has a "
            "different stochmi installation)"
        )
    return spec


def run_cell(cell: CellSpec, *, progress: bool = False) -> dict[str, Any]:
    """Train one cell's network and estimate its layer MI at the chosen epochs.

    Parameters
    ----------
    cell : CellSpec
        Model spec, overrides, seed, data and estimate settings (from
        :meth:`stochmi.experiments.config.ExperimentConfig.cells`).
    progress : bool
        Show tqdm bars for the training epochs.

    Returns
    -------
    dict
        JSON-able record with keys

        - ``cell_id``, ``key`` (:meth:`CellSpec.key`), ``fingerprint``
          (:meth:`CellSpec.fingerprint`, what the key is made of), ``cell`` (the spec
          as a dict);
        - ``data_source``, ``n_train``, ``n_test``, ``n_inputs``, ``layer_sites``;
        - ``estimates``: one row per epoch x pair of :func:`stochmi.layer_mi` with
          weights marginalised: ``epoch, source, target, value, stderr, lower, upper,
          n, k_paths, saturated, dpi_ok, converged, mc_bias`` (nats);
        - ``conditional``: for models with a weight posterior when
          ``estimate.conditional``, the same rows of the conditional-mode table (means
          over posterior draws) with ``draws``, the per-draw values of
          I(X;T | W=w); empty otherwise;
        - ``uncertainty``: with ``estimate.uncertainty`` (else None), for models with
          a weight posterior one row per epoch x target of :func:`stochmi.weight_mi`,
          the epistemic information I(T_l; W | X) of each layer with injected noise
          and BALD I(Y; W | X), see :func:`epistemic_rows`; empty for models with
          fixed weights;
        - ``accuracy``: one row per measured epoch, ``epoch, test_accuracy,
          train_accuracy, loss``;
        - ``dpi_violations``: ``{epoch: attrs["dpi"] of the marginal table}`` for the
          epochs with any;
        - ``history`` (the training history), ``versions``
          (:func:`package_versions`), ``torch_threads`` and ``wall_s``.

    Notes
    -----
    Seeds: initialisation, training, each estimate and each accuracy evaluation
    use seeds derived from ``cell.seed`` by :func:`derive_seed`, so measuring at
    more or fewer epochs does not change the other numbers' random streams.
    """
    import pyro
    import torch

    from stochmi.models.nets import build_model
    from stochmi.models.training import train

    t0 = time.perf_counter()
    source, train_d, test_d, inputs = load_cell_data(cell.data, cell.estimate.n_inputs)
    spec = _cell_spec(cell)
    measure = _Measurements(cell, inputs)
    with rng_context(derive_seed(cell.seed, TAG_INIT), cell.device), pyro.get_param_store().scope():
        model = build_model(spec, seed=derive_seed(cell.seed, TAG_INIT))
        result = train(
            model,
            train_d,
            spec,
            epochs=cell.training_epochs,
            seed=derive_seed(cell.seed, TAG_TRAIN),
            device=cell.device,
            test=test_d,
            progress=progress,
            callback=measure,
        )
    history = _jsonable(list(result.history))
    measure.add_accuracy(history)
    return {
        "cell_id": cell.cell_id,
        "key": cell.key(),
        "fingerprint": cell.fingerprint(),
        "cell": cell.to_dict(),
        "data_source": source,
        "n_train": len(train_d),
        "n_test": len(test_d),
        "n_inputs": len(inputs),
        "layer_sites": list(getattr(model, "layer_sites", [])),
        **measure.records,
        "history": history,
        "versions": package_versions(),
        "torch_threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - t0,
    }
