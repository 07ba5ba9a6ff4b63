"""Mitigations: explicit, logged actions on the model taken at logging cadence."""

from .base import Mitigation
from .redo import ReDo
from .reset_dead_codes import ResetDeadCodes
from .sigma_reparam import SigmaReparam, SigmaReparametrization, sigma_reparam
from .simvq import SimVQ, SimVQParametrization, simvq

__all__ = [
    "Mitigation",
    "ReDo",
    "ResetDeadCodes",
    "SigmaReparam",
    "SigmaReparametrization",
    "sigma_reparam",
    "SimVQ",
    "SimVQParametrization",
    "simvq",
]
