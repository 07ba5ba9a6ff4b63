import contextlib
import json

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from collapse_monitor import CollapseMonitor, Sink, probes
from collapse_monitor.cli import main
from collapse_monitor.integrations.tensorboard import TensorBoardSink
from tests.probes.test_codebook_usage import Quantizer


def write_run(log_dir, collapse: bool, steps: int = 108):
    q = nn.Sequential()
    q.add_module("vq", Quantizer())
    mon = CollapseMonitor(
        q,
        [probes.CodebookUsage("vq", 16, name="vq")],
        2,
        sinks=[TensorBoardSink(log_dir)],
        observe_every_n_steps=1,
    )
    for step in range(steps):
        idx = (
            torch.zeros(64, dtype=torch.long) if collapse and step >= 98 else torch.arange(64) % 16
        )
        with mon.observe():
            q.vq(torch.zeros(64, 1), idx)
        mon.step()
    mon.close()


def test_report_flags_the_collapsed_run_and_exits_1(tmp_path, capsys):
    write_run(tmp_path / "bad", collapse=True)
    write_run(tmp_path / "good", collapse=False)
    assert main(["report", str(tmp_path), "--png", str(tmp_path / "dash.png")]) == 1
    out = capsys.readouterr().out
    bad, good = out.split("== good")
    assert "usage" in bad and "collapsed" in bad and "healthy" in good and "collapsed" not in good
    assert (tmp_path / "dash_bad.png").stat().st_size > 5_000
    assert main(["report", str(tmp_path / "good"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (run,) = data["runs"].values()
    usage = next(r for r in run["rows"] if r["metric"] == "usage")
    assert usage["verdict"] == "healthy" and usage["latest"] == 1.0 and run["errors"] == 0.0


def test_report_first_alert_step_replays_the_training_rule(tmp_path, capsys):
    write_run(tmp_path, collapse=True)
    main(["report", str(tmp_path), "--json"])
    (run,) = json.loads(capsys.readouterr().out)["runs"].values()
    usage = next(r for r in run["rows"] if r["metric"] == "usage")
    # usage 1/16 from step 99: past the severe bound, the first log of a collapsed window fires
    assert usage["first_alert"] == 100


def test_a_run_started_again_in_the_same_folder_replaces_the_old_timeline(tmp_path, capsys):
    """A run resumed from a checkpoint, or started again, into the folder of an earlier one:
    the old run's logs after the new one's first step were read as the latest state (a
    collapse at step 140 held a healthy new run of 108 steps collapsed, exit 1)."""
    write_run(tmp_path, collapse=True, steps=140)
    assert main(["report", str(tmp_path), "--json"]) == 1
    capsys.readouterr()
    write_run(tmp_path, collapse=False)
    assert main(["report", str(tmp_path), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"].values()
    usage = next(r for r in run["rows"] if r["metric"] == "usage")
    assert usage["verdict"] == "healthy" and usage["latest"] == 1.0


def test_report_errors_are_clear(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no TensorBoard event files" in capsys.readouterr().err
    with SummaryWriter(tmp_path / "other") as w:
        w.add_scalar("loss", 1.0, 0)
    assert main(["report", str(tmp_path)]) == 2  # an input problem, not an unmeasured run
    assert "no collapse/... scalars" in capsys.readouterr().err


def test_a_run_that_measured_nothing_or_lost_a_probe_is_never_healthy(tmp_path, capsys):
    """A user's check: a loop that never entered observe(), and a run whose only probe failed
    at its first call, were both reported healthy (exit 0) with an empty table."""
    q = nn.Sequential()
    q.add_module("vq", Quantizer())

    def train_q(watched, sinks, steps, observe=True):
        mon = CollapseMonitor(q, watched, 2, sinks=sinks, observe_every_n_steps=1)
        for _ in range(steps):
            with mon.observe() if observe else contextlib.nullcontext():
                q.vq(torch.zeros(64, 1), torch.arange(64) % 16)
            mon.step()
        mon.close()

    usage = probes.CodebookUsage("vq", 16, name="vq")
    train_q([usage], [TensorBoardSink(tmp_path / "a")], 6, observe=False)  # nothing recorded
    assert main(["report", str(tmp_path / "a")]) == 3
    out = capsys.readouterr().out
    assert "(unmeasured)" in out and "observe()" in out

    def fails_later(module, args, output):  # a probe's reading breaks mid-run
        if fails_later.calls >= 4:
            raise RuntimeError("reader broke")
        fails_later.calls += 1
        return output[1]

    fails_later.calls = 0
    watched = [
        probes.CodebookUsage("vq", 16, name="vq"),
        probes.CodebookUsage("vq", 16, name="broken", extract=fails_later),
    ]
    train_q(watched, [TensorBoardSink(tmp_path / "b")], 8)
    assert main(["report", str(tmp_path / "b"), "--json"]) == 3
    (run,) = json.loads(capsys.readouterr().out)["runs"].values()
    assert run["status"] == "incomplete" and run["errors"] == 1.0
    assert {r["verdict"] for r in run["rows"]} == {"healthy", "stale"}  # the broken probe's stop
    # both runs side by side: the worst is what the exit code says
    assert main(["report", str(tmp_path)]) == 3
    capsys.readouterr()

    class Fails(Sink):  # a sink's failure loses no metric: the run stays healthy
        def log_metrics(self, metrics, step):
            raise OSError("network down")

    train_q(
        [probes.CodebookUsage("vq", 16, name="vq")], [Fails(), TensorBoardSink(tmp_path / "c")], 6
    )
    assert main(["report", str(tmp_path / "c"), "--json"]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"].values()
    assert run["status"] == "healthy" and run["errors"] == 1.0


def test_report_replays_a_rule_with_its_last_step_sibling():
    from collapse_monitor.report import health

    window = [(10, 0.2), (20, 0.1), (30, 0.6)]  # the window averages the healthy steps first
    last = [(10, 0.2), (20, 0.6), (30, 0.6)]  # units died within the second window
    series = {"collapse/d/3/dormant_fraction": window}
    (row,) = health(series)
    assert row["first_alert"] == 30  # without the last step: one log late
    (row,) = health({**series, "collapse/d/3/dormant_fraction_last_step": last})
    assert row["first_alert"] == 20 and row["verdict"] == "collapsed"
    # a collapse inside the run's last window: only the last step holds there, still collapsed
    window, last = [(100, 0.1), (200, 0.2)], [(100, 0.1), (200, 0.57)]
    series = {"collapse/d/3/dormant_fraction": window}
    (row,) = health({**series, "collapse/d/3/dormant_fraction_last_step": last})
    assert row["first_alert"] == 200 and row["verdict"] == "collapsed"


def test_a_collapsed_ssl_run_is_collapsed_by_both_of_its_rules(tmp_path, capsys):
    """norm_std_below and the drop rule both fire on one metric: the report keeps the earliest
    alert and the gravest verdict (a drop that still holds is a collapse, not a warning)."""
    model = nn.Sequential(nn.Identity())
    mon = CollapseMonitor(
        model,
        [probes.RepresentationRank("0", ssl=True, name="proj")],
        2,
        sinks=[TensorBoardSink(tmp_path)],
    )
    g = torch.Generator().manual_seed(0)
    point = torch.randn(1, 16, generator=g)
    for step in range(20):
        z = torch.randn(64, 16, generator=g)
        if step >= 10:  # collapsed to a signed point
            z = point + 1e-3 * z
        with mon.observe():
            model(z)
        mon.step()
    mon.close()
    assert main(["report", str(tmp_path), "--json"]) == 1
    (run,) = json.loads(capsys.readouterr().out)["runs"].values()
    row = next(r for r in run["rows"] if r["metric"] == "norm_std")
    assert row["verdict"] == "collapsed" and row["first_alert"] == 12


def test_a_rule_is_replayed_only_on_its_own_probes_metrics():
    """CodebookUsage and LatentUsage both log usage, dead_fraction and perplexity_ratio; the
    report replays each class's rules only where that class's own metric is logged beside."""
    from collapse_monitor.report import health

    def verdicts(series):
        return {r["metric"]: r["verdict"] for r in health(series)}

    common = {"usage": 0.6, "dead_fraction": 0.57, "perplexity_ratio": 0.05, "usage_uniform": 1.0}
    codes = {f"collapse/vq/{k}": [(10, v), (20, v)] for k, v in {**common, "dead_codes": 9}.items()}
    latents = {
        f"collapse/sae/{k}": [(10, v), (20, v)] for k, v in {**common, "dead_latents": 9}.items()
    }
    got = verdicts(codes)
    assert got["perplexity_ratio"] == "collapsed" and got.get("dead_fraction") != "collapsed"
    got = verdicts(latents)
    assert got["dead_fraction"] == "collapsed" and got.get("perplexity_ratio") != "collapsed"
