"""IRLS: Fisher scoring for the location, Newton for the scale, alternating."""

from dataclasses import dataclass

import jax.numpy as jnp

from nbfit import _problem
from nbfit._solvers._common import (
    EXPAND_AFTER,
    LineSearchResult,
    ascent_direction,
    finished,
    line_search,
    within_cap,
)


@dataclass(frozen=True)
class IRLS:
    """Iteratively reweighted least squares for the location, then a scale Newton step.

    Each iteration solves the weighted least-squares problem of the location model
    (Fisher scoring with weights ``mu r / (mu + r)``) at fixed scale, then takes a Newton
    step on the scale coefficients with the observed scale Hessian at the new location.
    Both steps are line-searched. Location and scale are orthogonal in the Fisher sense,
    so the alternation converges fast.

    Attributes
    ----------
    tol : float
        Converged when the summed decrements of both half-steps are below
        ``tol * max(1, |ll|)``.
    update_loc, update_scale : bool
        Which half-steps are taken.
    """

    tol: float = 1e-10
    update_loc: bool = True
    update_scale: bool = True

    def init(self, theta, problem):
        return ()

    def step(self, theta, state, problem, active, n_steps):
        expand = n_steps >= EXPAND_AFTER
        p_loc = problem.design_loc.shape[1]
        start = value = _problem.objective(theta, problem)
        decrement = jnp.zeros_like(value)
        moved = jnp.zeros(value.shape, bool)
        if self.update_loc:
            value, grad_loc, info_loc = _problem.fisher_location(theta, problem)
            direction_loc = ascent_direction(grad_loc, -info_loc, jnp.ones(p_loc, bool), active)
            slope = jnp.sum(grad_loc * direction_loc, axis=1)
            direction = jnp.zeros_like(theta).at[:, :p_loc].set(direction_loc)
            search = line_search(_problem.objective, theta, value, direction, slope, problem, active,
                                 expand=expand)
            theta, value = search.theta, search.value
            decrement, moved = decrement + slope, moved | search.accepted
        if self.update_scale:
            value, grad_scale, hess_scale = _problem.scale_derivatives(theta, problem)
            free = jnp.ones(theta.shape[1] - p_loc, bool)
            direction_scale = ascent_direction(grad_scale, hess_scale, free, active)
            direction = jnp.zeros_like(theta).at[:, p_loc:].set(direction_scale)
            direction, first = within_cap(theta, direction, problem)
            slope = jnp.sum(grad_scale * direction[:, p_loc:], axis=1)
            search = line_search(_problem.objective, theta, value, direction, slope, problem, active, first,
                                 expand)
            theta, value = search.theta, search.value
            decrement, moved = decrement + slope, moved | search.accepted
        done, converged = finished(decrement, LineSearchResult(theta, value, moved), start, self.tol)
        return theta, state, done, converged
