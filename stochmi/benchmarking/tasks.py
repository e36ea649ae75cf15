"""Ground-truth MI tasks: samples with a known mutual information.

Each task is a :class:`Task` holding N paired samples ``x`` (N, dx), ``t`` (N, dt)
(float64 tensors), the true population MI ``I(X; T)`` in nats, and, where the
channel has a density, ``conditional(x) -> Distribution`` with batch shape (N,)
whose i-th member is ``p(t | x_i)``.  That conditional is what
:func:`stochmi.mi_from_conditional` needs, so the certified estimator can be run on
the same tasks as the sample-only baselines in :mod:`stochmi.benchmarking.baselines`.

Families (after Czyż et al., "Beyond Normal", NeurIPS 2023):

* :func:`gaussian_task` - jointly Gaussian, sparse (paired coordinates) or dense
  (equicorrelated) correlation;
* :func:`additive_gaussian_task` - ``T = A X + sigma Z``;
* :func:`additive_uniform_task` - ``X ~ U(0, 1)``, ``T = X + U(-eps, eps)``;
* :func:`student_t_task` - multivariate Student-t (heavy tails);
* :func:`transformed_task` - MI-preserving per-coordinate monotone maps (asinh,
  half-cube, wiggly) applied to another task.

Every sampler takes ``seed`` (the rule of :mod:`stochmi.core.rng`) and uses a private
``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy.special import digamma, gammaln
from torch.distributions import (
    Distribution,
    Independent,
    MultivariateNormal,
    Normal,
    TransformedDistribution,
    Uniform,
    constraints,
)
from torch.distributions.transforms import Transform

from stochmi.core.rng import numpy_generator

__all__ = [
    "Task",
    "gaussian_task",
    "additive_gaussian_task",
    "additive_uniform_task",
    "student_t_task",
    "transformed_task",
    "benchmark_tasks",
    "gaussian_mi",
    "additive_uniform_mi",
    "student_t_mi",
    "AsinhTransform",
    "HalfCubeTransform",
    "WigglyTransform",
    "TRANSFORMS",
]


@dataclass(frozen=True)
class Task:
    """Paired samples with a known mutual information.

    Attributes
    ----------
    name : str
        Short identifier (includes the parameters).
    x : Tensor, shape (N, dx), float64
    t : Tensor, shape (N, dt), float64
    true_mi : float
        Population ``I(X; T)`` in nats.
    conditional : callable or None
        ``conditional(x) -> torch.distributions.Distribution`` with batch shape
        (len(x),) and event shape (dt,): ``p(t | x_i)``.  ``None`` when the
        channel has no density.
    description : str
        Human-readable description.
    params : dict
        Parameters the task was built with.
    """

    name: str
    x: torch.Tensor
    t: torch.Tensor
    true_mi: float
    conditional: Callable[[torch.Tensor], Distribution] | None
    description: str = ""
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim_x(self) -> int:
        return int(self.x.shape[1])

    @property
    def dim_t(self) -> int:
        return int(self.t.shape[1])

    def channel(self) -> Distribution:
        """``conditional(self.x)``: the channel at the task's own inputs, batch (N,).

        Raises
        ------
        ValueError
            When the task has no conditional density.
        """
        if self.conditional is None:
            raise ValueError(f"task {self.name!r} has no conditional density")
        return self.conditional(self.x)


# ----------------------------------------------------------------------------
# closed forms
# ----------------------------------------------------------------------------


def gaussian_mi(cov: np.ndarray | torch.Tensor, dim_x: int) -> float:
    r"""``I(X; T)`` of a joint Gaussian with covariance ``cov`` ((dx+dt) x (dx+dt)).

    .. math:: I = \tfrac12\big(\log\det\Sigma_{XX} + \log\det\Sigma_{TT} - \log\det\Sigma\big)
    """
    c = np.asarray(cov, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cov must be square, got shape {c.shape}")
    if not 0 < dim_x < c.shape[0]:
        raise ValueError(f"dim_x must be in [1, {c.shape[0] - 1}], got {dim_x}")
    ld = lambda m: np.linalg.slogdet(m)[1]  # noqa: E731
    return float(0.5 * (ld(c[:dim_x, :dim_x]) + ld(c[dim_x:, dim_x:]) - ld(c)))


def additive_uniform_mi(eps: float) -> float:
    r"""``I(X; X + U)`` for ``X ~ U(0, 1)``, ``U ~ U(-eps, eps)`` (nats).

    ``T`` has a trapezoidal density.  With ``w = 2 eps``:
    for ``w <= 1``, ``h(T) = w / 2`` (two linear ramps of width ``w``, each
    contributing ``w / 4``; the plateau of height 1 contributes 0), so
    ``I = h(T) - log w = eps - log(2 eps)``; for ``w >= 1``,
    ``h(T) = 1 / (2w) + log w`` and ``I = 1 / (4 eps)``.  Both agree at ``eps = 1/2``.
    """
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if eps <= 0.5:
        return float(eps - math.log(2 * eps))
    return float(1.0 / (4.0 * eps))


def _student_entropy_term(d: float) -> float:
    return float(gammaln(d / 2.0) - (d / 2.0) * digamma(d / 2.0))


def student_t_mi(dispersion: np.ndarray, dim_x: int, df: float) -> float:
    r"""``I(X; T)`` of a multivariate Student-t with dispersion ``Sigma`` and ``df`` dof.

    Arellano-Valle, Contreras-Reyes & Genton (2013), as used by Czyż et al. (2023):

    .. math::

        I = I_{\rm Gauss}(\Sigma) + c(\nu) + c(\nu + d_x + d_t) - c(\nu + d_x) - c(\nu + d_t),
        \qquad c(d) = \log\Gamma(d/2) - \tfrac d2\,\psi(d/2).

    The correction is positive: even with ``Sigma`` block-diagonal (uncorrelated
    blocks) ``X`` and ``T`` share the common scale variable and are dependent.
    """
    if not df > 0:
        raise ValueError(f"df must be positive, got {df}")
    c = np.asarray(dispersion, dtype=np.float64)
    dt = c.shape[0] - dim_x
    corr = (
        _student_entropy_term(df)
        + _student_entropy_term(df + dim_x + dt)
        - _student_entropy_term(df + dim_x)
        - _student_entropy_term(df + dt)
    )
    return gaussian_mi(c, dim_x) + corr


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------


def _check_n(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 2:
        raise ValueError(f"n must be an int >= 2, got {n!r}")
    return int(n)


def _check_dim(d: int, name: str) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"{name} must be a positive int, got {d!r}")
    return int(d)


def _t64(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)


def _correlation(dim_x: int, dim_t: int, correlation: str, rho: float) -> np.ndarray:
    d = dim_x + dim_t
    if correlation == "sparse":
        if not -1 < rho < 1:
            raise ValueError(f"rho must be in (-1, 1) for sparse correlation, got {rho}")
        c = np.eye(d)
        for k in range(min(dim_x, dim_t)):
            c[k, dim_x + k] = c[dim_x + k, k] = rho
        return c
    if correlation == "dense":
        if not -1.0 / (d - 1) < rho < 1:
            raise ValueError(f"rho must be in (-1/(d-1), 1) = ({-1.0 / (d - 1):.3f}, 1), got {rho}")
        return (1 - rho) * np.eye(d) + rho * np.ones((d, d))
    raise ValueError(f"correlation must be 'sparse' or 'dense', got {correlation!r}")


def _gaussian_conditional(cov: np.ndarray, dim_x: int):
    """``x -> MultivariateNormal(B x, S)`` for T | X = x of a zero-mean joint Gaussian."""
    sxx, sxt, stt = cov[:dim_x, :dim_x], cov[:dim_x, dim_x:], cov[dim_x:, dim_x:]
    b = np.linalg.solve(sxx, sxt).T  # (dt, dx)
    s = stt - sxt.T @ np.linalg.solve(sxx, sxt)
    b_t, chol = _t64(b), torch.linalg.cholesky(_t64(s))

    def conditional(x: torch.Tensor) -> Distribution:
        x = _as_batch(x, dim_x)
        return MultivariateNormal(x @ b_t.T, scale_tril=chol.expand(x.shape[0], -1, -1))

    return conditional


def _as_batch(x: torch.Tensor, dim_x: int) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.dim() == 1 and dim_x == 1:
        x = x[:, None]
    if x.dim() != 2 or x.shape[1] != dim_x:
        raise ValueError(f"x must have shape (N, {dim_x}), got {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------
# task constructors
# ----------------------------------------------------------------------------


def gaussian_task(
    n: int,
    *,
    dim_x: int = 2,
    dim_t: int = 2,
    correlation: str = "sparse",
    rho: float = 0.8,
    seed: int | None = 0,
) -> Task:
    r"""Jointly Gaussian ``(X, T)`` with unit variances.

    ``correlation="sparse"``: ``corr(X_k, T_k) = rho`` for ``k < min(dx, dt)``, all
    else independent, ``I = -(min(dx, dt)/2) log(1 - rho^2)``.
    ``correlation="dense"``: every pair of the ``dx + dt`` coordinates has
    correlation ``rho`` (equicorrelated); ``I`` from the covariance.
    ``conditional(x) = N(Σ_tx Σ_xx^{-1} x, Σ_tt - Σ_tx Σ_xx^{-1} Σ_xt)``.

    Parameters
    ----------
    n : int
        Number of samples.
    dim_x, dim_t : int
    correlation : {"sparse", "dense"}
    rho : float
    seed : int or None
    """
    n, dim_x, dim_t = _check_n(n), _check_dim(dim_x, "dim_x"), _check_dim(dim_t, "dim_t")
    cov = _correlation(dim_x, dim_t, correlation, float(rho))
    rng = numpy_generator(seed)
    z = rng.standard_normal((n, dim_x + dim_t)) @ np.linalg.cholesky(cov).T
    return Task(
        name=f"gauss-{correlation}-{dim_x}x{dim_t}-rho{rho:g}",
        x=_t64(z[:, :dim_x]),
        t=_t64(z[:, dim_x:]),
        true_mi=gaussian_mi(cov, dim_x),
        conditional=_gaussian_conditional(cov, dim_x),
        description=f"jointly Gaussian, {correlation} correlation rho={rho:g}",
        params={"dim_x": dim_x, "dim_t": dim_t, "correlation": correlation, "rho": rho},
    )


def additive_gaussian_task(
    n: int,
    *,
    dim_x: int = 2,
    dim_t: int = 2,
    sigma: float = 0.5,
    A: np.ndarray | torch.Tensor | None = None,
    seed: int | None = 0,
) -> Task:
    r"""Additive Gaussian channel ``T = A X + sigma Z``, ``X, Z ~ N(0, I)``.

    ``I(X; T) = 1/2 log det(I + A A^T / sigma^2)``;
    ``conditional(x) = Independent(Normal(A x, sigma), 1)``.

    Parameters
    ----------
    n : int
    dim_x, dim_t : int
        Shapes (ignored when ``A`` is given: ``A`` is (dim_t, dim_x)).
    sigma : float
        Noise standard deviation (> 0).
    A : array (dim_t, dim_x), optional
        Channel matrix; default a seeded Gaussian matrix with entries
        ``N(0, 1/dim_x)``.
    seed : int or None
    """
    n = _check_n(n)
    if not sigma > 0:
        raise ValueError(f"sigma must be positive (zero noise gives infinite MI), got {sigma}")
    rng = numpy_generator(seed)
    if A is None:
        dim_x, dim_t = _check_dim(dim_x, "dim_x"), _check_dim(dim_t, "dim_t")
        a = rng.standard_normal((dim_t, dim_x)) / math.sqrt(dim_x)
    else:
        a = np.asarray(A.detach().cpu() if isinstance(A, torch.Tensor) else A, dtype=np.float64)
        if a.ndim != 2:
            raise ValueError(f"A must be a (dim_t, dim_x) matrix, got shape {a.shape}")
        dim_t, dim_x = a.shape
    x = rng.standard_normal((n, dim_x))
    t = x @ a.T + sigma * rng.standard_normal((n, dim_t))
    _, logdet = np.linalg.slogdet(np.eye(dim_t) + a @ a.T / sigma**2)
    a_t = _t64(a)

    def conditional(xx: torch.Tensor) -> Distribution:
        xx = _as_batch(xx, dim_x)
        return Independent(Normal(xx @ a_t.T, torch.full((), float(sigma), dtype=xx.dtype)), 1)

    return Task(
        name=f"additive-gauss-{dim_x}to{dim_t}-sigma{sigma:g}",
        x=_t64(x),
        t=_t64(t),
        true_mi=float(0.5 * logdet),
        conditional=conditional,
        description=f"T = A X + {sigma:g} Z, X ~ N(0, I_{dim_x})",
        params={"dim_x": dim_x, "dim_t": dim_t, "sigma": sigma, "A": a},
    )


def additive_uniform_task(n: int, *, eps: float = 0.1, dim: int = 1, seed: int | None = 0) -> Task:
    r"""``X ~ U(0, 1)^dim``, ``T = X + U``, ``U ~ U(-eps, eps)^dim`` (independent coords).

    ``I = dim * (eps - log(2 eps))`` for ``eps <= 1/2`` and ``dim / (4 eps)`` above
    (see :func:`additive_uniform_mi`).
    ``conditional(x) = Independent(Uniform(x - eps, x + eps), 1)`` (with
    ``validate_args=False`` so that points outside the support get log density -inf).

    Parameters
    ----------
    n : int
    eps : float
        Half-width of the noise.
    dim : int
    seed : int or None
    """
    n, dim = _check_n(n), _check_dim(dim, "dim")
    mi1 = additive_uniform_mi(float(eps))
    rng = numpy_generator(seed)
    x = rng.uniform(0.0, 1.0, (n, dim))
    t = x + rng.uniform(-eps, eps, (n, dim))

    def conditional(xx: torch.Tensor) -> Distribution:
        xx = _as_batch(xx, dim)
        return Independent(Uniform(xx - eps, xx + eps, validate_args=False), 1)

    return Task(
        name=f"additive-uniform-{dim}d-eps{eps:g}",
        x=_t64(x),
        t=_t64(t),
        true_mi=dim * mi1,
        conditional=conditional,
        description=f"X ~ U(0,1)^{dim}, T = X + U(-{eps:g}, {eps:g})",
        params={"dim": dim, "eps": eps},
    )


def student_t_task(
    n: int,
    *,
    dim_x: int = 1,
    dim_t: int = 1,
    df: float = 3.0,
    rho: float = 0.5,
    seed: int | None = 0,
) -> Task:
    r"""Multivariate Student-t ``(X, T)`` with sparse dispersion and ``df`` degrees of freedom.

    ``(X, T) = Z / sqrt(W / df)`` with ``Z ~ N(0, Sigma)`` (``Sigma`` as in
    :func:`gaussian_task` with sparse correlation ``rho``) and ``W ~ chi^2_df``.
    True MI from :func:`student_t_mi`.  The conditional is again Student-t:

    .. math::

        T \mid X = x \sim t_{\nu + d_x}\Big(B x,\;
            \frac{\nu + x^\top\Sigma_{xx}^{-1}x}{\nu + d_x}\,\Sigma_{t|x}\Big)

    (``pyro.distributions.MultivariateStudentT``, batch (N,)).

    Parameters
    ----------
    n : int
    dim_x, dim_t : int
    df : float
        Degrees of freedom (> 0; heavier tails for small df).
    rho : float
        Correlation parameter of the dispersion (0 still gives positive MI).
    seed : int or None
    """
    from pyro.distributions import MultivariateStudentT

    n, dim_x, dim_t = _check_n(n), _check_dim(dim_x, "dim_x"), _check_dim(dim_t, "dim_t")
    if not df > 0:
        raise ValueError(f"df must be positive, got {df}")
    cov = _correlation(dim_x, dim_t, "sparse", float(rho))
    rng = numpy_generator(seed)
    z = rng.standard_normal((n, dim_x + dim_t)) @ np.linalg.cholesky(cov).T
    w = rng.chisquare(df, size=(n, 1))
    s = z / np.sqrt(w / df)
    sxx, sxt, stt = cov[:dim_x, :dim_x], cov[:dim_x, dim_x:], cov[dim_x:, dim_x:]
    b = _t64(np.linalg.solve(sxx, sxt).T)
    sxx_inv = _t64(np.linalg.inv(sxx))
    chol = torch.linalg.cholesky(_t64(stt - sxt.T @ np.linalg.solve(sxx, sxt)))

    def conditional(xx: torch.Tensor) -> Distribution:
        xx = _as_batch(xx, dim_x)
        maha = ((xx @ sxx_inv) * xx).sum(1)
        factor = torch.sqrt((df + maha) / (df + dim_x))
        tril = factor[:, None, None] * chol
        dof = torch.full((xx.shape[0],), float(df + dim_x), dtype=xx.dtype)
        return MultivariateStudentT(dof, xx @ b.T, tril)

    return Task(
        name=f"student-t-{dim_x}x{dim_t}-df{df:g}-rho{rho:g}",
        x=_t64(s[:, :dim_x]),
        t=_t64(s[:, dim_x:]),
        true_mi=student_t_mi(cov, dim_x, float(df)),
        conditional=conditional,
        description=f"multivariate Student-t, df={df:g}, sparse dispersion rho={rho:g}",
        params={"dim_x": dim_x, "dim_t": dim_t, "df": df, "rho": rho},
    )


# ----------------------------------------------------------------------------
# MI-preserving transforms
# ----------------------------------------------------------------------------


class AsinhTransform(Transform):
    r"""Elementwise ``y = asinh(x)``; ``log|dy/dx| = -1/2 log(1 + x^2)``."""

    domain = constraints.real
    codomain = constraints.real
    bijective = True
    sign = +1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsinhTransform)

    def __hash__(self) -> int:
        return hash(type(self))

    def _call(self, x):
        return torch.asinh(x)

    def _inverse(self, y):
        return torch.sinh(y)

    def log_abs_det_jacobian(self, x, y):
        return -0.5 * torch.log1p(x * x)


class HalfCubeTransform(Transform):
    r"""Elementwise ``y = x |x|^{1/2}``; inverse ``x = sign(y) |y|^{2/3}``;
    ``log|dy/dx| = log(3/2) + 1/2 log|x|``."""

    domain = constraints.real
    codomain = constraints.real
    bijective = True
    sign = +1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HalfCubeTransform)

    def __hash__(self) -> int:
        return hash(type(self))

    def _call(self, x):
        return x * torch.sqrt(torch.abs(x))

    def _inverse(self, y):
        return torch.sign(y) * torch.abs(y) ** (2.0 / 3.0)

    def log_abs_det_jacobian(self, x, y):
        return math.log(1.5) + 0.5 * torch.log(torch.abs(x))


class WigglyTransform(Transform):
    r"""Elementwise ``y = x + a sin(omega x)`` with ``a omega < 1`` (strictly increasing).

    ``log|dy/dx| = log(1 + a omega cos(omega x))``.  The inverse has no closed form:
    a safeguarded Newton iteration on the bracket ``[y - a, y + a]`` (bisection when
    a Newton step leaves the bracket), to float64 precision.
    """

    domain = constraints.real
    codomain = constraints.real
    bijective = True
    sign = +1

    def __init__(self, amplitude: float = 0.4, omega: float = 2.0, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        if not amplitude * omega < 1 or amplitude < 0 or omega <= 0:
            raise ValueError("need amplitude >= 0, omega > 0 and amplitude * omega < 1")
        self.amplitude = float(amplitude)
        self.omega = float(omega)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, WigglyTransform)
            and other.amplitude == self.amplitude
            and other.omega == self.omega
        )

    def __hash__(self) -> int:
        return hash((type(self), self.amplitude, self.omega))

    def _call(self, x):
        return x + self.amplitude * torch.sin(self.omega * x)

    def _inverse(self, y):
        a, w = self.amplitude, self.omega
        lo, hi = y - a, y + a
        x = y.clone()
        for _ in range(60):
            f = x + a * torch.sin(w * x) - y
            lo = torch.where(f < 0, x, lo)
            hi = torch.where(f > 0, x, hi)
            step = f / (1.0 + a * w * torch.cos(w * x))
            xn = x - step
            outside = (xn <= lo) | (xn >= hi)
            xn = torch.where(outside, 0.5 * (lo + hi), xn)
            if bool((xn - x).abs().max() <= 1e-15 * (1.0 + x.abs().max())):
                x = xn
                break
            x = xn
        return x

    def log_abs_det_jacobian(self, x, y):
        return torch.log1p(self.amplitude * self.omega * torch.cos(self.omega * x))


TRANSFORMS: dict[str, Callable[[], Transform]] = {
    "asinh": AsinhTransform,
    "half_cube": HalfCubeTransform,
    "wiggly": WigglyTransform,
}


def transformed_task(base: Task, transform: str = "asinh", *, apply_to: str = "both") -> Task:
    r"""Apply an MI-preserving elementwise monotone map to a task.

    For injective ``f``, ``g``: ``I(f(X); g(T)) = I(X; T)``, so ``true_mi`` is the
    base task's.  The conditional of the new task inverts the map on ``x`` and
    pushes the base conditional through the map on ``t``:
    ``p(t' | x') = TransformedDistribution(base.conditional(f^{-1}(x')), g)``.

    Parameters
    ----------
    base : Task
    transform : {"asinh", "half_cube", "wiggly"}
    apply_to : {"both", "x", "t"}
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {sorted(TRANSFORMS)}, got {transform!r}")
    if apply_to not in ("both", "x", "t"):
        raise ValueError(f"apply_to must be 'both', 'x' or 't', got {apply_to!r}")
    f = TRANSFORMS[transform]()
    on_x, on_t = apply_to in ("both", "x"), apply_to in ("both", "t")
    x = f(base.x) if on_x else base.x
    t = f(base.t) if on_t else base.t
    conditional = None
    if base.conditional is not None:
        base_cond = base.conditional

        def conditional(xx: torch.Tensor) -> Distribution:
            xx = torch.as_tensor(xx, dtype=torch.float64)
            d = base_cond(f.inv(xx) if on_x else xx)
            return TransformedDistribution(d, [f]) if on_t else d

    return replace(
        base,
        name=f"{transform}({base.name})"
        if apply_to == "both"
        else f"{transform}-{apply_to}({base.name})",
        x=x,
        t=t,
        conditional=conditional,
        description=f"{transform} applied to {apply_to} of: {base.description}",
        params={**base.params, "transform": transform, "apply_to": apply_to},
    )


def benchmark_tasks(n: int = 2000, *, seed: int = 0, quick: bool = False) -> list[Task]:
    """The task list used by :func:`stochmi.benchmarking.compare.run_comparison`.

    Parameters
    ----------
    n : int
        Samples per task.
    seed : int
        Base seed (task ``k`` uses ``seed + k``).
    quick : bool
        A shorter list (one task per family).
    """
    gauss_2x2 = gaussian_task(n, dim_x=2, dim_t=2, rho=0.8, seed=seed + 3)
    tasks = [
        gaussian_task(n, dim_x=1, dim_t=1, rho=0.8, seed=seed),
        gaussian_task(n, dim_x=3, dim_t=3, rho=0.9, seed=seed + 1),
        gaussian_task(n, dim_x=5, dim_t=5, correlation="dense", rho=0.5, seed=seed + 2),
        additive_gaussian_task(n, dim_x=4, dim_t=4, sigma=0.5, seed=seed + 4),
        additive_uniform_task(n, eps=0.1, seed=seed + 5),
        student_t_task(n, dim_x=1, dim_t=1, df=3.0, rho=0.5, seed=seed + 6),
        student_t_task(n, dim_x=2, dim_t=2, df=5.0, rho=0.8, seed=seed + 7),
        transformed_task(gauss_2x2, "asinh"),
        transformed_task(gauss_2x2, "half_cube"),
        transformed_task(gauss_2x2, "wiggly"),
    ]
    if quick:
        keep = {0, 3, 4, 5, 8}
        tasks = [tk for i, tk in enumerate(tasks) if i in keep]
    return tasks
