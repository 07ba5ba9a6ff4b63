"""Section 6 of benchmarks/run.py: neural collapse at language-model scale (issue 16).

A NeuralCollapse window over C = 50,257 classes (GPT-2's vocabulary) and D = 768 features, every
class used, read out by 1, 2 and 4 gloo processes on this machine's CPUs (one torch thread each:
the per-rank work is what a rank on its own device would do; with more ranks than cores their
wall times overlap, so CPU seconds are the per-rank measure). Also: the bytes each rank holds
and sends per log, the sampled-pairs readout's time and interval coverage, and the default
cadence on a 1,000-class head.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor import functional as F

C, D = 50_257, 768
ROWS_PER_CLASS = 2  # every class used (NC needs 2 samples)
BATCH = 4096


def _collective_bytes() -> dict[str, int]:
    """Count the bytes of every tensor this process hands to a collective (wrapping the
    functions the monitor calls: this is measurement, not the monitor's code)."""
    counts = {"all_reduce": 0, "broadcast": 0, "all_gather_object": 0}

    def wrap(name, fn):
        def counted(tensor_or_list, *a, **k):
            if name == "all_gather_object":
                import pickle

                counts[name] += len(pickle.dumps(a[0])) * dist.get_world_size()
            else:
                counts[name] += tensor_or_list.numel() * tensor_or_list.element_size()
            return fn(tensor_or_list, *a, **k)

        return counted

    dist.all_reduce = wrap("all_reduce", dist.all_reduce)
    dist.broadcast = wrap("broadcast", dist.broadcast)
    dist.all_gather_object = wrap("all_gather_object", dist.all_gather_object)
    return counts


def _window(rank: int, world: int, pair_sample: int | None = None, device: str = "cpu"):
    """This rank's share of the rows: class means at random directions, noise around them."""
    model = nn.Sequential(nn.Identity())
    probe = probes.NeuralCollapse("0", C, read="output", name="lm", pair_sample=pair_sample)
    mon = CollapseMonitor(model, [probe], 10**9, observe_every_n_steps=1)
    g = torch.Generator().manual_seed(0)
    means = torch.randn(C, D, generator=g)
    labels = torch.arange(C).repeat(ROWS_PER_CLASS)[torch.randperm(C * ROWS_PER_CLASS, generator=g)]
    # every row's noise depends on the row only: all worlds see the same data set
    noise = torch.randn(len(labels), D, generator=g)
    mine = torch.arange(rank, len(labels), world)
    for s in range(0, len(mine), BATCH):
        rows = mine[s : s + BATCH]
        y = labels[rows]
        with mon.observe(targets=y.to(device)):
            model((means[y] + 0.5 * noise[rows]).to(device))
    return mon, probe


def _worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=30)
    )
    try:
        mon, probe = _window(rank, world)
        counts = _collective_bytes()
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = mon.compute()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        sent = dict(counts)
        state = mon.state_dict()  # a checkpoint: the reduced window
        checkpoint = sum(counts.values()) - sum(sent.values())
        torch.save(
            {
                "metrics": metrics,
                "wall": wall,
                "cpu": cpu,
                "bytes": sent,
                "checkpoint_bytes": checkpoint,
                "state_bytes": probe.window.nbytes(),
                "saved_bytes": sum(
                    t.numel() * t.element_size()
                    for e in state["probes"]["lm"]["window"]["entries"].values()
                    for t in e["states"].values()
                ),
            },
            os.path.join(out, f"r{rank}.pt"),
        )
        mon.close()
    finally:
        dist.destroy_process_group()


def _run(world: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/store"
        mp.start_processes(_worker, args=(world, init, tmp), nprocs=world, start_method="spawn")
        return [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(world)]


def _single(pair_sample: int | None = None) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mon, _ = _window(0, 1, pair_sample)
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = mon.compute()
        out = {"metrics": metrics, "wall": time.perf_counter() - wall}
        out["cpu"] = time.process_time() - cpu
        mon.close()
        return out
    finally:
        torch.set_num_threads(threads)


def gpu_readout(device: str) -> list[str]:
    """The same window (C = 50,257, D = 768) accumulated and read out on ``device``, against the
    same readout on this machine's CPU (all its threads): seconds and the largest relative
    difference of the metrics."""
    out = []
    for pair_sample in (None, 131_072):
        mon, _ = _window(0, 1, pair_sample, device)
        torch.cuda.synchronize()
        t = time.perf_counter()
        got = mon.compute()
        torch.cuda.synchronize()
        took = time.perf_counter() - t
        mon.close()
        mon, _ = _window(0, 1, pair_sample)
        t = time.perf_counter()
        ref = mon.compute()
        cpu = time.perf_counter() - t
        mon.close()
        mode = "exact" if pair_sample is None else f"pair_sample={pair_sample:,}"
        out.append(
            f"- NC readout, C = {C:,}, D = {D}, {mode}: {took:.2f} s on the GPU, {cpu:.1f} s on "
            f"the CPU ({torch.get_num_threads()} threads); metrics differ by at most "
            f"{_max_rel(got, ref):.1e} (relative)"
        )
        print(out[-1], flush=True)
    return out


def _max_rel(a: dict, b: dict) -> float:
    keys = [k for k in b if k in a and not k.endswith(("calls", "errors"))]
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-300) for k in keys)


def _coverage(seeds: int, pairs: int) -> tuple[dict[str, float], float]:
    """Interval coverage of the sampled readout over ``seeds`` draws, on class means drawn like
    the window's (uneven norms and variances), against the exact value; and ms per readout."""
    g = torch.Generator().manual_seed(1)
    m = torch.randn(5000, 64, generator=g, dtype=torch.float64)
    m = m * torch.exp(0.3 * torch.randn(5000, 1, generator=g, dtype=torch.float64))
    v = torch.exp(torch.randn(5000, generator=g, dtype=torch.float64))
    m = m - m.mean(0)
    exact = F.pairwise_metrics(F.pairwise_sums(m, v))
    hits = dict.fromkeys(("equiangular", "cos_std", "cdnv"), 0)
    times = []
    for seed in range(seeds):
        t = time.perf_counter()
        got = F.sampled_pairwise_metrics(m, v, pairs, torch.Generator().manual_seed(seed))
        times.append(time.perf_counter() - t)
        for k in hits:
            hits[k] += abs(got[f"{k}_sampled"] - exact[k]) <= got[f"{k}_sampled_ci95"]
    return {k: h / seeds for k, h in hits.items()}, statistics.median(times) * 1e3


def _cadence(classes: int, log_every: int = 50, steps: int = 150) -> list[float]:
    head = nn.Linear(16, classes)
    mon = CollapseMonitor(nn.Sequential(head), [probes.NeuralCollapse("0", classes)], log_every)
    g = torch.Generator().manual_seed(0)
    used = []
    for _ in range(steps):
        y = torch.randint(0, classes, (256,), generator=g)
        with mon.observe(targets=y):
            head(torch.randn(256, 16, generator=g))
        m = mon.step()
        if m is not None:
            used.append(m["collapse/0/classes_used"])
    mon.close()
    return used


def section_nc_scale(quick: bool, table) -> list[str]:
    single = _single()
    rows, runs = [], {}
    for world in (1, 2, 4):
        runs[world] = _run(world) if world > 1 else None
    base_bytes = None
    for world, ranks in runs.items():
        if ranks is None:
            cpu, wall, rel = single["cpu"], single["wall"], 0.0
            state, sent, ckpt = 16 * C * D + 8 * D * D, 0, 0
        else:
            cpu = max(r["cpu"] for r in ranks)
            wall = max(r["wall"] for r in ranks)
            rel = max(_max_rel(r["metrics"], single["metrics"]) for r in ranks)
            state = max(r["state_bytes"] for r in ranks)
            sent = max(sum(r["bytes"].values()) for r in ranks)
            ckpt = max(r["checkpoint_bytes"] for r in ranks)
            base_bytes = base_bytes or sent
        rows.append(
            [
                world,
                f"{cpu:.1f}",
                f"{cpu / single['cpu']:.2f}",
                f"{wall:.1f}",
                f"{rel:.1e}",
                f"{state / 1e6:.0f}",
                f"{sent / 1e6:.0f}",
                f"{ckpt / 1e6:.0f}",
            ]
        )
    sampled = _single(pair_sample=2**17)
    cover, ms = _coverage(100 if quick else 400, 20_000)
    cover_40, _ = _coverage(40, 20_000)
    exact = {k.split("/")[-1]: v for k, v in single["metrics"].items()}
    est = {k.split("/")[-1]: v for k, v in sampled["metrics"].items()}
    sampled_rows = [
        [k, f"{exact[k]:.6f}", f"{est[k + '_sampled']:.6f} +- {est[k + '_sampled_ci95']:.6f}"]
        for k in ("equiangular", "cos_std", "cdnv")
    ]
    cadence = {c: _cadence(c) for c in (10, 1000)}
    # per-rank readout CPU s = A + P / world: P the pairwise work (split), A the rest (the
    # all-reduce, re-centring, scatter and Sigma_B GEMMs, eigh: replicated), fitted on 2 and 4
    t2 = max(r["cpu"] for r in runs[2])
    t4 = max(r["cpu"] for r in runs[4])
    pair_s, rest_s = 4 * (t2 - t4), 2 * t4 - t2
    big_c, big_d, ranks8 = 128_000, 4096, 8
    pair_8 = pair_s * (big_c / C) ** 2 * (big_d / D) / ranks8
    rest_8 = rest_s * (big_c / C) * (big_d / D) ** 2
    return (
        [
            "### 6. Neural collapse at language-model scale (C = 50,257, D = 768, every class used)",
            "",
            "Readout of one window (`monitor.compute()`: the all-reduce and the metrics) by 1, 2 "
            "and 4 gloo processes, one torch thread each. CPU s per rank is the work each rank "
            "does (with more ranks than this machine's 2 cores, wall times overlap); rel. diff. "
            "is the largest relative difference of any metric from one process. State, bytes "
            "sent per log (tensor bytes handed to collectives by one rank) and per checkpoint "
            "(`state_dict()`, a collective) are per rank.",
            "",
        ]
        + table(
            [
                "ranks",
                "readout CPU s per rank",
                "vs 1 process",
                "wall s",
                "rel. diff.",
                "state MB per rank",
                "MB sent per log",
                "MB sent per checkpoint",
            ],
            rows,
        )
        + [
            "",
            "The pairwise metrics split over the ranks (each computes its share of the "
            "class-pair tiles; the sums are all-reduced), the rest of the readout does not yet: "
            f"fitted per-rank CPU s = {rest_s:.1f} + {pair_s:.1f} / world (2 and 4 ranks). The "
            "window's statistics are still replicated: every rank holds and all-reduces "
            f"16CD + 8D^2 = {(16 * C * D + 8 * D * D) / 1e6:.0f} MB (class-sharded statistics "
            "are not built yet).",
            "",
            f"Sampled pairs (`NeuralCollapse(pair_sample=131072)`), one process: "
            f"{sampled['cpu']:.1f} CPU s against {single['cpu']:.1f} s exact.",
            "",
        ]
        + table(["metric", "exact", "sampled +- 95% half width"], sampled_rows)
        + [
            "",
            f"Interval coverage over {100 if quick else 400} draws of 20,000 pairs (5,000 classes,"
            f" D = 64, uneven norms and variances; {ms:.0f} ms per readout): "
            + ", ".join(f"{k} {v:.3f}" for k, v in cover.items())
            + "; over the first 40 draws: "
            + ", ".join(f"{k} {v:.3f}" for k, v in cover_40.items())
            + ".",
            "",
            "Default cadence, log every 50 steps, batch 256, uniform labels (classes_used per "
            "window): 10 classes "
            + str(cadence[10])
            + "; 1,000 classes "
            + str(cadence[1000])
            + ".",
            "",
            f"Extrapolated to C = 128,000, D = 4,096 on 8 ranks (pairwise work as C^2 D / world, "
            f"the rest as C D^2): {pair_8 / 60:.1f} + {rest_8 / 60:.1f} CPU min per rank on one "
            "thread: the replicated C D^2 part, not the pairs, is what to split next; replicated "
            f"state {(16 * big_c * big_d + 8 * big_d**2) / 1e9:.1f} GB per rank.",
        ]
    )
