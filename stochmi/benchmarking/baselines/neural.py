"""Variational (neural critic) MI lower bounds: MINE, NWJ, InfoNCE, SMILE.

All four train a critic ``f(x, t)`` in torch on a training split and report the
bound on a held-out split (Poole et al., ICML 2019, give the common framework).
For a batch of B pairs the critic is evaluated on all B x B combinations, giving a
score matrix ``S[i, j] = f(x_i, t_j)`` whose diagonal holds the joint pairs and
whose off-diagonal entries stand in for samples of the product of marginals.

Bounds (nats), with ``mean_{j != i}`` over off-diagonal entries:

* InfoNCE (van den Oord et al. 2018): ``mean_i [S_ii - log sum_j exp S_ij] + log B``
  (never above ``log B``);
* NWJ (Nguyen, Wainwright & Jordan 2010): ``mean_i S_ii - mean_{i != j} exp(S_ij - 1)``;
* MINE (Belghazi et al. 2018), Donsker-Varadhan:
  ``mean_i S_ii - log mean_{i != j} exp S_ij``; trained with the moving-average
  correction of the biased gradient of the log term;
* SMILE (Song & Ermon 2020): the DV value with ``S`` clipped to ``[-tau, tau]``
  inside the log-mean-exp; the critic is trained with the Jensen-Shannon
  (f-GAN) objective.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from stochmi.benchmarking.baselines.util import (
    as_2d_float,
    as_labels,
    check_pair,
    checked_estimate,
    is_label_array,
    make_generator,
    split_indices,
    standardize,
    torch_threads,
)
from stochmi.core.estimate import MIEstimate
from stochmi.core.rng import numpy_generator, rng_context

__all__ = ["MINE", "NWJ", "InfoNCE", "SMILE", "Critic", "DIVERGED_BELOW", "divergence_reason"]


class Critic(nn.Module):
    r"""Critic ``f(x, t)`` evaluated on all pairs of a batch.

    ``kind="concat"``: an MLP on the concatenation ``[x, t]``.  Its first layer is
    linear, ``W [x; t] = W_x x + W_t t``, so the B x B x H first-layer activations
    are formed by broadcasting ``W_x x_i + W_t t_j`` (no B^2 copies of the inputs).
    ``kind="separable"``: ``f(x, t) = g(x)^T h(t)`` with two MLP embeddings.

    Parameters
    ----------
    dx, dt : int
        Input dimensions.
    hidden : tuple of int
        Hidden widths.
    kind : {"concat", "separable"}
    embed_dim : int
        Embedding size of the separable critic.
    """

    def __init__(
        self,
        dx: int,
        dt: int,
        hidden: tuple[int, ...] = (64, 64),
        kind: str = "separable",
        embed_dim: int = 32,
    ) -> None:
        super().__init__()
        if kind not in ("concat", "separable"):
            raise ValueError(f"critic kind must be 'concat' or 'separable', got {kind!r}")
        if len(hidden) < 1:
            raise ValueError("hidden must contain at least one width")
        self.kind = kind
        if kind == "concat":
            self.in_x = nn.Linear(dx, hidden[0])
            self.in_t = nn.Linear(dt, hidden[0], bias=False)
            layers: list[nn.Module] = [nn.ReLU()]
            for a, b in zip(hidden[:-1], hidden[1:]):
                layers += [nn.Linear(a, b), nn.ReLU()]
            layers.append(nn.Linear(hidden[-1], 1))
            self.head = nn.Sequential(*layers)
        else:
            self.g = _mlp(dx, hidden, embed_dim)
            self.h = _mlp(dt, hidden, embed_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Score matrix ``S[i, j] = f(x_i, t_j)``, shape (B, B)."""
        if self.kind == "concat":
            z = self.in_x(x)[:, None, :] + self.in_t(t)[None, :, :]
            return self.head(z).squeeze(-1)
        return self.g(x) @ self.h(t).T


def _mlp(d_in: int, hidden: tuple[int, ...], d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = d_in
    for h in hidden:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, d_out))
    return nn.Sequential(*layers)


def _offdiag_mask(b: int) -> torch.Tensor:
    return ~torch.eye(b, dtype=torch.bool)


def _logmeanexp_offdiag_rows(s: torch.Tensor) -> torch.Tensor:
    """Row-wise ``log mean_{j != i} exp S_ij``, shape (B,)."""
    b = s.shape[0]
    masked = s.masked_fill(~_offdiag_mask(b), -math.inf)
    return torch.logsumexp(masked, dim=1) - math.log(b - 1)


def _logmeanexp_offdiag(s: torch.Tensor) -> torch.Tensor:
    b = s.shape[0]
    return torch.logsumexp(s[_offdiag_mask(b)], dim=0) - math.log(b * (b - 1))


def infonce_terms(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE bound of a score matrix and its per-row terms (value, terms (B,))."""
    terms = s.diag() - torch.logsumexp(s, dim=1) + math.log(s.shape[0])
    return terms.mean(), terms


def nwj_terms(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NWJ bound ``mean S_ii - mean_{i!=j} exp(S_ij - 1)`` and per-row terms."""
    terms = s.diag() - torch.exp(_logmeanexp_offdiag_rows(s) - 1.0)
    return terms.mean(), terms


def dv_terms(s: torch.Tensor, clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Donsker-Varadhan bound (optionally clipped, SMILE) and delta-method row terms.

    ``value = mean_i a_i - log mean_i b_i`` with ``a_i = S_ii`` and
    ``b_i = mean_{j != i} exp(clip(S_ij))``; the row terms ``a_i - b_i / mean(b)``
    have the same first-order fluctuations (used only for the standard error).
    """
    sc = s if clip is None else s.clamp(-clip, clip)
    log_b = _logmeanexp_offdiag_rows(sc)
    log_mean_b = torch.logsumexp(log_b, dim=0) - math.log(s.shape[0])
    value = s.diag().mean() - log_mean_b
    terms = s.diag() - torch.exp(log_b - log_mean_b)
    return value, terms


def js_fgan(s: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon f-GAN objective used to train the SMILE critic."""
    b = s.shape[0]
    first = -nn.functional.softplus(-s.diag()).mean()
    sp = nn.functional.softplus(s)
    second = (sp.sum() - sp.diag().sum()) / (b * (b - 1))
    return first - second


#: a held-out bound below minus this many nats is reported as divergence
DIVERGED_BELOW = 1.0


def divergence_reason(value: float, terms: torch.Tensor, history) -> str:
    """Why a neural bound's result is a divergence, or ``""`` when it is not."""
    if not math.isfinite(value):
        return f"non-finite held-out value {value}"
    bad = [s for s, v in history if not math.isfinite(v)]
    if bad:
        return f"non-finite held-out evaluation at step {bad[0]}"
    if len(terms) and not bool(torch.isfinite(terms).all()):
        return "non-finite held-out row terms"
    if len(terms) and float(terms.abs().max()) > 1e6:
        return f"exploding held-out row terms (|term| up to {float(terms.abs().max()):.3g})"
    if value < -DIVERGED_BELOW:
        return f"value {value:.4g} nats is far below 0"
    return ""


class _NeuralBound:
    r"""Shared training / evaluation loop of the neural-critic bounds.

    The data are split at random into a training part and a held-out part
    (``holdout`` fraction).  The critic is trained with Adam on minibatches of
    ``batch_size`` pairs; every ``eval_every`` steps the bound is evaluated on the
    held-out part and the best critic kept; training stops after ``patience``
    evaluations without improvement or at ``max_steps``.  The reported value is the
    bound of the best critic on the held-out part, averaged over ``eval_repeats``
    random batchings.  Selecting the critic on the same held-out data biases the
    value up slightly (of the order of its standard error).

    ``stderr`` is ``std(row terms) / sqrt(n_heldout)`` over the held-out samples
    (row terms averaged over the repeats; for MINE / SMILE the delta-method
    linearisation of the log-mean-exp); it ignores the coupling of rows within a
    batch, the optimisation noise and the selection effect: a cheap indication,
    not a bootstrap.

    Divergence: on heavy-tailed data the exponential terms of NWJ and MINE can blow
    up (values such as -1.7e7 nats).  A result is flagged ``extra["diverged"] = True``
    (reason in ``extra["divergence"]``) and a :class:`RuntimeWarning` is issued when
    the value or a held-out evaluation is not finite, when the value is below
    ``-DIVERGED_BELOW`` nats (a lower bound on MI that far below 0 carries no
    information), or when a held-out row term exceeds ``1e6`` in magnitude.
    Rerunning with another ``seed`` or a smaller ``lr`` usually helps.

    ``seed=None`` draws a fresh seed, so two calls differ; the seed used is returned
    in ``extra["seed"]``.

    The critic (:class:`Critic`) is ``separable`` by default, ``f = g(x)^T h(t)``
    (Poole et al.): the B x B scores cost one matrix product, fast on a CPU;
    ``critic="concat"`` is more expressive and about 20-40x slower per step.

    Parameters
    ----------
    critic : {"separable", "concat"}
    hidden : tuple of int
        Hidden widths of the critic MLP(s).
    embed_dim : int
        Embedding size of the separable critic.
    batch_size : int
        Pairs per minibatch, and held-out batch size (InfoNCE is capped by its log).
    lr : float
        Adam learning rate.
    max_steps, eval_every, patience : int
        Training length and early stopping (evaluations without improvement).
    holdout : float
        Held-out fraction.
    eval_repeats : int
        Random batchings of the held-out part averaged for the final value.
    progress : bool
        tqdm bar over training steps.
    num_threads : int or None
        torch threads while training (restored afterwards); 1 is fastest for
        these small networks.  ``None`` keeps torch's setting.

    Inputs are standardised with the training statistics (see
    :func:`stochmi.benchmarking.baselines.util.standardize`: near-constant coordinates are not
    inflated); integer labels are one-hot encoded.  Randomness: ``seed`` drives the
    split, the batches and (via :func:`stochmi.core.rng.rng_context`) the critic
    initialisation; the caller's global RNG state is left untouched.
    """

    name = "neural"

    def __init__(
        self,
        *,
        critic: str = "separable",
        hidden: tuple[int, ...] = (64, 64),
        embed_dim: int = 32,
        batch_size: int = 128,
        lr: float = 1e-3,
        max_steps: int = 2000,
        eval_every: int = 100,
        patience: int = 5,
        holdout: float = 0.2,
        eval_repeats: int = 4,
        progress: bool = False,
        num_threads: int | None = 1,
    ) -> None:
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2, got {batch_size}")
        if max_steps < 1 or eval_every < 1 or patience < 1 or eval_repeats < 1:
            raise ValueError("max_steps, eval_every, patience and eval_repeats must be >= 1")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.critic = critic
        self.hidden = tuple(int(h) for h in hidden)
        self.embed_dim = int(embed_dim)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.max_steps = int(max_steps)
        self.eval_every = int(eval_every)
        self.patience = int(patience)
        self.holdout = float(holdout)
        self.eval_repeats = int(eval_repeats)
        self.progress = bool(progress)
        self.num_threads = num_threads
        if critic not in ("concat", "separable"):
            raise ValueError(f"critic kind must be 'concat' or 'separable', got {critic!r}")
        if len(self.hidden) < 1 or min(self.hidden) < 1 or self.embed_dim < 1:
            raise ValueError("hidden must hold positive widths and embed_dim must be >= 1")

    # subclasses define these two
    def _train_loss(self, s: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _bound(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _reset_state(self) -> None:
        """Per-fit state (MINE's moving average)."""

    @staticmethod
    def _as_features(a: Any, name: str) -> np.ndarray:
        if is_label_array(a, name):
            y = as_labels(a, name)
            return np.eye(int(y.max()) + 1)[y]
        return as_2d_float(a, name)

    def _evaluate(
        self, f: Critic, x: torch.Tensor, t: torch.Tensor, repeats: int, gen: torch.Generator
    ) -> tuple[float, torch.Tensor]:
        n = x.shape[0]
        b = min(self.batch_size, n)
        values = []
        row_sum = torch.zeros(n, dtype=torch.float64)
        row_cnt = torch.zeros(n, dtype=torch.float64)
        with torch.no_grad():
            for _ in range(repeats):
                perm = torch.randperm(n, generator=gen)
                for s0 in range(0, n - b + 1, b):
                    idx = perm[s0 : s0 + b]
                    v, terms = self._bound(f(x[idx], t[idx]))
                    values.append(float(v))
                    row_sum[idx] += terms.double()
                    row_cnt[idx] += 1
        used = row_cnt > 0
        return float(np.mean(values)), row_sum[used] / row_cnt[used]

    @checked_estimate
    def estimate(self, x: Any, t: Any, *, seed: int | None = None) -> MIEstimate:
        """Train the critic and return the held-out bound in nats.

        Parameters
        ----------
        x : tensor or array, shape (N, dx)
        t : tensor or array, shape (N, dt), or integer labels (N,)
        seed : int or None
            Seed of the split, batches and critic initialisation.

        Returns
        -------
        MIEstimate
            ``value`` (held-out bound), ``stderr`` (see class notes), ``n`` = N;
            ``extra`` holds ``steps``, ``best_step``, ``n_heldout``, ``batch_size``,
            the held-out ``history`` [(step, value)], ``seed`` (the seed used: a
            fresh one when ``seed=None``), ``diverged`` and ``divergence`` (see the
            class notes), ``x_discrete`` and ``t_discrete``.
        """
        with torch_threads(self.num_threads):
            return self._fit(x, t, seed)

    def _fit(self, x: Any, t: Any, seed: int | None) -> MIEstimate:
        """Body of :meth:`estimate`."""
        from tqdm.auto import tqdm

        xa = self._as_features(x, "x")
        ta = self._as_features(t, "t")
        n = check_pair(xa, ta, min_n=8)
        rng = numpy_generator(seed)  # seed: resolved by checked_estimate
        tr, te = split_indices(n, self.holdout, rng)
        xt = torch.as_tensor(standardize(xa, tr), dtype=torch.float32)
        tt = torch.as_tensor(standardize(ta, tr), dtype=torch.float32)
        x_tr, t_tr, x_te, t_te = xt[tr], tt[tr], xt[te], tt[te]
        gen = make_generator(int(rng.integers(2**62)))
        init_seed = int(rng.integers(2**62))
        with rng_context(init_seed):
            f = Critic(xa.shape[1], ta.shape[1], self.hidden, self.critic, self.embed_dim)
        opt = torch.optim.Adam(f.parameters(), lr=self.lr)
        self._reset_state()
        b = min(self.batch_size, len(tr))
        best, best_state, best_step, bad = -math.inf, copy.deepcopy(f.state_dict()), 0, 0
        history: list[tuple[int, float]] = []
        step = 0
        bar = tqdm(total=self.max_steps, desc=self.name, disable=not self.progress, leave=False)
        try:
            for step in range(1, self.max_steps + 1):
                idx = torch.randint(len(tr), (b,), generator=gen)
                loss = self._train_loss(f(x_tr[idx], t_tr[idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)
                if step % self.eval_every == 0 or step == self.max_steps:
                    v, _ = self._evaluate(f, x_te, t_te, 1, gen)
                    history.append((step, v))
                    bar.set_postfix(heldout=f"{v:.3f}")
                    if v > best:
                        best, best_state, best_step, bad = v, copy.deepcopy(f.state_dict()), step, 0
                    else:
                        bad += 1
                        if bad >= self.patience:
                            break
        finally:
            bar.close()
        f.load_state_dict(best_state)
        value, terms = self._evaluate(f, x_te, t_te, self.eval_repeats, gen)
        stderr = float(terms.std() / math.sqrt(len(terms))) if len(terms) > 1 else math.nan
        divergence = divergence_reason(value, terms, history)
        if divergence:
            warnings.warn(
                f"{self.name}: the critic diverged ({divergence}); value {value:.4g} nats is "
                "meaningless. Try another seed or a smaller lr.",
                RuntimeWarning,
                stacklevel=3,
            )
        return MIEstimate(
            value=value,
            stderr=stderr,
            n=n,
            method=self.name,
            extra={
                "steps": step,
                "best_step": best_step,
                "n_heldout": len(te),
                "batch_size": min(self.batch_size, len(te)),
                "history": history,
                "seed": seed,
                "diverged": bool(divergence),
                "divergence": divergence,
            },
        )


class InfoNCE(_NeuralBound):
    r"""InfoNCE / contrastive predictive coding lower bound with a learned critic.

    .. math::

        I \ge \hat I_{\rm NCE} = \frac1B \sum_i \Big[S_{ii}
              - \log \sum_{j=1}^B e^{S_{ij}}\Big] + \log B \le \log B .

    Trained by maximising the bound itself.  Low variance, but it cannot report more
    than ``log B`` (``B`` = held-out batch size, ``min(batch_size, n_heldout)``).
    See :class:`_NeuralBound` for the parameters, the split and the stderr.
    """

    name = "infonce"

    def _train_loss(self, s: torch.Tensor) -> torch.Tensor:
        return -infonce_terms(s)[0]

    def _bound(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return infonce_terms(s)


class NWJ(_NeuralBound):
    r"""Nguyen-Wainwright-Jordan (f-divergence, "TUBA" with ``a = e``) lower bound.

    .. math::

        I \ge \hat I_{\rm NWJ} = \frac1B\sum_i S_{ii}
           - \frac{1}{B(B-1)} \sum_{i \ne j} e^{S_{ij} - 1}.

    Unbiased given the critic, variance grows like ``e^I``.  Trained on the bound.
    """

    name = "nwj"

    def _train_loss(self, s: torch.Tensor) -> torch.Tensor:
        return -nwj_terms(s)[0]

    def _bound(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return nwj_terms(s)


class MINE(_NeuralBound):
    r"""MINE: Donsker-Varadhan bound with a moving-average gradient correction.

    .. math::

        I \ge \hat I_{\rm DV} = \frac1B\sum_i S_{ii}
           - \log \frac{1}{B(B-1)} \sum_{i \ne j} e^{S_{ij}} .

    The minibatch gradient of the log term, ``E_B[grad S e^S] / E_B[e^S]``, is biased;
    Belghazi et al. replace the denominator by an exponential moving average
    ``m <- (1 - rate) m + rate E_B[e^S]`` (kept in log space here), i.e. the
    surrogate loss is ``-(mean S_ii - E_B[e^S] / m)`` with ``m`` held fixed.

    Parameters
    ----------
    ema_rate : float
        Moving-average rate (Belghazi et al. use 0.01).
    **kwargs
        See :class:`_NeuralBound`.
    """

    name = "mine"

    def __init__(self, *, ema_rate: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < ema_rate <= 1:
            raise ValueError(f"ema_rate must be in (0, 1], got {ema_rate}")
        self.ema_rate = float(ema_rate)
        self._log_ema: float | None = None

    def _reset_state(self) -> None:
        self._log_ema = None

    def _train_loss(self, s: torch.Tensor) -> torch.Tensor:
        log_m = _logmeanexp_offdiag(s)
        lm = float(log_m.detach())
        if self._log_ema is None:
            self._log_ema = lm
        else:
            self._log_ema = float(
                np.logaddexp(
                    math.log1p(-self.ema_rate) + self._log_ema, math.log(self.ema_rate) + lm
                )
            )
        return -(s.diag().mean() - torch.exp(log_m - self._log_ema))

    def _bound(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dv_terms(s)


class SMILE(_NeuralBound):
    r"""SMILE (Song & Ermon 2020): clipped Donsker-Varadhan value, JS-trained critic.

    .. math::

        \hat I_{\rm SMILE} = \frac1B\sum_i S_{ii}
           - \log \frac{1}{B(B-1)} \sum_{i\ne j} e^{\mathrm{clip}(S_{ij}, -\tau, \tau)} .

    The critic maximises the Jensen-Shannon f-GAN objective
    ``-E_p softplus(-S) - E_q softplus(S)`` (whose optimum is ``S = log p/(p_x p_t)``);
    clipping at ``tau`` trades variance for bias (``tau = inf`` gives DV).

    Parameters
    ----------
    tau : float
        Clipping threshold (Song & Ermon use 1, 5 or inf).
    **kwargs
        See :class:`_NeuralBound`.
    """

    name = "smile"

    def __init__(self, *, tau: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")
        self.tau = float(tau)

    def _train_loss(self, s: torch.Tensor) -> torch.Tensor:
        return -js_fgan(s)

    def _bound(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return dv_terms(s, None if math.isinf(self.tau) else self.tau)
