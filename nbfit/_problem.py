"""The fitting problem of a chunk of genes: log-likelihoods, gradients and Hessians.

Every function here takes the coefficients of all genes of a chunk, ``theta`` of shape
(n_genes, P), each row the concatenation ``(a, b)`` of a gene's location coefficients
(``p_loc``) and scale coefficients (``p_scale``), and returns one result per gene. Genes
never interact: a gene's results depend on its own row only.

The log-likelihood is split as in :mod:`nbfit._likelihood`: the cheap ``mean_part`` is
summed over the (genes, cells) matrix, a tile of ``CELL_TILE`` cells at a time (XLA keeps
each of its many elementwise intermediates in memory; a tile's stay in the cache, which
makes a pass over the matrix about three times faster), the special-function
``count_part`` over the flat
histogram of distinct (count, scale group) pairs of the chunk (:mod:`nbfit._histogram`),
whose entries are summed per gene; the continuation beyond the r cap depends on the scale
group alone and is summed per group. Observation-level derivatives are written out
(``mean_part_derivatives``, ``count_part_derivatives`` of :mod:`nbfit._likelihood`);
gene-level gradients and Hessians are assembled from them with the designs
(``g = X^T w``, ``H = X^T diag(W) X``).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nbfit import _devices
from nbfit._histogram import CountHistogram, capacity, device_layout, device_loads, select_genes
from nbfit._likelihood import (
    cap_continuation,
    count_part,
    count_part_derivatives,
    irls_weights,
    log_likelihood_constant,
    mean_part,
    mean_part_derivatives,
)


class Problem(NamedTuple):
    """Data of a chunk of genes on the devices.

    Under several devices each sees its share of the genes and the histogram entries of
    those genes (:func:`nbfit._histogram.device_layout`); the shared fields are replicated.

    The cells are padded to whole tiles (:func:`pad_cells`) with cells of count 0, design
    rows 0 and log size factor -inf (mean 0): they add exactly 0 to every sum.

    Attributes
    ----------
    counts : Array, shape (n_genes, n_cells)
    entry_genes : Array of int32, shape (n_entries,)
        Row in ``counts`` of each histogram entry's gene, sorted.
    entry_groups : Array of int32, shape (n_entries,)
        Scale group of each entry.
    entry_values, entry_weights : Array, shape (n_entries,)
        The distinct count and how many cells of the gene have it in that group (0 for
        padding).
    design_loc : Array, shape (n_cells, p_loc)
        Location design (already multiplied by its constraint matrix). Shared.
    design_scale : Array, shape (n_cells, p_scale)
        Scale design (already multiplied by its constraint matrix). Shared.
    scale_rows : Array, shape (n_groups, p_scale)
        The distinct rows of ``design_scale``, indexed by ``entry_groups``. Shared.
    scale_group_sizes : Array, shape (n_groups,)
        Number of cells with each of those rows. Shared.
    log_size_factors : Array, shape (n_cells,)
        Offset of the location linear predictor. Shared.
    """

    counts: jax.Array
    entry_genes: jax.Array
    entry_groups: jax.Array
    entry_values: jax.Array
    entry_weights: jax.Array
    design_loc: jax.Array
    design_scale: jax.Array
    scale_rows: jax.Array
    scale_group_sizes: jax.Array
    log_size_factors: jax.Array


#: Which fields of a :class:`Problem` are split over the devices (the rest are shared).
SPLIT = Problem(True, True, True, True, True, False, False, False, False, False)

#: Cells are padded to whole tiles of this many (measured on 10k cells and 420 genes: 512
#: is 2.5-4x faster than whole rows; 128 pays for the loop, 2048 leaves the cache).
CELL_TILE = 512
#: A tile holds at most this many (gene, cell) pairs: more genes, narrower tiles (down to
#: ``CELL_TILE / 16``), so that a tile's intermediates stay in the cache.
TILE_PAIRS = 2**16


def pad_cells(n_cells):
    """Number of cells once padded to whole tiles (unchanged up to one tile)."""
    if n_cells <= CELL_TILE:
        return n_cells
    return -(-n_cells // CELL_TILE) * CELL_TILE


def shared_arrays(design_loc, design_scale, scale_groups, log_size_factors, dtype):
    """The shared fields of a :class:`Problem`, cells padded, replicated on the devices.

    Parameters
    ----------
    design_loc : ndarray, shape (n_cells, p_loc)
    design_scale : ndarray, shape (n_cells, p_scale)
    scale_groups : nbfit._design.DesignGroups
        The distinct rows of ``design_scale``.
    log_size_factors : ndarray, shape (n_cells,)
    dtype : numpy dtype
    """
    pad = pad_cells(log_size_factors.shape[0]) - log_size_factors.shape[0]
    arrays = dict(
        design_loc=np.pad(design_loc, ((0, pad), (0, 0))),
        design_scale=np.pad(design_scale, ((0, pad), (0, 0))),
        scale_rows=scale_groups.rows,
        scale_group_sizes=np.bincount(scale_groups.inverse, minlength=scale_groups.rows.shape[0]),
        log_size_factors=np.pad(log_size_factors, (0, pad), constant_values=-np.inf),
    )
    return {name: _devices.put_shared(value.astype(dtype)) for name, value in arrays.items()}


class Chunk(NamedTuple):
    """Host copy of a chunk, from which its :class:`Problem` (or a subset's) is built.

    Attributes
    ----------
    counts : ndarray, shape (n_rows, n_cells)
        In the working dtype; n_rows is a multiple of the device count.
    histogram : nbfit._histogram.CountHistogram
        Entries of the rows of ``counts``.
    shared : dict
        ``design_loc``, ``design_scale``, ``scale_rows``, ``log_size_factors``, padded and
        placed on the devices (:func:`shared_arrays`).
    size : int
        Histogram entries per device.
    """

    counts: np.ndarray
    histogram: object
    shared: dict
    size: int

    def problem(self):
        """The :class:`Problem` on the devices."""
        devices = _devices.n_devices()
        genes, groups, values, weights = device_layout(self.histogram, self.counts.shape[0], devices, self.size)
        dtype = self.counts.dtype
        counts = np.pad(self.counts, ((0, 0), (0, pad_cells(self.counts.shape[1]) - self.counts.shape[1])))
        return Problem(
            counts=_devices.put_genes(counts),
            entry_genes=_devices.put_genes(genes),
            entry_groups=_devices.put_genes(groups),
            entry_values=_devices.put_genes(values.astype(dtype)),
            entry_weights=_devices.put_genes(weights.astype(dtype)),
            **self.shared,
        )

    def select(self, rows):
        """The chunk of the rows ``rows`` of this one (its histogram entries renumbered)."""
        return Chunk(self.counts[rows], select_genes(self.histogram, rows), self.shared, self.size)


def stack_chunks(chunks, n_rows):
    """One :class:`Chunk` of the rows of ``chunks`` in order, padded to ``n_rows`` rows.

    Padding rows have zero counts and no histogram entries.
    """
    counts = np.concatenate([c.counts for c in chunks])
    counts = np.concatenate([counts, np.zeros((n_rows - counts.shape[0], counts.shape[1]), counts.dtype)])
    offsets = np.cumsum([0] + [c.counts.shape[0] for c in chunks[:-1]])
    histogram = CountHistogram(*(
        np.concatenate([getattr(c.histogram, name) + (offset if name == "genes" else 0)
                        for c, offset in zip(chunks, offsets, strict=True)])
        for name in CountHistogram._fields
    ))
    load = device_loads(histogram, n_rows, _devices.n_devices()).max(initial=0)
    size = max(c.size for c in chunks)
    return Chunk(counts, histogram, chunks[0].shared, size if load <= size else capacity(load))


def split(theta, problem):
    """Split ``theta`` (n_genes, P) into location (n_genes, p_loc) and scale coefficients."""
    p_loc = problem.design_loc.shape[1]
    return theta[:, :p_loc], theta[:, p_loc:]


def _group_eta_scale(theta, problem):
    """``log r`` of each (gene, scale group), shape (n_genes, n_groups)."""
    _, b = split(theta, problem)
    return b @ problem.scale_rows.T


def _cell_sums(theta, problem, terms, combine=jnp.add, per_cell=()):
    """Sum over cell tiles of ``terms(eta_mean, eta_scale, y, x_loc, x_scale, *per_cell)``.

    ``terms`` gets one tile: the location linear predictor and counts of shape (n_genes,
    tile), the scale linear predictor of shape (n_genes, tile) or, where every cell has
    the same scale row, (n_genes, 1), design rows (tile, p_loc) and (tile, p_scale) and the
    tile's rows of each ``per_cell`` array (n_cells, ...); it returns a pytree of per-gene
    arrays, combined over tiles with ``combine`` (a function, or a pytree of functions
    matching the output).
    """
    a, b = split(theta, problem)
    # One scale row (the usual dispersion ~1): r is per gene, not per cell. Padding cells
    # (count 0, mean 0) then see the gene's r instead of 1, which changes none of their
    # terms (all 0).
    shared_scale = _group_eta_scale(theta, problem) if problem.scale_rows.shape[0] == 1 else None
    n_genes, n_cells = problem.counts.shape
    tile = min(CELL_TILE, n_cells)
    if n_cells > CELL_TILE:  # whole tiles of CELL_TILE: halving keeps them whole
        while tile > CELL_TILE // 16 and tile * n_genes > TILE_PAIRS:
            tile //= 2

    def one(start):
        def cells(array, axis=0):
            return jax.lax.dynamic_slice_in_dim(array, start, tile, axis=axis)

        x_loc, x_scale = cells(problem.design_loc), cells(problem.design_scale)
        eta_mean = a @ x_loc.T + cells(problem.log_size_factors)
        eta_scale = b @ x_scale.T if shared_scale is None else shared_scale
        return terms(eta_mean, eta_scale, cells(problem.counts, 1), x_loc, x_scale, *map(cells, per_cell))

    first = one(0)
    if n_cells == tile:
        return first
    if callable(combine):
        combine = jax.tree_util.tree_map(lambda _: combine, first)

    def body(k, total):
        return jax.tree_util.tree_map(lambda f, x, y: f(x, y), combine, total, one(k * tile))

    return jax.lax.fori_loop(1, n_cells // tile, body, first)


def diagnostics(theta, problem, scale_groups):
    """Per gene: the quantities the fit status is read from.

    Parameters
    ----------
    scale_groups : Array, shape (n_cells, n_groups)
        One-hot membership of the cells in the distinct rows of the scale design
        (n_groups may be 0; padding cells in none).

    Returns
    -------
    min_eta_mean_zero, max_eta_scale, min_overdispersion_score : Array, shape (n_genes,)
        Smallest ``log mu`` over the cells with a zero count (+inf if none); largest
        ``log r``; smallest over the scale groups of ``sum((y - mu)^2 - y)`` (+inf
        without groups).
    """
    def terms(eta_mean, eta_scale, y, x_loc, x_scale, groups):
        real = jnp.isfinite(eta_mean)  # padding cells have mean 0
        min_eta = jnp.min(jnp.where((y == 0) & real, eta_mean, jnp.inf), axis=1)
        max_eta_scale = jnp.max(jnp.where(real, eta_scale, -jnp.inf), axis=1)
        return min_eta, max_eta_scale, ((y - jnp.exp(eta_mean)) ** 2 - y) @ groups

    min_eta, max_eta_scale, score = _cell_sums(theta, problem, terms, (jnp.minimum, jnp.maximum, jnp.add),
                                               (scale_groups,))
    return min_eta, max_eta_scale, score.min(axis=1, initial=jnp.inf)


def _entry_eta_scale(theta, problem):
    """``log r`` of each histogram entry, shape (n_entries,)."""
    return _group_eta_scale(theta, problem)[problem.entry_genes, problem.entry_groups]


def per_gene(values, problem):
    """Sums of per-entry ``values`` (n_entries,) over each gene's entries, shape (n_genes,)."""
    return jax.ops.segment_sum(values, problem.entry_genes, num_segments=problem.counts.shape[0],
                               indices_are_sorted=True)


def _group_continuation(theta, problem):
    """:func:`~nbfit._likelihood.cap_continuation` of each (gene, scale group) times the
    group's number of cells: value, first and second derivative, each (n_genes, n_groups)."""
    parts = cap_continuation(_group_eta_scale(theta, problem))
    return tuple(part * problem.scale_group_sizes for part in parts)


def _count_value(theta, problem):
    """``count_part`` summed over each gene's histogram entries, with the continuation
    beyond the cap; shape (n_genes,)."""
    entries = count_part(problem.entry_values, _entry_eta_scale(theta, problem))
    continuation, _, _ = _group_continuation(theta, problem)
    return per_gene(problem.entry_weights * entries, problem) + jnp.sum(continuation, axis=1)


def objective(theta, problem):
    """Log-likelihood of each gene, without the parameter-free ``-sum lgamma(y+1)``; (n_genes,)."""
    def terms(eta_mean, eta_scale, y, x_loc, x_scale):
        return jnp.sum(mean_part(eta_mean, eta_scale, y), axis=1)

    return _cell_sums(theta, problem, terms) + _count_value(theta, problem)


def weighted_gram(weights, left, right):
    """``left^T diag(w) right`` for each row ``w`` of ``weights``; shape (n_genes, p_left, p_right).

    Written as ``weights @ outer`` with the cell-wise outer products of the design rows,
    which do not depend on the gene: one (genes x cells) by (cells x p_left p_right)
    matrix product instead of a batch of small ones.
    """
    outer = (left[:, :, None] * right[:, None, :]).reshape(left.shape[0], -1)
    return (weights @ outer).reshape(weights.shape[0], left.shape[1], right.shape[1])


def _count_derivatives(theta, problem, constant=False):
    """``count_part`` summed over each gene's entries, and its derivatives per scale group,
    with the continuation beyond the cap (which, too, depends on the scale group only).

    With ``constant`` the value includes ``-lgamma(y + 1)``, added entry by entry: for high
    counts both sum to ~1e5 and cancel to ~|ll|, which float32 resolves only if they
    cancel before the sum.

    Returns
    -------
    value : Array, shape (n_genes,)
    grad_groups, hess_groups : Array, shape (n_genes, n_groups)
        First and second derivatives w.r.t. each group's log r (the Hessian is diagonal).
    """
    eta = _entry_eta_scale(theta, problem)
    y, w = problem.entry_values, problem.entry_weights
    shape = (problem.counts.shape[0], problem.scale_rows.shape[0])

    def per_group(values):
        return jnp.zeros(shape, values.dtype).at[problem.entry_genes, problem.entry_groups].add(w * values)

    value, grad, hess = count_part_derivatives(y, eta)
    if constant:
        value = value + log_likelihood_constant(y)
    beyond, beyond_grad, beyond_hess = _group_continuation(theta, problem)
    return (per_gene(w * value, problem) + jnp.sum(beyond, axis=1), per_group(grad) + beyond_grad,
            per_group(hess) + beyond_hess)


def value_and_gradient(theta, problem):
    """Log-likelihood (n_genes,) and gradient (n_genes, P) of each gene."""
    def terms(eta_mean, eta_scale, y, x_loc, x_scale):
        value, d_mean, d_scale, *_ = mean_part_derivatives(eta_mean, eta_scale, y)
        return jnp.sum(value, axis=1), d_mean @ x_loc, d_scale @ x_scale

    value, grad_loc, grad_scale = _cell_sums(theta, problem, terms)
    count_value, count_grad, _ = _count_derivatives(theta, problem)
    grad = jnp.concatenate([grad_loc, grad_scale + count_grad @ problem.scale_rows], axis=1)
    return value + count_value, grad


def _scale_hessian(cells, count_hess, problem):
    """Observed scale Hessian (n_genes, p_scale, p_scale) from its cell sum and group curvatures."""
    rows = problem.scale_rows
    return cells + jnp.einsum("gk,ki,kj->gij", count_hess, rows, rows)


def derivatives(theta, problem, constant=False):
    """Log-likelihood, gradient and Hessian of each gene.

    The log-likelihood is without ``-sum lgamma(y + 1)``, or with it if ``constant``.

    Returns
    -------
    value : Array, shape (n_genes,)
    grad : Array, shape (n_genes, P)
    hess : Array, shape (n_genes, P, P)
    """
    def terms(eta_mean, eta_scale, y, x_loc, x_scale):
        value, d_m, d_s, d_mm, d_ms, d_ss = mean_part_derivatives(eta_mean, eta_scale, y)
        return (jnp.sum(value, axis=1), d_m @ x_loc, d_s @ x_scale, weighted_gram(d_mm, x_loc, x_loc),
                weighted_gram(d_ms, x_loc, x_scale), weighted_gram(d_ss, x_scale, x_scale))

    value, g_loc, g_scale, h_ll, h_ls, h_ss = _cell_sums(theta, problem, terms)
    count_value, count_grad, count_hess = _count_derivatives(theta, problem, constant)
    grad = jnp.concatenate([g_loc, g_scale + count_grad @ problem.scale_rows], axis=1)
    h_ss = _scale_hessian(h_ss, count_hess, problem)
    hess = jnp.concatenate([
        jnp.concatenate([h_ll, h_ls], axis=2),
        jnp.concatenate([jnp.swapaxes(h_ls, 1, 2), h_ss], axis=2),
    ], axis=1)
    return value + count_value, grad, hess


def fisher_location(theta, problem):
    """Log-likelihood (n_genes,), location gradient (n_genes, p_loc) and expected information.

    The expected information of the location coefficients, shape (n_genes, p_loc, p_loc),
    is ``X^T diag(W) X`` with the IRLS weights ``W = mu r / (mu + r)``.
    """
    def terms(eta_mean, eta_scale, y, x_loc, x_scale):
        value, d_mean, *_ = mean_part_derivatives(eta_mean, eta_scale, y)
        weights = irls_weights(eta_mean, eta_scale)
        return jnp.sum(value, axis=1), d_mean @ x_loc, weighted_gram(weights, x_loc, x_loc)

    value, grad, info = _cell_sums(theta, problem, terms)
    return value + _count_value(theta, problem), grad, info


def scale_derivatives(theta, problem):
    """Log-likelihood, scale gradient and observed scale Hessian of each gene.

    Shapes (n_genes,), (n_genes, p_scale) and (n_genes, p_scale, p_scale).
    """
    def terms(eta_mean, eta_scale, y, x_loc, x_scale):
        value, _, d_scale, _, _, d_scale_scale = mean_part_derivatives(eta_mean, eta_scale, y)
        return jnp.sum(value, axis=1), d_scale @ x_scale, weighted_gram(d_scale_scale, x_scale, x_scale)

    value, grad, hess = _cell_sums(theta, problem, terms)
    count_value, count_grad, count_hess = _count_derivatives(theta, problem)
    grad = grad + count_grad @ problem.scale_rows
    return value + count_value, grad, _scale_hessian(hess, count_hess, problem)
