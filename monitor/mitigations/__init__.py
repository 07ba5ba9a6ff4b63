"""Mitigations: explicit, logged actions on the model taken at logging cadence."""

from .base import Mitigation
from .reset_dead_codes import ResetDeadCodes

__all__ = ["Mitigation", "ResetDeadCodes"]
