"""Mergeable streaming statistics: declared states, ``update``, ``merge``, ``all_reduce``,
``state_dict``; a :class:`Window` holds a probe's statistics together."""

from .attention import HeadEntropy
from .base import Counter, Statistic, agree_sizes, to_device
from .calls import CallCounts
from .class_moments import ClassMoments, Moments, ShardedClassMoments
from .counts import CodeCounts, RecentHits, UsageEMA
from .depth import TokenUniformitySums
from .logits import LogitSums, TokenEntropySums
from .posterior import PosteriorSums
from .units import UnitActivity
from .window import Window, WindowView

__all__ = [
    "CallCounts",
    "ClassMoments",
    "ShardedClassMoments",
    "CodeCounts",
    "RecentHits",
    "Counter",
    "HeadEntropy",
    "LogitSums",
    "TokenEntropySums",
    "Moments",
    "PosteriorSums",
    "Statistic",
    "TokenUniformitySums",
    "UnitActivity",
    "UsageEMA",
    "Window",
    "WindowView",
    "agree_sizes",
    "to_device",
]
