"""Negative-binomial counts with known parameters."""

import numpy as np
import pandas as pd


def simulate(n_cells=500, n_genes=100, n_conditions=2, n_batches=1, size_factor_sd=0.3,
             scale_condition_sd=0.0, seed=0):
    """Simulate NB counts of a condition (and batch) design with known coefficients.

    The location model is ``~1+condition(+batch)`` (treatment coding, reference levels
    ``A`` and ``b1``), the scale model ``~1`` or, with ``scale_condition_sd > 0``,
    ``~1+condition``. Intercepts ~ U(-1, 4), condition effects ~ N(0, 0.7^2), batch
    effects ~ N(0, 0.3^2), log r ~ N(0.5, 1), size factors ~ LogNormal(0, size_factor_sd).

    Parameters
    ----------
    n_cells, n_genes : int
    n_conditions, n_batches : int
    size_factor_sd : float
        0 gives size factors of 1.
    scale_condition_sd : float
        Standard deviation of condition effects on log r (0: one r per gene).
    seed : int

    Returns
    -------
    AnnData, shape (n_cells, n_genes)
        ``X`` the counts (float64, integer valued); ``obs`` with ``condition``, ``batch``
        (if ``n_batches > 1``) and ``sf``; the true coefficients in
        ``varm["true_a"]`` (n_genes, n_loc) and ``varm["true_b"]`` (n_genes, n_scale),
        their names in ``uns["true_a_names"]`` / ``uns["true_b_names"]``, the formulas in
        ``uns["formula_loc"]`` / ``uns["formula_scale"]``.
    """
    import anndata

    rng = np.random.default_rng(seed)
    conditions = [chr(ord("A") + k) for k in range(n_conditions)]
    obs = pd.DataFrame(
        {"condition": np.array(conditions)[np.arange(n_cells) % n_conditions]},
        index=[f"cell_{i}" for i in range(n_cells)],
    )
    loc_names = ["Intercept"] + [f"condition[T.{c}]" for c in conditions[1:]]
    design_loc = [np.ones(n_cells)] + [(obs["condition"] == c).to_numpy(float) for c in conditions[1:]]
    effects = [rng.uniform(-1, 4, n_genes)] + [rng.normal(0, 0.7, n_genes) for _ in conditions[1:]]
    formula_loc = "~1+condition"
    if n_batches > 1:
        batches = [f"b{k + 1}" for k in range(n_batches)]
        obs["batch"] = rng.choice(batches, n_cells)
        loc_names += [f"batch[T.{b}]" for b in batches[1:]]
        design_loc += [(obs["batch"] == b).to_numpy(float) for b in batches[1:]]
        effects += [rng.normal(0, 0.3, n_genes) for _ in batches[1:]]
        formula_loc += "+batch"
    scale_names, design_scale = ["Intercept"], [np.ones(n_cells)]
    scale_effects = [rng.normal(0.5, 1.0, n_genes)]
    formula_scale = "~1"
    if scale_condition_sd > 0:
        scale_names += loc_names[1:n_conditions]
        design_scale += design_loc[1:n_conditions]
        scale_effects += [rng.normal(0, scale_condition_sd, n_genes) for _ in conditions[1:]]
        formula_scale = "~1+condition"
    sf = np.exp(rng.normal(0, size_factor_sd, n_cells)) if size_factor_sd > 0 else np.ones(n_cells)
    obs["sf"] = sf
    true_a, true_b = np.stack(effects, axis=1), np.stack(scale_effects, axis=1)
    mu = sf[:, None] * np.exp(np.stack(design_loc, axis=1) @ true_a.T)
    r = np.exp(np.stack(design_scale, axis=1) @ true_b.T)
    counts = rng.negative_binomial(r, r / (r + mu)).astype(np.float64)
    adata = anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"gene_{j}" for j in range(n_genes)]))
    adata.varm["true_a"] = true_a
    adata.varm["true_b"] = true_b
    adata.uns["true_a_names"] = loc_names
    adata.uns["true_b_names"] = scale_names
    adata.uns["formula_loc"] = formula_loc
    adata.uns["formula_scale"] = formula_scale
    return adata
