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

Precision (Gaussian path).  With ``precision="auto"`` each block is computed in float32
(TF32 on CUDA where even that bound allows) when a rounding-error bound keeps its mean row
error under ``tolerance`` (default 1e-3 nats), in float64 otherwise (e.g. activations of
magnitude 100 with noise 1e-2).  A float32 entry is one product of augmented factors,

.. math::

    y_{ji} = \\langle [f_j, \\rho\\text{-term}, 1, -s_j], [b_i, P_i, \\beta_i, 1] \\rangle
           = L_{ji} - o_j - s_j,

with the row features ``f_j`` (``a_j = t'_j / s``, ``t'_j`` or ``[t'^2_j, t'_j]``), the
column factors ``b_i``, the bias ``beta_i`` relative to its maximum, the float64 row offset
``o_j`` and the row shift ``s_j`` (inner dimension ``K = w + 2``, ``+1`` for per-source
isotropic scales).  The shift is the exact diagonal ``L[j, j] - o_j`` rounded to float32,
known before the product, so the entries come out of the product already shifted: they
are exponentiated in place and summed per row (float32 cascade sum) with no row-maximum
pass; the own entry is zeroed (leave-one-out) and everything after the row sums is
float64 (``log sum_{i != j} exp L[j, i] = o_j + s_j + log sum_i e_ji``).  A row whose sum
overflows or falls under ``M * 2^-102`` (``M = N C`` entries; where float32 underflow could
cost more than ``u`` of the sum) is recomputed with its row maximum as the shift.  The
bound, for the entries within ``T = log M + 20`` nats of the row's log-sum-exp ``G_j``
(in the units of the product), is

.. math::

    E_j = \\lambda \\sqrt{K} u (\\lVert f_j \\rVert C + \\rho_j + |s_j| + \\hat\\beta_j)
          + \\lambda \\sqrt{2} u_{in} \\lVert f_j \\rVert C + 2 u_{in} (\\rho_j + \\hat\\beta_j)
          + (\\log_2 M + 9) u + e^{F_j - 20},

with ``C = max_i |b_i|``, ``rho_j = |t'_j|^2 max_i s_i^-2 / 2`` (isotropic scales, else 0)
and ``hat beta_j = min(max_i |beta_i|, |f_j| C + rho_j + |s_j| + |G_j| + T)``, the largest
bias an entry within ``T`` of ``G_j`` can have.  The first three terms are the
probabilistic rounding bound of the product (Higham & Mary 2019, ``lambda = 5``,
``u = 2^-24``, ``u_in = u`` or ``2^-11`` for TF32 inputs, plus ``u_in |s_j|`` for TF32),
``(log2 M + 9) u`` covers float32 exp, the cascade row sum and flushed entries, and
``e^{F_j - 20}`` (``F_j``: the same bound with the largest bias) the share of the entries
further below.  ``E_j`` bounds the error of every entry that matters in row ``j``, hence of
its log-sum-exp, hence (averaged over rows) of the estimate.  The block's precision is
chosen with ``G_j = 0`` and checked again after the product with the row sums; a block
that fails the check is recomputed in float64.  ``"auto"`` only switches to float32 when
the work is large enough for it to matter (``N * M * w >= AUTO_MIN_WORK`` multiply-adds
per draw); small problems stay in float64.

Repair (callers that use only the row sums, :meth:`LogDensityKernel.iter_exp_blocks` with
``repair``).  Where the sources are far apart against the noise (a value at ``log N``)
``|f_j| C`` is large and ``E_j`` exceeds the tolerance although each row's sum rests on a
few entries.  A block is then still computed in float32, and in each row the entries
within ``log(8 / tolerance) + 3 E_j + 2`` nats of its largest are recomputed exactly in
float64; the rest, whose float32 sum is known, can move the row's log-sum by at most
``r / (1 - r)`` with ``r`` their share times ``e^{E_j} - 1``
(:meth:`LogDensityKernel._repair`).  A probe of the first block's first rows decides once
whether this pays (at most 1/256 of the entries redone), and whether the diagonal shift
would underflow every row (then the row maximum is used from the start).  Exponents are
clamped at -87 before ``exp`` (float32's smallest normal within a factor 1.4): an
underflowing ``exp`` takes a slow path on the CPU, and the clamped entries stay within the
flushed-entry allowance ``(log2 M + 9) u`` of the bound.

Memory is ``O(chunk * N)`` (``O(chunk * N * C)`` for ``C``-component mixtures);
the full ``N x N`` matrix is never held, and never ``N x N x d``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import distributions as td

from stochmi.core.rng import draw_seed, rng_context

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
_STEP_ELEMS = 2**23  # elements per step of the O(N d) passes (64 MiB of float64)
_PREFETCH = True  # draw the normals on a second thread during the set-up (CPU)
_EXACT_DIST = "donot_use_mm_for_euclid_dist"  # torch.cdist from differences
_WINDOW_MARGIN = 20.0  # the error bound covers entries within log M + 20 of a row's lse
_LAMBDA = 5.0  # probabilistic rounding-error bound: lambda * sqrt(w) * u
_U32 = 2.0**-24  # unit roundoff of float32
_UTF32 = 2.0**-11  # unit roundoff of TF32 inputs (10-bit mantissa)
# exponents are clamped here before exp: e^-87 is float32's smallest normal within a
# factor 1.4, where an underflowing exp takes a slow path (12-15x slower on CPU); such
# an entry then adds at most 1.4 * 2^-126 where it would have been flushed to 0, within
# the flushed-entry allowance of the bound
_EXP_FLOOR = -87.0
_REPAIR_SHARE = 256  # a float32 block is repaired only if at most 1/256 of it is redone
_PROBE_ROWS = 32  # rows of the first block counted before a repair is tried


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
    loc_sum : Tensor, shape (d,), optional
        Sum of ``loc`` over sources and components (the finiteness check's by-product).
    """

    loc: torch.Tensor
    scale: torch.Tensor
    logw: torch.Tensor
    structure: str
    loc_sum: torch.Tensor | None = None

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
        self, n_draws: int, generator: torch.Generator, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``(n_draws, N, d)`` and the component each came from ``(n_draws, N)``.

        ``eps`` (one component only): the standard normals ``randn((n_draws, N, d))``
        already drawn with ``generator`` (see :func:`draw_normals`), overwritten."""
        n, c, d = self.loc.shape
        dev = self.loc.device
        if c == 1:
            # loc + scale * eps without gathering (N x d copies of loc and of a broadcast
            # scale): the same normals and, in place, the same rounding (an addcmul would
            # fuse into an FMA and change the last bit)
            comp = torch.zeros(n_draws, n, dtype=torch.long, device=dev)
            if eps is None:
                eps = draw_normals(self, n_draws, generator)
            loc, scale = self.loc[:, 0], self.scale[:, 0]
            step = max(1, _STEP_ELEMS // d)  # both passes on one cache-sized piece
            for r in range(n_draws):
                for s0 in range(0, n, step):
                    s1 = min(s0 + step, n)
                    eps[r, s0:s1].mul_(scale[s0:s1]).add_(loc[s0:s1])
            return eps, comp
        else:
            probs = self.logw.exp().expand(n_draws, n, c).reshape(n_draws * n, c)
            comp = torch.multinomial(probs, 1, generator=generator).view(n_draws, n)
        idx = torch.arange(n, device=dev).expand(n_draws, n)
        loc = self.loc[idx, comp]
        scale = self.scale[idx, comp]
        eps = torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=dev)
        return loc + scale * eps, comp


def draw_normals(g: GaussianMixture, n_draws: int, generator: torch.Generator) -> torch.Tensor:
    """The standard normals of :meth:`GaussianMixture.sample_with_components` (one
    component): ``randn((n_draws, N, d))`` in the locations' dtype and device."""
    n, _, d = g.loc.shape
    return torch.randn(
        (n_draws, n, d), generator=generator, dtype=g.loc.dtype, device=g.loc.device
    )


class _Prefetch:
    """:func:`draw_normals` on a background thread.

    torch's CPU normal generator is serial (one core, about a quarter of a float32
    ``N x d x N`` product at N = 10,000, d = 1,024 on 2 cores); drawn while the kernel
    sets up its column factors, it uses the other core.  Same generator, same calls,
    same numbers; the generator must not be used elsewhere until :meth:`result`."""

    def __init__(self, g: GaussianMixture, n_draws: int, generator: torch.Generator) -> None:
        import threading

        self.n_draws, self.generator = n_draws, generator
        self._out: list = []

        def run() -> None:
            try:
                self._out.append(draw_normals(g, n_draws, generator))
            except BaseException as exc:  # re-raised in result()
                self._out.append(exc)

        self._thread = threading.Thread(target=run, name="stochmi-draws", daemon=True)
        self._thread.start()

    def result(self) -> torch.Tensor:
        self._thread.join()
        out = self._out[0]
        if isinstance(out, BaseException):
            raise out
        return out


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
    # a finite column sum means finite locations (NaN and inf propagate); kept for the
    # kernel's centring (one pass over loc for both)
    loc_sum = loc.reshape(-1, loc.shape[-1]).sum(0)
    if not bool(torch.isfinite(loc_sum).all()):
        _check_finite(loc, "location")  # raises, unless a sum of finite values overflowed
        loc_sum = None
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
    return GaussianMixture(loc, scale, logw.expand(loc.shape[:2]), structure, loc_sum)


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
    # a finite sum means finite entries (NaN and inf propagate); one read pass instead of
    # isfinite's several; only an overflowing sum of finite entries takes the full check
    if x.is_floating_point() and bool(torch.isfinite(x.sum())):
        return
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
        Arithmetic of the blocks of :meth:`iter_exp_blocks` and :meth:`shifted_block`
        (Gaussian path):
        ``"auto"`` uses float32 (TF32 on CUDA) per block where the rounding-error bound
        is below ``tolerance`` and the problem is large enough to gain, float64
        elsewhere; ``"float32"`` forces float32; ``"float64"`` never uses it.
    tolerance : float, default 1e-3
        Bound (nats) on the mean row error a float32 block may carry.
    prefetch : (int, torch.Generator), optional
        ``(n_draws, generator)`` of the coming :meth:`sample` call: the standard normals
        are then drawn on a second thread while the set-up runs (one-component Gaussian
        conditionals on the CPU; the same numbers, from the same generator, which must
        not be used elsewhere until :meth:`sample`).
    """

    def __init__(
        self,
        cond: td.Distribution,
        *,
        chunk_size: int | None = None,
        device: torch.device | str | None = None,
        precision: str = "auto",
        tolerance: float = DEFAULT_TOLERANCE,
        prefetch: tuple[int, torch.Generator] | None = None,
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
        #: rows whose speculative shift (see :meth:`iter_exp_blocks`) had to be redone
        self.rescued_rows = 0
        #: rows of float32 blocks whose entries near the row maximum were redone in
        #: float64 (:meth:`_repair`)
        self.repaired_rows = 0
        #: whether float32 blocks over the bound are repaired: None until the probe of
        #: :meth:`_few` decides, False once a repair does not pay or does not pass
        self._repair_ok: bool | None = None
        self.cond = cond
        self.n = int(cond.batch_shape[0])
        self._scratch_buf: torch.Tensor | None = None
        self.gauss = as_gaussian_mixture(cond)
        self.device = torch.device(device) if device is not None else self._cond_device()
        if self.gauss is not None:
            g = self.gauss
            self.gauss = GaussianMixture(
                g.loc.to(self.device),
                g.scale.to(self.device),
                g.logw.to(self.device),
                g.structure,
                g.loc_sum.to(self.device) if g.loc_sum is not None else None,
            )
            self._prefetch: _Prefetch | None = None
            if (
                prefetch is not None
                and _PREFETCH
                and self.gauss.n_components == 1
                and self.device.type == "cpu"
            ):
                self._prefetch = _Prefetch(self.gauss, *prefetch)
            try:
                self._prepare_gaussian()
            except BaseException:
                if self._prefetch is not None:
                    self._prefetch._thread.join()
                raise
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

    def _scratch(self, rows: int, width: int) -> torch.Tensor:
        """A float64 ``(rows, width)`` work buffer shared by the O(N d) passes: one
        allocation instead of a fresh one (page faults) in every pass."""
        need = rows * width
        buf = self._scratch_buf
        if buf is None or buf.numel() < need:
            buf = self._scratch_buf = torch.empty(need, dtype=torch.float64, device=self.device)
        return buf[:need].view(rows, width)

    @property
    def is_gaussian(self) -> bool:
        return self.gauss is not None

    def _default_chunk(self) -> int:
        if self.gauss is not None:
            cols = self.n * self.gauss.n_components
            if self._lowp:
                # one float32 block, the float64 row features and their float32 copy;
                # float64 blocks are computed in steps of `_rows64` rows within a chunk
                per_row = 4 * cols + 12 * self._width + 16
            else:
                per_row = 8 * (2 * cols + self._width)
        else:
            per_row = 8 * self.n * (2 * self.event_numel + 2)
        return int(max(16, min(4096, DEFAULT_CHUNK_BYTES // per_row)))

    @property
    def _rows64(self) -> int:
        """Rows per step of a float64 block (the float64 memory budget)."""
        if self.gauss is None:
            return self.chunk_size
        per_row = 8 * (2 * self.n * self.gauss.n_components + self._width)
        return int(max(1, min(self.chunk_size, max(16, DEFAULT_CHUNK_BYTES // per_row))))

    def _prepare_gaussian(self) -> None:
        # L[j, i] = bias_i + <row features of t_j, column features of s_i> + row term,
        # with -1/2 folded into the factors so one addmm gives the whole block
        g = self.gauss
        n, c, d = g.loc.shape
        m = n * c
        mu = g.loc.reshape(m, d)
        sc = g.scale.reshape(m, d)
        self._centre = g.loc_sum / m if g.loc_sum is not None else mu.mean(0)
        self._col_prec = None
        self._sigma: float | None = None  # one scale for every source and dimension
        if g.structure == "shared":
            s = sc[0]
            self._inv_s = 1.0 / s
            if bool((s == s[0]).all()):
                self._sigma = float(s[0])
            self._centre_s = -self._centre * self._inv_s
            log_det = torch.log(s).sum().expand(m)
        elif g.structure == "iso":
            s = sc[:, 0]
            self._col_prec = 1.0 / (s * s)  # row term: -|t'|^2 / (2 s_i^2)
            log_det = d * torch.log(s)
        else:
            log_det = torch.log(sc).sum(1)
        self._width = 2 * d if g.structure == "diag" else d
        self._log_det = log_det.reshape(n, c)
        work = n * n * c * self._width
        self._lowp = self.precision == "float32" or (
            self.precision == "auto" and work >= AUTO_MIN_WORK
        )
        self._cols64: torch.Tensor | None = None  # float64 column factors (M, w)
        self._colsT64: torch.Tensor | None = None  # built on first float64 block
        quad = torch.empty(m, dtype=torch.float64, device=self.device)
        if not self._lowp:
            self._cols64 = self._col_features(0, m, quad)
        else:
            # float32 column factors, augmented so that one product gives the whole entry
            # relative to the float64 row offset, shift included (see _aug_rows):
            # [cols_i, (prec_i), bias_i - c0, 1]; built in row steps (no float64 copy)
            w = self._width
            iso = g.structure == "iso"
            self._k_aug = w + 2 + int(iso)
            b32 = torch.empty(m, self._k_aug, dtype=torch.float32, device=self.device)
            col_sq = torch.empty(m, dtype=torch.float64, device=self.device)
            step = max(1, _STEP_ELEMS // w)
            for s0 in range(0, m, step):
                s1 = min(s0 + step, m)
                cols = self._col_features(s0, s1, quad[s0:s1], scratch=True)
                b32[s0:s1, :w] = cols
                col_sq[s0:s1] = quad[s0:s1] if g.structure == "shared" else _sq_norms(cols)
            if iso:
                b32[:, w] = self._col_prec
                self._prec_max = float(self._col_prec.max())
        log_norm = g.logw.reshape(m) - log_det - 0.5 * d * _LOG_2PI
        self._bias = (log_norm - 0.5 * quad).contiguous()
        self._speculate = True
        if self._lowp:
            # c0, the largest bias, keeps the float32 values O(1)
            self._c0 = float(self._bias.max())
            bias_rel = self._bias - self._c0
            b32[:, -2] = bias_rel
            b32[:, -1] = 1.0
            self._cols32 = b32
            self._col_norm = math.sqrt(float(col_sq.max()))
            self._bias_abs = float(bias_rel.abs().max())
            # exp (relative error within 2u), the float32 cascade row sum (log2(M) u) and
            # entries flushed to zero (at most u of a row sum above _underflow_floor)
            self._fixed_err = (math.log2(max(2, m)) + 9.0) * _U32
            self._underflow_floor = m * 2.0**-102

    def _col_features(
        self, s0: int, s1: int, quad: torch.Tensor, scratch: bool = False
    ) -> torch.Tensor:
        """Float64 column factors of sources ``s0:s1`` (flattened components); writes
        ``sum_d mu'^2 / s^2`` into ``quad``.  With ``scratch`` the result may live in
        the work buffer (valid until its next use)."""
        g = self.gauss
        d = g.dim
        mu = g.loc.reshape(-1, d)[s0:s1]
        if scratch and self._sigma is not None:
            # one scale: |mu - c| from exact differences in one fused pass; the factors
            # only feed the float32 product, so one FMA pass (error far below float32)
            dist = torch.cdist(mu, self._centre[None], compute_mode=_EXACT_DIST).view(-1)
            dist.div_(self._sigma)
            torch.mul(dist, dist, out=quad)
            return torch.addcmul(self._centre_s, mu, self._inv_s, out=self._scratch(s1 - s0, d))
        if scratch:
            mu_p = torch.sub(mu, self._centre, out=self._scratch(s1 - s0, d))
        else:
            mu_p = mu - self._centre
        if g.structure == "shared":
            cols = mu_p.mul_(self._inv_s)  # unit scale
            quad.copy_(_sq_norms(cols))
            return cols
        if g.structure == "iso":
            prec = self._col_prec[s0:s1]
            torch.mul(_sq_norms(mu_p), prec, out=quad)
            return mu_p.mul_(prec[:, None])  # mu' / s^2
        sc = g.scale.reshape(-1, d)[s0:s1]
        prec = 1.0 / (sc * sc)
        torch.sum(mu_p * mu_p * prec, 1, out=quad)
        return torch.cat([-0.5 * prec, mu_p.mul_(prec)], dim=1)  # (M, 2d)

    @property
    def _cols(self) -> torch.Tensor:
        if self._cols64 is None:
            m = self.gauss.loc.shape[0] * self.gauss.n_components
            quad = torch.empty(m, dtype=torch.float64, device=self.device)
            self._cols64 = self._col_features(0, m, quad)
        return self._cols64

    @property
    def _colsT(self) -> torch.Tensor:
        if self._colsT64 is None:
            self._colsT64 = self._cols.T.contiguous()
        return self._colsT64

    # ------------------------------------------------------------------ samples
    def sample(self, n_draws: int, generator: torch.Generator) -> torch.Tensor:
        """``n_draws`` samples per source, shape ``(n_draws, N, *event)``.

        The Gaussian path draws with ``generator`` directly; other families use
        ``cond.sample`` inside :func:`stochmi.core.rng.rng_context`, seeded from
        ``generator``, so the caller's global RNG state is untouched.
        """
        if self.gauss is not None:
            eps, pre = None, self._prefetch
            if pre is not None:  # joined whatever the request: it may share the generator
                self._prefetch = None
                drawn = pre.result()
                if pre.n_draws == n_draws and pre.generator is generator:
                    eps = drawn
            t, self.components = self.gauss.sample_with_components(n_draws, generator, eps)
            if len(self.cond.event_shape) == 0:
                t = t.squeeze(-1)
            return t
        with rng_context(draw_seed(generator), self.device):
            t = self.cond.sample((n_draws,))
        t = t.to(self.device)
        if not bool(torch.isfinite(t).all()):
            raise ValueError("samples drawn from the conditional contain NaN or inf values")
        return t

    # ------------------------------------------------------------------ blocks
    def diagonal(self, t: torch.Tensor) -> torch.Tensor:
        """``log p(t_rj | s_j)`` for samples ``t`` (R, N, *event) -> (R, N) float64."""
        if self.gauss is not None:
            if self.gauss.n_components == 1:
                return self._diag_single(t)
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
        z = (tt - g.loc.unsqueeze(0)).div_(g.scale.unsqueeze(0))  # (R, N, C, d)
        return -0.5 * z.mul_(z).sum(-1) - self._log_det - 0.5 * g.dim * _LOG_2PI

    def _diag_single(self, t: torch.Tensor) -> torch.Tensor:
        # _diag_components for one component, in cache-sized steps (same arithmetic;
        # a log-sum-exp over one entry is that entry)
        g = self.gauss
        r, n, d = t.shape[0], self.n, g.dim
        tt = t.to(torch.float64).reshape(r, n, d)
        loc, scale = g.loc[:, 0], g.scale[:, 0]
        out = torch.empty(r, n, dtype=torch.float64, device=tt.device)
        if self._sigma is not None or g.structure == "iso":
            # one scale per source: |t - mu| / s from exact differences, one fused pass
            sig = self._sigma if self._sigma is not None else scale[:, 0]
            for ri in range(r):
                torch.div(_row_dist(tt[ri], loc), sig, out=out[ri])
            out.mul_(out).mul_(-0.5).sub_(self._log_det[:, 0]).sub_(0.5 * d * _LOG_2PI)
            return out.add_(g.logw[:, 0])
        step = max(1, _STEP_ELEMS // d)
        for ri in range(r):
            for s0 in range(0, n, step):
                s1 = min(s0 + step, n)
                z = torch.sub(tt[ri, s0:s1], loc[s0:s1], out=self._scratch(s1 - s0, d))
                torch.linalg.vector_norm(z.div_(scale[s0:s1]), dim=1, out=out[ri, s0:s1])
        out.mul_(out).mul_(-0.5).sub_(self._log_det[:, 0]).sub_(0.5 * d * _LOG_2PI)
        return out.add_(g.logw[:, 0])

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

    def row_bounds(
        self,
        rows: torch.Tensor,
        tf32: bool = False,
        shift: torch.Tensor | None = None,
        window: float | None = None,
    ) -> torch.Tensor:
        """Bound (nats) on the float32 error of each row of :meth:`shifted_block`.

        ``E_j`` (see the module docstring) bounds ``|blk32[j, i] - (L[j, i] - off[j])|``
        for every entry within ``window`` nats (default ``log M + 20``) of the row's
        log-sum-exp, and so the error of that log-sum-exp.  With ``shift`` (float32 row
        shifts relative to the offset, as in :meth:`iter_exp_blocks`) the bound covers
        ``blk32[j, i] - shift[j]`` computed in the same product.

        Returns
        -------
        Tensor, shape (B,), float64
        """
        if self.gauss is None or not self._lowp:
            raise ValueError("row bounds need a Gaussian kernel with a float32 path")
        a, fnorm, _, rho = self._aug_rows(rows)
        s_abs: torch.Tensor | float = 0.0
        if shift is not None:
            a[:, -1] = -shift.to(torch.float32)
            s_abs = shift.to(torch.float64).abs()
        g = torch.logsumexp(self._mm32(a, tf32).to(torch.float64), dim=1)
        return self._bounds(fnorm, rho, s_abs, g.abs(), tf32, window)

    def _bounds(
        self,
        fnorm: torch.Tensor,
        rho: torch.Tensor | float,
        s_abs: torch.Tensor | float,
        g_abs: torch.Tensor | float,
        tf32: bool,
        window: float | None = None,
    ) -> torch.Tensor:
        """Per-row error bound of a float32 block (module docstring).

        ``g_abs``: ``|G_j|``, the row's log-sum-exp in the units of the product (``0``
        before the product: the a-priori bound).  ``rho``: the iso row term
        ``|t'_j|^2 max_i s_i^-2 / 2``; ``s_abs``: the shift's size."""
        u_in = _UTF32 if tf32 else _U32
        acc = _LAMBDA * math.sqrt(self._k_aug) * _U32
        fc = fnorm * self._col_norm  # >= |<f_j, b_i>|
        big = max(1.0, math.log(self._cols32.shape[0])) + _WINDOW_MARGIN
        t_win = big if window is None else float(window)
        # bias size on the entries within t_win of the row's log-sum-exp: there
        # y = <f, b> - rho_ij + bias_i - s_j with |y| <= |G| + t_win, so
        # |bias_i| <= |<f, b>| + rho + |s| + |G| + t_win (and never above its maximum)
        beta = torch.clamp(fc + rho + s_abs + g_abs + t_win, max=self._bias_abs)
        lin = fc + rho + s_abs
        e = acc * (lin + beta) + (_LAMBDA * math.sqrt(2.0) * u_in) * fc
        e += 2.0 * u_in * (rho + beta) + (u_in if tf32 else 0.0) * s_abs + self._fixed_err
        if window is None:
            # entries further below: at most M of them, each under exp(G - t_win) even
            # with its full error (bias at its maximum), so at most exp(far - margin) of
            # the row sum
            far = acc * (lin + self._bias_abs) + (_LAMBDA * math.sqrt(2.0) * u_in) * fc
            far += 2.0 * u_in * (rho + self._bias_abs) + (u_in if tf32 else 0.0) * s_abs
            e += math.exp(min(700.0, float(far.max())) - _WINDOW_MARGIN)
        return e

    def _aug_rows(
        self, rows: torch.Tensor, a: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """Augmented float32 row factors ``[f_j, (-|t'_j|^2 / 2), 1, 0]`` (the last column
        takes ``-shift``; written into ``a`` when given), the row norms ``|f_j|``, the
        float64 row offsets ``off_j`` (``L[j, i] = off_j + <a_j, b_i>``) and the iso
        row-term size ``rho_j``."""
        g = self.gauss
        b = rows.shape[0]
        rows = rows.to(torch.float64).reshape(b, g.dim)
        if a is None:
            a = torch.empty(b, self._k_aug, dtype=torch.float32, device=self.device)
        rho: torch.Tensor | float = 0.0
        # (no sqrt/log/exp of small vectors here: MKL's threaded vector math makes each
        # such call a parallel region, milliseconds on a loaded machine)
        work = self._scratch(b, g.dim)
        if g.structure == "shared":
            # (t - c) / s in one pass (an FMA: within 1 ulp of |t| / s, far below float32)
            t = torch.addcmul(self._centre_s, rows, self._inv_s, out=work)
            fnorm = torch.linalg.vector_norm(t, dim=1)
            off = (-0.5 * fnorm * fnorm).add_(self._c0)
            a[:, : g.dim] = t
        else:
            t = torch.sub(rows, self._centre, out=work)
            off = torch.full((b,), self._c0, dtype=torch.float64, device=self.device)
        if g.structure == "iso":
            fnorm = torch.linalg.vector_norm(t, dim=1)
            sq = fnorm * fnorm
            a[:, : g.dim] = t
            a[:, g.dim] = -0.5 * sq
            rho = (0.5 * self._prec_max) * sq
        elif g.structure == "diag":
            n4 = torch.linalg.vector_norm(t, ord=4, dim=1)  # |t * t| = |t|_4^2
            fnorm = torch.hypot(n4 * n4, torch.linalg.vector_norm(t, dim=1))
            torch.mul(t, t, out=a[:, : g.dim])
            a[:, g.dim : 2 * g.dim] = t
        a[:, -2] = 1.0
        a[:, -1] = 0.0
        return a, fnorm, off, rho

    def _all_rows(
        self, flat: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """:meth:`_aug_rows` of every row, in steps of ``_STEP_ELEMS`` float64 elements
        (few large passes: each torch op is a parallel region)."""
        total = flat.shape[0]
        a = torch.empty(total, self._k_aug, dtype=torch.float32, device=self.device)
        fnorm = torch.empty(total, dtype=torch.float64, device=self.device)
        off = torch.empty_like(fnorm)
        rho: torch.Tensor | float = 0.0
        if self.gauss.structure == "iso":
            rho = torch.empty_like(fnorm)
        step = max(1, _STEP_ELEMS // self._width)
        for s0 in range(0, total, step):
            s1 = min(s0 + step, total)
            _, fn, of, rh = self._aug_rows(flat[s0:s1], a[s0:s1])
            fnorm[s0:s1], off[s0:s1] = fn, of
            if isinstance(rho, torch.Tensor):
                rho[s0:s1] = rh
        self._scratch_buf = None  # kept from the set-up and the diagonal until here
        return a, fnorm, off, rho

    def _choose(
        self, fnorm: torch.Tensor, rho: torch.Tensor | float, s_abs: torch.Tensor | float
    ) -> tuple[bool, bool]:
        """(use float32, use TF32) for a block, from the a-priori bound (``G = 0``)."""
        tf32 = False
        if self.precision == "auto" and self.device.type == "cuda":
            bound = self._bounds(fnorm, rho, s_abs, 0.0, tf32=True)
            tf32 = float(bound.mean()) <= self.tolerance
        if not tf32:
            bound = self._bounds(fnorm, rho, s_abs, 0.0, tf32=False)
        return self.precision == "float32" or float(bound.mean()) <= self.tolerance, tf32

    def _account(self, b: int, kind: str, bound: torch.Tensor | None = None) -> None:
        self.counts[kind] += 1
        self.rows_done += b
        if bound is not None:
            self.bound_sum += float(bound.sum())

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
            a, fnorm, off, rho = self._aug_rows(rows)
            ok, tf32 = self._choose(fnorm, rho, 0.0)
            if ok:
                blk = self._mm32(a, tf32)
                lse = torch.logsumexp(blk.to(torch.float64), dim=1)
                bound = self._bounds(fnorm, rho, 0.0, lse.abs(), tf32)
                if self.precision == "float32" or float(bound.mean()) <= self.tolerance:
                    if g.n_components > 1:
                        blk = torch.logsumexp(blk.view(b, self.n, g.n_components), dim=-1)
                    self._account(b, "tf32" if tf32 else "float32", bound)
                    return blk, off
        self._account(b, "float64")
        return self.block(rows), torch.zeros(b, dtype=torch.float64, device=self.device)

    def _mm32(self, a: torch.Tensor, tf32: bool, out: torch.Tensor | None = None) -> torch.Tensor:
        """``a @ cols32.T``, into ``out`` when given (a reused block buffer: a fresh
        output would cost page faults on every block)."""
        if out is not None:
            out = out[: a.shape[0]]
        if self.device.type != "cuda":
            return torch.mm(a, self._cols32.T, out=out)
        flags = torch.backends.cuda.matmul
        old = flags.allow_tf32
        flags.allow_tf32 = tf32
        try:
            return torch.mm(a, self._cols32.T, out=out)
        finally:
            flags.allow_tf32 = old

    @property
    def mean_bound(self) -> float:
        """Mean over all rows done of the float32 error bound (0 for float64 rows)."""
        return self.bound_sum / self.rows_done if self.rows_done else 0.0

    def iter_exp_blocks(
        self, t: torch.Tensor, diag: torch.Tensor, exact_shift: bool = False, repair: bool = False
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(row_slice, src, e, shift, loo)``: the exponentiated off-diagonal blocks.

        ``e[r, i] = exp(L[row, i] - shift[r])`` for ``i != src[r]`` and ``0`` at
        ``i = src[r]`` (float32 or float64, shape ``(B, N)``); ``shift`` (float64) is the
        row's shift and ``loo = e.sum(1)`` in float64, so that
        ``log sum_{i != j} exp L[j, i] = shift + log(loo)``.  ``e`` is a reused buffer:
        valid until the next block is requested.

        On the float32 path the shift is *speculative* unless ``exact_shift``: the exact
        diagonal ``L[j, j]``, known before the product, goes into the product as one more
        inner column, so each entry is computed, exponentiated and summed in two passes
        with no row maximum.  A row whose sum overflows or falls under
        ``N * C * 2^-102`` (where float32 underflow could matter) is recomputed with its
        row maximum as the shift; after many such rows the kernel stops speculating.
        Float64 blocks (and ``exact_shift``) shift by the off-diagonal row maximum.
        Rows are flattened draw-major (row ``r * N + j`` belongs to source ``j``).

        With ``repair`` (callers that use only the row sums ``loo``, not the entries of
        ``e`` one by one) a block whose float32 bound is too large may still be computed in
        float32 when few entries matter: see :meth:`_repair`.
        """
        r = t.shape[0]
        flat = t.reshape(r * self.n, *t.shape[2:])
        dflat = diag.reshape(-1)
        total = r * self.n
        fast = self.gauss is not None and self._lowp
        if fast:
            a_all, fn_all, off_all, rho_all = self._all_rows(flat)
            rows = min(self.chunk_size, total)
            buf = torch.empty(rows, self._cols32.shape[0], dtype=torch.float32, device=self.device)
        for start in range(0, total, self.chunk_size):
            stop = min(start + self.chunk_size, total)
            src = torch.arange(start, stop, device=self.device) % self.n
            out = None
            if fast:
                rho = rho_all[start:stop] if isinstance(rho_all, torch.Tensor) else rho_all
                out = self._exp_block32(
                    a_all[start:stop],
                    fn_all[start:stop],
                    off_all[start:stop],
                    rho,
                    dflat[start:stop],
                    src,
                    exact_shift,
                    buf,
                    flat[start:stop] if repair else None,
                )
            if out is not None:
                yield (slice(start, stop), src) + out
                continue
            self._account(stop - start, "float64")
            step = self._rows64
            for s0 in range(start, stop, step):
                s1 = min(s0 + step, stop)
                yield (slice(s0, s1), src[s0 - start : s1 - start]) + _exp_max_shift(
                    self.block(flat[s0:s1]), src[s0 - start : s1 - start], 1
                )

    def _exp_block32(
        self,
        a: torch.Tensor,
        fnorm: torch.Tensor,
        off: torch.Tensor,
        rho: torch.Tensor | float,
        diag: torch.Tensor,
        src: torch.Tensor,
        exact_shift: bool,
        buf: torch.Tensor | None = None,
        t_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(e, shift, loo)`` of a float32 block from its row factors (:meth:`_aug_rows`),
        or ``None`` where its bound says float64 (checked before the product with
        ``G = 0`` and after it with the row sums).  ``e`` may live in ``buf``.  With
        ``t_rows`` (the block's samples) a block over the bound may be repaired instead
        (:meth:`_repair`)."""
        b, c = a.shape[0], self.gauss.n_components
        spec = self._speculate and not exact_shift
        s_abs: torch.Tensor | float = 0.0
        if spec:
            s32 = (diag - off).to(torch.float32)  # shift relative to the offset, exact in f32
            a[:, -1] = -s32
            shift = s32.to(torch.float64)
            s_abs = shift.abs()
        else:
            a[:, -1] = 0.0
        ok, tf32 = self._choose(fnorm, rho, s_abs)
        repairable = t_rows is not None and self._repair_ok is not False and c == 1
        if not ok and not (
            repairable and self.precision == "auto" and self._few(a, src, fnorm, spec)
        ):
            return None
        if spec and not self._speculate:  # the probe found the diagonal far above the rest
            spec, s_abs = False, 0.0
            a[:, -1] = 0.0
        y = self._mm32(a, tf32, buf)  # (B, N * C): L - off - shift
        if not spec:
            e, shift, loo = _exp_max_shift(y, src, c)
            g_abs = shift.abs() + _log_abs_bound(loo)
        else:
            y.clamp_(min=_EXP_FLOOR).exp_()
            ar = torch.arange(b, device=y.device)
            y.view(b, self.n, c)[ar, src] = 0.0
            e = y.view(b, self.n, c).sum(-1) if c > 1 else y
            loo = e.sum(1).to(torch.float64)
            g_abs = _log_abs_bound(loo)
            bad = ~(loo >= self._underflow_floor) | torch.isinf(loo)
            nbad = int(bad.sum())
            if nbad:
                # the shift was off by more than float32's range: these rows again, with
                # their row maximum as the shift
                idx = bad.nonzero()[:, 0]
                a2 = a[idx]
                a2[:, -1] = 0.0
                e2, m2, loo2 = _exp_max_shift(self._mm32(a2, tf32), src[idx], c)
                e[idx], shift[idx], loo[idx] = e2, m2, loo2
                g_abs[idx] = m2.abs() + _log_abs_bound(loo2)
                s_abs[idx] = 0.0
                self.rescued_rows += nbad
                if nbad > b // 4:
                    self._speculate = False
        bound = self._bounds(fnorm, rho, s_abs, g_abs, tf32)
        if self.precision != "float32" and float(bound.mean()) > self.tolerance and repairable:
            bound = self._repair(e, shift, off, loo, bound, t_rows, src)
            if bound is None or float(bound.mean()) > self.tolerance:
                self._repair_ok = False  # (a repair that does not pass is not tried again)
        if self.precision != "float32" and (bound is None or float(bound.mean()) > self.tolerance):
            return None
        self._account(b, "tf32" if tf32 else "float32", bound)
        return e, shift + off, loo

    def _repair(self, e, shift, off, loo, bound, t_rows, src) -> torch.Tensor | None:
        """Recompute in float64 the entries of a float32 block that carry its row sums.

        In row ``j`` every float32 entry is within a factor ``e^{+-E_j}`` of the truth
        (``E_j``, its bound).  The entries within ``W_j = log(8 / tolerance) + 3 E_j + 2``
        nats of the row's largest (few where the rows are far apart, as when a value sits
        at ``log N``) are replaced by ``exp`` of their exact float64 log density, and the
        row sum is corrected by the difference.  The rest, whose float32 sum ``R_j`` is
        known (the old row sum minus the old window entries, plus the float32 sum's own
        error), can be off by at most ``R_j (e^{E_j} - 1)`` together, so the log of the
        new row sum ``S_j`` is off by at most ``r / (1 - r)`` with
        ``r = R_j (e^{E_j} - 1) / S_j``; a repaired row's bound is that plus the float32
        ``exp`` and sum error.  In place on ``e`` and ``loo``; returns the new row bounds,
        or ``None`` (and no more tries) where the window holds more than
        ``1 / _REPAIR_SHARE`` of the block's entries: each redone entry costs a
        ``d``-wide gather and difference, about a hundred times its share of the product.
        """
        need = bound > self.tolerance
        whole = bool(need.all())
        rows = torch.arange(len(bound), device=e.device) if whole else torch.nonzero(need)[:, 0]
        er = e if whole else e[rows]  # (no copy of the block when every row is repaired)
        eb = bound[rows]
        top = er.amax(1)
        thresh = top.to(torch.float64) * torch.exp(-(math.log(8.0 / self.tolerance) + 3 * eb + 2))
        # (entries of a row whose sum vanished are not in the window: top = 0)
        thresh = torch.where(top > 0, thresh, torch.full_like(thresh, math.inf))
        r_idx, i_idx = torch.nonzero(er >= thresh.to(torch.float32)[:, None], as_tuple=True)
        if len(r_idx) > er.numel() // _REPAIR_SHARE:
            self._repair_ok = False
            return None
        j = rows[r_idx]
        exact = torch.exp(self._pair_log_density(t_rows[j], i_idx) - off[j] - shift[j])
        old = e[j, i_idx].to(torch.float64)
        rest = loo[rows].clone()
        rest.index_add_(0, r_idx, -old)
        rest = rest.clamp_min(0.0) + self._fixed_err * loo[rows]
        # the row sums change by the difference at the redone entries (the own entry, 0,
        # is never in the window)
        loo.index_add_(0, j, exact - old)
        e[j, i_idx] = exact.to(e.dtype)
        self.repaired_rows += len(rows)
        den = loo[rows]
        ratio = torch.where(den > 0, rest * torch.expm1(eb) / den, torch.full_like(den, math.inf))
        new = bound.clone()
        new[rows] = self._fixed_err + torch.where(
            ratio < 1, ratio / (1 - ratio), torch.full_like(ratio, math.inf)
        )
        return new

    def _few(self, a: torch.Tensor, src: torch.Tensor, fnorm: torch.Tensor, spec: bool) -> bool:
        """Whether a repair (:meth:`_repair`) is likely to pay: decided once per kernel
        from the first ``_PROBE_ROWS`` rows of the first block that needs it, by counting
        their entries within ``log N + log(8 / tolerance) + 3 E_j`` of the row maximum (the
        window a repair would need if every entry below it counted fully; one small
        float32 product).  With a speculative shift (``spec``: the diagonal, in the last column of
        ``a``) whose off-diagonal sums would underflow in most probe rows, speculation is
        switched off (those rows would all be computed twice)."""
        if self._repair_ok is None:
            k = min(_PROBE_ROWS, a.shape[0])
            y = self._mm32(a[:k], False)
            y[torch.arange(k, device=y.device), src[:k]] = -math.inf
            rho = 0.0 if self.gauss.structure != "iso" else (0.5 * self._prec_max) * fnorm[:k] ** 2
            e = self._bounds(fnorm[:k], rho, 0.0, 0.0, False)
            width = math.log(self.n) + math.log(8.0 / self.tolerance) + 3.0 * e
            top = y.amax(1)
            inside = (y >= (top - width.to(y.dtype))[:, None]).sum()
            self._repair_ok = bool(inside * _REPAIR_SHARE <= y.numel())
            # with a speculative shift (the diagonal, in the last column of a): where the
            # off-diagonal sums of most probe rows would underflow, the shift is dropped
            # for this block and the next (their rows would all be computed twice)
            floor = math.log(self._underflow_floor) + 1.0
            if spec and float((top < floor).float().mean()) > 0.5:
                self._speculate = False
        return self._repair_ok

    def _pair_log_density(self, t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        """``log p(t_k | s_{src_k})`` in float64 from exact differences (one component),
        for ``t`` (K, *event) and ``src`` (K,)."""
        g = self.gauss
        t = t.to(torch.float64).reshape(-1, g.dim)
        if self._sigma is not None:  # one scale: exact distances in one fused pass
            out = _row_dist(t, g.loc[src, 0]).div_(self._sigma)
            out.mul_(out).mul_(-0.5).sub_(self._log_det[src, 0]).sub_(0.5 * g.dim * _LOG_2PI)
            return out.add_(g.logw[src, 0])
        z = t - g.loc[src, 0]
        if g.structure == "shared":
            z.div_(g.scale[0, 0])
        else:
            z.div_(torch.broadcast_to(g.scale, g.loc.shape)[src, 0])
        out = torch.linalg.vector_norm(z, dim=1)
        out.mul_(out).mul_(-0.5).sub_(self._log_det[src, 0]).sub_(0.5 * g.dim * _LOG_2PI)
        return out.add_(g.logw[src, 0])


def _log_abs_bound(x: torch.Tensor) -> torch.Tensor:
    """An upper bound on ``|log x|`` (float64) from the binary exponent: no ``log`` call
    (see :meth:`LogDensityKernel._aug_rows`); ``inf`` where ``x`` is 0 or inf."""
    mant, expo = torch.frexp(x)  # x = mant * 2^expo, mant in [0.5, 1)
    out = (expo.abs().to(torch.float64) + 1.0) * math.log(2.0)
    return torch.where((x > 0) & ~torch.isinf(x), out, torch.full_like(out, math.inf))


def _row_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``|x_i - y_i|`` for matching rows of two ``(n, d)`` float64 matrices, from exact
    differences (no ``|x|^2 + |y|^2 - 2 x.y``), in one pass without a temporary."""
    n = x.shape[0]
    if n == 0:
        return x.new_zeros(0)
    d = torch.cdist(x[:, None], y[:, None], compute_mode=_EXACT_DIST)
    return d.view(n)


def _sq_norms(x: torch.Tensor) -> torch.Tensor:
    """Squared row norms of a float64 matrix, one pass."""
    n = torch.linalg.vector_norm(x, dim=1)
    return n.mul_(n)


def _exp_max_shift(
    y: torch.Tensor, src: torch.Tensor, c: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e, m, loo)`` for a block ``y`` (B, N * c) of log densities (per component when
    ``c > 1``): the own source's entries left out, ``m`` the row maximum of the rest
    (float64), ``e = exp(y - m)`` summed over components, ``loo = e.sum(1)`` (float64)."""
    b = y.shape[0]
    ar = torch.arange(b, device=y.device)
    y.view(b, -1, c)[ar, src] = -math.inf
    m = y.amax(1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    y.sub_(m[:, None])
    if y.dtype == torch.float32:  # (see _EXP_FLOOR; the own entries back to 0 after)
        y.clamp_(min=_EXP_FLOOR).exp_()
        y.view(b, -1, c)[ar, src] = 0.0
    else:
        y.exp_()
    e = y.view(b, -1, c).sum(-1) if c > 1 else y
    return e, m.to(torch.float64), e.sum(1).to(torch.float64)
