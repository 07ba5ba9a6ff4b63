"""Whole-tensor float64 reference implementations of every metric."""

from .attention import attention_entropy, entropy_from_logits, entropy_from_probs
from .codebook import codebook_usage, usage_from_counts
from .logits import dormant_units, logit_health, softmax_collapsed, token_uniformity, zero_loss
from .neural_collapse import (
    metrics_from_class_statistics,
    nearest_class_center_mismatch,
    neural_collapse,
)
from .representation import (
    effective_rank,
    frechet_distance,
    posterior_collapse,
    rankme,
    representation_rank,
)

__all__ = [
    "attention_entropy",
    "entropy_from_logits",
    "entropy_from_probs",
    "codebook_usage",
    "dormant_units",
    "logit_health",
    "softmax_collapsed",
    "token_uniformity",
    "zero_loss",
    "effective_rank",
    "frechet_distance",
    "metrics_from_class_statistics",
    "nearest_class_center_mismatch",
    "neural_collapse",
    "posterior_collapse",
    "rankme",
    "representation_rank",
    "usage_from_counts",
]
