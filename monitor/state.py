"""The monitor's checkpoint: what :meth:`CollapseMonitor.state_dict` returns, and its checks.

The state holds only tensors and plain Python values, so it loads with
``torch.load(..., weights_only=True)``; each probe's part names the probe it came from
(``identity``), so that a state of another probe is refused before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence

VERSION = 4
PARTS = (
    "version",
    "reduced",
    "global_step",
    "should_stop",
    "probes",
    "rules",
    "mitigation_counts",
    "mitigations",
)


def pack(**parts) -> dict:
    """The state of a monitor's parts, with the format's version."""
    state = {"version": VERSION, **parts}
    assert tuple(state) == PARTS, tuple(state)
    return state


def check(state: dict, probes: Sequence, mitigations: Sequence) -> None:
    """Refuse a state of another version, or whose parts are not this monitor's: a probe or
    mitigation without state, or state of one this monitor does not have.

    Raises:
        ValueError: another version; KeyError: parts missing or unknown.
    """
    if not isinstance(state, dict) or state.get("version") != VERSION:
        version = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(
            f"unsupported CollapseMonitor state version {version} (this version reads {VERSION})"
        )
    unknown = sorted(set(state) - set(PARTS))
    missing = [p for p in PARTS if p not in state]
    if unknown or missing:
        raise KeyError(f"not a CollapseMonitor state: parts {missing} missing, {unknown} unknown")
    for what, mine in (("probes", probes), ("mitigations", mitigations)):
        names = {c.name for c in mine}
        missing = [n for n in names if n not in state[what]]
        if missing:
            raise KeyError(
                f"checkpoint has no state for {what} {sorted(missing)}; it has "
                f"{sorted(state[what])}"
            )
        extra = sorted(set(state[what]) - names)
        if extra:
            raise KeyError(
                f"checkpoint has state for {what} {extra} that this monitor does not have (it "
                f"has {sorted(names)}); remove them from the state to resume without them"
            )
