"""``de.test``: diffxpy's differential-expression tests on nbfit fits.

``import nbfit.api as de; de.test.wald(adata, formula_loc="~1+condition",
factor_loc_totest="condition").summary()`` returns the table diffxpy returns (``gene``,
``pval``, ``qval``, ``log2fc``, ``mean``, ``zero_mean``, ``grad``, ``coef_mle``,
``coef_sd``, ``ll``), computed by :mod:`nbfit.inference` with nbfit's safeguards: genes that
did not converge, have no finite MLE or a singular information matrix get NaN p-values
(see the ``status`` column) instead of diffxpy's spurious p ~ 0.
"""

import warnings

import numpy as np
import pandas as pd

from nbfit import inference
from nbfit._fit import fit

__all__ = ["DifferentialExpressionTestLRT", "DifferentialExpressionTestWald", "lrt", "wald"]


def _fit_options(kwargs, backend, train_args):
    """Drop diffxpy-only options (with a warning where they would have changed something)."""
    if train_args:
        warnings.warn(
            f"train_args={train_args!r} is ignored by nbfit; use training_strategy (a list of "
            "dicts for Estimator.train) instead.",
            stacklevel=3,
        )
    del backend  # nbfit always runs on JAX; diffxpy's backend names are accepted and ignored.
    return kwargs


class _DifferentialExpressionTest:
    """What both tests share: the per-gene table and diffxpy's accessors."""

    _table: pd.DataFrame

    @property
    def gene_ids(self):
        return self._table["gene"].to_numpy()

    @property
    def pval(self):
        return self._table["pval"].to_numpy()

    @property
    def qval(self):
        return self._table["qval"].to_numpy()

    @property
    def mean(self):
        return self._table["mean"].to_numpy()

    def log_fold_change(self, base=np.e, **kwargs):
        """Log fold change per gene to ``base`` (natural log by default)."""
        return self._table["log2fc"].to_numpy() * np.log(2.0) / np.log(base)

    def log2_fold_change(self, **kwargs):
        return self._table["log2fc"].to_numpy()

    def log10_fold_change(self, **kwargs):
        return self.log_fold_change(base=10.0)

    def summary(self, qval_thres=None, fc_upper_thres=None, fc_lower_thres=None, mean_thres=None,
                **kwargs):
        """Per-gene results table, optionally filtered as diffxpy filters it.

        Parameters
        ----------
        qval_thres : float, optional
            Keep genes with ``qval <= qval_thres`` (NaN q-values are dropped).
        fc_upper_thres, fc_lower_thres : float, optional
            Keep genes with fold change (not log) ``>= fc_upper_thres`` or
            ``<= fc_lower_thres`` (give at most one).
        mean_thres : float, optional
            Keep genes with mean count ``>= mean_thres``.
        """
        if fc_upper_thres is not None and fc_lower_thres is not None:
            raise ValueError("give at most one of fc_upper_thres and fc_lower_thres.")
        res = self._table.copy()
        if qval_thres is not None:
            res = res[res["qval"].notna() & (res["qval"] <= qval_thres)]
        if fc_upper_thres is not None:
            res = res[res["log2fc"] >= np.log2(fc_upper_thres)]
        if fc_lower_thres is not None:
            res = res[res["log2fc"] <= np.log2(fc_lower_thres)]
        if mean_thres is not None:
            res = res[res["mean"] >= mean_thres]
        return res

    def plot_volcano(self, **kwargs):
        """Volcano plot of the test; see :func:`nbfit.plot.volcano`."""
        from nbfit import plot

        return plot.volcano(self._table, **kwargs)


def _base_columns(result, pval, qval, log2fc):
    means = inference.gene_means(result)
    if means is None:
        means = np.full(len(result.gene_names), np.nan)
    jacobian = np.asarray(result.jacobian)
    return {
        "gene": np.asarray(result.gene_names).astype(str),
        "pval": pval,
        "qval": qval,
        "log2fc": log2fc,
        "mean": means,
        "zero_mean": means == 0,
        "grad": np.max(np.abs(jacobian), axis=1) if jacobian.shape[1] else np.zeros(len(means)),
    }


class DifferentialExpressionTestWald(_DifferentialExpressionTest):
    """Result of :func:`wald`.

    Attributes
    ----------
    model_estim : Estimator
        The fit.
    coef_loc_totest : list of str
        The tested location coefficients (full design column names).
    theta_mle, theta_sd : ndarray
        Estimates and standard errors of the tested coefficients, shape (n_genes,) for one
        coefficient, else (n_coefficients, n_genes).
    """

    def __init__(self, model_estim, coef_loc_totest):
        self.model_estim = model_estim
        self.coef_loc_totest = list(coef_loc_totest)
        test = inference.wald(model_estim, coef=self.coef_loc_totest)
        self.test_table = test
        if len(self.coef_loc_totest) == 1:
            self.theta_mle = test["estimate"].to_numpy()
            self.theta_sd = test["se"].to_numpy()
        else:
            tested = self.coef_loc_totest
            self.theta_mle = np.stack([test[f"estimate_{c}"].to_numpy() for c in tested])
            self.theta_sd = np.stack([test[f"se_{c}"].to_numpy() for c in tested])
        columns = _base_columns(model_estim, test["pval"].to_numpy(), test["qval"].to_numpy(),
                                test["log2fc"].to_numpy())
        columns.update(
            {
                "coef_mle": test["estimate"].to_numpy(),
                "coef_sd": test["se"].to_numpy(),
                "ll": test["ll"].to_numpy(),
                "df": test["df"].to_numpy(),
                "statistic": test["statistic"].to_numpy(),
                "status": test["status"].to_numpy(),
            }
        )
        self._table = pd.DataFrame(columns)

    @property
    def log_likelihood(self):
        return self._table["ll"].to_numpy()


class DifferentialExpressionTestLRT(_DifferentialExpressionTest):
    """Result of :func:`lrt`.

    ``log2fc``, ``coef_mle`` and ``coef_sd`` are those of the full-model location
    coefficient, among the columns the reduced design does not have, with the largest
    absolute value (NaN when the designs share all column names).

    Attributes
    ----------
    full_estim, reduced_estim : Estimator
    """

    def __init__(self, full_estim, reduced_estim):
        self.full_estim = full_estim
        self.reduced_estim = reduced_estim
        test = inference.lrt(full_estim, reduced_estim)
        self.test_table = test
        extra = [
            c for c in full_estim.model.design_loc_names
            if c not in set(reduced_estim.model.design_loc_names)
        ]
        self.coef_loc_totest = extra
        n_genes = len(test)
        coef_mle = coef_sd = np.full(n_genes, np.nan)
        if extra:
            wald = inference.wald(full_estim, coef=extra)
            coef_mle, coef_sd = wald["estimate"].to_numpy(), wald["se"].to_numpy()
        columns = _base_columns(full_estim, test["pval"].to_numpy(), test["qval"].to_numpy(),
                                coef_mle / inference.LN2)
        columns.update(
            {
                "coef_mle": coef_mle,
                "coef_sd": coef_sd,
                "ll": test["ll_full"].to_numpy(),
                "ll_reduced": test["ll_reduced"].to_numpy(),
                "df": test["df"].to_numpy(),
                "statistic": test["statistic"].to_numpy(),
                "status": test["status"].to_numpy(),
            }
        )
        self._table = pd.DataFrame(columns)


def _coefficients_to_test(names, factor_loc_totest, coef_to_test):
    """diffxpy's rules: a factor's columns, some levels of it, or explicit columns."""
    if factor_loc_totest is None and coef_to_test is None:
        raise ValueError("give factor_loc_totest (a factor, e.g. 'condition') or coef_to_test.")
    coefs = None if coef_to_test is None else (
        [coef_to_test] if isinstance(coef_to_test, str) else list(coef_to_test)
    )
    if factor_loc_totest is None:
        indices, _ = inference.resolve_coefficients(names, coef=coefs)
        return [names[k] for k in indices]
    indices, _ = inference.resolve_coefficients(names, term=factor_loc_totest)
    of_factor = [names[k] for k in indices]
    if coefs is None:
        return of_factor
    chosen = []
    for c in coefs:
        candidates = [c, f"{factor_loc_totest}[T.{c}]", f"{factor_loc_totest}[{c}]"]
        match = next((x for x in candidates if x in of_factor), None)
        if match is None:
            raise ValueError(
                f"coef_to_test {c!r} is neither a coefficient nor a level of factor "
                f"{factor_loc_totest!r}; its coefficients are {of_factor}."
            )
        chosen.append(match)
    return chosen


def wald(
    data,
    factor_loc_totest=None,
    coef_to_test=None,
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
    backend="numpy",
    train_args=None,
    training_strategy="AUTO",
    quick_scale=False,
    dtype="float64",
    **kwargs,
):
    """Fit the model and Wald-test location coefficients, as ``diffxpy.api.test.wald``.

    Parameters
    ----------
    data, formula_loc, formula_scale, as_numeric, init_a, init_b, gene_names, \
sample_description, dmat_loc, dmat_scale, constraints_loc, constraints_scale, noise_model, \
size_factors, batch_size, training_strategy, quick_scale, dtype, **kwargs
        As for :func:`nbfit.fit`.
    factor_loc_totest : str or list of str, optional
        Factor(s) of ``formula_loc`` whose coefficients are tested jointly.
    coef_to_test : str or list of str, optional
        Coefficients (design column names, e.g. ``"condition[T.B]"``) to test jointly; with
        ``factor_loc_totest``, levels of that factor (``"B"``) or its coefficient names.
    backend, train_args
        diffxpy options; ``backend`` is ignored (nbfit runs on JAX), a non-empty
        ``train_args`` is ignored with a warning.

    Returns
    -------
    DifferentialExpressionTestWald
        ``.summary()`` is the per-gene table; ``.model_estim`` the fit.
    """
    kwargs = _fit_options(kwargs, backend, train_args)
    estimator = fit(
        data, formula_loc=formula_loc, formula_scale=formula_scale, as_numeric=as_numeric,
        init_a=init_a, init_b=init_b, gene_names=gene_names, sample_description=sample_description,
        dmat_loc=dmat_loc, dmat_scale=dmat_scale, constraints_loc=constraints_loc,
        constraints_scale=constraints_scale, noise_model=noise_model, size_factors=size_factors,
        batch_size=batch_size, training_strategy=training_strategy, quick_scale=quick_scale,
        dtype=dtype, **kwargs,
    )
    names = [str(n) for n in estimator.model.design_loc_names]
    coefficients = _coefficients_to_test(names, factor_loc_totest, coef_to_test)
    return DifferentialExpressionTestWald(estimator, coefficients)


def lrt(
    data,
    full_formula_loc,
    reduced_formula_loc,
    full_formula_scale="~1",
    reduced_formula_scale="~1",
    as_numeric=(),
    init_a="AUTO",
    init_b="AUTO",
    gene_names=None,
    sample_description=None,
    noise_model="nb",
    size_factors=None,
    batch_size=None,
    backend="numpy",
    train_args=None,
    training_strategy="AUTO",
    quick_scale=False,
    dtype="float64",
    **kwargs,
):
    """Fit a full and a reduced model and compare them, as ``diffxpy.api.test.lrt``.

    The reduced formulas must give designs nested in the full ones (checked).

    Returns
    -------
    DifferentialExpressionTestLRT
        ``.summary()`` is the per-gene table; ``.full_estim`` / ``.reduced_estim`` the fits.
    """
    kwargs = _fit_options(kwargs, backend, train_args)
    common = dict(
        as_numeric=as_numeric, gene_names=gene_names, sample_description=sample_description,
        noise_model=noise_model, size_factors=size_factors, batch_size=batch_size,
        training_strategy=training_strategy, quick_scale=quick_scale, dtype=dtype, **kwargs,
    )
    full = fit(data, formula_loc=full_formula_loc, formula_scale=full_formula_scale,
               init_a=init_a, init_b=init_b, **common)
    reduced = fit(data, formula_loc=reduced_formula_loc, formula_scale=reduced_formula_scale,
                  **common)
    return DifferentialExpressionTestLRT(full, reduced)
