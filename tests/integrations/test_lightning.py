import gc
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from collapse_monitor import Rule, probes
from collapse_monitor import functional as F
from collapse_monitor.integrations.lightning import CollapseCallback, default_targets
from tests.functional.test_neural_collapse import clustered
from tests.integrations.test_tensorboard import read_events
from tests.reference import assert_metrics_close

C, D = 4, 8


class Classifier(L.LightningModule):
    def __init__(self, lr=0.1):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(D, 32), nn.Tanh())
        self.head = nn.Linear(32, C)
        self.lr = lr

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def dataset(n=64, seed=0):
    x, y = clustered(C, D, n, noise=1.0, seed=seed)
    return TensorDataset(x.float(), y)


class InterleavedData(L.LightningDataModule):
    """Rank r takes samples r, r + W, ... in order, so the global batch of a W-rank run equals
    a one-process batch W times larger (Lightning's own sampler would shuffle)."""

    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        ds, world = dataset(64), self.trainer.world_size
        sampler = DistributedSampler(ds, world, self.trainer.global_rank, shuffle=False)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)


class JoinedTeardown(L.Callback):
    """Under ``ddp_spawn``, leave the process group together at the end of fit, as
    tests/dist.py does: a barrier, the DDP wrapper's Reducer freed (Lightning unwrapped the model
    before this hook) while the group lives, then ``destroy_process_group`` on every rank. A
    worker left to tear gloo down at interpreter exit aborted once in a few dozen runs
    (``terminate called without an active exception``)."""

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
            gc.collect()
            torch.distributed.destroy_process_group()


def trainer(tmp_path, name, max_epochs, **kw):
    kw.setdefault("logger", TensorBoardLogger(tmp_path, name=name, version=0))
    if kw.get("strategy") == "ddp_spawn":
        kw["callbacks"] = [*kw.get("callbacks", []), JoinedTeardown()]
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator=kw.pop("accelerator", "cpu"),
        devices=kw.pop("devices", 1),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kw.pop("enable_checkpointing", False),
        num_sanity_val_steps=0,
        **kw,
    )


def scalars(log_dir, tag):
    acc = read_events(log_dir)
    if tag not in acc.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in acc.Scalars(tag)}


def callback(**kw):
    return CollapseCallback(
        probes=[probes.NeuralCollapse("head", C)], **kw, observe_every_n_steps=1
    )


def test_fit_logs_through_tensorboard_and_csv_loggers(tmp_path):
    model = Classifier(lr=0.0)  # frozen: each window's features are known exactly
    train, val = dataset(64), dataset(32, seed=1)
    tb = TensorBoardLogger(tmp_path, name="tb", version=0)
    csv = CSVLogger(tmp_path, name="csv", version=0)
    t = trainer(tmp_path, "tb", 2, logger=[tb, csv], callbacks=[callback(log_every_n_steps=4)])
    t.fit(model, DataLoader(train, batch_size=16), DataLoader(val, batch_size=16))

    feats = model.body(train.tensors[0]).detach()
    ref = F.neural_collapse(feats, train.tensors[1], C, model.head.weight)
    nc1 = scalars(tb.log_dir, "collapse/head/nc1")
    assert sorted(nc1) == [4, 8]
    for value in nc1.values():
        assert value == pytest.approx(ref["nc1"], rel=1e-6)
    val_feats = model.body(val.tensors[0]).detach()
    val_ref = F.neural_collapse(val_feats, val.tensors[1], C, model.head.weight)
    val_nc1 = scalars(tb.log_dir, "val/collapse/head/nc1")
    assert len(val_nc1) == 2
    assert_metrics_close({"nc1": next(iter(val_nc1.values()))}, val_ref, rtol=1e-6, keys=["nc1"])
    rows = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text()
    assert "collapse/head/nc1" in rows.splitlines()[0]


def test_early_stopping_and_checkpoints_can_watch_a_collapse_metric(tmp_path):
    """A user's check: EarlyStopping(monitor="val/collapse/...") raised "not available": the
    monitor's metrics reach the loggers, and now trainer.callback_metrics too."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    model = Classifier(lr=0.0)
    val = dataset(32, seed=1)
    stop = EarlyStopping(monitor="val/collapse/head/nc1", patience=1, mode="min")
    best = ModelCheckpoint(tmp_path / "ckpt", monitor="val/collapse/head/nc1", mode="min")
    t = trainer(
        tmp_path,
        "es",
        5,
        logger=False,
        enable_checkpointing=True,
        callbacks=[callback(log_every_n_steps=4), stop, best],
    )
    t.fit(model, DataLoader(dataset(64), batch_size=16), DataLoader(val, batch_size=16))
    val_feats = model.body(val.tensors[0]).detach()
    want = F.neural_collapse(val_feats, val.tensors[1], C, model.head.weight)["nc1"]
    got = t.callback_metrics["val/collapse/head/nc1"]
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert t.current_epoch < 5  # frozen: nc1 never improves, patience 1 stops the fit
    assert best.best_model_score.item() == pytest.approx(want, rel=1e-6)


def test_checkpoint_resume_logs_exactly_the_uninterrupted_metrics(tmp_path):
    rules = [Rule("collapse/head/nc1", 0.01, "drop", name="nc1_drop")]
    loader = DataLoader(
        dataset(64), batch_size=16
    )  # 4 steps per epoch; windows of 3 straddle epochs
    whole = trainer(tmp_path, "whole", 3, callbacks=[callback(log_every_n_steps=3, rules=rules)])
    whole.fit(Classifier(), loader)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = trainer(
        tmp_path,
        "first",
        1,
        enable_checkpointing=True,
        callbacks=[callback(log_every_n_steps=3, rules=rules), ckpt],
    )
    first.fit(Classifier(), loader)
    second = trainer(tmp_path, "second", 3, callbacks=[callback(log_every_n_steps=3, rules=rules)])
    second.fit(Classifier(), loader, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    tags = [
        "collapse/head/nc1",
        "collapse/head/cdnv",
        "collapse/head/ncc_mismatch_lagged",
        "collapse/head/samples",
        "collapse/alerts/nc1_drop",
    ]
    for tag in tags:
        a = scalars(tmp_path / "whole" / "version_0", tag)
        b = scalars(tmp_path / "first" / "version_0", tag)
        b.update(scalars(tmp_path / "second" / "version_0", tag))
        assert sorted(b) == sorted(a) and 6 in a, tag
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-6), (tag, step)


def test_ddp_spawn_two_processes_log_the_single_process_metrics(tmp_path):
    rule = [Rule("collapse/head/samples", 0, "above", warmup_steps=8, action="stop", name="stop")]
    runs = {}
    for name, devices, batch in (("single", 1, 16), ("ddp", 2, 8)):
        kw = {"strategy": "ddp_spawn"} if devices > 1 else {}
        t = trainer(
            tmp_path,
            name,
            5,
            devices=devices,
            use_distributed_sampler=False,
            callbacks=[callback(log_every_n_steps=4, rules=rule)],
            **kw,
        )
        t.fit(Classifier(), datamodule=InterleavedData(batch))
        runs[name] = scalars(tmp_path / name / "version_0", "collapse/head/nc1")
    # the "stop" rule fires at the third log (step 12) and stops both runs there
    assert sorted(runs["ddp"]) == sorted(runs["single"]) == [4, 8, 12]
    for step, value in runs["single"].items():
        assert runs["ddp"][step] == pytest.approx(value, rel=1e-4)


def test_default_targets_and_errors():
    assert default_targets((1, 2)) == 2
    assert default_targets({"labels": 3}) == 3
    assert default_targets({"targets": 4}) == 4
    with pytest.raises(ValueError, match="targets="):
        default_targets({"x": 1})


class AttentionModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        from tests.mitigations.test_sigma_reparam import blocks

        self.net = blocks()

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("when", ["start", "rule"])
def test_sigma_reparam_checkpoint_resume(tmp_path, when):
    from collapse_monitor import mitigations

    data = DataLoader(
        TensorDataset(torch.randn(32, 6, 32, generator=torch.Generator().manual_seed(0))),
        batch_size=8,
    )

    def cb():
        rules = [
            Rule(
                "collapse/attn/net.0.attn/entropy_norm", 10.0, "below", name="attn/entropy_collapse"
            )
        ]
        return CollapseCallback(
            [probes.AttentionEntropy("net.*.attn", name="attn")],
            log_every_n_steps=3,
            default_rules=False,
            rules=rules if when == "rule" else [],
            mitigations=[mitigations.SigmaReparam("net.*.attn", when=when)],
            observe_every_n_steps=1,
        )

    tag = "collapse/attn/net.1.attn/entropy/head_0"
    trainer(tmp_path, "whole", 3, callbacks=[cb()]).fit(AttentionModule(), data)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, "first", 1, enable_checkpointing=True, callbacks=[cb(), ckpt]).fit(
        AttentionModule(), data
    )
    resumed = AttentionModule()
    trainer(tmp_path, "second", 3, callbacks=[cb()]).fit(
        resumed, data, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    from torch.nn.utils import parametrize

    assert parametrize.is_parametrized(resumed.net[0].attn.q)
    assert parametrize.is_parametrized(resumed.net[1].attn.q) == (when == "start")
    a = scalars(tmp_path / "whole" / "version_0", tag)
    b = scalars(tmp_path / "first" / "version_0", tag)
    b.update(scalars(tmp_path / "second" / "version_0", tag))
    assert sorted(a) == sorted(b) == [3, 6, 9, 12]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5), step


class ZooModule(L.LightningModule):
    def __init__(self, lr=1e-2):
        super().__init__()
        from tests.zoo import Zoo

        self.zoo = Zoo()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        from tests.zoo import loss_of

        return loss_of(self.zoo(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class ZooData(L.LightningDataModule):
    def __init__(self, batch_size):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self):
        from tests.zoo import batch

        x, y, groups = batch(0, n=48)
        odd = y[1::2]
        odd[odd == 3] = 2  # class 3 only in even rows: with 2 ranks, rank 1 never sees it
        ds = TensorDataset(x, y, groups)
        sampler = DistributedSampler(
            ds, self.trainer.world_size, self.trainer.global_rank, shuffle=False
        )
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler)  # 48 = uneven last batch


def groups_of(batch):
    return {"groups": batch[2]}


class SaveRankState(L.Callback):
    def __init__(self, out):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        cb = next(c for c in trainer.callbacks if isinstance(c, CollapseCallback))
        torch.save(
            {
                "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
                "mitigations": dict(cb.monitor.mitigation_counts),
            },
            f"{self.out}/rank{trainer.global_rank}_{trainer.world_size}.pt",
        )


def test_ddp_spawn_with_every_probe_and_mitigation(tmp_path):
    from tests.zoo import every_mitigation, every_probe

    tags = {}
    for name, devices, bs in (("single", 1, 10), ("ddp", 2, 5)):
        cb = CollapseCallback(
            every_probe("zoo."),
            log_every_n_steps=3,
            strict=True,
            context=groups_of,
            mitigations=every_mitigation("zoo."),
            observe_every_n_steps=1,
        )
        kw = {"strategy": "ddp_spawn"} if devices > 1 else {}
        t = trainer(
            tmp_path,
            name,
            2,
            devices=devices,
            use_distributed_sampler=False,
            callbacks=[cb, SaveRankState(tmp_path)],
            **kw,
        )
        t.fit(ZooModule(lr=float(os.environ.get("ZOO_LR", "1e-2"))), datamodule=ZooData(bs))
        acc = read_events(tmp_path / name / "version_0")
        tags[name] = {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}
    single, ddp = tags["single"], tags["ddp"]
    assert set(single) == set(ddp) and len(single) > 60
    first = [t for t in single if 3 in single[t]]
    # nlm_cosine is the mean over ranks of each rank's local-gradient cosine (documented);
    # max_logit is a maximum over weights that differ by DDP's rounding after two updates (equal
    # when the learning rate is 0: ZOO_LR=0).
    known = {"collapse/logits/nlm_cosine", "collapse/attn/zoo.attn/max_logit"}
    for tag in first:  # the first window: same global batches, before any mitigation acted
        if tag.endswith("/calls"):  # forward calls summed over ranks: each rank made them
            assert ddp[tag][3] == 2 * single[tag][3], tag
        elif tag not in known:
            assert ddp[tag][3] == pytest.approx(single[tag][3], rel=1e-4, abs=1e-7), tag
    r0, r1 = (torch.load(tmp_path / f"rank{r}_2.pt", weights_only=False) for r in range(2))
    assert r0["mitigations"] == r1["mitigations"] and r0["mitigations"]["reset_dead_codes"] > 0
    for key in r0["weights"]:
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key


def test_targets_reach_every_probe_that_reads_them(tmp_path):
    """LogitHealth reads targets (zero-loss fraction) without any class-conditional probe."""
    cb = CollapseCallback(
        [probes.LogitHealth("head", nlm=False)], log_every_n_steps=4, observe_every_n_steps=1
    )
    trainer(tmp_path, "logits", 1, callbacks=[cb]).fit(
        Classifier(), DataLoader(dataset(64), batch_size=16)
    )
    got = scalars(tmp_path / "logits" / "version_0", "collapse/head/zero_loss_fraction")
    assert sorted(got) == [4] and got[4] == 0.0


def test_ddp_spawn_resume_with_class_shards_logs_the_uninterrupted_window(tmp_path):
    """Lightning writes rank 0's callback state only: every rank's classes are gathered into
    it, so the window a checkpoint cuts resumes exactly on both ranks (it was skipped before)."""

    def shards():
        nc = probes.NeuralCollapse("head", C, shard_classes=True, name="nc")
        return CollapseCallback(probes=[nc], log_every_n_steps=3, observe_every_n_steps=1)

    kw = {"strategy": "ddp_spawn", "devices": 2, "use_distributed_sampler": False}
    # the uninterrupted run, checkpointed after its first epoch (step 4: inside a window)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    whole = trainer(
        tmp_path, "whole", 2, enable_checkpointing=True, callbacks=[shards(), ckpt], **kw
    )
    whole.fit(Classifier(), datamodule=InterleavedData(8))  # 4 steps per epoch
    resumed = trainer(tmp_path, "resumed", 2, callbacks=[shards()], **kw)
    path = str(tmp_path / "ckpt" / "epoch=0.ckpt")
    resumed.fit(Classifier(), datamodule=InterleavedData(8), ckpt_path=path)
    for tag in ("collapse/nc/nc1", "collapse/nc/samples", "collapse/nc/classes_used"):
        a = scalars(tmp_path / "whole" / "version_0", tag)
        b = scalars(tmp_path / "resumed" / "version_0", tag)
        assert sorted(a) == [3, 6] and sorted(b) == [6], tag
        assert b[6] == pytest.approx(a[6], rel=1e-6), tag
