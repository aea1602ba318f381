"""Run tools on registered problems, score them with one evaluator, write the tables.

    python bench/run.py                    # cb_1k and cb_10k, every tool: issue #5's tables
    python bench/run.py --problems cb_10k --tools nbfit glmgampoi \\
        --max-genes statsmodels=50 --out bench/results

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
DEFAULT_PROBLEMS = ["cb_1k", "cb_10k"]
#: seconds per tool process before it is killed (reported as failed)
DEFAULT_TIMEOUT = 3600.0
COLUMNS = [
    "tool", "version", "fit_s_warm", "fit_s_cold", "process_s", "peak_mem_mb", "mem_before_fit_mb",
    "process_peak_mem_mb", "n_steps",
    "converged_frac", "genes_scored", "gene_fraction", "n_failed", "frac_within_1e-6",
    "n_gap_gt_1e-6", "median_rel_gap", "max_rel_gap", "warm_speedup_vs_glmgampoi",
    "cold_speedup_vs_glmgampoi", "process_speedup_vs_glmgampoi", "mem_ratio_vs_glmgampoi",
    "warm_speedup_vs_delnx", "warm_speedup_vs_diffxpy", "nbfit_warm_speedup",
    "nbfit_cold_speedup", "diffxpy_fit_only_s", "status", "notes",
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


def run_problem(problem, tools, workdir, max_genes=None, timeout=None, log=print,
                skip=None):
    """Run ``tools`` on one problem; return (table DataFrame, per-gene DataFrame).

    ``skip`` maps tools to leave out to the reason shown in the table.
    """
    max_genes = {**DEFAULT_MAX_GENES, **(max_genes or {})}
    results, status = {}, {}
    for tool in tools:
        if skip and tool in skip:
            status[tool] = f"skipped: {skip[tool]}"
            log(f"[{problem.name}] {tool} skipped: {skip[tool]}")
            continue
        log(f"[{problem.name}] {tool} ...", flush=True)
        try:
            results[tool] = RUNNERS[tool](problem, workdir, max_genes=max_genes.get(tool),
                                          timeout=timeout)
            status[tool] = "ok"
            r = results[tool]
            log(f"[{problem.name}] {tool}: warm {r.fit_seconds_warm:.3g} s, cold "
                f"{r.fit_seconds_cold:.3g} s, process {r.process_seconds:.3g} s, peak "
                f"{r.peak_memory_mb:.0f} MiB", flush=True)
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
                            "n_failed": int(s["n_failed"]),
                            "frac_within_1e-6": s["frac_within_tol"],
                            "n_gap_gt_1e-6": int(s["n_gap_gt_tol"]),
                            "median_rel_gap": s["median_rel_gap"],
                            "max_rel_gap": s["max_rel_gap"]})
            fit_only = results[tool].extra.get("fit_only_seconds")
            if fit_only:  # diffxpy: its model fit inside test.wald, extrapolated likewise
                row["diffxpy_fit_only_s"] = (float(np.min(fit_only))
                                             / results[tool].gene_fraction)
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
    table["warm_speedup_vs_delnx"] = ratio("delnx", "fit_s_warm")
    table["warm_speedup_vs_diffxpy"] = ratio("diffxpy", "fit_s_warm")
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
    header = ["tool", "fit warm (s)", "fit cold (s)", "process (s)",
              "peak MiB, fit (at start)", "process peak MiB", "steps", "converged", "genes",
              "failed", "within 1e-6", "max rel gap", "warm ×glmGamPoi", "cold ×glmGamPoi",
              "mem /glmGamPoi", "warm ×delnx", "warm ×diffxpy", "nbfit warm ×",
              "nbfit cold ×"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in table.iterrows():
        if not str(r["status"]).startswith("ok"):
            lines.append(f"| {r['tool']} | {r['status']} |" + " |" * (len(header) - 2))
            continue
        genes = f"{int(r['genes_scored'])}" if pd.notna(r["genes_scored"]) else "–"
        failed = f"{int(r['n_failed'])}" if pd.notna(r.get("n_failed")) else "–"
        cells = [r["tool"], _fmt(r["fit_s_warm"]), _fmt(r["fit_s_cold"]), _fmt(r["process_s"]),
                 f"{_fmt(r['peak_mem_mb'])} ({_fmt(r['mem_before_fit_mb'])})",
                 _fmt(r.get("process_peak_mem_mb", np.nan)),
                 _fmt(r["n_steps"]), _fmt(r["converged_frac"]), genes, failed,
                 _fmt(r["frac_within_1e-6"], 4), _fmt(r["max_rel_gap"], 2),
                 _fmt(r["warm_speedup_vs_glmgampoi"]), _fmt(r["cold_speedup_vs_glmgampoi"]),
                 _fmt(r["mem_ratio_vs_glmgampoi"]), _fmt(r.get("warm_speedup_vs_delnx")),
                 _fmt(r.get("warm_speedup_vs_diffxpy")), _fmt(r["nbfit_warm_speedup"]),
                 _fmt(r["nbfit_cold_speedup"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(tables: dict, dates: dict | None = None) -> list[str]:
    """Issue #5's targets as PASS/FAIL lines, computed from the result tables.

    Each ratio is taken within one problem's table (one run); the line names the run's
    date. A target whose numbers are missing (tool skipped or failed) reads "no data".
    """
    dates = dates or {}
    out = []

    def get(problem, tool, column):
        t = tables.get(problem)
        if t is None or tool not in set(t["tool"]) or column not in t:
            return np.nan
        row = t.set_index("tool").loc[tool]
        if not str(row["status"]).startswith("ok"):
            return np.nan
        return float(row[column])

    def line(problem, text, value, ok, info=False):
        if info:
            mark = "(information)"
        elif not np.isfinite(value):
            mark = "**no data**"
        else:
            mark = "**PASS**" if ok else "**FAIL**"
        when = f" [{problem} run {dates[problem]}]" if problem in dates else ""
        out.append(f"- {mark} {text}: {_fmt(value)}{when}")

    p = "cb_10k"
    w = get(p, "nbfit", "warm_speedup_vs_glmgampoi")
    line(p, "cb_10k: nbfit warm fit ≥ 5× faster than glmGamPoi (glmGamPoi's time / nbfit's)",
         w, w >= 5)
    c = get(p, "nbfit", "cold_speedup_vs_glmgampoi")
    line(p, "cb_10k: nbfit cold fit (fresh process, compilation included) ≥ 2× faster than "
         "glmGamPoi's fit (×)", c, c >= 2)
    c2 = get(p, "nbfit", "process_speedup_vs_glmgampoi")
    line(p, "cb_10k: whole fresh process, nbfit (2 fits) vs Rscript glmGamPoi (×)", c2, True,
         info=True)
    d = get("cb_1k", "diffxpy", "nbfit_warm_speedup")
    line("cb_1k", "cb_1k: nbfit warm ≥ 50× faster than diffxpy 0.7.4's de.test.wald (×)", d,
         d >= 50)
    dfit = np.nan
    t1 = tables.get("cb_1k")
    if t1 is not None and np.isfinite(d):
        nb = get("cb_1k", "nbfit", "fit_s_warm")
        fit_only = t1.set_index("tool").loc["diffxpy"].get("diffxpy_fit_only_s", np.nan)
        dfit = float(fit_only) / nb if pd.notna(fit_only) else np.nan
    line("cb_1k", "cb_1k: same, against diffxpy's model fit alone (its _fit inside "
         "test.wald, ×)", dfit, dfit >= 50)
    x = get(p, "delnx", "nbfit_warm_speedup")
    line(p, "cb_10k: nbfit warm faster than delnx warm (delnx's time / nbfit's)", x, x > 1)
    xc = get(p, "delnx", "nbfit_cold_speedup")
    line(p, "cb_10k: nbfit cold vs delnx cold (×)", xc, True, info=True)
    f = get(p, "nbfit", "frac_within_1e-6")
    line(p, "cb_10k: nbfit ll ≥ best tool's − 1e-6 relative on ≥ 99.9% of genes (share)", f,
         f >= 0.999)
    f1 = get("cb_1k", "nbfit", "frac_within_1e-6")
    line("cb_1k", "cb_1k: same on cb_1k (share)", f1, f1 >= 0.999)
    m = get(p, "nbfit", "mem_ratio_vs_glmgampoi")
    line(p, "cb_10k: nbfit peak memory over its fits ≤ glmGamPoi's (ratio nbfit / glmGamPoi)",
         m, m <= 1)
    pm_nb, pm_gg = (get(p, "nbfit", "process_peak_mem_mb"),
                    get(p, "glmgampoi", "process_peak_mem_mb"))
    line(p, "cb_10k: whole-process peak memory, nbfit / glmGamPoi", pm_nb / pm_gg, True,
         info=True)
    return out


REGENERATE = "flock /tmp/nbfit_timing.lock python bench/run.py"


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
    dates = {name: meta["date"] for name, meta in metas.items()}
    order = sorted(metas, key=lambda n: (n not in ("cb_10k", "cb_1k"), n != "cb_10k", n))
    parts = [
        "# nbfit benchmark results",
        "",
        "Regenerate both tables of issue #5 (cb_1k and cb_10k, every tool, one run each; "
        "about 15 minutes on the 2-core machine below), from the repository root with "
        "nbfit's dev environment active and the peers installed by `bench/setup.sh`:",
        "",
        f"    {REGENERATE}",
        "",
        "(`flock` only keeps timed runs on a shared machine from overlapping; "
        "`python bench/run.py --problems cb_10k` redoes cb_10k alone.) Scaling figures: "
        "`python bench/scaling.py` (section at the end). This file is rebuilt by every run "
        "from the tables in this folder; the PASS/FAIL lines are computed from them.",
        "",
        "Every number comes from one run per problem on the machine named with it. Ratios "
        "compare tools *of the same run*: `warm ×glmGamPoi` = glmGamPoi's time / the tool's "
        "(above 1: faster than glmGamPoi), likewise `×delnx`, `×diffxpy`; `mem /glmGamPoi` = "
        "the tool's peak memory / glmGamPoi's; `nbfit warm ×` = the tool's time / nbfit's "
        "(how many times faster nbfit is).",
        "",
        "Columns: *fit warm* = fit time in a process that already fitted once (JIT tools: "
        "nbfit, delnx) or the single fit (the others); *fit cold* = first fit in a fresh "
        "process, JIT compilation included; *process* = wall time of the whole fresh process "
        "(start-up, imports, reading the data files, every fit, writing results); *peak MiB, "
        "fit* = the process's peak resident memory over its fits (high-water mark reset just "
        "before the first fit, read after the last: data, libraries and fit allocations), in "
        "brackets the resident memory when the fits start; *process peak* = the whole "
        "process's peak, reading the input files included; *steps* = mean solver iterations "
        "per gene where the tool reports them (diffxpy: training iterations, all genes "
        "together); *converged* = the tool's own convergence flag; *genes* = genes fitted; "
        "*failed* = fitted genes whose estimates give no finite log-likelihood (they count "
        "as not within 1e-6); *within 1e-6* = share of fitted genes whose log-likelihood, "
        "evaluated in float64 by `bench/evaluate.py` at the tool's own estimates "
        "(log mu = log sf + X a, r = exp(b)), is within 1e-6 relative of the best tool on "
        "that gene; *max rel gap* = the worst such gap. Tools fitted on a gene subset have "
        "their fit times extrapolated linearly to all genes (see notes).",
        "",
    ]
    if "cb_10k" in tables or "cb_1k" in tables:
        parts += ["## Targets of issue #5", ""] + targets(tables, dates) + [""]
    for name in order:
        meta, table = metas[name], tables[name]
        m = meta["machine"]
        versions = "; ".join(
            f"{r['tool']} {r['version']}" for _, r in table.iterrows()
            if isinstance(r["version"], str) and r["version"])
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
            f"- versions: {versions}",
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
    scaling = out / "scaling.md"
    if scaling.exists():
        parts += [scaling.read_text().strip(), ""]
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
    parser.add_argument("--problems", nargs="+", default=DEFAULT_PROBLEMS,
                        help=f"registered problems: {', '.join(P.REGISTRY)} (default: "
                             f"{' '.join(DEFAULT_PROBLEMS)})")
    parser.add_argument("--tools", nargs="+", default=None, choices=TOOLS,
                        help="default: every tool, less those bench/problems.py SKIP leaves "
                             "out of a problem (a tool named here always runs)")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--workdir", type=Path, default=HERE / "work",
                        help="data files and tool outputs (default bench/work, gitignored)")
    parser.add_argument("--max-genes", nargs="*", default=[], metavar="TOOL=N",
                        help="fit only N evenly spread genes with TOOL and extrapolate its "
                             "fit times (statsmodels defaults to 50)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="seconds per tool process (killed after, reported as failed; "
                             f"default {DEFAULT_TIMEOUT:.0f})")
    args = parser.parse_args(argv)
    max_genes = parse_max_genes(args.max_genes)
    args.out.mkdir(parents=True, exist_ok=True)
    command = ("python bench/run.py " + " ".join(shlex.quote(a) for a in (
        argv if argv is not None else sys.argv[1:]))).strip()
    machine = machine_info()
    for name in args.problems:
        problem = P.get(name)
        tools = args.tools or TOOLS
        skip = {} if args.tools else P.SKIP.get(name, {})
        table, per_gene = run_problem(problem, tools, args.workdir, max_genes, args.timeout,
                                      skip=skip)
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
