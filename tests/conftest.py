"""Shared fixtures: the reference scenarios and their fits, computed once per session."""

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import anndata
import pandas as pd
import pytest

import nbfit

DATA = Path(__file__).parent / "data"
#: Scenarios fitted without constraints.
UNCONSTRAINED = ["sim_condition_batch", "sim_scale_model", "sim_edge", "pbmc_logumi"]


@dataclass(frozen=True)
class Scenario:
    name: str
    spec: dict
    adata: anndata.AnnData
    gold: pd.DataFrame
    design_loc: pd.DataFrame
    design_scale: pd.DataFrame


@cache
def load_scenario(name):
    folder = DATA / name
    read = dict(float_precision="round_trip")
    return Scenario(
        name=name,
        spec=json.loads((folder / "scenario.json").read_text()),
        adata=anndata.read_h5ad(folder / "data.h5ad"),
        gold=pd.read_csv(folder / "gold.csv", **read),
        design_loc=pd.read_csv(folder / "X_loc.csv", index_col="cell", **read),
        design_scale=pd.read_csv(folder / "X_scale.csv", index_col="cell", **read),
    )


@cache
def fit_scenario(name, training_strategy="AUTO"):
    """nbfit's fit of a reference scenario with its own formulas and size factors."""
    scenario = load_scenario(name)
    spec = scenario.spec
    return nbfit.fit(
        scenario.adata,
        formula_loc=spec["formula_loc"],
        formula_scale=spec["formula_scale"],
        as_numeric=spec["as_numeric"],
        size_factors=spec["size_factors"],
        training_strategy=training_strategy,
    )


@pytest.fixture(scope="session")
def condition_batch():
    return load_scenario("sim_condition_batch")
