"""The demo zoo: every example at its small built-in budget, then the health report of all runs.

Each example trains twice on data that ships with scikit-learn or is generated (once where
collapse happens, once with the fix), logs to TensorBoard and writes a figure. Then
``collapse-monitor report`` reads the event files back and prints a health table per run, with a
dashboard PNG per run. About 3 minutes on 2 CPU cores.

    python examples/demo.py --out runs/demo
    tensorboard --logdir runs/demo
"""

from __future__ import annotations

import argparse
import runpy
import sys
import time
from pathlib import Path

from collapse_monitor.cli import main as report

EXAMPLES = [
    "neural_collapse",
    "vq_dead_codes",
    "vae_posterior_collapse",
    "simsiam_collapse",
    "attention_entropy_collapse",
    "grokking_softmax_collapse",
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="where the runs go")
    parser.add_argument("--only", nargs="*", choices=EXAMPLES, help="a subset of the examples")
    args = parser.parse_args(argv)
    out = Path(args.out)
    here = Path(__file__).resolve().parent

    start = time.time()
    for i, name in enumerate(args.only or EXAMPLES, 1):
        print(
            f"\n[{i}/{len(args.only or EXAMPLES)}] {name} ({time.time() - start:.0f} s)", flush=True
        )
        runpy.run_path(str(here / f"{name}.py"))["main"](["--out", str(out / name)])
    print(f"\nall examples done in {time.time() - start:.0f} s; the health report of every run:\n")
    code = report(["report", str(out), "--png", str(out / "dashboard.png")])
    pngs = sorted(p for p in out.rglob("*.png"))
    print(f"\nlogs (TensorBoard event files): {out.resolve()}")
    print(f"figures: {len(pngs)} PNGs, e.g. {pngs[0] if pngs else '-'}")
    print(f"open the logs:  tensorboard --logdir {out}")
    print("report again:   collapse-monitor report " + str(out))
    # the report exits 1 when a run collapsed: here that is the point of half the runs
    return 0 if code in (0, 1) else code


if __name__ == "__main__":
    sys.exit(main())
