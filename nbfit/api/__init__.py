"""diffxpy-compatible entry points: ``import nbfit.api as de; de.fit.model(...)``."""

from nbfit.api import fit as fit

__all__ = ["fit"]
