"""An overhead budget the monitor keeps by itself: ``CollapseMonitor(..., overhead_budget=0.01)``.

The monitor measures what it costs and records the costly probes on fewer steps when that
exceeds the budget:

- **Its cost**: the host time of every probe's work (its hooks on the steps it records, its
  end-of-step work) and of the last log, and on a CUDA device the device time of the kernels
  that work queued (CUDA events recorded around it, read at the log, when the device has been
  synchronised anyway: no synchronisation in between). A probe costs the larger of the two.
- **The step time**: the wall time between consecutive ``step()`` calls, monitor included
  (the step's own time, whether the host or the device bounds it).
- **The control**, at each log: when the window's cost exceeds ``budget`` times its step time,
  each sampled or class-conditional probe records on proportionally fewer steps (its stride
  multiplied by :attr:`ProbeDriver.slower <collapse_monitor.probes.driver.ProbeDriver>`), down
  to one step per window (the logging step); when the cost falls under half the budget, the
  probes record more steps again, up to the cadence's own. Probes that record every step (code
  counts, dormant units, posterior moments: ``O(B D)`` updates whose windows must see every
  step) are never thinned: their cost counts, and the logged overhead shows when they alone
  exceed the budget. Under ``torch.distributed`` the ranks take the largest multiplier of any
  rank (one all-reduce per log), so that every rank records the same steps.

Every recorded step still enters its window whole, so a window's metrics are those of the
steps it recorded, which are an even stride back from the logging step, chosen whatever the data
(the same estimate as the default cadence's, from fewer steps): each probe reports how many steps
its window holds (``collapse/<probe>/recorded_steps``), and the monitor the fraction of the
window's time it took (``collapse/monitor/overhead``).
"""

from __future__ import annotations

import math
import time

import torch

from . import _dist
from .keys import OVERHEAD_KEY, MetricKey


class Meter:
    """The time one component (a probe's driver) spends, between two logs.

    Host seconds by ``time.perf_counter``; on a CUDA device also the device time between a
    CUDA event recorded before its work and one after (queued, not waited for).
    """

    __slots__ = ("host", "events")

    def __init__(self) -> None:
        self.host = 0.0
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self) -> tuple[float, torch.cuda.Event | None]:
        event = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
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
    """

    def __init__(self, fraction: float) -> None:
        self.fraction = float(fraction)
        self.window_seconds = 0.0  # wall time of the window's steps, monitor included
        self.log_seconds = 0.0  # the last log's own time (paid by the window after it)
        self.overhead: float | None = None  # the last window's measured share
        self._last_step: float | None = None
        self._log_began: float | None = None

    def tick(self) -> None:
        """At each ``step()``: the wall time since the previous one joins the window."""
        now = time.perf_counter()
        if self._last_step is not None:
            self.window_seconds += now - self._last_step
        self._last_step = now

    def log_began(self) -> None:
        self._log_began = time.perf_counter()

    def settle(self, drivers, everywhere, group=None) -> None:
        """At a log (on every rank: a collective): measure the window's overhead and set each
        driver's ``slower`` for the next window, the same on every rank.

        Args:
            drivers: this rank's probe drivers (their ``meter``, ``window_steps``, ``slower``).
            everywhere: every probe's driver, also those living on other ranks only, in the
                same order on every rank.
        """
        spent = {d.name: d.meter.take() for d in drivers}
        cost = self.log_seconds + sum(spent.values())
        window, self.window_seconds = self.window_seconds, 0.0
        self.overhead = cost / window if window > 0 else None
        thinned = [d for d in drivers if not d.probe.sampling.every_step and d.window_steps]
        fixed = cost - sum(spent[d.name] for d in thinned)
        movable = cost - fixed
        wanted = {}
        over = self.overhead is not None and self.overhead > self.fraction
        under = self.overhead is not None and self.overhead < self.fraction / 2
        if movable > 0 and (over or under):
            # the share of the movable cost the budget leaves (0: only one step per window)
            scale = max(self.fraction * window - fixed, 0.0) / movable
            if under:  # back towards the cadence, with room to spare
                scale = min(2.0, 0.75 * scale)
            for d in thinned:
                steps = max(1.0, d.window_steps * scale)
                # the steps the cadence alone would record are window_steps * slower
                wanted[d.name] = max(1, math.ceil(d.slower * d.window_steps / steps - 1e-9))
        agreed = torch.tensor([wanted.get(d.name, d.slower) for d in everywhere], dtype=torch.int64)
        if _dist.is_distributed(group):
            agreed = agreed.to(_dist.collective_device(group, agreed.device))
            torch.distributed.all_reduce(agreed, torch.distributed.ReduceOp.MAX, group=group)
        mine = {d.name for d in drivers}
        for d, slower in zip(everywhere, agreed.tolist()):
            if d.name in mine:
                d.slower = slower

    def log_ended(self) -> None:
        if self._log_began is not None:
            self.log_seconds = time.perf_counter() - self._log_began
            self._log_began = None

    def metrics(self) -> dict[MetricKey, float]:
        return {} if self.overhead is None else {OVERHEAD_KEY: self.overhead}
