"""Lightning integration: ``CollapseCallback`` runs a CollapseMonitor inside a ``Trainer``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from ..mitigations.base import Mitigation
from ..monitor import CollapseMonitor
from ..probes.base import Probe
from ..rules import Alert, Rule
from ..sinks import Sink
from .tensorboard import TensorBoardSink


class LightningLoggerSink(Sink):
    """Logs through every logger of a ``Trainer`` (TensorBoard, CSV, W&B, ...) at the trainer's
    ``global_step``; TensorBoard loggers also get alert text and the custom-scalars layout."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.trainer = trainer
        self._tensorboard: dict[int, TensorBoardSink] = {}

    def _tb_sinks(self) -> list[TensorBoardSink]:
        if not self.trainer.is_global_zero:
            return []
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and id(logger) not in self._tensorboard:
                self._tensorboard[id(logger)] = TensorBoardSink(logger.experiment)
        return list(self._tensorboard.values())

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=self.trainer.global_step)
        for tb in self._tb_sinks():
            tb._write_layout(metrics)

    def log_thresholds(self, thresholds: dict[str, list[float]], step: int) -> None:
        for tb in self._tb_sinks():
            tb.log_thresholds(thresholds, self.trainer.global_step)

    def log_histogram(self, tag: str, values, step: int) -> None:
        for tb in self._tb_sinks():
            tb.log_histogram(tag, values, self.trainer.global_step)

    def log_image(self, tag: str, image, step: int) -> None:
        for tb in self._tb_sinks():
            tb.log_image(tag, image, self.trainer.global_step)

    def log_alert(self, alert: Alert) -> None:
        for tb in self._tb_sinks():
            tb.log_alert(alert)

    def log_event(self, name: str, info: dict, step: int) -> None:
        for tb in self._tb_sinks():
            tb.log_event(name, info, self.trainer.global_step)

    def flush(self) -> None:
        for tb in self._tb_sinks():
            tb.flush()


def _optimizers_in(out: Any) -> list:
    """The optimizers in whatever ``configure_optimizers`` returned."""
    if isinstance(out, torch.optim.Optimizer):
        return [out]
    if isinstance(out, Mapping):
        return _optimizers_in(out.get("optimizer"))
    if isinstance(out, (list, tuple)):
        return [o for item in out for o in _optimizers_in(item)]
    return []


def default_targets(batch: Any) -> Any:
    """``batch[1]`` for tuples/lists, ``batch["labels"]`` or ``batch["targets"]`` for dicts."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in ("labels", "targets"):
            if key in batch:
                return batch[key]
    raise ValueError(
        f"CollapseCallback cannot find targets in a batch of type {type(batch).__name__}: "
        "pass targets=<index>, targets='<key>' or targets=callable(batch)"
    )


class CollapseCallback(L.Callback):
    """Run a :class:`~collapse_monitor.CollapseMonitor` inside a Lightning ``Trainer``.

    Metrics go through the trainer's own loggers at ``trainer.global_step``. Training batches
    are observed from ``on_train_batch_start`` to ``on_before_backward``; with
    ``validation=True`` every validation loop is a snapshot logged under ``val/collapse/...``.
    Monitor state is saved in checkpoints and restored on ``fit(ckpt_path=...)``. Under DDP the
    statistics are all-reduced before metrics are computed and a ``"stop"`` alert is reduced
    across ranks with ``strategy.reduce_boolean_decision``.

    Args:
        probes: probe instances; module paths are relative to the ``LightningModule``.
        targets: how to read labels from a batch: ``None`` (``batch[1]`` or
            ``batch["labels"|"targets"]``), an int index, a str key, or ``callable(batch)``.
        log_every_n_steps, rules, default_rules, mitigations, on_alert, observe_every_n_steps,
        pictures, strict: as in :class:`~collapse_monitor.CollapseMonitor`.
        validation: take validation snapshots.
        context: ``callable(batch) -> dict`` of extra ``observe()`` keywords, e.g.
            ``lambda batch: {"groups": batch["site"]}`` for ``GroupCollapse``.
    """

    def __init__(
        self,
        probes: list[Probe],
        targets: Union[Callable[[Any], Any], int, str, None] = None,
        log_every_n_steps: int = 50,
        rules: Optional[list[Rule]] = None,
        default_rules: bool = True,
        mitigations: Optional[list[Mitigation]] = None,
        on_alert: Optional[Callable[[Alert], None]] = None,
        observe_every_n_steps: Optional[int] = None,
        pictures: Union[bool, list[str]] = False,
        validation: bool = True,
        context: Optional[Callable[[Any], dict]] = None,
        strict: bool = False,
    ) -> None:
        self.probes = list(probes)
        self.context = context
        self.targets = targets
        self.kwargs = dict(
            log_every_n_steps=log_every_n_steps,
            rules=list(rules or []),
            default_rules=default_rules,
            mitigations=list(mitigations or []),
            on_alert=on_alert,
            observe_every_n_steps=observe_every_n_steps,
            pictures=pictures,
            strict=strict,
        )
        self.validation = validation
        self.monitor: CollapseMonitor | None = None
        self._pending_state: dict | None = None
        self._observing = None
        self._in_snapshot = False

    @property
    def state_key(self) -> str:
        return "CollapseCallback[" + ",".join(p.name for p in self.probes) + "]"

    # ----------------------------------------------------------------- lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.monitor is not None:
            return
        self.monitor = CollapseMonitor(
            pl_module, self.probes, sinks=[LightningLoggerSink(trainer)], **self.kwargs
        )
        if self._pending_state is not None:
            self.monitor.load_state_dict(self._pending_state)
            self._pending_state = None
        self._wrap_module(pl_module)

    def _wrap_module(self, pl_module: L.LightningModule) -> None:
        # Lightning loads the model's weights before any callback state: a mitigation that
        # changed the model's structure (σReparam) must be re-applied from the checkpoint first,
        # and the optimizers that configure_optimizers builds must get the same param groups.
        load, configure = pl_module.on_load_checkpoint, pl_module.configure_optimizers

        def on_load_checkpoint(checkpoint):
            state = checkpoint.get("callbacks", {}).get(self.state_key)
            if state and self.monitor is not None:
                self.monitor.restore_structure(state)
            return load(checkpoint)

        def configure_optimizers():
            out = configure()
            if self.monitor is not None:
                for opt in _optimizers_in(out):
                    self.monitor.adopt_optimizer(opt)
            return out

        pl_module.on_load_checkpoint = on_load_checkpoint
        pl_module.configure_optimizers = configure_optimizers
        self._unwrap = lambda: [
            pl_module.__dict__.pop(n, None) for n in ("on_load_checkpoint", "configure_optimizers")
        ]

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_observing()
        if self.monitor is not None:
            self._pending_state = self.monitor.state_dict(sync=False)
            self.monitor.close()
            self.monitor = None
            self._unwrap()

    def state_dict(self) -> dict:
        if self.monitor is not None:
            return self.monitor.state_dict()
        return self._pending_state or {}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        if self.monitor is not None:
            self.monitor.load_state_dict(state_dict)
        else:
            self._pending_state = state_dict

    # ----------------------------------------------------------------- observation
    def _targets(self, batch: Any) -> Any:
        if not any("targets" in p.keywords for p in self.probes):
            return None
        if callable(self.targets):
            return self.targets(batch)
        if self.targets is None:
            return default_targets(batch)
        return batch[self.targets]

    def _start_observing(self, batch: Any) -> None:
        self._stop_observing()
        extra = self.context(batch) if self.context is not None else {}
        self._observing = self.monitor.observe(targets=self._targets(batch), **extra)
        self._observing.__enter__()

    def _stop_observing(self) -> None:
        if self._observing is not None:
            cm, self._observing = self._observing, None
            cm.__exit__(None, None, None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start_observing(batch)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # the backward pass (and any activation-checkpointing recompute) is not observed
        self._stop_observing()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._stop_observing()
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if self.monitor.step(optimizer=optimizer) is not None:
            stop = trainer.strategy.reduce_boolean_decision(self.monitor.should_stop, all=False)
            if stop:
                trainer.should_stop = True

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.validation and not trainer.sanity_checking and self.monitor is not None:
            self.monitor.begin_snapshot("val")
            self._in_snapshot = True

    def on_validation_batch_start(
        self, trainer, pl_module, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if self._in_snapshot:
            self._start_observing(batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self._stop_observing()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._in_snapshot:
            self._in_snapshot = False
            self.monitor.end_snapshot()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._stop_observing()
