"""collapse-monitor: watch a PyTorch model for collapse while it trains.

>>> from collapse_monitor import CollapseMonitor, probes, mitigations, functional
"""

if __name__ != "collapse_monitor":
    # the repository keeps the package in a folder named ``monitor``; importing that folder under
    # its own name would give a second copy of every class
    raise ImportError(
        f"this package is collapse_monitor; it was imported as '{__name__}' (from a checkout's "
        "'monitor' folder). Install it (pip install -e .) and `import collapse_monitor`"
    )

from . import functional, losses, mitigations, probes, stats
from .contracts import Event, LogView, ProbeInfo, Readout, Recording, Replaced, Setup, StepView
from .keys import MetricKey
from .monitor import CollapseMonitor
from .rules import Alert, Rule, RuleSpec
from .sinks import Sink

__version__ = "0.2.0"

__all__ = [
    "Alert",
    "CollapseMonitor",
    "Event",
    "LogView",
    "MetricKey",
    "ProbeInfo",
    "Readout",
    "Recording",
    "Replaced",
    "Rule",
    "RuleSpec",
    "Setup",
    "Sink",
    "StepView",
    "functional",
    "losses",
    "mitigations",
    "probes",
    "stats",
]
