"""statsmodels: one discrete NegativeBinomial (NB2) ML fit per gene, on a gene subset.

sm.NegativeBinomial(y, X, offset=log sf, loglike_method="nb2").fit(): joint ML over the
coefficients and alpha = 1/r (Newton with the analytic Hessian on the full parameter
vector, BFGS where Newton fails; statsmodels' default start from a Poisson fit). Times
are per fitted gene; the runner extrapolates.
"""

import warnings

from _common import FitMemory, Timer, load_spec, read_problem, write_result

spec = load_spec()
import numpy as np  # noqa: E402
import statsmodels  # noqa: E402
import statsmodels.api as sm  # noqa: E402

warnings.filterwarnings("ignore")
meta, counts, obs, design, sf, genes = read_problem(spec)
X = design.to_numpy()
offset = np.log(sf)
p = X.shape[1]
a = np.full((p, len(genes)), np.nan)
b = np.full(len(genes), np.nan)
iters = np.full(len(genes), np.nan)
conv = np.zeros(len(genes), dtype=bool)
memory = FitMemory().start()
with Timer() as t:
    for k in range(len(genes)):
        y = counts[:, k]
        model = sm.NegativeBinomial(y, X, offset=offset, loglike_method="nb2")
        res = None
        for method in ("newton", "bfgs"):  # Newton first; BFGS if it fails or diverges
            try:
                res = model.fit(method=method, disp=0, maxiter=200)
            except Exception:  # noqa: BLE001 - try the next method
                res = None
                continue
            if res.mle_retvals.get("converged", False) and np.all(np.isfinite(res.params)):
                break
        if res is None:
            continue
        params = np.asarray(res.params)
        a[:, k] = params[:p]
        alpha = params[p]
        b[k] = -np.log(alpha) if alpha > 0 else np.inf
        iters[k] = res.mle_retvals.get("iterations", res.mle_retvals.get("fcalls", np.nan))
        conv[k] = bool(res.mle_retvals.get("converged", False))
memory.stop()
write_result(
    spec, a, b, genes,
    **memory.info(),
    fit_seconds_warm=t.seconds, fit_seconds_cold=t.seconds,
    n_steps=float(np.nanmean(iters)) if np.any(np.isfinite(iters)) else None,
    converged_fraction=float(np.mean(conv)),
    version=statsmodels.__version__,
    notes=["per-gene loop, single fit (no JIT): warm = cold"],
)
