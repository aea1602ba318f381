"""Equality constraints on the coefficients of a design.

nbfit represents constraints by a matrix ``H`` with ``full = H @ reduced``: its rows are
the design columns, its columns the free (reduced) parameters. The model is fitted on the
full-rank design ``X @ H``; the full coefficients ``H @ reduced`` satisfy every constraint
exactly. This is the convention batchglm uses.

Worked example: design columns ``Intercept, condition[T.B], batch[b1], batch[b2],
batch[b3], batch[b4]`` with batches b1, b2 in condition A and b3, b4 in B. The constraints
``batch[b1] + batch[b2] = 0`` and ``batch[b3] + batch[b4] = 0`` make the first term of each
dependent (``batch[b1] = -batch[b2]``); the free parameters are the other columns, in
order: ``Intercept, condition[T.B], batch[b2], batch[b4]``, and::

    H = [[1, 0,  0,  0],     Intercept
         [0, 1,  0,  0],     condition[T.B]
         [0, 0, -1,  0],     batch[b1] = -batch[b2]
         [0, 0,  1,  0],     batch[b2]
         [0, 0,  0, -1],     batch[b3] = -batch[b4]
         [0, 0,  0,  1]]     batch[b4]

The same constraints can be given

* as that array ``H`` (shape: design columns x free parameters);
* in diffxpy's array form: one row per constraint, one column per design column, ``-1``
  for the dependent parameter and ``+1`` for the others (``[[0, 0, -1, 1, 0, 0],
  [0, 0, 0, 0, -1, 1]]``), recognised by having fewer rows than design columns;
* as strings over the design column names (:func:`constraint_matrix_from_string`);
* as a dict ``{"batch": "condition"}`` with a formula (:func:`setup_constrained`).
"""

import re
from typing import NamedTuple

import formulaic
import numpy as np
import pandas as pd

from nbfit._design import Design, check_design, design_from_formula, normalise_as_numeric, parse_formula


class ConstraintError(ValueError):
    """A constraint specification that cannot be used."""


class Constrained(NamedTuple):
    """A full design with its constraint matrix.

    Attributes
    ----------
    design : Design
        The full (possibly rank-deficient) design.
    constraints : ndarray, shape (n_full, n_reduced)
        ``full = constraints @ reduced``.
    reduced_names : list of str
        Names of the free parameters.
    """

    design: Design
    constraints: np.ndarray
    reduced_names: list


def constraint_matrix_from_string(names, constraints):
    """Constraint matrix ``H`` from equations over design column names.

    Parameters
    ----------
    names : sequence of str
        Design column names.
    constraints : str or sequence of str
        Equations ``"p1 + p2 + ... + pk = 0"`` (terms may carry ``-`` and a numeric
        factor, e.g. ``"2*x - y = 0"``). The first term of each is the dependent
        parameter, expressed through the others; it must not be dependent already.

    Returns
    -------
    H : ndarray, shape (len(names), len(names) - n_constraints)
    reduced_names : list of str

    Examples
    --------
    >>> H, free = constraint_matrix_from_string(["a", "b", "c"], ["b + c = 0"])
    >>> H.tolist(), free
    ([[1.0, 0.0], [0.0, -1.0], [0.0, 1.0]], ['a', 'c'])
    """
    names = [str(name) for name in names]
    if isinstance(constraints, str):
        constraints = [constraints]
    rows = np.zeros((len(constraints), len(names)))
    for k, equation in enumerate(constraints):
        for index, coefficient in _parse_equation(equation, names):
            rows[k, index] += coefficient
    return _matrix_from_rows(names, rows, [_first_index(e, names) for e in constraints], constraints)


def _parse_equation(equation, names):
    """[(column index, coefficient)] of ``equation`` (left side, right side 0)."""
    if not isinstance(equation, str) or equation.count("=") != 1:
        raise ConstraintError(
            f"constraint {equation!r} is not an equation 'p1 + p2 + ... = 0' over the design "
            f"columns {names}."
        )
    left, right = equation.split("=")
    if right.strip() != "0":
        raise ConstraintError(f"constraint {equation!r}: the right-hand side must be 0.")
    terms, position, text = [], 0, left.strip()
    by_length = sorted(names, key=len, reverse=True)
    while position < len(text):
        match = re.match(r"\s*([+-]?)\s*(?:(\d+(?:\.\d*)?)\s*\*\s*)?", text[position:])
        sign = -1.0 if match.group(1) == "-" else 1.0
        factor = float(match.group(2)) if match.group(2) else 1.0
        position += match.end()
        name = next((n for n in by_length if text.startswith(n, position)), None)
        if name is None:
            raise ConstraintError(
                f"constraint {equation!r}: {text[position:]!r} does not start with a design column "
                f"name; valid names are {names}."
            )
        terms.append((names.index(name), sign * factor))
        position += len(name)
        rest = text[position:].lstrip()
        if rest and rest[0] not in "+-":
            raise ConstraintError(
                f"constraint {equation!r}: expected '+' or '-' before {rest!r}; valid names are {names}."
            )
    if not terms:
        raise ConstraintError(f"constraint {equation!r} has no terms.")
    return terms


def _first_index(equation, names):
    return _parse_equation(equation, names)[0][0]


def constraint_matrix_from_array(names, array):
    """Constraint matrix ``H`` from an array in nbfit's or diffxpy's form.

    Parameters
    ----------
    names : sequence of str
        Design column names (``n_full`` of them).
    array : array-like
        Either ``H`` itself, shape (n_full, n_reduced) with ``n_reduced <= n_full``, or
        diffxpy's form, shape (n_constraints, n_full) with ``n_constraints < n_full``: one
        row per constraint, -1 marking the dependent parameter, +1 the others.

    Returns
    -------
    H : ndarray, shape (n_full, n_reduced)
    reduced_names : list of str
    """
    names = [str(name) for name in names]
    n_full = len(names)
    try:
        array = np.asarray(array, dtype=np.float64)
    except (TypeError, ValueError):
        raise ConstraintError(
            f"constraints {array!r} are neither equations (a string or a list of strings) nor a "
            "numeric array."
        ) from None
    if array.ndim != 2 or not np.all(np.isfinite(array)):
        raise ConstraintError("a constraint array must be a finite 2-dimensional array.")
    if array.shape[0] == n_full and array.shape[1] <= n_full:
        return array, _reduced_names(names, array)
    if array.shape[1] == n_full and array.shape[0] < n_full:
        dependent = []
        for k, row in enumerate(array):
            minus = np.flatnonzero(row == -1)
            if len(minus) != 1 or not np.all(np.isin(row, (-1, 0, 1))):
                raise ConstraintError(
                    f"row {k} of the diffxpy-form constraint array must hold exactly one -1 (the "
                    "dependent parameter) and otherwise 0 or +1."
                )
            dependent.append(int(minus[0]))
        rows = np.where(array == -1, 1.0, array)
        return _matrix_from_rows(names, rows, dependent, [f"row {k}" for k in range(len(array))])
    raise ConstraintError(
        f"a constraint array of shape {array.shape} does not fit a design with {n_full} columns "
        f"{names}: pass H with full = H @ reduced, shape ({n_full}, n_free) with n_free <= "
        f"{n_full}, or diffxpy's form, shape (n_constraints, {n_full}) with n_constraints < {n_full}."
    )


def _matrix_from_rows(names, rows, dependent, labels):
    """``H`` from constraint rows ``rows @ full = 0``, each solved for its dependent column."""
    n_full = len(names)
    if len(set(dependent)) != len(dependent):
        repeated = [names[d] for d in dependent if dependent.count(d) > 1]
        raise ConstraintError(f"parameter {repeated[0]!r} is the dependent parameter of two constraints.")
    free = [j for j in range(n_full) if j not in dependent]
    if not free:
        raise ConstraintError("the constraints leave no free parameter.")
    expression = np.zeros((n_full, len(free)))
    expression[free, np.arange(len(free))] = 1.0
    defined = set(free)
    for row, d, label in zip(rows, dependent, labels):
        others = [j for j in np.flatnonzero(row) if j != d]
        undefined = [names[j] for j in others if j not in defined]
        if undefined:
            raise ConstraintError(
                f"constraint {label!r} uses {undefined}, dependent in a later constraint; order the "
                "constraints so that each uses only free or earlier-defined parameters."
            )
        expression[d] = -sum(row[j] * expression[j] for j in others) / row[d] + 0.0
        defined.add(d)
    return expression, [names[j] for j in free]


def _reduced_names(names, matrix):
    """Names of the columns of a user-given ``H``: the design column it is the unit of."""
    result = []
    for k in range(matrix.shape[1]):
        column = matrix[:, k]
        units = [j for j in np.flatnonzero(column == 1) if np.count_nonzero(matrix[j]) == 1]
        result.append(names[units[0]] if units else f"reduced_{k}")
    return result


def constraint_matrix_from_dict(sample_description, constraints, names, as_numeric=()):
    """Constraint strings and matrix of a dict ``{factor: grouping factor or "1"}``.

    The levels of each constrained factor (dummy coded without a reference level, columns
    ``factor[level]``) sum to zero within each level of its grouping factor, or over all
    levels for ``"1"``. The constrained factor must be nested in its grouping factor.

    Returns
    -------
    H : ndarray, shape (len(names), n_reduced)
    reduced_names : list of str
    equations : list of str
    """
    equations = []
    as_numeric = normalise_as_numeric(as_numeric)
    for factor, group in constraints.items():
        if not isinstance(group, str) and group != 1:
            raise ConstraintError(
                f"constraints {{{factor!r}: {group!r}}}: the value must be the name of a grouping "
                "factor or \"1\" (sum to zero over all levels)."
            )
        _check_factor(sample_description, factor, as_numeric, "constrained factor")
        levels = _levels(sample_description[factor])
        if str(group) == "1":
            blocks = [levels]
        else:
            if group in constraints:
                raise ConstraintError(
                    f"constraints {{{factor!r}: {group!r}}} group by {group!r}, which is itself "
                    "constrained; group by an unconstrained factor, or write the constraints as "
                    "strings (constraint_matrix_from_string)."
                )
            _check_factor(sample_description, group, as_numeric, "grouping factor")
            blocks = _nested_blocks(sample_description, factor, group)
        for block in blocks:
            if len(block) > 1:
                equations.append(" + ".join(f"{factor}[{level}]" for level in block) + " = 0")
    matrix, reduced = constraint_matrix_from_string(names, equations)
    return matrix, reduced, equations


def _check_factor(sample_description, name, as_numeric, role):
    if name not in sample_description.columns:
        raise ConstraintError(
            f"{role} {name!r} is not a column of the sample description; columns are "
            f"{list(sample_description.columns)}."
        )
    if name in as_numeric:
        raise ConstraintError(f"{role} {name!r} is numeric (as_numeric); only factors can be constrained.")


def _levels(column):
    values = column.astype(object) if isinstance(column.dtype, pd.CategoricalDtype) else column
    try:
        return sorted(pd.unique(values))
    except TypeError:
        return sorted(pd.unique(values), key=str)


def _nested_blocks(sample_description, factor, group):
    """Levels of ``factor`` within each level of ``group``; raise unless nested."""
    pairs = sample_description[[factor, group]].astype(str).drop_duplicates()
    spread = pairs.groupby(factor)[group].nunique()
    crossed = spread[spread > 1]
    if len(crossed):
        raise ConstraintError(
            f"{factor!r} is not nested in {group!r}: level {crossed.index[0]!r} of {factor!r} occurs "
            f"in {int(crossed.iloc[0])} levels of {group!r}. Constraints within groups need each "
            f"level of {factor!r} in exactly one level of {group!r}."
        )
    by_string = {str(level): level for level in _levels(sample_description[factor])}
    blocks = []
    for level in _levels(sample_description[group]):
        members = pairs.loc[pairs[group] == str(level), factor]
        blocks.append([by_string[m] for m in sorted(members, key=lambda m: list(by_string).index(m))])
    return blocks


def setup_constrained(sample_description, formula, constraints, as_numeric=()):
    """Full design and constraint matrix of a formula with constraints.

    Parameters
    ----------
    sample_description : DataFrame, shape (n_cells, n_covariates)
    formula : str
        e.g. ``"~1+condition+batch"``.
    constraints : dict, str, sequence of str or array
        A dict ``{"batch": "condition"}`` removes the constrained factors from the formula
        and appends them fully dummy coded (``~0+batch``: columns ``batch[b1]``, ...),
        exactly as batchglm does; other forms apply to the formula's own design columns.
    as_numeric : sequence of str

    Returns
    -------
    design : DataFrame, shape (n_cells, n_full)
    coef_names : list of str
        The full design column names.
    constraint_matrix : ndarray, shape (n_full, n_reduced)
        ``full = constraint_matrix @ reduced``.
    term_names : list of str
        The terms of the formula.
    """
    constrained = build_constrained(sample_description, formula, constraints, as_numeric)
    design = pd.DataFrame(
        constrained.design.matrix, index=sample_description.index, columns=constrained.design.names
    )
    terms = [str(term) for term in _terms(formula)]
    term_names = ["Intercept" if term == "1" else term for term in terms]
    return design, list(constrained.design.names), constrained.constraints, term_names


def build_constrained(sample_description, formula, constraints, as_numeric=(), which="loc"):
    """:class:`Constrained` design of a formula and any form of constraints, rank-checked."""
    as_numeric = normalise_as_numeric(as_numeric)
    if isinstance(constraints, dict):
        design = _design_with_full_dummies(sample_description, formula, list(constraints), as_numeric, which)
        matrix, reduced, _ = constraint_matrix_from_dict(sample_description, constraints, design.names, as_numeric)
    else:
        # Equations that name factor levels without "T." ("batch[b1]") refer to the full
        # dummy coding of that factor, as with the dict form.
        if isinstance(constraints, str):
            text = constraints
        elif isinstance(constraints, (list, tuple)):
            text = " ".join(c for c in constraints if isinstance(c, str))
        else:
            text = ""
        full_dummies = [
            factor for factor in _single_factors(formula, which)
            if f"{factor}[" in text and f"{factor}[T." not in text
        ]
        if full_dummies:
            design = _design_with_full_dummies(sample_description, formula, full_dummies, as_numeric, which)
        else:
            design = design_from_formula(formula, sample_description, as_numeric, which, check=False)
        matrix, reduced = constraint_matrix_any(design.names, constraints)
    return check_constrained(Constrained(design, matrix, reduced), which)


def constraint_matrix_any(names, constraints):
    """``(H, reduced_names)`` of string / list-of-strings / array constraints."""
    if isinstance(constraints, str) or (
        isinstance(constraints, (list, tuple)) and all(isinstance(c, str) for c in constraints)
    ):
        return constraint_matrix_from_string(names, constraints)
    if isinstance(constraints, dict):
        raise ConstraintError(
            "dict constraints need a formula (formula_loc / formula_scale) to build the design "
            "from; with a pre-built design matrix give strings or an array."
        )
    return constraint_matrix_from_array(names, constraints)


def check_constrained(constrained, which="loc"):
    """Raise unless ``X @ H`` has full column rank (naming the free parameters involved)."""
    reduced = Design(constrained.design.matrix @ constrained.constraints, constrained.reduced_names)
    try:
        check_design(reduced, which)
    except ValueError as error:
        raise ConstraintError(
            f"with constraints_{which}, {error} Full design columns: {constrained.design.names}."
        ) from None
    return constrained


def _terms(formula, which="loc"):
    """The terms of a one-sided, single-part formula (ValueError otherwise)."""
    return list(parse_formula(formula, which))


def _single_factors(formula, which="loc"):
    """Names of the factors that form a main-effect term of ``formula``."""
    terms = _terms(formula, which)
    return [str(term) for term in terms if len(term.factors) == 1 and str(term) != "1"]


def _design_with_full_dummies(sample_description, formula, factors, as_numeric, which):
    """The formula without the constrained factors, plus their full dummy coding."""
    terms = _terms(formula, which)
    kept = []
    for term in terms:
        used = {str(factor) for factor in term.factors}
        if used & set(factors):
            if len(used) > 1:
                raise ConstraintError(
                    f"term {str(term)!r} of formula_{which} mixes a constrained factor with others; "
                    "dict constraints support main effects only: write the constraints as strings."
                )
            continue
        kept.append(str(term))
    missing = [f for f in factors if f not in {str(fa) for t in terms for fa in t.factors}]
    if missing:
        raise ConstraintError(f"constrained factors {missing} are not terms of formula_{which}={formula!r}.")
    base = "~" + ("+".join(kept) if "1" in kept else "+".join(["0"] + kept))
    parts = [design_from_formula(base, sample_description, as_numeric, which, check=False)] if kept else []
    for factor in factors:
        parts.append(design_from_formula(f"~0+{factor}", sample_description, as_numeric, which, check=False))
    return Design(np.hstack([p.matrix for p in parts]), [name for p in parts for name in p.names])
