"""``nbfit.simulate``: its output layout, and that a fit recovers its true coefficients."""

import numpy as np
import pytest

import nbfit

#: A true location coefficient is recovered if |estimate - truth| <= this many standard
#: errors (sqrt of the diagonal of the inverse observed information).
RECOVERY_Z = 5.0
#: ... for at least this share of the coefficients.
RECOVERY_SHARE = 0.9

N_CELLS, N_GENES, SEED = 2000, 30, 1


@pytest.fixture(scope="module")
def simulated():
    return nbfit.simulate(n_cells=N_CELLS, n_genes=N_GENES, seed=SEED)


def test_simulate_layout(simulated):
    adata = simulated
    assert adata.shape == (N_CELLS, N_GENES)
    counts = np.asarray(adata.X)
    assert counts.dtype == np.float64
    assert np.all(counts >= 0) and np.all(counts == np.round(counts))
    assert list(adata.obs.columns) == ["condition", "sf"]
    assert sorted(adata.obs["condition"].unique()) == ["A", "B"]
    assert np.all(adata.obs["sf"].to_numpy() > 0)
    assert adata.uns["true_a_names"] == ["Intercept", "condition[T.B]"]
    assert adata.uns["true_b_names"] == ["Intercept"]
    assert adata.uns["formula_loc"] == "~1+condition"
    assert adata.uns["formula_scale"] == "~1"
    assert adata.varm["true_a"].shape == (N_GENES, 2)
    assert adata.varm["true_b"].shape == (N_GENES, 1)
    assert adata.obs_names.is_unique and adata.var_names.is_unique


def test_simulate_is_reproducible(simulated):
    again = nbfit.simulate(n_cells=N_CELLS, n_genes=N_GENES, seed=SEED)
    np.testing.assert_array_equal(np.asarray(again.X), np.asarray(simulated.X))
    np.testing.assert_array_equal(again.varm["true_a"], simulated.varm["true_a"])
    other = nbfit.simulate(n_cells=N_CELLS, n_genes=N_GENES, seed=SEED + 1)
    assert not np.array_equal(np.asarray(other.X), np.asarray(simulated.X))


def test_simulate_batches_and_scale_model():
    adata = nbfit.simulate(n_cells=300, n_genes=7, n_batches=3, scale_condition_sd=0.5, seed=2)
    assert adata.shape == (300, 7)
    assert list(adata.obs.columns) == ["condition", "batch", "sf"]
    assert set(adata.obs["batch"].unique()) <= {"b1", "b2", "b3"}
    loc_names = ["Intercept", "condition[T.B]", "batch[T.b2]", "batch[T.b3]"]
    assert adata.uns["true_a_names"] == loc_names
    assert adata.uns["true_b_names"] == ["Intercept", "condition[T.B]"]
    assert adata.uns["formula_loc"] == "~1+condition+batch"
    assert adata.uns["formula_scale"] == "~1+condition"
    assert adata.varm["true_a"].shape == (7, 4)
    assert adata.varm["true_b"].shape == (7, 2)
    # The formulas build designs whose column names match the true coefficients' names.
    est = nbfit.fit(
        adata,
        formula_loc=adata.uns["formula_loc"],
        formula_scale=adata.uns["formula_scale"],
        size_factors="sf",
        training_strategy=[{"method": "newton", "max_steps": 0}],
    )
    assert list(est.model.design_loc_names) == loc_names
    assert list(est.model.design_scale_names) == adata.uns["true_b_names"]


def test_fit_recovers_simulated_location(simulated):
    adata = simulated
    est = nbfit.fit(adata, formula_loc=adata.uns["formula_loc"], size_factors="sf")
    p_loc = len(adata.uns["true_a_names"])
    assert list(est.model.design_loc_names) == adata.uns["true_a_names"]
    assert est.a_var.shape == (p_loc, N_GENES)
    assert est.fisher_inv.shape == (N_GENES, p_loc + 1, p_loc + 1)

    estimate = est.a_var.T  # (n_genes, p_loc)
    truth = adata.varm["true_a"]
    variance = np.diagonal(est.fisher_inv, axis1=1, axis2=2)[:, :p_loc]
    assert np.all(np.isfinite(variance)) and np.all(variance > 0), est.status
    z = np.abs(estimate - truth) / np.sqrt(variance)
    share = np.mean(z <= RECOVERY_Z)
    assert share >= RECOVERY_SHARE, (share, np.sort(z.ravel())[-10:])
