"""The monitor's cost per step in one process: unmonitored and monitored blocks of 50 steps
interleaved, NeuralCollapse at the head at the default cadence (log every 50), on a tiny MLP
(8-16-4, batch 32: the monitor's fixed cost alone) and on section 1's 784-512-512-10 MLP.

    python benchmarks/fixed_cost.py           # this tree
    python benchmarks/ab.py --against REV --fixed-cost   # two versions, alternating
"""

from __future__ import annotations

import json
import statistics
import time

import torch
from torch import nn

from collapse_monitor import CollapseMonitor, probes


def fixed_cost(big: bool, blocks: int, steps: int = 50) -> dict:
    """Median ms per step unmonitored and monitored, and the median of the blocks' ratios."""
    torch.manual_seed(0)
    if big:
        model = nn.Sequential(
            nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
        )
        x, y, head, classes = torch.randn(256, 784), torch.randint(0, 10, (256,)), "4", 10
    else:
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        x, y, head, classes = torch.randn(32, 8), torch.randint(0, 4, (32,)), "2", 4
    mon = CollapseMonitor(model, [probes.NeuralCollapse(head, classes, name="head")], 50)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(monitored: bool) -> None:
        if monitored:
            with mon.observe(targets=y):
                loss = nn.functional.cross_entropy(model(x), y)
        else:
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if monitored:
            mon.step(optimizer=opt)

    for _ in range(100):  # warm up both paths
        step(True)
        step(False)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(blocks):
        for monitored in (False, True):
            t = time.perf_counter()
            for _ in range(steps):
                step(monitored)
            times[monitored].append((time.perf_counter() - t) / steps * 1e3)
    mon.close()
    plain, monitored = statistics.median(times[False]), statistics.median(times[True])
    ratios = [m / p for m, p in zip(times[True], times[False])]
    return {
        "plain_ms": plain,
        "extra_us": (monitored - plain) * 1e3,
        "ratio": statistics.median(ratios),
    }


def main() -> dict:
    torch.set_num_threads(2)
    return {"tiny": fixed_cost(False, 20), "mlp": fixed_cost(True, 12)}


if __name__ == "__main__":
    print(json.dumps(main()))
