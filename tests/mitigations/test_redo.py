"""ReDo re-draws a dormant unit's incoming weights from the layer's initial distribution
(Sokar et al. 2023, Algorithm 1), tested against that distribution with a Kolmogorov-Smirnov
test that rejects the others."""

import logging
import math

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, mitigations, probes

stats = pytest.importorskip("scipy.stats")

DEAD = 200


def dead_net(kind: str) -> nn.Sequential:
    """A layer of 256 units of which the first 200 never fire (bias -100)."""
    torch.manual_seed(0)
    if kind == "linear":
        m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8))
    else:
        m = nn.Sequential(nn.Conv2d(8, 256, 3), nn.ReLU(), nn.Conv2d(256, 4, 1))
    with torch.no_grad():
        m[0].bias[:DEAD] = -100.0
    return m


def recycle(m: nn.Sequential, kind: str, **redo) -> tuple[torch.Tensor, torch.Tensor]:
    """One log of ReDo; the re-drawn incoming weights and biases of the dead units."""
    x = torch.randn(64, 64) if kind == "linear" else torch.randn(16, 8, 6, 6)
    mon = CollapseMonitor(
        m, [probes.DormantUnits("1", name="d")], 1, mitigations=[mitigations.ReDo(**redo)]
    )
    with mon.observe():
        m(x)
    mon.step()
    mon.close()
    return m[0].weight[:DEAD].detach().flatten(), m[0].bias[:DEAD].detach()


def uniform(bound: float):
    return stats.uniform(loc=-bound, scale=2 * bound).cdf


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_redrawn_weights_follow_the_layers_initial_distribution(kind):
    m = dead_net(kind)
    fan_in = 64 if kind == "linear" else 8 * 9
    alive = m[0].weight[DEAD:].detach().clone()
    w, b = recycle(m, kind)
    assert w.numel() >= 12_800 and torch.equal(m[0].weight[DEAD:], alive)
    own = 1 / math.sqrt(fan_in)  # nn.Linear / nn.Conv2d reset_parameters
    assert stats.kstest(w.numpy(), uniform(own)).pvalue > 1e-3
    assert stats.kstest(b.numpy(), uniform(own)).pvalue > 1e-3
    # the test can tell: Xavier's bound (dopamine's recycler) and He's (timoklein/redo) are rejected
    fan_out = 256 * (1 if kind == "linear" else 9)
    for other in (math.sqrt(6 / (fan_in + fan_out)), math.sqrt(6 / fan_in)):
        assert stats.kstest(w.numpy(), uniform(other)).pvalue < 1e-6


def test_xavier_and_a_callable_init():
    m = dead_net("linear")
    w, b = recycle(m, "linear", init="xavier")
    assert stats.kstest(w.numpy(), uniform(math.sqrt(6 / (64 + 256)))).pvalue > 1e-3
    assert (b == 0).all()

    def gpt(weight, bias, generator):
        nn.init.normal_(weight, 0.0, 0.02, generator=generator)
        nn.init.zeros_(bias)

    m = dead_net("linear")
    w, b = recycle(m, "linear", init=gpt)
    assert stats.kstest(w.numpy(), stats.norm(0, 0.02).cdf).pvalue > 1e-3 and (b == 0).all()


def test_a_model_initialised_otherwise_is_said_and_a_custom_layer_refused(caplog):
    m = dead_net("linear")
    with torch.no_grad():
        m[0].weight.normal_(0.0, 0.02)
    with caplog.at_level(logging.WARNING, logger="collapse_monitor"):
        CollapseMonitor(
            m, [probes.DormantUnits("1", name="d")], 1, mitigations=[mitigations.ReDo()]
        ).close()
    assert any("pass init=" in r.message and "'0'" in r.message for r in caplog.records)

    class Scaled(nn.Linear):
        def reset_parameters(self):
            nn.init.orthogonal_(self.weight)

    m = nn.Sequential(Scaled(8, 16), nn.ReLU(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match="own reset_parameters; pass init="):
        CollapseMonitor(
            m, [probes.DormantUnits("1", name="d")], 1, mitigations=[mitigations.ReDo()]
        )
    CollapseMonitor(
        m, [probes.DormantUnits("1", name="d")], 1, mitigations=[mitigations.ReDo(init="xavier")]
    ).close()


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_a_normalisation_between_layer_and_activation_is_reset_with_the_unit(norm):
    """Conv -> BatchNorm -> ReLU: a channel the norm's bias pushes below zero stays dormant
    whatever its conv weights (a user's check: ReDo re-counted the same 4 channels at every
    log). The norm's per-channel state comes back with the unit, its moments zeroed, and the
    channels fire at the next log."""
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(16) if norm == "batch" else nn.GroupNorm(4, 16)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), bn, nn.ReLU(), nn.Conv2d(16, 4, 1))
    with torch.no_grad():
        bn.bias[:4], bn.weight[4:8] = -3.0, 2.0  # 4 dead channels; 4 live ones left alone
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    mon = CollapseMonitor(
        m, [probes.DormantUnits("2", name="d")], 2, mitigations=[mitigations.ReDo()]
    )
    logged = []
    for _ in range(4):
        with mon.observe():
            loss = m(torch.randn(8, 3, 6, 6)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (out := mon.step(optimizer=opt)) is not None:
            logged.append(out)
            if len(logged) == 1:  # right after the reset, before any step moves them
                assert bn.bias[:4].tolist() == [0.0] * 4 and bn.weight[:4].tolist() == [1.0] * 4
                assert bn.weight[4:8].tolist() == pytest.approx([2.0] * 4, abs=0.01)
                if norm == "batch":
                    assert bn.running_mean[:4].tolist() == [0.0] * 4
                    assert bn.running_var[:4].tolist() == [1.0] * 4
                moments = opt.state[bn.bias]["exp_avg"]
                assert moments[:4].tolist() == [0.0] * 4 and moments[4:].abs().sum() > 0
    mon.close()
    assert logged[0]["collapse/d/dormant_fraction"] == 0.25
    assert logged[0]["collapse/mitigations/redo"] == 4
    assert logged[1]["collapse/d/dormant_fraction"] == 0.0  # revived


def test_a_layernorm_before_the_activation_is_reset_and_said_to_move_the_others(caplog):
    """Linear -> LayerNorm -> ReLU -> Linear: the LayerNorm's bias of -1000 kept 10 of 32
    units dead, and ReDo re-drew their weights without touching it (the units stayed dead, and
    the output moved: the norm pools the units). Its affine comes back with the units, which
    fire again; the monitor says that the reset moves the other units."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
    dead = torch.arange(0, 20, 2)
    with torch.no_grad():
        m[1].bias[dead] = -1000.0
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    with caplog.at_level(logging.WARNING, logger="collapse_monitor"):
        mon = CollapseMonitor(
            m, [probes.DormantUnits("2", name="d")], 2, mitigations=[mitigations.ReDo()]
        )
    assert "'1' (LayerNorm) normalises units together" in caplog.text
    logged = []
    for _ in range(4):
        with mon.observe():
            loss = m(torch.randn(64, 16)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (out := mon.step(optimizer=opt)) is not None:
            logged.append(out)
            if len(logged) == 1:
                assert m[1].bias[dead].tolist() == [0.0] * 10
                assert m[1].weight[dead].tolist() == [1.0] * 10
    mon.close()
    assert logged[0]["collapse/mitigations/redo"] == 10
    with torch.no_grad():
        h = m[2](m[1](m[0](torch.randn(256, 16))))
    assert (h[:, dead] > 0).any(0).all()  # every recycled unit fires again


@pytest.mark.parametrize(
    "layout",
    [
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)
        ),
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout2d(0.1), nn.Conv2d(8, 4, 1)),
        lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ZeroPad2d(1), nn.Conv2d(8, 4, 3)),
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.InstanceNorm2d(8, affine=True), nn.ReLU(), nn.Conv2d(8, 4, 1)
        ),
    ],
)
def test_layouts_that_keep_a_dormant_units_zeros_are_recycled_with_the_output_kept(layout):
    """Pooling (adaptive too, then a Flatten of 1 x 1 maps), channel dropout, zero padding
    and a per-channel InstanceNorm keep a dead unit's zeros zero in its own channel: recycled
    (a first version of the layout check refused them), the output unchanged at the reset."""
    torch.manual_seed(0)
    m = layout()
    with torch.no_grad():  # 3 dead channels (behind the InstanceNorm, by its own bias)
        (m[1] if isinstance(m[1], nn.InstanceNorm2d) else m[0]).bias[:3] = -1e3
    mon = CollapseMonitor(
        m, [probes.DormantUnits(str(next(i for i, c in enumerate(m) if isinstance(c, nn.ReLU))),
                                name="d")],
        1, mitigations=[mitigations.ReDo()],
    )  # fmt: skip
    x = torch.randn(4, 3, 8, 8)
    m.eval()
    before = m(x)
    with mon.observe():
        m(x)
    out = mon.step()
    mon.close()
    assert out["collapse/mitigations/redo"] == 3
    torch.testing.assert_close(m(x), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "layout, refused",
    [
        # a BatchNorm after the activation maps a dead unit's zeros to its bias, which the
        # next layer reads: zeroing the outgoing weights would change the output
        (
            lambda: nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 4)),
            r"'2' \(BatchNorm1d\) between '0' and '3'",
        ),
        # a channel owns H * W columns of the Linear after a Flatten
        (
            lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 5)),
            r"'0' gives 8 units, but '3' \(Linear\) reads 72 inputs",
        ),
        # a depthwise conv reads each channel in its own group
        (
            lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8)),
            r"'0' gives 8 units, but '2' \(Conv2d\) reads 8 inputs in 8 groups",
        ),
    ],
)
def test_layouts_where_zeroed_outgoing_weights_change_the_output_are_refused_at_attach(
    layout, refused
):
    """They were recycled (the output moved by up to 0.146) or refused only at the first log,
    after the training it took to get there."""
    with pytest.raises(ValueError, match=refused):
        CollapseMonitor(layout(), [probes.DormantUnits("1")], 2, mitigations=[mitigations.ReDo()])
