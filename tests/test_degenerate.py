"""Degenerate genes: finite results, the right status, and no effect on the others (issue 4).

One count matrix mixes regular genes with every kind of degenerate gene (no counts, one
count, a group of zeros, counts in the millions, no or extreme overdispersion). In float64
each degenerate gene gets the status it deserves and every regular gene's fit is exactly
the fit made without the degenerate genes. In float32 every output is still finite and
every gene carries a status; where float32 cannot resolve the likelihood (counts >= 1e6,
separation) the status is not yet the float64 one: those cases are marked xfail below and
reported as engine issues (docs/robustness.md, "float32").
"""

import numpy as np
import pytest

import nbfit
from conftest import fit_scenario, load_scenario
from nbfit._status import STATUS_NAMES

N_CELLS = 200
FORMULA = "~1+condition"
#: Regular genes fitted with or without the degenerate ones: the same to rounding.
SAME_RTOL = 1e-10
SAME_ATOL = 1e-10

#: Each degenerate gene and its float64 status.
EXPECTED = {
    "all_zero": "all_zero",
    "single_1_in_A": "separated",  # condition B has only zeros (and A is underdispersed)
    "single_5_in_B": "separated",
    "zeros_in_group_A": "separated",  # complete separation: B ~ NB(3, 2), A all 0
    "counts_4e6": "converged",  # NB(mean 4e6, r 20): counts 2.0e6 to 6.3e6
    "counts_5e7": "converged",  # NB(mean 5e7, r 5): counts up to ~1e8 (> 2**24)
    "binomial_underdispersed": "poisson_limit",  # Var < mean: the likelihood rises to r = inf
    "constant_3": "poisson_limit",  # every count 3: Var = 0
    "overdispersed_r0.01": "converged",  # NB(mean 20, r 0.01): ~92% zeros, up to a few thousand
    "overdispersed_r0.05_mean1e3": "converged",
}
N_REGULAR = 6
#: Statuses whose covariances may be NaN by design (information singular or not finite;
#: for separated genes it is singular to working precision).
NO_COVARIANCE = ("all_zero", "singular", "nonfinite", "separated")


def _degenerate_counts(condition_b, rng):
    def nb(mean, r):
        return rng.negative_binomial(r, r / (r + mean), N_CELLS).astype(float)

    genes = {name: np.zeros(N_CELLS) for name in ("all_zero", "single_1_in_A", "single_5_in_B")}
    genes["single_1_in_A"][np.flatnonzero(~condition_b)[0]] = 1
    genes["single_5_in_B"][np.flatnonzero(condition_b)[3]] = 5
    genes["zeros_in_group_A"] = np.where(condition_b, nb(3.0, 2.0), 0.0)
    genes["counts_4e6"] = nb(4e6, 20.0)
    genes["counts_5e7"] = nb(5e7, 5.0)
    genes["binomial_underdispersed"] = rng.binomial(8, 0.5, N_CELLS).astype(float)
    genes["constant_3"] = np.full(N_CELLS, 3.0)
    genes["overdispersed_r0.01"] = nb(20.0, 0.01)
    genes["overdispersed_r0.05_mean1e3"] = nb(1e3, 0.05)
    assert list(genes) == list(EXPECTED)
    return genes


@pytest.fixture(scope="module")
def mixed():
    """(counts, obs, names, n_degenerate): degenerate genes first, then regular ones."""
    regular = nbfit.simulate(n_cells=N_CELLS, n_genes=N_REGULAR, seed=12)
    obs = regular.obs
    genes = _degenerate_counts((obs["condition"] == "B").to_numpy(), np.random.default_rng(12))
    counts = np.column_stack([*genes.values(), np.asarray(regular.X)])
    names = list(genes) + [f"regular_{k}" for k in range(N_REGULAR)]
    assert counts[:, list(genes).index("counts_4e6")].min() >= 1e6
    return counts, obs, names


def _fit(counts, obs, names, **options):
    return nbfit.fit(counts, sample_description=obs, gene_names=names, formula_loc=FORMULA, **options)


@pytest.fixture(scope="module")
def fit64(mixed):
    return _fit(*mixed)


@pytest.fixture(scope="module")
def fit32(mixed):
    return _fit(*mixed, dtype="float32")


def _assert_finite(est, covariances=True, no_covariance=()):
    """Every output finite; covariances only NaN where the status says there is none (or
    for the genes named in ``no_covariance``)."""
    model = est.model
    for name, values in [("a", model.a), ("b", model.b), ("ll", est.log_likelihood),
                         ("mu", model.mu), ("phi", model.phi), ("eta_loc", model.eta_loc)]:
        bad = ~np.isfinite(values)
        assert not bad.any(), f"{name} not finite for {list(est.gene_names[np.nonzero(bad)[-1]])}"
    assert set(est.status) <= set(STATUS_NAMES)
    if not covariances:
        return
    has_covariance = ~np.isin(est.status, NO_COVARIANCE) & ~np.isin(est.gene_names, no_covariance)
    assert np.isfinite(est.fisher_inv[has_covariance]).all()
    assert np.all(np.isfinite(est.jacobian[est.status != "nonfinite"]))
    assert np.all(np.isfinite(est.hessian[est.status != "nonfinite"]))
    assert np.all(np.isnan(est.fisher_inv[np.isin(est.status, ("all_zero", "singular", "nonfinite"))]))


def test_float64_statuses(fit64):
    _assert_finite(fit64)
    status = dict(zip(fit64.gene_names, fit64.status))
    for gene, expected in EXPECTED.items():
        assert status[gene] == expected, (gene, status[gene])
    np.testing.assert_array_equal(fit64.status[len(EXPECTED):], "converged")


def test_float64_degenerate_fits_are_sensible(mixed, fit64):
    counts, obs, names = mixed
    a, b, ll = fit64.model.a, fit64.model.b, fit64.log_likelihood
    column = {name: k for k, name in enumerate(names)}
    # all zero: ll = 0 (its supremum), mean ~1e-20.
    assert ll[column["all_zero"]] == 0 and fit64.model.mu[:, column["all_zero"]].max() < 1e-15
    # separated: the all-zero group's mean is (numerically) 0, the other group's is its mean.
    mu = fit64.model.mu[:, column["zeros_in_group_A"]]
    condition_b = (obs["condition"] == "B").to_numpy()
    assert mu[~condition_b].max() < 1e-10
    np.testing.assert_allclose(mu[condition_b].mean(), counts[condition_b, column["zeros_in_group_A"]].mean(),
                               rtol=1e-6)
    # Poisson limit: steps are cut at the cap, so log r ends on it (or within AT_CAP of a
    # step below it), and the fit converges.
    for gene in ("binomial_underdispersed", "constant_3"):
        assert np.log(1e8) - 1e-3 <= b[0, column[gene]] <= np.log(1e8)
        assert fit64.converged[column[gene]]
    # Large counts: the intercept is the log of the group mean.
    for gene in ("counts_4e6", "counts_5e7"):
        y = counts[~condition_b, column[gene]]
        assert a[0, column[gene]] == pytest.approx(np.log(y.mean()), abs=1e-8)
    # Extreme overdispersion: a small r, still with standard errors.
    for gene in ("overdispersed_r0.01", "overdispersed_r0.05_mean1e3"):
        assert b[0, column[gene]] < -2 and np.isfinite(fit64.b_se[0, column[gene]])


def test_regular_genes_unaffected_by_degenerate_ones(mixed, fit64):
    counts, obs, names = mixed
    k = len(EXPECTED)
    alone = _fit(counts[:, k:], obs, names[k:])
    np.testing.assert_allclose(alone.a_var, fit64.a_var[:, k:], rtol=SAME_RTOL, atol=SAME_ATOL)
    np.testing.assert_allclose(alone.b_var, fit64.b_var[:, k:], rtol=SAME_RTOL, atol=SAME_ATOL)
    np.testing.assert_allclose(alone.log_likelihood, fit64.log_likelihood[k:], rtol=SAME_RTOL)
    np.testing.assert_allclose(alone.fisher_inv, fit64.fisher_inv[k:], rtol=1e-8, atol=1e-14)
    np.testing.assert_array_equal(alone.status, fit64.status[k:])


def test_float32_finite_with_a_status(fit32, fit64):
    """float32 with counts up to 1e8: nothing overflows to inf/NaN and every gene has a status.

    Covariances may be NaN where float64 has none and for the genes float32 does not fit
    right yet (FLOAT32_KNOWN below: e.g. counts_4e6 stops with an indefinite Hessian).
    """
    no_covariance = list(fit64.gene_names[np.isin(fit64.status, NO_COVARIANCE)]) + list(FLOAT32_KNOWN)
    _assert_finite(fit32, no_covariance=no_covariance)
    assert fit32.status[0] == "all_zero"
    regular = slice(len(EXPECTED), None)
    np.testing.assert_array_equal(fit32.status[regular], "converged")
    error = np.abs(fit32.a_var[:, regular] - fit64.a_var[:, regular]) / fit64.a_se[:, regular]
    assert error.max() <= 0.02  # the float32 tolerance of tests/test_properties.py
    # Separated genes are never reported as converged, whatever float32 reaches.
    separated = fit64.status == "separated"
    assert not np.any(fit32.status[separated] == "converged")


#: float32 cases whose status or fit does not match float64 yet (see the module docstring).
FLOAT32_KNOWN = {
    "single_1_in_A": "stops at a mean ~1e-9 in B (gains below float32 resolution): poisson_limit",
    "single_5_in_B": "runs to max_steps with the zero group's mean ~1e-9",
    "zeros_in_group_A": "runs to max_steps with the zero group's mean ~6e-7",
    "counts_4e6": "ll sums of ~1e7 per cell resolve only ~500: b goes to -5.7, status singular",
    "counts_5e7": "counts above 2**24 are not exact in float32: nonfinite, a far off",
    "overdispersed_r0.05_mean1e3": "ll off by 0.07; runs to max_steps though a is right",
    "overdispersed_r0.01": "ll of -149 from lgamma terms of ~1e4 per count that cancel: float32 "
                           "resolves it to ~2e-3 (1.4e-5 relative); a and b match float64 to 1e-4",
}


@pytest.mark.parametrize("gene", list(EXPECTED))
def test_float32_status_matches_float64(fit32, fit64, gene, request):
    if gene in FLOAT32_KNOWN:
        request.applymarker(pytest.mark.xfail(reason=FLOAT32_KNOWN[gene], strict=False))
    k = list(fit64.gene_names).index(gene)
    assert fit32.status[k] == fit64.status[k]
    if fit64.status[k] != "all_zero":
        ll = fit64.log_likelihood[k]
        assert abs(fit32.log_likelihood[k] - ll) <= 1e-5 * max(1.0, abs(ll))


def test_sim_edge_every_gene_has_its_expected_status():
    """The shared sim_edge reference: each edge case's status follows the gold's flags.

    Precedence as in nbfit._status: all_zero, then separated, then poisson_limit.
    """
    scenario = load_scenario("sim_edge")
    est = fit_scenario("sim_edge")
    gold = scenario.gold
    expected = np.where(gold["all_zero"], "all_zero", np.where(
        gold["separated"], "separated", np.where(gold["poisson_limit"], "poisson_limit", "converged")))
    mismatch = est.status != expected
    assert not mismatch.any(), list(zip(gold["gene"][mismatch], est.status[mismatch], expected[mismatch]))
    _assert_finite(est, covariances=False)  # covariances: see the next test
    regular = ~(gold["all_zero"] | gold["separated"] | gold["poisson_limit"]).to_numpy()
    ll = gold["ll"].to_numpy()
    np.testing.assert_allclose(est.log_likelihood[regular], ll[regular], rtol=1e-6)


def test_sim_edge_covariances_do_not_raise():
    est = fit_scenario("sim_edge")
    _assert_finite(est)
    wald = est.wald(coef="condition[T.B]")
    status = est.status
    testable = ~np.isin(status, ["separated", "all_zero", "singular", "nonfinite", "max_steps", "stalled"])
    assert np.all(np.isfinite(wald["pval"].to_numpy()[testable]))
    assert np.all(np.isnan(wald["pval"].to_numpy()[~testable]))
    assert np.all(np.isfinite(est.a_se[:, testable]))
