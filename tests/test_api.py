"""The public API: input types, batch sizes, strategies, options, and their errors."""

import anndata
import jax
import jax.monitoring
import numpy as np
import pytest
import scipy.sparse

import nbfit
import nbfit.api as de

#: Results of the same fit through different input paths / chunkings agree to this.
SAME_RTOL = 1e-10
N_CELLS, N_GENES = 240, 20


@pytest.fixture(scope="module")
def adata():
    return nbfit.simulate(n_cells=N_CELLS, n_genes=N_GENES, n_batches=2, seed=3)


@pytest.fixture(scope="module")
def reference_fit(adata):
    return nbfit.fit(adata, formula_loc="~1+condition+batch", size_factors="sf")


def _fit(data, adata, **options):
    options.setdefault("sample_description", adata.obs)
    options.setdefault("gene_names", adata.var_names)
    return nbfit.fit(data, formula_loc="~1+condition+batch", size_factors="sf", **options)


def _assert_same(est, reference):
    np.testing.assert_allclose(est.a_var, reference.a_var, rtol=SAME_RTOL, atol=1e-12)
    np.testing.assert_allclose(est.b_var, reference.b_var, rtol=SAME_RTOL, atol=1e-12)
    np.testing.assert_allclose(est.log_likelihood, reference.log_likelihood, rtol=SAME_RTOL)
    np.testing.assert_array_equal(est.status, reference.status)


@pytest.mark.parametrize(
    "convert",
    [np.asarray, scipy.sparse.csr_matrix, scipy.sparse.csc_matrix],
    ids=["dense", "csr", "csc"],
)
def test_matrix_inputs_agree(adata, reference_fit, convert):
    _assert_same(_fit(convert(adata.X), adata), reference_fit)


def test_anndata_raw_input(adata, reference_fit):
    holder = anndata.AnnData(X=np.zeros((N_CELLS, N_GENES)), obs=adata.obs, var=adata.var)
    holder.raw = adata
    est = _fit(holder.raw, adata, gene_names=None)
    _assert_same(est, reference_fit)
    assert list(est.gene_names) == list(adata.var_names)


def test_anndata_with_sparse_x(adata, reference_fit):
    sparse = adata.copy()
    sparse.X = scipy.sparse.csr_matrix(sparse.X)
    est = nbfit.fit(sparse, formula_loc="~1+condition+batch", size_factors="sf")
    _assert_same(est, reference_fit)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_batch_size_never_changes_results(adata, reference_fit, batch_size):
    est = nbfit.fit(adata, formula_loc="~1+condition+batch", size_factors="sf", batch_size=batch_size)
    assert est.batch_size == batch_size
    _assert_same(est, reference_fit)


def test_second_fit_compiles_nothing(adata, reference_fit):
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        est = nbfit.fit(adata, formula_loc="~1+condition+batch", size_factors="sf")
        est.log_likelihood  # evaluation is compiled too
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled == []


def test_diffxpy_entry_point(adata, reference_fit):
    est = de.fit.model(adata, formula_loc="~1+condition+batch", size_factors="sf")
    _assert_same(est, reference_fit)


def test_global_jax_config_untouched(adata):
    before = jax.config.jax_enable_x64
    est = nbfit.fit(adata, formula_loc="~1+condition+batch", size_factors="sf", dtype="float64")
    assert jax.config.jax_enable_x64 == before
    assert est.a_var.dtype == np.float64


def test_estimator_attributes(adata, reference_fit):
    est = reference_fit
    p_loc, p_scale = 3, 1
    assert est.a_var.shape == (p_loc, N_GENES) and est.b_var.shape == (p_scale, N_GENES)
    assert est.model.design_loc_names == ["Intercept", "condition[T.B]", "batch[T.b2]"]
    model = est.model
    assert model.mu.shape == (N_CELLS, N_GENES) and model.location is not None
    np.testing.assert_allclose(model.mu, adata.obs["sf"].to_numpy()[:, None] * np.exp(model.design_loc @ model.a))
    np.testing.assert_allclose(model.phi, np.exp(model.design_scale @ model.b))
    np.testing.assert_allclose(np.log(model.mu), model.eta_loc)
    np.testing.assert_allclose(model.size_factors, adata.obs["sf"].to_numpy())
    assert est.jacobian.shape == (N_GENES, p_loc + p_scale)
    assert est.hessian.shape == est.fisher_inv.shape == (N_GENES, p_loc + p_scale, p_loc + p_scale)
    np.testing.assert_allclose(
        np.einsum("gij,gjk->gik", est.fisher_inv, -est.hessian), np.broadcast_to(np.eye(4), (N_GENES, 4, 4)), atol=1e-8
    )
    assert est.loss == pytest.approx(-est.log_likelihood.sum())
    assert est.converged.all() and (est.n_steps > 0).all()
    frame = est.to_dataframe()
    assert list(frame.index) == list(adata.var_names)
    assert {"a_Intercept", "b_Intercept", "ll", "status", "converged", "n_steps"} <= set(frame.columns)
    summary = est.convergence_summary()
    assert summary["n_genes"].sum() == N_GENES


def test_gradient_vanishes_at_fit(reference_fit):
    scale = np.maximum(1.0, np.abs(reference_fit.log_likelihood))[:, None]
    assert np.all(np.abs(reference_fit.jacobian) / scale < 1e-6)


# ---------------------------------------------------------------- options


def test_strategy_forms_agree(adata, reference_fit):
    by_list = _fit(adata.X, adata, training_strategy=[{"method": "newton"}])
    _assert_same(by_list, reference_fit)
    calls = []

    def strategy(estimator):
        calls.append(estimator)
        estimator.train(method="nr")

    by_callable = _fit(adata.X, adata, training_strategy=strategy)
    assert calls == [by_callable]
    _assert_same(by_callable, reference_fit)


@pytest.mark.parametrize("name", ["auto", "DEFAULT", "EXACT", "QUICK", "IRLS", "NR", "LBFGS"])
def test_named_strategies_reach_the_optimum(adata, reference_fit, name):
    est = _fit(adata.X, adata, training_strategy=name)
    tolerance = 1e-5 if name == "QUICK" else 1e-8
    np.testing.assert_allclose(est.log_likelihood, reference_fit.log_likelihood, rtol=tolerance)


def test_quick_scale_is_close_but_not_joint(adata, reference_fit):
    est = _fit(adata.X, adata, quick_scale=True)
    # One pass (location, scale, location) is near the joint optimum, never above it.
    gap = est.log_likelihood - reference_fit.log_likelihood
    assert np.all(gap <= 1e-8 * np.abs(reference_fit.log_likelihood))
    assert np.all(gap >= -1e-3 * np.abs(reference_fit.log_likelihood))


@pytest.mark.parametrize("init", ["standard", "closed_form", "AUTO"])
def test_init_methods_reach_the_same_optimum(adata, reference_fit, init):
    est = _fit(adata.X, adata, init_a=init, init_b=init)
    np.testing.assert_allclose(est.log_likelihood, reference_fit.log_likelihood, rtol=1e-9)


def test_init_arrays(adata, reference_fit):
    est = _fit(adata.X, adata, init_a=reference_fit.a_var, init_b=reference_fit.b_var,
               training_strategy=[{"method": "newton", "max_steps": 0}])
    np.testing.assert_array_equal(est.a_var, reference_fit.a_var)
    np.testing.assert_allclose(est.log_likelihood, reference_fit.log_likelihood, rtol=1e-12)


def test_float32(adata, reference_fit):
    est = _fit(adata.X, adata, dtype="float32")
    regular = reference_fit.status == "converged"
    np.testing.assert_allclose(est.a_var[:, regular], reference_fit.a_var[:, regular], atol=2e-3)
    np.testing.assert_allclose(est.log_likelihood, reference_fit.log_likelihood, rtol=1e-5)


def test_dmat_overrides_formula(adata, reference_fit):
    model = reference_fit.model
    frame = __import__("pandas").DataFrame(model.design_loc, columns=model.design_loc_names)
    est = nbfit.fit(adata, formula_loc="~1", dmat_loc=frame,
                    dmat_scale=(model.design_scale, model.design_scale_names), size_factors="sf")
    _assert_same(est, reference_fit)
    assert est.model.design_loc_names == model.design_loc_names


def test_size_factors_forms(adata, reference_fit):
    sf = adata.obs["sf"]
    for form in (sf, sf.to_numpy()):
        est = nbfit.fit(adata, formula_loc="~1+condition+batch", size_factors=form)
        _assert_same(est, reference_fit)


def test_as_numeric_keeps_column_numeric(adata):
    obs = adata.obs.copy()
    obs["dose"] = np.arange(N_CELLS) % 3
    categorical = nbfit.fit(adata.X, sample_description=obs, formula_loc="~1+dose")
    numeric = nbfit.fit(adata.X, sample_description=obs, formula_loc="~1+dose", as_numeric="dose")
    assert categorical.model.design_loc_names == ["Intercept", "dose[T.1]", "dose[T.2]"]
    assert numeric.model.design_loc_names == ["Intercept", "dose"]


def test_scale_model_with_design(adata):
    est = nbfit.fit(adata, formula_loc="~1+condition", formula_scale="~1+condition", size_factors="sf")
    assert est.b_var.shape == (2, N_GENES)
    assert est.model.design_scale_names == ["Intercept", "condition[T.B]"]


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"training_strategy": "FASTEST"}, ValueError, "valid names are"),
        ({"training_strategy": [{"method": "sgd"}]}, ValueError, "valid methods are"),
        ({"training_strategy": [{"method": "newton", "learning_rate": 1}]}, TypeError, "valid arguments are"),
        ({"noise_model": "poisson"}, ValueError, "supported: ['nb']"),
        ({"constraints_loc": {"batch": "condition"}}, ValueError, "not nested"),
        ({"dtype": "float16"}, ValueError, "float64"),
        ({"init_a": "random"}, ValueError, "closed_form"),
        ({"init_a": np.zeros((2, 2))}, ValueError, "expected (3, 20)"),
        ({"formula_loc": "~1+treatment"}, ValueError, "not columns of the sample description"),
        ({"size_factors": "depth"}, ValueError, "not a column"),
        ({"batch_size": 0}, ValueError, "positive integer"),
        ({"formula_loc": None}, ValueError, "formula_loc"),
        ({"as_numeric": ["condition"]}, ValueError, "not numeric"),
    ],
)
def test_bad_options_raise_clear_errors(adata, options, error, message):
    options = {"formula_loc": "~1+condition+batch", **options}
    with pytest.raises(error, match=__import__("re").escape(message)):
        nbfit.fit(adata, **options)


def test_rank_deficient_design_names_columns(adata):
    obs = adata.obs.copy()
    obs["copy"] = obs["condition"]
    with pytest.raises(ValueError, match=r"rank deficient: columns \['copy\[T.B\]'\]|condition\[T.B\]"):
        nbfit.fit(adata.X, sample_description=obs, formula_loc="~1+condition+copy")
