"""Pieces shared by the solvers: modified Newton directions and the line search.

Everything here works on all genes of a chunk at once (genes on the first axis); no gene's
result depends on another's.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from nbfit import _devices
from nbfit._likelihood import LOG_R_CAP

#: Sufficient-increase constant of the Armijo line search.
ARMIJO = 1e-4
#: Step halvings before a line search gives up.
MAX_HALVINGS = 40
#: A full step that gains more than this fraction of the slope is extrapolated: the
#: log-likelihood keeps rising along exponential tails (separation, the Poisson limit)
#: much further than Newton's quadratic model believes. A quadratic gains one half, an
#: exponential tail ``1 - 1/e`` (0.63). At 0.55, ordinary genes' first steps (0.55-0.6)
#: were extrapolated too: on 2,000 genes, 314 extra trials of a whole chunk, 23 of which
#: gained anything.
EXPAND_RATIO = 0.6
#: Steps are extrapolated only from this step of a stage on. Ordinary genes converge in 3
#: to 4 Newton steps, and their first steps, far from the optimum, may gain more than a
#: quadratic predicts without any exponential tail; each extrapolation trial costs an
#: evaluation of the whole chunk. Genes on a tail are still running here.
EXPAND_AFTER = 3
#: Each extrapolation multiplies the step by this, at most ``MAX_EXPANSIONS`` times.
EXPAND_FACTOR = 4.0
MAX_EXPANSIONS = 4
#: A step that gains less than this fraction of max(1, |ll|) ends the fit: what is left
#: is below what the 1e-6 (and far tighter) targets can see, e.g. near the r cap or while
#: the means of separated cells go to 0.
GAIN_TOL = 1e-13
#: Log-likelihood differences below this many machine epsilons of the working dtype,
#: relative to max(1, |ll|), are rounding noise: a step whose predicted gain is that small
#: is accepted unless it loses more than the noise, and is never extrapolated (else
#: rounding would pick the step).
NOISE_EPS = 1e3
#: ... but only if it moves no coefficient by more than this: where rounding swamps the
#: log-likelihood (float32 with counts of millions), the gradient and Hessian are noise
#: too, and accepting their long steps on noise would let the fit drift without bound.
NOISE_STEP = 1e-2
#: A gene whose line search finds no ascent is converged if its Newton decrement is
#: below this fraction of max(1, |ll|): the optimum is then reached to rounding error.
STALL_TOL = 1e-8


def free_mask(n_params, p_loc, update_loc, update_scale):
    """Boolean mask, shape (n_params,), of the parameters a stage may change."""
    index = jnp.arange(n_params)
    return jnp.where(index < p_loc, update_loc, update_scale)


def ascent_direction(grad, hess, free, active):
    """Newton direction of a maximisation with |eigenvalue| modification, per gene.

    Where ``-hess`` is clearly positive definite (the usual case near an optimum) the
    direction is the plain Newton step from an unrolled Cholesky factorisation; only if
    an active gene's is not does the chunk also take the eigen-decomposition, far dearer
    for small matrices on the CPU.

    Parameters
    ----------
    grad : Array, shape (n_genes, P)
    hess : Array, shape (n_genes, P, P)
        Hessian (or minus an information matrix) of the log-likelihood.
    free : Array, shape (P,), bool
        Parameters that may move; the direction is 0 for the others.
    active : Array, shape (n_genes,), bool
        Genes whose direction is used (the others' may be anything finite).

    Returns
    -------
    Array, shape (n_genes, P)
        ``V diag(1/max(|lambda|, floor)) V^T grad`` with ``-hess = V diag(lambda) V^T``:
        the Newton step where the Hessian is negative definite, an ascent direction
        everywhere.
    """
    n = grad.shape[1]
    both = free[:, None] & free[None, :]
    neg_hess = jnp.where(both, -hess, jnp.eye(n, dtype=hess.dtype))
    grad = jnp.where(free, grad, 0.0)
    if n > MAX_UNROLLED:
        return _eigen_direction(neg_hess, grad)
    newton, definite = _cholesky_direction(neg_hess, grad)
    return jax.lax.cond(
        jnp.all(definite | ~active),
        lambda: newton,
        lambda: jnp.where(definite[:, None], newton, _eigen_direction(neg_hess, grad)),
    )


#: Cholesky is unrolled (O(P^3) operations in the program) up to this many parameters;
#: larger models always take the eigen-decomposition.
MAX_UNROLLED = 12
#: A Cholesky pivot below this many epsilons of the largest diagonal entry sends the gene
#: to the eigen-decomposition (indefinite or nearly singular matrix), whose eigenvalue
#: floor is ten times lower.
PIVOT_EPS = 1e3


def _cholesky_direction(matrix, grad):
    """(``matrix^-1 grad``, whether ``matrix`` is clearly positive definite), per gene.

    Unrolled over the (static, small) matrix size, so that XLA fuses it into a few
    elementwise passes over the genes instead of one small LAPACK call per gene.

    Parameters
    ----------
    matrix : Array, shape (n_genes, P, P)
    grad : Array, shape (n_genes, P)
    """
    n = grad.shape[1]
    a = [[matrix[:, i, j] for j in range(n)] for i in range(n)]
    diagonal = jnp.diagonal(matrix, axis1=1, axis2=2)
    floor = PIVOT_EPS * jnp.finfo(grad.dtype).eps * jnp.max(jnp.abs(diagonal), axis=1)
    definite = jnp.ones(grad.shape[0], bool)
    lower = [[None] * n for _ in range(n)]
    for j in range(n):
        pivot = a[j][j] - sum(lower[j][k] * lower[j][k] for k in range(j))
        definite = definite & (pivot > floor)
        lower[j][j] = jnp.sqrt(jnp.maximum(pivot, floor) + jnp.finfo(grad.dtype).tiny)
        for i in range(j + 1, n):
            lower[i][j] = (a[i][j] - sum(lower[i][k] * lower[j][k] for k in range(j))) / lower[j][j]
    z = [None] * n
    for i in range(n):  # L z = grad
        z[i] = (grad[:, i] - sum(lower[i][k] * z[k] for k in range(i))) / lower[i][i]
    x = [None] * n
    for i in reversed(range(n)):  # L^T x = z
        x[i] = (z[i] - sum(lower[k][i] * x[k] for k in range(i + 1, n))) / lower[i][i]
    return jnp.stack(x, axis=1), definite


def _eigen_direction(matrix, grad):
    """``V diag(1/max(|lambda|, floor)) V^T grad`` with ``matrix = V diag(lambda) V^T``, per gene."""
    # LAPACK on one device; Jacobi when chunks are split over several (see symmetric_eigen).
    eigh = jax.vmap(symmetric_eigen) if _devices.n_devices() > 1 else jnp.linalg.eigh
    eigenvalues, eigenvectors = eigh(matrix)
    magnitude = jnp.abs(eigenvalues)
    floor = 100.0 * jnp.finfo(matrix.dtype).eps * jnp.max(magnitude, axis=1, keepdims=True)
    floor = floor + jnp.finfo(matrix.dtype).tiny
    along = jnp.einsum("gji,gj->gi", eigenvectors, grad) / jnp.maximum(magnitude, floor)
    return jnp.einsum("gij,gj->gi", eigenvectors, along)


#: Jacobi sweeps stop once the off-diagonal mass is below this many epsilons of the
#: matrix's norm (or after ``MAX_SWEEPS``; cyclic Jacobi converges quadratically).
JACOBI_EPS = 1.0
MAX_SWEEPS = 30


def symmetric_eigen(matrix):
    """Eigenvalues and eigenvectors of a small symmetric matrix by cyclic Jacobi rotations.

    Written in elementwise operations and reductions over rows only, so that under vmap
    it is one fused computation over all genes: jaxlib's batched LAPACK ``syevd`` splits a
    large batch over the intra-op thread pool, which deadlocks when several forced CPU
    devices run their shards on that pool at once.

    Parameters
    ----------
    matrix : Array, shape (P, P)

    Returns
    -------
    eigenvalues : Array, shape (P,)
        Unsorted.
    eigenvectors : Array, shape (P, P)
        Orthonormal columns: ``matrix = V diag(eigenvalues) V^T``.
    """
    n = matrix.shape[0]
    if n == 1:
        return matrix[0], jnp.ones_like(matrix)
    p_index, q_index = jnp.triu_indices(n, 1)
    identity = jnp.eye(n, dtype=matrix.dtype)
    tolerance = JACOBI_EPS * jnp.finfo(matrix.dtype).eps * jnp.sqrt(jnp.sum(matrix * matrix))

    def rotate(k, carry):
        a, v = carry
        e_p = jnp.arange(n) == p_index[k]
        e_q = jnp.arange(n) == q_index[k]
        # Rows p and q of a and v (as masked sums: no gathers, no small matmuls).
        a_p, a_q = _pick(a, e_p), _pick(a, e_q)
        a_pq, a_pp, a_qq = _pick(a_p, e_q), _pick(a_p, e_p), _pick(a_q, e_q)
        nonzero = a_pq != 0
        ratio = (a_qq - a_pp) / jnp.where(nonzero, 2.0 * a_pq, 1.0)
        t = jnp.where(ratio >= 0, 1.0, -1.0) / (jnp.abs(ratio) + jnp.sqrt(ratio * ratio + 1.0))
        t = jnp.where(nonzero, t, 0.0)
        c = 1.0 / jnp.sqrt(t * t + 1.0)
        s = t * c
        # a <- J^T a J with J = I + (c - 1)(e_p e_p^T + e_q e_q^T) + s (e_p e_q^T - e_q e_p^T).
        def rotate_rows(m, row_p, row_q):
            return _set_rows(m, e_p, e_q, c * row_p - s * row_q, s * row_p + c * row_q)

        a = rotate_rows(a, a_p, a_q).T  # J^T a, transposed: its columns as rows
        a = rotate_rows(a, _pick(a, e_p), _pick(a, e_q)).T
        v = v.T
        v = rotate_rows(v, _pick(v, e_p), _pick(v, e_q)).T
        return a, v

    def off_diagonal(a):
        return jnp.sqrt(jnp.sum(jnp.where(identity > 0, 0.0, a * a)))

    def cond(carry):
        a, _, sweeps = carry
        return (off_diagonal(a) > tolerance) & (sweeps < MAX_SWEEPS)

    def sweep(carry):
        a, v, sweeps = carry
        a, v = jax.lax.fori_loop(0, p_index.shape[0], rotate, (a, v))
        return a, v, sweeps + 1

    a, v, _ = jax.lax.while_loop(cond, sweep, (matrix, identity, 0))
    return jnp.diagonal(a), v


def _pick(a, mask):
    """Row ``mask`` (one-hot, shape (P,)) of ``a`` (shape (P, ...))."""
    return jnp.sum(jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)), a, 0.0), axis=0)


def _set_rows(a, e_p, e_q, row_p, row_q):
    """``a`` (P, P) with rows p and q (one-hot masks) replaced."""
    return jnp.where(e_p[:, None], row_p[None, :], jnp.where(e_q[:, None], row_q[None, :], a))


#: A scale step that can go less than this fraction of the way before some group's log r
#: reaches ``LOG_R_CAP`` counts as starting at the cap.
AT_CAP = 1e-3


def within_cap(theta, direction, problem):
    """(direction, first trial step) of each gene that keep every group's log r below the cap.

    Genes whose likelihood rises to the Poisson limit climb in log r by about one per
    Newton step. A step that would cross :data:`~nbfit._likelihood.LOG_R_CAP` is cut:
    to end on the cap if that keeps at least half of it, else to the first step of the
    halving sequence (1, 1/2, 1/4, ...) below the cap, where backtracking from the steep
    continuation beyond the cap would have arrived after a dozen wasted trials. A gene
    already at the cap with a single scale coefficient (the usual intercept-only
    dispersion) drops the scale part of its direction: the cap bounds that coefficient,
    and the location goes on to its own optimum. With several scale coefficients the
    step at the cap is left as is (the line search backtracks from the continuation).

    Parameters
    ----------
    theta, direction : Array, shape (n_genes, P)
    problem : nbfit._problem.Problem

    Returns
    -------
    direction : Array, shape (n_genes, P)
    first : Array, shape (n_genes,)
        First trial step of the line search, in (0, 1].
    """
    p_loc = problem.design_loc.shape[1]
    rows = problem.scale_rows
    rise = direction[:, p_loc:] @ rows.T
    room = jnp.maximum(LOG_R_CAP - theta[:, p_loc:] @ rows.T, 0.0)
    rising = rise > 0
    steps = jnp.where(rising, room / jnp.where(rising, rise, 1.0), jnp.inf)
    limit = jnp.min(steps, axis=1, initial=jnp.inf)
    at_cap = limit < AT_CAP
    if rows.shape[1] == 1:
        direction = jnp.where(at_cap[:, None] & (jnp.arange(direction.shape[1]) >= p_loc), 0.0, direction)
    halving = jnp.exp2(jnp.floor(jnp.log2(jnp.maximum(limit, AT_CAP))))
    first = jnp.where(limit >= 1.0, 1.0, jnp.where(limit >= 0.5, limit, halving))
    return direction, jnp.where(at_cap, 1.0, first)


class LineSearchResult(NamedTuple):
    """Per gene: new coefficients (n_genes, P), their log-likelihood and whether a step was taken."""

    theta: jax.Array
    value: jax.Array
    accepted: jax.Array


#: Phases of a gene in the line search.
_BACKTRACK, _EXPAND, _DONE = 0, 1, 2


def line_search(objective, theta, value, direction, slope, problem, active, first=None, expand=True):
    """Backtracking Armijo line search along an ascent direction per gene, with extrapolation.

    Tries step ``first`` (1 by default), halves it until the log-likelihood rises by
    ``ARMIJO * t * slope``; if a full step gains more than a quadratic model predicts,
    tries longer steps while they keep improving. The log-likelihood never decreases:
    without an acceptable step the gene stays where it is (``accepted`` False). Genes
    that are not ``active`` (done) take no step.

    One loop holds both phases, so ``objective`` is traced (and compiled) once; each pass
    evaluates every gene at its own trial step.

    Parameters
    ----------
    objective : callable ``(theta, problem) -> (n_genes,)``
    theta, direction : Array, shape (n_genes, P)
    value, slope : Array, shape (n_genes,)
        Log-likelihood at ``theta`` and its directional derivative along ``direction``.
    problem : nbfit._problem.Problem
    active : Array, shape (n_genes,), bool
    first : Array, shape (n_genes,), optional
        First trial step of each gene (:func:`within_cap`).
    expand : bool or Array of bool, shape (n_genes,)
        Genes whose full steps may be extrapolated.
    """
    noise = noise_level(value)
    may_expand = active & (slope > noise) & expand
    length = jnp.max(jnp.abs(direction), axis=1)

    def trial(carry):
        t, phase, halvings, expansions, best_t, best_v = carry
        v = objective(theta + t[:, None] * direction, problem)
        sufficient = v >= value + ARMIJO * t * slope
        within_noise = (slope <= noise) & (v >= value - noise) & (t * length <= NOISE_STEP)
        backtracking, expanding = phase == _BACKTRACK, phase == _EXPAND
        accepted = backtracking & jnp.isfinite(v) & (sufficient | within_noise)
        rejected = backtracking & ~accepted
        grow = accepted & may_expand & (t == 1.0) & (v - value > EXPAND_RATIO * slope + noise)
        better = expanding & jnp.isfinite(v) & (v > best_v + noise)
        expansions = expansions + better
        keep = accepted | better
        go_on = (rejected & (halvings < MAX_HALVINGS)) | grow | (better & (expansions < MAX_EXPANSIONS))
        phase = jnp.where(go_on, jnp.where(backtracking & ~grow, _BACKTRACK, _EXPAND), _DONE)
        t_next = jnp.where(rejected, 0.5 * t, EXPAND_FACTOR * t)
        return (jnp.where(go_on, t_next, t), phase, halvings + rejected, expansions,
                jnp.where(keep, t, best_t), jnp.where(keep, v, best_v))

    start = (jnp.ones_like(value) if first is None else first, jnp.where(active, _BACKTRACK, _DONE),
             jnp.zeros(value.shape, jnp.int32), jnp.zeros(value.shape, jnp.int32), jnp.zeros_like(value),
             jnp.full_like(value, -jnp.inf))
    _, _, _, _, best_t, best_v = jax.lax.while_loop(lambda carry: jnp.any(carry[1] != _DONE), trial, start)
    accepted = best_t > 0
    new_theta = jnp.where(accepted[:, None], theta + best_t[:, None] * direction, theta)
    return LineSearchResult(new_theta, jnp.where(accepted, best_v, value), accepted)


def finished(decrement, search, value, tol):
    """(done, converged) of each gene after a line-searched step.

    Converged when the decrement before the step was below ``tol`` or the accepted step
    gained less than ``GAIN_TOL`` (both relative to max(1, |ll|)) although a resolvable
    gain was predicted; done also when the line search found no ascent (converged then
    only if the decrement was tiny). A predicted gain below the rounding noise of the
    log-likelihood (float32) does not stop the fit: the gradient still resolves it.
    """
    scale = relative_to(value)
    no_gain = search.accepted & (search.value - value <= GAIN_TOL * scale) & (decrement > noise_level(value))
    small = (decrement <= tol * scale) | no_gain
    stalled = ~search.accepted
    return small | stalled, small | (stalled & (decrement <= STALL_TOL * scale))


#: Near an optimum Newton's decrements shrink quadratically, ``d_next ~ d^3 / d_prev^2``
#: (the error squares; a decrement is quadratic in the error), and the steps with the
#: square root of their ratio. A gene stops once the next decrement is predicted below
#: ``PREDICT_SAFETY * tol`` and the next step below ``PREDICT_STEP`` in every coefficient:
#: that step would gain nothing the tolerance can see. The prediction is trusted only
#: from step ``PREDICT_AFTER`` on (the contraction of the first step from a start is no
#: guide), after a step that gained what the quadratic model said (a full step gains half
#: the decrement) to ``QUADRATIC_GAIN``, and with a decrement at most ``PREDICT_FROM``
#: (relative to max(1, |ll|)): a contraction measured farther out can be luckier than
#: the next one. On 2,000 simulated genes of 1,000 cells, two thirds of the genes stop
#: after three steps instead of 44%, within 3e-7 of the fully converged coefficients.
PREDICT_SAFETY = 1e-2
PREDICT_STEP = 1e-7
PREDICT_AFTER = 2
QUADRATIC_GAIN = 1e-2
PREDICT_FROM = 1e-6


def predicted_converged(decrement, previous, direction, search, value, tol, n_steps):
    """Genes whose next Newton step is predicted to change nothing the tolerances can see.

    Parameters
    ----------
    decrement, previous : Array, shape (n_genes,)
        Newton decrement ``g^T d`` of this step and of the one before (+inf at the first).
    direction : Array, shape (n_genes, P)
        This step's Newton direction.
    search : LineSearchResult
        This step's line search.
    value : Array, shape (n_genes,)
        Log-likelihood before this step.
    tol : float
    n_steps : Array of int, shape (n_genes,)
        Steps the gene had taken before this one.
    """
    gain = (search.value - value) / jnp.where(decrement > 0, decrement, 1.0)
    quadratic = jnp.abs(gain - 0.5) < QUADRATIC_GAIN
    contraction = decrement / previous
    scale = relative_to(value)
    next_decrement = decrement * contraction**2
    next_step = jnp.max(jnp.abs(direction), axis=1) * contraction
    # The gain is resolved to QUADRATIC_GAIN only well above the rounding noise (never in
    # float32, whose noise is above PREDICT_FROM).
    resolved = QUADRATIC_GAIN * decrement > noise_level(value)
    return ((n_steps >= PREDICT_AFTER) & search.accepted & quadratic & resolved & (contraction < 1.0)
            & (decrement <= PREDICT_FROM * scale) & (next_decrement <= PREDICT_SAFETY * tol * scale)
            & (next_step <= PREDICT_STEP))


def noise_level(value):
    """Rounding noise of a log-likelihood ``value`` in its dtype."""
    return NOISE_EPS * jnp.finfo(value.dtype).eps * relative_to(value)


def relative_to(value):
    """``max(1, |value|)``: the scale against which tolerances are relative."""
    return jnp.maximum(1.0, jnp.abs(value))
