"""Collapse monitoring in a Hugging Face Accelerate training loop, on one process or many.

The recipe: build the monitor on the unwrapped model before ``accelerator.prepare``; observe
each forward pass; step the monitor once per optimizer step (``accelerator.sync_gradients``),
so that gradient accumulation does not multiply the steps. Statistics are all-reduced across
processes at each log, and sinks write from the main process only.

    accelerate launch --num_processes 2 examples/accelerate_ddp.py --out runs/accelerate
    # on CPU processes: accelerate launch --cpu ..., or ACCELERATE_USE_CPU=1 torchrun ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor.integrations.jsonl import JSONLinesSink

C, D = 4, 8


def data(n: int = 128) -> TensorDataset:
    """Four Gaussian classes in ``D`` dimensions (generated: nothing to download)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % C
    x = 3.0 * torch.randn(C, D, generator=g)[y] + torch.randn(n, D, generator=g)
    return TensorDataset(x, y)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, C))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/accelerate")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    accelerator = Accelerator(gradient_accumulation_steps=2)
    net = model()
    monitor = CollapseMonitor(
        net,  # the unwrapped model: module paths as you know them
        [probes.NeuralCollapse("2", C, name="head"), probes.DormantUnits("1", name="relu")],
        log_every_n_steps=4,
        sinks=[JSONLinesSink(Path(args.out) / "collapse.jsonl")],  # main process only
        observe_every_n_steps=1,
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
    loader = DataLoader(data(), batch_size=8)
    net, optimizer, loader = accelerator.prepare(net, optimizer, loader)
    for _ in range(args.epochs):
        for x, y in loader:
            with accelerator.accumulate(net):
                with monitor.observe(targets=y):
                    loss = F.cross_entropy(net(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:  # one monitor step per optimizer step
                metrics = monitor.step(optimizer)
                if metrics and accelerator.is_main_process:
                    print(f"step {monitor.global_step}: NC1 {metrics['collapse/head/nc1']:.3f}")
    monitor.close()
    # free the DDP wrapper while the process group lives: a gloo Reducer freed after the group
    # is destroyed can deadlock at exit
    net, optimizer, loader = accelerator.free_memory(net, optimizer, loader)
    accelerator.end_training()


if __name__ == "__main__":
    main()
