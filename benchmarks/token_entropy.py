"""TokenEntropy side by side with TRL's ``entropy_from_logits`` on the same logits: cost and accuracy.

    python benchmarks/token_entropy.py [--shape 6,256,151936] [--draws 200] [--write]

On one ``(B, T, V)`` float32 logits tensor (TRL's measured case is ``(6, 256, 151936)``), a
quarter of each sequence a prompt (labels ``-100``): the time of TRL's ``entropy_from_logits``
over every position (what its trainers compute), and of the monitor's ``TokenEntropy`` update
(default ``tokens=32`` sampled rows, and exact ``tokens=None``) through a real forward hook;
the exact mode's mean against TRL's over the same tokens; and, over ``--draws`` seeds of the
row sampling, the sampled mean's bias and how often its 95% interval covers the exact mean.
Needs ``trl`` (``pip install trl``, with the CPU torch pinned).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from collapse_monitor import CollapseMonitor, probes


def monitored(tokens):
    head = nn.Sequential()
    head.add_module("head", nn.Identity())
    mon = CollapseMonitor(head, [probes.TokenEntropy("head", tokens=tokens, seed=0, name="e")], 1)
    return head, mon


def run_once(head, mon, z, y) -> tuple[float, dict]:
    t = time.perf_counter()
    with mon.observe(targets=y):
        head.head(z)
    took = time.perf_counter() - t
    return took, mon.step()


def best(fn, repeats=3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="6,256,151936")
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    from trl.trainer.utils import entropy_from_logits

    B, T, V = (int(x) for x in args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, T, V, generator=g) * torch.rand(B, T, 1, generator=g) * 6
    y = torch.randint(0, V, (B, T), generator=g)
    y[:, : T // 4] = -100
    keep = y != -100
    start = time.perf_counter()

    trl_time = best(lambda: entropy_from_logits(z), repeats=7)
    theirs = entropy_from_logits(z).double()[keep].mean().item()
    timing, means = {}, {}
    for tokens in (64, None):
        head, mon = monitored(tokens)
        run_once(head, mon, z, y)  # warm-up
        times = []
        for _ in range(7):
            took, m = run_once(head, mon, z, y)
            times.append(took)
        timing[tokens], means[tokens] = min(times), m["collapse/e/entropy_mean"]
        mon.close()
    estimates, covered = [], 0
    for seed in range(args.draws):
        head = nn.Sequential()
        head.add_module("head", nn.Identity())
        probe = probes.TokenEntropy("head", seed=seed, name="e")
        mon = CollapseMonitor(head, [probe], 1)
        _, m = run_once(head, mon, z, y)
        mon.close()
        est, ci = m["collapse/e/entropy_mean"], m["collapse/e/entropy_mean_ci95"]
        estimates.append(est)
        covered += abs(est - means[None]) <= ci
    sd = statistics.stdev(estimates)
    bias = statistics.mean(estimates) - means[None]
    lines = [
        f"Logits `({B}, {T}, {V})` float32, a quarter of each sequence a prompt (labels -100), "
        f"{int(keep.sum())} completion tokens; best of 7.",
        "",
        "| computation | time | share of TRL's | mean entropy (nats) |",
        "|---|---|---|---|",
        f"| TRL `entropy_from_logits` (every position) | {trl_time * 1e3:.0f} ms | 100% | "
        f"{theirs:.9f} (completion tokens) |",
        f"| `TokenEntropy(tokens=None)` (exact, every position) | {timing[None] * 1e3:.0f} ms | "
        f"{timing[None] / trl_time:.0%} | {means[None]:.9f} (relative difference "
        f"{abs(means[None] - theirs) / theirs:.1e}) |",
        f"| `TokenEntropy()` (64 sampled completion tokens, default) | {timing[64] * 1e3:.1f} ms | "
        f"{timing[64] / trl_time:.1%} | {means[64]:.4f} (one draw) |",
        "",
        f"Over {args.draws} draws of the 64 rows: mean estimate minus exact {bias:+.4f} nats "
        f"(standard error {sd / math.sqrt(args.draws):.4f}), standard deviation {sd:.3f}; the "
        f"95% interval covered the exact mean in {covered / args.draws:.1%} of the draws.",
    ]
    print("\n".join(lines))
    if args.write:
        from run import write_section

        write_section(
            "token_entropy",
            "11. TokenEntropy against TRL's entropy_from_logits",
            [f"`python benchmarks/token_entropy.py --write` (trl {__import__('trl').__version__})."]
            + [""]
            + lines,
            time.perf_counter() - start,
            f"{torch.get_num_threads()} torch threads",
        )
    return lines


if __name__ == "__main__":
    main()
