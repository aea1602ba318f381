"""Per-gene fit statuses and how they are assigned."""

import enum

import numpy as np

from nbfit._likelihood import LOG_R_CAP

#: A cell with a zero count whose fitted mean is below this is taken as separated.
SEPARATION_MEAN = 1e-10
#: -H is singular when its smallest |eigenvalue| is below this times its largest.
SINGULAR_RCOND = 1e-12


class Status(enum.Enum):
    """What happened to a gene; the value is the explanation shown to users."""

    converged = (
        "reached the optimum: the Newton decrement fell (or was predicted to fall) below the "
        "tolerance"
    )
    max_steps = "stopped at max_steps before the convergence test passed"
    stalled = (
        "no ascent step could be found before the convergence test passed (the remaining "
        "gain is below floating-point resolution or the problem is degenerate)"
    )
    nonfinite = "the log-likelihood or its derivatives are not finite at the fitted point"
    singular = (
        "converged, but the information matrix is singular: some coefficients are not "
        "identified by this gene's counts"
    )
    all_zero = (
        "every count is zero: the likelihood is maximal (ll = 0) as the mean goes to 0; the "
        "location is set to a mean of about 1e-20"
    )
    separated = (
        "some cells with zero counts can have their mean go to 0 (e.g. a group with only "
        "zeros): no finite MLE; the affected coefficients are large and finite and ll is "
        "within tolerance of its supremum"
    )
    poisson_limit = (
        "no overdispersion: for some cells the likelihood rises all the way to r = infinity "
        "(the Poisson limit); r stops at or near the cap 1e8 (log r = 18.42), where the NB "
        "equals the Poisson to within 1e-8 per count"
    )


STATUS_NAMES = tuple(s.name for s in Status)


def assign_status(all_zero, converged, stalled, evaluation_finite, min_eta_mean_zero,
                  max_eta_scale, overdispersion_score, min_abs_eigenvalue, max_abs_eigenvalue):
    """One status name per gene; every argument has shape (n_genes,).

    A gene is at the Poisson limit when its fitted r reached the cap, or when in some
    group of cells with equal scale design the log-likelihood still rises towards
    r = infinity (``overdispersion_score <= 0``, see :class:`nbfit._loop.Evaluation`).

    The first that applies wins: all_zero, nonfinite, separated, poisson_limit,
    stalled / max_steps (not converged), singular, converged.
    """
    status = np.full(all_zero.shape, Status.converged.name, dtype=object)
    singular = ~(min_abs_eigenvalue > SINGULAR_RCOND * max_abs_eigenvalue)
    status[singular] = Status.singular.name
    status[~converged & ~stalled] = Status.max_steps.name
    status[~converged & stalled] = Status.stalled.name
    status[(max_eta_scale >= LOG_R_CAP) | (overdispersion_score <= 0)] = Status.poisson_limit.name
    status[min_eta_mean_zero < np.log(SEPARATION_MEAN)] = Status.separated.name
    status[~evaluation_finite] = Status.nonfinite.name
    status[all_zero] = Status.all_zero.name
    return status


def inverse_if_definite(matrices, usable):
    """Inverse of each symmetric positive definite matrix, NaN for the others.

    Parameters
    ----------
    matrices : ndarray, shape (n_genes, P, P)
        Symmetric matrices (e.g. the observed information ``-H``).
    usable : ndarray of bool, shape (n_genes,)
        Genes to invert at all (False: NaN whatever the matrix).

    Returns
    -------
    ndarray, shape (n_genes, P, P)
        ``inv(M)`` through the eigendecomposition where every eigenvalue exceeds
        ``SINGULAR_RCOND`` times the largest and the matrix is finite; NaN elsewhere.
    """
    matrices = np.asarray(matrices, np.float64)
    result = np.full_like(matrices, np.nan)
    ok = np.asarray(usable, bool) & np.all(np.isfinite(matrices), axis=(1, 2))
    if not np.any(ok):
        return result
    values, vectors = np.linalg.eigh(matrices[ok])
    definite = values.min(axis=1) > SINGULAR_RCOND * np.abs(values).max(axis=1)
    inverse = np.einsum("gij,gj,gkj->gik", vectors, 1.0 / np.where(values > 0, values, 1.0), vectors)
    inverse[~definite] = np.nan
    result[ok] = inverse
    return result
