"""Probes: one collapse phenomenon at one place in the model."""

from .attention import AttentionEntropy
from .base import Probe
from .codebook import CodebookUsage, LatentUsage
from .logits import DormantUnits, LogitHealth, TokenUniformity
from .neural_collapse import GroupCollapse, NeuralCollapse
from .representation import PosteriorCollapse, RepresentationRank

__all__ = [
    "AttentionEntropy",
    "CodebookUsage",
    "DormantUnits",
    "GroupCollapse",
    "LatentUsage",
    "LogitHealth",
    "NeuralCollapse",
    "PosteriorCollapse",
    "Probe",
    "RepresentationRank",
    "TokenUniformity",
]
