import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as F
from tests.functional.test_neural_collapse import clustered
from tests.reference import assert_metrics_close, nc_reference
from tests.stats.test_class_moments import random_split

KEYS = [
    "nc1",
    "nc1_quotient",
    "equinorm_features",
    "equinorm_weights",
    "equiangular",
    "cos_std",
    "self_duality",
    "cdnv",
    "classes_used",
]


def metrics_of(mon, name="head"):
    prefix = f"collapse/{name}/"
    return {k[len(prefix) :]: v for k, v in mon.compute().items() if k.startswith(prefix)}


class Net(nn.Module):
    def __init__(self, D, C):
        super().__init__()
        self.body = nn.Identity()
        self.head = nn.Linear(D, C)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("C,D", [(8, 12), (20, 6)])
def test_probe_streams_what_the_functional_computes(C, D):
    x, y = clustered(C, D, 1000, weights=torch.linspace(0.3, 2, C))
    x = x.float()
    net = Net(D, C)
    mon = CollapseMonitor(
        net, [probes.NeuralCollapse("head", C)], log_every_n_steps=10**6, observe_every_n_steps=1
    )
    for idx in torch.split(torch.arange(1000), random_split(1000, 13, C)):
        with mon.observe(targets=y[idx]):
            net(x[idx])
        mon.step()
    got = metrics_of(mon)
    ref = F.neural_collapse(x, y, C, net.head.weight, net.head.bias)
    assert_metrics_close(got, ref, keys=KEYS)
    assert_metrics_close(
        got, nc_reference(x.numpy(), y.numpy(), C, net.head.weight.detach().numpy()), keys=KEYS
    )
    assert got["samples"] == 1000 and "ncc_mismatch_lagged" not in got  # no previous window yet


def test_lagged_ncc_uses_the_previous_window_means():
    C, D = 6, 5
    x, y = clustered(C, D, 400, noise=1.5)
    x = x.float()
    net = Net(D, C)
    mon = CollapseMonitor(
        net, [probes.NeuralCollapse("head", C)], log_every_n_steps=2, observe_every_n_steps=1
    )
    for idx in torch.split(torch.arange(400), 100):
        with mon.observe(targets=y[idx]):
            net(x[idx])
        metrics = mon.step()
    means1 = torch.stack([x[:200][y[:200] == c].double().mean(0) for c in range(C)])
    want = (
        F.nearest_class_center_mismatch(
            x[200:], means1, torch.arange(C), net.head.weight, net.head.bias
        )
        .double()
        .mean()
        .item()
    )
    assert metrics["collapse/head/ncc_mismatch_lagged"] == pytest.approx(want, abs=1e-12)
    assert 0 < want < 1


def test_language_model_shapes_with_ignore_index_and_target_shift():
    B, T, D, C = 4, 9, 6, 11
    h = torch.randn(B, T, D)
    labels = torch.randint(0, C, (B, T))
    labels[0, 5:] = -100  # padding
    net = Net(D, C)
    mon = CollapseMonitor(
        net,
        [probes.NeuralCollapse("head", C, target_shift=1, ncc_max_rows=0)],
        1000,
        observe_every_n_steps=1,
    )
    with mon.observe(targets=labels):
        net(h)
    got = metrics_of(mon)
    feats, tgt = h[:, :-1].reshape(-1, D), labels[:, 1:].reshape(-1)
    keep = tgt != -100
    ref = F.neural_collapse(feats[keep], tgt[keep], C, net.head.weight)
    assert_metrics_close(got, ref, keys=KEYS)
    assert got["samples"] == keep.sum().item()


def test_read_output_with_a_separate_classifier():
    C, D = 5, 7
    net = Net(D, C)
    net.body = nn.Linear(D, D)
    x, y = clustered(C, D, 300)
    x = x.float()
    mon = CollapseMonitor(
        net,
        [probes.NeuralCollapse("body", C, read="output", classifier="head", name="head")],
        100,
        observe_every_n_steps=1,
    )
    with mon.observe(targets=y):
        net(x)
    ref = F.neural_collapse(net.body(x).detach(), y, C, net.head.weight)
    assert_metrics_close(metrics_of(mon), ref, keys=KEYS)


def test_nonfinite_rows_are_counted_and_excluded():
    C, D = 4, 3
    x, y = clustered(C, D, 200)
    x = x.float()
    bad = torch.zeros(200, dtype=torch.bool)
    bad[::7] = True
    xn = x.clone()
    xn[bad, 1] = float("nan")
    xn[3, 0] = float("inf")
    bad[3] = True
    net = Net(D, C)
    mon = CollapseMonitor(net, [probes.NeuralCollapse("head", C)], 100, observe_every_n_steps=1)
    with mon.observe(targets=y):
        net(xn)
    got = metrics_of(mon)
    assert got["skipped_nonfinite"] == bad.sum().item()
    assert_metrics_close(got, F.neural_collapse(x[~bad], y[~bad], C, net.head.weight), keys=KEYS)


def test_large_vocabulary_language_model_head():
    C, D, N = 50_000, 256, 4096
    g = torch.Generator().manual_seed(0)
    zipf = 1.0 / torch.arange(1, C + 1, dtype=torch.float)
    y = torch.multinomial(zipf, N, replacement=True, generator=g)
    x = torch.randn(N, D, generator=g)
    head = nn.Linear(D, C)
    mon = CollapseMonitor(
        head, [probes.NeuralCollapse("", C, name="lm", ncc_max_rows=64)], 2, observe_every_n_steps=1
    )
    # "" is the root module's name in named_modules()
    for _ in range(2):
        with mon.observe(targets=y):
            head(x)
        metrics = mon.step()
    got = {k.split("/")[-1]: v for k, v in metrics.items()}
    used = torch.bincount(y, minlength=C) >= 1  # both windows see y twice, so n_c >= 2
    assert got["classes_used"] == used.sum().item()
    assert got["samples"] == 2 * N
    for key in ("nc1_quotient", "cdnv", "equiangular"):
        assert got[key] > 0


@pytest.mark.parametrize(
    "make_input, match",
    [
        (lambda: (torch.randn(8, 4), torch.randint(0, 3, (5,))), "do not match"),
        (lambda: (torch.randn(8, 4), torch.full((8,), 7)), "out of range"),
        (lambda: (torch.randn(8, 4), torch.rand(8)), "integer class indices"),
        (lambda: (torch.randn(8, 4), None), r"needs targets: call monitor.observe\(targets=...\)"),
    ],
)
def test_bad_input_names_probe_module_and_problem(make_input, match):
    x, y = make_input()
    head = nn.Linear(4, 3)
    net = nn.Sequential(head)
    mon = CollapseMonitor(
        net, [probes.NeuralCollapse("0", 3, name="nc")], 10, strict=True, observe_every_n_steps=1
    )
    with pytest.raises(ValueError, match=match) as err:
        with mon.observe(targets=y):
            net(x)
    assert "NeuralCollapse 'nc'" in str(err.value) and "module '0'" in str(err.value)
    # statistics untouched by the rejected batch
    assert metrics_of(mon, "nc")["samples"] == 0


def test_module_input_that_is_not_a_tensor():
    class TupleIn(nn.Module):
        def forward(self, pair):
            return pair[0]

    net = nn.Sequential(TupleIn())
    mon = CollapseMonitor(
        net, [probes.NeuralCollapse("0", 3)], 10, strict=True, observe_every_n_steps=1
    )
    with pytest.raises(
        ValueError, match=r"got tuple\(Tensor torch.float32 \(2, 3\), int\); pass extract="
    ):
        with mon.observe(targets=torch.zeros(2, dtype=torch.long)):
            net((torch.randn(2, 3), 1))
    mon.close()
    mon = CollapseMonitor(
        net,
        [probes.NeuralCollapse("0", 3, extract=lambda m, a, o: a[0][0])],
        10,
        observe_every_n_steps=1,
    )
    with mon.observe(targets=torch.tensor([0, 1, 2, 0])):
        net((torch.randn(4, 3), 1))
    assert metrics_of(mon, "0")["samples"] == 4


def test_configuration_errors():
    net = Net(4, 3)
    with pytest.raises(KeyError, match=r"closest names: \['head'"):
        CollapseMonitor(net, [probes.NeuralCollapse("haed", 3)], observe_every_n_steps=1)
    with pytest.raises(ValueError, match="num_classes=5"):
        CollapseMonitor(net, [probes.NeuralCollapse("head", 5)], observe_every_n_steps=1)
    with pytest.raises(ValueError, match="exactly one module"):
        CollapseMonitor(net, [probes.NeuralCollapse("*", 3)], observe_every_n_steps=1)
    with pytest.raises(ValueError, match="read must be"):
        probes.NeuralCollapse("head", 3, read="weights")
    with pytest.raises(ValueError, match="unique"):
        CollapseMonitor(
            net,
            [probes.NeuralCollapse("head", 3), probes.NeuralCollapse("head", 3)],
            observe_every_n_steps=1,
        )
    # a failed construction leaves no hook behind
    assert not net.head._forward_hooks


def test_lagged_ncc_counts_only_the_classes_the_previous_window_used():
    """Classes 0 and 1 with two samples each, class 2 with one sample at (-1, -1) (dropped by
    min_class_count=2), W = [[1, 0], [0, 1], [-1, -1]], no bias, the same data in two windows:
    the functional NC4 excludes class 2's sample and is 0; so must the lagged one be."""
    head = nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
    x = torch.tensor([[2.0, 0.1], [3.0, -0.1], [0.1, 2.0], [-0.1, 3.0], [-1.0, -1.0]])
    y = torch.tensor([0, 0, 1, 1, 2])
    ref = F.neural_collapse(x, y, 3, head.weight)
    mon = CollapseMonitor(
        nn.Sequential(head), [probes.NeuralCollapse("0", 3, name="nc")], 1, observe_every_n_steps=1
    )
    for _ in range(2):
        with mon.observe(targets=y):
            mon.model(x)
        metrics = mon.step()
    assert ref["ncc_mismatch"] == 0.0 and ref["classes_used"] == 2
    assert metrics["collapse/nc/ncc_mismatch_lagged"] == ref["ncc_mismatch"]
    mon.close()
