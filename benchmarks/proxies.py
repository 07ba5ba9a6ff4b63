"""What the monitor costs on a step, measured the same way on any machine (issue 30, point 4):
its host time and the ATen ops it dispatches, on a step it does not record and on a step each
probe records, for the four workloads of section 1.

- ATen ops: ``torch.profiler`` counts the ``aten::`` calls of one whole training step, monitored
  minus unmonitored (the same model, batch and optimizer): deterministic on a given PyTorch.
- Host time: every hook the monitor registers is a :class:`collapse_monitor.hooks.Hook`; its
  calls are timed (``perf_counter`` around each, the timer's own cost measured on an empty hook
  and subtracted), plus ``observe()`` entered and left and ``step()``. Median over steps.

An unrecorded step is one of ``observe_every_n_steps=1000`` (steps 1..999 record nothing); a
recorded step is one of ``observe_every_n_steps=1`` that does not log (``log_every_n_steps``
10^6), after a first recorded step (allocations).

    python benchmarks/run.py --only proxies [--write]
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch
from models import WORKLOADS  # benchmarks/models.py, beside run.py

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor.hooks import Hook

_CLOCK = {"s": 0.0}
_call = Hook.__call__


def _timed_call(self, *args):
    t = time.perf_counter()
    try:
        return _call(self, *args)
    finally:
        _CLOCK["s"] += time.perf_counter() - t


def _timer_cost(reps: int = 20000) -> float:
    """Seconds the timing wrapper adds to one hook call (an empty hook, timed vs not)."""
    hook = Hook(lambda *a: None)
    t = time.perf_counter()
    for _ in range(reps):
        hook(0)
    plain = time.perf_counter() - t
    Hook.__call__ = _timed_call
    try:
        t = time.perf_counter()
        for _ in range(reps):
            hook(0)
        timed = time.perf_counter() - t
    finally:
        Hook.__call__ = _call
    return max(timed - plain, 0.0) / reps


class _Counted:
    """Hook calls counted (to subtract the timer's cost per call)."""

    calls = 0


def _counting_call(self, *args):
    _Counted.calls += 1
    return _timed_call(self, *args)


def _step_fn(w, mon):
    opt = torch.optim.Adam(w.model.parameters(), lr=w.lr)
    x, y = w.batch

    def step() -> float:
        """One training step; returns the monitor's host seconds in it."""
        own = 0.0
        if mon is None:
            loss = w.loss(w.model, x, y)
        else:
            t = time.perf_counter()
            with mon.observe(targets=y) as _:
                own += time.perf_counter() - t
                loss = w.loss(w.model, x, y)
                t = time.perf_counter()
            own += time.perf_counter() - t
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if mon is not None:
            t = time.perf_counter()
            mon.step(opt)
            own += time.perf_counter() - t
        return own

    return step


class _Null:
    """A monitor that does nothing, timed the same way: the floor of the measurement (the
    timer and a context manager and a call, run cold after the model's kernels)."""

    def observe(self, **_):
        return contextlib.nullcontext()

    def step(self, _optimizer=None) -> None:
        return None


def floor(name: str, steps: int) -> float:
    """Median host microseconds of :class:`_Null` in ``name``'s training step."""
    torch.manual_seed(0)
    w = WORKLOADS[name]()
    step = _step_fn(w, _Null())
    step()
    return statistics.median(step() for _ in range(steps)) * 1e6


def _aten_ops(step) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def measure(name: str, probe: str | None, every: int, steps: int) -> dict:
    """ATen ops and host microseconds per step of ``name``'s workload with its probes (only
    ``probe`` when given), observing every ``every``-th step."""
    torch.manual_seed(0)
    w = WORKLOADS[name]()
    chosen = [p for p in w.make_probes() if probe is None or p.name == probe]
    mitigations = w.make_mitigations() if probe is None else []
    plain = _step_fn(w, None)
    mon = CollapseMonitor(
        w.model, chosen, 10**6, mitigations=mitigations, observe_every_n_steps=every
    )
    watched = _step_fn(w, mon)
    watched(), plain()  # step 0 (recorded in both modes) and allocations
    ops = _aten_ops(watched) - _aten_ops(plain)
    cost = _timer_cost()
    host = []
    Hook.__call__ = _counting_call
    try:
        for _ in range(steps):
            _CLOCK["s"], _Counted.calls = 0.0, 0
            own = watched()
            host.append(own + _CLOCK["s"] - cost * _Counted.calls)
    finally:
        Hook.__call__ = _call
    hooks = sum(len(d.hooks) + len(d._model_hooks) for d in mon._probes.drivers) + sum(
        len(m._hooks) for m in mon.mitigations
    )
    # hooks still on their modules after an unrecorded step (the others are out until needed)
    on = sum(len(mod._forward_hooks) + len(mod._forward_pre_hooks) for mod in w.model.modules())
    mon.close()
    return {"ops": ops, "us": statistics.median(host) * 1e6, "hooks": hooks, "on": on}


def tight_loop(reps: int = 5000) -> tuple[float, float]:
    """Microseconds per forward of a tiny model (8-16-4, batch 4) alone, and inside an
    ``observe()`` that records nothing followed by ``step()``: the monitor's fixed cost with
    warm caches (one NeuralCollapse probe, one hook)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x, y = torch.randn(4, 8), torch.randint(0, 4, (4,))
    mon = CollapseMonitor(
        model, [probes.NeuralCollapse("2", 4, name="head")], 10**6, observe_every_n_steps=10**6
    )

    def idle() -> None:
        with mon.observe(targets=y):
            model(x)
        mon.step()

    idle()  # (step 0 records)
    best = [float("inf"), float("inf")]
    for _ in range(5):  # alternating rounds, the fastest of each: the machine's drift cancels
        for i, fn in enumerate((lambda: model(x), idle)):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t) / reps * 1e6)
    mon.close()
    return best[0], best[1]


def section(quick: bool, table) -> list[str]:
    steps = 3 if quick else 10
    reps = 1000 if quick else 5000
    alone, watched = tight_loop(reps)
    rows, per_probe = [], []
    for name, make in WORKLOADS.items():
        w = make()
        idle = measure(name, None, 1000, steps)
        hooked = idle["hooks"]
        rows.append([w.name, hooked, idle["on"], f"{idle['us']:.1f}", f"{floor(name, steps):.1f}",
                     idle["ops"]])  # fmt: skip
        for p in w.make_probes():
            rec = measure(name, p.name, 1, steps)
            per_probe.append(
                [
                    w.name.split(",")[0],
                    f"{type(p).__name__} `{p.name}`",
                    f"{rec['us']:.0f}",
                    rec["ops"],
                ]
            )
    return [
        "### 12. What the monitor dispatches and costs on the host per step (every machine)",
        "",
        "Method: `benchmarks/proxies.py` (ATen ops of a whole step, monitored minus "
        "unmonitored, from `torch.profiler`; host time of the monitor's hooks, `observe()` "
        "and `step()`, timer cost subtracted; median of "
        f"{steps} steps). Unrecorded: `observe_every_n_steps=1000`, steps 1-999: the probes' "
        "hooks are off their modules (a mitigation's stay), `observe()` and `step()` take "
        "their quiet path. Beside it, a monitor whose `observe()` returns a null context and "
        "whose `step()` returns at once, timed the same way: the floor of this measurement.",
        "",
        *table(
            [
                "workload (its probes and mitigations)",
                "hooks",
                "of them on modules",
                "unrecorded step: host us",
                "a no-op monitor: host us",
                "ATen ops",
            ],
            rows,
        ),
        "",
        "The same with warm caches (`tight_loop`: a tiny 8-16-4 model, one NeuralCollapse "
        f"probe, the fastest of 5 alternating rounds of {reps} steps): {alone:.2f} us per "
        f"forward alone, {watched:.2f} us inside an unrecorded `observe()` and `step()`, so "
        f"{watched - alone:.2f} us of monitor. In the workloads above the same Python runs "
        "after large kernels, with cold caches: the no-op monitor's column is that floor.",
        "",
        "Recorded, non-logging step, one probe at a time (`observe_every_n_steps=1`):",
        "",
        *table(["workload", "probe", "host us", "ATen ops"], per_probe),
    ]
