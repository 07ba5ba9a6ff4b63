"""The monitor in ``torch.distributed.checkpoint`` (DCP) and in a trainer that saves rank 0's
state only, on 2 gloo processes: saved mid-window, loaded into a fresh monitor, the next log
equals the uninterrupted run's (to rounding), replicated and class-sharded statistics alike;
the state is written once; loaded into one process, the replicated statistics resume exactly,
and a class-sharded state is refused whole with the reason."""

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from tests.dist import process_group, run_two
from tests.probes.test_attention_entropy import SDPAAttention

C, D = 12, 5


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, D), nn.Tanh(), nn.Linear(D, C))


def monitor(net, shards=True):
    watched = [
        probes.NeuralCollapse("2", C, name="nc"),
        probes.RepresentationRank("1", name="rank"),
        *[probes.NeuralCollapse("2", C, name="shards", shard_classes=True)] * shards,
    ]
    return CollapseMonitor(net, watched, 4, observe_every_n_steps=1)


def batch(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    n = 9 + 4 * rank  # uneven
    return torch.randn(n, 7, generator=g), torch.randint(0, C, (n,), generator=g)


def run(mon, steps, ranks):
    logs = []
    for s in steps:
        xs, ys = zip(*[batch(s, r) for r in ranks])
        with mon.observe(targets=torch.cat(ys)):
            mon.model(torch.cat(xs))
        out = mon.step()
        if out is not None:
            logs.append(out)
    return logs


def worker(rank, init, out_dir):
    ckpt = os.path.join(out_dir, "dcp")
    with process_group(rank, init):
        torch.set_num_threads(1)
        net = model()
        mon = monitor(net)
        run(mon, range(6), [rank])  # a log at step 4, then half a window
        dcp.save({"monitor": mon.stateful()}, checkpoint_id=ckpt)
        gathered = mon.state_dict(gather=True)  # what Lightning's callback saves (rank 0's)
        want = run(mon, range(6, 8), [rank])
        mon.close()

        fresh = monitor(net)
        dcp.load({"monitor": fresh.stateful()}, checkpoint_id=ckpt)
        from_dcp = run(fresh, range(6, 8), [rank])
        fresh.close()

        if rank == 0:
            torch.save(gathered, os.path.join(out_dir, "rank0.pt"))
        torch.distributed.barrier()
        fresh = monitor(net)
        fresh.load_state_dict(torch.load(os.path.join(out_dir, "rank0.pt"), weights_only=True))
        from_rank0 = run(fresh, range(6, 8), [rank])
        fresh.close()

        # sampled query rows, sequences of another length on each rank: every rank resumes
        # its own random draws (each rank's generator is in the state rank 0 writes)
        attn = nn.Sequential()
        attn.add_module("attn", SDPAAttention())
        sampled = [probes.AttentionEntropy("attn", queries=3, name="attn")]
        xs = [
            torch.randn(2, 9 + 3 * rank, 32, generator=torch.Generator().manual_seed(s))
            for s in range(8)
        ]

        def attend(mon, steps):
            for s in steps:
                with mon.observe():
                    attn(xs[s])
                logged = mon.step()
            return logged  # the last step's: a log (step 8)

        mon = CollapseMonitor(attn, sampled, 4)
        attend(mon, range(6))
        dcp.save({"monitor": mon.stateful()}, checkpoint_id=ckpt + "_attn")
        want_attn = attend(mon, range(6, 8))
        mon.close()
        mon = CollapseMonitor(attn, sampled, 4)
        dcp.load({"monitor": mon.stateful()}, checkpoint_id=ckpt + "_attn")
        got_attn = attend(mon, range(6, 8))
        mon.close()

        plain = monitor(net, shards=False)  # replicated statistics only
        run(plain, range(6), [rank])
        dcp.save({"monitor": plain.stateful()}, checkpoint_id=ckpt + "_plain")
        plain.close()
        out = {"want": want, "dcp": from_dcp, "rank0": from_rank0, "attn": (want_attn, got_attn)}
        torch.save(out, os.path.join(out_dir, f"ckpt{rank}.pt"))


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dcp")
    return tmp, run_two(worker, tmp, "ckpt")


def test_dcp_and_a_gathered_rank_0_state_resume_the_window_exactly(ran):
    _, ranks = ran
    for r in ranks:
        (want,) = r["want"]
        assert {k.split("/")[1] for k in want} >= {"nc", "shards", "rank"}
        assert want["collapse/shards/samples"] == 4 * (9 + 13)  # the whole window: both ranks
        for resumed in (r["dcp"], r["rank0"]):  # (reduced, then merged: rounding apart)
            (got,) = resumed
            assert got.keys() == want.keys()
            assert all(got[k] == pytest.approx(want[k], rel=1e-12) for k in want)
    assert ranks[0]["want"] == ranks[1]["want"]


def test_each_rank_resumes_its_own_random_draws(ran):
    _, ranks = ran
    for r in ranks:
        want, got = r["attn"]
        assert "collapse/attn/attn/entropy/head_0" in want and got.keys() == want.keys()
        assert all(got[k] == pytest.approx(want[k], rel=1e-12) for k in want)


def test_dcp_writes_the_replicated_state_once(ran):
    tmp, _ = ran
    metadata = dcp.FileSystemReader(str(tmp / "dcp")).read_metadata()
    assert list(metadata.state_dict_metadata) == ["monitor.collapse_monitor"]
    assert len(metadata.storage_data) == 1


def test_dcp_loads_into_one_process_exactly_or_refuses_class_shards_whole(ran):
    tmp, ranks = ran
    mon = monitor(model(), shards=False)
    dcp.load({"monitor": mon.stateful()}, checkpoint_id=str(tmp / "dcp_plain"), no_dist=True)
    (got,) = run(mon, range(6, 8), [0, 1])  # both ranks' batches, in one process
    mon.close()
    (want,) = ranks[0]["want"]
    # (float32 features of one batch of both ranks' rows round apart from two batches';
    # ``calls`` counts forward calls, here 2 per step on 2 ranks, then 1)
    replicated = [k for k in want if k.split("/")[1] in ("nc", "rank") and "calls" not in k]
    assert replicated and all(got[k] == pytest.approx(want[k], rel=1e-6) for k in replicated)
    mon = monitor(model())
    with pytest.raises(ValueError, match=r"holds class shards \(the classes of rank 0 of 2\)"):
        dcp.load({"monitor": mon.stateful()}, checkpoint_id=str(tmp / "dcp"), no_dist=True)
    assert mon.global_step == 0  # nothing loaded
    mon.close()
