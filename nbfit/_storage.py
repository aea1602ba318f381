"""Counts that stay where they are: on disk (backed / lazy AnnData, .h5ad, .zarr) or in dask.

:class:`GeneSource` reads ``[:, start:stop]`` gene blocks, densifies only the block and
validates each block the first time it is read, so a fit never holds more than one gene
chunk of counts. :class:`ReaderSpec` names where a source lives (file, format, key), so
that a worker process can open it itself (``nbfit.distributed``).

:func:`prepare` writes a gene-major copy (CSC) of an AnnData file once: reading a gene
block of a cell-major (CSR or row-major dense) matrix reads the whole matrix.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse

#: Formats of a :class:`ReaderSpec`.
FORMATS = ("h5ad", "zarr")

_CELL_MAJOR_HINT = (
    "each gene chunk then reads the whole matrix; write a gene-major (CSC) copy once with "
    "`nbfit prepare IN OUT` (or nbfit.prepare) and fit that."
)


class CellMajorWarning(UserWarning):
    """Counts are stored by cell (CSR): reading genes costs a pass over the whole matrix."""


def _anndata_io():
    """``(read_elem, sparse_dataset, write_elem)`` of any anndata >= 0.10."""
    try:
        from anndata.io import read_elem, sparse_dataset, write_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem, sparse_dataset, write_elem
    return read_elem, sparse_dataset, write_elem


def _sparse_dataset_types():
    try:
        from anndata.abc import CSCDataset, CSRDataset
        return (CSCDataset, CSRDataset)
    except ImportError:  # anndata < 0.11
        try:
            from anndata._core.sparse_dataset import BaseCompressedSparseDataset
        except ImportError:  # pragma: no cover
            return ()
        return (BaseCompressedSparseDataset,)


def is_dask_array(x):
    module = sys.modules.get("dask.array")
    return module is not None and isinstance(x, module.Array)


def is_streamable(x):
    """Whether ``x`` is read lazily: an on-disk dataset (h5py, zarr, anndata sparse) or dask."""
    if is_dask_array(x):
        return True
    if isinstance(x, _sparse_dataset_types()):
        return True
    h5py = sys.modules.get("h5py")
    if h5py is not None and isinstance(x, h5py.Dataset):
        return True
    zarr = sys.modules.get("zarr")
    return zarr is not None and isinstance(x, getattr(zarr, "Array", ()))


@dataclass(frozen=True)
class ReaderSpec:
    """Where a count matrix lives: ``format`` ("h5ad" or "zarr"), file ``path``, ``key``
    of the matrix inside it ("X", "layers/counts", ...). Picklable; workers open it."""

    format: str
    path: str
    key: str = "X"

    def open(self):
        """The :class:`GeneSource` of this matrix (files stay open, cached per process)."""
        return _open_cached(self)


@functools.lru_cache(maxsize=8)
def _open_cached(spec):
    root = _open_root(spec.path, spec.format)
    return GeneSource(_element_array(root[spec.key]), location=spec)


class GeneSource:
    """A (cells, genes) count matrix read gene block by gene block.

    Parameters
    ----------
    array : h5py.Dataset, zarr.Array, anndata CSC/CSR dataset or dask array, (cells, genes)
    location : ReaderSpec, optional
        Where the array lives on disk, if it does.

    ``source[:, start:stop]`` is a dense float64 ndarray of shape (n_cells, stop - start),
    checked by :meth:`set_check` the first time each block is read.
    """

    ndim = 2

    def __init__(self, array, location=None):
        self.array = array
        self.shape = tuple(int(n) for n in array.shape)
        if len(self.shape) != 2:
            raise ValueError(f"data must be 2-dimensional (cells x genes), got shape {self.shape}.")
        self.location = location if location is not None else _location_of(array)
        self.format = _format_of(array)
        self._check = None
        self._checked = set()
        if self.format == "csr":
            warnings.warn(
                f"the counts{self._where()} are stored cell-major (CSR) on disk: "
                + _CELL_MAJOR_HINT,
                CellMajorWarning,
                stacklevel=6,
            )

    def _where(self):
        return f" in {self.location.path!r}" if self.location is not None else ""

    def __repr__(self):
        return f"GeneSource({self.format}, shape={self.shape}{self._where()})"

    def set_check(self, check):
        """``check(block, start, stop)`` raises on bad values of a dense (cells, genes) block."""
        self._check = check
        self._checked = set()

    def __getitem__(self, key):
        if (
            not isinstance(key, tuple) or len(key) != 2 or key[0] != slice(None)
            or not isinstance(key[1], slice) or key[1].step not in (None, 1)
        ):
            raise IndexError("a GeneSource is read by gene blocks only: source[:, start:stop].")
        start, stop, _ = key[1].indices(self.shape[1])
        return self.read(start, stop)

    def read(self, start, stop):
        """Dense float64 counts of genes ``start:stop``, shape (n_cells, stop - start)."""
        block = self.read_raw(start, stop)
        if scipy.sparse.issparse(block):  # column-major: gene_chunk's transpose is free
            block = block.astype(np.float64).toarray(order="F")
        block = np.asarray(block, dtype=np.float64)
        if self._check is not None and (start, stop) not in self._checked:
            self._check(block, start, stop)
            self._checked.add((start, stop))
        return block

    def read_raw(self, start, stop):
        """Genes ``start:stop`` as stored: scipy.sparse (CSC) or ndarray, unchecked."""
        if self.format == "dask":
            block = self.array[:, start:stop].compute()
        else:
            block = self.array[:, start:stop]
        if scipy.sparse.issparse(block) and block.format != "csc":
            block = scipy.sparse.csc_matrix(block)
        return block

    def mean(self, axis=0):
        """Mean of each gene over cells, shape (n_genes,); streams over gene blocks."""
        if axis != 0:
            raise NotImplementedError("GeneSource.mean supports axis=0 (per gene) only.")
        step = max(1, 2**24 // max(self.shape[0], 1))
        means = [
            np.asarray(self.read_raw(s, min(s + step, self.shape[1])).mean(axis=0)).reshape(-1)
            for s in range(0, self.shape[1], step)
        ]
        return np.concatenate(means).astype(np.float64)


def _format_of(array):
    if is_dask_array(array):
        return "dask"
    fmt = getattr(array, "format", None)  # anndata sparse datasets
    if isinstance(array, _sparse_dataset_types()) and fmt in ("csr", "csc"):
        return fmt
    return "dense"


def _location_of(array):
    """Best-effort :class:`ReaderSpec` of an on-disk array, or None."""
    group = getattr(array, "group", None)  # anndata sparse dataset
    node = group if group is not None and isinstance(array, _sparse_dataset_types()) else array
    h5py = sys.modules.get("h5py")
    if h5py is not None and isinstance(node, (h5py.Dataset, h5py.Group)):
        try:
            return ReaderSpec("h5ad", str(Path(node.file.filename).resolve()), node.name)
        except (ValueError, OSError):  # pragma: no cover - closed file
            return None
    zarr = sys.modules.get("zarr")
    zarr_types = (getattr(zarr, "Array", ()), getattr(zarr, "Group", ())) if zarr else ()
    if zarr is not None and isinstance(node, zarr_types):
        store = node.store
        root = getattr(store, "root", None) or getattr(store, "path", None)
        if root is None or not Path(str(root)).exists():
            return None
        return ReaderSpec("zarr", str(Path(str(root)).resolve()), node.path or "/")
    return None


def _element_array(elem):
    """The lazily readable array of an AnnData element (sparse group or dense array)."""
    attrs = dict(elem.attrs)
    encoding = attrs.get("encoding-type", attrs.get("h5sparse_format"))
    if encoding in ("csr_matrix", "csc_matrix", "csr", "csc"):
        _, sparse_dataset, _ = _anndata_io()
        return sparse_dataset(elem)
    if hasattr(elem, "shape") and hasattr(elem, "dtype"):
        return elem
    raise ValueError(
        f"element {getattr(elem, 'name', elem)!r} of encoding {encoding!r} is not a count matrix "
        "(expected a dense array or a CSR/CSC sparse matrix)."
    )


def path_format(path):
    """"zarr" for a .zarr path or folder, else "h5ad"."""
    path = Path(path)
    return "zarr" if path.suffix == ".zarr" or path.is_dir() else "h5ad"


def _open_root(path, fmt):
    if fmt == "zarr":
        import zarr

        return zarr.open_group(str(path), mode="r")
    import h5py

    return h5py.File(str(path), "r")


def open_path(path, layer=None):
    """Open an AnnData file lazily.

    Parameters
    ----------
    path : str or PathLike
        An ``.h5ad`` file or a ``.zarr`` store.
    layer : str, optional
        Read ``layers/<layer>`` instead of ``X``.

    Returns
    -------
    (GeneSource, obs DataFrame, var DataFrame)
        Only ``obs`` and ``var`` are read into memory.
    """
    path = Path(os.fspath(path))
    if not path.exists():
        raise FileNotFoundError(f"input {str(path)!r} does not exist.")
    fmt = path_format(path)
    if fmt == "h5ad" and path.is_dir():  # pragma: no cover - path_format makes it zarr
        raise ValueError(f"input {str(path)!r} is a folder, not an .h5ad file.")
    try:
        root = _open_root(path, fmt)
    except Exception as error:  # h5py / zarr raise many types on unreadable files
        what = "a .zarr store" if fmt == "zarr" else "an .h5ad file"
        raise ValueError(f"could not read {str(path)!r} as {what}: {error}") from None
    key = "X" if layer is None else f"layers/{layer}"
    if key not in root:
        layers = list(root["layers"].keys()) if "layers" in root else []
        what = "has no count matrix X" if layer is None else f"has no layer {layer!r}"
        raise KeyError(f"{str(path)!r} {what}; layers: {layers}.")
    read_elem, _, _ = _anndata_io()
    obs = read_elem(root["obs"])
    var = read_elem(root["var"])
    spec = ReaderSpec(fmt, str(path.resolve()), key)
    return GeneSource(_element_array(root[key]), location=spec), obs, var


# --------------------------------------------------------------------------- prepare


def _parse_bytes(value):
    if isinstance(value, (int, np.integer)):
        return int(value)
    text = str(value).strip().upper().replace("IB", "B")
    units = {"KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(float(text))


def prepare(source_path, out_path, layer=None, max_memory="2GB", genes_per_chunk=None,
            report=None):
    """Write a gene-major copy of an AnnData file, once: counts as CSC, ``obs``, ``var``.

    Column (gene) access on a cell-major matrix (CSR, or a row-major dense array) reads
    the whole matrix for every gene chunk; on the CSC copy a gene chunk reads only its
    own genes. Nothing is densified; at most ``max_memory`` of nonzeros is held at once
    (a cell-major input is read once per ``max_memory`` of its nonzeros).

    Parameters
    ----------
    source_path : str or PathLike
        ``.h5ad`` file or ``.zarr`` store.
    out_path : str or PathLike
        ``.h5ad`` (HDF5, CSC) or ``.zarr`` (CSC, arrays chunked along the genes); must not
        exist yet.
    layer : str, optional
        Take the counts from ``layers[layer]`` instead of ``X``; they become ``X``.
    max_memory : int or str
        Bytes of nonzeros held at once, e.g. ``"2GB"``.
    genes_per_chunk : int, optional
        Genes per written block for a gene-major input (default: about 2**24 nonzeros).
    report : callable, optional
        Called with progress messages.

    Returns
    -------
    pathlib.Path
        ``out_path``.
    """
    import anndata

    report = report or (lambda message: None)
    out = Path(os.fspath(out_path))
    if out.exists():
        raise FileExistsError(f"output {str(out)!r} exists already; remove it or choose another.")
    if not out.resolve().parent.is_dir():
        raise FileNotFoundError(f"output folder {str(out.resolve().parent)!r} does not exist.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CellMajorWarning)
        source, obs, var = open_path(source_path, layer)
    n_cells, n_genes = source.shape
    budget = _parse_bytes(max_memory)
    out_format = path_format(out) if out.suffix in (".zarr", ".h5ad") else "h5ad"
    report(f"{n_cells} cells x {n_genes} genes, stored {source.format}; writing CSC to {out}")

    blocks = _gene_major_blocks(source, budget, genes_per_chunk, report)
    meta = anndata.AnnData(obs=obs, var=var)
    if out_format == "zarr":
        with warnings.catch_warnings():  # anndata's notice about its default zarr format
            warnings.filterwarnings("ignore", message=".*zarr v2", category=UserWarning)
            meta.write_zarr(str(out))
        import zarr

        try:
            root = zarr.open_group(str(out), mode="a", use_consolidated=False)
        except TypeError:  # pragma: no cover - zarr 2
            root = zarr.open_group(str(out), mode="a")
    else:
        meta.write_h5ad(str(out))
        import h5py

        root = h5py.File(str(out), "a")
    try:
        _write_csc(root, blocks, n_cells, n_genes, out_format)
    except BaseException:
        if out_format == "h5ad":
            root.close()
        raise
    if out_format == "h5ad":
        root.close()
    else:
        import zarr

        zarr.consolidate_metadata(str(out))  # as anndata writes it; read_zarr expects it
    report(f"wrote {out}")
    return out


def _write_csc(root, blocks, n_cells, n_genes, out_format):
    _, sparse_dataset, write_elem = _anndata_io()
    chunks = (2**20,)
    written = 0
    dataset = None
    for block in blocks:
        block = scipy.sparse.csc_matrix(block)
        block.sort_indices()
        if dataset is None:
            kwargs = {"chunks": chunks}
            try:
                write_elem(root, "X", block, dataset_kwargs={**kwargs, "indptr_dtype": np.int64})
            except TypeError:  # pragma: no cover - anndata without indptr_dtype
                write_elem(root, "X", block, dataset_kwargs=kwargs)
            dataset = sparse_dataset(root["X"])
        else:
            dataset.append(block)
        written += block.shape[1]
    if dataset is None or written != n_genes:  # pragma: no cover - defensive
        raise RuntimeError(f"prepare wrote {written} of {n_genes} genes.")


def _gene_major_blocks(source, budget, genes_per_chunk, report):
    """Yield CSC blocks of consecutive genes covering all genes, within ``budget`` bytes."""
    n_cells, n_genes = source.shape
    bytes_per_nonzero = 12  # float64 data + int32 index
    if source.format in ("csc", "dask"):
        step = genes_per_chunk or max(1, 2**24 // max(1, n_cells // 10))
        for start in range(0, n_genes, step):
            stop = min(start + step, n_genes)
            yield scipy.sparse.csc_matrix(source.read_raw(start, stop))
        return
    # Cell-major (CSR or row-major dense): count nonzeros per gene, then one pass over the
    # cells per group of genes whose nonzeros fit the budget.
    row_step = max(1, 2**24 // max(1, n_genes))
    nnz = np.zeros(n_genes, dtype=np.int64)
    for r0 in range(0, n_cells, row_step):
        rows = _read_rows(source, r0, min(r0 + row_step, n_cells))
        nnz += np.bincount(rows.indices, minlength=n_genes)
    groups = []
    start = 0
    while start < n_genes:
        stop = start + 1
        total = nnz[start]
        while stop < n_genes and (total + nnz[stop]) * bytes_per_nonzero <= budget:
            total += nnz[stop]
            stop += 1
        groups.append((start, stop))
        start = stop
    report(f"{int(nnz.sum())} nonzeros; {len(groups)} pass(es) over the cells")
    for start, stop in groups:
        pieces = []
        for r0 in range(0, n_cells, row_step):
            rows = _read_rows(source, r0, min(r0 + row_step, n_cells))
            pieces.append(rows[:, start:stop].tocsc())
        yield scipy.sparse.vstack(pieces, format="csc")


def _read_rows(source, r0, r1):
    """Rows ``r0:r1`` of a cell-major source as CSR."""
    block = source.array[r0:r1]
    if scipy.sparse.issparse(block):
        return scipy.sparse.csr_matrix(block)
    return scipy.sparse.csr_matrix(np.asarray(block))
