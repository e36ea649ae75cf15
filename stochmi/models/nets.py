"""Reference stochastic networks for MNIST, built from a :class:`~stochmi.models.spec.ModelSpec`.

Every network is a :class:`pyro.nn.PyroModule` called as ``model(x, y=None)`` with
``x`` of shape ``(N, 784)``.  Inside ``pyro.plate("data", N, dim=-1)`` each
stochastic layer is a latent sample site ``"h1"``, ``"h2"``, ... (execution order)
whose distribution has batch shape ``(N,)`` and event shape ``(d_l,)``; the labels
are the observed site ``"y"`` with ``Categorical(logits=...)``.

Families
--------
``noisy_mlp`` (Goldfeld et al. 2019)
    post-activation noise: ``h_l = act(W_l h_{l-1} + b_l) + sigma_l Z``,
    ``logits = W_out h_L + b_out``;
    pre-activation noise: ``h_l = W_l act(h_{l-1}) + b_l + sigma_l Z`` (``act(h_0) := x``),
    ``logits = W_out act(h_L) + b_out``.
    The site distribution is ``Normal(mean, sigma_l).to_event(1)``.
``noisy_cnn``
    conv blocks ``h_l = flatten(maxpool(act(conv_l(h_{l-1})))) + sigma_l Z`` (the
    site is the flattened ``C*H*W`` map), then dense noisy layers as above, then
    the logits.
``bayes_mlp``
    Bayesian weights with prior ``W ~ Normal(0, s)``, ``s = prior.scale`` (or
    ``prior.scale / sqrt(fan_in)`` with ``prior.fan_in = true``) (global
    ``PyroSample`` sites ``"layers.{i}.weight"``, ``"layers.{i}.bias"``; the last
    index is the logits layer).  The layer site is the *pre-activation*
    ``h_l = W_l a_{l-1} + b_l + sigma Z`` with ``a_0 = x`` (or its fixed PCA
    projection) and ``a_l = act(h_l)``; with ``sigma = 0`` the site is
    ``Delta(W_l a_{l-1} + b_l).to_event(1)``, visibly deterministic given ``W``.

Training mode (``register_layers=False``, or :meth:`StochasticNet.train_forward`)
draws the layer noise by reparameterised sampling without registering the ``h``
sites, so that SVI's ELBO is ``E_{q(W), noise} log p(y | x, W, noise) - KL(q || p)``
with a correct gradient.  Randomness comes from torch's global RNG, as in all of
Pyro; wrap calls in :func:`rng_context` with a seed (the training and evaluation
functions of :mod:`stochmi.models.training` do).

Parameters are module-local: every forward pass runs under Pyro's
``module_local_params`` setting, so the networks' and guides' parameters never
enter Pyro's global param store.  Several models can coexist, and
``pyro.clear_param_store()`` does not affect them; save them with ``state_dict``.
"""

from __future__ import annotations

import functools
import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample
from torch import nn

from stochmi.core.rng import make_generator, resolve_seed, rng_context
from stochmi.models.spec import ModelSpec, load_spec

__all__ = [
    "StochasticNet",
    "NoisyMLP",
    "NoisyCNN",
    "BayesMLP",
    "BayesLinear",
    "MeanFieldGuide",
    "PCAProjection",
    "build_model",
    "fit_pca",
    "rng_context",
]

_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}


def _local_params():
    """Keep parameters module-local: no entries in Pyro's global param store.

    Each model and guide owns its parameters, so several can coexist and
    ``pyro.clear_param_store()`` never touches them.
    """
    return pyro.settings.context(module_local_params=True)


# ----------------------------------------------------------------------------- PCA input


def fit_pca(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Principal components of ``x`` from the exact covariance eigendecomposition.

    Deterministic (no randomised SVD): ``C = (x - mean)^T (x - mean) / (N - 1)``
    in float64, ``C = V diag(lambda) V^T``; the top ``k`` eigenvectors are kept.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, D)`` data.
    k : int
        Number of components, ``1 <= k <= min(N, D)``.

    Returns
    -------
    mean : (D,) float32
    components : (D, k) float32, orthonormal columns, sign fixed so that the
        entry of largest magnitude of each column is positive.
    scale : (k,) float32, the standard deviation ``sqrt(lambda_j)`` of each
        projection, so that
        ``(x - mean) @ components / scale`` has unit variance per column.
    """
    if x.dim() != 2:
        raise ValueError(f"fit_pca needs a 2-D tensor, got shape {tuple(x.shape)}")
    n, d = x.shape
    if not 1 <= k <= min(n, d):
        raise ValueError(f"k must be in 1..{min(n, d)}, got {k}")
    xd = x.detach().double()
    mean = xd.mean(0)
    xc = xd - mean
    cov = xc.T @ xc / max(n - 1, 1)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    comps = evecs[:, -k:].flip(1).contiguous()
    var = evals[-k:].flip(0).clamp_min(0)
    idx = comps.abs().argmax(0)
    signs = torch.sign(comps[idx, torch.arange(k)])
    comps = comps * signs
    scale = var.sqrt()
    if not bool((scale > 0).all()):
        raise ValueError("fit_pca: a requested component has zero variance; lower k")
    return mean.float(), comps.float(), scale.float()


@functools.lru_cache(maxsize=8)
def _pca_for_source(source: str, k: int):
    from stochmi.data.mnist import load_mnist

    data = load_mnist(source)
    mean, comps, scale = fit_pca(data.x, k)
    return mean, comps, scale, data.source


class PCAProjection(nn.Module):
    """Fixed linear map ``z = (x - mean) @ components / scale``: ``(N, D) -> (N, k)``.

    The buffers are part of the model's ``state_dict``.
    """

    def __init__(self, mean: torch.Tensor, components: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("components", components.clone())
        self.register_buffer("scale", scale.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.components / self.scale


# ----------------------------------------------------------------------------- base class


class StochasticNet(PyroModule):
    """Common machinery of the reference networks.

    Attributes
    ----------
    spec : ModelSpec
        The spec the network was built from.
    layer_sites : list of str
        ``["h1", ..., "hL"]`` in execution order.
    layer_dims : dict
        Site name -> event size ``d_l``.
    sigmas : list of float
        Injected noise standard deviation of each layer.
    """

    kind: str = ""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.input_dim = int(spec.get("model.input_dim"))
        self.n_classes = int(spec.get("model.n_classes"))
        self.activation = spec.get("model.activation")
        self._act = _ACTIVATIONS[self.activation]
        self.noise_where = spec.get("noise.where")
        self.post_activation = self.noise_where == "post-activation"

    # subclasses fill these
    layer_sites: list[str]
    layer_dims: dict[str, int]
    sigmas: list[float]

    def _set_input_transform(self, spec: ModelSpec) -> int:
        """Set ``input_transform`` (a PCA projection when ``model.pca_components`` k > 0,
        else None) and return the width of the first layer's input (k or ``input_dim``)."""
        k = int(spec.get("model.pca_components"))
        self.input_transform = _make_pca(spec) if k else None
        return k if k else self.input_dim

    def _site_index(self, site: str) -> int:
        if site not in self.layer_sites:
            raise ValueError(f"unknown layer site {site!r}; this network has {self.layer_sites}")
        return self.layer_sites.index(site)

    def _check_inputs(self, x, y, dim=None):
        dim = self.input_dim if dim is None else dim
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != dim:
            raise ValueError(f"x must have shape (N, {dim}), got {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise TypeError(f"x must be floating point, got {x.dtype}")
        if y is not None:
            if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
                raise ValueError(f"y must be a tensor of shape ({x.shape[0]},)")
            if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise TypeError(f"y must hold integer labels, got {y.dtype}")

    @staticmethod
    def _plate(n: int, n_total: int | None, device):
        if n_total is None or n_total == n:
            return pyro.plate("data", n, dim=-1)
        if n_total < n:
            raise ValueError(f"n_total={n_total} is smaller than the batch size {n}")
        return pyro.plate("data", size=n_total, subsample=torch.arange(n, device=device), dim=-1)

    @staticmethod
    def _layer(name: str, mean: torch.Tensor, sigma: float, register: bool) -> torch.Tensor:
        if register:
            if sigma > 0:
                return pyro.sample(name, dist.Normal(mean, sigma).to_event(1))
            return pyro.sample(name, dist.Delta(mean).to_event(1))
        if sigma > 0:
            return mean + sigma * torch.randn_like(mean)
        return mean

    def _observe(self, logits: torch.Tensor, y):
        return pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    def train_forward(self, x, y=None, *, n_total=None):
        """``forward`` with ``register_layers=False`` (noise drawn by rsample, no h sites)."""
        return self(x, y, n_total=n_total, register_layers=False)

    def make_guide(self, *, seed: int | None = 0):
        """Variational guide over the global weight sites (None: no global latents)."""
        return None

    def extra_repr(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.layer_dims.items())
        return f"kind={self.kind}, spec={self.spec.name!r}, sites: {dims}, sigma={self.sigmas}"


# ----------------------------------------------------------------------------- noisy MLP


class _NoiseInjectedNet(StochasticNet):
    """Forward pass and channels shared by the noise-injected nets.

    Subclasses define ``_mean(l, parent)`` (the deterministic map ``f_l``) and may
    override ``_logits(h)`` (default ``self.out(h)``).
    """

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(h)

    def _noisy_forward(self, x, y, n_total, register_layers) -> torch.Tensor:
        """``h_l = f_l(h_{l-1}) + sigma_l Z`` for every site, then the logits ``(N, n_classes)``."""
        self._check_inputs(x, y)
        with _local_params(), self._plate(x.shape[0], n_total, x.device):
            h = x
            for l, site in enumerate(self.layer_sites):
                h = self._layer(site, self._mean(l, h), self.sigmas[l], register_layers)
            logits = self._logits(h)
            self._observe(logits, y)
        return logits

    def _noisy_conditional(self, site: str, parent: torch.Tensor) -> dist.Independent:
        """``Normal(f_l(parent), sigma_l).to_event(1)``, batch ``(N,)``, event ``(d_l,)``."""
        l = self._site_index(site)
        # keep the graph only for a parent that asks for it (Jacobians in stochmi.layers.deep)
        with torch.set_grad_enabled(parent.requires_grad):
            mean = self._mean(l, parent)
        return dist.Normal(mean, self.sigmas[l]).to_event(1)


class NoisyMLP(_NoiseInjectedNet):
    """Noise-injected MLP (``kind = "noisy_mlp"``); see the module docstring for the maths.

    Parameters
    ----------
    spec : ModelSpec
        ``[model] hidden, activation, input_dim, n_classes, pca_components``,
        ``[noise] sigma, where``.
    """

    kind = "noisy_mlp"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        hidden = list(spec.get("model.hidden"))
        d_in = self._set_input_transform(spec)
        dims = [d_in] + hidden
        self.hidden_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], self.n_classes)
        self.layer_sites = [f"h{i + 1}" for i in range(len(hidden))]
        self.layer_dims = dict(zip(self.layer_sites, hidden))
        self.sigmas = spec.sigmas(len(hidden))

    def _mean(self, l: int, parent: torch.Tensor) -> torch.Tensor:
        if l == 0:
            a = self.input_transform(parent) if self.input_transform is not None else parent
        else:
            a = parent if self.post_activation else self._act(parent)
        z = self.hidden_layers[l](a)
        return self._act(z) if self.post_activation else z

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(h if self.post_activation else self._act(h))

    def forward(self, x, y=None, *, n_total=None, register_layers=True):
        """Run the network; returns the logits ``(N, n_classes)``.

        Parameters
        ----------
        x : (N, input_dim) tensor
        y : (N,) int64 tensor, optional
            Observed labels for site ``"y"``.
        n_total : int, optional
            Size of the full data set when ``x`` is a minibatch: the plate then
            subsamples and Pyro scales the log-likelihood by ``n_total / N``.
        register_layers : bool
            True: the layers are ``pyro.sample`` sites ``h1..hL``.  False: noise
            is drawn by reparameterised sampling without sites (training).
        """
        return self._noisy_forward(x, y, n_total, register_layers)

    def conditional(self, site: str, parent: torch.Tensor) -> dist.Independent:
        """The channel ``p(h_l | h_{l-1} = parent)``: ``Normal(f_l(parent), sigma_l).to_event(1)``.

        ``parent`` is ``x`` ``(N, input_dim)`` for ``"h1"``, else the previous
        site's value ``(N, d_{l-1})``.  Batch shape ``(N,)``, event ``(d_l,)``.
        """
        return self._noisy_conditional(site, parent)


# ----------------------------------------------------------------------------- noisy CNN


class NoisyCNN(_NoiseInjectedNet):
    """Noise-injected CNN (``kind = "noisy_cnn"``).

    Blocks ``conv(k x k, valid) -> act -> maxpool(pool) -> + sigma Z`` give the
    sites ``h1 .. h_C`` (flattened ``(N, C_l * H_l * W_l)``), then dense
    post-activation noisy layers ``h_{C+1} ..``, then the logits.
    """

    kind = "noisy_cnn"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        channels = list(spec.get("model.conv_channels"))
        hidden = list(spec.get("model.hidden"))
        ksz = int(spec.get("model.kernel_size"))
        self.pool = int(spec.get("model.pool"))
        size = int(spec.get("model.image_size"))
        self.image_size = size
        convs, shapes = [], []
        c_in = 1
        for c in channels:
            convs.append(nn.Conv2d(c_in, c, ksz))
            size = (size - ksz + 1) // self.pool
            shapes.append((c, size, size))
            c_in = c
        self.convs = nn.ModuleList(convs)
        self.conv_shapes = shapes
        flat = [c * s * s for c, s, _ in shapes]
        dims = [flat[-1]] + hidden
        self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = nn.Linear(dims[-1], self.n_classes)
        n = len(channels) + len(hidden)
        self.layer_sites = [f"h{i + 1}" for i in range(n)]
        self.layer_dims = dict(zip(self.layer_sites, flat + hidden))
        self.sigmas = spec.sigmas(n)

    def _mean(self, l: int, parent: torch.Tensor) -> torch.Tensor:
        n = parent.shape[0]
        n_conv = len(self.convs)
        if l < n_conv:
            if l == 0:
                inp = parent.reshape(n, 1, self.image_size, self.image_size)
            else:
                inp = parent.reshape(n, *self.conv_shapes[l - 1])
            out = F.max_pool2d(self._act(self.convs[l](inp)), self.pool)
            return out.flatten(1)
        return self._act(self.dense[l - n_conv](parent))

    def forward(self, x, y=None, *, n_total=None, register_layers=True):
        """Run the network; returns logits ``(N, n_classes)`` (arguments as :class:`NoisyMLP`)."""
        return self._noisy_forward(x, y, n_total, register_layers)

    def conditional(self, site: str, parent: torch.Tensor) -> dist.Independent:
        """``p(h_l | h_{l-1} = parent) = Normal(f_l(parent), sigma_l).to_event(1)``, batch (N,)."""
        return self._noisy_conditional(site, parent)


# ----------------------------------------------------------------------------- Bayesian MLP


class BayesLinear(PyroModule):
    """Linear layer with Bayesian weights, prior ``Normal(0, prior_scale)`` on every entry.

    ``weight`` ``(d_out, d_in)`` and ``bias`` ``(d_out,)`` are ``PyroSample`` sites.
    """

    def __init__(self, d_in: int, d_out: int, prior_scale: float):
        super().__init__()
        self.d_in, self.d_out = int(d_in), int(d_out)
        self.register_buffer("prior_scale", torch.tensor(float(prior_scale)))
        self.weight = PyroSample(BayesLinear._weight_prior)
        self.bias = PyroSample(BayesLinear._bias_prior)

    def _prior(self, shape):
        s = self.prior_scale
        return dist.Normal(torch.zeros((), dtype=s.dtype, device=s.device), s).expand(shape)

    def _weight_prior(self):
        return self._prior([self.d_out, self.d_in]).to_event(2)

    def _bias_prior(self):
        return self._prior([self.d_out]).to_event(1)

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return F.linear(a, self.weight, self.bias)


class MeanFieldGuide(PyroModule):
    """Mean-field Gaussian guide ``q(W) = prod_sites Normal(loc, scale)`` over weight sites.

    The parameters are ordinary ``nn.Parameter`` objects owned by this module
    (``loc`` and ``raw_scale`` with ``scale = softplus(raw_scale)``), not entries
    of Pyro's global param store, so several guides can coexist; optimise
    ``guide.parameters()`` with a torch optimiser and save ``guide.state_dict()``.

    Parameters
    ----------
    sites : list of (name, shape)
        Weight site names (e.g. ``"layers.0.weight"``) and shapes.
    init_scale : float
        Initial posterior standard deviation of every weight.  Small (0.01 by
        default) so that SVI starts from a nearly deterministic network: with
        a large initial scale the weight noise would dominate the first
        gradients and the ELBO would start in the prior-dominated regime.
    seed : int or None
        Seed of the initial locations, drawn as in ``nn.Linear``:
        ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
    """

    def __init__(self, sites, init_scale: float = 0.01, *, seed: int | None = 0):
        super().__init__()
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        g = make_generator(seed)[0]
        self.site_names = [name for name, _ in sites]
        self.site_shapes = {name: tuple(shape) for name, shape in sites}
        self.locs = nn.ParameterDict()
        self.raw_scales = nn.ParameterDict()
        raw = math.log(math.expm1(init_scale))
        fan_in = {}
        for name, shape in sites:
            if name.endswith(".weight"):
                fan_in[name.rsplit(".", 1)[0]] = shape[-1]
        for name, shape in sites:
            bound = 1.0 / math.sqrt(fan_in.get(name.rsplit(".", 1)[0], shape[-1]))
            loc = (torch.rand(shape, generator=g) * 2 - 1) * bound
            key = self._key(name)
            self.locs[key] = nn.Parameter(loc)
            self.raw_scales[key] = nn.Parameter(torch.full(shape, raw))

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def loc_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior ``(loc, scale)`` of weight site ``name`` (same shape as the weight)."""
        if name not in self.site_shapes:
            raise KeyError(f"guide has no site {name!r}; sites: {self.site_names}")
        key = self._key(name)
        locs = self.__dict__["_modules"]["locs"]
        raws = self.__dict__["_modules"]["raw_scales"]
        return locs[key], F.softplus(raws[key])

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Sample every weight site; returns ``{name: value}``.  Arguments are ignored."""
        out = {}
        with _local_params():
            for name in self.site_names:
                loc, scale = self.loc_scale(name)
                out[name] = pyro.sample(name, dist.Normal(loc, scale).to_event(loc.dim()))
        return out

    def median(self) -> dict[str, torch.Tensor]:
        """Posterior medians (the locs), detached."""
        return {name: self.loc_scale(name)[0].detach() for name in self.site_names}


class BayesMLP(StochasticNet):
    """Bayesian MLP (``kind = "bayes_mlp"``) with mean-field Gaussian guide.

    Layers ``layers.0 .. layers.{L-1}`` are hidden, ``layers.L`` gives the
    logits.  Sites: weights ``"layers.{i}.weight"`` ``(d_out, d_in)`` and
    ``"layers.{i}.bias"`` ``(d_out,)`` (global, sampled before the data plate);
    ``h_l = W_l a_{l-1} + b_l (+ sigma Z)`` inside the plate.
    """

    kind = "bayes_mlp"

    def __init__(self, spec: ModelSpec):
        super().__init__(spec)
        hidden = list(spec.get("model.hidden"))
        d_in = self._set_input_transform(spec)
        dims = [d_in] + hidden + [self.n_classes]
        scale = float(spec.get("prior.scale"))
        fan_in = bool(spec.get("prior.fan_in"))
        #: prior standard deviation of each layer's weights and biases
        self.prior_scales = [scale / math.sqrt(a) if fan_in else scale for a in dims[:-1]]
        self.init_scale = float(spec.get("guide.init_scale"))
        self.layers = PyroModule[nn.ModuleList](
            [BayesLinear(a, b, s) for a, b, s in zip(dims[:-1], dims[1:], self.prior_scales)]
        )
        self.layer_sites = [f"h{i + 1}" for i in range(len(hidden))]
        self.layer_dims = dict(zip(self.layer_sites, hidden))
        self.sigmas = spec.sigmas(len(hidden))
        self._dims = dims

    @property
    def weight_sites(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(name, shape)]`` of the global weight sites, in execution order."""
        out = []
        for i, (a, b) in enumerate(zip(self._dims[:-1], self._dims[1:])):
            out.append((f"layers.{i}.weight", (b, a)))
            out.append((f"layers.{i}.bias", (b,)))
        return out

    def make_guide(self, *, seed: int | None = 0) -> MeanFieldGuide:
        """Mean-field Normal guide over the weight sites only (``init_scale`` from the spec)."""
        guide = MeanFieldGuide(self.weight_sites, self.init_scale, seed=seed)
        p = next(iter(self.buffers()), None)
        return guide.to(p.device) if p is not None else guide

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_transform(x) if self.input_transform is not None else x

    def forward(self, x, y=None, *, n_total=None, register_layers=True, transformed_input=False):
        """Run the network; returns logits ``(N, n_classes)`` (arguments as :class:`NoisyMLP`).

        All weights are sampled first (outside the data plate), then the layers.
        With ``transformed_input=True``, ``x`` is already the PCA projection
        ``(N, pca_components)`` (saves the projection in repeated calls, e.g. NUTS).
        """
        if transformed_input:
            if self.input_transform is None:
                raise ValueError("transformed_input=True needs a model with a PCA input")
            self._check_inputs(x, y, dim=self._dims[0])
        else:
            self._check_inputs(x, y)
        with _local_params():
            weights = [(layer.weight, layer.bias) for layer in self.layers]
            with self._plate(x.shape[0], n_total, x.device):
                a = x if transformed_input else self._input(x)
                for l, site in enumerate(self.layer_sites):
                    w, b = weights[l]
                    h = self._layer(site, F.linear(a, w, b), self.sigmas[l], register_layers)
                    a = self._act(h)
                w, b = weights[-1]
                logits = F.linear(a, w, b)
                self._observe(logits, y)
        return logits

    def _parent_activation(self, l: int, parent: torch.Tensor) -> torch.Tensor:
        return self._input(parent) if l == 0 else self._act(parent)

    def local_reparam_conditional(
        self, site: str, parent: torch.Tensor, guide: MeanFieldGuide | None
    ) -> dist.Independent:
        """Exact weight-marginal channel ``p(h_l | parent)`` under the mean-field posterior.

        With ``a = x`` (or its PCA projection) for ``l = 1`` and ``a = act(parent)``
        otherwise, and the guide's ``W ~ N(M, S^2)``, ``b ~ N(m_b, s_b^2)`` drawn
        independently per example,

            h_l | a ~ N(M a + m_b, diag(S^2 a^2 + s_b^2 + sigma^2))

        (local reparameterisation, Kingma et al. 2015).  With ``guide=None`` the
        prior is used (``M = 0``, ``S = s_b =`` the layer's prior scale).  This makes
        the net a :class:`stochmi.layers.links.LocalReparamModel`.

        Parameters
        ----------
        site : str
            ``"h1" .. "hL"``.
        parent : torch.Tensor
            ``(N, input_dim)`` for ``"h1"``, else ``(N, d_{l-1})`` values of the
            previous site (pre-activations).
        guide : MeanFieldGuide or None

        Returns
        -------
        torch.distributions.Independent
            ``Normal`` with batch shape ``(N,)`` and event shape ``(d_l,)``.
        """
        l = self._site_index(site)
        if parent.dim() != 2:
            raise ValueError(f"parent must be (N, d), got shape {tuple(parent.shape)}")
        with torch.set_grad_enabled(parent.requires_grad):
            a = self._parent_activation(l, parent)
            if a.shape[1] != self._dims[l]:
                raise ValueError(
                    f"parent of {site} must give {self._dims[l]} features, got {a.shape[1]}"
                )
            if guide is None:
                s = self.prior_scales[l]
                mean = torch.zeros(a.shape[0], self._dims[l + 1], dtype=a.dtype, device=a.device)
                var = (a * a).sum(1, keepdim=True) * s**2 + s**2 + mean
            else:
                M, S = guide.loc_scale(f"layers.{l}.weight")
                mb, sb = guide.loc_scale(f"layers.{l}.bias")
                mean = F.linear(a, M, mb)
                var = F.linear(a * a, S * S, sb * sb)
            var = var + self.sigmas[l] ** 2
        return dist.Normal(mean, var.sqrt()).to_event(1)

    def conditional(
        self, site: str, parent: torch.Tensor, weights: dict[str, torch.Tensor]
    ) -> dist.Independent:
        """Channel given fixed weights: ``p(h_l | parent, W) = N(W a + b, sigma^2 I)``.

        Needs ``sigma > 0`` (else the layer is deterministic given ``W``).
        ``weights`` maps ``"layers.{l}.weight"``/``"layers.{l}.bias"`` to values.
        """
        l = self._site_index(site)
        if self.sigmas[l] <= 0:
            raise ValueError(
                f"{site} has no injected noise (sigma = 0): given the weights it is a "
                "deterministic function of its parent, so the conditional has no density"
            )
        with torch.set_grad_enabled(parent.requires_grad):  # differentiable in the parent
            a = self._parent_activation(l, parent)
            w, b = weights[f"layers.{l}.weight"].detach(), weights[f"layers.{l}.bias"].detach()
            mean = F.linear(a, w, b)
        return dist.Normal(mean, self.sigmas[l]).to_event(1)


def _make_pca(spec: ModelSpec) -> PCAProjection:
    k = int(spec.get("model.pca_components"))
    mean, comps, scale, _ = _pca_for_source(spec.get("model.pca_source"), k)
    return PCAProjection(mean, comps, scale)


_KINDS = {"noisy_mlp": NoisyMLP, "noisy_cnn": NoisyCNN, "bayes_mlp": BayesMLP}


def build_model(spec, *, seed: int | None = 0, overrides=None) -> StochasticNet:
    """Build the network a spec describes.

    Parameters
    ----------
    spec : ModelSpec, str or path
        A spec, or a name/path for :func:`stochmi.models.spec.load_spec`.
    seed : int or None
        Seed of the deterministic weights' initialisation (noisy nets; ``None``: a
        fresh seed); the global RNG is left as it was.
    overrides : dict or list of str, optional
        Applied when ``spec`` is a name or path.

    Returns
    -------
    StochasticNet
        A :class:`NoisyMLP`, :class:`NoisyCNN` or :class:`BayesMLP`.
    """
    spec = load_spec(spec, overrides)
    cls = _KINDS[spec.kind]
    with rng_context(resolve_seed(seed)):
        return cls(spec)
