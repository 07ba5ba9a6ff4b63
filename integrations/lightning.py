"""Lightning integration: ``CollapseCallback`` runs a CollapseMonitor inside a ``Trainer``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import torch

from ..config import MonitorConfig
from ..distributed import is_fsdp_wrapped
from ..loop import LoopAdapter, Targets, TrainerLoop
from ..mitigations.base import Mitigation
from ..probes.base import Probe
from ..rules import Alert, Rule
from ..sinks import Sink, optional_import, threshold_scalars
from .tensorboard import TensorBoardSink

L = optional_import("lightning", "CollapseCallback", "lightning")
from lightning.pytorch.loggers import (  # noqa: E402
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from lightning.pytorch.strategies import DeepSpeedStrategy  # noqa: E402

LIGHTNING_DEEPSPEED = (
    "CollapseCallback: Lightning's DeepSpeedStrategy is not supported: it runs on CUDA only and "
    "has not been tried with the monitor (the probes work under DeepSpeed in a plain loop and "
    "under the Hugging Face Trainer, at every ZeRO stage); use DDP, FSDP or "
    "ModelParallelStrategy (FSDP2)"
)


class CallbackMetricsSink(Sink):
    """Puts every logged metric into ``trainer.callback_metrics`` (as a 0-d tensor), where
    Lightning's ``EarlyStopping`` and ``ModelCheckpoint`` read what they ``monitor``
    (``"val/collapse/head/nc1"``). On every rank: the metrics are all-reduced, the same
    everywhere, so each rank's callbacks decide alike."""

    main_process_only = False

    def __init__(self, trainer: L.Trainer) -> None:
        self.trainer = trainer

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.trainer.callback_metrics.update(
            {str(k): torch.tensor(float(v)) for k, v in metrics.items()}
        )


class LightningLoggerSink(Sink):
    """Logs through one logger of a ``Trainer`` at the monitor's step (the batches that
    stepped the optimizers; Lightning's own ``self.log`` values of that batch lie one lower, its
    loggers counting from 0), in the form it accepts: metrics with ``logger.log_metrics``;
    alerts, mitigation events, histograms, pictures and threshold lines to TensorBoard (text,
    histograms, images, custom-scalars layout), W&B (tables, ``wandb.Histogram``,
    ``wandb.Image``) and MLflow (text and JSON artifacts, ``log_image``; per-head keys as
    ``.../metric.head_0``, which its file store can hold beside ``.../metric``); thresholds
    as scalars to the others (CSV), whose alerts and events go to Python ``logging`` (as for
    every logger). One sink per logger: each is an outlet of its own, so a logger that fails
    never silences the others. Lightning's loggers write from rank 0 themselves, so this sink
    runs on every rank.

    Args:
        trainer: the trainer (whether this is rank 0).
        logger: one of its loggers.
    """

    main_process_only = False

    def __init__(self, trainer: L.Trainer, logger: Logger) -> None:
        self.trainer, self.logger = trainer, logger
        self._extra: Sink | None = None
        self._made = False

    @property
    def name(self) -> str:
        return type(self.logger).__name__

    @property
    def extra(self) -> Sink | None:
        """The sink that writes what ``log_metrics`` cannot (rank 0 only)."""
        if not self._made and self.trainer.is_global_zero:
            self._made, logger = True, self.logger
            if isinstance(logger, TensorBoardLogger):
                self._extra = TensorBoardSink(logger.experiment)
            elif isinstance(logger, WandbLogger):
                from .wandb import WandbSink

                self._extra = WandbSink(run=logger.experiment, step_key="trainer/global_step")
            elif isinstance(logger, MLFlowLogger):
                from .mlflow import MLflowSink

                self._extra = MLflowSink(run_id=logger.run_id, client=logger.experiment)
        return self._extra

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if isinstance(self.logger, MLFlowLogger):
            from .mlflow import metric_name

            metrics = {metric_name(k): v for k, v in metrics.items()}
        self.logger.log_metrics(metrics, step=step)
        if isinstance(self.extra, TensorBoardSink):
            self.extra.write_layout(metrics)

    def log_thresholds(self, thresholds: dict[str, list[float]], step: int) -> None:
        if self.extra is not None:
            self.extra.log_thresholds(thresholds, step)
        elif thresholds and self.trainer.is_global_zero:
            self.logger.log_metrics(threshold_scalars(thresholds), step=step)

    def _extra_do(self, method: str, *args) -> None:
        if self.extra is not None:
            getattr(self.extra, method)(*args)

    def log_histogram(self, tag: str, values, step: int) -> None:
        self._extra_do("log_histogram", tag, values, step)

    def log_image(self, tag: str, image, step: int) -> None:
        self._extra_do("log_image", tag, image, step)

    def log_alert(self, alert: Alert) -> None:
        self._extra_do("log_alert", alert)

    def log_event(self, name: str, info: dict, step: int) -> None:
        self._extra_do("log_event", name, info, step)

    def flush(self) -> None:
        self._extra_do("flush")


def _stepped(trainer: L.Trainer) -> int:
    """The batches that stepped the optimizers, this one included if it did (read at its
    end, before Lightning counts it): ``trainer.global_step`` counts every optimizer's steps,
    two per batch for a GAN's manual optimization."""
    loop = trainer.fit_loop.epoch_loop
    return loop._batches_that_stepped + (not loop._should_accumulate())


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


class CollapseCallback(LoopAdapter, L.Callback):
    """Run a :class:`~collapse_monitor.CollapseMonitor` inside a Lightning ``Trainer``.

    Metrics go through the trainer's own loggers at the monitor's step, each in the form it
    accepts and each an outlet of its own (see :class:`LightningLoggerSink`), and into
    ``trainer.callback_metrics``, where ``EarlyStopping(monitor="val/collapse/head/nc1")`` and
    ``ModelCheckpoint`` find them (:class:`CallbackMetricsSink`). Steps are batches that stepped
    the optimizers (``trainer.global_step`` counts each optimizer's steps: two per batch in a
    GAN's manual optimization, one monitor step), as Lightning's loggers count them: with
    ``accumulate_grad_batches=k`` the monitor records all k micro-batches of a recorded step,
    logs every ``log_every_n_steps`` optimizer steps and acts (mitigations) only after an
    optimizer step, with every optimizer of the trainer (a GAN's two). Training batches are
    observed from ``on_train_batch_start`` to ``on_before_backward``; with ``validation=True``
    every validation loop is a snapshot logged under ``val/collapse/...``, one per dataloader
    (``.../dataloader_idx_<i>``) when there are several. A model passed to ``fit`` as
    ``torch.compile(model, fullgraph=True)`` is refused at setup with a clear error; DeepSpeed
    is refused too. Under ``strategy="fsdp"`` parameters are gathered through the FSDP wrapper
    (:meth:`~collapse_monitor.CollapseMonitor.sharded_by`). Monitor state is saved in
    checkpoints and restored on ``fit(ckpt_path=...)`` (with class shards every rank's classes
    are gathered into the state Lightning saves from rank 0). Under DDP the statistics are
    all-reduced before metrics are computed and a ``"stop"`` alert is reduced across ranks
    with ``strategy.reduce_boolean_decision``.

    Args:
        probes: probe instances; module paths are relative to the ``LightningModule``.
        targets: how to read labels from a batch: ``None`` (``batch[1]`` or
            ``batch["labels"|"targets"]``), an int index, a str key, or ``callable(batch)``.
        log_every_n_steps: the window in optimizer steps; default the trainer's own
            ``log_every_n_steps`` (50 unless set).
        rules, default_rules, mitigations, on_alert, observe_every_n_steps, pictures, strict,
        pictures_every_n_logs, overhead_budget: as in :class:`~collapse_monitor.CollapseMonitor`.
        validation: take validation snapshots.
        context: ``callable(batch) -> dict`` of extra ``observe()`` keywords, e.g.
            ``lambda batch: {"groups": batch["site"]}`` for ``GroupCollapse``.

    Raises:
        TypeError, ValueError: an argument the monitor refuses (at construction; the message
            lists the valid choices).
    """

    def __init__(
        self,
        probes: list[Probe],
        targets: Targets = None,
        log_every_n_steps: Optional[int] = None,
        rules: Optional[list[Rule]] = None,
        default_rules: bool = True,
        mitigations: Optional[list[Mitigation]] = None,
        on_alert: Optional[Callable[[Alert], None]] = None,
        observe_every_n_steps: Optional[int] = None,
        pictures: Union[bool, list[str]] = False,
        validation: bool = True,
        context: Optional[Callable[[Any], dict]] = None,
        strict: bool = False,
        pictures_every_n_logs: int = 1,
        overhead_budget: Optional[float] = None,
    ) -> None:
        config = MonitorConfig(
            probes, log_every_n_steps, mitigations, rules, default_rules, on_alert,
            observe_every_n_steps, pictures, strict, pictures_every_n_logs, overhead_budget,
        )  # fmt: skip
        self.loop = TrainerLoop(config, targets, default_targets, context)
        self.validation = validation
        self._in_snapshot = False
        self._loader: int | None = None  # the validation dataloader of the open snapshot
        self._loaders = self._done = 0  # validation dataloaders in this loop; snapshots taken

    @property
    def state_key(self) -> str:
        return "CollapseCallback[" + ",".join(p.name for p in self.loop.config.probes) + "]"

    # ----------------------------------------------------------------- lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.monitor is not None:
            return
        if isinstance(trainer.strategy, DeepSpeedStrategy):
            raise ValueError(LIGHTNING_DEEPSPEED)
        ctx = getattr(pl_module, "_compiler_ctx", None)  # Lightning's record of torch.compile
        if ctx and getattr(ctx.get("dynamo_ctx"), "fullgraph", False):
            raise ValueError(
                "CollapseCallback: the model is compiled with torch.compile(fullgraph=True), "
                "which refuses the graph break the monitor's hooks need at each probed module "
                "while they record; compile with fullgraph=False (the default): the graph then "
                "breaks only on the steps the monitor records"
            )
        sinks = [CallbackMetricsSink(trainer)]
        sinks += [LightningLoggerSink(trainer, logger) for logger in trainer.loggers]
        self.loop.build(pl_module, sinks, trainer.log_every_n_steps)
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
        if self.monitor is not None:
            self.loop.close()
            self._unwrap()

    def state_dict(self) -> dict:
        # Lightning writes rank 0's callback state only: class shards of every rank go into it
        return self.loop.state_dict(gather=True)

    def load_state_dict(self, state_dict: dict) -> None:
        self.loop.load_state_dict(state_dict)

    # ----------------------------------------------------------------- training
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.loop.observe(batch)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        # the backward pass (and any activation-checkpointing recompute) is not observed
        self.loop.stop_observing()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._find_wrapper(trainer, pl_module)

    def _find_wrapper(self, trainer, pl_module) -> None:
        # strategy="fsdp" wraps the module after setup(): parameters are gathered through it
        holder = trainer.strategy.model
        if self.monitor is not None and holder is not pl_module and is_fsdp_wrapped(holder):
            self.monitor.sharded_by(holder)

    def on_train_start(self, trainer, pl_module) -> None:
        self.loop.start(trainer.fit_loop.epoch_loop._batches_that_stepped)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # one monitor step per optimizer step: with accumulate_grad_batches=k, the k
        # micro-batches of a step are all observed (or none) and nothing acts between them
        if self.loop.advance_to(_stepped(trainer), trainer.optimizers):
            stop = trainer.strategy.reduce_boolean_decision(self.monitor.should_stop, all=False)
            if stop:
                trainer.should_stop = True

    # ----------------------------------------------------------------- validation
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._find_wrapper(trainer, pl_module)  # also for a standalone validate()
        self._in_snapshot = (
            self.validation and not trainer.sanity_checking and self.monitor is not None
        )
        self._loader, self._done, self._loaders = None, 0, len(trainer.num_val_batches)

    def on_validation_batch_start(
        self, trainer, pl_module, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if not self._in_snapshot:
            return
        if self._loader != dataloader_idx:
            self._snapshots_until(dataloader_idx)
            self._begin_snapshot(dataloader_idx)
        self.loop.observe(batch)

    def on_validation_batch_end(
        self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.loop.stop_observing()

    def _begin_snapshot(self, loader: int) -> None:
        # keyed ``.../dataloader_idx_<i>`` when there are several (Lightning's convention)
        self.loop.begin_evaluation("val", loader=loader if self._loaders > 1 else None)
        self._loader = loader

    def _snapshots_until(self, loader: int) -> None:
        """End the open snapshot, then take the (empty) snapshots of the loaders before
        ``loader`` that this rank got no batch from: every rank ends one snapshot per loader,
        in loader order, so that their collectives match."""
        if self._loader is not None:
            self.loop.end_evaluation()
            self._done, self._loader = self._loader + 1, None
        for skipped in range(self._done, loader):
            self._begin_snapshot(skipped)
            self.loop.end_evaluation()
            self._loader = None
        self._done = max(self._done, loader)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._in_snapshot:
            self._in_snapshot = False
            self._snapshots_until(self._loaders)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.loop.stop_observing()
