"""Histograms of counts per gene and scale group.

The log-gamma part of the NB log-likelihood, ``lgamma(y + r) - lgamma(r) - y log r``,
depends on a cell only through its count y and its scale group (cells with equal rows of
the scale design share r). Summing it over the distinct (count, group) pairs of a gene,
weighted by how often each occurs, costs O(distinct counts) instead of O(cells): single-cell
genes have tens to hundreds of distinct counts over thousands of cells.
"""

from typing import NamedTuple

import numpy as np


class CountHistogram(NamedTuple):
    """Distinct (count, scale group) pairs of each gene, padded to a common size.

    Padding entries have count 0 and weight 0 (they contribute nothing).

    Attributes
    ----------
    values : ndarray, shape (n_genes, size)
    groups : ndarray of int32, shape (n_genes, size)
    weights : ndarray, shape (n_genes, size)
        Number of cells with that count in that group.
    """

    values: np.ndarray
    groups: np.ndarray
    weights: np.ndarray


def _sorted_keys(counts, cell_groups, n_groups):
    """Row-sorted keys ``count * n_groups + group`` and the mask of first occurrences."""
    keys = counts * n_groups + cell_groups[None, :]
    keys.sort(axis=1)
    first = np.ones(keys.shape, dtype=bool)
    first[:, 1:] = keys[:, 1:] != keys[:, :-1]
    return keys, first


def n_distinct(counts, cell_groups, n_groups):
    """Number of distinct (count, group) pairs of each gene, shape (n_genes,)."""
    _, first = _sorted_keys(counts, cell_groups, n_groups)
    return first.sum(axis=1)


def count_histogram(counts, cell_groups, n_groups, size):
    """:class:`CountHistogram` of a gene chunk.

    Parameters
    ----------
    counts : ndarray, shape (n_genes, n_cells)
        Integer-valued counts.
    cell_groups : ndarray of int, shape (n_cells,)
        Scale group of each cell.
    n_groups : int
    size : int
        Padded number of entries; at least the largest :func:`n_distinct`.
    """
    n_genes, n_cells = counts.shape
    keys, first = _sorted_keys(counts, cell_groups, n_groups)
    slot = np.cumsum(first, axis=1) - 1
    if n_genes and slot[:, -1].max() >= size:
        raise ValueError(f"histogram size {size} is smaller than {slot[:, -1].max() + 1} distinct counts.")
    flat = (np.arange(n_genes)[:, None] * size + slot).ravel()
    weights = np.bincount(flat, minlength=n_genes * size).reshape(n_genes, size).astype(np.float64)
    genes, _ = np.nonzero(first)
    unique = keys[first]
    positions = slot[first]
    values = np.zeros((n_genes, size))
    groups = np.zeros((n_genes, size), dtype=np.int32)
    values[genes, positions] = np.floor(unique / n_groups)
    groups[genes, positions] = np.round(unique - values[genes, positions] * n_groups).astype(np.int32)
    return CountHistogram(values, groups, weights)
