"""Probes: one collapse phenomenon at one place in the model."""

from .base import Probe
from .codebook import CodebookUsage, LatentUsage
from .neural_collapse import NeuralCollapse

__all__ = ["CodebookUsage", "LatentUsage", "NeuralCollapse", "Probe"]
