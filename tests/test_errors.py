"""Bad input: a clear error, raised before JAX traces or compiles anything (issue 4).

Every case asserts the exception type, the message content, that no JAX compilation or
tracing happened during the call (``jax.monitoring``) and that the traceback never
enters JAX or nbfit's engine. Cases already in tests/test_api.py (unknown strategy name,
unknown ``train`` key, unknown dtype and noise model, unknown init name, a formula naming
a missing column, ``as_numeric`` naming a non-numeric column, a rank-deficient location
design) are not repeated; variants of them are.

The second half fuzzes the formula and constraint parsers with hypothesis: whatever
string, dict, list or array they are given, they raise ValueError (ConstraintError, a
ValueError, for constraints) or nothing. docs/robustness.md lists every message.
"""

import re

import jax.monitoring
import numpy as np
import pandas as pd
import pytest
import scipy.sparse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nbfit
from nbfit._design import design_from_formula, design_from_matrix
from nbfit._input import read_counts
from nbfit.constraints import (
    ConstraintError,
    build_constrained,
    constraint_matrix_any,
    constraint_matrix_from_array,
    constraint_matrix_from_dict,
    constraint_matrix_from_string,
    setup_constrained,
)

N_CELLS, N_GENES = 40, 5
#: Traceback frames from these files mean the error came from inside the engine or JAX.
ENGINE_FILES = ("/jax/", "/jaxlib/", "nbfit/_loop.py", "nbfit/_problem.py", "nbfit/_solvers/")


@pytest.fixture(scope="module")
def adata():
    return nbfit.simulate(n_cells=N_CELLS, n_genes=N_GENES, n_batches=2, seed=1)


class _CompileMonitor:
    """Records every JAX tracing / lowering / compilation event while active."""

    def __init__(self):
        self.events = []

    def __call__(self, event, *args, **kwargs):
        if event.startswith("/jax/core/compile"):
            self.events.append(event)


def raises_early(error, match, call):
    """Assert ``call()`` raises ``error`` matching ``match`` before anything reaches JAX."""
    monitor = _CompileMonitor()
    jax.monitoring.register_event_duration_secs_listener(monitor)
    jax.monitoring.register_event_listener(monitor)
    try:
        with pytest.raises(error, match=match) as info:
            call()
    finally:
        jax.monitoring.unregister_event_duration_listener(monitor)
        jax.monitoring.unregister_event_listener(monitor)
    assert monitor.events == [], f"JAX traced/compiled before the error: {monitor.events}"
    frames = [str(entry.path).replace("\\", "/") for entry in info.traceback]
    inside = [f for f in frames if any(part in f for part in ENGINE_FILES)]
    assert not inside, f"the error came from inside the engine: {inside}"
    return info.value


def _fit(adata, **options):
    options.setdefault("formula_loc", "~1+condition+batch")
    data = options.pop("data", adata)
    return nbfit.fit(data, **options)


def _counts_with(adata, value, cell=3, gene=2):
    counts = np.array(adata.X, dtype=np.float64)
    counts[cell, gene] = value
    return counts


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csc"])
@pytest.mark.parametrize(
    "value, what", [(-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite"), (-np.inf, "infinite")]
)
def test_invalid_counts(adata, value, what, sparse):
    counts = _counts_with(adata, value)
    if sparse:
        counts = scipy.sparse.csc_matrix(counts)
    message = f"data has 1 {what} value(s), first at cell 'cell_3', gene 'gene_2'"
    raises_early(ValueError, re.escape(message),
                 lambda: _fit(adata, data=counts, sample_description=adata.obs))


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "csc"])
def test_noninteger_counts_suggest_raw_counts(adata, sparse):
    counts = _counts_with(adata, 2.5)
    if sparse:
        counts = scipy.sparse.csc_matrix(counts)
    error = raises_early(ValueError, "non-integer",
                         lambda: _fit(adata, data=counts, sample_description=adata.obs))
    message = str(error)
    assert "cell 'cell_3', gene 'gene_2'" in message
    assert "raw counts" in message and "allow_noninteger=True" in message


def test_noninteger_counts_accepted_on_request(adata):
    counts = _counts_with(adata, 2.5)
    data = read_counts(counts, sample_description=adata.obs, allow_noninteger=True)
    assert data.gene_chunk(2, 3)[0, 3] == 2.5
    # Opting in does not let negative values through.
    raises_early(ValueError, "negative", lambda: read_counts(
        _counts_with(adata, -2.5), sample_description=adata.obs, allow_noninteger=True))


@pytest.mark.parametrize(
    "counts, message",
    [
        (np.zeros((N_CELLS, 0)), "data is empty: 40 cells x 0 genes"),
        (scipy.sparse.csc_matrix((N_CELLS, 0)), "data is empty: 40 cells x 0 genes"),
        (np.zeros((0, N_GENES)), "data is empty: 0 cells x 5 genes"),
    ],
    ids=["no-genes", "no-genes-sparse", "no-cells"],
)
def test_empty_data(adata, counts, message):
    obs = adata.obs.iloc[: counts.shape[0]]
    raises_early(ValueError, re.escape(message), lambda: _fit(adata, data=counts, sample_description=obs))


def test_empty_anndata(adata):
    raises_early(ValueError, "data is empty: 40 cells x 0 genes", lambda: _fit(adata[:, []].copy()))


@pytest.mark.parametrize(
    "data, error, message",
    [
        (np.zeros(N_CELLS), ValueError, "must be 2-dimensional"),
        (np.full((N_CELLS, N_GENES), "1"), TypeError, "must be numeric"),
        ([[1, 2], [3, 4]], TypeError, "is not supported"),
    ],
    ids=["1d", "strings", "list"],
)
def test_unusable_data(adata, data, error, message):
    raises_early(error, message, lambda: _fit(adata, data=data, sample_description=adata.obs))


# ---------------------------------------------------------------- lengths and names


def test_sample_description_length(adata):
    raises_early(ValueError, re.escape("sample_description has 39 rows but data has 40 cells"),
                 lambda: _fit(adata, data=adata.X, sample_description=adata.obs.iloc[:-1]))


def test_sample_description_type(adata):
    raises_early(TypeError, "must be a pandas DataFrame",
                 lambda: _fit(adata, data=adata.X, sample_description=adata.obs.to_numpy()))


@pytest.mark.parametrize("n", [N_CELLS - 1, N_CELLS + 1])
def test_size_factors_length(adata, n):
    raises_early(ValueError, re.escape(f"size_factors has {n} values but data has 40 cells"),
                 lambda: _fit(adata, size_factors=np.ones(n)))


def test_size_factors_shape(adata):
    raises_early(ValueError, r"must be 1-dimensional .* shape \(40, 2\)",
                 lambda: _fit(adata, size_factors=np.ones((N_CELLS, 2))))


@pytest.mark.parametrize("names", [["a", "b"], [f"g{k}" for k in range(N_GENES + 1)]])
def test_gene_names_length(adata, names):
    message = f"gene_names has {len(names)} entries but data has 5 genes"
    raises_early(ValueError, re.escape(message), lambda: _fit(adata, gene_names=names))


def test_gene_names_string(adata):
    raises_early(TypeError, "not a string", lambda: _fit(adata, gene_names="abcde"))


def test_design_matrix_rows(adata):
    raises_early(ValueError, re.escape("dmat_loc has 39 rows but data has 40 cells"),
                 lambda: _fit(adata, dmat_loc=np.ones((N_CELLS - 1, 1))))


def test_duplicate_gene_names(adata):
    raises_early(ValueError, re.escape("gene names must be unique; duplicated: ['x']"),
                 lambda: _fit(adata, gene_names=["x", "y", "x", "z", "w"]))


def test_duplicate_var_names(adata):
    copy = adata.copy()
    copy.var_names = ["a", "b", "b", "c", "c"]
    raises_early(ValueError, re.escape("duplicated: ['b', 'c']"), lambda: _fit(copy))


# ---------------------------------------------------------------- size factors


@pytest.mark.parametrize("value", [0.0, -1.0, np.nan, np.inf], ids=["zero", "negative", "nan", "inf"])
def test_bad_size_factor_values(adata, value):
    sf = np.ones(N_CELLS)
    sf[7] = value
    raises_early(
        ValueError,
        re.escape("size_factors has 1 non-positive or non-finite value(s), first at cell 'cell_7'"),
        lambda: _fit(adata, size_factors=sf),
    )


def test_bad_size_factor_column(adata):
    obs = adata.obs.assign(depth=1.0)
    obs.iloc[5, obs.columns.get_loc("depth")] = 0.0
    raises_early(ValueError, "first at cell 'cell_5'",
                 lambda: _fit(adata, data=adata.X, sample_description=obs, size_factors="depth"))


def test_non_numeric_size_factors(adata):
    raises_early(ValueError, "size_factors must be positive numbers",
                 lambda: _fit(adata, size_factors="condition"))


def test_size_factor_series_aligned_by_cell_name(adata):
    """A Series labelled by cell names is aligned, not read by position."""
    from nbfit._input import read_size_factors

    sf = adata.obs["sf"]
    np.testing.assert_array_equal(read_size_factors(sf.iloc[::-1], adata.obs), sf.to_numpy())
    unlabelled = pd.Series(sf.to_numpy()[::-1])
    np.testing.assert_array_equal(read_size_factors(unlabelled, adata.obs), sf.to_numpy()[::-1])


# ---------------------------------------------------------------- formulas and designs


def test_scale_formula_missing_column(adata):
    raises_early(ValueError, r"formula_scale='~1\+depth' uses \['depth'\].*columns are",
                 lambda: _fit(adata, formula_scale="~1+depth"))


@pytest.mark.parametrize(
    "formula, message",
    [
        ("~1+(condition", "could not be parsed"),
        ("condition ~ batch", "not a one-sided formula"),
        ("~1+condition | batch", "not a one-sided formula"),
        ("~1+np.log(sf * 0)", r"non-finite values in the design columns \['np.log\(sf \* 0\)'\]"),
        ("~1+np.log(sf - 10)", "could not be evaluated: .*null values"),
        ("~0", "design has no columns"),
    ],
)
def test_bad_formula(adata, formula, message):
    raises_early(ValueError, message, lambda: _fit(adata, formula_loc=formula, as_numeric="sf"))


def test_formula_not_a_string(adata):
    raises_early(ValueError, "formula_scale must be a string", lambda: _fit(adata, formula_scale=None))


def test_as_numeric_missing_column(adata):
    raises_early(ValueError, "as_numeric names 'dose', which is not a column",
                 lambda: _fit(adata, as_numeric=["sf", "dose"]))


@pytest.mark.parametrize("value, what", [(np.nan, "missing"), (np.inf, "infinite")])
def test_numeric_column_missing_or_infinite(adata, value, what):
    obs = adata.obs.assign(dose=np.linspace(0, 1, N_CELLS))
    obs.iloc[4, obs.columns.get_loc("dose")] = value
    raises_early(ValueError, f"column 'dose' of the sample description has 1 {what} value.*cell_4",
                 lambda: _fit(adata, data=adata.X, sample_description=obs,
                              formula_loc="~1+dose", as_numeric="dose"))


def test_factor_column_missing_values(adata):
    obs = adata.obs.copy()
    obs["batch"] = obs["batch"].astype(object)
    obs.iloc[2, obs.columns.get_loc("batch")] = None
    raises_early(ValueError, "column 'batch' of the sample description has missing values",
                 lambda: _fit(adata, data=adata.X, sample_description=obs))


def test_rank_deficient_scale_design(adata):
    obs = adata.obs.assign(copy=adata.obs["condition"])
    raises_early(ValueError, r"scale design is rank deficient: columns \['copy\[T.B\]'\]",
                 lambda: _fit(adata, data=adata.X, sample_description=obs,
                              formula_scale="~1+condition+copy"))


def test_rank_deficient_matrix_names_columns(adata):
    dmat = pd.DataFrame({"one": 1.0, "x": np.arange(N_CELLS), "two_x": 2.0 * np.arange(N_CELLS)})
    raises_early(ValueError, r"rank deficient: columns \['(two_)?x'\] .*linearly dependent columns: \['x', 'two_x'\]",
                 lambda: _fit(adata, dmat_loc=dmat))


def test_more_coefficients_than_cells_formula(adata):
    obs = adata.obs.assign(cell=np.arange(N_CELLS).astype(str))
    raises_early(ValueError, re.escape("the loc design has 41 coefficients but only 40 cells"),
                 lambda: _fit(adata, data=adata.X, sample_description=obs, formula_loc="~1+cell+condition"))


def test_more_coefficients_than_cells_matrix(adata):
    dmat = np.random.default_rng(0).normal(size=(N_CELLS, N_CELLS + 3))
    raises_early(ValueError, re.escape("the scale design has 43 coefficients but only 40 cells"),
                 lambda: _fit(adata, dmat_scale=dmat))


def test_non_finite_design_matrix(adata):
    dmat = np.ones((N_CELLS, 1))
    dmat[0, 0] = np.nan
    raises_early(ValueError, "dmat_loc has non-finite entries", lambda: _fit(adata, dmat_loc=dmat))


# ---------------------------------------------------------------- init arrays


@pytest.mark.parametrize(
    "options, message",
    [
        ({"init_b": np.zeros((2, N_GENES))}, r"init_b has shape \(2, 5\), expected \(1, 5\)"),
        ({"init_a": np.zeros((N_GENES, 3))}, r"init_a has shape \(5, 3\), expected \(3, 5\).*transposed"),
        ({"init_a": np.zeros(3)}, r"init_a has shape \(3,\), expected \(3, 5\)"),
        ({"init_a": None}, "init_a=None is not known"),
        ({"init_b": np.full((1, N_GENES), "x")}, "init_b is neither a known name nor a numeric array"),
        ({"init_b": np.full((1, N_GENES), np.inf)}, r"init_b has 5 non-finite value\(s\), first at coefficient 0, gene 0"),
    ],
    ids=["b-rows", "a-transposed", "a-1d", "none", "strings", "inf"],
)
def test_bad_init(adata, options, message):
    raises_early(ValueError, message, lambda: _fit(adata, **options))


# ---------------------------------------------------------------- strategies, dtype


@pytest.mark.parametrize(
    "strategy, error, message",
    [
        ([{"method": "newton", "maxsteps": 5}], TypeError,
         r"training_strategy\[0\]: .*unknown arguments \['maxsteps'\] \(did you mean 'max_steps'"),
        ([{"method": "irls"}, {"method": "Newton-CG"}], ValueError,
         r"training_strategy\[1\]: unknown training method 'Newton-CG'"),
        ([{"max_steps": -1}], ValueError, r"max_steps must be None or an integer >= 0, got -1"),
        ([{"max_steps": 2.5}], ValueError, r"max_steps must be None or an integer >= 0, got 2.5"),
        ([{"tol": 0}], ValueError, "tol must be a positive finite number, got 0"),
        ([{"tol": "tight"}], ValueError, "tol must be a positive number, got 'tight'"),
        ([{"update_loc": "no"}], ValueError, "update_loc must be True or False"),
        ([{"update_loc": False, "update_scale": False}], ValueError, "would fit nothing"),
        (["newton"], TypeError, r"training_strategy\[0\] is str"),
        (1, TypeError, "must be a name, a callable or a list of dicts"),
        ("newton-cg", ValueError, "unknown training_strategy 'newton-cg'; valid names are"),
    ],
)
def test_bad_training_strategy(adata, strategy, error, message):
    raises_early(error, message, lambda: _fit(adata, training_strategy=strategy))


@pytest.mark.parametrize("dtype", ["float128", "f4", None, [1], np.int32])
def test_unknown_dtype(adata, dtype):
    raises_early(ValueError, r"is not supported; use one of \['float64', 'float32'\]",
                 lambda: _fit(adata, dtype=dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.dtype("float32"), "float32"])
def test_numpy_dtypes_are_understood(adata, dtype, monkeypatch):
    """dtype=np.float32 means "float32" (checked without fitting: the estimator is stubbed)."""
    seen = {}

    class Stop(Exception):
        pass

    def stub(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(nbfit._fit, "Estimator", stub)
    raises_early(Stop, None, lambda: _fit(adata, dtype=dtype))
    assert seen["dtype"] == "float32"


@pytest.mark.parametrize("noise_model", ["NB2", None, "zinb"])
def test_unknown_noise_model(adata, noise_model):
    raises_early(ValueError, re.escape("is not supported; supported: ['nb']"),
                 lambda: _fit(adata, noise_model=noise_model))


def test_unknown_keyword(adata):
    raises_early(TypeError, re.escape("fit() got unknown arguments ['alow_noninteger']"),
                 lambda: _fit(adata, alow_noninteger=True))


# ---------------------------------------------------------------- constraints through fit


def test_constraint_value_not_a_factor(adata):
    raises_early(ConstraintError, "the value must be the name of a grouping factor",
                 lambda: _fit(adata, constraints_loc={"batch": ["condition"]}))


def test_constraint_of_unusable_type(adata):
    raises_early(ConstraintError, "neither equations .* nor a numeric array",
                 lambda: _fit(adata, constraints_loc=[1, "batch[b1] + batch[b2] = 0"]))


def test_dict_constraints_with_unparsable_formula(adata):
    raises_early(ValueError, "could not be parsed",
                 lambda: _fit(adata, formula_loc="~1+(batch", constraints_loc={"batch": "1"}))


# ================================================================ parser fuzzing
#
# Contract (docs/robustness.md): the formula parser (design_from_formula) raises
# ValueError for every formula it cannot use, whatever the string; the constraint
# builders raise ConstraintError (a ValueError) for every constraint they cannot use, and
# ValueError for a bad formula given with constraints. So `except ValueError` catches
# every parser error. None of these tests compiles anything.

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))

_N = 24
_OBS = pd.DataFrame(
    {
        "condition": np.tile(["A", "B"], _N // 2),
        "batch": np.repeat(["b1", "b2", "b3", "b4"], _N // 4),
        "dose": np.linspace(0.5, 3.0, _N),
        "sf": np.linspace(0.8, 1.2, _N),
    },
    index=[f"c{i}" for i in range(_N)],
)
_FORMULA_TOKENS = [
    "condition", "batch", "dose", "sf", "missing", "+", "-", "*", ":", "/", "**", "~", "(", ")",
    "0", "1", "2", " ", "C(", "np.log(", "I(", "{", "}", "[", "]", ",", ".", "'", '"', "|", "=",
    "%", "T.", "poly(", "scale(", "center(", "@", "\\", "\n", "#", "`", "$", "~1+", "~0+",
]
formulas = st.one_of(
    st.lists(st.sampled_from(_FORMULA_TOKENS), max_size=12).map("".join),
    st.text(max_size=20),
)
_NAMES = ["Intercept", "condition[T.B]", "batch[T.b2]", "batch[b1]", "batch[b2]", "dose", "a", "b"]
_EQUATION_TOKENS = _NAMES + ["+", "-", "*", "=", "0", "1", "2.5", " ", "(", ")", "3*", "--", "e", "."]
equations = st.one_of(
    st.lists(st.sampled_from(_EQUATION_TOKENS), max_size=10).map("".join),
    st.text(max_size=15),
)
_COLUMNS = st.sampled_from(["condition", "batch", "dose", "sf", "missing", "1", "", "Intercept"])
constraint_dicts = st.dictionaries(
    st.one_of(_COLUMNS, st.integers()),
    st.one_of(_COLUMNS, st.integers(), st.none(), st.floats(), st.lists(_COLUMNS, max_size=2)),
    max_size=3,
)
constraint_values = st.one_of(
    equations,
    st.lists(equations, max_size=4),
    st.lists(st.one_of(equations, st.integers(), st.none()), max_size=3),
    st.none(),
    st.integers(),
    st.floats(),
)
_ENTRY = st.one_of(st.integers(-2, 2).map(float), st.sampled_from([0.5, np.nan, np.inf]))


@st.composite
def arrays(draw):
    rows, columns = draw(st.integers(0, 5)), draw(st.integers(0, 5))
    values = draw(st.lists(_ENTRY, min_size=rows * columns, max_size=rows * columns))
    return np.array(values, dtype=np.float64).reshape(rows, columns)


@FUZZ
@given(formula=formulas, as_numeric=st.sampled_from([(), ("dose",), ("dose", "sf"), ("condition",)]))
def test_fuzz_formula_parser(formula, as_numeric):
    try:
        design = design_from_formula(formula, _OBS, as_numeric, "loc")
    except ValueError:
        return
    assert design.matrix.shape[0] == _N and np.isfinite(design.matrix).all()
    assert len(design.names) == design.matrix.shape[1]


@FUZZ
@given(constraints=constraint_values,
       names=st.lists(st.sampled_from(_NAMES), max_size=5, unique=True))
def test_fuzz_constraint_strings(constraints, names):
    try:
        matrix, reduced = constraint_matrix_any(names, constraints)
    except ConstraintError:
        return
    assert matrix.shape == (len(names), len(reduced))
    assert np.isfinite(matrix).all()


@FUZZ
@given(array=arrays(), n_names=st.integers(0, 5))
def test_fuzz_constraint_arrays(array, n_names):
    try:
        matrix, reduced = constraint_matrix_from_array([f"p{k}" for k in range(n_names)], array)
    except ConstraintError:
        return
    assert matrix.shape == (n_names, len(reduced)) and np.isfinite(matrix).all()


@FUZZ
@given(constraints=constraint_dicts, names=st.lists(st.sampled_from(_NAMES), max_size=6, unique=True))
def test_fuzz_constraint_dicts(constraints, names):
    try:
        constraint_matrix_from_dict(_OBS, constraints, names)
    except ConstraintError:
        return


@FUZZ
@given(
    formula=st.one_of(formulas, st.sampled_from(
        ["~1+condition+batch", "~0+batch", "~1+condition*batch", "~1+dose+batch", "~1+condition:batch"])),
    constraints=st.one_of(constraint_dicts, constraint_values),
    as_numeric=st.sampled_from([(), ("dose",)]),
)
def test_fuzz_formula_with_constraints(formula, constraints, as_numeric):
    for build in (build_constrained, setup_constrained):
        try:
            build(_OBS, formula, constraints, as_numeric)
        except ValueError:
            pass


@FUZZ
@given(
    matrix=st.lists(st.lists(_ENTRY, min_size=3, max_size=3), min_size=0, max_size=6).map(np.array),
    constraints=st.one_of(constraint_values, arrays()),
)
def test_fuzz_design_matrix_with_constraints(matrix, constraints):
    try:
        design = design_from_matrix(matrix, len(matrix), check=False)
        constraint_matrix_any(design.names, constraints)
    except ValueError:
        pass


def test_the_guard_sees_compilation():
    """raises_early would notice an error raised after JAX compiled something."""
    import jax

    def compile_then_fail():
        jax.jit(lambda x: x * 3.0 + 1.0)(np.arange(7.0))
        raise ValueError("late")

    with pytest.raises(AssertionError, match="JAX traced/compiled before the error"):
        raises_early(ValueError, "late", compile_then_fail)
