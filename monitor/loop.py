"""What every trainer callback does with a monitor, written once.

The Lightning and Hugging Face callbacks are thin adapters (a TRL one would be another): each
tells a
:class:`TrainerLoop` where the model is, which forwards to observe (with the batch or the
forward's keywords they see), when the trainer took an optimizer step, when an evaluation begins
and ends, and where checkpoints go. The loop builds the monitor from a validated
:class:`~collapse_monitor.config.MonitorConfig`, reads the labels, counts steps as the trainer
does (optimizer steps: every micro-batch of an accumulated step is observed, mitigations act
after the optimizer step), hands every optimizer to the mitigations, and saves and loads the
monitor's state (``weights_only=True``).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from .config import MonitorConfig
from .monitor import CollapseMonitor
from .sinks import Sink


class LoopAdapter:
    """What a trainer callback built on a :class:`TrainerLoop` shows: its loop's monitor and
    configuration (read-only)."""

    loop: TrainerLoop

    @property
    def monitor(self) -> CollapseMonitor | None:
        """The running monitor (None outside a run)."""
        return self.loop.monitor

    @property
    def probes(self) -> list:
        return self.loop.config.probes

    @property
    def targets(self) -> Targets:
        return self.loop.targets


#: how a callback finds the labels in what it sees (a batch, a forward's keywords): ``None``
#: (the trainer's convention), an index or key, or ``callable(source) -> labels``
Targets = Union[Callable[[Any], Any], int, str, None]


class TrainerLoop:
    """A :class:`~collapse_monitor.CollapseMonitor` run by a trainer callback.

    Args:
        config: what to watch (checked when it was made).
        targets: how to read the labels from a source (see :data:`Targets`).
        default_targets: ``default_targets(source)``, the trainer's convention for
            ``targets=None``.
        context: ``context(source) -> dict`` of further ``observe()`` keywords.

    Attributes:
        monitor: the monitor, once :meth:`build` made it (None before and after the run).
    """

    def __init__(
        self,
        config: MonitorConfig,
        targets: Targets = None,
        default_targets: Callable[[Any], Any] | None = None,
        context: Callable[[Any], dict] | None = None,
    ) -> None:
        if not (targets is None or callable(targets) or isinstance(targets, (int, str))):
            raise TypeError(
                "targets must be None, an index, a key or callable(batch) -> labels, got "
                f"{type(targets).__name__}"
            )
        if context is not None and not callable(context):
            raise TypeError(
                f"context must be callable(batch) -> dict, got {type(context).__name__}"
            )
        self.config = config
        self.targets = targets
        self.default_targets = default_targets
        self.context = context
        self.monitor: CollapseMonitor | None = None
        self._pending: dict | None = None  # state to load into the next monitor
        self._pending_for: Callable[[], nn.Module | None] | None = None  # of that model only
        self._observing = None

    # ----------------------------------------------------------------- life
    def build(
        self,
        model: nn.Module,
        sinks: Iterable[Sink],
        log_every_n_steps: int,
        process_group=None,
    ) -> CollapseMonitor:
        """The monitor of ``model`` (one already built on it with this cadence is kept; another
        is replaced, its state carried over), logging every ``log_every_n_steps`` unless the
        configuration says otherwise."""
        every = self.config.log_every_n_steps or log_every_n_steps
        mon = self.monitor
        if mon is not None and mon.model is model and mon.log_every_n_steps == every:
            return mon
        self.close(keep_state=mon is not None and mon.model is model)
        config = dataclasses.replace(self.config, log_every_n_steps=every)
        self.monitor = CollapseMonitor.from_config(model, config, sinks, process_group)
        # state kept at close is the closed model's: a callback reused on a new model (a seed
        # sweep) starts afresh (loaded, that state's step held the new run's monitor back)
        kept = self._pending_for is None or self._pending_for() is model
        if self._pending is not None and kept:
            self.monitor.load_state_dict(self._pending)
        self._pending = self._pending_for = None
        return self.monitor

    def close(self, keep_state: bool = True) -> None:
        """Close the monitor, keeping its state (this rank's, unreduced) for the next one on
        the same model (a Lightning ``validate()`` after ``fit()``)."""
        self.stop_observing()
        if self.monitor is not None:
            self._pending = self.monitor.state_dict(sync=False) if keep_state else None
            self._pending_for = weakref.ref(self.monitor.model) if keep_state else None
            self.monitor.close()
            self.monitor = None

    def start(self, trainer_step: int) -> None:
        """Training starts (or resumes) at the trainer's optimizer step ``trainer_step``: the
        monitor counts from there (a run resumed without monitor state, or a callback added
        later)."""
        self.monitor.global_step = max(self.monitor.global_step, trainer_step)

    # ----------------------------------------------------------------- steps
    def read_targets(self, source: Any) -> Any:
        """The labels in ``source`` (None when no probe reads them)."""
        if not self.config.reads_targets():
            return None
        if callable(self.targets):
            return self.targets(source)
        if self.targets is None:
            return None if self.default_targets is None else self.default_targets(source)
        if isinstance(source, Mapping):  # a forward without them (predict() on unlabelled data)
            return source.get(self.targets)
        return source[self.targets]

    def observe(self, source: Any, rollout: bool = False) -> None:
        """Record the forward passes from now until :meth:`stop_observing` (a batch's, or one
        forward's), with the labels and keywords ``source`` holds; ``rollout``: a generation
        forward, for the rollout probes only (no labels, no keywords)."""
        self.stop_observing()
        if rollout:
            self._observing = self.monitor.observe(rollout=True)
        else:
            extra = dict(self.context(source)) if self.context is not None else {}
            # targets given by the context (the loss's own labels) stand for the forward's
            targets = extra.pop("targets") if "targets" in extra else self.read_targets(source)
            self._observing = self.monitor.observe(targets=targets, **extra)
        self._observing.__enter__()

    def stop_observing(self) -> None:
        if self._observing is not None:
            cm, self._observing = self._observing, None
            cm.__exit__(None, None, None)

    def advance_to(self, trainer_step: int, optimizers: Sequence[torch.optim.Optimizer]) -> bool:
        """The trainer took optimizer steps up to ``trainer_step``: the monitor steps as many
        times, with every optimizer. Returns whether it logged."""
        self.stop_observing()
        logged = False
        while self.monitor.global_step < trainer_step:
            logged |= self.monitor.step(optimizer=list(optimizers)) is not None
        return logged

    # ----------------------------------------------------------------- evaluation
    def begin_evaluation(self, prefix: str, loader: int | None = None) -> None:
        self.monitor.begin_snapshot(prefix, loader)

    def end_evaluation(self, prefix: str | None = None) -> dict:
        """Read the evaluation out (and log it) under ``prefix`` (default: the one it began
        with); its metrics."""
        self.stop_observing()
        return self.monitor.end_snapshot(prefix)

    def discard_evaluation(self) -> None:
        self.stop_observing()
        self.monitor.end_snapshot(discard=True)

    @property
    def evaluating(self) -> bool:
        return self.monitor is not None and self.monitor.snapshot_prefix is not None

    # ----------------------------------------------------------------- state
    def state_dict(self, gather: bool = False) -> dict:
        """The monitor's state (a collective under ``torch.distributed``: every rank calls it;
        ``gather``: see :meth:`CollapseMonitor.state_dict`), or the state kept for the next
        monitor."""
        if self.monitor is not None:
            return self.monitor.state_dict(gather=gather)
        return self._pending or {}

    def load_state_dict(self, state: dict) -> None:
        """Load ``state`` now, or into the next monitor :meth:`build` makes."""
        if not state:
            return
        if self.monitor is not None:
            self.monitor.load_state_dict(state)
        else:
            self._pending, self._pending_for = state, None  # (a checkpoint's: any model)

    @staticmethod
    def write(state: dict, path: str) -> None:
        """A :meth:`state_dict` to ``path`` (its folder made)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        torch.save(state, path)

    @staticmethod
    def read(path: str) -> dict:
        """A state written by :meth:`write`, loaded with ``weights_only=True`` (a file that
        needs more than tensors and plain values is refused, never run)."""
        return torch.load(path, map_location="cpu", weights_only=True)
