"""Every mitigation through one battery (cases in ``tests/mitigations/harness.py``)."""

import copy
import os

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from collapse_monitor._sharding import whole
from tests.dist import process_group, run_two
from tests.mitigations.harness import CASES, STEPS, parametrized, train

IDS = [c.id for c in CASES]


def name_of(mon):
    return mon.mitigations[0].name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_counted_change_is_read_back_in_the_model(case):
    model = case.new()
    mon = case.monitor(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seen = train(case, model, mon, opt, STEPS)
    total = mon.mitigation_counts.get(name_of(mon), 0)
    expected = seen if case.writes else parametrized(model)
    assert total == expected > 0
    mon.close()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_resumed_run_ends_exactly_where_an_uninterrupted_one_does(case):
    def fresh():
        model = case.new()
        mon = case.monitor(model)  # (a reparametrisation applies here, before the optimizer)
        return model, mon, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, mon, opt = fresh()
    train(case, model, mon, opt, STEPS)
    half = STEPS // 2 + 1  # mid-window
    first, mon1, opt1 = fresh()
    train(case, first, mon1, opt1, half)
    saved = {
        "monitor": mon1.state_dict(),
        "model": first.state_dict(),
        "optimizer": opt1.state_dict(),
    }
    mon1.close()
    again, mon2, opt2 = fresh()
    mon2.load_state_dict(saved["monitor"], optimizer=opt2)
    again.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    train(case, again, mon2, opt2, STEPS - half)
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n
    assert mon2.mitigation_counts == mon.mitigation_counts


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_a_copy_of_the_model_is_untouched(case):
    model = case.new()
    mon = case.monitor(model)
    twin = copy.deepcopy(model)
    kept = {n: t.clone() for n, t in twin.state_dict().items()}
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(case, model, mon, opt, STEPS)
    assert mon.mitigation_counts.get(name_of(mon), 0) > 0
    for n, t in twin.state_dict().items():
        assert torch.equal(t, kept[n]), n


def _whole(model):
    return {n: whole(p).detach().clone() for n, p in model.named_parameters()}


def worker(rank, init, out_dir):
    """Every case under DDP and under FSDP2 on this rank's own data."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with process_group(rank, init):
        torch.set_num_threads(1)
        out = {}
        for case in CASES:
            model = case.new()
            mon = case.monitor(model)  # before the wrapper: a reparametrisation comes first
            ddp = DDP(model)
            opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
            train(case, model, mon, opt, STEPS, rank, forward=ddp)
            out[f"ddp/{case.id}"] = (_whole(model), dict(mon.mitigation_counts))
            mon.close()
            del ddp  # freed before the group is destroyed
            model = case.new()
            mon = case.monitor(model)
            mesh = init_device_mesh("cpu", (2,))
            for path in case.shards:
                fully_shard(model.get_submodule(path), mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            train(case, model, mon, opt, STEPS, rank)
            out[f"fsdp2/{case.id}"] = (_whole(model), dict(mon.mitigation_counts))
            mon.close()
        torch.save(out, os.path.join(out_dir, f"replicas{rank}.pt"))


def test_ddp_replicas_and_fsdp2_shards_stay_identical(tmp_path):
    a, b = run_two(worker, tmp_path, "replicas")
    assert a.keys() == {f"{e}/{c}" for e in ("ddp", "fsdp2") for c in IDS}
    for key in a:
        (pa, ca), (pb, cb) = a[key], b[key]
        assert ca == cb and sum(ca.values()) > 0, key  # the same decisions, and some
        for n in pa:
            assert torch.equal(pa[n], pb[n]), f"{key}: {n}"
