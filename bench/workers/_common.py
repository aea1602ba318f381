"""Helpers shared by the Python workers (numpy and pandas only: runs in every venv)."""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd


def load_spec():
    spec = json.loads(Path(sys.argv[1]).read_text())
    spec["data_dir"] = Path(spec["data_dir"])
    spec["out_dir"] = Path(spec["out_dir"])
    return spec


def read_problem(spec, sparse=False):
    """(meta, counts, obs, design_loc DataFrame, sf, genes) of the problem folder.

    counts are float64 (cells, genes) restricted to the requested genes; CSR when
    ``sparse`` (and the folder has counts_csr.npz).
    """
    folder = spec["data_dir"]
    meta = json.loads((folder / "meta.json").read_text())
    genes = np.asarray(spec["genes"], dtype=np.int64)
    if sparse:
        import scipy.sparse

        counts = scipy.sparse.load_npz(folder / "counts_csr.npz").tocsr()
        if len(genes) < counts.shape[1]:
            counts = counts[:, genes].tocsr()
    else:
        counts = np.load(folder / "counts.npy")
        if len(genes) < counts.shape[1]:
            counts = np.ascontiguousarray(counts[:, genes])
    obs = pd.read_csv(folder / "obs.csv", index_col="cell")
    obs["condition"] = obs["condition"].astype(str)
    obs["batch"] = obs["batch"].astype(str)
    design = pd.read_csv(folder / "design.csv", float_precision="round_trip")
    design.index = obs.index
    sf = np.loadtxt(folder / "sf.txt")
    return meta, counts, obs, design, sf, genes


def hwm_mb():
    """Peak resident memory of this process so far (VmHWM), MiB; NaN off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb():
    """Current resident memory of this process (VmRSS), MiB; NaN off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class FitMemory:
    """Peak memory of the fit window, the data and libraries it holds included.

    ``start()`` (just before the first timed fit) records the process's peak so far
    (reading the data, imports: ``mem_load_peak_mb``), then resets the kernel's high-water
    mark (``echo 5 > /proc/self/clear_refs``) so that ``stop()`` (right after the last
    fit) reads the peak of the fits alone: ``mem_peak_mb`` (``mem_before_fit_mb`` = the
    resident memory when the fits start). Where the reset is refused, ``mem_peak_mb`` is
    the whole process's peak and ``mem_hwm_reset`` says so.
    """

    def start(self):
        self.load_peak = hwm_mb()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False
        self.before = rss_mb()
        return self

    def stop(self):
        self.peak = hwm_mb()
        return self

    def info(self):
        return {"mem_load_peak_mb": self.load_peak, "mem_before_fit_mb": self.before,
                "mem_peak_mb": self.peak, "mem_hwm_reset": self.reset,
                "mem_process_peak_mb": max(self.load_peak, self.peak)}


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def write_result(spec, a, b, genes, fit_seconds_warm, fit_seconds_cold, n_steps=None,
                 converged_fraction=None, version="", notes=(), **extra):
    """result.npz (a (p, n), b (n,), genes, extra arrays) and result.json."""
    out = spec["out_dir"]
    out.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in extra.items() if isinstance(v, np.ndarray)}
    info = {k: v for k, v in extra.items() if not isinstance(v, np.ndarray)}
    np.savez(out / "result.npz", a=np.asarray(a, dtype=np.float64),
             b=np.asarray(b, dtype=np.float64).reshape(-1), genes=np.asarray(genes), **arrays)
    import resource

    info.setdefault("mem_peak_mb", hwm_mb())  # workers pass FitMemory.info()
    info.update(
        # worker pools' processes are reported apart (their ru_maxrss, largest one)
        children_peak_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        fit_seconds_warm=float(fit_seconds_warm),
        fit_seconds_cold=float(fit_seconds_cold),
        n_steps=None if n_steps is None else float(n_steps),
        converged_fraction=None if converged_fraction is None else float(converged_fraction),
        version=str(version),
        notes=list(notes),
    )
    (out / "result.json").write_text(json.dumps(info, indent=1, default=str))


def reorder(frame_or_array, names, wanted):
    """Rows of a (p, n) coefficient array reordered from ``names`` to ``wanted``."""
    index = [list(names).index(w) for w in wanted]
    return np.asarray(frame_or_array)[index]
