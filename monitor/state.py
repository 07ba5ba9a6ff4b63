"""The monitor's checkpoint: what :meth:`CollapseMonitor.state_dict` returns, and its checks.

The state holds only tensors and plain Python values, so it loads with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

VERSION = 3


def pack(**parts) -> dict:
    """The state of a monitor's parts, with the format's version."""
    return {"version": VERSION, **parts}


def check(state: dict, probes: Sequence, mitigations: Sequence) -> None:
    """Refuse a state of another version, or one without a part this monitor has.

    Raises:
        ValueError: another version; KeyError: a probe or mitigation without state.
    """
    if not isinstance(state, dict) or state.get("version") != VERSION:
        version = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"unsupported CollapseMonitor state version {version} (this version reads {VERSION})"
        )
    for what, mine in (("probes", probes), ("mitigations", mitigations)):
        missing = [c.name for c in mine if c.name not in state[what]]
        if missing:
            raise KeyError(
                f"checkpoint has no state for {what} {missing}; it has {sorted(state[what])}"
            )
