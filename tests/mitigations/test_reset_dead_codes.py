import math

import pytest
import torch
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from collapse_monitor import CollapseMonitor, Rule, mitigations, probes
from tests.checkpoints import saved_and_loaded
from tests.test_monitor import Recorder


class VQ(nn.Module):
    """A minimal learned-codebook quantiser (van den Oord et al.): nn.Embedding + argmin."""

    def __init__(self, K=16, D=4):
        super().__init__()
        self.codebook = nn.Embedding(K, D)

    def forward(self, z):
        idx = torch.cdist(z, self.codebook.weight).argmin(-1)
        q = self.codebook(idx)
        return z + (q - z).detach(), idx, (q - z.detach()).pow(2).mean()


class Model(nn.Module):
    def __init__(self, quantizer):
        super().__init__()
        self.vq = quantizer

    def forward(self, z):
        return self.vq(z)[0]


def concentrated(n, D, centers=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centers, D, generator=g) * 3
    return c[torch.randint(0, centers, (n,), generator=g)] + 0.01 * torch.randn(n, D, generator=g)


def run(model, mon, batches, optimizer=None):
    out = []
    for z in batches:
        with mon.observe():
            y = model(z)
        if optimizer is not None:
            (y.pow(2).mean() + model.vq(z)[2]).backward()
            optimizer.step()
            optimizer.zero_grad()
        m = mon.step(optimizer=optimizer)
        if m:
            out.append(m)
    return out


def test_learned_codebook_reset_rows_and_adam_moments():
    torch.manual_seed(0)
    K, D = 16, 4
    model = Model(VQ(K, D))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sink = Recorder()
    probe = probes.CodebookUsage("vq", K, ema_decay=0.5, warmup_steps=2)
    mon = CollapseMonitor(
        model,
        [probe],
        4,
        sinks=[sink],
        mitigations=[mitigations.ResetDeadCodes("vq", every_step=False)],
        observe_every_n_steps=1,
    )
    batches = [concentrated(64, D, seed=i) for i in range(4)]
    run(model, mon, batches[:3], opt)
    # the last step of the window, watched closely
    state = {k: v.clone() for k, v in opt.state[model.vq.codebook.weight].items()}
    with mon.observe():
        (model(batches[3]).pow(2).mean() + model.vq(batches[3])[2]).backward()
    opt.step()
    opt.zero_grad()
    after_opt = model.vq.codebook.weight.detach().clone()
    metrics = mon.step(optimizer=opt)
    weight = model.vq.codebook.weight.detach()
    changed = (weight != after_opt).any(1)
    n = int(changed.sum())
    assert n > 0 and metrics["collapse/mitigations/reset_dead_codes"] == n
    assert sink.events[-1][1] == "reset_dead_codes" and sink.events[-1][2]["count"] == n
    # replaced rows are vectors of the current batch; the others are what the optimizer left
    for row in weight[changed]:
        assert (batches[3] == row).all(1).any()
    assert torch.equal(weight[~changed], after_opt[~changed])
    st = opt.state[model.vq.codebook.weight]
    for key in ("exp_avg", "exp_avg_sq"):
        assert (st[key][changed] == 0).all() and (st[key][~changed] != 0).any()
    assert st["step"] == state["step"] + 1  # the step count is kept
    # the replaced codes restart their usage memory: the next readout no longer calls them dead
    mon.compute()
    assert not mon.driver(probe).last.masks[probe.key("dead")][0][changed].any()


def test_vector_quantize_pytorch_ema_codebook_is_probed_and_reset():
    torch.manual_seed(0)
    K, D = 32, 8
    vq = VectorQuantize(dim=D, codebook_size=K, decay=0.8)
    model = Model(vq)
    probe = probes.CodebookUsage("vq", K, ema_decay=0.5, warmup_steps=2)  # no extract=
    reset = mitigations.ResetDeadCodes("vq", every_step=False)
    mon = CollapseMonitor(model, [probe], 3, mitigations=[reset], observe_every_n_steps=1)
    assert reset.codebook_path == "_codebook.embed"
    assert reset.ema_paths == ("_codebook.cluster_size", "_codebook.embed_avg")
    batches = [concentrated(128, D, seed=i).reshape(4, 32, D) for i in range(3)]
    run(model, mon, batches[:2])
    with mon.observe():
        model(batches[2])
    embed_before = vq._codebook.embed.detach().clone()
    metrics = mon.step()
    embed = vq._codebook.embed[0]
    changed = (embed != embed_before[0]).any(1)
    n = int(changed.sum())
    assert n > K // 2 and metrics["collapse/mitigations/reset_dead_codes"] == n
    flat = batches[2].reshape(-1, D)
    for row in embed[changed]:
        assert (flat == row).all(1).any()
    size = vq._codebook.cluster_size[0]
    assert torch.equal(size[changed], torch.ones(n))
    assert torch.allclose(vq._codebook.embed_avg[0][changed], embed[changed])
    # the next EMA update keeps a replaced code that got no hits
    kept = embed[changed].clone()
    used = vq(batches[0])[1].unique()
    with torch.no_grad():
        vq(batches[0])
    idle = changed.clone()
    idle[used] = False
    assert torch.allclose(vq._codebook.embed[0][idle], kept[idle[changed]], rtol=1e-3, atol=1e-4)


def test_farthest_strategy_takes_the_worst_quantised_vectors():
    torch.manual_seed(0)
    K, D = 8, 3
    model = Model(VQ(K, D))
    probe = probes.CodebookUsage("vq", K, ema_decay=0.0, warmup_steps=0)
    mon = CollapseMonitor(
        model,
        [probe],
        1,
        mitigations=[mitigations.ResetDeadCodes("vq", strategy="farthest")],
        observe_every_n_steps=1,
    )
    z = torch.randn(50, D)
    with torch.no_grad(), mon.observe():
        model(z)
    cb = model.vq.codebook.weight.detach().clone()
    dead = torch.ones(K, dtype=torch.bool)
    dead[model.vq(z)[1].unique()] = False
    mon.step()
    far = torch.cdist(z, cb).min(1).values.argsort(descending=True)[: int(dead.sum())]
    assert torch.equal(model.vq.codebook.weight[dead].detach(), z[far])


def test_gating_by_rule_and_by_step():
    model = Model(VQ(8, 3))
    probe = probes.CodebookUsage("vq", 8, ema_decay=0.0, warmup_steps=0)
    never = mitigations.ResetDeadCodes("vq", when_rule="vq/usage_below")
    mon = CollapseMonitor(
        model,
        [probe],
        1,
        mitigations=[never],
        default_rules=False,
        rules=[Rule("collapse/vq/usage", -1, "below", name="vq/usage_below")],
        observe_every_n_steps=1,
    )
    before = model.vq.codebook.weight.detach().clone()
    run(model, mon, [torch.zeros(10, 3)] * 2)
    assert torch.equal(model.vq.codebook.weight, before)
    with pytest.raises(ValueError, match="multiple of log_every_n_steps"):
        CollapseMonitor(
            Model(VQ(8, 3)),
            [probes.CodebookUsage("vq", 8)],
            4,
            mitigations=[mitigations.ResetDeadCodes("vq", every_n_steps=6)],
            observe_every_n_steps=1,
        )


def test_configuration_errors():
    class TwoTables(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.zeros(8, 3)), nn.Parameter(torch.zeros(8, 3))

        def forward(self, x):
            return x, torch.zeros(len(x), dtype=torch.long)

    model = nn.Sequential()
    model.add_module("vq", TwoTables())
    with pytest.raises(ValueError, match="pass codebook="):
        CollapseMonitor(
            model,
            [probes.CodebookUsage("vq", 8)],
            mitigations=[mitigations.ResetDeadCodes("vq", every_step=False)],
            observe_every_n_steps=1,
        )
    mon = CollapseMonitor(
        model,
        [probes.CodebookUsage("vq", 8)],
        mitigations=[mitigations.ResetDeadCodes("vq", codebook="b")],
        observe_every_n_steps=1,
    )
    assert mon.mitigations[0].codebook_path == "b"
    mon.close()
    with pytest.raises(ValueError, match="needs one CodebookUsage probe"):
        CollapseMonitor(
            model,
            [],
            mitigations=[mitigations.ResetDeadCodes("vq", codebook="a")],
            observe_every_n_steps=1,
        )
    with pytest.raises(ValueError, match=r"expected \(5, D\)"):
        CollapseMonitor(
            model,
            [probes.CodebookUsage("vq", 5)],
            mitigations=[mitigations.ResetDeadCodes("vq", codebook="a")],
            observe_every_n_steps=1,
        )
    assert not model.vq._forward_hooks


@pytest.mark.parametrize(
    "make",
    [
        lambda vqp: vqp.LFQ(dim=4, codebook_size=16),
        lambda vqp: vqp.FSQ(levels=[5, 3, 3]),
        lambda vqp: vqp.ResidualFSQ(dim=8, levels=[5, 3, 3], num_quantizers=2),
        lambda vqp: vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2),
    ],
)
@pytest.mark.parametrize("mitigation", ["reset", "simvq"])
def test_a_quantiser_without_a_learned_codebook_is_refused_and_left_alone(make, mitigation):
    # LFQ's codes are the signs of its input and FSQ's its rounded levels: their tables are
    # constants (LFQ's feeds its entropy loss), which a reset overwrote with encoder outputs
    import vector_quantize_pytorch as vqp

    quantiser = make(vqp)
    model = nn.ModuleDict({"q": quantiser})
    before = {k: v.clone() for k, v in quantiser.state_dict().items()}
    heads = getattr(quantiser, "num_quantizers", 1)
    size = getattr(quantiser, "codebook_size", 45)
    made = mitigations.ResetDeadCodes("q") if mitigation == "reset" else mitigations.SimVQ("q")
    with pytest.raises(ValueError, match="not a learned codebook: nothing to reset"):
        CollapseMonitor(model, [probes.CodebookUsage("q", size, heads=heads)], mitigations=[made])
    assert all(torch.equal(v, before[k]) for k, v in quantiser.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_every_step_replaces_unused_codes_between_logs_like_vector_quantize_pytorch():
    torch.manual_seed(0)
    K, D = 16, 4
    model = Model(VQ(K, D))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    reset = mitigations.ResetDeadCodes("vq", dead_hits=2)  # every step, the vqp rule
    mon = CollapseMonitor(model, [probes.CodebookUsage("vq", K, name="vq")], 3, mitigations=[reset])
    total = 0
    for step in range(3):
        z = concentrated(64, D, seed=step)  # two clusters: most codes are never chosen
        before = model.vq.codebook.weight.detach().clone()
        used = torch.cdist(z, before).argmin(1).unique()
        logged = run(model, mon, [z], opt)
        after = model.vq.codebook.weight.detach()
        replaced = (after[:, None] == z[None]).all(-1).any(1) & (after != before).any(1)
        if step == 0:  # every code no batch has chosen yet is a row of this batch now
            dead = torch.ones(K, dtype=torch.bool)
            dead[used] = False
            assert torch.equal(replaced, dead)
        # (later, the usage EMA protects codes replaced a step ago)
        assert not opt.state[model.vq.codebook.weight]["exp_avg"][replaced].any()
        total += int(replaced.sum())
        assert bool(logged) == (step == 2)  # nothing waits for the log
    assert logged[0]["collapse/mitigations/reset_dead_codes"] == total  # one event at the log
    with pytest.raises(ValueError, match="every_step"):
        mitigations.ResetDeadCodes("vq", every_step=True, every_n_steps=3)
    mon.close()


@pytest.mark.parametrize("batch", [16, 64, 256])
def test_the_default_replaces_codes_unused_for_ten_uniform_shares_and_never_a_used_one(batch):
    """Default rule: dead after ceil(10 K / T) recorded steps without a hit. A healthy codebook
    (every code on one of the data's cluster centres) keeps every code whatever the batch
    (batch = K gets 1 hit per code per step, where a fixed 2 hits per step called most codes
    dead); codes far from the data are replaced exactly when their time is up."""
    torch.manual_seed(0)
    K, D = 16, 4
    centres = torch.randn(K, D) * 3
    model = Model(VQ(K, D))
    with torch.no_grad():
        model.vq.codebook.weight.copy_(centres)
        model.vq.codebook.weight[:4] += 100.0  # four codes no input will ever choose
    reset = mitigations.ResetDeadCodes("vq")
    mon = CollapseMonitor(model, [probes.CodebookUsage("vq", K)], 10**6, mitigations=[reset])
    patience = math.ceil(10 * K / batch)
    g = torch.Generator().manual_seed(1)
    for step in range(1, 40):
        before = model.vq.codebook.weight.detach().clone()
        z = centres[torch.randint(4, K, (batch,), generator=g)]  # the far codes' centres unused
        z = z + 0.1 * torch.randn(batch, D, generator=g)
        run(model, mon, [z])
        changed = (model.vq.codebook.weight != before).any(1)
        assert not changed[4:].any(), step  # a used code is never replaced
        if step == patience:  # the far codes are replaced exactly when their time is up
            assert changed[:4].all()
        elif step < patience:
            assert not changed.any()
    mon.close()


def test_options_that_need_a_log_select_the_form_acting_at_logs():
    assert mitigations.ResetDeadCodes("vq").every_step
    for kw in ({"every_n_steps": 4}, {"when_rule": "vq/usage_below"}, {"strategy": "farthest"}):
        assert not mitigations.ResetDeadCodes("vq", **kw).every_step
        with pytest.raises(ValueError, match="every_step=True acts at every step"):
            mitigations.ResetDeadCodes("vq", every_step=True, **kw)


def test_every_step_resets_wait_on_the_steps_their_probe_does_not_record():
    # observe_every_n_steps=2: the probe records every other step; its hits EMA must not decay,
    # nor codes be replaced, on the steps between (as if those steps never happened)
    torch.manual_seed(0)
    K, D = 16, 4
    model = Model(VQ(K, D))
    probe = probes.CodebookUsage("vq", K)
    reset = mitigations.ResetDeadCodes("vq", dead_hits=2)
    mon = CollapseMonitor(model, [probe], 4, mitigations=[reset], observe_every_n_steps=2)
    changed = []
    for step in range(8):
        recorded = mon.records(probe)
        before = model.vq.codebook.weight.detach().clone()
        run(model, mon, [concentrated(64, D, seed=step)])
        changed.append((recorded, bool((model.vq.codebook.weight != before).any())))
    assert [r for r, _ in changed] == [True, False] * 4
    assert changed[0] == (True, True)  # the first recorded step replaces the unused codes
    assert not any(c for r, c in changed if not r)
    mon.close()


def test_every_step_on_an_ema_codebook_replaces_exactly_what_vector_quantize_pytorch_would():
    # vector-quantize-pytorch's rule: a code is dead when the codebook's own EMA cluster size
    # (decay 0.8, updated in the forward) is below 2, and a replaced code restarts at 2
    torch.manual_seed(0)
    K, D = 32, 8
    vq = VectorQuantize(dim=D, codebook_size=K, threshold_ema_dead_code=0)
    model = Model(vq)
    reset = mitigations.ResetDeadCodes("vq", every_step=True, dead_hits=2)
    mon = CollapseMonitor(model, [probes.CodebookUsage("vq", K)], 10, mitigations=[reset])
    seen = []  # the codebook after the forward's EMA update, before the monitor's step
    cb = vq._codebook
    hook = vq.register_forward_hook(
        lambda *_: seen.append((cb.cluster_size[0].clone(), cb.embed[0].detach().clone()))
    )
    for step in range(6):
        run(model, mon, [torch.randn(4, 32, D)])  # ~4 hits per code: some just below 2
        size, embed = seen[-1]
        replaced = (cb.embed[0] != embed).any(-1)
        assert torch.equal(replaced, size < 2), step
        assert (cb.cluster_size[0][replaced] == 2).all() and 0 < int(replaced.sum()) < K
    hook.remove()
    mon.close()


def test_every_step_resets_resume_exactly():

    def build():
        torch.manual_seed(0)
        model = Model(VQ(16, 4))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        reset = mitigations.ResetDeadCodes("vq", every_step=True)
        mon = CollapseMonitor(model, [probes.CodebookUsage("vq", 16)], 3, mitigations=[reset])
        return model, opt, mon

    zs = [concentrated(64, 4, seed=s) for s in range(6)]
    model, opt, mon = build()
    run(model, mon, zs[:4], opt)  # a log at step 3, then one step into the next window
    state = saved_and_loaded(m=model.state_dict(), o=opt.state_dict(), mon=mon.state_dict())
    model2, opt2, mon2 = build()
    mon2.load_state_dict(state["mon"], optimizer=opt2)
    model2.load_state_dict(state["m"])
    opt2.load_state_dict(state["o"])
    a, b = run(model, mon, zs[4:], opt), run(model2, mon2, zs[4:], opt2)
    assert torch.equal(model.vq.codebook.weight, model2.vq.codebook.weight)
    assert a == b and a[0]["collapse/mitigations/reset_dead_codes"] > 0


class ChannelsFirstVQ(VQ):
    """A VQGAN-style quantiser: a (B, D, H, W) latent, codes along the channels."""

    def forward(self, z):
        flat = z.permute(0, 2, 3, 1)
        q, idx, loss = super().forward(flat)
        return q.permute(0, 3, 1, 2), idx, loss


def replaced_once(quantizer, z):
    """One logged step of the default ResetDeadCodes on ``quantizer``'s input ``z``: the
    codebook rows it replaced."""
    K = quantizer.codebook.num_embeddings
    model = Model(quantizer)
    mon = CollapseMonitor(
        model,
        [probes.CodebookUsage("vq", K, warmup_steps=0)],
        1,
        mitigations=[mitigations.ResetDeadCodes("vq", dead_hits=2)],  # dead at the first step
        strict=True,
    )
    before = model.vq.codebook.weight.detach().clone()
    try:
        with mon.observe():
            model(z)
        mon.step()
    finally:
        mon.close()
    weight = model.vq.codebook.weight.detach()
    return weight[(weight != before).any(1)]


@pytest.mark.parametrize("width", [5, 4])
def test_a_channels_first_latent_gives_code_space_vectors_or_is_refused(width):
    """With width = D = 4 the rows along the width are no code-space vectors: the layout is
    ambiguous and refused (vectors= says it); otherwise the channel axis is read as codes."""
    torch.manual_seed(0)
    K, D = 16, 4
    z = concentrated(2 * 3 * width, D).view(2, 3, width, D).permute(0, 3, 1, 2)  # (B, D, H, W)
    if width == D:
        with pytest.raises(ValueError, match="both axis 1 and axis -1 have the code dimension"):
            replaced_once(ChannelsFirstVQ(K, D), z)
        return
    rows = replaced_once(ChannelsFirstVQ(K, D), z)
    vectors = z.permute(0, 2, 3, 1).reshape(-1, D)
    assert len(rows) > 0
    for row in rows:
        assert (vectors == row).all(1).any()  # a latent position's channel vector


class DeclaredChannelsFirstVQ(ChannelsFirstVQ):
    accept_image_fmap = True  # as vector-quantize-pytorch's VectorQuantize says it


class SequenceChannelsFirstVQ(VQ):
    """A codec-style quantiser on (B, D, T) sequences."""

    def forward(self, z):
        q, idx, loss = super().forward(z.transpose(1, 2))
        return q.transpose(1, 2), idx, loss


@pytest.mark.parametrize("case", ["declared_4d_width_eq_d", "sequence_3d"])
def test_the_code_axis_is_read_from_the_quantiser_or_its_one_d_long_axis(case):
    torch.manual_seed(0)
    K, D = 16, 4
    if case == "declared_4d_width_eq_d":  # ambiguous by shape, said by the quantiser
        quantizer, z = DeclaredChannelsFirstVQ(K, D), concentrated(24, D).view(2, 3, 4, D)
        z, vectors = z.permute(0, 3, 1, 2), z.reshape(-1, D)
    else:
        quantizer, z = SequenceChannelsFirstVQ(K, D), concentrated(14, D).view(2, 7, D)
        z, vectors = z.transpose(1, 2), z.reshape(-1, D)
    rows = replaced_once(quantizer, z)
    assert len(rows) > 0
    for row in rows:
        assert (vectors == row).all(1).any()


def test_a_checkpoint_of_the_other_dead_rule_is_refused():
    """The default rule counts steps since a hit, dead_hits=2 keeps an EMA of hits: each other's
    memory would be read as a plausible wrong number, so it is refused."""
    torch.manual_seed(0)
    states = {}
    for name, kw in (("ema", {"dead_hits": 2}), ("since", {})):
        model = Model(VQ(16, 4))
        mon = CollapseMonitor(
            model,
            [probes.CodebookUsage("vq", 16)],
            2,
            mitigations=[mitigations.ResetDeadCodes("vq", **kw)],
        )
        run(model, mon, [concentrated(64, 4, seed=s) for s in range(2)])
        states[name] = mon.state_dict()
        mon.close()
    model = Model(VQ(16, 4))
    mon = CollapseMonitor(
        model, [probes.CodebookUsage("vq", 16)], 2, mitigations=[mitigations.ResetDeadCodes("vq")]
    )
    loaded = saved_and_loaded(**states)
    mon.load_state_dict(loaded["since"])
    with pytest.raises(ValueError, match="other dead rule"):
        mon.load_state_dict(loaded["ema"])
    mon.close()


@pytest.mark.parametrize("every_step", [True, False])
def test_rows_with_nan_are_never_drawn_into_the_codebook(every_step):
    """A few NaN encoder rows (skipped by the probe) must not become codes."""
    torch.manual_seed(0)
    K, D = 16, 4
    model = Model(VQ(K, D))
    reset = (
        mitigations.ResetDeadCodes("vq", dead_hits=2)
        if every_step
        else (mitigations.ResetDeadCodes("vq", every_step=False))
    )
    mon = CollapseMonitor(
        model, [probes.CodebookUsage("vq", K, warmup_steps=0)], 1, mitigations=[reset]
    )
    for seed in range(3):
        z = concentrated(64, D, seed=seed)
        z[:48] = float("nan")  # most rows: a draw would meet them
        run(model, mon, [z])
    weight = model.vq.codebook.weight.detach()
    assert torch.isfinite(weight).all()
    assert mon.mitigation_counts["reset_dead_codes"] > 0  # codes were replaced, from real rows
    mon.close()
