import math

import numpy as np
import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as F
from tests.stats.test_class_moments import random_split


class Quantizer(nn.Module):
    """Stand-in for a VQ layer: returns (quantized, indices, loss) like vector-quantize-pytorch."""

    def forward(self, x, indices):
        return x, indices, torch.zeros(())


def np_usage(counts):
    counts = np.asarray(counts, dtype=np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return math.exp(-(nz * np.log(nz)).sum()), (counts > 0).mean()


def stream(probe, batches, log_every=10**9):
    q = nn.Sequential()
    q.add_module("vq", Quantizer())
    mon = CollapseMonitor(q, [probe], log_every, observe_every_n_steps=1)
    out = []
    for idx in batches:
        with mon.observe():
            q.vq(torch.zeros(len(idx), 1), idx)
        m = mon.step()
        if m:
            out.append(m)
    return mon, out


def test_known_answers_uniform_and_single_code():
    K = 64
    mon, _ = stream(probes.CodebookUsage("vq", K), [torch.arange(K).repeat(5)])
    m = mon.compute()
    assert m["collapse/vq/perplexity"] == pytest.approx(K, rel=1e-12)
    assert m["collapse/vq/usage"] == 1.0
    mon, _ = stream(probes.CodebookUsage("vq", K), [torch.full((100,), 7)])
    m = mon.compute()
    assert m["collapse/vq/perplexity"] == pytest.approx(1.0, abs=1e-12)
    assert m["collapse/vq/usage"] == 1 / K


@pytest.mark.parametrize("seed", range(3))
def test_pooled_window_equals_whole_tensor_and_numpy(seed):
    K = 50
    g = torch.Generator().manual_seed(seed)
    p = torch.distributions.Dirichlet(torch.full((K,), 0.3)).sample()
    idx = torch.multinomial(p, 3000, replacement=True, generator=g)
    batches = torch.split(idx, random_split(3000, 9, seed))
    mon, _ = stream(probes.CodebookUsage("vq", K), batches)
    m = mon.compute()
    ref = F.codebook_usage(idx, K)
    ppl, usage = np_usage(np.bincount(idx.numpy(), minlength=K))
    assert m["collapse/vq/perplexity"] == pytest.approx(ref["perplexity"].item(), rel=1e-12)
    assert m["collapse/vq/perplexity"] == pytest.approx(ppl, rel=1e-9)
    assert m["collapse/vq/usage"] == pytest.approx(usage) == ref["usage"].item()
    # the pooled perplexity is not the mean of batch perplexities (concavity)
    batch_mean = np.mean([F.codebook_usage(b, K)["perplexity"].item() for b in batches])
    assert m["collapse/vq/perplexity"] > batch_mean


def test_heads_are_reported_separately():
    K, H = 16, 3
    idx = torch.stack(
        [torch.arange(K).repeat(4), torch.zeros(64, dtype=torch.long), torch.arange(64) % 4], 1
    )
    mon, _ = stream(probes.CodebookUsage("vq", K, heads=H), [idx])
    m = mon.compute()
    assert m["collapse/vq/perplexity/head_0"] == pytest.approx(K)
    assert m["collapse/vq/perplexity/head_1"] == pytest.approx(1.0)
    assert m["collapse/vq/perplexity/head_2"] == pytest.approx(4.0)
    assert m["collapse/vq/usage"] == pytest.approx((1 + 1 / 16 + 4 / 16) / 3)
    # each head a codebook of its own: the collapse ratios are the worst codebook's
    assert m["collapse/vq/perplexity_ratio"] == pytest.approx(1 / K)
    # (every head holds 64 indices: one usage_uniform, 1 - (15/16)^64)
    assert m["collapse/vq/usage_ratio"] == pytest.approx((1 / 16) / (1 - (15 / 16) ** 64))


def test_ema_dead_codes_equal_a_plain_loop_reference():
    K, decay, thr = 20, 0.9, 0.01
    g = torch.Generator().manual_seed(0)
    batches = []
    for step in range(60):
        hi = K if step < 20 else 8  # codes 8.. stop being used after step 20
        batches.append(
            torch.randint(0, hi, (int(torch.randint(5, 40, (1,), generator=g)),), generator=g)
        )
    probe = probes.CodebookUsage("vq", K, ema_decay=decay, dead_threshold=thr, warmup_steps=10)
    mon, _ = stream(probe, batches)
    m = mon.compute()
    ema, rows = np.zeros(K), 0.0
    for b in batches:
        ema = decay * ema + (1 - decay) * np.bincount(b.numpy(), minlength=K)
        rows = decay * rows + (1 - decay) * len(b)
    dead = ema / rows < thr
    assert dead[8:].all() and not dead[:8].any()
    assert m["collapse/vq/dead_codes"] == dead.sum()
    assert torch.equal(mon.driver(probe).last.masks[probe.key("dead")][0], torch.from_numpy(dead))


def test_dead_codes_by_the_window_during_the_warmup_then_by_the_ema():
    probe = probes.CodebookUsage("vq", 10, ema_decay=0.5, warmup_steps=5)
    # window 1 (4 observed steps, inside the warm-up) uses codes 0 and 1; window 2 only code 0
    batches = [torch.tensor([0, 1])] * 4 + [torch.tensor([0, 0])] * 4
    mon, logs = stream(probe, batches, log_every=4)
    assert logs[0]["collapse/vq/dead_codes"] == 8  # the window's unused codes 2..9
    # after the warm-up the EMA decides: code 1, unused in window 2, was used recently
    assert logs[1]["collapse/vq/dead_codes"] == 8
    assert not mon.driver(probe).last.masks[probe.key("dead")][0, 1]


def test_window_resets_but_ema_persists():
    probe = probes.CodebookUsage("vq", 8, warmup_steps=0)
    _, logs = stream(
        probe, [torch.arange(8)] * 3 + [torch.zeros(8, dtype=torch.long)] * 3, log_every=3
    )
    assert logs[0]["collapse/vq/usage"] == 1.0 and logs[1]["collapse/vq/usage"] == 1 / 8
    assert logs[1]["collapse/vq/samples"] == 24
    assert logs[1]["collapse/vq/dead_codes"] == 0  # the EMA still remembers codes 1..7


def test_moe_router_top_k_expert_load():
    E, k = 8, 2
    router = nn.Linear(16, E)
    with torch.no_grad():
        router.weight[5:] = -100  # experts 5..7 never chosen
        router.bias.zero_()
    model = nn.Sequential()
    model.add_module("router", router)
    probe = probes.CodebookUsage(
        "router", E, extract=lambda m, a, o: o.topk(k, dim=-1).indices, warmup_steps=1, name="moe"
    )
    mon = CollapseMonitor(model, [probe], 4, observe_every_n_steps=1)
    x = torch.randn(256, 16).abs()
    for _ in range(4):
        with mon.observe():
            model(x)
        m = mon.step()
    choices = router(x).topk(k, dim=-1).indices
    ref = F.codebook_usage(choices, E)
    assert m["collapse/moe/perplexity"] == pytest.approx(ref["perplexity"].item(), rel=1e-12)
    assert m["collapse/moe/samples"] == 4 * 256 * k
    assert m["collapse/moe/dead_codes"] == 3


def test_sae_latent_usage_counts_fires_per_window():
    L = 32
    enc = nn.Linear(10, L)
    with torch.no_grad():
        enc.bias[:8] = -1e3  # latents 0..7 never fire
    model = nn.Sequential()
    model.add_module("enc", enc)
    model.add_module("act", nn.ReLU())
    mon = CollapseMonitor(
        model, [probes.LatentUsage("act", L, name="sae")], 3, observe_every_n_steps=1
    )
    x = torch.randn(3, 100, 10)
    for i in range(3):
        with mon.observe():
            acts = model(x[i])
        m = mon.step()
    fires = (torch.relu(enc(x)) > 0).reshape(-1, L)
    assert m["collapse/sae/dead_latents"] == 8 == (fires.sum(0) == 0).sum()
    assert m["collapse/sae/dead_fraction"] == 8 / L
    assert m["collapse/sae/fire_rate"] == pytest.approx(fires.sum(1).double().mean().item())
    assert m["collapse/sae/samples"] == 300
    assert acts.shape == (100, L)


@pytest.mark.parametrize(
    "output, match",
    [
        ((torch.zeros(3, 2), torch.tensor([0, 1, 99]), torch.zeros(())), "out of range"),
        ((torch.zeros(3, 2), torch.tensor([-2, 1, 2]), torch.zeros(())), "out of range"),
        (
            (torch.zeros(3, 2), torch.zeros(3)),
            "expected a single integer tensor of code indices as the module's output",
        ),
        (
            {
                "q": torch.zeros(3),
                "a": torch.zeros(3, dtype=torch.long),
                "b": torch.ones(3, dtype=torch.long),
            },
            "expected a single integer tensor of code indices as the module's output",
        ),
    ],
)
def test_bad_indices_raise_clear_errors(output, match):
    class Fixed(nn.Module):
        def forward(self, x):
            return output

    model = nn.Sequential(Fixed())
    mon = CollapseMonitor(
        model, [probes.CodebookUsage("0", 10, name="vq")], 5, strict=True, observe_every_n_steps=1
    )
    with pytest.raises(ValueError, match=match) as err:
        with mon.observe():
            model(torch.zeros(1))
    assert "CodebookUsage 'vq' at module '0'" in str(err.value)
    assert mon.compute()["collapse/vq/samples"] == 0


def test_float_indices_from_extract_are_rejected():
    model = nn.Sequential(nn.Identity())
    mon = CollapseMonitor(
        model,
        [probes.CodebookUsage("0", 10, extract=lambda m, a, o: o)],
        5,
        strict=True,
        observe_every_n_steps=1,
    )
    with pytest.raises(
        ValueError,
        match=r"expected a single integer tensor of code indices as the value returned by extract, got Tensor torch.float32 \(4,\)",
    ):
        with mon.observe():
            model(torch.zeros(4))


@pytest.mark.parametrize("per_step, first", [(4, None), (20, 1)])
def test_the_usage_rules_judge_a_window_from_the_first_log_once_it_holds_enough(per_step, first):
    """No warm-up: a codebook collapsed from initialisation alerts at the first log, where the
    window holds enough assignments that a uniform codebook would show >= 90% of its codes
    (usage_uniform = 1 - (7/8)^T: 0.41 for T = 4, 0.93 for T = 20); a thinner window says
    nothing (a handful of assignments leaves most codes unseen whatever the codebook)."""
    model = nn.Sequential()
    model.add_module("vq", Quantizer())
    alerts = []
    mon = CollapseMonitor(
        model, [probes.CodebookUsage("vq", 8, name="vq")], 1, on_alert=alerts.append
    )
    for _ in range(4):  # one code of 8 every step: usage 1/8, past the severe bound
        with mon.observe():
            model.vq(torch.zeros(per_step, 1), torch.zeros(per_step, dtype=torch.long))
        m = mon.step()
    mon.close()
    assert m["collapse/vq/usage_uniform"] == pytest.approx(1 - (7 / 8) ** per_step, rel=1e-12)
    assert m["collapse/vq/usage_uniform"] == F.uniform_usage(torch.tensor(per_step), 8).item()
    fired = [a.step for a in alerts if a.rule == "vq/usage_below"]
    assert (min(fired) if fired else None) == first


def test_a_total_collapse_in_windows_too_thin_for_the_usage_rule_still_alerts():
    """512 codes, 640 assignments per window: usage is not judged (usage_uniform 0.71), but
    one code where a uniform codebook would show 71% is a tenth of that and alerts; the same
    thin windows of a uniform stream do not."""
    K, n = 512, 64
    fired = {}
    g = torch.Generator().manual_seed(0)
    for name, make in (
        ("collapsed", lambda: torch.zeros(n, dtype=torch.long)),
        ("uniform", lambda: torch.randint(0, K, (n,), generator=g)),
    ):
        model = nn.Sequential()
        model.add_module("vq", Quantizer())
        alerts = []
        mon = CollapseMonitor(
            model, [probes.CodebookUsage("vq", K, name="vq")], 10, on_alert=alerts.append
        )
        m = None
        for _ in range(40):
            with mon.observe():
                model.vq(torch.zeros(n, 1), make())
            m = mon.step() or m
        mon.close()
        fired[name] = sorted({a.rule for a in alerts})
    assert m["collapse/vq/usage_ratio"] == pytest.approx(
        m["collapse/vq/usage"] / m["collapse/vq/usage_uniform"]
    )
    # (by step 40 the latest 37 steps hold the 2,357 assignments that make a sample: one code)
    assert fired == {"collapsed": ["vq/single_code", "vq/usage_collapsed"], "uniform": []}


def test_usage_of_the_latest_steps_that_hold_enough_samples():
    every_code = torch.arange(8).repeat(10)  # 80 indices: 10 per code
    two_codes = torch.tensor([0, 1]).repeat(40)
    _, (m,) = stream(probes.CodebookUsage("vq", 8, name="vq"), [every_code, two_codes], 2)
    assert m["collapse/vq/usage"] == 1.0 and m["collapse/vq/usage_recent"] == 0.25
    assert m["collapse/vq/usage_recent_steps"] == 1
    # the latest steps reach back until a uniform codebook would show 90% of its codes (the
    # sample the window needs for the usage rule): 1 - (7/8)^T >= 0.9 from T = 18; with fewer
    # the usage is low by construction
    _, (m,) = stream(probes.CodebookUsage("vq", 8, name="vq"), [every_code, two_codes[:18]], 2)
    assert (m["collapse/vq/usage_recent"], m["collapse/vq/usage_recent_steps"]) == (0.25, 1)
    _, (m,) = stream(probes.CodebookUsage("vq", 8, name="vq"), [every_code, two_codes[:17]], 2)
    assert (m["collapse/vq/usage_recent"], m["collapse/vq/usage_recent_steps"]) == (1.0, 2)
    _, (m,) = stream(probes.CodebookUsage("vq", 8, name="vq"), [two_codes[:17]], 1)
    assert "collapse/vq/usage_recent" not in m  # 17 indices in all: too few to judge


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recent_usage_across_logs_equals_a_by_hand_union_of_the_latest_steps(seed):
    # thin, uneven steps (several calls each), most codes dying part-way, logs every 3 steps:
    # the latest steps span logs; expected from the raw indices, independently
    K, g = 32, torch.Generator().manual_seed(seed)
    steps = []
    for s in range(40):
        live = K if s < 15 else 6
        n = int(torch.randint(4, 40, (), generator=g))
        steps.append(torch.randint(0, live, (n,), generator=g))
    q = nn.Sequential()
    q.add_module("vq", Quantizer())
    mon = CollapseMonitor(q, [probes.CodebookUsage("vq", K, name="vq")], 3)
    seen = 0
    for s, idx in enumerate(steps, 1):
        for part in idx.split(random_split(len(idx), 3, seed * 100 + s)):
            with mon.observe():
                q.vq(torch.zeros(len(part), 1), part)
        m = mon.step()
        if not m:
            continue
        n = next(
            (n for n in range(1, min(s, 128) + 1)
             if 1 - (1 - 1 / K) ** sum(len(t) for t in steps[s - n : s]) >= 0.9),
            None,
        )  # fmt: skip
        if n is None:
            assert "collapse/vq/usage_recent" not in m
            continue
        seen += 1
        hit = torch.cat(steps[s - n : s]).unique().numel() / K
        assert m["collapse/vq/usage_recent_steps"] == n
        assert m["collapse/vq/usage_recent"] == pytest.approx(hit, rel=1e-12)
    mon.close()
    assert seen >= 10


def alerts_of(num_codes, steps, name="vq"):
    """The last log and the alerts (step, rule) of a codebook fed ``steps``, logged every 10."""
    alerts, m = [], None
    q = nn.Sequential()
    q.add_module("vq", Quantizer())
    mon = CollapseMonitor(
        q, [probes.CodebookUsage("vq", num_codes, name=name)], 10, on_alert=alerts.append
    )
    for idx in steps:
        with mon.observe():
            q.vq(torch.zeros(len(idx), 1), idx)
        m = mon.step() or m
    mon.close()
    return m, sorted((a.step, a.rule) for a in alerts), alerts


def test_a_codebook_collapse_inside_the_first_window_alerts_at_its_first_log():
    # 64 codes, 64 indices a step: every code for 4 steps, then 4 codes. The window's usage
    # (all 64) hides it; the latest 5 steps (320 indices, where a uniform codebook shows 99%)
    # show 4 of 64 at the first log
    steps = [torch.arange(64)] * 4 + [torch.arange(4).repeat(16)] * 6
    m, fired, alerts = alerts_of(64, steps)
    assert m["collapse/vq/usage"] == 1.0 and m["collapse/vq/usage_recent"] == 4 / 64
    assert fired == [(10, "vq/usage_below")]
    assert "usage_recent = 0.0625" in alerts[0].message


def test_a_checkpoint_without_the_recent_steps_entry_still_loads():
    # saved before the probe kept its latest steps: that entry starts empty
    mon, _ = stream(probes.CodebookUsage("vq", 8, name="vq"), [torch.arange(8).repeat(10)])
    state = mon.state_dict()
    del state["probes"]["vq"]["window"]["entries"]["recent"]
    again, _ = stream(probes.CodebookUsage("vq", 8, name="vq"), [])
    again.load_state_dict(state)
    assert again.compute()["collapse/vq/samples"] == 80
    del state["probes"]["vq"]["window"]["entries"]["counts"]  # a real entry missing: an error
    with pytest.raises(KeyError, match="counts"):
        again.load_state_dict(state)
    # a glob kept per module: one window part per quantiser
    q = nn.Sequential()
    q.add_module("vq1", Quantizer())
    q.add_module("vq2", Quantizer())
    mon = CollapseMonitor(q, [probes.CodebookUsage("vq*", 8, name="vq")], 10)
    state = mon.state_dict()
    entries = state["probes"]["vq"]["window"]["entries"]
    for key in [k for k in entries if k.endswith("/recent")]:
        del entries[key]
    mon.load_state_dict(state)


def test_a_router_of_few_experts_on_one_expert_alerts_at_that_log():
    # one expert of 3 is usage 0.33, never past usage_below's severe 0.3: single_code reads the
    # recent steps; one of 4 (0.25) is past it, and both rules fire at that log
    def alerts_for(k, steps):
        return alerts_of(k, steps, name="r")[:2]

    for k, rules in ((3, ["r/single_code"]), (4, ["r/single_code", "r/usage_below"])):
        healthy = [torch.arange(k).repeat(8)] * 10
        m, fired = alerts_for(k, healthy[:6] + [torch.full((8 * k,), 2)] * 4)
        assert m["collapse/r/usage"] == 1.0 and m["collapse/r/codes_used_recent"] == 1.0
        assert m["collapse/r/usage_recent"] == 1 / k
        assert fired == [(10, rule) for rule in rules]
        assert alerts_for(k, healthy)[1] == []
    # two of 4 experts (0.5): neither the window (1.0) nor the latest steps cross 0.4
    healthy = [torch.arange(4).repeat(8)] * 10
    m, fired = alerts_for(4, healthy[:6] + [torch.tensor([1, 2]).repeat(16)] * 4)
    assert m["collapse/r/codes_used_recent"] == 2.0 and fired == []
