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


#: Counts below this are tallied with ``bincount`` (O(cells)); the rare larger ones are
#: sorted.
SMALL_COUNT = 128
#: Genes are processed in blocks of about this many counts (cache-sized temporaries).
BLOCK = 2**18


def _distinct_pairs(counts, cell_groups, n_groups):
    """Distinct (count, group) pairs of every gene with their multiplicities.

    Returns
    -------
    genes, values, groups, weights : ndarray, shape (n_entries,)
        Gene (row of ``counts``), count, scale group and number of cells of each distinct
        pair, ordered by gene.
    """
    n_genes, n_cells = counts.shape
    step = max(1, BLOCK // max(1, n_cells))
    genes, keys, weights = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for start in range(0, n_genes, step):
        block_genes, block_keys, block_weights = _block_pairs(counts[start:start + step], cell_groups, n_groups)
        genes.append(block_genes + start)
        keys.append(block_keys)
        weights.append(block_weights)
    keys = np.concatenate(keys)
    return np.concatenate(genes), keys // n_groups, keys % n_groups, np.concatenate(weights)


def _block_pairs(counts, cell_groups, n_groups):
    """(gene, key = count * n_groups + group, weight) of the distinct pairs of a block."""
    n_genes = counts.shape[0]
    key = counts.astype(np.int64) * n_groups + cell_groups[None, :]
    width = SMALL_COUNT * n_groups
    row = np.arange(n_genes, dtype=np.int64)[:, None]
    small = key < width
    table = np.bincount((key + row * width)[small], minlength=n_genes * width).reshape(n_genes, width)
    genes, keys = np.nonzero(table)
    weights = table[genes, keys]
    if not small.all():
        span = int(key.max()) + 1
        large, large_weights = np.unique((key + row * span)[~small], return_counts=True)
        genes = np.concatenate([genes, large // span])
        keys = np.concatenate([keys, large % span])
        weights = np.concatenate([weights, large_weights])
        order = np.argsort(genes, kind="stable")
        genes, keys, weights = genes[order], keys[order], weights[order]
    return genes, keys, weights


def n_distinct(counts, cell_groups, n_groups):
    """Number of distinct (count, group) pairs of each gene, shape (n_genes,)."""
    genes = _distinct_pairs(counts, cell_groups, n_groups)[0]
    return np.bincount(genes, minlength=counts.shape[0])


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
    n_genes = counts.shape[0]
    genes, values, groups, weights = _distinct_pairs(counts, cell_groups, n_groups)
    per_gene = np.bincount(genes, minlength=n_genes)
    if n_genes and per_gene.max() > size:
        raise ValueError(f"histogram size {size} is smaller than {per_gene.max()} distinct counts.")
    starts = np.concatenate([[0], np.cumsum(per_gene)[:-1]])
    slots = np.arange(genes.size) - starts[genes]
    histogram = CountHistogram(
        np.zeros((n_genes, size)), np.zeros((n_genes, size), np.int32), np.zeros((n_genes, size))
    )
    histogram.values[genes, slots] = values
    histogram.groups[genes, slots] = groups
    histogram.weights[genes, slots] = weights
    return histogram
