"""Inference: standard errors, Wald and likelihood-ratio tests, results export (issue 6)."""

import anndata
import jax
import numpy as np
import pandas as pd
import pytest
import scipy.stats
from conftest import fit_scenario, load_scenario

import nbfit
import nbfit.api as de
from nbfit import inference
from nbfit._problem import objective

#: Uniformity of null p-values: the KS test must not reject at this level.
KS_LEVEL = 0.01
#: Share of planted effects found at q < 0.05.
MIN_POWER = 0.9
#: Standard errors at fixed dispersion vs statsmodels (relative).
STATSMODELS_RTOL = 1e-5
#: Observed information vs a finite-difference Hessian (relative to the largest entry).
FD_RTOL = 1e-6
FD_STEP = 1e-5
#: Wald z against the gold fit: |z - z_gold| <= GOLD_Z_RTOL * max(1, |z_gold|).
GOLD_Z_RTOL = 1e-4
#: Genes with at least this mean count are "expressed".
EXPRESSED_MEAN = 0.1
SAME_RTOL = 1e-12
#: Columns of diffxpy's summary() tables.
DIFFXPY_COLUMNS = (
    "gene", "pval", "qval", "log2fc", "mean", "zero_mean", "coef_mle", "coef_sd", "ll",
)

N_CELLS, N_NULL, N_EFFECT = 200, 1200, 300


def _simulate_null_and_effect(seed=0):
    """Intercept + condition (A/B) with size factors; no effect on the first N_NULL genes."""
    rng = np.random.default_rng(seed)
    n_genes = N_NULL + N_EFFECT
    obs = pd.DataFrame(
        {"condition": np.array(["A", "B"])[np.arange(N_CELLS) % 2]},
        index=[f"cell_{i}" for i in range(N_CELLS)],
    )
    obs["sf"] = np.exp(rng.normal(0, 0.3, N_CELLS))
    intercept = rng.uniform(-0.5, 3, n_genes)
    effect = np.zeros(n_genes)
    effect[N_NULL:] = rng.choice([-1, 1], N_EFFECT) * rng.uniform(0.7, 1.2, N_EFFECT)
    r = np.exp(rng.normal(1, 0.7, n_genes))
    is_b = (obs["condition"] == "B").to_numpy()[:, None]
    mu = obs["sf"].to_numpy()[:, None] * np.exp(intercept + is_b * effect)
    counts = rng.negative_binomial(r, r / (r + mu)).astype(np.float64)
    genes = pd.Index([f"gene_{j}" for j in range(n_genes)])
    return counts, obs, genes, r


@pytest.fixture(scope="module")
def null_data():
    return _simulate_null_and_effect()


@pytest.fixture(scope="module")
def null_fits(null_data):
    counts, obs, genes, _ = null_data
    options = dict(sample_description=obs, gene_names=genes, size_factors="sf")
    full = nbfit.fit(counts, formula_loc="~1+condition", **options)
    reduced = nbfit.fit(counts, formula_loc="~1", **options)
    return full, reduced


# --------------------------------------------------------------------------- calibration


def test_null_pvalues_uniform_and_effects_found(null_fits):
    full, reduced = null_fits
    wald = full.wald(coef="condition[T.B]")
    lrt = full.lrt(reduced)
    null, planted = slice(0, N_NULL), slice(N_NULL, None)
    for table in (wald, lrt):
        pvals = table["pval"].to_numpy()
        assert np.isfinite(pvals[null]).sum() >= 1000
        ks = scipy.stats.kstest(pvals[null][np.isfinite(pvals[null])], "uniform")
        assert ks.pvalue > KS_LEVEL
        assert np.mean(table["qval"].to_numpy()[planted] < 0.05) >= MIN_POWER
    # Wald and LR statistics agree closely on regular genes.
    regular = wald["status"].to_numpy() == "converged"
    rank = scipy.stats.spearmanr(wald["statistic"][regular], lrt["statistic"][regular])
    assert rank.statistic > 0.99


def test_wald_table_columns(null_fits):
    full, _ = null_fits
    table = full.wald(coef="condition[T.B]")
    assert list(table.columns) == [
        "gene", "coef", "estimate", "se", "log2fc", "z", "statistic", "df", "pval", "qval", "ll",
        "status",
    ]
    np.testing.assert_allclose(table["estimate"], full.model.a[1], rtol=SAME_RTOL)
    np.testing.assert_allclose(table["se"], full.model.a_se[1], rtol=SAME_RTOL)
    np.testing.assert_allclose(table["log2fc"], table["estimate"] / np.log(2), rtol=SAME_RTOL)
    np.testing.assert_allclose(table["statistic"], table["z"] ** 2, rtol=1e-10)
    two_sided = 2 * scipy.stats.norm.sf(np.abs(table["z"]))
    np.testing.assert_allclose(table["pval"], two_sided, rtol=1e-8)
    # A one-coefficient term is the same test.
    by_term = full.wald(term="condition")
    np.testing.assert_allclose(by_term["pval"], table["pval"], rtol=1e-12)


def test_benjamini_hochberg_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    pvals = np.random.default_rng(1).uniform(size=500) ** 3
    pvals[[3, 70]] = np.nan
    q = inference.benjamini_hochberg(pvals)
    finite = np.isfinite(pvals)
    expected = multipletests(pvals[finite], method="fdr_bh")[1]
    np.testing.assert_allclose(q[finite], expected, rtol=1e-12)
    assert np.all(np.isnan(q[~finite]))


# --------------------------------------------------------------------------- standard errors


def test_fixed_dispersion_se_match_statsmodels(null_data):
    import statsmodels.api as sm

    counts, obs, genes, r = null_data
    # Size factors make the observed information differ from the expected one.
    est = nbfit.fit(
        counts, formula_loc="~1+condition", sample_description=obs, gene_names=genes,
        size_factors="sf", init_b=np.log(r)[None, :],
        training_strategy=[{"method": "newton", "update_scale": False}],
    )
    np.testing.assert_array_equal(est.b_var[0], np.log(r))
    se = inference.standard_errors(est, fixed_scale=True)
    design = est.model.design_loc
    offset = np.log(obs["sf"].to_numpy())
    for j in range(0, counts.shape[1], 37):  # 41 genes
        model = sm.GLM(counts[:, j], design, family=sm.families.NegativeBinomial(alpha=1 / r[j]),
                       offset=offset)
        start = model.fit(method="IRLS", tol=1e-12).params
        result = model.fit(method="newton", start_params=start, tol=1e-12, disp=False)
        np.testing.assert_allclose(est.a_var[:, j], result.params, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(se[:, j], result.bse, rtol=STATSMODELS_RTOL)


def test_joint_se_at_least_fixed_dispersion_se(null_fits):
    full, _ = null_fits
    regular = np.asarray(full.status) == "converged"
    joint = inference.standard_errors(full)[:, regular]
    fixed = inference.standard_errors(full, fixed_scale=True)[:, regular]
    np.testing.assert_array_equal(joint, full.model.a_se[:, regular])
    assert np.all(joint >= fixed * (1 - 1e-12))


def test_observed_information_matches_finite_differences(null_fits):
    full, _ = null_fits
    regular = np.flatnonzero(np.asarray(full.status) == "converged")
    n_params = full.hessian.shape[1]
    with jax.enable_x64(True):
        start, stop, chunk = next(full._problems())
        problem = chunk.problem()
        theta = np.zeros((chunk.counts.shape[0], n_params))
        theta[: stop - start] = np.concatenate([full.a_var, full.b_var]).T[start:stop]
        # Autodiff of the summed objective: genes are independent, so row g is gene g's.
        gradient = jax.jit(jax.grad(lambda theta, problem: objective(theta, problem).sum()))
        fd = np.zeros((theta.shape[0], n_params, n_params))
        for k in range(n_params):
            step = np.zeros(n_params)
            step[k] = FD_STEP
            fd[:, :, k] = (np.asarray(gradient(theta + step, problem))
                           - np.asarray(gradient(theta - step, problem))) / (2 * FD_STEP)
    genes = regular[regular < stop]
    hessian = full.hessian[genes]
    fd = fd[genes - start]
    scale = np.abs(hessian).max(axis=(1, 2))[:, None, None]
    assert np.all(np.abs(hessian - fd) <= FD_RTOL * scale)
    # Joint standard errors = sqrt(diag(inv(-H_fd))).
    se_fd = np.sqrt(np.diagonal(np.linalg.inv(-fd), axis1=1, axis2=2)).T
    np.testing.assert_allclose(full.a_se[:, genes], se_fd[: full.a_var.shape[0]], rtol=1e-5)


def test_wald_z_agrees_with_gold_fit():
    scenario = load_scenario("sim_condition_batch")
    spec = scenario.spec
    gold = scenario.gold
    names = spec["design_loc_names"]
    est = fit_scenario("sim_condition_batch")
    at_gold = nbfit.fit(
        scenario.adata, formula_loc=spec["formula_loc"], formula_scale=spec["formula_scale"],
        size_factors=spec["size_factors"],
        init_a=gold[[f"a_{n}" for n in names]].to_numpy().T,
        init_b=gold[[f"b_{n}" for n in spec["design_scale_names"]]].to_numpy().T,
        training_strategy=[{"method": "newton", "max_steps": 0}],
    )
    assert np.all(at_gold.n_steps == 0)
    cov_gold = np.linalg.inv(-at_gold.hessian)
    means = np.asarray(scenario.adata.X.mean(axis=0)).ravel()
    flagged = gold[["poisson_limit", "all_zero", "separated"]].any(axis=1).to_numpy()
    keep = (means >= EXPRESSED_MEAN) & ~flagged & (np.asarray(est.status) == "converged")
    assert keep.sum() > 350
    for k, name in enumerate(names):
        z = est.wald(coef=name)["z"].to_numpy()
        z_gold = gold[f"a_{name}"].to_numpy() / np.sqrt(cov_gold[:, k, k])
        assert np.all(np.abs(z - z_gold)[keep] <= GOLD_Z_RTOL * np.maximum(1, np.abs(z_gold[keep])))


# --------------------------------------------------------------------------- constraints


@pytest.fixture(scope="module")
def constrained():
    scenario = load_scenario("sim_constrained")
    return nbfit.fit(scenario.adata, formula_loc=scenario.spec["formula_loc"],
                     constraints_loc=scenario.spec["constraints_loc"], size_factors="sf")


def test_wald_under_constraints(constrained):
    est = constrained
    regular = np.asarray(est.status) == "converged"
    b1, b2 = est.wald(coef="batch[b1]"), est.wald(coef="batch[b2]")
    np.testing.assert_allclose(b1["estimate"], -b2["estimate"], rtol=1e-12)
    np.testing.assert_allclose(b1["se"], b2["se"], rtol=1e-10)
    np.testing.assert_allclose(b1["pval"][regular], b2["pval"][regular], rtol=1e-8)
    # batch[b1] and batch[b2] carry one free parameter: the joint test has df 1.
    pair = est.wald(coef=["batch[b1]", "batch[b2]"])
    assert (pair["df"] == 1).all()
    np.testing.assert_allclose(pair["statistic"][regular], b2["statistic"][regular], rtol=1e-8)
    # Four batch columns, two constraints: df 2, = the test of the two free parameters.
    term = est.wald(term="batch")
    assert (term["df"] == 2).all()
    free = est.wald(coef=["batch[b2]", "batch[b4]"])
    np.testing.assert_allclose(term["statistic"][regular], free["statistic"][regular], rtol=1e-8)
    assert {"estimate_batch[b1]", "se_batch[b4]"} <= set(term.columns)


# --------------------------------------------------------------------------- untestable genes


@pytest.fixture(scope="module")
def small():
    """240 cells x 20 genes (the shapes of test_api, so fits share compilations)."""
    return nbfit.simulate(n_cells=240, n_genes=20, n_batches=2, seed=3)


@pytest.fixture(scope="module")
def small_fit(small):
    return nbfit.fit(small, formula_loc="~1+condition+batch", size_factors="sf")


def test_untestable_genes_get_nan(small):
    adata = small.copy()
    is_a = (adata.obs["condition"] == "A").to_numpy()
    adata.X[:, 0] = 0.0            # all zero
    adata.X[is_a, 1] = 0.0         # separated: no counts in condition A
    est = nbfit.fit(adata, formula_loc="~1+condition+batch", size_factors="sf")
    assert est.status[0] == "all_zero" and est.status[1] == "separated"
    wald = est.wald(coef="condition[T.B]")
    assert np.isnan(wald["pval"][:2]).all() and np.isnan(wald["qval"][:2]).all()
    assert np.isfinite(wald["pval"][2:]).all()
    assert list(wald["status"][:2]) == ["all_zero", "separated"]
    # Stopped early: no p-value at all.
    early = nbfit.fit(adata, formula_loc="~1+condition+batch", size_factors="sf",
                      training_strategy=[{"method": "newton", "max_steps": 1}])
    stopped = np.asarray(early.status) == "max_steps"
    assert stopped.any()
    assert np.isnan(early.wald(term="condition")["pval"][stopped]).all()
    reduced = nbfit.fit(adata, formula_loc="~1+batch", size_factors="sf")
    lrt = early.lrt(reduced)
    assert np.isnan(lrt["pval"][stopped]).all()
    assert np.isnan(est.lrt(reduced)["pval"][0])


def test_singular_covariance_block_is_flagged(small_fit):
    class Broken:
        """A fit whose covariance of one gene is not positive definite."""

        def __getattr__(self, name):
            return getattr(small_fit, name)

        fisher_inv = small_fit.fisher_inv.copy()

    Broken.fisher_inv[4, 1, 1] = -1.0
    wald = inference.wald(Broken(), coef="condition[T.B]")
    assert np.isnan(wald["pval"][4]) and wald["status"][4] == "singular"
    assert np.isfinite(wald["pval"][5])


def test_lrt_checks_nesting(small, small_fit):
    other = nbfit.fit(small, formula_loc="~1+condition", size_factors="sf")
    with pytest.raises(ValueError, match="not nested"):
        inference.lrt(other, nbfit.fit(small, formula_loc="~1+batch", size_factors="sf"))
    with pytest.raises(ValueError, match="no fewer parameters"):
        inference.lrt(other, nbfit.fit(small, formula_loc="~0+condition", size_factors="sf"))
    with pytest.raises(ValueError, match="size factors"):
        inference.lrt(small_fit, nbfit.fit(small, formula_loc="~1+batch"))

    class Renamed:
        def __getattr__(self, name):
            return getattr(other, name)

        gene_names = other.gene_names[::-1]

    with pytest.raises(ValueError, match="same genes"):
        inference.lrt(small_fit, Renamed())
    changed = small.copy()
    changed.X = changed.X + 1
    with pytest.raises(ValueError, match="same counts"):
        inference.lrt(small_fit, nbfit.fit(changed, formula_loc="~1+condition", size_factors="sf"))


def test_bad_coefficient_names(small_fit):
    with pytest.raises(ValueError, match="not columns of the loc design"):
        small_fit.wald(coef="condition[T.C]")
    with pytest.raises(ValueError, match="not a term"):
        small_fit.wald(term="time")
    with pytest.raises(ValueError, match="exactly one"):
        small_fit.wald()
    scale = small_fit.wald(coef="Intercept", which="scale")
    np.testing.assert_allclose(scale["estimate"], small_fit.b_var[0], rtol=SAME_RTOL)


# --------------------------------------------------------------------------- diffxpy API


def test_diffxpy_wald_and_lrt(small, small_fit):
    test = de.test.wald(small, formula_loc="~1+condition+batch", factor_loc_totest="condition",
                        size_factors="sf")
    summary = test.summary()
    assert set(DIFFXPY_COLUMNS) <= set(summary.columns)
    direct = small_fit.wald(coef="condition[T.B]")
    np.testing.assert_allclose(summary["pval"], direct["pval"], rtol=1e-12)
    np.testing.assert_allclose(summary["coef_mle"], small_fit.model.a[1], rtol=1e-12)
    np.testing.assert_allclose(summary["mean"], np.asarray(small.X.mean(axis=0)).ravel())
    assert len(test.summary(qval_thres=0.05)) == int((direct["qval"] <= 0.05).sum())
    by_level = de.test.wald(small, formula_loc="~1+condition+batch", factor_loc_totest="condition",
                            coef_to_test="B", size_factors="sf")
    np.testing.assert_allclose(by_level.pval, test.pval, rtol=1e-12)
    with pytest.raises(ValueError, match="factor_loc_totest"):
        de.test.wald(small, formula_loc="~1+condition")
    lrt = de.test.lrt(small, full_formula_loc="~1+condition+batch", reduced_formula_loc="~1+batch",
                      size_factors="sf").summary()
    assert set(DIFFXPY_COLUMNS) <= set(lrt.columns)
    assert (lrt["df"] == 1).all()


# --------------------------------------------------------------------------- export


def test_to_anndata_round_trips_h5ad(small, small_fit, tmp_path):
    adata = small.copy()
    wald = small_fit.wald(term="condition")
    small_fit.to_anndata(adata, key="fit", test=wald)
    path = tmp_path / "out.h5ad"
    adata.write_h5ad(path)
    back = anndata.read_h5ad(path)
    np.testing.assert_array_equal(back.varm["fit_a"], small_fit.model.a.T)
    np.testing.assert_array_equal(back.varm["fit_b"], small_fit.model.b.T)
    np.testing.assert_array_equal(back.varm["fit_a_se"], small_fit.model.a_se.T)
    np.testing.assert_array_equal(back.var["fit_ll"], small_fit.log_likelihood)
    assert list(back.var["fit_status"]) == list(small_fit.status)
    np.testing.assert_array_equal(back.var["fit_converged"], small_fit.converged)
    np.testing.assert_array_equal(back.var["fit_n_steps"], small_fit.n_steps)
    np.testing.assert_array_equal(back.var["fit_test_pval"], wald["pval"])
    info = back.uns["fit"]
    assert info["formula_loc"] == "~1+condition+batch" and info["formula_scale"] == "~1"
    assert list(info["design_loc_names"]) == small_fit.model.design_loc_names
    assert info["size_factors"] == "sf" and info["training_strategy"] == "AUTO"
    assert set(info["versions"]) >= {"nbfit", "jax", "numpy"}
    assert info["versions"]["nbfit"] == nbfit.__version__
    with pytest.raises(ValueError, match="genes"):
        small_fit.to_anndata(small[:, :5].copy())


def test_save_and_load(small_fit, tmp_path):
    path = tmp_path / "fit.npz"
    small_fit.save(path)
    loaded = nbfit.load(path)
    assert isinstance(loaded, nbfit.Results)
    for name in ("a_var", "b_var", "log_likelihood", "fisher_inv", "hessian", "n_steps",
                 "converged"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(small_fit, name))
    np.testing.assert_array_equal(loaded.model.a, small_fit.model.a)
    np.testing.assert_allclose(loaded.model.mu, small_fit.model.mu, rtol=1e-14)
    np.testing.assert_array_equal(loaded.model.a_se, small_fit.model.a_se)
    assert list(loaded.status) == list(small_fit.status)
    pd.testing.assert_frame_equal(loaded.to_dataframe(), small_fit.to_dataframe())
    pd.testing.assert_frame_equal(loaded.wald(term="batch"), small_fit.wald(term="batch"))
    pd.testing.assert_frame_equal(loaded.convergence_summary(), small_fit.convergence_summary())
    assert loaded.fit_settings == small_fit.fit_settings
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises((ValueError, OSError)):
        nbfit.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(2))
    with pytest.raises(ValueError, match="not an nbfit results file"):
        nbfit.load(tmp_path / "other.npz")
