"""nbfit's time and peak memory as cells grow (1k, 10k, 100k x 2k genes) and as genes
grow (2k, 20k x 10k cells, fitted in chunks of ``batch_size`` = 500 genes).

    python bench/scaling.py [--out bench/results] [--workdir bench/work] [--quick]
                            [--timeout 600] [--series cells genes]

Each point is one fresh nbfit process (bench.tools.run_nbfit): cold = first fit,
compilation included; warm = second fit; peak memory = the process's ru_maxrss, which
includes the dense float64 counts it holds (cells x genes x 8 bytes, listed as data MiB).
A point whose process runs past ``--timeout`` seconds is recorded as timed out and left out
of the plot. Writes ``scaling.csv``, ``scaling.json``, ``scaling.md`` (a section that
``bench/run.py`` puts into ``results/README.md``, which is rebuilt here too) and
``scaling_cells.png`` / ``scaling_genes.png`` (matplotlib: the ``plot`` extra). The fitted log-log slope of warm time against size is
printed and stored: 1 means linear. ``--quick`` runs small sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench import problems as P  # noqa: E402
from bench.run import git_revision, machine_info, write_readme  # noqa: E402
from bench.tools import run_nbfit  # noqa: E402

SERIES = {
    "cells": ["cells_1k", "cells_10k", "cells_100k"],
    "genes": ["genes_2k", "genes_20k"],
}


def sized_series(cells=None, genes=None):
    """The registry's series, or other sizes of the same problems (``--cells``/``--genes``):
    cells N x 2,000 genes (nbfit's default chunking) and 10,000 cells x N genes (chunks of
    500 genes). Registered problems are used where a size matches one."""
    by_size = {(p.n_cells, p.n_genes, tag): p for tag in ("scaling_cells", "scaling_genes")
               for p in P.with_tag(tag)}
    base_cells, base_genes = P.get("cells_1k"), P.get("genes_2k")
    out = {k: [P.get(n) for n in v] for k, v in SERIES.items()}
    if cells:
        out["cells"] = [by_size.get((n, 2_000, "scaling_cells"))
                        or P.scaled(base_cells, name=f"cells_{n}", n_cells=n) for n in cells]
    if genes:
        out["genes"] = [by_size.get((10_000, n, "scaling_genes"))
                        or P.scaled(base_genes, name=f"genes_{n}", n_genes=n) for n in genes]
    return out


def quick_series():
    base = P.get("cells_1k")
    return {
        "cells": [P.scaled(base, name=f"q_cells_{n}", n_cells=n, n_genes=100) for n in (200, 800)],
        "genes": [P.scaled(base, name=f"q_genes_{g}", n_cells=300, n_genes=g, batch_size=50)
                  for g in (100, 400)],
    }


def measure(problem, workdir, timeout=None):
    try:
        result = run_nbfit(problem, workdir, timeout=timeout)
    except RuntimeError as error:  # killed at the timeout, or failed
        return {"problem": problem.name, "n_cells": problem.n_cells,
                "n_genes": problem.n_genes, "batch_size": problem.batch_size,
                "status": f"failed or timed out (> {timeout} s): {str(error).splitlines()[0]}"}
    return {
        "problem": problem.name, "n_cells": problem.n_cells, "n_genes": problem.n_genes,
        "batch_size": problem.batch_size, "fit_s_warm": result.fit_seconds_warm,
        "fit_s_cold": result.fit_seconds_cold, "process_s": result.process_seconds,
        "peak_mem_mb": result.peak_memory_mb,
        "data_mb": problem.n_cells * problem.n_genes * 8 / 2**20,
        "n_steps": result.n_steps, "converged_frac": result.converged_fraction,
        "status": "ok",
    }


def slope(x, y):
    x, y = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    if len(x) < 2:
        return float("nan")
    return float(np.polyfit(x, y, 1)[0])


def plot(frame, axis, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = "n_cells" if axis == "cells" else "n_genes"
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = frame[size].to_numpy(float)
    for column, label, marker in (("fit_s_warm", "fit, warm", "o"),
                                  ("fit_s_cold", "fit, cold (compile incl.)", "s"),
                                  ("process_s", "whole process", "^")):
        left.loglog(x, frame[column], marker=marker, label=label)
    ref = frame["fit_s_warm"].iloc[0] * x / x[0]
    left.loglog(x, ref, "k:", label="linear from the first point")
    left.set_xlabel(size.replace("n_", "number of "))
    left.set_ylabel("seconds")
    left.legend(fontsize=8)
    left.set_title(f"nbfit time vs {axis}")
    right.loglog(x, frame["peak_mem_mb"], "o-", label="peak RSS over the fits")
    right.loglog(x, frame["data_mb"], "s--", label="dense float64 counts")
    right.set_xlabel(size.replace("n_", "number of "))
    right.set_ylabel("MiB")
    right.legend(fontsize=8)
    right.set_title(f"nbfit memory vs {axis}")
    fixed = (f"{frame['n_genes'].iloc[0]} genes" if axis == "cells"
             else f"{frame['n_cells'].iloc[0]} cells, batch_size {frame['batch_size'].iloc[0]}")
    fig.suptitle(f"~1+condition+batch, dispersion ~1, float64; {fixed}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--workdir", type=Path, default=HERE / "work")
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--series", nargs="+", default=["cells", "genes"],
                        choices=["cells", "genes"])
    parser.add_argument("--cells", nargs="+", type=int, default=None, metavar="N",
                        help="cell counts of the cells series (default 1000 10000 100000)")
    parser.add_argument("--genes", nargs="+", type=int, default=None, metavar="N",
                        help="gene counts of the genes series (default 2000 20000)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per point (one fresh nbfit process, two fits)")
    args = parser.parse_args(argv)
    series = quick_series() if args.quick else sized_series(args.cells, args.genes)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, slopes = [], {}
    for axis in args.series:
        part = []
        for problem in series[axis]:
            print(f"[scaling/{axis}] {problem.name} ({problem.n_cells} x {problem.n_genes}) ...",
                  flush=True)
            row = {"series": axis, **measure(problem, args.workdir, args.timeout)}
            if row["status"] != "ok":
                print(f"    {row['status']}", flush=True)
            else:
                print(f"    warm {row['fit_s_warm']:.3g} s, cold {row['fit_s_cold']:.3g} s, "
                      f"peak {row['peak_mem_mb']:.0f} MiB", flush=True)
            part.append(row)
        rows += part
        frame = pd.DataFrame([r for r in part if r["status"] == "ok"])
        if len(frame) == 0:
            continue
        size = "n_cells" if axis == "cells" else "n_genes"
        slopes[axis] = {"warm": slope(frame[size], frame["fit_s_warm"]),
                        "cold": slope(frame[size], frame["fit_s_cold"]),
                        "peak_mem": slope(frame[size], frame["peak_mem_mb"])}
        print(f"[scaling/{axis}] log-log slope of warm time: {slopes[axis]['warm']:.2f} "
              "(1 = linear)")
        plot(frame, axis, args.out / f"scaling_{axis}{'_quick' if args.quick else ''}.png")
    suffix = "_quick" if args.quick else ""
    table = pd.DataFrame(rows)
    table.to_csv(args.out / f"scaling{suffix}.csv", index=False)
    meta = {"command": "python bench/scaling.py " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine_info(), "git": git_revision(), "loglog_slopes": slopes}
    (args.out / f"scaling{suffix}.json").write_text(json.dumps(meta, indent=1))
    if not args.quick:
        (args.out / "scaling.md").write_text(markdown(table, meta, args.series))
        write_readme(args.out)
    print(f"wrote {args.out}/scaling{suffix}.csv and plots")


def markdown(table, meta, series):
    """The scaling section of results/README.md."""
    m = meta["machine"]
    lines = ["## Scaling (nbfit alone)", "",
             f"- command: `{meta['command']}`",
             f"- date: {meta['date']}; nbfit revision {meta.get('git', '?')}",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB memory",
             "", "| series | cells | genes | batch_size | fit warm (s) | fit cold (s) | "
             "process (s) | peak MiB, fit | data MiB | steps | converged | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, r in table.iterrows():
        ok = r.get("status") == "ok"

        def f(column, digits=3):
            value = r.get(column)
            return f"{value:.{digits}g}" if ok and pd.notna(value) else "–"

        batch = "default" if pd.isna(r.get("batch_size")) else str(int(r["batch_size"]))
        lines.append(f"| {r['series']} | {r['n_cells']} | {r['n_genes']} | {batch} | "
                     f"{f('fit_s_warm')} | {f('fit_s_cold')} | {f('process_s')} | "
                     f"{f('peak_mem_mb', 4)} | {f('data_mb', 4)} | {f('n_steps')} | "
                     f"{f('converged_frac', 4)} | {r.get('status', '')} |")
    lines.append("")
    for axis, s in meta["loglog_slopes"].items():
        lines.append(f"- log-log slope vs {axis} (1 = linear): warm {s['warm']:.2f}, "
                     f"cold {s['cold']:.2f}, peak memory {s['peak_mem']:.2f}")
    lines.append("")
    for axis in series:
        lines.append(f"![nbfit vs {axis}](scaling_{axis}.png)")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
