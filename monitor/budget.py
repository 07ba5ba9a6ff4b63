"""An overhead budget the monitor keeps by itself: ``CollapseMonitor(..., overhead_budget=0.01)``.

The monitor measures what it costs and records the costly probes on fewer steps when that
exceeds the budget:

- **Its cost**: the host time of every probe's work (its hooks on the steps it records, its
  end-of-step work) and of the last log (readouts, rules, mitigations, sinks), and on a CUDA
  device the device time of the kernels that work queued (CUDA events recorded around it, read
  at the log, when the device has been synchronised anyway: no synchronisation in between). A
  probe costs the larger of the two. Not in it: ``observe()`` and ``step()`` themselves (on a
  step no probe records its hooks, but the pre-hook reading the model's attention mask, are off
  their modules: about a microsecond warm), and the caches the monitor's work evicts.
- **The step time**: the wall time between consecutive ``step()`` calls, monitor included
  (the step's own time, whether the host or the device bounds it), validation snapshots
  left out (their forwards are not metered either).
- **The control**, at each log: when the window's cost exceeds ``budget`` times its step time,
  each sampled or class-conditional probe records on proportionally fewer steps (its stride
  multiplied by :attr:`ProbeDriver.slower <collapse_monitor.probes.driver.ProbeDriver>`), down
  to one step per window (the logging step), and a class-conditional probe to no fewer steps
  than its classes need for their samples; when the cost falls under half the budget, the
  probes record more steps again, up to the cadence's own. Probes that record every step (code
  counts, dormant units, posterior moments: ``O(B D)`` updates whose windows must see every
  step) are never thinned: their cost counts, and the logged overhead shows when they alone
  exceed the budget. Under ``torch.distributed`` the ranks take the largest multiplier of any
  rank (one all-reduce per log), so that every rank records the same steps. A resumed run keeps
  the multipliers (a run resumed without a budget drops them).

Every recorded step still enters its window whole, so a window's metrics are those of the
steps it recorded, which are an even stride back from the logging step, chosen whatever the data
(the same estimate as the default cadence's, from fewer steps): each probe reports how many steps
its window holds (``collapse/<probe>/recorded_steps``), and the monitor the fraction of the
window's time it took (``collapse/monitor/overhead``).
"""

from __future__ import annotations

import logging
import math
import time

import torch

from . import _dist
from .keys import OVERHEAD_KEY, MetricKey

log = logging.getLogger(__name__)


class Meter:
    """The time one component (a probe's driver) spends, between two logs.

    Host seconds by ``time.perf_counter``; on a CUDA device also the device time between a
    CUDA event recorded before its work and one after (queued, not waited for).

    Example:
        >>> m = Meter()
        >>> m.stop(m.start())
        >>> m.take() >= 0.0, m.take()  # (taken: the next one starts from zero)
        (True, 0.0)
    """

    __slots__ = ("host", "events")

    def __init__(self) -> None:
        self.host = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> tuple[float, torch.cuda.Event | None]:
        event = None
        if torch.cuda.is_initialized():  # (work on a GPU: time it there too)
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        return time.perf_counter(), event

    def stop(self, token: tuple[float, torch.cuda.Event | None]) -> None:
        began, event = token
        self.host += time.perf_counter() - began
        if event is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((event, end))

    def take(self) -> float:
        """Seconds spent since the last call (the larger of host and device time); resets."""
        device = 0.0
        if self.events:
            self.events[-1][1].synchronize()  # (at a log: the device was synchronised anyway)
            device = sum(a.elapsed_time(b) for a, b in self.events) / 1e3
        spent, self.host, self.events = max(self.host, device), 0.0, []
        return spent


class Budget:
    """The overhead budget of one monitor (see the module docstring).

    Args:
        fraction: the share of the step time the monitor may take, in ``(0, 1)`` (checked by
            :class:`~collapse_monitor.config.MonitorConfig`).

    Example:
        >>> b = Budget(0.01)
        >>> b.tick(); b.tick()  # two step() calls: the time between them is the window's
        >>> b.window_seconds > 0
        True
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = float(fraction)
        self.window_seconds = 0.0  # wall time of the window's steps, monitor included
        self.log_seconds = 0.0  # the last log's own time (paid by the window after it)
        self.overhead: float | None = None  # the last window's measured share
        self._last_step: float | None = None
        self._log_began: float | None = None
        self._paused: float | None = None
        self.recorded: dict[MetricKey, float] = {}  # the steps each probe's window held
        self._whole = False  # a window timed from its first step (not the first window)
        self._said = False

    def tick(self) -> None:
        """At each ``step()``: the wall time since the previous one joins the window."""
        now = time.perf_counter()
        if self._last_step is not None:
            self.window_seconds += now - self._last_step
        self._last_step = now

    def log_began(self) -> None:
        """A log starts; on a GPU after the steps' queued kernels ran (the log waits for them
        anyway), so that they are not counted as the log's."""
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self._log_began = time.perf_counter()

    def pause(self) -> None:
        """A validation snapshot starts: its time is not the training steps'."""
        self._paused = time.perf_counter()

    def resume(self) -> None:
        if self._paused is not None:
            self.window_seconds -= time.perf_counter() - self._paused
            self._paused = None

    def settle(self, drivers, everywhere, group=None, replicas: int | None = None) -> None:
        """At a log (on every rank: a collective): measure the window's overhead and set each
        driver's ``slower`` for the next window, the same on every rank. A rank whose own
        measure fails keeps its strides and still takes part.

        Args:
            drivers: this rank's probe drivers (their ``meter``, ``window_steps``, ``slower``).
            everywhere: every probe's driver, also those living on other ranks only, in the
                same order on every rank.
            replicas: the ranks that see different data (default: the group's size; fewer
                under tensor parallelism).
        """
        try:
            wanted = self._wanted(drivers, replicas or _dist.world_size(group))
        except Exception as exc:  # (the collective below must still be reached)
            log.warning("collapse monitor: the overhead budget could not measure: %s", exc)
            wanted = {}
        # one MAX over the ranks: the strides, the steps each window held (a rank without a
        # batch recorded fewer) and the overhead (the costliest rank's), the same on every rank
        steps = {d.name: d.window_steps for d in drivers}
        share = -1.0 if self.overhead is None else self.overhead
        agreed = torch.tensor(
            [wanted.get(d.name, d.slower) for d in everywhere]
            + [steps.get(d.name, 0) for d in everywhere]
            + [share],
            dtype=torch.float64,
        )
        if _dist.is_distributed(group):
            agreed = agreed.to(_dist.collective_device(group, agreed.device))
            torch.distributed.all_reduce(agreed, torch.distributed.ReduceOp.MAX, group=group)
        values, n = agreed.tolist(), len(everywhere)
        self.overhead = None if values[-1] < 0 else values[-1]
        self.recorded = {
            d.probe.key("recorded_steps"): values[n + i] for i, d in enumerate(everywhere)
        }
        for d, slower in zip(everywhere, values[:n]):
            if d.name in steps:
                d.slower = int(slower)

    def _wanted(self, drivers, world: int) -> dict[str, int]:
        """This rank's wish for each thinnable probe's ``slower``, from the window's costs."""
        spent = {d.name: d.meter.take() for d in drivers}
        cost = self.log_seconds + sum(spent.values())
        window, self.window_seconds = self.window_seconds, 0.0
        # the first window's clock starts at its first step() (after step 0's work): no share
        whole, self._whole = self._whole, True
        self.overhead = cost / window if window > 0 and whole else None
        thinned = [d for d in drivers if not d.probe.sampling.every_step and d.window_steps]
        fixed = cost - sum(spent[d.name] for d in thinned)
        movable = cost - fixed
        over = self.overhead is not None and self.overhead > self.fraction
        under = self.overhead is not None and self.overhead < self.fraction / 2
        if over and fixed > self.fraction * window and not self._said:
            self._said = True
            log.warning(
                "collapse monitor: the overhead budget of %.1f%% cannot be kept: the logs and "
                "the probes that record every step alone take %.1f%% of the step time (thinning "
                "the others cannot lower that); log less often or watch fewer modules",
                100 * self.fraction,
                100 * fixed / window,
            )
        if movable <= 0 or not (over or under):
            return {}
        # the share of the movable cost the budget leaves (0: the fewest steps allowed)
        scale = max(self.fraction * window - fixed, 0.0) / movable
        if under:  # back towards the cadence, with room to spare
            scale = min(2.0, 0.75 * scale)
        wanted = {}
        for d in thinned:
            cadence = d.slower * d.window_steps  # the steps the cadence alone would record
            fewest = self._fewest(d, world, cadence)
            steps = max(fewest, d.window_steps * scale)
            # (a stride is whole: never so long that the window holds fewer than the fewest)
            wanted[d.name] = max(1, min(math.ceil(cadence / steps - 1e-9), cadence // fewest))
        return wanted

    @staticmethod
    def _fewest(d, world: int, cadence: int) -> int:
        """The fewest steps a window of ``d`` may hold: one, or for a class-conditional probe
        the steps its classes need for their samples (a thinner window would drop classes)."""
        sampling = d.probe.sampling
        if sampling.classes is None or not d.rows_per_step:
            return 1
        need = math.ceil(sampling.samples_per_class * sampling.classes / (d.rows_per_step * world))
        return max(1, min(need, cadence))

    def log_ended(self) -> None:
        if self._log_began is not None:
            self.log_seconds = time.perf_counter() - self._log_began
            self._log_began = None

    def metrics(self) -> dict[MetricKey, float]:
        """The last window's: each probe's ``recorded_steps`` and the overhead (not the first
        window's), the same on every rank."""
        return {**self.recorded, **({} if self.overhead is None else {OVERHEAD_KEY: self.overhead})}
