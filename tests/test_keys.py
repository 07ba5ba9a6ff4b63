"""Metric keys are one type: every logged key parses back to itself; bad names are refused."""

import pytest
import torch

from collapse_monitor import CollapseMonitor, MetricKey, probes
from collapse_monitor.probes import PROBE_TYPES
from collapse_monitor.probes.base import HEALTH_RULES
from collapse_monitor.report import default_rule_templates
from tests.zoo import Zoo, batch, every_mitigation, every_probe, loss_of


def test_every_logged_key_parses_back_to_itself():
    model = Zoo()
    mon = CollapseMonitor(
        model, every_probe(), 2, mitigations=every_mitigation(), observe_every_n_steps=1
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(2):
        x, y, groups = batch(step)
        with mon.observe(targets=y, groups=groups):
            loss_of(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        metrics = mon.step(optimizer=opt)
    assert len(metrics) > 60
    layers = set()
    for key in metrics:
        parsed = MetricKey.parse(key)
        assert str(parsed) == key
        layers.add(parsed.layer)
    assert {"attn", "sae_act", "enc"} <= layers  # per-layer keys of three probes
    val = MetricKey.parse("val/collapse/attn/attn/entropy_norm/head_1")
    assert (val.prefix, val.probe, val.layer, val.metric, val.index) == (
        "val", "attn", "attn", "entropy_norm", "head_1"
    )  # fmt: skip
    alert = MetricKey.parse("collapse/alerts/vq/usage_below")
    assert (alert.probe, alert.metric, alert.is_probe_metric) == ("alerts", "vq/usage_below", False)
    mon.close()


@pytest.mark.parametrize("name", ["a/b", "alerts", "errors", "mitigations"])
def test_a_probe_name_that_would_break_keys_is_refused(name):
    with pytest.raises(ValueError, match="name"):
        probes.NeuralCollapse("head", 4, name=name)


def test_a_glob_module_path_as_name_binds_rules_to_that_probe_only():
    model = torch.nn.Module()
    model.blocks = torch.nn.ModuleList([torch.nn.ReLU(), torch.nn.ReLU()])
    probe = probes.DormantUnits("blocks.*")  # name "blocks.*": the glob is a literal name
    rule, *health = probe.default_rules()
    assert rule.matches("collapse/blocks.*/blocks.0/dormant_fraction")
    assert not rule.matches("collapse/blocks.x/blocks.0/dormant_fraction")
    assert [r.metric for r in health] == [
        "collapse/blocks.[*]/nonfinite",
        "collapse/blocks.[*]/silent",
    ]


def test_the_report_reads_the_declared_rules_of_every_probe_type():
    exported = {getattr(probes, n) for n in probes.__all__ if isinstance(getattr(probes, n), type)}
    assert set(PROBE_TYPES) == {
        c for c in exported if c is not probes.Probe and c is not probes.Call
    }
    templates = default_rule_templates()
    declared = sum(len(cls.rules) for cls in PROBE_TYPES) + len(HEALTH_RULES)
    assert len(templates) == declared > 8
    usage = next(r for r in templates if r.name == "*/usage_below")
    declared = next(s for s in probes.CodebookUsage.rules if s.name == "usage_below")
    assert usage.matches("collapse/any_name/usage") and usage.threshold == declared.threshold
