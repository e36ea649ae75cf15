"""Pairwise log-density kernel: ``L[j, i] = log p(t_j | s_i)`` in row chunks.

This module knows nothing about mutual information; it turns a conditional
distribution into row-chunked blocks of the matrix ``L`` and hands each block
to a reducer.  Two paths:

* **Gaussian fast path** for ``Normal`` (event shape ``()``), ``Independent(Normal, 1)``
  and ``MixtureSameFamily`` of either.  With centred inputs ``t' = t - c`` and
  ``mu' = mu - c`` the squared Mahalanobis distance expands as

  .. math::

      D_{ji} = \\sum_d \\frac{(t'_{jd} - \\mu'_{id})^2}{s_{id}^2}
             = \\sum_d t'^2_{jd} P_{id} - 2 \\sum_d t'_{jd} Q_{id} + r_i,
      \\quad P = s^{-2},\\ Q = \\mu' P,\\ r_i = \\sum_d \\mu'^2_{id} P_{id},

  which is one matrix product per chunk (inner dimension ``d`` when the scale is
  shared by all sources or constant over dimensions, ``2 d`` for per-source
  diagonal scales).  The work is done in float64 after centring, and the
  diagonal ``L[j, j]`` (the term that dominates the estimate when noise is small)
  is recomputed directly from differences, so activations of magnitude 100 with
  noise 1e-2 keep full precision.
* **Generic path** through ``Distribution.log_prob`` broadcasting: a chunk of
  ``B`` samples of shape ``(B, 1, *event)`` against the batch ``(N,)``.  The
  chunk is sized so ``B * N * d`` elements fit the memory budget.

Precision (Gaussian path).  The cross term of each block is one matrix product; with
``precision="auto"`` it runs in float32 (TF32 on CUDA where even that bound allows) when a
rounding-error bound on the block, computed from the row norms of the block, the largest
column norm after centring and scaling, the inner dimension ``w`` and the bias magnitudes,

.. math::

    E_j = \\lambda (\\sqrt{w} u_{acc} + \\sqrt{2} u_{in}) \\lVert a_j \\rVert
          \\max_i \\lVert b_i \\rVert + 2 u \\max_i |\\beta_i| + (\\log_2 N + 8) u,

(probabilistic rounding analysis, Higham & Mary 2019, with ``lambda = 5``; ``u = 2^-24``
for float32, ``u_in = 2^-11`` for TF32 inputs) has its mean over the rows of the block
below ``tolerance`` (default 1e-3 nats).  ``E_j`` bounds the error of every entry of row
``j`` relative to the row offset, hence of its log-sum-exp, hence (averaged over rows) of
the estimate.  Blocks whose bound is larger, e.g. activations of magnitude 100 with noise
1e-2, are computed in float64 as before.  Float32 blocks are returned *shifted*:
``L[j, i] = blk[j, i] + off[j]`` with the large row and constant terms kept in the float64
offset, so the float32 values stay O(1) to O(100) nats.  ``"auto"`` only switches to
float32 when the work is large enough for it to matter (``N * M * w >= AUTO_MIN_WORK``
multiply-adds per draw); small problems stay bit-identical to float64.

Memory is ``O(chunk * N)`` (``O(chunk * N * C)`` for ``C``-component mixtures);
the full ``N x N`` matrix is never held, and never ``N x N x d``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import distributions as td

__all__ = [
    "GaussianMixture",
    "as_gaussian_mixture",
    "LogDensityKernel",
    "DeterministicLayerError",
    "DETERMINISTIC_MESSAGE",
    "first_tensor",
    "is_delta",
    "PRECISIONS",
    "DEFAULT_TOLERANCE",
]

_LOG_2PI = math.log(2.0 * math.pi)
#: default budget (bytes) for one chunk of the pairwise matrix or its intermediates
DEFAULT_CHUNK_BYTES = 64 * 2**20
#: accepted values of ``precision=``
PRECISIONS = ("auto", "float64", "float32")
#: default bound (nats) on the error float32 blocks may add to the estimate
DEFAULT_TOLERANCE = 1e-3
#: "auto" uses float32 only from this many multiply-adds per draw (N * M * w)
AUTO_MIN_WORK = 2**24
_LAMBDA = 5.0  # probabilistic rounding-error bound: lambda * sqrt(w) * u
_U32 = 2.0**-24  # unit roundoff of float32
_UTF32 = 2.0**-11  # unit roundoff of TF32 inputs (10-bit mantissa)


class DeterministicLayerError(ValueError):
    """Raised when a conditional has no density (zero noise / point mass)."""


DETERMINISTIC_MESSAGE = (
    "the conditional p(t | s) has no density (a point mass: zero noise scale or a Delta "
    "distribution). For a deterministic map of a continuous input the mutual information "
    "is infinite, so any finite number would be an artefact of binning or k. Make the layer "
    "a stochastic channel: inject noise (T = f(S) + sigma * Z with sigma > 0) or use Bayesian "
    "weights with a posterior and weights='marginal'."
)


@dataclass
class GaussianMixture:
    """A conditional ``p(t | s_i) = sum_c w_ic N(t; mu_ic, diag(s_ic^2))`` in float64.

    Attributes
    ----------
    loc : Tensor, shape (N, C, d)
    scale : Tensor, shape (N, C, d)
        Possibly an expanded (stride-0) view.
    logw : Tensor, shape (N, C)
        Normalised log mixture weights (zeros when ``C == 1``).
    structure : {"shared", "iso", "diag"}
        ``"shared"``: one scale vector ``(d,)`` for every source and component;
        ``"iso"``: scale constant over dimensions but varying over sources;
        ``"diag"``: general per-source diagonal scales.
    """

    loc: torch.Tensor
    scale: torch.Tensor
    logw: torch.Tensor
    structure: str

    @property
    def n(self) -> int:
        return self.loc.shape[0]

    @property
    def n_components(self) -> int:
        return self.loc.shape[1]

    @property
    def dim(self) -> int:
        return self.loc.shape[2]

    def sample(self, n_draws: int, generator: torch.Generator) -> torch.Tensor:
        """Draw ``n_draws`` samples per source with ``generator``.

        Returns
        -------
        Tensor, shape (n_draws, N, d), float64
        """
        return self.sample_with_components(n_draws, generator)[0]

    def sample_with_components(
        self, n_draws: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``(n_draws, N, d)`` and the component each came from ``(n_draws, N)``."""
        n, c, d = self.loc.shape
        dev = self.loc.device
        if c == 1:
            comp = torch.zeros(n_draws, n, dtype=torch.long, device=dev)
        else:
            probs = self.logw.exp().expand(n_draws, n, c).reshape(n_draws * n, c)
            comp = torch.multinomial(probs, 1, generator=generator).view(n_draws, n)
        idx = torch.arange(n, device=dev).expand(n_draws, n)
        loc = self.loc[idx, comp]
        scale = self.scale[idx, comp]
        eps = torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=dev)
        return loc + scale * eps, comp


def is_delta(d: td.Distribution) -> bool:
    """Whether ``d`` is a point mass: a ``Delta`` (Pyro's), or ``Independent`` of one.

    The one test of the package for a deterministic site (no density).
    """
    return type(d).__name__ == "Delta" or (
        isinstance(d, td.Independent) and type(d.base_dist).__name__ == "Delta"
    )


def _unwrap_normal(d: td.Distribution) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(loc, scale) with a trailing event dim for Normal / Independent(Normal, 1)."""
    if is_delta(d):
        return None
    if isinstance(d, td.Normal) and len(d.event_shape) == 0:
        return d.loc.unsqueeze(-1), d.scale.unsqueeze(-1)
    if (
        isinstance(d, td.Independent)
        and d.reinterpreted_batch_ndims == 1
        and isinstance(d.base_dist, td.Normal)
    ):
        return d.base_dist.loc, d.base_dist.scale
    return None


def as_gaussian_mixture(cond: td.Distribution) -> GaussianMixture | None:
    """Recognise the Gaussian families of the fast path; ``None`` for anything else.

    Parameters
    ----------
    cond : Distribution
        Batch shape ``(N,)``; event shape ``()`` or ``(d,)``.

    Returns
    -------
    GaussianMixture or None
    """
    if isinstance(cond, td.MixtureSameFamily):
        comp = _unwrap_normal(cond.component_distribution)
        if comp is None:
            return None
        loc, scale = comp  # (N, C, d)
        logw = torch.log_softmax(cond.mixture_distribution.logits.to(torch.float64), dim=-1)
    else:
        comp = _unwrap_normal(cond)
        if comp is None:
            return None
        loc, scale = comp[0].unsqueeze(1), comp[1].unsqueeze(1)  # (N, 1, d)
        logw = torch.zeros(loc.shape[:2], dtype=torch.float64, device=loc.device)
    if loc.dim() != 3:
        return None
    loc = loc.to(torch.float64)
    scale = torch.broadcast_to(scale.to(torch.float64), loc.shape)
    # checks on the distinct values only: a broadcast (stride-0) scale, e.g. one sigma for
    # every source, is looked at once instead of N * d times
    compact = scale[tuple(slice(0, 1) if st == 0 else slice(None) for st in scale.stride())]
    _check_finite(loc, "location")
    _check_finite(compact, "scale")
    _check_mixture_weights(cond)
    if (compact < 0).any():
        raise ValueError(
            "the conditional's scale has negative values (smallest "
            f"{float(compact.min()):.3g}): a standard deviation must be positive"
        )
    if (compact == 0).any():
        raise DeterministicLayerError(DETERMINISTIC_MESSAGE)
    flat = compact.reshape(-1, compact.shape[-1])
    if bool((flat == flat[:1]).all()):
        structure = "shared"
    elif bool((scale == scale[..., :1]).all()):
        structure = "iso"
    else:
        structure = "diag"
    return GaussianMixture(loc, scale, logw.expand(loc.shape[:2]), structure)


def first_tensor(obj: object, floating: bool = False, _depth: int = 0) -> torch.Tensor | None:
    """First (floating) tensor among a distribution's parameters, descending into
    wrapped distributions (``Independent.base_dist``, mixture components, ...)."""
    if _depth > 8:
        return None
    values = list(vars(obj).values())
    for v in values:
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or not floating):
            return v
    for v in values:
        if isinstance(v, td.Distribution):
            t = first_tensor(v, floating, _depth + 1)
            if t is not None:
                return t
    return None


def _check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"the conditional's {what} contains NaN or inf values")


def _check_mixture_weights(cond: td.Distribution) -> None:
    """NaN (or +inf) mixture weights of a ``MixtureSameFamily``: a clear ValueError
    instead of torch's 'probability tensor contains either inf, nan or element < 0'."""
    if not isinstance(cond, td.MixtureSameFamily):
        return
    mix = cond.mixture_distribution
    # read what the Categorical was built from (accessing the other computes it lazily)
    w = mix.__dict__.get("logits", mix.__dict__.get("probs"))
    if w is None:
        w = mix.logits
    w = w.detach()
    is_probs = "logits" not in mix.__dict__
    bad = torch.isnan(w) | torch.isposinf(w)
    if is_probs:
        bad = bad | (w < 0)
    if bool(bad.any()) or bool(torch.isnan(mix.logits.detach()).any()):
        raise ValueError(
            "the conditional's mixture weights contain NaN, inf or negative values "
            f"({int(bad.sum())} of {w.numel()} entries); mixture weights must be finite "
            "and non-negative with a positive sum for every source"
        )


class LogDensityKernel:
    """Row-chunked evaluation of ``L[j, i] = log p(t_j | s_i)``.

    Parameters
    ----------
    cond : Distribution
        Batch shape ``(N,)``, event shape ``()`` or ``(d,)``.
    chunk_size : int, optional
        Rows of ``L`` per block; chosen from a 64 MiB budget when omitted.
    device : torch.device or str, optional
        Where the work runs (defaults to the conditional's device).
    precision : {"auto", "float64", "float32"}
        Arithmetic of the cross-term product in :meth:`shifted_block` (Gaussian path):
        ``"auto"`` uses float32 (TF32 on CUDA) per block where the rounding-error bound
        is below ``tolerance`` and the problem is large enough to gain, float64
        elsewhere; ``"float32"`` forces float32; ``"float64"`` never uses it.
    tolerance : float, default 1e-3
        Bound (nats) on the mean row error a float32 block may carry.
    """

    def __init__(
        self,
        cond: td.Distribution,
        *,
        chunk_size: int | None = None,
        device: torch.device | str | None = None,
        precision: str = "auto",
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if (
            isinstance(tolerance, bool)
            or not isinstance(tolerance, (int, float))
            or not tolerance > 0
            or not math.isfinite(tolerance)
        ):
            raise ValueError(f"tolerance must be a positive finite number, got {tolerance!r}")
        self.precision = precision
        self.tolerance = float(tolerance)
        #: blocks computed per precision, and the summed row bounds of the float32 ones
        self.counts = {"float64": 0, "float32": 0, "tf32": 0}
        self.bound_sum = 0.0
        self.rows_done = 0
        self.cond = cond
        self.n = int(cond.batch_shape[0])
        self.gauss = as_gaussian_mixture(cond)
        self.device = torch.device(device) if device is not None else self._cond_device()
        if self.gauss is not None:
            g = self.gauss
            self.gauss = GaussianMixture(
                g.loc.to(self.device), g.scale.to(self.device), g.logw.to(self.device), g.structure
            )
            self._prepare_gaussian()
        elif is_delta(cond):
            raise DeterministicLayerError(DETERMINISTIC_MESSAGE)
        else:
            _check_mixture_weights(cond)
        self.event_numel = max(1, math.prod(cond.event_shape))
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = chunk_size or self._default_chunk()

    # ------------------------------------------------------------------ set-up
    def _cond_device(self) -> torch.device:
        t = first_tensor(self.cond)
        return t.device if t is not None else torch.device("cpu")

    @property
    def is_gaussian(self) -> bool:
        return self.gauss is not None

    def _default_chunk(self) -> int:
        if self.gauss is not None:
            cols = self.n * self.gauss.n_components
            width = 2 * self.gauss.dim if self.gauss.structure == "diag" else self.gauss.dim
            per_row = 8 * (2 * cols + width)
        else:
            per_row = 8 * self.n * (2 * self.event_numel + 2)
        return int(max(16, min(4096, DEFAULT_CHUNK_BYTES // per_row)))

    def _prepare_gaussian(self) -> None:
        # L[j, i] = bias_i + <row features of t_j, column features of s_i> + row term,
        # with -1/2 folded into the factors so one addmm gives the whole block
        g = self.gauss
        n, c, d = g.loc.shape
        mu = g.loc.reshape(n * c, d)
        sc = g.scale.reshape(n * c, d)
        self._centre = mu.mean(0)
        mu_p = mu - self._centre
        if g.structure == "shared":
            s = sc[0]
            self._inv_s = 1.0 / s
            mu_p = mu_p * self._inv_s  # unit scale
            self._cols = mu_p
            quad = (mu_p * mu_p).sum(1)
            self._col_prec = None
            log_det = torch.log(s).sum().expand(n * c)
        elif g.structure == "iso":
            s = sc[:, 0]
            prec = 1.0 / (s * s)
            self._cols = mu_p * prec[:, None]  # mu' / s^2
            quad = (mu_p * mu_p).sum(1) * prec
            self._col_prec = prec  # row term: -|t'|^2 / (2 s_i^2)
            log_det = d * torch.log(s)
        else:
            prec = 1.0 / (sc * sc)
            self._cols = torch.cat([-0.5 * prec, mu_p * prec], dim=1)  # (M, 2d)
            quad = (mu_p * mu_p * prec).sum(1)
            self._col_prec = None
            log_det = torch.log(sc).sum(1)
        self._log_det = log_det.reshape(n, c)
        log_norm = g.logw.reshape(n * c) - log_det - 0.5 * d * _LOG_2PI
        self._bias = (log_norm - 0.5 * quad).contiguous()
        self._colsT64: torch.Tensor | None = None  # built on first float64 block
        self._width = self._cols.shape[1]
        work = n * n * c * self._width
        self._lowp = self.precision == "float32" or (
            self.precision == "auto" and work >= AUTO_MIN_WORK
        )
        if self._lowp:
            # float32 copies; the largest bias becomes the float64 offset so that the
            # float32 block holds O(1) values relative to it
            self._c0 = float(self._bias.max())
            bias_rel = self._bias - self._c0
            self._bias32 = bias_rel.to(torch.float32)
            self._colsT32 = self._cols.T.to(torch.float32).contiguous()
            self._col_norm = float(self._cols.norm(dim=1).max())
            self._bias_abs = float(bias_rel.abs().max())
            if self._col_prec is not None:
                self._col_prec32 = self._col_prec.to(torch.float32)
                self._prec_max = float(self._col_prec.max())
            # exp, max-subtraction and the row sum in float32 (cascade summation)
            self._fixed_err = (math.log2(max(2, n * c)) + 8.0) * _U32

    @property
    def _colsT(self) -> torch.Tensor:
        if self._colsT64 is None:
            self._colsT64 = self._cols.T.contiguous()
        return self._colsT64

    # ------------------------------------------------------------------ samples
    def sample(self, n_draws: int, generator: torch.Generator) -> torch.Tensor:
        """``n_draws`` samples per source, shape ``(n_draws, N, *event)``.

        The Gaussian path draws with ``generator`` directly; other families use
        ``cond.sample`` inside :func:`torch.random.fork_rng`, seeded from
        ``generator``, so the caller's global RNG state is untouched.
        """
        if self.gauss is not None:
            t, self.components = self.gauss.sample_with_components(n_draws, generator)
            if len(self.cond.event_shape) == 0:
                t = t.squeeze(-1)
            return t
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            t = self.cond.sample((n_draws,))
        t = t.to(self.device)
        if not bool(torch.isfinite(t).all()):
            raise ValueError("samples drawn from the conditional contain NaN or inf values")
        return t

    # ------------------------------------------------------------------ blocks
    def diagonal(self, t: torch.Tensor) -> torch.Tensor:
        """``log p(t_rj | s_j)`` for samples ``t`` (R, N, *event) -> (R, N) float64."""
        if self.gauss is not None:
            return torch.logsumexp(self._diag_components(t) + self.gauss.logw, dim=-1)
        lp = self.cond.log_prob(t.to(self._cond_dtype())).to(torch.float64)
        if bool(torch.isposinf(lp).any()):
            raise DeterministicLayerError(DETERMINISTIC_MESSAGE)
        if not bool(torch.isfinite(lp).all()):
            raise ValueError("log_prob of the conditional at its own samples is NaN or -inf")
        return lp

    def _diag_components(self, t: torch.Tensor) -> torch.Tensor:
        g = self.gauss
        tt = t.to(torch.float64).reshape(t.shape[0], self.n, 1, g.dim)
        z = (tt - g.loc.unsqueeze(0)) / g.scale.unsqueeze(0)  # (R, N, C, d)
        return -0.5 * (z * z).sum(-1) - self._log_det - 0.5 * g.dim * _LOG_2PI

    def diagonal_excluding_group(self, t: torch.Tensor, group: int) -> torch.Tensor:
        """``log p(t_rj | s_j)`` with the component group that drew ``t_rj`` left out.

        Components ``c`` are grouped as ``c // group`` (one group per propagated
        path).  The remaining groups are renormalised, so this is the log-density
        under the mixture of the *other* paths, which is independent of the draw.
        Needs the Gaussian path and a preceding :meth:`sample`.

        Returns
        -------
        Tensor, shape (R, N), float64
        """
        g = self.gauss
        if g is None or g.n_components % group or g.n_components // group < 2:
            raise ValueError("group exclusion needs a Gaussian mixture of at least two groups")
        own = (self.components // group).unsqueeze(-1)  # (R, N, 1)
        cgroup = torch.arange(g.n_components, device=own.device) // group  # (C,)
        mask = cgroup == own  # (R, N, C)
        logw = g.logw.unsqueeze(0).expand(mask.shape)
        kept = torch.where(mask, torch.full_like(logw, -math.inf), logw)
        comp = self._diag_components(t) + kept
        return torch.logsumexp(comp, dim=-1) - torch.logsumexp(kept, dim=-1)

    def _cond_dtype(self) -> torch.dtype:
        t = first_tensor(self.cond, floating=True)
        return t.dtype if t is not None else torch.get_default_dtype()

    def block(self, rows: torch.Tensor) -> torch.Tensor:
        """``L[j, i]`` for a block of samples.

        Parameters
        ----------
        rows : Tensor, shape (B, *event)

        Returns
        -------
        Tensor, shape (B, N), float64
        """
        if self.gauss is not None:
            return self._gauss_block(rows)
        x = rows.to(self._cond_dtype()).unsqueeze(1)  # (B, 1, *event)
        return self.cond.log_prob(x).to(torch.float64)

    def _gauss_block(self, rows: torch.Tensor) -> torch.Tensor:
        g = self.gauss
        t = rows.to(torch.float64).reshape(rows.shape[0], g.dim) - self._centre
        if g.structure == "shared":
            t = t * self._inv_s
            logp = torch.addmm(self._bias, t, self._colsT)
            logp.add_((t * t).sum(1, keepdim=True), alpha=-0.5)
        elif g.structure == "iso":
            logp = torch.addmm(self._bias, t, self._colsT)
            logp.addr_((t * t).sum(1), self._col_prec, alpha=-0.5)
        else:
            logp = torch.addmm(self._bias, torch.cat([t * t, t], dim=1), self._colsT)
        if g.n_components > 1:
            logp = torch.logsumexp(logp.view(rows.shape[0], self.n, g.n_components), dim=-1)
        return logp

    def row_bounds(self, rows: torch.Tensor, tf32: bool = False) -> torch.Tensor:
        """Bound (nats) on the float32 error of each row of :meth:`shifted_block`.

        ``E_j`` (see the module docstring) bounds ``|blk32[j, i] - (L[j, i] - off[j])|``
        for every ``i``, and so the error of row ``j``'s log-sum-exp.

        Returns
        -------
        Tensor, shape (B,), float64
        """
        if self.gauss is None or not self._lowp:
            raise ValueError("row bounds need a Gaussian kernel with a float32 path")
        feats, tt = self._row_features(rows)
        return self._bounds(feats, tt, tf32)

    def _bounds(self, feats: torch.Tensor, tt: torch.Tensor, tf32: bool) -> torch.Tensor:
        u_in = _UTF32 if tf32 else _U32
        coef = _LAMBDA * (math.sqrt(self._width) * _U32 + math.sqrt(2.0) * u_in)
        e = (coef * self._col_norm) * feats.norm(dim=1)
        e.add_(2 * _U32 * self._bias_abs + self._fixed_err)
        if self.gauss.structure == "iso":
            e.add_((tt * tt).sum(1), alpha=_U32 * self._prec_max)
        return e

    def _row_features(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gauss
        t = rows.to(torch.float64).reshape(rows.shape[0], g.dim) - self._centre
        if g.structure == "shared":
            a = t.mul_(self._inv_s)
            return a, a
        if g.structure == "iso":
            return t, t
        return torch.cat([t * t, t], dim=1), t

    def shifted_block(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``L`` for a block of samples as ``(blk, off)`` with ``L[j, i] = blk[j, i] + off[j]``.

        ``blk`` is float32 when the block qualifies for the float32 path (see
        ``precision``), else the exact float64 block with ``off = 0``.  The counters
        ``counts`` and ``bound_sum`` record which path each block took.

        Parameters
        ----------
        rows : Tensor, shape (B, *event)

        Returns
        -------
        (Tensor (B, N) float32 or float64, Tensor (B,) float64)
        """
        b = rows.shape[0]
        if self.gauss is not None and self._lowp:
            g = self.gauss
            feats, tt = self._row_features(rows)
            tf32 = False
            if self.precision == "auto" and self.device.type == "cuda":
                bound = self._bounds(feats, tt, tf32=True)
                tf32 = float(bound.mean()) <= self.tolerance
            if not tf32:
                bound = self._bounds(feats, tt, tf32=False)
            if self.precision == "float32" or float(bound.mean()) <= self.tolerance:
                blk = self._addmm32(feats.to(torch.float32), tf32)
                if g.structure == "iso":
                    blk.addr_((tt * tt).sum(1).to(torch.float32), self._col_prec32, alpha=-0.5)
                off = torch.full((b,), self._c0, dtype=torch.float64, device=self.device)
                if g.structure == "shared":
                    off.add_((feats * feats).sum(1), alpha=-0.5)
                if g.n_components > 1:
                    blk = torch.logsumexp(blk.view(b, self.n, g.n_components), dim=-1)
                self.counts["tf32" if tf32 else "float32"] += 1
                self.bound_sum += float(bound.sum())
                self.rows_done += b
                return blk, off
        self.counts["float64"] += 1
        self.rows_done += b
        return self.block(rows), torch.zeros(b, dtype=torch.float64, device=self.device)

    def _addmm32(self, a: torch.Tensor, tf32: bool) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.addmm(self._bias32, a, self._colsT32)
        flags = torch.backends.cuda.matmul
        old = flags.allow_tf32
        flags.allow_tf32 = tf32
        try:
            return torch.addmm(self._bias32, a, self._colsT32)
        finally:
            flags.allow_tf32 = old

    @property
    def mean_bound(self) -> float:
        """Mean over all rows done of the float32 error bound (0 for float64 rows)."""
        return self.bound_sum / self.rows_done if self.rows_done else 0.0

    def iter_shifted_blocks(
        self, t: torch.Tensor, diag: torch.Tensor
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(row_slice, src, blk, off)`` over all samples, ``L = blk + off[:, None]``.

        ``t`` has shape ``(R, N, *event)``; rows are flattened draw-major, so row
        ``r * N + j`` belongs to source ``j``.  Blocks come from :meth:`shifted_block`;
        the exact diagonal is written at ``(row, src)`` as ``diag - off`` in ``blk``'s
        dtype."""
        r = t.shape[0]
        flat = t.reshape(r * self.n, *t.shape[2:])
        dflat = diag.reshape(-1)
        total = r * self.n
        for start in range(0, total, self.chunk_size):
            stop = min(start + self.chunk_size, total)
            rows = torch.arange(start, stop, device=self.device)
            src = rows % self.n
            blk, off = self.shifted_block(flat[start:stop])
            dg = (dflat[start:stop] - off).to(blk.dtype)
            blk[torch.arange(stop - start, device=self.device), src] = dg
            yield slice(start, stop), src, blk, off
