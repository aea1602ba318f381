"""nbfit on a CUDA GPU at scale: 100,000 cells x 20,000 genes, float32 and float64.

On a CUDA machine, from the repository root (about 2 minutes of installation from wheels):

    python3 -m venv .venv && . .venv/bin/activate
    pip install -e ".[plot]" "jax[cuda12]"
    python bench/gpu.py                    # writes bench/results/gpu.json and gpu.md

and ``python bench/gpu.py --small`` runs the same script on a small problem of the same
family (2,000 x 400) on whatever JAX device there is (CPU included): the smoke test.

What it does, for the registry's problems ``gpu_100k_20k_f32`` and ``gpu_100k_20k_f64``
(``gpu_small_*`` with ``--small``), same counts for both:

1. simulates the counts (bench.problems.simulate_chunked, all CPU cores);
2. fits with nbfit on the default JAX device (the GPU): a cold fit (compilation
   included) and a warm fit, float32 first, then float64; records device peak memory
   (``memory_stats()['peak_bytes_in_use']``, process-wide so far) and host peak RSS;
3. fits a subset of genes (``--ref-genes``, evenly spread) in float64 on the CPU device
   (the reference), and times it;
4. scores all fits on that subset with the float64 evaluator (bench/evaluate.py) and
   prints the relative log-likelihood gap of each GPU fit to the CPU reference.

nbfit promises that the float32 path keeps normal equations at full precision (no TF32 on
GPU); this script does not change any precision setting, so the float32 gaps measure it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from bench import evaluate as E  # noqa: E402
from bench import problems as P  # noqa: E402
from bench.run import machine_info  # noqa: E402
from bench.tools.base import gene_subset  # noqa: E402


def device_info():
    import jax

    devices = jax.devices()
    return {"backend": jax.default_backend(), "devices": [str(d) for d in devices],
            "device_kind": devices[0].device_kind, "jax": jax.__version__,
            "matmul_precision": str(jax.config.jax_default_matmul_precision)}


def device_peak_mb():
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices may not report
        stats = {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def host_peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fit(adata, problem, **extra):
    import nbfit

    start = time.perf_counter()
    est = nbfit.fit(adata, formula_loc=problem.formula_loc, formula_scale=problem.formula_scale,
                    size_factors="sf", dtype=problem.dtype, batch_size=problem.batch_size,
                    **extra)
    return est, time.perf_counter() - start


def coefficients(est, loc_names):
    names = list(est.model.design_loc_names)
    a = np.asarray(est.a_var)[[names.index(n) for n in loc_names]]
    return a, np.asarray(est.b_var)


def summarise_gap(ll, ll_ref):
    gap = E.relative_gap(ll, ll_ref)  # > 0: below the CPU float64 reference
    return {"median_rel_gap": float(np.median(gap)), "max_rel_gap": float(np.max(gap)),
            "frac_within_1e-6": float(np.mean(gap <= 1e-6)),
            "frac_within_1e-4": float(np.mean(gap <= 1e-4)),
            "frac_above_ref": float(np.mean(gap < 0))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true",
                        help="the small problems (gpu_small_*): a CPU-sized smoke test")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"],
                        choices=["float32", "float64"])
    parser.add_argument("--ref-genes", type=int, default=None,
                        help="genes of the CPU float64 reference (default 200; 100 small)")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run the full-size problems even without a GPU")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)

    import jax

    info = device_info()
    print(f"JAX {info['jax']}, backend {info['backend']}: {info['devices']}", flush=True)
    if info["backend"] != "gpu" and not (args.small or args.allow_cpu):
        raise SystemExit("no GPU visible to JAX: install jax[cuda12], or use --small "
                         "(or --allow-cpu for the full size on the CPU)")
    tag = "gpu_small" if args.small else "gpu_100k_20k"
    names = {"float32": f"{tag}_f32", "float64": f"{tag}_f64"}
    problems = [P.get(names[d]) for d in sorted(args.dtypes)]  # float32 first
    base = problems[0]
    ref_genes = args.ref_genes or (100 if args.small else 200)

    start = time.perf_counter()
    data = P.load(base)
    sim_seconds = time.perf_counter() - start
    print(f"simulated {data.n_cells} x {data.n_genes} counts in {sim_seconds:.1f} s", flush=True)
    adata = data.adata(sparse=False)
    loc_names = list(data.design_loc.columns)
    subset = gene_subset(data.n_genes, ref_genes)

    report = {"date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": "python bench/gpu.py " + " ".join(argv or sys.argv[1:]),
              "machine": machine_info(), "device": info, "n_cells": data.n_cells,
              "n_genes": data.n_genes, "simulate_seconds": sim_seconds,
              "ref_genes": int(len(subset)), "fits": {}}
    estimates = {}
    for problem in problems:
        print(f"[{problem.name}] cold fit ...", flush=True)
        est, cold = fit(adata, problem)
        print(f"[{problem.name}] cold {cold:.2f} s; warm fit ...", flush=True)
        est, warm = fit(adata, problem)
        status, counts = np.unique(np.asarray(est.status), return_counts=True)
        estimates[problem.dtype] = coefficients(est, loc_names)
        entry = {"fit_s_cold": cold, "fit_s_warm": warm,
                 "device_peak_mb": device_peak_mb(), "host_peak_mb": host_peak_mb(),
                 "n_steps_mean": float(np.mean(est.n_steps)),
                 "n_steps_max": int(np.max(est.n_steps)),
                 "converged_frac": float(np.mean(est.converged)),
                 "status": {str(s): int(c) for s, c in zip(status, counts, strict=True)},
                 "batch_size": problem.batch_size}
        report["fits"][problem.dtype] = entry
        print(f"[{problem.name}] warm {warm:.2f} s, device peak {entry['device_peak_mb']} MiB, "
              f"host peak {entry['host_peak_mb']:.0f} MiB, converged "
              f"{entry['converged_frac']:.4f}", flush=True)
        del est

    # float64 reference on the CPU device, gene subset
    cpu = jax.devices("cpu")[0]
    ref_problem = P.get(names["float64"])
    sub = adata[:, subset].copy()
    print(f"[cpu float64 reference] {len(subset)} genes ...", flush=True)
    with jax.default_device(cpu):
        fit(sub, ref_problem)  # compile
        ref_est, ref_seconds = fit(sub, ref_problem)
    a_ref, b_ref = coefficients(ref_est, loc_names)
    report["cpu_reference"] = {
        "fit_s_warm_subset": ref_seconds,
        "fit_s_warm_extrapolated": ref_seconds * data.n_genes / len(subset),
        "converged_frac": float(np.mean(ref_est.converged))}
    ll_ref = E.gene_log_likelihood(data.counts, data.design_loc, data.design_scale, data.sf,
                                   a_ref, b_ref, subset)
    for dtype, (a, b) in estimates.items():
        ll = E.gene_log_likelihood(data.counts, data.design_loc, data.design_scale, data.sf,
                                   a[:, subset], b[:, subset], subset)
        gaps = summarise_gap(ll, ll_ref)
        report["fits"][dtype]["ll_vs_cpu_f64"] = gaps
        cpu_time = report["cpu_reference"]["fit_s_warm_extrapolated"]
        report["fits"][dtype]["speedup_vs_cpu_f64_extrapolated"] = (
            cpu_time / report["fits"][dtype]["fit_s_warm"])

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_small" if args.small else "gpu"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=float))
    lines = [f"# nbfit {'(small) ' if args.small else ''}GPU benchmark", "",
             f"- command: `{report['command']}`", f"- date: {report['date']}",
             f"- device: {info['backend']} {info['device_kind']} ({info['devices'][0]}); "
             f"host {report['machine']['cpu']}, {report['machine']['cores']} cores; "
             f"JAX {info['jax']}",
             f"- problem: {data.n_cells} cells x {data.n_genes} genes, ~1+condition+batch, "
             f"dispersion ~1, size factors; simulated in {sim_seconds:.1f} s",
             f"- CPU float64 reference: {len(subset)} genes in {ref_seconds:.2f} s (warm), "
             f"{report['cpu_reference']['fit_s_warm_extrapolated']:.1f} s extrapolated to all "
             "genes", "",
             "| dtype | fit warm (s) | fit cold (s) | device peak MiB | host peak MiB | "
             "steps (mean/max) | converged | ll within 1e-6 of CPU f64 | max rel gap | "
             "× CPU f64 (extrap.) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for dtype, f in report["fits"].items():
        g = f["ll_vs_cpu_f64"]
        dev = "–" if f["device_peak_mb"] is None else f"{f['device_peak_mb']:.0f}"
        lines.append(
            f"| {dtype} | {f['fit_s_warm']:.2f} | {f['fit_s_cold']:.2f} | {dev} | "
            f"{f['host_peak_mb']:.0f} | {f['n_steps_mean']:.1f}/{f['n_steps_max']} | "
            f"{f['converged_frac']:.4f} | {g['frac_within_1e-6']:.4f} | "
            f"{g['max_rel_gap']:.1e} | {f['speedup_vs_cpu_f64_extrapolated']:.1f} |")
    text = "\n".join(lines) + "\n"
    (args.out / f"{stem}.md").write_text(text)
    print("\n" + text)
    print(f"wrote {args.out}/{stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
