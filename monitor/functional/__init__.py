"""Whole-tensor float64 reference implementations of every metric."""

from .codebook import codebook_usage, usage_from_counts
from .neural_collapse import (
    metrics_from_class_statistics,
    nearest_class_center_mismatch,
    neural_collapse,
)

__all__ = [
    "codebook_usage",
    "metrics_from_class_statistics",
    "nearest_class_center_mismatch",
    "neural_collapse",
    "usage_from_counts",
]
