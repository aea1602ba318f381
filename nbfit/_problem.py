"""The fitting problem of ONE gene: its log-likelihood, gradient and Hessian.

All functions here are written for a single gene and vmapped over genes by the caller
(:mod:`nbfit._loop`). The parameter vector ``theta`` of a gene is the concatenation
``(a, b)`` of its location coefficients (``p_loc``) and scale coefficients (``p_scale``).

The log-likelihood is split as in :mod:`nbfit._likelihood`: the cheap ``mean_part`` is
summed over cells, the special-function ``count_part`` over the gene's histogram of
distinct (count, scale group) pairs (:mod:`nbfit._histogram`). Observation-level
derivatives come from JAX autodiff of those two functions; gene-level gradients and
Hessians are assembled from them with the designs (``g = X^T w``, ``H = X^T diag(W) X``).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nbfit._likelihood import LOG_R_CAP, count_part, mean_part


class Problem(NamedTuple):
    """Data of one gene and the data shared by all genes.

    Attributes
    ----------
    counts : Array, shape (n_cells,)
        Counts of the gene.
    histogram_values, histogram_weights : Array, shape (n_entries,)
        Distinct counts of the gene per scale group and how many cells have them.
    histogram_groups : Array of int32, shape (n_entries,)
        Scale group of each histogram entry.
    design_loc : Array, shape (n_cells, p_loc)
        Location design (already multiplied by its constraint matrix). Shared.
    design_scale : Array, shape (n_cells, p_scale)
        Scale design (already multiplied by its constraint matrix). Shared.
    scale_rows : Array, shape (n_groups, p_scale)
        The distinct rows of ``design_scale``, indexed by ``histogram_groups``. Shared.
    log_size_factors : Array, shape (n_cells,)
        Offset of the location linear predictor. Shared.
    """

    counts: jax.Array
    histogram_values: jax.Array
    histogram_groups: jax.Array
    histogram_weights: jax.Array
    design_loc: jax.Array
    design_scale: jax.Array
    scale_rows: jax.Array
    log_size_factors: jax.Array


#: vmap axes of a :class:`Problem`: counts and histograms per gene, the rest shared.
PROBLEM_AXES = Problem(0, 0, 0, 0, None, None, None, None)


def split(theta, problem):
    """Split ``theta`` into location and scale coefficients."""
    p_loc = problem.design_loc.shape[1]
    return theta[:p_loc], theta[p_loc:]


def linear_predictors(theta, problem):
    """``eta_mean = X_loc a + log sf`` and ``eta_scale = X_scale b``, each shape (n_cells,)."""
    a, b = split(theta, problem)
    eta_mean = problem.design_loc @ a + problem.log_size_factors
    eta_scale = problem.design_scale @ b
    return eta_mean, eta_scale


def _histogram_eta_scale(theta, problem):
    """``log r`` of each histogram entry, shape (n_entries,)."""
    _, b = split(theta, problem)
    return (problem.scale_rows @ b)[problem.histogram_groups]


def objective(theta, problem):
    """Log-likelihood of the gene, without the parameter-free ``-sum lgamma(y+1)``."""
    eta_mean, eta_scale = linear_predictors(theta, problem)
    cells = jnp.sum(mean_part(eta_mean, eta_scale, problem.counts))
    entries = count_part(problem.histogram_values, _histogram_eta_scale(theta, problem))
    return cells + problem.histogram_weights @ entries


def weighted_gram(weights, left, right):
    """``left^T diag(weights) right``, shape (p_left, p_right).

    Written as ``weights @ outer`` with the cell-wise outer products of the design rows,
    which do not depend on the gene: under vmap over genes this is one (genes x cells)
    by (cells x p_left p_right) matrix product instead of a batch of small ones.
    """
    outer = (left[:, :, None] * right[:, None, :]).reshape(left.shape[0], -1)
    return (weights @ outer).reshape(left.shape[1], right.shape[1])


def _cell_derivatives(eta_mean, eta_scale, y):
    """``mean_part`` and its first and second derivatives at one cell.

    Returns ``(value, d_mean, d_scale, d_mean_mean, d_mean_scale, d_scale_scale)``. Nested
    scalar ``grad`` calls fuse better in XLA than ``jax.hessian`` of a 2-vector.
    """
    d_mean = jax.grad(mean_part, 0)
    d_scale = jax.grad(mean_part, 1)
    return (
        mean_part(eta_mean, eta_scale, y),
        d_mean(eta_mean, eta_scale, y),
        d_scale(eta_mean, eta_scale, y),
        jax.grad(d_mean, 0)(eta_mean, eta_scale, y),
        jax.grad(d_mean, 1)(eta_mean, eta_scale, y),
        jax.grad(d_scale, 1)(eta_mean, eta_scale, y),
    )


def _count_derivatives(theta, problem):
    """``count_part`` summed over the histogram, and its derivatives per scale group.

    Returns
    -------
    value : Array, shape ()
    grad_groups, hess_groups : Array, shape (n_groups,)
        First and second derivatives w.r.t. each group's log r (the Hessian is diagonal).
    """
    eta = _histogram_eta_scale(theta, problem)
    y, w = problem.histogram_values, problem.histogram_weights
    d_scale = jax.grad(count_part, 1)
    value = w @ count_part(y, eta)
    n_groups = problem.scale_rows.shape[0]

    def per_group(values):
        return jax.ops.segment_sum(w * values, problem.histogram_groups, num_segments=n_groups)

    return value, per_group(jax.vmap(d_scale)(y, eta)), per_group(jax.vmap(jax.grad(d_scale, 1))(y, eta))


def derivatives(theta, problem):
    """Log-likelihood, gradient and Hessian of the gene.

    Returns
    -------
    value : Array, shape ()
    grad : Array, shape (p_loc + p_scale,)
    hess : Array, shape (p_loc + p_scale, p_loc + p_scale)
    """
    eta_mean, eta_scale = linear_predictors(theta, problem)
    value, d_m, d_s, d_mm, d_ms, d_ss = jax.vmap(_cell_derivatives)(eta_mean, eta_scale, problem.counts)
    count_value, count_grad, count_hess = _count_derivatives(theta, problem)
    x_loc, x_scale, rows = problem.design_loc, problem.design_scale, problem.scale_rows
    grad_gene = jnp.concatenate([d_m @ x_loc, d_s @ x_scale + count_grad @ rows])
    h_ll = weighted_gram(d_mm, x_loc, x_loc)
    h_ls = weighted_gram(d_ms, x_loc, x_scale)
    h_ss = weighted_gram(d_ss, x_scale, x_scale) + rows.T @ (count_hess[:, None] * rows)
    hess_gene = jnp.block([[h_ll, h_ls], [h_ls.T, h_ss]])
    return jnp.sum(value) + count_value, grad_gene, hess_gene


def fisher_location(theta, problem):
    """Log-likelihood, location gradient (p_loc,) and expected information (p_loc, p_loc).

    The expected information of the location coefficients is ``X^T diag(W) X`` with the
    IRLS weights ``W = mu r / (mu + r)``.
    """
    eta_mean, eta_scale = linear_predictors(theta, problem)
    grad_mean = jax.vmap(jax.grad(mean_part, 0))(eta_mean, eta_scale, problem.counts)
    weights = _fisher_weights(eta_mean, eta_scale)
    x_loc = problem.design_loc
    return objective(theta, problem), grad_mean @ x_loc, weighted_gram(weights, x_loc, x_loc)


def _fisher_weights(eta_mean, eta_scale):
    """IRLS weights ``mu r / (mu + r) = mu / (1 + mu / r)``."""
    log_r = jnp.minimum(eta_scale, LOG_R_CAP)
    return jnp.exp(eta_mean - jax.nn.softplus(eta_mean - log_r))


def scale_derivatives(theta, problem):
    """Log-likelihood, scale gradient (p_scale,) and observed scale Hessian (p_scale, p_scale)."""
    eta_mean, eta_scale = linear_predictors(theta, problem)
    d_scale = jax.grad(mean_part, 1)
    grad_cells = jax.vmap(d_scale)(eta_mean, eta_scale, problem.counts)
    hess_cells = jax.vmap(jax.grad(d_scale, 1))(eta_mean, eta_scale, problem.counts)
    value = jnp.sum(mean_part(eta_mean, eta_scale, problem.counts))
    count_value, count_grad, count_hess = _count_derivatives(theta, problem)
    x_scale, rows = problem.design_scale, problem.scale_rows
    grad = grad_cells @ x_scale + count_grad @ rows
    hess = weighted_gram(hess_cells, x_scale, x_scale) + rows.T @ (count_hess[:, None] * rows)
    return value + count_value, grad, hess
