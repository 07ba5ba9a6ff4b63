"""The overhead budget (``CollapseMonitor(..., overhead_budget=...)``): measured, kept by thinning
the costly probes' steps, agreed by the ranks, resumed; never the every-step probes.

The decisions rest on measured time, so each test makes them certain: a monitor that costs far
more than the budget (toy models, whose step is tiny beside the readout: thinned to one step
per window whatever the machine) or far less (no thinning)."""

import re
import time

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as F
from tests.dist import process_group, run_two

C, D, L = 10, 64, 10


def batch(step, rows=64):
    g = torch.Generator().manual_seed(step)
    y = torch.randint(0, C, (rows,), generator=g)
    means = torch.randn(C, D, generator=torch.Generator().manual_seed(99)) * 2
    return means[y] + torch.randn(rows, D, generator=g), y


def run(mon, net, steps, first=0):
    logs = []
    for s in range(first, first + steps):
        x, y = batch(s)
        with mon.observe(targets=y):
            net(x)
        out = mon.step()
        if out:
            logs.append(out)
    return logs


def heavy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Identity(), nn.Linear(D, C))
    ps = [
        probes.NeuralCollapse("1", C, name="head"),
        probes.RepresentationRank("0", name="rank"),
        probes.DormantUnits("0", name="dormant"),
    ]
    return net, ps


def test_a_monitor_over_its_budget_records_one_step_per_window_exactly(caplog):
    net, ps = heavy()
    mon = CollapseMonitor(net, ps, L, overhead_budget=0.01)
    logs = run(mon, net, 5 * L)
    # the first window is timed from its first step(): no share yet, the cadence's own steps
    assert "collapse/monitor/overhead" not in logs[0]
    assert logs[0]["collapse/rank/recorded_steps"] == logs[1]["collapse/rank/recorded_steps"] == 2
    assert 0.01 < logs[1]["collapse/monitor/overhead"] < 1  # measured: a toy step is tiny
    for m in logs[2:]:  # then the floor: the logging step only
        assert m["collapse/rank/recorded_steps"] == m["collapse/head/recorded_steps"] == 1
        assert m["collapse/dormant/recorded_steps"] == L  # every-step probes are never thinned
        assert 0 < m["collapse/monitor/overhead"] < 1
    assert "cannot be kept" in caplog.text  # the logs alone exceed 1% of a toy's steps
    # the window is exact for the step it recorded: the last one
    last = 5 * L - 1
    x, y = batch(last)
    ref = F.neural_collapse(x, y, C, net[1].weight, net[1].bias)
    for k in ("nc1", "nc1_quotient", "equiangular", "cdnv"):
        assert logs[-1][f"collapse/head/{k}"] == pytest.approx(ref[k], rel=1e-6)
    assert logs[-1]["collapse/rank/erank"] == pytest.approx(
        F.representation_rank(x)["erank"], rel=1e-6
    )
    mon.close()


class Slow(nn.Module):
    """A layer whose forward costs tens of milliseconds: the monitor's share is then small."""

    def forward(self, x):
        a = torch.randn(384, 384, generator=torch.Generator().manual_seed(0))
        for _ in range(20):
            a = torch.tanh(a @ a)
        return x + 0 * a.sum()


def test_a_monitor_within_its_budget_keeps_the_cadence():
    torch.manual_seed(0)
    net = nn.Sequential(Slow(), nn.Linear(D, C))
    mon = CollapseMonitor(
        net, [probes.RepresentationRank("0", name="rank")], L, overhead_budget=0.9
    )
    logs = run(mon, net, 3 * L)
    for m in logs:
        assert m["collapse/rank/recorded_steps"] == 2
    for m in logs[1:]:
        assert 0 < m["collapse/monitor/overhead"] < 0.9
    assert mon.driver("rank").slower == 1
    mon.close()


def test_the_thinned_estimate_stays_within_its_interval_of_the_every_step_value():
    """Token entropy of i.i.d. logits: the thinned window (one step) estimates the every-step
    window's mean within the two windows' 95% intervals."""
    V = 40

    def logits(step):
        g = torch.Generator().manual_seed(step)
        return torch.randn(8, 32, V, generator=g) * 2

    head = nn.Identity()
    runs = {}
    for budget in (0.01, None):
        kw = {"overhead_budget": budget} if budget else {"observe_every_n_steps": 1}
        mon = CollapseMonitor(head, [probes.TokenEntropy("", name="ent")], L, **kw)
        for s in range(3 * L):
            with mon.observe():
                head(logits(s))
            out = mon.step()
        runs[budget] = out
        mon.close()
    thin, full = runs[0.01], runs[None]
    assert thin["collapse/ent/recorded_steps"] == 1
    gap = abs(thin["collapse/ent/entropy_mean"] - full["collapse/ent/entropy_mean"])
    assert gap <= thin["collapse/ent/entropy_mean_ci95"] + full["collapse/ent/entropy_mean_ci95"]


def test_a_resumed_run_keeps_the_thinned_strides_and_one_without_a_budget_drops_them():
    net, ps = heavy()
    mon = CollapseMonitor(net, ps, L, overhead_budget=0.01)
    run(mon, net, 2 * L)
    saved = mon.state_dict()
    slower = {d.name: d.slower for d in mon._probes.drivers}
    mon.close()
    net2, ps2 = heavy()
    mon2 = CollapseMonitor(net2, ps2, L, overhead_budget=0.01)
    mon2.load_state_dict(saved)
    assert {d.name: d.slower for d in mon2._probes.drivers} == slower
    assert slower["head"] > 1 and slower["rank"] > 1 and slower["dormant"] == 1
    logs = run(mon2, net2, L, first=2 * L)
    assert logs[0]["collapse/rank/recorded_steps"] == 1
    mon2.close()
    net3, ps3 = heavy()
    mon3 = CollapseMonitor(net3, ps3, L)  # no budget: the cadence's own strides again
    mon3.load_state_dict(saved)
    assert all(d.slower == 1 for d in mon3._probes.drivers)
    mon3.close()


class _Meter:
    def __init__(self, seconds):
        self.seconds = seconds

    def take(self):
        return self.seconds


def _driver(name, seconds, steps, slower=1, classes=None, rows=None):
    from types import SimpleNamespace

    from collapse_monitor.cadence import SAMPLED, per_class

    sampling = SAMPLED if classes is None else per_class(classes)
    return SimpleNamespace(
        name=name,
        meter=_Meter(seconds),
        window_steps=steps,
        slower=slower,
        rows_per_step=rows,
        probe=SimpleNamespace(sampling=sampling, key=lambda metric: f"collapse/{name}/{metric}"),
    )


def test_the_control_thins_when_over_and_records_more_again_when_well_under():
    """The controller alone, on given costs (no clock): over the budget the strides grow in
    proportion, never below one step per window or the steps a class-conditional probe's
    classes need; well under it they shrink back to the cadence's."""
    from collapse_monitor.budget import Budget

    b = Budget(0.01)
    cheap, costly = _driver("cheap", 0.0001, 2), _driver("costly", 0.05, 2)
    classes = _driver("nc", 0.05, 10, classes=1000, rows=512)  # needs 4000 / 512 -> 8 steps
    drivers = [cheap, costly, classes]
    b.settle(drivers, drivers)  # the first window (timed from its first step): no share
    assert b.overhead is None and [d.slower for d in drivers] == [1, 1, 1]
    b.window_seconds = 10.0  # 0.1 s of probes in 10 s: just over a budget of 1%
    b.settle(drivers, drivers)
    assert b.overhead == pytest.approx(0.01001)
    assert costly.slower == cheap.slower == 2  # (whole strides: the next is half the steps)
    assert classes.slower == 1  # 5 of 10 steps would be fewer than the 8 its classes need
    b.window_seconds, costly.meter, classes.meter = 1.0, _Meter(0.5), _Meter(0.5)
    costly.window_steps = 1  # (its stride doubled)
    b.settle(drivers, drivers)  # far over: the floors
    assert costly.slower == 2 and classes.slower == 1  # one step; the class probe's 10
    cadence = {"cheap": 2, "costly": 2, "nc": 10}
    for _ in range(3):  # 0.003% now: back to the cadence, at most twice the steps per log
        b.window_seconds = 100.0
        for d in drivers:
            d.meter, d.window_steps = _Meter(0.001), max(1, cadence[d.name] // d.slower)
        b.settle(drivers, drivers)
    assert [d.slower for d in drivers] == [1, 1, 1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"overhead_budget": 0.0}, r"overhead_budget must be None or in \(0, 1\)"),
        ({"overhead_budget": 1.5}, r"overhead_budget must be None or in \(0, 1\)"),
        ({"overhead_budget": 0.01, "observe_every_n_steps": 1}, "pass one of them"),
        ({"overhead_budget": "1%"}, "overhead_budget must be a float or None"),
    ],
)
def test_configuration_errors(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CollapseMonitor(nn.Linear(2, 2), [probes.RepresentationRank("", name="r")], 5, **kwargs)


def test_without_a_budget_nothing_is_measured_or_logged():
    net, ps = heavy()
    mon = CollapseMonitor(net, ps, L)
    logs = run(mon, net, L)
    assert not [k for k in logs[0] if "overhead" in k or "recorded_steps" in k]
    assert all(d.meter is None for d in mon._probes.drivers)
    mon.close()


# ----------------------------------------------------------------- two ranks
def _slow_on_rank0(module, args, output):
    if torch.distributed.get_rank() == 0:
        time.sleep(0.2)  # rank 0's probe costs far more than its budget; rank 1's does not
    return output


def _ranks(rank, init, out_dir):
    torch.set_num_threads(1)
    with process_group(rank, init):
        torch.manual_seed(0)
        net = nn.Sequential(Slow(), nn.Linear(D, C))
        probe = probes.RepresentationRank("0", name="rank", extract=_slow_on_rank0)
        mon = CollapseMonitor(net, [probe], L, overhead_budget=0.05)
        logs = []
        for s in range(4 * L):
            x, y = batch(2 * s + rank)
            if not (rank == 1 and s == 4):  # rank 1 has no batch at a recorded step
                with mon.observe(targets=y):
                    net(x)
            out = mon.step()
            if out:
                logs.append({k: float(v) for k, v in out.items()})
        torch.save(
            {"logs": logs, "slower": mon.driver("rank").slower}, f"{out_dir}/budget{rank}.pt"
        )
        mon.close()


def test_ranks_agree_on_the_thinned_steps(tmp_path):
    r0, r1 = run_two(_ranks, tmp_path, "budget")
    assert r0["slower"] == r1["slower"] > 1  # rank 1 alone would not thin: it takes rank 0's
    # the steps a window held and the overhead (the costliest rank's) are the same on both
    # ranks, also where rank 1 had no batch (step 4, recorded in the first window)
    assert r0["logs"][0]["collapse/rank/recorded_steps"] == 2
    for a, b in zip(r0["logs"], r1["logs"]):
        assert a["collapse/rank/recorded_steps"] == b["collapse/rank/recorded_steps"]
        assert a.get("collapse/monitor/overhead") == b.get("collapse/monitor/overhead")
    for a, b in zip(r0["logs"][2:], r1["logs"][2:]):
        assert a["collapse/rank/recorded_steps"] == b["collapse/rank/recorded_steps"] == 1
        assert a["collapse/rank/erank"] == b["collapse/rank/erank"]  # the same steps reduced


def test_the_report_shows_the_overhead_the_tensorboard_files_hold(tmp_path, capsys):
    import json

    from collapse_monitor.cli import main
    from collapse_monitor.integrations.tensorboard import TensorBoardSink

    net, ps = heavy()
    mon = CollapseMonitor(
        net, ps, L, overhead_budget=0.01, sinks=[TensorBoardSink(tmp_path / "run")]
    )
    logs = run(mon, net, 3 * L)
    mon.close()
    measured = [m["collapse/monitor/overhead"] for m in logs[1:]]
    main(["report", str(tmp_path / "run")])
    shown = re.search(r"monitor overhead: ([\d.]+)% of the step time", capsys.readouterr().out)
    assert float(shown.group(1)) == pytest.approx(100 * measured[-1], abs=0.006)  # (2 decimals)
    main(["report", str(tmp_path / "run"), "--json"])
    (got,) = json.loads(capsys.readouterr().out)["runs"].values()
    assert got["overhead"]["last"] == pytest.approx(measured[-1], rel=1e-6)  # (float32 files)
    assert got["overhead"]["max"] == pytest.approx(max(measured), rel=1e-6)
