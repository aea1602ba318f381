"""Solver stages. Each is a frozen dataclass with ``init(theta, problem) -> state`` and
``step(theta, state, problem, active, n_steps) -> (theta, state, done, converged)``, written
for all genes of a chunk at once (genes on the first axis of every array; ``active`` marks
the genes still being fitted, ``n_steps`` counts each gene's steps in the stage)."""

from nbfit._solvers.irls import IRLS as IRLS
from nbfit._solvers.lbfgs import LBFGS as LBFGS
from nbfit._solvers.newton import Newton as Newton

__all__ = ["IRLS", "LBFGS", "Newton"]
