"""Histograms of counts per gene and scale group.

The log-gamma part of the NB log-likelihood, ``lgamma(y + r) - lgamma(r) - y log r``,
depends on a cell only through its count y and its scale group (cells with equal rows of
the scale design share r). Summing it over the distinct (count, group) pairs of a gene,
weighted by how often each occurs, costs O(distinct counts) instead of O(cells): single-cell
genes have tens to hundreds of distinct counts over thousands of cells.

The entries of a chunk are kept flat, gene after gene, not padded per gene: a few genes
have a thousand distinct counts where the median gene has fifty. On the devices they are
laid out in one fixed-size block per device (:func:`device_layout`).
"""

from typing import NamedTuple

import numpy as np


class CountHistogram(NamedTuple):
    """Distinct (count, scale group) pairs of the genes of a chunk, flat and ordered by gene.

    Attributes
    ----------
    genes : ndarray of int64, shape (n_entries,)
        Row of the entry's gene in the chunk.
    values : ndarray, shape (n_entries,)
        The count.
    groups : ndarray of int64, shape (n_entries,)
        The scale group.
    weights : ndarray, shape (n_entries,)
        Number of cells of the gene with that count in that group.
    """

    genes: np.ndarray
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


def count_histogram(counts, cell_groups, n_groups):
    """:class:`CountHistogram` of a gene chunk.

    Parameters
    ----------
    counts : ndarray, shape (n_genes, n_cells)
        Integer-valued counts.
    cell_groups : ndarray of int, shape (n_cells,)
        Scale group of each cell.
    n_groups : int
    """
    return CountHistogram(*_distinct_pairs(counts, cell_groups, n_groups))


def select_genes(histogram, rows):
    """The entries of the genes ``rows`` (chunk rows), renumbered ``0 .. len(rows) - 1``."""
    rows = np.asarray(rows, dtype=np.int64)
    n_rows = int(max(rows.max(initial=-1), histogram.genes.max(initial=-1))) + 1
    per_gene = np.bincount(histogram.genes, minlength=n_rows)
    offsets = np.concatenate([[0], np.cumsum(per_gene)])
    lengths = per_gene[rows]
    firsts = np.repeat(offsets[rows], lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    index = firsts + within
    return CountHistogram(
        np.repeat(np.arange(rows.size), lengths), histogram.values[index],
        histogram.groups[index], histogram.weights[index],
    )


def device_loads(histogram, n_rows, n_devices):
    """Entries held by each device when ``n_rows`` rows are split evenly, shape (n_devices,)."""
    share = n_rows // n_devices
    return np.bincount(histogram.genes // share, minlength=n_devices)


def capacity(entries):
    """Entries per device for a load of ``entries``: at least 256, rounded up to 1, 1.25, 1.5
    or 1.75 times a power of two.

    Rounding up keeps the number of compiled shapes small across chunks (four per
    octave); quarter steps waste at most a quarter of the entries, where the next power of
    two wasted up to half.
    """
    entries = max(int(entries), 256)
    step = 1 << (entries.bit_length() - 3)  # a quarter of the power of two below
    return -(-entries // step) * step


def device_layout(histogram, n_rows, n_devices, size):
    """Entries arranged in one block of ``size`` per device, gene rows local to the block.

    Device ``d`` holds rows ``d * share .. (d + 1) * share - 1`` (share = n_rows /
    n_devices), as the gene axis is split. Padding entries have weight 0 and the block's
    last row as gene, so each block stays sorted by gene.

    Returns
    -------
    genes, groups : ndarray of int32, shape (n_devices * size,)
    values, weights : ndarray, shape (n_devices * size,)
    """
    share = n_rows // n_devices
    device = histogram.genes // share
    loads = np.bincount(device, minlength=n_devices)
    if loads.max(initial=0) > size:
        raise ValueError(f"{loads.max()} histogram entries do not fit in blocks of {size}.")
    firsts = np.concatenate([[0], np.cumsum(loads)[:-1]])
    position = device * size + np.arange(device.size) - firsts[device]
    genes = np.full(n_devices * size, share - 1, np.int32)
    groups = np.zeros(n_devices * size, np.int32)
    values = np.zeros(n_devices * size)
    weights = np.zeros(n_devices * size)
    genes[position] = histogram.genes - device * share
    groups[position] = histogram.groups
    values[position] = histogram.values
    weights[position] = histogram.weights
    return genes, groups, values, weights
