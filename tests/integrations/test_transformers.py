"""The Hugging Face ``Trainer`` with ``CollapseTrainerCallback``: targets read from the model's
inputs, optimizer steps with gradient accumulation, evaluation snapshots, report_to sinks,
stop alerts and resume; tiny GPT-2 and BERT models built from configs."""

from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from collapse_monitor import CollapseMonitor, Rule, mitigations, probes  # noqa: E402
from collapse_monitor import functional as F  # noqa: E402
from collapse_monitor.integrations.transformers import CollapseTrainerCallback  # noqa: E402
from tests.integrations.test_tensorboard import read_events  # noqa: E402
from tests.probes.test_neural_collapse_probe import KEYS  # noqa: E402
from tests.reference import assert_metrics_close  # noqa: E402

V, T = 24, 12  # vocabulary, sequence length


class Tokens(Dataset):
    """Random sequences of random lengths, right-padded (``attention_mask`` 0, labels -100)."""

    def __init__(self, n, seed=0, num_labels=None):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, V, (n, T), generator=g)
        lengths = torch.randint(4, T + 1, (n,), generator=g)
        self.mask = (torch.arange(T) < lengths[:, None]).long()
        self.labels = (
            self.ids.masked_fill(self.mask == 0, -100)
            if num_labels is None
            else torch.randint(0, num_labels, (n,), generator=g)
        )

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def gpt2(dropout=0.1):
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=V,
        n_positions=T,
        n_embd=16,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return GPT2LMHeadModel(config)


def bert(num_labels=3):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=V,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=T,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def arguments(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        gradient_accumulation_steps=2,
        logging_steps=2,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**defaults, **kw})


class Capture:
    """An independent record of what the head saw: its input in training forwards and the
    labels of the forward, per optimizer step."""

    def __init__(self, model, head):
        self.rows: list = []  # (optimizer step, head input, labels)
        self.step = 0
        self.labels = None
        model.register_forward_pre_hook(self._labels, with_kwargs=True)
        head.register_forward_hook(self._head)

    def _labels(self, module, args, kwargs):
        self.labels = kwargs.get("labels")

    def _head(self, module, args, output):
        if module.training:
            self.rows.append((self.step, args[0].detach().clone(), self.labels.clone()))


class CountSteps(TrainerCallback):
    def __init__(self, capture):
        self.capture = capture

    def on_step_end(self, args, state, control, **kwargs):
        self.capture.step = state.global_step


def lm_reference(capture, steps, weight):
    h = torch.cat([x[:, :-1] for s, x, _ in capture.rows if s in steps])
    y = torch.cat([y[:, 1:] for s, _, y in capture.rows if s in steps])
    keep = y != -100
    return F.neural_collapse(h[keep], y[keep], V, weight), int(keep.sum())


def collapse_logs(trainer, key):
    return {e["step"]: e[key] for e in trainer.state.log_history if key in e}


def test_gpt2_trainer_logs_neural_collapse_of_the_shifted_labels(tmp_path):
    """NC on GPT-2's lm_head: targets from the forward's ``labels`` (padding -100), shifted by
    one; 4 optimizer steps of 2 micro-batches, logs at steps 2 and 4 equal the float64
    reference on the features of exactly those steps."""
    model = gpt2()
    capture = Capture(model, model.lm_head)
    nc = probes.NeuralCollapse("lm_head", V, target_shift=1, ncc_max_rows=0)
    cb = CollapseTrainerCallback([nc], observe_every_n_steps=1, report_to=["tensorboard"])
    trainer = Trainer(
        model, arguments(tmp_path), train_dataset=Tokens(64), callbacks=[CountSteps(capture), cb]
    )
    trainer.train()
    assert trainer.state.global_step == 4 and len(capture.rows) == 8
    nc1 = collapse_logs(trainer, "collapse/lm_head/nc1")
    assert sorted(nc1) == [2, 4]
    # the last window (steps 3 and 4, counted 2 and 3 before their optimizer step)
    ref, n = lm_reference(capture, {2, 3}, model.lm_head.weight)
    (last,) = [
        e for e in trainer.state.log_history if e["step"] == 4 and "collapse/lm_head/nc1" in e
    ]
    got = {k.split("/")[-1]: v for k, v in last.items() if "collapse" in k}
    assert got["samples"] == n
    assert_metrics_close(got, ref, keys=KEYS)
    # the same numbers reached TensorBoard beside the Trainer's runs, at the optimizer steps
    events = read_events(tmp_path / "out" / "runs" / "collapse_monitor")
    logged = {e.step: e.value for e in events.Scalars("collapse/lm_head/nc1")}
    assert logged == pytest.approx(nc1, rel=1e-6)


def test_train_called_again_logs_its_own_windows(tmp_path):
    """A second train() starts at step 0 while the monitor stood at the first run's last
    step: it stayed ahead of the Trainer and logged nothing more."""
    nc = probes.NeuralCollapse("lm_head", V, target_shift=1, ncc_max_rows=0)
    cb = CollapseTrainerCallback([nc], observe_every_n_steps=1)
    trainer = Trainer(gpt2(), arguments(tmp_path), train_dataset=Tokens(64), callbacks=[cb])
    trainer.train()
    first = collapse_logs(trainer, "collapse/lm_head/samples")
    trainer.train()
    second = collapse_logs(trainer, "collapse/lm_head/samples")
    assert sorted(first) == [2, 4] and second == first
    assert cb.monitor.global_step == trainer.state.global_step == 4


def test_eval_mode_forwards_of_the_users_own_stay_out_of_evaluate(tmp_path):
    """After train() the callback's hooks stay on the model: a forward the user runs in eval
    mode (a notebook) opened a snapshot that the next evaluate() added to (8 + 12 rows)."""
    nc = probes.NeuralCollapse("lm_head", V, target_shift=1, ncc_max_rows=0)
    cb = CollapseTrainerCallback([nc], observe_every_n_steps=1)
    model = gpt2()
    trainer = Trainer(model, arguments(tmp_path), train_dataset=Tokens(64), callbacks=[cb])
    trainer.train()
    alone = trainer.evaluate(Tokens(12))["eval/collapse/lm_head/samples"]
    model.eval()
    with torch.no_grad():
        model(**Tokens(8)[:8])
    after = trainer.evaluate(Tokens(12))["eval/collapse/lm_head/samples"]
    assert after == alone > 0


def test_a_run_shorter_than_logging_steps_is_said_at_its_end(tmp_path, caplog):
    """The Trainer never closes its callbacks: the steps never logged are said at
    on_train_end (HF's default logging_steps=500 on a short run logs nothing)."""
    nc = probes.NeuralCollapse("lm_head", V, target_shift=1, ncc_max_rows=0)
    cb = CollapseTrainerCallback([nc], observe_every_n_steps=1)
    args = arguments(tmp_path, max_steps=3, logging_steps=500)
    trainer = Trainer(gpt2(), args, train_dataset=Tokens(64), callbacks=[cb])
    with caplog.at_level("WARNING", logger="collapse_monitor"):
        trainer.train()
    assert not collapse_logs(trainer, "collapse/lm_head/samples")
    (said,) = [r.message for r in caplog.records if "never logged" in r.message]
    assert "last 3 training step(s) (to step 3)" in said and "logged nothing" in said


def test_the_models_attention_mask_reaches_the_probes_inside_the_trainer(tmp_path):
    """Without labels the padding comes from the model's own attention_mask: read at each
    observed forward (the callback decides to observe before the monitor reads the inputs).
    By hand: the float64 entropy of the head's logits at the positions that are real and
    predict a real token, of the last window's steps."""
    model = gpt2(dropout=0.0)
    capture = Capture(model, model.lm_head)
    masks, logits = [], []  # of each training forward, at that step's weights
    model.register_forward_pre_hook(
        lambda m, a, kw: masks.append(kw["attention_mask"]) if m.training else None,
        with_kwargs=True,
    )
    model.lm_head.register_forward_hook(
        lambda m, a, out: (
            logits.append(a[0].double() @ m.weight.detach().double().T) if m.training else None
        )
    )
    probe = probes.TokenEntropy("lm_head", tokens=None, name="entropy")
    cb = CollapseTrainerCallback([probe], targets=lambda kwargs: None, observe_every_n_steps=1)
    trainer = Trainer(
        model, arguments(tmp_path), train_dataset=Tokens(64), callbacks=[CountSteps(capture), cb]
    )
    trainer.train()
    assert len(capture.rows) == len(masks) == 8
    window = [(z, m) for (s, _, _), z, m in zip(capture.rows, logits, masks) if s in {2, 3}]
    z = torch.cat([z[:, :-1] for z, _ in window])
    real = torch.cat([m.bool() for _, m in window])
    keep = real[:, :-1] & real[:, 1:]
    assert not keep.all()  # some padding to leave out
    want = F.token_entropy_metrics(z, keep)
    assert collapse_logs(trainer, "collapse/entropy/tokens")[4] == want["tokens"]
    got = collapse_logs(trainer, "collapse/entropy/entropy_mean")[4]
    assert got == pytest.approx(want["entropy_mean"], rel=1e-6)


class ByHand(Trainer):
    """The same run driven by hand: the user wraps compute_loss in observe()."""

    monitor: CollapseMonitor

    def compute_loss(self, model, inputs, *args, **kwargs):
        with self.monitor.observe(targets=inputs["labels"]):
            return super().compute_loss(model, inputs, *args, **kwargs)


class StepByHand(TrainerCallback):
    def __init__(self, monitor):
        self.monitor, self.logs = monitor, {}

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        out = self.monitor.step(optimizer)
        if out is not None:
            self.logs[state.global_step] = out


def test_trainer_callback_equals_the_run_driven_by_hand(tmp_path):
    def run(callback_driven):
        model = gpt2()
        nc = probes.NeuralCollapse("lm_head", V, target_shift=1)
        args = arguments(tmp_path, max_steps=6, gradient_accumulation_steps=3)
        if callback_driven:
            cb = CollapseTrainerCallback([nc], log_every_n_steps=3)
            trainer = Trainer(model, args, train_dataset=Tokens(96), callbacks=[cb])
            trainer.train()
            return {s: e for s, e in enumerate(trainer.state.log_history) if "collapse" in str(e)}
        monitor = CollapseMonitor(model, [nc], log_every_n_steps=3)
        hand = StepByHand(monitor)
        trainer = ByHand(model, args, train_dataset=Tokens(96), callbacks=[hand])
        trainer.monitor = monitor
        trainer.train()
        return hand.logs

    got = list(run(True).values())
    want = run(False)
    assert sorted(want) == [3, 6] and len(got) == 2
    for g, (step, w) in zip(got, sorted(want.items())):
        assert g["step"] == step
        assert g.keys() - {"step"} == w.keys()
        assert_metrics_close(g, w)


def test_bert_classifier_training_and_evaluation_snapshot(tmp_path):
    """NC on BERT's classifier input (the pooled output), labels (B,); evaluate() adds the
    snapshot of the whole evaluation set to its metrics, prefixed as the Trainer names it."""
    model = bert()
    nc = probes.NeuralCollapse("classifier", 3)
    cb = CollapseTrainerCallback([nc])
    args = arguments(tmp_path, logging_steps=2, gradient_accumulation_steps=1)
    evaluation = Tokens(40, seed=1, num_labels=3)
    trainer = Trainer(
        model,
        args,
        train_dataset=Tokens(64, num_labels=3),
        eval_dataset={"first": evaluation},
        callbacks=[cb],
    )
    trainer.train()
    assert sorted(collapse_logs(trainer, "collapse/classifier/nc1")) == [2, 4]
    feats = []
    handle = model.classifier.register_forward_hook(lambda m, a, o: feats.append(a[0]))
    metrics = trainer.evaluate()
    handle.remove()
    ref = F.neural_collapse(torch.cat(feats), evaluation.labels, 3, model.classifier.weight)
    got = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("eval_first/collapse/")}
    assert got["samples"] == 40
    assert_metrics_close(got, ref, keys=KEYS)
    assert any("eval_first/collapse/classifier/nc1" in e for e in trainer.state.log_history)


def test_stop_alert_stops_the_trainer(tmp_path):
    rule = Rule("collapse/classifier/samples", 0, "above", action="stop", name="always")
    cb = CollapseTrainerCallback([probes.NeuralCollapse("classifier", 3)], rules=[rule])
    args = arguments(tmp_path, max_steps=10, gradient_accumulation_steps=1)
    trainer = Trainer(bert(), args, train_dataset=Tokens(64, num_labels=3), callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 2  # the first log


def test_resume_restores_the_window(tmp_path):
    """A run stopped at step 3 and resumed from its checkpoint logs at step 4 what the
    uninterrupted run logs: the window of steps 1-3 travelled in the checkpoint."""

    def run(out, max_steps, resume=False):
        nc = probes.NeuralCollapse("classifier", 3)
        cb = CollapseTrainerCallback([nc], observe_every_n_steps=1)
        args = arguments(
            out,
            max_steps=max_steps,
            gradient_accumulation_steps=1,
            logging_steps=4,
            save_strategy="steps",
            save_steps=3,
            lr_scheduler_type="constant",  # the same schedule whatever max_steps is
        )
        trainer = Trainer(bert(), args, train_dataset=Tokens(64, num_labels=3), callbacks=[cb])
        trainer.train(resume_from_checkpoint=resume or None)
        return collapse_logs(trainer, "collapse/classifier/samples"), collapse_logs(
            trainer, "collapse/classifier/nc1"
        )

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "split", 3)
    assert (tmp_path / "split" / "out" / "checkpoint-3" / "collapse_monitor.pt").exists()
    resumed = run(tmp_path / "split", 4, resume=True)
    assert whole[0] == resumed[0] == {4: 16.0}  # 4 steps of 4 rows
    assert whole[1] == pytest.approx(resumed[1], rel=1e-6)


def test_wrong_module_path_fails_at_trainer_construction(tmp_path):
    cb = CollapseTrainerCallback([probes.NeuralCollapse("not_a_head", 3)])
    with pytest.raises(KeyError, match="not_a_head"):
        Trainer(bert(), arguments(tmp_path), train_dataset=Tokens(8, num_labels=3), callbacks=[cb])


def test_mitigations_that_add_parameters_under_deepspeed_are_refused_clearly(tmp_path):
    """The check runs at Trainer(...) (on_init_end), given the arguments a DeepSpeed run
    carries: σReparam adds parameters the engine's optimizer does not hold; the probes alone
    are accepted (they run under DeepSpeed on two processes:
    tests/integrations/test_two_processes.py)."""
    args = arguments(tmp_path)
    args.deepspeed = {"zero_optimization": {"stage": 3}}
    nc = probes.NeuralCollapse("classifier", 3)
    fix = mitigations.SigmaReparam("classifier", when="start")
    cb = CollapseTrainerCallback([nc], mitigations=[fix])
    with pytest.raises(ValueError, match="only ReDo and ResetDeadCodes act"):
        cb.on_init_end(args, None, None, model=bert())
    cb = CollapseTrainerCallback([nc])
    cb.on_init_end(args, None, None, model=bert())
    cb.close()


def test_metrics_reach_the_trainers_wandb_and_mlflow_runs(tmp_path, monkeypatch, offline_wandb):
    """report_to=["wandb", "mlflow"]: the collapse metrics land in the runs the Trainer's own
    callbacks start (W&B offline, MLflow file store), at the optimizer steps."""
    mlflow = pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from tests.integrations.test_sinks import wandb_history

    uri = (tmp_path / "mlruns").as_uri()
    for key, value in {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_EXPERIMENT_NAME": "collapse",
    }.items():
        monkeypatch.setenv(key, value)
    # the Trainer keeps a tracking URI set earlier in the process (Lightning's logger sets one)
    mlflow.set_tracking_uri(uri)
    cb = CollapseTrainerCallback([probes.NeuralCollapse("classifier", 3)])
    args = arguments(tmp_path, gradient_accumulation_steps=1, report_to=["wandb", "mlflow"])
    trainer = Trainer(bert(), args, train_dataset=Tokens(64, num_labels=3), callbacks=[cb])
    trainer.train()
    run_dir = Path(offline_wandb.run.dir).parent
    offline_wandb.finish()
    nc1 = collapse_logs(trainer, "collapse/classifier/nc1")
    assert sorted(nc1) == [2, 4]
    rows = wandb_history(run_dir)
    logged = {
        row["train/global_step"]: row["collapse/classifier/nc1"]
        for _, row in rows
        if "collapse/classifier/nc1" in row
    }
    assert logged == pytest.approx(nc1, rel=1e-9)
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("collapse").experiment_id])
    history = client.get_metric_history(run.info.run_id, "collapse/classifier/nc1")
    assert {m.step: m.value for m in history} == pytest.approx(nc1, rel=1e-6)
