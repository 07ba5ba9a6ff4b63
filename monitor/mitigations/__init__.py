"""Mitigations: explicit, logged actions on the model taken at logging cadence."""

from .base import Mitigation

__all__ = ["Mitigation"]
