"""``nbfit.fit``: the diffxpy ``fit.model`` API on top of the estimator."""

import numpy as np

from nbfit import _progress
from nbfit._design import design_from_formula, design_from_matrix, normalise_as_numeric
from nbfit._estimator import DTYPES, Estimator
from nbfit._init import resolve_init
from nbfit._input import read_counts, read_size_factors
from nbfit._results import describe_fit, versions
from nbfit._strategy import check_train_arguments, make_solver, resolve_strategy
from nbfit.constraints import Constrained, build_constrained, check_constrained, constraint_matrix_any

NOISE_MODELS = ("nb",)


def fit(
    data,
    formula_loc=None,
    formula_scale="~1",
    as_numeric=(),
    init_a="AUTO",
    init_b="AUTO",
    gene_names=None,
    sample_description=None,
    dmat_loc=None,
    dmat_scale=None,
    constraints_loc=None,
    constraints_scale=None,
    noise_model="nb",
    size_factors=None,
    batch_size=None,
    training_strategy="AUTO",
    quick_scale=False,
    dtype="float64",
    client=None,
    retries=2,
    progress=None,
    **kwargs,
):
    """Fit a negative-binomial GLM to every gene by maximum likelihood.

    For gene j and cell i: ``y_ij ~ NB(mu_ij, r_ij)`` with
    ``log mu_ij = log sf_i + X_loc[i] @ a_j`` and ``log r_ij = X_scale[i] @ b_j``
    (``Var = mu + mu^2 / r``).

    Parameters
    ----------
    data : AnnData, anndata Raw, ndarray, scipy.sparse or dask array, shape (n_cells, n_genes)
        Raw counts. An AnnData brings its ``obs`` (sample description) and ``var_names``.
        Backed or lazy AnnData, dask arrays and paths of ``.h5ad`` files / ``.zarr`` stores
        are read gene chunk by gene chunk (never whole); CSR is converted to CSC once.
    formula_loc : str
        Location model, e.g. ``"~1+condition+batch"``; not needed with ``dmat_loc``.
    formula_scale : str
        Scale (dispersion) model; default ``"~1"`` (one dispersion per gene).
    as_numeric : str or sequence of str
        Sample-description columns kept numeric; all other columns used by a formula are
        categorical (treatment coding, the first sorted level is the reference).
    init_a, init_b : {"AUTO", "standard", "closed_form"} or ndarray
        Starting values (any case). Arrays have shape (n_coefficients, n_genes).
    gene_names : sequence of str, optional
    sample_description : DataFrame, optional
        One row per cell; overrides ``data.obs``.
    dmat_loc, dmat_scale : DataFrame, formulaic ModelMatrix, ``(array, names)`` or array
        Pre-built designs; override the formulas.
    constraints_loc, constraints_scale : dict, str, list of str or ndarray, optional
        Equality constraints (see :mod:`nbfit.constraints`): a dict
        ``{"batch": "condition"}`` (batch levels sum to zero within each condition; the
        factor is then fully dummy coded), equations over design column names, or an
        array (``H`` with full = H @ reduced, or diffxpy's -1/+1 rows).
    noise_model : {"nb"}
    size_factors : ndarray, Series or str, optional
        Multiplicative per-cell factors (an offset ``log sf`` on the location), or the name
        of a sample-description column holding them.
    batch_size : int, optional
        Genes per compiled chunk. Bounds memory; never changes results. Default: equal
        chunks of at most 2**22 counts (genes x cells) each, and on CPUs of at most 128 genes
        per device.
    training_strategy : str, callable or list of dict
        "AUTO"/"DEFAULT"/"NEWTON"/"NR" (joint Newton), "EXACT" (Newton, tighter
        tolerance), "IRLS", "QUICK" (IRLS, loose tolerance), "LBFGS"; or
        ``callable(estimator)``; or a list of keyword dicts for :meth:`Estimator.train`.
    quick_scale : bool
        Fit the scale once given the location instead of jointly (faster, approximate).
    dtype : {"float64", "float32"}
    client : dask.distributed.Client or concurrent.futures.Executor, optional
        Fit one gene chunk per task there (:mod:`nbfit.distributed`); the result is
        identical to the local fit. On-disk counts are sent as reader specs (file and
        gene range), in-memory counts chunk by chunk.
    retries : int
        With ``client``: how often a failed task is retried; a chunk that still fails
        raises :class:`nbfit.distributed.ChunkError` naming its genes.
    progress : bool, optional
        Progress bar over gene chunks and solver stages; default (None): on in a terminal
        or notebook, off otherwise (pipes, CI).
    **kwargs
        ``allow_noninteger=True`` accepts non-integer counts.

    Returns
    -------
    Estimator
        The trained estimator; ``estimator.model`` holds the fitted model.
    """
    allow_noninteger = bool(kwargs.pop("allow_noninteger", False))
    if kwargs:
        raise TypeError(f"fit() got unknown arguments {sorted(kwargs)}.")
    if noise_model != "nb":
        raise ValueError(f"noise_model={noise_model!r} is not supported; supported: {list(NOISE_MODELS)}.")
    if isinstance(dtype, (type, np.dtype)) and np.dtype(dtype).name in DTYPES:
        dtype = np.dtype(dtype).name  # np.float32, jnp.float32, np.dtype("float32")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {list(DTYPES)}.")
    strategy = resolve_strategy(training_strategy, quick_scale)
    _check_stages(training_strategy)

    counts = read_counts(data, gene_names, sample_description, allow_noninteger)
    obs = counts.sample_description
    as_numeric = normalise_as_numeric(as_numeric)
    if dmat_loc is None and formula_loc is None:
        raise ValueError("give a location model: formula_loc (e.g. '~1+condition') or dmat_loc.")
    loc = _design(obs, counts.n_cells, formula_loc, dmat_loc, constraints_loc, as_numeric, "loc")
    scale = _design(obs, counts.n_cells, formula_scale, dmat_scale, constraints_scale, as_numeric, "scale")
    n_genes = counts.n_genes
    init_a = resolve_init(init_a, "init_a", (len(loc.reduced_names), n_genes))
    init_b = resolve_init(init_b, "init_b", (len(scale.reduced_names), n_genes))
    if client is not None:  # one task per gene chunk on a cluster or an executor
        from nbfit.distributed import fit_on_client

        estimator = fit_on_client(
            client, counts, loc, scale, size_factors=read_size_factors(size_factors, obs),
            init_a=init_a, init_b=init_b, batch_size=batch_size, dtype=dtype,
            training_strategy=training_strategy, quick_scale=quick_scale,
            allow_noninteger=allow_noninteger, retries=retries, progress=progress,
        )
    else:
        estimator = Estimator(
            counts,
            loc,
            scale,
            size_factors=read_size_factors(size_factors, obs),
            init_a=init_a,
            init_b=init_b,
            batch_size=batch_size,
            dtype=dtype,
        )
        with _progress.track(estimator, progress, training_strategy, quick_scale):
            strategy(estimator)
    # Recorded for to_anndata / save (issue 6): how the fit was made, with which versions.
    estimator.fit_settings = describe_fit(
        formula_loc, formula_scale, as_numeric, size_factors, constraints_loc, constraints_scale,
        training_strategy, quick_scale, init_a, init_b, dmat_loc, dmat_scale,
        estimator.batch_size, dtype, noise_model,
    )
    estimator.versions = versions()
    return estimator


def _design(obs, n_cells, formula, dmat, constraints, as_numeric, which):
    """:class:`Constrained` design of one model from a formula or matrix and constraints."""
    if constraints is None:
        if dmat is not None:
            design = design_from_matrix(dmat, n_cells, which)
        else:
            design = design_from_formula(formula, obs, as_numeric, which)
        return Constrained(design, np.eye(len(design.names)), list(design.names))
    if dmat is not None:
        design = design_from_matrix(dmat, n_cells, which, check=False)
        matrix, reduced = constraint_matrix_any(design.names, constraints)
        return check_constrained(Constrained(design, matrix, reduced), which)
    return build_constrained(obs, formula, constraints, as_numeric, which)


def _check_stages(training_strategy):
    """Validate list-of-dict strategies before anything is compiled."""
    if isinstance(training_strategy, (list, tuple)):
        for stage in training_strategy:
            check_train_arguments(Estimator.train, stage)
            make_solver(stage.get("method", "newton"))
