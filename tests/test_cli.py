"""The command line: ``nbfit fit data.h5ad ...`` end to end, and every bad-input path."""

import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

import nbfit
from nbfit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def h5ad(tmp_path_factory):
    """240 cells x 20 genes (the shapes of test_api, so fits share compilations)."""
    adata = nbfit.simulate(n_cells=240, n_genes=20, n_batches=2, seed=3)
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.log1p(adata.X)  # normalised X: the counts are in the layer
    path = tmp_path_factory.mktemp("cli") / "data.h5ad"
    adata.write_h5ad(path)
    return path


def test_fit_end_to_end(h5ad, tmp_path, capsys):
    out, written, saved = tmp_path / "res.csv", tmp_path / "out.h5ad", tmp_path / "fit.npz"
    code = main([
        "fit", str(h5ad), "--layer", "counts", "--formula-loc", "~1+condition+batch",
        "--size-factors", "sf", "--test", "condition", "--out", str(out),
        "--write-h5ad", str(written), "--save", str(saved),
    ])
    assert code == 0
    progress = capsys.readouterr().err
    assert "stage 1/1" in progress and "Wald test" in progress
    table = pd.read_csv(out)
    assert len(table) == 20
    expected = {"gene", "term", "log2fc", "pval", "qval", "a_condition[T.B]", "ll", "status"}
    assert expected <= set(table.columns)
    adata = anndata.read_h5ad(h5ad)
    est = nbfit.fit(adata.layers["counts"], formula_loc="~1+condition+batch", size_factors="sf",
                    sample_description=adata.obs, gene_names=adata.var_names)
    np.testing.assert_allclose(table["pval"], est.wald(term="condition")["pval"], rtol=1e-10)
    back = anndata.read_h5ad(written)
    np.testing.assert_allclose(back.varm["nbfit_a"], est.model.a.T, rtol=1e-10)
    assert "nbfit_test_pval" in back.var
    assert back.uns["nbfit"]["formula_loc"] == "~1+condition+batch"
    np.testing.assert_allclose(nbfit.load(saved).a_var, est.a_var, rtol=1e-10)


def test_fit_without_test_writes_fit_table(h5ad, tmp_path):
    out = tmp_path / "res.csv"
    assert main(["fit", str(h5ad), "--layer", "counts", "--formula-loc", "~1+condition+batch",
                 "--size-factors", "sf", "--test", "condition[T.B]", "--out", str(out),
                 "--quiet"]) == 0
    assert "coef" in pd.read_csv(out).columns


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["missing.h5ad", "--formula-loc", "~1"], "does not exist"),
        (["NOT_H5AD", "--formula-loc", "~1"], "could not read"),
        (["DATA", "--formula-loc", "~1+("], "could not be parsed"),
        (["DATA", "--formula-loc", "~1+nope"], "not columns of the sample description"),
        (["DATA", "--formula-loc", "~1", "--formula-scale", "~1+nope"], "formula_scale"),
        (["DATA", "--formula-loc", "~1", "--size-factors", "nope"], "size_factors='nope'"),
        (["DATA", "--formula-loc", "~1", "--as-numeric", "condition"], "not numeric"),
        (["DATA", "--formula-loc", "~1", "--layer", "nope"], "--layer 'nope'"),
        (["DATA", "--formula-loc", "~1+condition", "--test", "batch"], "neither a term"),
        (["DATA", "--formula-loc", "~1", "--training-strategy", "nope"], "--training-strategy"),
        (["DATA", "--formula-loc", "~1", "--out", "/no/such/folder/x.csv"], "does not exist"),
        (["DATA", "--formula-loc", "~1", "RAW_X"], "non-integer"),  # X holds log1p values
    ],
    ids=["missing-file", "not-h5ad", "bad-formula", "bad-column", "bad-scale-formula",
         "bad-size-factors", "non-numeric", "bad-layer", "bad-test", "bad-strategy", "bad-out",
         "not-counts"],
)
def test_bad_input_exits_2(h5ad, tmp_path, capsys, arguments, message):
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not an h5ad file")
    missing = str(tmp_path / "missing.h5ad")
    replace = {"DATA": str(h5ad), "NOT_H5AD": str(junk), "missing.h5ad": missing}
    arguments = [replace.get(a, a) for a in arguments]
    if "--out" not in arguments:
        arguments += ["--out", str(tmp_path / "res.csv")]
    if "RAW_X" in arguments:
        arguments.remove("RAW_X")
    elif "--layer" not in arguments:
        arguments += ["--layer", "counts"]
    code = main(["fit", *arguments, "--quiet"])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("nbfit: error: ") and message in error
    assert "\x1b[" not in error
    assert not (tmp_path / "res.csv").exists()


def test_missing_required_option_exits_2(h5ad, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", str(h5ad), "--out", "x.csv"])
    assert exit_info.value.code == 2
    assert "--formula-loc" in capsys.readouterr().err


def test_console_entry_point_exit_code(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nbfit", "fit", str(tmp_path / "missing.h5ad"),
         "--formula-loc", "~1", "--out", str(tmp_path / "x.csv")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert "nbfit: error: input file" in result.stderr
