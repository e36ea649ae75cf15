"""Seeds and random generators: every rule stochmi uses, in one module.

The promise that a cell, an estimate or a training run gives identical numbers
under any executor rests on the functions here.  Every public function that draws
random numbers takes a ``seed`` (or a private generator), validates it with
:func:`check_seed`, and draws from private generators made here; none reseeds or
consumes the caller's global torch or NumPy RNG.

The seed rule
-------------
A seed is ``None`` or an integer (a Python ``int`` or a NumPy integer; ``bool`` is
refused) in ``[-2**63, 2**64)``:

- ``None`` draws a fresh seed from the operating system (56 bits,
  :func:`resolve_seed`; ``os.urandom``, so no global RNG is read); functions that
  report what they used return it, so a run can be replayed.
- A negative seed is mapped to its 64-bit two's complement, ``seed + 2**64``
  (:func:`check_seed`). This is the value :meth:`torch.Generator.manual_seed` itself
  uses, so ``-1`` and ``2**64 - 1`` are the same seed everywhere: in torch generators
  and in NumPy :class:`~numpy.random.SeedSequence` derivations alike.
- Anything else raises :class:`TypeError` (not an integer) or :class:`ValueError`
  (out of range), both with the message of :func:`seed_error`.

Derived seeds
-------------
- :func:`spawn_seeds` (``count`` independent 62-bit seeds, ``SeedSequence.spawn``):
  layer-MI and weight-draw streams.
- :func:`derive_seed` (31-bit seed from a seed and integer tags): experiment cells.
- :func:`chain_seeds` (32-bit seeds, one per MCMC chain): NUTS.
- :func:`draw_seed` (a 62-bit seed drawn from a private ``torch.Generator``): one
  sub-stream per traced model call or sampled distribution.

Generators
----------
- :func:`make_generator`: a private ``torch.Generator`` and the seed it got.
- :func:`numpy_generator`: a NumPy ``Generator`` under the same rule.
- :func:`rng_context`: a block run on a forked copy of torch's global RNG (what Pyro
  and ``Distribution.sample`` draw from), seeded, with the caller's state restored
  afterwards.  Code that must call something drawing from the global RNG does it
  inside ``rng_context(draw_seed(generator), devices)``.
"""

from __future__ import annotations

import contextlib
import numbers
import os

import numpy as np
import torch

__all__ = [
    "SEED_MAX",
    "SEED_MIN",
    "chain_seeds",
    "check_seed",
    "derive_seed",
    "draw_seed",
    "make_generator",
    "numpy_generator",
    "resolve_seed",
    "rng_context",
    "seed_error",
    "spawn_seeds",
]

#: smallest and largest-plus-one accepted seed
SEED_MIN, SEED_MAX = -(2**63), 2**64


def seed_error(seed: object, name: str = "seed") -> str:
    """The one message for a seed that breaks the rule."""
    return (
        f"{name} must be None or an integer in [-2**63, 2**64) (negative values are taken "
        f"modulo 2**64), got {seed!r} ({type(seed).__name__})"
    )


def check_seed(seed: object, name: str = "seed") -> int | None:
    """Validate ``seed`` and return it as a non-negative ``int`` (``None`` stays ``None``).

    Raises
    ------
    TypeError
        Not ``None`` and not an integer (``bool``, ``float``, ``str``, ...).
    ValueError
        An integer outside ``[-2**63, 2**64)``.
    """
    if seed is None:
        return None
    if isinstance(seed, bool | np.bool_) or not isinstance(seed, numbers.Integral):
        raise TypeError(seed_error(seed, name))
    value = int(seed)
    if not SEED_MIN <= value < SEED_MAX:
        raise ValueError(seed_error(seed, name))
    return value % SEED_MAX


def resolve_seed(seed: object, name: str = "seed") -> int:
    """:func:`check_seed`, with ``None`` replaced by a fresh 56-bit seed from the OS."""
    value = check_seed(seed, name)
    if value is None:
        value = int.from_bytes(os.urandom(7), "little")
    return value


def make_generator(seed: object, device: torch.device | str = "cpu") -> tuple[torch.Generator, int]:
    """A private ``torch.Generator`` on ``device`` seeded by the rule, and its seed.

    The global torch RNG is neither read nor reseeded.  ``seed=None`` draws a seed
    (:func:`resolve_seed`), returned so that the run can be replayed.
    """
    value = resolve_seed(seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(value)
    return gen, value


def numpy_generator(seed: object) -> np.random.Generator:
    """``numpy.random.default_rng`` under the seed rule (``None``: OS entropy)."""
    return np.random.default_rng(check_seed(seed))


def spawn_seeds(seed: object, count: int) -> list[int]:
    """``count`` independent 62-bit seeds derived from ``seed`` (``SeedSequence.spawn``).

    ``seed=None`` draws a fresh seed first (:func:`resolve_seed`).
    """
    ss = np.random.SeedSequence(resolve_seed(seed))
    return [int(s.generate_state(1, np.uint64)[0] >> np.uint64(2)) for s in ss.spawn(count)]


def derive_seed(seed: object, *tags: int) -> int:
    """A 31-bit seed derived from ``seed`` and integer ``tags`` (NumPy ``SeedSequence``).

    Different tags give statistically independent streams; the same inputs give the
    same seed on every platform.  ``seed`` must not be ``None`` here.
    """
    value = check_seed(seed)
    if value is None:
        raise TypeError(seed_error(seed))
    state = np.random.SeedSequence([value, *map(int, tags)]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def chain_seeds(seed: object, count: int) -> list[int]:
    """One 32-bit seed per MCMC chain, derived from ``seed`` (``None``: fresh)."""
    ss = np.random.SeedSequence(resolve_seed(seed))
    return [int(s) for s in ss.generate_state(count, dtype=np.uint32)]


def draw_seed(generator: torch.Generator) -> int:
    """A 62-bit seed drawn from a private ``generator`` (advances it by one draw).

    The seed of a sub-stream: :func:`rng_context` runs a block that draws from torch's
    global RNG (a Pyro trace, ``Distribution.sample``) on a copy seeded with it.
    """
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))


def _cuda_indices(device) -> list[int]:
    """CUDA device indices among ``device`` (a device, a name, or a list of them)."""
    if device is None:
        return []
    items = device if isinstance(device, list | tuple) else [device]
    out: list[int] = []
    for d in items:
        d = torch.device(d)
        if d.type == "cuda":
            idx = d.index if d.index is not None else torch.cuda.current_device()
            if idx not in out:
                out.append(idx)
    return out


@contextlib.contextmanager
def rng_context(seed: object, device=None):
    """Run a block on a private copy of torch's global RNG, seeded with ``seed``.

    Pyro draws from torch's global RNG; this forks it (``torch.random.fork_rng``) so
    that the caller's RNG state is restored afterwards, and seeds the CPU generator
    and, for each CUDA device in ``device``, that device's generator with ``seed``
    (other devices' generators are neither forked nor reseeded, unlike
    ``torch.manual_seed``).  ``device`` is ``None`` (CPU only), a device or device
    name, or a list of them.  ``seed=None`` forks without seeding (continues the
    caller's stream on a copy).
    """
    value = check_seed(seed)
    devices = _cuda_indices(device)
    with torch.random.fork_rng(devices=devices):
        if value is not None:
            torch.random.default_generator.manual_seed(value)
            for idx in devices:
                with torch.cuda.device(idx):
                    torch.cuda.manual_seed(value)
        yield
