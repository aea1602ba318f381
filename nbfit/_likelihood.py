"""The negative-binomial log-likelihood of one observation, and its derivatives.

Everything is written in the two linear predictors of an observation:
``eta_mean = log(mu)`` (the location linear predictor plus the log size factor) and
``eta_scale = log(r)``. The log-likelihood is split into ``count_part`` (depends on the
count and r only) and ``mean_part``; each comes with its first and second derivatives
written out (``count_part_derivatives``, ``mean_part_derivatives``, tested against JAX
autodiff of the value functions). Gene-level gradients and Hessians are assembled from
them with the design matrices in :mod:`nbfit._problem`.

The log-gamma differences are evaluated without cancellation and without special
functions: a Stirling series for arguments >= ``STIRLING_MIN`` and the recurrence
``lgamma(x) = lgamma(x + 10) - log(x (x+1) ... (x+9))`` below it. Their derivatives
(digamma, trigamma) are then elementary too, which is several times cheaper than
``jax.scipy.special.polygamma``.
"""

import math

import jax.numpy as jnp

#: log r is capped here (r <= 1e8): beyond it the NB is a Poisson to within 1e-8 per count.
LOG_R_CAP = math.log(1e8)

#: Below this argument, log-gamma is shifted up by the recurrence before Stirling applies.
STIRLING_MIN = 10.0

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_SHIFT = 10


#: Coefficients c_k of the Stirling tail: sum_k c_k x^-(2k+1).
_TAIL = (1.0 / 12.0, -1.0 / 360.0, 1.0 / 1260.0, -1.0 / 1680.0, 1.0 / 1188.0, -691.0 / 360360.0)


def _stirling_tail(x):
    """Stirling series of ``lgamma(x) - ((x - 1/2) log x - x + log(2 pi)/2)``, x >= 10.

    The truncation error is below 1e-15 for x >= 10.
    """
    inv = 1.0 / x
    inv2 = inv * inv
    series = 0.0
    for c in reversed(_TAIL):
        series = c + inv2 * series
    return inv * series


def _stirling_tail_derivatives(x):
    """First and second derivatives of :func:`_stirling_tail`, x >= 10."""
    inv = 1.0 / x
    inv2 = inv * inv
    first, second = 0.0, 0.0
    for k in reversed(range(len(_TAIL))):
        first = inv2 * first - (2 * k + 1) * _TAIL[k]
        second = inv2 * second + (2 * k + 1) * (2 * k + 2) * _TAIL[k]
    return inv2 * first, inv2 * inv * second


def _digamma_trigamma(x):
    """digamma and trigamma for x > 0: the derivatives of :func:`lgamma`, written out."""
    small = x < STIRLING_MIN
    x_small = jnp.where(small, x, 1.0)
    z = jnp.where(small, x_small + _SHIFT, x)
    tail_1, tail_2 = _stirling_tail_derivatives(z)
    digamma = jnp.log(z) - 0.5 / z + tail_1
    trigamma = 1.0 / z + 0.5 / (z * z) + tail_2
    shift_1, shift_2 = 0.0, 0.0
    for k in range(_SHIFT):
        inverse = 1.0 / (x_small + k)
        shift_1, shift_2 = shift_1 + inverse, shift_2 + inverse * inverse
    return jnp.where(small, digamma - shift_1, digamma), jnp.where(small, trigamma + shift_2, trigamma)


def _lgamma_large(x):
    """log-gamma for x >= STIRLING_MIN."""
    return (x - 0.5) * jnp.log(x) - x + _HALF_LOG_2PI + _stirling_tail(x)


def lgamma(x):
    """log-gamma for x > 0, from elementary functions only (so its derivatives are too)."""
    small = x < STIRLING_MIN
    # Double `where`: each branch sees a safe argument so that neither the value nor the
    # derivative of the branch that is not taken can be NaN.
    x_small = jnp.where(small, x, 1.0)
    x_large = jnp.where(small, STIRLING_MIN, x)
    product = x_small
    for k in range(1, _SHIFT):
        product = product * (x_small + k)
    shifted = _lgamma_large(x_small + _SHIFT) - jnp.log(product)
    return jnp.where(small, shifted, _lgamma_large(x_large))


def _log1p_minus_x(t):
    """``log1p(t) - t`` for t >= 0 without cancellation (series below 0.01)."""
    small = t < 0.01
    ts = jnp.where(small, t, 0.0)
    series = 0.0
    for k in range(9, 1, -1):
        series = ts * ((-1.0) ** (k + 1) / k + series)
    series = ts * series
    tl = jnp.where(small, 1.0, t)
    return jnp.where(small, series, jnp.log1p(tl) - tl)


def lgamma_ratio(y, log_r):
    """``lgamma(y + r) - lgamma(r) - y * log(r)`` without cancellation, r = exp(log_r).

    For large r both log-gammas are huge and nearly equal; the Stirling form
    ``(y + r - 1/2) log1p(t) - y + tail(y + r) - tail(r)``, t = y / r, written for t < 1
    as ``r ((1 + t) (log1p(t) - t) + t^2) - log1p(t) / 2 + ...``, keeps full precision and
    tends to 0 as r -> infinity (the Poisson limit).
    """
    r = jnp.exp(log_r)
    large = r >= STIRLING_MIN
    r_large = jnp.where(large, r, STIRLING_MIN)
    t = y / r_large
    # y << r: the plain form cancels from ~y down to ~y^2/r; y >~ r: the rewritten one does.
    small_t = t < 1.0
    t_small = jnp.where(small_t, t, 0.0)
    rewritten = r_large * ((1.0 + t_small) * _log1p_minus_x(t_small) + t_small**2)
    plain = (y + r_large) * jnp.log1p(t) - y
    series = jnp.where(small_t, rewritten, plain) - 0.5 * jnp.log1p(t)
    tail_y, tail_r = _stirling_tail(jnp.stack([y + r_large, r_large]))  # one code path for both
    series = series + tail_y - tail_r
    r_small = jnp.where(large, 1.0, r)
    log_r_small = jnp.where(large, 0.0, log_r)
    lgamma_y, lgamma_r = lgamma(jnp.stack([y + r_small, r_small]))
    direct = lgamma_y - lgamma_r - y * log_r_small
    return jnp.where(large, series, direct)


# The functions evaluated per cell below avoid comparisons and `where`: on the CPU, XLA
# vectorises min, max, abs and sign but not selects on a computed predicate, which then
# cost several times an `exp`.


def _capped(eta_scale):
    """(log r used by the likelihood, excess of eta_scale over the cap)."""
    return jnp.minimum(eta_scale, LOG_R_CAP), jnp.maximum(eta_scale - LOG_R_CAP, 0.0)


def _y_eta_mean(y, eta_mean):
    """``y * eta_mean``, 0 for y = 0 even where eta_mean = -inf (mu = 0)."""
    return y * jnp.maximum(eta_mean, jnp.finfo(eta_mean.dtype).min)


def count_part(y, eta_scale):
    """``lgamma(y + r) - lgamma(r) - y log r``: the part that depends on (y, r) only."""
    log_r, _ = _capped(eta_scale)
    return lgamma_ratio(y, log_r)


def count_part_derivatives(y, eta_scale):
    """:func:`count_part` and its first and second derivatives in ``eta_scale``, written out.

    With ``D = r d/dr`` (the derivative in log r): for r < 10, ``D = r (digamma(y + r) -
    digamma(r)) - y`` and ``D^2 = D + y + r^2 (trigamma(y + r) - trigamma(r))``; for r >= 10
    they are those of the Stirling form of :func:`lgamma_ratio`, ``D = r (log1p(t) - t) +
    t / (2 (1 + t)) + r (tail'(y + r) - tail'(r))`` (t = y / r, no cancellation as
    r -> infinity). Beyond the cap both are 0. Several times cheaper to compile than
    autodiff through :func:`lgamma_ratio`'s branches.

    Returns
    -------
    value, first, second
        Each of the broadcast shape of the arguments.
    """
    log_r, beyond_cap = _capped(eta_scale)
    r = jnp.exp(log_r)
    large = r >= STIRLING_MIN
    # Stirling form (r >= 10).
    r_large = jnp.where(large, r, STIRLING_MIN)
    t = y / r_large
    small_t = t < 1.0
    log1p_minus_t = jnp.where(small_t, _log1p_minus_x(jnp.where(small_t, t, 0.0)), jnp.log1p(t) - t)
    # Each special function once, on both arguments stacked: half the code to compile.
    (tail_y_1, tail_r_1), (tail_y_2, tail_r_2) = _stirling_tail_derivatives(jnp.stack([y + r_large, r_large]))
    tail_1 = r_large * (tail_y_1 - tail_r_1)
    first_large = r_large * log1p_minus_t + 0.5 * t / (1.0 + t) + tail_1
    second_large = (r_large * log1p_minus_t + r_large * t * t / (1.0 + t) - 0.5 * t / (1.0 + t) ** 2
                    + tail_1 + r_large * r_large * (tail_y_2 - tail_r_2))
    # Digamma form (r < 10).
    r_small = jnp.where(large, 1.0, r)
    (digamma_y, digamma_r), (trigamma_y, trigamma_r) = _digamma_trigamma(jnp.stack([y + r_small, r_small]))
    first_small = r_small * (digamma_y - digamma_r) - y
    second_small = first_small + y + r_small * r_small * (trigamma_y - trigamma_r)
    within = beyond_cap == 0.0
    first = jnp.where(within, jnp.where(large, first_large, first_small), 0.0)
    second = jnp.where(within, jnp.where(large, second_large, second_small), 0.0)
    return lgamma_ratio(y, log_r), first, second


def _mean_ratio_terms(eta_mean, r):
    """``log1p(mu / r)``, ``q = mu / (mu + r)`` and ``q (1 - q)``, from one ``exp`` of
    ``eta_mean`` (shape of the cells) and ``r`` (per gene where it can be).

    No cancellation: each is a product or quotient of positive terms, or a ``log1p``.
    ``mu`` is capped below the largest float (``mu = 0`` for ``eta_mean = -inf``), so
    nothing overflows short of ``mu / r`` itself. Measured on the CPU, a fifth cheaper in
    the Newton derivatives than the symmetric form in ``exp(-|eta_mean - log r|)``.
    """
    mu = jnp.exp(jnp.minimum(eta_mean, math.log(jnp.finfo(jnp.result_type(eta_mean)).max) - 2.0))
    total = mu + r
    q = mu / total
    return jnp.log1p(mu / r), q, q * r / total


def mean_part(eta_mean, eta_scale, y):
    """``-(y + r) log1p(mu / r) + y log mu``: the rest, cheap elementary functions.

    r is taken at the cap beyond :data:`LOG_R_CAP` (:func:`cap_continuation` is added
    separately).
    """
    log_r, _ = _capped(eta_scale)
    r = jnp.exp(log_r)
    softplus, _, _ = _mean_ratio_terms(eta_mean, r)
    return -(y + r) * softplus + _y_eta_mean(y, eta_mean)


def mean_part_derivatives(eta_mean, eta_scale, y):
    """:func:`mean_part` and its first and second derivatives, written out.

    With ``q = mu / (mu + r)`` and ``s = log1p(mu / r)``, below the cap:
    ``d/d eta_mean = y - (y + r) q``, ``d/d eta_scale = (y + r) q - r s``,
    ``d2/d eta_mean2 = -(y + r) q (1 - q)``, ``d2/d eta_mean d eta_scale = (y + r) q (1 - q) - r q``,
    ``d2/d eta_scale2 = 2 r q - r s - (y + r) q (1 - q)``; beyond it the scale derivatives
    are 0. One ``exp`` and one ``log1p`` per cell (and one ``exp`` of the scale, per gene
    where ``eta_scale`` is): autodiff of ``mean_part`` costs several times more.

    Returns
    -------
    value, d_mean, d_scale, d_mean_mean, d_mean_scale, d_scale_scale
        Each of the broadcast shape of the arguments.
    """
    log_r, beyond_cap = _capped(eta_scale)
    within = 1.0 - jnp.sign(beyond_cap)  # 1 up to the cap, 0 beyond
    r = jnp.exp(log_r)
    within_r = within * r
    softplus, q, q_one_minus_q = _mean_ratio_terms(eta_mean, r)
    y_r = y + r
    curvature = y_r * q_one_minus_q
    value = -y_r * softplus + _y_eta_mean(y, eta_mean)
    d_mean = y - y_r * q
    d_scale = within * (y_r * q) - within_r * softplus
    d_mean_scale = within * curvature - within_r * q
    d_scale_scale = within_r * (2.0 * q - softplus) - within * curvature
    return value, d_mean, d_scale, -curvature, d_mean_scale, d_scale_scale


def cap_continuation(eta_scale):
    """The continuation ``-(log r - cap)^2 / 2`` of one observation's log-likelihood beyond
    :data:`LOG_R_CAP`, and its first and second derivatives in ``eta_scale`` (0 below).

    It depends on the scale alone: summed over cells, it is summed per scale group.
    """
    _, beyond_cap = _capped(eta_scale)
    return -0.5 * beyond_cap**2, -beyond_cap, -jnp.sign(beyond_cap)


def irls_weights(eta_mean, eta_scale):
    """IRLS weights ``mu r / (mu + r) = r q``, the expected information of ``eta_mean``."""
    log_r, _ = _capped(eta_scale)
    r = jnp.exp(log_r)
    return r * _mean_ratio_terms(eta_mean, r)[1]


def log_likelihood(eta_mean, eta_scale, y):
    """NB log-likelihood of one observation, without the constant ``-lgamma(y + 1)``.

    Parameters
    ----------
    eta_mean : float
        ``log(mu)``: location linear predictor plus log size factor.
    eta_scale : float
        ``log(r)``. Beyond :data:`LOG_R_CAP` the log-likelihood is continued as its value
        at the cap minus ``(log r - cap)^2 / 2``, so that a fit whose dispersion runs to
        the Poisson limit comes back to the cap instead of drifting on a plateau.
    y : float
        The count.

    Returns
    -------
    float
        ``lgamma(y+r) - lgamma(r) + r log(r/(r+mu)) + y log(mu/(r+mu))``
        ``= count_part(y, eta_scale) + mean_part(eta_mean, eta_scale, y)`` (plus
        ``cap_continuation(eta_scale)`` beyond the cap). Finite for ``mu -> 0`` with
        ``y = 0``; tends to the Poisson log-likelihood as ``r -> infinity``.
    """
    return count_part(y, eta_scale) + mean_part(eta_mean, eta_scale, y) + cap_continuation(eta_scale)[0]


def log_likelihood_constant(y):
    """The parameter-free term ``-lgamma(y + 1)`` of each observation."""
    return -lgamma(y + 1.0)
