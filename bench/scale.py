"""Large data from disk: 200,000 cells x 2,000 genes, sparse (~90% zeros), fitted from a
backed .h5ad file; time and peak memory against the dense float64 size of the matrix.

    python bench/scale.py                      # generate (once), prepare, fit; ~5 min on 2 cores
    python bench/scale.py --cells 20000 --genes 200 --out /tmp/scale.md   # a quick look

Steps, each in its own process (so that its peak resident memory, VmHWM, is its own):

1. ``generate`` (untimed, skipped when the file exists): NB counts with means 0.02-0.3
   times size factors and a condition effect, written cell-major (CSR) as most .h5ad
   files are.
2. ``prepare``: ``nbfit prepare`` writes the gene-major (CSC) copy.
3. ``fit``: ``nbfit.fit("counts_csc.h5ad", formula_loc="~1+condition", size_factors="sf")``
   on the file (opened lazily, read gene chunk by gene chunk), including JIT compilation
   and the evaluation of the statuses.

Timed steps run under ``flock /tmp/nbfit_timing.lock`` so they never overlap other timed
work on the machine. Results: ``bench/results/scale.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCK = "/tmp/nbfit_timing.lock"
FORMULA = "~1+condition"


def _peak_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return -1


def generate(path, n_cells, n_genes, seed=0):
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse

    rng = np.random.default_rng(seed)
    condition = np.array(["A", "B"])[rng.integers(0, 2, n_cells)]
    size_factors = np.exp(rng.normal(0.0, 0.3, n_cells))
    effect = np.where(condition == "A", 1.0, 1.3)
    blocks = []
    for start in range(0, n_genes, 100):
        n = min(100, n_genes - start)
        base = np.exp(rng.uniform(np.log(0.02), np.log(0.3), n))
        r = np.exp(rng.normal(0.0, 0.5, n))
        mu = base[None, :] * (size_factors * effect)[:, None]
        counts = rng.negative_binomial(r[None, :], r[None, :] / (r[None, :] + mu))
        blocks.append(scipy.sparse.csc_matrix(counts.astype(np.float32)))
    matrix = scipy.sparse.hstack(blocks, format="csc").tocsr()
    obs = pd.DataFrame({"condition": condition, "sf": size_factors},
                       index=[f"cell_{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)])
    anndata.AnnData(X=matrix, obs=obs, var=var).write_h5ad(path)
    return {"nnz": int(matrix.nnz), "zeros": 1.0 - matrix.nnz / (n_cells * n_genes)}


def step_prepare(source, target):
    from nbfit._storage import prepare

    start = time.perf_counter()
    prepare(source, target)
    return {"seconds": time.perf_counter() - start, "peak_bytes": _peak_bytes()}


def step_fit(path, batch_size):
    import numpy as np

    import nbfit

    start = time.perf_counter()
    est = nbfit.fit(path, formula_loc=FORMULA, size_factors="sf", batch_size=batch_size,
                    progress=False)
    status = est.status  # evaluation: log-likelihood, derivatives, statuses
    seconds = time.perf_counter() - start
    counts = dict(zip(*np.unique(status, return_counts=True), strict=True))
    return {
        "seconds": seconds,
        "peak_bytes": _peak_bytes(),
        "batch_size": int(est.batch_size),
        "n_genes": int(len(status)),
        "status": {str(k): int(v) for k, v in counts.items()},
        "mean_steps": float(np.mean(est.n_steps)),
        "counts_kind": est.data.counts.format,
    }


def _child(args):
    """Run one step in a fresh process under the timing lock; its JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--step", *args]
    if Path("/usr/bin/flock").exists() or Path("/bin/flock").exists():
        command = ["flock", LOCK, *command]
    env = {**os.environ, "NBFIT_PROGRESS": "0", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gib(n):
    return f"{n / 2**30:.2f} GiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=200_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--batch-sizes", nargs="+", default=["default", "25"],
                        help="genes per chunk of each fit ('default': nbfit's, <= 2**22 counts "
                             "per chunk); one fit per value")
    parser.add_argument("--workdir", default=str(HERE / "work" / "scale"))
    parser.add_argument("--out", default=str(HERE / "results" / "scale.md"))
    parser.add_argument("--step", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.step:  # inside a child process
        name, *rest = args.step
        if name == "prepare":
            result = step_prepare(*rest)
        else:
            result = step_fit(rest[0], int(rest[1]) if rest[1] != "None" else None)
        print(json.dumps(result))
        return 0

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tag = f"{args.cells}x{args.genes}"
    csr, csc = work / f"counts_{tag}_csr.h5ad", work / f"counts_{tag}_csc.h5ad"
    if not csr.exists():
        print(f"generating {csr}", file=sys.stderr)
        info = generate(str(csr), args.cells, args.genes)
        (work / f"counts_{tag}.json").write_text(json.dumps(info))
    info = json.loads((work / f"counts_{tag}.json").read_text())
    if csc.exists():
        csc.unlink()
    print("prepare ...", file=sys.stderr)
    prepared = _child(["prepare", str(csr), str(csc)])
    fits = []
    for size in args.batch_sizes:
        print(f"fit, batch_size {size} ...", file=sys.stderr)
        fits.append(_child(["fit", str(csc), "None" if size == "default" else str(int(size))]))

    dense = args.cells * args.genes * 8
    rows = [
        f"| `nbfit.fit(path)`, backed CSC, batch_size {f['batch_size']}"
        f"{' (default)' if size == 'default' else ''} | {f['seconds']:.1f} s | "
        f"{_gib(f['peak_bytes'])} ({f['peak_bytes'] / dense:.0%} of dense) | "
        f"{_gib(args.cells * f['batch_size'] * 8)} |"
        for size, f in zip(args.batch_sizes, fits, strict=True)
    ]
    fitted = fits[-1]
    lines = [
        "# Large data from disk (bench/scale.py)",
        "",
        f"{args.cells:,} cells x {args.genes:,} genes, {info['zeros']:.1%} zeros "
        f"({info['nnz']:,} nonzeros), `{FORMULA}` with size factors, float64, on "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"each step in its own process under `flock {LOCK}`.",
        "",
        "| step | time | peak memory (VmHWM) | one dense float64 chunk |",
        "|---|---|---|---|",
        f"| `nbfit prepare` CSR .h5ad -> CSC .h5ad | {prepared['seconds']:.1f} s | "
        f"{_gib(prepared['peak_bytes'])} | |",
        *rows,
        "",
        f"Dense float64 size of the whole matrix: {_gib(dense)}. Fit times include JIT "
        "compilation, reading the file and the statuses (log-likelihood and derivatives at "
        "the fit). Peak memory is set by `batch_size` (about 10 dense chunk-sized arrays "
        "in flight in the solvers, plus the interpreter and JAX, ~0.3 GiB), not by the "
        "number of genes or the file size.",
        "",
        f"Statuses: {', '.join(f'{n} {s}' for s, n in fitted['status'].items())}; "
        f"mean Newton steps per gene {fitted['mean_steps']:.1f}; "
        f"{fitted['n_genes'] / fitted['seconds']:.1f} genes/s.",
        "",
        "Reproduce: `python bench/scale.py` (generates the data once under "
        "`bench/work/scale/`).",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
