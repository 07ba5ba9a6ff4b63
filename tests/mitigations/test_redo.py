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
