"""Solver stages. Each is a frozen dataclass with ``init(theta, problem) -> state`` and
``step(theta, state, problem) -> (theta, state, done, converged)``, written for one gene."""

from nbfit._solvers.irls import IRLS as IRLS
from nbfit._solvers.lbfgs import LBFGS as LBFGS
from nbfit._solvers.newton import Newton as Newton

__all__ = ["IRLS", "LBFGS", "Newton"]
