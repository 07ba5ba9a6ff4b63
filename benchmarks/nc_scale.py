"""Section 6 of benchmarks/run.py: neural collapse at language-model scale (issue 16).

A NeuralCollapse window over C = 50,257 classes (GPT-2's vocabulary) and D = 768 features, every
class used, read out by 1, 2 and 4 gloo processes on this machine's CPUs (one torch thread each:
the per-rank work is what a rank on its own device would do; with more ranks than cores their
wall times overlap, so CPU seconds are the per-rank measure). Also: the bytes each rank holds
and sends per log, the sampled-pairs readout's time and interval coverage, and the default
cadence on a 1,000-class head.
"""

from __future__ import annotations

import math
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
    """Count the bytes this process hands to collectives or sends to another rank
    (``"<name>"``), and the bytes it puts on the wire with the usual algorithms
    (``"<name>/wire"``: ring all-reduce ``2 (P-1)/P n``, all-gather ``(P-1) n``, all-to-all and
    sends what leaves the rank), by wrapping the functions the monitor calls: this is
    measurement, not the monitor's code."""
    import pickle

    def nbytes(t):
        return t.numel() * t.element_size()

    def p():
        return dist.get_world_size()

    sizes = {  # name: (handed, wire)
        "all_reduce": lambda t, *a, **k: (nbytes(t), 2 * (p() - 1) / p() * nbytes(t)),
        "broadcast": lambda t, *a, **k: (nbytes(t), nbytes(t)),
        "all_gather": lambda out, t, *a, **k: (nbytes(t), (p() - 1) * nbytes(t)),
        "all_gather_object": lambda out, obj, *a, **k: (
            len(pickle.dumps(obj)),
            (p() - 1) * len(pickle.dumps(obj)),
        ),
        "all_to_all_single": lambda out, t, *a, **k: (nbytes(t), nbytes(t)),
        "batch_isend_irecv": lambda ops: (
            (sum(nbytes(o.tensor) for o in ops if o.op is dist.isend),) * 2
        ),
    }
    counts = {}

    def wrap(name, fn):
        def counted(*a, **k):
            handed, wire = sizes[name](*a, **k)
            counts[name] = counts.get(name, 0) + handed
            counts[name + "/wire"] = counts.get(name + "/wire", 0) + wire
            return fn(*a, **k)

        return counted

    for name in sizes:
        setattr(dist, name, wrap(name, getattr(dist, name)))
    return counts


def _sent(counts: dict, wire: bool = False) -> float:
    return sum(v for k, v in counts.items() if k.endswith("/wire") == wire)


def _window(
    rank: int, world: int, pair_sample: int | None = None, device: str = "cpu", shard=False
):
    """This rank's share of the rows: class means at random directions, noise around them; a
    training step per batch (class shards route their rows there)."""
    model = nn.Sequential(nn.Identity())
    probe = probes.NeuralCollapse(
        "0", C, read="output", name="lm", pair_sample=pair_sample, shard_classes=shard
    )
    mon = CollapseMonitor(model, [probe], 10**9, observe_every_n_steps=1)
    g = torch.Generator().manual_seed(0)
    means = torch.randn(C, D, generator=g)
    labels = torch.arange(C).repeat(ROWS_PER_CLASS)[torch.randperm(C * ROWS_PER_CLASS, generator=g)]
    # every row's noise depends on the row only: all worlds see the same data set
    noise = torch.randn(len(labels), D, generator=g)
    mine = torch.arange(rank, len(labels), world)
    for s in range(0, -(-len(labels) // world), BATCH):  # the same steps on every rank
        rows = mine[s : s + BATCH]
        y = labels[rows]
        if len(rows):
            with mon.observe(targets=y.to(device)):
                model((means[y] + 0.5 * noise[rows]).to(device))
        mon.step()
    return mon, probe


def _worker(rank: int, world: int, init: str, out: str, shard: bool) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(minutes=30)
    )
    try:
        counts = _collective_bytes()
        steps_cpu = time.process_time()
        mon, probe = _window(rank, world, shard=shard)
        steps_cpu = time.process_time() - steps_cpu  # the hot path: updates (and routing)
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = mon.compute()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        sent = dict(counts)
        state = mon.state_dict()  # a checkpoint: the reduced window
        checkpoint = _sent(counts) - _sent(sent)
        torch.save(
            {
                "metrics": metrics,
                "wall": wall,
                "cpu": cpu,
                "steps_cpu": steps_cpu,
                "bytes": sent,
                "checkpoint_bytes": checkpoint,
                "state_bytes": mon.driver(probe).window.nbytes(),
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


def _run(world: int, shard: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/store"
        mp.start_processes(
            _worker, args=(world, init, tmp, shard), nprocs=world, start_method="spawn"
        )
        return [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(world)]


def _single(pair_sample: int | None = None) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps_cpu = time.process_time()
        mon, _ = _window(0, 1, pair_sample)
        steps_cpu = time.process_time() - steps_cpu
        wall, cpu = time.perf_counter(), time.process_time()
        metrics = mon.compute()
        out = {"metrics": metrics, "wall": time.perf_counter() - wall}
        out["cpu"] = time.process_time() - cpu
        out["steps_cpu"] = steps_cpu
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


def _coverage(seeds: int, pairs: int, spread: float) -> tuple[dict, dict, float]:
    """Interval coverage of the sampled readout over ``seeds`` draws and over the first 40, on
    class means drawn like the window's (uneven norms; log-variances of standard deviation
    ``spread``), against the exact value; and ms per readout."""
    g = torch.Generator().manual_seed(1)
    m = torch.randn(5000, 64, generator=g, dtype=torch.float64)
    m = m * torch.exp(0.3 * torch.randn(5000, 1, generator=g, dtype=torch.float64))
    v = torch.exp(spread * torch.randn(5000, generator=g, dtype=torch.float64))
    m = m - m.mean(0)
    exact = F.pairwise_metrics(F.pairwise_sums(m, v))
    hits = {k: [] for k in ("equiangular", "cos_std", "cdnv")}
    times = []
    for seed in range(seeds):
        t = time.perf_counter()
        got = F.sampled_pairwise_metrics(m, v, pairs, torch.Generator().manual_seed(seed))
        times.append(time.perf_counter() - t)
        for k, h in hits.items():
            h.append(abs(got[f"{k}_sampled"] - exact[k]) <= got[f"{k}_sampled_ci95"])
    cover = {k: sum(h) / seeds for k, h in hits.items()}
    return cover, {k: sum(h[:40]) for k, h in hits.items()}, statistics.median(times) * 1e3


def _at_least(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) >= k)."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


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


def _readout_parts(classes: int = C) -> tuple[float, float, float]:
    """CPU s (one thread) of the parts of an exact readout over ``classes`` class means, for
    the extrapolation: the pairwise sums (``C^2 D``), the ``D x D`` eigendecomposition
    (``D^3``) and the two ``C x D x D`` GEMMs (between-class Gram and scatter, ``C D^2``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(0)
        m = torch.randn(classes, D, generator=g, dtype=torch.float64)
        t = time.process_time()
        F.pairwise_sums(m - m.mean(0), torch.ones(classes, dtype=torch.float64))
        pairs = time.process_time() - t
        t = time.process_time()
        gram = m.T @ m
        gemms = 2 * (time.process_time() - t)
        t = time.process_time()
        torch.linalg.eigh(gram)
        return pairs, time.process_time() - t, gemms
    finally:
        torch.set_num_threads(threads)


def section_nc_scale(quick: bool, table) -> list[str]:
    single = _single()
    rows, runs = [], {}
    for world, shard in ((1, False), (2, False), (4, False), (2, True), (4, True)):
        runs[world, shard] = _run(world, shard) if world > 1 else None
    base = [max(_sent(r["bytes"], w) for r in runs[4, False]) for w in (False, True)]
    for (world, shard), ranks in runs.items():
        if ranks is None:
            cpu, wall, rel, steps = single["cpu"], single["wall"], 0.0, single["steps_cpu"]
            state, sent, wire, ckpt = 16 * C * D + 8 * D * D, 0, 0, 0
        else:
            cpu = max(r["cpu"] for r in ranks)
            wall = max(r["wall"] for r in ranks)
            steps = max(r["steps_cpu"] for r in ranks)
            rel = max(_max_rel(r["metrics"], single["metrics"]) for r in ranks)
            state = max(r["state_bytes"] for r in ranks)
            sent = max(_sent(r["bytes"]) for r in ranks)
            wire = max(_sent(r["bytes"], True) for r in ranks)
            ckpt = max(r["checkpoint_bytes"] for r in ranks)
        runs[world, shard] = (cpu, state, sent, wire)
        rows.append(
            [
                f"{world}{' (class shards)' if shard else ''}",
                f"{steps:.1f}",
                f"{cpu:.1f}",
                f"{cpu / single['cpu']:.2f}",
                f"{wall:.1f}",
                f"{rel:.1e}",
                f"{state / 1e6:.0f} ({(state - 8 * D * D) / (16 * C * D):.2f})",
                f"{sent / 1e6:.0f} ({sent / base[0]:.2f})",
                f"{wire / 1e6:.0f} ({wire / base[1]:.2f})",
                f"{ckpt / 1e6:.0f}",
            ]
        )
    sampled = _single(pair_sample=2**17)
    draws = 200 if quick else 2000
    coverage = [(spread, *_coverage(draws, 20_000, spread)) for spread in (1.0, 2.0)]
    cover_rows = [
        [f"{spread:.0f}"]
        + [f"{cover[k]:.3f} ({first[k]}/40)" for k in ("equiangular", "cos_std", "cdnv")]
        for spread, cover, first, _ in coverage
    ]
    exact = {k.split("/")[-1]: v for k, v in single["metrics"].items()}
    est = {k.split("/")[-1]: v for k, v in sampled["metrics"].items()}
    sampled_rows = [
        [k, f"{exact[k]:.6f}", f"{est[k + '_sampled']:.6f} +- {est[k + '_sampled_ci95']:.6f}"]
        for k in ("equiangular", "cos_std", "cdnv")
    ]
    cadence = {c: _cadence(c) for c in (10, 1000)}
    # per-rank readout CPU s with class shards = E + (pairs + R) / world: E the D x D
    # eigendecomposition (replicated), pairs the exact pairwise sums (C^2 D), R the per-class
    # passes (C D^2); pairs and E timed alone, R from the single process
    pair_s, eigh_s, rest_s = _readout_parts()
    big_c, big_d, ranks8 = 128_000, 4096, 8
    pair_8 = pair_s * (big_c / C) ** 2 * (big_d / D) / ranks8
    rest_8 = rest_s * (big_c / C) * (big_d / D) ** 2 / ranks8
    eigh_8 = eigh_s * (big_d / D) ** 3
    shard_state_8 = 16 * big_c * big_d / ranks8 + 8 * big_d**2
    # bytes a rank sends per log with class shards: its rows to their owners (2 rows per
    # class, float32), its used class means to world/2 ranks, the D x D all-reduces
    rows_8 = 2 * big_c * big_d * 4 / ranks8 * (ranks8 - 1) / ranks8
    blocks_8 = ranks8 // 2 * big_c / ranks8 * (big_d + 1) * 8
    sent_8 = rows_8 + blocks_8 + 2 * 8 * big_d**2 * 2 * (ranks8 - 1) / ranks8
    rep_wire_8 = 2 * (ranks8 - 1) / ranks8 * (16 * big_c * big_d + 8 * big_d**2)
    rep_8 = (pair_8, rest_8 * ranks8, eigh_8, 16 * big_c * big_d + 8 * big_d**2)
    cpu4, state4, sent4, wire4 = runs[4, True]
    return (
        [
            "### 6. Neural collapse at language-model scale (C = 50,257, D = 768, every class used)",
            "",
            "One window of two rows per class (4,096 rows per step, one step per batch), read out "
            "(`monitor.compute()`) by 1, 2 and 4 gloo processes of one torch thread each, with "
            "the statistics replicated (default) or class-sharded "
            "(`NeuralCollapse(shard_classes=True)`). Hot path: CPU s per rank of the window's "
            "steps (updates, and with class shards the routing of rows to their classes' "
            "owners). Readout CPU s per rank is the work each rank does (with more ranks than "
            "this machine's 2 cores, wall times overlap); rel. diff. is the largest relative "
            "difference of any metric from one process. State (in brackets: the per-class part "
            "against one process's, the replicated `D x D` moment aside), bytes per log (during "
            "the window and its readout: the tensor bytes one rank hands to collectives or sends "
            "to another rank, and the bytes it puts on the wire with the usual algorithms, ring "
            "all-reduce `2(P-1)/P n`, all-gather `(P-1) n`, all-to-all what leaves the rank; in "
            "brackets: against 4 ranks with replicated statistics) and per checkpoint "
            "(`state_dict()`, a collective) are per rank.",
            "",
        ]
        + table(
            [
                "ranks",
                "hot path CPU s",
                "readout CPU s per rank",
                "vs 1 process",
                "wall s",
                "rel. diff.",
                "state MB per rank",
                "MB handed per log",
                "MB on the wire per log",
                "MB sent per checkpoint",
            ],
            rows,
        )
        + [
            "",
            f"With class shards at 4 ranks: readout {cpu4 / single['cpu']:.2f} of one process, "
            f"per-class state {(state4 - 8 * D * D) / (16 * C * D):.2f} of one process's, bytes "
            f"per log {sent4 / base[0]:.2f} (handed) and {wire4 / base[1]:.2f} (on the wire) of "
            "the replicated statistics'. Every class lives on one rank, so there is no "
            "re-centring at the log; each rank sends its rows once, in their dtype (float32 "
            "here), to their classes' owners, and its used class means to world/2 ranks for the "
            "pairs (the larger part of the bytes at 4 ranks).",
            "",
            "Extrapolated to C = 128,000, D = 4,096 on 8 ranks (measured here: the pairwise sums "
            f"{pair_s:.1f} CPU s for all 50,257 classes, scaled as C^2 D / world; the "
            f"eigendecomposition {eigh_s:.2f} s, as D^3, on every rank; the two C x D x D "
            f"GEMMs {rest_s:.1f} s, as C D^2, on every rank when replicated, / world when "
            "sharded (the remaining C x D passes are smaller still); rows: two per class, "
            "float32):",
            "",
        ]
        + table(
            [
                "statistics",
                "readout CPU min per rank",
                "state GB per rank",
                "GB on the wire per log",
            ],
            [
                [
                    "replicated",
                    f"{sum(rep_8[:3]) / 60:.1f}",
                    f"{rep_8[3] / 1e9:.1f}",
                    f"{rep_wire_8 / 1e9:.1f}",
                ],
                [
                    "class shards",
                    f"{(pair_8 + rest_8 + eigh_8) / 60:.1f}",
                    f"{shard_state_8 / 1e9:.2f}",
                    f"{sent_8 / 1e9:.2f}",
                ],
            ],
        )
        + [
            "",
            f"Sampled pairs (`NeuralCollapse(pair_sample=131072)`), one process: "
            f"{sampled['cpu']:.1f} CPU s against {single['cpu']:.1f} s exact.",
            "",
        ]
        + table(["metric", "exact", "sampled +- 95% half width"], sampled_rows)
        + [
            "",
            f"Interval coverage over {draws} draws of 20,000 pairs each (and over the first 40 "
            "draws), 5,000 classes, D = 64, uneven norms, log-variances of standard deviation 1 "
            f"or 2 ({coverage[0][3]:.0f} ms per readout); binomial standard error at 0.95: "
            f"{math.sqrt(0.95 * 0.05 / draws):.3f}. A correct 95% interval covers at least 38 "
            f"of 40 draws with probability {_at_least(38, 40, 0.95):.2f} only.",
            "",
        ]
        + table(["log-variance sd", "equiangular", "cos_std", "cdnv"], cover_rows)
        + [
            "",
            "Default cadence, log every 50 steps, batch 256, uniform labels (classes_used per "
            "window): 10 classes "
            + str(cadence[10])
            + "; 1,000 classes "
            + str(cadence[1000])
            + ".",
        ]
    )
