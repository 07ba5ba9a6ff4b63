"""Neural-collapse readout after the first log (issue 16): per-rank CPU seconds of ``compute()``
on a window whose class shifts the ranks already agree on (every log but the first), at
C = 50,257, D = 768, every class used, for 1, 2 and 4 gloo processes of one torch thread.

    python benchmarks/nc_steady.py [--worlds 1,2,4] [--first]

``--first`` times the first window instead, in which every class is new and each rank re-centres
its sums of the classes it saw before the reduce (as section 6 of ``benchmarks/run.py`` does).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from collapse_monitor import CollapseMonitor, probes

C, D, BATCH = 50_257, 768, 4096


def _record(mon, model, rank: int, world: int, offset: float) -> None:
    """This rank's share of two rows per class (class means at random directions, noise)."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(C, D, generator=g)
    labels = torch.arange(C).repeat(2)[torch.randperm(C * 2, generator=g)]
    noise = torch.randn(len(labels), D, generator=g)
    mine = torch.arange(rank, len(labels), world)
    for s in range(0, len(mine), BATCH):
        rows = mine[s : s + BATCH]
        with mon.observe(targets=labels[rows]):
            model(means[labels[rows]] + 0.5 * noise[rows] + offset)


def _worker(rank: int, world: int, init: str, out: str, first: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=30)
    )
    try:
        model = nn.Sequential(nn.Identity())
        probe = probes.NeuralCollapse("0", C, read="output", name="lm")
        mon = CollapseMonitor(model, [probe], 1, observe_every_n_steps=1)
        _record(mon, model, rank, world, 0.0)
        if not first:
            mon.step()  # the first log: its reduce and shifts (its readout not timed)
            _record(mon, model, rank, world, 0.01)
        dist.barrier()
        cpu = time.process_time()
        metrics = mon.compute()
        cpu = time.process_time() - cpu
        torch.save({"metrics": metrics, "cpu": cpu}, os.path.join(out, f"r{rank}.pt"))
        mon.close()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--first", action="store_true", help="time the first window")
    args = parser.parse_args(argv)
    first = None
    for world in map(int, args.worlds.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            init = f"file://{tmp}/store"
            mp.start_processes(
                _worker, args=(world, init, tmp, args.first), nprocs=world, start_method="spawn"
            )
            runs = [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(world)]
        cpu = max(r["cpu"] for r in runs)
        first = first or (cpu, runs[0]["metrics"])
        ref = first[1]
        keys = [k for k in ref if not k.endswith(("calls", "errors"))]
        diff = max(abs(runs[0]["metrics"][k] - ref[k]) / max(abs(ref[k]), 1e-300) for k in keys)
        print(
            f"world {world}: readout CPU s per rank {cpu:.1f} ({cpu / first[0]:.2f} of the "
            f"first world's), metrics differ by at most {diff:.1e} (relative)",
            flush=True,
        )


if __name__ == "__main__":
    main()
