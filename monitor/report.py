"""``collapse-monitor report RUN_DIR``: a health table of a finished (or running) run, read back from
its TensorBoard event files (any logger that wrote ``collapse/...`` scalars, Lightning's included).

Verdicts replay the probes' own default rules (the ones training used) over the logged values:
``collapsed`` when a rule holds at the latest log, ``warning`` when it fired earlier but no longer
holds, ``diverged`` for a probe that saw NaN or Inf (or fell silent), ``stale`` for a metric whose
last value is older than the run's last log (never called healthy), ``healthy`` otherwise. A
run is never healthy for want of measurements: ``unmeasured`` when no probe recorded a call (no
``observe()``, a probe that failed at its first call), ``incomplete`` when a probe or mitigation
failed and was switched off (``collapse/errors`` above the sinks' own failures). A damaged
event file (truncated, or a record whose checksum fails) is named in a warning with the point
where reading stopped. Exit codes (see :mod:`collapse_monitor.cli`): 0 healthy; 1 collapsed or
diverged; 2 a usage or I/O error; 3 unmeasured or incomplete.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import struct
import sys
from pathlib import Path

from .keys import ERRORS_KEY, OVERHEAD_KEY, ROOT, MetricKey
from .probes import PROBE_TYPES
from .probes.base import HEALTH_RULES
from .rules import Rule, RuleEngine


def default_rule_templates() -> list[Rule]:
    """Every probe class's declared default rules, for any probe name (the rules training uses)."""
    specs = [spec for cls in PROBE_TYPES for spec in cls.rules] + list(HEALTH_RULES)
    return [spec.template() for spec in specs]


def damage(path: Path) -> str | None:
    """Where reading ``path`` (a TensorBoard event file: records of a length, its checksum,
    the data and its checksum) stops before its end, or None when every record is whole."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = path.read_bytes()
    offset = records = 0
    while offset < len(data):
        head = data[offset : offset + 12]
        if len(head) < 12:
            return _truncated(offset, len(data), records)
        length = struct.unpack("<Q", head[:8])[0]
        if struct.unpack("<I", head[8:])[0] != masked_crc32c(head[:8]):
            return (
                f"a corrupt record length at byte {offset} of {len(data)} (after {records} records)"
            )
        end = offset + 12 + length + 4
        if end > len(data):
            return _truncated(offset, len(data), records)
        body, crc = data[offset + 12 : end - 4], struct.unpack("<I", data[end - 4 : end])[0]
        if crc != masked_crc32c(body):
            return f"a corrupt record at byte {offset} of {len(data)} (after {records} records)"
        offset, records = end, records + 1
    return None


def _truncated(offset: int, size: int, records: int) -> str:
    return (
        f"truncated at byte {offset} of {size} (after {records} records; a run still "
        "writing it may just be mid-record)"
    )


def read_scalars(
    run_dir: Path, events: list[Path] | None = None
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """``{run: {tag: [(step, value), ...]}}`` of every ``collapse/...`` scalar under ``run_dir``;
    a run is a directory holding event files (its path relative to ``run_dir``), read in the
    order they were written. A later file that starts at or before a step the earlier ones reach
    is a restart (a run resumed from a checkpoint, or started again, into the same folder): it
    replaces their values from its first step on, as the timeline that was thrown away would
    otherwise read as the latest state. A damaged file is said in a warning (stderr) naming it
    and where reading stopped; what it holds before that point is read."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs: dict[str, dict[str, dict[int, float]]] = {}
    for path in events or sorted(run_dir.rglob("events.out.tfevents.*")):
        problem = damage(path)
        if problem:
            print(
                f"collapse-monitor: warning: {path} is damaged: {problem}; the values after "
                "that point are missing",
                file=sys.stderr,
            )
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        run = str(path.parent.relative_to(run_dir))
        found = {
            tag: {e.step: e.value for e in acc.Scalars(tag)}
            for tag in acc.Tags().get("scalars", [])
            if tag.startswith(f"{ROOT}/")
        }
        first = min((min(points) for points in found.values() if points), default=None)
        if first is None:
            continue
        earlier = runs.setdefault(run, {})
        for points in earlier.values():  # (a restart: what came at or after it is replaced)
            for step in [s for s in points if s >= first]:
                del points[step]
        for tag, points in found.items():
            earlier.setdefault(tag, {}).update(points)
    return {
        run: {tag: sorted(p.items()) for tag, p in tags.items() if p}
        for run, tags in sorted(runs.items())
    }


def _trend(values: list[float]) -> str:
    if len(values) < 2:
        return "-"
    first, last = values[max(0, len(values) - 4)], values[-1]
    if abs(last - first) <= 0.02 * max(abs(first), abs(last), 1e-12):
        return "steady"
    return "rising" if last > first else "falling"


_HEALTH = {spec.name for spec in HEALTH_RULES}  # rules whose firing means the run diverged
_GRAVITY = {"healthy": 0, "warning": 1, "collapsed": 2, "diverged": 3}


def _holding(rule: Rule, values: list[float]) -> bool:
    """Whether the last value still meets ``rule``'s condition (a drop/rise against the run's
    extremum)."""
    return rule.holds(values[-1], (max if rule.mode == "drop" else min)(values))


def health(series: dict[str, list[tuple[int, float]]]) -> list[dict]:
    """One row per metric that a default rule watches (and NC1; a health rule's metric only
    where it fired), with verdict and alert steps;
    a row whose last value is older than the run's last log is ``stale`` (never healthy), one
    of a probe that saw NaN or Inf (or fell silent) is ``diverged``."""
    rows = []
    templates = default_rule_templates()
    last_log = max((points[-1][0] for points in series.values()), default=0)
    for tag, points in sorted(series.items()):
        key = MetricKey.parse(tag)
        if not key.is_probe_metric:
            continue
        rules = [r for r in templates if fnmatch.fnmatchcase(tag, r.metric)]
        if not rules and key.metric != "nc1":
            continue
        row = {
            "probe": key.probe,
            "metric": "/".join(p for p in (key.layer, key.metric, key.index) if p),
            "tag": tag,
            "latest": points[-1][1],
            "step": points[-1][0],
            "trend": _trend([v for _, v in points]),
            "verdict": "healthy",
            "first_alert": None,
            "rule": None,
        }
        for rule in rules:
            engine = RuleEngine([dataclasses.replace(rule, metric=tag)])
            # a rule with requires= or latest= reads sibling metrics at the same log
            parent = tag.rsplit("/", 1)[0]
            siblings = [cond[0] for cond in rule.requires or ()]
            siblings += [rule.latest] if rule.latest else []
            beside = {f"{parent}/{m}": dict(series.get(f"{parent}/{m}", ())) for m in siblings}
            fired = []
            for step, value in points:
                logged = {tag: value}
                logged.update({k: v[step] for k, v in beside.items() if step in v})
                fired += engine.check(logged, step)
            if fired:
                # still holding at the last log: the window's value, or its latest one (a
                # collapse inside the last window: the window still averages what came before)
                last = beside.get(f"{parent}/{rule.latest}", {}).get(points[-1][0])
                holding = _holding(rule, [v for _, v in points]) or (
                    last is not None and rule.holds(last, last)
                )
                verdict = (
                    "diverged"
                    if rule.name.split("/")[-1] in _HEALTH
                    else "collapsed"
                    if holding
                    else "warning"
                )
                # several rules on one metric: the earliest alert, the gravest verdict
                if row["first_alert"] is None or fired[0].step < row["first_alert"]:
                    row["first_alert"] = fired[0].step
                if _GRAVITY[verdict] > _GRAVITY[row["verdict"]]:
                    row["verdict"] = verdict
                    row["rule"] = f"{key.metric} {rule.mode} {rule.threshold:g}"
        if row["verdict"] == "healthy" and any(r.name.split("/")[-1] in _HEALTH for r in rules):
            continue  # a health rule that never fired says nothing (nonfinite: logged only then)
        if row["step"] < last_log:  # a value older than the run's last log
            row["trend"] = f"stale since {row['step']}"
            if row["verdict"] == "healthy":
                row["verdict"] = "stale"
        rows.append(row)
    return rows


def mitigations(series) -> dict[str, float]:
    """``{mitigation name: total count}`` at the last log."""
    keys = {tag: MetricKey.parse(tag) for tag in series}
    return {k.metric: series[tag][-1][1] for tag, k in keys.items() if k.probe == "mitigations"}


def format_table(rows: list[dict], applied: dict[str, float]) -> str:
    header = ("probe", "metric", "latest", "trend", "verdict", "first alert", "rule")
    body = [
        (
            r["probe"],
            r["metric"],
            f"{r['latest']:.4g}",
            r["trend"],
            r["verdict"],
            "-" if r["first_alert"] is None else str(r["first_alert"]),
            r["rule"] or "-",
        )
        for r in rows
    ]
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    if applied:
        lines.append("")
        lines.append(
            "mitigations applied: " + ", ".join(f"{k} x{v:g}" for k, v in sorted(applied.items()))
        )
    return "\n".join(lines)


def dashboard(series, rows: list[dict], png: Path) -> None:
    """One panel per probe: its watched metrics over steps, thresholds, first alerts, mitigations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_probe: dict[str, list[dict]] = {}
    for r in rows:
        by_probe.setdefault(r["probe"], []).append(r)
    n = max(len(by_probe), 1)
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.6 * n), constrained_layout=True, squeeze=False)
    counts = [pts for t, pts in series.items() if MetricKey.parse(t).probe == "mitigations"]
    mitigation_steps = sorted(
        {s for pts in counts for (s, v), (_, prev) in zip(pts[1:], pts[:-1]) if v > prev}
        | {pts[0][0] for pts in counts if pts[0][1] > 0}
    )
    for ax, (probe, prows) in zip(axes[:, 0], sorted(by_probe.items())):
        for r in prows[:6]:
            pts = series[r["tag"]]
            ax.plot(
                [s for s, _ in pts], [v for _, v in pts], label=f"{r['metric']} ({r['verdict']})"
            )
            if r["rule"]:
                ax.axhline(float(r["rule"].split()[-1]), color="gray", ls="--", lw=0.8)
            if r["first_alert"] is not None:
                ax.axvline(r["first_alert"], color="red", lw=0.8)
        for s in mitigation_steps:
            ax.axvline(s, color="green", lw=0.6, ls=":")
        ax.set_title(probe)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(
        "collapse-monitor health (dashed: thresholds, red: first alert, green: mitigations)"
    )
    fig.savefig(png, dpi=90)
    plt.close(fig)


def report(run_dir: Path, events: list[Path], png: Path | None, as_json: bool) -> int:
    """Print the health table of every run under ``run_dir`` (and draw ``png``); the exit code
    (0 healthy, 1 collapsed or diverged, 2 no collapse scalars, 3 a run unmeasured or
    incomplete)."""
    runs = read_scalars(run_dir, events)
    if not runs:
        print(
            f"collapse-monitor: the event files under {run_dir} hold no collapse/... scalars "
            "(was a CollapseMonitor with a TensorBoard sink, or CollapseCallback, attached?)",
            file=sys.stderr,
        )
        return 2
    out, failed, unsure = {}, False, False
    for run, series in runs.items():
        rows, applied = health(series), mitigations(series)
        errors = series.get(ERRORS_KEY, [(0, 0.0)])[-1][1]
        # (collapse/errors counts the sinks' and pictures' failures too: those lose no metric)
        lost = errors - sum(
            points[-1][1] for tag, points in series.items() if tag.startswith(_OUTLET_ERRORS)
        )
        verdicts = {r["verdict"] for r in rows}
        if not _measured(series, rows):  # (nothing was measured: not a health)
            verdicts.add("unmeasured")
        if lost > 0:  # (a probe was switched off: the rest of the table is not all of it)
            verdicts.add("incomplete")
        order = ("diverged", "collapsed", "unmeasured", "incomplete", "stale", "warning")
        status = next((v for v in order if v in verdicts), "healthy")
        failed |= status in ("diverged", "collapsed")
        unsure |= status in ("unmeasured", "incomplete")
        out[run] = {"status": status, "rows": rows, "mitigations": applied, "errors": errors}
        cost = series.get(OVERHEAD_KEY)  # (logged by an overhead budget)
        if cost:
            out[run]["overhead"] = {"last": cost[-1][1], "max": max(v for _, v in cost)}
        if not as_json:
            print(f"== {run} ({status})" if len(runs) > 1 else f"== {run_dir} ({status})")
            if status in ("unmeasured", "incomplete"):
                print(_UNSURE[status].format(errors=int(lost)))
            print(format_table(rows, applied) + "\n")
            if cost:
                print(
                    f"monitor overhead: {cost[-1][1]:.2%} of the step time in the last window "
                    f"(at most {max(v for _, v in cost):.2%})\n"
                )
        if png:
            path = (
                png
                if len(runs) == 1
                else png.with_name(f"{png.stem}_{run.replace('/', '_')}{png.suffix}")
            )
            dashboard(series, rows, path)
            if not as_json:
                print(f"dashboard: {path}\n")
    if as_json:
        print(json.dumps({"runs": out}, indent=2))
    return 1 if failed else 3 if unsure else 0


def _measured(series: dict[str, list[tuple[int, float]]], rows: list[dict]) -> bool:
    """Whether a probe recorded a call in some window (every probe logs its ``calls``; logs
    without them: whether a watched metric was logged)."""
    calls = [points for tag, points in series.items() if MetricKey.parse(tag).metric == "calls"]
    return any(v > 0 for points in calls for _, v in points) if calls else bool(rows)


_UNSURE = {
    "unmeasured": "no probe logged a metric: was the forward inside monitor.observe(), and did "
    "a probe fail at its first call (collapse/errors)?",
    "incomplete": "{errors} probe or mitigation error(s) (collapse/errors, less the sinks'): "
    "one failed and was switched off, so its rows stop where it did; the training log names it",
}
_OUTLET_ERRORS = f"{ROOT}/outlet_errors/"
