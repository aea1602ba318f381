"""The chunk loop: one ``lax.while_loop`` per solver stage over a chunk of genes.

A chunk has a fixed shape (``n_genes_chunk`` genes, padded), so a stage compiles once
per solver and shape. Genes that are done are frozen with ``where``; the loop runs while
any gene of the chunk is not done and fewer than ``max_steps`` steps were taken.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nbfit import _devices, _problem
from nbfit._likelihood import log_likelihood_constant
from nbfit._problem import SPLIT, Problem


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


#: Chunks of at least this many genes are compacted: once at most a quarter of their
#: genes are still running, those are gathered into a chunk a quarter the size (never
#: below this), so that a few slow genes do not set the cost of the whole chunk.
MIN_COMPACT = 64


class _Carry(NamedTuple):
    """Loop state of a chunk; every field has the genes as first axis."""

    theta: jax.Array
    state: object
    done: jax.Array
    n_steps: jax.Array
    converged: jax.Array


def _on_devices(local, in_specs, out_specs):
    """``local`` on each device's share of the genes (``shard_map``), or as is on one device.

    A spec ``P("genes")`` splits every leaf of its argument over the genes.
    """
    mesh = _devices.mesh()
    if mesh is None:
        return local
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _problem_specs():
    return Problem(*(P("genes") if split else P() for split in SPLIT))


@partial(jax.jit, static_argnames=("solver",))
def _start(solver, theta, skip, problem):
    def local(theta, skip, problem):
        state = solver.init(theta, problem)
        return _Carry(theta, state, skip, jnp.zeros(theta.shape[0], jnp.int32), skip)

    return _on_devices(local, (P("genes"), P("genes"), _problem_specs()), P("genes"))(theta, skip, problem)


def _running(carry, max_steps):
    """Genes that are not done and below ``max_steps``."""
    return ~carry.done & (carry.n_steps < max_steps)


def _advance_local(solver, carry, problem, max_steps, min_running):
    """Step the running genes of ``carry`` until at most ``min_running`` of them run."""

    def cond(carry):
        return jnp.sum(_running(carry, max_steps)) > min_running

    def body(carry):
        moving = _running(carry, max_steps)
        new_theta, new_state, new_done, new_converged = solver.step(carry.theta, carry.state, problem, moving)

        def keep(old, new):
            mask = moving.reshape(moving.shape + (1,) * (old.ndim - 1))
            return jnp.where(mask, new, old)

        return _Carry(
            theta=keep(carry.theta, new_theta),
            state=jax.tree_util.tree_map(keep, carry.state, new_state),
            done=carry.done | (moving & new_done),
            n_steps=carry.n_steps + moving.astype(jnp.int32),
            converged=jnp.where(moving, new_converged, carry.converged),
        )

    return jax.lax.while_loop(cond, body, carry)


@partial(jax.jit, static_argnames=("solver", "max_steps", "min_running"))
def _advance(solver, carry, problem, max_steps, min_running):
    """:func:`_advance_local` on each device's share of the genes, independently.

    With several local devices the genes are split over them (``shard_map``) and each
    device runs its own loop, without communication: ``min_running`` is then per device.
    """
    local = partial(_advance_local, solver, max_steps=max_steps, min_running=min_running // _devices.n_devices())
    return _on_devices(local, (P("genes"), _problem_specs()), P("genes"))(carry, problem)


def run_stage(solver, theta, skip, chunk, max_steps):
    """Run ``solver`` on every gene of a chunk until each is done or ``max_steps`` is hit.

    Every gene follows the same trajectory whatever chunk or device it is in: compaction
    only moves running genes (with their solver state) into a smaller chunk.

    Parameters
    ----------
    solver : a solver stage from :mod:`nbfit._solvers` (hashable, static)
    theta : Array, shape (n_genes_chunk, P)
        Starting coefficients.
    skip : Array, shape (n_genes_chunk,), bool
        Genes not to fit (padding, all-zero genes); returned unchanged.
    chunk : nbfit._problem.Chunk
        The chunk's data (n_genes_chunk rows).
    max_steps : int

    Returns
    -------
    StageResult
    """
    problem = chunk.problem()
    carry = _start(solver, theta, skip, problem)
    size = theta.shape[0]
    devices = _devices.n_devices()
    result = None
    index = np.arange(size)  # chunk row of each gene of the current (sub)chunk
    while True:
        target = size // 4 // devices * devices  # each device keeps an equal share
        if target < MIN_COMPACT:
            target = 0
        carry = _advance(solver, carry, problem, max_steps, target)
        if result is None and target == 0:
            return StageResult(carry.theta, carry.n_steps, carry.converged, carry.done)
        if result is None:
            result = jax.tree_util.tree_map(np.array, carry)
        running = np.flatnonzero(np.asarray(_running(carry, max_steps)))
        _scatter(result, carry, index)
        if running.size == 0 or target == 0:
            break
        # Gather the running genes into a chunk of size // 4, padded with done genes.
        size = target
        rows = np.concatenate([running, np.full(size - running.size, running[0])])
        padding = np.arange(size) >= running.size
        carry = jax.tree_util.tree_map(lambda x: np.asarray(x)[rows], carry)
        carry = carry._replace(done=carry.done | padding, converged=carry.converged | padding)
        carry = jax.tree_util.tree_map(_devices.put_genes, carry)
        chunk = chunk.select(rows, running.size)
        problem = chunk.problem()
        index = np.where(padding, -1, index[rows])
    return StageResult(result.theta, result.n_steps, result.converged, result.done)


def _scatter(result, carry, index):
    """Write the genes of a (sub)chunk ``carry`` back into ``result`` (rows ``index``)."""
    real = index >= 0
    for name in ("theta", "n_steps", "converged", "done"):
        getattr(result, name)[index[real]] = np.asarray(getattr(carry, name))[real]


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
    distinct rows of the scale design (n_groups may be 0; padding cells in none).
    """

    def local(theta, problem, scale_groups):
        value, grad, hess = _problem.derivatives(theta, problem)
        eta_mean, eta_scale = _problem.linear_predictors(theta, problem)
        constant = _problem.per_gene(problem.entry_weights * log_likelihood_constant(problem.entry_values), problem)
        counts = problem.counts
        real = jnp.isfinite(problem.log_size_factors)  # not a padding cell
        min_eta = jnp.min(jnp.where((counts == 0) & real, eta_mean, jnp.inf), axis=1)
        max_eta_scale = jnp.max(jnp.where(real, eta_scale, -jnp.inf), axis=1)
        score = ((counts - jnp.exp(eta_mean)) ** 2 - counts) @ scale_groups
        return Evaluation(value + constant, grad, hess, min_eta, max_eta_scale, score.min(axis=1, initial=jnp.inf))

    return _on_devices(local, (P("genes"), _problem_specs(), P()), P("genes"))(theta, problem, scale_groups)
