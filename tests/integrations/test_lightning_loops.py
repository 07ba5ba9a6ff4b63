"""Lightning done right: optimizer steps with gradient accumulation, a key per validation
dataloader, every logger in the form it accepts, fullgraph compilation refused."""

import csv
import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader

from collapse_monitor import Rule, mitigations, probes
from collapse_monitor import functional as F
from collapse_monitor.integrations.lightning import CollapseCallback
from tests.integrations.test_lightning import Classifier, dataset, scalars, trainer
from tests.integrations.test_tensorboard import read_events


class Counted(Classifier):
    """Counts the optimizer steps and the batches its training step saw."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        return super().training_step(batch, batch_idx)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    cb = CollapseCallback([probes.NeuralCollapse("head", 4)], log_every_n_steps=2)
    model = Counted()
    t = trainer(tmp_path, "accumulate", 1, callbacks=[cb], accumulate_grad_batches=4)
    t.fit(model, DataLoader(dataset(128), batch_size=4))  # 32 micro-batches
    assert model.batches == 32 and t.global_step == 8
    samples = scalars(tmp_path / "accumulate" / "version_0", "collapse/head/samples")
    # 4 logs at optimizer steps 2, 4, 6, 8; each window: 2 steps x 4 micro-batches x 4 rows
    assert samples == {2: 32.0, 4: 32.0, 6: 32.0, 8: 32.0}


class TwoValidationSets(Classifier):
    def val_dataloader(self):
        return [DataLoader(dataset(64, seed=s), batch_size=16) for s in (1, 2)]

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self(batch[0])


def test_each_validation_dataloader_gets_its_own_keys(tmp_path):
    cb = CollapseCallback([probes.NeuralCollapse("head", 4)], log_every_n_steps=4)
    model = TwoValidationSets()
    t = trainer(tmp_path, "val", 1, callbacks=[cb], limit_train_batches=4)
    t.fit(model, DataLoader(dataset(64), batch_size=16))
    log_dir = tmp_path / "val" / "version_0"
    for i, seed in enumerate((1, 2)):
        x, y = dataset(64, seed=seed).tensors
        with torch.no_grad():
            feats = model.body(x)
        want = F.neural_collapse(feats, y, 4)["nc1"]
        got = scalars(log_dir, f"val/collapse/head/nc1/dataloader_idx_{i}")
        assert list(got) == [t.global_step] and got[t.global_step] == pytest.approx(want, rel=1e-5)
    assert not scalars(log_dir, "val/collapse/head/nc1")  # no merged snapshot


def test_validate_alone_and_before_fit_logs_its_snapshot(tmp_path):
    """trainer.validate() opens the snapshot inside inference_mode: its windows were inference
    tensors, the recording failed on them and disabled the probe for the rest of the run (no
    val/ keys, and none of the training logs after it)."""
    cb = CollapseCallback([probes.NeuralCollapse("head", 4)], log_every_n_steps=2)
    model = TwoValidationSets()
    t = trainer(tmp_path, "validate", 1, callbacks=[cb], limit_train_batches=4)
    t.validate(model, DataLoader(dataset(20, seed=1), batch_size=6), verbose=False)
    x, y = dataset(20, seed=1).tensors
    with torch.no_grad():
        want = F.neural_collapse(model.body(x), y, 4)["nc1"]
    assert float(t.callback_metrics["val/collapse/head/nc1"]) == pytest.approx(want, rel=1e-5)
    assert float(t.callback_metrics["val/collapse/head/samples"]) == 20.0
    t.fit(model, DataLoader(dataset(64), batch_size=16))
    log_dir = tmp_path / "validate" / "version_0"
    assert scalars(log_dir, "collapse/head/samples") == {2: 32.0, 4: 32.0}
    assert not scalars(log_dir, "collapse/errors") or set(
        scalars(log_dir, "collapse/errors").values()
    ) == {0.0}


class GAN(L.LightningModule):
    """Manual optimization with two optimizers: trainer.global_step moves by 2 per batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.gen = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.disc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        gen_opt, disc_opt = self.optimizers()
        fake = self.gen(batch[0])
        gen_opt.zero_grad()
        self.manual_backward(-self.disc(fake).mean())
        gen_opt.step()
        disc_opt.zero_grad()
        self.manual_backward(self.disc(fake.detach()).mean() - self.disc(batch[0]).mean())
        disc_opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(m.parameters(), lr=0.01) for m in (self.gen, self.disc)]


def test_two_optimizers_in_manual_optimization_step_the_monitor_once_per_batch(tmp_path):
    """Stepped at trainer.global_step, the monitor took two steps per batch and observed only
    every other one: a window of 4 steps held 2 batches, and a probe recording every other
    step (RepresentationRank's default cadence here) recorded none in the whole run."""
    cb = CollapseCallback([probes.RepresentationRank("gen.2", name="rr")], log_every_n_steps=4)
    t = trainer(tmp_path, "gan", 1, callbacks=[cb])
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    t.fit(GAN(), DataLoader(torch.utils.data.TensorDataset(x, x), batch_size=4))  # 16 batches
    assert t.global_step == 32
    log_dir = tmp_path / "gan" / "version_0"
    calls = scalars(log_dir, "collapse/rr/calls")
    assert list(calls) == [4, 8, 12, 16] and all(c > 0 for c in calls.values())
    assert set(scalars(log_dir, "collapse/rr/samples").values()) == {4 * next(iter(calls.values()))}


def test_one_callback_reused_on_a_new_model_logs_its_own_run(tmp_path):
    """A seed sweep reusing one callback: the state kept at the first run's teardown (step 8)
    was loaded into the second model's monitor, which then stood ahead of its trainer and
    logged nothing."""
    cb = CollapseCallback([probes.NeuralCollapse("head", 4)], log_every_n_steps=2)
    for run in ("first", "second"):
        t = trainer(tmp_path, run, 1, callbacks=[cb], limit_val_batches=0)
        t.fit(Classifier(), DataLoader(dataset(128), batch_size=16))
        samples = scalars(tmp_path / run / "version_0", "collapse/head/samples")
        assert list(samples) == [2, 4, 6, 8], run


class UnevenValidation(TwoValidationSets):
    """Rank 1 gets no batch from the first validation loader (an uneven shard)."""

    def val_dataloader(self):
        rank = self.trainer.global_rank
        first = dataset(64, seed=1)
        first = torch.utils.data.Subset(first, range(0 if rank else 64))
        return [DataLoader(first, batch_size=16), DataLoader(dataset(64, seed=2), batch_size=16)]


def test_a_rank_without_batches_from_a_loader_still_joins_its_snapshot(tmp_path):
    """Every rank ends one snapshot per loader in loader order, even one that saw nothing from
    a loader: no hang, and the first loader's snapshot holds rank 0's 64 rows only."""
    cb = CollapseCallback([probes.NeuralCollapse("head", 4)], log_every_n_steps=4)
    t = trainer(
        tmp_path,
        "uneven",
        1,
        callbacks=[cb],
        limit_train_batches=2,
        devices=2,
        strategy="ddp_spawn",
        use_distributed_sampler=False,
    )
    model = UnevenValidation()
    model.allow_zero_length_dataloader_with_multiple_devices = True  # Lightning refuses otherwise
    t.fit(model, DataLoader(dataset(64), batch_size=16))
    log_dir = tmp_path / "uneven" / "version_0"
    first = scalars(log_dir, "val/collapse/head/samples/dataloader_idx_0")
    second = scalars(log_dir, "val/collapse/head/samples/dataloader_idx_1")
    assert list(first.values()) == [64.0] and list(second.values()) == [128.0]


class Dormant(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        with torch.no_grad():
            self.net[0].bias[:8] = -100.0  # dormant units: ReDo acts, an alert fires

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def wandb_rows(save_dir):
    from tests.integrations.test_sinks import wandb_history

    return wandb_history(next((save_dir / "wandb").glob("offline-run-*")))


def test_every_logger_gets_alerts_events_histograms_and_thresholds(
    tmp_path, monkeypatch, offline_wandb
):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    loggers = [
        TensorBoardLogger(tmp_path, name="tb", version=0),
        CSVLogger(tmp_path, name="csv", version=0),
        MLFlowLogger(tracking_uri=(tmp_path / "mlruns").as_uri(), experiment_name="collapse"),
        WandbLogger(save_dir=str(tmp_path), offline=True, project="collapse"),
    ]
    cb = CollapseCallback(
        [
            probes.DormantUnits("net.1", name="units"),
            probes.RepresentationRank("net.1", name="rank"),
        ],
        log_every_n_steps=4,
        mitigations=[mitigations.ReDo()],
        rules=[Rule("collapse/units/dormant_fraction", 0.05, "above", name="many_dormant")],
    )
    t = trainer(tmp_path, "all", 1, callbacks=[cb], logger=loggers)
    t.fit(Dormant(), DataLoader(dataset(64), batch_size=8))  # 8 steps: logs at 4 and 8
    for logger in loggers:
        logger.finalize("success")
    loggers[3].experiment.finish()  # WandbLogger leaves its run open: flush it to disk
    # TensorBoard: scalars, alert and event text, histograms, threshold scalars
    acc = read_events(tmp_path / "tb" / "version_0")
    assert "collapse/units/net.1/dormant_fraction" in acc.Tags()["scalars"]
    assert "thresholds/collapse/units/net.1/dormant_fraction/upper" in acc.Tags()["scalars"]
    assert {"collapse/alerts", "collapse/events/redo"} <= {
        t.split("/text_summary")[0] for t in acc.Tags()["tensors"]
    }
    assert "collapse/rank/spectrum" in acc.Tags()["histograms"]
    # CSV: the numbers and the thresholds (text goes to Python logging)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {
        "collapse/units/dormant_fraction",
        "thresholds/collapse/units/net.1/dormant_fraction/upper",
    } <= set(rows[0])
    assert {r["step"] for r in rows if r["collapse/units/dormant_fraction"]} == {"4", "8"}
    # MLflow: metrics, alert and event text, histogram artifacts
    mlruns = tmp_path / "mlruns"
    alerts = next(mlruns.rglob("collapse/alerts.txt")).read_text()
    assert "[many_dormant] step 4" in alerts
    assert (
        json.loads(next(mlruns.rglob("collapse/events.txt")).read_text().splitlines()[0])["name"]
        == "redo"
    )
    assert any(mlruns.rglob("histograms/collapse/rank/spectrum/*.json"))
    # W&B: tables of alerts and events, histograms, thresholds, at the trainer's step
    rows = wandb_rows(tmp_path)
    logged = [r for _, r in rows if "collapse/units/dormant_fraction" in r]
    assert [r["trainer/global_step"] for r in logged] == [4, 8]
    assert any(r.get("collapse/alert_log/_type") == "table-file" for _, r in rows)
    assert any(r.get("collapse/event_log/_type") == "table-file" for _, r in rows)
    assert any(r.get("collapse/rank/spectrum/_type") == "histogram" for _, r in rows)
    assert any("thresholds/collapse/units/net.1/dormant_fraction/upper" in r for _, r in rows)


def test_fullgraph_compilation_is_refused_with_what_to_do(tmp_path):
    cb = CollapseCallback([probes.NeuralCollapse("head", 4)], log_every_n_steps=2)
    t = trainer(tmp_path, "compiled", 1, callbacks=[cb], limit_train_batches=2)
    with pytest.raises(ValueError, match=r"fullgraph=True.*compile with fullgraph=False"):
        t.fit(torch.compile(Classifier(), fullgraph=True), DataLoader(dataset(64), batch_size=16))


def test_deepspeed_is_refused_with_a_clear_error():
    """Lightning's DeepSpeedStrategy runs on CUDA only (untried): refused at setup. The strategy
    object is built without its constructor, which needs an accelerator; the callback only
    looks at its type."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    cb = CollapseCallback([probes.NeuralCollapse("head", 4)])
    with pytest.raises(ValueError, match="DeepSpeedStrategy is not supported"):
        cb.setup(SimpleNamespace(strategy=strategy), Counted(), "fit")
