"""Sinks for plain PyTorch: JSON lines, W&B (offline), MLflow (file store), read back."""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, Rule, mitigations, probes
from collapse_monitor.integrations.jsonl import JSONLinesSink
from tests.test_monitor import train


def monitored(sink, steps=10):
    """An MLP with NC and dormant units, a rule that fires, ReDo acting: every kind of output."""
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].bias[:8] = -100.0  # 8 dormant units: ReDo acts at the first log
    mon = CollapseMonitor(
        model,
        [
            probes.NeuralCollapse("2", 4, name="head"),
            probes.DormantUnits("1", name="units"),
            probes.RepresentationRank("1", name="rank"),
        ],
        5,
        sinks=[sink],
        mitigations=[mitigations.ReDo()],
        rules=[Rule("collapse/head/samples", 0, "above", name="always", repeat=True)],
        observe_every_n_steps=1,
        pictures=["units"],
        strict=True,
    )
    logged = train(model, mon, steps)
    mon.close()
    return logged


def test_json_lines_hold_every_record(tmp_path):
    path = tmp_path / "runs" / "collapse.jsonl"
    logged = monitored(JSONLinesSink(path))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = {r["type"] for r in records}
    assert kinds == {"metrics", "thresholds", "histogram", "alert", "event"}
    metrics = [r for r in records if r["type"] == "metrics"]
    assert [(r["step"], r["metrics"]) for r in metrics] == [(s, m) for s, m in logged]
    alert = next(r for r in records if r["type"] == "alert")
    assert alert["rule"] == "always" and alert["step"] == 5
    event = next(r for r in records if r["type"] == "event")
    assert event["name"] == "redo" and event["info"]["count"] == 8


def _wandb_records(path: Path) -> list:
    """The ``wandb_internal_pb2.Record`` messages of an offline run's ``.wandb`` file: a
    LevelDB-style log (7-byte file header, 32 KiB blocks of records ``<crc u32, length u16,
    type u8>``)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts, part = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header: padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        part += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            parts.append(part)
            part = b""
    records = []
    for raw in parts:
        rec = pb.Record()
        rec.ParseFromString(raw)
        records.append(rec)
    return records


def wandb_history(run_dir, timeout: float = 60.0) -> list[tuple[int, dict]]:
    """The history rows of a finished offline W&B run. ``wandb.finish()`` can return before the
    wandb-core service has written the run's log out, so this waits (up to ``timeout``) for the
    log's closing ``exit`` record."""
    path = next(Path(run_dir).glob("run-*.wandb"))
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(path)
        kinds = [rec.WhichOneof("record_type") for rec in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "exit" in kinds, f"{path} has no exit record after {timeout} s"
    return [
        (
            rec.history.step.num,
            {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item},
        )
        for rec, kind in zip(records, kinds)
        if kind == "history"
    ]


def test_wandb_offline_run_holds_the_metrics_and_tables(tmp_path, offline_wandb):
    from collapse_monitor.integrations.wandb import WandbSink

    sink = WandbSink(project="collapse-test", mode="offline", dir=str(tmp_path))
    logged = monitored(sink)
    rows = wandb_history(next((tmp_path / "wandb").glob("offline-run-*")))
    # one row per log, the monitor's step beside it
    assert [row["collapse/step"] for _, row in rows] == [s for s, _ in logged]
    for (_, row), (_, metrics) in zip(rows, logged):
        for key, value in metrics.items():
            assert row[key] == pytest.approx(value, rel=1e-9), (row["collapse/step"], key)
        (dormant,) = probes.DormantUnits.rules  # the declared default threshold, drawn too
        assert row["thresholds/collapse/units/1/dormant_fraction/upper"] == dormant.threshold
        assert row["collapse/alert_log/_type"] == "table-file"  # the alerts so far
        assert row["collapse/units/1/unit_scores/_type"] == "image-file"
        assert row["collapse/rank/spectrum/_type"] == "histogram"
    assert rows[0][1]["collapse/event_log/_type"] == "table-file"  # ReDo at the first log


def test_wandb_keeps_every_log_beside_the_users_own_wandb_log(tmp_path, offline_wandb):
    """A loop that calls wandb.log itself (twice a step) moves W&B's step past the monitor's:
    logged at step=, W&B dropped every collapse row with a warning of its own."""
    from collapse_monitor.integrations.wandb import WandbSink

    run = offline_wandb.init(project="collapse-test", mode="offline", dir=str(tmp_path))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 4, name="nc")], 4, sinks=[WandbSink(run=run)],
        observe_every_n_steps=1,
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    logged = []
    for step in range(1, 13):
        x, y = torch.randn(16, 8, generator=g), torch.arange(16) % 4
        with mon.observe(targets=y):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        run.log({"loss": loss.item()})
        run.log({"lr": 0.1})
        m = mon.step(optimizer=opt)
        if m is not None:
            logged.append((step, m["collapse/nc/nc1"]))
    mon.close()
    run.finish()
    rows = [row for _, row in wandb_history(next((tmp_path / "wandb").glob("offline-run-*")))]
    ours = [
        (row["collapse/step"], row["collapse/nc/nc1"]) for row in rows if "collapse/step" in row
    ]
    assert [s for s, _ in ours] == [4, 8, 12] and [s for s, _ in logged] == [4, 8, 12]
    assert [v for _, v in ours] == pytest.approx([v for _, v in logged], rel=1e-9)
    assert sum("loss" in row for row in rows) == 12  # the user's rows are untouched


def test_mlflow_file_store_holds_metrics_text_and_histograms(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    from collapse_monitor.integrations.mlflow import MLflowSink

    uri = (tmp_path / "mlruns").as_uri()
    sink = MLflowSink(tracking_uri=uri, experiment="collapse")
    logged = monitored(sink)
    client = MlflowClient(uri)
    history = client.get_metric_history(sink.run_id, "collapse/head/nc1")
    assert [m.step for m in history] == [s for s, _ in logged]
    assert [m.value for m in history] == pytest.approx([m["collapse/head/nc1"] for _, m in logged])
    artifacts = tmp_path / "mlruns"
    alerts = next(artifacts.rglob("collapse/alerts.txt")).read_text().splitlines()
    assert len(alerts) == 2 and alerts[0].startswith("[always] step 5")
    events = [
        json.loads(line) for line in next(artifacts.rglob("events.txt")).read_text().splitlines()
    ]
    assert events[0]["name"] == "redo"
    spectrum = json.loads(
        next(artifacts.rglob("histograms/collapse/rank/spectrum/5.json")).read_text()
    )
    assert spectrum["step"] == 5 and len(spectrum["values"]) == 32


def test_under_ddp_sinks_write_from_rank_0_unless_asked(tmp_path):
    from tests.dist import run_two

    run_two(_sink_worker, tmp_path, "sinks")
    assert (tmp_path / "main.jsonl").exists()
    assert not list(tmp_path.glob("main.rank*.jsonl"))
    assert sorted(p.name for p in tmp_path.glob("every.rank*.jsonl")) == [
        "every.rank0.jsonl",
        "every.rank1.jsonl",
    ]
    main = [json.loads(line) for line in (tmp_path / "main.jsonl").read_text().splitlines()]
    assert len([r for r in main if r["type"] == "metrics"]) == 1  # one copy, not two


def _sink_worker(rank, init, out_dir):
    from tests.dist import process_group

    torch.set_num_threads(1)
    with process_group(rank, init):
        model = nn.Sequential(nn.Linear(4, 3))
        sinks = [
            JSONLinesSink(os.path.join(out_dir, "main.jsonl")),
            JSONLinesSink(os.path.join(out_dir, "every.jsonl"), all_ranks=True),
        ]
        mon = CollapseMonitor(model, [probes.NeuralCollapse("0", 3)], 1, sinks=sinks)
        with mon.observe(targets=torch.arange(6) % 3):
            model(torch.randn(6, 4))
        mon.step()
        mon.close()
        torch.save({}, os.path.join(out_dir, f"sinks{rank}.pt"))
