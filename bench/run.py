"""Run tools on registered problems, score them with one evaluator, write the tables.

    python bench/run.py --problems cb_1k cb_10k --tools nbfit glmgampoi deseq2 \\
        --max-genes deseq2=500 statsmodels=50 --out bench/results

For each problem: ``<out>/<problem>.csv`` (one row per tool), ``<out>/<problem>.json``
(the command, date, machine, notes) and ``<out>/<problem>_genes.csv.gz`` (per-gene
log-likelihoods and gaps); then ``<out>/README.md`` is rebuilt from every problem in
``<out>``. Timing ratios are always against other tools of the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bench import evaluate as E  # noqa: E402
from bench import problems as P  # noqa: E402
from bench.tools import RUNNERS, TOOLS, ToolUnavailable  # noqa: E402

REFERENCE_TOOL = "glmgampoi"
DEFAULT_MAX_GENES = {"statsmodels": 50}
COLUMNS = [
    "tool", "version", "fit_s_warm", "fit_s_cold", "process_s", "peak_mem_mb", "mem_before_fit_mb",
    "n_steps",
    "converged_frac", "genes_scored", "gene_fraction", "frac_within_1e-6", "n_gap_gt_1e-6",
    "median_rel_gap", "max_rel_gap", "warm_speedup_vs_glmgampoi", "cold_speedup_vs_glmgampoi",
    "process_speedup_vs_glmgampoi", "mem_ratio_vs_glmgampoi", "nbfit_warm_speedup",
    "nbfit_cold_speedup", "status", "notes",
]


# ---------------------------------------------------------------------------- machine


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 1024**2
    except OSError:
        pass
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    info = {"cpu": cpu, "cores": affinity, "logical_cpus": os.cpu_count(),
            "memory_gib": round(mem_gib, 1), "os": platform.platform(),
            "python": platform.python_version()}
    try:
        import jax

        info["jax"] = jax.__version__
        info["jax_backend"] = jax.default_backend()
    except Exception:  # noqa: BLE001
        pass
    return info


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "nbfit"], cwd=HERE.parent,
                               capture_output=True, text=True).stdout.strip()
        return rev + (" (nbfit/ modified)" if dirty else "")
    except Exception:  # noqa: BLE001
        return "unknown"


# ---------------------------------------------------------------------------- run


def run_problem(problem, tools, workdir, max_genes=None, timeout=None, log=print):
    """Run ``tools`` on one problem; return (table DataFrame, per-gene DataFrame)."""
    max_genes = {**DEFAULT_MAX_GENES, **(max_genes or {})}
    results, status = {}, {}
    for tool in tools:
        log(f"[{problem.name}] {tool} ...")
        try:
            results[tool] = RUNNERS[tool](problem, workdir, max_genes=max_genes.get(tool),
                                          timeout=timeout)
            status[tool] = "ok"
            r = results[tool]
            log(f"[{problem.name}] {tool}: warm {r.fit_seconds_warm:.3g} s, cold "
                f"{r.fit_seconds_cold:.3g} s, process {r.process_seconds:.3g} s, peak "
                f"{r.peak_memory_mb:.0f} MiB")
        except ToolUnavailable as error:
            status[tool] = f"skipped: {error}"
            log(f"[{problem.name}] {tool} skipped: {error}")
        except Exception as error:  # noqa: BLE001 - one failing tool does not stop the run
            status[tool] = f"failed: {str(error).splitlines()[0]}"
            log(f"[{problem.name}] {tool} FAILED:\n{error}")
            traceback.print_exc()
    data = P.load(problem)
    per_gene, summary = E.score(data, results)
    table = build_table(results, summary, status)
    return table, per_gene


def build_table(results, summary, status):
    rows = []
    for tool, state in status.items():
        row = {"tool": tool, "status": state}
        if tool in results:
            row.update(results[tool].row())
            if tool in summary.index:
                s = summary.loc[tool]
                row.update({"genes_scored": int(s["genes_scored"]),
                            "frac_within_1e-6": s["frac_within_tol"],
                            "n_gap_gt_1e-6": int(s["n_gap_gt_tol"]),
                            "median_rel_gap": s["median_rel_gap"],
                            "max_rel_gap": s["max_rel_gap"]})
        rows.append(row)
    table = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in table:
            table[column] = np.nan

    def ratio(num_tool, column, invert=False):
        if num_tool not in results:
            return pd.Series(np.nan, index=table.index)
        ref = getattr(results[num_tool], {"fit_s_warm": "fit_seconds_warm",
                                          "fit_s_cold": "fit_seconds_cold",
                                          "process_s": "process_seconds",
                                          "peak_mem_mb": "peak_memory_mb"}[column])
        values = table[column].astype(float)
        return values / ref if invert else ref / values

    table["warm_speedup_vs_glmgampoi"] = ratio(REFERENCE_TOOL, "fit_s_warm")
    table["cold_speedup_vs_glmgampoi"] = ratio(REFERENCE_TOOL, "fit_s_cold")
    table["process_speedup_vs_glmgampoi"] = ratio(REFERENCE_TOOL, "process_s")
    table["mem_ratio_vs_glmgampoi"] = ratio(REFERENCE_TOOL, "peak_mem_mb", invert=True)
    # how many times faster nbfit is than each tool
    table["nbfit_warm_speedup"] = ratio("nbfit", "fit_s_warm", invert=True)
    table["nbfit_cold_speedup"] = ratio("nbfit", "fit_s_cold", invert=True)
    return table[COLUMNS]


# ---------------------------------------------------------------------------- report


def _fmt(value, digits=3):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    if isinstance(value, (int, np.integer)):
        return str(value)
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    header = ["tool", "fit warm (s)", "fit cold (s)", "process (s)", "peak MiB (before fit)",
              "steps", "converged", "genes", "within 1e-6", "max rel gap", "warm ×glmGamPoi",
              "cold ×glmGamPoi", "mem /glmGamPoi", "nbfit warm ×", "nbfit cold ×"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        if not str(r["status"]).startswith("ok"):
            lines.append(f"| {r['tool']} | {r['status']} |" + " |" * (len(header) - 2))
            continue
        cells = [r["tool"], _fmt(r["fit_s_warm"]), _fmt(r["fit_s_cold"]), _fmt(r["process_s"]),
                 f"{_fmt(r['peak_mem_mb'])} ({_fmt(r['mem_before_fit_mb'])})",
                 _fmt(r["n_steps"]), _fmt(r["converged_frac"]),
                 f"{int(r['genes_scored'])}" if pd.notna(r["genes_scored"]) else "–",
                 _fmt(r["frac_within_1e-6"], 4), _fmt(r["max_rel_gap"], 2),
                 _fmt(r["warm_speedup_vs_glmgampoi"]), _fmt(r["cold_speedup_vs_glmgampoi"]),
                 _fmt(r["mem_ratio_vs_glmgampoi"]), _fmt(r["nbfit_warm_speedup"]),
                 _fmt(r["nbfit_cold_speedup"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(tables: dict) -> list[str]:
    """Issue #5's targets, checked on whatever is in the results folder."""
    out = []

    def get(problem, tool, column):
        t = tables.get(problem)
        if t is None or tool not in set(t["tool"]):
            return np.nan
        return float(t.set_index("tool").loc[tool, column])

    def line(text, value, ok):
        mark = "–" if not np.isfinite(value) else ("met" if ok else "NOT met")
        out.append(f"- {text}: {_fmt(value)} → **{mark}**")

    p = "cb_10k"
    w = get(p, "nbfit", "warm_speedup_vs_glmgampoi")
    line("cb_10k: nbfit warm fit ≥ 5× faster than glmGamPoi (×)", w, w >= 5)
    c = get(p, "nbfit", "cold_speedup_vs_glmgampoi")
    line("cb_10k: nbfit cold fit (fresh process, compile included) ≥ 2× faster than "
         "glmGamPoi's fit (×)", c, c >= 2)
    c2 = get(p, "nbfit", "process_speedup_vs_glmgampoi")
    line("cb_10k: (whole fresh process, nbfit vs Rscript, ×)", c2, c2 >= 2)
    d = get("cb_1k", "diffxpy", "nbfit_warm_speedup")
    line("cb_1k: nbfit warm ≥ 50× faster than diffxpy 0.7.4 (×)", d, d >= 50)
    x = get(p, "delnx", "nbfit_warm_speedup")
    line("cb_10k: nbfit warm faster than delnx warm (×)", x, x > 1)
    f = get(p, "nbfit", "frac_within_1e-6")
    line("cb_10k: nbfit ll within 1e-6 relative of the best tool on ≥ 99.9% of genes", f,
         f >= 0.999)
    m = get(p, "nbfit", "mem_ratio_vs_glmgampoi")
    line("cb_10k: nbfit peak memory ≤ glmGamPoi's (ratio)", m, m <= 1)
    return out


def write_readme(out: Path):
    metas = {}
    for path in sorted(out.glob("*.json")):
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if "problem" in meta and (out / f"{meta['problem']}.csv").exists():
            metas[meta["problem"]] = meta
    tables = {name: pd.read_csv(out / f"{name}.csv") for name in metas}
    order = sorted(metas, key=lambda n: (n not in ("cb_10k", "cb_1k"), n != "cb_10k", n))
    parts = [
        "# nbfit benchmark results",
        "",
        "Made by `bench/run.py` (see `bench/README.md`); every number below comes from one "
        "run per problem on the machine named with it. Ratios compare tools *of the same "
        "run*: `warm ×glmGamPoi` = glmGamPoi's time / the tool's time (above 1: faster than "
        "glmGamPoi), `mem /glmGamPoi` = the tool's peak memory / glmGamPoi's, "
        "`nbfit warm ×` = the tool's time / nbfit's (how many times faster nbfit is).",
        "",
        "Columns: *fit warm* = fit time in a process that already fitted once (JIT tools) "
        "or the single fit (others); *fit cold* = first fit in a fresh process, JIT "
        "compilation included; *process* = wall time of the whole fresh process (start-up, "
        "imports, reading the data files, every fit); *peak MiB* = peak resident memory of "
        "that process (`ru_maxrss`, data loading included), in brackets its peak just "
        "before the timed fit (VmHWM: interpreter, libraries, data); *steps* = mean solver "
        "iterations per gene where the tool reports them; *within 1e-6* = share of genes "
        "whose log-likelihood, evaluated in float64 by `bench/evaluate.py` at the tool's own "
        "estimates, is within 1e-6 relative of the best tool on that gene; *max rel gap* = "
        "the worst such gap. Tools fitted on a gene subset have their fit times "
        "extrapolated linearly to all genes (see notes).",
        "",
    ]
    if "cb_10k" in tables or "cb_1k" in tables:
        parts += ["## Targets of issue #5", ""] + targets(tables) + [""]
    for name in order:
        meta, table = metas[name], tables[name]
        m = meta["machine"]
        parts += [
            f"## {name}",
            "",
            f"{meta['description']}",
            "",
            f"- command: `{meta['command']}`",
            f"- date: {meta['date']}; nbfit revision {meta.get('git', '?')}",
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB memory, "
            f"{m['os']}; Python {m['python']}, JAX {m.get('jax', '?')} "
            f"({m.get('jax_backend', '?')})",
            "",
            markdown_table(table),
            "",
            "Notes:",
            "",
        ]
        for _, r in table.iterrows():
            note = r["notes"] if isinstance(r["notes"], str) else ""
            version = r["version"] if isinstance(r["version"], str) else ""
            parts.append(f"- **{r['tool']}** {version}: {note or r['status']}")
        parts.append("")
    (out / "README.md").write_text("\n".join(parts))


def parse_max_genes(items):
    result = {}
    for item in items or []:
        tool, _, n = item.partition("=")
        if tool not in RUNNERS or not n.isdigit():
            raise SystemExit(f"--max-genes takes TOOL=N with TOOL in {TOOLS}, got {item!r}")
        result[tool] = int(n)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", nargs="+", default=["cb_1k"],
                        help=f"registered problems: {', '.join(P.REGISTRY)}")
    parser.add_argument("--tools", nargs="+", default=TOOLS, choices=TOOLS)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--workdir", type=Path, default=HERE / "work",
                        help="data files and tool outputs (default bench/work, gitignored)")
    parser.add_argument("--max-genes", nargs="*", default=[], metavar="TOOL=N",
                        help="fit only N evenly spread genes with TOOL and extrapolate its "
                             "fit times (statsmodels defaults to 50)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per tool process (killed after)")
    args = parser.parse_args(argv)
    max_genes = parse_max_genes(args.max_genes)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/run.py " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))
    machine = machine_info()
    for name in args.problems:
        problem = P.get(name)
        table, per_gene = run_problem(problem, args.tools, args.workdir, max_genes,
                                      args.timeout)
        table.to_csv(args.out / f"{name}.csv", index=False)
        per_gene.to_csv(args.out / f"{name}_genes.csv.gz", float_format="%.17g")
        meta = {"problem": name, "description": problem.description or name,
                "spec": problem.spec(), "command": command,
                "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "machine": machine, "git": git_revision(), "max_genes": max_genes}
        (args.out / f"{name}.json").write_text(json.dumps(meta, indent=1))
        print(f"\n{name}:\n" + markdown_table(table) + "\n")
    write_readme(args.out)
    print(f"wrote {args.out}/README.md")


if __name__ == "__main__":
    main()
