"""diffxpy-compatible entry points: ``import nbfit.api as de; de.fit.model(...)``,
``de.test.wald(...)``, ``de.test.lrt(...)``."""

from nbfit.api import fit as fit
from nbfit.api import test as test
from nbfit.api import utils as utils

__all__ = ["fit", "test", "utils"]
