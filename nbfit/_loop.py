"""The chunk loop: one ``lax.while_loop`` per solver stage over a chunk of genes.

A chunk has a fixed shape (``n_genes_chunk`` genes, padded), so a stage compiles once
per solver and shape. Genes that are done are frozen with ``where``; the loop runs while
more than a given number of genes of the chunk are not done and below ``max_steps``
steps; the slow genes left then wait to be packed with those of other chunks
(:func:`run_stage`).
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nbfit import _devices, _problem
from nbfit._problem import SPLIT, Problem


#: Once at most ``1 / PACK_AT`` of a chunk's genes still run (and that is at least this
#: many), the chunk stops; its running genes wait, with their solver state, to be packed with
#: those of other chunks into a full chunk. Every chunk then has one shape (one compiled
#: program) and a few slow genes do not set the cost of a whole chunk.
MIN_PACK = 16
#: A third: most genes converge in three Newton steps, and up to a third of a chunk
#: still needs a fourth (measured on 1k and 10k cells: 10-15% less loop time than a
#: quarter).
PACK_AT = 3


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
    """Partition specs of a :class:`Problem`: per-gene fields split, the rest replicated."""
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


def _advance_local(solver, carry, problem, limits):
    """Step the running genes of ``carry`` until at most ``limits[1]`` of them run.

    ``limits`` = (max_steps, min_running) is traced: one program serves every stage
    length and stopping point.
    """
    max_steps, min_running = limits[0], limits[1]

    def cond(carry):
        return jnp.sum(_running(carry, max_steps)) > min_running

    def body(carry):
        moving = _running(carry, max_steps)
        new_theta, new_state, new_done, new_converged = solver.step(carry.theta, carry.state, problem, moving,
                                                                    carry.n_steps)

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


@partial(jax.jit, static_argnames=("solver",))
def _advance(solver, carry, problem, limits):
    """:func:`_advance_local` on each device's share of the genes, independently.

    With several local devices the genes are split over them (``shard_map``) and each
    device runs its own loop, without communication: ``min_running`` is then per device.
    """
    local = partial(_advance_local, solver)
    return _on_devices(local, (P("genes"), _problem_specs(), P()), P("genes"))(carry, problem, limits)


class Unit(NamedTuple):
    """A chunk of genes to fit, on the host.

    Attributes
    ----------
    genes : ndarray of int, shape (n_rows,)
        Index of each row's gene in the estimator; -1 for padding rows.
    theta : ndarray, shape (n_rows, P)
        Starting coefficients.
    skip : ndarray of bool, shape (n_rows,)
        Rows not to fit (padding, all-zero genes).
    chunk : nbfit._problem.Chunk
    """

    genes: np.ndarray
    theta: np.ndarray
    skip: np.ndarray
    chunk: object


class _Waiting(NamedTuple):
    """Running genes of a stopped chunk: gene indices, loop state (host) and data rows."""

    genes: np.ndarray
    carry: _Carry
    chunk: object


def run_stage(solver, units, max_steps, write):
    """Run ``solver`` on every gene of ``units`` until each is done or ``max_steps`` is hit.

    Each unit runs until at most a third of its genes still run; those wait and are
    packed with the waiting genes of other units into a unit of the same size, which runs
    the same way. The last unit runs to the end. Every gene follows the same trajectory
    whatever unit or device it is in (genes never interact).

    Parameters
    ----------
    solver : a solver stage from :mod:`nbfit._solvers` (hashable, static)
    units : iterable of Unit
        All with the same number of rows.
    max_steps : int
    write : callable ``(genes, theta, n_steps, converged, done)``
        Called with the rows (host arrays) of the genes that are finished.
    """
    devices = _devices.n_devices()
    waiting = []
    units = iter(units)
    unit = next(units, None)
    size = None if unit is None else unit.genes.size
    # Each unit is launched before the results of the one in flight are read: the host
    # prepares it (and writes results) while the devices compute.
    in_flight = None
    while True:
        # A packed unit is at least 2/3 full (each waiting group holds at most 1/3), so
        # it always makes progress.
        waiting_genes = sum(w.genes.size for w in waiting)
        if unit is not None and waiting_genes < size:
            genes, chunk = unit.genes, unit.chunk
            problem = chunk.problem()
            carry = _start(solver, _devices.put_genes(unit.theta.astype(chunk.counts.dtype)),
                           _devices.put_genes(unit.skip), problem)
            unit = next(units, None)
        elif waiting_genes >= size or (waiting and in_flight is None):
            genes, carry, chunk, waiting = _pack(waiting, size)
            problem = chunk.problem()
        else:
            genes = None
        launched = None
        if genes is not None:
            target = size // PACK_AT // devices * devices
            if target < MIN_PACK or (unit is None and not waiting and in_flight is None):
                target = 0  # the last unit (or a small one) runs to the end
            limits = _devices.put_shared(np.array([max_steps, target // devices], np.int32))
            launched = (genes, _advance(solver, carry, problem, limits), chunk)
        if in_flight is not None:
            waiting += _collect(*in_flight, max_steps, write)
        in_flight = launched
        if in_flight is None and unit is None and not waiting:
            return


def _collect(genes, carry, chunk, max_steps, write):
    """Read a launched unit's results: write its finished genes, return its running ones
    (a list of at most one :class:`_Waiting`)."""
    carry = jax.tree_util.tree_map(np.asarray, carry)
    running = _running(carry, max_steps) & (genes >= 0)
    finished = ~running & (genes >= 0)
    write(genes[finished], carry.theta[finished], carry.n_steps[finished], carry.converged[finished],
          carry.done[finished])
    if not running.any():
        return []
    rows = np.flatnonzero(running)
    return [_Waiting(genes[rows], jax.tree_util.tree_map(lambda x: x[rows], carry), chunk.select(rows))]


def _pack(waiting, size):
    """(genes, device carry, chunk, rest of waiting): waiting genes packed into ``size`` rows.

    Takes whole groups in order while they fit (each holds at most a third of ``size``);
    padding rows are done genes (-1) without histogram entries.
    """
    taken, n = [], 0
    while waiting and n + waiting[0].genes.size <= size:
        taken.append(waiting[0])
        n += waiting[0].genes.size
        waiting = waiting[1:]
    padding = size - n
    genes = np.concatenate([w.genes for w in taken] + [np.full(padding, -1)])

    def stack(*leaves):
        rows = np.concatenate(leaves)
        return np.concatenate([rows, np.repeat(rows[:1], padding, axis=0)])

    carry = jax.tree_util.tree_map(stack, *[w.carry for w in taken])
    carry = carry._replace(done=carry.done | (genes < 0), converged=carry.converged | (genes < 0))
    chunk = _problem.stack_chunks([w.chunk for w in taken], size)
    return genes, jax.tree_util.tree_map(_devices.put_genes, carry), chunk, waiting


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
        value, grad, hess = _problem.derivatives(theta, problem, constant=True)
        return Evaluation(value, grad, hess, *_problem.diagnostics(theta, problem, scale_groups))

    return _on_devices(local, (P("genes"), _problem_specs(), P()), P("genes"))(theta, problem, scale_groups)
