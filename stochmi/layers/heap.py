"""Heap settings for the deep-layer estimator's temporaries (glibc on Linux).

A round of :func:`stochmi.layers.deep.deep_log_density` allocates and frees
``(sources, paths, width)`` temporaries of a few to some tens of MB thousands of times.
glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB) with a
fresh ``mmap``, and gives free memory above its trim threshold at the top of the heap
back to the system; either way the next temporary faults its pages in again, which
can cost as much as the arithmetic on them (416 queries of a bridged round of the
untrained ``noisy_cnn``, X -> h3 at N = 1,000: 56.5 s, against 37.1 s under
:func:`heap_for_temporaries`; ``benchmarks/README.md``).  Which allocations are
mmapped depends on the largest block the process freed before (glibc raises the
threshold to it), so without fixed thresholds the same call can take very different
times in different processes.

:func:`heap_for_temporaries` raises both thresholds for the duration of a round, so
those temporaries are reused from the heap.  The chunks of the bridged factors' build
are sized under the 64 MiB mmap threshold; the tensors a round keeps, the ranking
tables of subsampled sources (256 queries at every forward path) and the temporaries
of blocks evaluated at every source (about 2e7 elements each) are larger and faulted
in afresh.  On leaving it sets them to the largest
values glibc's own dynamic thresholds reach (mmap 32 MiB, trim 64 MiB) and returns the
free heap to the system (``malloc_trim``), so that the memory available, which
:func:`stochmi.layer_mi` reads before a bridged round, counts it.  glibc cannot report
the thresholds a process had before, so a caller that had set its own gets these back.
Elsewhere (another C library, another system) it does nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import platform

__all__ = ["heap_for_temporaries"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters of glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MIB = 2**20
#: (mmap threshold, trim threshold) in bytes during a round and after it
DURING = (64 * MIB, 256 * MIB)
AFTER = (32 * MIB, 64 * MIB)


@functools.lru_cache(maxsize=1)
def _glibc():
    """The process's glibc (``mallopt`` and ``malloc_trim``), or None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def _set(libc, thresholds: tuple[int, int]) -> None:
    mmap, trim = thresholds
    libc.mallopt(_M_MMAP_THRESHOLD, mmap)
    libc.mallopt(_M_TRIM_THRESHOLD, trim)


@contextlib.contextmanager
def heap_for_temporaries():
    """Keep temporaries of up to 64 MiB on the heap, and up to 256 MiB of free heap,
    while the body runs (glibc only; see the module docstring).  On leaving, even by an
    exception: thresholds of 32 and 64 MiB and the free heap returned to the system.
    Numbers do not change, only where the memory comes from."""
    libc = _glibc()
    if libc is None:
        yield
        return
    _set(libc, DURING)
    try:
        yield
    finally:
        _set(libc, AFTER)
        libc.malloc_trim(0)
