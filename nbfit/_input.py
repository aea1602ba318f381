"""The input layer: counts as gene chunks, sample description, gene names, size factors.

Everything here is plain numpy / scipy / pandas and is checked before anything is traced.
"""

import os
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse

from nbfit._storage import CellMajorWarning, GeneSource, is_streamable, open_path


@dataclass(frozen=True)
class CountData:
    """Counts with their cell and gene annotations.

    Attributes
    ----------
    counts : ndarray, scipy.sparse.csc_matrix or GeneSource, shape (n_cells, n_genes)
        Non-negative counts; sparse input is kept sparse (column-major for gene access);
        on-disk and dask input stays where it is and is read gene chunk by gene chunk.
    sample_description : DataFrame, shape (n_cells, n_covariates)
    gene_names : Index, shape (n_genes,)
    """

    counts: np.ndarray | scipy.sparse.csc_matrix
    sample_description: pd.DataFrame
    gene_names: pd.Index

    @property
    def n_cells(self):
        return self.counts.shape[0]

    @property
    def n_genes(self):
        return self.counts.shape[1]

    def gene_chunk(self, start, stop):
        """Dense counts of genes ``start:stop``, shape (stop - start, n_cells), float64."""
        block = self.counts[:, start:stop]
        if scipy.sparse.issparse(block):  # column-major: the transpose below is then free
            block = block.astype(np.float64).toarray(order="F")
        return np.ascontiguousarray(np.asarray(block, dtype=np.float64).T)


def read_counts(data, gene_names=None, sample_description=None, allow_noninteger=False):
    """Turn any supported ``data`` into a validated :class:`CountData`.

    Parameters
    ----------
    data : AnnData (in memory, backed or lazy), anndata Raw, ndarray, scipy.sparse matrix,
        dask array, shape (n_cells, n_genes), or the path of an .h5ad file / .zarr store
    gene_names : sequence of str, optional
        Overrides the names carried by ``data``.
    sample_description : DataFrame, optional
        Overrides ``obs`` of an AnnData.
    allow_noninteger : bool
        Accept non-integer values (e.g. estimated counts); by default they are an error.
    """
    counts, names, obs = _unpack(data)
    if gene_names is not None:
        if isinstance(gene_names, str):
            raise TypeError("gene_names must be a sequence of names, one per gene, not a string.")
        names = gene_names
    if sample_description is not None:
        obs = sample_description
    n_cells, n_genes = counts.shape
    if n_cells == 0 or n_genes == 0:
        raise ValueError(f"data is empty: {n_cells} cells x {n_genes} genes.")
    if names is None:
        names = [f"gene_{j}" for j in range(n_genes)]
    names = pd.Index([str(name) for name in names])
    if len(names) != n_genes:
        raise ValueError(f"gene_names has {len(names)} entries but data has {n_genes} genes (columns).")
    if names.has_duplicates:
        duplicated = names[names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"gene names must be unique; duplicated: {duplicated}.")
    if obs is None:
        obs = pd.DataFrame(index=pd.RangeIndex(n_cells).astype(str))
    if not isinstance(obs, pd.DataFrame):
        raise TypeError(f"sample_description must be a pandas DataFrame, got {type(obs).__name__}.")
    if len(obs) != n_cells:
        raise ValueError(
            f"sample_description has {len(obs)} rows but data has {n_cells} cells (rows)."
        )
    if isinstance(counts, GeneSource):  # streamed: each gene chunk is checked when first read
        counts.set_check(_chunk_check(obs.index, names, allow_noninteger))
    else:
        _check_values(counts, obs.index, names, allow_noninteger)
    return CountData(counts, obs, names)


def _chunk_check(cell_names, gene_names, allow_noninteger):
    """``check(block, start, stop)`` of :meth:`GeneSource.set_check`: the checks of
    :func:`_check_values` on one dense (cells, genes) block, naming its genes."""

    def check(block, start, stop):
        _check_values(block, cell_names, gene_names[start:stop], allow_noninteger)

    return check


def _unpack(data):
    """(counts, gene names, sample description) of any supported input."""
    try:
        import anndata
    except ImportError:  # pragma: no cover - anndata is a dependency
        anndata = None
    if isinstance(data, (str, os.PathLike)):  # an .h5ad file or .zarr store, read lazily
        source, obs, var = open_path(data)
        return source, var.index, obs
    if anndata is not None and isinstance(data, anndata.AnnData):
        obs = data.obs
        if not isinstance(obs, pd.DataFrame) and hasattr(obs, "to_memory"):
            obs = obs.to_memory()  # lazy AnnData (anndata.experimental.read_lazy)
        return _as_matrix(data.X), data.var_names, obs
    if anndata is not None and isinstance(data, anndata.Raw):
        return _as_matrix(data.X), data.var_names, None
    if scipy.sparse.issparse(data) or isinstance(data, (np.ndarray, GeneSource)) \
            or is_streamable(data):
        return _as_matrix(data), None, None
    if isinstance(data, pd.DataFrame):
        return _as_matrix(data.to_numpy()), data.columns, None
    raise TypeError(
        f"data of type {type(data).__name__} is not supported: pass an AnnData (in memory, "
        "backed or lazy), anndata Raw, numpy array, scipy.sparse matrix or dask array of shape "
        "(cells, genes), or the path of an .h5ad file or .zarr store."
    )


def _as_matrix(x):
    """Dense ndarray or CSC matrix of shape (cells, genes)."""
    if x is None:
        raise ValueError("data has no count matrix (X is None).")
    if isinstance(x, GeneSource):
        return x
    if is_streamable(x):  # on disk or dask: read gene chunk by gene chunk, never whole
        return GeneSource(x)
    if scipy.sparse.issparse(x):
        if x.format != "csc":
            megabytes = 2 * x.data.nbytes / 2**20
            warnings.warn(
                f"data is a {x.format.upper()} sparse matrix: converting it once to CSC for "
                f"gene access (a copy of about {megabytes:.0f} MiB and a sort of the nonzeros). "
                "Pass CSC (X.tocsc()) to avoid it, or for files write a gene-major copy with "
                "`nbfit prepare`.",
                CellMajorWarning,
                stacklevel=5,
            )
        return scipy.sparse.csc_matrix(x)
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"data must be 2-dimensional (cells x genes), got shape {x.shape}.")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise TypeError(f"data must be numeric, got dtype {x.dtype}.")
    return x


def _check_values(counts, cell_names, gene_names, allow_noninteger):
    """Raise on NaN, infinite, negative or (unless allowed) non-integer counts."""
    if scipy.sparse.issparse(counts):
        values = counts.data

        def where(mask):
            coo = counts.tocoo()
            k = np.flatnonzero(mask(coo.data))[0]
            return coo.row[k], coo.col[k], np.count_nonzero(mask(coo.data))
    else:
        values = counts

        def where(mask):
            bad = mask(counts)
            i, j = np.argwhere(bad)[0]
            return i, j, int(np.count_nonzero(bad))

    checks = [
        (lambda v: np.isnan(v), "NaN"),
        (lambda v: np.isinf(v), "infinite"),
        (lambda v: v < 0, "negative"),
    ]
    if not allow_noninteger:
        checks.append((lambda v: np.isfinite(v) & (v != np.round(v)), "non-integer"))
    for mask, what in checks:
        if np.any(mask(values)):
            i, j, n_bad = where(mask)
            hint = ""
            if what == "non-integer":
                hint = (
                    " nbfit fits raw counts: pass unnormalised counts (e.g. adata.layers['counts'] "
                    "or adata.raw), or allow_noninteger=True for estimated counts."
                )
            raise ValueError(
                f"data has {n_bad} {what} value(s), first at cell {cell_names[i]!r}, "
                f"gene {gene_names[j]!r}.{hint}"
            )


def read_size_factors(size_factors, sample_description):
    """Size factors as an ndarray of shape (n_cells,), or None.

    Parameters
    ----------
    size_factors : None, array-like, Series or str
        A string names a column of ``sample_description``.
    """
    if size_factors is None:
        return None
    n_cells = len(sample_description)
    if isinstance(size_factors, str):
        if size_factors not in sample_description.columns:
            raise ValueError(
                f"size_factors={size_factors!r} is not a column of the sample description; "
                f"columns are {list(sample_description.columns)}."
            )
        size_factors = sample_description[size_factors]
    elif isinstance(size_factors, pd.Series) and not size_factors.index.equals(sample_description.index):
        # A Series labelled by the cells is aligned by label, otherwise used by position.
        index = size_factors.index
        cells = sample_description.index
        if index.is_unique and cells.is_unique and len(index) == n_cells and set(index) == set(cells):
            size_factors = size_factors.reindex(cells)
    try:
        values = np.asarray(size_factors, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            f"size_factors must be positive numbers, one per cell; got values of dtype "
            f"{np.asarray(size_factors).dtype} that are not numeric."
        ) from None
    if values.ndim > 1 and values.size != max(values.shape):
        raise ValueError(f"size_factors must be 1-dimensional (one per cell), got shape {values.shape}.")
    values = values.reshape(-1)
    if values.shape[0] != n_cells:
        raise ValueError(f"size_factors has {values.shape[0]} values but data has {n_cells} cells.")
    bad = ~np.isfinite(values) | (values <= 0)
    if np.any(bad):
        first = sample_description.index[np.flatnonzero(bad)[0]]
        raise ValueError(
            f"size_factors has {int(bad.sum())} non-positive or non-finite value(s), "
            f"first at cell {first!r}; size factors must be positive."
        )
    return values
