"""Starting values of the coefficients: closed form, standard, or user arrays.

Plain numpy on one gene chunk at a time; the solvers never see this module.
"""

import numpy as np

#: Location of genes without any count: their mean is set to about 1e-20, i.e. 0.
ALL_ZERO_LOG_MEAN = float(np.log(1e-20))
#: Closed-form log r starts are clipped to this range: a start on the plateau of large r
#: (where the likelihood is flat in r) would stall gradient-based solvers.
LOG_R_START_RANGE = (-8.0, 8.0)

INIT_NAMES = ("auto", "standard", "closed_form")


def _constant_fit(matrix, values):
    """Coefficients whose linear predictor is as close as possible to ``values`` (n_genes,)."""
    solution, *_ = np.linalg.lstsq(matrix, np.ones(matrix.shape[0]), rcond=None)
    return values[:, None] * solution[None, :]


def init_location(method, counts, design, size_factors, groups):
    """Location starts, shape (n_genes, p_loc).

    Parameters
    ----------
    method : {"standard", "closed_form"}
        "standard": the intercept (or the constant fit of the design) at the log of the
        mean normalised count, other coefficients 0. "closed_form": the log mean of
        each group of cells with equal design rows, fitted by weighted least squares (falls
        back to "standard" when the design has too many distinct rows).
    counts : ndarray, shape (n_genes, n_cells)
    design : ndarray, shape (n_cells, p_loc)
    size_factors : ndarray, shape (n_cells,)
    groups : DesignGroups
    """
    all_zero = counts.sum(axis=1) == 0
    if method == "closed_form" and groups.usable:
        sums = counts @ groups.indicator
        exposure = size_factors @ groups.indicator
        # Half a count per group keeps empty groups finite.
        means = (sums + 0.5) / exposure
        start = groups.fit(np.log(means), groups.indicator.sum(axis=0))
    else:
        mean = counts.sum(axis=1) / size_factors.sum()
        start = _constant_fit(design, np.log(np.maximum(mean, 1e-8)))
    start[all_zero] = _constant_fit(design, np.full(int(all_zero.sum()), ALL_ZERO_LOG_MEAN))
    return start


def init_scale(method, counts, design, size_factors, groups):
    """Scale starts, shape (n_genes, p_scale).

    "standard": all zeros (r = 1). "closed_form": method-of-moments log r of each group of
    cells with equal scale-design rows, from normalised counts, clipped to
    ``LOG_R_START_RANGE`` and fitted by weighted least squares.
    """
    if method != "closed_form" or not groups.usable:
        return np.zeros((counts.shape[0], design.shape[1]))
    normalised = counts / size_factors[None, :]
    n = groups.indicator.sum(axis=0)
    mean = normalised @ groups.indicator / n
    variance = (normalised**2) @ groups.indicator / n - mean**2
    poisson_variance = mean * ((1.0 / size_factors) @ groups.indicator / n)
    excess = variance - poisson_variance
    with np.errstate(divide="ignore", invalid="ignore"):
        log_r = np.where(excess > 0, np.log(mean**2 / excess), LOG_R_START_RANGE[1])
    log_r = np.clip(np.nan_to_num(log_r, nan=0.0), *LOG_R_START_RANGE)
    return groups.fit(log_r, n)


def resolve_init(init, name, shape):
    """Normalise an ``init_a`` / ``init_b`` argument.

    Returns the method name ("standard" or "closed_form") or a float64 array of ``shape``
    (n_coefficients, n_genes), the diffxpy layout.
    """
    if isinstance(init, str):
        method = init.lower()
        if method not in INIT_NAMES:
            raise ValueError(f"{name}={init!r} is not known; use one of {list(INIT_NAMES)} or an array.")
        return "closed_form" if method == "auto" else method
    usage = f"use one of {list(INIT_NAMES)} or an array of shape {shape} (coefficients x genes)"
    if init is None:
        raise ValueError(f"{name}=None is not known; {usage}.")
    try:
        values = np.asarray(init, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name} is neither a known name nor a numeric array; {usage}.") from None
    if values.shape != shape:
        hint = " (transposed? nbfit takes diffxpy's layout)" if values.shape == shape[::-1] else ""
        raise ValueError(
            f"{name} has shape {values.shape}, expected {shape} (coefficients x genes){hint}."
        )
    if not np.all(np.isfinite(values)):
        bad = np.argwhere(~np.isfinite(values))[0]
        raise ValueError(
            f"{name} has {int(np.sum(~np.isfinite(values)))} non-finite value(s), first at "
            f"coefficient {int(bad[0])}, gene {int(bad[1])}."
        )
    return values
