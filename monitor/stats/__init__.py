"""Mergeable streaming statistics: ``update(batch)``, ``merge(other)``, ``all_reduce(group)``."""

from .base import Counter, Statistic, SumStatistic, to_device
from .class_moments import ClassMoments

__all__ = ["ClassMoments", "Counter", "Statistic", "SumStatistic", "to_device"]
