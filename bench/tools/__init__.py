"""One runner per tool, all with the same signature.

    run(problem, workdir, max_genes=None, timeout=None, **options) -> ToolResult

``problem`` is a :class:`bench.problems.Problem` (or its name), ``workdir`` the folder for
the problem's data files and the tool's outputs, ``max_genes`` fits an evenly spread
subset of genes (fit times are then extrapolated linearly to all genes, and the result
says so). A tool that is not installed raises :class:`ToolUnavailable`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bench import problems as P
from bench.tools.base import (
    REPO,
    WORKERS,
    ToolResult,
    ToolUnavailable,
    gene_subset,
    read_result,
    rscript,
    run_worker,
    venv_python,
    write_spec,
)

__all__ = ["RUNNERS", "ToolResult", "ToolUnavailable", "run", "TOOLS"]


def _prepare(problem, workdir, max_genes, formats=("npy",)):
    problem = P.get(problem) if isinstance(problem, str) else problem
    workdir = Path(workdir).resolve()
    folder = P.materialise(problem, workdir, formats=formats)
    n_genes = problem.n_genes
    genes = gene_subset(n_genes, max_genes)
    return problem, folder, genes


def _intercept_scale_only(problem, tool):
    if problem.formula_scale.replace(" ", "") not in ("~1",):
        raise ToolUnavailable(f"{tool}: only intercept-only dispersion models are benchmarked")


def _python_tool(tool, worker, python, problem, workdir, max_genes, timeout, repeats,
                 env=None, options=None, sparse=False):
    problem, folder, genes = _prepare(problem, workdir, max_genes,
                                      formats=("npy", "csr") if sparse else ("npy",))
    out_dir = Path(workdir).resolve() / problem.name / f"out_{tool}"
    spec = {
        "data_dir": str(folder), "out_dir": str(out_dir), "genes": genes.tolist(),
        "repeats": repeats, "dtype": problem.dtype, "formula_loc": problem.formula_loc,
        "formula_scale": problem.formula_scale, "sparse": sparse,
        "batch_size": problem.batch_size, "options": options or {},
    }
    spec_path = write_spec(out_dir, spec)
    cmd = [python, WORKERS / worker, spec_path]
    return run_worker(tool, problem, cmd, out_dir, problem.n_genes, env=env, timeout=timeout)


# ---------------------------------------------------------------------------- runners


def run_nbfit(problem, workdir, max_genes=None, timeout=None, repeats=2, python=None,
              **options):
    """nbfit in a fresh process (this Python, or ``python``) with this checkout on the path.

    cold = first fit (JIT compilation included), warm = best later fit in that process.
    Sparse problems pass the counts as CSR. ``options`` go to ``nbfit.fit``.
    """
    problem = P.get(problem) if isinstance(problem, str) else problem
    python = python or os.environ.get("NBFIT_PYTHON") or _default_python()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           # cold means compiled in that process: no persistent compilation cache
           "JAX_ENABLE_COMPILATION_CACHE": "false"}
    result = _python_tool("nbfit", "nbfit_worker.py", python, problem, workdir, max_genes,
                          timeout, repeats, env=env, options=options, sparse=problem.sparse)
    result.notes.append(f"dtype {problem.dtype}" + (", CSR input" if problem.sparse else ""))
    return result


def _default_python():
    import sys

    return sys.executable


def run_glmgampoi(problem, workdir, max_genes=None, timeout=None, **_):
    """glmGamPoi::glm_gp via Rscript (overdispersion MLE, no shrinkage, no Cox-Reid)."""
    return _r_tool("glmgampoi", "glmgampoi.R", problem, workdir, max_genes, timeout)


def run_deseq2(problem, workdir, max_genes=None, timeout=None, **_):
    """DESeq2 via Rscript: gene-wise dispersions, then nbinomWaldTest's MLE at them."""
    return _r_tool("deseq2", "deseq2.R", problem, workdir, max_genes, timeout)


_R_PACKAGES = {"glmgampoi": "glmGamPoi", "deseq2": "DESeq2"}
_r_checked: dict = {}


def _r_package_available(exe, package):
    """Whether ``library(package)`` loads in Rscript (checked once per process)."""
    if package not in _r_checked:
        import subprocess

        probe = subprocess.run([exe, "-e", f"suppressPackageStartupMessages(library({package}))"],
                               env={**os.environ, "EDITOR": os.environ.get("EDITOR") or "vi"},
                               capture_output=True, text=True, timeout=300)
        _r_checked[package] = probe.returncode == 0
    return _r_checked[package]


def _r_tool(tool, script, problem, workdir, max_genes, timeout):
    problem = P.get(problem) if isinstance(problem, str) else problem
    _intercept_scale_only(problem, tool)
    exe = rscript()
    if not _r_package_available(exe, _R_PACKAGES[tool]):
        raise ToolUnavailable(f"R package {_R_PACKAGES[tool]} not installed "
                              "(bench/setup.sh r: apt-get install r-bioc-glmgampoi r-bioc-deseq2)")
    problem, folder, genes = _prepare(problem, workdir, max_genes, formats=("npy", "f64"))
    out_dir = Path(workdir).resolve() / problem.name / f"out_{tool}"
    out_dir.mkdir(parents=True, exist_ok=True)
    genes_file = out_dir / "genes.txt"
    np.savetxt(genes_file, genes + 1, fmt="%d")
    cmd = [exe, WORKERS / script, folder, out_dir, genes_file]
    meta_names = P.LOC_NAMES if problem.formula_loc == "~1+condition+batch" else None

    def convert():
        import json

        lines = (out_dir / "timing.txt").read_text().splitlines()
        elapsed, user, version, r_version, names = lines[0], lines[1], lines[2], lines[3], lines[4]
        names = names.split("\t")
        p = len(names)
        beta = np.fromfile(out_dir / "beta.f64", dtype="<f8").reshape(len(genes), p).T
        if meta_names is not None and names != meta_names:
            beta = beta[[names.index(n) for n in meta_names]]
        od = np.fromfile(out_dir / "overdispersion.f64", dtype="<f8")
        with np.errstate(divide="ignore"):
            b = -np.log(od)  # overdispersion 0 -> log r = +inf (Poisson)
        mem_before, mem_peak, mem_load, reset, blas = lines[5:10]
        info = {"fit_seconds_warm": float(elapsed), "fit_seconds_cold": float(elapsed),
                "mem_before_fit_mb": float(mem_before), "mem_peak_mb": float(mem_peak),
                "mem_load_peak_mb": float(mem_load), "mem_hwm_reset": reset == "TRUE",
                "mem_process_peak_mb": max(float(mem_peak), float(mem_load)),
                "fit_user_seconds": float(user), "version": f"{tool} {version} ({r_version})",
                "blas": blas,
                "notes": [f"fit timed in R with system.time(); no JIT: warm = cold; "
                          f"single-threaded R, BLAS {blas}"]}
        if tool == "glmgampoi":
            info["notes"].append("glm_gp(overdispersion=TRUE, overdispersion_shrinkage=FALSE, "
                                 "do_cox_reid_adjustment=FALSE); b = -log(overdispersion)")
            info["n_poisson"] = int(np.sum(od == 0))
        else:
            iters = np.fromfile(out_dir / "iter.f64", dtype="<f8")
            conv = np.fromfile(out_dir / "conv.f64", dtype="<f8")
            info["n_steps"] = float(np.nanmean(iters)) if np.any(np.isfinite(iters)) else None
            info["converged_fraction"] = float(np.mean(conv > 0))
            info["notes"].append(
                "estimateDispersionsGeneEst(useCR=FALSE, minmu=1e-6) then "
                "nbinomWaldTest(betaPrior=FALSE, minmu=1e-6) at the gene-wise dispersions "
                "(trend/MAP shrinkage skipped: ll is scored at the MLE-type pair); "
                "b = -log(dispGeneEst); steps = betaIter")
        np.savez(out_dir / "result.npz", a=beta, b=b, genes=genes)
        (out_dir / "result.json").write_text(json.dumps(info))

    for stale in ("timing.txt", "beta.f64", "overdispersion.f64"):
        (out_dir / stale).unlink(missing_ok=True)
    return _run_and_convert(tool, problem, cmd, out_dir, convert, timeout)


def _run_and_convert(tool, problem, cmd, out_dir, convert, timeout):
    from bench.tools import base

    log = out_dir / "log.txt"
    code, wall, peak = base.run_measured(cmd, env={"EDITOR": os.environ.get("EDITOR") or "vi"},
                                         timeout=timeout, log=log)
    if code != 0 or not (out_dir / "timing.txt").exists():
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"{tool} failed (exit {code}) on {problem.name}; log {log}:\n{tail}")
    convert()
    # read back through the common path, then restore the parent's measurements
    result = read_result(tool, problem, out_dir)
    result.process_seconds = wall
    result.peak_memory_mb = result.extra.get("mem_peak_mb") or peak
    return result


def run_pydeseq2(problem, workdir, max_genes=None, timeout=None, n_cpus=None, **_):
    """PyDESeq2 (bench/.venvs/pydeseq2): gene-wise dispersions, then fit_LFC at them."""
    problem = P.get(problem) if isinstance(problem, str) else problem
    _intercept_scale_only(problem, "pydeseq2")
    return _python_tool("pydeseq2", "pydeseq2_worker.py", venv_python("pydeseq2"), problem,
                        workdir, max_genes, timeout, repeats=1, options={"n_cpus": n_cpus})


def run_delnx(problem, workdir, max_genes=None, timeout=None, repeats=2, **options):
    """delnx.tl.nb_fit (bench/.venvs/delnx), glmGamPoi's settings; cold and warm fits."""
    problem = P.get(problem) if isinstance(problem, str) else problem
    _intercept_scale_only(problem, "delnx")
    return _python_tool("delnx", "delnx_worker.py", venv_python("delnx"), problem, workdir,
                        max_genes, timeout, repeats=repeats, options=options)


def run_diffxpy(problem, workdir, max_genes=None, timeout=None, **_):
    """diffxpy 0.7.4 / batchglm 0.7.4 (bench/.venvs/diffxpy) through de.test.wald."""
    problem = P.get(problem) if isinstance(problem, str) else problem
    return _python_tool("diffxpy", "diffxpy_worker.py", venv_python("diffxpy"), problem,
                        workdir, max_genes, timeout, repeats=1)


def run_statsmodels(problem, workdir, max_genes=50, timeout=None, python=None, **_):
    """statsmodels discrete NegativeBinomial per gene on ``max_genes`` genes (default 50);
    fit times extrapolated to all genes."""
    problem = P.get(problem) if isinstance(problem, str) else problem
    _intercept_scale_only(problem, "statsmodels")
    python = python or _default_python()
    try:
        import statsmodels  # noqa: F401
    except ImportError as error:
        raise ToolUnavailable("statsmodels not installed") from error
    return _python_tool("statsmodels", "statsmodels_worker.py", python, problem, workdir,
                        max_genes, timeout, repeats=1)


RUNNERS = {
    "nbfit": run_nbfit,
    "glmgampoi": run_glmgampoi,
    "deseq2": run_deseq2,
    "pydeseq2": run_pydeseq2,
    "delnx": run_delnx,
    "diffxpy": run_diffxpy,
    "statsmodels": run_statsmodels,
}
TOOLS = list(RUNNERS)


def run(tool, problem, workdir, **kwargs) -> ToolResult:
    return RUNNERS[tool](problem, workdir, **kwargs)
