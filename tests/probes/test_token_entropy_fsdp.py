"""TokenEntropy's hidden-state path under FSDP2 on 2 gloo processes: with the LM head in the
root unit (the usual wrap: blocks, then the model) its weight is whole during the forward and the
metrics equal one process on the union of the batches; a head sharded as a unit of its own is
refused with a message naming it."""

import os

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from collapse_monitor import CollapseMonitor, probes
from tests.dist import process_group, run_two
from tests.probes.test_conventions import tiny

pytest.importorskip("transformers")
KEYS = ("tokens", "entropy_mean", "entropy_std", "entropy_upper95", "entropy_q50", "logprob_mean")


def batch(rank):
    g = torch.Generator().manual_seed(10 + rank)
    ids = torch.randint(0, 50, (3, 8), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # the prompt
    return ids, labels


def watched():
    return [
        probes.TokenEntropy("model", head="lm_head", tokens=None, name="hidden"),
        probes.TokenEntropy("lm_head", tokens=None, name="logits"),
    ]


def run(model, wrapped, batches, mon):
    for ids, labels in batches:
        with mon.observe(targets=labels):
            loss = wrapped(input_ids=ids, labels=labels).loss
        loss.backward()
    return mon.step()


def worker(rank, init, out_dir):
    with process_group(rank, init):
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (2,))
        out = {}
        for tied in (False, True):
            model = tiny("Llama", vocab_size=50, num_hidden_layers=2, tie_word_embeddings=tied)
            mon = CollapseMonitor(model, watched(), 1, strict=True)
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)  # the head, embeddings and norm: the root unit
            out[tied] = run(model, model, [batch(rank)], mon)
            mon.close()
        # the head as a unit of its own: sharded when the backbone's output arrives
        model = tiny("Llama", vocab_size=50, num_hidden_layers=1)
        mon = CollapseMonitor(model, watched()[:1], 1, strict=True)
        fully_shard(model.lm_head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        try:
            run(model, model, [batch(rank)], mon)
        except ValueError as exc:
            out["own_unit"] = str(exc)
        mon.close()
        torch.save(out, os.path.join(out_dir, f"te{rank}.pt"))


def test_fsdp2_head_in_the_root_unit_equals_one_process_and_its_own_unit_is_refused(tmp_path):
    ranks = run_two(worker, tmp_path, "te")
    for tied in (False, True):
        model = tiny("Llama", vocab_size=50, num_hidden_layers=2, tie_word_embeddings=tied)
        mon = CollapseMonitor(model, watched(), 1, strict=True)
        ids, labels = (torch.cat(t) for t in zip(batch(0), batch(1)))
        want = run(model, model, [(ids, labels)], mon)
        mon.close()
        for got in (r[tied] for r in ranks):
            for name in ("hidden", "logits"):
                for key in KEYS:
                    k = f"collapse/{name}/{key}"
                    assert got[k] == pytest.approx(want[k], rel=1e-5), (tied, k)
    for r in ranks:
        assert "head 'lm_head' holds a DTensor weight" in r["own_unit"]
