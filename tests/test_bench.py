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
from bench.tools import RUNNERS, ToolResult, ToolUnavailable  # noqa: E402
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


def test_failed_genes_count_against_the_tool():
    """NaN estimates on a fitted gene are a failure (infinite gap), not a dropped gene."""
    data = P.load("tiny")
    truth = ToolResult("truth", "tiny", a=data.true_a, b=data.true_b[0])
    a = data.true_a.copy()
    a[:, :5] = np.nan
    b = data.true_b[0].copy()
    b[5:7] = -np.inf  # r = 0: no finite likelihood
    broken = ToolResult("broken", "tiny", a=a, b=b)
    subset = ToolResult("subset", "tiny", a=data.true_a[:, :10], b=data.true_b[0, :10],
                        genes=np.arange(10))
    per_gene, summary = E.score(data, {"truth": truth, "broken": broken, "subset": subset})
    assert summary.loc["broken", "genes_scored"] == 50
    assert summary.loc["broken", "n_failed"] == 7
    assert summary.loc["broken", "frac_within_tol"] == pytest.approx(43 / 50)
    assert np.isinf(summary.loc["broken", "max_rel_gap"])
    assert np.all(np.isinf(per_gene["gap_broken"].to_numpy()[:7]))
    assert set(per_gene["best_tool"].iloc[:7]) <= {"truth", "subset"}
    # a gene subset is scored on its genes only, without failures
    assert summary.loc["subset", "genes_scored"] == 10
    assert summary.loc["subset", "n_failed"] == 0
    assert per_gene["gap_subset"].isna().sum() == 40
    assert summary.loc["truth", "frac_within_tol"] == 1.0


def test_targets_are_computed_from_the_tables():
    def table(rows):
        frame = pd.DataFrame(rows)
        frame["status"] = "ok"
        return frame

    cb10 = table([
        {"tool": "nbfit", "warm_speedup_vs_glmgampoi": 6.0, "cold_speedup_vs_glmgampoi": 1.5,
         "process_speedup_vs_glmgampoi": 1.0, "frac_within_1e-6": 1.0,
         "mem_ratio_vs_glmgampoi": 0.8, "process_peak_mem_mb": 800, "nbfit_warm_speedup": 1},
        {"tool": "glmgampoi", "process_peak_mem_mb": 1000, "nbfit_warm_speedup": 6.0},
        {"tool": "delnx", "nbfit_warm_speedup": 0.5, "nbfit_cold_speedup": 2.0},
    ])
    cb1 = table([{"tool": "nbfit", "fit_s_warm": 0.5, "frac_within_1e-6": 0.99},
                 {"tool": "diffxpy", "nbfit_warm_speedup": 80.0, "diffxpy_fit_only_s": 20.0}])
    lines = bench_run.targets({"cb_10k": cb10, "cb_1k": cb1})
    text = "\n".join(lines)
    assert "**PASS** cb_10k: nbfit warm fit ≥ 5×" in text
    assert "**FAIL** cb_10k: nbfit cold fit" in text
    assert "**PASS** cb_1k: nbfit warm ≥ 50× faster than diffxpy" in text
    assert "**FAIL** cb_1k: same, against diffxpy's model fit alone" in text  # 20 / 0.5 = 40
    assert "**FAIL** cb_10k: nbfit warm faster than delnx" in text
    assert "**PASS** cb_10k: nbfit ll" in text and "**FAIL** cb_1k: same on cb_1k" in text
    assert "**PASS** cb_10k: nbfit peak memory" in text
    assert all(("PASS" in x) or ("FAIL" in x) or ("information" in x) for x in lines)
    # a skipped tool gives "no data", not a pass
    cb1.loc[cb1["tool"] == "diffxpy", "status"] = "skipped: not installed"
    assert "**no data** cb_1k: nbfit warm ≥ 50×" in "\n".join(
        bench_run.targets({"cb_10k": cb10, "cb_1k": cb1}))


def test_skipped_tools_are_listed(tmp_path):
    table, _ = bench_run.run_problem(P.get("tiny"), ["diffxpy"], tmp_path,
                                     skip={"diffxpy": "not here"}, log=lambda *a, **k: None)
    assert table.loc[0, "status"] == "skipped: not here"


def test_missing_peers_are_skipped_not_failed(tmp_path, monkeypatch):
    """A fresh clone has no bench/.venvs: the Python peers raise ToolUnavailable."""
    from bench.tools import base

    monkeypatch.setattr(base, "VENVS", tmp_path / "no_venvs")
    for tool in ("pydeseq2", "delnx", "diffxpy"):
        with pytest.raises(ToolUnavailable):
            RUNNERS[tool]("tiny", tmp_path)
    monkeypatch.setattr(base.shutil, "which", lambda name: None)
    for tool in ("glmgampoi", "deseq2"):
        with pytest.raises(ToolUnavailable):
            RUNNERS[tool]("tiny", tmp_path)


#: loosest share of genes within 1e-6 of the best tool (nbfit included) on tiny; DESeq2 and
#: PyDESeq2 estimate the dispersion before the coefficients (PyDESeq2 with Cox-Reid), so
#: they are not expected at the joint optimum, only close to it on most genes
PEER_WITHIN = {"glmgampoi": 0.8, "delnx": 0.8, "diffxpy": 0.9, "deseq2": 0.7, "pydeseq2": 0.0}


@pytest.mark.slow
@pytest.mark.parametrize("tool", PEERS)
def test_peer_tool_on_tiny(tool, tiny_run, tmp_path):
    """Each installed peer runs end to end on tiny and fits the benchmark's model: its
    log-likelihoods sit next to nbfit's (a wrong parameterisation, size-factor convention
    or coefficient order would put them far off)."""
    problem = P.get("tiny")
    try:
        result = RUNNERS[tool](problem, tmp_path)
    except ToolUnavailable as error:
        pytest.skip(str(error))
    assert result.a.shape == (4, 50) and result.b.shape == (50,)
    assert result.fit_seconds_warm > 0 and result.peak_memory_mb > 0
    _, work = tiny_run
    nb = read_result("nbfit", problem, work / "tiny" / "out_nbfit")
    per_gene, summary = E.score(P.load(problem), {"nbfit": nb, tool: result})
    assert summary.loc[tool, "n_failed"] <= 1
    assert summary.loc[tool, "median_rel_gap"] < 1e-4
    assert summary.loc[tool, "frac_within_tol"] >= PEER_WITHIN[tool]
