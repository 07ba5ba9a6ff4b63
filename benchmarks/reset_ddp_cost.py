"""What ``ResetDeadCodes`` costs per training step under DDP (2 gloo processes on the CPU).

The default form acts at every step: it all-reduces the ``(H, K)`` hit counts and broadcasts
rank 0's ``(H, K, D)`` draws each step. The form acting at logs (``every_step=False``) does its
collectives only at logs. Each rank trains a VQ autoencoder (vector-quantize-pytorch
``VectorQuantize``, EMA codebook of ``K`` codes of dimension ``D``) wrapped in DDP, with a
``CodebookUsage`` probe and ``log_every_n_steps=50``, and times 150 steps per variant after 20
warm-up steps; variants alternate over 3 rounds, the median is reported.
``python benchmarks/reset_ddp_cost.py [--write]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from collapse_monitor import CollapseMonitor, mitigations, probes

VARIANTS = {
    "probe only": None,
    "ResetDeadCodes() (every step, default)": {},
    "ResetDeadCodes(every_step=False) (at logs)": {"every_step": False},
}
SIZES = ((256, 32), (1024, 64))
STEPS, WARMUP, ROUNDS = 150, 20, 3


class AutoEncoder(nn.Module):
    def __init__(self, K: int, D: int) -> None:
        from vector_quantize_pytorch import VectorQuantize

        super().__init__()
        self.D = D
        self.enc, self.dec = nn.Linear(64, 8 * D), nn.Linear(8 * D, 64)
        self.vq = VectorQuantize(dim=D, codebook_size=K)

    def forward(self, x):
        q, _, commit = self.vq(self.enc(x).view(-1, 8, self.D))
        return (self.dec(q.flatten(1)) - x).pow(2).mean() + commit.sum()


def worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    times: dict[tuple[int, int, str], list[float]] = {}
    for _ in range(ROUNDS):
        for K, D in SIZES:
            for label, kwargs in VARIANTS.items():
                torch.manual_seed(0)
                model = AutoEncoder(K, D)
                fixes = [] if kwargs is None else [mitigations.ResetDeadCodes("vq", **kwargs)]
                mon = CollapseMonitor(
                    model, [probes.CodebookUsage("vq", K, name="vq")], 50, mitigations=fixes
                )
                ddp = nn.parallel.DistributedDataParallel(model)
                opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                g = torch.Generator().manual_seed(rank)
                for step in range(WARMUP + STEPS):
                    if step == WARMUP:
                        dist.barrier()
                        start = time.perf_counter()
                    x = torch.randn(128, 64, generator=g)
                    with mon.observe():
                        loss = ddp(x)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    mon.step(optimizer=opt)
                dist.barrier()
                times.setdefault((K, D, label), []).append(
                    (time.perf_counter() - start) / STEPS * 1e3
                )
                del ddp
                mon.close()
    if rank == 0:
        torch.save(times, out)
    dist.destroy_process_group()


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.pt")
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.start_processes(worker, args=(init, out), nprocs=2, start_method="spawn")
        times = torch.load(out)
    lines = [
        "| codebook (K x D) | variant | ms per step (median of rounds) | over the probe alone |",
        "|---|---|---|---|",
    ]
    for K, D in SIZES:
        base = statistics.median(times[K, D, "probe only"])
        for label in VARIANTS:
            ms = statistics.median(times[K, D, label])
            lines.append(f"| {K} x {D} | {label} | {ms:.2f} | {ms - base:+.2f} ms |")
    print("\n".join(lines))
    if args.write:
        sys.path.insert(0, str(Path(__file__).parent))
        from run import write_section

        write_section(
            "reset_ddp",
            "9. ResetDeadCodes per training step under DDP",
            [
                "`python benchmarks/reset_ddp_cost.py --write`: 2 gloo processes on the CPU, "
                "DDP, vector-quantize-pytorch `VectorQuantize` (EMA codebook), batches of 128 "
                f"images x 8 code vectors, `log_every_n_steps=50`; {STEPS} timed steps per "
                f"variant after {WARMUP}, {ROUNDS} alternating rounds:",
                "",
                *lines,
            ],
            time.perf_counter() - t,
            "one torch thread per process",
        )
    return lines


if __name__ == "__main__":
    main()
