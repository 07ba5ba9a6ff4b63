"""Whole-tensor float64 reference implementations of every metric, and the readouts (functions of
sufficient statistics) that the streaming probes share with them."""

from .attention import attention_entropy, entropy_from_logits, entropy_from_probs, entropy_from_sums
from .codebook import (
    codebook_usage,
    dead_codes,
    fire_rate,
    latent_usage,
    uniform_usage,
    usage_from_counts,
)
from .depth import mean_token_uniformity, token_uniformity, token_uniformity_from_sums
from .diversity import generation_diversity
from .logits import (
    logit_health,
    logit_health_from_sums,
    logit_rows,
    softmax_collapsed,
    training_dtype,
    zero_loss,
)
from .neural_collapse import (
    class_gram,
    cross_pairwise_sums,
    group_collapse,
    group_variance_ratio,
    metrics_from_class_statistics,
    nearest_class_center,
    nearest_class_center_mismatch,
    neural_collapse,
    pairwise_metrics,
    pairwise_sums,
    sampled_pairwise_metrics,
    used_class_means,
)
from .representation import (
    effective_rank,
    frechet_distance,
    posterior_collapse,
    rankme,
    representation_rank,
)
from .token_entropy import chunked_entropy, token_entropy, token_entropy_metrics
from .units import dormant_from_activity, dormant_units

__all__ = [
    "attention_entropy",
    "chunked_entropy",
    "class_gram",
    "codebook_usage",
    "cross_pairwise_sums",
    "dead_codes",
    "dormant_from_activity",
    "dormant_units",
    "effective_rank",
    "generation_diversity",
    "entropy_from_logits",
    "entropy_from_probs",
    "entropy_from_sums",
    "fire_rate",
    "frechet_distance",
    "group_collapse",
    "group_variance_ratio",
    "latent_usage",
    "logit_health",
    "logit_health_from_sums",
    "logit_rows",
    "mean_token_uniformity",
    "metrics_from_class_statistics",
    "nearest_class_center",
    "nearest_class_center_mismatch",
    "neural_collapse",
    "pairwise_metrics",
    "pairwise_sums",
    "posterior_collapse",
    "rankme",
    "representation_rank",
    "sampled_pairwise_metrics",
    "softmax_collapsed",
    "token_entropy",
    "token_entropy_metrics",
    "token_uniformity",
    "token_uniformity_from_sums",
    "training_dtype",
    "uniform_usage",
    "usage_from_counts",
    "used_class_means",
    "zero_loss",
]
