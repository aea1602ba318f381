"""``de.utils``: helpers for building constrained designs by hand."""

from nbfit.constraints import constraint_matrix_from_dict as constraint_matrix_from_dict
from nbfit.constraints import constraint_matrix_from_string as constraint_matrix_from_string
from nbfit.constraints import setup_constrained as setup_constrained

__all__ = ["constraint_matrix_from_dict", "constraint_matrix_from_string", "setup_constrained"]
