"""The monitor in ``torch.distributed.checkpoint`` (DCP) and in a trainer that saves rank 0's
state only, on 2 gloo processes: saved mid-window, loaded into a fresh monitor, the next log
equals the uninterrupted run's (to rounding), replicated and class-sharded statistics alike;
the state is written once; loaded into one process or into 3 ranks, the class shards are
re-sharded and the window resumes as exactly; one rank's own class shards (not every rank's)
are refused in one process with the reason."""

import functools
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
        own = mon.state_dict()  # each rank's own classes
        want = run(mon, range(6, 8), [rank])
        mon.close()

        fresh = monitor(net)
        dcp.load({"monitor": fresh.stateful()}, checkpoint_id=ckpt)
        from_dcp = run(fresh, range(6, 8), [rank])
        fresh.close()

        if rank == 0:
            torch.save(gathered, os.path.join(out_dir, "rank0.pt"))
            torch.save(own, os.path.join(out_dir, "rank0_own.pt"))
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


def rows_of_both_ranks(step, part):
    """Step ``step``'s rows of the 2-rank run, ``part = (rank, world)``'s share of them."""
    x, y = (torch.cat(t) for t in zip(batch(step, 0), batch(step, 1)))
    share = slice(len(y) * part[0] // part[1], len(y) * (part[0] + 1) // part[1])
    return x[share], y[share]


def loader(rank, init, out_dir, ckpt):
    with process_group(rank, init, world=3):
        torch.set_num_threads(1)
        mon = monitor(model())
        dcp.load({"monitor": mon.stateful()}, checkpoint_id=ckpt)
        for s in range(6, 8):
            x, y = rows_of_both_ranks(s, (rank, 3))
            with mon.observe(targets=y):
                mon.model(x)
            logged = mon.step()
        mon.close()
        torch.save(logged, os.path.join(out_dir, f"loaded{rank}.pt"))


def assert_resumed(got, want):
    # (float32 features of other batches of the same rows round apart; ``calls`` counts
    # forward calls: 2 per step on 2 ranks)
    keys = [k for k in want if "calls" not in k]
    assert {k.split("/")[1] for k in keys} >= {"nc", "shards", "rank"}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k], rel=1e-6) for k in keys)


def test_dcp_loads_into_one_process_exactly_with_the_class_shards_joined(ran):
    tmp, ranks = ran
    mon = monitor(model())
    dcp.load({"monitor": mon.stateful()}, checkpoint_id=str(tmp / "dcp"), no_dist=True)
    for s in range(6, 8):
        x, y = rows_of_both_ranks(s, (0, 1))
        with mon.observe(targets=y):
            mon.model(x)
        got = mon.step()
    mon.close()
    assert_resumed(got, ranks[0]["want"][0])


def test_dcp_of_2_ranks_loads_into_3_with_the_class_shards_re_split(ran, tmp_path):
    tmp, ranks = ran
    loaded = run_two(functools.partial(loader, ckpt=str(tmp / "dcp")), tmp_path, "loaded", world=3)
    for got in loaded:
        assert_resumed(got, ranks[0]["want"][0])
        assert got["collapse/shards/samples"] == 4 * (9 + 13)


def test_one_ranks_own_class_shards_are_refused_whole_in_one_process(ran):
    tmp, _ = ran
    mon = monitor(model())
    own = torch.load(tmp / "rank0_own.pt", weights_only=True)
    with pytest.raises(ValueError, match=r"holds class shards \(the classes of rank 0 of 2\)"):
        mon.load_state_dict(own)
    assert mon.global_step == 0  # nothing loaded
    mon.close()
