"""A/B of the monitor's step-time overhead: two commits (or a commit and this working tree).

Both versions run the same workloads (``benchmarks/models.py`` of this tree) and the same
measurement (``run.overhead``: the median over interleaved blocks of monitored / unmonitored
step time, each block one whole window), each in its own process, the versions alternating
round by round so that a drift of the machine falls on both. A commit is exported with
``git archive`` and installed (``pip install --target``, no dependencies) into a temporary
folder put first on ``PYTHONPATH``; each child says which copy it imported.

    python benchmarks/ab.py --against 2b87854 [--after HEAD] [--rounds 3] [--workloads mlp,cnn]
    python benchmarks/ab.py --against 2b87854 --fixed-cost   # benchmarks/fixed_cost.py instead
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BLOCKS = {"mlp": 7, "cnn": 5, "gpt": 3, "vqvae": 5}

CHILD = """
import json, sys
sys.path.insert(0, {here!r})
import torch
torch.manual_seed(0)
import collapse_monitor
from run import overhead, LOG_EVERY
out = {{"file": collapse_monitor.__file__}}
for name, blocks in {plan!r}.items():
    out[name] = overhead(name, None, blocks, LOG_EVERY)["ratio"]
print("RESULT " + json.dumps(out))
"""

FIXED = """
import json, sys
sys.path.insert(0, {here!r})
import collapse_monitor
from fixed_cost import main
out = {{"file": collapse_monitor.__file__}}
for name, r in main().items():
    out[name + "_extra_us"], out[name + "_ratio"] = r["extra_us"], r["ratio"]
print("RESULT " + json.dumps(out))
"""


def install(rev: str, into: Path) -> Path:
    """``rev``'s package installed into ``into/site``."""
    src, site = into / "src", into / "site"
    src.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", rev, "monitor", "integrations", "pyproject.toml", "README.md"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
        + ["--target", str(site), str(src)],
        check=True,
    )
    return site


def measure(plan: dict | None, site: Path | None) -> dict:
    """Section 1's ratios of the workloads in ``plan`` (None: ``fixed_cost.py``'s numbers)."""
    env = dict(os.environ)
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    code = (CHILD if plan else FIXED).format(here=str(HERE), plan=plan)
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the earlier commit")
    parser.add_argument("--after", default=None, help="the later commit (default: this tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(BLOCKS))
    parser.add_argument(
        "--fixed-cost", action="store_true", help="time benchmarks/fixed_cost.py instead"
    )
    args = parser.parse_args(argv)
    plan = None if args.fixed_cost else {w: BLOCKS[w] for w in args.workloads.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        sites = {"before": install(args.against, Path(tmp) / "before")}
        sites["after"] = install(args.after, Path(tmp) / "after") if args.after else None
        runs: dict[str, list[dict]] = {"before": [], "after": []}
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for version in order:
                got = measure(plan, sites[version])
                expected = str(sites[version] or ROOT / "monitor")
                assert got["file"].startswith(expected), (version, got["file"])
                runs[version].append(got)
                print(version, {k: round(v, 3) for k, v in got.items() if k != "file"}, flush=True)

    def short(rev):
        return subprocess.run(
            ["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()

    after = short(args.after) if args.after else "this tree"
    print(f"\n| workload | {short(args.against)} (before) | {after} (after) |\n|---|---|---|")
    for name in (k for k in runs["before"][0] if k != "file"):
        before = [r[name] for r in runs["before"]]
        after = [r[name] for r in runs["after"]]
        print(
            f"| {name} | {statistics.median(before):.3f} ({min(before):.3f}-{max(before):.3f}) "
            f"| {statistics.median(after):.3f} ({min(after):.3f}-{max(after):.3f}) |"
        )


if __name__ == "__main__":
    main()
