"""nbfit: negative-binomial GLMs for every gene of a count matrix at once, in JAX."""

from nbfit import api as api
from nbfit import constraints as constraints
from nbfit import inference as inference
from nbfit._estimator import Estimator as Estimator
from nbfit._estimator import Model as Model
from nbfit._fit import fit as fit
from nbfit._results import Results as Results
from nbfit._results import load as load
from nbfit._simulate import simulate as simulate
from nbfit._status import Status as Status

__all__ = [
    "Estimator", "Model", "Results", "Status", "api", "constraints", "fit", "inference", "load",
    "simulate",
]
__version__ = "0.1.0"
