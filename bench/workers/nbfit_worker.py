"""nbfit in a fresh process: first fit (cold, compilation included), then warm fits."""

import os
import sys

from _common import FitMemory, Timer, load_spec, read_problem, reorder, write_result

spec = load_spec()

# One JAX CPU device per core: nbfit shards each gene chunk over the local devices.
DEVICES = os.cpu_count() or 1
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={DEVICES}").strip()
import numpy as np  # noqa: E402

import jax  # noqa: E402

import nbfit  # noqa: E402

meta, counts, obs, design, sf, genes = read_problem(spec, sparse=spec.get("sparse", False))
import anndata  # noqa: E402
import pandas as pd  # noqa: E402

adata = anndata.AnnData(X=counts, obs=obs,
                        var=pd.DataFrame(index=[f"gene_{j}" for j in genes]))
kwargs = dict(formula_loc=spec["formula_loc"], formula_scale=spec["formula_scale"],
              size_factors="sf", dtype=spec["dtype"], batch_size=spec.get("batch_size"))
kwargs.update(spec.get("options", {}))
memory = FitMemory().start()
times = []
for _ in range(max(1, int(spec.get("repeats", 2)))):
    with Timer() as t:
        est = nbfit.fit(adata, **kwargs)
    times.append(t.seconds)
memory.stop()
names = list(est.model.design_loc_names)
a = reorder(est.a_var, names, meta["loc_names"])
b = np.asarray(est.b_var)
if b.shape[0] != 1:
    sys.exit("bench runners handle intercept-only scale models only")
status = np.asarray(est.status)
values, counts_ = np.unique(status, return_counts=True)
n_steps = getattr(est, "n_steps", None)
write_result(
    spec, a, b[0], genes,
    **memory.info(),
    fit_seconds_warm=min(times[1:]) if len(times) > 1 else times[0],
    fit_seconds_cold=times[0],
    n_steps=None if n_steps is None else float(np.mean(n_steps)),
    converged_fraction=float(np.mean(est.converged)),
    version=nbfit.__version__ if hasattr(nbfit, "__version__") else "",
    notes=[f"{len(times)} fits in one process: cold = first, warm = best of the rest",
           f"{jax.local_device_count()} JAX CPU devices (one per core; "
           f"XLA_FLAGS={os.environ['XLA_FLAGS']!r})"],
    fit_times=times,
    status_counts={str(v): int(c) for v, c in zip(values, counts_, strict=True)},
    max_steps=None if n_steps is None else int(np.max(n_steps)),
    ll_self=np.asarray(est.log_likelihood, dtype=np.float64),
    n_steps_per_gene=np.asarray(n_steps if n_steps is not None else [], dtype=np.float64),
)
