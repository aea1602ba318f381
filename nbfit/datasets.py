"""Example data sets bundled with nbfit."""

from importlib import resources

import anndata


def pbmc_logumi() -> anndata.AnnData:
    """Load the bundled PBMC UMI counts (283 cells x 910 genes).

    Returns
    -------
    anndata.AnnData
        ``X`` holds the raw UMI counts (cells x genes, ``scipy.sparse`` CSR, float64,
        integer valued). ``obs`` has ``total_umi`` (total UMI per cell over all 914 genes
        of the original data) and ``log_umi`` (``log10(total_umi)``), both computed before
        gene filtering. ``var`` has ``n_cells_detected``.

    Notes
    -----
    Source: the 10x Genomics public PBMC UMI counts as shipped in the R package
    sctransform (``sctransform::pbmc``, sctransform 0.3.5, 914 genes x 283 cells).
    Genes detected (count > 0) in fewer than 5 cells are dropped, leaving 910 of 914.

    Licence: the counts come from a public 10x Genomics data set as redistributed by
    sctransform under the GPL-3 licence.

    Examples
    --------
    >>> from nbfit.datasets import pbmc_logumi
    >>> adata = pbmc_logumi()
    >>> adata.shape
    (283, 910)
    """
    ref = resources.files("nbfit") / "data" / "pbmc_logumi.h5ad"
    with resources.as_file(ref) as path:
        return anndata.read_h5ad(path)
