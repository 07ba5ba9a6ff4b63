import gc
import weakref

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, Event, Rule, Sink, mitigations, probes
from collapse_monitor import functional as F
from collapse_monitor.cadence import sampled_steps_per_window
from tests.functional.test_neural_collapse import clustered
from tests.reference import assert_metrics_close


class Recorder(Sink):
    """A real sink that keeps what it receives."""

    def __init__(self):
        self.metrics, self.alerts, self.events, self.closed = [], [], [], False

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_alert(self, alert):
        self.alerts.append(alert)

    def log_event(self, name, info, step):
        self.events.append((step, name, info))

    def close(self):
        self.closed = True


def mlp(D=8, C=4):
    return nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C))


def train(model, mon, steps, D=8, C=4, lr=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    out = []
    for _ in range(steps):
        x = torch.randn(32, D, generator=g)
        y = torch.randint(0, C, (32,), generator=g)
        with mon.observe(targets=y):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        m = mon.step(optimizer=opt)
        if m is not None:
            out.append((mon.global_step, m))
    return out


def test_cadence_windows_and_sinks():
    model, sink = mlp(), Recorder()
    mon = CollapseMonitor(
        model,
        [probes.NeuralCollapse("2", 4, name="head")],
        5,
        sinks=[sink],
        observe_every_n_steps=1,
    )
    logged = train(model, mon, 12)
    assert [s for s, _ in logged] == [5, 10] == [s for s, _ in sink.metrics]
    assert all(m["collapse/head/samples"] == 5 * 32 for _, m in logged)  # window reset
    mon.close()
    assert sink.closed


def test_hooks_do_nothing_outside_observe():
    model = mlp()
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 4, name="head")], 5, observe_every_n_steps=1
    )
    model(torch.randn(16, 8))  # no targets needed: the hook returns at once
    assert mon.compute()["collapse/head/samples"] == 0


def test_observe_every_n_steps_records_only_those_steps():
    model = mlp()
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 4, name="head")], 6, observe_every_n_steps=3
    )
    ((_, m),) = train(model, mon, 6)
    assert m["collapse/head/samples"] == 2 * 32


@pytest.mark.parametrize("L, recorded", [(50, [24, 49]), (10, [4, 9]), (7, [2, 6]), (1, [0])])
def test_default_cadence_samples_gemm_probes_and_records_cheap_ones_every_step(L, recorded):
    model = mlp()
    nc = probes.NeuralCollapse("2", 4, name="head")
    dormant = probes.DormantUnits("1")
    mon = CollapseMonitor(model, [nc, dormant], L)
    assert sampled_steps_per_window(L) == len(recorded)
    seen = []
    model[2].register_forward_hook(
        lambda *a: seen.append((mon.global_step, mon.records(nc), mon.records(dormant)))
    )
    logged = train(model, mon, 2 * L)
    # the class-conditional probe also records the run's first step: it learns the batch size
    first = [0] if 0 not in recorded else []
    assert [s for s, r, _ in seen if r] == first + recorded + [L + s for s in recorded]
    assert all(r for _, _, r in seen) and len(seen) == 2 * L  # the cheap probe: every step
    samples = [m["collapse/head/samples"] for _, m in logged]
    assert samples == [(len(first) + len(recorded)) * 32, len(recorded) * 32]
    with mon.snapshot("val") as val:  # validation records every batch for every probe
        for _ in range(3):
            y = torch.randint(0, 4, (32,))
            with mon.observe(targets=y):
                model(torch.randn(32, 8))
    assert val["val/collapse/head/samples"] == 3 * 32
    mon.close()
    assert sampled_steps_per_window(500) == 20


def test_forwards_outside_observe_are_said_once_and_not_called_thin(caplog):
    """A user's check: a loop that never entered observe() got only the advice for a thin
    window ("pass observe_every_n_steps=1"), and a snapshot without observe() nothing."""
    model = mlp()
    mon = CollapseMonitor(model, [probes.NeuralCollapse("2", 4, name="head")], 5)
    with caplog.at_level("WARNING", logger="collapse_monitor"):
        for _ in range(10):
            model(torch.randn(32, 8)).sum().backward()
            mon.step()
        with mon.snapshot("val") as val:
            model(torch.randn(32, 8))
        with mon.snapshot("val"):
            model(torch.randn(32, 8))
    said = [r.message for r in caplog.records]
    assert sum("no training step ran inside monitor.observe()" in m for m in said) == 1
    assert sum("snapshot 'val' held no monitor.observe()" in m for m in said) == 1
    assert not any("statistics are thin" in m for m in said)
    assert "val/collapse/head/samples" not in val or val["val/collapse/head/samples"] == 0
    mon.close()


@pytest.mark.parametrize("steps, every, said", [(5, 100, "this run logged nothing"), (7, 3, "")])
def test_steps_never_logged_are_said_at_close(caplog, steps, every, said):
    """A run shorter than log_every_n_steps (HF's logging_steps=500 on a short run) logged
    nothing and said nothing; nor did the last partial window of a longer one."""
    model = mlp()
    mon = CollapseMonitor(model, [probes.NeuralCollapse("2", 4, name="head")], every)
    with caplog.at_level("WARNING", logger="collapse_monitor"):
        train(model, mon, steps)
        mon.close()
        mon.close()
    warned = [r.message for r in caplog.records if "never logged" in r.message]
    assert (
        len(warned) == 1 and f"last {steps % every} training step(s) (to step {steps})" in warned[0]
    )
    assert said in warned[0]


def test_a_run_ending_on_a_log_says_nothing_at_close(caplog):
    model = mlp()
    mon = CollapseMonitor(model, [probes.NeuralCollapse("2", 4, name="head")], 5)
    with caplog.at_level("WARNING", logger="collapse_monitor"):
        train(model, mon, 10)
        mon.close()
    assert not any("never logged" in r.message for r in caplog.records)


def test_a_state_saved_before_step_says_it_is_unfinished(caplog):
    """Saved after the optimizer step but before monitor.step(), the step's samples are in the
    window while the step count is one behind: a run resumed from it logs one step late, and
    nothing said so."""
    model = mlp()
    nc = probes.NeuralCollapse("2", 4, name="head")
    mon = CollapseMonitor(model, [nc], 10, observe_every_n_steps=1)
    with caplog.at_level("WARNING", logger="collapse_monitor"):
        train(model, mon, 3)
        mon.state_dict()
        with mon.observe(targets=torch.arange(32) % 4):
            model(torch.randn(32, 8))
        mon.state_dict()
    mon.close()
    (said,) = [r.message for r in caplog.records if "unfinished" in r.message]
    assert "save after monitor.step()" in said


def test_a_glob_keeps_the_outermost_modules_it_matches():
    """A user's check: TokenUniformity("transformer.h.*") read 144 modules of a 12-layer GPT-2
    (every submodule of every block); "*.x" still finds x at any depth."""
    blocks = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(12)))
    model = nn.Sequential()
    model.add_module("h", blocks)
    mon = CollapseMonitor(model, [probes.TokenUniformity("h.*", name="t")], 10)
    assert mon.probes[0].paths == [f"h.{i}" for i in range(12)]
    mon.close()
    mon = CollapseMonitor(model, [probes.TokenUniformity("*.1", name="t")], 10)
    assert set(mon.probes[0].paths) == {"h.1"} | {f"h.{i}.1" for i in range(12) if i != 1}
    mon.close()


@pytest.mark.parametrize("every", [None, 1])
def test_a_thin_sampled_class_window_is_said_once(every, caplog):
    # 400 classes at 32 rows a step: the default cadence records its budget, 5 of 10 steps
    # (160 samples, plus the first step in the first window); every step: 320, still thin
    model = mlp(C=400)
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 400, name="head")], 10, observe_every_n_steps=every
    )
    with caplog.at_level("WARNING", logger="collapse_monitor"):
        logged = train(model, mon, 20, C=400)
    thin = [r.message for r in caplog.records if "class statistics are thin" in r.message]
    if every is None:
        assert [m["collapse/head/samples"] for _, m in logged] == [192, 160]
        assert len(thin) == 1 and "192 samples for 400 classes" in thin[0]
        assert "recorded 6 of its 10 steps" in thin[0]
    else:
        assert thin == []  # the user chose the cadence
    mon.close()


def test_default_cadence_gives_a_thousand_class_head_usable_windows():
    # balanced data, batch 256, log every 50 steps: most classes get the 2 samples NC needs
    C, D = 1000, 8
    head = nn.Linear(D, C)
    mon = CollapseMonitor(nn.Sequential(head), [probes.NeuralCollapse("0", C, name="h")], 50)
    g = torch.Generator().manual_seed(0)
    used = []
    for _ in range(100):
        y = torch.randint(0, C, (256,), generator=g)
        with mon.observe(targets=y):
            head(torch.randn(256, D, generator=g) + y[:, None] % 7)
        m = mon.step()
        if m is not None:
            used.append(m["collapse/h/classes_used"])
    mon.close()
    assert min(used) >= 900, used


def test_close_removes_every_hook_and_observe_refuses():
    model = mlp()
    before = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 4, name="head")], 5, observe_every_n_steps=1
    )
    assert model[2]._forward_hooks
    mon.close()
    after = [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]
    assert after == before
    with pytest.raises(RuntimeError, match="closed"):
        with mon.observe(targets=torch.zeros(1)):
            pass


def test_monitor_keeps_no_autograd_graph():
    model = mlp()
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 4, name="head")], 2, observe_every_n_steps=1
    )
    train(model, mon, 2)  # one window ends: lagged centres exist
    x = torch.randn(16, 8, requires_grad=True)
    ref = weakref.ref(x)
    with mon.observe(targets=torch.randint(0, 4, (16,))):
        out = model(x)
    out.sum().backward()
    del x, out
    gc.collect()
    assert ref() is None, "the monitor kept the input (or its graph) alive"
    p = mon.probes[0]
    held = [getattr(s, n) for _, s in mon.driver(p).window.items() for n in s.state_names]
    held += [t for t in p.extra_state().values() if isinstance(t, torch.Tensor)]
    assert len(held) > 8
    assert all(t.grad_fn is None and not t.requires_grad for t in held)


def test_memory_does_not_grow_over_2000_steps():
    import resource

    model = mlp()
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 4, name="head")], 50, observe_every_n_steps=1
    )
    train(model, mon, 200)
    gc.collect()
    tensors = sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())
    state = mon.driver(mon.probes[0]).window.nbytes()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train(model, mon, 1800)
    gc.collect()
    assert sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()) == tensors
    assert mon.driver(mon.probes[0]).window.nbytes() == state
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 20_000  # KiB


def test_rules_alerts_on_alert_and_stop():
    model, sink = mlp(), Recorder()
    seen = []
    mon = CollapseMonitor(
        model,
        [probes.NeuralCollapse("2", 4, name="head")],
        5,
        sinks=[sink],
        rules=[
            Rule("collapse/head/samples", 100, "above", action="stop", name="many", repeat=True)
        ],
        on_alert=seen.append,
        observe_every_n_steps=1,
    )
    logged = train(model, mon, 10)
    assert [a.step for a in seen] == [5, 10] and sink.alerts == seen
    assert mon.should_stop
    assert [m["collapse/alerts/many"] for _, m in logged] == [1.0, 2.0]


def test_mitigations_see_the_same_metrics_and_alerts():
    class Count(mitigations.Mitigation):
        kind = "noted"

        def __init__(self):
            super().__init__()
            self.calls = []

        def after_log(self, view):
            self.calls.append(
                (
                    view.metrics["collapse/head/samples"],
                    [a.rule for a in view.alerts],
                    view.optimizer,
                )
            )
            return [Event(self.name, {"n": len(self.calls)})]

    model, sink, mit = mlp(), Recorder(), Count()
    mon = CollapseMonitor(
        model,
        [probes.NeuralCollapse("2", 4, name="head")],
        5,
        sinks=[sink],
        mitigations=[mit],
        rules=[Rule("collapse/head/samples", 0, "above", name="any")],
        observe_every_n_steps=1,
    )
    train(model, mon, 5)
    ((n, rules, opt),) = mit.calls
    assert n == 160 and rules == ["any"] and isinstance(opt, torch.optim.SGD)
    assert sink.events == [(5, "noted", {"n": 1, "count": 1})]


def test_snapshot_uses_fresh_windows_and_restores_training_window():
    C, D = 4, 8
    model = nn.Sequential(nn.Linear(D, C))
    sink = Recorder()
    mon = CollapseMonitor(
        model,
        [probes.NeuralCollapse("0", C, name="head")],
        100,
        sinks=[sink],
        observe_every_n_steps=1,
    )
    x, y = clustered(C, D, 200)
    x = x.float()
    with mon.observe(targets=y[:100]):
        model(x[:100])
    with mon.snapshot("val") as val:
        with mon.observe(targets=y[100:]):
            model(x[100:])
    ref = F.neural_collapse(x[100:], y[100:], C, model[0].weight)
    got = {k.split("/")[-1]: v for k, v in val.items()}
    assert_metrics_close(got, ref, keys=["nc1", "cdnv", "self_duality"])
    assert all(k.startswith("val/collapse/head/") for k in val)
    assert sink.metrics[-1][1] == val
    assert mon.compute()["collapse/head/samples"] == 100  # training window untouched


def test_state_dict_resume_continues_exactly():
    torch.manual_seed(1)
    model_a, model_b = mlp(), mlp()
    model_b.load_state_dict(model_a.state_dict())
    rules = [Rule("collapse/head/nc1", 0.05, "drop", patience=2)]

    def monitor(model):
        return CollapseMonitor(
            model,
            [probes.NeuralCollapse("2", 4, name="head")],
            7,
            rules=rules,
            observe_every_n_steps=1,
        )

    def steps(model, mon, opt, g, n):
        logged = []
        for _ in range(n):
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
            with mon.observe(targets=y):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            m = mon.step()
            if m is not None:
                logged.append((mon.global_step, m))
        return logged

    full = train(model_a, monitor(model_a), 30, seed=3)
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model_b.parameters(), lr=0.05)
    mon_b = monitor(model_b)
    first = steps(model_b, mon_b, opt, g, 17)  # stop mid-window (window = 7 steps)
    state = mon_b.state_dict()
    mon_b.close()
    mon_c = monitor(model_b)
    mon_c.load_state_dict(state)
    rest = steps(model_b, mon_c, opt, g, 13)
    assert [s for s, _ in first + rest] == [s for s, _ in full]
    for (_, a), (_, b) in zip(first + rest, full):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-15), k


def test_nested_observe_is_an_error():
    model = mlp()
    mon = CollapseMonitor(model, [probes.NeuralCollapse("2", 4)], 5, observe_every_n_steps=1)
    with pytest.raises(RuntimeError, match="nested"):
        with mon.observe(targets=None):
            with mon.observe(targets=None):
                pass


class Explodes(Sink):
    def log_metrics(self, metrics, step):
        raise OSError("No space left on device")


def test_a_failing_sink_is_disabled_and_training_goes_on(caplog):
    model, good = mlp(), Recorder()
    mon = CollapseMonitor(
        model,
        [probes.NeuralCollapse("2", 4, name="head")],
        2,
        sinks=[Explodes(), good],
        observe_every_n_steps=1,
    )
    with caplog.at_level("ERROR", logger="collapse_monitor"):
        logged = train(model, mon, 6)
    assert [s for s, _ in logged] == [2, 4, 6]
    assert len(good.metrics) == 3  # the other sink keeps logging
    assert logged[-1][1]["collapse/errors"] == 1.0
    assert sum("No space left on device" in r.message for r in caplog.records) == 1


def test_a_probe_that_raises_is_logged_once_counted_and_disabled(caplog):
    model = mlp()
    # an extract that returns integers: every call fails (labels out of range are bad rows,
    # skipped and counted: tests/test_faults.py)
    bad = probes.NeuralCollapse("1", 3, read="output", name="bad", extract=lambda m, a, o: o.long())
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 4, name="head"), bad], 2, observe_every_n_steps=1
    )
    with caplog.at_level("ERROR", logger="collapse_monitor"):
        logged = train(model, mon, 4)
    messages = [r.message for r in caplog.records if "failed" in r.message]
    assert (
        len(messages) == 1
        and "NeuralCollapse 'bad'" in messages[0]
        and "expected floating-point features" in messages[0]
    )
    assert bad.disabled and not mon.probes[0].disabled
    assert logged[-1][1]["collapse/errors"] == 1.0
    assert "collapse/bad/nc1" not in logged[-1][1] and logged[-1][1]["collapse/head/samples"] == 64
    strict = CollapseMonitor(
        mlp(),
        [probes.NeuralCollapse("1", 3, read="output", name="bad")],
        2,
        strict=True,
        observe_every_n_steps=1,
    )
    with pytest.raises(ValueError, match="out of range"):
        train(strict.model, strict, 1)


@pytest.mark.parametrize("strict", [False, True])
def test_a_probe_hook_leaves_grad_mode_as_it_found_it_and_labels_only_under_a_profiler(strict):
    """The hooks set grad mode by hand (cheaper than no_grad() on a cold cache): it comes
    back after a probe that raises, inside inference_mode too; the profiler label that
    benchmarks read a probe's time by is there under a profiler."""
    model = mlp()
    bad = probes.NeuralCollapse("1", 3, read="output", name="bad", extract=lambda m, a, o: o.long())
    mon = CollapseMonitor(model, [bad], 2, strict=strict, observe_every_n_steps=1)
    for mode in (torch.enable_grad, torch.inference_mode):
        with mode():
            try:
                with mon.observe(targets=torch.zeros(4, dtype=torch.long)):
                    out = model(torch.randn(4, 8))
                assert not strict and out.requires_grad is (mode is torch.enable_grad)
            except ValueError:
                assert strict
            assert torch.is_grad_enabled() is (mode is torch.enable_grad)
    mon.close()
    mon = CollapseMonitor(model, [probes.NeuralCollapse("2", 4, name="head")], 2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with mon.observe(targets=torch.zeros(4, dtype=torch.long)):
            model(torch.randn(4, 8))
    assert "collapse_monitor.head" in {e.key for e in prof.key_averages()}
    mon.close()


def test_mitigations_are_saved_by_name_and_names_are_unique():
    def monitor(mits):
        return CollapseMonitor(
            mlp(), [probes.DormantUnits("1", name="dormant")], 5, mitigations=mits
        )

    with pytest.raises(ValueError, match=r"mitigation names must be unique, repeated: \['redo'\]"):
        monitor([mitigations.ReDo(), mitigations.ReDo()])
    a, b = mitigations.ReDo(name="early", every_n_steps=5), mitigations.ReDo(name="late")
    state = monitor([a, b]).state_dict()
    assert list(state["mitigations"]) == ["early", "late"]
    resumed = monitor([mitigations.ReDo(name="late"), mitigations.ReDo(name="early")])
    resumed.load_state_dict(state)  # another order: matched by name, not position
    with pytest.raises(KeyError, match=r"no state for mitigations \['other'\]"):
        monitor([mitigations.ReDo(name="other")]).load_state_dict(state)


def test_a_resumed_class_cadence_records_the_same_steps():
    def run(mon, head, steps, g):
        recorded = []
        for _ in range(steps):
            recorded.append(mon.records(mon.probes[0]))
            y = torch.randint(0, 100, (32,), generator=g)
            with mon.observe(targets=y):
                head(torch.randn(32, 8, generator=g))
            mon.step()
        return recorded

    head = nn.Linear(8, 100)
    make = lambda: CollapseMonitor(  # noqa: E731
        nn.Sequential(head), [probes.NeuralCollapse("0", 100, name="h")], 20
    )
    g = torch.Generator().manual_seed(0)
    whole = make()
    expected = run(whole, head, 30, g)
    whole.close()
    first = make()
    g = torch.Generator().manual_seed(0)
    before = run(first, head, 10, g)
    state = first.state_dict()
    first.close()
    resumed = make()
    resumed.load_state_dict(state)
    assert before + run(resumed, head, 20, g) == expected
    assert sum(expected) < 30  # the learned stride skips steps (100 classes, 32 rows: 1 in 2)
    resumed.close()
