"""Lightning's ModelParallelStrategy (FSDP2) on 2 CPU processes with every probe and
mitigation: the first window's metrics equal one process on the union of the data, and the
mitigations leave identical whole weights on both ranks."""

import os
import subprocess
import sys

import pytest
import torch

from tests.integrations.test_lightning import read_events
from tests.scripts.lightning_fsdp import fit


def scalars_of(log_dir):
    acc = read_events(log_dir)
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def test_model_parallel_strategy_with_every_probe_and_mitigation(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    # Lightning starts rank 1 by running this command again: a subprocess, not pytest
    subprocess.run(
        [sys.executable, "-m", "tests.scripts.lightning_fsdp", str(tmp_path), "fsdp2"],
        check=True,
        env=env,
        timeout=600,
    )
    fit(str(tmp_path), "single", 1, 10)
    single = scalars_of(tmp_path / "single" / "version_0")
    sharded = scalars_of(tmp_path / "fsdp2" / "version_0")
    assert set(single) == set(sharded) and len(single) > 60
    # as under DDP: nlm_cosine is each rank's own gradient; max_logit a maximum over weights
    # that differ by the reduction's rounding after two updates
    known = {"collapse/logits/nlm_cosine", "collapse/attn/zoo.attn/max_logit"}
    for tag in single:
        if 3 not in single[tag] or tag in known:
            continue
        want = single[tag][3] * (2 if tag.endswith("/calls") else 1)
        assert sharded[tag][3] == pytest.approx(want, rel=1e-4, abs=1e-7), tag
    r0, r1 = (torch.load(tmp_path / f"fsdp2{r}.pt", weights_only=False) for r in range(2))
    assert r0["sharded"] and "zoo.attn.q.parametrizations.weight.original" in r0["sharded"]
    assert r0["mitigations"] == r1["mitigations"] and r0["mitigations"]["reset_dead_codes"] > 0
    assert r0["mitigations"]["sigma_reparam"] > 0
    for key in r0["weights"]:
        assert torch.equal(r0["weights"][key], r1["weights"][key]), key
