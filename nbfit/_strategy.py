"""Training strategies and solver names, resolved in one place."""

import inspect

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
        options["tol"] = float(tol)
    return cls(**options)


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
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"Estimator.train got unknown arguments {unknown}; valid arguments are {valid}.")
