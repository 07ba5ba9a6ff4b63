"""Steps that no probe records cost nothing: the probes' hooks leave their modules until their
next recorded step (issue 30), come back where they were among the user's hooks, and change no
metric; torch.compile never traces a module while they are out."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from collapse_monitor import CollapseMonitor, mitigations, probes
from tests.mitigations.test_reset_dead_codes import concentrated
from tests.mitigations.test_simvq import AutoEncoder
from tests.reference import assert_metrics_close, nc_reference

STEPS, L = 30, 10


@pytest.fixture(autouse=True)
def _hooks_may_leave():
    """Another test's torch.compile in this process keeps every hook on its module from then on
    (HookSet.suspend); these tests' models are never compiled, so they start as a fresh process."""
    from collapse_monitor import hooks

    hooks._may_suspend()  # (watching compilations from here on)
    seen, hooks._COMPILE["seen"] = hooks._COMPILE["seen"], False
    yield
    hooks._COMPILE["seen"] = seen


def test_hooks_leave_the_modules_on_steps_no_probe_records_and_every_metric_stays():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    head = model[2]
    inputs: list[torch.Tensor] = []
    before = head.register_forward_hook(lambda m, a, out: inputs.append(a[0].detach().clone()))
    nc = probes.NeuralCollapse("2", 4, name="nc")
    rank = probes.RepresentationRank("0", name="rank")
    monitor = CollapseMonitor(model, [nc, rank], L)
    after = head.register_forward_hook(lambda m, a, out: None)  # a user's hook added later
    batches = [(torch.randn(64, 6), torch.arange(64) % 4) for _ in range(STEPS)]
    logged = []
    rows = []
    for x, y in batches:
        due = {p.name: monitor.records(p) for p in monitor.probes}
        with monitor.observe(targets=y):
            model(x)
            hooks = list(head._forward_hooks)
        out = monitor.step()
        rows.append((due, hooks, inputs[-1], y))
        if out is not None:
            logged.append(out)
    quiet = [h for due, h, _, _ in rows if not any(due.values())]
    recorded = [h for due, h, _, _ in rows if due["nc"]]
    assert quiet and recorded, "the cadence should leave some steps unrecorded"
    for hooks in quiet:  # ours are out; the user's stay, in their order
        assert hooks == [before.id, after.id]
    for hooks in recorded:  # ours are back between them, where they were registered
        assert len(hooks) == 3 and hooks[0] == before.id and hooks[-1] == after.id
    # the last window's NC metrics = a float64 reference on the steps it recorded
    last = rows[-L:]
    X = torch.cat([x for due, _, x, _ in last if due["nc"]]).double().numpy()
    Y = torch.cat([y for due, _, _, y in last if due["nc"]]).numpy()
    want = nc_reference(X, Y, 4, head.weight.detach().double().numpy(),
                        head.bias.detach().double().numpy())  # fmt: skip
    got = {k.split("/")[-1]: v for k, v in logged[-1].items() if k.startswith("collapse/nc/")}
    assert_metrics_close(
        got, want, keys=["nc1", "nc1_quotient", "cdnv", "equiangular", "self_duality"]
    )
    assert got["samples"] == len(X)
    monitor.close()
    assert list(head._forward_hooks) == [before.id, after.id]  # closed: no trace of ours


def test_a_quiet_step_still_refuses_a_nested_observe_and_a_closed_monitor():
    model = nn.Sequential(nn.Linear(3, 3))
    monitor = CollapseMonitor(model, [probes.RepresentationRank("0")], 10**6,
                              observe_every_n_steps=1000)  # fmt: skip
    for _ in range(2):
        with monitor.observe():
            model(torch.randn(4, 3))
        monitor.step()
    assert not model[0]._forward_hooks  # step 2 is quiet: the hooks are out
    with monitor.observe(), pytest.raises(RuntimeError, match="nested"):
        with monitor.observe():
            pass
    monitor.close()
    with pytest.raises(RuntimeError, match="closed"), monitor.observe():
        pass


def test_a_step_counter_set_back_by_hand_records_and_logs_as_the_cadence_says():
    model = nn.Sequential(nn.Linear(3, 3))
    monitor = CollapseMonitor(model, [probes.RepresentationRank("0", name="z")], 10,
                              observe_every_n_steps=5)  # fmt: skip
    logs = []
    for step in range(22):
        if step == 12:
            monitor.global_step = 0  # (a user re-aligning with a trainer's counter)
        with monitor.observe():
            model(torch.randn(4, 3))
        out = monitor.step()
        if out is not None:
            logs.append((monitor.global_step, out["collapse/z/samples"]))
    # steps 0 and 5 of a window of 10 recorded, 4 rows each; set back at 12, the open window
    # (its step 10) takes the new steps 0 and 5 and logs after the new step 9
    assert logs == [(10, 8.0), (10, 12.0)]


_COMPILED = textwrap.dedent(
    """
    import torch
    from torch import nn
    from collapse_monitor import CollapseMonitor, probes

    def run(compile_at):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
        monitor = CollapseMonitor(model, [probes.RepresentationRank("0", name="rank")], 10,
                                  observe_every_n_steps=5)
        forward, logs = model, []
        for step in range(20):
            if step == compile_at:  # first called on a step the probe does not record
                assert not model[0]._forward_hooks
                forward = torch.compile(model, backend="eager")
            with monitor.observe():
                forward(torch.randn(32, 6))
            out = monitor.step()
            if out is not None:
                logs.append(out)
        monitor.close()
        return logs

    eager, compiled = run(None), run(3)
    for a, b in zip(eager, compiled):
        assert a["collapse/rank/samples"] == b["collapse/rank/samples"] == 2 * 32, (a, b)
        for k in a:
            if k.startswith("collapse/rank/"):
                assert abs(a[k] - b[k]) <= 1e-6 * abs(a[k]) + 1e-12, (k, a[k], b[k])
    print("ok", len(eager))
    """
)


def test_torch_compile_of_a_model_whose_hooks_are_out_puts_them_back_first(tmp_path):
    # (a subprocess: once torch.compile has run, no hook leaves its module in that process)
    done = subprocess.run([sys.executable, "-c", _COMPILED], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok 2"


class _Idle(mitigations.Mitigation):
    """A user's mitigation that does nothing; like any mitigation not known to rest on quiet
    steps, it makes the monitor run every step in full."""


def _vq_run(extra: list) -> tuple[list, dict, list]:
    torch.manual_seed(0)
    model = AutoEncoder()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = CollapseMonitor(
        model,
        [probes.CodebookUsage("vq", 16, ema_decay=0.5, warmup_steps=2)],
        8,
        mitigations=[mitigations.ResetDeadCodes("vq", every_step=False), *extra],
        observe_every_n_steps=4,
    )
    logs, hooked = [], []
    for step in range(24):
        x = concentrated(48, 8, seed=step)
        with monitor.observe():
            recon, commit = model(x)
            hooked.append(len(model.vq._forward_hooks) + len(model.vq._forward_pre_hooks))
        ((recon - x).pow(2).mean() + commit).backward()
        opt.step()
        opt.zero_grad()
        out = monitor.step(opt)
        if out is not None:
            logs.append(out)
    monitor.close()
    return logs, model.state_dict(), hooked


def test_quiet_steps_take_a_mitigations_hooks_off_too_and_change_nothing():
    quiet_logs, quiet_weights, quiet_hooked = _vq_run([])
    full_logs, full_weights, full_hooked = _vq_run([_Idle()])
    assert min(quiet_hooked) == 0 < max(quiet_hooked)  # off on quiet steps, on when recording
    assert min(full_hooked) > 0  # a mitigation with work on every step keeps every hook
    assert quiet_logs[-1]["collapse/mitigations/reset_dead_codes"] > 0  # (it reset codes)
    assert len(quiet_logs) == len(full_logs) == 3
    for a, b in zip(quiet_logs, full_logs):
        assert a == b
    for name, weight in quiet_weights.items():
        assert torch.equal(weight, full_weights[name]), name


def test_a_monitor_whose_every_probe_stopped_keeps_stepping_and_logging():
    model = nn.Sequential(nn.Linear(3, 3))  # (float outputs: no code indices to read)
    monitor = CollapseMonitor(model, [probes.CodebookUsage("0", 4, name="vq")], 5)
    logs = []
    for _ in range(20):
        with monitor.observe():
            model(torch.randn(4, 3))
        if monitor.step() is not None:
            logs.append(monitor.global_step)
    assert logs == [5, 10, 15, 20] and monitor.error_count == 1
    assert not model[0]._forward_hooks  # (stopped: never due again, its hooks off)
    monitor.close()


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.body = nn.Embedding(10, 8), nn.Linear(8, 8)

    def forward(self, input_ids, attention_mask=None):
        return self.body(self.emb(input_ids))


def test_hooks_are_back_before_a_forward_that_enters_observe_from_the_models_own_pre_hook():
    # transformers' callback enters observe() in a pre-hook of the model itself: PyTorch read
    # the model's pre-hooks before it ran, so the probes' (the attention mask's) must be back
    # by then; the padded tokens are no embeddings, on every recorded step
    torch.manual_seed(0)
    model = _Tokens()
    monitor = CollapseMonitor(model, [probes.RepresentationRank("body", name="z")], 10)
    inside = []

    def enter(module, args, kwargs):
        inside.append(monitor.observe())
        inside[-1].__enter__()

    def leave(module, args, output):
        inside.pop().__exit__(None, None, None)

    handles = [model.register_forward_pre_hook(enter, with_kwargs=True, prepend=True),
               model.register_forward_hook(leave)]  # fmt: skip
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[:, 4:] = 0  # 16 real tokens a batch
    logs = []
    for _ in range(30):
        model(input_ids=torch.randint(0, 10, (4, 6)), attention_mask=mask)
        out = monitor.step()
        if out is not None:
            logs.append(out["collapse/z/samples"])
    assert logs == [32.0, 32.0, 32.0]  # two recorded steps a window, 16 tokens each
    # an evaluation begun inside the model's pre-hook, on a quiet step (as the callback does)
    evaluating = [True]

    def enter_eval(module, args, kwargs):
        if evaluating[0] and monitor.snapshot_prefix is None:
            monitor.begin_snapshot("val")
        enter(module, args, kwargs)

    handles[0].remove()
    handles[0] = model.register_forward_pre_hook(enter_eval, with_kwargs=True, prepend=True)
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=torch.randint(0, 10, (4, 6)), attention_mask=mask)
    assert monitor.end_snapshot()["val/collapse/z/samples"] == 32.0
    for h in handles:
        h.remove()
    monitor.close()


class _Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)

    def forward(self, x, **kwargs):
        return self.body(x)


def test_a_model_whose_forward_takes_no_mask_has_no_pre_hook_of_ours():
    # the model's pre-hook reads attention_mask, input_ids, logits_to_keep and a cache: a model
    # whose forward takes none of them (forward(x)) gets none, so its quiet steps leave no hook
    # of ours anywhere; with them, or with **kwargs, it stays (a forward in flight, see above)
    for model, x, kept in (
        (nn.Sequential(nn.Linear(8, 8)), torch.randn(4, 6, 8), 0),
        (_Tokens(), torch.randint(0, 10, (4, 6)), 1),
        (_Keywords(), torch.randn(4, 6, 8), 1),
    ):
        path = "0" if isinstance(model, nn.Sequential) else "body"
        probe = probes.RepresentationRank(path, name="z")
        monitor = CollapseMonitor(model, [probe], 10)
        quiet = []
        for _ in range(12):
            with monitor.observe():
                model(x)
                if not monitor.records(probe):
                    quiet.append(len(model._forward_pre_hooks) + len(model._forward_hooks))
            monitor.step()
        assert quiet and set(quiet) == {kept}, (type(model).__name__, quiet)
        monitor.close()
        assert not model._forward_pre_hooks and not model._forward_hooks


def test_a_snapshot_on_a_quiet_step_leaves_the_hooks_as_it_found_them():
    # the snapshot puts every hook back for its forwards, and takes out again those of the
    # probes that do not record the current step: the quiet stretch goes on after it
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64))
    probe = probes.RepresentationRank("2", name="rank")
    monitor = CollapseMonitor(model, [probe], 50)
    hooked, recorded = [], []
    for step in range(50):
        with monitor.observe():
            if model[2]._forward_hooks:
                hooked.append(step)
            if monitor.records(probe):
                recorded.append(step)
            model(torch.randn(32, 16))
        out = monitor.step()
        if step == 10:
            with monitor.snapshot("val") as val, monitor.observe():
                model(torch.randn(40, 16))
    assert val["val/collapse/rank/samples"] == 40
    assert out["collapse/rank/samples"] == 32 * len(recorded)
    assert recorded and [s for s in hooked if s] == recorded  # (step 0: on since attach)
    monitor.close()
