"""``de.fit.model``: the diffxpy name of :func:`nbfit.fit`."""

from nbfit._fit import fit as model

__all__ = ["model"]
