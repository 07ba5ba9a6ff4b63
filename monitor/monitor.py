"""CollapseMonitor: attaches probes, keeps cadence, dispatches metrics to rules, sinks and mitigations."""

from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager, nullcontext
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import _dist
from . import pictures as pictures_
from ._modules import named_modules
from ._sharding import whole_parameters
from .contracts import Component, Event, LogView, Readout, Recording, Setup
from .keys import ERRORS_KEY, alerts_key, mitigations_key
from .mitigations.base import Mitigation
from .probes.base import Probe
from .rules import Alert, Rule, RuleEngine
from .sinks import Sink

log = logging.getLogger(__name__)

_STATE_VERSION = 2
SAMPLE_STRIDE = 25  # the default cadence records one step in 25 at most (4 % of the steps)
# ... but a class-conditional probe records enough steps for this many expected samples per
# class in each window (with 4, ~91% of balanced classes reach the 2 samples that NC needs) ...
SAMPLES_PER_CLASS = 4
# ... within a budget: at most this fraction of the steps
MAX_RECORDED_FRACTION = 0.5

# the open monitor of each model, kept here rather than on the model: nothing of the monitor
# travels with a saved, pickled or copied model
_MONITORS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def _sample_stride(log_every_n_steps: int) -> int:
    return max(1, min(SAMPLE_STRIDE, -(-log_every_n_steps // 2)))


def sampled_steps_per_window(log_every_n_steps: int) -> int:
    """Steps per window that the GEMM-cost probes record under the default cadence: one step in
    ``min(25, ceil(L / 2))`` (``L = log_every_n_steps``): two at the default ``L = 50``, twenty
    at ``L = 500``, every step for ``L <= 2``."""
    return -(-log_every_n_steps // _sample_stride(log_every_n_steps))


def class_sample_stride(log_every_n_steps: int, classes: int, rows_per_step: int) -> int:
    """The default cadence's stride for a class-conditional probe whose window gains
    ``rows_per_step`` samples per recorded step (over all ranks): one step in ``stride`` is
    recorded, enough for ``SAMPLES_PER_CLASS``
    expected samples per class in a window, within the budget of ``MAX_RECORDED_FRACTION`` of
    the steps, and never fewer steps than :func:`sampled_steps_per_window`. E.g. 1,000 classes
    at batch 256, ``L = 50``: one step in 3 (17 per window); 10 classes: one in 25 (2)."""
    L = log_every_n_steps
    stride = _sample_stride(L)
    need = -(-SAMPLES_PER_CLASS * classes // max(rows_per_step, 1))
    steps = min(need, max(1, int(L * MAX_RECORDED_FRACTION)))
    return max(1, min(stride, L // steps))


def _unique_names(items, what: str) -> None:
    names = [x.name for x in items]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{what} names must be unique, repeated: {dupes}; pass name=...")


class CollapseMonitor:
    """Watches a model for collapse while it trains.

    Args:
        model: the ``nn.Module`` whose ``named_modules()`` the probes' paths refer to.
        probes: probe instances (``collapse_monitor.probes``); names must be unique.
        log_every_n_steps: window length; metrics are computed, logged and checked every this
            many calls of :meth:`step`, and the window statistics are then reset.
        sinks: :class:`~collapse_monitor.Sink` objects (e.g. ``TensorBoardSink``).
        mitigations: :class:`~collapse_monitor.mitigations.Mitigation` objects; names unique.
        rules: extra :class:`~collapse_monitor.Rule` objects.
        default_rules: also use each probe's default rules (METRICS.md thresholds).
        on_alert: callables ``f(alert)`` called for every alert.
        observe_every_n_steps: which training steps are recorded. ``None`` (default): the
            cheap probes (``Probe.every_step``: codebook and latent usage, posterior collapse,
            dormant units) record every step, the others (whose update costs a GEMM or a
            recomputed attention) record :func:`sampled_steps_per_window` steps per window,
            evenly spaced and ending with the logging step; class-conditional ones
            (``NeuralCollapse``) record their first step, then as many as
            :func:`class_sample_stride` says give ~4 samples per class per window (at most half
            the steps). An integer ``n``: every probe records
            every n-th step only (``1``: every step, the exact whole-window statistics).
            Metrics are exact for the samples recorded; validation snapshots record every batch.
        pictures: ``True`` (every probe that draws), or names of probes: at each log, these
            probes' pictures (class-mean cosine heatmap, code usage, attention entropy per layer
            and head, KL per latent dimension, eigen-spectrum) go to the sinks as images. Needs
            matplotlib; without it the monitor says so once and logs no pictures.
        process_group: ``torch.distributed`` group for the all-reductions (default: WORLD).
        strict: raise every error of a probe, sink or mitigation (for tests). By default such an
            error never reaches the training loop: it is logged once with the owner's name,
            counted in ``collapse/errors`` and the owner is disabled. Under DDP a probe or
            mitigation disabled on any rank is disabled on all at the next log, before any
            collective.

    Raises:
        TypeError: a probe, mitigation or sink of the wrong type.
        ValueError: repeated probe or mitigation names; ``pictures`` naming unknown probes.
        KeyError: a module path that matches nothing (the message lists the closest names).
        RuntimeError: the model already has an open monitor.

    Use ``with monitor.observe(targets=y): out = model(x)`` around the forward pass and
    ``monitor.step()`` once per training step. Call ``close()`` to remove every hook.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> mon = CollapseMonitor(model, [probes.NeuralCollapse("2", 3, name="head")], 2)
        >>> for _ in range(2):
        ...     y = torch.arange(30) % 3
        ...     with mon.observe(targets=y):
        ...         _ = model(torch.randn(30, 4) + y[:, None])
        ...     metrics = mon.step()
        >>> metrics["collapse/head/samples"], metrics["collapse/head/classes_used"]
        (60.0, 3.0)
        >>> mon.close()
    """

    def __init__(
        self,
        model: nn.Module,
        probes: Sequence[Probe],
        log_every_n_steps: int = 50,
        sinks: Iterable[Sink] = (),
        mitigations: Iterable[Mitigation] = (),
        rules: Iterable[Rule] = (),
        default_rules: bool = True,
        on_alert: Callable[[Alert], None] | Iterable[Callable[[Alert], None]] | None = None,
        observe_every_n_steps: int | None = None,
        pictures: bool | Iterable[str] = False,
        process_group=None,
        strict: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if log_every_n_steps < 1 or (observe_every_n_steps or 1) < 1:
            raise ValueError(
                "log_every_n_steps and observe_every_n_steps must be >= 1, got "
                f"{log_every_n_steps} and {observe_every_n_steps}"
            )
        probes, mitigations, sinks = list(probes), list(mitigations), list(sinks)
        for items, kind, what in (
            (probes, Probe, "probes"),
            (mitigations, Mitigation, "mitigations"),
            (sinks, Sink, "sinks"),
        ):
            for x in items:
                if not isinstance(x, kind):
                    raise TypeError(
                        f"{what} must be {kind.__name__} instances, got {type(x).__name__}"
                    )
        _unique_names(probes, "probe")
        _unique_names(mitigations, "mitigation")
        self.model = model
        self._sharded_by: nn.Module | None = None  # an FSDP module wrapped around the model later
        self.probes = probes
        self.log_every_n_steps = int(log_every_n_steps)
        self.observe_every_n_steps = (
            None if observe_every_n_steps is None else int(observe_every_n_steps)
        )
        self.sinks = sinks
        self.mitigations = mitigations
        if on_alert is None:
            self.on_alert = []
        elif callable(on_alert):
            self.on_alert = [on_alert]
        else:
            self.on_alert = list(on_alert)
        names = [p.name for p in probes]
        if isinstance(pictures, str):
            raise TypeError("pictures must be True/False or a list of probe names")
        wanted = names if pictures is True else list(pictures or [])
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise ValueError(f"pictures names probes that do not exist: {unknown}; probes: {names}")
        self._picture_probes = set(wanted)
        self._keywords = {"targets"} | {k for p in probes for k in p.keywords}
        self.process_group = process_group
        self.strict = strict
        self.errors = 0  # errors of sinks and pictures (probes and mitigations count their own)
        self.global_step = 0
        self.should_stop = False
        self.mitigation_counts: dict[str, float] = {}
        self._recording: list[Component] = []  # inside observe(): who records
        self._recorded: set[Probe] = set()  # probes that recorded in this training step
        self._stopped: set[Probe] = set()  # probes disabled on every rank (agreed at a log)
        self._failed_sinks: set[int] = set()
        self._thin_warned: set[str] = set()
        self._idle_warned: set[str] = set()
        self._unread_warned: set[str] = set()
        self._snapshot_prefix: str | None = None
        self._snapshot_loader: int | None = None
        self._closed = False
        other = _MONITORS.get(model)
        if other is not None and other() is not None and not other()._closed:
            raise RuntimeError(
                f"{type(model).__name__} already has a CollapseMonitor; two monitors would hook the "
                "same modules twice. Pass all probes to one monitor, or close() the other first"
            )
        _MONITORS[model] = weakref.ref(self)
        self._named = MappingProxyType({p.name: p for p in probes})
        setup = Setup(
            model,
            self._named,
            self.log_every_n_steps,
            process_group,
            strict,
        )
        try:
            with whole_parameters(model):  # FSDP: attach reads parameters' shapes
                for c in (*probes, *mitigations):
                    c.attach(setup)
            # after attach: a glob over several modules binds its rules to each module's keys
            bound = [r for p in probes for r in p.default_rules()] if default_rules else []
            self.rules = RuleEngine(bound + list(rules))
        except Exception:
            self.close()
            raise

    # ----------------------------------------------------------------- recording
    @contextmanager
    def observe(self, targets: Any = None, **inputs) -> Iterator[CollapseMonitor]:
        """Record the forward passes run inside this block.

        Args:
            targets: class labels for class-conditional probes, shaped like the probed
                features without their last dimension (``(N,)`` or ``(B, T)``).
            **inputs: other per-batch inputs that probes declare (``groups=`` for
                ``GroupCollapse``, ``mask=`` for ``TokenUniformity``).

        A keyword that no probe reads is ignored, with a warning the first time (a typo shows).

        Raises:
            RuntimeError: the monitor is closed, or ``observe()`` blocks are nested.
        """
        if self._closed:
            raise RuntimeError("CollapseMonitor is closed")
        if self._recording:
            raise RuntimeError("observe() blocks cannot be nested")
        unknown = sorted(set(inputs) - self._keywords - self._unread_warned)
        if unknown:  # a shared training loop may pass more than these probes read; a typo shows
            self._unread_warned.update(unknown)
            log.warning(
                "collapse monitor: observe() got keywords no probe reads: %s (ignored); the "
                "probes read %s",
                unknown,
                sorted(self._keywords),
            )
        inputs = {"targets": targets, **inputs}
        snapshot = self._snapshot_prefix is not None
        logging_step = not snapshot and (self.global_step + 1) % self.log_every_n_steps == 0
        recorders = [p for p in self.probes if self.records(p)]
        for p in recorders:
            p.begin_recording(
                Recording(
                    self.global_step,
                    logging_step,
                    snapshot,
                    {k: v for k, v in inputs.items() if k in p.keywords and v is not None},
                )
            )
        for m in self.mitigations:
            m.begin_recording(Recording(self.global_step, logging_step, snapshot))
        self._recording = [*recorders, *self.mitigations]
        if not snapshot:  # snapshots do not advance per-step state such as usage EMAs
            self._recorded.update(recorders)
        try:
            yield self
        finally:
            for c in self._recording:
                c.end_recording()
            self._recording = []

    def records(self, probe: Probe) -> bool:
        """Whether ``probe`` records in a forward pass observed now (at this step)."""
        n = self.observe_every_n_steps
        if self._snapshot_prefix is not None:
            return True
        if n is not None:
            return self.global_step % n == 0
        if probe.every_step:
            return True
        L = self.log_every_n_steps
        if probe.classes is None:
            stride = _sample_stride(L)
        elif probe.rows_per_step is None:
            return True  # its first step tells how many samples a step brings
        else:  # every rank records: the window holds world x rows per recorded step
            rows = probe.rows_per_step * _dist.world_size(self.process_group)
            stride = class_sample_stride(L, probe.classes, rows)
        return (L - 1 - self.global_step % L) % stride == 0

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float] | None:
        """Advance one training step; at cadence compute, log, check rules and mitigate.

        Returns:
            the logged metrics (``{"collapse/<probe>/<metric>": float}``) at a logging step,
            else ``None``. Only logging steps synchronise with the device (and, on a GPU, the
            recorded steps of a class-sharded probe: ``NeuralCollapse(shard_classes=True)``).
        """
        for m in self.mitigations:
            if not m.disabled:
                self._guard(m, m.on_step, optimizer)
        for p in self.probes:
            due = p in self._recorded or self.records(p)
            if p in self._recorded and not p.disabled:
                self._guard(p, p.finish_step)
            elif not p.disabled and due:  # e.g. this rank had no batch this step
                self._guard(p, p.missed_step)
            if due and p not in self._stopped:  # a collective for some probes: on every rank,
                # disabled or not, until the ranks agree at a log that it stopped
                self._guard(p, p.exchange, self.process_group)
        self._recorded.clear()
        self.global_step += 1
        if self.global_step % self.log_every_n_steps:
            return None
        with torch.profiler.record_function("collapse_monitor.log"):
            return self._log(optimizer)

    # ----------------------------------------------------------------- failures
    def _guard(self, owner: Component, fn, *args) -> Any:
        try:
            return fn(*args)
        except Exception as exc:
            owner.fail(exc)

    def _agree_on_disabled(self) -> None:
        """Disable on every rank what failed on any rank (before any collective)."""
        owners = [*self.probes, *self.mitigations]
        if not _dist.is_distributed(self.process_group) or not owners:
            return
        flags = torch.tensor(
            [float(c.disabled) for c in owners], device=_dist.collective_device(self.process_group)
        )
        _dist.all_reduce_max_(flags, self.process_group)
        for c, flag in zip(owners, flags.tolist()):
            c.disabled = c.disabled or bool(flag)
        self._stopped = {c for c in self.probes if c.disabled}

    @property
    def rank_local_state(self) -> bool:
        """Whether some probe keeps statistics that only this rank holds (class shards,
        ``NeuralCollapse(shard_classes=True)`` under ``torch.distributed``): then every rank
        must save its own :meth:`state_dict` and load it back (a checkpoint of rank 0's alone
        skips the resumed window, with a warning)."""
        return any(p.sharded for p in self.probes)

    @property
    def error_count(self) -> int:
        """Errors so far: every probe's, mitigation's, sink's and picture's."""
        return self.errors + sum(c.errors for c in (*self.probes, *self.mitigations))

    # ----------------------------------------------------------------- readout
    def _readouts(self) -> dict[str, Readout]:
        """Each enabled probe's readout of its window over all ranks; the windows are kept."""
        named = named_modules(self.model)
        for p in self.probes:
            if not p.disabled:
                self._guard(p, p.check_modules, named)
        self._agree_on_disabled()
        readouts = {}
        # FSDP (first generation): gathered only for a readout that reads weights (NC's
        # classifier); every rank takes the same decision (disabled flags were just agreed)
        gather = any(p.reads_parameters and not p.disabled for p in self.probes)
        with whole_parameters(self._holder, writeback=False) if gather else nullcontext():
            for p in self.probes:
                if not p.disabled:
                    r = self._guard(p, p.compute, self.process_group)
                    if r is not None:
                        readouts[p.name] = r
        return readouts

    def _metrics(
        self, readouts: dict[str, Readout], prefix: str | None = None, loader: int | None = None
    ) -> dict:
        return {
            key.with_prefix(prefix, loader): float(value)
            for r in readouts.values()
            for key, value in r.metrics.items()
            if value == value  # NaN: undefined, not logged
        }

    def compute(self) -> dict[str, float]:
        """Metrics of the current window (all-reduced across ranks); the window is kept. Under
        ``torch.distributed`` a collective: call it on every rank."""
        metrics = self._metrics(self._readouts())
        metrics[ERRORS_KEY] = float(self.error_count)
        return metrics

    def _each_sink(self, method: str, *args) -> None:
        for sink in self.sinks:
            if id(sink) in self._failed_sinks or (sink.main_process_only and _dist.rank() != 0):
                continue
            try:
                getattr(sink, method)(*args)
            except Exception as exc:
                if self.strict:
                    raise
                self.errors += 1
                self._failed_sinks.add(id(sink))
                log.error(
                    "collapse monitor: sink %r failed and is disabled: %s: %s",
                    sink,
                    type(exc).__name__,
                    exc,
                )

    def _pictures(self, readouts: dict[str, Readout]) -> dict[str, np.ndarray]:
        """Rendered pictures of the opted-in probes (only where a sink will receive them)."""
        if not (self._picture_probes and self.sinks):
            return {}
        if not pictures_.available():
            log.warning(
                "collapse monitor: pictures are off, matplotlib is not installed "
                "(pip install matplotlib, or collapse-monitor[pictures])"
            )
            self._picture_probes = set()
            return {}
        out = {}
        for name, r in readouts.items():
            if name not in self._picture_probes:
                continue
            try:
                for key, pic in r.pictures.items():
                    out[key] = pictures_.render(pic)
            except Exception as exc:  # a picture never costs the probe its metrics
                if self.strict:
                    raise
                self.errors += 1
                self._picture_probes.discard(name)
                log.error(
                    "collapse monitor: pictures of %r are off: %s: %s",
                    name,
                    type(exc).__name__,
                    exc,
                )
        return out

    def _warn_thin_windows(self, metrics: dict[str, float]) -> None:
        """Say once per probe when the sampled default cadence left a class-conditional probe
        fewer than 2 samples per class in a window (classes below ``min_class_count`` drop out)."""
        if self.observe_every_n_steps is not None:
            return
        L = self.log_every_n_steps
        for p in self.probes:
            samples = metrics.get(p.key("samples"))
            if p.every_step or p.classes is None or samples is None or p.name in self._thin_warned:
                continue
            if samples < 2 * p.classes:
                self._thin_warned.add(p.name)
                log.warning(
                    "collapse monitor: %r recorded %d samples for %d classes in this window (the "
                    "default cadence recorded %d of its %d steps, at most half of them); its "
                    "class statistics are thin: pass observe_every_n_steps=1 or log less often",
                    p,
                    samples,
                    p.classes,
                    p.window_steps,
                    L,
                )

    def _warn_no_calls(self, metrics: dict[str, float]) -> None:
        """Say once per probe when it recorded steps in this window but its modules never ran
        inside ``observe()`` (over all ranks)."""
        for p in self.probes:
            calls = metrics.get(p.key("calls"))
            if calls == 0 and p.window_steps and p.name not in self._idle_warned:
                self._idle_warned.add(p.name)
                log.warning(
                    "collapse monitor: %r recorded %d steps but its modules %s never ran inside "
                    "observe() (collapse/%s/calls = 0). Likely causes: the model was compiled "
                    "before the monitor was attached (torch.compile ignores hooks added later: "
                    "attach first, or compile after), the path names a module the forward does "
                    "not call, the module is skipped (conditional computation), or the forward "
                    "ran on a copy of the model (copy.deepcopy, a reloaded pickle: copies are "
                    "not monitored)",
                    p,
                    p.window_steps,
                    p.paths,
                    p.name,
                )

    def _mitigate(self, view: LogView) -> list[Event]:
        """Every enabled mitigation acts on this log (same view on every rank); the events it
        returns are counted and routed to the probes they name."""
        events = []
        gather = any(m.reads_parameters and not m.disabled for m in self.mitigations)
        with whole_parameters(self._holder) if gather else nullcontext():  # FSDP: written back
            for m in self.mitigations:
                if not m.disabled:
                    events += self._guard(m, m.after_log, view) or []
        for event in events:
            self.mitigation_counts[event.name] = (
                self.mitigation_counts.get(event.name, 0.0) + event.count
            )
            probe = self._named.get(event.probe)
            if probe is not None and not probe.disabled:
                self._guard(probe, probe.replaced, event.scope, event.replaced)
        return events

    def _log(self, optimizer) -> dict[str, float]:
        readouts = self._readouts()
        metrics = self._metrics(readouts)
        self._warn_thin_windows(metrics)
        histograms = {k: v for r in readouts.values() for k, v in r.histograms.items()}
        self._warn_no_calls(metrics)
        pictures = self._pictures(readouts)
        step = self.global_step
        alerts = self.rules.check(metrics, step)
        for name, count in self.rules.counts.items():
            metrics[alerts_key(name)] = float(count)
        # mitigations act on this window's (reduced, rank-identical) statistics, so they run
        # before the probes move on to the next window
        view = LogView(
            step,
            MappingProxyType(dict(metrics)),
            tuple(alerts),
            optimizer,
            self._named,
            MappingProxyType(readouts),
        )
        events = self._mitigate(view)
        for name, total in self.mitigation_counts.items():
            metrics[mitigations_key(name)] = total
        for p in self.probes:
            if not p.disabled:
                self._guard(p, p.finish_window, self.process_group)
        metrics[ERRORS_KEY] = float(self.error_count)
        self._each_sink("log_metrics", metrics, step)
        self._each_sink("log_thresholds", self.rules.thresholds(metrics), step)
        for tag, values in histograms.items():
            self._each_sink("log_histogram", tag, values, step)
        for tag, image in pictures.items():
            self._each_sink("log_image", tag, image, step)
        for alert in alerts:
            self._dispatch_alert(alert)
        for event in events:
            log.info("step %d: mitigation %s applied: %s", step, event.name, event.info)
            self._each_sink("log_event", event.name, {**event.info, "count": event.count}, step)
        self._each_sink("flush")
        return metrics

    def _dispatch_alert(self, alert: Alert) -> None:
        prefix = f"[rank {_dist.rank(self.process_group)}] " if _dist.is_distributed() else ""
        log.warning("%scollapse alert: %s", prefix, alert.message)
        if alert.action == "stop":
            self.should_stop = True
        self._each_sink("log_alert", alert)
        for fn in self.on_alert:
            fn(alert)

    # ----------------------------------------------------------------- snapshots
    def begin_snapshot(self, prefix: str = "val", loader: int | None = None) -> None:
        """Start an evaluation snapshot: probes record into fresh windows until :meth:`end_snapshot`.

        Args:
            prefix: the keys' prefix, ``<prefix>/collapse/...``.
            loader: an evaluation dataloader's index, keyed ``.../dataloader_idx_<loader>``.
        """
        if self._snapshot_prefix is not None:
            raise RuntimeError(f"snapshot '{self._snapshot_prefix}' is already open")
        self._snapshot_prefix, self._snapshot_loader = prefix, loader
        for p in self.probes:
            p.begin_snapshot()

    def _close_snapshot(self) -> None:
        self._snapshot_prefix = None
        for p in self.probes:
            p.end_snapshot()

    @property
    def snapshot_prefix(self) -> str | None:
        """The prefix of the open snapshot, ``None`` outside one."""
        return self._snapshot_prefix

    def end_snapshot(self, prefix: str | None = None, discard: bool = False) -> dict[str, float]:
        """Compute and log the snapshot under ``<prefix>/collapse/...``; restore the training windows.

        Args:
            prefix: the keys' prefix if not the one :meth:`begin_snapshot` gave (a trainer
                that names its evaluation only at its end).
            discard: close the snapshot without computing or logging anything.
        """
        if self._snapshot_prefix is None:
            raise RuntimeError("end_snapshot() without begin_snapshot()")
        if discard:
            self._close_snapshot()
            return {}
        prefix, loader = prefix or self._snapshot_prefix, self._snapshot_loader
        try:
            metrics = self._metrics(self._readouts(), prefix, loader)
        finally:
            self._close_snapshot()
        self._each_sink("log_metrics", metrics, self.global_step)
        self._each_sink("flush")
        return metrics

    @contextmanager
    def snapshot(
        self, prefix: str = "val", loader: int | None = None
    ) -> Iterator[dict[str, float]]:
        """``with monitor.snapshot("val") as metrics:`` observe batches inside; ``metrics`` is
        filled (and logged) when the block ends (see :meth:`begin_snapshot`)."""
        self.begin_snapshot(prefix, loader)
        result: dict[str, float] = {}
        try:
            yield result
        except BaseException:
            self._close_snapshot()
            raise
        result.update(self.end_snapshot())

    # ----------------------------------------------------------------- lifecycle
    def sharded_by(self, wrapper: nn.Module) -> None:
        """Tell the monitor that ``wrapper``, a ``FullyShardedDataParallel`` module built around
        the monitored model after the monitor (so that σReparam could apply first), now holds
        its parameters: readouts and mitigations gather them through it (``summon_full_params``).
        Lightning's ``CollapseCallback`` does this itself under ``strategy="fsdp"``.

        Raises:
            ValueError: ``wrapper`` does not contain the monitored model.
        """
        if not any(m is self.model for m in wrapper.modules()):
            raise ValueError(
                f"{type(wrapper).__name__} does not contain the monitored {type(self.model).__name__}"
            )
        self._sharded_by = wrapper

    @property
    def _holder(self) -> nn.Module:
        return self.model if self._sharded_by is None else self._sharded_by

    def close(self) -> None:
        """Remove every hook and close the sinks; the model is left as it was (mitigations aside)."""
        for c in (*self.probes, *self.mitigations):
            c.detach()
        self._recording = []
        if not self._closed:
            for sink in self.sinks:
                sink.close()
            ref = _MONITORS.get(self.model)
            if ref is not None and ref() is self:
                del _MONITORS[self.model]
        self._sharded_by = None
        self._closed = True

    def __enter__(self) -> CollapseMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def state_dict(self, sync: bool | None = None) -> dict:
        """Everything a resumed run needs: step, window statistics, rule and mitigation state.

        Under ``torch.distributed`` (``sync=None`` means: when a group is initialised) the
        window statistics are all-reduced first, so this is a collective: call it on every rank
        (Lightning does), and save rank 0's result; with class-sharded probes
        (``NeuralCollapse(shard_classes=True)``) every rank's result holds its own classes:
        save each rank's to its own file (``torch.distributed.checkpoint`` keeps one copy of
        each key, as if replicated: it cannot hold them).
        """
        sync = sync is not False
        return {
            "version": _STATE_VERSION,
            # a reduced state holds every rank's samples: only one rank may keep them on load
            "reduced": sync and _dist.is_distributed(self.process_group),
            "global_step": self.global_step,
            "should_stop": self.should_stop,
            "probes": {p.name: p.state_dict(self.process_group, sync=sync) for p in self.probes},
            "rules": self.rules.state_dict(),
            "mitigation_counts": dict(self.mitigation_counts),
            "mitigations": {m.name: m.state_dict() for m in self.mitigations},
        }

    def _check_state(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"unsupported CollapseMonitor state version {state.get('version')} "
                f"(this version reads {_STATE_VERSION})"
            )
        for what, mine in (("probes", self.probes), ("mitigations", self.mitigations)):
            missing = [c.name for c in mine if c.name not in state[what]]
            if missing:
                raise KeyError(
                    f"checkpoint has no state for {what} {missing}; it has {sorted(state[what])}"
                )

    def restore_structure(self, state: dict) -> None:
        """Re-apply what mitigations changed in the model's structure (σReparam) from a saved
        state, before the model's own weights are loaded."""
        self._check_state(state)
        for m in self.mitigations:
            m.restore_structure(state["mitigations"][m.name])

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let mitigations that add parameters arrange a new optimizer's groups as before."""
        for m in self.mitigations:
            m.adopt_optimizer(optimizer)

    def load_state_dict(self, state: dict, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Restore :meth:`state_dict`. Under distributed runs every rank loads the same (reduced)
        state; ranks other than 0 keep its shifts and lagged centres but start their window
        empty, so the next all-reduce counts each sample once. A state saved without reducing
        (``sync=False``: each rank its own) is kept whole on every rank.

        Mitigations that changed the model's structure (``SigmaReparam``) re-apply it here, and add
        their parameters to ``optimizer``: load the monitor before the model and the optimizer.

        Raises:
            ValueError: a state of another version; KeyError: a probe or mitigation without state.
        """
        self._check_state(state)
        keep = not state["reduced"] or _dist.rank(self.process_group) == 0
        self.global_step = int(state["global_step"])
        self.should_stop = bool(state["should_stop"])
        for p in self.probes:
            p.load_state_dict(state["probes"][p.name], keep_window=keep)
        self.rules.load_state_dict(state["rules"])
        self.mitigation_counts = dict(state["mitigation_counts"])
        for m in self.mitigations:
            m.load_state_dict(state["mitigations"][m.name], optimizer=optimizer)
