"""The benchmark suite (bench/) works end to end on the registry's ``tiny`` problem.

Nothing here is timed. Peer tools that are not installed (R packages, the virtualenvs of
bench/setup.sh) are skipped.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import evaluate as E  # noqa: E402
from bench import problems as P  # noqa: E402
from bench import run as bench_run  # noqa: E402
from bench.tools import RUNNERS, ToolUnavailable  # noqa: E402
from bench.tools.base import read_result  # noqa: E402

PEERS = ["glmgampoi", "deseq2", "pydeseq2", "delnx", "diffxpy"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """bench/run.py on tiny with nbfit and statsmodels (2 genes)."""
    root = tmp_path_factory.mktemp("bench")
    out, work = root / "results", root / "work"
    bench_run.main(["--problems", "tiny", "--tools", "nbfit", "statsmodels",
                    "--max-genes", "statsmodels=2", "--out", str(out), "--workdir", str(work)])
    return out, work


def test_registry_has_the_issue_problems():
    for name in ["tiny", "cb_1k", "cb_10k", "cb_10k_f32", "cb_10k_sparse", "cells_1k",
                 "cells_10k", "cells_100k", "genes_2k", "genes_20k", "gpu_100k_20k_f32",
                 "gpu_100k_20k_f64"]:
        assert name in P.REGISTRY
    cb = P.get("cb_10k")
    assert (cb.n_cells, cb.n_genes, cb.formula_loc, cb.formula_scale, cb.dtype) == (
        10_000, 2_000, "~1+condition+batch", "~1", "float64")
    data = P.load("tiny")
    assert list(data.design_loc.columns) == P.LOC_NAMES
    assert data.counts.shape == (200, 50)


def test_outputs_written(tiny_run):
    out, _ = tiny_run
    table = pd.read_csv(out / "tiny.csv")
    assert list(table["tool"]) == ["nbfit", "statsmodels"]
    assert set(table["status"]) == {"ok"}
    nb = table.set_index("tool").loc["nbfit"]
    assert nb["fit_s_warm"] > 0 and nb["fit_s_cold"] > 0 and nb["peak_mem_mb"] > 0
    assert nb["genes_scored"] == 50 and nb["converged_frac"] > 0.9
    sm = table.set_index("tool").loc["statsmodels"]
    assert sm["genes_scored"] == 2 and sm["gene_fraction"] == pytest.approx(2 / 50)
    assert sm["frac_within_1e-6"] == 1.0  # both fit the MLE of the same model
    readme = (out / "README.md").read_text()
    assert "## tiny" in readme and "python bench/run.py" in readme and "| nbfit |" in readme
    meta = json.loads((out / "tiny.json").read_text())
    assert meta["machine"]["cores"] >= 1 and meta["machine"]["cpu"]
    assert (out / "tiny_genes.csv.gz").exists()


def test_evaluator_matches_nbfit_log_likelihood(tiny_run):
    _, work = tiny_run
    problem = P.get("tiny")
    result = read_result("nbfit", problem, work / "tiny" / "out_nbfit")
    data = P.load(problem)
    ll = E.gene_log_likelihood(data.counts, data.design_loc, data.design_scale, data.sf,
                               result.a, result.b[None, :])
    own = result.arrays["ll_self"]
    np.testing.assert_allclose(ll, own, rtol=1e-8, atol=1e-8)


def test_evaluator_poisson_limit_and_huge_r():
    y = np.array([0.0, 1.0, 5.0, 40.0])
    eta_mu = np.log([0.5, 2.0, 4.0, 30.0])
    poisson = y * eta_mu - np.exp(eta_mu) - np.array([0.0, 0.0, np.log(120.0),
                                                      np.sum(np.log(np.arange(1, 41)))])
    np.testing.assert_allclose(E.nb_log_likelihood(y, eta_mu, np.inf), poisson, rtol=1e-12)
    np.testing.assert_allclose(E.nb_log_likelihood(y, eta_mu, np.log(1e15)), poisson,
                               rtol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("tool", PEERS)
def test_peer_tool_on_tiny(tool, tmp_path):
    problem = P.get("tiny")
    try:
        result = RUNNERS[tool](problem, tmp_path)
    except ToolUnavailable as error:
        pytest.skip(str(error))
    assert result.a.shape == (4, 50) and result.b.shape == (50,)
    assert result.fit_seconds_warm > 0 and result.peak_memory_mb > 0
    data = P.load(problem)
    per_gene, summary = E.score(data, {tool: result})
    assert np.isfinite(per_gene[f"ll_{tool}"]).mean() > 0.9
