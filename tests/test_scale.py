"""Large data (issue 7): sparse / on-disk / dask inputs, ``nbfit prepare``, fits on a dask
cluster or an executor, progress bars, the CLI's compilation cache, bounded memory.

One problem shape throughout (100 cells x 45 genes, ``batch_size=10``: four full chunks
and a partial one), so that this module compiles the solvers once.
"""

import concurrent.futures
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anndata
import numpy as np
import pytest
import scipy.sparse

import nbfit
from nbfit import distributed as nbdist
from nbfit._storage import CellMajorWarning, GeneSource
from nbfit.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Writing zarr v2:UserWarning")

KW = dict(formula_loc="~1+condition+batch", size_factors="sf", batch_size=10)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def adata():
    return nbfit.simulate(n_cells=100, n_genes=45, n_batches=2, seed=1)


@pytest.fixture(scope="module")
def reference(adata):
    return nbfit.fit(adata, **KW)


@pytest.fixture(scope="module")
def files(adata, tmp_path_factory):
    """The counts of ``adata`` as CSC / CSR / dense .h5ad and CSC .zarr."""
    folder = tmp_path_factory.mktemp("scale")
    paths = {}
    for name, matrix in [("csc", scipy.sparse.csc_matrix(adata.X)),
                         ("csr", scipy.sparse.csr_matrix(adata.X)), ("dense", adata.X)]:
        copy = adata.copy()
        copy.X = matrix
        paths[name] = folder / f"{name}.h5ad"
        copy.write_h5ad(paths[name])
    copy = adata.copy()
    copy.X = scipy.sparse.csc_matrix(adata.X)
    paths["zarr"] = folder / "csc.zarr"
    copy.write_zarr(paths["zarr"])
    return paths


def assert_same(estimator, reference):
    """Bitwise the same fit: coefficients, steps, flags, log-likelihood, derivatives, status."""
    for name in ["_theta", "n_steps", "_converged", "_stalled", "_all_zero"]:
        np.testing.assert_array_equal(getattr(estimator, name), getattr(reference, name), name)
    for name in ["log_likelihood", "jacobian", "hessian"]:
        np.testing.assert_array_equal(getattr(estimator, name), getattr(reference, name), name)
    assert list(estimator.status) == list(reference.status)
    assert list(estimator.gene_names) == list(reference.gene_names)
    assert estimator.to_dataframe().equals(reference.to_dataframe())


# --------------------------------------------------------------------------- inputs


def _dask(x, chunks):
    da = pytest.importorskip("dask.array")
    return da.from_array(x, chunks=chunks)


INPUTS = {
    "dense": lambda a, f: a.X,
    "csr": lambda a, f: scipy.sparse.csr_matrix(a.X),
    "csc": lambda a, f: scipy.sparse.csc_matrix(a.X),
    "backed-h5ad": lambda a, f: anndata.read_h5ad(f["csc"], backed="r"),
    "backed-h5ad-dense": lambda a, f: anndata.read_h5ad(f["dense"], backed="r"),
    "h5ad-path": lambda a, f: f["csc"],
    "zarr-path": lambda a, f: str(f["zarr"]),
    "read-zarr": lambda a, f: anndata.read_zarr(f["zarr"]),
    "dask": lambda a, f: _dask(a.X, (50, 7)),
    "dask-sparse": lambda a, f: _dask(scipy.sparse.csr_matrix(a.X), (50, 45)),
}


@pytest.mark.parametrize("kind", list(INPUTS))
def test_inputs_give_identical_fits(adata, files, reference, kind):
    data = INPUTS[kind](adata, files)
    names = {}
    if not isinstance(data, (anndata.AnnData, str, Path)):
        names = dict(sample_description=adata.obs, gene_names=adata.var_names)
    if kind == "csr":
        with pytest.warns(CellMajorWarning, match="converting it once to CSC"):
            estimator = nbfit.fit(data, **names, **KW)
    else:
        estimator = nbfit.fit(data, **names, **KW)
    lazy = kind in ("backed-h5ad", "backed-h5ad-dense", "h5ad-path", "zarr-path", "dask",
                    "dask-sparse")
    assert isinstance(estimator.data.counts, GeneSource) == lazy
    assert_same(estimator, reference)
    np.testing.assert_allclose(nbfit.inference.gene_means(estimator), adata.X.mean(axis=0))


def test_anndata_with_dask_x(adata, reference):
    copy = adata.copy()
    copy.X = _dask(adata.X, (100, 9))
    assert_same(nbfit.fit(copy, **KW), reference)


def test_streamed_input_is_read_chunk_by_chunk(files, monkeypatch):
    reads = []
    original = GeneSource.read_raw

    def spy(self, start, stop):
        reads.append((start, stop))
        return original(self, start, stop)

    monkeypatch.setattr(GeneSource, "read_raw", spy)
    assert len(nbfit.fit(files["csc"], **KW).status) == 45
    assert reads and max(stop - start for start, stop in reads) <= KW["batch_size"]
    assert {start for start, _ in reads} == set(range(0, 45, 10))


def test_cell_major_file_warns_and_names_prepare(files, reference):
    with pytest.warns(CellMajorWarning, match="nbfit prepare"):
        estimator = nbfit.fit(files["csr"], **KW)
    assert_same(estimator, reference)


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1.0, "negative"), (np.nan, "NaN"), (2.5, "non-integer")],
    ids=["negative", "nan", "noninteger"],
)
@pytest.mark.parametrize("where", ["file", "dask"])
def test_bad_counts_are_found_chunk_by_chunk_and_named(adata, tmp_path, value, message, where):
    bad = adata.copy()
    bad.X[7, 37] = value  # in the fourth chunk
    if where == "file":
        bad.X = scipy.sparse.csc_matrix(bad.X)
        bad.write_h5ad(tmp_path / "bad.h5ad")
        data, names = tmp_path / "bad.h5ad", {}
    else:
        data = _dask(bad.X, (50, 10))
        names = dict(sample_description=bad.obs, gene_names=bad.var_names)
    with pytest.raises(ValueError, match=f"{message}.*cell 'cell_7', gene 'gene_37'"):
        nbfit.fit(data, **names, **KW)
    if message == "non-integer":
        nbfit.fit(data, **names, **KW, allow_noninteger=True, training_strategy=[])


# --------------------------------------------------------------------------- prepare


def test_prepare_writes_gene_major_copies(files, reference, tmp_path):
    out_h5ad, out_zarr = tmp_path / "genes.h5ad", tmp_path / "genes.zarr"
    assert main(["prepare", str(files["csr"]), str(out_h5ad), "--quiet"]) == 0
    # A budget of ~1000 nonzeros: several passes over the cells.
    assert main(["prepare", str(files["dense"]), str(out_zarr), "--max-memory", "12000",
                 "--quiet"]) == 0
    for path in (out_h5ad, out_zarr):
        with_x = anndata.read_zarr(path) if path.suffix == ".zarr" else anndata.read_h5ad(path)
        assert with_x.X.format == "csc"
        assert (with_x.X != scipy.sparse.csr_matrix(reference.data.counts)).nnz == 0
        assert list(with_x.obs_names) == list(reference.sample_description.index)
        estimator = nbfit.fit(str(path), **KW)
        assert estimator.data.counts.format == "csc"
        assert_same(estimator, reference)
    backed = anndata.read_h5ad(out_h5ad, backed="r")
    assert backed.X.format == "csc"


def test_prepare_errors(files, tmp_path, capsys):
    out = tmp_path / "x.h5ad"
    out.write_text("")
    assert main(["prepare", str(files["csc"]), str(out)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["prepare", str(tmp_path / "missing.h5ad"), str(tmp_path / "y.h5ad")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["prepare", str(files["csc"]), str(tmp_path / "z.h5ad"), "--layer", "no"]) == 2
    assert "no layer 'no'" in capsys.readouterr().err


# --------------------------------------------------------------------------- executors


@pytest.mark.parametrize("source", ["memory", "sparse", "file"])
def test_executor_fit_equals_local_fit(adata, files, reference, source):
    data = {"memory": adata, "file": files["csc"]}.get(source)
    if source == "sparse":
        data = adata.copy()
        data.X = scipy.sparse.csc_matrix(adata.X)
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        estimator = nbfit.fit(data, **KW, client=executor)
    assert_same(estimator, reference)
    np.testing.assert_allclose(nbfit.inference.gene_means(estimator), adata.X.mean(axis=0))
    result = estimator.wald(term="condition")
    expected = reference.wald(term="condition")
    assert result.equals(expected)


def test_executor_fit_with_init_arrays(adata, reference):
    init = dict(init_a=reference.a_var, init_b=reference.b_var)
    local = nbfit.fit(adata, **KW, **init)
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        assert_same(nbfit.fit(adata, **KW, **init, client=executor), local)


def test_failed_chunks_are_retried_then_reported_with_their_genes(adata, reference, monkeypatch):
    original = nbdist._read_block
    failures = {"left": 1}

    def flaky(value, start, stop):
        if start == 20 and failures["left"] > 0:
            failures["left"] -= 1
            raise ConnectionError("worker lost its file handle")
        return original(value, start, stop)

    monkeypatch.setattr(nbdist, "_read_block", flaky)
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        assert_same(nbfit.fit(adata, **KW, client=executor, retries=1), reference)
        failures["left"] = 10**6
        with pytest.raises(nbdist.ChunkError, match=r"genes 20\.\.29 \('gene_20'") as info:
            nbfit.fit(adata, **KW, client=executor, retries=2)
    [failed] = info.value.failed
    assert failed["genes"] == [f"gene_{j}" for j in range(20, 30)]
    assert isinstance(failed["error"], ConnectionError)
    assert "after 3 attempt(s)" in str(info.value)


def test_bad_counts_on_a_client_raise_the_local_error(adata, tmp_path):
    bad = adata.copy()
    bad.X[3, 41] = -2
    bad.X = scipy.sparse.csc_matrix(bad.X)
    bad.write_h5ad(tmp_path / "bad.h5ad")
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        with pytest.raises(ValueError, match="negative.*gene 'gene_41'"):
            nbfit.fit(tmp_path / "bad.h5ad", **KW, client=executor)


def test_client_argument_is_checked(adata):
    with pytest.raises(TypeError, match="client must be"):
        nbfit.fit(adata, **KW, client="localhost:8786")
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        with pytest.raises(ValueError, match="retries"):
            nbfit.fit(adata, **KW, client=executor, retries=-1)


# --------------------------------------------------------------------------- progress


def test_progress_bar_over_chunks_and_stages(adata, capsys):
    nbfit.fit(adata, **KW, progress=True, training_strategy=[{"method": "newton"}] * 2)
    err = capsys.readouterr().err
    assert "stage 1/2 newton" in err and "stage 2/2 newton" in err and "10/10" in err
    nbfit.fit(adata, **KW, progress=False)
    assert capsys.readouterr().err == ""


def test_progress_default(monkeypatch):
    from nbfit import _progress

    monkeypatch.delenv("NBFIT_PROGRESS", raising=False)
    monkeypatch.setenv("CI", "true")
    assert not _progress.enabled(None)
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys, "stderr", open(os.devnull, "w"))  # not a terminal
    assert not _progress.enabled(None)
    monkeypatch.setenv("NBFIT_PROGRESS", "1")
    assert _progress.enabled(None)
    assert not _progress.enabled(False) and _progress.enabled(True)


# --------------------------------------------------------------------------- start-up


def test_library_import_leaves_the_compilation_cache_alone():
    code = "import jax, nbfit; nbfit.fit; print(jax.config.jax_compilation_cache_dir)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "None"


@pytest.mark.slow
def test_second_cli_run_loads_compiled_solvers_from_the_cache(files, tmp_path):
    cache = tmp_path / "jax-cache"
    env = {**os.environ, "NBFIT_JAX_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, "-m", "nbfit", "fit", str(files["csc"]), "--formula-loc",
               "~1+condition", "--out", str(tmp_path / "r.csv"), "--quiet"]
    entries = []
    for _ in range(2):
        subprocess.run(command, env=env, check=True, capture_output=True)
        entries.append(sorted(p.name for p in cache.rglob("*") if p.is_file()))
    assert entries[0], "the first run wrote no compiled solver to the cache"
    assert entries[1] == entries[0], "the second run compiled something again"


# --------------------------------------------------------------------------- local devices

_SHARDED_FIT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    import nbfit
    from nbfit import _loop

    seen = []
    advance = _loop._advance

    def recording(solver, carry, problem, limits):
        sharding = carry.theta.sharding
        seen.append([carry.theta.shape[0], len(sharding.device_set), sharding.is_fully_replicated,
                     int(limits[1])])
        return advance(solver, carry, problem, limits)

    _loop._advance = recording
    path, out = sys.argv[1:]
    est = nbfit.fit(path, formula_loc="~1+condition", batch_size=300, progress=False)
    np.savez(out, theta=est._theta, n_steps=est.n_steps, ll=est.log_likelihood,
             status=np.asarray(est.status, str), seen=np.array(seen), devices=jax.device_count())
""")


def test_chunks_are_sharded_over_four_local_devices(tmp_path):
    """4 forced CPU devices: every loop's genes split over all 4, same fit as one device.

    330 genes with ``batch_size=300``: a full chunk that stops once at most 100 genes run
    (25 per device), a partial one, and the slow genes of both packed into a third loop of
    the same 300 rows. Packing changes nothing: the fit equals one chunk of all genes.
    """
    data = nbfit.simulate(n_cells=60, n_genes=330, seed=3)
    path = tmp_path / "counts.h5ad"
    data.write_h5ad(path)
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    subprocess.run([sys.executable, "-c", _SHARDED_FIT, str(path), str(tmp_path / "out.npz")],
                   env=env, check=True, capture_output=True)
    sharded = np.load(tmp_path / "out.npz")
    assert int(sharded["devices"]) == 4
    rows, devices, replicated, stop_at = sharded["seen"].T
    assert np.all(devices == 4) and not np.any(replicated)
    assert np.all(rows == 300), f"loops of {sorted(set(rows))} rows: one shape expected"
    assert list(stop_at) == [25, 25, 0], f"loops stopping at {list(stop_at)} running genes per device"
    single = nbfit.fit(data, formula_loc="~1+condition", batch_size=300, progress=False)
    whole = nbfit.fit(data, formula_loc="~1+condition", batch_size=330, progress=False)
    np.testing.assert_array_equal(single.status, whole.status)
    np.testing.assert_array_equal(single.n_steps, whole.n_steps)
    np.testing.assert_allclose(single.log_likelihood, whole.log_likelihood, rtol=1e-12)
    # Per-device shapes change XLA's rounding (not the arithmetic): a gene at the
    # convergence threshold may take one step more or less, to the same optimum.
    assert np.abs(sharded["n_steps"] - single.n_steps).max() <= 1
    np.testing.assert_array_equal(sharded["status"], np.asarray(single.status, str))
    converged = single.status == "converged"  # separated genes drift along a flat ridge
    np.testing.assert_allclose(sharded["theta"][converged], single._theta[converged], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sharded["ll"], single.log_likelihood, rtol=1e-12)


# --------------------------------------------------------------------------- dask cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    distributed = pytest.importorskip("distributed")
    # Worker processes share a JAX compilation cache: a restarted worker loads the solvers.
    cache = tmp_path_factory.mktemp("worker-jax-cache")
    saved = {k: os.environ.get(k) for k in ("JAX_COMPILATION_CACHE_DIR",
                                            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    try:
        local = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, worker_dashboard_address=None,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    client = distributed.Client(local)
    yield client
    client.close()
    local.close()


@pytest.mark.slow
def test_dask_cluster_fit_equals_local_fit(cluster, adata, files, reference):
    assert_same(nbfit.fit(files["csc"], **KW, client=cluster), reference)
    assert_same(nbfit.fit(adata, **KW, client=cluster), reference)
    data = _dask(adata.X, (50, 9))
    assert_same(nbfit.fit(data, sample_description=adata.obs, gene_names=adata.var_names,
                          **KW, client=cluster), reference)


@pytest.mark.slow
def test_dask_fit_survives_a_killed_worker(cluster, files, reference):
    pids = cluster.run(os.getpid)
    result = {}
    # The default strategy (one Newton stage), each task held for a moment so that the
    # worker is killed while it fits a chunk (a lambda: pickled by value for the workers).
    strategy = lambda estimator: (time.sleep(0.5), estimator.train())  # noqa: E731

    def run():
        try:
            result["estimator"] = nbfit.fit(files["csc"], **KW, client=cluster,
                                            training_strategy=strategy)
        except BaseException as error:  # reported below
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    victim = None
    while victim is None and time.monotonic() < deadline and thread.is_alive():
        for worker, keys in cluster.processing().items():
            if any("nbfit-fit-" in str(key) for key in keys):
                victim = worker
                break
        else:
            time.sleep(0.01)
    assert victim is not None, "no fit task was seen running"
    os.kill(pids[victim], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert "error" not in result, result.get("error")
    assert_same(result["estimator"], reference)
    assert len(result["estimator"].gene_names) == 45


# --------------------------------------------------------------------------- memory


_MEMORY_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np, pandas as pd, scipy.sparse as sp, anndata
    n_cells, n_genes, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if sys.argv[4] == "write":
        rng = np.random.default_rng(0)
        condition = np.array(["A", "B"])[np.arange(n_cells) % 2]
        effect = np.where(condition == "A", 1, 1.5)[:, None]
        mu = np.exp(rng.uniform(-2, 1, n_genes))[None, :] * effect
        X = sp.csc_matrix(rng.negative_binomial(2, 2 / (2 + mu)).astype(np.float32))
        obs = pd.DataFrame({"condition": condition}, index=[f"c{i}" for i in range(n_cells)])
        anndata.AnnData(X=X, obs=obs).write_h5ad(path)
    else:
        import nbfit
        est = nbfit.fit(path, formula_loc="~1+condition", batch_size=500, progress=False)
        assert len(est.status) == n_genes and len(est.to_dataframe()) == n_genes
        print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
""")


@pytest.mark.slow
def test_peak_memory_is_bounded_by_batch_size_not_genes(tmp_path):
    """A fit of 20,000 genes from a backed file peaks at most 1.5x one of 2,000 genes, and
    less above it than the dense float64 matrix would take (nothing is densified whole)."""
    n_cells = 1000
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NBFIT_PROGRESS": "0"}
    script = tmp_path / "memory.py"
    script.write_text(_MEMORY_SCRIPT)
    sizes = {"small": 2_000, "large": 20_000}
    for name, n_genes in sizes.items():
        subprocess.run([sys.executable, str(script), str(n_cells), str(n_genes),
                        str(tmp_path / f"{name}.h5ad"), "write"], env=env, check=True)
    # Both fits at once (one core each); each peak is its own process's VmHWM.
    runs = {
        name: subprocess.Popen([sys.executable, str(script), str(n_cells), str(n_genes),
                                str(tmp_path / f"{name}.h5ad"), "fit"], env=env,
                               stdout=subprocess.PIPE, text=True)
        for name, n_genes in sizes.items()
    }
    peak = {}
    for name, process in runs.items():
        out, _ = process.communicate(timeout=600)
        assert process.returncode == 0
        peak[name] = int(out.split()[-1]) * 1024
    assert peak["large"] <= 1.5 * peak["small"], peak
    dense = n_cells * sizes["large"] * 8
    assert peak["large"] - peak["small"] < dense, peak
