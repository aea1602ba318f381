"""nbfit quickstart: simulate counts, fit a per-gene NB GLM, inspect the results.

Run with ``python examples/quickstart.py``.
"""

import nbfit
import nbfit.api as de

# 500 cells x 100 genes; obs has a two-level factor "condition".
adata = nbfit.simulate(n_cells=500, n_genes=100, seed=0)
print(adata)

est = de.fit.model(adata, formula_loc="~1+condition")

print(est.to_dataframe().head())
print(est.convergence_summary())
