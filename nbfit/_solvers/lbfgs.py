"""L-BFGS on the joint coefficients (a, b)."""

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from nbfit import _problem
from nbfit._solvers._common import finished, free_mask, line_search


class LBFGSState(NamedTuple):
    """L-BFGS memory of each gene; ``y`` holds gradient differences of ``-ll``."""

    value: jax.Array  # (n_genes,)
    grad: jax.Array  # (n_genes, P) gradient of ll at theta
    s: jax.Array  # (n_genes, m, P)
    y: jax.Array  # (n_genes, m, P)
    rho: jax.Array  # (n_genes, m) 1 / (y^T s), 0 for empty slots
    newest: jax.Array  # (n_genes,) index of the newest pair
    preconditioner: jax.Array  # (n_genes, P) initial inverse-Hessian diagonal


@dataclass(frozen=True)
class LBFGS:
    """Limited-memory BFGS on the joint log-likelihood, each gene with its own memory.

    The initial inverse Hessian is the inverse diagonal of the observed information at
    the starting point (one Hessian evaluation per stage), which puts the location and
    scale coefficients on a common footing; every later step uses gradients only.

    Attributes
    ----------
    tol : float
        Converged when the quasi-Newton decrement ``g^T d`` is below
        ``tol * max(1, |ll|)``.
    memory : int
        Number of stored (s, y) pairs.
    max_step : float
        Largest change of any coefficient in one step.
    update_loc, update_scale : bool
        Which coefficient groups move.
    """

    tol: float = 1e-12
    memory: int = 10
    max_step: float = 1.0
    update_loc: bool = True
    update_scale: bool = True

    def _free(self, theta, problem):
        return free_mask(theta.shape[1], problem.design_loc.shape[1], self.update_loc, self.update_scale)

    def init(self, theta, problem):
        value, grad, hess = _problem.derivatives(theta, problem)
        curvature = jnp.abs(jnp.diagonal(hess, axis1=1, axis2=2))
        floor = 1e-8 * jnp.max(curvature, axis=1, keepdims=True) + jnp.finfo(theta.dtype).tiny
        n_genes, n_params = theta.shape
        zeros = jnp.zeros((n_genes, self.memory, n_params), theta.dtype)
        return LBFGSState(
            value=value,
            grad=jnp.where(self._free(theta, problem), grad, 0.0),
            s=zeros,
            y=zeros,
            rho=jnp.zeros((n_genes, self.memory), theta.dtype),
            newest=jnp.zeros(n_genes, jnp.int32),
            preconditioner=1.0 / jnp.maximum(curvature, floor),
        )

    def _direction(self, state):
        """Two-loop recursion for one gene: approximate inverse Hessian of -ll times the ll gradient."""
        m = self.memory
        order = (state.newest - jnp.arange(m)) % m  # newest first

        def backward(q, i):
            alpha = state.rho[i] * (state.s[i] @ q)
            return q - alpha * state.y[i], alpha

        q, alphas = jax.lax.scan(backward, state.grad, order)
        r = state.preconditioner * q

        def forward(r, inputs):
            i, alpha = inputs
            beta = state.rho[i] * (state.y[i] @ r)
            return r + state.s[i] * (alpha - beta), None

        r, _ = jax.lax.scan(forward, r, (order[::-1], alphas[::-1]))
        return r

    def _remember(self, state, s, y, keep):
        """``state`` of one gene with the pair (s, y) stored if ``keep``."""
        slot = (state.newest + 1) % self.memory
        sy = jnp.where(keep, s @ y, 1.0)
        return state._replace(
            s=jnp.where(keep, state.s.at[slot].set(s), state.s),
            y=jnp.where(keep, state.y.at[slot].set(y), state.y),
            rho=jnp.where(keep, state.rho.at[slot].set(1.0 / sy), state.rho),
            newest=jnp.where(keep, slot, state.newest),
        )

    def step(self, theta, state, problem, active, n_steps):
        free = self._free(theta, problem)
        direction = jax.vmap(self._direction)(state)
        slope = jnp.sum(state.grad * direction, axis=1)
        # Fall back to the preconditioned gradient if the memory gives no ascent.
        fallback = state.preconditioner * state.grad
        direction = jnp.where((slope > 0)[:, None], direction, fallback)
        # A step moves no coefficient by more than max_step: a long first step on a
        # flat dispersion lands on the plateau of large r, where gradients vanish.
        largest = jnp.max(jnp.abs(direction), axis=1, keepdims=True)
        direction = direction * jnp.minimum(1.0, self.max_step / largest)
        slope = jnp.sum(state.grad * direction, axis=1)
        search = line_search(_problem.objective, theta, state.value, direction, slope, problem, active,
                             expand=False)
        value, grad = _problem.value_and_gradient(search.theta, problem)
        grad = jnp.where(free, grad, 0.0)
        s = search.theta - theta
        y = state.grad - grad  # gradient difference of -ll
        sy = jnp.sum(s * y, axis=1)
        keep = search.accepted & (sy > 1e-10 * jnp.sqrt(jnp.sum(s * s, axis=1) * jnp.sum(y * y, axis=1)))
        new_state = jax.vmap(self._remember)(state._replace(value=value, grad=grad), s, y, keep)
        done, converged = finished(slope, search, state.value, self.tol)
        return search.theta, new_state, done, converged
