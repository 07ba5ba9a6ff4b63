"""ATen ops of one recorded, non-logging step of DormantUnits on a 3-layer ReLU MLP (batch 32):
every op torch.profiler sees (nested ones included), monitored minus unmonitored.

Run: ``python benchmarks/dormant_ops.py`` (a few seconds; deterministic).
"""

import contextlib

import torch
from torch import nn

from collapse_monitor import CollapseMonitor, probes


def aten_ops(model: nn.Module, x: torch.Tensor, mon: CollapseMonitor | None) -> int:
    def one_step() -> None:
        with mon.observe() if mon else contextlib.nullcontext(), torch.no_grad():
            model(x)
        if mon:
            mon.step()

    for _ in range(3):  # past the first steps (the statistics' sizes fixed)
        one_step()
    with torch.profiler.profile() as prof:
        one_step()
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    x = torch.randn(32, 64)
    base = aten_ops(model, x, None)
    mon = CollapseMonitor(
        model, [probes.DormantUnits("*", name="d")], 1000, observe_every_n_steps=1
    )
    print("DormantUnits recorded step, ATen ops:", aten_ops(model, x, mon) - base)
    mon.close()


if __name__ == "__main__":
    main()
