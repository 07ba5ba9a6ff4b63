"""Faults injected on purpose, each with the outcome users must get (the README's "faults tried"
table): a diverged run alerts and fails its report, one failing outlet never silences another,
state loads safely and whole, bad rows never switch a probe off, training loops as people write
them are counted right, and distributed runs equal one process after a mitigation too."""

import json
import os
import pickle
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from collapse_monitor import CollapseMonitor, Sink, mitigations, probes
from collapse_monitor.cli import main as report
from collapse_monitor.config import MonitorConfig
from collapse_monitor.integrations.jsonl import JSONLinesSink
from collapse_monitor.integrations.lightning import CollapseCallback
from collapse_monitor.integrations.mlflow import MLflowSink, metric_name
from collapse_monitor.integrations.tensorboard import TensorBoardSink
from collapse_monitor.keys import MetricKey
from collapse_monitor.loop import TrainerLoop
from tests.dist import process_group, run_two
from tests.integrations.test_sinks import wandb_history
from tests.integrations.test_tensorboard import read_events
from tests.mitigations.test_reset_dead_codes import concentrated
from tests.mitigations.test_simvq import AutoEncoder
from tests.test_monitor import mlp, train
from tests.zoo import Zoo, batch, every_probe, loss_of, zoo_steps


def train_zoo(model, mon, steps, nan_at=None):
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    return list(zoo_steps(model, mon, opt, 0, steps, nan_at).items())


# ------------------------------------------------------------------------------ divergence
def test_a_nan_weight_alerts_at_the_next_log_and_the_report_fails_the_run(tmp_path, capsys):
    model, alerts = Zoo(), []
    mon = CollapseMonitor(
        model,
        every_probe(),
        10,
        sinks=[TensorBoardSink(tmp_path)],
        on_alert=alerts.append,
        observe_every_n_steps=1,
    )
    logged = train_zoo(model, mon, 60, nan_at=30)
    mon.close()
    diverged = [a for a in alerts if a.rule.endswith("/diverged")]
    assert diverged and min(a.step for a in diverged) == 40  # the first log after the NaN
    # each probe names the first step its inputs were mostly NaN: the head's at once, the
    # encoder's (one weight of 128 NaN at step 30) after the optimizer spread it at step 31
    first = {
        a.rule.split("/")[0]: a.message.split("first_nonfinite_step = ")[1][:2] for a in diverged
    }
    assert first["nc"] == "30" and set(first.values()) <= {"30", "31"}
    assert {a.rule.split("/")[0] for a in diverged} >= {"nc", "rank", "logits", "vae", "attn"}
    last = logged[-1][1]
    assert last["collapse/nc/nonfinite"] == 1.0 and "collapse/nc/nc1" not in last
    assert last["collapse/alerts/nc/diverged"] == 1.0  # once per episode
    assert report(["report", str(tmp_path), "--json"]) == 1
    (run,) = json.loads(capsys.readouterr().out)["runs"].values()
    assert run["status"] == "diverged"
    nc1 = next(r for r in run["rows"] if r["probe"] == "nc" and r["metric"] == "nc1")
    assert nc1["verdict"] == "stale" and nc1["step"] == 30 and nc1["trend"] == "stale since 30"


def test_a_probe_whose_rows_all_turn_bad_falls_silent_with_an_alert():
    model = mlp()
    alerts = []
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 4, name="head")], 2, on_alert=alerts.append
    )
    train(model, mon, 4)  # healthy windows: nc1 reported
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))  # every feature row Inf: skipped and counted
    logged = train(model, mon, 2)
    assert logged[-1][1]["collapse/head/silent"] == 1.0
    assert [a.rule for a in alerts] == ["head/diverged", "head/silent"]


def test_nan_rows_under_the_default_cadence_are_not_called_a_thin_window(caplog):
    # every row skipped as NaN: the health rules speak, not the cadence's thin-window advice
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5))
    alerts = []
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 5, name="head")], 10, on_alert=alerts.append
    )
    with caplog.at_level("WARNING", logger="collapse_monitor"):
        train(model, mon, 30, D=20, C=5)
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
        train(model, mon, 10, D=20, C=5)
    assert not [r for r in caplog.records if "thin" in r.message]
    assert {a.rule for a in alerts} == {"head/diverged", "head/silent"}
    mon.close()


def test_a_thin_window_after_healthy_ones_is_not_silent():
    # a window whose labels fall in one class keeps its samples but defines no NC1: thin, not
    # a probe whose inputs stopped being usable
    model = mlp()
    alerts = []
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 4, name="head")], 2, on_alert=alerts.append
    )
    train(model, mon, 4)
    for _ in range(2):
        with mon.observe(targets=torch.zeros(32, dtype=torch.int64)):
            model(torch.randn(32, 8))
        logged = mon.step()
    assert "collapse/head/nc1" not in logged and logged["collapse/head/samples"] > 0
    assert logged["collapse/head/silent"] == 0.0 and alerts == []


def test_the_report_does_not_call_a_run_stale_for_a_nonfinite_blip(tmp_path, capsys):
    # nonfinite is logged only in windows that saw NaN: its last value being older than the
    # last log means none since, not a stale health row
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path) as w:
        for step in (10, 20, 30):
            w.add_scalar("collapse/head/nc1", 1.0, step)
            w.add_scalar("collapse/head/calls", 10.0, step)
        w.add_scalar("collapse/head/nonfinite", 0.1, 10)
    assert report(["report", str(tmp_path), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"].values()
    assert run["status"] == "healthy"
    assert [r["metric"] for r in run["rows"]] == ["nc1"]  # health rows only when they fired
    assert run["rows"][0]["verdict"] == "healthy"


# ------------------------------------------------------------------------------ outlets
class Explodes(Sink):
    def log_metrics(self, metrics, step):
        raise OSError("No space left on device")


def _keys(logged):
    return {k for _, m in logged for k in m}


def test_every_sink_receives_every_key_of_every_probe_while_one_fails(
    tmp_path, monkeypatch, offline_wandb
):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    from collapse_monitor.integrations.wandb import WandbSink

    uri = (tmp_path / "mlruns").as_uri()
    sinks = [
        Explodes(),
        TensorBoardSink(tmp_path / "tb"),
        JSONLinesSink(tmp_path / "run.jsonl"),
        MLflowSink(tracking_uri=uri, experiment="faults"),
        WandbSink(project="faults", mode="offline", dir=str(tmp_path)),
    ]
    model = Zoo()
    mon = CollapseMonitor(model, every_probe(), 2, sinks=sinks, observe_every_n_steps=1)
    logged = train_zoo(model, mon, 4)
    mon.close()
    keys = _keys(logged)
    assert any(k.endswith("/entropy_norm/head_0") for k in keys)  # per-head keys beside
    assert logged[-1][1]["collapse/outlet_errors/Explodes"] == 1.0
    tb = set(read_events(tmp_path / "tb").Tags()["scalars"])
    records = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    jsonl = {k for r in records if r["type"] == "metrics" for k in r["metrics"]}
    stored = MlflowClient(uri).get_run(sinks[3].run_id).data.metrics
    rows = wandb_history(next((tmp_path / "wandb").glob("offline-run-*")))
    wandb = {k for _, row in rows for k in row}
    late = {"collapse/outlet_errors/Explodes"}  # counted at the log after the failure
    for name, got in (("tb", tb), ("jsonl", jsonl), ("wandb", wandb)):
        assert keys - late <= got, (name, sorted(keys - got)[:5])
    assert {metric_name(k) for k in keys - late} <= set(stored)


class FailingLogger(Logger):
    name, version = "failing", 0

    def log_metrics(self, metrics, step=None):
        raise OSError("the tracking server is down")

    def log_hyperparams(self, params, *args, **kwargs):
        pass


class ZooModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.zoo = Zoo()

    def training_step(self, b, i):
        x, y, groups = b
        return loss_of(self.zoo(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def test_every_lightning_logger_receives_every_key_while_one_fails(
    tmp_path, monkeypatch, offline_wandb
):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    parts = [batch(s) for s in range(4)]
    data = TensorDataset(*(torch.cat(t) for t in zip(*parts)))
    mlf = MLFlowLogger(tracking_uri=(tmp_path / "mlruns").as_uri(), experiment_name="faults")
    loggers = [
        FailingLogger(),
        TensorBoardLogger(tmp_path, name="tb", version=0),
        CSVLogger(tmp_path, name="csv", version=0),
        mlf,
        WandbLogger(save_dir=str(tmp_path), offline=True, project="faults"),
    ]
    seen = []
    cb = CollapseCallback(
        every_probe("zoo."),
        context=lambda b: {"groups": b[2]},
        log_every_n_steps=2,
        observe_every_n_steps=1,
        on_alert=seen.append,
    )
    trainer = L.Trainer(
        max_steps=4,
        logger=loggers,
        callbacks=[cb],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(ZooModule(), DataLoader(data, batch_size=12))
    loggers[-1].experiment.finish()
    tb = set(read_events(tmp_path / "tb" / "version_0").Tags()["scalars"])
    expected = {k for k in tb if k.startswith("collapse/") and "outlet_errors" not in k}
    assert any(k.endswith("/entropy_norm/head_0") for k in expected)
    assert "collapse/outlet_errors/FailingLogger" in tb
    csv = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert expected <= set(csv)
    stored = MlflowClient((tmp_path / "mlruns").as_uri()).get_run(mlf.run_id).data.metrics
    assert {metric_name(MetricKey.parse(k)) for k in expected} <= set(stored)
    rows = wandb_history(next((tmp_path / "wandb").glob("offline-run-*")))
    assert expected <= {k for _, row in rows for k in row}


# ------------------------------------------------------------------------------ state
class Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_crafted_pickle_in_the_checkpoint_folder_is_refused_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint-3" / "collapse_monitor.pt"
    path.parent.mkdir()
    with open(path, "wb") as f:
        pickle.dump({"version": 4, "probes": Boom()}, f)
    with pytest.raises(pickle.UnpicklingError):
        TrainerLoop.read(str(path))
    assert not (tmp_path / "pwned").exists()


def test_no_module_of_the_package_loads_with_weights_only_false():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in ("monitor", "integrations"):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f)).read()
                    assert "weights_only=False" not in text, f


def test_every_probe_and_mitigations_state_loads_with_weights_only_true(tmp_path):
    from tests.zoo import every_mitigation

    model = Zoo()
    mon = CollapseMonitor(model, every_probe(), 2, mitigations=every_mitigation())
    train_zoo(model, mon, 3)  # mid-window, after a log
    torch.save(mon.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    again = Zoo()
    fresh = CollapseMonitor(again, every_probe(), 2, mitigations=every_mitigation())
    fresh.load_state_dict(loaded)
    assert fresh.global_step == 3


def test_a_state_of_another_module_of_the_same_width_is_refused_and_nothing_changes():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 4))
    first = CollapseMonitor(model, [probes.NeuralCollapse("3", 4, name="nc")], 2)
    train(model, first, 3)
    saved = first.state_dict()
    first.close()
    other = CollapseMonitor(model, [probes.NeuralCollapse("2", 4, read="output", name="nc")], 2)
    train(model, other, 1)
    before = {k: v.clone() for k, v in other.driver("nc").window["moments"].state_dict().items()
              if isinstance(v, torch.Tensor)}  # fmt: skip
    with pytest.raises(ValueError, match=r"NeuralCollapse\(module='2', name='nc'\).*paths"):
        other.load_state_dict(saved)
    assert other.global_step == 1
    for k, v in other.driver("nc").window["moments"].state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k])


def test_a_malformed_part_of_one_probes_state_changes_no_probe():
    """A probe's extra state that fails to load (a damaged count) raised after the probes
    before it had swapped in the checkpoint's windows: a caller that caught the error went on
    with windows of step 6 under step 1."""
    model = mlp()

    def build():
        return CollapseMonitor(
            model,
            [probes.NeuralCollapse("2", 4, name="a"), probes.DormantUnits("1", name="b")],
            10,
            observe_every_n_steps=1,
        )

    first = build()
    train(model, first, 6)
    saved = first.state_dict()
    first.close()
    other = build()
    train(model, other, 1)
    before = {n: other.driver(n).state_dict(sync=False) for n in ("a", "b")}
    saved["probes"]["b"]["extra"]["observed_steps"] = "x"
    with pytest.raises(ValueError):
        other.load_state_dict(saved)
    assert other.global_step == 1
    for n in ("a", "b"):
        after = other.driver(n).state_dict(sync=False)
        assert after["extra"] == before[n]["extra"], n
        for k, v in before[n]["window"].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(after["window"][k], v), (n, k)
    other.close()


def test_a_state_with_probes_this_monitor_does_not_have_is_refused():
    model = mlp()
    mon = CollapseMonitor(model, [probes.NeuralCollapse("2", 4, name="a")], 2)
    saved = mon.state_dict()
    saved["probes"]["b"] = saved["probes"]["a"]
    with pytest.raises(KeyError, match=r"state for probes \['b'\] that this monitor does not"):
        mon.load_state_dict(saved)


def test_a_failing_mitigation_state_changes_no_other_part():
    from tests.mitigations.test_reset_dead_codes import VQ, Model, run

    model = Model(VQ(16, 4))

    def build():
        reset = mitigations.ResetDeadCodes("vq", every_step=True)
        return CollapseMonitor(model, [probes.CodebookUsage("vq", 16)], 2, mitigations=[reset])

    first = build()
    run(model, first, [concentrated(64, 4, seed=s) for s in range(3)])
    saved = first.state_dict()
    first.close()
    other = build()
    del saved["mitigations"]["reset_dead_codes"]["generator"]  # a damaged part
    with pytest.raises(KeyError, match="generator"):
        other.load_state_dict(saved)
    assert other.global_step == 0 and other.driver("vq").observed_steps == 0
    assert other.rules.counts == dict.fromkeys(other.rules.counts, 0)
    other.close()


class FailsAlways(Sink):
    def log_metrics(self, metrics, step):
        raise OSError("No space left on device")

    def close(self):
        raise OSError("No space left on device")


class FailsOnClose(Sink):
    def close(self):
        raise OSError("disk gone")


def test_sinks_that_fail_on_close_leave_the_others_closed_and_the_model_free(tmp_path):
    model = mlp()
    jsonl = JSONLinesSink(tmp_path / "run.jsonl")
    sinks = [FailsAlways(), FailsOnClose(), jsonl]
    mon = CollapseMonitor(model, [probes.NeuralCollapse("2", 4, name="head")], 2, sinks=sinks)
    train(model, mon, 2)
    mon.close()
    assert jsonl._file is None or jsonl._file.closed
    assert mon.outlets.failures == {"FailsAlways": 1, "FailsOnClose": 1}
    CollapseMonitor(model, [probes.NeuralCollapse("2", 4, name="head")], 2).close()


def test_an_evaluation_without_labels_is_skipped_not_a_failure(caplog):
    # predict() on unlabelled data: the class-conditional probe skips it (said once), and
    # training goes on with the probe
    model = mlp()
    mon = CollapseMonitor(model, [probes.NeuralCollapse("2", 4, name="head")], 2)
    train(model, mon, 2)
    with caplog.at_level("WARNING", logger="collapse_monitor"):
        for _ in range(2):
            mon.begin_snapshot("predict")
            with mon.observe():
                model(torch.randn(16, 8))
            assert "predict/collapse/head/nc1" not in mon.end_snapshot()
    said = [r.message for r in caplog.records if "without targets" in r.message]
    assert len(said) == 1
    logged = train(model, mon, 2)
    assert "collapse/head/nc1" in logged[-1][1] and mon.error_count == 0
    # the Hugging Face callback's source, a forward's keywords, without the labels
    loop = TrainerLoop(MonitorConfig([probes.NeuralCollapse("2", 4)]), targets="labels")
    assert loop.read_targets({"input_ids": torch.zeros(2, 3)}) is None


# ------------------------------------------------------------------------------ bad rows
def test_labels_out_of_range_are_skipped_and_counted_and_the_probe_goes_on(caplog):
    model = mlp()
    head = probes.NeuralCollapse("2", 4, name="head")
    mon = CollapseMonitor(model, [head], 2, observe_every_n_steps=1)
    g = torch.Generator().manual_seed(0)
    logged = []
    for step in range(4):
        y = torch.randint(0, 4, (32,), generator=g)
        if step == 0:
            y[:3] = 9  # one bad batch
        with caplog.at_level("WARNING", logger="collapse_monitor"), mon.observe(targets=y):
            model(torch.randn(32, 8, generator=g))
        logged.append(mon.step())
    assert not head.disabled and mon.error_count == 0
    assert logged[1]["collapse/head/out_of_range"] == 3.0
    assert logged[1]["collapse/head/samples"] == 64 - 3
    assert logged[3]["collapse/head/out_of_range"] == 0 and "collapse/head/nc1" in logged[3]
    said = [r.message for r in caplog.records if "rows of bad input" in r.message]
    assert len(said) == 1 and "skipped 3 rows" in said[0]


def test_all_zero_tokens_are_skipped_not_a_nan_window():
    model = nn.Sequential(nn.Identity())
    mon = CollapseMonitor(model, [probes.TokenUniformity("0", name="tok")], 1)
    hidden = torch.randn(3, 5, 4)
    hidden[1] = 0.0  # every real token of sequence 1 is zero: no direction to compare
    with mon.observe():
        model(hidden)
    m = mon.step()
    assert m["collapse/tok/0/skipped"] == 1 and "collapse/tok/0/r_f" in m


# ------------------------------------------------------------------------------ loops
def test_a_gan_with_two_optimizers_has_the_discriminators_moments_zeroed_by_redo(tmp_path):
    class GAN(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            torch.manual_seed(0)
            self.gen = nn.Sequential(nn.Linear(4, 8))
            self.disc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
            with torch.no_grad():
                self.disc[0].bias[:6] = -50.0  # dormant discriminator units

        def training_step(self, b, i):
            opt_g, opt_d = self.optimizers()
            fake = self.gen(b[0])
            d_loss = (
                F.softplus(self.disc(fake.detach())).mean() + F.softplus(-self.disc(b[1])).mean()
            )
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
            g_loss = F.softplus(-self.disc(fake)).mean()
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()

        def configure_optimizers(self):
            return torch.optim.Adam(self.gen.parameters()), torch.optim.Adam(self.disc.parameters())

    class Moments(L.Callback):  # after CollapseCallback: what ReDo left in the moments
        rows = None

        def on_train_batch_end(self, trainer, module, *args):
            if self.rows is None and cb.monitor.mitigation_counts:
                opt_d = trainer.optimizers[1]
                self.rows = opt_d.state[module.disc[0].weight]["exp_avg"][:6].clone()

    cb = CollapseCallback([probes.DormantUnits("disc.1", name="d")], log_every_n_steps=2,
                          mitigations=[mitigations.ReDo(probe="d")])  # fmt: skip
    moments = Moments()
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 8))
    trainer = L.Trainer(
        max_epochs=1, callbacks=[cb, moments], logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(GAN(), DataLoader(data, batch_size=16))
    assert cb.loop.config.mitigations[0].name == "redo"
    assert moments.rows is not None and (moments.rows == 0).all()


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 4)

    def forward(self, x, reentrant=False):
        if reentrant:
            h = checkpoint(self.body, x, use_reentrant=True)
        else:
            h = self.body(x)
        return self.head(h)


def _run(first_in_inference=False, reentrant=False, backward_inside=False):
    model = Checkpointed()
    mon = CollapseMonitor(
        model,
        [probes.DormantUnits("body.1", name="d"), probes.RepresentationRank("body", name="r")],
        2,
        observe_every_n_steps=1,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    out = []
    for step in range(4):
        x = torch.randn(16, 8, generator=g, requires_grad=reentrant)
        if step == 0:  # a rollout first: no gradient
            with torch.inference_mode() if first_in_inference else torch.no_grad():
                with mon.observe():
                    model(x)
        with mon.observe():
            loss = model(x, reentrant).pow(2).mean()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        opt.step()
        opt.zero_grad()
        m = mon.step()
        if m:
            out.append(m)
    assert mon.error_count == 0
    return out


def test_an_inference_mode_first_call_leaves_the_numbers_of_a_plain_run():
    assert _run(first_in_inference=True) == _run()


def test_a_reentrant_checkpoint_recomputed_in_backward_is_not_recorded_again():
    plain = _run()
    assert _run(reentrant=True, backward_inside=True) == plain
    assert plain[0]["collapse/d/calls"] == 3  # the rollout and two training steps


# ------------------------------------------------------------------------------ distributed
def _reset_run(rank=None, steps=8, engine="ddp"):
    """ResetDeadCodes at logs on a quantised autoencoder; ``rank`` None: one process on both
    ranks' batches."""
    from collapse_monitor._sharding import whole

    torch.manual_seed(0)
    model = AutoEncoder()
    mon = CollapseMonitor(
        model,
        [probes.CodebookUsage("vq", 16, ema_decay=0.5, warmup_steps=2, name="vq")],
        2,
        mitigations=[mitigations.ResetDeadCodes("vq", every_step=False)],
        observe_every_n_steps=1,
    )
    forward = model
    if rank is not None and engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        forward = DDP(model)
    elif rank is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        for part in (model.enc, model.vq, model.dec, model):
            fully_shard(part, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    logs = []
    for step in range(steps):
        parts = [concentrated(24, 8, seed=100 * r + step) for r in (0, 1)]
        x = parts[rank] if rank is not None else torch.cat(parts)
        with mon.observe():
            recon, commit = forward(x)
        ((recon - x).pow(2).mean() + commit).backward()
        opt.step()
        opt.zero_grad()
        m = mon.step(optimizer=opt)
        if m:
            logs.append(dict(m))
    codebook = whole(model.vq.codebook.weight).detach().clone()
    mon.close()
    return logs, codebook


def _reset_worker(rank, init, out_dir):
    engine = open(os.path.join(out_dir, "engine")).read()
    with process_group(rank, init):
        torch.set_num_threads(1)
        logs, codebook = _reset_run(rank, engine=engine)
        torch.save((logs, codebook), os.path.join(out_dir, f"reset{rank}.pt"))


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
def test_distributed_resets_equal_one_process_over_several_logs(engine, tmp_path):
    (tmp_path / "engine").write_text(engine)
    (logs0, cb0), (logs1, cb1) = run_two(_reset_worker, tmp_path, "reset")
    one, cb = _reset_run()
    assert logs0 == logs1 and torch.equal(cb0, cb1)
    resets = [m.get("collapse/mitigations/reset_dead_codes", 0) for m in one]
    assert resets[0] > 0 and len(resets) == 4  # resets from the first log on, then 3 more logs
    for got, want in zip(logs0, one):
        assert got.keys() == want.keys()
        for k in want:
            if not k.endswith("/calls"):  # (each rank makes its own calls)
                assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), k
    torch.testing.assert_close(cb0, cb, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ the report
def _tb_run(path, steps=20):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(path) as w:
        for s in range(steps):
            w.add_scalar("collapse/p/nc1", 1.0 / (s + 1), s)


def test_a_damaged_event_file_is_named_with_where_reading_stopped(tmp_path, capsys):
    _tb_run(tmp_path / "run")
    (events,) = (tmp_path / "run").glob("events.out.tfevents.*")
    data = events.read_bytes()
    events.write_bytes(data[: len(data) * 2 // 3])
    assert report(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert f"{events} is damaged: truncated at byte" in err and "values after" in err


def test_usage_and_io_errors_exit_2_before_anything_heavy_is_imported(tmp_path, capsys):
    _tb_run(tmp_path / "run")
    assert report(["report", str(tmp_path), "--png", str(tmp_path / "no" / "dash.png")]) == 2
    assert "no such folder" in capsys.readouterr().err
    a_file = tmp_path / "run" / "notes.txt"
    a_file.write_text("x")
    assert report(["report", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    code = (
        "import sys; from collapse_monitor.cli import main\n"
        f"print(main(['report', {str(tmp_path / 'missing')!r}]), 'torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "False"] and "no such directory" in proc.stderr


def test_a_quantiser_fed_nan_is_diverged_not_only_collapsed():
    """CodebookUsage reads integer indices, in which NaN never shows: vector-quantize-pytorch
    maps NaN inputs to one code, which read alone is a plausible codebook collapse. The call's
    own tensors (the quantiser's input and output) tell the run diverged."""
    from vector_quantize_pytorch import VectorQuantize

    torch.manual_seed(0)
    enc, vq = nn.Linear(16, 32), VectorQuantize(dim=8, codebook_size=64)
    model = nn.ModuleDict({"enc": enc, "vq": vq})
    alerts = []
    mon = CollapseMonitor(
        model, [probes.CodebookUsage("vq", 64, name="vq")], 5, on_alert=alerts.append
    )
    for step in range(20):
        if step == 7:
            with torch.no_grad():
                enc.weight[0, 0] = float("nan")
        with mon.observe():
            vq(enc(torch.randn(32, 16)).view(-1, 4, 8))
        mon.step()
    mon.close()
    diverged = [a for a in alerts if a.rule == "vq/diverged"]
    assert [a.step for a in diverged] == [10]
    assert "first_nonfinite_step = 7" in diverged[0].message  # the step the weight went NaN


def test_one_nan_weight_marks_every_downstream_probe_diverged_from_the_first_step():
    """A NaN in one weight makes one feature NaN in every row: a small part of the elements,
    but no row left to use. Every probe downstream counts the call as diverged from step 0
    (found by a user check: RepresentationRank, DormantUnits and NeuralCollapse only did once
    NaN had spread to most elements, a window later)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    with torch.no_grad():
        net[2].weight[0, 0] = float("nan")
    watched = [
        probes.RepresentationRank("2", name="rank"),
        probes.DormantUnits("3", name="dormant"),
        probes.NeuralCollapse("4", 10, name="nc"),
    ]
    mon = CollapseMonitor(net, watched, 2, observe_every_n_steps=1)
    for _ in range(2):
        y = torch.randint(0, 10, (8,))
        with mon.observe(targets=y), torch.no_grad():
            net(torch.randn(8, 16))
        logged = mon.step()
    mon.close()
    for name in ("rank", "dormant", "nc"):
        assert logged[f"collapse/{name}/nonfinite"] == 1.0, name
        assert logged[f"collapse/{name}/first_nonfinite_step"] == 0.0, name
        assert logged[f"collapse/alerts/{name}/diverged"] == 1.0, name


def test_the_diverged_check_samples_a_permuted_activation_across_all_of_it():
    from collapse_monitor.reading import nonfinite

    x = torch.randn(64, 64, 8, 8).permute(0, 2, 3, 1)  # channels-last view: not contiguous
    assert not bool(nonfinite(x))
    for bad, want in [(slice(0, 1), False), (slice(0, 20), False), (slice(0, 44), True)]:
        y = x.clone()  # (the same layout)
        y[bad] = float("nan")  # bad batch elements
        assert bool(nonfinite(y)) is want, (bad, want)
        z = x.clone()
        z[..., bad] = float("inf")  # bad channels
        assert bool(nonfinite(z)) is want, (bad, want)
