"""The monitor's arguments, checked once, shared by ``CollapseMonitor`` and the trainer callbacks.

A :class:`MonitorConfig` is validated when it is made, so a callback given a wrong argument
fails at its construction (as Lightning's ``EarlyStopping`` does), with a message that lists the
valid choices, long before a trainer builds the monitor on its model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Union

from .mitigations.base import Mitigation
from .probes.base import Probe
from .rules import Alert, Rule

OnAlert = Union[Callable[[Alert], None], Iterable[Callable[[Alert], None]], None]


def _unique(names: list[str], what: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique, repeated: {dupes}; pass name=...")


@dataclass
class MonitorConfig:
    """What a monitor watches and how often (see :class:`~collapse_monitor.CollapseMonitor`
    for each argument).

    Args:
        probes: probe instances; names unique.
        log_every_n_steps: the window, in training steps; ``None`` only in a trainer callback,
            where it means the trainer's own logging interval.
        mitigations: mitigation instances; names unique.
        rules: extra rules; default_rules: also each probe's default rules.
        on_alert: a callable ``f(alert)`` or several.
        observe_every_n_steps: ``None`` (each probe's own sampling) or ``n >= 1``.
        pictures: ``True``, ``False`` or names of probes.
        strict: raise every error of a probe, sink or mitigation.
        pictures_every_n_logs: draw pictures at every n-th log only.
        overhead_budget: ``None`` or a share of the step time in ``(0, 1)``
            (:mod:`collapse_monitor.budget`); with the default cadence only.

    Raises:
        TypeError: an argument of the wrong type (the message says which types are valid).
        ValueError: repeated names, a cadence below 1, pictures naming unknown probes, an
            overhead budget outside (0, 1) or with observe_every_n_steps.

    Example:
        >>> from collapse_monitor import probes
        >>> MonitorConfig([probes.RepresentationRank("enc")], log_every_n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: log_every_n_steps must be an integer >= 1 (or None in a trainer callback: the trainer's logging interval), got 0
    """

    probes: Sequence[Probe]
    log_every_n_steps: int | None = 50
    mitigations: Sequence[Mitigation] | None = ()
    rules: Sequence[Rule] | None = ()
    default_rules: bool = True
    on_alert: OnAlert = None
    observe_every_n_steps: int | None = None
    pictures: bool | Sequence[str] = False
    strict: bool = False
    pictures_every_n_logs: int = 1
    overhead_budget: float | None = None
    alert_callbacks: list[Callable[[Alert], None]] = field(init=False)
    picture_probes: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.probes = _instances(self.probes, Probe, "probes")
        self.mitigations = _instances(self.mitigations or [], Mitigation, "mitigations")
        self.rules = _instances(self.rules or [], Rule, "rules")
        _unique([p.name for p in self.probes], "probe")
        _unique([m.name for m in self.mitigations], "mitigation")
        if not isinstance(self.pictures_every_n_logs, int) or self.pictures_every_n_logs < 1:
            raise ValueError(
                f"pictures_every_n_logs must be an integer >= 1, got {self.pictures_every_n_logs}"
            )
        if self.overhead_budget is not None:
            if isinstance(self.overhead_budget, bool) or not isinstance(
                self.overhead_budget, (int, float)
            ):
                raise TypeError(
                    f"overhead_budget must be a float or None, got {self.overhead_budget!r}"
                )
            if not 0 < self.overhead_budget < 1:
                raise ValueError(
                    f"overhead_budget must be None or in (0, 1), got {self.overhead_budget!r}"
                )
            if self.observe_every_n_steps is not None:
                raise ValueError(
                    "overhead_budget thins the default cadence; observe_every_n_steps="
                    f"{self.observe_every_n_steps} fixes the recorded steps: pass one of them"
                )
        for name in ("log_every_n_steps", "observe_every_n_steps"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__}")
            if value is not None and value < 1:
                where = (
                    " (or None in a trainer callback: the trainer's logging interval)"
                    if name == "log_every_n_steps"
                    else " (or None: each probe's own sampling)"
                )
                raise ValueError(f"{name} must be an integer >= 1{where}, got {value}")
        if self.on_alert is None:
            self.alert_callbacks = []
        elif callable(self.on_alert):
            self.alert_callbacks = [self.on_alert]
        else:
            self.alert_callbacks = list(self.on_alert)
        for fn in self.alert_callbacks:
            if not callable(fn):
                raise TypeError(f"on_alert must be callables f(alert), got {type(fn).__name__}")
        names = [p.name for p in self.probes]
        if isinstance(self.pictures, str) or not isinstance(self.pictures, (bool, Iterable)):
            raise TypeError(
                f"pictures must be True, False or a list of probe names, got {self.pictures!r}"
            )
        wanted = names if self.pictures is True else list(self.pictures or [])
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(f"pictures names probes that do not exist: {unknown}; probes: {names}")
        self.picture_probes = wanted

    def keywords(self) -> set[str]:
        """The ``observe()`` keywords the probes read (``targets`` always)."""
        return {"targets"} | {k for p in self.probes for k in p.keywords}

    def reads_targets(self) -> bool:
        """Whether some probe reads ``observe(targets=)`` (a callback then finds the labels)."""
        return any("targets" in p.keywords for p in self.probes)


def _instances(items, kind: type, what: str) -> list:
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{what} must be a list of {kind.__name__} instances, got {items!r}")
    items = list(items)
    for x in items:
        if not isinstance(x, kind):
            raise TypeError(f"{what} must be {kind.__name__} instances, got {type(x).__name__}")
    return items
