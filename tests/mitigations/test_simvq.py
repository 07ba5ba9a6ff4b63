import importlib.util
import statistics
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from vector_quantize_pytorch import VectorQuantize

from collapse_monitor import CollapseMonitor, Rule, mitigations, probes
from tests.checkpoints import saved_and_loaded
from tests.mitigations.test_reset_dead_codes import VQ


class AutoEncoder(nn.Module):
    def __init__(self, quantizer=None, K=16, D=4):
        super().__init__()
        self.enc = nn.Linear(8, D)
        self.vq = quantizer if quantizer is not None else VQ(K, D)
        self.dec = nn.Linear(D, 8)

    def forward(self, x):
        q, _, commit = self.vq(self.enc(x))
        return self.dec(q), commit.sum()


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 8, generator=g) for _ in range(n)]


def train(model, mon, opt, xs):
    for x in xs:
        with mon.observe():
            recon, commit = model(x)
        ((recon - x).pow(2).mean() + commit).backward()
        opt.step()
        opt.zero_grad()
        mon.step(optimizer=opt)


def rule_monitor(model, when="rule"):
    return CollapseMonitor(
        model,
        [probes.CodebookUsage("vq", 16, name="vq")],
        2,
        default_rules=False,
        rules=[Rule("collapse/vq/usage", 2.0, "below", name="vq/usage_below")],  # fires at once
        mitigations=[mitigations.SimVQ("vq", when=when)],
    )


@pytest.mark.parametrize("basis", ["codebook", None])
def test_the_switch_keeps_the_function_or_starts_as_the_paper_and_feeds_the_optimizer(basis):
    torch.manual_seed(0)
    model = AutoEncoder()
    x = torch.randn(64, 8)
    before = model(x)[0].detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    simvq_ = mitigations.SimVQ("vq", optimizer=opt, basis=basis)
    mon = CollapseMonitor(model, [], 2, mitigations=[simvq_])
    assert parametrize.is_parametrized(model.vq.codebook, "weight")
    simvq = model.vq.codebook.parametrizations.weight[0]
    if basis == "codebook":
        assert torch.equal(model(x)[0], before)  # C I + 0 = C exactly
    else:  # the authors' start: C ~ N(0, 1/D) frozen, W and b as nn.Linear(D, D) draws them
        D, bound = 4, 4**-0.5
        assert simvq.frozen.std().item() == pytest.approx(D**-0.5, rel=0.3)
        assert simvq.weight.abs().max() <= bound and simvq.bias.abs().max() <= bound
        assert not torch.equal(simvq.weight, torch.eye(D))
        want = simvq.frozen @ simvq.weight + simvq.bias
        assert torch.allclose(model.vq.codebook.weight, want)
    held = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert id(simvq.weight) in held and id(simvq.bias) in held
    assert held[id(simvq.weight)]["momentum"] == 0.9 and held[id(simvq.weight)]["lr"] == 0.1
    frozen = simvq.frozen.clone()
    codebook = model.vq.codebook.weight.detach().clone()
    train(model, mon, opt, batches(4))
    assert torch.equal(simvq.frozen, frozen)  # C stays frozen
    moved = (model.vq.codebook.weight - codebook).norm(dim=1)
    assert bool((moved > 0).all())  # every code moved, chosen or not: the point of SimVQ
    assert mon.mitigation_counts["simvq"] == 1
    mon.close()


def test_rule_mode_applies_at_the_log_without_changing_the_function_and_resumes_exactly():
    xs = batches(8)
    torch.manual_seed(0)
    model = AutoEncoder()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = rule_monitor(model)
    train(model, mon, opt, xs[:2])  # the log of step 2: the rule fires, SimVQ is applied
    assert parametrize.is_parametrized(model.vq.codebook, "weight")
    assert len(opt.param_groups) == 2  # W and b, in a group of their own
    simvq = model.vq.codebook.parametrizations.weight[0]
    assert torch.equal(simvq.weight, torch.eye(4)) and torch.equal(simvq.bias, torch.zeros(4))
    assert torch.equal(simvq.frozen, model.vq.codebook.parametrizations.weight.original)
    train(model, mon, opt, xs[2:4])
    state = saved_and_loaded(
        model=model.state_dict(), opt=opt.state_dict(), monitor=mon.state_dict()
    )
    resumed = AutoEncoder()
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    mon2 = rule_monitor(resumed)
    mon2.load_state_dict(state["monitor"], optimizer=opt2)  # re-applies SimVQ first
    resumed.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    train(model, mon, opt, xs[4:])
    train(resumed, mon2, opt2, xs[4:])
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert mon2.mitigation_counts["simvq"] == 1  # applied once, not again on resume


def test_the_function_is_unchanged_at_the_switch_mid_training():
    torch.manual_seed(0)
    model = AutoEncoder()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = rule_monitor(model)
    xs = batches(2)
    train(model, mon, opt, xs[:1])
    x = torch.randn(16, 8)
    with mon.observe():  # step 2 up to its log
        recon, commit = model(xs[1])
    ((recon - xs[1]).pow(2).mean() + commit).backward()
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        before = model(x)[0]
    mon.step(optimizer=opt)  # applies SimVQ
    assert parametrize.is_parametrized(model.vq.codebook, "weight")
    with torch.no_grad():
        assert torch.equal(model(x)[0], before)


def test_vector_quantize_pytorch_learnable_codebook():
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=16, learnable_codebook=True, ema_update=False)
    model = AutoEncoder(vq)
    x = torch.randn(64, 8)
    model.eval()
    before = model(x)[0].detach().clone()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mon = CollapseMonitor(
        model,
        [probes.CodebookUsage("vq", 16, name="vq")],
        2,
        mitigations=[mitigations.SimVQ("vq", optimizer=opt, basis="codebook")],
    )
    assert parametrize.is_parametrized(vq._codebook, "embed")
    model.eval()
    assert torch.equal(model(x)[0], before)
    model.train()
    frozen = vq._codebook.parametrizations.embed[0].frozen.clone()
    train(model, mon, opt, batches(4))
    assert torch.equal(vq._codebook.parametrizations.embed[0].frozen, frozen)
    assert not torch.equal(vq._codebook.embed, frozen)  # learned through W and b
    mon.close()


def test_ema_codebooks_and_missing_codebooks_are_clear_errors():
    with pytest.raises(TypeError, match="learned codebook.*EMA"):
        CollapseMonitor(
            AutoEncoder(VectorQuantize(dim=4, codebook_size=16)),
            [],
            mitigations=[mitigations.SimVQ("vq")],
        )
    with pytest.raises(ValueError, match="cannot tell which tensor"):
        CollapseMonitor(AutoEncoder(), [], mitigations=[mitigations.SimVQ("enc")])


def test_the_original_codebook_gets_no_gradient_and_a_repeated_rule_applies_once():
    torch.manual_seed(0)
    model = AutoEncoder()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = CollapseMonitor(
        model,
        [probes.CodebookUsage("vq", 16, name="vq")],
        2,
        default_rules=False,
        rules=[Rule("collapse/vq/usage", 2.0, "below", repeat=True, name="vq/usage_below")],
        mitigations=[mitigations.SimVQ("vq", when="rule")],
        strict=True,
    )
    train(model, mon, opt, batches(6))  # the rule fires at every log: SimVQ once, no error
    assert mon.mitigation_counts["simvq"] == 1
    x = batches(1, seed=9)[0]
    recon, commit = model(x)
    ((recon - x).pow(2).mean() + commit).backward()
    original = model.vq.codebook.parametrizations.weight.original
    assert original.grad is not None and not original.grad.any()  # in the graph, times zero
    mon.close()


# the authors' SimVQ (youngsheen/SimVQ at d8bd94d, taming/modules/vqvae/quantize.py, fetched when
# this was written, not vendored) on benchmarks/simvq_side_by_side.py's autoencoder: final usage
# per seed, recorded by `python benchmarks/simvq_side_by_side.py --authors PATH` (RESULTS.md 8)
AUTHORS_USAGE = {0: 0.938, 1: 0.939, 2: 0.938}


def test_the_default_start_reaches_the_authors_usage():
    spec = importlib.util.spec_from_file_location(
        "simvq_side_by_side", Path(__file__).parents[2] / "benchmarks" / "simvq_side_by_side.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the benchmark runs
    try:
        ours = [bench.train("ours", seed) for seed in AUTHORS_USAGE]
        function_preserving = bench.train("ours_codebook", 0)
    finally:
        torch.set_num_threads(threads)
    authors = statistics.mean(AUTHORS_USAGE.values())
    assert abs(statistics.mean(ours) - authors) <= 0.03, (ours, authors)
    assert function_preserving < authors - 0.1  # the start is what the usage comes from
