"""Design matrices from formulas (formulaic) or from pre-built matrices.

Columns of the sample description named in ``as_numeric`` stay numeric; every other
column used by a formula is categorical with its levels sorted, so that treatment coding
takes the first sorted level as the reference (``condition[T.B]``).
"""

from typing import NamedTuple

import formulaic
import numpy as np
import pandas as pd
import scipy.linalg


#: Designs with at most this many distinct rows get group-wise closed forms.
MAX_GROUPS = 256


class Design(NamedTuple):
    """A design matrix and its column names.

    Attributes
    ----------
    matrix : ndarray, shape (n_cells, n_coefficients)
    names : list of str, length n_coefficients
    """

    matrix: np.ndarray
    names: list


def normalise_as_numeric(as_numeric):
    """``as_numeric`` (str or sequence of str) as a tuple of column names."""
    if as_numeric is None:
        return ()
    if isinstance(as_numeric, str):
        return (as_numeric,)
    return tuple(as_numeric)


def parse_formula(formula, which="loc"):
    """``formula`` parsed by formulaic; every problem is a ValueError naming the formula."""
    if not isinstance(formula, str):
        raise ValueError(f"formula_{which} must be a string such as '~1+condition', got {formula!r}.")
    try:
        parsed = formulaic.Formula(formula)
    except Exception as error:  # noqa: BLE001 - formulaic's parser errors are not all FormulaicError
        message = str(error).split("\n")[0]
        raise ValueError(f"formula_{which}={formula!r} could not be parsed: {message}") from None
    if isinstance(parsed, formulaic.formula.StructuredFormula):
        raise ValueError(
            f"formula_{which}={formula!r} is not a one-sided formula with a single part such as "
            "'~1+condition' (no left-hand side, no '|')."
        )
    return parsed


def design_from_formula(formula, sample_description, as_numeric=(), which="loc", check=True):
    """Build the design of ``formula`` over ``sample_description``.

    Parameters
    ----------
    formula : str
        A Wilkinson formula such as ``"~1+condition+batch"``.
    sample_description : DataFrame, shape (n_cells, n_covariates)
    as_numeric : tuple of str
        Columns kept numeric; all others used by the formula become categorical.
    which : {"loc", "scale"}
        Only used in error messages.
    check : bool
        Raise if the design is rank deficient (off for designs identified by constraints).
    """
    parsed = parse_formula(formula, which)
    try:
        variables = sorted(parsed.required_variables)
    except Exception as error:  # noqa: BLE001 - any failure here is the formula's
        raise ValueError(f"formula_{which}={formula!r} could not be parsed: {error}") from None
    missing = [v for v in variables if v not in sample_description.columns]
    if missing:
        raise ValueError(
            f"formula_{which}={formula!r} uses {missing}, which are not columns of the sample "
            f"description; columns are {list(sample_description.columns)}."
        )
    for column in as_numeric:
        if column not in sample_description.columns:
            raise ValueError(
                f"as_numeric names {column!r}, which is not a column of the sample description; "
                f"columns are {list(sample_description.columns)}."
            )
        if not pd.api.types.is_numeric_dtype(sample_description[column]):
            raise ValueError(
                f"as_numeric names {column!r}, whose values are not numeric "
                f"(dtype {sample_description[column].dtype})."
            )
    frame = pd.DataFrame(index=sample_description.index)
    for v in variables:
        column = sample_description[v]
        if v in as_numeric:
            frame[v] = _numeric(column, v)
        else:
            frame[v] = _sorted_categorical(column, v)
    try:
        matrix = formulaic.model_matrix(formula, frame, na_action="raise")
    except Exception as error:  # noqa: BLE001 - formulaic evaluates the formula's Python code
        raise ValueError(
            f"formula_{which}={formula!r} could not be evaluated: {type(error).__name__}: {error}"
        ) from None
    if not isinstance(matrix, pd.DataFrame):
        raise ValueError(
            f"formula_{which}={formula!r} is not a one-sided formula with a single part "
            "(such as '~1+condition')."
        )
    design = Design(np.asarray(matrix, dtype=np.float64), list(matrix.columns))
    finite = np.isfinite(design.matrix).all(axis=0)
    if not finite.all():
        names = [name for name, ok in zip(design.names, finite) if not ok]
        raise ValueError(f"formula_{which}={formula!r} gives non-finite values in the design columns {names}.")
    return check_design(design, which) if check else design


def _numeric(column, name):
    """``column`` as float64; raise on missing or infinite values."""
    values = column.astype(np.float64)
    if values.isna().any():
        first = values.index[values.isna().to_numpy()][0]
        raise ValueError(
            f"column {name!r} of the sample description has {int(values.isna().sum())} missing "
            f"value(s), first at cell {first!r}."
        )
    infinite = ~np.isfinite(values.to_numpy())
    if infinite.any():
        raise ValueError(
            f"column {name!r} of the sample description has {int(infinite.sum())} infinite "
            f"value(s), first at cell {values.index[infinite][0]!r}."
        )
    return values


def _sorted_categorical(column, name):
    """``column`` as a categorical whose categories are its sorted distinct values."""
    if column.isna().any():
        raise ValueError(f"column {name!r} of the sample description has missing values.")
    values = column.astype(object) if isinstance(column.dtype, pd.CategoricalDtype) else column
    levels = pd.unique(values)
    try:
        levels = sorted(levels)
    except TypeError:
        levels = sorted(levels, key=str)
    return pd.Categorical(values, categories=levels)


def design_from_matrix(dmat, n_cells, which="loc", check=True):
    """A :class:`Design` from a DataFrame / formulaic ModelMatrix, ``(array, names)`` or array."""
    if isinstance(dmat, pd.DataFrame):
        matrix, names = dmat.to_numpy(), [str(c) for c in dmat.columns]
    elif isinstance(dmat, tuple) and len(dmat) == 2:
        matrix, names = np.asarray(dmat[0]), [str(c) for c in dmat[1]]
    else:
        matrix = np.asarray(dmat)
        names = [f"x{k}" for k in range(matrix.shape[1])] if matrix.ndim == 2 else []
    try:
        matrix = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"dmat_{which} must be numeric.") from None
    if matrix.ndim != 2:
        raise ValueError(f"dmat_{which} must be 2-dimensional (cells x coefficients), got shape {matrix.shape}.")
    if matrix.shape[0] != n_cells:
        raise ValueError(f"dmat_{which} has {matrix.shape[0]} rows but data has {n_cells} cells.")
    if len(names) != matrix.shape[1]:
        raise ValueError(f"dmat_{which} has {matrix.shape[1]} columns but {len(names)} names.")
    if not np.all(np.isfinite(matrix)):
        raise ValueError(f"dmat_{which} has non-finite entries.")
    design = Design(matrix, names)
    return check_design(design, which) if check else design


def check_design(design, which="loc"):
    """Raise if the design has more columns than rows or is rank deficient (naming columns)."""
    n_cells, n_coefficients = design.matrix.shape
    if n_coefficients == 0:
        raise ValueError(f"the {which} design has no columns.")
    if n_coefficients > n_cells:
        raise ValueError(
            f"the {which} design has {n_coefficients} coefficients but only {n_cells} cells."
        )
    dependent = dependent_columns(design.matrix)
    if dependent:
        names = [design.names[k] for k in dependent]
        involved = [design.names[k] for k in involved_columns(design.matrix)]
        raise ValueError(
            f"the {which} design is rank deficient: columns {names} are linear combinations of "
            f"the others (linearly dependent columns: {involved}; design columns: "
            f"{design.names}). Drop or merge them, or identify the model with constraints_{which}."
        )
    return design


def involved_columns(matrix):
    """Indices of the columns that take part in some linear dependency (null space support)."""
    _, singular_values, vt = np.linalg.svd(matrix, full_matrices=False)
    tolerance = max(matrix.shape) * np.finfo(np.float64).eps * singular_values[0]
    null_space = vt[int(np.sum(singular_values > tolerance)):]
    return [int(k) for k in np.flatnonzero(np.any(np.abs(null_space) > 1e-8, axis=0))]


def dependent_columns(matrix):
    """Indices of the columns outside a maximal independent set (pivoted QR)."""
    if matrix.shape[1] == 0:
        return []
    _, r, pivots = scipy.linalg.qr(matrix, mode="economic", pivoting=True)
    diagonal = np.abs(np.diag(r))
    tolerance = max(matrix.shape) * np.finfo(np.float64).eps * diagonal[0]
    rank = int(np.sum(diagonal > tolerance))
    return sorted(int(k) for k in pivots[rank:])


class DesignGroups:
    """The distinct rows of a design (cells with equal rows form a group).

    Attributes
    ----------
    rows : ndarray, shape (n_groups, p)
    inverse : ndarray of int, shape (n_cells,)
        Group of each cell.
    indicator : ndarray, shape (n_cells, n_groups)
        One-hot group membership of each cell (only if ``usable``).
    usable : bool
        Few groups and full rank: group-wise closed forms are possible.
    """

    def __init__(self, matrix):
        rows, inverse = np.unique(matrix, axis=0, return_inverse=True)
        inverse = np.asarray(inverse).reshape(-1)
        self.rows = rows
        self.inverse = inverse
        self.usable = rows.shape[0] <= MAX_GROUPS and np.linalg.matrix_rank(rows) == rows.shape[1]
        if self.usable:
            self.indicator = np.zeros((matrix.shape[0], rows.shape[0]))
            self.indicator[np.arange(matrix.shape[0]), inverse] = 1.0

    def fit(self, group_values, group_weights):
        """Weighted least squares of per-group values on the group rows.

        Parameters
        ----------
        group_values : ndarray, shape (n_genes, n_groups)
        group_weights : ndarray, shape (n_groups,)

        Returns
        -------
        ndarray, shape (n_genes, p)
        """
        weighted = self.rows * group_weights[:, None]
        return np.linalg.solve(self.rows.T @ weighted, (group_values @ weighted).T).T
