"""PyDESeq2 in a fresh process.

Timed: gene-wise dispersions (fit_genewise_dispersions: DESeq2's rough mu, then the
dispersion by L-BFGS-B; PyDESeq2 always applies the Cox-Reid adjustment here, there is
no public switch), then the GLM coefficients (fit_LFC, IRLS) *at the gene-wise
dispersions* (trend and MAP shrinkage skipped). Given size factors and design matrix;
min_mu 1e-6 and max_disp max(10, n_cells) as DESeq2 for single cells.
"""

import warnings

from _common import FitMemory, Timer, load_spec, read_problem, reorder, write_result

spec = load_spec()
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pydeseq2  # noqa: E402
from pydeseq2.dds import DeseqDataSet  # noqa: E402

warnings.filterwarnings("ignore")
meta, counts, obs, design, sf, genes = read_problem(spec)
names = [f"gene_{j}" for j in genes]
counts_df = pd.DataFrame(counts.astype(np.int64), index=obs.index, columns=names)
opts = dict(min_mu=1e-6, max_disp=max(10.0, float(len(obs))), refit_cooks=False,
            quiet=True, n_cpus=spec.get("options", {}).get("n_cpus"))
memory = FitMemory().start()
times = []
for _ in range(max(1, int(spec.get("repeats", 1)))):
    dds = DeseqDataSet(counts=counts_df, metadata=obs, design=design, **opts)
    # given size factors, set as fit_size_factors() would: PyDESeq2 0.5.4 refits them
    # inside fit_genewise_dispersions (_fit_MoM_dispersions) unless "normed_counts" exists
    dds.obs["size_factors"] = sf
    dds.layers["normed_counts"] = dds.X / sf[:, None]
    dds.var["_normed_means"] = dds.layers["normed_counts"].mean(axis=0)
    with Timer() as t:
        dds.fit_genewise_dispersions()
        dds.var["dispersions"] = dds.var["genewise_dispersions"].copy()
        dds.fit_LFC()
    times.append(t.seconds)
memory.stop()
lfc = dds.varm["LFC"]
a = reorder(lfc.to_numpy().T, list(lfc.columns), meta["loc_names"])
disp = dds.var["dispersions"].to_numpy(dtype=float)
with np.errstate(divide="ignore"):
    b = -np.log(disp)
conv = dds.var["_LFC_converged"].to_numpy(dtype=float, na_value=0.0)
write_result(
    spec, a, b, genes,
    **memory.info(),
    fit_seconds_warm=min(times), fit_seconds_cold=times[0],
    converged_fraction=float(np.mean(conv > 0)),
    version=pydeseq2.__version__,
    notes=["no JIT: one fit, warm = cold",
           "gene-wise dispersions with PyDESeq2's built-in Cox-Reid adjustment; LFC (IRLS) "
           "refitted at those dispersions; min_mu 1e-6"],
    genewise_converged=float(np.mean(dds.var["_genewise_converged"].to_numpy(
        dtype=float, na_value=0.0) > 0)),
)
