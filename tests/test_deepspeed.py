"""DeepSpeed (ZeRO stages 0-3) in a plain loop, on 2 gloo CPU processes: every probe the monitor
is built with logs what one process logs on the union of the ranks' batches (a learning rate
of 0 keeps the weights; ZeRO-3 partitions them between forwards, so NeuralCollapse's classifier
is gathered through DeepSpeed's ``GatheredParameters`` at the readout). ReDo and
ResetDeadCodes write DeepSpeed's fp32 master copies and optimizer states through its public API
(the change survives its next step, as in one process); σReparam, which adds parameters, is
refused with the reason."""

import functools
import importlib.util
import os

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, mitigations, probes
from tests.dist import process_group, run_two

# (not imported here: the workers import it, and this process keeps its torch untouched)
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)

STAGES = (0, 1, 2, 3)


class VQ(nn.Module):
    """A learned codebook (argmin) beside the model: its indices are probed and its dead codes
    reset. It adds a zero to the loss, so that it is in the backward pass, as ZeRO-3 wants of
    every module whose parameters a forward gathered."""

    def __init__(self):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(8, 16))

    def forward(self, z):
        return torch.cdist(z, self.codebook).argmin(-1), 0.0 * self.codebook.sum()


class Net(nn.Module):
    def __init__(self, dormant=False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.hidden = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.pool = nn.Identity()  # (the pooled features, read by a NeuralCollapse of its own)
        self.head = nn.Linear(16, 5)
        self.vq = VQ()
        if dormant:  # 3 units that never fire: ReDo's to recycle
            with torch.no_grad():
                self.hidden[0].bias[:3] = -50.0

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        _, zero = self.vq(h.detach().reshape(-1, 16))
        return self.head(self.pool(self.hidden(h).mean(1))) + zero


def watched():
    return [
        probes.AttentionEntropy("attn", name="attn"),
        probes.RepresentationRank("hidden.0", name="rank"),
        probes.DormantUnits("hidden.1", name="dormant"),
        probes.NeuralCollapse("head", 5, name="nc", min_class_count=1),
        # (its lagged NC4 reads the classifier's weight in the forward: not under ZeRO-3)
        probes.NeuralCollapse("pool", 5, read="output", classifier="head", name="pooled"),
        probes.LogitHealth("head", name="logits"),
        probes.CodebookUsage("vq", 8, name="vq"),
    ]


def fixed():
    return [probes.DormantUnits("hidden.1", name="dormant"), probes.CodebookUsage("vq", 8)]


def fixes():
    """ReDo of the dormant units, ResetDeadCodes of the side codebook at each log."""
    redo = mitigations.ReDo("dormant", layers={"hidden.1": ("hidden.0", "head")})
    return [redo, mitigations.ResetDeadCodes("vq", every_n_steps=2)]


MITIGATED = ("hidden.0.weight", "hidden.0.bias", "head.weight", "vq.codebook")


def data(step, rank):
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(6, 7, 6, generator=g), torch.randint(0, 5, (6,), generator=g)


def config(stage):
    zero = {"stage": stage}
    if stage == 3:  # every parameter partitioned, however small
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": 6, "zero_optimization": zero}


def train(mon, forward, backward, rank, steps, optimizer, after_log=lambda: None):
    """``steps`` steps on rank ``rank``'s batches (every rank's, ``rank=None``); the logs."""
    logs = []
    for s in range(steps):
        x, y = data(s, rank) if rank is not None else map(torch.cat, zip(data(s, 0), data(s, 1)))
        with mon.observe(targets=y):
            loss = nn.functional.cross_entropy(forward(x), y)
        backward(loss)
        logged = mon.step(optimizer)
        if logged is not None:
            logs.append(logged)
            after_log()
    mon.close()
    return logs


def read_moments(into, params, optimizer):
    """Adam's ``exp_avg`` of the mitigated parameters, whole (a collective: every rank reads)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    for name in MITIGATED:
        got = safe_get_full_optimizer_state(params[name], "exp_avg")
        if got is None:  # ZeRO-0 in fp32: the torch optimizer's own
            got = optimizer.state[params[name]]["exp_avg"]
        into[name] = got.clone()


def worker(rank, init, out_dir):
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    from collapse_monitor._sharding import edited, whole

    # DeepSpeed's fallback to plain torch.distributed where its shared-memory all-reduce op
    # is not built (as off Linux): no 60 s compile of that op in every test run
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    def engine_of(net):
        opt = torch.optim.AdamW(net.parameters(), lr=0.0, weight_decay=0.0)
        return deepspeed.initialize(model=net, optimizer=opt, config=config(stage))[0]

    def step(engine):
        return lambda loss: (engine.backward(loss), engine.step())

    with process_group(rank, init):
        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend="gloo")
        out = {}
        for stage in STAGES:
            net = Net()
            engine = engine_of(net)
            mon = CollapseMonitor(engine, watched(), 2, observe_every_n_steps=1)
            logs = train(mon, engine, step(engine), rank, 4, engine.optimizer)
            engine.destroy()
            # σReparam adds parameters the engine's optimizer does not hold: refused on the
            # engine, on the model DeepSpeed holds (ZeRO 1-3), and at DeepSpeed's optimizer
            # by a monitor built before deepspeed.initialize
            sigma = mitigations.SigmaReparam("attn", when="rule")
            net = Net()
            early = CollapseMonitor(net, watched(), 2, mitigations=[sigma])
            engine = engine_of(net)
            refused, stepped = [], None
            try:
                CollapseMonitor(engine, watched(), 2, mitigations=[sigma]).close()
            except ValueError as exc:
                refused.append(str(exc))
            x, y = data(0, rank)
            with early.observe(targets=y):
                engine(x)
            try:
                early.step(engine.optimizer)
            except ValueError as exc:
                stepped = str(exc)
            early.close()
            try:
                CollapseMonitor(net, watched(), 2, mitigations=[sigma]).close()
            except ValueError as exc:
                refused.append(str(exc))
            engine.destroy()

            # ReDo and ResetDeadCodes act through DeepSpeed's master copies
            net = Net(dormant=True)
            engine = engine_of(net)
            params, moments = dict(net.named_parameters()), {}
            read = functools.partial(read_moments, moments, params, engine.optimizer)
            mon = CollapseMonitor(engine, fixed(), 2, observe_every_n_steps=1, mitigations=fixes())
            fixed_logs = train(mon, engine, step(engine), rank, 3, engine.optimizer, read)
            # after one more step of DeepSpeed's optimizer (lr 0): the module and the master
            weights = {n: whole(params[n]).clone() for n in MITIGATED}
            masters = {n: safe_get_full_fp32_param(params[n]) for n in MITIGATED}
            engine.destroy()
            out[stage] = {
                "logs": logs,
                "refused": refused,
                "stepped": stepped,
                "fixed": fixed_logs,
                "moments": moments,
                "weights": weights,
                "masters": masters,
            }
            if stage:  # bf16: a write keeps the master's digits where nothing changed
                net = Net()
                opt = torch.optim.AdamW(net.parameters(), lr=0.0, weight_decay=0.0)
                cfg = {**config(stage), "bf16": {"enabled": True}}
                engine = deepspeed.initialize(model=net, optimizer=opt, config=cfg)[0]
                head = dict(net.named_parameters())["head.weight"]
                master = safe_get_full_fp32_param(head)
                odd = master + 1e-4 * torch.rand(master.shape, generator=torch.Generator())
                safe_set_full_fp32_param(head, odd)  # (digits a bf16 copy cannot hold)
                with edited(head) as full:
                    full[0] = 7.0
                out[stage]["bf16"] = (odd, safe_get_full_fp32_param(head), whole(head).clone())
                engine.destroy()
        torch.save(out, os.path.join(out_dir, f"ds{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_two(worker, tmp_path_factory.mktemp("deepspeed"), "ds")


def one_process():
    net = Net()
    mon = CollapseMonitor(net, watched(), 2, observe_every_n_steps=1)
    return train(mon, net, lambda loss: loss.backward(), None, 4, None)


def one_process_fixed():
    """The mitigated run in one process on every rank's rows: its logs, the Adam moments
    right after the log, the weights at the end."""
    net = Net(dormant=True)
    opt = torch.optim.AdamW(net.parameters(), lr=0.0, weight_decay=0.0)
    params, moments = dict(net.named_parameters()), {}

    def read_moments():
        moments.update({n: opt.state[params[n]]["exp_avg"].clone() for n in MITIGATED})

    def step(loss):
        loss.backward()
        opt.step()
        opt.zero_grad()

    mon = CollapseMonitor(net, fixed(), 2, observe_every_n_steps=1, mitigations=fixes())
    logs = train(mon, net, step, None, 3, opt, read_moments)
    return logs, moments, {n: params[n].detach().clone() for n in MITIGATED}


@pytest.mark.parametrize("stage", STAGES)
def test_every_probe_at_every_zero_stage_equals_one_process(ranks, stage):
    want = one_process()
    lagged = "collapse/pooled/ncc_mismatch_lagged"
    assert lagged in want[1]  # (from the second window on)
    for r in ranks:
        got = r[stage]["logs"]
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            # (``nlm_cosine``: each rank's cosine with its own gradient, as under DDP)
            keys = [k for k in w if not k.endswith(("/calls", "/nlm_cosine"))]
            if stage == 3 and lagged in w:  # (the classifier partitioned in the forward)
                assert lagged not in g and g["collapse/errors"] == 0
                keys.remove(lagged)
            assert -1 <= g["collapse/logits/nlm_cosine"] <= 1
            assert {k.split("/")[1] for k in keys} >= {"attn", "rank", "dormant", "nc", "logits"}
            assert set(keys) <= set(g)
            for k in keys:
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), (stage, k)
    assert ranks[0][stage]["logs"] == ranks[1][stage]["logs"]


@pytest.mark.parametrize("stage", STAGES)
def test_redo_and_reset_dead_codes_write_deepspeeds_master_copies_as_one_process(ranks, stage):
    """The changes equal one process's, in the module and in DeepSpeed's fp32 master copy,
    after DeepSpeed's optimizer stepped again (it would have written an unchanged master copy
    back over them); the reset rows' Adam moments are zero, as in one process."""
    (log,), moments, weights = one_process_fixed()
    assert log["collapse/mitigations/redo"] >= 3  # the 3 units that never fire, at least
    assert log["collapse/mitigations/reset_dead_codes"] > 0
    for r in ranks:
        got = r[stage]
        assert len(got["fixed"]) == 1
        for k in ("collapse/mitigations/redo", "collapse/mitigations/reset_dead_codes"):
            assert got["fixed"][0][k] == log[k]
        for n in MITIGATED:
            torch.testing.assert_close(got["weights"][n], weights[n], rtol=1e-6, atol=1e-7)
            if stage:  # (ZeRO-0 in fp32: the torch optimizer, no master copy)
                torch.testing.assert_close(got["masters"][n], weights[n], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(got["moments"][n], moments[n], rtol=1e-5, atol=1e-8)
    assert not torch.equal(weights["hidden.0.weight"], Net(True).hidden[0].weight.detach())


@pytest.mark.parametrize("stage", STAGES[1:])
def test_a_bf16_write_changes_the_master_copy_only_where_the_value_changed(ranks, stage):
    """The module holds bf16, the master fp32: writing the whole bf16 value back would round
    every untouched master entry (a codebook written at every step would stop learning)."""
    for r in ranks:
        odd, master, module = r[stage]["bf16"]
        assert module.dtype == torch.bfloat16 and bool((module[0] == 7.0).all())
        assert bool((master[0] == 7.0).all())
        assert torch.equal(master[1:], odd[1:])
        assert not torch.equal(odd[1:], odd[1:].bfloat16().float())  # (the test can fail)


@pytest.mark.parametrize("stage", STAGES)
def test_mitigations_that_add_parameters_are_refused_with_the_reason(ranks, stage):
    """σReparam on the engine; on the model DeepSpeed holds master copies of (ZeRO 1-3); at
    DeepSpeed's optimizer when the monitor was built before ``deepspeed.initialize``. At
    ZeRO-0 (fp32) the bare model keeps no master copy and the engine's optimizer is torch's."""
    for r in ranks:
        refused, stepped = r[stage]["refused"], r[stage]["stepped"]
        assert len(refused) == (1 if stage == 0 else 2)
        assert all("they add parameters" in m for m in refused)
        assert (stepped is None) if stage == 0 else ("they add parameters" in stepped)
