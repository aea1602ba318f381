"""One float64 evaluator: every tool's per-gene log-likelihood at its own estimates.

The model is nbfit's (README "The model"): for gene j and cell i

    mu_ij = sf_i * exp(X_loc[i] @ a_j),  r_ij = exp(X_scale[i] @ b_j)
    ll_ij = lgamma(y+r) - lgamma(r) - lgamma(y+1) + r log(r/(r+mu)) + y log(mu/(r+mu))

and the per-gene log-likelihood is the sum over cells. It is evaluated here in float64
with numpy/scipy only (no JAX, nothing shared with nbfit's engine) in a rearranged form
that does not cancel for huge r (Poisson limit) nor overflow for mu >> r:

    ll = D(r, y) - lgamma(y+1) + y eta_mu - (r + y) softplus(eta_mu - eta_r)
    D(r, y) = lgamma(y+r) - lgamma(r) - y log r
            = (r + y - 1/2) log1p(y/r) - y + C(r+y) - C(r)        (Stirling, r >= 30)

with eta_mu = log mu, eta_r = log r, softplus(x) = log(1 + e^x) and C the Stirling
correction series. r = +inf (a tool reporting zero overdispersion) gives the Poisson
log-likelihood y eta_mu - mu - lgamma(y+1).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import gammaln

#: relative log-likelihood tolerance for "at the optimum" (issue #5)
REL_TOL = 1e-6
_STIRLING_FROM = 30.0


def _stirling_correction(x):
    """lgamma(x) - [(x - 1/2) log x - x + log(2 pi)/2] for x >= 30 (error < 1e-17)."""
    inv = 1.0 / x
    inv2 = inv * inv
    return inv * (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 * (1 / 1680 - inv2 / 1188))))


def _d_term(r, y):
    """lgamma(y + r) - lgamma(r) - y log r, elementwise, without cancellation."""
    out = np.zeros(np.broadcast(r, y).shape)
    r = np.broadcast_to(r, out.shape)
    y = np.broadcast_to(y, out.shape)
    positive = y > 0
    big = positive & (r >= _STIRLING_FROM)
    small = positive & ~big
    rb, yb = r[big], y[big]
    out[big] = ((rb + yb - 0.5) * np.log1p(yb / rb) - yb
                + _stirling_correction(rb + yb) - _stirling_correction(rb))
    rs, ys = r[small], y[small]
    out[small] = gammaln(ys + rs) - gammaln(rs) - ys * np.log(rs)
    return out


def nb_log_likelihood(y, eta_mu, eta_r):
    """Elementwise NB log-likelihood in the two log-scale predictors (float64).

    ``eta_mu = log mu`` (size factors included), ``eta_r = log r``; ``eta_r = +inf`` gives
    the Poisson limit.
    """
    y = np.asarray(y, dtype=np.float64)
    eta_mu = np.asarray(eta_mu, dtype=np.float64)
    eta_r = np.broadcast_to(np.asarray(eta_r, dtype=np.float64), np.broadcast(y, eta_mu).shape)
    y, eta_mu = np.broadcast_arrays(y, eta_mu)
    out = np.empty(y.shape)
    y_log_mu = np.where(y > 0, y * eta_mu, 0.0)
    poisson = np.isposinf(eta_r)
    nb = ~poisson
    if np.any(nb):
        r = np.exp(eta_r[nb])
        yy = y[nb]
        x = eta_mu[nb] - eta_r[nb]
        out[nb] = _d_term(r, yy) - gammaln(yy + 1) + y_log_mu[nb] - (r + yy) * np.logaddexp(0.0, x)
    if np.any(poisson):
        yy = y[poisson]
        out[poisson] = y_log_mu[poisson] - np.exp(eta_mu[poisson]) - gammaln(yy + 1)
    return out


def gene_log_likelihood(counts, design_loc, design_scale, sf, a, b, genes=None,
                        chunk_elements=2**23):
    """Per-gene log-likelihood at (a, b), float64.

    Parameters
    ----------
    counts : (cells, all_genes) array (dense ndarray or scipy.sparse)
    design_loc, design_scale : (cells, p) arrays or DataFrames
    sf : (cells,) size factors
    a : (p_loc, n) location coefficients; b : (p_scale, n) log r coefficients
    genes : (n,) column indices into ``counts`` (default: all columns, n = all_genes)
    """
    import scipy.sparse

    x_loc = np.asarray(design_loc, dtype=np.float64)
    x_scale = np.asarray(design_scale, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64).reshape(x_loc.shape[1], -1)
    b = np.asarray(b, dtype=np.float64).reshape(x_scale.shape[1], -1)
    genes = np.arange(a.shape[1]) if genes is None else np.asarray(genes)
    log_sf = np.log(np.asarray(sf, dtype=np.float64))[:, None]
    n_cells = x_loc.shape[0]
    step = max(1, chunk_elements // max(n_cells, 1))
    ll = np.empty(len(genes))
    for start in range(0, len(genes), step):
        stop = min(start + step, len(genes))
        cols = genes[start:stop]
        y = counts[:, cols]
        y = y.toarray() if scipy.sparse.issparse(y) else np.asarray(y, dtype=np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            eta_mu = x_loc @ a[:, start:stop] + log_sf
            eta_r = x_scale @ b[:, start:stop]
            ll[start:stop] = nb_log_likelihood(y, eta_mu, eta_r).sum(axis=0)
    return ll


def relative_gap(ll, best):
    """(best - ll) / |best|, with all-zero genes (best = 0) measured absolutely."""
    ll = np.asarray(ll, dtype=np.float64)
    best = np.asarray(best, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(np.abs(best) > 0, (best - ll) / np.abs(best), best - ll)


def score(data, results, rel_tol=REL_TOL):
    """Score every tool's estimates on one problem.

    A tool *attempts* the genes it was run on (all genes, or its ``genes`` subset). On an
    attempted gene, estimates that give no finite log-likelihood (NaN or infinite
    coefficients, a missing gene) are a **failure**: the gene counts against the tool with
    an infinite gap, never as a win, and never drops out of its denominator. The best
    log-likelihood of a gene is the largest finite one over all tools; a gene no tool fits
    finitely has no best, and every tool that attempted it fails it.

    Parameters
    ----------
    data : bench.problems.ProblemData
    results : dict tool -> ToolResult (``a`` (p_loc, n), ``b`` (p_scale, n) or (n,),
        ``genes`` (n,) or None for all genes)

    Returns
    -------
    per_gene : DataFrame, one row per gene, columns ``ll_<tool>`` (NaN where the tool did
        not attempt the gene or failed it), ``best``, ``best_tool``, ``gap_<tool>``
        (relative gap to the best tool on that gene; ``inf`` on a failure, NaN where not
        attempted).
    summary : DataFrame, one row per tool: genes attempted (``genes_scored``), failures,
        fraction within ``rel_tol`` of the best (failures count as not within), median and
        max relative gap, sum of ll over its finite genes.
    """
    n_genes = data.n_genes
    lls, attempted = {}, {}
    n_scale = data.design_scale.shape[1]
    for tool, res in results.items():
        if res is None or res.a is None:
            continue
        genes = np.arange(n_genes) if res.genes is None else np.asarray(res.genes)
        a = np.asarray(res.a, dtype=np.float64).reshape(data.design_loc.shape[1], -1)
        b = np.asarray(res.b, dtype=np.float64).reshape(n_scale, -1)
        full = np.full(n_genes, np.nan)
        mask = np.zeros(n_genes, dtype=bool)
        mask[genes] = True
        if a.shape[1] == len(genes) and b.shape[1] == len(genes):
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                ll = gene_log_likelihood(data.counts, data.design_loc, data.design_scale,
                                         data.sf, a, b, genes)
            # NaN coefficients, -inf ll (e.g. r = 0), +inf (impossible for a pmf): failure
            full[genes] = np.where(np.isfinite(ll), ll, np.nan)
        lls[tool] = full
        attempted[tool] = mask
    per_gene = pd.DataFrame({f"ll_{t}": v for t, v in lls.items()},
                            index=pd.Index([f"gene_{j}" for j in range(n_genes)], name="gene"))
    if not lls:
        return per_gene, pd.DataFrame()
    matrix = np.column_stack(list(lls.values()))
    finite = np.where(np.isfinite(matrix), matrix, -np.inf)
    any_finite = np.isfinite(matrix).any(axis=1)
    best = np.where(any_finite, finite.max(axis=1), np.nan)
    best_tool = np.where(any_finite, np.array(list(lls))[finite.argmax(axis=1)], "")
    per_gene["best"] = best
    per_gene["best_tool"] = best_tool
    rows = []
    for tool, ll in lls.items():
        mask = attempted[tool]
        failed = mask & ~np.isfinite(ll)
        gap = relative_gap(ll, best)
        gap = np.where(failed, np.inf, np.where(mask, gap, np.nan))
        per_gene[f"gap_{tool}"] = gap
        g = gap[mask]
        rows.append({
            "tool": tool,
            "genes_scored": int(mask.sum()),
            "n_failed": int(failed.sum()),
            "frac_within_tol": float(np.mean(g <= rel_tol)) if g.size else np.nan,
            "frac_finite_ll": float(np.mean(~failed[mask])) if g.size else np.nan,
            "median_rel_gap": float(np.median(g)) if g.size else np.nan,
            "max_rel_gap": float(np.max(g)) if g.size else np.nan,
            "n_gap_gt_tol": int(np.sum(~(g <= rel_tol))),
            "sum_ll": float(np.sum(ll[mask & ~failed])),
        })
    return per_gene, pd.DataFrame(rows).set_index("tool")
