"""Fit gene chunks on a dask.distributed cluster or any ``concurrent.futures`` executor.

``nbfit.fit(data, ..., client=client)`` sends one task per gene chunk. A task gets a
reader spec (the file, the matrix in it and the gene range) when the counts are on disk,
or the chunk itself when they are in memory, and fits it with nbfit itself, with the
same options; the results are gathered in gene order into one :class:`~nbfit.Estimator`,
identical to a local fit with the same ``batch_size``:

- every task fits exactly one chunk of the local fit, padded to ``batch_size`` genes
  (all tasks have one shape: each worker compiles once);
- a first round of light tasks reads and checks every chunk and counts the entries of
  its histogram of distinct counts (:mod:`nbfit._histogram`); every task then lays its
  histogram out in blocks of one common size (one shape, one compilation per worker).

Failed tasks are retried (``retries``; dask reschedules the tasks of a lost worker
itself); a chunk that fails for good raises :class:`ChunkError`, naming its genes.
Bad counts (NaN, negative, non-integer) raise the ``ValueError`` of a local fit.

No scheduler of its own: dask (``client.submit``, ``retries=``) or the executor does it.
"""

from __future__ import annotations

import concurrent.futures
import copy
import sys
import uuid
import warnings

import numpy as np
import pandas as pd
import scipy.sparse

from nbfit import _progress
from nbfit._design import DesignGroups
from nbfit._estimator import Estimator, Model, _resolve_batch_size
from nbfit._histogram import capacity, count_histogram
from nbfit._input import read_counts
from nbfit._storage import GeneSource
from nbfit._strategy import resolve_strategy

#: Per-gene arrays of an Estimator, concatenated over chunks in gene order.
PER_GENE = ("_theta", "n_steps", "_converged", "_stalled", "_all_zero")

_PAD_NAME = "__nbfit_padding_{}"


class ChunkError(RuntimeError):
    """One or more gene chunks failed for good (after their retries).

    Attributes
    ----------
    failed : list of dict
        One per chunk: ``start``, ``stop``, ``genes`` (names) and ``error`` (the exception).
    """

    def __init__(self, failed, attempts):
        self.failed = failed
        parts = []
        for chunk in failed:
            genes = list(chunk["genes"])
            shown = ", ".join(repr(g) for g in genes[:4]) + (", ..." if len(genes) > 4 else "")
            error = chunk["error"]
            parts.append(
                f"genes {chunk['start']}..{chunk['stop'] - 1} ({shown}): "
                f"{type(error).__name__}: {error}"
            )
        n_genes = sum(chunk["stop"] - chunk["start"] for chunk in failed)
        super().__init__(
            f"{len(failed)} gene chunk(s) ({n_genes} genes) failed after {attempts} attempt(s); "
            "no result was produced for them:\n  " + "\n  ".join(parts)
        )


# --------------------------------------------------------------------------- coordinator


def fit_on_client(client, counts, loc, scale, size_factors=None, init_a="closed_form",
                  init_b="closed_form", batch_size=None, dtype="float64",
                  training_strategy="AUTO", quick_scale=False, allow_noninteger=False,
                  retries=2, progress=None):
    """Fit every gene of ``counts`` (a :class:`CountData`), one task per gene chunk.

    Parameters are those of :func:`nbfit.fit` after resolution (designs, size factors,
    init method names or arrays of shape (n_coefficients, n_genes)); ``client`` is a
    ``dask.distributed.Client`` or a ``concurrent.futures.Executor``.

    Returns
    -------
    Estimator
        Identical to the local fit with the same ``batch_size``; its ``data`` is
        ``counts`` (read only if it is trained further).
    """
    runner = _runner(client, retries)
    n_cells, n_genes = counts.n_cells, counts.n_genes
    size = _resolve_batch_size(batch_size, n_cells, n_genes)
    chunks = [(s, min(s + size, n_genes)) for s in range(0, n_genes, size)]
    names = counts.gene_names
    shared = {
        "loc": loc,
        "scale": scale,
        "size_factors": size_factors,
        "dtype": dtype,
        "batch_size": size,
        "training_strategy": training_strategy,
        "quick_scale": quick_scale,
        "allow_noninteger": allow_noninteger,
        "cells": pd.DataFrame(index=counts.sample_description.index),
    }
    # The settings travel inside every task, like in-memory chunks: scattered data held
    # only by a worker that dies cannot be recovered, and every task depending on it fails.
    show = _progress.enabled(progress)

    # Round 1: read and check every chunk, and the histogram entries of the largest.
    groups = DesignGroups(scale.design.matrix @ scale.constraints)
    if _in_memory(counts.counts):
        entries = 1
        for start, stop in chunks:
            entries = max(entries, _n_entries(counts.gene_chunk(start, stop), groups))
    else:
        bar = _progress.Bar(show, len(chunks), desc="nbfit reading")
        tasks = {
            k: (_scan_task, (runner.chunk_input(counts.counts, start, stop), start, stop,
                             names[start:stop], shared))
            for k, (start, stop) in enumerate(chunks)
        }
        results, failures = runner.run(tasks, bar, "scan")
        bar.close()
        _raise_failures(failures, chunks, names, runner.attempts)
        for k in range(len(chunks)):
            if isinstance(results[k], Exception):  # bad counts: the error of a local fit
                raise results[k]
        entries = max([1] + [int(results[k]) for k in range(len(chunks))])

    # Round 2: fit every chunk.
    bar = _progress.Bar(show, len(chunks), desc="nbfit fitting")
    tasks = {}
    for k, (start, stop) in enumerate(chunks):
        args = (
            runner.chunk_input(counts.counts, start, stop), start, stop, names[start:stop],
            _init_slice(init_a, start, stop), _init_slice(init_b, start, stop), shared,
            capacity(entries), k == 0,
        )
        tasks[k] = (_fit_task, args)
    results, failures = runner.run(tasks, bar, "fit")
    bar.close()
    _raise_failures(failures, chunks, names, runner.attempts)
    for k in range(len(chunks)):
        if isinstance(results[k], Exception):
            raise results[k]
    return combine([results[k] for k in range(len(chunks))], counts)


def combine(results, counts):
    """One Estimator from per-chunk results (in gene order) of :func:`_fit_task`.

    The first result carries a ``template`` Estimator (designs, constraints, settings);
    the per-gene arrays (:data:`PER_GENE`), the evaluation (log-likelihood, derivatives,
    status) and the gene means are concatenated.
    """
    template = results[0]["template"]
    estimator = copy.copy(template)
    estimator.data = counts
    estimator.gene_names = counts.gene_names
    estimator.sample_description = counts.sample_description
    for name in PER_GENE:
        setattr(estimator, name, np.concatenate([r[name] for r in results]))
    evaluation = {}
    for key, value in results[0]["evaluation"].items():
        if isinstance(value, np.ndarray):
            evaluation[key] = np.concatenate([r["evaluation"][key] for r in results])
        else:  # pragma: no cover - no such entry today
            evaluation[key] = value
    estimator._evaluation = evaluation
    estimator.gene_mean = np.concatenate([r["gene_mean"] for r in results])
    estimator._histograms = {}  # remade on demand, for the chunks of the whole data
    estimator.model = Model(estimator)
    return estimator


def _raise_failures(failures, chunks, names, attempts):
    if failures:
        failed = []
        for k in sorted(failures):
            start, stop = chunks[k]
            failed.append({"start": start, "stop": stop, "genes": list(names[start:stop]),
                           "error": failures[k]})
        raise ChunkError(failed, attempts) from failures[min(failures)]


def _in_memory(counts):
    return not isinstance(counts, GeneSource)


def _init_slice(init, start, stop):
    return init if isinstance(init, str) else np.asarray(init)[:, start:stop]


def _n_entries(chunk, groups):
    """Number of distinct (gene, count, scale group) triples of ``chunk``."""
    return int(count_histogram(chunk, groups.inverse, len(groups.rows)).genes.size)


# --------------------------------------------------------------------------- runners


def _is_dask_client(client):
    distributed = sys.modules.get("distributed")
    return distributed is not None and isinstance(client, distributed.Client)


def _runner(client, retries):
    if isinstance(retries, bool) or not isinstance(retries, (int, np.integer)) or retries < 0:
        raise ValueError(f"retries must be a non-negative integer, got {retries!r}.")
    if _is_dask_client(client):
        return _DaskRunner(client, int(retries))
    if isinstance(client, concurrent.futures.Executor):
        return _ExecutorRunner(client, int(retries))
    raise TypeError(
        f"client must be a dask.distributed.Client or a concurrent.futures.Executor, "
        f"got {type(client).__name__}."
    )


class _ExecutorRunner:
    """Tasks on a ``concurrent.futures`` executor; failed tasks are resubmitted."""

    def __init__(self, executor, retries):
        self.executor = executor
        self.retries = retries
        self.attempts = retries + 1
        self.window = 2 * max(1, int(getattr(executor, "_max_workers", 4) or 4))

    def chunk_input(self, counts, start, stop):
        return _chunk_input(counts, start, stop, dask_client=None)

    def run(self, tasks, bar, label):
        """Results (index -> value) and failures (index -> exception) of ``tasks``."""
        queue = list(tasks)
        pending = {}
        results, failures = {}, {}
        attempt = dict.fromkeys(tasks, 0)

        def submit(k):
            fn, args = tasks[k]
            attempt[k] += 1
            try:
                pending[self.executor.submit(fn, *args)] = k
            except Exception as error:  # a broken pool refuses new work
                failures[k] = error

        while queue or pending:
            while queue and len(pending) < self.window:
                submit(queue.pop(0))
            if not pending:
                continue
            done, _ = concurrent.futures.wait(list(pending), return_when="FIRST_COMPLETED")
            for future in done:
                k = pending.pop(future)
                error = future.exception()
                if error is None:
                    results[k] = future.result()
                    bar.update(1)
                elif attempt[k] <= self.retries:
                    submit(k)
                else:
                    failures[k] = error
        return results, failures


class _DaskRunner:
    """Tasks on a dask.distributed cluster; dask retries them (``retries=``)."""

    def __init__(self, client, retries):
        self.client = client
        self.retries = retries
        self.attempts = retries + 1
        self.token = uuid.uuid4().hex[:8]
        n_workers = len(client.scheduler_info().get("workers", {})) or 1
        self.window = max(4, 4 * n_workers)

    def chunk_input(self, counts, start, stop):
        return _chunk_input(counts, start, stop, dask_client=self.client)

    def run(self, tasks, bar, label):
        import distributed

        queue = list(tasks)
        pending = {}
        results, failures = {}, {}
        while queue or pending:
            while queue and len(pending) < self.window:
                k = queue.pop(0)
                fn, args = tasks[k]
                args = tuple(self._materialise(a) for a in args)
                key = f"nbfit-{label}-{k}-{self.token}"
                with warnings.catch_warnings():
                    # An in-memory chunk travels inside its task (not scattered), so that
                    # the scheduler can resend it if the worker holding it dies.
                    warnings.filterwarnings("ignore", message="Large object of size")
                    future = self.client.submit(fn, *args, key=key, retries=self.retries,
                                                pure=False)
                pending[future] = k
            done = distributed.wait(list(pending), return_when="FIRST_COMPLETED").done
            for future in done:
                k = pending.pop(future)
                if future.status == "finished":
                    results[k] = future.result()
                    bar.update(1)
                else:
                    try:
                        failures[k] = future.exception()
                    except Exception as error:  # cancelled
                        failures[k] = error
                future.release()
        return results, failures

    def _materialise(self, value):
        """A dask-array chunk input becomes a future of its computed value (lazily)."""
        if isinstance(value, _DaskChunk):
            return self.client.compute(value.array)
        if isinstance(value, _MemoryChunk):
            return value.block
        return value


class _DaskChunk:
    """A lazy dask-array gene chunk (computed by the cluster when its task is sent)."""

    def __init__(self, array):
        self.array = array


class _MemoryChunk:
    def __init__(self, block):
        self.block = block
        self.nbytes = block.data.nbytes if scipy.sparse.issparse(block) else block.nbytes


def _chunk_input(counts, start, stop, dask_client):
    """What a task gets to read genes ``start:stop``: a reader spec or the data."""
    if isinstance(counts, GeneSource):
        if counts.location is not None:
            return counts.location  # a ReaderSpec: the worker opens the file
        if counts.format == "dask":
            return _DaskChunk(counts.array[:, start:stop]) if dask_client is not None \
                else counts.array[:, start:stop]
        block = counts.read_raw(start, stop)
    elif scipy.sparse.issparse(counts):
        block = counts[:, start:stop]
    else:
        block = np.ascontiguousarray(counts[:, start:stop])
    return _MemoryChunk(block) if dask_client is not None else block


# --------------------------------------------------------------------------- tasks


def _read_block(value, start, stop):
    """Genes ``start:stop`` from a task input: (cells, genes) ndarray or scipy.sparse."""
    from nbfit._storage import ReaderSpec, is_dask_array

    if isinstance(value, ReaderSpec):
        return value.open().read_raw(start, stop)
    if is_dask_array(value):
        import dask

        with dask.config.set(scheduler="sync"):
            return value.compute()
    if isinstance(value, _MemoryChunk):
        return value.block
    return value


def _chunk_counts(value, start, stop, names, shared, pad):
    """Validated CountData of one chunk, padded with all-zero genes to ``batch_size``."""
    block = _read_block(value, start, stop)
    names = [str(n) for n in names]
    missing = shared["batch_size"] - block.shape[1] if pad else 0
    if missing > 0:
        if scipy.sparse.issparse(block):
            empty = scipy.sparse.csc_matrix((block.shape[0], missing), dtype=block.dtype)
            block = scipy.sparse.hstack([scipy.sparse.csc_matrix(block), empty], format="csc")
        else:
            block = np.concatenate([np.asarray(block), np.zeros((block.shape[0], missing))], axis=1)
        names = names + [_PAD_NAME.format(k) for k in range(missing)]
    return read_counts(block, gene_names=names, sample_description=shared["cells"],
                       allow_noninteger=shared["allow_noninteger"])


def _scan_task(value, start, stop, names, shared):
    """Read and check one chunk; the number of entries of its histogram.

    Bad counts are returned (not raised), so that they are reported, not retried.
    """
    try:
        counts = _chunk_counts(value, start, stop, names, shared, pad=False)
    except (ValueError, TypeError) as error:
        return error
    scale = shared["scale"]
    groups = DesignGroups(scale.design.matrix @ scale.constraints)
    return _n_entries(counts.gene_chunk(0, counts.n_genes), groups)


def _fit_task(value, start, stop, names, init_a, init_b, shared, entries_size, template):
    """Fit one gene chunk with nbfit; per-gene results (and, if asked, the Estimator)."""
    try:
        counts = _chunk_counts(value, start, stop, names, shared, pad=True)
    except (ValueError, TypeError) as error:
        return error
    n = stop - start
    size = counts.n_genes
    estimator = Estimator(
        counts, shared["loc"], shared["scale"], size_factors=shared["size_factors"],
        init_a=_pad_init(init_a, size), init_b=_pad_init(init_b, size), batch_size=size,
        dtype=shared["dtype"],
    )
    estimator._entries_size = max(estimator._entries_size, int(entries_size))
    resolve_strategy(shared["training_strategy"], shared["quick_scale"])(estimator)
    evaluation = estimator._evaluate()
    result = {name: np.array(getattr(estimator, name)[:n]) for name in PER_GENE}
    result["evaluation"] = {
        key: np.array(value[:n]) if isinstance(value, np.ndarray) and value.shape[:1] == (size,)
        else value
        for key, value in evaluation.items()
    }
    result["gene_mean"] = _gene_means(counts)[:n]
    if template:  # designs, constraints and settings for combine(); not the counts
        estimator.data = None
        estimator._histograms = {}
        result["template"] = estimator
    return result


def _pad_init(init, size):
    if isinstance(init, str):
        return init
    init = np.asarray(init, dtype=np.float64)
    missing = size - init.shape[1]
    if missing > 0:
        init = np.concatenate([init, np.zeros((init.shape[0], missing))], axis=1)
    return init


def _gene_means(counts):
    matrix = counts.counts
    if isinstance(matrix, GeneSource):  # pragma: no cover - tasks get in-memory blocks
        return matrix.mean(axis=0)
    return np.asarray(matrix.mean(axis=0), dtype=np.float64).reshape(-1)
