"""What every runner returns, and how a tool's fresh process is run and measured.

Every tool runs in a fresh child process (its own virtualenv's Python, or Rscript) that
reads the problem's files (written beforehand, outside the timed region), times its own
fit, and writes ``result.json`` (timings, diagnostics, notes) and ``result.npz`` (``a``
(p_loc, n), ``b`` (n,) log r, ``genes`` (n,)). The parent measures the whole process:
wall time (start-up, imports, data loading, fit, writing). Peak memory is the worker's
own peak resident set over its fits (``workers/_common.py`` FitMemory: the kernel's
high-water mark VmHWM is reset just before the first fit and read right after the last,
so it counts the data, libraries and everything the fits allocate, but not transient
copies made while reading the input files); the whole process's peak is kept too
(``process_peak_mem_mb``). ``ru_maxrss`` from ``os.wait4`` cannot be used, since Linux
carries the forking parent's high-water mark across exec. Processes of worker pools (diffxpy's multiprocessing pool,
PyDESeq2's joblib workers) are not included; their largest ``ru_maxrss`` is kept in
``extra["children_peak_mb"]``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
WORKERS = BENCH / "workers"
VENVS = BENCH / ".venvs"


class ToolUnavailable(RuntimeError):
    """The tool is not installed here (the runner is skipped with this note)."""


@dataclass
class ToolResult:
    tool: str
    problem: str
    #: (p_loc, n) location coefficients in nbfit's convention (problems.LOC_NAMES)
    a: np.ndarray | None = None
    #: (n,) log r per gene (intercept-only scale models)
    b: np.ndarray | None = None
    #: (n,) indices of the genes fitted (None: all genes)
    genes: np.ndarray | None = None
    #: fit time in a warmed-up process (second fit for JIT tools), extrapolated to all
    #: genes when only a subset was fitted
    fit_seconds_warm: float = float("nan")
    #: fit time of the first fit in a fresh process (JIT compilation included)
    fit_seconds_cold: float = float("nan")
    #: wall time of the whole fresh process: start-up, imports, reading data, fit(s)
    process_seconds: float = float("nan")
    peak_memory_mb: float = float("nan")
    n_steps: float = float("nan")
    converged_fraction: float = float("nan")
    #: genes fitted / genes in the problem (time extrapolated by its inverse)
    gene_fraction: float = 1.0
    version: str = ""
    notes: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    #: further per-gene arrays a worker returned (e.g. nbfit's own log_likelihood)
    arrays: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {
            "tool": self.tool,
            "version": self.version,
            "fit_s_warm": self.fit_seconds_warm,
            "fit_s_cold": self.fit_seconds_cold,
            "process_s": self.process_seconds,
            "peak_mem_mb": self.peak_memory_mb,
            "mem_before_fit_mb": _num(self.extra.get("mem_before_fit_mb")),
            "process_peak_mem_mb": _num(self.extra.get("mem_process_peak_mb")),
            "n_steps": self.n_steps,
            "converged_frac": self.converged_fraction,
            "gene_fraction": self.gene_fraction,
            "notes": "; ".join(self.notes),
        }


def _num(value) -> float:
    return float("nan") if value is None else float(value)


def venv_python(name: str) -> Path:
    """Python of ``bench/.venvs/<name>`` (made by bench/setup.sh)."""
    python = VENVS / name / "bin" / "python"
    if not python.exists():
        raise ToolUnavailable(f"virtualenv bench/.venvs/{name} missing (run bench/setup.sh)")
    return python


def rscript() -> str:
    path = shutil.which("Rscript")
    if path is None:
        raise ToolUnavailable("Rscript not found (apt-get install r-base-core)")
    return path


def run_measured(cmd, env=None, timeout=None, log=None):
    """Run ``cmd`` to completion; return (returncode, wall seconds, peak RSS MiB).

    stdout and stderr go to ``log`` (a path) when given.
    """
    full_env = dict(os.environ)
    full_env.update(env or {})
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        start = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], env=full_env, stdout=out,
                                stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
        deadline = None if timeout is None else start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log:
            out.close()
    return proc.returncode, wall, usage.ru_maxrss / 1024.0


def run_worker(tool, problem, cmd, out_dir, n_genes_total, env=None, timeout=None):
    """Run one worker command, read its result files and return a ToolResult."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("result.json", "result.npz"):
        (out_dir / stale).unlink(missing_ok=True)
    log = out_dir / "log.txt"
    code, wall, peak = run_measured(cmd, env=env, timeout=timeout, log=log)
    info_path = out_dir / "result.json"
    if code != 0 or not info_path.exists():
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise RuntimeError(f"{tool} worker failed (exit {code}) on {problem.name}; log "
                           f"{log}:\n{tail}")
    result = read_result(tool, problem, out_dir)
    result.process_seconds = wall
    # the worker's own VmHWM; os.wait4's ru_maxrss would also count the parent's memory
    # at fork time (Linux keeps the high-water mark across exec)
    result.peak_memory_mb = result.extra.get("mem_peak_mb") or peak
    return result


def read_result(tool, problem, out_dir):
    """ToolResult from a worker's result.json / result.npz (fit times extrapolated to all
    genes when a subset was fitted)."""
    out_dir = Path(out_dir)
    info = json.loads((out_dir / "result.json").read_text())
    arrays = np.load(out_dir / "result.npz")
    genes = np.asarray(arrays["genes"], dtype=np.int64)
    fraction = len(genes) / problem.n_genes
    notes = list(info.get("notes", []))
    if fraction < 1:
        notes.append(f"fitted {len(genes)} of {problem.n_genes} genes; fit times x"
                     f"{1 / fraction:.3g} (extrapolated linearly in genes); process time "
                     "and memory as measured")
    nan = float("nan")
    return ToolResult(
        tool=tool,
        problem=problem.name,
        a=np.asarray(arrays["a"], dtype=np.float64),
        b=np.asarray(arrays["b"], dtype=np.float64).reshape(-1),
        genes=None if fraction == 1 else genes,
        fit_seconds_warm=float(info["fit_seconds_warm"]) / fraction,
        fit_seconds_cold=float(info["fit_seconds_cold"]) / fraction,
        n_steps=nan if info.get("n_steps") is None else float(info["n_steps"]),
        converged_fraction=(nan if info.get("converged_fraction") is None
                            else float(info["converged_fraction"])),
        gene_fraction=fraction,
        version=str(info.get("version", "")),
        notes=notes,
        extra={k: v for k, v in info.items() if k not in ("notes", "version")},
        arrays={k: arrays[k] for k in arrays.files if k not in ("a", "b", "genes")},
    )


def gene_subset(n_genes: int, max_genes: int | None, seed: int = 0) -> np.ndarray:
    """Evenly spread gene indices (all genes when max_genes is None or large enough)."""
    if max_genes is None or max_genes >= n_genes:
        return np.arange(n_genes)
    return np.unique(np.linspace(0, n_genes - 1, max_genes).round().astype(np.int64))


def python_cmd(python, worker, spec_path):
    return [python, WORKERS / worker, spec_path]


def write_spec(out_dir: Path, spec: dict) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "spec.json"
    path.write_text(json.dumps(spec, indent=1, default=str))
    return path


def this_python() -> str:
    return sys.executable
