import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as F
from collapse_monitor.rules import RuleEngine
from tests.functional.test_neural_collapse import clustered
from tests.functional.test_representation import anisotropic
from tests.reference import assert_metrics_close
from tests.stats.test_class_moments import random_split


class Returns(nn.Module):
    """Returns whatever ``make`` builds from the input (encoder heads with odd outputs)."""

    def __init__(self, make=lambda x: x):
        super().__init__()
        self.make = make

    def forward(self, x):
        return self.make(x)


def run(probe, batches, make=lambda x: x, **observe):
    model = nn.Sequential()
    model.add_module("m", Returns(make))
    mon = CollapseMonitor(model, [probe], 10**9, strict=True, observe_every_n_steps=1)
    for b in batches:
        with mon.observe(**observe):
            model(b)
    prefix = f"collapse/{probe.name}/"
    return mon, {k[len(prefix) :]: v for k, v in mon.compute().items()}


@pytest.mark.parametrize("offset", [0.0, 1e3])
def test_representation_rank_streams_the_whole_tensor_values(offset):
    Z = anisotropic(1200, 10, offset=offset)
    Rf = anisotropic(300, 10, seed=4) + 0.5
    parts = torch.split(Z.float() if offset == 0 else Z, random_split(1200, 9, 2))
    _, got = run(probes.RepresentationRank("m", reference=Rf), parts)
    ref = F.representation_rank(torch.cat(parts), reference=Rf)
    keys = ["erank", "rankme", "norm_std", "negative_mass", "variance_ratio", "frechet_distance"]
    assert_metrics_close(got, ref, rtol=1e-6, keys=keys)
    assert got["samples"] == 1200


def test_the_simsiam_rule_watches_signed_embeddings_not_relu_features():
    g = torch.Generator().manual_seed(0)
    relu = torch.relu(torch.randn(512, 32, generator=g))  # healthy, norm_std low by construction
    point = torch.randn(1, 32, generator=g) + 0.01 * torch.randn(512, 32, generator=g)  # collapsed
    fired = {}
    for name, z in (("relu", relu), ("point", point)):
        model = nn.Sequential(Returns())
        alerts = []
        mon = CollapseMonitor(
            model, [probes.RepresentationRank("0", ssl=True, name=name)], 1, on_alert=alerts.append
        )
        with mon.observe():
            model(z)
        m = mon.step()
        mon.close()
        fired[name] = [a.rule for a in alerts]
        ref = F.representation_rank(z.double())
        assert m[f"collapse/{name}/negative_mass"] == pytest.approx(ref["negative_mass"], rel=1e-9)
    assert ref["negative_mass"] > 0.3 and F.representation_rank(relu)["negative_mass"] == 0
    # both sit below 0.5; only the signed, collapsed one is SimSiam's collapse (severe: at once)
    assert fired == {"relu": [], "point": ["point/norm_std_below"]}


def test_a_classifiers_hidden_layer_is_not_an_ssl_embedding():
    """A healthy MLP on uniform random data: its second Linear's output is signed but sits at
    norm_std 0.4-0.55 from the start (the common offset of ReLU inputs). Unmarked, SimSiam's
    bound does not apply; the drop rule (a tenth of its own level) stays silent. Marked ssl=True,
    the same numbers are SimSiam's collapse criterion."""
    fired = {}
    for ssl in (False, True):
        torch.manual_seed(0)
        m = nn.Sequential(
            nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
        )
        x, y = torch.rand(512, 32), torch.randint(0, 10, (512,))
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        alerts = []
        probe = probes.RepresentationRank("2", ssl=ssl, name="hidden")
        mon = CollapseMonitor(m, [probe], 50, on_alert=alerts.append)
        g, out = torch.Generator().manual_seed(0), None
        for _ in range(300):
            idx = torch.randint(0, 512, (64,), generator=g)
            with mon.observe():
                loss = nn.functional.cross_entropy(m(x[idx]), y[idx])
            loss.backward()
            opt.step()
            opt.zero_grad()
            out = mon.step() or out
        mon.close()
        assert out["collapse/hidden/norm_std"] < 0.5 < loss.item()
        assert out["collapse/hidden/negative_mass"] > 0.1
        fired[ssl] = {a.rule for a in alerts}
    assert fired == {False: set(), True: {"hidden/norm_std_below"}}


def test_sequences_and_nonfinite_rows():
    Z = torch.randn(6, 20, 8)
    Z[0, 3, 2] = float("nan")
    _, got = run(probes.RepresentationRank("m"), [Z])
    rows = Z.reshape(-1, 8)
    ok = torch.isfinite(rows).all(1)
    assert got["skipped_nonfinite"] == 1 and got["samples"] == 119
    assert_metrics_close(got, F.representation_rank(rows[ok]), keys=["erank", "rankme", "norm_std"])


def test_padded_token_states_are_not_embeddings():
    """Token states ``(B, T, D)`` of a padded batch: the padding (``observe(mask=)``, or a
    transformers model's own ``attention_mask``) is left out, not counted as samples."""
    from tests.probes.test_conventions import tiny

    pytest.importorskip("transformers")
    model = tiny("Llama", num_hidden_layers=1)
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(3))
    attention = torch.ones(3, 8, dtype=torch.long)
    attention[1, :3] = attention[2, :5] = 0  # left padding
    probe = probes.RepresentationRank("model.norm", name="emb")
    mon = CollapseMonitor(model, [probe], 10**6, strict=True, observe_every_n_steps=1)
    with mon.observe():
        model(ids, attention_mask=attention)
    got = {k.split("/")[-1]: v for k, v in mon.compute().items()}
    mon.close()
    with torch.no_grad():
        states = model.model(ids, attention_mask=attention).last_hidden_state
    real = states[attention.bool()]
    assert got["samples"] == real.shape[0] == 16 and got["skipped_nonfinite"] == 0
    assert_metrics_close(got, F.representation_rank(real), keys=["erank", "rankme", "norm_std"])


def test_per_sequence_embeddings_are_the_means_of_the_tokens_that_count():
    # uneven calls; labels at -100 (a prompt) and padding (observe(mask=)) leave tokens out, a
    # sequence with none is left out. By hand: the float64 mean of each sequence's kept tokens
    g = torch.Generator().manual_seed(7)
    calls, rows = [], []
    for B in (3, 5, 2):
        Z = torch.randn(B, 9, 6, generator=g) @ torch.randn(6, 6, generator=g)
        labels = torch.randint(0, 50, (B, 9), generator=g)
        labels[:, :3] = -100  # the prompt
        mask = torch.rand(B, 9, generator=g) > 0.2
        mask[0] = False  # a sequence that is all padding
        calls.append((Z, labels, mask))
        keep = (labels != -100) & mask
        rows += [Z[b].double()[keep[b]].mean(0) for b in range(B) if keep[b].any()]
    model = nn.Sequential()
    model.add_module("m", Returns())
    probe = probes.RepresentationRank("m", per_sequence=True, name="seq")
    mon = CollapseMonitor(model, [probe], 10**9, strict=True, observe_every_n_steps=1)
    for Z, labels, mask in calls:
        with mon.observe(targets=labels, mask=mask):
            model(Z)
    got = {k.split("/")[-1]: v for k, v in mon.compute().items()}
    assert got["samples"] == len(rows) == 7
    ref = F.representation_rank(torch.stack(rows))
    assert_metrics_close(got, ref, rtol=1e-9, keys=["erank", "rankme", "norm_std"])
    with pytest.raises(ValueError, match="per_sequence=True needs"), mon.observe():
        model(torch.randn(4, 6))
    mon.close()


def test_sketch_is_the_documented_projection_and_close_to_exact():
    g = torch.Generator().manual_seed(0)
    basis = torch.randn(5, 256, generator=g, dtype=torch.float64)
    Z = torch.randn(3000, 5, generator=g, dtype=torch.float64) @ basis  # rank 5 in D = 256
    probe = probes.RepresentationRank("m", sketch_dim=64)
    mon, got = run(probe, torch.split(Z, 500))
    sketched = F.representation_rank(Z @ probe.sketch.cpu())
    assert_metrics_close(got, sketched, keys=["erank", "rankme"])
    exact = F.representation_rank(Z)
    assert got["erank"] == pytest.approx(exact["erank"], rel=0.15)
    assert got["norm_std"] == pytest.approx(exact["norm_std"], rel=1e-9)  # never sketched
    assert mon.driver(mon.probes[0]).window["moments"].second_moment.shape == (64, 64)


def test_frozen_reference_from_another_window():
    Z = anisotropic(500, 6)
    probe = probes.RepresentationRank("m")
    mon, _ = run(probe, [Z])
    frozen = probe.frozen()
    _, got = run(probes.RepresentationRank("m", reference=frozen), [Z[:250] * 0.5])
    ref = F.representation_rank(Z[:250] * 0.5, reference=Z)
    assert_metrics_close(got, ref, rtol=1e-9, keys=["variance_ratio", "frechet_distance"])


@pytest.mark.parametrize(
    "make",
    [
        lambda x: (x[:, :6], x[:, 6:]),
        lambda x: {"mu": x[:, :6], "logvar": x[:, 6:], "z": x[:, :6]},
        lambda x: torch.distributions.Normal(x[:, :6], (0.5 * x[:, 6:]).exp()),
        lambda x: torch.distributions.Independent(
            torch.distributions.Normal(x[:, :6], (0.5 * x[:, 6:]).exp()), 1
        ),
    ],
)
def test_posterior_collapse_streams_the_whole_tensor_values(make):
    g = torch.Generator().manual_seed(1)
    mu = torch.cat(
        [torch.randn(900, 3, generator=g) * 2, 0.01 * torch.randn(900, 3, generator=g)], 1
    )
    logvar = torch.cat([torch.full((900, 3), -3.0), 0.05 * torch.randn(900, 3, generator=g)], 1)
    x = torch.cat([mu, logvar], 1).double()
    probe = probes.PosteriorCollapse("m", num_smallest=2)
    mon, got = run(probe, torch.split(x, random_split(900, 7, 0)), make=make)
    ref = F.posterior_collapse(mu.double(), logvar.double())
    keys = [
        "kl_total",
        "active_units",
        "active_fraction",
        "units_passive",
        "units_active",
        "units_mixed",
        "collapsed_units",
        "samples",
    ]
    assert_metrics_close(got, ref, rtol=1e-9, keys=keys)
    smallest = ref["kl_per_dim"].argsort()[:2].tolist()
    assert sorted(k for k in got if k.startswith("kl/dim_")) == sorted(
        f"kl/dim_{j}" for j in smallest
    )
    for j in smallest:
        assert got[f"kl/dim_{j}"] == pytest.approx(ref["kl_per_dim"][j].item(), rel=1e-9)
    histograms = {k.metric: v for k, v in mon.driver(mon.probes[0]).last.histograms.items()}
    assert torch.allclose(histograms["kl"], ref["kl_per_dim"], rtol=1e-9)


def test_posterior_bad_output_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"PosteriorCollapse 'm' at module 'm': expected \(mu, logvar\)"
    ):
        run(probes.PosteriorCollapse("m"), [torch.zeros(3, 4)], make=lambda x: (x, x, x))
    with pytest.raises(
        ValueError,
        match=r"two floating tensors of one shape.*got tuple\(Tensor torch.float32 \(3, 4\), Tensor torch.float32 \(3, 2\)\)",
    ):
        run(probes.PosteriorCollapse("m"), [torch.zeros(3, 4)], make=lambda x: (x, x[:, :2]))


def test_group_collapse_variance_ratio_and_nc_statistics():
    G, D = 5, 6
    x, g = clustered(G, D, 1000, noise=0.7)
    model = nn.Sequential()
    model.add_module("m", nn.Identity())
    mon = CollapseMonitor(
        model,
        [probes.GroupCollapse("m", G, name="site")],
        10**9,
        strict=True,
        observe_every_n_steps=1,
    )
    for idx in torch.split(torch.arange(1000), random_split(1000, 6, 1)):
        with mon.observe(groups=g[idx]):
            model(x[idx])
    got = {k.split("/")[-1]: v for k, v in mon.compute().items()}
    xn, gn = x.numpy(), g.numpy()
    grand = xn.mean(0)
    between = sum((gn == c).sum() * ((xn[gn == c].mean(0) - grand) ** 2).sum() for c in range(G))
    total = ((xn - grand) ** 2).sum()
    assert got["group_variance_ratio"] == pytest.approx(between / total, rel=1e-9)
    assert_metrics_close(got, F.neural_collapse(x, g, G), keys=["nc1", "cdnv", "nc1_quotient"])
    with pytest.raises(ValueError, match=r"needs groups: call monitor.observe\(groups=...\)"):
        with mon.observe(targets=g):
            model(x)


def test_a_posterior_active_at_initialisation_that_collapses_in_its_second_window_alerts():
    """An encoder active at initialisation (window 1.0) whose units die within the next window
    (0.25): one healthy log arms the posterior rule (two in a row never came: no alert at all);
    a log whose calls held no active share (the window's 1.0 was drift between steps) does not."""
    rules = [spec.bind("vae") for spec in probes.PosteriorCollapse.rules]
    for peak, want in ((1.0, ["vae/active_below"]), (0.25, [])):
        eng = RuleEngine(rules)
        fired = [
            a.rule
            for step, value in ((10, 1.0), (20, 0.25), (30, 0.0))
            for a in eng.check(
                {"collapse/vae/active_fraction": value, "collapse/vae/active_fraction_peak": peak},
                step,
            )
        ]
        assert fired == want


class _Posterior(nn.Module):
    """An encoder head returning ``(mu, logvar)`` = ``(x, 0)``."""

    def forward(self, x):
        return x, torch.zeros_like(x)


def test_a_posterior_that_collapses_inside_its_first_window_alerts_at_that_log():
    """Units 0-5 of 8 lose their spread in the window's last two steps (32 rows each): the
    window's active fraction still holds its active steps, the last two steps' (the rule's
    latest value, 64 rows) show the collapse, and the rule fires at that log."""
    model = nn.Sequential(_Posterior())
    mon = CollapseMonitor(model, [probes.PosteriorCollapse("0", name="vae")], 10)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 8, generator=g) for _ in range(10)]
    for b in batches[8:]:
        b[:, :6] *= 1e-3
    for b in batches:
        with mon.observe():
            model(b)
        m = mon.step()
    zero = torch.zeros(64, 8, dtype=torch.float64)
    last = F.posterior_collapse(torch.cat(batches[8:]).double(), zero)["active_fraction"]
    window = torch.cat(batches).double()
    whole = F.posterior_collapse(window, torch.zeros_like(window))["active_fraction"]
    assert (m["collapse/vae/active_fraction"], whole) == (1.0, 1.0)
    assert m["collapse/vae/active_fraction_last_step"] == last == 0.25
    assert m["collapse/alerts/vae/active_below"] == 1
    # the next window: a last step of 64 rows alone; the one after: two of fewer, not reported
    for b in (*batches[:9], torch.cat(batches[8:])):
        with mon.observe():
            model(b)
        m = mon.step()
    assert m["collapse/vae/active_fraction_last_step"] == last
    for b in (*batches[:9], batches[9][:20]):
        with mon.observe():
            model(b)
        m = mon.step()
    assert "collapse/vae/active_fraction_last_step" not in m
    mon.close()


def test_an_encoder_drifting_between_steps_does_not_arm_the_posterior_rule():
    """A fresh encoder: each call's means barely vary across inputs, but move between steps. The
    window's Burda activity pools that drift (every unit 'active'); within one call none is
    (``active_fraction_peak``, by hand), so the rule is not armed and its last step, all
    inactive, draws no alert. Once the units are active within a call, a collapse alerts."""
    model = nn.Sequential(_Posterior())
    mon = CollapseMonitor(model, [probes.PosteriorCollapse("0", name="vae")], 5)
    g = torch.Generator().manual_seed(0)
    drifting = [
        torch.randn(1, 8, generator=g) + 1e-3 * torch.randn(64, 8, generator=g) for _ in range(5)
    ]
    for b in drifting:
        with mon.observe():
            model(b)
        m = mon.step()
    window = torch.cat(drifting).double()
    assert F.posterior_collapse(window, torch.zeros_like(window))["active_fraction"] == 1.0
    assert m["collapse/vae/active_fraction"] == 1.0
    assert (
        m["collapse/vae/active_fraction_peak"] == 0.0 == m["collapse/vae/active_fraction_last_step"]
    )
    assert m["collapse/alerts/vae/active_below"] == 0
    active = [torch.randn(64, 8, generator=g) for _ in range(4)]
    peaks = []
    for b in active:
        with mon.observe():
            model(b)
        m = mon.step()
        var = b.double().var(0)  # one call's own activity
        peaks.append((var > 0.01).double().mean().item())
    with mon.observe():
        model(drifting[0])  # the units collapse at the window's last step
    m = mon.step()
    assert m["collapse/vae/active_fraction_peak"] == max(peaks) == 1.0
    assert m["collapse/vae/active_fraction_last_step"] == 0.0
    assert m["collapse/alerts/vae/active_below"] == 1
    mon.close()
