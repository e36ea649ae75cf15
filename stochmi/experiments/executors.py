"""Executors: where the cells of a sweep run.

Three interchangeable executors, all yielding :class:`CellOutcome` objects to the
driver *as cells complete*, so that the driver (and only the driver) writes each
finished cell to disk at once:

``InProcessExecutor``
    One cell after the other in the calling process (the default).
``ProcessExecutor``
    A :class:`concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start
    method, ``workers`` cells at a time.
``RayExecutor``
    Ray tasks, one per cell, with the experiment's ``[resources]`` hints passed as
    ``.options(num_cpus=..., num_gpus=...)``.  Connects to ``address`` when given
    (or to a Ray already initialised in the process); otherwise starts a local Ray
    with ``ray.init(num_cpus=...)`` and shuts it down afterwards.  Ray is optional:
    ``pip install -e ".[ray]"``.

Torch threads: every executor runs a cell with the same number of torch threads,
``threads`` when given, else the cell's ``[resources] cpus`` (default 1), and
restores the previous setting afterwards.  Matrix products round differently with
another thread count (differences of order 1e-8 nats after training), so a fixed
count per cell is what makes the numbers bitwise identical whichever executor runs
the cell.  Use ``workers x threads <= cores``.  On a 2-core machine under load from
other jobs, one thread per cell was also much the fastest: the noise_sweep example took
70 s in-process with 1 thread and 415 s with torch's default of 2 threads (same numbers
to 5e-8; idle-spinning threads of small matrix products; deep rows by nested Monte
Carlo in that run, see ``docs/experiments.md``).

A cell that raises is reported as a failed outcome (with its traceback) and the
other cells go on.  A cell's numbers depend only on its configuration and seed (see
:mod:`stochmi.experiments.cells`).
"""

from __future__ import annotations

import os
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from stochmi.experiments.config import CellSpec

__all__ = [
    "CellOutcome",
    "Executor",
    "InProcessExecutor",
    "ProcessExecutor",
    "RayExecutor",
    "available_cpus",
    "cell_threads",
    "make_executor",
]

CellFn = Callable[..., dict[str, Any]]

RAY_INSTALL_HINT = (
    'the Ray executor needs Ray: pip install "stochmi[ray]" (from a checkout: '
    'pip install -e ".[ray]")'
)


@dataclass
class CellOutcome:
    """What came back for one cell: ``result`` on success, else ``error`` (a traceback)."""

    cell: CellSpec
    result: dict[str, Any] | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def available_cpus() -> int:
    """CPU cores this process may use (affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return os.cpu_count() or 1


def cell_threads(cell: CellSpec, threads: int | None = None) -> int:
    """Torch threads for ``cell``: ``threads`` if given, else ``max(1, int(resources.cpus))``."""
    return threads or max(1, int(cell.resources.cpus))


def _call(fn: CellFn, cell: CellSpec, progress: bool, threads: int) -> tuple[str, Any]:
    """Run ``fn(cell)`` with ``threads`` torch threads (restored afterwards).

    Returns ``("ok", result)`` or ``("error", traceback text)``.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return "ok", fn(cell, progress=progress)
    except Exception:
        return "error", traceback.format_exc()
    finally:
        torch.set_num_threads(old)


def _outcome(cell: CellSpec, status: str, payload: Any) -> CellOutcome:
    if status == "ok":
        return CellOutcome(cell, result=payload)
    return CellOutcome(cell, error=str(payload))


class Executor(ABC):
    """Runs cells and yields their outcomes as they complete.

    Use as a context manager (``with executor: ...``): entering starts workers or
    connects to a cluster, leaving stops what was started.
    """

    name = "executor"

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        return None

    @abstractmethod
    def run(
        self, fn: CellFn, cells: Sequence[CellSpec], *, progress: bool = False
    ) -> Iterator[CellOutcome]:
        """Yield one :class:`CellOutcome` per cell, in completion order."""

    def describe(self) -> str:
        return self.name


def _check_threads(threads) -> None:
    if threads is not None and (
        not isinstance(threads, int) or isinstance(threads, bool) or threads < 1
    ):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")


class InProcessExecutor(Executor):
    """Run cells one after the other in this process.

    Parameters
    ----------
    threads : int, optional
        Torch threads per cell (default: the cell's ``resources.cpus``).
    """

    name = "inprocess"

    def __init__(self, *, threads: int | None = None) -> None:
        _check_threads(threads)
        self.threads = threads

    def describe(self) -> str:
        return "in-process"

    def run(self, fn, cells, *, progress=False):
        for cell in cells:
            threads = cell_threads(cell, getattr(self, "threads", None))
            yield _outcome(cell, *_call(fn, cell, progress, threads))


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # pragma: no cover - already set in this process
        pass


class ProcessExecutor(Executor):
    """Run cells in ``workers`` spawned processes.

    Parameters
    ----------
    workers : int
        Number of worker processes (>= 1).
    threads : int, optional
        Torch threads per cell (default: the cell's ``resources.cpus``); keep
        ``workers * threads`` at most the number of cores.
    """

    name = "process"

    def __init__(self, workers: int, *, threads: int | None = None) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        _check_threads(threads)
        self.workers = workers
        self.threads = threads
        self._pool = None

    def describe(self) -> str:
        return f"process pool ({self.workers} workers)"

    def __enter__(self) -> ProcessExecutor:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
        )
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=exc[0] is None, cancel_futures=True)
            self._pool = None

    def run(self, fn, cells, *, progress=False):
        from concurrent.futures import as_completed
        from concurrent.futures.process import BrokenProcessPool

        if self._pool is None:
            raise RuntimeError("use the ProcessExecutor as a context manager (with ...:)")
        futures = {
            self._pool.submit(_call, fn, cell, False, cell_threads(cell, self.threads)): cell
            for cell in cells
        }
        try:
            for fut in as_completed(futures):
                cell = futures[fut]
                try:
                    status, payload = fut.result()
                except BrokenProcessPool:
                    status, payload = (
                        "error",
                        "a worker process died (out of memory or killed):\n"
                        + traceback.format_exc(),
                    )
                except Exception:  # result could not be unpickled, etc.
                    status, payload = "error", traceback.format_exc()
                yield _outcome(cell, status, payload)
        finally:
            for fut in futures:
                fut.cancel()


class RayExecutor(Executor):
    """Run each cell as a Ray task.

    Parameters
    ----------
    address : str, optional
        Address of a running Ray cluster (``"auto"``, ``"ray://host:10001"``, ...).
        When omitted and Ray is already initialised in this process, that Ray is used
        (and left running); otherwise a local Ray is started with
        ``ray.init(num_cpus=num_cpus)`` and shut down when the executor exits.
    num_cpus : int, optional
        CPUs of the local Ray (default: :func:`available_cpus`).
    threads : int, optional
        Torch threads per cell (default: the cell's ``resources.cpus``).

    Raises
    ------
    RuntimeError
        When Ray is not installed (the message gives the install command).

    Notes
    -----
    Each task requests the cell's ``resources.cpus`` / ``resources.gpus`` from Ray
    (``.options(num_cpus=..., num_gpus=...)``, fractions allowed).
    """

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_cpus: int | None = None,
        threads: int | None = None,
    ) -> None:
        try:
            import ray  # noqa: F401
        except ImportError as exc:
            raise RuntimeError(RAY_INSTALL_HINT) from exc
        _check_threads(threads)
        self.threads = threads
        self.address = address
        self.num_cpus = num_cpus
        self._owns = False

    def describe(self) -> str:
        import ray

        where = self.address or ("local Ray (started for this run)" if self._owns else "Ray")
        try:
            cpus = ray.cluster_resources().get("CPU")
        except Exception:  # pragma: no cover - cluster went away
            cpus = None
        return f"ray: {where}" + (f", {cpus:g} CPUs" if cpus else "")

    def __enter__(self) -> RayExecutor:
        import ray

        if ray.is_initialized():
            self._owns = False
        elif self.address:
            ray.init(address=self.address, log_to_driver=False)
            self._owns = True
        else:
            ray.init(
                num_cpus=self.num_cpus or available_cpus(),
                include_dashboard=False,
                log_to_driver=False,
            )
            self._owns = True
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self._owns and ray.is_initialized():
            ray.shutdown()
        self._owns = False

    def run(self, fn, cells, *, progress=False):
        import ray

        if not ray.is_initialized():
            raise RuntimeError("use the RayExecutor as a context manager (with ...:)")
        remote = ray.remote(_call)
        pending: dict[Any, CellSpec] = {}
        for cell in cells:
            opts = {"num_cpus": cell.resources.cpus, "max_retries": 0}
            if cell.resources.gpus > 0:
                opts["num_gpus"] = cell.resources.gpus
            threads = cell_threads(cell, self.threads)
            pending[remote.options(**opts).remote(fn, cell, False, threads)] = cell
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                ref = ready[0]
                cell = pending.pop(ref)
                try:
                    status, payload = ray.get(ref)
                except Exception:  # RayTaskError, WorkerCrashedError, ...
                    status, payload = "error", traceback.format_exc()
                yield _outcome(cell, status, payload)
        finally:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # pragma: no cover - best effort
                    pass


def make_executor(
    kind: str = "inprocess",
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    threads: int | None = None,
) -> Executor:
    """Build an executor by name.

    Parameters
    ----------
    kind : {"inprocess", "process", "ray"}
        ``"inprocess"`` with ``workers > 1`` means ``"process"``.
    workers : int, optional
        Worker processes for ``"process"`` (default: :func:`available_cpus`);
        for ``"ray"``, the CPUs of a locally started Ray.
    ray_address : str, optional
        Cluster address for ``"ray"``.
    num_cpus : int, optional
        CPUs of a locally started Ray (default ``workers`` or all cores).
    threads : int, optional
        Torch threads per cell, for every executor (default: each cell's
        ``resources.cpus``); see the module docstring.
    """
    if kind not in ("inprocess", "process", "ray"):
        raise ValueError(f"unknown executor {kind!r}; choose inprocess, process or ray")
    if ray_address and kind != "ray":
        raise ValueError("--ray-address needs --executor ray")
    if kind == "ray":
        return RayExecutor(ray_address, num_cpus=num_cpus or workers, threads=threads)
    if kind == "process" or (workers is not None and workers > 1):
        return ProcessExecutor(workers or available_cpus(), threads=threads)
    return InProcessExecutor(threads=threads)
