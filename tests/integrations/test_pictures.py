import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.plugins.custom_scalar import layout_pb2

from collapse_monitor import CollapseMonitor, Rule, probes
from collapse_monitor.integrations.tensorboard import TensorBoardSink
from collapse_monitor.pictures import Picture, render
from tests.integrations.test_tensorboard import read_events
from tests.zoo import Zoo, batch, every_probe, loss_of

DRAWN = {
    "nc": "class_mean_cosines",
    "vq": "usage_sorted",
    "sae": "usage_sorted",
    "attn": "entropy_heatmap",
    "vae": "kl_per_dim",
    "rank": "eigen_spectrum",
    "groups": "class_mean_cosines",
    "tokens": "r_f_by_depth",
    "dormant": "sae_act/unit_scores",
}


def train_zoo(mon, model, steps):
    for step in range(steps):
        x, y, groups = batch(step)
        with mon.observe(targets=y, groups=groups):
            loss = loss_of(model(x), y)
        loss.backward()
        model.zero_grad()
        mon.step()


def test_every_drawing_probe_writes_a_real_image_to_tensorboard(tmp_path):
    model = Zoo()
    mon = CollapseMonitor(model, every_probe(), 3, sinks=[TensorBoardSink(tmp_path)], pictures=True)
    train_zoo(mon, model, 6)
    mon.close()
    acc = read_events(tmp_path)
    tags = set(acc.Tags()["images"])
    assert tags == {f"collapse/{p}/{key}" for p, key in DRAWN.items()}
    for tag in tags:
        events = acc.Images(tag)
        assert [e.step for e in events] == [3, 6]
        img = np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB"))
        assert img.shape == (events[-1].height, events[-1].width, 3) and img.shape[0] >= 200
        assert img.std() > 10  # not blank: axes, text and data drawn


def test_pictures_at_every_nth_log_only(tmp_path):
    model = Zoo()
    mon = CollapseMonitor(
        model,
        every_probe(),
        2,
        sinks=[TensorBoardSink(tmp_path)],
        pictures=["nc"],
        pictures_every_n_logs=2,
    )
    train_zoo(mon, model, 8)  # logs at steps 2, 4, 6, 8: pictures at the first and third
    mon.close()
    acc = read_events(tmp_path)
    assert [e.step for e in acc.Images("collapse/nc/class_mean_cosines")] == [2, 6]
    assert [e.step for e in acc.Scalars("collapse/nc/nc1")] == [2, 4, 6, 8]


def test_pictures_opt_in_by_probe_name_and_unknown_names_are_refused(tmp_path):
    model = Zoo()
    with pytest.raises(ValueError, match="do not exist: \\['nope'\\]"):
        CollapseMonitor(model, every_probe(), 3, pictures=["nope"])
    mon = CollapseMonitor(
        model, every_probe(), 3, sinks=[TensorBoardSink(tmp_path)], pictures=["attn"]
    )
    train_zoo(mon, model, 3)
    mon.close()
    assert read_events(tmp_path).Tags()["images"] == ["collapse/attn/entropy_heatmap"]


def test_class_mean_cosines_of_a_simplex_etf_are_the_etf_value():
    C, D = 5, 8
    etf = torch.eye(C) - 1.0 / C  # rows: a simplex ETF (centred, equal norms, equal angles)
    model = torch.nn.Sequential(torch.nn.Linear(D, C))
    nc = probes.NeuralCollapse("0", C, name="nc")
    mon = CollapseMonitor(model, [nc], 10**6, observe_every_n_steps=1)
    feats = torch.cat([etf, torch.zeros(C, D - C)], 1).repeat(3, 1).double()
    with mon.observe(targets=torch.arange(C).repeat(3)):
        model[0].double()(feats)
    mon.compute()
    pic = mon.driver(nc).last.pictures[nc.key("class_mean_cosines")]
    off = ~torch.eye(C, dtype=torch.bool)
    assert torch.allclose(
        pic.values[off], torch.full((C * C - C,), -1 / (C - 1), dtype=torch.float64)
    )
    assert torch.allclose(pic.values.diagonal(), torch.ones(C, dtype=torch.float64))
    assert pic.reference == pytest.approx(-0.25)
    mon.close()


def test_render_kinds_and_bad_kind():
    for kind, values in (
        ("heatmap", torch.rand(3, 4)),
        ("bars", torch.rand(7)),
        ("spectrum", torch.rand(7)),
    ):
        img = render(Picture(kind, values, "t", reference=0.5))
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    with pytest.raises(ValueError, match="unknown picture kind 'pie'"):
        render(Picture("pie", torch.rand(3), "t"))


def test_thresholds_are_logged_next_to_their_metric_with_margin_charts(tmp_path):
    model = Zoo()
    mon = CollapseMonitor(
        model,
        [probes.NeuralCollapse("head", 4, name="nc")],
        3,
        sinks=[TensorBoardSink(tmp_path)],
        rules=[
            Rule("collapse/nc/nc1", 0.05, "below", name="low"),
            Rule("collapse/nc/nc1", 50.0, "above", name="high"),
        ],
        observe_every_n_steps=1,
    )
    train_zoo(mon, model, 6)
    mon.close()
    acc = read_events(tmp_path)
    lower = [e.value for e in acc.Scalars("thresholds/collapse/nc/nc1/lower")]
    assert lower == [np.float32(0.05)] * 2  # event files hold float32
    assert [e.value for e in acc.Scalars("thresholds/collapse/nc/nc1/upper")] == [50.0, 50.0]
    raw = acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0]
    layout = layout_pb2.Layout.FromString(raw)
    charts = {ch.title: ch for c in layout.category for ch in c.chart}
    margin = charts["nc1 vs threshold"].margin.series[0]
    assert (margin.value, margin.lower, margin.upper) == (
        "collapse/nc/nc1",
        "thresholds/collapse/nc/nc1/lower",
        "thresholds/collapse/nc/nc1/upper",
    )


def test_without_matplotlib_the_monitor_says_so_once_and_logs_metrics(tmp_path):
    script = """
import logging, sys
sys.modules["matplotlib"] = None  # as if matplotlib were not installed
logging.basicConfig(level=logging.WARNING)
from collapse_monitor.integrations.tensorboard import TensorBoardSink
from collapse_monitor import CollapseMonitor
from tests.integrations.test_pictures import train_zoo
from tests.zoo import Zoo, every_probe
model = Zoo()
mon = CollapseMonitor(model, every_probe(), 2, sinks=[TensorBoardSink(sys.argv[1])], pictures=True)
train_zoo(mon, model, 6)
mon.close()
print("errors", mon.outlets.errors)
"""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("pictures are off, matplotlib is not installed") == 1
    assert "errors 0" in out.stdout
    acc = read_events(tmp_path)
    assert acc.Tags()["images"] == [] and "collapse/nc/nc1" in acc.Tags()["scalars"]
