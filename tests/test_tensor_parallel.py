"""Tensor parallelism (DTensor ``parallelize_module``) on 4 gloo processes: refused, never a
silently wrong number.

Each rank of a tensor-parallel group holds a slice of the heads, the vocabulary or the features,
and sees the same batch as the others; the monitor would all-reduce the slices as if they were
the same quantities. Measured before the refusal (2 ranks): per-head entropies off by 0.19 and
0.42 nats, a vocabulary-parallel head's ``log_z_mean`` 36.9 against 59.9, no error counted. Each
case here checks the layout that gave such numbers is refused with the module and its placement
named: at construction (also for a DTensor weight placed without parallelize_module, as
transformers' ``tp_plan`` does, and under FSDP2), at the first log for a model parallelised after the monitor was built,
in the forward for a DTensor activation, and for TP composed with FSDP2 on a 2-D mesh.
"""

import os

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from collapse_monitor import CollapseMonitor, mitigations, probes
from tests.dist import process_group, run_two


class Block(nn.Module):
    """Self-attention through SDPA, a norm and a vocabulary head."""

    def __init__(self, d=16, heads=4, vocab=32):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        b, t, d = x.shape

        def split(y):  # a column-parallel projection holds heads / tp of them
            return y.view(b, t, -1, d // self.heads).transpose(1, 2)

        a = nn.functional.scaled_dot_product_attention(
            split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True
        )
        return self.head(self.norm(x + self.o(a.transpose(1, 2).reshape(b, t, -1))))


def attention_tp(model, mesh):
    plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel()}
    return parallelize_module(model, mesh, {**plan, "o": RowwiseParallel()})


class Counting(mitigations.Mitigation):
    """A user's own mitigation: counts the logs it acted at."""

    kind = "counting"
    acted = 0

    def after_log(self, view):
        self.acted += 1
        return []


def watched():
    return [
        probes.AttentionEntropy("", name="attention"),
        probes.LogitHealth("head", name="logits"),
        probes.RepresentationRank("norm", name="rank"),
    ]


def step(model, mon):
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(0))
    try:
        with mon.observe():
            model(x).sum().backward()
    except ValueError as exc:
        return str(exc)
    return mon.step()


def worker(rank, init, out_dir):
    with process_group(rank, init, world=4):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        tp = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        out = {}
        # built on a parallelised model: refused at construction
        model = attention_tp(Block(), tp)
        with pytest.raises(ValueError) as exc:
            CollapseMonitor(model, watched(), 1)
        out["construction"] = str(exc.value)
        # parallelised after the monitor was built: the first log disables every probe and
        # mitigation (strict=False), logs none of their numbers and counts the errors
        model = Block()
        mon = CollapseMonitor(model, watched(), 1, mitigations=[Counting()])
        parallelize_module(model, tp, {"head": ColwiseParallel()})  # local vocabulary shards
        out["after"] = step(model, mon)
        out["disabled"] = [p.disabled for p in [*mon.probes, *mon.mitigations]]
        out["acted"] = mon.mitigations[0].acted
        mon.close()
        # a vocabulary-parallel head whose logits stay DTensors (torchtitan's loss_parallel
        # layout): the probe refuses the DTensor in the forward (strict=True raises there)
        model = Block()
        mon = CollapseMonitor(model, [probes.LogitHealth("head", name="logits")], 1, strict=True)
        plan = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
        parallelize_module(model, tp, {"head": plan})
        out["dtensor"] = step(model, mon)
        mon.close()
        # TP x FSDP2 on a 2-D mesh (2 data-parallel x 2 tensor-parallel)
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        model = attention_tp(Block(), mesh["tp"])
        fully_shard(model, mesh=mesh["dp"])
        with pytest.raises(ValueError) as exc:
            CollapseMonitor(model, watched(), 1)
        out["tp_fsdp2"] = str(exc.value)
        # a DTensor weight placed without parallelize_module (as transformers' tp_plan does),
        # alone, then sharded by FSDP2
        for fsdp in (False, True):
            model = Block()
            w = model.head.weight.detach()
            model.head.weight = nn.Parameter(distribute_tensor(w, mesh["tp"], [Shard(0)]))
            if fsdp:
                fully_shard(model, mesh=mesh["dp"])
            with pytest.raises(ValueError) as exc:
                CollapseMonitor(model, watched(), 1)
            out[f"by_hand_{fsdp}"] = str(exc.value)
        # data parallelism alone is not refused: HSDP on the 2-D mesh, and FSDP2 that keeps the
        # parameters whole after the forward (DTensors between steps, plain inside forwards)
        out["accepted"] = []
        for kw in ({"mesh": mesh}, {"mesh": mesh["dp"], "reshard_after_forward": False}):
            model = Block()
            fully_shard(model, **kw)
            mon = CollapseMonitor(model, watched(), 1)
            logged = step(model, mon)
            out["accepted"].append((logged["collapse/errors"], "collapse/rank/erank" in logged))
            mon.close()
        torch.save(out, os.path.join(out_dir, f"tp{rank}.pt"))


def test_tensor_parallel_layouts_are_refused_with_the_module_and_its_placement(tmp_path):
    for out in run_two(worker, tmp_path, "tp", world=4):
        assert (
            "tensor parallelism is not supported: 'q' (weight (Shard(dim=0),) on mesh ('tp',)"
            in (out["construction"])
        )
        assert "'q' (weight (Shard(dim=0),) on mesh ('tp',); bias" in out["construction"]
        assert " and 3 more (DTensor placements" in out["construction"]  # k, v, o
        after = out["after"]
        assert after["collapse/errors"] == 4.0  # three probes and the mitigation
        assert not [k for k in after if k.startswith(("collapse/attention", "collapse/logits"))]
        assert not [k for k in after if k.startswith("collapse/rank")]
        assert out["disabled"] == [True] * 4
        assert out["acted"] == 0
        assert "read a DTensor at 'head' (placements (Shard(dim=2),))" in out["dtensor"]
        # FSDP2 around TP: the placements on the 2-D mesh are named
        by_hand = "not supported: 'head' (weight (Shard(dim=0),) on mesh ('tp',)) (DTensor"
        assert by_hand in out["by_hand_False"]
        assert "parameters that were DTensors when FSDP2" in out["by_hand_True"]
        placed = "'q' (weight (_StridedShard(dim=0, sf=2), Shard(dim=0)) on mesh ('dp', 'tp')"
        assert placed in out["tp_fsdp2"]
        assert out["accepted"] == [(0.0, True), (0.0, True)]
