"""The sweep driver: validate, resume, run cells on an executor, write results.

:func:`run_sweep` is what ``stochmi sweep EXPERIMENT.toml --out DIR`` calls:

1. parse and validate the experiment file and expand it into cells (each spec is
   loaded with its overrides, the data source is opened) - all before any training;
2. claim ``DIR`` (refusing a folder made by a different experiment file unless
   ``force``) and skip the cells whose records are already there;
3. run the remaining cells on the chosen executor, writing each record atomically as
   soon as it arrives in the driver; a failed cell is reported (traceback in
   ``DIR/cells/<id>.error.txt``) and the others go on;
4. when every cell has a record, assemble ``results.nc``, ``summary.csv``,
   ``bayes_per_draw.nc`` and the plots from the records.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stochmi.experiments.cells import load_cell_data, run_cell
from stochmi.experiments.config import ConfigError, ExperimentConfig, load_experiment
from stochmi.experiments.executors import (
    Executor,
    ProcessExecutor,
    available_cpus,
    cell_threads,
    make_executor,
)
from stochmi.experiments.store import (
    RESULTS_NC,
    ResultStore,
    ResumeError,
    assemble,
    load_results,
    write_outputs,
)

__all__ = ["SweepResult", "run_sweep"]


@dataclass
class SweepResult:
    """What a sweep did.

    Attributes
    ----------
    out_dir : Path
    n_cells, n_run, n_skipped : int
        All cells; cells run now; cells found finished on disk and skipped.
    failures : list of (cell_id, traceback)
    dataset : xarray.Dataset or None
        The assembled results (None when some cell is unfinished).
    files : dict
        Name -> path of the written outputs.
    wall_s : float
        Wall time of this call.
    executor : str
        Description of the executor used.
    """

    out_dir: Path
    n_cells: int
    n_run: int
    n_skipped: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    dataset: Any = None
    files: dict[str, Path] = field(default_factory=dict)
    wall_s: float = 0.0
    executor: str = ""

    @property
    def complete(self) -> bool:
        return not self.failures and self.dataset is not None


def run_sweep(
    experiment: str | Path | ExperimentConfig,
    out_dir: str | Path,
    *,
    executor: str | Executor = "inprocess",
    workers: int | None = None,
    ray_address: str | None = None,
    threads: int | None = None,
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
    plots: bool = True,
    log: Callable[[str], None] | None = print,
    cell_fn: Callable[..., dict] = run_cell,
) -> SweepResult:
    """Run (or resume) an experiment and write its results into ``out_dir``.

    Parameters
    ----------
    experiment : path or ExperimentConfig
        The experiment file (see :mod:`stochmi.experiments.config`).
    out_dir : path
        The sweep folder (layout in :mod:`stochmi.experiments.store`).
    executor : {"inprocess", "process", "ray"} or Executor
        Where cells run (see :mod:`stochmi.experiments.executors`).
    workers : int, optional
        Worker processes (``workers > 1`` selects the process pool), or the CPUs of
        a locally started Ray.
    ray_address : str, optional
        Address of an existing Ray cluster.
    threads : int, optional
        Torch threads per cell under every executor (default: each cell's
        ``[resources] cpus``, 1 unless set); see :mod:`stochmi.experiments.executors`.
    force : bool
        Reuse a folder made by a different experiment file.
    device : str
        Torch device for training and estimation.
    progress : bool
        Progress bar over cells (and training bars for in-process cells).
    plots : bool
        Write the PNG plots.
    log : callable or None
        Where status lines go (default :func:`print`; None for silence).
    cell_fn : callable
        ``cell_fn(cell, progress=...) -> record``; :func:`run_cell` unless testing.

    Returns
    -------
    SweepResult

    Raises
    ------
    ConfigError
        Invalid experiment file, unknown spec or override, unusable data settings.
    ResumeError
        ``out_dir`` belongs to a different experiment and ``force`` is false, has a
        corrupt manifest, is a file, is used by another running sweep (the folder is
        locked while a sweep writes to it), or is read-only with cells left to run.
    """
    t0 = time.perf_counter()
    say = log or (lambda _msg: None)
    config = experiment if isinstance(experiment, ExperimentConfig) else load_experiment(experiment)
    cells = config.cells(device=device)
    try:
        source, train, test, inputs = load_cell_data(config.data, config.estimate.n_inputs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{config.path}: [data]: {exc}") from exc

    store = ResultStore(out_dir)
    store.check_folder()
    if not store.writable():
        return _read_only_sweep(store, config, cells, say, t0)
    # refuse before taking the lock, so that a refused sweep creates no lock file and
    # leaves an existing one as it was; open() checks again under the lock
    store.check_claim(config, force=force)
    with store:
        store.lock()
        store.open(config, cells, force=force)
        todo = _cells_to_run(store, cells, say)
        ex = executor if isinstance(executor, Executor) else None
        if ex is None:
            ex = make_executor(executor, workers=workers, ray_address=ray_address, threads=threads)
        _warn_oversubscription(ex, todo, say)
        say(
            f"experiment {config.name!r}: {len(cells)} cell(s), {len(cells) - len(todo)} "
            f"already done -> {out_dir}"
        )
        say(
            f"data: {source}; {len(train)} training / {len(test)} held-out images, "
            f"MI on {len(inputs)} held-out inputs"
        )
        n_run, failures, desc = _run_cells(store, ex, cell_fn, todo, progress, say)
        result = SweepResult(
            out_dir=Path(out_dir),
            n_cells=len(cells),
            n_run=n_run,
            n_skipped=len(cells) - len(todo),
            failures=failures,
            executor=desc or "none (all cells were done)",
        )
        if failures:
            say(
                f"{len(failures)} of {len(cells)} cells failed; the {len(cells) - len(failures)} "
                f"finished ones are saved in {store.cells_dir}. Rerun the same command to retry "
                "the failed cells."
            )
        else:
            _write_results(store, config, cells, result, plots, say)
    result.wall_s = time.perf_counter() - t0
    return result


def _cells_to_run(store: ResultStore, cells, say) -> list:
    """The cells without a valid record; says why a stored record is not reused."""
    todo = []
    for cell in cells:
        rec, reason = store.check(cell)
        if rec is None:
            todo.append(cell)
            if reason:
                say(f"cell {cell.cell_id}: recomputing, stored record not reused: {reason}")
    return todo


def _warn_oversubscription(ex: Executor, todo, say) -> None:
    if isinstance(ex, ProcessExecutor) and todo:
        per_cell = max(cell_threads(c, ex.threads) for c in todo)
        if ex.workers * per_cell > available_cpus():
            say(
                f"warning: {ex.workers} workers x {per_cell} torch threads per cell "
                f"oversubscribe the {available_cpus()} cores; lower --workers or --threads"
            )


def _run_cells(store: ResultStore, ex: Executor, cell_fn, todo, progress: bool, say):
    """Run ``todo`` on ``ex``, writing each record as it arrives.

    Returns ``(n_run, failures, executor description)``.
    """
    from tqdm.auto import tqdm

    failures: list[tuple[str, str]] = []
    n_run = 0
    if not todo:
        return n_run, failures, ""
    with ex:
        per_cell = sorted({cell_threads(c, getattr(ex, "threads", None)) for c in todo})
        desc = ex.describe()
        say(f"executor: {desc}; torch threads per cell: " + ", ".join(str(t) for t in per_cell))
        bar = tqdm(total=len(todo), desc="cells", unit="cell", disable=not progress)
        try:
            inner = progress and ex.name == "inprocess"
            for outcome in ex.run(cell_fn, todo, progress=inner):
                if outcome.ok:
                    store.write(outcome.result)
                    n_run += 1
                else:
                    path = store.write_failure(outcome.cell, outcome.error)
                    failures.append((outcome.cell.cell_id, outcome.error))
                    last = outcome.error.strip().splitlines()[-1] if outcome.error else ""
                    msg = f"cell {outcome.cell.cell_id} FAILED: {last} (traceback: {path})"
                    tqdm.write(msg) if progress else say(msg)
                bar.update(1)
        finally:
            bar.close()
    return n_run, failures, desc


def _write_results(store: ResultStore, config, cells, result: SweepResult, plots, say) -> None:
    """Assemble the records into the outputs and write them (and the plots)."""
    records = store.records(cells)
    ds, summary, idata = assemble(config, cells, records)
    result.files = write_outputs(store.out_dir, ds, summary, idata)
    if plots:
        from stochmi.experiments.plots import plot_all

        result.files.update(plot_all(ds, store.out_dir))
    result.dataset = ds
    for name, path in result.files.items():
        say(f"wrote {name}: {path}")


def _read_only_sweep(store: ResultStore, config, cells, say, t0: float) -> SweepResult:
    """A rerun into a folder this process cannot write: fine when the folder holds
    this experiment's finished results (they are loaded, nothing is written),
    otherwise a :class:`ResumeError` that says so."""
    store.open_read_only(config)
    missing = [c.cell_id for c in cells if not store.is_done(c)]
    results = store.out_dir / RESULTS_NC
    if missing or not results.is_file():
        what = f"{len(missing)} cell(s) to run" if missing else f"no {RESULTS_NC}"
        raise ResumeError(
            f"{store.out_dir} is read-only and the sweep is not finished ({what}); make the "
            "folder writable or use another --out folder"
        )
    say(
        f"experiment {config.name!r}: all {len(cells)} cells done; {store.out_dir} is "
        "read-only, results left as they are"
    )
    return SweepResult(
        out_dir=store.out_dir,
        n_cells=len(cells),
        n_run=0,
        n_skipped=len(cells),
        dataset=load_results(store.out_dir),
        files={"results": results},
        executor="none (all cells were done)",
        wall_s=time.perf_counter() - t0,
    )
