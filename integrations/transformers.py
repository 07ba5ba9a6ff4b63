"""Hugging Face integration: ``CollapseTrainerCallback`` runs a CollapseMonitor inside a
``transformers.Trainer``."""

from __future__ import annotations

import glob
import logging
import os
import sys
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..config import MonitorConfig
from ..distributed import refuse_deepspeed
from ..loop import LoopAdapter, TrainerLoop
from ..probes.base import Probe
from ..reading import kv_cache
from ..rules import Alert
from ..sinks import Sink, optional_import
from ..state import VERSION
from .tensorboard import TensorBoardSink

TrainerCallback = optional_import(
    "transformers", "CollapseTrainerCallback", "transformers"
).TrainerCallback

log = logging.getLogger(__name__)

_STATE_FILE = "collapse_monitor.pt"


def _state_file(rank: int | str) -> str:
    """The monitor's file in a checkpoint folder: rank 0's, or another rank's own (written
    only when the monitor holds rank-local state)."""
    return _STATE_FILE if rank == 0 else f"collapse_monitor.rank{rank}.pt"


_REPORTED = ("tensorboard", "wandb", "mlflow")  # report_to integrations with a sink here


def report_to_sink(name: str, output_dir: str) -> Sink | None:
    """The sink writing where a ``Trainer`` with ``report_to=[name]`` logs, or ``None`` while
    that integration's run does not exist yet: TensorBoard (the directory
    ``TENSORBOARD_LOGGING_DIR``, else ``<output_dir>/runs/collapse_monitor``, beside the
    Trainer's runs), the active W&B run (step ``train/global_step``, as the Trainer's
    ``WandbCallback``) and the active MLflow run, which the Trainer's callbacks start at
    ``train()``.

    Raises:
        ValueError: an integration without a sink here (pass ``report_to=`` and ``sinks=``).
    """
    if name == "tensorboard":
        log_dir = os.getenv("TENSORBOARD_LOGGING_DIR") or os.path.join(
            output_dir, "runs", "collapse_monitor"
        )
        return TensorBoardSink(os.path.expanduser(log_dir))
    if name == "wandb":
        from .wandb import WandbSink

        wandb = optional_import("wandb", "WandbSink", "wandb")
        return None if wandb.run is None else WandbSink(wandb.run, step_key="train/global_step")
    if name == "mlflow":
        from .mlflow import MLflowSink

        run = optional_import("mlflow", "MLflowSink", "mlflow").active_run()
        return None if run is None else MLflowSink(run_id=run.info.run_id)
    raise ValueError(
        f"CollapseTrainerCallback has no sink for report_to={name!r} (it has tensorboard, "
        "wandb and mlflow); pass report_to=[...] with those and sinks=[...] for the others"
    )


class LogHistorySink(Sink):
    """Appends metrics to ``trainer.state.log_history`` (every rank, as the Trainer does)."""

    main_process_only = False

    def __init__(self, callback: CollapseTrainerCallback) -> None:
        self.callback = callback

    @property
    def name(self) -> str:
        return "log_history"

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.callback.state.log_history.append({**metrics, "step": step})


class ReportToSink(Sink):
    """The sink of one ``report_to`` integration (:func:`report_to_sink`), made once its run
    exists (W&B's and MLflow's start at ``train()``); until then calls are dropped. Rank 0."""

    def __init__(self, integration: str, callback: CollapseTrainerCallback) -> None:
        self.integration, self.callback = integration, callback
        self.sink: Sink | None = None

    @property
    def name(self) -> str:
        return f"report_to_{self.integration}"

    def _do(self, method: str, *args) -> None:
        if self.sink is None:
            self.sink = report_to_sink(self.integration, self.callback.args.output_dir)
        if self.sink is not None:
            getattr(self.sink, method)(*args)

    def log_metrics(self, metrics, step) -> None:
        self._do("log_metrics", metrics, step)

    def log_histogram(self, tag, values, step) -> None:
        self._do("log_histogram", tag, values, step)

    def log_thresholds(self, thresholds, step) -> None:
        self._do("log_thresholds", thresholds, step)

    def log_image(self, tag, image, step) -> None:
        self._do("log_image", tag, image, step)

    def log_alert(self, alert: Alert) -> None:
        self._do("log_alert", alert)

    def log_event(self, name, info, step) -> None:
        self._do("log_event", name, info, step)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()


def _in_trainer_evaluation() -> bool:
    """Whether a ``transformers.Trainer``'s evaluation or prediction loop is on the call stack
    (``evaluate()``, ``predict()``; its subclasses', TRL's, included)."""
    trainer = sys.modules["transformers"].Trainer
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name in _EVALUATION_LOOPS and isinstance(
            frame.f_locals.get("self"), trainer
        ):
            return True
        frame = frame.f_back
    return False


_EVALUATION_LOOPS = ("evaluation_loop", "prediction_loop", "prediction_step")


class CollapseTrainerCallback(LoopAdapter, TrainerCallback):
    """Run a :class:`~collapse_monitor.CollapseMonitor` inside a ``transformers.Trainer``.

    The callback hooks the model's own forward: a training forward (``model.training``) is
    observed with ``targets`` read from the forward's keyword arguments (``labels``, or the
    Trainer's ``label_names``), so nothing needs subclassing; the backward pass (and any
    gradient-checkpointing recompute) is not observed. A training-mode forward without
    gradients is no training forward: one with a key-value cache (``generate()``, TRL's
    rollouts) reaches only the probes made with ``rollout=True``, one without (TRL's old or
    reference log-probabilities) no probe. Steps are the Trainer's optimizer steps
    (``state.global_step``): with gradient accumulation every micro-batch of a recorded step is
    observed, and mitigations act only after an optimizer step. The monitor logs every
    ``logging_steps`` steps (the Trainer's) unless ``log_every_n_steps`` is given.

    Evaluation (``trainer.evaluate``/``predict``) is a snapshot, logged under
    ``<metric_key_prefix>/collapse/...`` (``eval/collapse/...``) and added to the metrics that
    ``evaluate()`` returns. Metrics go to ``trainer.state.log_history``, to the integrations of
    ``report_to`` (see :func:`report_to_sink`) and to ``sinks``, each an outlet of its own (one
    that fails is counted in ``collapse/outlet_errors/<name>`` and the others go on). A ``"stop"`` alert sets
    ``control.should_training_stop`` on every rank. The monitor's state is saved beside each
    checkpoint (``checkpoint-<step>/collapse_monitor.pt``; with rank-local state, class-sharded
    ``NeuralCollapse``, also ``collapse_monitor.rank<r>.pt`` from every other rank) and restored
    when training resumes from a checkpoint in ``output_dir`` (loaded with
    ``weights_only=True``: a file that needs more than tensors and plain values is refused; at
    another world size every rank's file is read and the class shards are split again).

    Args:
        probes: probe instances; module paths are relative to the model the Trainer trains.
        targets: the forward keyword holding the labels (default the Trainer's
            ``label_names[0]``, i.e. ``"labels"``), or ``callable(kwargs) -> targets``.
        log_every_n_steps: logging cadence in optimizer steps (default ``logging_steps``).
        report_to: override the Trainer's ``report_to`` for collapse metrics (``[]``: none).
        sinks: further sinks.
        context: ``callable(kwargs) -> dict`` of extra ``observe()`` keywords.
        evaluation: take evaluation snapshots.
        **monitor: the monitor's other arguments, as in :class:`~collapse_monitor.CollapseMonitor`
            (``rules``, ``default_rules``, ``mitigations``, ``on_alert``,
            ``observe_every_n_steps``, ``pictures``, ``strict``).

    Raises:
        TypeError, ValueError: an argument the monitor refuses (at construction).
        KeyError: a probe's module path does not exist in the model (at ``Trainer(...)``).

    Example::

        trainer = Trainer(model, args, train_dataset=ds, callbacks=[
            CollapseTrainerCallback([NeuralCollapse("lm_head", num_classes=50257)])
        ])
    """

    def __init__(
        self,
        probes: list[Probe],
        targets: Union[str, Callable[[dict], Any], None] = None,
        log_every_n_steps: Optional[int] = None,
        report_to: Optional[list[str]] = None,
        sinks: Optional[list[Sink]] = None,
        context: Optional[Callable[[dict], dict]] = None,
        evaluation: bool = True,
        **monitor,
    ) -> None:
        config = MonitorConfig(probes, log_every_n_steps, **monitor)
        self._user_context = context
        self._loss_inputs: dict = {}  # see observe_loss_inputs
        self.loop = TrainerLoop(config, targets, self._default_targets, self._context)
        self.report_to = report_to
        self.sinks = list(sinks or [])
        self.evaluation = evaluation
        self.args = self.state = None
        self._handles: list = []
        self._training = False  # between on_train_begin and on_train_end
        self._rollouts = any(p.rollout for p in config.probes)  # generation forwards observed

    def observe_loss_inputs(self, trainer, **keywords: str) -> None:
        """Pass entries of the inputs ``trainer.compute_loss`` receives to the forwards it makes,
        as ``observe()`` keywords: ``cb.observe_loss_inputs(trainer, advantages="advantages")``
        gives ``TokenEntropy`` and ``GenerationDiversity`` the per-sequence advantages of TRL's
        ``GRPOTrainer`` (which reach its loss step but not the model's forward).

        ``targets="labels"``: the loss's labels stand for the forwards' own (TRL's
        ``SFTTrainer`` with ``label_smoothing_factor`` or ``compute_loss_func`` runs its
        gradient forward without labels: the prompt tokens would count).

        It wraps the trainer's ``compute_loss`` on this instance (TRL offers no callback that
        sees a step's inputs; a subclass would be more to ask): entries absent from a step's
        inputs are not passed.

        Raises:
            TypeError: a keyword value that is not the name of an input.
        """
        for key, name in keywords.items():
            if not isinstance(name, str):
                raise TypeError(f"{key}= must name an entry of the inputs, got {name!r}")
        original = trainer.compute_loss

        def compute_loss(model, inputs, *args, **kwargs):
            before = self._loss_inputs  # (a second call's wrapper adds to the first's)
            found = {k: inputs[n] for k, n in keywords.items() if n in inputs}
            self._loss_inputs = {**before, **found}
            try:
                return original(model, inputs, *args, **kwargs)
            finally:
                self._loss_inputs = before

        trainer.compute_loss = compute_loss

    def _context(self, kwargs: dict) -> dict:
        extra = self._user_context(kwargs) if self._user_context is not None else {}
        return {**extra, **self._loss_inputs}

    # ----------------------------------------------------------------- lifecycle
    def _attach(self, args, model: nn.Module, log_every: int) -> None:
        previous = self.monitor
        report_to = self.report_to if self.report_to is not None else args.report_to
        report_to = [report_to] if isinstance(report_to, str) else list(report_to or [])
        unknown = [n for n in report_to if n not in _REPORTED]
        if unknown and previous is None:
            log.warning(
                "collapse monitor: no sink for report_to=%s; collapse metrics reach them only "
                "through trainer.state.log_history (pass sinks=[...] for more)",
                unknown,
            )
        sinks = [LogHistorySink(self)]
        sinks += [ReportToSink(n, self) for n in report_to if n in _REPORTED]
        monitor = self.loop.build(model, sinks + self.sinks, log_every)
        if monitor is not previous:
            for h in self._handles:
                h.remove()
            self._handles = [
                # first: the monitor's own pre-hooks (the model's inputs: its attention_mask,
                # logits_to_keep) read only forwards this one decided to observe
                model.register_forward_pre_hook(self._pre_forward, with_kwargs=True, prepend=True),
                model.register_forward_hook(self._post_forward, always_call=True),
            ]

    def close(self) -> None:
        """Remove the hooks and close the monitor (``Trainer`` does not call this)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.loop.close()

    def on_init_end(self, args, state, control, model=None, **kwargs):
        # attached at Trainer(...) so that evaluate() before train() is observed too and a
        # wrong module path fails at once; with model_init the model comes at train()
        self.args, self.state = args, state
        deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
        if args.deepspeed or deepspeed:  # (probes work at every ZeRO stage)
            refuse_deepspeed(self.loop.config.mitigations)
        if model is not None:
            # a logging_steps ratio (< 1) is resolved at train(); until then, 50
            self._attach(args, model, int(args.logging_steps) if args.logging_steps >= 1 else 50)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.args, self.state = args, state
        if self.monitor is not None and state.global_step < self.monitor.global_step:
            # train() again from an earlier step (a new run on this model): fresh windows and
            # counts (kept, the monitor stayed ahead of the Trainer and never logged again)
            self.loop.close(keep_state=False)
        self._attach(args, model, max(1, state.logging_steps))
        self._training = True
        # the sampler ends sequences at the tokenizer's end token too (TRL adds it to its own
        # generation config, not the model's)
        eos = getattr(kwargs.get("processing_class"), "eos_token_id", None)
        for probe in self.probes if isinstance(eos, int) else ():
            if probe.rollout and getattr(probe, "end_ids", 0) is None:  # (TokenEntropy's)
                probe.also_ends([eos])
        if state.global_step > self.monitor.global_step:
            self._resume(args, state)

    def _resume(self, args, state) -> None:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        path = os.path.join(folder, _state_file(args.process_index))
        if not os.path.exists(path):  # a run without rank-local state: rank 0's file
            path = os.path.join(folder, _STATE_FILE)
        saved = self._saved_ranks(folder)
        if saved > 1 and saved != args.world_size:  # every rank's file: re-sharded on load
            parts = [self.loop.read(os.path.join(folder, _state_file(r))) for r in range(saved)]
            self.loop.load_state_dict({"version": VERSION, "ranks": parts})
        elif os.path.exists(path):
            self.loop.load_state_dict(self.loop.read(path))
        else:
            log.warning(
                "collapse monitor: training resumes at step %d but %s does not exist; the "
                "monitor starts from empty windows",
                state.global_step,
                path,
            )
        self.loop.start(state.global_step)  # the monitor counts the Trainer's optimizer steps

    @staticmethod
    def _saved_ranks(folder: str) -> int:
        """The ranks of the run that wrote the files of rank-local state in ``folder`` (rank
        0's and ``collapse_monitor.rank<r>.pt``; 1 without them)."""
        ranks = glob.glob(os.path.join(glob.escape(folder), _state_file("*")))
        return len(ranks) + 1 if ranks and os.path.exists(os.path.join(folder, _STATE_FILE)) else 1

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if state.is_world_process_zero:  # other ranks' files of an earlier run would be
            # loaded on resume: removed before the collective, so before this save's are written
            for old in glob.glob(os.path.join(glob.escape(folder), _state_file("*"))):
                os.remove(old)
        saved = self.loop.state_dict()  # a collective: every rank takes part
        # with class shards every rank holds its own classes: each saves its file
        if state.is_world_process_zero or self.monitor.rank_local_state:
            self.loop.write(saved, os.path.join(folder, _state_file(args.process_index)))

    def on_train_end(self, args, state, control, **kwargs):
        self.loop.stop_observing()
        self._training = False
        if self.monitor is not None:
            self.monitor.outlets.each_sink("flush")
            # (the Trainer never closes its callbacks)
            self.monitor.notices.unlogged(self.monitor.global_step, self.monitor.log_every_n_steps)

    # ----------------------------------------------------------------- observation
    def _default_targets(self, kwargs: dict) -> Any:
        names = list(self.args.label_names or ["labels"])
        return kwargs.get(names[0])

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.loop.stop_observing()
        if module.training:
            if not self._training:
                return
            if not torch.is_grad_enabled():
                # a training-mode forward without gradients is no training forward: generate()
                # (TRL's rollouts, known by their key-value cache) is for the rollout probes
                # alone; a scoring pass (old or reference log-probabilities) for none: mixed in,
                # either would blur the trained policy's statistics
                if self._rollouts and kv_cache(kwargs) is not None:
                    self.loop.observe(kwargs, rollout=True)
                return
            if self.loop.evaluating:
                # eval-mode forwards outside evaluate()/predict() (e.g. generate() in a
                # callback) are not an evaluation: dropped, not logged
                self.loop.discard_evaluation()
        elif not self.evaluation or not _in_trainer_evaluation():
            # an eval-mode forward of the user's own (a notebook after train(): the hooks stay
            # until close()) is no evaluation: it went into the next evaluate()'s snapshot
            return
        elif not self.loop.evaluating:
            self.loop.begin_evaluation("eval")
        self.loop.observe(kwargs)

    def _post_forward(self, module, args, output) -> None:
        self.loop.stop_observing()

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        self.loop.advance_to(state.global_step, [] if optimizer is None else [optimizer])
        # rules see the all-reduced metrics: every rank takes the same decision
        if self.monitor.should_stop:
            control.should_training_stop = True
        return control

    def _end_snapshot(self, metrics: dict | None) -> None:
        self.loop.stop_observing()
        if not self.loop.evaluating:
            return
        # the Trainer names evaluation metrics <metric_key_prefix>_runtime, _loss, ...
        prefixes = [k[: -len("_runtime")] for k in (metrics or {}) if k.endswith("_runtime")]
        result = self.loop.end_evaluation(prefixes[0] if prefixes else None)
        if metrics is not None:
            metrics.update(result)  # evaluate() returns them too

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._end_snapshot(metrics)

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        self._end_snapshot(metrics)
