"""Training strategies and solver names, resolved in one place."""

import difflib
import inspect
import math
import numbers

import numpy as np

from nbfit._solvers import IRLS, LBFGS, Newton

#: Solver names accepted by ``Estimator.train(method=...)`` (case-insensitive).
SOLVERS = {
    "newton": Newton,
    "nr": Newton,
    "newton_raphson": Newton,
    "irls": IRLS,
    "lbfgs": LBFGS,
    "l-bfgs": LBFGS,
    "l_bfgs": LBFGS,
}

#: Default ``max_steps`` of each solver.
MAX_STEPS = {Newton: 100, IRLS: 100, LBFGS: 1000}

#: Named strategies: each a list of keyword dicts for ``Estimator.train``.
STRATEGIES = {
    "AUTO": [{"method": "newton"}],
    "DEFAULT": [{"method": "newton"}],
    "EXACT": [{"method": "newton", "tol": 1e-13, "max_steps": 200}],
    "QUICK": [{"method": "irls", "tol": 1e-6, "max_steps": 20}],
    "IRLS": [{"method": "irls"}],
    "NEWTON": [{"method": "newton"}],
    "NR": [{"method": "newton"}],
    "LBFGS": [{"method": "lbfgs"}],
}


def make_solver(method, tol=None, update_loc=True, update_scale=True):
    """A solver stage from its name (see :data:`SOLVERS`)."""
    if not isinstance(method, str) or method.lower() not in SOLVERS:
        raise ValueError(f"unknown training method {method!r}; valid methods are {sorted(SOLVERS)}.")
    cls = SOLVERS[method.lower()]
    options = {"update_loc": bool(update_loc), "update_scale": bool(update_scale)}
    if tol is not None:
        options["tol"] = check_tol(tol)
    return cls(**options)


def check_tol(tol):
    """``tol`` as a positive finite float, or a clear ValueError."""
    try:
        value = float(tol)
    except (TypeError, ValueError):
        raise ValueError(f"tol must be a positive number, got {tol!r}.") from None
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}.")
    return value


def check_max_steps(max_steps):
    """``max_steps`` (None or an integer >= 0) unchanged, or a clear ValueError."""
    if max_steps is None:
        return None
    integral = isinstance(max_steps, numbers.Integral) or (
        isinstance(max_steps, numbers.Real) and math.isfinite(max_steps) and float(max_steps).is_integer()
    )
    if isinstance(max_steps, bool) or not integral or max_steps < 0:
        raise ValueError(f"max_steps must be None or an integer >= 0, got {max_steps!r}.")
    return int(max_steps)


def check_stage(stage, label="training_strategy"):
    """Validate one keyword dict for ``Estimator.train`` before anything is compiled.

    Unknown keys are a TypeError (as for any unknown keyword argument); bad values of
    known keys a ValueError naming the stage.
    """
    from nbfit._estimator import Estimator

    try:
        check_train_arguments(Estimator.train, stage)
    except TypeError as error:
        raise TypeError(f"{label}: {error}") from None
    try:
        make_solver(stage.get("method", "newton"), tol=stage.get("tol"))
        check_max_steps(stage.get("max_steps"))
    except ValueError as error:
        raise ValueError(f"{label}: {error}") from None
    for flag in ("update_loc", "update_scale"):
        if not isinstance(stage.get(flag, True), (bool, np.bool_)):
            raise ValueError(f"{label}: {flag} must be True or False, got {stage[flag]!r}.")
    if not stage.get("update_loc", True) and not stage.get("update_scale", True):
        raise ValueError(f"{label}: update_loc and update_scale are both False; the stage would fit nothing.")


def default_max_steps(solver):
    return MAX_STEPS[type(solver)]


def resolve_strategy(training_strategy, quick_scale=False):
    """A callable ``strategy(estimator)`` for any accepted ``training_strategy``.

    Parameters
    ----------
    training_strategy : str, callable or list of dict
        A name of :data:`STRATEGIES` (case-insensitive); a callable called with the
        estimator; or a list of keyword dicts, each passed to ``estimator.train``.
    quick_scale : bool
        For named strategies: fit the scale once, given the location, instead of jointly
        (location-only stage, scale-only Newton stage, location-only stage: the one-pass
        scheme of glmGamPoi). Faster; the scale is not the joint maximiser.
    """
    if callable(training_strategy):
        return training_strategy
    if isinstance(training_strategy, str):
        key = training_strategy.upper()
        if key not in STRATEGIES:
            raise ValueError(
                f"unknown training_strategy {training_strategy!r}; valid names are "
                f"{sorted(STRATEGIES)}, or pass a callable or a list of dicts for train()."
            )
        stages = STRATEGIES[key]
        if quick_scale:
            stages = [
                {**stage, "update_scale": False} for stage in stages
            ] + [{"method": "newton", "update_loc": False}] + [
                {**stage, "update_scale": False} for stage in stages
            ]
    elif isinstance(training_strategy, (list, tuple)):
        stages = list(training_strategy)
        for k, stage in enumerate(stages):
            if not isinstance(stage, dict):
                raise TypeError(
                    f"training_strategy[{k}] is {type(stage).__name__}; a list strategy holds "
                    "dicts of keyword arguments for Estimator.train."
                )
            check_stage(stage, f"training_strategy[{k}]")
    else:
        raise TypeError(
            "training_strategy must be a name, a callable or a list of dicts, "
            f"got {type(training_strategy).__name__}."
        )

    def strategy(estimator):
        for stage in stages:
            estimator.train(**stage)

    return strategy


def check_train_arguments(train, options):
    """Raise a clear TypeError for keyword arguments ``train`` does not take."""
    valid = [name for name in inspect.signature(train).parameters if name != "self"]
    unknown = sorted(set(options) - set(valid), key=str)
    if unknown:
        hints = [
            f"{close[0]!r} for {name!r}"
            for name in unknown
            if (close := difflib.get_close_matches(str(name), valid, n=1))
        ]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise TypeError(
            f"Estimator.train got unknown arguments {unknown}{hint}; valid arguments are {valid}."
        )
