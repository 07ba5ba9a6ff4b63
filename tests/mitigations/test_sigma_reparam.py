import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, Rule, mitigations, probes
from collapse_monitor.mitigations import sigma_reparam
from tests.checkpoints import saved_and_loaded
from tests.probes.test_attention_entropy import SDPAAttention
from tests.test_monitor import Recorder


def test_function_preserved_spectral_norm_is_gamma_and_gamma_learns():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16)
    before = lin(x).detach()
    weight = lin.weight
    sigma_reparam(lin)
    assert lin.parametrizations.weight.original is weight  # optimizer state stays valid
    assert torch.allclose(lin(x), before, rtol=1e-5, atol=1e-6)
    gamma = lin.parametrizations.weight[0].gamma
    assert torch.linalg.matrix_norm(lin.weight.detach(), ord=2) == pytest.approx(
        gamma.item(), rel=1e-5
    )
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    for _ in range(3):
        loss = lin(x).pow(2).mean()
        loss.backward()
        assert gamma.grad is not None and gamma.grad.abs() > 0
        opt.step()
        opt.zero_grad()
    # the power iteration (one per training forward) converges again once the weight stops moving
    for _ in range(100):
        lin(x)
    with torch.no_grad():  # inspecting the weight does not advance the iteration
        u = lin.parametrizations.weight[0].u.clone()
        lin(x)
    assert torch.equal(u, lin.parametrizations.weight[0].u)
    assert torch.linalg.matrix_norm(lin.weight.detach(), ord=2) == pytest.approx(
        gamma.item(), rel=1e-5
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_start_is_exact_in_half_precision(dtype):
    """gamma from the SVD rounded to bfloat16 against sigma from a bfloat16 power iteration
    moved the weights by up to 0.9% at the start (0.78% with only sigma in float32): gamma now
    starts at the forward's own sigma, both rounded to the weight's dtype."""
    for seed in range(20):
        torch.manual_seed(seed)
        lin = nn.Linear(64, 48).to(dtype)
        before = lin.weight.detach().clone()
        sigma_reparam(lin)
        with torch.no_grad():
            assert torch.equal(lin.weight, before), seed
        gamma = lin.parametrizations.weight[0].gamma
        norm = torch.linalg.matrix_norm(before.double(), 2)
        assert gamma.dtype == dtype and float(gamma) == pytest.approx(float(norm), rel=2**-7)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    a, b = sigma_reparam(nn.Linear(6, 4)), sigma_reparam(nn.Linear(6, 4))
    with torch.no_grad():
        a.parametrizations.weight[0].gamma.mul_(1.7)
        a(torch.randn(2, 6))
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {
        "bias",
        "parametrizations.weight.original",
        "parametrizations.weight.0.gamma",
        "parametrizations.weight.0.u",
    }
    x = torch.randn(3, 6)
    assert torch.equal(a(x), b(x))


def test_modules_without_a_2d_weight_matrix_are_rejected():
    with pytest.raises(
        TypeError,
        match=r"needs a 2-D weight matrix: Conv2d.weight is Parameter of shape \(3, 3, 3, 3\)",
    ):
        sigma_reparam(nn.Conv2d(3, 3, 3))
    with pytest.raises(TypeError, match="LayerNorm.weight_x is NoneType"):
        sigma_reparam(nn.LayerNorm(4), name="weight_x")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = SDPAAttention()
        self.mlp = nn.Linear(32, 32)

    def forward(self, x):
        x = x + self.attn(x, causal=True)
        return x + self.mlp(x)


def blocks(n=2):
    torch.manual_seed(0)
    m = nn.Sequential(*[Block() for _ in range(n)])
    return m


def test_start_mode_reparametrises_attention_projections_only_and_feeds_the_optimizer():
    model = blocks()
    x = torch.randn(2, 6, 32)
    before = model(x).detach()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sink = Recorder()
    mon = CollapseMonitor(
        model,
        [probes.AttentionEntropy("*.attn", name="attn")],
        1,
        sinks=[sink],
        mitigations=[mitigations.SigmaReparam("*.attn")],
        observe_every_n_steps=1,
    )
    assert torch.allclose(model(x), before, rtol=1e-5, atol=1e-6)
    from torch.nn.utils import parametrize

    assert parametrize.is_parametrized(model[0].attn.q) and parametrize.is_parametrized(
        model[1].attn.kv
    )
    assert not parametrize.is_parametrized(model[0].mlp)
    with mon.observe():
        loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    mon.step(optimizer=opt)
    gammas = [g for g in opt.param_groups[1:] for _ in g["params"]]
    assert len(opt.param_groups) == 1 + 4 and all(g["weight_decay"] == 0.05 for g in gammas)
    assert sink.events[0][1] == "sigma_reparam" and sink.events[0][2]["count"] == 4


def train_steps(model, mon, opt, xs):
    for x in xs:
        with mon.observe():
            loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(optimizer=opt)


def rule_monitor(model, layer_glob="collapse/attn/0.attn/entropy_norm"):
    return CollapseMonitor(
        model,
        [probes.AttentionEntropy("*.attn", name="attn")],
        2,
        default_rules=False,
        rules=[Rule(layer_glob, 10.0, "below", name="attn/entropy_collapse")],
        mitigations=[mitigations.SigmaReparam("*.attn", when="rule")],
        observe_every_n_steps=1,
    )


def test_rule_mode_applies_to_the_layer_that_fired_and_resumes_exactly():
    from torch.nn.utils import parametrize

    xs = [torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    model = blocks()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = rule_monitor(model)
    train_steps(model, mon, opt, xs[:4])  # the rule fires at the log of step 2
    assert parametrize.is_parametrized(model[0].attn.q) and not parametrize.is_parametrized(
        model[1].attn.q
    )
    assert len(opt.param_groups) == 3  # two gammas, one group each
    state = saved_and_loaded(
        model=model.state_dict(), opt=opt.state_dict(), monitor=mon.state_dict()
    )

    resumed = blocks()
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    mon2 = rule_monitor(resumed)
    mon2.load_state_dict(state["monitor"], optimizer=opt2)  # re-applies σReparam first
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    train_steps(model, mon, opt, xs[4:])
    train_steps(resumed, mon2, opt2, xs[4:])
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_bad_selection_names_what_it_found():
    with pytest.raises(ValueError, match=r"no attention projection.*\['mlp'\]"):
        model = nn.Sequential()
        model.add_module("mlp", nn.Linear(3, 3))
        CollapseMonitor(
            model, [], mitigations=[mitigations.SigmaReparam("mlp")], observe_every_n_steps=1
        )


def test_a_tied_head_is_left_out_and_said(caplog):
    """σReparam over every projection of GPT-2 reparametrised its head, whose weight is the
    embedding's: after 3 Adam steps the head's effective weight differed from the embedding by
    0.025, the tie silently broken. A weight shared with another module is left out."""
    import logging

    import transformers

    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    with caplog.at_level(logging.WARNING, logger="collapse_monitor"):
        mon = CollapseMonitor(
            model, [], mitigations=[mitigations.SigmaReparam("", all_linear=True)]
        )
    assert "'lm_head.weight' is one Parameter with ['transformer.wte.weight']" in caplog.text
    parametrized = [n for n, m in model.named_modules() if hasattr(m, "parametrizations")]
    assert "lm_head" not in parametrized and "transformer.h.0.attn.c_attn" in parametrized
    assert "transformer.h.0.mlp.c_fc" in parametrized  # (all_linear: the MLP too)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 8))
    for _ in range(3):
        with mon.observe():
            model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        mon.step(optimizer=opt)
    mon.close()
    assert torch.equal(model.lm_head.weight, model.transformer.wte.weight)


def test_a_block_reused_is_no_tie_and_the_start_is_exact_under_autocast():
    """One attention block registered twice (weight sharing by reuse: both uses go through the
    same parametrized module) was taken for a tie and left nothing to reparametrise; under a
    bfloat16 autocast the float32 sigma ran in bfloat16 again (gamma / sigma - 1 = 1.6e-3)."""
    torch.manual_seed(0)
    block = nn.Module()
    block.attn = nn.Module()
    block.attn.proj = nn.Linear(16, 16)
    model = nn.Sequential(block, block)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model[0].attn.proj(x)
    CollapseMonitor(model, [], mitigations=[mitigations.SigmaReparam("*.attn")]).close()
    assert hasattr(block.attn.proj, "parametrizations")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model[0].attn.proj(x), before)


def test_the_start_is_exact_for_a_float32_gpt2_under_a_bfloat16_autocast():
    """Registering the parametrization evaluated it once in training mode, which advanced u:
    the first forward's sigma then differed from gamma by a float32 step, and a bfloat16
    autocast rounded some weights anew (GPT-2's logits moved by 1e-3)."""
    import transformers

    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()  # (no dropout in the comparison)
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(ids).logits
    w = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    model.train()  # (as a run builds its monitor)
    CollapseMonitor(model, [], mitigations=[mitigations.SigmaReparam("transformer.h.*.attn")])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.transformer.h[0].attn.c_attn.weight, w)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(model(ids).logits, before)


def test_rule_mode_resumes_exactly_from_a_distributed_checkpoint(tmp_path):
    """torch.distributed.checkpoint loads into a template of the model's parameters: the
    monitor is loaded first (its own dcp.load), which re-applies σReparam, so the model's
    template then holds the gammas the checkpoint has."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    xs = [torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    model = blocks()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = rule_monitor(model)
    train_steps(model, mon, opt, xs[:4])  # σReparam on block 0 since the log of step 2
    model_sd, opt_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "opt": opt_sd, "monitor": mon.stateful()}
    dcp.save(state, checkpoint_id=tmp_path, no_dist=True)

    resumed = blocks()
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    mon2 = rule_monitor(resumed)
    dcp.load({"monitor": mon2.stateful(opt2)}, checkpoint_id=tmp_path, no_dist=True)
    model_sd, opt_sd = get_state_dict(resumed, opt2)  # the template, gammas included
    dcp.load({"model": model_sd, "opt": opt_sd}, checkpoint_id=tmp_path, no_dist=True)
    set_state_dict(resumed, opt2, model_state_dict=model_sd, optim_state_dict=opt_sd)
    train_steps(model, mon, opt, xs[4:])
    train_steps(resumed, mon2, opt2, xs[4:])
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_gradient_checkpointed_gpt2_trains_as_without_checkpointing(reentrant):
    """Activation checkpointing reruns the forward during the backward pass; a non-reentrant
    rerun advanced u a second time and took the gradient at another sigma (after 4 AdamW steps the
    logits moved against the same run without checkpointing). It now starts where its forward
    started: the two runs agree exactly."""
    import transformers

    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    runs = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(cfg).train()
        if checkpointed:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        mon = CollapseMonitor(
            model, [], mitigations=[mitigations.SigmaReparam("transformer.h.*.attn")]
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(4):
            with mon.observe():
                out = model(ids, labels=ids)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            mon.step(optimizer=opt)
        mlp = model.transformer.h[1].attn.c_attn.parametrizations.weight[0]
        runs.append((out.logits.detach(), mlp.u.clone(), mlp.gamma.detach().clone()))
        mon.close()
    for plain, checkpointed in zip(*runs):
        assert torch.equal(plain, checkpointed)
