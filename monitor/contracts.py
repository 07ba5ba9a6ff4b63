"""What flows between the monitor and the parts it owns. Probes and mitigations never hold the
monitor, and mitigations never hold a probe: they are handed these small, read-only records.

- :class:`Setup`: what a probe or mitigation sees when it is attached (probes as :class:`ProbeInfo`).
- :class:`Recording`: what a probe's hooks see while the monitor records a forward pass.
- :class:`Readout`: what a probe returns at a log (metrics, histograms, pictures, masks).
- :class:`StepView`: what a mitigation that acts at every step sees after each step.
- :class:`LogView`: what a mitigation sees after a log.
- :class:`Replaced`: what a mitigation replaced of a probe's elements; the monitor routes it to
  the probe, which forgets them.
- :class:`Event`: what a mitigation did; the monitor logs it (and routes its :class:`Replaced`).
- :class:`Component`: the failure bookkeeping of the parts (probe drivers, mitigations).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import torch
from torch import nn

from .keys import layer_name

if TYPE_CHECKING:
    from .keys import MetricKey
    from .pictures import Picture
    from .rules import Alert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeInfo:
    """What a mitigation may know of a probe: a description, not the probe.

    Attributes:
        name: the probe's name (its keys' ``collapse/<name>/...``).
        kinds: the names of its class and of the probe classes it derives from, most derived
            first (``("LatentUsage", "CodebookUsage")``).
        module: the path or glob it was given; paths: the module paths it resolved to.
        per_module: a glob whose modules are kept apart: its keys carry the module path as
            their layer (:meth:`scope`).
        params: the attributes the probe class lists in ``Probe.described`` (``num_codes``).

    Example:
        >>> info = ProbeInfo("vq", ("CodebookUsage",), "vq", ("vq",), False, {"num_codes": 8})
        >>> info.is_a("CodebookUsage"), info.scope("vq"), info.params["num_codes"]
        (True, None, 8)
    """

    name: str
    kinds: tuple[str, ...]
    module: str
    paths: tuple[str, ...]
    per_module: bool
    params: Mapping[str, Any] = field(default_factory=dict)

    def is_a(self, kind: str) -> bool:
        """Whether the probe is a ``kind`` (its class or a base class of it, by name)."""
        return kind in self.kinds

    def scope(self, path: str) -> str | None:
        """The layer under which the probe keeps module ``path``'s statistics and keys (None:
        the probe's only part)."""
        return layer_name(path) if self.per_module else None


@dataclass(frozen=True)
class Setup:
    """What a probe or mitigation sees when the monitor attaches it.

    Attributes:
        model: the monitored model (module paths are its ``named_modules()`` names).
        probes: every probe of the monitor, described (:class:`ProbeInfo`), by name. Filled
            once the probes are attached: mitigations, attached after them, find theirs here.
        log_every_n_steps: the monitor's window length.
        process_group: the ``torch.distributed`` group the monitor reduces over (None: WORLD).
        strict: errors propagate instead of disabling the component.
        tensor_parallel: the model's tensor-parallel layout
            (:class:`~collapse_monitor._tensor_parallel.TensorParallel`), or None.
    """

    model: nn.Module
    probes: Mapping[str, ProbeInfo]
    log_every_n_steps: int
    process_group: Any = None
    strict: bool = False
    tensor_parallel: Any = None


@dataclass(frozen=True)
class Recording:
    """What the hooks of one probe (or mitigation) see inside ``monitor.observe()``.

    Attributes:
        step: the training step being recorded (``monitor.global_step``).
        logging: this step ends with a log (its ``monitor.step()`` computes metrics).
        snapshot: a validation snapshot, not a training step.
        inputs: the ``observe()`` keywords the owner declared (``targets=``, ``groups=``, ...).
    """

    step: int
    logging: bool
    snapshot: bool
    inputs: Mapping[str, Any] = field(default_factory=dict)


class Observation(contextlib.ContextDecorator):
    """What ``CollapseMonitor.observe()`` returns: a context manager (and decorator) that hands
    recordings to the probes due at this step on entry and takes them back on exit (a plain
    class rather than a generator: a step that records nothing costs a few attribute reads).

    Example:
        >>> import torch
        >>> from collapse_monitor import CollapseMonitor, probes
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> mon = CollapseMonitor(model, [probes.RepresentationRank("0", name="z")], 1)
        >>> with mon.observe() as m:
        ...     _ = model(torch.randn(8, 4))
        >>> m is mon, mon.step()["collapse/z/samples"]
        (True, 8.0)
        >>> mon.close()
    """

    __slots__ = ("_monitor", "_args")

    def __init__(self, monitor, *args) -> None:
        self._monitor, self._args = monitor, args

    def __enter__(self):
        return self._monitor._begin_observe(*self._args)

    def __exit__(self, *exc) -> None:
        self._monitor._end_observe()


@dataclass
class Readout:
    """A probe's result at a log, from its reduced window (identical on every rank).

    Attributes:
        metrics: ``{MetricKey: value}``; NaN where a value is undefined (the key is then not
            logged).
        histograms: ``{MetricKey: 1-D tensor}`` of distributions worth a plot (hits per code).
        pictures: ``{MetricKey: Picture}``, drawn only for probes the user opted in.
        masks: ``{MetricKey: bool tensor}`` of per-element decisions mitigations act on (dead
            codes ``(H, K)``, dormant units ``(H,)``). None of these may be views of the
            window's states (the window is reset in place after the log).
        incomplete: the window lacks samples it should hold (a resumed rank lost its part): its
            missing metrics say nothing of the run (the probe is not ``silent``).
    """

    metrics: dict[MetricKey, float] = field(default_factory=dict)
    histograms: dict[MetricKey, torch.Tensor] = field(default_factory=dict)
    pictures: dict[MetricKey, Picture] = field(default_factory=dict)
    masks: dict[MetricKey, torch.Tensor] = field(default_factory=dict)
    incomplete: bool = False


@dataclass(frozen=True)
class StepView:
    """What a mitigation sees after every training step (identical on every rank but for the
    step values, which are this rank's).

    Attributes:
        step: the step just taken.
        optimizers: every optimizer passed to ``monitor.step`` (may be empty).
        values: ``{probe name: {scope: {name: tensor}}}``, what each probe that recorded this
            step publishes of it (``Probe.step_values``: a codebook's hits of the step), on the
            device; valid during the call only.
    """

    step: int
    optimizers: tuple[torch.optim.Optimizer, ...]
    values: Mapping[str, Mapping[str | None, Mapping[str, torch.Tensor]]]


@dataclass(frozen=True)
class LogView:
    """What a mitigation sees after a log (read-only; identical on every rank).

    Attributes:
        step: the step just logged.
        metrics: the logged metrics, ``{MetricKey: value}``.
        alerts: the alerts that fired at this log.
        optimizers: every optimizer passed to ``monitor.step`` (may be empty).
        probes: every probe, described, by name.
        readouts: each enabled probe's :class:`Readout` of this log, by probe name.
    """

    step: int
    metrics: Mapping[MetricKey, float]
    alerts: tuple[Alert, ...]
    optimizers: tuple[torch.optim.Optimizer, ...]
    probes: Mapping[str, ProbeInfo]
    readouts: Mapping[str, Readout]

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The first optimizer (None without one)."""
        return self.optimizers[0] if self.optimizers else None


@dataclass(frozen=True)
class Replaced:
    """Elements of a probe that a mitigation replaced (codes): the probe forgets what it knew
    of them (a replaced code restarts its usage EMA).

    Attributes:
        probe: the probe's name; mask: ``(H, K)`` bool of what changed; scope: the module, for
            a probe that keeps the modules of a glob apart (else None).
    """

    probe: str
    mask: torch.Tensor
    scope: str | None = None


@dataclass(frozen=True)
class Event:
    """A change a mitigation made to the model, read back before it is reported.

    Attributes:
        name: the mitigation's name (``collapse/mitigations/<name>`` counts ``count``).
        info: JSON-able details for the sinks and the log.
        count: how many elements (codes, units, layers) changed.
        replaced: what a probe must forget (:class:`Replaced`), or None.

    Example:
        >>> Event("reset_dead_codes", {"codebook": "vq.embed"}, count=3).count
        3
    """

    name: str
    info: dict
    count: int = 1
    replaced: Replaced | None = None


class Component:
    """What the monitor owns and may disable: a name, a ``disabled`` flag and an error count.

    An error inside a component never reaches the training loop unless the monitor is
    ``strict``: it is logged once with the component's name, counted in ``collapse/errors`` and
    the component is disabled (its hooks idle). Under DDP a probe disabled on any rank is disabled
    on every rank at the next log, before any collective.
    """

    #: whether its readout (or action, for a mitigation) reads the model's parameters: the
    #: monitor then gathers FSDP (first generation) shards around it
    reads_parameters: bool = False

    def __init__(self, name: str) -> None:
        self.name = name
        self.disabled = False
        self.errors = 0
        self.strict = False  # the monitor's setting, given at attach
        self._recording: Recording | None = None
        # a plain bool for the hooks to test: torch.compile guards on its value (two variants)
        self._active = False
        self._profile_label = f"collapse_monitor.{name}"  # torch.profiler, per hook call
        self.meter = None  # its time, while an overhead budget measures (collapse_monitor.budget)

    def fail(self, exc: Exception) -> None:
        """Raise ``exc`` under ``strict``; else count it and disable this component."""
        if self.strict:
            raise exc
        self.errors += 1
        self._active = False
        if not self.disabled:
            self.disabled = True
            log.error(
                "collapse monitor: %r failed and is disabled (strict=False): %s: %s",
                self,
                type(exc).__name__,
                exc,
            )

    def run(self, fn, *args) -> Any:
        """``fn(*args)``; an exception goes to :meth:`fail` (the result is then None)."""
        try:
            return fn(*args)
        except Exception as exc:
            self.fail(exc)

    # the monitor hands a Recording at the start of every observed forward pass (kept in
    # ``_recording`` for the hooks), and takes it back after
    def begin_recording(self, recording: Recording) -> None:
        self._recording = recording
        self._active = not self.disabled

    def end_recording(self) -> None:
        self._recording = None
        self._active = False

    @torch.compiler.disable
    def guarded(self, fn, *args, in_backward: bool = False) -> Any:
        """Run ``fn(*args)`` from a hook; an exception goes to :meth:`fail`.

        Never traced by ``torch.compile``: the monitor's bookkeeping stays out of the user's
        graph (a graph break while recording, nothing otherwise). Runs without autograd and
        outside inference mode, so that statistics first made inside an ``inference_mode``
        forward are ordinary tensors a later training step can update. Skipped while the
        autograd engine runs a backward pass (a forward recomputed there by activation
        checkpointing is not a new sample), unless ``in_backward`` (gradient hooks)."""
        if not in_backward and torch._C._current_graph_task_id() != -1:
            return None
        # (a validation snapshot's forwards are not the training steps' cost)
        metered = self.meter is not None and not (self._recording and self._recording.snapshot)
        token = self.meter.start() if metered else None
        # set by hand, not by context managers: on a step after large kernels (cold caches)
        # no_grad, inference_mode and record_function cost 150 us per call between them (a
        # VQ-VAE's every-step probe: half its own work); a profiler label only under a profiler
        grad = torch.is_grad_enabled()
        outside = torch.inference_mode(False) if torch.is_inference_mode_enabled() else None
        label = (
            torch.profiler.record_function(self._profile_label)
            if torch._C._autograd._profiler_enabled()
            else None
        )
        try:
            with outside or contextlib.nullcontext(), label or contextlib.nullcontext():
                torch.set_grad_enabled(False)
                return fn(*args)
        except Exception as exc:
            self.fail(exc)
        finally:
            torch.set_grad_enabled(grad)
            if token is not None:
                self.meter.stop(token)
