"""Probes: one collapse phenomenon at one place in the model."""

from .base import Probe
from .neural_collapse import NeuralCollapse

__all__ = ["NeuralCollapse", "Probe"]
