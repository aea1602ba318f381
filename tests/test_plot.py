"""Plots render headless (Agg) to PNG; a missing matplotlib gives a clear error."""

import sys

import numpy as np
import pytest

import nbfit

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")

from nbfit import plot  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fitted():
    adata = nbfit.simulate(n_cells=240, n_genes=20, n_batches=2, seed=3)
    adata.X[:, 0] = 0.0  # an all-zero gene: shown by status, left out of the volcano
    return nbfit.fit(adata, formula_loc="~1+condition+batch", size_factors="sf")


def _render(figure, path):
    from matplotlib.figure import Figure

    assert isinstance(figure, Figure)
    figure.savefig(path, dpi=60)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_mean_dispersion(fitted, tmp_path):
    _render(plot.mean_dispersion(fitted), tmp_path / "md.png")


def test_volcano(fitted, tmp_path):
    table = fitted.wald(coef="condition[T.B]")
    assert np.isnan(table["pval"][0])
    figure = plot.volcano(table, label_top=3)
    assert "1 genes without a p-value" in figure.axes[0].get_title()
    _render(figure, tmp_path / "volcano.png")
    summary = nbfit.api.test.DifferentialExpressionTestWald(fitted, ["condition[T.B]"])
    _render(summary.plot_volcano(), tmp_path / "volcano2.png")
    with pytest.raises(ValueError, match="log2fc"):
        plot.volcano(table.drop(columns="log2fc"))


def test_convergence(fitted, tmp_path):
    _render(plot.convergence(fitted), tmp_path / "convergence.png")


def test_draws_into_given_axes(fitted):
    from matplotlib.figure import Figure

    figure = Figure()
    ax = figure.add_subplot()
    assert plot.mean_dispersion(fitted, ax=ax) is figure


def test_loaded_results_plot(fitted, tmp_path):
    fitted.save(tmp_path / "fit.npz")
    loaded = nbfit.load(tmp_path / "fit.npz")
    _render(plot.mean_dispersion(loaded), tmp_path / "md.png")
    _render(plot.convergence(loaded), tmp_path / "c.png")


def test_missing_matplotlib_is_a_clear_error(fitted, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"nbfit\[plot\]"):
        plot.convergence(fitted)
