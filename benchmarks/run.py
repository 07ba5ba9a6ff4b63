"""Benchmarks of the core: step-time overhead of the NeuralCollapse probe, state memory, and the
cost of one log (readout). Prints a Markdown table; `--write` also writes benchmarks/RESULTS.md.

    python benchmarks/run.py [--write]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitor import CollapseMonitor, probes  # noqa: E402


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def overhead(log_every: int, blocks: int = 15, steps: int = 20) -> tuple[float, float, float]:
    """Median over interleaved blocks of (monitored / unmonitored) step time, MLP 784-512-512-10."""
    base, watched = mlp(), mlp()
    mon = CollapseMonitor(watched, [probes.NeuralCollapse("4", 10, name="head")], log_every)
    opts = {m: torch.optim.SGD(m.parameters(), lr=0.01) for m in (base, watched)}
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))

    def run(model, monitored):
        opt = opts[model]
        t = time.perf_counter()
        for _ in range(steps):
            if monitored:
                with mon.observe(targets=y):
                    loss = nn.functional.cross_entropy(model(x), y)
            else:
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if monitored:
                mon.step(opt)
        return (time.perf_counter() - t) / steps

    run(base, False), run(watched, True)  # warm-up
    ratios, a_times, b_times = [], [], []
    for _ in range(blocks):
        a, b = run(base, False), run(watched, True)
        ratios.append(b / a)
        a_times.append(a)
        b_times.append(b)
    mon.close()
    return statistics.median(ratios), statistics.median(a_times), statistics.median(b_times)


def state_and_readout(C: int, D: int, used: int, batches: int = 4, batch: int = 4096):
    # features read at the output of an Identity: the timings are the monitor's alone
    model = nn.Sequential(nn.Identity())
    mon = CollapseMonitor(model, [probes.NeuralCollapse("0", C, read="output", name="h")], 10**9)
    g = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(batch, D, generator=g), torch.randint(0, used, (batch,), generator=g))
        for _ in range(batches + 1)
    ]
    with mon.observe(targets=data[0][1]):
        model(data[0][0])  # first batch allocates the state
    t = time.perf_counter()
    for x, y in data[1:]:
        with mon.observe(targets=y):
            model(x)
    update = (time.perf_counter() - t) / batches
    t = time.perf_counter()
    mon.compute()
    readout = time.perf_counter() - t
    measured = mon.probes[0].window.moments.nbytes()
    mon.close()
    return measured, 16 * C * D + 8 * D * D, update, readout


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    lines = [
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}. GPU: none in this session; GPU numbers pending.",
        "",
        "### Step-time overhead, MLP 784-512-512-10, batch 256, NeuralCollapse on the head",
        "",
        "| cadence | unmonitored ms/step | monitored ms/step | ratio (median of interleaved blocks) |",
        "|---|---|---|---|",
    ]
    for label, every in (("log every 50 steps (default)", 50), ("log every step (worst case)", 1)):
        ratio, a, b = overhead(every)
        lines.append(f"| {label} | {a * 1e3:.2f} | {b * 1e3:.2f} | {ratio:.3f} |")
    lines += [
        "",
        "### State memory and cost per batch / per log (4 batches of 4096 samples)",
        "",
        "| C | D | classes seen | state bytes (measured) | formula 16CD+8D^2 | update ms/batch | log (readout) s |",
        "|---|---|---|---|---|---|---|",
    ]
    for C, D, used in ((10, 512, 10), (1000, 512, 1000), (50257, 768, 4000)):
        measured, formula, update, readout = state_and_readout(C, D, used)
        lines.append(
            f"| {C} | {D} | {used} | {measured:,} | {formula:,} | {update * 1e3:.1f} | {readout:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.write:
        out = Path(__file__).with_name("RESULTS.md")
        out.write_text(
            "# Benchmark results\n\nProduced by `python benchmarks/run.py --write`.\n\n"
            + text
            + "\n"
        )


if __name__ == "__main__":
    main()
