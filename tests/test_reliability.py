"""Reliability: torch.compile, activation checkpointing, mixed precision, module reuse, leaks."""

import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from collapse_monitor import CollapseMonitor, probes
from tests.checkpoints import saved_and_loaded
from tests.zoo import Zoo, batch, every_probe, loss_of, zoo_steps


def run(model, forward=None, steps=3, log_every=3, **kw):
    forward = model if forward is None else forward
    mon = CollapseMonitor(
        model, every_probe(), log_every, strict=True, **kw, observe_every_n_steps=1
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    out = None
    for step in range(steps):
        x, y, groups = batch(step)
        with mon.observe(targets=y, groups=groups):
            loss = loss_of(forward(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        out = mon.step(optimizer=opt) or out
    mon.close()
    return out


def close(a, b, rel):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-9), k


def test_every_probe_gives_the_same_metrics_under_torch_compile():
    eager = run(Zoo())
    model = Zoo()
    compiled = run(model, torch.compile(model))
    assert len(eager) > 60
    close(eager, compiled, rel=1e-4)


def test_activation_checkpointing_recompute_is_not_counted_twice():
    class Checkpointed(Zoo):
        def forward(self, x):
            return checkpoint(super().forward, x, use_reentrant=False)

    plain, ckpt = run(Zoo()), run(Checkpointed())
    close(plain, ckpt, rel=1e-6)


def test_a_module_called_twice_per_step_counts_both_calls():
    model = nn.Sequential()
    model.add_module("head", nn.Linear(5, 3))
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("head", 3)], 1, strict=True, observe_every_n_steps=1
    )
    x, y = torch.randn(10, 5), torch.randint(0, 3, (10,))
    with mon.observe(targets=y):
        model(x)
        model(x + 1)  # e.g. two views in one step: both are counted (documented)
    assert mon.step()["collapse/head/samples"] == 20


def test_empty_batches_are_harmless():
    model = Zoo()
    mon = CollapseMonitor(model, every_probe(), 2, strict=True, observe_every_n_steps=1)
    x, y, groups = batch(0)
    with mon.observe(targets=y[:0], groups=groups[:0]):
        model(x[:0])
    with mon.observe(targets=y, groups=groups):
        model(x)
    metrics = mon.step() or mon.step()
    assert metrics["collapse/nc/samples"] == len(y) and metrics["collapse/errors"] == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_statistics_match_float32_within_input_precision(dtype):
    full = run(Zoo())
    with torch.autocast("cpu", dtype=dtype):
        low = run(Zoo())
    for key in (
        "collapse/nc/nc1",
        "collapse/rank/erank",
        "collapse/vae/kl_total",
        "collapse/attn/attn/entropy_norm",
    ):
        assert low[key] == pytest.approx(full[key], rel=0.05), key
    model = Zoo()
    mon = CollapseMonitor(model, every_probe(), 10, strict=True, observe_every_n_steps=1)
    x, y, groups = batch(0)
    with torch.autocast("cpu", dtype=dtype), mon.observe(targets=y, groups=groups):
        model(x)
    stats = mon.driver(mon.probes[0]).window["moments"]
    assert stats.second_moment.dtype == torch.float64 and stats.sum.dtype == torch.float64


def test_close_leaves_no_hooks_and_no_reference_to_the_model():
    model = Zoo()
    before = {
        n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    run(model)
    after = {
        n: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for n, m in model.named_modules()
    }
    assert after == before
    assert not torch.overrides._get_current_function_mode_stack()
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None, "a closed monitor (or its probes) still references the model"


def test_a_module_path_that_no_longer_exists_is_reported():
    model = Zoo()
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("head", 4)], 1, strict=True, observe_every_n_steps=1
    )
    model.head = nn.Linear(16, 4)  # the user swapped the head: the probed module is gone
    x, y, _ = batch(0)
    with mon.observe(targets=y):
        model(x)
    with pytest.raises(ValueError, match="'head' is no longer part of the model"):
        mon.step()


def test_two_monitors_on_one_model_are_refused():
    model = Zoo()
    first = CollapseMonitor(model, [probes.NeuralCollapse("head", 4)], observe_every_n_steps=1)
    with pytest.raises(RuntimeError, match="already has a CollapseMonitor"):
        CollapseMonitor(
            model, [probes.NeuralCollapse("head", 4, name="other")], observe_every_n_steps=1
        )
    first.close()
    CollapseMonitor(
        model, [probes.NeuralCollapse("head", 4)], observe_every_n_steps=1
    ).close()  # fine after close()


def test_memory_stays_flat_over_5000_observed_steps():
    import resource

    from tests.mitigations.test_reset_dead_codes import VQ

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("head", nn.Linear(6, 3))
    model.add_module("vq", VQ(8, 3))
    mon = CollapseMonitor(
        model,
        [
            probes.NeuralCollapse("head", 3),
            probes.CodebookUsage("vq", 8),
            probes.LogitHealth("head", name="z"),
        ],
        log_every_n_steps=100,
        strict=True,
        observe_every_n_steps=1,
    )
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def steps(n):
        for _ in range(n):
            with torch.no_grad(), mon.observe(targets=y):
                model(x)
            mon.step()

    steps(500)  # (a tensor kept per step, or per log, shows as 4,500 or 45 more below)
    gc.collect()
    tensors = sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    steps(4_500)
    gc.collect()
    assert sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()) <= tensors + 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 50_000  # KiB, generous


def test_resume_with_every_probe_and_mitigation_logs_what_an_uninterrupted_run_logs():

    from collapse_monitor import Rule
    from tests.zoo import every_mitigation

    rules = [Rule("collapse/nc/nc1", 0.0, "above", name="always", repeat=True)]

    def build():
        model = Zoo()
        mon = CollapseMonitor(
            model,
            every_probe(),
            3,
            strict=True,
            rules=rules,
            mitigations=every_mitigation(),
            observe_every_n_steps=1,
        )
        return model, mon, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, mon, opt = build()
    whole = zoo_steps(model, mon, opt, 0, 9)
    model, mon, opt = build()
    first = zoo_steps(model, mon, opt, 0, 5)  # stops inside the window of steps 4-6
    state = saved_and_loaded(
        model=model.state_dict(), opt=opt.state_dict(), monitor=mon.state_dict()
    )
    mon.close()
    model, mon, opt = build()
    mon.load_state_dict(state["monitor"], optimizer=opt)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    rest = zoo_steps(model, mon, opt, 5, 9)
    assert sorted({**first, **rest}) == sorted(whole) == [3, 6, 9]
    assert (
        whole[9]["collapse/mitigations/reset_dead_codes"] > 0
        and whole[9]["collapse/alerts/always"] == 3
    )
    for step, metrics in {**first, **rest}.items():
        close(metrics, whole[step], rel=1e-6)


def test_probes_and_mitigations_hold_no_tensors_before_attach():
    # Lightning's ddp_spawn sends callbacks to the workers through torch.multiprocessing, which
    # moves their tensors to memory shared by every rank: state made before attach would be shared
    from tests.zoo import every_mitigation

    def tensors(obj, depth=0):
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor):
                yield value
            elif (
                depth < 2
                and hasattr(value, "__dict__")
                and not isinstance(value, (type, nn.Module))
            ):
                yield from tensors(value, depth + 1)

    for obj in every_probe() + every_mitigation():
        assert not list(tensors(obj)), type(obj).__name__
