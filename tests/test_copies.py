"""Copies of a monitored model (torch.save, pickle, copy.deepcopy: EMA teachers, model EMA) work,
carry nothing of the monitor, and are never recorded by the original's probes."""

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch

from collapse_monitor import CollapseMonitor, mitigations, probes
from tests.zoo import Zoo, batch, every_probe, loss_of


def monitored(reparam=None):
    """The zoo, monitored; ``reparam``: also σReparam (``"sigma"``) or SimVQ on the codebook
    instead of ResetDeadCodes (``"simvq"``)."""
    model = Zoo()
    codebook = (
        mitigations.SimVQ("vq")
        if reparam == "simvq"
        else mitigations.ResetDeadCodes("vq", every_step=False)
    )
    mits = [codebook, mitigations.ReDo(layers={"sae_act": ("sae", "dec")})]
    mits += [mitigations.SigmaReparam("attn")] if reparam == "sigma" else []
    mon = CollapseMonitor(
        model, every_probe(), 100, mitigations=mits, strict=True, observe_every_n_steps=1
    )
    x, y, groups = batch(0)
    with mon.observe(targets=y, groups=groups):
        loss_of(model(x), y).backward()
    mon.step()
    return model, mon


@pytest.mark.parametrize(
    "make_copy",
    [
        copy.deepcopy,
        lambda m: pickle.loads(pickle.dumps(m)),
        lambda m: torch.load(io.BytesIO(_saved(m)), weights_only=False),
    ],
    ids=["deepcopy", "pickle", "torch.save"],
)
def test_a_copy_works_and_is_never_recorded_by_the_original(make_copy):
    model, mon = monitored()
    before = mon.compute()
    twin = make_copy(model)
    x, y, groups = batch(1)
    with mon.observe(targets=y, groups=groups):  # the original is being recorded...
        out = twin(x)  # ...but only the copy runs
    assert torch.equal(out[0], model(x)[0])  # the copy computes what the original does
    assert mon.compute() == before
    # the copy carries no monitor: it can get its own
    other = CollapseMonitor(twin, every_probe(), 100, strict=True, observe_every_n_steps=1)
    with other.observe(targets=y, groups=groups):
        twin(x)
    assert other.compute()["collapse/nc/samples"] == len(y)
    other.close()
    mon.close()


def _saved(model) -> bytes:
    buf = io.BytesIO()
    torch.save(model, buf)
    return buf.getvalue()


def test_a_saved_monitored_model_loads_without_this_package(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    mon = CollapseMonitor(
        model,
        [
            probes.NeuralCollapse("2", 4, name="nc"),
            probes.DormantUnits("1", name="dormant"),
            probes.LogitHealth("2", name="logits"),
        ],
        5,
        mitigations=[mitigations.ReDo()],
    )
    with mon.observe(targets=torch.arange(10) % 4):
        model(torch.randn(10, 8))
    torch.save(model, tmp_path / "model.pt")  # saved while monitored, hooks attached
    mon.close()
    code = (
        "import sys; sys.modules['collapse_monitor'] = None\n"  # the package is not there
        "import torch\n"
        f"m = torch.load({str(tmp_path / 'model.pt')!r}, weights_only=False)\n"
        "print(m(torch.ones(2, 8)).shape)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "torch.Size([2, 4])"


@pytest.mark.parametrize("reparam", ["sigma", "simvq"])
def test_a_deepcopy_of_a_reparametrized_model_trains_apart_from_the_original(reparam):
    # (pickle and torch.save of a parametrized module are refused by torch.nn.utils.parametrize:
    # such a model is saved through its state_dict)
    model, mon = monitored(reparam)
    model.zero_grad(set_to_none=True)
    teacher = copy.deepcopy(model)
    x, y, groups = batch(2)
    with mon.observe(targets=y, groups=groups):
        loss_of(teacher(x), y).backward()

    def added(m):  # the parameter the reparametrisation added
        if reparam == "sigma":
            return m.attn.q.parametrizations.weight[0].gamma
        return m.vq.codebook.parametrizations.weight[0].weight

    assert added(teacher).grad is not None
    assert added(model).grad is None
    mon.close()
