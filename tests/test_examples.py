"""The examples run: the script (as CI runs it) and the notebook's code cells in order."""

import json
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_condition_script(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    namespace = runpy.run_path(str(EXAMPLES / "test_condition.py"), run_name="example")
    result, png = namespace["main"](tmp_path)
    assert png == tmp_path / "volcano.png" and png.stat().st_size > 0
    assert (result["qval"] < 0.05).sum() > 50
    assert "top genes by p-value" in capsys.readouterr().out


def test_quickstart_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    notebook = json.loads((EXAMPLES / "quickstart.ipynb").read_text())
    cells = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert "pip" in cells[0]  # the first cell installs nbfit (a no-op where it is importable)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__main__"}
    for source in cells:
        exec(compile(source, "quickstart.ipynb", "exec"), namespace)
    assert (tmp_path / "quickstart_results.h5ad").exists()
    assert (tmp_path / "quickstart_fit.npz").exists()
