"""Mutual information from a known conditional density.

Given N source values ``s_1..s_N`` and a conditional ``cond`` whose ``i``-th batch
member is ``p(t | s_i)``, draw ``t_j ~ p(t | s_j)`` and let
``L[j, i] = log p(t_j | s_i)``.  Then (natural logs, nats):

* dataset MI (source uniform over the N values), exact up to Monte Carlo error::

      I_hat = mean_j ( L[j, j] - logmeanexp_i L[j, i] )

* population bracket (source drawn i.i.d.; Poole et al. 2019)::

      lower = I_hat                                          (InfoNCE, optimal critic, <= log N)
      upper = mean_j ( L[j, j] - logmeanexp_{i != j} L[j, i] )   (leave-one-out)

Every term belongs to one source ``j`` and depends only on its own draws, so the
terms are independent given the sources and the standard error is
``sd(terms) / sqrt(N)``.
"""

from __future__ import annotations

import math

import torch
from torch import distributions as td

from stochmi.core.estimate import MIEstimate
from stochmi.core.kernel import LogDensityKernel, first_tensor
from stochmi.core.rng import make_generator

__all__ = ["mi_from_conditional", "mi_with_labels", "make_generator"]

_SUB_ELEMS = 2**21  # elements of L reduced per step (16 MiB of float64): few, large torch ops


def _validate(cond: object, n_draws: int) -> int:
    if not isinstance(cond, td.Distribution):
        raise TypeError(
            "cond must be a torch.distributions.Distribution (Pyro distributions included) "
            f"with batch shape (N,), got {type(cond).__name__}"
        )
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive int, got {n_draws!r}")
    if len(cond.batch_shape) != 1:
        raise ValueError(
            "cond must have batch shape (N,) - one conditional p(t | s_i) per source value - "
            f"but has batch shape {tuple(cond.batch_shape)}; use .to_event() to move extra "
            "dimensions into the event shape"
        )
    if len(cond.event_shape) > 1:
        raise ValueError(
            f"cond must have event shape () or (d,), got {tuple(cond.event_shape)}; flatten the "
            "layer (e.g. reshape feature maps to (N, C*H*W)) before estimating"
        )
    n = int(cond.batch_shape[0])
    if n < 2:
        raise ValueError(f"mutual information needs at least two source values, got N = {n}")
    return n


def _device(cond: td.Distribution, device: torch.device | str | None) -> torch.device:
    """Where the kernel will run: ``device``, else the conditional's."""
    if device is not None:
        return torch.device(device)
    t = first_tensor(cond)
    return t.device if t is not None else torch.device("cpu")


def _mean_se(terms: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of per-source terms (shape (N,))."""
    n = terms.numel()
    mean = float(terms.mean())
    se = float(terms.std(unbiased=True) / math.sqrt(n)) if n > 1 else math.nan
    return mean, se


class _Pass:
    """One pass over ``L``: per-row logsumexp over all sources and leave-one-out,
    optionally class-restricted, accumulated per source."""

    def __init__(
        self,
        kernel: LogDensityKernel,
        n_draws: int,
        gen: torch.Generator,
        labels: torch.Tensor | None = None,
        group: int | None = None,
    ) -> None:
        self.kernel = kernel
        n = kernel.n
        self.t = kernel.sample(n_draws, gen)
        self.diag = kernel.diagonal(self.t)  # (R, N)
        self.diag_excl = (
            kernel.diagonal_excluding_group(self.t, group) if group is not None else None
        )
        total = n_draws * n
        dev = kernel.device
        self.lse_all = torch.empty(total, dtype=torch.float64, device=dev)
        self.lse_loo = torch.empty(total, dtype=torch.float64, device=dev)
        self.labels = labels
        if labels is not None:
            self.lse_cls = torch.empty(total, dtype=torch.float64, device=dev)
            self.lse_cls_loo = torch.empty(total, dtype=torch.float64, device=dev)
            classes = torch.unique(labels)
            self.n_classes = len(classes)
            self.class_of = torch.searchsorted(classes, labels)
            self.onehot = torch.nn.functional.one_hot(self.class_of, self.n_classes).to(
                torch.float64
            )
        # e = exp(L - shift) off the diagonal (0 on it), loo its row sums (float64):
        #   lse_loo = shift + log loo,  lse_all = logaddexp(lse_loo, L[j, j]),
        # the logs taken once at the end (few calls: each is a parallel region)
        shift = torch.empty(total, dtype=torch.float64, device=dev)
        loo = torch.empty(total, dtype=torch.float64, device=dev)
        cls = torch.empty(total, dtype=torch.float64, device=dev) if labels is not None else None
        for sl, src, e, sh, lo in kernel.iter_exp_blocks(
            self.t, self.diag, exact_shift=labels is not None, repair=labels is None
        ):
            shift[sl], loo[sl] = sh, lo
            if cls is not None:
                self._classes(cls[sl], src, e)
        diag = self.diag.reshape(-1)
        torch.add(shift, torch.log(loo), out=self.lse_loo)
        torch.logaddexp(self.lse_loo, diag, out=self.lse_all)
        if cls is not None:
            torch.add(shift, torch.log(cls), out=self.lse_cls_loo)
            torch.logaddexp(self.lse_cls_loo, diag, out=self.lse_cls)

    def _classes(self, out: torch.Tensor, src: torch.Tensor, e: torch.Tensor) -> None:
        # own-class sums of the same exponentials as one small float64 matrix product,
        # in steps of 16 MiB of float64
        step = max(32, _SUB_ELEMS // max(1, e.shape[1]))
        for r0 in range(0, e.shape[0], step):
            r1 = min(r0 + step, e.shape[0])
            ar = torch.arange(r1 - r0, device=e.device)
            own = self.class_of[src[r0:r1]]
            out[r0:r1] = (e[r0:r1].to(torch.float64) @ self.onehot)[ar, own]

    def loo_upper(self, n_draws: int) -> tuple[float, float]:
        """Leave-one-out upper ``mean_j(L[j,j] - logmeanexp_{i != j} L[j,i])``, stderr."""
        n = self.kernel.n
        terms = self.diag.reshape(-1) - (self.lse_loo - math.log(n - 1))
        return _mean_se(_per_source(terms, n_draws, n))


def _precision_extra(kernel: LogDensityKernel) -> dict:
    """What arithmetic the blocks used (``extra`` entries)."""
    return {
        "precision": kernel.precision,
        "blocks": {k: v for k, v in kernel.counts.items() if v},
        "precision_bound": kernel.mean_bound,
        "rescued_rows": kernel.rescued_rows,
        "repaired_rows": kernel.repaired_rows,
    }


def _per_source(x: torch.Tensor, n_draws: int, n: int) -> torch.Tensor:
    return x.view(n_draws, n).mean(0)


def _dataset_se(x: torch.Tensor, n_draws: int, n: int, fallback: float) -> float:
    """Monte Carlo standard error of the dataset MI (sources held fixed).

    With ``R >= 2`` draws per source only the within-source variance is Monte
    Carlo error: ``se = sqrt(sum_j var_r(term[r, j]) / R) / N``.  With one draw
    the within- and between-source spreads cannot be told apart, and the
    conservative ``sd_j(term) / sqrt(N)`` (``fallback``) is used.
    """
    if n_draws < 2:
        return fallback
    within = x.view(n_draws, n).var(dim=0, unbiased=True)
    return float(torch.sqrt(within.sum() / n_draws) / n)


def mi_from_conditional(
    cond: td.Distribution,
    *,
    n_draws: int = 1,
    seed: int | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    bounds: bool = False,
    saturation_margin: float = 1.0,
    path_group: int | None = None,
    precision: str = "auto",
) -> MIEstimate:
    """Estimate I(S; T) for a channel with known conditional density.

    Parameters
    ----------
    cond : torch.distributions.Distribution
        Batch shape ``(N,)``, event shape ``()`` or ``(d,)``; ``cond[i]`` is
        ``p(t | s_i)``.  Normal, ``Independent(Normal, 1)`` (scalar, per-dimension
        or per-source diagonal scales) and ``MixtureSameFamily`` of those take a
        matrix-product fast path; every other family goes through ``log_prob``.
    n_draws : int, default 1
        Channel draws ``t ~ p(t | s_j)`` per source value.
    seed : int, optional
        Seed of the private generator used for the draws (fresh entropy when
        omitted; the seed used is stored in ``extra["seed"]``).
    chunk_size : int, optional
        Rows of the pairwise matrix per block (memory ``O(chunk_size * N)``).
    device : torch.device or str, optional
        Device for the computation (defaults to the conditional's).
    bounds : bool, default False
        Also compute the deterministic Kolchinsky-Tracey pairwise-distance
        bounds on the dataset MI (Gaussian single-component conditionals only),
        stored in ``extra["pairwise_lower"]`` and ``extra["pairwise_upper"]``.
    saturation_margin : float, default 1.0
        ``saturated`` is set when ``lower > log N - saturation_margin``.
    path_group : int, optional
        For nested Monte Carlo channels ``p(t | s_i) ~ (1/K) sum_k q(t | path_ik)``
        given as a ``MixtureSameFamily`` whose components come in ``K`` consecutive
        groups of ``path_group`` (one group per path): ``lower`` then uses, for
        each draw, the mixture of the *other* ``K - 1`` paths of its own source as
        the InfoNCE critic.  That critic is independent of the draw, so ``lower``
        stays a valid lower bound on the population MI in expectation, while
        ``value`` and ``upper`` (which include the drawing path) overstate.
    precision : {"auto", "float64", "float32"}, default "auto"
        Arithmetic of the pairwise cross term (Gaussian fast path).  ``"auto"``
        computes a block in float32 (TF32 on CUDA) when a rounding-error bound
        keeps its error on the estimate below 1e-3 nats, float64 otherwise (e.g.
        large activations with tiny noise).  A float32 block is exponentiated and
        summed per row in float32 (inside the bound); the logs and every later
        reduction are float64.  ``extra`` records ``precision``, ``blocks`` (counts
        per arithmetic), ``precision_bound`` (bound on the error the float32 blocks
        add, nats) and ``rescued_rows`` (rows whose float32 row shift was redone).

    Returns
    -------
    MIEstimate
        ``value``/``stderr``: dataset MI ``mean_j(L[j,j] - logmeanexp_i L[j,i])``;
        ``lower``/``upper``: population bracket (InfoNCE with the optimal critic,
        and its leave-one-out counterpart), each with a standard error that
        includes the sampling of the sources.  ``stderr`` is the Monte Carlo
        error of the dataset MI: the within-source spread when ``n_draws >= 2``,
        the (conservative) total spread when ``n_draws == 1``.

    Raises
    ------
    TypeError
        ``cond`` is not a distribution, or ``seed`` is not an int.
    ValueError
        Fewer than two sources, wrong shapes, NaN/inf parameters or samples,
        or a conditional without density (zero noise), which has infinite MI.
    """
    n = _validate(cond, n_draws)
    gen, used_seed = make_generator(seed, _device(cond, device))
    kernel = LogDensityKernel(
        cond, chunk_size=chunk_size, device=device, precision=precision, prefetch=(n_draws, gen)
    )
    if path_group is not None and not kernel.is_gaussian:
        raise ValueError("path_group needs a Gaussian (mixture) conditional")
    p = _Pass(kernel, n_draws, gen, group=path_group)
    log_n = math.log(n)
    terms = p.diag.reshape(-1) - (p.lse_all - log_n)
    value, se_pop = _mean_se(_per_source(terms, n_draws, n))
    se = _dataset_se(terms, n_draws, n, se_pop)
    upper, se_up = p.loo_upper(n_draws)
    lower, se_lo = value, se_pop
    if p.diag_excl is not None:
        d_ex = p.diag_excl.reshape(-1)
        lower, se_lo = _mean_se(
            _per_source(d_ex - (torch.logaddexp(p.lse_loo, d_ex) - log_n), n_draws, n)
        )
    extra: dict = {
        "seed": used_seed,
        "fast_path": kernel.is_gaussian,
        "chunk_size": kernel.chunk_size,
        **_precision_extra(kernel),
    }
    if bounds:
        from stochmi.core.bounds import pairwise_bounds

        if kernel.gauss is None or kernel.gauss.n_components != 1:
            raise ValueError(
                "pairwise-distance bounds need a single-component Gaussian conditional "
                "(Normal or Independent(Normal))"
            )
        lo, hi = pairwise_bounds(
            kernel.gauss.loc[:, 0], kernel.gauss.scale[:, 0], chunk_size=chunk_size
        )
        extra["pairwise_lower"], extra["pairwise_upper"] = lo, hi
    return MIEstimate(
        value=value,
        stderr=se,
        lower=lower,
        upper=upper,
        lower_stderr=se_lo,
        upper_stderr=se_up,
        saturated=bool(lower > log_n - saturation_margin),
        n=n,
        n_draws=n_draws,
        method="conditional",
        extra=extra,
    )


def mi_with_labels(
    cond: td.Distribution,
    y: torch.Tensor,
    *,
    n_draws: int = 1,
    seed: int | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
    precision: str = "auto",
) -> MIEstimate:
    """Estimate I(T; Y) for discrete labels through class-conditional mixtures.

    With ``(S, Y)`` uniform over the N given pairs, ``T`` is the mixture
    ``(1/N) sum_i p(t | s_i)`` and ``T | Y=y`` the mixture over the ``N_y``
    sources with label ``y``, so

    .. math::

        I(T;Y) = h(T) - \\sum_y p(y) h(T|Y=y)
               = E_j\\left[\\log \\tfrac{1}{N_{y_j}}\\sum_{i: y_i = y_j} p(t_j|s_i)
                 - \\log \\tfrac{1}{N}\\sum_i p(t_j|s_i)\\right].

    ``value`` is this dataset quantity (exact up to Monte Carlo error).
    ``lower`` is the Barber-Agakov bound ``H(Y) + E log q(y_j | t_j)`` with the
    leave-one-out mixture classifier ``q`` (built without source ``j``, so it is a
    fixed classifier for the pair ``(t_j, y_j)``), mixed with 1e-6 of the uniform
    classifier so that it stays finite, using the plug-in label entropy.
    ``upper = min(H(Y), I(S;T) - I(S;T | Y))`` by the chain rule (``Y - S - T``), with
    the leave-one-out upper bound on ``I(S;T)`` and the InfoNCE lower bound on each
    class's ``I(S;T | Y=y)`` (``N_y`` sources); the ``L[j, j]`` cancel, leaving
    ``mean_j (logmeanexp_{i: y_i = y_j} L[j,i] - logmeanexp_{i != j} L[j,i])``.

    Parameters
    ----------
    cond : Distribution
        Batch shape ``(N,)``, event shape ``()`` or ``(d,)``.
    y : Tensor, shape (N,)
        Integer labels.
    n_draws, seed, chunk_size, device, precision
        As in :func:`mi_from_conditional`.

    Returns
    -------
    MIEstimate
    """
    n = _validate(cond, n_draws)
    if not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(
            f"labels must have shape ({n},) to match the conditional, got {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.is_complex():
        raise TypeError("labels must be an integer tensor")
    gen, used_seed = make_generator(seed, _device(cond, device))
    kernel = LogDensityKernel(
        cond, chunk_size=chunk_size, device=device, precision=precision, prefetch=(n_draws, gen)
    )
    y = y.to(kernel.device).long()
    p = _Pass(kernel, n_draws, gen, labels=y)
    counts = torch.bincount(p.class_of, minlength=p.n_classes).to(torch.float64)
    yrow = p.class_of.repeat(n_draws)
    log_n = math.log(n)
    terms = (p.lse_cls - torch.log(counts[yrow])) - (p.lse_all - log_n)
    value, se_pop = _mean_se(_per_source(terms, n_draws, n))
    se = _dataset_se(terms, n_draws, n, se_pop)
    freq = counts / n
    h_y = float(-(freq * torch.log(freq)).sum())
    if bool((counts >= 2).all()):
        # classifier q' = (1 - eps) q + eps / K: still a classifier (so still a valid
        # Barber-Agakov bound), and finite where q underflows for isolated samples
        eps = 1e-6
        log_q = p.lse_cls_loo - p.lse_loo
        log_q = torch.logaddexp(
            log_q + math.log1p(-eps), torch.full_like(log_q, math.log(eps / p.n_classes))
        )
        t_lo = _per_source(log_q, n_draws, n)
        ba, se_lo = _mean_se(t_lo)
        lower = h_y + ba
    else:
        lower, se_lo = math.nan, math.nan
    t_up = (p.lse_cls - torch.log(counts[yrow])) - (p.lse_loo - math.log(n - 1))
    up_st, se_up = _mean_se(_per_source(t_up, n_draws, n))
    upper = min(h_y, up_st)
    return MIEstimate(
        value=value,
        stderr=se,
        lower=lower,
        upper=upper,
        lower_stderr=se_lo,
        upper_stderr=se_up if up_st < h_y else 0.0,
        saturated=False,
        n=n,
        n_draws=n_draws,
        method="labels",
        extra={
            "seed": used_seed,
            "label_entropy": h_y,
            "n_classes": p.n_classes,
            "fast_path": kernel.is_gaussian,
            **_precision_extra(kernel),
        },
    )
