"""ResetDeadCodes against vector-quantize-pytorch 1.34's own dead-code replacement.

    pip install --no-deps --target .tmp/vqp134 vector-quantize-pytorch==1.34.1
    PYTHONPATH=.tmp/vqp134 python benchmarks/dead_code_anchors.py [--draws 8] [--write]

Version 1.34 redefined a dead code: below ``dead_code_threshold_ratio`` of the mean EMA cluster
size, where earlier versions (the ones the test extra pins, compared in section 7) counted an
absolute EMA size below ``threshold_ema_dead_code``; that argument is now deprecated and mapped to
the ratio ``threshold_ema_dead_code / codebook_size``. This runs the autoencoder of section 7
(:func:`detection.dead_code_fixes`: seeds fix data, initialisation and batches; draws only the
replacement vectors) under both of 1.34's settings and the default ``ResetDeadCodes``, on the
same seeds and batches.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version

import detection

VARIANTS = {
    "none": "no fix",
    "anchor": "`threshold_ema_dead_code=2` (1.34: ratio 2/256 of the mean cluster size)",
    "ratio": "`dead_code_threshold_ratio=0.1` (1.34's suggested setting)",
    "default": '`ResetDeadCodes("vq")`, default arguments',
}
KEYS = {"usage@25": 3, "usage 26-50": 3, "usage@100": 3, "mse 76-100": 5}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--draws", type=int, default=8, help="replacement draws per seed")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    vqp = version("vector-quantize-pytorch")
    if tuple(int(p) for p in vqp.split(".")[:2]) < (1, 34):
        parser.error(f"vector-quantize-pytorch {vqp} is installed; this compares with 1.34+")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [(s, v, d) for s in seeds for v in VARIANTS for d in range(args.draws)]
    t = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        out = list(pool.map(detection.dead_code_fixes, *zip(*runs)))
    by = {}
    for (s, v, _), r in zip(runs, out):
        by.setdefault((s, v), []).append(r)

    def cell(rs, k):
        vs = [r[k] for r in rs]
        return f"{statistics.mean(vs):.{KEYS[k]}f} ± {statistics.stdev(vs):.{KEYS[k]}f}"

    lines = [
        f"| seed | fix | {' | '.join(KEYS)} |",
        "|---" * (len(KEYS) + 2) + "|",
        *(
            f"| {s} | {VARIANTS[v]} | " + " | ".join(cell(rs, k) for k in KEYS) + " |"
            for (s, v), rs in by.items()
        ),
    ]
    print("\n".join(lines))
    if args.write:
        from run import write_section

        write_section(
            "dead_code_anchors",
            "17. ResetDeadCodes against vector-quantize-pytorch 1.34's dead-code replacement",
            [
                "`pip install --no-deps --target .tmp/vqp134 vector-quantize-pytorch==1.34.1; "
                "PYTHONPATH=.tmp/vqp134 python benchmarks/dead_code_anchors.py --write`: the "
                f"autoencoder of section 7 under vector-quantize-pytorch {vqp}, {args.draws} draws "
                "of the replacement vectors per seed (mean ± standard deviation over the draws; "
                "usage of held-out codes at step 25 and 100, of the codes the training batches "
                "chose over steps 26-50, and the training reconstruction MSE over steps 76-100):",
                "",
                *lines,
            ],
            time.perf_counter() - t,
            f"{args.workers} worker processes of one torch thread",
        )
    return by


if __name__ == "__main__":
    main()
