"""Test a condition effect gene by gene: simulate, fit, Wald test, volcano plot.

Run with ``python examples/test_condition.py [OUTPUT_FOLDER]``; the volcano plot is
written to OUTPUT_FOLDER (default: a new temporary folder). Needs matplotlib for the plot
(``pip install 'nbfit[plot]'``); without it the plot is skipped.
"""

import sys
import tempfile
from pathlib import Path

import nbfit


def main(out_dir=None):
    # 400 cells x 200 genes, two conditions A/B and two batches; every gene has a random
    # true condition effect (adata.varm["true_a"]).
    adata = nbfit.simulate(n_cells=400, n_genes=200, n_batches=2, seed=1)

    est = nbfit.fit(adata, formula_loc="~1+condition+batch", size_factors="sf")
    print(est.convergence_summary(), "\n")

    result = est.wald(coef="condition[T.B]")  # or est.wald(term="condition")
    top = result.sort_values("pval").head(10)
    print("top genes by p-value:")
    print(top[["gene", "log2fc", "se", "pval", "qval", "status"]].to_string(index=False))
    n_hits = int((result["qval"] < 0.05).sum())
    print(f"\n{n_hits} of {len(result)} genes with q < 0.05")

    # The same question as a likelihood-ratio test against the model without condition.
    reduced = nbfit.fit(adata, formula_loc="~1+batch", size_factors="sf")
    lrt = est.lrt(reduced)
    print(f"LRT: {int((lrt['qval'] < 0.05).sum())} genes with q < 0.05")

    try:
        from nbfit import plot

        figure = plot.volcano(result, label_top=5)
    except ImportError as error:
        print(f"skipping the volcano plot: {error}")
        return result, None
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="nbfit_"))
    path = out_dir / "volcano.png"
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")
    return result, path


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
