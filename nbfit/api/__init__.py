"""diffxpy-compatible entry points: ``import nbfit.api as de; de.fit.model(...)``."""

from nbfit.api import fit as fit
from nbfit.api import utils as utils

__all__ = ["fit", "utils"]
