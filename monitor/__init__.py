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

import importlib

# imported on first use (PEP 562): ``import collapse_monitor`` (the report command) does not
# import torch
_LAZY = {
    "CollapseMonitor": ".monitor",
    "Alert": ".rules",
    "Rule": ".rules",
    "RuleSpec": ".rules",
    "Sink": ".sinks",
    "MetricKey": ".keys",
    **{
        name: ".contracts"
        for name in (
            "Event",
            "LogView",
            "ProbeInfo",
            "Readout",
            "Recording",
            "Replaced",
            "Setup",
            "StepView",
        )
    },
}
_SUBPACKAGES = ("functional", "losses", "mitigations", "probes", "stats")


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'collapse_monitor' has no attribute {name!r}")


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
