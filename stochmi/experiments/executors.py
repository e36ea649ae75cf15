"""Executors: where the cells of a sweep run.

Three interchangeable executors, all yielding :class:`CellOutcome` objects to the
driver *as cells complete*, so that the driver (and only the driver) writes each
finished cell to disk at once:

``InProcessExecutor``
    One cell after the other in the calling process (the default).
``ProcessExecutor``
    A :class:`concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start
    method; each worker process sets ``torch.set_num_threads(cores // workers)``
    so that workers do not oversubscribe the cores.
``RayExecutor``
    Ray tasks, one per cell, with the experiment's ``[resources]`` hints passed as
    ``.options(num_cpus=..., num_gpus=...)``.  Connects to ``address`` when given
    (or to a Ray already initialised in the process); otherwise starts a local Ray
    with ``ray.init(num_cpus=...)`` and shuts it down afterwards.  Ray is optional:
    ``pip install -e ".[ray]"``.

A cell that raises is reported as a failed outcome (with its traceback) and the
other cells go on.  Results do not depend on the executor, since a cell's numbers
depend only on its configuration and seed (see :mod:`stochmi.experiments.cells`) -
bitwise so when each cell runs with the same number of torch threads (``threads=``;
matrix products may round differently with another thread count, differences of
order 1e-8 nats, far below the Monte Carlo error).
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


def _call(fn: CellFn, cell: CellSpec, progress: bool) -> tuple[str, Any]:
    """Run ``fn(cell)`` and return ``("ok", result)`` or ``("error", traceback text)``."""
    try:
        return "ok", fn(cell, progress=progress)
    except Exception:
        return "error", traceback.format_exc()


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


class InProcessExecutor(Executor):
    """Run cells one after the other in this process.

    Parameters
    ----------
    threads : int, optional
        Torch threads while a cell runs (restored afterwards); default: leave
        torch's setting as it is.
    """

    name = "inprocess"

    def __init__(self, *, threads: int | None = None) -> None:
        _check_threads(threads)
        self.threads = threads

    def describe(self) -> str:
        import torch

        return f"in-process ({self.threads or torch.get_num_threads()} torch threads)"

    def run(self, fn, cells, *, progress=False):
        import torch

        for cell in cells:
            old = torch.get_num_threads()
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                status, payload = _call(fn, cell, progress)
            finally:
                torch.set_num_threads(old)
            yield _outcome(cell, status, payload)


def _check_threads(threads) -> None:
    if threads is not None and (
        not isinstance(threads, int) or isinstance(threads, bool) or threads < 1
    ):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # pragma: no cover - already set in this process
        pass


class ProcessExecutor(Executor):
    """Run cells in ``workers`` spawned processes, ``cores // workers`` torch threads each.

    Parameters
    ----------
    workers : int
        Number of worker processes (>= 1).
    threads : int, optional
        Torch threads per worker; default ``max(1, available_cpus() // workers)``.
    """

    name = "process"

    def __init__(self, workers: int, *, threads: int | None = None) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers must be a positive integer, got {workers!r}")
        _check_threads(threads)
        self.workers = workers
        self.threads = threads or max(1, available_cpus() // workers)
        self._pool = None

    def describe(self) -> str:
        return f"process pool ({self.workers} workers x {self.threads} torch threads)"

    def __enter__(self) -> ProcessExecutor:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.threads,),
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
        futures = {self._pool.submit(_call, fn, cell, False): cell for cell in cells}
        try:
            for fut in as_completed(futures):
                cell = futures[fut]
                try:
                    status, payload = fut.result()
                except BrokenProcessPool:
                    status, payload = (
                        "error",
                        (
                            "a worker process died (out of memory or killed):\n"
                            + traceback.format_exc()
                        ),
                    )
                except Exception:  # result could not be unpickled, etc.
                    status, payload = "error", traceback.format_exc()
                yield _outcome(cell, status, payload)
        finally:
            for fut in futures:
                fut.cancel()


def _ray_call(fn: CellFn, cell: CellSpec, threads: int) -> tuple[str, Any]:
    import torch

    torch.set_num_threads(threads)
    return _call(fn, cell, False)


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
        Torch threads in every task; default ``max(1, int(resources.cpus))``.

    Raises
    ------
    RuntimeError
        When Ray is not installed (the message gives the install command).

    Notes
    -----
    Each task gets the cell's ``resources.cpus`` / ``resources.gpus`` as Ray
    resource requests and sets ``torch.set_num_threads(threads)``, by default
    ``max(1, int(cpus))``.
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
        remote = ray.remote(_ray_call)
        pending: dict[Any, CellSpec] = {}
        for cell in cells:
            opts = {"num_cpus": cell.resources.cpus, "max_retries": 0}
            if cell.resources.gpus > 0:
                opts["num_gpus"] = cell.resources.gpus
            threads = self.threads or max(1, int(cell.resources.cpus))
            pending[remote.options(**opts).remote(fn, cell, threads)] = cell
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
        Torch threads per cell for every executor.  By default in-process leaves
        torch's setting, the process pool uses ``cores // workers`` and Ray
        ``int(resources.cpus)``.  Matrix products may round differently with a
        different number of threads, so results are bitwise identical across
        executors when the thread count per cell is the same (pass ``threads``),
        and otherwise agree to float rounding.
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
