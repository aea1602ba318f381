"""Joint Newton-Raphson on (a, b) with the full observed Hessian."""

from dataclasses import dataclass

import jax.numpy as jnp

from nbfit import _problem
from nbfit._solvers._common import (
    EXPAND_AFTER,
    ascent_direction,
    finished,
    free_mask,
    line_search,
    predicted_converged,
    within_cap,
)


@dataclass(frozen=True)
class Newton:
    """Newton-Raphson on all coefficients of a gene at once.

    Each step solves with the observed Hessian of the joint location-scale
    log-likelihood (|eigenvalue| modified where it is not negative definite) and takes a
    line-searched step. Quadratic convergence near the optimum.

    Attributes
    ----------
    tol : float
        Converged when the Newton decrement ``g^T d`` is below ``tol * max(1, |ll|)``
        (the step is still taken), or once the contraction of the last two decrements
        predicts the next one below a hundredth of that and a step of at most 1e-7
        (:func:`~nbfit._solvers._common.predicted_converged`).
    update_loc, update_scale : bool
        Which coefficient groups move.
    """

    tol: float = 1e-10
    update_loc: bool = True
    update_scale: bool = True

    def init(self, theta, problem):
        return jnp.full(theta.shape[0], jnp.inf, theta.dtype)  # the previous decrement

    def step(self, theta, state, problem, active, n_steps):
        value, grad, hess = _problem.derivatives(theta, problem)
        free = free_mask(theta.shape[1], problem.design_loc.shape[1], self.update_loc, self.update_scale)
        direction, first = within_cap(theta, ascent_direction(grad, hess, free, active), problem)
        decrement = jnp.sum(grad * direction, axis=1)
        search = line_search(_problem.objective, theta, value, direction, decrement, problem, active, first,
                             expand=n_steps >= EXPAND_AFTER)
        done, converged = finished(decrement, search, value, self.tol)
        predicted = predicted_converged(decrement, state, direction, search, value, self.tol, n_steps)
        return search.theta, decrement, done | predicted, converged | predicted
