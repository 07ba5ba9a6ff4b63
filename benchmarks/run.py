"""Benchmark suite: overhead, memory, comparisons with the usual alternatives, scaling, GPU.

Prints Markdown tables; ``--write`` also writes benchmarks/RESULTS.md (machine, torch, date).

    python benchmarks/run.py [--write] [--only overhead,memory,compare,scaling,gpu,nc_scale,proxies,precision,budget] [--quick]
    python benchmarks/run.py --only gpu --write      # on a CUDA machine: section 5

Timings are medians over interleaved A/B blocks in one process; a block at the default cadence
is one whole logging window (50 steps), so each block pays the same share of sampled steps and
logs. Nothing here is a test: the numbers are for reading, the targets are in the README.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from models import WORKLOADS, Workload  # benchmarks/models.py, beside this script
from nc_scale import gpu_readout, section_nc_scale
from precision import section as section_precision
from proxies import section as section_proxies
from torch.nn import functional as F

from collapse_monitor import CollapseMonitor, probes
from collapse_monitor.functional.neural_collapse import metrics_from_class_statistics
from collapse_monitor.stats import ClassMoments, Statistic

LOG_EVERY = 50
F64 = torch.float64


def table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def median_time(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ============================================================================ 1. overhead
def _on(w: Workload, device: str) -> Workload:
    w.model.to(device)
    w.batch = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in w.batch)
    return w


def _pair(name: str, observe_every: int | None, device: str = "cpu", budget=None):
    torch.manual_seed(0)
    base: Workload = _on(WORKLOADS[name](), device)
    torch.manual_seed(0)
    watched: Workload = _on(WORKLOADS[name](), device)
    mon = CollapseMonitor(
        watched.model,
        watched.make_probes(),
        LOG_EVERY,
        mitigations=watched.make_mitigations(),
        observe_every_n_steps=observe_every,
        overhead_budget=budget,
    )
    return base, watched, mon


def _stopwatch(device: str):
    """Start timing; the returned function stops and gives seconds. On a GPU: CUDA events, one
    synchronisation at the end of the timed block."""
    if torch.device(device).type != "cuda":
        t = time.perf_counter()
        return lambda: time.perf_counter() - t
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()

    def stop() -> float:
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    return stop


def _runner(w: Workload, mon: CollapseMonitor | None, device: str = "cpu", timed: bool = True):
    opt = torch.optim.Adam(w.model.parameters(), lr=w.lr)
    x, y = w.batch

    def run(steps: int) -> float:
        stop = _stopwatch(device) if timed else None
        for _ in range(steps):
            if mon is None:
                loss = w.loss(w.model, x, y)
            else:
                with mon.observe(targets=y):
                    loss = w.loss(w.model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if mon is not None:
                mon.step(opt)
        return stop() / steps if timed else 0.0

    return run


def overhead(
    name: str, observe_every: int | None, blocks: int, steps: int, device="cpu", budget=None
) -> dict:
    """Median over interleaved blocks of monitored / unmonitored step time; with ``budget``,
    also the monitor's own measure of its share (the last window's) and the strides' factors."""
    base, watched, mon = _pair(name, observe_every, device, budget)
    run_a, run_b = _runner(base, None, device), _runner(watched, mon, device)
    run_a(2), run_b(2)  # warm-up (allocations, first-batch state)
    ratios, a_t, b_t = [], [], []
    for _ in range(blocks):
        a, b = run_a(steps), run_b(steps)
        ratios.append(b / a)
        a_t.append(a)
        b_t.append(b)
    profile = (
        _where_time_goes(run_b, min(steps, 10)) if observe_every == 1 and device == "cpu" else {}
    )
    measured = mon._probes.budget.overhead if budget else None
    slower = {d.name: d.slower for d in mon._probes.drivers}
    mon.close()
    return {
        "measured": measured,
        "slower": slower,
        "ratio": statistics.median(ratios),
        "base_ms": statistics.median(a_t) * 1e3,
        "watched_ms": statistics.median(b_t) * 1e3,
        "profile": profile,
    }


def _where_time_goes(run, steps: int) -> dict[str, float]:
    """ms per step inside each probe's hook (``record_function`` labels of ``Probe.guarded``)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(steps)
    out = {}
    for e in prof.key_averages():
        if e.key.startswith("collapse_monitor."):
            out[e.key.removeprefix("collapse_monitor.")] = e.cpu_time_total / 1e3 / steps
    return out


def section_overhead(quick: bool) -> list[str]:
    # every block is one whole window (50 steps, one log); GPT steps take ~0.7 s: fewer blocks
    plan = {"mlp": 41, "cnn": 9, "gpt": 3, "vqvae": 15}
    rows, prof_rows = [], []
    for name, blocks in plan.items():
        blocks = 2 if quick else blocks
        label = WORKLOADS[name]().name
        d = overhead(name, None, blocks, LOG_EVERY)
        e = overhead(name, 1, max(2, blocks - 1), LOG_EVERY)
        rows.append(
            [
                label,
                f"{d['base_ms']:.1f}",
                f"{d['ratio']:.3f}",
                f"{e['ratio']:.3f}",
            ]
        )
        spent = e["watched_ms"] - e["base_ms"]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(e["profile"].items()))
        prof_rows.append([label, f"{spent:.1f}", parts or "-"])
        print(rows[-1], prof_rows[-1], flush=True)
    return (
        [
            f"### 1. Step-time overhead (median of interleaved A/B blocks; log every {LOG_EVERY} steps)",
            "",
            "Default cadence: `CollapseMonitor(model, probes, 50)` as documented (GEMM-cost probes "
            "record 2 sampled steps per window, cheap ones every step). Every step: "
            "`observe_every_n_steps=1` (the worst case).",
            "",
        ]
        + table(
            [
                "workload (probes: see benchmarks/models.py)",
                "unmonitored ms/step",
                "default cadence",
                "observe every step",
            ],
            rows,
        )
        + [
            "",
            "Where the time goes when every step is observed (torch.profiler, ms per step inside "
            "each probe's hook; the rest of the extra time is hook dispatch, the SDPA function "
            "mode and the logging steps):",
            "",
        ]
        + table(["workload", "extra ms/step (measured)", "ms/step per probe hook"], prof_rows)
    )


# ============================================================================ 2. memory
def state_bytes(obj) -> int:
    """Bytes of every Statistic and tensor reachable from a probe (its own memories)."""
    seen: set[int] = set()

    def walk(o, depth=0) -> int:
        if id(o) in seen or depth > 3:
            return 0
        seen.add(id(o))
        if isinstance(o, Statistic):
            return o.nbytes()
        if isinstance(o, torch.Tensor):
            return o.numel() * o.element_size()
        if isinstance(o, dict):
            return sum(walk(v, depth + 1) for v in o.values())
        if isinstance(o, (list, tuple)):
            return sum(walk(v, depth + 1) for v in o)
        if hasattr(o, "__dict__") and not isinstance(o, (torch.nn.Module, CollapseMonitor)):
            return sum(
                walk(v, depth + 1)
                for k, v in vars(o).items()
                if k not in ("monitor", "hooked", "_driver")
            )
        return 0

    return walk(obj)


def _formula(p, mon) -> str:
    if isinstance(p, probes.NeuralCollapse):
        C, D = p.num_classes, mon.driver(p).window["moments"].dim
        return f"16CD+8D^2+8CD(lag)+O(C) = {16 * C * D + 8 * D * D + 8 * C * D:,}"
    if isinstance(p, probes.RepresentationRank):
        return "8D^2+8D+O(1)"
    if isinstance(p, probes.CodebookUsage):
        return "32HK+O(H)"
    return "O(layers x heads)" if isinstance(p, probes.AttentionEntropy) else "O(1)"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def section_memory(quick: bool) -> list[str]:
    rows = []
    for name in WORKLOADS:
        _, w, mon = _pair(name, 1)
        _runner(w, mon)(LOG_EVERY + 1)  # past the first window: lagged centres exist
        for p in mon.probes:
            rows.append(
                [
                    w.name.split(",")[0],
                    p.name,
                    type(p).__name__,
                    f"{state_bytes(p) + mon.driver(p).window.nbytes():,}",
                    _formula(p, mon),
                ]
            )
        mon.close()
    steps = 2000 if quick else 10_000
    _, w, mon = _pair("mlp", 1)
    run = _runner(w, mon)
    run(LOG_EVERY)  # the first window
    samples = [(mon.global_step, rss_mb())]
    while mon.global_step < steps:
        run(min(500, steps - mon.global_step))
        samples.append((mon.global_step, rss_mb()))
    mon.close()
    after_first = [r for _, r in samples]
    shown = samples[:: max(1, len(samples) // 6)]
    shown += [] if shown[-1] is samples[-1] else [samples[-1]]
    rss_rows = [[f"{s:,}", f"{r:.1f}"] for s, r in shown]
    return (
        [
            "### 2. Memory",
            "",
            "State bytes per probe (measured after the first window, D from the model):",
            "",
        ]
        + table(["model", "probe", "type", "state bytes (measured)", "formula"], rows)
        + [
            "",
            f"Process RSS while training the MLP with NeuralCollapse observed every step for "
            f"{steps:,} steps (log every {LOG_EVERY}): max - min after the first window = "
            f"{max(after_first) - min(after_first):.1f} MB.",
            "",
        ]
        + table(["step", "RSS MB"], rss_rows)
    )


# ============================================================================ 3. comparisons
def _batches(N: int, C: int, D: int, batch: int, zipf: bool):
    """Clustered features with labels (uniform, or Zipf-distributed like tokens)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(C, D, generator=g) * 3
    if zipf:
        p = 1.0 / torch.arange(1, C + 1, dtype=F64)
        labels = torch.multinomial(p / p.sum(), N, replacement=True, generator=g)
    else:
        labels = torch.randint(0, C, (N,), generator=g)
    for s in range(0, N, batch):
        y = labels[s : s + batch]
        yield centres[y] + torch.randn(len(y), D, generator=g), y


def nc_streaming(data, C: int) -> dict:
    m = ClassMoments(C)
    for x, y in data:
        m.update(x, y)
    return metrics_from_class_statistics(
        m.count, m.means(), m.within_class_scatter(), m.class_variances()
    )


def nc_two_pass(data, C: int) -> dict:
    """The published neural-collapse code's method: a pass for the class means (class sums by
    one-hot matmul), a second pass for the within-class scatter around them; float64 here so
    that the numbers can be compared."""
    D = data[0][0].shape[1]
    sums = torch.zeros(C, D, dtype=F64)
    counts = torch.zeros(C, dtype=F64)
    for x, y in data:
        onehot = F.one_hot(y, C).to(F64)
        sums += onehot.T @ x.to(F64)
        counts += onehot.sum(0)
    means = sums / counts.clamp_min(1)[:, None]
    scatter = torch.zeros(D, D, dtype=F64)
    sq = torch.zeros(C, dtype=F64)
    for x, y in data:
        z = x.to(F64) - means[y]
        scatter += z.T @ z
        sq.index_add_(0, y, (z * z).sum(1))
    return metrics_from_class_statistics(counts.long(), means, scatter, sq / counts.clamp_min(1))


def _max_rel(a: dict, b: dict) -> float:
    keys = [k for k in a if k in b and k != "cdnv_pairs_skipped"]
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-30) for k in keys)


def section_compare(quick: bool) -> list[str]:
    rows = []
    cases = [(1000, 512, 200_000, 4096, False), (50257, 768, 16_384, 1024, True)]
    if quick:
        cases = [(1000, 512, 40_000, 4096, False), (50257, 768, 4096, 1024, True)]
    for C, D, N, batch, zipf in cases:
        data = list(_batches(N, C, D, batch, zipf))
        t = time.perf_counter()
        one = nc_streaming(data, C)
        t_one = time.perf_counter() - t
        t = time.perf_counter()
        two = nc_two_pass(data, C)
        t_two = time.perf_counter() - t
        rows.append(
            [
                f"NC, C={C:,}, D={D}, N={N:,}" + (" (Zipf labels)" if zipf else ""),
                f"{t_two:.2f} s",
                f"{t_one:.2f} s",
                f"{t_two / t_one:.1f}x",
                f"{_max_rel(one, two):.1e}",
            ]
        )
        print(rows[-1], flush=True)
        del data
    rows += _attention_rows(quick)
    rows += _codebook_rows()
    return [
        "### 3. Against the usual alternatives (same data, same process)",
        "",
        "NC: one streaming pass (this library) vs the two-pass method of the published "
        "neural-collapse code (one-hot class sums, then scatter around the means), both "
        "float64, statistics only: the two-pass method also needs a second forward pass over "
        "the data, which is not counted. Attention: per-head entropy of one causal layer "
        "(B=1, 4 heads, d=64) by the probe (64 sampled queries per call, the default) vs eager "
        "attention with explicit probabilities; cost = time (memory) above the SDPA forward "
        "alone. Codebook: per-step usage statistics vs `indices.unique()` plus a host sync.",
        "",
    ] + table(["case", "usual way", "this library", "speed-up", "max rel. diff / memory"], rows)


_ATTN_CHILD = r"""
import sys
from run import attention_setup
fn = attention_setup(int(sys.argv[1]), sys.argv[2])
fn()  # warm-up, then reset the peak RSS (VmHWM) and measure one call's peak above the current
open("/proc/self/clear_refs", "w").write("5")
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
before = status("VmRSS")
fn()
print(status("VmHWM") - before)
"""


def attention_setup(T: int, how: str):
    """A forward of one causal attention layer (4 heads of 64) on ``(1, T, 256)``: ``sdpa``
    alone, ``probe`` (SDPA with the AttentionEntropy probe observing) or ``eager`` (explicit
    probabilities and their per-head entropy, the usual way)."""
    from models import CausalSelfAttention

    torch.manual_seed(0)
    attn = CausalSelfAttention(256, 4).eval()
    x = torch.randn(1, T, 256)
    if how == "probe":
        mon = CollapseMonitor(
            attn, [probes.AttentionEntropy("", name="attn")], 10**9, observe_every_n_steps=1
        )

        @torch.no_grad()
        def observed():
            with mon.observe():
                attn(x)

        return observed
    if how == "sdpa":
        return torch.no_grad()(lambda: attn(x))

    @torch.no_grad()
    def eager():
        q, k, v = attn.qkv(x).view(1, T, 3, 4, 64).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / 8.0
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        p = s.softmax(-1)
        out = attn.proj((p @ v).transpose(1, 2).reshape(1, T, 256))
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean((0, 2))
        return out, entropy

    return eager


def _child_mb(T: int, how: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _ATTN_CHILD, str(T), how],
        capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parent,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def _interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def _attention_rows(quick: bool) -> list[list]:
    rows = []
    for T in (256, 1024) if quick else (256, 1024, 4096):
        fns = {how: attention_setup(T, how) for how in ("sdpa", "probe", "eager")}
        t = _interleaved(fns, 5 if T == 4096 else 21)
        # extra cost over the SDPA forward, per repetition, then the median
        probe = statistics.median(p - s for p, s in zip(t["probe"], t["sdpa"]))
        eager = statistics.median(e - s for e, s in zip(t["eager"], t["sdpa"]))
        mem = {how: _child_mb(T, how) for how in fns}
        eager_total = statistics.median(t["eager"])
        rows.append(
            [
                f"attention entropy, context {T}",
                f"{eager * 1e3:.2f} ms above SDPA ({eager_total * 1e3:.1f} ms in all), "
                f"{mem['eager'] - mem['sdpa']:.1f} MB",
                f"{probe * 1e3:.2f} ms, {mem['probe'] - mem['sdpa']:.1f} MB",
                f"{eager / probe:.1f}x",
                f"probe / eager: {probe / eager:.3f} of its extra, {probe / eager_total:.3f} "
                "of its forward",
            ]
        )
        print(rows[-1], flush=True)
    return rows


def _codebook_row(K: int, N: int) -> list:
    idx = torch.randint(0, K, (N,))
    model = torch.nn.Identity()  # emits the indices: the probe reads them as a VQ output
    mon = CollapseMonitor(model, [probes.CodebookUsage("", K, name="vq")], 10**9)

    def ours():  # the probe's whole per-step cost: counts in the window and the EMA
        with mon.observe():
            model(idx)
        mon.step()

    def usual():
        return idx.unique().numel()  # a data-dependent shape: a host sync on a GPU

    t_u, t_o = median_time(usual, 21), median_time(ours, 21)
    mon.close()
    return [
        f"codebook usage, K={K:,}, {N:,} indices/step",
        f"{t_u * 1e3:.2f} ms",
        f"{t_o * 1e3:.2f} ms",
        f"{t_u / t_o:.1f}x",
        "ours never syncs",
    ]


def _codebook_rows() -> list[list]:
    return [_codebook_row(1024, 16_384), _codebook_row(8192, 65_536)]


# ============================================================================ 15. budget
def section_budget(quick: bool) -> list[str]:
    rows = []
    for name, blocks in {"mlp": 41, "cnn": 9, "gpt": 3, "vqvae": 15}.items():
        blocks = 2 if quick else blocks
        plain = overhead(name, None, blocks, LOG_EVERY)
        kept = overhead(name, None, blocks, LOG_EVERY, budget=0.01)
        slower = ", ".join(f"{k} x{v}" for k, v in kept["slower"].items() if v > 1) or "none"
        rows.append(
            [
                WORKLOADS[name]().name,
                f"{plain['base_ms']:.1f}",
                f"{plain['ratio']:.3f}",
                f"{kept['ratio']:.3f}",
                f"{kept['measured']:.4f}",
                slower,
            ]
        )
        print(rows[-1], flush=True)
    return [
        "### 15. The overhead budget: `overhead_budget=0.01` against the default cadence",
        "",
        "Both columns are medians of interleaved A/B blocks of one 50-step window against the "
        "unmonitored model (as section 1, separate runs); `measured` is the monitor's own "
        "`collapse/monitor/overhead` of its last window (host time of its probes' work and of "
        "the previous log, over the window's wall time); `thinned` lists the probes whose "
        "stride the budget multiplied.",
        "",
    ] + table(
        [
            "workload",
            "unmonitored ms/step",
            "default cadence",
            "overhead_budget=0.01",
            "measured (budget)",
            "thinned",
        ],
        rows,
    )


# ============================================================================ 4. scaling
def _update_ms(m: ClassMoments, x: torch.Tensor, y: torch.Tensor, reps: int) -> float:
    m.update(x, y)  # the first update allocates the state
    return median_time(lambda: m.update(x, y), reps) * 1e3


def section_scaling(quick: bool) -> list[str]:
    rows = []
    base = dict(B=1024, D=256, C=100)
    grid = [("B", (256, 1024, 4096)), ("D", (128, 256, 512, 1024)), ("C", (10, 1000, 10_000))]
    for key, values in grid:
        for v in values:
            cfg = dict(base, **{key: v})
            g = torch.Generator().manual_seed(0)
            x = torch.randn(cfg["B"], cfg["D"], generator=g)
            y = torch.randint(0, cfg["C"], (cfg["B"],), generator=g)
            m = ClassMoments(cfg["C"])
            ms = _update_ms(m, x, y, 5 if quick else 11)
            B, D, C = cfg["B"], cfg["D"], cfg["C"]
            rows.append(
                [
                    key,
                    B,
                    D,
                    f"{C:,}",
                    f"{ms:.2f}",
                    f"{ms * 1e6 / (B * D + B * D * D):.3f}",
                    f"{m.nbytes():,}",
                    f"{16 * C * D + 8 * D * D:,}",
                ]
            )
    return [
        "### 4. Scaling of one NeuralCollapse update (ClassMoments.update) and its state",
        "",
        "Time per update follows B*D^2 (the GEMM) and does not depend on C; state is "
        "16CD + 8D^2 bytes, independent of B and of the number of steps.",
        "",
    ] + table(
        ["varied", "B", "D", "C", "ms/update", "ns per (B*D + B*D^2)", "state bytes", "16CD+8D^2"],
        rows,
    )


# ============================================================================ 5. GPU
GPU_DEVICE = "cuda"  # --device cpu runs this section's code on the CPU (a dry run, no sync check)


def sync_check(name: str, device: str) -> str:
    """Every probe recording every step: run one whole window, then the next window's steps
    before its log under ``torch.cuda.set_sync_debug_mode("error")``; report the first host
    synchronisation, if any. The unmonitored loop is checked the same way first."""
    if torch.device(device).type != "cuda":
        return "n/a (CPU)"
    base, watched, mon = _pair(name, 1, device)
    verdicts = []
    for w, m in ((base, None), (watched, mon)):
        run = _runner(w, m, device, timed=False)
        run(LOG_EVERY)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run(LOG_EVERY - 1)
            verdicts.append(None)
        except RuntimeError as e:
            verdicts.append(str(e).strip().splitlines()[0][:120])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    mon.close()
    if verdicts[0]:
        return f"the training loop itself syncs: {verdicts[0]}"
    if verdicts[1]:
        return f"SYNCS: {verdicts[1]}"
    return f"none in {LOG_EVERY - 1} steps"


def section_gpu(quick: bool) -> list[str]:
    title = "### 5. GPU: step-time overhead (CUDA events) and the no-sync check"
    device = GPU_DEVICE
    if device == "cuda" and not torch.cuda.is_available():
        return [
            title,
            "",
            "No CUDA device on the machine that wrote this section: GPU numbers pending. On one, "
            "`python benchmarks/run.py --only gpu --write` fills it (the four workloads of "
            "section 1, timed with CUDA events, and one window of steps per workload under "
            '`torch.cuda.set_sync_debug_mode("error")`); `pytest tests/test_gpu.py` checks the '
            "same with every probe and mitigation.",
        ]
    plan = {"mlp": 9, "cnn": 7, "gpt": 5, "vqvae": 7}
    rows = []
    for name, blocks in plan.items():
        blocks = 2 if quick else blocks
        d = overhead(name, None, blocks, LOG_EVERY, device)
        e = overhead(name, 1, blocks, LOG_EVERY, device)
        rows.append(
            [
                WORKLOADS[name]().name,
                f"{d['base_ms']:.2f}",
                f"{d['ratio']:.3f}",
                f"{e['ratio']:.3f}",
                sync_check(name, device),
            ]
        )
        print(rows[-1], flush=True)
    where = torch.cuda.get_device_name() if device == "cuda" else f"{device} (dry run)"
    readout = [] if quick or device != "cuda" else ["", *gpu_readout(device)]
    if device == "cuda":  # the float32 Gram where it matters (section 14 is the CPU's)
        readout += ["", *section_precision(quick, table, device)[2:]]
    return (
        [
            title,
            "",
            f"Device: {where}. Ratios as in section 1 (medians of interleaved blocks of one window "
            "each), timed with CUDA events; host syncs: steps before a log with every probe "
            'recording, under `set_sync_debug_mode("error")`.',
            "",
        ]
        + table(
            [
                "workload",
                "unmonitored ms/step",
                "default cadence",
                "observe every step",
                "host syncs between logs",
            ],
            rows,
        )
        + readout
    )


SECTIONS = {
    "overhead": section_overhead,
    "memory": section_memory,
    "compare": section_compare,
    "scaling": section_scaling,
    "gpu": section_gpu,
    "nc_scale": lambda quick: section_nc_scale(quick, table),
    "proxies": lambda quick: section_proxies(quick, table),
    "precision": lambda quick: section_precision(quick, table),
    "budget": section_budget,
}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--device", default="cuda", help="device of the gpu section")
    args = parser.parse_args(argv)
    global GPU_DEVICE
    GPU_DEVICE = args.device
    gpu = (
        f"GPU: {torch.cuda.get_device_name()}"
        if torch.cuda.is_available()
        else "GPU: none on this machine; GPU numbers pending"
    )
    header = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}, Python {platform.python_version()}, "
        f"{datetime.date.today().isoformat()}. {gpu}."
    )
    out = Path(__file__).with_name("RESULTS.md")
    blocks = read_results(out) if args.write and out.exists() else {}
    for name in args.only.split(","):
        t = time.perf_counter()
        body = SECTIONS[name](args.quick)
        took = f"_{name}: {time.perf_counter() - t:.0f} s. {header}_"
        blocks[name] = "\n".join([f"<!-- section: {name} -->", *body, "", took])
        print(blocks[name] + "\n", flush=True)
    if args.write:
        write_results(out, blocks)


def write_results(out: Path, blocks: dict[str, str]) -> None:
    """Write RESULTS.md from its sections; sections this script does not make
    (benchmarks/detection.py's, measurements recorded by hand) are kept, last."""
    order = [k for k in SECTIONS if k in blocks] + [k for k in blocks if k not in SECTIONS]
    text = "\n\n".join(blocks[k] for k in order)
    out.write_text(
        "# Benchmark results\n\nProduced by `python benchmarks/run.py --write` (`make bench`); "
        "`--only memory,compare` reruns those sections and keeps the others; "
        "`python benchmarks/detection.py --write` writes the detection section (and "
        "`simvq_side_by_side.py`, `reset_ddp_cost.py`, `dead_code_anchors.py` theirs). Each section "
        "ends with the machine it ran on.\n\n" + text + "\n"
    )


def write_section(key: str, title: str, lines: list[str], took: float, how: str) -> None:
    """Put one section, ``### title`` then ``lines``, into RESULTS.md (the others are kept),
    ending with the seconds it took and the machine (``how``: processes and threads)."""
    out = Path(__file__).with_name("RESULTS.md")
    blocks = read_results(out) if out.exists() else {}
    footer = (
        f"_{key}: {took:.0f} s. Machine: {platform.machine()}, {os.cpu_count()} CPUs, {how}, "
        f"torch {torch.__version__}._"
    )
    blocks[key] = "\n".join([f"<!-- section: {key} -->", f"### {title}", "", *lines, "", footer])
    write_results(out, blocks)


def read_results(path: Path) -> dict[str, str]:
    """Sections of an earlier RESULTS.md, by their ``<!-- section: name -->`` markers."""
    parts = path.read_text().split("<!-- section: ")[1:]
    return {p.split(" -->", 1)[0]: ("<!-- section: " + p).rstrip() for p in parts}


if __name__ == "__main__":
    main()
