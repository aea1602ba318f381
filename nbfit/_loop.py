"""The chunk loop: one ``lax.while_loop`` per solver stage over a chunk of genes.

A chunk has a fixed shape (``n_genes_chunk`` genes, padded), so a stage compiles once
per solver and shape. Genes that are done are frozen with ``where``; the loop runs while
any gene of the chunk is not done and fewer than ``max_steps`` steps were taken.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nbfit import _problem
from nbfit._likelihood import log_likelihood_constant
from nbfit._problem import PROBLEM_AXES


class StageResult(NamedTuple):
    """Outcome of one stage on a chunk.

    Attributes
    ----------
    theta : Array, shape (n_genes_chunk, P)
    n_steps : Array, shape (n_genes_chunk,)
        Steps taken by each gene in this stage.
    converged : Array, shape (n_genes_chunk,)
        The solver's convergence test passed.
    done : Array, shape (n_genes_chunk,)
        The gene stopped before ``max_steps``: converged, or stalled (no ascent step).
    """

    theta: jax.Array
    n_steps: jax.Array
    converged: jax.Array
    done: jax.Array


@partial(jax.jit, static_argnames=("solver",))
def run_stage(solver, theta, skip, problem, max_steps):
    """Run ``solver`` on every gene of a chunk until each is done or ``max_steps`` is hit.

    Parameters
    ----------
    solver : a solver stage from :mod:`nbfit._solvers` (hashable, static)
    theta : Array, shape (n_genes_chunk, P)
        Starting coefficients.
    skip : Array, shape (n_genes_chunk,), bool
        Genes not to fit (padding, all-zero genes); returned unchanged.
    problem : Problem
        ``counts`` of shape (n_genes_chunk, n_cells); the rest shared.
    max_steps : int
    """
    init = jax.vmap(solver.init, in_axes=(0, PROBLEM_AXES))
    step = jax.vmap(solver.step, in_axes=(0, 0, PROBLEM_AXES))
    n_genes = theta.shape[0]

    def cond(carry):
        k, _, _, done, _, _ = carry
        return (k < max_steps) & ~jnp.all(done)

    def body(carry):
        k, theta, state, done, n_steps, converged = carry
        new_theta, new_state, new_done, new_converged = step(theta, state, problem)

        def keep(old, new):
            mask = done.reshape(done.shape + (1,) * (old.ndim - 1))
            return jnp.where(mask, old, new)

        theta = keep(theta, new_theta)
        state = jax.tree_util.tree_map(keep, state, new_state)
        n_steps = n_steps + (~done).astype(n_steps.dtype)
        converged = jnp.where(done, converged, new_converged)
        return k + 1, theta, state, done | new_done, n_steps, converged

    carry = (
        jnp.zeros((), jnp.int32),
        theta,
        init(theta, problem),
        skip,
        jnp.zeros(n_genes, jnp.int32),
        skip,
    )
    _, theta, _, done, n_steps, converged = jax.lax.while_loop(cond, body, carry)
    return StageResult(theta, n_steps, converged, done)


class Evaluation(NamedTuple):
    """Log-likelihood and derivatives at the fitted coefficients of a chunk.

    Attributes
    ----------
    log_likelihood : Array, shape (n_genes_chunk,)
        Including the constant ``-sum lgamma(y + 1)``.
    gradient : Array, shape (n_genes_chunk, P)
    hessian : Array, shape (n_genes_chunk, P, P)
    min_eta_mean_zero : Array, shape (n_genes_chunk,)
        Smallest ``log mu`` over the cells with a zero count (+inf if none).
    max_eta_scale : Array, shape (n_genes_chunk,)
        Largest ``log r`` over the cells.
    min_overdispersion_score : Array, shape (n_genes_chunk,)
        Smallest over the scale groups of ``sum((y - mu)^2 - y)``, twice the derivative of
        the log-likelihood in 1/r at the Poisson limit: <= 0 means the likelihood of that
        group rises all the way to r = infinity (+inf without groups).
    """

    log_likelihood: jax.Array
    gradient: jax.Array
    hessian: jax.Array
    min_eta_mean_zero: jax.Array
    max_eta_scale: jax.Array
    min_overdispersion_score: jax.Array


@jax.jit
def evaluate(theta, problem, scale_groups):
    """:class:`Evaluation` of every gene of a chunk.

    ``scale_groups`` (n_cells, n_groups) is the one-hot membership of the cells in the
    distinct rows of the scale design (n_groups may be 0).
    """

    def one(theta, problem):
        value, grad, hess = _problem.derivatives(theta, problem)
        eta_mean, eta_scale = _problem.linear_predictors(theta, problem)
        constant = jnp.sum(log_likelihood_constant(problem.counts))
        zero = problem.counts == 0
        min_eta = jnp.min(jnp.where(zero, eta_mean, jnp.inf))
        residual = problem.counts - jnp.exp(eta_mean)
        score = ((residual**2 - problem.counts) @ scale_groups).min(initial=jnp.inf)
        return Evaluation(value + constant, grad, hess, min_eta, jnp.max(eta_scale), score)

    return jax.vmap(one, in_axes=(0, PROBLEM_AXES))(theta, problem)
