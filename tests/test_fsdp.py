"""FSDP2 (``fully_shard``) and FSDP (first generation, both ``use_orig_params`` settings,
auto-wrapped blocks) on 2 gloo processes: every probe's metrics equal one process on the union
of the data, and every mitigation's effect is read back from the sharded parameters."""

import functools
import os
from contextlib import nullcontext

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp import fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from collapse_monitor import CollapseMonitor, mitigations, probes
from collapse_monitor._sharding import whole
from tests.dist import process_group, run_two
from tests.mitigations.test_reset_dead_codes import VQ
from tests.probes.test_attention_entropy import SDPAAttention
from tests.zoo import C, Zoo, batch, every_probe, loss_of

ENGINES = ["fsdp2", "fsdp1", "fsdp1_orig_params"]
STEPS, LOG = 2, 2


def monitor(model, engine, redo=True):
    """Every probe, ResetDeadCodes, ReDo and (where the monitor is built before sharding)
    σReparam, which adds parameters and so must come before FSDP wraps the model."""
    chosen = [mitigations.ResetDeadCodes("vq", every_step=False)]
    if redo:
        chosen.append(mitigations.ReDo(layers={"sae_act": ("sae", "dec")}))
    if engine != "fsdp1":
        chosen.append(mitigations.SigmaReparam("attn"))
    # and neural collapse on class shards (one process: the same probe unsharded)
    chosen_probes = every_probe() + [
        probes.NeuralCollapse("head", C, name="nc_shards", shard_classes=True)
    ]
    return CollapseMonitor(
        model, chosen_probes, LOG, mitigations=chosen, observe_every_n_steps=1, strict=True
    )


def union(step):
    """Both ranks' batches of a step (each rank takes its own half)."""
    parts = [batch(step, seed=r) for r in range(2)]
    return [torch.cat(t) for t in zip(*parts)]


def train(model, forward, mon, optimizer, rank=None, vq_inputs=None):
    for step in range(STEPS):
        x, y, groups = batch(step, seed=rank) if rank is not None else union(step)
        with mon.observe(targets=y, groups=groups):
            loss = loss_of(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        out = mon.step(optimizer=optimizer)
    return out


def snapshot(model, optimizer, metrics, mon, moments=True):
    """Everything whole (gathered from shards): parameters and optimizer moments (FSDP of the
    first generation keeps moments of flat local shards: not compared)."""
    named = dict(model.named_parameters())
    moments = moments and {
        f"{n}/{k}": whole(v).detach().clone()
        for n, p in named.items()
        for k, v in optimizer.state.get(p, {}).items()
        if k == "exp_avg"
    }
    return {
        "metrics": metrics,
        "counts": dict(mon.mitigation_counts),
        "params": {n: whole(p).detach().clone() for n, p in named.items()},
        "moments": moments,
    }


def fsdp_worker(rank, init, out_dir):
    with process_group(rank, init):
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (2,))
        results = {}
        for engine in ENGINES:
            model = Zoo()
            if engine == "fsdp2":
                mon = monitor(model, engine)
                for block in (model.attn, model.vq, model.sae, model):
                    fully_shard(block, mesh=mesh)
                wrapped = model
            else:
                # FSDP (first generation): the monitor built on the wrapped model (paths as in
                # the unwrapped one), or built first and told which module wraps it
                before = engine == "fsdp1_orig_params"
                mon = monitor(model, engine) if before else None
                wrapped = FSDP(
                    model,
                    use_orig_params=before,
                    auto_wrap_policy=ModuleWrapPolicy({SDPAAttention, VQ}),
                    device_id=torch.device("cpu"),
                )
                if before:
                    mon.sharded_by(wrapped)
                else:
                    mon = monitor(wrapped, engine)
            optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
            captured = []
            model.vq.register_forward_pre_hook(lambda m, a, c=captured: c.append(a[0].detach()))
            metrics = train(model, wrapped, mon, optimizer, rank)
            gather = FSDP.summon_full_params(wrapped) if engine != "fsdp2" else nullcontext()
            with gather:
                results[engine] = snapshot(model, optimizer, metrics, mon, engine == "fsdp2")
            results[engine]["vq_inputs"] = captured[-1]
            # a second window: the lagged NCC of the first window's class means
            second = train(model, wrapped, mon, optimizer, rank)
            results[engine]["ncc"] = second["collapse/nc/ncc_mismatch_lagged"]
            results[engine]["gamma"] = [
                (type(p).__name__, tuple(p.shape))
                for n, p in model.named_parameters()
                if n.endswith("gamma")
            ]
            mon.close()
            del wrapped, optimizer
        # a monitor built on the model that FSDP then wraps from outside cannot gather its
        # parameters: a clear error at the first log, on every rank, instead of a crash
        model = Zoo()
        mon = monitor(model, "fsdp1", redo=False)  # not told: sharded_by(wrapped)
        wrapped = FSDP(model, device_id=torch.device("cpu"))
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=1e-2)
        try:
            train(model, wrapped, mon, optimizer, rank)
        except RuntimeError as exc:
            results["outside"] = str(exc)
        mon.close()
        del wrapped
        # σReparam cannot add its gain to a model already sharded: refused at attach
        model = Zoo()
        fully_shard(model, mesh=mesh)
        try:
            CollapseMonitor(model, [], mitigations=[mitigations.SigmaReparam("attn")])
        except RuntimeError as exc:
            results["sigma_after_shard"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"fsdp{rank}.pt"))


@functools.cache
def single(engine):
    model = Zoo()
    mon = monitor(model, engine)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    metrics = train(model, model, mon, optimizer)
    out = snapshot(model, optimizer, metrics, mon)
    mon.close()
    return out


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return run_two(fsdp_worker, tmp_path_factory.mktemp("fsdp"), "fsdp")


def canonical(name):
    return name.replace("_fsdp_wrapped_module.", "")


@pytest.mark.parametrize("engine", ENGINES)
def test_every_probe_equals_one_process_on_the_union(sharded, engine):
    want = single(engine)["metrics"]
    for rank, result in enumerate(sharded):
        got = result[engine]["metrics"]
        assert got.keys() == want.keys(), sorted(got.keys() ^ want.keys())
        wrong = {}
        for key, value in want.items():
            if key.endswith("/calls"):  # forward calls are counted on every rank
                value *= 2
            if key.endswith("/nlm_cosine"):  # each rank's own gradient (documented)
                continue
            if key.endswith("/active_fraction_peak"):  # each rank's own calls (documented)
                assert got[key] == sharded[1 - rank][engine]["metrics"][key]  # (their highest)
                continue
            if got[key] != pytest.approx(value, rel=1e-6, abs=1e-9):
                wrong[key] = (got[key], value)
        assert not wrong, (rank, wrong)
    assert want["collapse/errors"] == 0 and len(want) > 60


@pytest.mark.parametrize("engine", ENGINES)
def test_every_mitigation_changed_the_sharded_parameters(sharded, engine):
    ref = single(engine)
    r0, r1 = (r[engine] for r in sharded)
    counts = r0["counts"]
    assert counts == r1["counts"] == ref["counts"]
    assert counts["redo"] > 0 and counts["reset_dead_codes"] > 0
    # shards agree: every rank reads the same whole parameters and moments
    for key in r0["params"]:
        assert torch.equal(r0["params"][key], r1["params"][key]), key
    for key in r0["moments"] or ():
        assert torch.equal(r0["moments"][key], r1["moments"][key]), key
    params = {canonical(k): v for k, v in r0["params"].items()}
    want = {canonical(k): v for k, v in ref["params"].items()}
    # ReDo: the recycled units' incoming rows are the (seeded) fresh ones, outgoing columns 0
    recycled = (want["sae.weight"] != single_before_redo(engine)).any(1)
    assert int(recycled.sum()) == counts["redo"]
    assert torch.equal(params["sae.weight"][recycled], want["sae.weight"][recycled])
    assert (params["dec.weight"][:, recycled] == 0).all()
    # ResetDeadCodes: as many codes as one process resets, each a vector of the ranks' batches
    codebook = params["vq.codebook.weight"]
    pool = torch.cat([r["vq_inputs"].reshape(-1, codebook.shape[1]) for r in (r0, r1)])
    hits = (codebook[:, None, :] == pool[None]).all(-1).any(1)
    assert int(hits.sum()) == counts["reset_dead_codes"]
    if engine == "fsdp2":  # FSDP (first generation)'s flat optimizer state is not reset
        moments = {canonical(k): v for k, v in r0["moments"].items()}
        key = next(k for k in moments if k.startswith("vq.codebook.weight"))
        assert (moments[key][hits] == 0).all() and (moments[key][~hits] != 0).any()


def single_before_redo(engine):
    """One process's ``sae.weight`` just before the log at which ReDo acts."""
    model = Zoo()
    mon = monitor(model, engine, redo=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, model, mon, optimizer)
    mon.close()
    return model.sae.weight.detach().clone()


def test_sigma_reparam_gain_is_a_sharded_one_element_tensor(sharded):
    gammas = sharded[0]["fsdp2"]["gamma"]
    assert gammas and all(g == ("DTensor", (1,)) for g in gammas)
    assert single("fsdp2")["counts"]["sigma_reparam"] == len(gammas)
    assert sharded[0]["fsdp1_orig_params"]["counts"]["sigma_reparam"] == len(gammas)


def test_fsdp_wrapping_the_monitored_model_from_outside_is_a_clear_error(sharded):
    for result in sharded:
        assert "build the CollapseMonitor on the FSDP-wrapped model" in result["outside"]


def test_sigma_reparam_on_an_already_sharded_model_is_refused(sharded):
    for result in sharded:
        assert "apply σReparam before sharding" in result["sigma_after_shard"]


@pytest.mark.parametrize("engine", ENGINES)
def test_lagged_ncc_is_reported_and_agrees_across_ranks(sharded, engine):
    r0, r1 = (r[engine]["ncc"] for r in sharded)
    assert r0 == r1 and 0.0 <= r0 <= 1.0
