"""delnx (JAX, glmGamPoi's algorithm) in a fresh process: cold fit, then warm fits.

delnx.tl.nb_fit with the given design matrix and size factors, MLE dispersion without
shrinkage or Cox-Reid (glmGamPoi's call in the benchmark). delnx enables JAX x64 itself.
"""

import warnings

from _common import FitMemory, Timer, load_spec, read_problem, write_result

spec = load_spec()
import anndata  # noqa: E402
import delnx  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

warnings.filterwarnings("ignore")
meta, counts, obs, design, sf, genes = read_problem(spec)
adata = anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"gene_{j}" for j in genes]))
opts = dict(design=design.to_numpy(), design_column_names=list(design.columns),
            size_factors=sf, overdispersion=True, overdispersion_shrinkage=False,
            do_cox_reid_adjustment=False, verbose=False)
opts.update(spec.get("options", {}))
memory = FitMemory().start()
times = []
for _ in range(max(1, int(spec.get("repeats", 2)))):
    with Timer() as t:
        fit = delnx.tl.nb_fit(adata, **opts)
    times.append(t.seconds)
memory.stop()
a = np.asarray(fit.beta).T  # (p, genes), design column order
with np.errstate(divide="ignore"):
    b = -np.log(np.asarray(fit.overdispersions, dtype=float))
write_result(
    spec, a, b, genes,
    **memory.info(),
    fit_seconds_warm=min(times[1:]) if len(times) > 1 else times[0],
    fit_seconds_cold=times[0],
    converged_fraction=float(np.mean(np.asarray(fit.converged))),
    version=getattr(delnx, "__version__", ""),
    notes=[f"{len(times)} fits in one process: cold = first, warm = best of the rest",
           "converged = its final beta Newton stage"],
    fit_times=times,
)
