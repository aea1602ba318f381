"""Equality constraints in every form, against the gold fit of sim_constrained."""

import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbfit
import nbfit.api as de
from conftest import load_scenario
from nbfit.constraints import (
    ConstraintError,
    constraint_matrix_from_array,
    constraint_matrix_from_dict,
    constraint_matrix_from_string,
    setup_constrained,
)

LL_RTOL = 1e-6
COEF_ATOL = 1e-4
SAME_RTOL = 1e-9


@pytest.fixture(scope="module")
def scenario():
    return load_scenario("sim_constrained")


def _fit(scenario, constraints, **options):
    return nbfit.fit(
        scenario.adata, formula_loc=scenario.spec["formula_loc"], constraints_loc=constraints,
        size_factors="sf", **options,
    )


@pytest.mark.parametrize("solver", ["NEWTON", "IRLS", "LBFGS"])
def test_constrained_fit_reaches_gold(scenario, solver):
    est = _fit(scenario, scenario.spec["constraints_loc"], training_strategy=solver)
    gold, spec = scenario.gold, scenario.spec
    ll = gold["ll"].to_numpy()
    gap = (est.log_likelihood - ll) / np.maximum(1.0, np.abs(ll))
    assert gap.min() >= -LL_RTOL
    regular = ~gold["poisson_limit"].to_numpy()
    full = gold[[f"a_{n}" for n in spec["design_loc_names"]]].to_numpy()
    reduced = gold[[f"areduced_{n}" for n in spec["reduced_loc_names"]]].to_numpy()
    assert np.abs(est.model.a.T - full)[regular].max() <= COEF_ATOL
    assert np.abs(est.a_var.T - reduced)[regular].max() <= COEF_ATOL
    assert est.reduced_loc_names == spec["reduced_loc_names"]
    assert est.model.design_loc_names == spec["design_loc_names"]
    np.testing.assert_array_equal(est.model.design_loc, scenario.design_loc.to_numpy())
    np.testing.assert_array_equal(est.model.constraints_loc, np.array(spec["constraint_matrix_loc"]))
    # The full coefficients satisfy the constraints exactly.
    a = est.model.a
    np.testing.assert_allclose(a[2] + a[3], 0, atol=1e-12)
    np.testing.assert_allclose(a[4] + a[5], 0, atol=1e-12)


def test_forms_give_identical_fits(scenario):
    spec = scenario.spec
    reference = _fit(scenario, spec["constraints_loc"])
    fits = [
        _fit(scenario, spec["constraint_strings_loc"]),
        nbfit.fit(scenario.adata, dmat_loc=scenario.design_loc, size_factors="sf",
                  constraints_loc=spec["constraint_strings_loc"]),
        nbfit.fit(scenario.adata, dmat_loc=scenario.design_loc, size_factors="sf",
                  constraints_loc=np.array(spec["constraint_matrix_loc"])),
        nbfit.fit(scenario.adata, dmat_loc=scenario.design_loc, size_factors="sf",
                  constraints_loc=np.array(spec["constraint_array_loc_diffxpy"])),
    ]
    for est in fits:
        np.testing.assert_allclose(est.a_var, reference.a_var, rtol=SAME_RTOL, atol=1e-12)
        np.testing.assert_allclose(est.log_likelihood, reference.log_likelihood, rtol=SAME_RTOL)


def test_setup_constrained_reproduces_reference(scenario):
    spec = scenario.spec
    design, names, matrix, terms = de.utils.setup_constrained(
        scenario.adata.obs, spec["formula_loc"], spec["constraints_loc"]
    )
    assert names == spec["design_loc_names"] == list(design.columns)
    np.testing.assert_array_equal(design.to_numpy(), scenario.design_loc.to_numpy())
    np.testing.assert_array_equal(matrix, np.array(spec["constraint_matrix_loc"]))
    assert terms == ["Intercept", "condition", "batch"]
    strings_matrix, reduced = constraint_matrix_from_string(names, spec["constraint_strings_loc"])
    np.testing.assert_array_equal(strings_matrix, matrix)
    assert reduced == spec["reduced_loc_names"]
    dict_matrix, _, equations = constraint_matrix_from_dict(scenario.adata.obs, spec["constraints_loc"], names)
    assert equations == spec["constraint_strings_loc"]
    np.testing.assert_array_equal(dict_matrix, matrix)


def test_standard_errors_map_to_full(scenario):
    est = _fit(scenario, scenario.spec["constraints_loc"])
    regular = est.status == "converged"
    # se of batch[b1] = se of batch[b2] since batch[b1] = -batch[b2].
    np.testing.assert_allclose(est.model.a_se[2, regular], est.model.a_se[3, regular], rtol=1e-10)
    np.testing.assert_allclose(est.model.a_se[3, regular], est.a_se[2, regular], rtol=1e-10)
    assert est.fisher_inv_full.shape == (est.gene_names.size, 7, 7)


def test_scale_constraints_equal_reparameterisation():
    """A sum-to-zero condition effect on the dispersion equals one dispersion per condition."""
    adata = nbfit.simulate(n_cells=300, n_genes=12, scale_condition_sd=0.5, seed=5)
    constrained = nbfit.fit(
        adata, formula_loc="~1+condition", formula_scale="~1+condition",
        constraints_scale={"condition": "1"}, size_factors="sf",
    )
    assert constrained.model.design_scale_names == ["Intercept", "condition[A]", "condition[B]"]
    free = nbfit.fit(adata, formula_loc="~1+condition", formula_scale="~0+condition", size_factors="sf")
    np.testing.assert_allclose(constrained.log_likelihood, free.log_likelihood, rtol=1e-9)
    np.testing.assert_allclose(constrained.model.phi, free.model.phi, rtol=1e-6)
    b = constrained.model.b
    np.testing.assert_allclose(b[1] + b[2], 0, atol=1e-12)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches_per_condition=st.lists(st.integers(2, 3), min_size=2, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_constrained_equals_full_rank_reparameterisation(batches_per_condition, seed):
    """Batches nested in conditions, summing to 0 within each, equal one mean per batch."""
    rng = np.random.default_rng(seed)
    levels = [(c, f"{c}{k}") for c, n in zip("AB", batches_per_condition) for k in range(n)]
    n_cells = 24 * len(levels)
    pairs = [levels[i % len(levels)] for i in range(n_cells)]
    obs = pd.DataFrame({"condition": [p[0] for p in pairs], "batch": [p[1] for p in pairs]},
                       index=[f"c{i}" for i in range(n_cells)])
    # 8 genes, fixed shape across examples would need equal level counts; shapes are small.
    batch_means = rng.uniform(0.5, 3.0, (len(levels), 8))
    index = np.array([levels.index(p) for p in pairs])
    mu = np.exp(batch_means[index])
    counts = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(float)
    counts[0] += 1  # no all-zero gene
    constrained = nbfit.fit(counts, sample_description=obs, formula_loc="~1+condition+batch",
                            constraints_loc={"batch": "condition"})
    free = nbfit.fit(counts, sample_description=obs, formula_loc="~0+batch")
    np.testing.assert_allclose(constrained.log_likelihood, free.log_likelihood, rtol=1e-8)
    np.testing.assert_allclose(constrained.model.mu, free.model.mu, rtol=1e-5)


# ---------------------------------------------------------------- errors


def test_wrong_shape_array(scenario):
    with pytest.raises(ConstraintError, match=re.escape("does not fit a design with 6 columns")):
        nbfit.fit(scenario.adata, dmat_loc=scenario.design_loc, constraints_loc=np.eye(3))


def test_unknown_column_in_string(scenario):
    with pytest.raises(ConstraintError, match=r"valid names are \['Intercept'"):
        nbfit.fit(scenario.adata, dmat_loc=scenario.design_loc, constraints_loc=["batch[b9] + batch[b2] = 0"])


def test_malformed_equation():
    with pytest.raises(ConstraintError, match="right-hand side must be 0"):
        constraint_matrix_from_string(["a", "b"], ["a + b = 1"])
    with pytest.raises(ConstraintError, match="not an equation"):
        constraint_matrix_from_string(["a", "b"], ["a + b"])
    with pytest.raises(ConstraintError, match="expected"):
        constraint_matrix_from_string(["a", "b"], ["a b = 0"])


def test_constraint_on_numeric_column(scenario):
    obs = scenario.adata.obs.assign(dose=np.arange(scenario.adata.n_obs) % 4 * 1.0)
    with pytest.raises(ConstraintError, match="numeric"):
        setup_constrained(obs, "~1+dose", {"dose": "1"}, as_numeric=["dose"])


def test_nesting_violated(scenario):
    obs = scenario.adata.obs.copy()
    obs["crossed"] = np.tile(["x", "y"], scenario.adata.n_obs // 2)
    with pytest.raises(ConstraintError, match="not nested"):
        setup_constrained(obs, "~1+condition+crossed", {"crossed": "condition"})


def test_grouping_by_constrained_factor(scenario):
    with pytest.raises(ConstraintError, match="itself constrained"):
        setup_constrained(scenario.adata.obs, "~1+condition+batch", {"batch": "condition", "condition": "batch"})


def test_still_rank_deficient(scenario):
    # Only the A batches are constrained: b3, b4 stay confounded with condition.
    with pytest.raises(ConstraintError, match="rank deficient"):
        nbfit.fit(scenario.adata, dmat_loc=scenario.design_loc, constraints_loc=["batch[b1] + batch[b2] = 0"])


def test_dependent_twice():
    with pytest.raises(ConstraintError, match="dependent parameter of two"):
        constraint_matrix_from_string(["a", "b", "c"], ["a + b = 0", "a + c = 0"])


def test_diffxpy_array_rows_checked():
    with pytest.raises(ConstraintError, match="exactly one -1"):
        constraint_matrix_from_array(["a", "b", "c"], [[1, 1, 0]])
