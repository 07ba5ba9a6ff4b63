"""collapse-monitor: watch a PyTorch model for collapse while it trains.

>>> from monitor import CollapseMonitor, probes, mitigations, functional
"""

from . import functional, losses, mitigations, probes, stats
from .monitor import CollapseMonitor
from .rules import Alert, Rule
from .sinks import Sink

__version__ = "0.1.0"

__all__ = [
    "Alert",
    "CollapseMonitor",
    "Rule",
    "Sink",
    "functional",
    "losses",
    "mitigations",
    "probes",
    "stats",
]
