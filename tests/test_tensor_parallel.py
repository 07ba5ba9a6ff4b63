"""Tensor parallelism (DTensor ``parallelize_module``) on 4 and 2 gloo processes: the numbers of
one process, or a refusal naming the module, never a silently wrong number.

Each rank of a tensor-parallel group holds a slice of the heads, the vocabulary or the features
and sees the same batch as the others. Before this was read (2 ranks): per-head entropies off by
0.19 and 0.42 nats, a vocabulary-parallel head's ``log_z_mean`` 36.9 against 59.9, no error
counted. Here the same training steps run in one process (the reference, computed in the test's
own process) and under tensor parallelism over 4 ranks, torchtitan's ``loss_parallel`` layout
(logits left as ``Shard(-1)`` DTensors), TP x FSDP2 on a 2 x 2 mesh (each data-parallel rank half
of the global batch; also with one data-parallel group recording nothing), resumed from rank 0's
state inside a window, and a ``transformers`` Llama (GQA, left padding) and a sequence-parallel
stack on 2 ranks: every metric must agree. ReDo on a column- and a row-parallel pair must make
one process's change; a probe on a slice it cannot place, σReparam on a tensor-parallel layer and
a model parallelised after the monitor was built are refused, naming the module.
"""

import contextlib
import os

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, mitigations, probes
from tests.dist import process_group, run_two
from tests.probes.test_conventions import tiny

D, HEADS, VOCAB, HIDDEN = 16, 4, 32, 32


class Side(nn.Module):
    """A block whose second activation is fed through another operation (``up(x) * 1``)."""

    def __init__(self):
        super().__init__()
        self.block, self.act2 = Block(), nn.ReLU()

    def forward(self, x):
        self.act2(self.block.up(x) * 1)  # (a side branch: the output is the block's)
        return self.block(x)


class SDPA(nn.Module):
    """A module that only makes the attention call (torchtitan's ``sdpa``)."""

    def forward(self, q, k, v):
        return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


class Block(nn.Module):
    """Self-attention through SDPA, an MLP, a norm and a vocabulary head."""

    def __init__(self, wrapped=False):
        super().__init__()
        if wrapped:
            self.sdpa = SDPA()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.up, self.act, self.down = nn.Linear(D, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, VOCAB)

    def forward(self, x):
        b, t, _ = x.shape

        def split(y):  # a column-parallel projection holds heads / tp of them
            return y.view(b, t, -1, D // HEADS).transpose(1, 2)

        attend = getattr(self, "sdpa", None) or SDPA()
        a = attend(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        x = x + self.o(a.transpose(1, 2).reshape(b, t, -1))
        x = x + self.down(self.act(self.up(x)))
        return self.head(self.norm(x))


def plan(loss_parallel=False):
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    head = ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    return {
        **{n: ColwiseParallel() for n in ("q", "k", "v", "up")},
        "o": RowwiseParallel(),
        "down": RowwiseParallel(),
        "head": head if loss_parallel else ColwiseParallel(),  # local vocabulary slices
    }


def watched():
    return [
        probes.AttentionEntropy("", queries=None, name="attention"),
        probes.LogitHealth("head", name="logits"),
        probes.NeuralCollapse("head", VOCAB, name="nc"),
        probes.RepresentationRank("norm", name="rank"),
        probes.DormantUnits("up", name="up"),  # a column-parallel output: gathered
        # the activation between a column- and a row-parallel layer, fed by the first: its
        # slice of the hidden units gathered
        probes.DormantUnits("act", name="act"),
        probes.LatentUsage("up", HIDDEN, name="latents"),
        probes.TokenUniformity("norm", name="tokens"),
    ]


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, D, generator=g) * 3
    return x, torch.randint(0, VOCAB, (4, 6), generator=g)


def train(model, mon, rows=slice(None), steps=2, mesh=None, observe=True):
    """``steps`` SGD steps on the global batch's ``rows``; the log of the last. ``mesh``: the
    tensor-parallel mesh whose ranks hold the logits' vocabulary slices; ``observe=False``:
    forwards outside ``observe()`` (a rank that records nothing)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = batch()
    x, y = x[rows], y[rows]
    for _ in range(steps):
        with mon.observe(targets=y) if observe else contextlib.nullcontext():
            out = model(x)
            if mesh is not None and not hasattr(out, "full_tensor"):
                from torch.distributed.tensor import DTensor, Shard

                out = DTensor.from_local(out, mesh, [Shard(2)])
            out = out.full_tensor() if hasattr(out, "full_tensor") else out
            # (the mean over the global batch: each data-parallel rank's share of it)
            loss = nn.functional.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
        opt.step()
        opt.zero_grad()
        logged = mon.step(opt)
    return logged


def reference(rows=slice(None), steps=2):
    torch.manual_seed(0)
    model = Block()
    mon = CollapseMonitor(model, watched(), steps)
    logged = train(model, mon, rows, steps)
    mon.close()
    return logged


def nc4(model, mesh=None):
    """NeuralCollapse's lagged NC4 (from the second window on): 4 steps, a log every 2."""
    torch.manual_seed(0)
    mon = CollapseMonitor(model, [probes.NeuralCollapse("head", VOCAB, name="nc")], 2)
    logged = train(model, mon, steps=4, mesh=mesh)
    mon.close()
    return {k: v for k, v in logged.items() if k.startswith("collapse/nc/")}


def dormant():
    """A block whose first 5 hidden units barely respond (ReDo's dormant neurons)."""
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.up.weight[:5] *= 1e-3
        model.up.bias[:5] = 0
    return model


def redo(model, mesh=None):
    """ReDo on the column-parallel ``up`` and row-parallel ``down``, driven by the dormant units
    of the ReLU between them, at the log of step 2 (Adam): the log, the whole weights and the
    moments of ``up.weight`` after it."""
    mon = CollapseMonitor(
        model,
        [probes.DormantUnits("act", tau=0.6, name="act")],  # (the hidden units after ReLU)
        2,
        mitigations=[mitigations.ReDo("act", layers={"act": ("up", "down")})],
    )
    made = []
    adam = torch.optim.Adam

    class Optimizer(adam):  # (train's optimizer: Adam, kept for its moments)
        def __init__(self, params, lr):
            super().__init__(params, lr=1e-2)
            made.append(self)

    torch.optim.SGD, sgd = Optimizer, torch.optim.SGD
    try:
        logged = train(model, mon, mesh=mesh)
    finally:
        torch.optim.SGD = sgd
    mon.close()

    def whole(t):
        return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()

    weights = {k: whole(v) for k, v in model.state_dict().items()}
    moments = {k: whole(v) for k, v in made[0].state[model.up.weight].items() if k != "step"}
    return logged, weights, moments


def worker(rank, init, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    with process_group(rank, init, world=4):
        torch.set_num_threads(1)
        out = {}
        tp = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
        for name, loss_parallel in (("tp", False), ("loss_parallel", True)):
            torch.manual_seed(0)
            model = parallelize_module(Block(), tp, plan(loss_parallel))
            mon = CollapseMonitor(model, watched(), 2)
            out[name] = train(model, mon, mesh=tp)
            mon.close()
        torch.manual_seed(0)
        out["nc4"] = nc4(parallelize_module(Block(), tp, plan()), tp)
        out["redo"] = redo(parallelize_module(dormant(), tp, plan()), tp)
        # an activation fed through another operation: its slice cannot be placed; the
        # probe is disabled at the first log, nothing of it logged
        torch.manual_seed(0)
        model = Side()
        parallelize_module(model.block, tp, plan())
        mon = CollapseMonitor(model, [probes.DormantUnits("act2", name="act2")], 1)
        out["side"] = train(model, mon, steps=1, mesh=tp)
        mon.close()
        # σReparam on a tensor-parallel layer: refused at construction, naming it
        sigma = mitigations.SigmaReparam("q", all_linear=True)
        with pytest.raises(ValueError) as exc:
            CollapseMonitor(parallelize_module(Block(), tp, plan()), [], 1, mitigations=[sigma])
        out["sigma"] = str(exc.value)
        with pytest.raises(ValueError) as exc:  # (a user's mitigation acting on the model)
            CollapseMonitor(parallelize_module(Block(), tp, plan()), [], 1, mitigations=[Acting()])
        out["child"] = str(exc.value)
        # a probe that fails on one rank alone, inside a forward, between two of its gathers:
        # that rank still makes the second (no hang, no gather paired with the model's own
        # collectives), and the probe stops on every rank at the log
        torch.manual_seed(0)
        model = parallelize_module(Block(), tp, plan())
        mon = CollapseMonitor(model, [FailsOnRank1("[qk]", name="qk")], 1)
        out["failing"] = (train(model, mon, steps=2, mesh=tp), mon.probes[0].disabled)
        mon.close()
        # rank 0's reduced state, saved inside the window and loaded into a fresh monitor on
        # every rank: the log equals the uninterrupted run's
        torch.manual_seed(0)
        model = parallelize_module(Block(), tp, plan())
        mon = CollapseMonitor(model, watched(), 2)
        train(model, mon, steps=1, mesh=tp)
        saved = [mon.state_dict()]
        torch.distributed.broadcast_object_list(saved, src=0)  # (as a file rank 0 wrote)
        mon.close()
        mon = CollapseMonitor(model, watched(), 2)
        mon.load_state_dict(saved[0])
        out["resumed"] = train(model, mon, steps=1, mesh=tp)
        mon.close()
        # TP x FSDP2 on a 2-D mesh: 2 data-parallel ranks, each half of the batch
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)
        model = parallelize_module(Block(), mesh["tp"], plan())
        fully_shard(model, mesh=mesh["dp"])
        mon = CollapseMonitor(model, watched(), 2)
        dp = mesh.get_local_rank("dp")
        out["tp_fsdp2"] = train(model, mon, slice(2 * dp, 2 * dp + 2), mesh=mesh["tp"])
        mon.close()
        # the tensor-parallel group of the second data-parallel rank records nothing: no hang,
        # the numbers of the first one's rows
        torch.manual_seed(0)
        model = parallelize_module(Block(), mesh["tp"], plan())
        fully_shard(model, mesh=mesh["dp"])
        mon = CollapseMonitor(model, watched(), 1)
        rows = slice(2 * dp, 2 * dp + 2)
        out["quiet"] = train(model, mon, rows, 1, mesh["tp"], observe=dp == 0)
        mon.close()
        # parallelised after the monitor was built: the first log disables every probe and
        # mitigation (strict=False), logs none of their numbers and counts the errors
        model = Block()
        mon = CollapseMonitor(model, watched()[:2], 1, mitigations=[Counting()])
        parallelize_module(model, tp, plan())
        out["after"] = train(model, mon, steps=1, mesh=tp)
        out["disabled"] = [p.disabled for p in [*mon.probes, *mon.mitigations]]
        mon.close()
        # a DTensor activation on a mesh of its own: refused naming it (strict: raised)
        from torch.distributed.tensor import Replicate, distribute_tensor

        model = parallelize_module(Block(), tp, plan())
        mon = CollapseMonitor(model, [probes.RepresentationRank("act", name="r")], 1, strict=True)
        other = init_device_mesh("cpu", (2, 2), mesh_dim_names=("a", "b"))
        try:
            with mon.observe():
                model.act(distribute_tensor(torch.randn(2, D), other, [Replicate()] * 2))
        except ValueError as exc:
            out["other_mesh"] = str(exc)
        mon.close()
        torch.save(out, os.path.join(out_dir, f"tp{rank}.pt"))


class Counting(mitigations.Mitigation):
    """A user's own mitigation: counts the logs it acted at."""

    kind = "counting"

    def after_log(self, view):
        return []


class FailsOnRank1(probes.RepresentationRank):
    """Fails in its updates on rank 1 (after each call's gather)."""

    def update(self, window, value, call):
        if torch.distributed.get_rank() == 1:
            raise RuntimeError("rank 1 only")
        super().update(window, value, call)


class Acting(Counting):
    """A user's own mitigation that says it acts on the whole model."""

    paths = ("",)


def close(a: dict, b: dict, rel=1e-6) -> list:
    return [(k, a[k], b[k]) for k in a if abs(a[k] - b[k]) > rel * max(abs(a[k]), abs(b[k]), 1e-3)]


def test_tensor_parallel_gives_the_numbers_of_one_process(tmp_path):
    ref = {k: v for k, v in reference().items() if k.startswith("collapse/")}
    ref_redo = redo(dormant())
    torch.manual_seed(0)
    ref_nc4 = nc4(Block())
    assert "collapse/nc/ncc_mismatch_lagged" in ref_nc4
    quiet = reference(slice(0, 2), 1)
    quiet = {k: v for k, v in quiet.items() if k.startswith("collapse/") and "nlm" not in k}
    assert "collapse/attention/model/entropy/head_3" in ref
    assert "collapse/logits/log_z_mean" in ref and "collapse/nc/nc1" in ref
    for out in run_two(worker, tmp_path, "tp", world=4):
        for name in ("tp", "loss_parallel", "tp_fsdp2", "resumed"):
            got = {k: v for k, v in out[name].items() if k.startswith("collapse/")}
            assert got.pop("collapse/errors") == 0.0, name
            # (the head's nlm_cosine is not read from a tensor-parallel weight)
            mine = {k: v for k, v in ref.items() if k != "collapse/logits/nlm_cosine"}
            mine.pop("collapse/errors")
            assert set(got) == set(mine), (name, set(got) ^ set(mine))
            if name == "tp_fsdp2":  # (each data-parallel rank's forward is a call, as in DDP)
                mine.update({k: 2 * v for k, v in mine.items() if k.endswith("/calls")})
            assert not close(mine, got), (name, close(mine, got))
        got = {k: v for k, v in out["quiet"].items() if k.startswith("collapse/")}
        assert set(got) == set(quiet)
        # (the head's weight, read after the step, trained on both data-parallel ranks' rows)
        weights = ("collapse/nc/equinorm_weights", "collapse/nc/self_duality")
        assert [k for k, *_ in close(quiet, got)] == list(weights)
        after = out["after"]
        assert after["collapse/errors"] == 3.0  # two probes and the mitigation
        assert out["disabled"] == [True] * 3
        assert "not the tensor-parallel mesh" in out["other_mesh"]
        assert (
            "'q' is tensor-parallel (its weight a DTensor with placements (Shard(dim=0),))"
            in (out["sigma"])
        )
        # NC4 from the vocabulary-parallel head's logits, gathered with its input
        assert not close(ref_nc4, out["nc4"]) and set(ref_nc4) == set(out["nc4"])
        side = out["side"]
        logged = {k for k in side if k.startswith("collapse/act2/")} - {"collapse/act2/calls"}
        assert side["collapse/errors"] == 1.0 and not logged, logged
        failing, disabled = out["failing"]
        assert disabled and not [k for k in failing if k.startswith("collapse/qk/")]
        # ReDo on a column- and a row-parallel layer: the change of one process, read back
        logged, weights, moments = out["redo"]
        assert logged["collapse/mitigations/redo"] == ref_redo[0]["collapse/mitigations/redo"] == 5
        for k, w in ref_redo[1].items():
            if k == "k.bias":  # (its gradient is round-off: softmax ignores a key bias, and
                continue  # Adam scales round-off to whole steps)
            torch.testing.assert_close(weights[k], w, rtol=1e-5, atol=1e-6, msg=k)
        for k, m in ref_redo[2].items():  # the re-drawn rows' moments: reset to zero
            assert (m[:5] == 0).all() and (moments[k][:5] == 0).all()
            torch.testing.assert_close(moments[k], m, rtol=1e-5, atol=1e-9)


pytest.importorskip("torch.distributed.tensor.parallel")


def llama_inputs():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


def llama_probes():
    return [
        probes.AttentionEntropy("model.layers.*.self_attn", queries=None, name="attention"),
        probes.LogitHealth("lm_head", name="logits", nlm=False),
        probes.RepresentationRank("model.norm", name="rank"),
        probes.DormantUnits("model.layers.*.mlp.act_fn", name="act"),  # (fed by gate_proj)
        probes.TokenEntropy("lm_head", tokens=None, name="entropy"),
        # the hidden-state path: logits recomputed from the final norm's output and the head
        probes.TokenEntropy("model.norm", head="lm_head", tokens=None, name="hidden"),
    ]


def one_log(model, watched, forward, calls=1):
    """The collapse metrics of one log after ``calls`` observed ``forward()`` s (no grad)."""
    mon = CollapseMonitor(model, watched, 1)
    with mon.observe(), torch.no_grad():
        for _ in range(calls):
            forward()
    logged = mon.step()
    mon.close()
    return {k: v for k, v in logged.items() if k.startswith("collapse/")}


def llama_log(model):
    ids, mask = llama_inputs()
    return one_log(model, llama_probes(), lambda: model(input_ids=ids, attention_mask=mask))


def sequential():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D), nn.LayerNorm(D), nn.Linear(D, VOCAB)
    )


def sequence_log(model):
    """The norm's output (whole sequences) and the row-parallel layer's (a slice of them)."""
    watched = [
        probes.RepresentationRank("2", name="norm"),
        probes.LogitHealth("3", name="logits", nlm=False),
        probes.RepresentationRank("1", name="rows"),
    ]
    return one_log(model, watched, lambda: model(batch()[0]))


def odd():
    torch.manual_seed(0)
    return nn.ModuleDict(
        {"rows": nn.Embedding(64, D), "cols": nn.Embedding(64, D), "head": nn.Linear(D, 63)}
    )


def odd_plan():
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    # (RowwiseParallel on an embedding, as torchtitan writes it: Shard(0) rows, replicated ids
    # and output; ColwiseParallel: Shard(1), a slice of each vector; on the head: 32 and 31 of
    # 63 columns)
    rows = RowwiseParallel(input_layouts=Replicate())
    return {"rows": rows, "cols": ColwiseParallel(), "head": ColwiseParallel()}


def odd_log(model):
    watched = [
        probes.RepresentationRank("rows", name="rows"),
        probes.RepresentationRank("cols", name="cols"),
        probes.LogitHealth("head", name="logits", nlm=False),
    ]
    ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(3))

    def forward():
        model["rows"](ids)
        model["cols"](ids)
        model["head"](batch()[0] * 5)

    return one_log(model, watched, forward)


def mixed_log(model):
    """Two calls per layer (the sampled query rows must stay in step over them)."""
    ids, mask = llama_inputs()
    watched = [probes.AttentionEntropy("model.layers.*.self_attn", queries=3, name="a")]
    return one_log(model, watched, lambda: model(input_ids=ids, attention_mask=mask), calls=2)


def wrapped_log(model):
    watched = [probes.AttentionEntropy("", queries=None, name="attention")]
    return one_log(model, watched, lambda: model(batch()[0]))


def llama_worker(rank, init, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    with process_group(rank, init, world=2):
        torch.set_num_threads(1)
        tp = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        model = tiny("Llama")  # GQA: 4 query heads, 2 key-value heads; SDPA
        for layer in model.model.layers:
            parallelize_module(
                layer,
                tp,
                {
                    **{f"self_attn.{p}_proj": ColwiseParallel() for p in "qkv"},
                    "self_attn.o_proj": RowwiseParallel(),
                    **{f"mlp.{p}_proj": ColwiseParallel() for p in ("gate", "up")},
                    "mlp.down_proj": RowwiseParallel(),
                },
            )
        parallelize_module(model, tp, {"lm_head": ColwiseParallel()})  # local vocabulary slices
        out = {"llama": llama_log(model)}
        # sequence parallelism (torchtitan's layout): a row-parallel layer scatters the
        # sequence, a SequenceParallel norm keeps it as a Shard(1) DTensor, the head gathers it
        from torch.distributed.tensor import Shard
        from torch.distributed.tensor.parallel import SequenceParallel

        model = parallelize_module(
            sequential(),
            tp,
            {
                "0": ColwiseParallel(),
                "1": RowwiseParallel(output_layouts=Shard(1)),  # local sequence slices
                "2": SequenceParallel(),
                "3": ColwiseParallel(input_layouts=Shard(1)),
            },
        )
        out["sequence"] = sequence_log(model)
        # an odd vocabulary (uneven slices); embeddings split both ways
        out["odd"] = odd_log(parallelize_module(odd(), tp, odd_plan()))
        # only the second layer tensor-parallel, sampled query rows: the same rows on each rank
        model = tiny("Llama")
        parallelize_module(
            model.model.layers[1],
            tp,
            {
                **{f"self_attn.{p}_proj": ColwiseParallel() for p in "qkv"},
                "self_attn.o_proj": RowwiseParallel(),
            },
        )
        out["mixed"] = mixed_log(model)
        # the call made by a child module of the one holding q/k/v: still numbered globally
        torch.manual_seed(0)
        out["wrapped"] = wrapped_log(parallelize_module(Block(wrapped=True), tp, plan()))
        torch.save(out, os.path.join(out_dir, f"llama{rank}.pt"))


def test_a_transformers_llama_and_sequence_parallelism_give_the_numbers_of_one_process(tmp_path):
    pytest.importorskip("transformers")
    ref = llama_log(tiny("Llama"))
    assert "collapse/attention/model.layers.1.self_attn/entropy/head_3" in ref
    seq = sequence_log(sequential())
    odd_ref, mixed_ref = odd_log(odd()), mixed_log(tiny("Llama"))
    torch.manual_seed(0)
    wrapped_ref = wrapped_log(Block(wrapped=True))
    assert "collapse/attention/sdpa/entropy/head_3" in wrapped_ref
    seq = {k: v for k, v in seq.items() if "/rows/" not in k}
    for out in run_two(llama_worker, tmp_path, "llama", world=2):
        got = out["llama"]
        assert got["collapse/errors"] == 0.0
        assert set(got) == set(ref)
        assert not close(ref, got), close(ref, got)
        # sequence parallelism: the norm's Shard(1) DTensor gathered (each token once); the
        # row-parallel layer's local slice of the sequence refused
        got = out["sequence"]
        assert got.pop("collapse/errors") == seq.pop("collapse/errors", 0.0) + 1
        got = {k: v for k, v in got.items() if "/rows/" not in k}
        assert set(got) == set(seq) and not close(seq, got), close(seq, got)
        for name, mine in (("odd", odd_ref), ("mixed", mixed_ref), ("wrapped", wrapped_ref)):
            got = out[name]
            assert got.get("collapse/errors", 0.0) == 0.0, name
            assert set(got) == set(mine) and not close(mine, got), (name, close(mine, got))
