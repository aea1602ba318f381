"""Command-line interface: ``nbfit <command> [options]``."""

from __future__ import annotations

import argparse
import re
import sys
import time

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
    return parser


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
    adata = _read_h5ad(args.data)
    counts = adata.X
    if args.layer is not None:
        if args.layer not in adata.layers:
            raise CommandError(f"--layer {args.layer!r} is not a layer of {args.data}; layers: "
                               f"{list(adata.layers.keys())}.")
        counts = adata.layers[args.layer]
    if counts is None:
        raise CommandError(f"{args.data} has no count matrix X; give --layer.")
    report(f"{adata.n_obs} cells x {adata.n_vars} genes; formula_loc={args.formula_loc!r}, "
           f"formula_scale={args.formula_scale!r}")

    test_options = None
    if args.test is not None:  # checked before fitting
        from nbfit._design import design_from_formula

        names = design_from_formula(args.formula_loc, adata.obs, tuple(args.as_numeric)).names
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
        sample_description=adata.obs,
        gene_names=adata.var_names,
        batch_size=args.batch_size,
        training_strategy=strategy,
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
        est.to_anndata(adata, test=test)
        adata.write_h5ad(args.write_h5ad)
        report(f"wrote {args.write_h5ad}")
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


def main(argv: list[str] | None = None) -> int:
    """Run the ``nbfit`` command line; return the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, NotImplementedError, KeyError, OSError) as exc:
        message = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        message = re.sub(r"\x1b\[[0-9;]*m", "", message)  # formulaic colours its messages
        print(f"nbfit: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
