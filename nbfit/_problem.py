"""The fitting problem of ONE gene: its log-likelihood, gradient and Hessian.

All functions here are written for a single gene and vmapped over genes by the caller
(:mod:`nbfit._loop`). The parameter vector ``theta`` of a gene is the concatenation
``(a, b)`` of its location coefficients (``p_loc``) and scale coefficients (``p_scale``).
Observation-level derivatives come from JAX autodiff of
:func:`nbfit._likelihood.log_likelihood`; the gene-level gradient and Hessian are
assembled from them with the designs (``g = X^T w``, ``H = X^T diag(W) X``).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nbfit._likelihood import LOG_R_CAP, log_likelihood


class Problem(NamedTuple):
    """Data of one gene (``counts``) and the data shared by all genes.

    Attributes
    ----------
    counts : Array, shape (n_cells,)
        Counts of the gene (batched over genes by the caller).
    design_loc : Array, shape (n_cells, p_loc)
        Location design (already multiplied by its constraint matrix).
    design_scale : Array, shape (n_cells, p_scale)
        Scale design (already multiplied by its constraint matrix).
    log_size_factors : Array, shape (n_cells,)
        Offset of the location linear predictor.
    """

    counts: jax.Array
    design_loc: jax.Array
    design_scale: jax.Array
    log_size_factors: jax.Array


#: vmap axes of a :class:`Problem`: counts per gene, everything else shared.
PROBLEM_AXES = Problem(counts=0, design_loc=None, design_scale=None, log_size_factors=None)


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


def objective(theta, problem):
    """Log-likelihood of the gene, without the parameter-free ``-sum lgamma(y+1)``."""
    eta_mean, eta_scale = linear_predictors(theta, problem)
    return jnp.sum(log_likelihood(eta_mean, eta_scale, problem.counts))


def _observation_derivatives(eta_mean, eta_scale, y):
    """Value, first and second derivatives of one observation's log-likelihood.

    Returns ``(ll, d_mean, d_scale, d_mean_mean, d_mean_scale, d_scale_scale)``. Nested
    scalar ``grad`` calls fuse better in XLA than ``jax.hessian`` of a 2-vector.
    """
    d_mean = jax.grad(log_likelihood, 0)
    d_scale = jax.grad(log_likelihood, 1)
    return (
        log_likelihood(eta_mean, eta_scale, y),
        d_mean(eta_mean, eta_scale, y),
        d_scale(eta_mean, eta_scale, y),
        jax.grad(d_mean, 0)(eta_mean, eta_scale, y),
        jax.grad(d_mean, 1)(eta_mean, eta_scale, y),
        jax.grad(d_scale, 1)(eta_mean, eta_scale, y),
    )


def weighted_gram(weights, left, right):
    """``left^T diag(weights) right``, shape (p_left, p_right).

    Written as ``weights @ outer`` with the cell-wise outer products of the design rows,
    which do not depend on the gene: under vmap over genes this is one (genes x cells)
    by (cells x p_left p_right) matrix product instead of a batch of small ones.
    """
    outer = (left[:, :, None] * right[:, None, :]).reshape(left.shape[0], -1)
    return (weights @ outer).reshape(left.shape[1], right.shape[1])


def derivatives(theta, problem):
    """Log-likelihood, gradient and Hessian of the gene.

    Returns
    -------
    value : Array, shape ()
    grad : Array, shape (p_loc + p_scale,)
    hess : Array, shape (p_loc + p_scale, p_loc + p_scale)
    """
    eta_mean, eta_scale = linear_predictors(theta, problem)
    value, d_m, d_s, d_mm, d_ms, d_ss = jax.vmap(_observation_derivatives)(
        eta_mean, eta_scale, problem.counts
    )
    x_loc, x_scale = problem.design_loc, problem.design_scale
    grad_gene = jnp.concatenate([d_m @ x_loc, d_s @ x_scale])
    h_ll = weighted_gram(d_mm, x_loc, x_loc)
    h_ls = weighted_gram(d_ms, x_loc, x_scale)
    h_ss = weighted_gram(d_ss, x_scale, x_scale)
    hess_gene = jnp.block([[h_ll, h_ls], [h_ls.T, h_ss]])
    return jnp.sum(value), grad_gene, hess_gene


def fisher_location(theta, problem):
    """Log-likelihood, location gradient (p_loc,) and expected information (p_loc, p_loc).

    The expected information of the location coefficients is ``X^T diag(W) X`` with the
    IRLS weights ``W = mu r / (mu + r)``.
    """
    eta_mean, eta_scale = linear_predictors(theta, problem)
    value, grad_mean = jax.vmap(jax.value_and_grad(log_likelihood), in_axes=(0, 0, 0))(
        eta_mean, eta_scale, problem.counts
    )
    weights = _fisher_weights(eta_mean, eta_scale)
    x_loc = problem.design_loc
    return jnp.sum(value), grad_mean @ x_loc, weighted_gram(weights, x_loc, x_loc)


def _fisher_weights(eta_mean, eta_scale):
    """IRLS weights ``mu r / (mu + r) = mu / (1 + mu / r)``."""
    log_r = jnp.minimum(eta_scale, LOG_R_CAP)
    return jnp.exp(eta_mean - jax.nn.softplus(eta_mean - log_r))


def scale_derivatives(theta, problem):
    """Log-likelihood, scale gradient (p_scale,) and observed scale Hessian (p_scale, p_scale)."""
    eta_mean, eta_scale = linear_predictors(theta, problem)

    def ll_scale(eta_s, eta_m, y):
        return log_likelihood(eta_m, eta_s, y)

    value, grad_scale = jax.vmap(jax.value_and_grad(ll_scale))(eta_scale, eta_mean, problem.counts)
    hess_scale = jax.vmap(jax.grad(jax.grad(ll_scale)))(eta_scale, eta_mean, problem.counts)
    x_scale = problem.design_scale
    return jnp.sum(value), grad_scale @ x_scale, weighted_gram(hess_scale, x_scale, x_scale)
