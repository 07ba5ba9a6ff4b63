"""DeepSpeed (ZeRO stages 0-3) in a plain loop, on 2 gloo CPU processes: every probe the monitor
is built with logs what one process logs on the union of the ranks' batches (a learning rate
of 0 keeps the weights; ZeRO-3 partitions them between forwards, so NeuralCollapse's classifier
is gathered through DeepSpeed's ``GatheredParameters`` at the readout). Mitigations are refused
under DeepSpeed, with the reason."""

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


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.hidden = nn.Sequential(nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.hidden(h).mean(1))


def watched():
    return [
        probes.AttentionEntropy("attn", name="attn"),
        probes.RepresentationRank("hidden.0", name="rank"),
        probes.DormantUnits("hidden.1", name="dormant"),
        probes.NeuralCollapse("head", 5, name="nc", min_class_count=1),
        probes.LogitHealth("head", name="logits"),
    ]


def data(step, rank):
    g = torch.Generator().manual_seed(10 * step + rank)
    return torch.randn(6, 7, 6, generator=g), torch.randint(0, 5, (6,), generator=g)


def config(stage):
    zero = {"stage": stage}
    if stage == 3:  # every parameter partitioned, however small
        zero["stage3_param_persistence_threshold"] = 0
    return {"train_micro_batch_size_per_gpu": 6, "zero_optimization": zero}


def worker(rank, init, out_dir):
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank))
    import deepspeed

    # DeepSpeed's fallback to plain torch.distributed where its shared-memory all-reduce op
    # is not built (as off Linux): no 60 s compile of that op in every test run
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    with process_group(rank, init):
        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend="gloo")
        out = {}
        for stage in STAGES:
            net = Net()
            opt = torch.optim.AdamW(net.parameters(), lr=0.0)
            engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=config(stage))
            mon = CollapseMonitor(engine, watched(), 2, observe_every_n_steps=1)
            logs = []
            for s in range(4):
                x, y = data(s, rank)
                with mon.observe(targets=y):
                    loss = nn.functional.cross_entropy(engine(x), y)
                engine.backward(loss)
                engine.step()
                logged = mon.step(engine.optimizer)  # (DeepSpeed's own at stages 1-3)
                if logged is not None:
                    logs.append(logged)
            mon.close()
            redo = mitigations.ReDo("dormant", layers={"hidden.1": ("hidden.0", "head")})
            refused = []
            for built_on in (engine, net):  # the engine, or the model (ZeRO-3 partitions it)
                try:
                    CollapseMonitor(built_on, watched(), 2, mitigations=[redo]).close()
                except ValueError as exc:
                    refused.append(str(exc))
            # on the bare model at ZeRO 0-2 (nothing partitioned), at DeepSpeed's optimizer
            stepped = None
            if stage < 3:
                bare = CollapseMonitor(net, watched(), 2, mitigations=[redo])
                x, y = data(0, rank)
                with bare.observe(targets=y):
                    engine(x)
                try:
                    bare.step(engine.optimizer)
                except ValueError as exc:
                    stepped = str(exc)
                bare.close()
            out[stage] = {"logs": logs, "refused": refused, "stepped": stepped}
            engine.destroy()
        torch.save(out, os.path.join(out_dir, f"ds{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_two(worker, tmp_path_factory.mktemp("deepspeed"), "ds")


def one_process():
    net = Net()
    mon = CollapseMonitor(net, watched(), 2, observe_every_n_steps=1)
    logs = []
    for s in range(4):
        x, y = (torch.cat(t) for t in zip(data(s, 0), data(s, 1)))
        with mon.observe(targets=y):
            nn.functional.cross_entropy(net(x), y).backward()
        logged = mon.step()
        if logged is not None:
            logs.append(logged)
    mon.close()
    return logs


@pytest.mark.parametrize("stage", STAGES)
def test_every_probe_at_every_zero_stage_equals_one_process(ranks, stage):
    want = one_process()
    for r in ranks:
        got = r[stage]["logs"]
        assert len(got) == len(want) == 2
        for g, w in zip(got, want):
            # (``nlm_cosine``: each rank's cosine with its own gradient, as under DDP)
            keys = [k for k in w if not k.endswith(("/calls", "/nlm_cosine"))]
            assert -1 <= g["collapse/logits/nlm_cosine"] <= 1
            assert {k.split("/")[1] for k in keys} >= {"attn", "rank", "dormant", "nc", "logits"}
            assert set(keys) <= set(g)
            for k in keys:
                assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-9), (stage, k)
    assert ranks[0][stage]["logs"] == ranks[1][stage]["logs"]


@pytest.mark.parametrize("stage", STAGES)
def test_mitigations_are_refused_with_the_reason(ranks, stage):
    for r in ranks:
        refused = r[stage]["refused"]
        assert len(refused) == (2 if stage == 3 else 1)  # (the bare model: ZeRO-3 only)
        assert all("mitigations are not supported under DeepSpeed" in m for m in refused)


def test_a_monitor_on_the_bare_model_refuses_mitigations_at_deepspeeds_optimizer(ranks):
    """At ZeRO 1-2 the bare model looks like any other: DeepSpeed's optimizer passed to
    ``step`` is where mitigations are refused. At ZeRO-0 (fp32) the engine's optimizer is the
    torch one, with no master copy: a mitigation's change stays."""
    for r in ranks:
        assert r[0]["stepped"] is None
        for stage in (1, 2):
            assert "mitigations are not supported under DeepSpeed" in r[stage]["stepped"]
