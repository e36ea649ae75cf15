"""Predictive V-information (Xu, Zhao, Song, Stewart & Ermon, ICLR 2020).

``I_V(X -> Y) = H_V(Y | ∅) - H_V(Y | X)``: how much better a predictor from the
family V does with ``X`` than without it, measured by held-out log loss.  Unlike
Shannon MI it is finite for deterministic layers and can grow through processing
(a layer can make information *usable* by a linear probe).
"""

from __future__ import annotations

import copy
import math
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

__all__ = ["VInformation", "VInfoLinear", "VInfoMLP"]


def _gauss_nll(res: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Per-row negative log density of N(0, cov) at residuals ``res`` (n, d), nats."""
    d = res.shape[1]
    chol = torch.linalg.cholesky(cov)
    z = torch.linalg.solve_triangular(chol, res.T, upper=False)
    logdet = 2.0 * torch.log(torch.diagonal(chol)).sum()
    return 0.5 * (z * z).sum(0) + 0.5 * logdet + 0.5 * d * math.log(2 * math.pi)


def _cov(res: torch.Tensor) -> torch.Tensor:
    """Ledoit-Wolf shrinkage covariance of zero-mean residuals (n, d), float64.

    Shrinkage keeps the matrix well conditioned when d is not small against n
    (e.g. a 128-unit layer predicted from a few hundred validation samples).
    """
    from sklearn.covariance import ledoit_wolf

    r = res.detach().cpu().numpy()
    if r.shape[1] == 1:
        c = np.array([[max(float((r * r).mean()), 1e-12)]])
    else:
        c, _ = ledoit_wolf(r, assume_centered=True)
        c = c + 1e-12 * np.trace(c) / c.shape[0] * np.eye(c.shape[0])
    return torch.as_tensor(c, dtype=torch.float64)


#: L2 strengths tried by ``weight_decay="auto"`` (linear probes).
_LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class VInformation:
    r"""V-information ``I_V(X -> T) = H_V(T | ∅) - H_V(T | X)`` with a probe family.

    The data are split into train / held-out (``holdout``).  The train part is split
    again into a fitting part and a validation part (``val_fraction``).

    * Labels ``t`` (classification): V = softmax(g(x)) with ``g`` linear
      (``probe="linear"``) or a one-hidden-layer MLP (``probe="mlp"``);
      ``H_V(T|∅)`` is the held-out cross-entropy of the train class frequencies
      (add-one smoothed); ``H_V(T|X)`` the held-out cross-entropy of the probe.
    * Continuous ``t`` (N, dt): V = N(g(x), Σ) with ``g`` linear (ridge) or MLP
      (MSE) and a full covariance Σ estimated from the validation residuals
      (Ledoit-Wolf shrinkage); ``H_V(T|∅)`` uses N(mean, Σ_0) of the train part
      (Σ_0 shrunk likewise).  For jointly Gaussian data
      and the linear probe this converges to the Shannon MI.

    .. math::

        \hat I_V = \frac{1}{n_{\rm test}} \sum_{i \in \rm test}
          \big[-\log q_\varnothing(t_i) + \log q_{g}(t_i \mid x_i)\big].

    Parameters
    ----------
    probe : {"linear", "mlp"}
    hidden : int
        Hidden width of the MLP probe.
    weight_decay : float or "auto"
        L2 penalty.  Linear probes: ``"auto"`` picks it from
        ``(1e-4, 1e-3, 1e-2, 1e-1, 1)`` on the validation part (logistic
        regression is then refitted on the whole train part; the ridge regression
        stays fitted on the fitting part, since the validation residuals set the
        noise covariance).  MLP probes: Adam weight decay, ``"auto"`` = 1e-4.
    holdout, val_fraction : float
        Held-out fraction of all data; validation fraction of the train part.
    max_epochs, batch_size, lr, patience : MLP training (Adam, early stopping on
        the validation loss).
    progress : bool
        tqdm bar over MLP epochs.
    num_threads : int or None
        torch threads while fitting (restored afterwards); ``None`` keeps torch's.

    Notes
    -----
    ``stderr = std_i(d_i) / sqrt(n_test)`` with ``d_i`` the per-sample held-out
    log-loss differences (valid given the fitted probes).  Inputs are standardised
    with the train statistics (near-constant coordinates are not inflated).
    ``seed`` fixes the split, the MLP initialisation (inside
    :func:`stochmi.core.rng.rng_context`) and the minibatches.
    """

    name = "vinfo"

    def __init__(
        self,
        probe: str = "linear",
        *,
        hidden: int = 64,
        weight_decay: float | str = "auto",
        holdout: float = 0.3,
        val_fraction: float = 0.2,
        max_epochs: int = 200,
        batch_size: int = 128,
        lr: float = 1e-3,
        patience: int = 10,
        progress: bool = False,
        num_threads: int | None = 1,
    ) -> None:
        if probe not in ("linear", "mlp"):
            raise ValueError(f"probe must be 'linear' or 'mlp', got {probe!r}")
        if weight_decay != "auto" and not (
            isinstance(weight_decay, (int, float)) and weight_decay >= 0
        ):
            raise ValueError(f"weight_decay must be 'auto' or a float >= 0, got {weight_decay!r}")
        self.probe = probe
        self.hidden = int(hidden)
        self.weight_decay = weight_decay if weight_decay == "auto" else float(weight_decay)
        self.holdout = float(holdout)
        self.val_fraction = float(val_fraction)
        self.max_epochs = int(max_epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.patience = int(patience)
        self.progress = bool(progress)
        self.num_threads = num_threads

    # -- probes -----------------------------------------------------------------
    def _fit_mlp(self, x_fit, y_fit, x_val, y_val, d_out, loss_fn, gen, init_seed):
        from tqdm.auto import tqdm

        with rng_context(init_seed):
            net = nn.Sequential(
                nn.Linear(x_fit.shape[1], self.hidden), nn.ReLU(), nn.Linear(self.hidden, d_out)
            ).double()
        wd = 1e-4 if self.weight_decay == "auto" else self.weight_decay
        opt = torch.optim.Adam(net.parameters(), lr=self.lr, weight_decay=wd)
        best, best_state, bad = math.inf, copy.deepcopy(net.state_dict()), 0
        n = x_fit.shape[0]
        for _ in tqdm(
            range(self.max_epochs), desc=self.name, disable=not self.progress, leave=False
        ):
            perm = torch.randperm(n, generator=gen)
            for s0 in range(0, n, self.batch_size):
                idx = perm[s0 : s0 + self.batch_size]
                loss = loss_fn(net(x_fit[idx]), y_fit[idx]).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                v = float(loss_fn(net(x_val), y_val).mean())
            if v < best - 1e-6:
                best, best_state, bad = v, copy.deepcopy(net.state_dict()), 0
            else:
                bad += 1
                if bad >= self.patience:
                    break
        net.load_state_dict(best_state)
        net.eval()
        return net

    def _lambdas(self) -> tuple[float, ...]:
        return _LAMBDAS if self.weight_decay == "auto" else (float(self.weight_decay),)

    def _select(self, fit_fn, val_loss, x_fit, y_fit, x_val, y_val, x_all, y_all):
        """Pick the L2 strength on the validation part, refit on ``x_all``."""
        lams = self._lambdas()
        if len(lams) == 1:
            return fit_fn(x_all, y_all, lams[0]), lams[0]
        losses = [val_loss(fit_fn(x_fit, y_fit, lam), x_val, y_val) for lam in lams]
        best = lams[int(np.argmin(losses))]
        return fit_fn(x_all, y_all, best), best

    @staticmethod
    def _fit_logistic(x_fit, y_fit, lam, n_classes):
        w = torch.zeros(x_fit.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(x_fit @ w + b, y_fit) + 0.5 * lam * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
        w, b = w.detach(), b.detach()
        return lambda z: z @ w + b

    @staticmethod
    def _fit_ridge(x_fit, y_fit, lam):
        xb = torch.cat([x_fit, torch.ones(x_fit.shape[0], 1, dtype=x_fit.dtype)], 1)
        reg = lam * x_fit.shape[0] * torch.eye(xb.shape[1], dtype=x_fit.dtype)
        reg[-1, -1] = 0.0
        coef = torch.linalg.solve(xb.T @ xb + reg, xb.T @ y_fit)
        return lambda z: torch.cat([z, torch.ones(z.shape[0], 1, dtype=z.dtype)], 1) @ coef

    # -- estimate ---------------------------------------------------------------
    @checked_estimate
    def estimate(self, x: Any, t: Any, *, seed: int | None = None) -> MIEstimate:
        """Estimate ``I_V(X -> T)`` in nats (``t`` predicted from ``x``).

        Parameters
        ----------
        x : tensor or array, shape (N, dx)
            Predictor (e.g. a layer).
        t : tensor or array, shape (N, dt), or integer labels (N,)
            Target.
        seed : int or None
        """
        with torch_threads(self.num_threads):
            return self._fit(x, t, seed)

    def _fit(self, x: Any, t: Any, seed: int | None) -> MIEstimate:
        """Body of :meth:`estimate`."""
        xa = as_2d_float(x, "x")
        labels = is_label_array(t)
        ta = as_labels(t, "t") if labels else as_2d_float(t, "t")
        n = check_pair(xa, ta if not labels else ta[:, None], min_n=10)
        rng = numpy_generator(seed)  # seed: resolved by checked_estimate
        tr, te = split_indices(n, self.holdout, rng)
        fit, val = split_indices(len(tr), self.val_fraction, rng)
        fit, val = tr[fit], tr[val]
        xs = torch.as_tensor(standardize(xa, tr), dtype=torch.float64)
        gen = make_generator(int(rng.integers(2**62)))
        init_seed = int(rng.integers(2**62))
        if labels:
            y = torch.as_tensor(ta)
            c = int(y.max()) + 1
            counts = torch.bincount(y[tr], minlength=c).double() + 1.0
            log_p0 = torch.log(counts / counts.sum())
            nll0 = -log_p0[y[te]]
            lam = math.nan
            if self.probe == "linear":
                g, lam = self._select(
                    lambda a, b, lm: self._fit_logistic(a, b, lm, c),
                    lambda g_, a, b: float(nn.functional.cross_entropy(g_(a), b)),
                    xs[fit], y[fit], xs[val], y[val], xs[tr], y[tr],
                )  # fmt: skip
            else:
                g = self._fit_mlp(
                    xs[fit], y[fit], xs[val], y[val], c,
                    lambda o, yy: nn.functional.cross_entropy(o, yy, reduction="none"),
                    gen, init_seed,
                )  # fmt: skip
            with torch.no_grad():
                nll1 = nn.functional.cross_entropy(g(xs[te]), y[te], reduction="none")
        else:
            tt = torch.as_tensor(ta, dtype=torch.float64)
            m0 = tt[tr].mean(0)
            nll0 = _gauss_nll(tt[te] - m0, _cov(tt[tr] - m0))
            lam = math.nan
            if self.probe == "linear":
                g, lam = self._select(
                    self._fit_ridge,
                    lambda g_, a, b: float(((g_(a) - b) ** 2).sum(1).mean()),
                    xs[fit], tt[fit], xs[val], tt[val], xs[fit], tt[fit],
                )  # fmt: skip
            else:
                g = self._fit_mlp(
                    xs[fit], tt[fit], xs[val], tt[val], tt.shape[1],
                    lambda o, yy: ((o - yy) ** 2).sum(1), gen, init_seed,
                )  # fmt: skip
            with torch.no_grad():
                cov = _cov(tt[val] - g(xs[val]))
                nll1 = _gauss_nll(tt[te] - g(xs[te]), cov)
        d = (nll0 - nll1).double()
        return MIEstimate(
            value=float(d.mean()),
            stderr=float(d.std() / math.sqrt(len(d))),
            n=n,
            method=self.name,
            extra={
                "probe": self.probe,
                "H_V_null": float(nll0.mean()),
                "H_V_cond": float(nll1.mean()),
                "n_test": len(te),
                "weight_decay": lam if self.probe == "linear" else self.weight_decay,
            },
        )


class VInfoLinear(VInformation):
    """V-information with the linear probe family (see :class:`VInformation`)."""

    name = "vinfo_linear"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(probe="linear", **kwargs)


class VInfoMLP(VInformation):
    """V-information with the one-hidden-layer MLP probe family (see :class:`VInformation`)."""

    name = "vinfo_mlp"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(probe="mlp", **kwargs)
