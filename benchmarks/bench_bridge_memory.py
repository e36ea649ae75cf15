"""Peak memory of a bridged deep-layer round against ``bridge_bytes``, the estimate that
``layer_mi`` checks before running one.

Each case runs in its own process: an untrained reference network (noise sigma 1),
``N`` shared MNIST test images, one draw of every layer, then ``deep_log_density`` for
``X -> target`` with the settings of the first bridged round of ``layer_mi``'s defaults
(32 forward paths and 4 bridged draws per source, the bridged round's subsample sizes;
``n_paths = 4`` gives 8 and 2), for
32 queries at every source.  The resident set size is sampled every 10 ms.  Prints a
markdown table.

    python benchmarks/bench_bridge_memory.py        # noisy_mlp, N = 1,000 to 4,000 (~4 min)
    python benchmarks/bench_bridge_memory.py --cnn  # + a wide noisy_cnn, N = 250 (10.5 GiB)

The ``--cnn`` cases use the ``noisy_cnn`` spec with 16 and 32 channels (relu, maps of
2,304 and 512 units), wider than the shipped spec, because that is where the bridged
round's memory decides whether it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import stochmi  # noqa: E402
from stochmi.layers.chain import Chain  # noqa: E402
from stochmi.layers.deep import bridge_bytes, deep_log_density, normal_params  # noqa: E402
from stochmi.layers.estimation import SUBSAMPLE  # noqa: E402

GIB = 2**30
# the CNN case measures wide conv maps (2,304 and 512 units), where the memory matters
OVERRIDES = {
    "noisy_cnn": {
        "model.conv_channels": [16, 32],
        "model.hidden": [128],
        "model.activation": "relu",
    }
}


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def run_case(name: str, n: int, target: str, n_fwd: int, n_br: int) -> dict:
    """One bridged call; returns its measured peak and the estimate."""
    spec = stochmi.load_spec(name, overrides={"noise.sigma": 1.0, **OVERRIDES.get(name, {})})
    model = stochmi.build_model(spec, seed=0)
    x = stochmi.load_mnist("shared-test", n=n, seed=1).x
    sites = model.layer_sites
    l = sites.index(target)
    gen = torch.Generator().manual_seed(0)
    chain = Chain(model, x, sites[: l + 1], [], [], 1, "single", None, gen)
    links = [lambda p, s=s: model.conditional(s, p) for s in sites[1 : l + 1]]
    loc, scale = normal_params(chain.conds[0])
    values = [v.reshape(n, -1) for v in chain.values]
    widths = [int(v.shape[1]) for v in values[:l]]
    d_last = int(values[l].shape[1])
    base = _rss()
    peak, stop = [base], [False]

    def monitor():
        while not stop[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    th = threading.Thread(target=monitor)
    th.start()
    t0 = time.perf_counter()
    deep_log_density(
        loc,
        scale,
        links,
        values[l],
        values[:l],
        n_is=64,
        n_fwd=n_fwd,
        n_bridge=n_br,
        n_top=SUBSAMPLE[True][0],
        n_random=SUBSAMPLE[True][1],
        generator=torch.Generator().manual_seed(2),
        rows=torch.arange(32),
    )
    secs = time.perf_counter() - t0
    stop[0] = True
    th.join()
    n_top, n_random = SUBSAMPLE[True]
    est = bridge_bytes(
        n, widths, d_last, n_bridge=n_br, n_fwd=n_fwd, n_top=n_top, n_random=n_random
    )
    return dict(
        model=name,
        pair=f"X->{target}",
        n=n,
        widths=widths,
        d_last=d_last,
        n_fwd=n_fwd,
        n_br=n_br,
        peak=(peak[0] - base) / GIB,
        est=est / GIB,
        secs=secs,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cnn", action="store_true", help="also a wide noisy_cnn at N = 250")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    args = ap.parse_args()
    torch.set_num_threads(2)
    if args.case:
        print(json.dumps(run_case(*json.loads(args.case))))
        return
    cases = [("noisy_mlp", n, t, 32, 4) for n in (1000, 2000, 4000) for t in ("h2", "h3")]
    if args.cnn:
        cases += [("noisy_cnn", 250, t, 8, 2) for t in ("h2", "h3")]
    print(
        "| model | pair | N | intermediate widths / d_L | K / n_bridge | peak extra (GiB) "
        "| bridge_bytes (GiB) | peak / estimate | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        out = subprocess.run(
            [sys.executable, __file__, "--case", json.dumps(case)],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"| {r['model']} | {r['pair']} | {r['n']:,} | {r['widths']} / {r['d_last']} "
            f"| {r['n_fwd']} / {r['n_br']} | {r['peak']:.2f} | {r['est']:.2f} "
            f"| {r['peak'] / r['est']:.2f} | {r['secs']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
