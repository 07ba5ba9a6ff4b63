"""On a CUDA device (skipped elsewhere): the monitored hot path never makes the host wait."""

import pytest
import torch

from collapse_monitor import CollapseMonitor
from tests.zoo import Zoo, batch, every_mitigation, every_probe, loss_of

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LOG_EVERY = 5


def train(mon, steps, sync_debug):
    """Run ``steps`` training steps of the zoo; under ``sync_debug`` any host sync raises."""
    model = mon.model if mon is not None else Zoo().cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = [tuple(t.cuda() for t in batch(s)) for s in range(steps)]
    logged = []
    for s, (x, y, groups) in enumerate(data):
        debug = sync_debug and (mon is None or (s + 1) % LOG_EVERY != 0)
        torch.cuda.set_sync_debug_mode("error" if debug else "default")
        try:
            if mon is None:
                loss = loss_of(model(x), y)
            else:
                with mon.observe(targets=y, groups=groups):
                    loss = loss_of(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if mon is not None:
                logged.append(bool(mon.step(optimizer=opt)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return logged


def test_the_unmonitored_loop_itself_never_synchronises():
    # the premise of the next test: any sync it reports comes from the monitor
    train(None, 2 * LOG_EVERY, sync_debug=True)


@pytest.mark.parametrize("codebook", ["reset", "every_step", "simvq"])
def test_steps_between_logs_never_synchronise_with_every_probe_and_mitigation(codebook):
    model = Zoo().cuda()
    mon = CollapseMonitor(
        model,
        every_probe(),
        LOG_EVERY,
        mitigations=every_mitigation(codebook=codebook),
        observe_every_n_steps=1,  # every probe records every step
    )
    # two windows: the second starts with state made on the device at the first log
    logged = train(mon, 2 * LOG_EVERY, sync_debug=True)
    assert logged == [False] * (LOG_EVERY - 1) + [True] + [False] * (LOG_EVERY - 1) + [True]
    mon.close()


def test_lightning_fsdp_strategy_gathers_through_the_wrapper(tmp_path):
    """Lightning's strategy="fsdp" (first generation, CUDA only) wraps the module after the
    callback's setup: the callback points the monitor at the wrapper (``sharded_by``), so every
    probe and mitigation reads and writes whole parameters."""
    from tests.scripts.lightning_fsdp import fit

    fit(str(tmp_path), "fsdp", 1, 10, accelerator="cuda")
    state = torch.load(tmp_path / "fsdp0.pt", weights_only=False)
    assert state["mitigations"]["reset_dead_codes"] > 0
