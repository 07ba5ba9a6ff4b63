"""Probes: one collapse phenomenon at one place in the model (see ``docs/writing_a_probe.md``)."""

from .attention import AttentionEntropy
from .base import Call, Probe
from .codebook import CodebookUsage, LatentUsage
from .diversity import GenerationDiversity
from .dormant import DormantUnits
from .logits import LogitHealth
from .neural_collapse import GroupCollapse, NeuralCollapse
from .posterior import PosteriorCollapse
from .representation import RepresentationRank
from .token_entropy import TokenEntropy
from .token_uniformity import TokenUniformity

#: every probe class of the library (the report command replays their declared default rules)
PROBE_TYPES = (
    NeuralCollapse,
    GroupCollapse,
    CodebookUsage,
    LatentUsage,
    AttentionEntropy,
    RepresentationRank,
    PosteriorCollapse,
    LogitHealth,
    TokenEntropy,
    GenerationDiversity,
    TokenUniformity,
    DormantUnits,
)

__all__ = [
    "PROBE_TYPES",
    "AttentionEntropy",
    "Call",
    "CodebookUsage",
    "DormantUnits",
    "GenerationDiversity",
    "GroupCollapse",
    "LatentUsage",
    "LogitHealth",
    "NeuralCollapse",
    "PosteriorCollapse",
    "Probe",
    "RepresentationRank",
    "TokenEntropy",
    "TokenUniformity",
]
