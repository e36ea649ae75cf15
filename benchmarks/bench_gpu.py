"""Precision-adaptive kernel: the full estimate against float32 / float64 GEMM floors.

Runs on CUDA when it is present (``--device auto``, the default), else on the CPU, the
same cases as ``bench_core.py``: a Gaussian channel ``p(t | s_i) = N(mu_i, sigma^2 I)``,
``mu_i ~ N(0, I_d)``, ``sigma = sqrt(d) / 2`` (MI about 2 nats, not saturated).  For each
``(N, d)``, in one process, interleaved and best of ``--repeats``:

* ``f32`` / ``tf32`` / ``f64``: one ``(N x d) @ (d x N)`` matrix product in float32 (TF32
  off), TF32 (CUDA only) and float64: the floors;
* ``auto``: ``stochmi.mi_from_conditional(cond, seed=0, device=dev)`` -- draws, value,
  bracket and standard errors, default ``precision="auto"``;
* ``f64 est``: the same with ``precision="float64"``.

It prints one markdown table (times in seconds, ratios against the float32 floor, which
blocks ran in which precision, and the difference of the value and the upper bound from
the float64 estimate) with the load average before and after each case.  Nothing here is
a test; no test needs a GPU.

Usage::

    python benchmarks/bench_gpu.py                         # CUDA if present, else CPU
    python benchmarks/bench_gpu.py --device cpu --threads 2 --sizes 1000 4000 10000 \
        --dims 64 256 1024 --repeats 3
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


def run_case(n: int, d: int, device, repeats: int) -> dict:
    import torch
    from torch import distributions as td

    import stochmi

    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    gen = torch.Generator().manual_seed(1234)
    loc = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)
    sigma = torch.tensor(0.5 * math.sqrt(d), dtype=torch.float64, device=device)
    cond = td.Independent(td.Normal(loc, sigma), 1)
    a32, b32 = loc.float(), loc.T.contiguous().float()
    bt = loc.T.contiguous()
    res: dict = {"n": n, "d": d, "load_before": _load()}
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


def table(rows: list[dict]) -> str:
    lines = [
        "| N | d | f32 floor | tf32 floor | f64 floor | auto | f64 est | auto / f32 "
        "| f64 est / f32 | blocks | bound | abs dvalue | abs dupper | value ± se "
        "| load before; after |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        tf = f"{r['tf32']:.3g}" if r["tf32"] is not None else "-"
        blocks = ", ".join(f"{k} {v}" for k, v in r["blocks"].items())
        lines.append(
            f"| {r['n']} | {r['d']} | {r['f32']:.3g} | {tf} | {r['f64']:.3g} | {r['auto']:.3g} "
            f"| {r['est64']:.3g} | {r['auto'] / r['f32']:.2f} | {r['est64'] / r['f32']:.2f} "
            f"| {blocks} | {r['bound']:.1e} | {r['dvalue']:.1e} | {r['dupper']:.1e} "
            f"| {r['value']:.4f} ± {r['stderr']:.4f} | {r['load_before']}; {r['load_after']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
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
    rows = []
    for d in args.dims:
        for n in args.sizes:
            rows.append(run_case(n, d, dev, args.repeats))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
