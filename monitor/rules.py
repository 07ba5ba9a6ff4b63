"""Threshold rules over logged metrics, producing :class:`Alert` events.

A rule watches one metric key (or an ``fnmatch`` glob over keys, each key tracked separately) at
every log. Modes:

- ``"below"`` / ``"above"``: ``value < threshold`` / ``value > threshold``;
- ``"drop"``: the value fell by more than ``threshold`` (a fraction, e.g. 0.9 = 90%) from its
  running maximum since warm-up;
- ``"rise"``: the value rose by more than ``threshold`` (a fraction) over its running minimum.

A ``drop``/``rise`` rule with ``bound`` also needs the value past that absolute level (below it
for a drop, above for a rise): a fall to a fifth of the run's own level that ends below 0.2
nats, whatever the level the run started from.

The condition must hold on ``patience`` consecutive logs, except that a value past ``severe``
(a second, further bound of a ``below``/``above`` rule) fires at once. An alert fires once per
episode: the condition must clear before the same key can fire again (``repeat=True`` re-fires
every ``patience`` logs while it holds, at every log while the value is past ``severe`` or
agrees with ``latest``). Logs where the metric is NaN or ``requires`` is not met are skipped,
not counted. After an alert the rule is silent for ``cooldown`` steps.
``warmup_steps`` ignores early logs entirely (running extrema included). ``arm=True`` is for a
metric that starts at its "collapsed" end (every head attends uniformly at initialisation): the
rule is armed by ``arm_logs`` (2) consecutive logs whose window value does not meet the condition
(a stable healthy value; or, with ``warmup_steps``, by the end of the warm-up), and stays silent
before it; a ``latest`` value that fires (past ``severe``, or past the threshold with
``latest_alone``) fires on the arming log itself (the window saw the healthy value, its last
step the collapse). ``arm_by`` names a sibling metric that must be healthy on the arming log too.
``requires=("negative_mass", "above", 0.1)`` evaluates the rule only at logs where that sibling
metric (the same key with its last part replaced) meets its own condition: a criterion defined
for some inputs (SimSiam's ``norm_std`` for signed features) says nothing on others.
``latest="dormant_fraction_last_step"`` names the sibling holding the same quantity measured on
the last training step the probe recorded in the window (or on the fewest latest steps that make
a sample: ``CodebookUsage``'s ``usage_recent``): a window averages over its steps, so a
collapse that sets in inside a window shows in the window value one log late. The rule fires at
once when the window value and the latest value both hold (the crossing lasted to the window's
end), and when the latest value is past ``severe`` (the window still averages the healthy steps
before it); the episode lasts while the latest value stays past the threshold. With
``latest_alone=True`` the latest value past the threshold fires by itself: for a latest value
that is a whole step's statistic over a sample of its own, where the window's mean only lags.
"""

from __future__ import annotations

import fnmatch
import glob
import math
import re
from dataclasses import dataclass, field, fields

from .keys import ROOT, key_pattern

_MODES = ("below", "above", "drop", "rise")


@dataclass(frozen=True)
class Alert:
    """One rule firing: at ``step``, metric ``metric`` had ``value``."""

    step: int
    rule: str
    metric: str
    value: float
    threshold: float
    mode: str
    message: str
    action: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass
class Rule:
    """A threshold on a metric key.

    Args:
        metric: full key (``"collapse/head/nc1"``) or glob (``"collapse/*/dead_fraction"``).
        threshold: the bound; for ``drop``/``rise`` a fraction of the running extremum.
        mode: ``"below"``, ``"above"``, ``"drop"`` or ``"rise"``.
        warmup_steps: logs at steps ``<= warmup_steps`` are ignored.
        patience: consecutive logs the condition must hold before an alert.
        cooldown: steps after an alert during which the rule stays silent.
        repeat: re-fire while the condition keeps holding (default: once per episode).
        action: ``None`` or ``"stop"`` (ask the training loop to stop: ``monitor.should_stop``).
        name: alert name, used in ``collapse/alerts/<name>``; derived from metric and mode.
        message: extra text appended to the alert message (what to do).
        severe: a ``below``/``above`` rule's bound beyond ``threshold`` where one log suffices.
        arm: stay silent until ``arm_logs`` logs in a row whose window value does not meet
            the condition, or until
            ``warmup_steps`` have passed when it is set (see the module doc).
        arm_logs: the healthy logs in a row that arm an ``arm`` rule (default 2).
        arm_by: a sibling metric that must be on the threshold's healthy side too on an
            arming log (where pooling over steps inflates the rule's own value: the highest
            share of a posterior's units active within one call, beside the window's share).
        requires: ``(sibling metric, mode, threshold)``, a ``below``/``above`` condition on the
            sibling key that must hold for this rule to be evaluated at a log (a tuple of such
            conditions: all must hold).
        latest: the sibling metric holding this quantity at the window's end (a
            ``below``/``above`` rule; see the module doc); logs without it behave as without.
        latest_alone: the ``latest`` value past ``threshold`` fires at once by itself (default:
            only with the window's value, or past ``severe``).
        detail: a sibling metric whose value the alert's message shows (e.g. the step at which
            a probe first saw NaN).
        bound: a ``drop``/``rise`` rule's absolute level, which the value must also be past
            (below for a drop, above for a rise).
    """

    metric: str
    threshold: float
    mode: str = "below"
    warmup_steps: int = 0
    patience: int = 1
    cooldown: int = 0
    repeat: bool = False
    action: str | None = None
    name: str | None = None
    message: str = ""
    severe: float | None = None
    arm: bool = False
    arm_logs: int = 2
    arm_by: str | None = None
    requires: tuple | None = None
    latest: str | None = None
    latest_alone: bool = False
    detail: str | None = None
    bound: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"Rule mode must be one of {_MODES}, got {self.mode!r}")
        if self.action not in (None, "stop"):
            raise ValueError(f"Rule action must be None or 'stop', got {self.action!r}")
        if self.patience < 1 or self.arm_logs < 1 or self.warmup_steps < 0 or self.cooldown < 0:
            raise ValueError(
                f"Rule needs patience >= 1, arm_logs >= 1, warmup_steps >= 0, cooldown >= 0; got "
                f"{self.patience}, {self.arm_logs}, {self.warmup_steps}, {self.cooldown}"
            )
        if self.mode in ("drop", "rise") and not self.threshold > 0:
            raise ValueError(
                f"a '{self.mode}' rule needs a positive fraction, got {self.threshold}"
            )
        if self.severe is not None and not (
            (self.mode == "below" and self.severe < self.threshold)
            or (self.mode == "above" and self.severe > self.threshold)
        ):
            raise ValueError(
                f"severe={self.severe} must lie beyond threshold={self.threshold} of a "
                f"'below' or 'above' rule (mode {self.mode!r})"
            )
        if self.bound is not None and self.mode not in ("drop", "rise"):
            raise ValueError(f"bound needs a 'drop' or 'rise' rule, got mode {self.mode!r}")
        if self.latest is not None and self.mode not in ("below", "above"):
            raise ValueError(f"latest needs a 'below' or 'above' rule, got mode {self.mode!r}")
        if self.arm_by is not None and not (self.arm and self.mode in ("below", "above")):
            raise ValueError("arm_by needs arm=True on a 'below' or 'above' rule")
        if self.latest_alone and self.latest is None:
            raise ValueError("latest_alone needs latest (the sibling metric it reads)")
        if self.requires is not None and isinstance(self.requires[0], str):
            self.requires = (tuple(self.requires),)  # one condition
        for cond in self.requires or ():
            if cond[1] not in ("below", "above"):
                raise ValueError(f"requires needs 'below' or 'above' modes, got {self.requires}")
        if self.name is None:
            root = f"{ROOT}/"
            base = self.metric[len(root) :] if self.metric.startswith(root) else self.metric
            self.name = re.sub(r"[^A-Za-z0-9_./-]+", "any", base) + f"_{self.mode}"

    def holds(self, value: float, extreme: float) -> bool:
        """Whether ``value`` meets the condition, a ``drop``/``rise`` measured from ``extreme``
        (the running maximum or minimum, ``value`` included)."""
        if self.mode in ("below", "above"):
            return _past(self.mode, value, self.threshold)
        side, scale = (
            ("below", 1 - self.threshold) if self.mode == "drop" else ("above", 1 + self.threshold)
        )
        past = self.bound is None or _past(side, value, self.bound)
        return past and _past(side, value, scale * extreme)

    def matches(self, key: str) -> bool:
        return key == self.metric or fnmatch.fnmatchcase(key, self.metric)


@dataclass(frozen=True)
class RuleSpec:
    """A default rule declared by a probe class, relative to the probe's keys: data, not code.

    ``metric`` is the part of the key after ``collapse/<probe>/`` (``"usage"``, or
    ``"*/entropy_norm"`` for every layer); :meth:`bind` makes the rule of one probe, and
    :meth:`template` the rule for any probe name (what ``collapse-monitor report`` replays).

    Example:
        >>> spec = RuleSpec("usage", 0.5, "below", name="usage_below")
        >>> spec.bind("vq").metric, spec.bind("vq").name
        ('collapse/vq/usage', 'vq/usage_below')
    """

    metric: str
    threshold: float
    mode: str = "below"
    name: str = ""
    patience: int = 2
    warmup_steps: int = 0
    cooldown: int = 0
    message: str = ""
    severe: float | None = None
    arm: bool = False
    arm_logs: int = 2
    arm_by: str | None = None
    requires: tuple | None = None
    latest: str | None = None
    latest_alone: bool = False
    detail: str | None = None
    bound: float | None = None

    def _rule(self, probe_pattern: str, probe_name: str, per_module: bool) -> Rule:
        same = {f.name: getattr(self, f.name) for f in fields(self)}  # every field is Rule's too
        metric = f"*/{self.metric}" if per_module else self.metric
        same["metric"] = key_pattern(probe_pattern, metric)
        same["name"] = f"{probe_name}/{self.name}"
        return Rule(**same)

    def bind(self, probe: str, per_module: bool = False) -> Rule:
        """This rule on the probe named ``probe`` (glob characters in the name match literally);
        ``per_module``: on each module of a probe whose glob keeps its modules apart."""
        return self._rule(glob.escape(probe), probe, per_module)

    def template(self) -> Rule:
        """This rule on every probe name (and on each module of per-module probes)."""
        return self._rule("*", "*", per_module=False)


@dataclass
class _KeyState:
    consecutive: int = 0
    last_alert: int | None = None
    extreme: float | None = None
    latched: bool = False  # fired in the current episode
    armed: bool = False  # arm_logs logs in a row with a healthy window value seen (arm=True)
    healthy: int = 0  # logs in a row whose window value does not meet the condition


@dataclass
class RuleEngine:
    """Evaluates rules at each log; its state travels in ``state_dict``."""

    rules: list[Rule] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names must be unique, repeated: {dupes}; pass name=...")
        self._state: dict[str, dict[str, _KeyState]] = {r.name: {} for r in self.rules}
        self.counts: dict[str, int] = {r.name: 0 for r in self.rules}

    def thresholds(self, metrics: dict[str, float]) -> dict[str, list[float]]:
        """``{key: [threshold, ...]}`` of the fixed-threshold (``below``/``above``) rules that
        watch each key of ``metrics`` (for drawing them next to the metric)."""
        out: dict[str, list[float]] = {}
        for rule in self.rules:
            if rule.mode in ("below", "above"):
                for key in metrics:
                    if rule.matches(key):
                        out.setdefault(key, []).append(float(rule.threshold))
        return out

    def check(self, metrics: dict[str, float], step: int) -> list[Alert]:
        alerts = []
        for rule in self.rules:
            if step <= rule.warmup_steps:
                continue
            for key in sorted(k for k in metrics if rule.matches(k)):
                value = float(metrics[key])
                if math.isnan(value):
                    continue
                if not all(
                    _past(mode, _sibling(key, sibling, metrics), bound)
                    for sibling, mode, bound in rule.requires or ()
                ):
                    continue
                st = self._state[rule.name].setdefault(key, _KeyState())
                holds = self._holds(rule, st, value)
                # armed by the window's own value (and arm_by's): a last step past the severe
                # bound on the arming log is a collapse inside that window (its earlier steps
                # were healthy)
                healthy = not holds
                if rule.arm_by:
                    by = _sibling(key, rule.arm_by, metrics)
                    healthy &= not math.isnan(by) and not _past(rule.mode, by, rule.threshold)
                st.healthy = st.healthy + 1 if healthy else 0
                st.armed = st.armed or st.healthy >= rule.arm_logs
                latest = _sibling(key, rule.latest, metrics) if rule.latest else math.nan
                # a collapse inside the window: the latest step is past the severe bound while
                # the window's mean still holds the healthy steps before it
                latest_severe = rule.severe is not None and _past(rule.mode, latest, rule.severe)
                latest_holds = _past(rule.mode, latest, rule.threshold)
                alone = latest_holds and rule.latest_alone
                at_once = latest_severe or alone or (holds and latest_holds)
                # an episode lasts while the last step stays past the threshold
                if holds or latest_severe or alone or (st.latched and latest_holds):
                    st.consecutive = max(st.consecutive, 0) + 1
                else:
                    st.consecutive = min(st.consecutive, 0) - 1  # negative: healthy logs
                    st.latched = False
                if rule.arm and not (st.armed or rule.warmup_steps):
                    st.consecutive = min(st.consecutive, 0)
                    continue
                cooling = st.last_alert is not None and step - st.last_alert <= rule.cooldown
                at_once |= rule.severe is not None and _past(rule.mode, value, rule.severe)
                due = st.consecutive >= rule.patience or (at_once and st.consecutive > 0)
                if due and not cooling and not st.latched:
                    st.consecutive = 0
                    st.last_alert = step
                    st.latched = not rule.repeat
                    self.counts[rule.name] += 1
                    detail = _sibling(key, rule.detail, metrics) if rule.detail else math.nan
                    alerts.append(self._alert(rule, key, value, step, st, latest, detail))
        return alerts

    @staticmethod
    def _holds(rule: Rule, st: _KeyState, value: float) -> bool:
        if rule.mode in ("below", "above"):
            return rule.holds(value, value)
        if st.extreme is None:
            st.extreme = value
            return False
        st.extreme = (max if rule.mode == "drop" else min)(st.extreme, value)
        return rule.holds(value, st.extreme)

    @staticmethod
    def _alert(
        rule: Rule, key: str, value: float, step: int, st: _KeyState, latest: float, detail: float
    ) -> Alert:
        if rule.mode in ("below", "above"):
            word = rule.mode if _past(rule.mode, value, rule.threshold) else "not yet " + rule.mode
            what = f"{value:.6g} is {word} {rule.threshold:.6g}"
        else:
            word = "fell" if rule.mode == "drop" else "rose"
            ref = "running max" if rule.mode == "drop" else "running min"
            what = f"{value:.6g} {word} by more than {rule.threshold:.0%} from its {ref} {st.extreme:.6g}"
            if rule.bound is not None:
                what += f", {'below' if rule.mode == 'drop' else 'above'} {rule.bound:.6g}"
        msg = f"[{rule.name}] step {step}: {key} = {what}"
        if rule.severe is not None and _past(rule.mode, value, rule.severe):
            msg += f" (past the severe bound {rule.severe:.6g})"
        elif rule.severe is not None and _past(rule.mode, latest, rule.severe):
            msg += f", {rule.latest} = {latest:.6g} (past the severe bound {rule.severe:.6g})"
        elif _past(rule.mode, latest, rule.threshold):
            msg += f", and {rule.latest} = {latest:.6g} at the window's end"
        elif rule.patience > 1:
            msg += f" for {rule.patience} consecutive logs"
        if detail == detail:  # (not NaN)
            msg += f", {rule.detail} = {detail:.6g}"
        if rule.message:
            msg += f". {rule.message}"
        return Alert(step, rule.name, key, value, rule.threshold, rule.mode, msg, rule.action)

    def state_dict(self) -> dict:
        return {
            "counts": dict(self.counts),
            "keys": {
                name: {  # plain tags: the state loads with weights_only=True
                    str(k): (s.consecutive, s.last_alert, s.extreme, s.latched, s.armed, s.healthy)
                    for k, s in keys.items()
                }
                for name, keys in self._state.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: read whole first, so a malformed state changes nothing."""
        counts = {name: int(state["counts"].get(name, 0)) for name in self.counts}
        keys = {
            name: {k: _KeyState(*v) for k, v in state["keys"].get(name, {}).items()}
            for name in self.counts
        }
        self.counts, self._state = counts, keys


def _past(mode: str, value: float, bound: float) -> bool:
    """``value`` is beyond ``bound`` (never for NaN)."""
    return value < bound if mode == "below" else value > bound


def _sibling(key: str, metric: str, metrics: dict[str, float]) -> float:
    """The value of ``key``'s sibling ``metric`` (its last part replaced); NaN when missing."""
    return float(metrics.get(key.rsplit("/", 1)[0] + "/" + metric, math.nan))
