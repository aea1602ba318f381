"""The Estimator: coefficients, training over gene chunks, and everything derived from them.

Names follow diffxpy / batchglm (``a_var``, ``b_var``, ``model.mu``, ``fisher_inv``, ...)
so that code written for ``diffxpy.api.fit.model`` keeps working.
"""

import contextlib

import jax
import numpy as np
import pandas as pd
import scipy.linalg

from nbfit import _devices, _loop
from nbfit._design import DesignGroups
from nbfit._histogram import capacity, count_histogram, device_loads
from nbfit._init import init_location, init_scale
from nbfit._likelihood import LOG_R_CAP
from nbfit._problem import Chunk, pad_cells, shared_arrays
from nbfit._status import STATUS_NAMES, Status, assign_status, inverse_if_definite
from nbfit._strategy import default_max_steps, make_solver

DTYPES = {"float64": np.float64, "float32": np.float32}
#: Default bound on the counts of one chunk (genes x cells): its (genes, cells) arrays
#: then take 32 MiB each in float64 (measured on 10k cells: as fast as one chunk of all
#: 2,000 genes and a third of the memory).
CHUNK_COUNTS = 2**22
#: On CPUs, chunks hold at most this many genes per device: more, smaller chunks let the
#: slow genes of several be packed together and keep a chunk's tiles in the cache
#: (measured on 2 cores, 2,000 genes: 10k cells 5.3 s with 256 genes per chunk, 5.6 s with
#: 400; 1k cells 1.5 s with 256, 3.5 s with one chunk of 2,000).
CPU_GENES_PER_DEVICE = 128


class Model:
    """The fitted model: designs, constraints, coefficients and model quantities.

    Cell x gene quantities (``eta_loc``, ``mu``, ``phi``, ...) are computed on demand
    from the coefficients, not stored.

    Attributes
    ----------
    a : ndarray, shape (n_loc_full, n_genes)
        Location coefficients on the full design (``constraints_loc @ a_var``).
    b : ndarray, shape (n_scale_full, n_genes)
        Scale coefficients (log r) on the full design.
    design_loc, design_scale : ndarray, shape (n_cells, n_loc_full) / (n_cells, n_scale_full)
    design_loc_names, design_scale_names : list of str
    constraints_loc, constraints_scale : ndarray, shape (n_full, n_reduced)
        ``full = constraints @ reduced``; identity without constraints.
    size_factors : ndarray, shape (n_cells,), or None
    """

    def __init__(self, estimator):
        self._estimator = estimator
        self.design_loc = estimator.design_loc.matrix
        self.design_scale = estimator.design_scale.matrix
        self.design_loc_names = estimator.design_loc.names
        self.design_scale_names = estimator.design_scale.names
        self.constraints_loc = estimator.constraints_loc
        self.constraints_scale = estimator.constraints_scale
        self.size_factors = estimator.size_factors

    @property
    def a(self):
        return self.constraints_loc @ self._estimator.a_var

    @property
    def b(self):
        return self.constraints_scale @ self._estimator.b_var

    @property
    def eta_loc(self):
        """``X_loc a + log(size factors)``, shape (n_cells, n_genes)."""
        return self.design_loc @ self.a + self._estimator.log_size_factors[:, None]

    @property
    def eta_scale(self):
        """``X_scale b`` (log r before the cap), shape (n_cells, n_genes)."""
        return self.design_scale @ self.b

    @property
    def mu(self):
        """Fitted means, shape (n_cells, n_genes)."""
        return np.exp(self.eta_loc)

    @property
    def phi(self):
        """Fitted NB size r (capped at 1e8), shape (n_cells, n_genes)."""
        return np.exp(np.minimum(self.eta_scale, LOG_R_CAP))

    location = mu
    scale = phi

    @property
    def a_se(self):
        """Standard errors of the full location coefficients, shape (n_loc_full, n_genes)."""
        full = self._estimator.fisher_inv_full
        return self._estimator._standard_errors(full)[: self.design_loc.shape[1]]

    @property
    def b_se(self):
        """Standard errors of the full scale coefficients, shape (n_scale_full, n_genes)."""
        full = self._estimator.fisher_inv_full
        return self._estimator._standard_errors(full)[self.design_loc.shape[1]:]

    @property
    def log_likelihood(self):
        """Per-gene log-likelihood, shape (n_genes,)."""
        return self._estimator.log_likelihood


class Estimator:
    """Per-gene NB GLM estimator over a count matrix.

    Built by :func:`nbfit.fit`; train it with :meth:`train` (``fit`` does so with the
    training strategy).

    Parameters
    ----------
    data : nbfit._input.CountData
    loc, scale : nbfit.constraints.Constrained
        Full designs, constraint matrices and free-parameter names of both models.

    Attributes
    ----------
    a_var : ndarray, shape (n_loc, n_genes)
        Location coefficients (reduced, i.e. the free parameters under constraints).
    b_var : ndarray, shape (n_scale, n_genes)
        Scale coefficients (log r), reduced.
    model : Model
    gene_names : Index, shape (n_genes,)
    n_steps : ndarray, shape (n_genes,)
        Solver steps taken, summed over stages.
    """

    def __init__(self, data, loc, scale, size_factors=None, init_a="closed_form",
                 init_b="closed_form", batch_size=None, dtype="float64"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; use one of {list(DTYPES)}.")
        self.data = data
        self.gene_names = data.gene_names
        self.sample_description = data.sample_description
        self.design_loc = loc.design
        self.design_scale = scale.design
        self.reduced_loc_names = loc.reduced_names
        self.reduced_scale_names = scale.reduced_names
        self.dtype = dtype
        self.size_factors = size_factors
        self.log_size_factors = (
            np.zeros(data.n_cells) if size_factors is None else np.log(size_factors)
        )
        self.constraints_loc = loc.constraints
        self.constraints_scale = scale.constraints
        self._reduced_loc = loc.design.matrix @ loc.constraints
        self._reduced_scale = scale.design.matrix @ scale.constraints
        n_genes = data.n_genes
        self.batch_size = _resolve_batch_size(batch_size, data.n_cells, n_genes)
        # Rows of a compiled chunk: batch_size padded to a multiple of the device count.
        self._chunk_rows = -(-self.batch_size // _devices.n_devices()) * _devices.n_devices()
        self._scale_groups = DesignGroups(self._reduced_scale)
        self._histograms = {}  # chunk index -> CountHistogram (see _histogram)
        self._entries_size = 1  # histogram entries per device, the same for every chunk
        p_loc, p_scale = self._reduced_loc.shape[1], self._reduced_scale.shape[1]
        self._theta = np.zeros((n_genes, p_loc + p_scale))
        self.n_steps = np.zeros(n_genes, dtype=np.int64)
        self._converged = np.zeros(n_genes, dtype=bool)
        self._stalled = np.zeros(n_genes, dtype=bool)
        self._all_zero = np.zeros(n_genes, dtype=bool)
        self._evaluation = None
        self._initialise(init_a, init_b)
        self.model = Model(self)

    # ------------------------------------------------------------------ set-up

    def _chunks(self):
        """(start, stop) of each gene chunk."""
        n_genes = self.data.n_genes
        return [(s, min(s + self.batch_size, n_genes)) for s in range(0, n_genes, self.batch_size)]

    def _initialise(self, init_a, init_b):
        p_loc = self._reduced_loc.shape[1]
        size_factors = np.exp(self.log_size_factors)
        groups_loc = DesignGroups(self._reduced_loc)
        groups = self._scale_groups
        for index, (start, stop) in enumerate(self._chunks()):
            counts = self.data.gene_chunk(start, stop)
            self._all_zero[start:stop] = counts.sum(axis=1) == 0
            self._histogram(index, counts)
            if isinstance(init_a, str):
                self._theta[start:stop, :p_loc] = init_location(
                    init_a, counts, self._reduced_loc, size_factors, groups_loc
                )
            if isinstance(init_b, str):
                self._theta[start:stop, p_loc:] = init_scale(
                    init_b, counts, self._reduced_scale, size_factors, groups
                )
        if not isinstance(init_a, str):
            self._theta[:, :p_loc] = init_a.T
        if not isinstance(init_b, str):
            self._theta[:, p_loc:] = init_b.T

    def _histogram(self, index, counts):
        """CountHistogram of chunk ``index`` (counts (n_genes_chunk, n_cells)), kept once made.

        Makes the entry size large enough for it: all chunks share one, hence one
        compiled shape.
        """
        if index not in self._histograms:
            groups = self._scale_groups
            histogram = count_histogram(counts, groups.inverse, len(groups.rows))
            load = device_loads(histogram, self._chunk_rows, _devices.n_devices()).max(initial=0)
            self._entries_size = max(self._entries_size, capacity(load))
            self._histograms[index] = histogram
        return self._histograms[index]

    def _precision(self):
        """JAX context of the estimator's dtype; never changes the global configuration."""
        if self.dtype == "float64":
            return jax.enable_x64(True)
        return contextlib.nullcontext()

    def _problems(self):
        """Yield (start, stop, padded Chunk) for each gene chunk, in the estimator's dtype."""
        dtype = DTYPES[self.dtype]
        groups = self._scale_groups
        shared = shared_arrays(self._reduced_loc, self._reduced_scale, groups, self.log_size_factors, dtype)
        for index, (start, stop) in enumerate(self._chunks()):
            counts = self.data.gene_chunk(start, stop)
            histogram = self._histogram(index, counts)
            counts = _pad_rows(counts, self._chunk_rows).astype(dtype)
            yield start, stop, Chunk(counts, histogram, shared, self._entries_size)

    # ------------------------------------------------------------------ training

    def train(self, method="newton", max_steps=None, tol=None, update_loc=True, update_scale=True):
        """Run one solver stage on every gene, chunk by chunk.

        Parameters
        ----------
        method : {"newton", "nr", "irls", "lbfgs"}
            Joint Newton-Raphson with the observed Hessian; IRLS (Fisher scoring for the
            location, Newton for the scale, alternating); or L-BFGS on all coefficients.
        max_steps : int, optional
            Step limit per gene (default 100, L-BFGS 1000).
        tol : float, optional
            Convergence tolerance on the decrement relative to max(1, |ll|).
        update_loc, update_scale : bool
            Which coefficient groups move (the others stay fixed).
        """
        solver = make_solver(method, tol=tol, update_loc=update_loc, update_scale=update_scale)
        max_steps = default_max_steps(solver) if max_steps is None else int(max_steps)
        if max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}.")
        def units():
            for start, stop, chunk in self._problems():
                yield _loop.Unit(
                    genes=_pad_rows(np.arange(start, stop), self._chunk_rows, -1),
                    theta=_pad_rows(self._theta[start:stop], self._chunk_rows),
                    skip=_pad_rows(self._all_zero[start:stop], self._chunk_rows, True),
                    chunk=chunk,
                )
                # Reported as the chunk is taken up (the loop reads one chunk ahead).
                if getattr(self, "on_chunk", None) is not None:  # progress hook (nbfit._progress)
                    self.on_chunk(method, start, stop)

        def write(genes, theta, n_steps, converged, done):
            self._theta[genes] = theta
            self.n_steps[genes] += n_steps
            self._converged[genes] = converged
            self._stalled[genes] = done & ~converged

        with self._precision():
            _loop.run_stage(solver, units(), max_steps, write)
        self._converged[self._all_zero] = True
        self._evaluation = None
        return self

    # ------------------------------------------------------------------ results

    def _evaluate(self):
        """Log-likelihood, derivatives and status at the current coefficients (cached)."""
        if self._evaluation is not None:
            return self._evaluation
        n_genes, n_params = self._theta.shape
        ll = np.zeros(n_genes)
        gradient = np.zeros((n_genes, n_params))
        hessian = np.zeros((n_genes, n_params, n_params))
        min_eta_zero = np.zeros(n_genes)
        max_eta_scale = np.zeros(n_genes)
        overdispersion_score = np.zeros(n_genes)
        dtype = DTYPES[self.dtype]
        groups = self._scale_groups
        indicator = groups.indicator if groups.usable else np.zeros((self.data.n_cells, 0))
        indicator = np.pad(indicator, ((0, pad_cells(self.data.n_cells) - self.data.n_cells), (0, 0)))
        with self._precision():
            scale_groups = _devices.put_shared(indicator.astype(dtype))
            for start, stop, chunk in self._problems():
                theta = _devices.put_genes(_pad_rows(self._theta[start:stop], self._chunk_rows).astype(dtype))
                result = _loop.evaluate(theta, chunk.problem(), scale_groups)
                n = stop - start
                ll[start:stop] = np.asarray(result.log_likelihood[:n])
                gradient[start:stop] = np.asarray(result.gradient[:n])
                hessian[start:stop] = np.asarray(result.hessian[:n])
                min_eta_zero[start:stop] = np.asarray(result.min_eta_mean_zero[:n])
                max_eta_scale[start:stop] = np.asarray(result.max_eta_scale[:n])
                overdispersion_score[start:stop] = np.asarray(result.min_overdispersion_score[:n])
        ll[self._all_zero] = 0.0
        finite = np.isfinite(ll) & np.all(np.isfinite(gradient), axis=1)
        finite &= np.all(np.isfinite(hessian), axis=(1, 2))
        magnitudes = np.abs(np.linalg.eigvalsh(np.where(np.isfinite(hessian), -hessian, 0.0)))
        status = assign_status(
            self._all_zero, self._converged, self._stalled, finite, min_eta_zero,
            max_eta_scale, overdispersion_score, magnitudes.min(axis=1), magnitudes.max(axis=1),
        )
        self._evaluation = {"ll": ll, "gradient": gradient, "hessian": hessian, "status": status}
        return self._evaluation

    @property
    def a_var(self):
        return self._theta[:, : self._reduced_loc.shape[1]].T.copy()

    @property
    def b_var(self):
        return self._theta[:, self._reduced_loc.shape[1]:].T.copy()

    @property
    def log_likelihood(self):
        """Per-gene log-likelihood at the fit (with ``-lgamma(y+1)``), shape (n_genes,)."""
        return self._evaluate()["ll"]

    @property
    def loss(self):
        """Negative log-likelihood summed over genes (scalar)."""
        return -float(np.sum(self.log_likelihood))

    @property
    def jacobian(self):
        """Gradient of the log-likelihood w.r.t. (a_var, b_var), shape (n_genes, P)."""
        return self._evaluate()["gradient"]

    @property
    def hessian(self):
        """Observed Hessian w.r.t. (a_var, b_var), shape (n_genes, P, P)."""
        return self._evaluate()["hessian"]

    @property
    def fisher_inv(self):
        """Inverse observed information (``inv(-hessian)``), shape (n_genes, P, P).

        NaN for genes whose information is singular or not finite.
        """
        usable = ~np.isin(self.status, [Status.singular.name, Status.nonfinite.name, Status.all_zero.name])
        return inverse_if_definite(-self.hessian, usable)

    @property
    def fisher_inv_full(self):
        """:attr:`fisher_inv` mapped to the full coefficients, shape (n_genes, P_full, P_full).

        ``H F H^T`` with ``H`` the block-diagonal of both constraint matrices.
        """
        constraints = scipy.linalg.block_diag(self.constraints_loc, self.constraints_scale)
        return np.einsum("ij,gjk,lk->gil", constraints, self.fisher_inv, constraints)

    @property
    def a_se(self):
        """Standard errors of :attr:`a_var`, shape (n_loc, n_genes)."""
        return self._standard_errors(self.fisher_inv)[: self._reduced_loc.shape[1]]

    @property
    def b_se(self):
        """Standard errors of :attr:`b_var`, shape (n_scale, n_genes)."""
        return self._standard_errors(self.fisher_inv)[self._reduced_loc.shape[1]:]

    @staticmethod
    def _standard_errors(covariance):
        diagonal = np.diagonal(covariance, axis1=1, axis2=2).T
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.where(diagonal >= 0, diagonal, np.nan))

    @property
    def converged(self):
        """Whether the last training stage's convergence test passed, shape (n_genes,)."""
        return self._converged.copy()

    @property
    def status(self):
        """Status name of each gene (see :class:`nbfit.Status`), shape (n_genes,)."""
        return self._evaluate()["status"]

    def to_dataframe(self):
        """Per-gene results: full coefficients, log-likelihood, status, convergence, steps."""
        columns = {}
        for name, row in zip(self.model.design_loc_names, self.model.a):
            columns[f"a_{name}"] = row
        for name, row in zip(self.model.design_scale_names, self.model.b):
            columns[f"b_{name}"] = row
        columns["ll"] = self.log_likelihood
        columns["status"] = pd.Categorical(self.status, categories=STATUS_NAMES)
        columns["converged"] = self.converged
        columns["n_steps"] = self.n_steps
        frame = pd.DataFrame(columns, index=self.gene_names)
        frame.index.name = "gene"
        return frame

    def convergence_summary(self):
        """Number and share of genes per status, with what each status means."""
        status = pd.Series(pd.Categorical(self.status, categories=STATUS_NAMES))
        counts = status.value_counts().reindex(list(STATUS_NAMES))
        counts = counts[counts > 0]
        return pd.DataFrame(
            {
                "n_genes": counts.values,
                "share": counts.values / len(status),
                "meaning": [Status[name].value for name in counts.index],
            },
            index=pd.Index(counts.index, name="status"),
        )

    # ---- inference and results (issue 6) -----------------------------------------------
    # Thin wrappers around nbfit.inference and nbfit._results (shared with nbfit.Results).

    def wald(self, coef=None, term=None, **options):
        """Wald test of full design coefficients per gene; see :func:`nbfit.inference.wald`."""
        from nbfit import inference

        return inference.wald(self, coef=coef, term=term, **options)

    def lrt(self, reduced):
        """Likelihood-ratio test against a nested ``reduced`` fit (:func:`nbfit.inference.lrt`)."""
        from nbfit import inference

        return inference.lrt(self, reduced)

    def to_anndata(self, adata, key="nbfit", test=None):
        """Write parameters, diagnostics and settings into ``adata`` (``_results.to_anndata``)."""
        from nbfit import _results

        return _results.to_anndata(self, adata, key=key, test=test)

    def save(self, path):
        """Save the results (no counts) to an ``.npz`` file; reload with :func:`nbfit.load`."""
        from nbfit import _results

        return _results.save(self, path)

    # ---- end of inference and results (issue 6) ----------------------------------------


def _resolve_batch_size(batch_size, n_cells, n_genes):
    """Genes per chunk: as given, or by default equal chunks of at most ``CHUNK_COUNTS``
    counts (and, on CPUs, at most ``CPU_GENES_PER_DEVICE`` genes per device)."""
    if batch_size is None:
        n_chunks = -(-max(n_genes, 1) * max(n_cells, 1) // CHUNK_COUNTS)
        if jax.default_backend() == "cpu":
            n_chunks = max(n_chunks, -(-n_genes // (CPU_GENES_PER_DEVICE * _devices.n_devices())))
        return max(1, -(-n_genes // n_chunks))
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (genes per chunk), got {batch_size!r}.")
    return int(min(batch_size, n_genes))


def _pad_rows(array, n_rows, fill=0):
    """Pad the first axis of ``array`` to ``n_rows`` with ``fill``."""
    missing = n_rows - array.shape[0]
    if missing == 0:
        return array
    padding = np.full((missing,) + array.shape[1:], fill, dtype=array.dtype)
    return np.concatenate([array, padding])
