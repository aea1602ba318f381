"""Command-line interface: ``nbfit <command> [options]``."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

_DEMO_FORMULA_LOC = "~1+log_umi"
_DEMO_FORMULA_SCALE = "~1"
_N_SHOW = 15


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbfit",
        description="Per-gene negative-binomial GLM fitting in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        help="fit the bundled PBMC data set and print the results",
        description=(
            "Fit formula_loc='~1+log_umi', formula_scale='~1' to the bundled PBMC UMI "
            "counts (10x Genomics data as shipped in sctransform, GPL-3) and print the "
            "per-gene results and a convergence summary."
        ),
    )
    demo.add_argument(
        "--out",
        metavar="PATH",
        default=None,
        help="write the full per-gene results table to this CSV file",
    )
    demo.set_defaults(func=_cmd_demo)

    fit = sub.add_parser(
        "fit",
        help="fit a per-gene NB GLM to an .h5ad file, optionally test a term",
        description=(
            "Fit the negative-binomial GLM log mu = log sf + X_loc a, log r = X_scale b to "
            "every gene of an .h5ad file (raw counts in X, or in --layer), write the per-gene "
            "results table as CSV, and optionally Wald-test a term or coefficient."
        ),
    )
    fit.add_argument("data", metavar="DATA.h5ad",
                     help="AnnData file with raw counts (cells x genes)")
    fit.add_argument("--formula-loc", required=True, metavar="FORMULA",
                     help="location model over obs columns, e.g. '~1+condition'")
    fit.add_argument("--formula-scale", default="~1", metavar="FORMULA",
                     help="dispersion model (default '~1')")
    fit.add_argument("--as-numeric", nargs="+", default=[], metavar="COL",
                     help="obs columns to keep numeric (all others are categorical)")
    fit.add_argument("--size-factors", default=None, metavar="COL",
                     help="obs column of per-cell size factors")
    fit.add_argument("--layer", default=None, metavar="NAME",
                     help="take the counts from adata.layers[NAME] instead of X")
    fit.add_argument("--test", default=None, metavar="TERM",
                     help="Wald-test a term (e.g. 'condition': all its coefficients) or one "
                          "coefficient (e.g. 'condition[T.B]')")
    fit.add_argument("--out", required=True, metavar="RESULTS.csv", help="per-gene results table")
    fit.add_argument("--write-h5ad", default=None, metavar="OUT.h5ad",
                     help="write the input AnnData with the results (varm/var/uns 'nbfit_*')")
    fit.add_argument("--save", default=None, metavar="FIT.npz",
                     help="save the fit for nbfit.load (no counts)")
    fit.add_argument("--training-strategy", default="AUTO", metavar="NAME",
                     help="AUTO (default), EXACT, IRLS, QUICK or LBFGS")
    fit.add_argument("--batch-size", type=int, default=None, metavar="N",
                     help="genes per compiled chunk (bounds memory)")
    fit.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    fit.set_defaults(func=_cmd_fit)

    prepare = sub.add_parser(
        "prepare",
        help="write a gene-major (CSC) copy of an .h5ad/.zarr file, once, for fast gene access",
        description=(
            "Write the counts of IN (X, or --layer) with obs and var to OUT as a CSC matrix "
            "(.h5ad, or .zarr with arrays chunked along the genes). Reading a gene chunk of a "
            "cell-major (CSR or dense) file reads the whole matrix; of the copy, only its genes. "
            "Nothing is densified: at most --max-memory of nonzeros is held at once."
        ),
    )
    prepare.add_argument("input", metavar="IN", help="AnnData file (.h5ad) or store (.zarr)")
    prepare.add_argument("output", metavar="OUT", help="output .h5ad or .zarr (must not exist)")
    prepare.add_argument("--layer", default=None, metavar="NAME",
                         help="take the counts from layers[NAME] instead of X")
    prepare.add_argument("--max-memory", default="2GB", metavar="SIZE",
                         help="nonzeros held at once, e.g. 2GB (default)")
    prepare.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    prepare.set_defaults(func=_cmd_prepare)
    return parser


#: Environment variable naming the JAX compilation cache folder of the command line
#: (default ``$XDG_CACHE_HOME/nbfit/jax`` or ``~/.cache/nbfit/jax``); "0"/"off" disables it.
CACHE_ENV = "NBFIT_JAX_CACHE_DIR"


def compilation_cache_dir():
    """The folder of the command line's persistent JAX compilation cache, or None (off)."""
    setting = os.environ.get(CACHE_ENV)
    if setting is not None:
        if setting.strip().lower() in ("", "0", "off", "false", "no", "none"):
            return None
        return Path(setting).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nbfit" / "jax"


def enable_compilation_cache():
    """Turn on JAX's persistent compilation cache for this process (the CLI only: the
    library never changes JAX's configuration). A second run of the same shapes then
    loads the compiled solvers instead of compiling them. Returns the folder or None.

    A cache folder configured for JAX itself (``JAX_COMPILATION_CACHE_DIR``) wins.
    """
    import jax

    if jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    folder = compilation_cache_dir()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: run without the cache
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    # Cache every solver, not only those compiling for more than a second.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder


class CommandError(ValueError):
    """Bad input to a command: reported as ``nbfit: error: ...`` with exit code 2."""


def _progress(quiet):
    """A function printing timestamped stage messages to stderr (or nothing)."""
    start = time.perf_counter()

    def report(message):
        if not quiet:
            elapsed = time.perf_counter() - start
            print(f"nbfit [{elapsed:7.1f}s] {message}", file=sys.stderr, flush=True)

    return report


def _check_output(path, what):
    from pathlib import Path

    if path is None:
        return
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise CommandError(f"{what} {path!r}: folder {str(folder)!r} does not exist.")


def _read_h5ad(path):
    from pathlib import Path

    import anndata

    if not Path(path).exists():
        raise CommandError(f"input file {path!r} does not exist.")
    if Path(path).is_dir():
        raise CommandError(f"input {path!r} is a folder, not an .h5ad file.")
    try:
        return anndata.read_h5ad(path)
    except Exception as error:  # h5py / anndata raise many types on unreadable files
        raise CommandError(f"could not read {path!r} as an .h5ad file: {error}") from None


def _open_counts(path, layer):
    """(GeneSource, obs, var) of an .h5ad file or .zarr store, the counts left on disk."""
    from nbfit._storage import open_path

    if not Path(path).exists():
        raise CommandError(f"input file {path!r} does not exist.")
    if Path(path).is_dir() and Path(path).suffix != ".zarr":
        raise CommandError(f"input {path!r} is a folder, not an .h5ad file.")
    try:
        return open_path(path, layer)
    except KeyError as error:
        message = error.args[0] if error.args else str(error)
        if layer is None:
            raise CommandError(f"{message} Give --layer.") from None
        raise CommandError(f"--layer {layer!r} is not a layer of {path}: {message}") from None
    except (ValueError, OSError) as error:
        raise CommandError(str(error)) from None


def _resolve_test(names, test):
    """Keyword arguments of ``wald`` for --test: a coefficient name or else a term."""
    from nbfit import inference

    names = [str(n) for n in names]
    if test in names:
        return {"coef": test}
    if test in inference.terms(names):
        return {"term": test}
    raise CommandError(
        f"--test {test!r} is neither a term nor a coefficient of the location design; terms: "
        f"{inference.terms(names)}, coefficients: {names}."
    )


def _cmd_fit(args: argparse.Namespace) -> int:
    import numpy as np

    import nbfit
    from nbfit._strategy import STRATEGIES

    report = _progress(args.quiet)
    outputs = ((args.out, "--out"), (args.write_h5ad, "--write-h5ad"), (args.save, "--save"))
    for path, what in outputs:
        _check_output(path, what)
    if args.training_strategy.upper() not in STRATEGIES:
        raise CommandError(
            f"--training-strategy {args.training_strategy!r} is unknown; valid: "
            f"{sorted(STRATEGIES)}."
        )
    report(f"reading {args.data}")
    # The counts stay on disk and are read gene chunk by gene chunk; obs and var are read.
    counts, obs, var = _open_counts(args.data, args.layer)
    report(f"{counts.shape[0]} cells x {counts.shape[1]} genes ({counts.format}); "
           f"formula_loc={args.formula_loc!r}, formula_scale={args.formula_scale!r}")

    test_options = None
    if args.test is not None:  # checked before fitting
        from nbfit._design import design_from_formula

        names = design_from_formula(args.formula_loc, obs, tuple(args.as_numeric)).names
        test_options = _resolve_test(names, args.test)
    stages = STRATEGIES[args.training_strategy.upper()]

    def strategy(estimator):
        n_chunks = -(-len(estimator.gene_names) // estimator.batch_size)
        for k, stage in enumerate(stages, 1):
            report(f"stage {k}/{len(stages)}: {stage.get('method', 'newton')} on "
                   f"{n_chunks} chunk(s) of up to {estimator.batch_size} genes")
            estimator.train(**stage)

    est = nbfit.fit(
        counts,
        formula_loc=args.formula_loc,
        formula_scale=args.formula_scale,
        as_numeric=args.as_numeric,
        size_factors=args.size_factors,
        sample_description=obs,
        gene_names=var.index,
        batch_size=args.batch_size,
        training_strategy=strategy,
        progress=False if args.quiet else None,
    )
    est.fit_settings["training_strategy"] = args.training_strategy.upper()
    table = est.to_dataframe()
    summary = est.convergence_summary()
    report("fitted: " + ", ".join(f"{n} {s}" for s, n in summary["n_genes"].items()))
    test = None
    if args.test is not None:
        test = est.wald(**test_options)
        report(f"Wald test of {args.test!r} (df {int(test['df'].iloc[0])}): "
               f"{int(np.sum(test['qval'] < 0.05))} genes with q < 0.05, "
               f"{int(test['pval'].isna().sum())} without a p-value")
        columns = [c for c in test.columns if c not in ("gene", "ll", "status")]
        table = test.set_index("gene")[columns].join(table)
    table.to_csv(args.out)
    report(f"wrote {len(table)} rows to {args.out}")
    if args.save is not None:
        est.save(args.save)
        report(f"saved the fit to {args.save}")
    if args.write_h5ad is not None:
        adata = _read_h5ad(args.data)  # the whole file, written back with the results
        est.to_anndata(adata, test=test)
        adata.write_h5ad(args.write_h5ad)
        report(f"wrote {args.write_h5ad}")
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nbfit._storage import prepare

    report = _progress(args.quiet)
    if not Path(args.input).exists():
        raise CommandError(f"input {args.input!r} does not exist.")
    prepare(args.input, args.output, layer=args.layer, max_memory=args.max_memory, report=report)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import pandas as pd

    import nbfit
    from nbfit.datasets import pbmc_logumi

    adata = pbmc_logumi()
    t0 = time.perf_counter()
    est = nbfit.fit(
        adata,
        formula_loc=_DEMO_FORMULA_LOC,
        formula_scale=_DEMO_FORMULA_SCALE,
        as_numeric=["log_umi"],
    )
    df = est.to_dataframe()  # materialises the (possibly asynchronous) results
    elapsed = time.perf_counter() - t0

    print("dataset:        pbmc_logumi (10x Genomics PBMC via sctransform, GPL-3)")
    print(f"cells x genes:  {adata.n_obs} x {adata.n_vars}")
    print(f"formula_loc:    {_DEMO_FORMULA_LOC}  (as_numeric: log_umi)")
    print(f"formula_scale:  {_DEMO_FORMULA_SCALE}")
    print(f"time:           {elapsed:.2f} s (incl. JIT compilation)")
    print()

    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(f"per-gene results (first {min(_N_SHOW, len(df))} of {len(df)} genes):")
        print(df.head(_N_SHOW).to_string())
        print()
        if args.out is not None:
            df.to_csv(args.out)
            print(f"wrote all {len(df)} rows to {args.out}")
            print()
        print("convergence summary:")
        print(est.convergence_summary().to_string())
    return 0


def main(argv: list[str] | None = None, compilation_cache: bool | None = None) -> int:
    """Run the ``nbfit`` command line; return the process exit code.

    ``compilation_cache``: turn on JAX's persistent compilation cache
    (:func:`enable_compilation_cache`) for ``fit`` and ``demo``; default: when run as a
    command (``argv`` None, i.e. ``sys.argv``), not when called with arguments from Python.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if compilation_cache is None:
        compilation_cache = argv is None
    if compilation_cache and args.command in ("fit", "demo"):
        enable_compilation_cache()
    try:
        return int(args.func(args))
    except (ValueError, TypeError, NotImplementedError, KeyError, OSError) as exc:
        message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        message = re.sub(r"\x1b\[[0-9;]*m", "", message)  # formulaic colours its messages
        print(f"nbfit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
