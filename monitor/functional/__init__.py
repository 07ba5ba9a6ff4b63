"""Whole-tensor float64 reference implementations of every metric."""

from .neural_collapse import (
    metrics_from_class_statistics,
    nearest_class_center_mismatch,
    neural_collapse,
)

__all__ = ["metrics_from_class_statistics", "nearest_class_center_mismatch", "neural_collapse"]
