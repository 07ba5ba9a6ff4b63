import math

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, losses, mitigations, probes
from collapse_monitor import functional as F
from tests.stats.test_class_moments import random_split
from tests.test_monitor import Recorder


def test_softmax_collapse_known_answers():
    gap = torch.zeros(6, 10)
    gap[:, 3] = 200.0
    assert F.softmax_collapsed(gap).all()  # float32: exp(-200) underflows
    assert not F.softmax_collapsed(torch.zeros(6, 10)).any()
    gap30 = torch.zeros(2, 10)
    gap30[:, 0] = 30.0  # 9 exp(-30) = 8e-13: below float32's 2^-24, above float64's 2^-53
    assert F.softmax_collapsed(gap30).all() and not F.softmax_collapsed(gap30, torch.float64).any()
    near = torch.zeros(1, 10)
    near[0, 0] = 15.0  # exp(-15) * 9 = 2.8e-6 > 2^-24: not collapsed in float32
    assert not F.softmax_collapsed(near).any()
    assert (
        F.zero_loss(gap, torch.full((6,), 3)).all()
        and not F.zero_loss(gap, torch.zeros(6, dtype=torch.long)).any()
    )


def test_losses_match_their_formulas():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(5, 7, generator=g) * 3, torch.randint(0, 7, (5,), generator=g)
    assert losses.z_loss(z).item() == pytest.approx(
        1e-4 * (torch.logsumexp(z, -1) ** 2).mean().item(), rel=1e-6
    )
    ref = []
    for row, t in zip(z.double().tolist(), y.tolist()):
        s = [x + 1 if x >= 0 else 1 / (1 - x) for x in row]
        ref.append(-math.log(s[t] / sum(s)))
    assert losses.stablemax_cross_entropy(z, y).item() == pytest.approx(sum(ref) / 5, rel=1e-12)
    z.requires_grad_(True)
    losses.stablemax_cross_entropy(z, y).backward()
    assert torch.isfinite(z.grad).all()


def head_model(C=12):
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("head", nn.Linear(8, C))
    return m


def test_logit_health_streams_the_whole_tensor_values_and_nlm_cosine():
    m = head_model()
    with torch.no_grad():
        m.head.weight[:, :] *= 40  # large logits: some rows collapse
    x = torch.randn(300, 8)
    y = m.head(x).argmax(1)
    y[::3] = 0
    mon = CollapseMonitor(m, [probes.LogitHealth("head")], 10**6, observe_every_n_steps=1)
    for idx in torch.split(torch.arange(300), random_split(300, 5, 0)):
        with mon.observe(targets=y[idx]):
            m(x[idx])
    got = {k.split("/")[-1]: v for k, v in mon.compute().items()}
    ref = F.logit_health(m.head(x).detach(), y)
    for key in (
        "softmax_collapse",
        "zero_loss_fraction",
        "log_z_mean",
        "log_z_max",
        "logit_max",
        "logit_norm",
    ):
        assert got[key] == pytest.approx(ref[key], rel=1e-6), key
    assert 0 < got["softmax_collapse"] < 1
    # NLM cosine: read from the head's gradient on the logging step only
    mon.close()
    mon2 = CollapseMonitor(m, [probes.LogitHealth("head", name="h2")], 1, observe_every_n_steps=1)
    with mon2.observe(targets=y):
        loss = nn.functional.cross_entropy(m(x), y)
    loss.backward()
    g = m.head.weight.grad
    metrics = mon2.step()
    want = torch.nn.functional.cosine_similarity(
        -g.flatten(), m.head.weight.flatten(), dim=0
    ).item()
    assert metrics["collapse/h2/nlm_cosine"] == pytest.approx(want, rel=1e-6)


def test_logit_health_counts_labels_outside_the_classes_and_keeps_going():
    """A label outside [0, C) other than ignore_index (a user's check: one label 10 on a
    10-class head switched the probe off for the run) is counted in out_of_range and its row
    kept without a target, streamed as in the whole-tensor reference; zero_loss_fraction by
    hand over the labels that name a class."""
    m = head_model(C=10)
    with torch.no_grad():
        m.head.weight[:, :] *= 40
    x = torch.randn(64, 8)
    y = m.head(x).argmax(1)
    y[:4] = torch.tensor([10, -5, -100, -1])  # past the classes, negative, ignored, -1
    mon = CollapseMonitor(m, [probes.LogitHealth("head", name="h")], 10**6, observe_every_n_steps=1)
    for idx in torch.split(torch.arange(64), [20, 44]):
        with mon.observe(targets=y[idx]):
            m(x[idx])
    got = {k.split("/")[-1]: v for k, v in mon.compute().items()}
    mon.close()
    z = m.head(x).detach()
    ref = F.logit_health(z, y)
    assert got["out_of_range"] == ref["out_of_range"] == 3 and got["samples"] == 64
    assert mon.error_count == 0
    p = torch.softmax(z[4:], -1).gather(1, y[4:, None])[:, 0]
    assert got["zero_loss_fraction"] == pytest.approx((p == 1).double().mean().item(), rel=1e-12)
    assert got["zero_loss_fraction"] == pytest.approx(ref["zero_loss_fraction"], rel=1e-12)


def test_soft_targets_leave_logit_health_measuring_what_needs_no_labels(caplog):
    """Mixup or cutmix targets (B, C) floats, passed for another probe, switched LogitHealth
    off for the run (its targets are optional); it now measures what needs no labels, said
    once, while NeuralCollapse (whose labels are required) still refuses them."""
    m = head_model(C=10)
    x = torch.randn(64, 8)
    soft = torch.softmax(torch.randn(64, 10), -1)
    lh = probes.LogitHealth("head", name="h")
    mon = CollapseMonitor(m, [lh], 10**6, observe_every_n_steps=1, strict=True)
    with caplog.at_level("WARNING", logger="collapse_monitor"):
        for idx in torch.split(torch.arange(64), [20, 44]):
            with mon.observe(targets=soft[idx]):
                m(x[idx])
    got = {k.split("/")[-1]: v for k, v in mon.compute().items()}
    mon.close()
    ref = F.logit_health(m.head(x).detach())
    assert got["samples"] == 64 and "zero_loss_fraction" not in got
    for key in ("softmax_collapse", "log_z_mean", "logit_max"):
        assert got[key] == pytest.approx(ref[key], rel=1e-9), key
    assert sum("are not class indices" in r.message for r in caplog.records) == 1
    nc = CollapseMonitor(m, [probes.NeuralCollapse("head", 10, name="nc")], 1, strict=True)
    with pytest.raises(ValueError, match="must be integer class indices"):
        with nc.observe(targets=soft):
            m(x)
    nc.close()


def test_token_uniformity_known_answers_and_padding():
    tok = torch.randn(1, 1, 16)
    same = tok.expand(3, 6, 16)
    rho, r_f = F.token_uniformity(same)
    assert torch.allclose(rho, torch.ones(3, dtype=torch.float64)) and torch.allclose(
        r_f, torch.zeros(3, dtype=torch.float64), atol=1e-7
    )
    x = torch.randn(4, 9, 16)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 5:] = False
    x_pad = x.clone()
    x_pad[1, 5:] = 100.0  # padding must not count
    rho, r_f = F.token_uniformity(x_pad, mask)
    r1, f1 = F.token_uniformity(x[1:2, :5])
    assert rho[1] == pytest.approx(r1.item(), rel=1e-9) and r_f[1] == pytest.approx(
        f1.item(), rel=1e-9
    )
    # the probe: per layer, averaged over sequences
    blocks = nn.Sequential(nn.Identity(), nn.Identity())
    mon = CollapseMonitor(
        blocks, [probes.TokenUniformity("*", name="depth")], 10**6, observe_every_n_steps=1
    )
    with mon.observe(mask=mask):
        blocks(x_pad)
    got = mon.compute()
    assert got["collapse/depth/0/rho"] == pytest.approx(rho.mean().item(), rel=1e-9)
    assert got["collapse/depth/1/r_f"] == pytest.approx(r_f.mean().item(), rel=1e-9)


def dead_mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        m[0].bias[:6] = -100.0  # six ReLUs that never fire
    return m


def test_dormant_units_match_the_reference_score():
    m = dead_mlp()
    x = torch.randn(400, 10)
    mon = CollapseMonitor(
        m, [probes.DormantUnits("1", name="dormant")], 10**6, observe_every_n_steps=1
    )
    for idx in torch.split(torch.arange(400), [100, 250, 50]):
        with mon.observe():
            m(x[idx])
    got = mon.compute()
    ref = F.dormant_units(torch.relu(m[0](x)))
    assert (
        got["collapse/dormant/1/dormant_fraction"]
        == pytest.approx(ref["dormant_fraction"])
        == 6 / 32
    )
    assert got["collapse/dormant/1/mean_abs"] == pytest.approx(ref["mean_abs"], rel=1e-9)


def test_dormant_fraction_of_the_windows_last_step():
    # units 0-9 of 16 fall silent in the window's last step: the window's score still averages
    # their active steps, the last step's alone (the rule's latest value) shows them
    model = nn.Sequential(nn.Identity())
    g = torch.Generator().manual_seed(0)
    active = torch.randn(100, 16, generator=g).relu()
    silent = torch.randn(100, 16, generator=g).relu()
    silent[:, :10] = 0.0
    mon = CollapseMonitor(model, [probes.DormantUnits("0", name="d")], 2)
    for batch in (active, silent):
        with mon.observe():
            model(batch)
        m = mon.step()
    window = F.dormant_units(torch.cat([active, silent]))["dormant_fraction"]
    assert m["collapse/d/0/dormant_fraction"] == pytest.approx(window) and window < 0.1
    assert m["collapse/d/0/dormant_fraction_last_step"] == pytest.approx(10 / 16)
    assert m["collapse/d/dormant_fraction_last_step"] == pytest.approx(10 / 16)
    with mon.observe():  # a last step of fewer than 64 rows: with the step before it
        model(silent[:63])
    mon.step()
    with mon.observe():
        model(active[:63])
    m = mon.step()
    both = F.dormant_units(torch.cat([silent[:63], active[:63]]))["dormant_fraction"]
    assert m["collapse/d/0/dormant_fraction_last_step"] == pytest.approx(both)
    for _ in range(2):  # fewer than 64 rows in the last two steps: not reported
        with mon.observe():
            model(silent[:30])
        m = mon.step()
    assert "collapse/d/0/dormant_fraction_last_step" not in m
    mon.close()


class _SharedAct(nn.Module):
    """Two layers through one ReLU module (``self.act`` reused); half of fc1's units dead."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(8, 32), nn.Linear(32, 32), nn.ReLU()
        with torch.no_grad():
            self.fc1.bias[:16] = -50.0

    def forward(self, x):
        return self.act(self.fc2(self.act(self.fc1(x))))


class _TwoViews(nn.Module):
    """A siamese forward: one backbone (with its own ReLU) run on two views."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU())

    def forward(self, a, b):
        return self.backbone(a) - self.backbone(b)


def test_one_activation_module_shared_by_two_layers_is_refused_unless_reused():
    """Pooled, layer 1's 16 dead units of 32 read 0.125 dormant with layer 2's rows (no alert,
    by hand 0.5 for layer 1 alone). Refused at the second call in one call of the parent (or at
    attach where the module sits twice); ``reused=True`` pools on purpose; a siamese forward,
    whose backbone (the ReLU's parent) runs once per view, is read as one layer."""
    torch.manual_seed(0)
    net, x = _SharedAct(), torch.randn(256, 8)
    mon = CollapseMonitor(net, [probes.DormantUnits("act", name="d")], 1, strict=True)
    with pytest.raises(ValueError, match="ran twice in one call of its parent _SharedAct"):
        with mon.observe():
            net(x)
    mon.close()
    mon = CollapseMonitor(net, [probes.DormantUnits("act", name="d", reused=True)], 1)
    with mon.observe():
        net(x)
    m = mon.step()
    mon.close()
    with torch.no_grad():
        h1 = net.act(net.fc1(x))
        both = torch.cat([h1, net.act(net.fc2(h1))])
    assert F.dormant_units(h1)["dormant_fraction"] == 0.5
    assert m["collapse/d/act/dormant_fraction"] == F.dormant_units(both)["dormant_fraction"]
    act = nn.ReLU()
    seq = nn.Sequential(nn.Linear(8, 32), act, nn.Linear(32, 32), act)
    with pytest.raises(ValueError, match=r"sits at 2 places \(\['1', '3'\]\)"):
        CollapseMonitor(seq, [probes.DormantUnits("1", name="d")], 1)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in seq.modules())
    net = _TwoViews()
    mon = CollapseMonitor(net, [probes.DormantUnits("backbone.1", name="d")], 1, strict=True)
    a, b = torch.randn(64, 8), torch.randn(64, 8)
    with mon.observe():
        net(a, b)
    m = mon.step()
    mon.close()
    with torch.no_grad():
        views = torch.cat([net.backbone(a), net.backbone(b)])
    assert m["collapse/d/backbone.1/dormant_fraction"] == F.dormant_units(views)["dormant_fraction"]
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in net.modules())


def test_redo_revives_dormant_units_without_changing_the_output():
    m = dead_mlp()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    x = torch.randn(128, 10)
    sink = Recorder()
    mon = CollapseMonitor(
        m,
        [probes.DormantUnits("1", name="dormant")],
        2,
        sinks=[sink],
        mitigations=[mitigations.ReDo()],
        observe_every_n_steps=1,
    )
    for _ in range(2):
        with mon.observe():
            loss = m(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        step_before = opt.state[m[0].weight]["step"].clone()
        out_before = m(x).detach()
        mon.step(optimizer=opt)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:6] = True
    assert torch.equal(m(x).detach(), out_before)  # outgoing weights are zero: same function
    assert (torch.relu(m[0](x))[:, dead] > 0).any(0).all()  # the units fire again
    assert (m[0].bias[dead].abs() <= 1 / math.sqrt(10)).all()  # re-drawn as nn.Linear draws
    assert (m[2].weight[:, dead] == 0).all()
    st_in, st_out = opt.state[m[0].weight], opt.state[m[2].weight]
    assert (st_in["exp_avg"][dead] == 0).all() and (st_in["exp_avg_sq"][dead] == 0).all()
    assert (st_out["exp_avg"][:, dead] == 0).all() and (st_in["exp_avg"][~dead] != 0).any()
    assert torch.equal(st_in["step"], step_before)
    assert sink.events[-1][1] == "redo" and sink.events[-1][2]["count"] == 6


@pytest.mark.parametrize(
    "build",
    [
        lambda: probes.LogitHealth("head", ignore_index=None),
        lambda: probes.NeuralCollapse("head", 10, ignore_index=None),
    ],
)
def test_an_ignore_index_that_is_no_label_is_refused_when_the_probe_is_built(build):
    """ignore_index=None was accepted and switched the probe off at its first call with an
    obscure error ('bool' object has no attribute 'sum')."""
    with pytest.raises(ValueError, match="ignore_index must be an integer label"):
        build()


def test_the_dormant_rule_fires_past_half_the_units_from_the_window_or_its_last_step():
    """Healthy runs of independent rounds held 41-47% dormant units on held-out data (a line at
    0.4 alarmed on 11 of them): the rule fires past half, on one log, from the window or from
    its last step alone."""
    from collapse_monitor.rules import RuleEngine

    def fired(logs):
        eng = RuleEngine([spec.bind("d") for spec in probes.DormantUnits.rules])
        return [
            step
            for step, (window, last) in enumerate(logs, 1)
            for _ in eng.check(
                {
                    "collapse/d/1/dormant_fraction": window,
                    "collapse/d/1/dormant_fraction_last_step": last,
                },
                step,
            )
        ]

    assert fired([(0.47, 0.45), (0.45, 0.49), (0.46, 0.47)]) == []
    assert fired([(0.3, 0.35), (0.32, 0.55)]) == [2]  # units died inside the window
    assert fired([(0.3, 0.35), (0.52, 0.45)]) == [2]
