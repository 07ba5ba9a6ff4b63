"""CollapseMonitor: a small coordinator over named parts.

- :class:`~collapse_monitor.cadence.Cadence`: which steps each probe records, when to log;
- :class:`~collapse_monitor.probes.probeset.ProbeSet`: the probes (hooks, windows, readouts);
- :class:`~collapse_monitor.rules.RuleEngine`: thresholds to alerts;
- :class:`~collapse_monitor.mitigations.runner.MitigationRunner`: the mitigations;
- :class:`~collapse_monitor.outlets.Outlets`: sinks, pictures and alert callbacks, each guarded;
- :class:`~collapse_monitor.snapshots.Snapshots`: evaluation snapshots;
- :mod:`~collapse_monitor.state`: the checkpoint format;
- :class:`~collapse_monitor.notices.Notices`: what is said once in the log.

A training step flows one way: ``observe()`` hands recordings to the probes that record it;
``step()`` ends the step for the probes and the every-step mitigations and, after a logging
step, reads the probes out over all ranks, checks the rules, lets the mitigations act, and
sends everything to the outlets.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from . import _dist, state
from ._sharding import whole_parameters
from .cadence import Cadence
from .config import MonitorConfig, OnAlert
from .contracts import LogView, Observation, Readout, Recording, Setup, StepView
from .keys import ERRORS_KEY, MetricKey, alerts_key
from .mitigations.base import Mitigation
from .mitigations.runner import MitigationRunner, Optimizers, as_optimizers
from .notices import Notices
from .outlets import Outlets
from .probes.base import Probe
from .probes.driver import ProbeDriver
from .probes.probeset import ProbeSet, metrics_of
from .rules import Rule, RuleEngine
from .sinks import Sink
from .snapshots import Snapshots

# the open monitor of each model, kept here rather than on the model: nothing of the monitor
# travels with a saved, pickled or copied model
_MONITORS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


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
        default_rules: also use each probe's default rules (listed in ``docs/metrics.md``).
        on_alert: callables ``f(alert)`` called for every alert.
        observe_every_n_steps: ``None`` (default): each probe records the steps its
            ``sampling`` asks of the cadence (:mod:`collapse_monitor.cadence`: every step for
            the cheap probes, two a window for GEMM-cost ones, ~4 samples per class for
            ``NeuralCollapse``); ``n``: every probe records every n-th step only (``1``: the
            exact whole-window statistics). Validation snapshots record every batch.
        pictures: ``True`` (every probe that draws), or names of probes: at each log, these
            probes' pictures (class-mean cosine heatmap, code usage, attention entropy per layer
            and head, KL per latent dimension, eigen-spectrum) go to the sinks as images. Needs
            matplotlib; without it the monitor says so once and logs no pictures.
        pictures_every_n_logs: draw the pictures at every n-th log only (a render: ~0.1 s CPU).
        overhead_budget: e.g. ``0.01``: the share of the step time the monitor may take; it
            records its costly probes on fewer steps to keep it (:mod:`collapse_monitor.budget`).
        process_group: ``torch.distributed`` group for the all-reductions (default: WORLD).
        strict: raise every error of a probe, sink or mitigation (for tests). By default such an
            error never reaches the training loop: it is logged once with the owner's name,
            counted in ``collapse/errors`` and the owner is disabled. Under DDP a probe or
            mitigation disabled on any rank is disabled on all at the next log, before any
            collective.

    Raises:
        TypeError: a probe, mitigation, rule or sink of the wrong type.
        ValueError: repeated probe or mitigation names; ``pictures`` naming unknown probes;
            a cadence below 1; tensor parallelism; a glob matching other modules on each rank.
        KeyError: a module path that matches nothing (on no rank, under ``torch.distributed``:
            a pipeline stage's modules, probes' and mitigations', live on some ranks; a
            collective), with the closest names.
        RuntimeError: the model already has an open monitor.

    Use ``with monitor.observe(targets=y): out = model(x)`` around the forward pass and
    ``monitor.step(optimizer)`` once per training step. Call ``close()`` to remove every hook.

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
        on_alert: OnAlert = None,
        observe_every_n_steps: int | None = None,
        pictures: bool | Iterable[str] = False,
        process_group=None,
        strict: bool = False,
        pictures_every_n_logs: int = 1,
        overhead_budget: float | None = None,
    ) -> None:
        config = MonitorConfig(
            probes, log_every_n_steps, mitigations, rules, default_rules, on_alert,
            observe_every_n_steps, pictures, strict, pictures_every_n_logs, overhead_budget,
        )  # fmt: skip
        self._build(model, config, sinks, process_group)

    @classmethod
    def from_config(
        cls, model: nn.Module, config: MonitorConfig, sinks: Iterable[Sink] = (), process_group=None
    ) -> CollapseMonitor:
        """A monitor of ``model`` as a (validated) :class:`~collapse_monitor.config.MonitorConfig`
        says (a trainer callback's)."""
        monitor = cls.__new__(cls)
        monitor._build(model, config, sinks, process_group)
        return monitor

    def _build(self, model, config: MonitorConfig, sinks, process_group) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if config.log_every_n_steps is None:
            raise ValueError("log_every_n_steps must be an integer >= 1, got None")
        self.model = model
        self.config = config
        self.process_group = process_group
        self.strict = strict = config.strict
        self.cadence = Cadence(
            config.log_every_n_steps, config.observe_every_n_steps, _dist.world_size(process_group)
        )
        self._probes = ProbeSet(
            config.probes, process_group, config.overhead_budget, config.picture_probes
        )
        self._mitigations = MitigationRunner(config.mitigations, self._probes.route)
        self._probes.quiet_with(config.mitigations)
        pictures, every = config.picture_probes, config.pictures_every_n_logs
        self.outlets = Outlets(sinks, pictures, config.alert_callbacks, strict, every)
        self._snapshots = Snapshots(self._probes)
        self.notices = Notices(config.keywords())
        self.global_step, self.should_stop = 0, False
        self._recording: list | None = None  # inside observe(): the parts that record
        self._sharded_by: nn.Module | None = None  # an FSDP module wrapped around the model later
        self._closed = False
        _claim(model, self)
        setup = Setup(model, {}, config.log_every_n_steps, process_group, strict)
        try:
            with whole_parameters(model):  # FSDP: attach reads parameters' shapes
                self.probe_info = info = self._probes.attach(setup)
                placed = replace(setup, probes=info, tensor_parallel=self._probes.tp)
                self.cadence.world = self._probes.replicas  # (a tensor-parallel group: one)
                self._probes.agreed(self._mitigations.attach, placed)
            # after attach: a glob over several modules binds its rules to each module's keys
            bound = [r for p in config.probes for r in p.default_rules() if config.default_rules]
            self.rules = RuleEngine(bound + list(config.rules))
        except Exception:
            self.close()
            raise

    # ----------------------------------------------------------------- the parts, read-only
    @property
    def log_every_n_steps(self) -> int:
        return self.cadence.log_every_n_steps

    @property
    def probes(self) -> list[Probe]:
        return [d.probe for d in self._probes.drivers]

    @property
    def mitigations(self) -> list[Mitigation]:
        return self._mitigations.mitigations

    @property
    def sinks(self) -> list[Sink]:
        return self.outlets.sinks

    @property
    def mitigation_counts(self) -> dict[str, float]:
        return self._mitigations.counts

    @property
    def error_count(self) -> int:
        """Errors so far: every probe's, mitigation's, sink's and picture's."""
        return self.outlets.errors + self._probes.errors + sum(m.errors for m in self.mitigations)

    @property
    def rank_local_state(self) -> bool:
        """Whether some probe keeps statistics only this rank holds (class shards under
        ``torch.distributed``): every rank saves its own :meth:`state_dict`, or a gathered one
        (``gather=True``); rank 0's alone skips the resumed window, with a warning."""
        return self._probes.rank_local

    def driver(self, probe: str | Probe) -> ProbeDriver:
        """The monitor's side of ``probe`` (by name or instance), for tests and debugging: its
        ``window`` of statistics, ``last`` readout (masks included), ``observed_steps``. Read it
        only."""
        return self._probes.by_name[probe.name if isinstance(probe, Probe) else probe]

    def records(self, probe: Probe) -> bool:
        """Whether ``probe`` records in a forward pass observed now (at this step)."""
        if self._snapshots.prefix is not None:
            return True
        d = self.driver(probe)
        return self.cadence.records(probe.sampling, self.global_step, d.rows_per_step, d.slower)

    # ----------------------------------------------------------------- recording
    def observe(self, targets: Any = None, *, rollout: bool = False, **inputs) -> Observation:
        """Record the forward passes run inside this block: ``with monitor.observe(...):``.

        Args:
            targets: class labels for class-conditional probes, shaped like the probed
                features without their last dimension (``(N,)`` or ``(B, T)``).
            rollout: the block generates: only ``rollout=True`` probes record it (and nothing else).
            **inputs: other per-batch inputs that probes declare (``groups=`` for
                ``GroupCollapse``, ``mask=`` for ``TokenUniformity``).

        A keyword that no probe reads is ignored, with a warning the first time (a typo shows).

        Raises:
            RuntimeError: on entry, the monitor is closed or ``observe()`` blocks are nested.
        """
        return Observation(self, targets, rollout, inputs)

    def _begin_observe(self, targets: Any, rollout: bool, inputs: dict) -> CollapseMonitor:
        if self._closed or self._recording is not None:
            why = "closed" if self._closed else "inside an observe() block: they cannot be nested"
            raise RuntimeError(f"CollapseMonitor is {why}")
        if inputs:
            self.notices.unread_keywords(inputs)
        snapshot, step = self._snapshots.note_observe(), self.global_step
        if step in self._probes.quiet_steps and not snapshot:
            self._recording = []  # (nothing records this step)
            return self
        recorders = self._probes.begin_recording(
            self.cadence, step, snapshot, {"targets": targets, **inputs}, rollout
        )
        logging = not snapshot and self.cadence.logs_after(step)
        for m in (mitigations := [] if rollout else self.mitigations):  # (training forwards)
            m.begin_recording(Recording(step, logging, snapshot))
        self._recording = [*recorders, *mitigations]
        return self

    def _end_observe(self) -> None:
        parts, self._recording = self._recording, None
        for part in parts or ():
            part.end_recording()

    def step(self, optimizer: Optimizers = None) -> dict[MetricKey, float] | None:
        """Advance one training step; at cadence compute, log, check rules and mitigate.

        Args:
            optimizer: the optimizer (or a list of every optimizer) of the step: mitigations
                reset the state of what they change in each that holds it.

        Returns:
            the logged metrics (``{"collapse/<probe>/<metric>": float}``, keys are
            :class:`~collapse_monitor.keys.MetricKey`) at a logging step, else ``None``. Only
            logging steps synchronise with the device (and, on a GPU, the recorded steps of a
            class-sharded probe: ``NeuralCollapse(shard_classes=True)``).
        """
        step = self.global_step
        if step in self._probes.quiet_steps:
            self.global_step = step + 1  # (no probe recorded it, and no log follows it)
            return None
        optimizers = as_optimizers(optimizer)
        if self.mitigations:  # (what the probes publish of a step is only for them)
            self._mitigations.after_step(StepView(step, optimizers, self._probes.step_values()))
        self._probes.end_step(self.cadence, step)
        self.global_step += 1
        if not self.cadence.logs_after(step):
            return None
        with torch.profiler.record_function("collapse_monitor.log"):
            return self._log(optimizers)

    # ----------------------------------------------------------------- logs
    def _readouts(self) -> dict[str, Readout]:
        self._probes.agree_on_disabled(self.model, self.mitigations)
        return self._probes.readouts(self._holder)

    def compute(self) -> dict[MetricKey, float]:
        """Metrics of the current window (all-reduced across ranks); the window is kept. Under
        ``torch.distributed`` a collective: call it on every rank."""
        metrics = metrics_of(self._readouts())
        metrics[ERRORS_KEY] = float(self.error_count)
        return metrics

    def _log(self, optimizers: tuple) -> dict[MetricKey, float]:
        readouts = self._readouts()
        metrics = metrics_of(readouts)
        self.notices.after_log(self._probes.drivers, metrics, self.cadence)
        step = self.global_step
        alerts = self.rules.check(metrics, step)
        for name, count in self.rules.counts.items():
            metrics[alerts_key(name)] = float(count)
        self.should_stop |= any(a.action == "stop" for a in alerts)
        # mitigations act on this window's (reduced, rank-identical) statistics, so they run
        # before the probes move on to the next window
        view = LogView(step, MappingProxyType(dict(metrics)), tuple(alerts), optimizers,
                       self.probe_info, MappingProxyType(readouts))  # fmt: skip
        events = self._mitigations.after_log(view, self._holder)
        metrics.update(self._mitigations.metrics())
        metrics.update(self._probes.finish_windows())  # (with a budget: its overhead)
        metrics.update({ERRORS_KEY: float(self.error_count), **self.outlets.error_metrics()})
        thresholds = self.rules.thresholds(metrics)
        index = step // self.log_every_n_steps - 1  # (logs fall on multiples of L)
        self.outlets.log(step, metrics, thresholds, readouts, alerts, events, index)
        self._probes.log_done()  # (with an overhead budget: the log's time ends here)
        return metrics

    # ----------------------------------------------------------------- snapshots
    def begin_snapshot(self, prefix: str = "val", loader: int | None = None) -> None:
        """Start an evaluation snapshot: probes record into fresh windows until :meth:`end_snapshot`.

        Args:
            prefix: the keys' prefix, ``<prefix>/collapse/...``.
            loader: an evaluation dataloader's index, keyed ``.../dataloader_idx_<loader>``.
        """
        self._snapshots.begin(prefix, loader)

    @property
    def snapshot_prefix(self) -> str | None:
        """The prefix of the open snapshot, ``None`` outside one."""
        return self._snapshots.prefix

    def end_snapshot(
        self, prefix: str | None = None, discard: bool = False
    ) -> dict[MetricKey, float]:
        """Compute and log the snapshot under ``<prefix>/collapse/...``; restore the training windows.

        Args:
            prefix: the keys' prefix if not the one :meth:`begin_snapshot` gave (a trainer
                that names its evaluation only at its end).
            discard: close the snapshot without computing or logging anything.
        """
        if discard:
            self._snapshots.close()
            return {}
        with self._snapshots.ending(prefix) as (prefix, loader):
            metrics = metrics_of(self._readouts(), prefix, loader)
        self.outlets.each_sink("log_metrics", metrics, self.global_step)
        self.outlets.each_sink("flush")
        return metrics

    @contextmanager
    def snapshot(
        self, prefix: str = "val", loader: int | None = None
    ) -> Iterator[dict[MetricKey, float]]:
        """``with monitor.snapshot("val") as metrics:`` observe batches inside; ``metrics`` is
        filled (and logged) when the block ends (see :meth:`begin_snapshot`)."""
        self.begin_snapshot(prefix, loader)
        result: dict[MetricKey, float] = {}
        try:
            yield result
        except BaseException:
            self._snapshots.close()
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
        self._probes.detach()
        self._mitigations.detach()
        self._recording, self._sharded_by = None, None
        if not self._closed:
            self._closed = True
            self.notices.unlogged(self.global_step, self.log_every_n_steps)
            try:
                self.outlets.close()
            finally:  # (under strict, a sink's error still frees the model)
                ref = _MONITORS.get(self.model)
                if ref is not None and ref() is self:
                    del _MONITORS[self.model]

    def __enter__(self) -> CollapseMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- state
    def state_dict(self, sync: bool | None = None, gather: bool = False) -> dict:
        """Everything a resumed run needs: step, window statistics, rule and mitigation state
        (tensors and plain values only).

        Under ``torch.distributed`` (``sync=None`` means: when a group is initialised) the
        window statistics are all-reduced first, so this is a collective: call it on every rank
        (Lightning does), and save rank 0's result; with class shards
        (``NeuralCollapse(shard_classes=True)``) every rank's result holds its own classes:
        save each rank's, or ``gather`` all into each (:func:`~collapse_monitor.state.gathered`).
        For ``torch.distributed.checkpoint``: :meth:`stateful`.
        """
        sync, gather = sync is not False, gather and self.rank_local_state
        saved = state.pack(
            # a reduced state holds every rank's samples: only one rank may keep them on load
            reduced=sync and _dist.is_distributed(self.process_group),
            global_step=self.global_step,
            should_stop=self.should_stop,
            probes=self._probes.state_dict(sync),
            rules=self.rules.state_dict(),
            mitigation_counts=dict(self._mitigations.counts),
            mitigations=self._mitigations.state_dict(),
        )
        return state.gathered(saved, self.process_group) if gather else saved

    def stateful(self, optimizer: Optimizers = None) -> state.DistributedCheckpoint:
        """This monitor as a ``torch.distributed.checkpoint`` ``Stateful``:
        ``dcp.save({..., "monitor": monitor.stateful()})``, the same to ``dcp.load``."""
        return state.DistributedCheckpoint(self, optimizer)

    def restore_structure(self, saved: dict) -> None:
        """Re-apply what mitigations changed in the model's structure (σReparam) from a saved
        state, before the model's own weights are loaded."""
        saved = state.checked(saved, self.probes, self.mitigations, self.process_group)
        self._mitigations.restore_structure(saved["mitigations"])

    def adopt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Let mitigations that add parameters arrange a new optimizer's groups as before."""
        self._mitigations.adopt_optimizer(optimizer)

    def load_state_dict(self, saved: dict, optimizer: Optimizers = None) -> None:
        """Restore :meth:`state_dict` (or this rank's part of a gathered one). Under distributed
        runs every rank loads the same reduced state; all but a probe's first rank keep its shifts
        and lagged centres but start their window empty (each sample counted once); a state saved
        with ``sync=False`` is kept whole on every rank. Mitigations that changed the model's
        structure (σReparam) re-apply it here and add their parameters to ``optimizer``: load the
        monitor before the model and the optimizer. A state that does not fit (a probe's
        identity, a statistic's shape, a malformed part) is refused naming it; nothing changes.

        Raises:
            ValueError: a state of another version, or another probe's; KeyError: a probe or
                mitigation without state, or state of ones this monitor does not have.
        """
        saved = state.checked(saved, self.probes, self.mitigations, self.process_group)
        apply_probes = self._probes.stage(saved["probes"], reduced=bool(saved["reduced"]))
        rules = RuleEngine(self.rules.rules)  # (a copy: a malformed part changes nothing)
        rules.load_state_dict(saved["rules"])
        step, stop = int(saved["global_step"]), bool(saved["should_stop"])
        # a mitigation's state that fails undoes the probes' (nothing changes)
        apply_probes(
            then=lambda: self._mitigations.load_state_dict(
                saved["mitigations"], saved["mitigation_counts"], as_optimizers(optimizer)
            )
        )
        self.rules, self.global_step, self.should_stop = rules, step, stop


def _claim(model: nn.Module, monitor: CollapseMonitor) -> None:
    """Register ``monitor`` as ``model``'s one open monitor (``RuntimeError`` if it has one)."""
    other = _MONITORS.get(model)
    if other is not None and other() is not None and not other()._closed:
        raise RuntimeError(
            f"{type(model).__name__} already has a CollapseMonitor; two monitors would hook the "
            "same modules twice. Pass all probes to one monitor, or close() the other first"
        )
    _MONITORS[model] = weakref.ref(monitor)
