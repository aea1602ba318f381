"""Inference on fitted models: standard errors, Wald tests and likelihood-ratio tests.

Every function takes a fitted *result*: an :class:`nbfit.Estimator` or a
:class:`nbfit.Results` loaded with :func:`nbfit.load`. Both expose the same attributes
(``model.a``, ``fisher_inv``, ``hessian``, ``log_likelihood``, ``status``, ...).

Parameters are tested on the **full** design (the names of ``model.design_loc_names``,
e.g. ``condition[T.B]``). With constraints the full coefficients are ``H @ reduced``;
their covariance is ``H F H^T`` with ``F`` the inverse observed information of the
reduced (free) parameters, and a joint hypothesis over full coefficients is tested on the
rows of ``H`` it involves, with as many degrees of freedom as those rows have rank.

Genes that cannot be tested get NaN p-values and q-values (never a confident p-value):
those whose status is in :data:`WALD_UNTESTABLE` (not at an optimum, no finite MLE, or a
singular information matrix) and those whose covariance block of the tested coefficients
is not finite and positive definite (their status is reported as ``singular``).
"""

import numpy as np
import pandas as pd
import scipy.stats

from nbfit._status import inverse_if_definite

#: Statuses without a valid Wald test: not at an optimum (max_steps, stalled, nonfinite),
#: no finite MLE (separated, all_zero) or a singular information matrix.
WALD_UNTESTABLE = ("singular", "nonfinite", "all_zero", "separated", "max_steps", "stalled")
#: Statuses without a valid likelihood-ratio test (in either model). Separated genes keep
#: theirs: their log-likelihood is at its supremum within tolerance.
LRT_UNTESTABLE = ("singular", "nonfinite", "all_zero", "max_steps", "stalled")
#: Rows of a hypothesis matrix below this (relative to the largest singular value) are
#: linearly dependent; the test then has fewer degrees of freedom.
RANK_RTOL = 1e-10
#: A reduced design lies in the span of the full one when its least-squares residual is
#: below this, relative to its norm.
NESTING_RTOL = 1e-8
#: Size factors (and gene means) of two fits on the same data agree to this.
SAME_DATA_RTOL = 1e-10

LN2 = float(np.log(2.0))


# --------------------------------------------------------------------------- helpers


def benjamini_hochberg(pvals):
    """Benjamini-Hochberg q-values over the finite p-values; NaN elsewhere.

    Parameters
    ----------
    pvals : array-like, shape (n,)

    Returns
    -------
    ndarray, shape (n,)
    """
    pvals = np.asarray(pvals, dtype=np.float64)
    qvals = np.full(pvals.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(pvals))
    if finite.size == 0:
        return qvals
    p = pvals[finite]
    order = np.argsort(p)
    ranked = p[order] * finite.size / np.arange(1, finite.size + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty_like(p)
    q[order] = np.minimum(ranked, 1.0)
    qvals[finite] = q
    return qvals


def _names(names):
    return [str(name) for name in names]


def _model_blocks(result, which):
    """(full names, constraint matrix, offset of the block in the reduced parameters)."""
    model = result.model
    p_loc = np.asarray(model.constraints_loc).shape[1]
    if which == "loc":
        return _names(model.design_loc_names), np.asarray(model.constraints_loc, float), 0
    if which == "scale":
        return _names(model.design_scale_names), np.asarray(model.constraints_scale, float), p_loc
    raise ValueError(f"which={which!r}: use 'loc' (location) or 'scale' (dispersion).")


def term_of(name):
    """The formula term a design column belongs to: ``condition[T.B]`` -> ``condition``.

    Interactions keep their factors: ``condition[T.B]:batch[T.b2]`` -> ``condition:batch``.
    """
    return ":".join(part.split("[", 1)[0] for part in str(name).split(":"))


def terms(names):
    """Distinct terms of the design columns ``names``, in order of appearance."""
    seen = []
    for name in names:
        term = term_of(name)
        if term not in seen:
            seen.append(term)
    return seen


def resolve_coefficients(names, coef=None, term=None, which="loc"):
    """Indices of the design columns tested by ``coef`` or ``term``, and a label.

    Parameters
    ----------
    names : list of str
        Full design column names.
    coef : str or sequence of str, optional
        Column names (``"condition[T.B]"``).
    term : str or sequence of str, optional
        Formula terms (``"condition"``): all their columns.

    Returns
    -------
    indices : list of int
    label : str
    """
    if (coef is None) == (term is None):
        raise ValueError(
            "give exactly one of coef= (design column names) or term= (a factor / term)."
        )
    if coef is not None:
        wanted = [coef] if isinstance(coef, str) else list(coef)
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(
                f"coefficient(s) {missing} are not columns of the {which} design; its columns are "
                f"{names} (terms: {terms(names)})."
            )
        if not wanted:
            raise ValueError("coef= is empty.")
        indices = [names.index(c) for c in wanted]
        return indices, ",".join(wanted)
    wanted = [term] if isinstance(term, str) else list(term)
    indices = []
    for t in wanted:
        found = [k for k, name in enumerate(names) if term_of(name) == str(t).replace(" ", "")]
        if not found:
            raise ValueError(
                f"term {t!r} is not a term of the {which} design; its terms are {terms(names)} "
                f"(columns {names})."
            )
        indices += found
    if not wanted:
        raise ValueError("term= is empty.")
    return indices, ",".join(map(str, wanted))


def _row_basis(rows):
    """A full-row-rank matrix with the same row space as ``rows``."""
    if rows.shape[0] == 1 or np.linalg.matrix_rank(rows, tol=None) == rows.shape[0]:
        if not np.any(rows):
            return rows[:0]
        return rows
    _, singular, vt = np.linalg.svd(rows, full_matrices=False)
    rank = int(np.sum(singular > RANK_RTOL * singular[0])) if singular.size else 0
    return singular[:rank, None] * vt[:rank]


def _positive_definite(cov):
    """Per gene: covariance blocks (n_genes, k, k) finite and positive definite."""
    finite = np.all(np.isfinite(cov), axis=(1, 2))
    ok = finite.copy()
    if np.any(finite):
        eig = np.linalg.eigvalsh(cov[finite])
        tiny = cov.shape[1] * np.finfo(np.float64).eps * np.abs(eig).max(axis=1)
        ok[finite] = eig.min(axis=1) > tiny
    return ok


# --------------------------------------------------------------------------- standard errors


def covariance(result, fixed_scale=False, full=False):
    """Covariance of the coefficient estimates: the inverse observed information.

    Parameters
    ----------
    result : Estimator or Results
    fixed_scale : bool
        False: joint location + scale model, ``inv(-H)`` over (a, b) (``fisher_inv``).
        True: the dispersion taken as known, ``inv(-H_aa)`` over the location block only
        (what a GLM with fixed dispersion, e.g. statsmodels' NegativeBinomial(alpha),
        reports).
    full : bool
        Map to the full coefficients (``H F H^T``); otherwise the reduced (free) ones.

    Returns
    -------
    ndarray, shape (n_genes, P, P)
        ``P`` = number of location + scale coefficients (joint) or location coefficients
        (``fixed_scale``). NaN for genes whose information is singular or not finite.
    """
    if not fixed_scale:
        return np.asarray(result.fisher_inv_full if full else result.fisher_inv)
    model = result.model
    h_loc = np.asarray(model.constraints_loc, float)
    p = h_loc.shape[1]
    block = -np.asarray(result.hessian)[:, :p, :p]
    status = np.asarray(result.status).astype(str)
    cov = inverse_if_definite(block, ~np.isin(status, ["singular", "nonfinite", "all_zero"]))
    if full:
        cov = np.einsum("ij,gjk,lk->gil", h_loc, cov, h_loc)
    return cov


def standard_errors(result, which="loc", fixed_scale=False, full=True):
    """Standard errors ``sqrt(diag(covariance))``, shape (n_coefficients, n_genes).

    Parameters
    ----------
    which : {"loc", "scale"}
    fixed_scale : bool
        See :func:`covariance` (location only).
    full : bool
        Full (design) coefficients, or the reduced ones under constraints.
    """
    if fixed_scale and which != "loc":
        raise ValueError("fixed_scale=True gives location standard errors only (which='loc').")
    cov = covariance(result, fixed_scale=fixed_scale, full=full)
    diagonal = np.diagonal(cov, axis1=1, axis2=2).T
    p_loc = (np.asarray(result.model.constraints_loc).shape[0 if full else 1])
    if not fixed_scale:
        diagonal = diagonal[:p_loc] if which == "loc" else diagonal[p_loc:]
    with np.errstate(invalid="ignore"):
        return np.sqrt(np.where(diagonal >= 0, diagonal, np.nan))


# --------------------------------------------------------------------------- Wald test


def wald(result, coef=None, term=None, which="loc", fixed_scale=False):
    """Wald test of coefficients being zero, per gene.

    Parameters
    ----------
    result : Estimator or Results
    coef : str or sequence of str, optional
        Full design column name(s), e.g. ``"condition[T.B]"``. Several are tested jointly.
    term : str or sequence of str, optional
        A formula term (factor), e.g. ``"condition"``: all its columns jointly.
    which : {"loc", "scale"}
        Test location (default) or scale (log r) coefficients.
    fixed_scale : bool
        Use the location covariance at fixed dispersion (see :func:`covariance`) instead
        of the joint one. The default (joint) accounts for the estimated dispersion.

    Returns
    -------
    DataFrame, one row per gene
        ``gene``; ``coef`` or ``term`` (what was tested); ``estimate`` and ``se`` of the
        coefficient (natural-log scale); ``log2fc`` = ``estimate / ln 2``; ``z`` =
        ``estimate / se``; ``statistic`` (``z**2``, or the chi-square statistic of a joint
        test); ``df``; ``pval``; ``qval`` (Benjamini-Hochberg over the genes with a
        p-value); ``ll``; ``status``. A joint test of several coefficients reports, in
        ``estimate``/``se``/``log2fc``, the coefficient with the largest absolute value
        (diffxpy's convention), every coefficient in ``estimate_<name>`` / ``se_<name>``,
        and ``z`` = NaN. The test uses ``df`` = the number of coefficients (the rank of
        their constraint rows under constraints).
    """
    if fixed_scale and which != "loc":
        raise ValueError("fixed_scale=True tests location coefficients only (which='loc').")
    names, h_block, offset = _model_blocks(result, which)
    indices, label = resolve_coefficients(names, coef, term, which)
    n_reduced_block = h_block.shape[1]
    if fixed_scale:
        cov_reduced = covariance(result, fixed_scale=True, full=False)
        theta = np.asarray(result.a_var, float).T
        rows = h_block[indices]
    else:
        cov_reduced = np.asarray(result.fisher_inv)
        theta = np.concatenate([np.asarray(result.a_var), np.asarray(result.b_var)]).T
        rows = np.zeros((len(indices), theta.shape[1]))
        rows[:, offset:offset + n_reduced_block] = h_block[indices]
    if not np.any(rows):
        raise ValueError(f"{label}: the tested coefficients are fixed at 0 by the constraints.")
    basis = _row_basis(rows)
    df = basis.shape[0]

    # Estimates and standard errors of the tested full coefficients.
    estimates = theta @ rows.T  # (n_genes, k)
    cov_rows = np.einsum("ij,gjk,lk->gil", rows, cov_reduced, rows)
    with np.errstate(invalid="ignore"):
        variances = np.diagonal(cov_rows, axis1=1, axis2=2)
        ses = np.sqrt(np.where(variances >= 0, variances, np.nan))

    # The statistic on a full-row-rank basis of the hypothesis.
    projected = theta @ basis.T
    cov_basis = np.einsum("ij,gjk,lk->gil", basis, cov_reduced, basis)
    status = np.asarray(result.status).astype(object).copy()
    definite = _positive_definite(cov_basis)
    status[~definite & ~np.isin(status.astype(str), WALD_UNTESTABLE)] = "singular"
    valid = definite & ~np.isin(status.astype(str), WALD_UNTESTABLE)
    statistic = np.full(theta.shape[0], np.nan)
    if np.any(valid):
        solved = np.linalg.solve(cov_basis[valid], projected[valid][..., None])[..., 0]
        statistic[valid] = np.sum(projected[valid] * solved, axis=1)
    pval = np.full(theta.shape[0], np.nan)
    pval[valid] = scipy.stats.chi2.sf(statistic[valid], df)

    if len(indices) == 1:
        estimate, se = estimates[:, 0], ses[:, 0]
    else:
        pick = np.argmax(np.where(np.isfinite(estimates), np.abs(estimates), -np.inf), axis=1)
        estimate = estimates[np.arange(len(pick)), pick]
        se = ses[np.arange(len(pick)), pick]
    with np.errstate(invalid="ignore", divide="ignore"):
        z = estimate / se if len(indices) == 1 else np.full_like(estimate, np.nan)
    z = np.where(valid, z, np.nan)
    columns = {
        "gene": np.asarray(result.gene_names).astype(str),
        ("coef" if coef is not None else "term"): label,
        "estimate": estimate,
        "se": se,
        "log2fc": estimate / LN2,
        "z": z,
        "statistic": statistic,
        "df": df,
        "pval": pval,
        "qval": benjamini_hochberg(pval),
        "ll": np.asarray(result.log_likelihood, float),
        "status": status.astype(str),
    }
    if len(indices) > 1:
        for k, index in enumerate(indices):
            columns[f"estimate_{names[index]}"] = estimates[:, k]
            columns[f"se_{names[index]}"] = ses[:, k]
    return pd.DataFrame(columns)


# --------------------------------------------------------------------------- LR test


def _effective_designs(result):
    model = result.model
    loc = np.asarray(model.design_loc, float) @ np.asarray(model.constraints_loc, float)
    scale = np.asarray(model.design_scale, float) @ np.asarray(model.constraints_scale, float)
    return loc, scale


def _in_span(inner, outer):
    """Whether every column of ``inner`` is a linear combination of the columns of ``outer``."""
    coefficients, *_ = np.linalg.lstsq(outer, inner, rcond=None)
    residual = np.linalg.norm(inner - outer @ coefficients, axis=0)
    return bool(np.all(residual <= NESTING_RTOL * np.maximum(np.linalg.norm(inner, axis=0), 1.0)))


def check_nested(full, reduced):
    """Raise ValueError unless ``reduced`` is nested in ``full`` on the same data.

    Checks: same genes in the same order, same number of cells, same size factors, same
    per-gene mean counts (where both know them), every column of each reduced design
    (location and scale, after constraints) in the span of the full one, and fewer
    parameters in the reduced model.

    Returns
    -------
    int
        Degrees of freedom: the difference in the number of free parameters.
    """
    genes_full = np.asarray(full.gene_names).astype(str)
    genes_reduced = np.asarray(reduced.gene_names).astype(str)
    if genes_full.shape != genes_reduced.shape or not np.array_equal(genes_full, genes_reduced):
        raise ValueError(
            "the full and reduced fits are not over the same genes (in the same order)."
        )
    loc_f, scale_f = _effective_designs(full)
    loc_r, scale_r = _effective_designs(reduced)
    if loc_f.shape[0] != loc_r.shape[0]:
        raise ValueError(
            f"the full fit has {loc_f.shape[0]} cells but the reduced fit {loc_r.shape[0]}."
        )
    sf_full = full.model.size_factors
    sf_reduced = reduced.model.size_factors
    n_cells = loc_f.shape[0]
    sf_full = np.ones(n_cells) if sf_full is None else np.asarray(sf_full, float)
    sf_reduced = np.ones(n_cells) if sf_reduced is None else np.asarray(sf_reduced, float)
    if not np.allclose(sf_full, sf_reduced, rtol=SAME_DATA_RTOL, atol=0):
        raise ValueError("the full and reduced fits use different size factors.")
    mean_full, mean_reduced = gene_means(full), gene_means(reduced)
    if mean_full is not None and mean_reduced is not None:
        if not np.allclose(mean_full, mean_reduced, rtol=SAME_DATA_RTOL, atol=0):
            raise ValueError(
                "the full and reduced fits are not of the same counts (gene means differ)."
            )
    for which, inner, outer in (("location", loc_r, loc_f), ("scale", scale_r, scale_f)):
        if not _in_span(inner, outer):
            raise ValueError(
                f"the reduced model is not nested in the full one: its {which} design is not in "
                f"the span of the full {which} design."
            )
    df = loc_f.shape[1] + scale_f.shape[1] - loc_r.shape[1] - scale_r.shape[1]
    if df <= 0:
        raise ValueError(
            f"the reduced model has no fewer parameters than the full one "
            f"({loc_r.shape[1] + scale_r.shape[1]} vs {loc_f.shape[1] + scale_f.shape[1]})."
        )
    return df


def lrt(full, reduced):
    """Likelihood-ratio test of a reduced model nested in a full one, per gene.

    Parameters
    ----------
    full, reduced : Estimator or Results
        Fits of the same counts; the reduced designs must lie in the span of the full
        ones (checked, see :func:`check_nested`).

    Returns
    -------
    DataFrame, one row per gene
        ``gene``, ``ll_full``, ``ll_reduced``, ``df``, ``statistic`` =
        ``2 (ll_full - ll_reduced)`` clipped at 0, ``pval`` (chi-square), ``qval``,
        ``status`` (the full fit's status, or the reduced fit's where only that one is
        untestable), ``status_full``, ``status_reduced``. p-values are NaN where either
        fit's status is in :data:`LRT_UNTESTABLE`.
    """
    df = check_nested(full, reduced)
    ll_full = np.asarray(full.log_likelihood, float)
    ll_reduced = np.asarray(reduced.log_likelihood, float)
    status_full = np.asarray(full.status).astype(str)
    status_reduced = np.asarray(reduced.status).astype(str)
    bad_full = np.isin(status_full, LRT_UNTESTABLE)
    bad_reduced = np.isin(status_reduced, LRT_UNTESTABLE)
    status = np.where(~bad_full & bad_reduced, status_reduced, status_full)
    with np.errstate(invalid="ignore"):
        statistic = np.maximum(2.0 * (ll_full - ll_reduced), 0.0)
    valid = ~bad_full & ~bad_reduced & np.isfinite(statistic)
    pval = np.full(ll_full.shape, np.nan)
    pval[valid] = scipy.stats.chi2.sf(statistic[valid], df)
    return pd.DataFrame(
        {
            "gene": np.asarray(full.gene_names).astype(str),
            "ll_full": ll_full,
            "ll_reduced": ll_reduced,
            "df": df,
            "statistic": statistic,
            "pval": pval,
            "qval": benjamini_hochberg(pval),
            "status": status,
            "status_full": status_full,
            "status_reduced": status_reduced,
        }
    )


# --------------------------------------------------------------------------- per-gene data


def gene_means(result):
    """Mean count of each gene over cells, shape (n_genes,), or None if unknown."""
    means = getattr(result, "gene_mean", None)
    if means is not None:
        return np.asarray(means, float)
    data = getattr(result, "data", None)
    if data is None:
        return None
    return np.asarray(data.counts.mean(axis=0), dtype=np.float64).reshape(-1)
