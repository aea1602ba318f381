"""The NB log-likelihood and its derivatives, each checked against an independent truth.

* ``lgamma`` / ``lgamma_ratio`` against mpmath at 40 significant digits;
* the per-observation log-likelihood against ``scipy.stats.nbinom`` / ``poisson``;
* the gene-level autodiff gradient and Hessian against finite differences of the
  objective;
* the expected location information against its closed form;
* location estimates at a fixed dispersion against statsmodels' NB GLM (IRLS).

All JAX computations run in float64 inside ``jax.enable_x64(True)``; the global JAX
configuration is never changed.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

import nbfit
from nbfit import _likelihood, _problem
from nbfit._design import DesignGroups
from nbfit._histogram import capacity, count_histogram
from nbfit._likelihood import LOG_R_CAP, STIRLING_MIN

# --------------------------------------------------------------------------- tolerances

#: Working precision (significant digits) of the mpmath references.
MPMATH_DIGITS = 40

#: lgamma / lgamma_ratio vs mpmath: |error| / max(1, |value|).
LGAMMA_RTOL = 1e-12
#: Constant-free log-likelihood vs mpmath: |error| / max(1, |value|).
LL_MPMATH_RTOL = 1e-12
#: Full log-likelihood vs scipy's nbinom.logpmf: |error| / max(1, |value|). This bounds
#: scipy's error, not nbfit's (that is the mpmath test above): scipy takes p = r/(r+mu)
#: and forms log(1 - p), which loses ~eps (r + mu) / mu relative (~1e-10 at r = 1e4,
#: mu = 1e-3); and the constant -lgamma(y+1), added separately, cancels against
#: lgamma(y+r) for small r.
NBINOM_RTOL = 1e-9
#: Log-likelihood at r = 1e8 vs the Poisson log-pmf: |error| / max(1, |value|). The NB
#: differs from the Poisson by about ((y - mu)^2 - y) / (2 r), below 1e-6 on the grid.
POISSON_RTOL = 1e-7
#: Beyond the r cap the log-likelihood is its value at the cap minus (log r - cap)^2 / 2.
CAP_ATOL = 1e-12
#: |ll| for y = 0 and mu -> 0 (eta_mean = -50): the exact value is -mu ~ -2e-22.
ZERO_MEAN_ATOL = 1e-15
#: Autodiff gradient / Hessian vs central finite differences of the objective, entrywise
#: |error| / max(1, |entry|) (observed: < 1e-10 and < 3e-9).
FD_GRAD_RTOL = 1e-6
FD_HESS_RTOL = 1e-6
#: Finite-difference steps (in the coefficients), with one Richardson extrapolation
#: (steps h and 2h): truncation O(h^4), rounding eps |f| / h (gradient) and
#: eps |f| / h^2 (Hessian, second differences of the objective) both small.
FD_GRAD_STEP = 1e-3
FD_HESS_STEP = 2e-3
#: fisher_location vs the closed form X^T diag(mu r / (mu + r)) X, and vs the observed
#: information at y = E[y] (the observed location Hessian is affine in y).
FISHER_RTOL = 1e-12
#: Location coefficients at a fixed dispersion vs statsmodels' GLM.
STATSMODELS_ATOL = 1e-6


@pytest.fixture(autouse=True)
def x64():
    """Run every test of this module in float64 without touching the global config."""
    with jax.enable_x64(True):
        yield


def _relative_error(value, truth):
    value, truth = np.asarray(value, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    return np.abs(value - truth) / np.maximum(1.0, np.abs(truth))


# --------------------------------------------------------------------------- 1. lgamma

#: Arguments of lgamma: tiny, around the Stirling switch at 10, huge.
LGAMMA_ARGS = [
    1e-6, 1e-3, 0.1, 0.5, 1.0, 1.5, 2.0, 3.7, 5.0, 9.5,
    np.nextafter(STIRLING_MIN, 0.0), STIRLING_MIN, np.nextafter(STIRLING_MIN, np.inf),
    10.5, 11.0, 25.3, 100.0, 1e3, 12345.678, 1e6, 1e8 + 0.5, 1e12,
]

#: r of lgamma_ratio: tiny, around the branch switch at r = 10, huge (the cap 1e8).
RATIO_R = [1e-6, 1e-2, 0.5, 1.0, 3.0, 9.9, 9.999999, 10.0, 10.000001, 10.1, 50.0, 1e3, 1e5, 1e8]
#: Counts from 0 to 1e6. (y between ~5e3 and ~5e4 at r = 1e8 is the cancellation region
#: of the large-r series, tested on its own below.)
RATIO_Y = [0.0, 1.0, 2.0, 3.0, 7.0, 10.0, 31.0, 100.0, 1e3, 3e3, 1e5, 1e6]


def test_lgamma_matches_mpmath():
    mpmath = pytest.importorskip("mpmath")
    x = np.asarray(LGAMMA_ARGS, dtype=np.float64)
    value = np.asarray(_likelihood.lgamma(jnp.asarray(x)))
    with mpmath.workdps(MPMATH_DIGITS):
        truth = np.array([float(mpmath.loggamma(mpmath.mpf(float(v)))) for v in x])
    error = _relative_error(value, truth)
    bad = error >= LGAMMA_RTOL
    assert not np.any(bad), dict(zip(x[bad], error[bad]))


def _ratio_truth(mpmath, y, log_r):
    """lgamma(y + r) - lgamma(r) - y log r in high precision, r = exp(log_r) exactly."""
    with mpmath.workdps(MPMATH_DIGITS):
        r = mpmath.exp(mpmath.mpf(float(log_r)))
        y = mpmath.mpf(float(y))
        return float(mpmath.loggamma(y + r) - mpmath.loggamma(r) - y * mpmath.log(r))


def test_lgamma_ratio_matches_mpmath():
    mpmath = pytest.importorskip("mpmath")
    y, r = np.meshgrid(np.asarray(RATIO_Y), np.asarray(RATIO_R), indexing="ij")
    y, log_r = y.ravel(), np.log(r.ravel())
    value = np.asarray(_likelihood.lgamma_ratio(jnp.asarray(y), jnp.asarray(log_r)))
    truth = np.array([_ratio_truth(mpmath, yy, lr) for yy, lr in zip(y, log_r)])
    error = _relative_error(value, truth)
    bad = error >= LGAMMA_RTOL
    assert not np.any(bad), [
        (float(yy), float(np.exp(lr)), float(e))
        for yy, lr, e in zip(y[bad], log_r[bad], error[bad])
    ]


# For large r and y ~ sqrt(2 r) the plain series ``(y + r - 1/2) log1p(y / r) - y``
# cancels from ~y down to ~1 (absolute error ~ y * eps, 1.8e-12 relative at r = 1e8,
# y ~ 1e4); lgamma_ratio's log1p(t) - t form must not.
def test_lgamma_ratio_large_r_cancellation():
    mpmath = pytest.importorskip("mpmath")
    y = np.unique(np.round(np.logspace(np.log10(5e3), np.log10(5e4), 60)))
    log_r = np.full(y.shape, math.log(1e8))
    value = np.asarray(_likelihood.lgamma_ratio(jnp.asarray(y), jnp.asarray(log_r)))
    truth = np.array([_ratio_truth(mpmath, yy, lr) for yy, lr in zip(y, log_r)])
    assert np.max(_relative_error(value, truth)) < LGAMMA_RTOL


# --------------------------------------------------------------------------- 2. log-likelihood


def _full_log_likelihood(mu, r, y):
    """nbfit's per-observation log-likelihood including the constant -lgamma(y + 1)."""
    eta_mean = jnp.log(jnp.asarray(mu, dtype=jnp.float64))
    eta_scale = jnp.log(jnp.asarray(r, dtype=jnp.float64))
    y = jnp.asarray(y, dtype=jnp.float64)
    value = _likelihood.log_likelihood(eta_mean, eta_scale, y)
    return np.asarray(value) - scipy.special.gammaln(np.asarray(y) + 1.0)


def _ll_grid():
    """(mu, r, y) over moderate r (1e-2 .. 1e4), both sides of the r = 10 branch switch."""
    mu = np.array([1e-3, 0.1, 1.0, 5.0, 30.0, 1e3])
    r = np.array([1e-2, 0.3, 1.0, 9.0, 11.0, 100.0, 1e4])
    y = np.array([0, 1, 2, 5, 17, 100, 1000, 20000], dtype=np.float64)
    return tuple(a.ravel() for a in np.meshgrid(mu, r, y, indexing="ij"))


def test_log_likelihood_matches_mpmath():
    mpmath = pytest.importorskip("mpmath")
    mu, r, y = _ll_grid()
    eta_mean, eta_scale = np.log(mu), np.log(r)
    value = np.asarray(
        _likelihood.log_likelihood(jnp.asarray(eta_mean), jnp.asarray(eta_scale), jnp.asarray(y))
    )
    truth = []
    with mpmath.workdps(MPMATH_DIGITS):
        for em, es, yy in zip(eta_mean, eta_scale, y):
            m, rr, k = mpmath.exp(mpmath.mpf(em)), mpmath.exp(mpmath.mpf(es)), mpmath.mpf(yy)
            truth.append(float(
                mpmath.loggamma(k + rr) - mpmath.loggamma(rr)
                + rr * mpmath.log(rr / (rr + m)) + k * mpmath.log(m / (rr + m))
            ))
    error = _relative_error(value, truth)
    worst = int(np.argmax(error))
    assert error[worst] < LL_MPMATH_RTOL, (mu[worst], r[worst], y[worst], value[worst])


def test_log_likelihood_matches_scipy_nbinom():
    mu, r, y = _ll_grid()
    value = _full_log_likelihood(mu, r, y)
    truth = scipy.stats.nbinom.logpmf(y, n=r, p=r / (r + mu))
    assert np.all(np.isfinite(value))
    error = _relative_error(value, truth)
    worst = int(np.argmax(error))
    assert error[worst] < NBINOM_RTOL, (mu[worst], r[worst], y[worst], value[worst], truth[worst])


def test_log_likelihood_tends_to_poisson_at_cap():
    mu = np.array([1e-2, 0.5, 2.0, 5.0])
    y = np.arange(9, dtype=np.float64)
    mu, y = (a.ravel() for a in np.meshgrid(mu, y, indexing="ij"))
    value = _full_log_likelihood(mu, np.full_like(mu, 1e8), y)
    truth = scipy.stats.poisson.logpmf(y, mu)
    error = _relative_error(value, truth)
    worst = int(np.argmax(error))
    assert error[worst] < POISSON_RTOL, (mu[worst], y[worst], value[worst], truth[worst])


def test_log_likelihood_beyond_cap_is_quadratic_continuation():
    eta_mean = jnp.asarray([-1.0, 0.5, 2.0])
    y = jnp.asarray([0.0, 3.0, 7.0])
    at_cap = np.asarray(_likelihood.log_likelihood(eta_mean, jnp.full(3, LOG_R_CAP), y))
    for excess in (1e-3, 0.5, 3.0):
        eta_scale = jnp.full(3, LOG_R_CAP + excess)
        beyond = np.asarray(_likelihood.log_likelihood(eta_mean, eta_scale, y))
        np.testing.assert_allclose(beyond, at_cap - 0.5 * excess**2, rtol=0, atol=CAP_ATOL)


@pytest.mark.parametrize(
    "log_r", [math.log(1e-6), 0.0, math.log(10.0), 5.0, LOG_R_CAP, LOG_R_CAP + 1]
)
def test_log_likelihood_zero_count_vanishing_mean(log_r):
    eta_mean, eta_scale, y = jnp.asarray(-50.0), jnp.asarray(log_r), jnp.asarray(0.0)
    value = _likelihood.log_likelihood(eta_mean, eta_scale, y)
    expected = -0.5 * max(0.0, log_r - LOG_R_CAP) ** 2  # 0 (up to -mu) within the cap
    assert np.isfinite(float(value))
    assert abs(float(value) - expected) < ZERO_MEAN_ATOL
    d_mean = jax.grad(_likelihood.log_likelihood, 0)(eta_mean, eta_scale, y)
    d_scale = jax.grad(_likelihood.log_likelihood, 1)(eta_mean, eta_scale, y)
    assert np.isfinite(float(d_mean)) and np.isfinite(float(d_scale))
    assert abs(float(d_mean)) < ZERO_MEAN_ATOL  # -mu r / (mu + r)


# --------------------------------------------------------------------------- 3. derivatives

N_CELLS_SMALL = 50
#: Cells of a problem summed over several tiles of CELL_TILE, the last one padded.
N_CELLS_TILED = 2 * _problem.CELL_TILE + 37

# One gene as a chunk of one; compiled once per shape (tracing happens under the x64 fixture).
def _one_gene(function):
    return jax.jit(lambda theta, problem: jax.tree_util.tree_map(lambda x: x[0], function(theta[None], problem)))


_objective = _one_gene(_problem.objective)
_derivatives = _one_gene(_problem.derivatives)
_fisher_location = _one_gene(_problem.fisher_location)


def _chunk_problem(counts, design_loc, design_scale, log_sf):
    """Problem of the genes ``counts`` (n_genes, n_cells) on the devices."""
    groups = DesignGroups(design_scale)
    histogram = count_histogram(counts, groups.inverse, len(groups.rows))
    shared = _problem.shared_arrays(design_loc, design_scale, groups, log_sf, np.float64)
    return _problem.Chunk(counts, histogram, shared, capacity(histogram.genes.size)).problem()


def _small_problem(seed=0, n_cells=N_CELLS_SMALL, one_scale=False):
    """One gene, design_loc = 1 + binary + numeric, design_scale = 1 + binary (or 1)."""
    rng = np.random.default_rng(seed)
    binary = (np.arange(n_cells) % 2).astype(np.float64)
    numeric = rng.normal(size=n_cells)
    design_loc = np.column_stack([np.ones(n_cells), binary, numeric])
    design_scale = np.ones((n_cells, 1)) if one_scale else np.column_stack([np.ones(n_cells), binary])
    log_sf = rng.normal(0.0, 0.3, n_cells)
    mu = np.exp(design_loc @ np.array([1.5, -0.7, 0.4]) + log_sf)
    r = np.exp(design_scale @ np.array([1.0, 1.5][:design_scale.shape[1]]))
    counts = rng.negative_binomial(r, r / (r + mu)).astype(np.float64)
    problem = _chunk_problem(counts[None, :], design_loc, design_scale, log_sf)
    return problem, design_loc, design_scale, log_sf, counts


#: (a, b) of the gene: log r = b0 (binary 0) and b0 + b1 (binary 1) on either side of
#: log 10 = 2.303 (the lgamma_ratio branch switch), both below, both above, and large.
THETAS = [
    [1.5, -0.7, 0.4, 1.0, 1.5],   # log r = 1.0 | 2.5: one cell group per branch
    [0.3, 0.8, -0.2, -1.5, 1.0],  # log r = -1.5 | -0.5: both below
    [2.0, 0.2, 0.6, 4.0, -1.0],   # log r = 4.0 | 3.0: both above
    [1.0, -0.3, 0.1, 12.0, 2.0],  # log r = 12 | 14: large r, below the cap
    [-0.5, 1.2, -0.8, 2.9, -1.2],  # log r = 2.9 | 1.7: other way round
]


def _central_gradient(f, theta, h):
    out = np.zeros_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        out[i] = (f(theta + e) - f(theta - e)) / (2 * h)
    return out


def _central_hessian(f, theta, h):
    n = theta.size
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            ei, ej = np.zeros(n), np.zeros(n)
            ei[i], ej[j] = h, h
            out[i, j] = out[j, i] = (
                f(theta + ei + ej) - f(theta + ei - ej) - f(theta - ei + ej) + f(theta - ei - ej)
            ) / (4 * h * h)
    return out


def _richardson(difference, f, theta, h):
    """Central difference with steps h and 2h, extrapolated (truncation O(h^4))."""
    return (4.0 * difference(f, theta, h) - difference(f, theta, 2.0 * h)) / 3.0


@pytest.mark.parametrize("theta, n_cells", [(theta, N_CELLS_SMALL) for theta in THETAS] + [(THETAS[0], N_CELLS_TILED)])
def test_derivatives_match_finite_differences(theta, n_cells):
    """At N_CELLS_TILED the cells are summed over tiles, the last one padded."""
    problem = _small_problem(n_cells=n_cells)[0]
    theta = np.asarray(theta, dtype=np.float64)
    def f(t):
        return float(_objective(jnp.asarray(t), problem))

    value, grad, hess = _derivatives(jnp.asarray(theta), problem)
    value, grad, hess = float(value), np.asarray(grad), np.asarray(hess)
    assert value == pytest.approx(f(theta), rel=1e-14, abs=1e-12)

    fd_grad = _richardson(_central_gradient, f, theta, FD_GRAD_STEP)
    assert np.max(_relative_error(grad, fd_grad)) < FD_GRAD_RTOL, (grad, fd_grad)

    fd_hess = _richardson(_central_hessian, f, theta, FD_HESS_STEP)
    np.testing.assert_array_equal(hess, hess.T)
    assert np.max(_relative_error(hess, fd_hess)) < FD_HESS_RTOL, (hess, fd_hess)


@pytest.mark.parametrize("log_r", [1.5, LOG_R_CAP + 1.0])
def test_one_scale_row_matches_the_cell_sum_and_finite_differences(log_r):
    """Dispersion ~1: r is taken per gene in the cell sums, so padding cells see the
    gene's r, and the continuation beyond the cap is summed per scale group. The value is
    the per-observation log-likelihood summed over the real cells only; gradient and
    Hessian match finite differences, below the cap and beyond it."""
    problem, design_loc, _, log_sf, counts = _small_problem(n_cells=N_CELLS_TILED, one_scale=True)
    assert problem.scale_rows.shape[0] == 1 and problem.counts.shape[1] > N_CELLS_TILED  # padded
    theta = np.array([1.5, -0.7, 0.4, log_r])
    cells = _likelihood.log_likelihood(jnp.asarray(design_loc @ theta[:3] + log_sf),
                                       jnp.full(N_CELLS_TILED, log_r), jnp.asarray(counts))
    value, grad, hess = (np.asarray(x) for x in _derivatives(jnp.asarray(theta), problem))
    assert float(value) == pytest.approx(float(jnp.sum(cells)), rel=1e-13)

    def f(t):
        return float(_objective(jnp.asarray(t), problem))

    fd_grad = _richardson(_central_gradient, f, theta, FD_GRAD_STEP)
    assert np.max(_relative_error(grad, fd_grad)) < FD_GRAD_RTOL
    fd_hess = _richardson(_central_hessian, f, theta, FD_HESS_STEP)
    assert np.max(_relative_error(hess, fd_hess)) < FD_HESS_RTOL


# --------------------------------------------------------------------------- 4. Fisher


@pytest.mark.parametrize("theta", THETAS + [[1.0, 0.5, -0.3, 17.0, 3.0]])  # last: beyond the cap
def test_fisher_location_closed_form(theta):
    problem, design_loc, design_scale, log_sf, counts = _small_problem(seed=3)
    theta = np.asarray(theta, dtype=np.float64)
    value, grad_loc, info = _fisher_location(jnp.asarray(theta), problem)
    p_loc = design_loc.shape[1]
    a, b = theta[:p_loc], theta[p_loc:]
    mu = np.exp(design_loc @ a + log_sf)
    r = np.exp(np.minimum(design_scale @ b, LOG_R_CAP))
    weights = mu * r / (mu + r)
    expected = design_loc.T @ (weights[:, None] * design_loc)
    np.testing.assert_allclose(np.asarray(info), expected, rtol=FISHER_RTOL, atol=0)

    # Value and location gradient agree with the joint derivatives.
    full_value, full_grad, _ = _derivatives(jnp.asarray(theta), problem)
    assert float(value) == pytest.approx(float(full_value), rel=1e-14)
    np.testing.assert_allclose(
        np.asarray(grad_loc), np.asarray(full_grad)[:p_loc], rtol=1e-12, atol=1e-10
    )

    # The observed location Hessian is affine in y, so its expectation is its value at
    # y = E[y] = mu: the expected information is minus that.
    at_mean = problem._replace(counts=jnp.asarray(mu[None, :]))
    _, _, hess = _derivatives(jnp.asarray(theta), at_mean)
    np.testing.assert_allclose(
        np.asarray(info), -np.asarray(hess)[:p_loc, :p_loc], rtol=FISHER_RTOL, atol=0
    )


# --------------------------------------------------------------------------- 5. statsmodels


def test_location_at_fixed_dispersion_matches_statsmodels():
    sm = pytest.importorskip("statsmodels.api")
    rng = np.random.default_rng(42)
    n_cells, n_genes = 200, 5
    condition = (rng.random(n_cells) < 0.5).astype(np.float64)
    numeric = rng.normal(size=n_cells)
    design = np.column_stack([np.ones(n_cells), condition, numeric])
    names = ["Intercept", "condition[T.B]", "numeric"]
    sf = np.exp(rng.normal(0.0, 0.3, n_cells))
    true_a = np.stack(
        [rng.uniform(0.0, 3.0, n_genes), rng.normal(0, 0.7, n_genes), rng.normal(0, 0.3, n_genes)]
    )
    r = np.array([0.5, 2.0, 5.0, 20.0, 200.0])  # one fixed r per gene, both sides of 10
    mu = sf[:, None] * np.exp(design @ true_a)
    counts = rng.negative_binomial(r, r / (r + mu)).astype(np.float64)

    est = nbfit.fit(
        counts,
        dmat_loc=(design, names),
        dmat_scale=(np.ones((n_cells, 1)), ["Intercept"]),
        size_factors=sf,
        init_b=np.log(r)[None, :],
        training_strategy=[{"method": "newton", "update_scale": False}],
    )
    np.testing.assert_array_equal(est.b_var, np.log(r)[None, :])  # the scale stayed fixed
    assert est.a_var.shape == (3, n_genes)

    for j in range(n_genes):
        family = sm.families.NegativeBinomial(alpha=1.0 / r[j])
        glm = sm.GLM(counts[:, j], design, family=family, offset=np.log(sf))
        result = glm.fit(tol=1e-12, maxiter=200)
        assert result.converged
        np.testing.assert_allclose(est.a_var[:, j], result.params, rtol=0, atol=STATSMODELS_ATOL,
                                   err_msg=f"gene {j} (r = {r[j]})")


def test_count_histogram_matches_a_tally_of_every_gene(monkeypatch):
    """Distinct (count, group) pairs and multiplicities, small counts (bincount) and large
    ones (sorted) alike, over several gene blocks."""
    from nbfit import _histogram

    monkeypatch.setattr(_histogram, "BLOCK", 300)  # blocks of 5 genes of 60 cells
    rng = np.random.default_rng(5)
    counts = rng.negative_binomial(0.7, 0.7 / (0.7 + np.exp(rng.uniform(-3, 7, (23, 1)))), (23, 60))
    counts[3, :4] = 10**7
    counts[-1] = 0
    groups = rng.integers(0, 3, 60)
    histogram = count_histogram(counts.astype(float), groups, 3)
    assert np.all(np.diff(histogram.genes) >= 0)
    for gene in range(counts.shape[0]):
        pairs, weights = np.unique(np.stack([counts[gene], groups]), axis=1, return_counts=True)
        mine = histogram.genes == gene
        got = sorted(zip(histogram.values[mine], histogram.groups[mine], histogram.weights[mine]))
        assert got == sorted(zip(pairs[0].astype(float), pairs[1], weights))


def test_histogram_layout_and_selection_keep_every_entry():
    """select_genes renumbers the chosen genes' entries; device_layout puts each gene's
    entries in its device's block with local rows, sorted, and pads with weight 0."""
    from nbfit._histogram import device_layout, select_genes

    rng = np.random.default_rng(6)
    counts = rng.poisson(rng.uniform(0, 30, (12, 1)), (12, 80)).astype(float)
    histogram = count_histogram(counts, np.zeros(80, int), 1)
    rows = np.array([7, 2, 11, 2, 0, 5])
    chosen = select_genes(histogram, rows)
    for new, old in enumerate(rows):
        np.testing.assert_array_equal(chosen.values[chosen.genes == new], histogram.values[histogram.genes == old])
    size = capacity(histogram.genes.size)
    genes, groups, values, weights = device_layout(histogram, 12, 3, size)
    for device in range(3):
        block = slice(device * size, (device + 1) * size)
        assert np.all(np.diff(genes[block]) >= 0) and genes[block].max() <= 3
        for local in range(4):
            mine = (genes[block] == local) & (weights[block] > 0)
            gene = device * 4 + local
            np.testing.assert_array_equal(values[block][mine], histogram.values[histogram.genes == gene])
    assert weights.sum() == counts.size
    with pytest.raises(ValueError, match="do not fit"):
        device_layout(histogram, 12, 3, 4)


def test_written_out_count_derivatives_match_autodiff():
    """count_part_derivatives against forward-mode autodiff of count_part (checked against
    mpmath above) on both sides of r = 10, from r = 1e-4 to the cap and beyond, y to 1e5."""
    y, eta_scale = (np.array(v, dtype=np.float64).ravel() for v in np.meshgrid(
        [0.0, 1.0, 2.0, 5.0, 9.0, 30.0, 1e3, 1e5],
        [-9.0, -2.0, 0.0, 1.5, math.log(STIRLING_MIN) - 1e-9, math.log(STIRLING_MIN), 3.0, 7.0, 12.0,
         LOG_R_CAP - 1e-6, LOG_R_CAP + 1.0]))

    def first(eta):
        return jax.jvp(lambda e: _likelihood.count_part(y, e), (eta,), (jnp.ones_like(eta),))

    (value, d1), (_, d2) = jax.jvp(first, (eta_scale,), (jnp.ones_like(eta_scale),))
    written = _likelihood.count_part_derivatives(y, eta_scale)
    for name, got, want in zip(["value", "first", "second"], written, (value, d1, d2)):
        want = np.asarray(want)
        scale = np.maximum(1.0, np.abs(want))
        assert np.max(np.abs(np.asarray(got) - want) / scale) < 1e-11, name


def test_written_out_cell_derivatives_match_autodiff():
    """mean_part_derivatives against JAX autodiff of mean_part (itself checked against
    mpmath and scipy above), below and beyond the r cap and for extreme means."""
    eta_mean, eta_scale, y = (np.array(v, dtype=np.float64).ravel() for v in np.meshgrid(
        [-40.0, -3.0, 0.0, 0.7, 6.0, 30.0], [-9.0, -0.5, 2.0, 12.0, LOG_R_CAP - 1e-3, LOG_R_CAP + 2.0],
        [0.0, 1.0, 7.0, 500.0]))
    d_mean = jax.grad(_likelihood.mean_part, 0)
    d_scale = jax.grad(_likelihood.mean_part, 1)
    expected = [jax.vmap(f)(eta_mean, eta_scale, y) for f in (
        _likelihood.mean_part, d_mean, d_scale, jax.grad(d_mean, 0), jax.grad(d_mean, 1), jax.grad(d_scale, 1))]
    written = _likelihood.mean_part_derivatives(eta_mean, eta_scale, y)
    for name, got, want in zip(["value", "d_m", "d_s", "d_mm", "d_ms", "d_ss"], written, expected):
        want = np.asarray(want)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max(), err_msg=name)


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_jacobi_eigen_matches_lapack(n):
    """Cyclic Jacobi (used instead of LAPACK syevd under vmap) on ill-conditioned and
    indefinite symmetric matrices: reconstruction, orthogonality and eigenvalues to rounding."""
    from nbfit._solvers._common import symmetric_eigen

    rng = np.random.default_rng(n)
    matrices = []
    for _ in range(50):
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        values = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-14, 4, n)
        matrices.append((q * values) @ q.T)
    matrices = np.array([(m + m.T) / 2 for m in matrices])
    with jax.enable_x64(True):
        values, vectors = jax.jit(jax.vmap(symmetric_eigen))(jnp.asarray(matrices))
    values, vectors = np.asarray(values), np.asarray(vectors)
    scale = np.abs(matrices).max(axis=(1, 2))[:, None, None]
    rebuilt = np.einsum("gij,gj,gkj->gik", vectors, values, vectors)
    assert np.all(np.abs(rebuilt - matrices) / scale < 1e-13)
    assert np.abs(np.einsum("gji,gjk->gik", vectors, vectors) - np.eye(n)).max() < 1e-13
    np.testing.assert_allclose(np.sort(values, axis=1), np.linalg.eigvalsh(matrices),
                               atol=1e-13 * scale.max(), rtol=0)


def _eigen_modified_direction(matrix, grad):
    """numpy reference: V diag(1/max(|lambda|, floor)) V^T grad for ``matrix`` = -H."""
    values, vectors = np.linalg.eigh(matrix)
    magnitude = np.abs(values)
    floor = 100.0 * np.finfo(np.float64).eps * magnitude.max() + np.finfo(np.float64).tiny
    return vectors @ ((vectors.T @ grad) / np.maximum(magnitude, floor))


def test_ascent_direction_is_the_newton_step_or_the_modified_one():
    """The unrolled Cholesky step equals a linear solve for definite -H (condition up to
    1e10); indefinite or singular ones are flagged and get the |eigenvalue| direction."""
    from nbfit._solvers._common import _cholesky_direction, ascent_direction

    rng = np.random.default_rng(7)
    n, genes = 5, 60
    matrices, grads = [], rng.normal(size=(genes, n))
    definite = np.ones(genes, bool)
    for k in range(genes):
        q, _ = np.linalg.qr(rng.normal(size=(n, n)))
        values = 10.0 ** rng.uniform(-6, 4, n)
        if k % 3 == 1:
            values[0] = -values[0]  # indefinite
        if k % 6 == 2:
            values[0] = 0.0  # singular
        definite[k] = values.min() > 0
        matrices.append((q * values) @ q.T)
    matrices = np.array([(m + m.T) / 2 for m in matrices])
    with jax.enable_x64(True):
        newton, flagged = jax.jit(_cholesky_direction)(jnp.asarray(matrices), jnp.asarray(grads))
        direction = jax.jit(ascent_direction)(jnp.asarray(grads), -jnp.asarray(matrices), jnp.ones(n, bool),
                                              jnp.ones(genes, bool))
    np.testing.assert_array_equal(np.asarray(flagged), definite)
    solved = np.linalg.solve(matrices[definite], grads[definite][..., None])[..., 0]
    np.testing.assert_allclose(np.asarray(newton)[definite], solved, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(direction)[definite], solved, rtol=1e-6)
    for k in np.flatnonzero(~definite):
        want = _eigen_modified_direction(matrices[k], grads[k])
        np.testing.assert_allclose(np.asarray(direction)[k], want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
        assert grads[k] @ np.asarray(direction)[k] > 0  # an ascent direction


def test_steps_are_cut_at_the_log_r_cap():
    """A step crossing the cap ends on it if that keeps half of it, else at the first
    halving below it; at the cap a single scale coefficient stops moving up."""
    import types

    from nbfit._solvers._common import within_cap

    one_scale = types.SimpleNamespace(design_loc=np.zeros((1, 2)), scale_rows=np.ones((1, 1)))
    b = LOG_R_CAP - np.array([10.0, 0.7, 0.3, 0.0, 0.0])
    theta = np.stack([np.zeros(5), np.zeros(5), b], axis=1)
    direction = np.array([[0.1, 0.2, 1.0]] * 4 + [[0.1, 0.2, -1.0]])
    with jax.enable_x64(True):
        cut, first = within_cap(jnp.asarray(theta), jnp.asarray(direction), one_scale)
    np.testing.assert_allclose(np.asarray(first), [1.0, 0.7, 0.25, 1.0, 1.0])
    expected = direction.copy()
    expected[3, 2] = 0.0  # at the cap, rising: the scale part is dropped
    np.testing.assert_array_equal(np.asarray(cut), expected)
    # Two scale coefficients (two groups): cut the same way, but never dropped.
    two_scales = types.SimpleNamespace(design_loc=np.zeros((1, 1)), scale_rows=np.array([[1.0, 0.0], [1.0, 1.0]]))
    theta = np.array([[0.0, LOG_R_CAP - 2.0, 1.4], [0.0, LOG_R_CAP, 0.0]])
    direction = np.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
    with jax.enable_x64(True):
        cut, first = within_cap(jnp.asarray(theta), jnp.asarray(direction), two_scales)
    np.testing.assert_allclose(np.asarray(first), [0.25, 1.0])  # group 2 reaches the cap after 0.3
    np.testing.assert_array_equal(np.asarray(cut), direction)


def test_histogram_capacity_rounds_up_by_at_most_a_quarter():
    loads = np.arange(1, 70000)
    sizes = np.array([capacity(n) for n in loads])
    assert np.all(sizes >= np.maximum(loads, 256))
    assert np.all(sizes[loads >= 256] <= 1.25 * loads[loads >= 256])
    assert len(np.unique(sizes)) <= 4 * 9  # four sizes per octave from 256


def test_newton_stops_once_the_next_step_is_predicted_negligible():
    """The prediction d^3 / d_prev^2 stops a gene only after a quadratic full step, from
    the third step on, with a small decrement resolved above rounding, a small predicted
    step, and contraction."""
    from nbfit._solvers._common import LineSearchResult, predicted_converged

    value = np.full(8, -1000.0)
    decrement = np.full(8, 1e-5)  # 1e-8 relative
    previous = np.full(8, 1e-1)  # contraction 1e-4: next decrement 1e-13, 1e-16 relative
    gained = value + 0.5 * decrement
    gained[1] = value[1] + 0.45 * decrement[1]  # not what the quadratic model said
    n_steps = np.full(8, 2)
    n_steps[2] = 1  # second step: the contraction from the start is no guide
    previous[3] = 1e-4  # contraction 0.1: next decrement 1e-7, far above tol / 100
    decrement[4], previous[4] = 2e-3, 1e3  # 2e-6 relative: too far out to trust
    direction = np.full((8, 3), 1e-4)  # the next step: 1e-8
    direction[5, 1] = 1e-2  # the next step would still move a coefficient by 1e-6
    accepted = np.ones(8, bool)
    accepted[6] = False

    def stop(dtype):
        search = LineSearchResult(jnp.zeros((8, 3), dtype), jnp.asarray(gained, dtype),
                                  jnp.asarray(accepted))
        floats = [jnp.asarray(x, dtype) for x in (decrement, previous, direction)]
        return np.asarray(predicted_converged(*floats, search, jnp.asarray(value, dtype), 1e-10,
                                              jnp.asarray(n_steps)))

    with jax.enable_x64(True):
        expected = [True, False, False, False, False, False, False, True]
        np.testing.assert_array_equal(stop(jnp.float64), expected)
        # float32 cannot resolve a gain of 5e-9 relative: never predicted.
        assert not stop(jnp.float32).any()
