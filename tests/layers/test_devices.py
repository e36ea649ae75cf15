"""Every tensor and generator that ``layer_mi`` and ``weight_mi`` make is on the input device.

On a CPU-only machine every device is ``"cpu"``, so a device mix-up (a tensor made on
the default device and then filled with, or combined with, the input's tensors; a CPU
generator driving draws for a CUDA tensor) cannot fail by running.  These tests record
instead.  While ``layer_mi`` runs,

* a :class:`~torch.overrides.TorchFunctionMode` sees every tensor factory call
  (``torch.empty``, ``zeros``, ``ones``, ``full``, ``arange``, ``eye``, ``randn``,
  ``rand``, ``randint``, ``randperm``, ``tensor``, ``as_tensor``, ``linspace``, ...;
  factories with no tensor argument go through the mode too), and
* ``torch.Generator`` is replaced by a recording subclass (stochmi looks the name up
  at call time, so patching the attribute of the ``torch`` module reaches it).

A call made directly from a file of the ``stochmi`` package passes when it names its
device: ``device=`` given, not ``None`` and not a string literal such as ``"cpu"``
(the input's device is a :class:`torch.device`).  ``tensor`` / ``as_tensor`` /
``asarray`` of an existing tensor and ``normal`` with a tensor argument inherit the
device and pass; ``*_like`` and ``Tensor.new_*`` calls are not factories here.  Every
``torch.Generator`` made from stochmi must be given a device.  Calls from torch, Pyro
or the test's own model are not checked.  A failure lists each offending
``file:line`` in stochmi, what was called, and the stochmi frames that led there.

The runs cover every kind of pair on a Pyro noise-injected chain of three Gaussian
layers: direct (``X -> h1``, adjacent layers), deep (``X -> h2``, ``X -> h3``), label
(``h_l -> Y``) and non-adjacent (``h1 -> h3``) pairs; the deep estimator's bridged
round and subsampled sources; models with global weight sites (mixture over prior
draws, and the conditional mode with a guide); and a narrowed ``noisy_mlp``.  The same
check covers ``weight_mi`` (the posterior estimate and the one over the draws as sources).  The
normals that the kernel would draw on a helper thread are drawn on the calling thread
here, where the mode is active.  Each test takes well under two seconds.
"""

from __future__ import annotations

import inspect
import math
import os
import sys
from collections import Counter

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.overrides import TorchFunctionMode

import stochmi
from stochmi.core import kernel

PKG = os.path.realpath(os.path.dirname(stochmi.__file__)) + os.sep
ROOT = os.path.dirname(os.path.dirname(PKG))

#: factory functions that take a ``device=`` argument and need no tensor input
FACTORIES = {
    torch.empty,
    torch.empty_strided,
    torch.zeros,
    torch.ones,
    torch.full,
    torch.arange,
    torch.range,
    torch.eye,
    torch.randn,
    torch.rand,
    torch.randint,
    torch.randperm,
    torch.normal,
    torch.tensor,
    torch.as_tensor,
    torch.asarray,
    torch.scalar_tensor,
    torch.linspace,
    torch.logspace,
    torch.tril_indices,
    torch.triu_indices,
}
#: factories whose tensor input carries its device along
INHERITS_FROM_TENSOR_INPUT = {torch.tensor, torch.as_tensor, torch.asarray, torch.normal}

_FILE_CACHE: dict[str, str | None] = {}


def _pkg_path(filename: str) -> str | None:
    """``stochmi/...`` for a file of the package, else None."""
    if filename not in _FILE_CACHE:
        real = os.path.realpath(filename)
        _FILE_CACHE[filename] = os.path.relpath(real, ROOT) if real.startswith(PKG) else None
    return _FILE_CACHE[filename]


def _stochmi_stack(frame, depth: int = 3) -> list[str] | None:
    """``file:line in function`` for the caller and up to ``depth - 1`` further stochmi
    frames above it; None when the caller itself is not in stochmi."""
    while frame is not None and frame.f_code.co_filename == torch.overrides.__file__:
        frame = frame.f_back
    if frame is None or _pkg_path(frame.f_code.co_filename) is None:
        return None
    out = []
    while frame is not None and len(out) < depth:
        rel = _pkg_path(frame.f_code.co_filename)
        if rel is not None:
            out.append(f"{rel}:{frame.f_lineno} in {frame.f_code.co_name}")
        frame = frame.f_back
    return out


def _device_problem(given: bool, value) -> str | None:
    if not given:
        return "no device="
    if value is None:
        return "device=None"
    if isinstance(value, str):
        return f"device={value!r} (a string literal, not the input's device)"
    return None


class DeviceRecorder(TorchFunctionMode):
    """Records factory calls and generators made from stochmi; see the module docstring.

    ``calls``: every recorded factory call from stochmi, as ``(stack, name, problem)``,
    ``problem`` None when the call names its device.  ``generators``: the same for
    every ``torch.Generator`` made from stochmi while the recorder is installed.
    """

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[list[str], str, str | None]] = []
        self.generators: list[tuple[list[str], str, str | None]] = []
        self.generator_class = self._make_generator_class()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            self._record_factory(func, args, kwargs)
        return func(*args, **kwargs)

    def _record_factory(self, func, args, kwargs):
        stack = _stochmi_stack(sys._getframe(2))
        if stack is None:
            return
        if func in INHERITS_FROM_TENSOR_INPUT and (
            (args and isinstance(args[0], torch.Tensor))
            or (func is torch.normal and any(isinstance(a, torch.Tensor) for a in args))
        ):
            problem = None
        else:
            problem = _device_problem("device" in kwargs, kwargs.get("device"))
        self.calls.append((stack, f"torch.{func.__name__}", problem))

    def _make_generator_class(self):
        base = torch.Generator
        recorder = self

        class _Meta(type(base)):
            def __instancecheck__(cls, obj):  # isinstance(g, torch.Generator) as before
                return isinstance(obj, base)

            def __subclasscheck__(cls, sub):
                return issubclass(sub, base)

        class RecordingGenerator(base, metaclass=_Meta):
            def __new__(cls, *args, **kwargs):
                stack = _stochmi_stack(sys._getframe(1))
                if stack is not None:
                    given = bool(args) or "device" in kwargs
                    value = args[0] if args else kwargs.get("device")
                    problem = _device_problem(given, value)
                    recorder.generators.append((stack, "torch.Generator", problem))
                return base.__new__(cls, *args, **kwargs)

        return RecordingGenerator

    def offences(self) -> list[str]:
        """One line per offending location (with how often it was hit)."""
        hits = Counter()
        callers: dict[tuple[str, str, str], set[str]] = {}
        for stack, name, problem in self.calls + self.generators:
            if problem is None:
                continue
            key = (stack[0], name, problem)
            hits[key] += 1
            callers.setdefault(key, set()).add(" <- ".join(stack[1:]))
        lines = []
        for key in sorted(hits):
            where, name, problem = key
            via = "; ".join(sorted(c for c in callers[key] if c))
            lines.append(
                f"{where}: {name} ({problem}), {hits[key]}x" + (f"  [via {via}]" if via else "")
            )
        return lines

    def files_seen(self) -> set[str]:
        return {stack[0].split(":")[0] for stack, _, _ in self.calls + self.generators}


@pytest.fixture
def recorder(monkeypatch):
    rec = DeviceRecorder()
    monkeypatch.setattr(torch, "Generator", rec.generator_class)
    monkeypatch.setattr(kernel, "_PREFETCH", False)  # the mode is per thread
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small problems: one thread is fastest and disturbs no one
    yield rec
    torch.set_num_threads(threads)


def _assert_no_offences(rec: DeviceRecorder):
    bad = rec.offences()
    assert not bad, (
        f"{len(bad)} tensor factory / generator call sites in stochmi do not name the "
        "input's device:\n  " + "\n  ".join(bad)
    )


class TanhChain:
    """x -> h1 = tanh(x A1) + s1 Z1 -> h2 = tanh(h1 A2) + s2 Z2 -> h3 (Pyro model)."""

    def __init__(self, widths=(3, 4, 4, 3), sigmas=(0.5, 0.6, 0.4), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A = [
            torch.randn(widths[k], widths[k + 1], generator=g, dtype=torch.float64)
            * (1.5 / math.sqrt(widths[k]))
            for k in range(len(widths) - 1)
        ]
        self.s = list(sigmas)

    def __call__(self, x):
        h = x
        with pyro.plate("data", x.shape[0]):
            for k, (a, s) in enumerate(zip(self.A, self.s)):
                h = pyro.sample(f"h{k + 1}", dist.Normal(torch.tanh(h @ a), s).to_event(1))
        return h


def _data(n=60, d=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def test_recorder_flags_calls_without_a_device(recorder):
    """The recorder itself: code compiled as a stochmi file is checked, the rest is not."""
    src = (
        "x = torch.zeros(3, dtype=torch.float64, device=dev)\n"  # fine
        "torch.empty(2, 2)\n"  # no device
        "torch.arange(4, device=None)\n"  # device=None
        "torch.full((2,), 1.0, device='cpu')\n"  # string literal
        "torch.as_tensor(x)\n"  # inherits from its tensor input
        "torch.zeros_like(x)\n"  # not a factory here
        "torch.randn(2, generator=torch.Generator(device=dev), device=dev)\n"  # fine
        "torch.Generator()\n"  # no device
    )
    fake = os.path.join(PKG, "layers", "_recorder_check.py")
    with recorder:
        exec(compile(src, fake, "exec"), {"torch": torch, "dev": torch.device("cpu")})
        torch.empty(3)  # from this test file: not checked
    bad = recorder.offences()
    assert [b.split(" ")[0] for b in bad] == [
        "stochmi/layers/_recorder_check.py:2",
        "stochmi/layers/_recorder_check.py:3",
        "stochmi/layers/_recorder_check.py:4",
        "stochmi/layers/_recorder_check.py:8",
    ], bad
    assert len(recorder.calls) == 6 and len(recorder.generators) == 2
    assert isinstance(torch.default_generator, torch.Generator)


def test_chain_with_labels_makes_everything_on_the_input_device(recorder):
    """Default pairs with labels: X -> h1..h3 (deep for h2, h3), h1 -> h2 -> h3, h_l -> Y."""
    x, y = _data()
    with recorder:
        df = stochmi.layer_mi(TanhChain(), x, y, seed=0)
    assert list(zip(df.source, df.target)) == [
        ("X", "h1"),
        ("X", "h2"),
        ("X", "h3"),
        ("h1", "h2"),
        ("h2", "h3"),
        ("h1", "Y"),
        ("h2", "Y"),
        ("h3", "Y"),
    ]
    seen = recorder.files_seen()
    assert {"stochmi/layers/deep.py", "stochmi/layers/estimation.py"} <= seen, seen
    _assert_no_offences(recorder)


def test_non_adjacent_pair_makes_everything_on_the_input_device(recorder):
    x, _ = _data()
    with recorder:
        df = stochmi.layer_mi(TanhChain(), x, pairs=[("h1", "h3")], seed=0)
    assert list(zip(df.source, df.target)) == [("h1", "h3")]
    assert "stochmi/layers/deep.py" in recorder.files_seen()
    _assert_no_offences(recorder)


def test_bridged_draws_and_subsampled_sources_make_everything_on_the_input_device(
    recorder, monkeypatch
):
    """The deep estimator's other branches: a tolerance no first round meets sends every
    deep row to a second, bridged round, and a small ``n_top`` / ``n_random`` in both
    rounds (at large ``N`` the defaults do the same) makes the sources subsampled per
    block of queries."""
    from stochmi.layers import deep, estimation

    monkeypatch.setattr(estimation, "SUBSAMPLE", {False: (2, 8), True: (2, 8)})
    x, y = _data(n=150)
    with recorder:
        df = stochmi.layer_mi(
            TanhChain(),
            x,
            y,
            pairs=[("X", "h3"), ("h1", "h3"), ("h3", "Y")],
            seed=0,
            tolerance=1e-9,
            max_effort=2,
            n_paths=8,
            n_is=8,
        )
    assert len(df) == 3 and df["k_paths"].max() == 16  # the second round ran
    calls = {stack[0].split(" in ")[1] for stack, _, _ in recorder.calls}
    assert {"_select_sources", "_rank_sources"} <= calls, calls  # subsampled
    src, first = inspect.getsourcelines(deep._Bridge)
    bridge_lines = {f"stochmi/layers/deep.py:{first + i}" for i in range(len(src))}
    seen = {stack[0].split(" in ")[0] for stack, _, _ in recorder.calls}
    assert seen & bridge_lines, seen  # bridged draws
    _assert_no_offences(recorder)


class BayesChain:
    """Global weights ``w_k`` (prior N(0, 1), or a fixed Gaussian guide) and noise:
    ``h_k = tanh(h_{k-1} w_k) + s_k Z``, three layers."""

    def __init__(self, widths=(3, 4, 4, 3), sigmas=(0.5, 0.6, 0.4), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.M = [
            torch.randn(widths[k], widths[k + 1], generator=g, dtype=torch.float64)
            / math.sqrt(widths[k])
            for k in range(len(widths) - 1)
        ]
        self.s = list(sigmas)

    def __call__(self, x):
        ws = [
            pyro.sample(f"w{k + 1}", dist.Normal(torch.zeros_like(m), 1.0).to_event(2))
            for k, m in enumerate(self.M)
        ]
        h = x
        with pyro.plate("data", x.shape[0]):
            for k, (w, s) in enumerate(zip(ws, self.s)):
                h = pyro.sample(f"h{k + 1}", dist.Normal(torch.tanh(h @ w), s).to_event(1))
        return h

    def guide(self, x):
        for k, m in enumerate(self.M):
            pyro.sample(f"w{k + 1}", dist.Normal(m, 0.3).to_event(2))


@pytest.mark.parametrize("weights, guide", [("marginal", False), ("conditional", True)])
def test_chain_with_weight_sites_makes_everything_on_the_input_device(recorder, weights, guide):
    """Global weight sites: a mixture over prior weight draws (nested Monte Carlo paths),
    and the conditional mode (per draw from the guide)."""
    m = BayesChain()
    x, y = _data(n=40)
    with recorder:
        df = stochmi.layer_mi(
            m,
            x,
            y,
            guide=m.guide if guide else None,
            weights=weights,
            seed=0,
            n_weight_draws=4,
            n_paths=4,
            max_effort=1,
        )
    assert len(df) == 8
    _assert_no_offences(recorder)


def test_noisy_mlp_makes_everything_on_the_input_device(recorder):
    """The reference ``noisy_mlp`` (narrowed to 16-8-6, noise 1), default pairs with labels:
    its own forward pass is stochmi code and is checked too."""
    spec = stochmi.load_spec(
        "noisy_mlp", overrides={"noise.sigma": 1.0, "model.hidden": [16, 8, 6]}
    )
    model = stochmi.build_model(spec, seed=0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, model.input_dim, generator=g)
    y = torch.randint(0, model.n_classes, (40,), generator=g)
    with recorder:
        df = stochmi.layer_mi(model, x, y, seed=0)
    assert len(df) == 8 and "stochmi/layers/deep.py" in recorder.files_seen()
    _assert_no_offences(recorder)


def test_weight_mi_makes_everything_on_the_input_device(recorder):
    """weight_mi on a mean-field chain with a closed-form weight marginal (first layer
    exact, the deeper one by own-source importance sampling, both chains, the moment
    Gaussian) and on a generic Pyro model (the estimate over the draws as sources)."""
    from stochmi.layers.weights import weight_mi
    from tests.layers.meanfield import MeanFieldChain, make_guide

    dims = [2, 3, 2]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 2, generator=g)
    model, guide = MeanFieldChain(dims, [0.5, 0.3]), make_guide(dims, 1.0, 0.4, 1)

    def generic(x):  # the same chain, without local_reparam_conditional
        return model(x)

    with recorder:
        df = weight_mi(model, x, guide=guide, seed=0, n_weight_draws=4, chain_rule=False)
        dg = weight_mi(generic, x[:6], guide=guide, seed=0, n_weight_draws=4, chain_rule=False)
    assert df["method"].tolist() == ["exact densities", "importance sampling"]
    assert dg["method"].str.contains("capped at log M").all()
    seen = recorder.files_seen()
    assert {"stochmi/layers/epistemic.py", "stochmi/layers/deep.py"} <= seen, seen
    _assert_no_offences(recorder)
