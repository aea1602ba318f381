"""Diagnostic plots (matplotlib, the optional extra ``nbfit[plot]``).

Each function returns a :class:`matplotlib.figure.Figure` built without pyplot, so nothing
is shown or kept open behind your back: save it with ``fig.savefig("x.png")``, or leave it
as the last expression of a notebook cell to display it. Pass ``ax=`` to draw into an
existing axes instead (the axes' figure is returned).
"""

import numpy as np
import pandas as pd

from nbfit._status import STATUS_NAMES

#: Colours of the statuses (tab10), in the order of :data:`nbfit._status.STATUS_NAMES`.
STATUS_COLOURS = dict(zip(STATUS_NAMES, [
    "#1f77b4", "#ff7f0e", "#8c564b", "#d62728", "#9467bd", "#7f7f7f", "#e377c2", "#2ca02c",
], strict=True))


def _matplotlib():
    """Import matplotlib's Figure lazily, with an actionable error when it is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "nbfit.plot needs matplotlib, an optional dependency: pip install 'nbfit[plot]' "
            "(or pip install matplotlib)."
        ) from error
    return Figure


def _axes(ax, figsize):
    if ax is not None:
        return ax.figure, ax
    figure = _matplotlib()(figsize=figsize, layout="constrained")
    return figure, figure.add_subplot()


def mean_dispersion(result, ax=None, figsize=(5.5, 4.5)):
    """Fitted mean against fitted dispersion ``alpha = 1/r`` per gene, log-log, by status.

    Parameters
    ----------
    result : Estimator or Results
    ax : matplotlib Axes, optional

    Returns
    -------
    Figure

    Notes
    -----
    The mean is the gene's fitted mean ``mu`` averaged over cells, the dispersion ``1/r``
    averaged over cells (one value per gene with ``formula_scale="~1"``). Poisson-limit
    genes sit at ``alpha ~ 1e-8`` (r at its cap).
    """
    figure, ax = _axes(ax, figsize)
    mean = np.mean(result.model.mu, axis=0)
    alpha = np.mean(1.0 / result.model.phi, axis=0)
    status = np.asarray(result.status).astype(str)
    for name in STATUS_NAMES:
        keep = (status == name) & np.isfinite(mean) & np.isfinite(alpha) & (mean > 0) & (alpha > 0)
        if np.any(keep):
            ax.scatter(mean[keep], alpha[keep], s=8, alpha=0.7, color=STATUS_COLOURS[name],
                       label=f"{name} ({int(keep.sum())})", linewidths=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("fitted mean count")
    ax.set_ylabel("dispersion 1/r")
    ax.set_title("mean vs dispersion")
    ax.legend(fontsize="small", markerscale=2)
    return figure


def volcano(result_df, alpha=0.05, ax=None, figsize=(5.5, 4.5), label_top=0):
    """Volcano plot of a test: log2 fold change against -log10 p-value.

    Parameters
    ----------
    result_df : DataFrame
        A table with ``log2fc``, ``pval`` and ``qval`` columns: from
        :func:`nbfit.inference.wald`, ``est.wald(...)`` or ``de.test...summary()``.
    alpha : float
        Genes with ``qval < alpha`` are highlighted.
    label_top : int
        Write the gene names of this many most significant genes.

    Returns
    -------
    Figure

    Notes
    -----
    Genes without a p-value (status not testable) are left out and counted in the title;
    p-values of 0 are drawn at the smallest positive double.
    """
    missing = [c for c in ("log2fc", "pval") if c not in result_df.columns]
    if missing:
        raise ValueError(f"the table has no column(s) {missing}; pass the result of a Wald test.")
    figure, ax = _axes(ax, figsize)
    log2fc = result_df["log2fc"].to_numpy(dtype=float)
    pval = result_df["pval"].to_numpy(dtype=float)
    qval = np.full_like(pval, np.nan)
    if "qval" in result_df:
        qval = result_df["qval"].to_numpy(dtype=float)
    shown = np.isfinite(log2fc) & np.isfinite(pval)
    height = -np.log10(np.maximum(pval, np.finfo(np.float64).tiny))
    hit = shown & (qval < alpha)
    ax.scatter(log2fc[shown & ~hit], height[shown & ~hit], s=8, color="#7f7f7f", alpha=0.6,
               linewidths=0, label=f"q >= {alpha:g} ({int((shown & ~hit).sum())})")
    ax.scatter(log2fc[hit], height[hit], s=10, color="#d62728", alpha=0.8, linewidths=0,
               label=f"q < {alpha:g} ({int(hit.sum())})")
    if label_top and "gene" in result_df:
        genes = result_df["gene"].astype(str).to_numpy()
        order = np.argsort(np.where(shown, pval, np.inf))[: int(label_top)]
        for k in order[np.isfinite(pval[order])]:
            ax.annotate(genes[k], (log2fc[k], height[k]), fontsize="x-small")
    ax.axvline(0.0, color="black", linewidth=0.5)
    ax.set_xlabel("log2 fold change")
    ax.set_ylabel("-log10 p-value")
    n_missing = int((~shown).sum())
    ax.set_title("volcano" + (f" ({n_missing} genes without a p-value)" if n_missing else ""))
    ax.legend(fontsize="small", markerscale=2)
    return figure


def convergence(result, figsize=(9.0, 3.8)):
    """Convergence summary: genes per status, and solver steps per gene.

    Parameters
    ----------
    result : Estimator or Results

    Returns
    -------
    Figure
    """
    figure = _matplotlib()(figsize=figsize, layout="constrained")
    left, right = figure.subplots(1, 2)
    status = np.asarray(result.status).astype(str)
    status = pd.Series(pd.Categorical(status, categories=STATUS_NAMES))
    counts = status.value_counts().reindex(list(STATUS_NAMES)).fillna(0).astype(int)
    counts = counts[counts > 0]
    bars = left.barh(list(counts.index), counts.values,
                     color=[STATUS_COLOURS[name] for name in counts.index])
    left.bar_label(bars, fontsize="small")
    left.invert_yaxis()
    left.set_xlabel("genes")
    left.set_title(f"status of {len(status)} genes")
    steps = np.asarray(result.n_steps)
    right.hist(steps, bins=np.arange(steps.min(), steps.max() + 2) - 0.5 if steps.size else 10,
               color="#1f77b4")
    right.set_xlabel("solver steps")
    right.set_ylabel("genes")
    right.set_title("steps per gene")
    return figure
