"""Accelerate and the Hugging Face ``Trainer`` on 2 CPU processes (torchrun, gloo): the
documented Accelerate recipe (``examples/accelerate_ddp.py``) and ``CollapseTrainerCallback``
log, from the main process, the metrics one process computes on the union of the data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from collapse_monitor import functional as F
from collapse_monitor import probes

ROOT = Path(__file__).resolve().parents[2]


def torchrun(*args, timeout=300, deepspeed=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if deepspeed:  # DeepSpeed's CPU accelerator (Accelerate's CPU mode would leave it out)
        env["DS_ACCELERATOR"] = "cpu"
    else:  # Accelerate's multi-CPU mode (accelerate launch --cpu)
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    subprocess.run([*cmd, *args], check=True, env=env, timeout=timeout, cwd=ROOT)


def test_accelerate_recipe_on_two_processes(tmp_path):
    torchrun("examples/accelerate_ddp.py", "--out", str(tmp_path), "--lr", "0")
    records = [json.loads(line) for line in (tmp_path / "collapse.jsonl").read_text().splitlines()]
    logs = {r["step"]: r["metrics"] for r in records if r["type"] == "metrics"}
    # 128 rows / (2 processes x 8 rows x 2 micro-batches): 4 optimizer steps per epoch
    assert sorted(logs) == [4, 8]
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from accelerate_ddp import data, model
    finally:
        sys.path.pop(0)
    net = model()
    x, y = data().tensors
    with torch.no_grad():
        feats = net[:2](x)
    ref = F.neural_collapse(feats, y, 4, net[2].weight)
    for metrics in logs.values():  # each window is one epoch: the whole data set
        assert metrics["collapse/head/samples"] == 128
        for key in ("nc1", "nc1_quotient", "equiangular", "cdnv", "equinorm_weights"):
            assert metrics[f"collapse/head/{key}"] == pytest.approx(ref[key], rel=1e-6), key


@pytest.mark.parametrize("mode", ["shards", "zero3"], ids=["ddp", "zero3"])
def test_trainer_callback_on_two_processes(tmp_path, mode):
    """Each window equals one process on all rows: under DDP with class shards and replicated
    statistics, also the window resumed from a checkpoint at step 3 (each rank saved its own
    classes); under DeepSpeed ZeRO-3 (the head's partitioned weight gathered at the
    readout)."""
    if mode == "zero3":
        pytest.importorskip("deepspeed")
    shards = mode == "shards"
    from tests.integrations.test_transformers import KEYS, Tokens, gpt2
    from tests.reference import assert_metrics_close
    from tests.scripts.hf_trainer_ddp import ROWS

    folder = tmp_path / "out" / "checkpoint-3"
    if shards:  # an earlier run's file of a rank this run does not have: removed at the save
        folder.mkdir(parents=True)
        (folder / "collapse_monitor.rank7.pt").write_bytes(b"stale")
    torchrun("-m", "tests.scripts.hf_trainer_ddp", str(tmp_path), mode, deepspeed=not shards)
    if shards:  # rank 1's classes travel in their own file
        assert {p.name for p in folder.glob("collapse_monitor*")} == {
            "collapse_monitor.pt",
            "collapse_monitor.rank1.pt",
        }
    logs = json.loads((tmp_path / "logs.json").read_text())
    assert [e["step"] for e in logs] == [2, 4]
    model, data = gpt2(dropout=0.0), Tokens(ROWS)
    feats = []
    model.lm_head.register_forward_hook(lambda m, a, o: feats.append(a[0]))
    with torch.no_grad():
        model(input_ids=data.ids, attention_mask=data.mask)
    h, labels = feats[0][:, :-1], data.labels[:, 1:]
    keep = labels != -100
    ref = F.neural_collapse(h[keep], labels[keep], 24, model.lm_head.weight)
    if shards:  # the 2 ranks' files resumed in one process: the classes of both joined
        assert_resumed_in_one_process(tmp_path)
    for entry in logs:  # each window is one epoch: every row once, on one rank or the other
        for name in ("lm_head", "replicated") if shards else ("lm_head",):
            got = {
                k.split("/")[-1]: v for k, v in entry.items() if k.startswith(f"collapse/{name}/")
            }
            assert got["samples"] == int(keep.sum()) and got["calls"] == 8
            assert_metrics_close(got, ref, keys=KEYS)


def assert_resumed_in_one_process(tmp_path):
    """The window of checkpoint-3 (two ranks' files, class shards and replicated statistics)
    loaded by the callback in one process: the joined class shards hold what the replicated
    statistics hold (the same rows, both ranks')."""
    from transformers import TrainerState

    from collapse_monitor.integrations.transformers import CollapseTrainerCallback
    from tests.integrations.test_transformers import V, arguments, gpt2

    def nc(**kw):
        return probes.NeuralCollapse("lm_head", V, target_shift=1, ncc_max_rows=0, **kw)

    watched = [nc(shard_classes=True), nc(name="replicated")]
    cb = CollapseTrainerCallback(watched, observe_every_n_steps=1)
    args = arguments(tmp_path, logging_steps=2)
    cb.on_init_end(args, TrainerState(), None, model=gpt2(dropout=0.0))
    cb._resume(args, TrainerState(global_step=3))
    joined, whole = (cb.monitor.driver(p).window["moments"] for p in watched)
    assert int(joined.count.sum()) > 0
    torch.testing.assert_close(joined.count, whole.count)
    torch.testing.assert_close(joined.means(), whole.means(), rtol=1e-12, atol=1e-12)
    cb.close()
