"""Precision-adaptive kernel: the full estimate against float32 / float64 GEMM floors.

Runs on CUDA when it is present (``--device auto``, the default), else on the CPU, the
same cases as ``bench_core.py``: a Gaussian channel ``p(t | s_i) = N(mu_i, sigma^2 I)``,
``mu_i ~ N(0, I_d)``, ``sigma = sqrt(d) / 2`` (MI about 2 nats, not saturated), or each of
``--sigmas``.  For each ``(N, d, sigma)``, in one process, interleaved and best of
``--repeats``:

* ``f32`` / ``tf32`` / ``f64``: one ``(N x d) @ (d x N)`` matrix product in float32 (TF32
  off), TF32 (CUDA only) and float64: the floors;
* ``auto``: ``stochmi.mi_from_conditional(cond, seed=0, device=dev)`` -- draws, value,
  bracket and standard errors, default ``precision="auto"``;
* ``f64 est``: the same with ``precision="float64"``.

It prints one markdown table (times in seconds, ratios against the float32 floor -- best
of the repeats and median --, which blocks ran in which precision and how many rows had
their row shift redone, and the difference of the value and the upper bound from the
float64 estimate; rows whose leading entries were redone in float64 are counted as
"repaired") with the load average before and after each case.  ``--breakdown``
adds, for the largest case, where the time of one estimate goes (``torch.profiler``, self
time per op, against the float32 floor).

``--layer-mi [N]`` adds a section that times the whole ``stochmi.layer_mi`` (every
default pair with labels: ``X -> h1..h3``, the deep rows ``X -> h2`` and ``X -> h3``,
adjacent layers and ``h_l -> Y``) on the untrained ``noisy_mlp`` (noise sigma 1, seed 0)
with ``N`` shared test images (default 2,000), on the CPU and on the CUDA device when
there is one.  It prints seconds per device (best of ``--layer-mi-repeats``, default 1,
after a warm-up run on 200 images) and the largest difference of the ``value`` column
between the devices.  The CPU and CUDA generators give different numbers for one seed,
so the values differ by Monte Carlo noise: the report also gives that difference over
the rows' combined standard error.  Without CUDA the section runs on the CPU alone (with
a note).  ``--skip-kernel`` leaves out the estimator cases above.  Nothing here is a
test; no test needs a GPU.

Usage::

    python benchmarks/bench_gpu.py                         # CUDA if present, else CPU
    python benchmarks/bench_gpu.py --device cpu --threads 2 --sizes 1000 4000 10000 \
        --dims 64 256 1024 --repeats 3
    python benchmarks/bench_gpu.py --device cpu --threads 2 --sizes 10000 --dims 1024 \
        --repeats 5 --breakdown
    python benchmarks/bench_gpu.py --skip-kernel --layer-mi          # layer_mi, N = 2,000
    python benchmarks/bench_gpu.py --skip-kernel --layer-mi 500 --threads 2
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"


def _best(fn, sync, repeats: int) -> tuple[float, object]:
    out, best = None, math.inf
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run_case(n: int, d: int, device, repeats: int, sigma: float | None = None) -> dict:
    import torch
    from torch import distributions as td

    import stochmi

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    gen = torch.Generator().manual_seed(1234)
    loc = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)
    sig = 0.5 * math.sqrt(d) if sigma is None else sigma
    cond = td.Independent(td.Normal(loc, torch.tensor(sig, dtype=torch.float64, device=device)), 1)
    a32, b32 = loc.float(), loc.T.contiguous().float()
    bt = loc.T.contiguous()
    res: dict = {"n": n, "d": d, "sigma": sig, "load_before": _load()}
    flags = torch.backends.cuda.matmul if cuda else None
    old = flags.allow_tf32 if cuda else None

    def floor32():
        if cuda:
            flags.allow_tf32 = False
        return a32 @ b32

    def floor_tf32():
        flags.allow_tf32 = True
        return a32 @ b32

    try:
        stochmi.mi_from_conditional(cond, seed=0, device=device)  # warm-up (CUDA context etc.)
        t32, t_auto, t64, ttf = [], [], [], []
        est = est64 = None
        for _ in range(repeats):  # interleaved: floor, estimate, floor, ... (load drifts)
            t32.append(_best(floor32, sync, 1)[0])
            if cuda:
                ttf.append(_best(floor_tf32, sync, 1)[0])
                flags.allow_tf32 = old
            t, est = _best(lambda: stochmi.mi_from_conditional(cond, seed=0), sync, 1)
            t_auto.append(t)
        res["f64"] = _best(lambda: loc @ bt, sync, max(1, repeats - 1))[0]
        t, est64 = _best(
            lambda: stochmi.mi_from_conditional(cond, seed=0, precision="float64"),
            sync,
            max(1, repeats - 1),
        )
        t64.append(t)
    finally:
        if cuda:
            flags.allow_tf32 = old
    res.update(
        f32=min(t32),
        tf32=min(ttf) if ttf else None,
        auto=min(t_auto),
        ratio_med=_median(t_auto) / _median(t32),
        rescued=est.extra.get("rescued_rows", 0),
        repaired=est.extra.get("repaired_rows", 0),
        est64=min(t64),
        blocks=est.extra["blocks"],
        bound=est.extra["precision_bound"],
        dvalue=abs(est.value - est64.value),
        dupper=abs(est.upper - est64.upper),
        value=est.value,
        stderr=est.stderr,
        load_after=_load(),
    )
    return res


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    k = len(ys) // 2
    return ys[k] if len(ys) % 2 else 0.5 * (ys[k - 1] + ys[k])


def table(rows: list[dict]) -> str:
    lines = [
        "| N | d | sigma | f32 floor | tf32 floor | f64 floor | auto | f64 est | auto / f32 "
        "| auto / f32 (median) | f64 est / f32 | blocks | bound | abs dvalue | abs dupper "
        "| value ± se | load before; after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        tf = f"{r['tf32']:.3g}" if r["tf32"] is not None else "-"
        blocks = ", ".join(f"{k} {v}" for k, v in r["blocks"].items())
        if r["rescued"]:
            blocks += f" ({r['rescued']} rows reshifted)"
        if r["repaired"]:
            blocks += f" ({r['repaired']} rows repaired)"
        lines.append(
            f"| {r['n']} | {r['d']} | {r['sigma']:.3g} | {r['f32']:.3g} | {tf} "
            f"| {r['f64']:.3g} | {r['auto']:.3g} "
            f"| {r['est64']:.3g} | {r['auto'] / r['f32']:.2f} | {r['ratio_med']:.2f} "
            f"| {r['est64'] / r['f32']:.2f} | {blocks} | {r['bound']:.1e} | {r['dvalue']:.1e} "
            f"| {r['dupper']:.1e} | {r['value']:.4f} ± {r['stderr']:.4f} "
            f"| {r['load_before']}; {r['load_after']} |"
        )
    return "\n".join(lines)


def breakdown(n: int, d: int, device, top: int = 14) -> str:
    """Self time per torch op of one estimate (``torch.profiler``), against the floor."""
    import torch
    from torch import distributions as td
    from torch.profiler import ProfilerActivity, profile

    import stochmi
    from stochmi.core import kernel as kmod

    cuda = device.type == "cuda"
    gen = torch.Generator().manual_seed(1234)
    loc = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)
    cond = td.Independent(td.Normal(loc, 0.5 * math.sqrt(d)), 1)
    a32, b32 = loc.float(), loc.T.contiguous().float()
    # the profiler sees the main thread only: draw the normals there (no prefetch thread)
    prefetch = getattr(kmod, "_PREFETCH", None)
    if prefetch is not None:
        kmod._PREFETCH = False

    def sync():
        if cuda:
            torch.cuda.synchronize()

    stochmi.mi_from_conditional(cond, seed=0)  # warm-up
    floor = _best(lambda: a32 @ b32, sync, 3)[0]
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        stochmi.mi_from_conditional(cond, seed=0)
        sync()
        wall = time.perf_counter() - t0
    floor_after = _best(lambda: a32 @ b32, sync, 3)[0]
    floor = min(floor, floor_after)
    if prefetch is not None:
        kmod._PREFETCH = prefetch
    evs = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    lines = [
        f"N = {n}, d = {d}: estimate {wall:.3f} s under the profiler (normals drawn on the "
        f"main thread), float32 floor {floor:.3f} s (ratio {wall / floor:.2f}); "
        f"load {_load()}",
        "",
        "| op | calls | self time (s) | / f32 floor |",
        "|---|---:|---:|---:|",
    ]
    shown = 0.0
    for e in evs[:top]:
        sec = e.self_cpu_time_total / 1e6
        shown += sec
        lines.append(f"| {e.key} | {e.count} | {sec:.3f} | {sec / floor:.2f} |")
    rest = sum(e.self_cpu_time_total for e in evs[top:]) / 1e6
    lines.append(f"| (other ops) | | {rest:.3f} | {rest / floor:.2f} |")
    return "\n".join(lines)


def layer_mi_section(n: int, devices: list, repeats: int, n_warm: int = 200) -> str:
    """``stochmi.layer_mi`` on the untrained noisy_mlp (sigma 1, seed 0), every default pair
    with labels, ``n`` shared test images, timed on each device (best of ``repeats``,
    after a warm-up on ``n_warm`` images); a markdown report."""
    import copy

    import torch

    import stochmi

    spec = stochmi.load_spec("noisy_mlp", overrides={"noise.sigma": 1.0})
    model = stochmi.build_model(spec, seed=0)
    data = stochmi.load_mnist("shared-test", n=n, seed=0)
    n_warm = min(n_warm, n)
    times, frames, loads = {}, {}, {}
    for dev in devices:
        cuda = dev.type == "cuda"

        def sync(cuda=cuda):
            if cuda:
                torch.cuda.synchronize()

        m = copy.deepcopy(model).to(dev)
        x, y = data.x.to(dev), data.y.to(dev)
        stochmi.layer_mi(m, x[:n_warm], y[:n_warm], seed=0)  # warm-up (CUDA context etc.)
        loads[dev] = _load()
        t, df = _best(lambda m=m, x=x, y=y: stochmi.layer_mi(m, x, y, seed=0), sync, repeats)
        times[dev], frames[dev] = t, df
        print(f"layer_mi on {dev}: {t:.2f} s (load {loads[dev]}; {_load()})", flush=True)
    lines = [
        f"layer_mi, untrained noisy_mlp (sigma 1, seed 0), every default pair with labels, "
        f"N = {n} shared test images, best of {repeats} (after a warm-up on {n_warm} images)",
        "",
        "| device | seconds | rows | converged | load before |",
        "|---|---:|---:|---:|---|",
    ]
    for dev in devices:
        df = frames[dev]
        lines.append(
            f"| {dev} | {times[dev]:.2f} | {len(df)} | {int(df['converged'].sum())} "
            f"| {loads[dev]} |"
        )
    ref = frames[devices[0]]
    key = list(zip(ref["source"], ref["target"]))
    lines += ["", "| pair | " + " | ".join(f"value ± se ({d})" for d in devices) + " |"]
    lines.append("|---|" + "---:|" * len(devices))
    for i, (a, b) in enumerate(key):
        cells = [
            f"{frames[d]['value'].iloc[i]:.4f} ± {frames[d]['stderr'].iloc[i]:.4f}" for d in devices
        ]
        lines.append(f"| {a} -> {b} | " + " | ".join(cells) + " |")
    for dev in devices[1:]:
        other = frames[dev]
        if list(zip(other["source"], other["target"])) != key:
            lines.append(f"\n{dev}: the pairs differ from the CPU's; no difference computed")
            continue
        diff = abs(other["value"].to_numpy() - ref["value"].to_numpy())
        se = (other["stderr"].to_numpy() ** 2 + ref["stderr"].to_numpy() ** 2) ** 0.5
        i = int(diff.argmax())
        z = float((diff / se).max())
        lines.append(
            f"\nmax abs difference of value, {dev} vs cpu: {diff[i]:.2e} nats "
            f"({key[i][0]} -> {key[i][1]}); largest |difference| / combined se: {z:.2f}; "
            f"speed-up {times[devices[0]] / times[dev]:.1f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        default=None,
        help="noise scales to run (default: sqrt(d) / 2 per d; at sigma = 1 and d = 1,024 the "
        "value sits at log N)",
    )
    p.add_argument(
        "--breakdown", action="store_true", help="profile one estimate of the largest case"
    )
    p.add_argument(
        "--layer-mi",
        type=int,
        nargs="?",
        const=2000,
        default=None,
        metavar="N",
        help="time stochmi.layer_mi on the untrained noisy_mlp (sigma 1), every default pair "
        "with labels, N shared test images (default 2000), on the CPU and on CUDA",
    )
    p.add_argument(
        "--layer-mi-repeats", type=int, default=1, help="timed layer_mi runs per device (best)"
    )
    p.add_argument("--skip-kernel", action="store_true", help="leave out the estimator cases")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
    print(
        f"device {dev} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
        f"{os.cpu_count()} logical CPUs; load average at start {_load()}",
        flush=True,
    )
    if not args.skip_kernel:
        rows = []
        for d in args.dims:
            for n in args.sizes:
                for sig in args.sigmas or [None]:
                    rows.append(run_case(n, d, dev, args.repeats, sig))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
        print()
        print(table(rows))
        if args.breakdown:
            print()
            print(breakdown(max(args.sizes), max(args.dims), dev))
    if args.layer_mi:
        devices = [torch.device("cpu")]
        if dev.type == "cuda":
            devices.append(dev)
        elif args.device == "auto":
            print(
                "\nnote: no CUDA device (torch.cuda.is_available() is False): "
                "the layer_mi section runs on the CPU only",
                flush=True,
            )
        print()
        print(layer_mi_section(args.layer_mi, devices, args.layer_mi_repeats), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
