from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from collapse_monitor import CollapseMonitor, Rule, probes
from collapse_monitor.integrations.tensorboard import TensorBoardSink, scalar_layout
from collapse_monitor.keys import MetricKey
from tests.test_monitor import train


def read_events(log_dir):
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_scalars_alerts_and_layout_are_written(tmp_path):
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    mon = CollapseMonitor(
        model,
        [probes.NeuralCollapse("2", 4, name="head")],
        5,
        sinks=[TensorBoardSink(tmp_path)],
        rules=[Rule("collapse/head/samples", 0, "above", name="always", repeat=True)],
        observe_every_n_steps=1,
    )
    logged = train(model, mon, 10)
    mon.close()
    acc = read_events(tmp_path)
    scalars = acc.Tags()["scalars"]
    for step, metrics in logged:
        for key, value in metrics.items():
            assert key in scalars
            event = next(e for e in acc.Scalars(key) if e.step == step)
            assert abs(event.value - value) <= 1e-6 * max(abs(value), 1e-30)
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("collapse/alerts")]
    assert texts, acc.Tags()
    msgs = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(texts[0])]
    assert any("[always] step 5" in m for m in msgs)
    # custom-scalars layout: one category per probe, nc1 in its own chart
    raw = [e for e in acc.Tensors("custom_scalars__config__")][-1].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    titles = {c.title: {ch.title for ch in c.chart} for c in layout.category}
    assert "nc1" in titles["collapse/head"] and "always" in titles["collapse/alerts"]


def test_layout_groups_per_head_values_and_val_prefix():
    layout = scalar_layout(
        [
            MetricKey("attn", "entropy", index="head_0"),
            MetricKey("attn", "entropy", index="head_1"),
            MetricKey("attn", "max_logit", prefix="val"),
        ]
    )
    assert list(layout["collapse/attn"]) == ["entropy"]
    assert layout["val/collapse/attn"]["max_logit"][1] == ["^val/collapse/attn/max_logit(/.*)?$"]


def test_shared_writer_is_not_closed(tmp_path):
    writer = SummaryWriter(tmp_path)
    sink = TensorBoardSink(writer)
    sink.log_metrics({"collapse/p/m": 1.0}, 1)
    sink.close()
    writer.add_scalar("after", 2.0, 2)  # still usable
    writer.close()
    assert "after" in read_events(tmp_path).Tags()["scalars"]


def test_codebook_usage_histogram_and_reset_events_are_written(tmp_path):
    from collapse_monitor import mitigations
    from tests.mitigations.test_reset_dead_codes import VQ, Model, concentrated

    model = Model(VQ(16, 4))
    mon = CollapseMonitor(
        model,
        [probes.CodebookUsage("vq", 16, ema_decay=0.5, warmup_steps=1)],
        2,
        sinks=[TensorBoardSink(tmp_path)],
        mitigations=[mitigations.ResetDeadCodes("vq", every_step=False)],
        observe_every_n_steps=1,
    )
    for step in range(2):
        with mon.observe():
            idx = model.vq(concentrated(64, 4, seed=step))[1]
        metrics = mon.step()
    mon.close()
    acc = read_events(tmp_path)
    (hist,) = acc.Histograms("collapse/vq/usage_hist")
    assert hist.step == 2 and hist.histogram_value.num == 16
    assert hist.histogram_value.sum == 128  # hits in the window
    texts = acc.Tags()["tensors"]
    assert "collapse/events/reset_dead_codes/text_summary" in texts
    assert metrics["collapse/mitigations/reset_dead_codes"] > 0 and idx.numel() == 64
