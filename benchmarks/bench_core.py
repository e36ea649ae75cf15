"""Speed and memory of the core estimator against a matmul floor and textbook code.

For a Gaussian channel with one scale shared by all sources,
``p(t | s_i) = N(mu_i, sigma^2 I)`` with ``mu_i ~ N(0, I_d)`` and ``sigma = sqrt(d) / 2``,
at every ``(N, d)`` this times (best of ``--repeats``, :func:`time.perf_counter`) and
measures the peak extra memory of:

* ``ours``: ``stochmi.mi_from_conditional(cond, seed=0)`` -- draws, dataset MI, and the
  population bracket (lower and leave-one-out upper), i.e. the full estimate;
* ``ours+bounds``: the same with ``bounds=True`` (adds the Kolchinsky-Tracey bounds);
* ``floor f64`` / ``floor f32``: one plain matrix product ``(N x d) @ (d x N)`` in float64
  and float32, the least any exact pairwise computation has to do;
* ``textbook``: broadcast ``Independent(Normal(loc[None], scale), 1).log_prob(t[:, None])``
  over all ``N x N`` pairs in float64, then value and leave-one-out upper from the full
  matrix.  Rows are chunked only as far as needed to keep one ``(rows, N, d)`` float64
  intermediate under ``--textbook-budget-gb``; if the whole run is predicted to exceed
  ``--textbook-limit`` seconds, a prefix of the row chunks is timed and the time is
  extrapolated linearly in the number of rows (marked ``~`` in the table);
* ``kde.py``: the pairwise-distance code of information-plane studies (Kolchinsky's
  ``kde.py`` as used by Saxe et al.), numpy float64, full ``N x N`` distance matrix,
  KL upper bound only.

Each (method, N, d) runs in a fresh subprocess with ``--threads`` threads (torch, OpenMP,
OpenBLAS, MKL).  Peak extra memory is the resident-set high-water mark during the first
run minus the resident set after the inputs were built (Linux: the high-water mark is
reset through ``/proc/self/clear_refs``; elsewhere ``getrusage`` of the fresh process is
used, which can only over-count the setup).  On CUDA it is
``torch.cuda.max_memory_allocated`` above the allocation after set-up.

Usage::

    python benchmarks/bench_core.py                      # N in {1000, 4000, 10000}, d in {64, 1024}
    python benchmarks/bench_core.py --quick              # small smoke run (about 1.5 minutes)
    python benchmarks/bench_core.py --sizes 2000 --dims 256 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
METHODS = ["floor64", "floor32", "ours", "ours_bounds", "textbook", "kde"]
LABELS = {
    "floor64": "floor f64",
    "floor32": "floor f32",
    "ours": "ours",
    "ours_bounds": "ours+bounds",
    "textbook": "textbook",
    "kde": "kde.py",
}
SEED = 0


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak extra memory (bytes) of a block of code, CPU RSS or CUDA allocator."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.how = ""

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.how = "cuda.max_memory_allocated"
        else:
            self.base = (_status_kb("VmRSS") or 0) * 1024
            if _reset_hwm() and _status_kb("VmHWM") is not None:
                self.how = "VmHWM (reset)"
            else:
                self.how = "ru_maxrss (fresh process)"
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.how.startswith("VmHWM"):
            peak = _status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.extra = max(0, peak - self.base)


# ----------------------------------------------------------------------------- worker
def _load_textbook():
    """tests/textbook.py by path (stochmi itself is imported the normal way, so
    PYTHONPATH can point the benchmark at a snapshot of the package)."""
    import importlib.util

    path = HERE.parent / "tests" / "textbook.py"
    spec = importlib.util.spec_from_file_location("_bench_textbook", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _worker(spec: dict) -> dict:
    """Run one method at one size in this (fresh) process; returns the measurements."""
    import torch
    from torch import distributions as td

    import stochmi

    textbook = _load_textbook()

    torch.set_num_threads(spec["threads"])
    method, n, d, device = spec["method"], spec["n"], spec["d"], spec["device"]
    gen = torch.Generator().manual_seed(1234)
    loc = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)
    sigma = 0.5 * math.sqrt(d)
    out: dict = {"method": method, "n": n, "d": d, "device": device}

    if method in ("floor64", "floor32"):
        dt = torch.float64 if method == "floor64" else torch.float32
        a = loc.to(dt)
        b = loc.T.contiguous().to(dt)

        def run():
            c = a @ b
            _sync(device)
            return c

    elif method in ("ours", "ours_bounds"):
        cond = td.Independent(td.Normal(loc, torch.tensor(sigma, dtype=torch.float64)), 1)
        bounds = method == "ours_bounds"

        def run():
            est = stochmi.mi_from_conditional(
                cond, seed=SEED, bounds=bounds, device=device, precision=spec["precision"]
            )
            _sync(device)
            return est

    elif method == "textbook":
        cond = td.Independent(td.Normal(loc, torch.tensor(sigma, dtype=torch.float64)), 1)
        t = textbook.estimator_draws(cond, 1, SEED)[0]  # the draws ours uses (not timed)
        budget = spec["textbook_budget_gb"] * 2**30
        rows = max(1, min(n, int(budget // (n * d * 8))))
        out["chunk_rows"] = rows
        limit = spec["textbook_limit"]

        def run():
            # textbook: L = cond.log_prob(t[:, None]) over all pairs, chunked to fit memory
            lmat = torch.empty(n, n, dtype=torch.float64, device=device)
            start = time.perf_counter()
            done = 0
            for s in range(0, n, rows):
                lmat[s : s + rows] = cond.log_prob(t[s : s + rows].unsqueeze(1))
                _sync(device)
                done = min(n, s + rows)
                elapsed = time.perf_counter() - start
                if done < n and elapsed * n / done > limit and elapsed > spec["sample_s"]:
                    return {"rows_done": done, "elapsed": elapsed}
            value, upper = textbook.mi_from_matrix(lmat.cpu())
            return {"rows_done": n, "value": value, "upper": upper}

    elif method == "kde":
        x = loc.cpu().numpy()
        var = sigma**2

        def run():
            return textbook.kde_pairwise_mi(x, var)

    else:  # pragma: no cover - argparse restricts methods
        raise ValueError(method)

    times = []
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        res = run()
        times.append(time.perf_counter() - t0)
    out["peak_extra_bytes"] = mem.extra
    out["memory_method"] = mem.how
    if method == "textbook" and res["rows_done"] < n:
        # extrapolate linearly in rows; the one run is all we time
        out["extrapolated"] = True
        out["rows_timed"] = res["rows_done"]
        times = [res["elapsed"] * n / res["rows_done"]]
    else:
        for _ in range(spec["repeats"] - 1):
            if method == "textbook" and times[0] > spec["textbook_limit"] / 3:
                break  # one full textbook run is enough when it is this slow
            t0 = time.perf_counter()
            res = run()
            times.append(time.perf_counter() - t0)
    out["times"] = times
    out["best"] = min(times)
    if method in ("ours", "ours_bounds"):
        out["value"], out["upper"] = res.value, res.upper
        out["chunk_size"] = res.extra["chunk_size"]
        if method == "ours_bounds":
            out["pairwise_upper"] = res.extra["pairwise_upper"]
    elif method == "textbook" and not out.get("extrapolated"):
        out["value"], out["upper"] = res["value"], res["upper"]
    elif method == "kde":
        out["pairwise_upper"] = float(res)
    return out


def _run_case(method: str, n: int, d: int, args) -> dict:
    spec = {
        "method": method,
        "n": n,
        "d": d,
        "device": args.device,
        "threads": args.threads,
        "repeats": args.repeats,
        "textbook_budget_gb": args.textbook_budget_gb,
        "textbook_limit": args.textbook_limit,
        "sample_s": args.textbook_sample,
        "precision": args.precision,
    }
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        return {"method": method, "n": n, "d": d, "error": proc.stderr.strip()[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- table
def _fmt_t(r: dict | None) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "error"
    s = f"{r['best']:.3g}"
    return "~" + s if r.get("extrapolated") else s


def _fmt_mb(r: dict | None) -> str:
    if r is None or "error" in r:
        return "-"
    return f"{r['peak_extra_bytes'] / 2**20:.0f}"


def _ratio(a: dict | None, b: dict | None) -> str:
    if not a or not b or "error" in a or "error" in b:
        return "-"
    s = f"{a['best'] / b['best']:.3g}"
    return "~" + s if a.get("extrapolated") or b.get("extrapolated") else s


def make_tables(results: list[dict]) -> str:
    """Markdown tables: time with ratios, peak extra memory, and the agreement checks."""
    by = {(r["n"], r["d"], r["method"]): r for r in results}
    cases = sorted({(r["n"], r["d"]) for r in results})
    lines = [
        "| N | d | floor f64 | floor f32 | ours | ours+bounds | textbook | kde.py "
        "| ours / f64 | ours / f32 | ours+bounds / f64 | textbook / ours | kde.py / ours |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, d in cases:
        g = {m: by.get((n, d, m)) for m in METHODS}
        lines.append(
            f"| {n} | {d} | "
            + " | ".join(_fmt_t(g[m]) for m in METHODS)
            + f" | {_ratio(g['ours'], g['floor64'])} | {_ratio(g['ours'], g['floor32'])}"
            + f" | {_ratio(g['ours_bounds'], g['floor64'])}"
            + f" | {_ratio(g['textbook'], g['ours'])} | {_ratio(g['kde'], g['ours'])} |"
        )
    lines += [
        "",
        "Peak extra memory (MiB):",
        "",
        "| N | d | floor f64 | floor f32 | ours | ours+bounds | textbook | kde.py | "
        "ours chunk rows | textbook chunk rows |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, d in cases:
        g = {m: by.get((n, d, m)) for m in METHODS}
        ours_chunk = g["ours"].get("chunk_size", "-") if g["ours"] else "-"
        tb = g["textbook"] or {}
        tb_chunk = tb.get("chunk_rows", "-")
        if tb.get("extrapolated"):
            tb_chunk = f"{tb_chunk} (timed {tb['rows_timed']} of {n} rows)"
        lines.append(
            f"| {n} | {d} | "
            + " | ".join(_fmt_mb(g[m]) for m in METHODS)
            + f" | {ours_chunk} | {tb_chunk} |"
        )
    lines += ["", "Agreement (same draws, float64):", ""]
    for n, d in cases:
        o, t, k, ob = (by.get((n, d, m)) for m in ("ours", "textbook", "kde", "ours_bounds"))
        parts = []
        if o and t and "value" in o and "value" in t:
            dv, du = abs(o["value"] - t["value"]), abs(o["upper"] - t["upper"])
            ok = "OK" if max(dv, du) < 1e-8 else "MISMATCH"
            parts.append(f"textbook |dvalue| = {dv:.1e}, |dupper| = {du:.1e} ({ok})")
        if ob and k and "pairwise_upper" in ob and "pairwise_upper" in k:
            dk = abs(ob["pairwise_upper"] - k["pairwise_upper"])
            parts.append(f"kde.py KL bound |d| = {dk:.1e} ({'OK' if dk < 1e-8 else 'MISMATCH'})")
        if o and "value" in o:
            parts.append(f"value {o['value']:.4f} nats, upper {o['upper']:.4f}")
        lines.append(f"- N={n}, d={d}: " + "; ".join(parts))
    errors = [r for r in results if "error" in r]
    for r in errors:
        lines.append(f"- ERROR {r['method']} N={r['n']} d={r['d']}: {r['error'][-300:]}")
    return "\n".join(lines)


def machine_info(args) -> str:
    import torch

    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    import stochmi

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(stochmi.__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = ""
    dev = args.device
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev += f" ({torch.cuda.get_device_name(0)})"
    return (
        f"CPU: {model}, {os.cpu_count()} logical cores; threads used: {args.threads}; "
        f"device: {dev}; torch {torch.__version__}; Python {platform.python_version()}; "
        f"stochmi from {Path(stochmi.__file__).parent} (commit {commit or 'unknown'}); "
        f"load average at start: {', '.join(f'{x:.1f}' for x in load)}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 10000])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--quick", action="store_true", help="small sizes, fewer repeats")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "float64", "float32"],
        help="precision= of ours (default auto; older tables: float64 only)",
    )
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--textbook-budget-gb", type=float, default=1.0)
    p.add_argument("--textbook-limit", type=float, default=300.0, help="seconds")
    p.add_argument("--textbook-sample", type=float, default=30.0, help="seconds timed at least")
    p.add_argument("--json", type=Path, default=None, help="also write raw results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.sizes, args.dims, args.repeats = [500, 2000], [64, 256], 2
        args.textbook_limit, args.textbook_sample = 20.0, 5.0
    print(machine_info(args), flush=True)
    results = []
    for n in args.sizes:
        for d in args.dims:
            for m in args.methods:
                r = _run_case(m, n, d, args)
                results.append(r)
                msg = r.get("error", "").splitlines()[-1:] if "error" in r else _fmt_t(r)
                print(f"  N={n:6d} d={d:5d} {LABELS[m]:12s} {msg}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info(args), "results": results}))
    print()
    print(make_tables(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
