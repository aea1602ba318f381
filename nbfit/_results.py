"""Fitted results without the data: saving, loading, AnnData export.

:func:`save` writes everything a fit produced (coefficients, designs, constraints, size
factors, log-likelihoods, derivatives, inverse information, statuses, settings, versions)
to one ``.npz`` file holding plain arrays and a JSON header (no pickle). :func:`load`
returns a :class:`Results`: a lightweight, read-only counterpart of the
:class:`~nbfit.Estimator` with the same attributes and the same inference methods
(``wald``, ``lrt``), but without the counts and without ``train``.
"""

import functools
import json
from importlib import metadata

import numpy as np
import pandas as pd

from nbfit import inference
from nbfit._likelihood import LOG_R_CAP
from nbfit._status import STATUS_NAMES, Status

FORMAT = "nbfit-results"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------- settings


def _describe(value):
    """A JSON- and h5ad-friendly description of an option value."""
    if value is None:
        return "none"
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.ndarray, pd.Series, pd.DataFrame)) or hasattr(value, "shape"):
        return f"array{tuple(np.shape(value))}"
    if callable(value):
        return f"callable {getattr(value, '__qualname__', type(value).__name__)}"
    try:
        return json.dumps(value, default=str, sort_keys=True)
    except (TypeError, ValueError):
        return repr(value)


def describe_fit(formula_loc, formula_scale, as_numeric, size_factors, constraints_loc,
                 constraints_scale, training_strategy, quick_scale, init_a, init_b, dmat_loc,
                 dmat_scale, batch_size, dtype, noise_model):
    """Settings of a fit as a flat dict of str / int / float / bool (h5ad-serialisable)."""
    return {
        "formula_loc": _describe(formula_loc if dmat_loc is None else None),
        "formula_scale": _describe(formula_scale if dmat_scale is None else None),
        "dmat_loc": _describe(dmat_loc),
        "dmat_scale": _describe(dmat_scale),
        "as_numeric": json.dumps([str(c) for c in as_numeric]),
        "size_factors": _describe(size_factors),
        "constraints_loc": _describe(constraints_loc),
        "constraints_scale": _describe(constraints_scale),
        "training_strategy": _describe(training_strategy),
        "quick_scale": bool(quick_scale),
        "init_a": _describe(init_a),
        "init_b": _describe(init_b),
        "batch_size": int(batch_size),
        "dtype": str(dtype),
        "noise_model": str(noise_model),
    }


def versions():
    """Versions of nbfit and the numerical stack, as a dict of str."""
    return dict(_installed_versions())


@functools.cache
def _installed_versions():
    """:func:`versions`, read once per process (package metadata takes ~30 ms to read)."""
    import jax

    import nbfit

    found = {"nbfit": nbfit.__version__, "jax": jax.__version__, "numpy": np.__version__}
    for package in ("jaxlib", "scipy", "pandas", "anndata"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


# --------------------------------------------------------------------------- gathering


def _collect(result):
    """(arrays, header) of an Estimator or Results."""
    model = result.model
    size_factors = model.size_factors
    means = inference.gene_means(result)
    arrays = {
        "a_var": np.asarray(result.a_var, np.float64),
        "b_var": np.asarray(result.b_var, np.float64),
        "design_loc": np.asarray(model.design_loc, np.float64),
        "design_scale": np.asarray(model.design_scale, np.float64),
        "constraints_loc": np.asarray(model.constraints_loc, np.float64),
        "constraints_scale": np.asarray(model.constraints_scale, np.float64),
        "log_likelihood": np.asarray(result.log_likelihood, np.float64),
        "jacobian": np.asarray(result.jacobian, np.float64),
        "hessian": np.asarray(result.hessian, np.float64),
        "fisher_inv": np.asarray(result.fisher_inv, np.float64),
        "status": np.asarray(result.status).astype(str),
        "converged": np.asarray(result.converged, bool),
        "n_steps": np.asarray(result.n_steps, np.int64),
        "gene_names": np.asarray(result.gene_names).astype(str),
    }
    if size_factors is not None:
        arrays["size_factors"] = np.asarray(size_factors, np.float64)
    if means is not None:
        arrays["gene_mean"] = means
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "design_loc_names": [str(n) for n in model.design_loc_names],
        "design_scale_names": [str(n) for n in model.design_scale_names],
        "reduced_loc_names": [str(n) for n in result.reduced_loc_names],
        "reduced_scale_names": [str(n) for n in result.reduced_scale_names],
        "fit_settings": dict(getattr(result, "fit_settings", None) or {}),
        "versions": dict(getattr(result, "versions", None) or versions()),
        "dtype": str(getattr(result, "dtype", "float64")),
    }
    return arrays, header


def save(result, path):
    """Write a fit's results to ``path`` (an ``.npz`` file; no pickle). See :func:`load`."""
    arrays, header = _collect(result)
    arrays["header"] = np.array(json.dumps(header))
    with open(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)
    return path


def load(path):
    """Load results written by ``Estimator.save`` / :func:`save`, without refitting.

    Returns
    -------
    Results
    """
    with np.load(path, allow_pickle=False) as stored:
        arrays = {name: stored[name] for name in stored.files}
    if "header" not in arrays:
        raise ValueError(f"{path} is not an nbfit results file (no header).")
    header = json.loads(str(arrays.pop("header")))
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not an nbfit results file (format {header.get('format')!r}).")
    if header.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written by a newer nbfit (format version {header['format_version']}); "
            "upgrade nbfit to read it."
        )
    return Results(arrays, header)


# --------------------------------------------------------------------------- Results


class ResultsModel:
    """The fitted model of a :class:`Results`: same attributes as :class:`nbfit.Model`."""

    def __init__(self, results):
        self._results = results
        arrays = results._arrays
        self.design_loc = arrays["design_loc"]
        self.design_scale = arrays["design_scale"]
        self.design_loc_names = list(results._header["design_loc_names"])
        self.design_scale_names = list(results._header["design_scale_names"])
        self.constraints_loc = arrays["constraints_loc"]
        self.constraints_scale = arrays["constraints_scale"]
        self.size_factors = arrays.get("size_factors")

    @property
    def a(self):
        return self.constraints_loc @ self._results.a_var

    @property
    def b(self):
        return self.constraints_scale @ self._results.b_var

    @property
    def eta_loc(self):
        offset = 0.0 if self.size_factors is None else np.log(self.size_factors)[:, None]
        return self.design_loc @ self.a + offset

    @property
    def eta_scale(self):
        return self.design_scale @ self.b

    @property
    def mu(self):
        return np.exp(self.eta_loc)

    @property
    def phi(self):
        return np.exp(np.minimum(self.eta_scale, LOG_R_CAP))

    location = mu
    scale = phi

    @property
    def a_se(self):
        return inference.standard_errors(self._results, "loc", full=True)

    @property
    def b_se(self):
        return inference.standard_errors(self._results, "scale", full=True)

    @property
    def log_likelihood(self):
        return self._results.log_likelihood


class Results:
    """Results of a fit, loaded with :func:`nbfit.load` (no counts, no refitting).

    Exposes the attributes of :class:`nbfit.Estimator` that do not need the counts:
    ``a_var``, ``b_var``, ``model`` (``a``, ``b``, ``mu``, ``phi``, designs, constraints,
    size factors, ``a_se``), ``log_likelihood``, ``jacobian``, ``hessian``,
    ``fisher_inv``, ``fisher_inv_full``, ``a_se``, ``b_se``, ``status``, ``converged``,
    ``n_steps``, ``gene_names``, ``reduced_loc_names``, ``to_dataframe()``,
    ``convergence_summary()``, and the inference methods ``wald()`` and ``lrt()``, plus
    ``to_anndata()`` and ``save()``. ``gene_mean`` holds each gene's mean count,
    ``fit_settings`` and ``versions`` how the fit was made.
    """

    def __init__(self, arrays, header):
        self._arrays = arrays
        self._header = header
        self.gene_names = pd.Index(arrays["gene_names"].astype(str))
        self.reduced_loc_names = list(header["reduced_loc_names"])
        self.reduced_scale_names = list(header["reduced_scale_names"])
        self.fit_settings = dict(header.get("fit_settings", {}))
        self.versions = dict(header.get("versions", {}))
        self.dtype = header.get("dtype", "float64")
        self.gene_mean = arrays.get("gene_mean")
        self.sample_description = None
        self.model = ResultsModel(self)

    def __repr__(self):
        return (
            f"<nbfit.Results: {len(self.gene_names)} genes, loc {self.model.design_loc_names}, "
            f"scale {self.model.design_scale_names}>"
        )

    @property
    def a_var(self):
        return self._arrays["a_var"].copy()

    @property
    def b_var(self):
        return self._arrays["b_var"].copy()

    @property
    def log_likelihood(self):
        return self._arrays["log_likelihood"].copy()

    @property
    def loss(self):
        return -float(np.sum(self.log_likelihood))

    @property
    def jacobian(self):
        return self._arrays["jacobian"].copy()

    @property
    def hessian(self):
        return self._arrays["hessian"].copy()

    @property
    def fisher_inv(self):
        return self._arrays["fisher_inv"].copy()

    @property
    def fisher_inv_full(self):
        import scipy.linalg

        model = self.model
        constraints = scipy.linalg.block_diag(model.constraints_loc, model.constraints_scale)
        return np.einsum("ij,gjk,lk->gil", constraints, self.fisher_inv, constraints)

    @property
    def a_se(self):
        return inference.standard_errors(self, "loc", full=False)

    @property
    def b_se(self):
        return inference.standard_errors(self, "scale", full=False)

    @property
    def status(self):
        return self._arrays["status"].astype(object)

    @property
    def converged(self):
        return self._arrays["converged"].copy()

    @property
    def n_steps(self):
        return self._arrays["n_steps"].copy()

    def to_dataframe(self):
        """Per-gene results (same columns as :meth:`nbfit.Estimator.to_dataframe`)."""
        return results_frame(self)

    def convergence_summary(self):
        return status_summary(self.status)

    def wald(self, coef=None, term=None, **options):
        """Wald test; see :func:`nbfit.inference.wald`."""
        return inference.wald(self, coef=coef, term=term, **options)

    def lrt(self, reduced):
        """Likelihood-ratio test against a nested ``reduced`` fit (:func:`nbfit.inference.lrt`)."""
        return inference.lrt(self, reduced)

    def to_anndata(self, adata, key="nbfit", test=None):
        """Write the results into ``adata``; see :func:`to_anndata`."""
        return to_anndata(self, adata, key=key, test=test)

    def save(self, path):
        """Write the results to ``path`` (``.npz``); reload with :func:`nbfit.load`."""
        return save(self, path)


def results_frame(result):
    """Per-gene table: full coefficients, ll, status, converged, n_steps (index: gene)."""
    columns = {}
    for name, row in zip(result.model.design_loc_names, result.model.a, strict=True):
        columns[f"a_{name}"] = row
    for name, row in zip(result.model.design_scale_names, result.model.b, strict=True):
        columns[f"b_{name}"] = row
    columns["ll"] = result.log_likelihood
    columns["status"] = pd.Categorical(result.status, categories=STATUS_NAMES)
    columns["converged"] = result.converged
    columns["n_steps"] = result.n_steps
    frame = pd.DataFrame(columns, index=pd.Index(result.gene_names, name="gene"))
    return frame


def status_summary(status):
    """Number and share of genes per status, with what each status means."""
    status = pd.Series(pd.Categorical(status, categories=STATUS_NAMES))
    counts = status.value_counts().reindex(list(STATUS_NAMES))
    counts = counts[counts > 0]
    return pd.DataFrame(
        {
            "n_genes": counts.values,
            "share": counts.values / len(status),
            "meaning": [Status[name].value for name in counts.index],
        },
        index=pd.Index(counts.index, name="status"),
    )


# --------------------------------------------------------------------------- AnnData


#: Columns of a test table written to ``var`` by :func:`to_anndata`.
TEST_COLUMNS = ("estimate", "se", "log2fc", "z", "statistic", "df", "pval", "qval")


def to_anndata(result, adata, key="nbfit", test=None):
    """Write a fit's results into ``adata`` (in place) and return it.

    Parameters
    ----------
    result : Estimator or Results
    adata : AnnData
        Its genes (``var_names``) must be the fitted genes, in the same order.
    key : str
        Prefix of every entry written.
    test : DataFrame, optional
        A table of :func:`nbfit.inference.wald` / :func:`~nbfit.inference.lrt`: its
        columns ``estimate, se, log2fc, z, statistic, df, pval, qval`` (those present) go to
        ``var[f"{key}_test_<column>"]``, what was tested to ``uns[key]["test"]``.

    Writes
    ------
    varm : ``{key}_a`` (n_genes, n_loc) and ``{key}_b`` (n_genes, n_scale) the full
        coefficients, ``{key}_a_se`` / ``{key}_b_se`` their standard errors,
        ``{key}_fisher_inv`` (n_genes, P, P) the inverse information of the free
        parameters.
    var : ``{key}_ll``, ``{key}_status`` (str), ``{key}_converged``, ``{key}_n_steps``,
        ``{key}_mean`` (mean count, when known).
    uns[key] : dict of formulas and fit settings, ``design_loc_names``,
        ``design_scale_names``, ``reduced_loc_names``, ``reduced_scale_names``,
        ``constraints_loc`` / ``constraints_scale`` arrays and ``versions``
        (nbfit, jax, numpy, ...): only types that round-trip through ``.h5ad``.
    """
    genes = np.asarray(result.gene_names).astype(str)
    if adata.n_vars != len(genes):
        raise ValueError(f"adata has {adata.n_vars} genes but the fit has {len(genes)}.")
    if not np.array_equal(np.asarray(adata.var_names).astype(str), genes):
        raise ValueError("adata.var_names are not the fitted genes (in the same order).")
    model = result.model
    adata.varm[f"{key}_a"] = np.asarray(model.a, np.float64).T
    adata.varm[f"{key}_b"] = np.asarray(model.b, np.float64).T
    adata.varm[f"{key}_a_se"] = np.asarray(model.a_se, np.float64).T
    adata.varm[f"{key}_b_se"] = np.asarray(model.b_se, np.float64).T
    adata.varm[f"{key}_fisher_inv"] = np.asarray(result.fisher_inv, np.float64)
    adata.var[f"{key}_ll"] = np.asarray(result.log_likelihood, np.float64)
    adata.var[f"{key}_status"] = np.asarray(result.status).astype(str).astype(object)
    adata.var[f"{key}_converged"] = np.asarray(result.converged, bool)
    adata.var[f"{key}_n_steps"] = np.asarray(result.n_steps, np.int64)
    means = inference.gene_means(result)
    if means is not None:
        adata.var[f"{key}_mean"] = means
    settings = dict(getattr(result, "fit_settings", None) or {})
    info = {
        **{name: value for name, value in settings.items()},
        "design_loc_names": [str(n) for n in model.design_loc_names],
        "design_scale_names": [str(n) for n in model.design_scale_names],
        "reduced_loc_names": [str(n) for n in result.reduced_loc_names],
        "reduced_scale_names": [str(n) for n in result.reduced_scale_names],
        "constraints_loc": np.asarray(model.constraints_loc, np.float64),
        "constraints_scale": np.asarray(model.constraints_scale, np.float64),
        "dtype": str(getattr(result, "dtype", "float64")),
        "versions": dict(getattr(result, "versions", None) or versions()),
    }
    if test is not None:
        written = [c for c in TEST_COLUMNS if c in test.columns]
        same = len(test) == len(genes)
        if same and "gene" in test:
            same = np.array_equal(test["gene"].astype(str), genes)
        if not same:
            raise ValueError("the test table is not over the fitted genes (in the same order).")
        for column in written:
            adata.var[f"{key}_test_{column}"] = np.asarray(test[column], np.float64)
        for label in ("coef", "term"):
            if label in test.columns:
                info["test"] = f"wald {label}={test[label].iloc[0]}"
        if "ll_reduced" in test.columns:
            info["test"] = "lrt"
    adata.uns[key] = info
    return adata
