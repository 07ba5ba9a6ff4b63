"""What the monitor says once per run in the log: its settings or the run look wrong.

- keywords passed to ``observe()`` that no probe reads (a typo);
- a class-conditional probe whose sampled windows stay thin (the cadence's promise failed);
- a probe that recorded steps but whose modules never ran inside ``observe()``;
- a run in which no probe has recorded a step by a log (no ``observe()`` around the forward);
- a rollout probe that saw no generation forward;
- training steps after the last log, never logged (a run shorter than ``log_every_n_steps``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from .cadence import Cadence
from .keys import MetricKey
from .probes.driver import ProbeDriver

log = logging.getLogger(__name__)


class Notices:
    """The once-per-run warnings of one monitor.

    Args:
        keywords: the ``observe()`` keywords its probes read.
    """

    def __init__(self, keywords: Iterable[str]) -> None:
        self.keywords = set(keywords)
        self._said: set[tuple[str, str]] = set()

    def _once(self, kind: str, who: str) -> bool:
        new = (kind, who) not in self._said
        self._said.add((kind, who))
        return new

    def unread_keywords(self, given: Iterable[str]) -> None:
        unknown = sorted(k for k in set(given) - self.keywords if self._once("keyword", k))
        if unknown:  # a shared training loop may pass more than these probes read
            log.warning(
                "collapse monitor: observe() got keywords no probe reads: %s (ignored); the "
                "probes read %s",
                unknown,
                sorted(self.keywords),
            )

    def unlogged(self, step: int, every: int) -> None:
        """Training ended (or the monitor closed) at ``step`` with the steps after the last log
        never logged: said once per such step (Lightning warns as much for its own logs)."""
        left = step % every
        if left and self._once("unlogged", str(step)):
            log.warning(
                "collapse monitor: the last %d training step(s) (to step %d) were never logged: "
                "logs fall every log_every_n_steps=%d steps%s",
                left,
                step,
                every,
                "; this run logged nothing (lower log_every_n_steps, or the Trainer's "
                "logging_steps)"
                if step < every
                else "",
            )

    def after_log(
        self, drivers: Iterable[ProbeDriver], metrics: Mapping[MetricKey, float], cadence: Cadence
    ) -> None:
        drivers = list(drivers)
        # no probe that still runs has recorded a step since the run began (a window may hold
        # none by design: observe_every_n_steps above log_every_n_steps)
        working = [d for d in drivers if not d.disabled]
        if working and not any(d.observed_steps for d in working) and self._once("unobserved", ""):
            log.warning(
                "collapse monitor: no probe has recorded a step: no training step ran inside "
                "monitor.observe() (wrap the forward: `with monitor.observe(targets=y): out = "
                "model(x)`); nothing is measured until one does"
            )
        for d in drivers:
            probe = d.probe
            calls = metrics.get(probe.key("calls"))
            samples = metrics.get(probe.key("samples"))
            # rows that arrived but were skipped (NaN, labels out of range) are not the
            # cadence's fault: the health rules and the bad-input notice speak of those
            skipped = sum(
                metrics.get(probe.key(m), 0.0) for m in ("skipped_nonfinite", *probe.bad_input)
            )
            # (a probe whose modules never ran is not thin: the notice below says why)
            thin = None if samples is None or calls == 0 else cadence.thin_window(
                probe.sampling, samples + skipped, d.window_steps
            )  # fmt: skip
            if thin and self._once("thin", d.name):
                log.warning("collapse monitor: %r %s", probe, thin)
            if probe.rollout and calls == 0 and self._once("no_rollout", d.name):
                log.warning(
                    "collapse monitor: %r saw no generation forward by this log: generate() runs "
                    "outside monitor.observe(rollout=True), elsewhere (vLLM), or, under the "
                    "Trainer callback, without a key-value cache (use_cache=False)",
                    probe,
                )
            # (a probe that left generation forwards out has said so: its modules ran)
            idle = calls == 0 and d.window_steps and not d.skipped_generation
            if idle and self._once("idle", d.name):
                log.warning(
                    "collapse monitor: %r recorded %d steps but its modules %s never ran inside "
                    "observe() (collapse/%s/calls = 0). Likely causes: the model was compiled "
                    "before the monitor was attached (torch.compile ignores hooks added later: "
                    "attach first, or compile after), the path names a module the forward does "
                    "not call, the module is skipped (conditional computation), or the forward "
                    "ran on a copy of the model (copy.deepcopy, a reloaded pickle: copies are "
                    "not monitored)",
                    probe,
                    d.window_steps,
                    probe.paths,
                    d.name,
                )
