"""The ``collapse-monitor`` command (and ``python -m collapse_monitor``): its arguments and
paths are checked before anything heavy is imported.

Exit codes: 0 every run healthy; 1 something collapsed or diverged; 2 a usage or I/O error (a
missing path, a file where a folder is expected, no event files, no collapse scalars, a
``--png`` folder that does not exist); 3 a run not measured in full (no probe metric logged, or
a probe that failed and was switched off): never read as healthy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

USAGE_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="collapse-monitor", description="Collapse-monitor tools")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="health table of a run from its TensorBoard event files")
    rep.add_argument("run_dir", type=Path)
    rep.add_argument("--png", type=Path, help="also write a dashboard figure")
    rep.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return parser


def _fail(message: str) -> int:
    print(f"collapse-monitor: {message}", file=sys.stderr)
    return USAGE_ERROR


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse's usage errors exit 2 already; --help exits 0
        return int(exc.code or 0)
    run_dir: Path = args.run_dir
    if not run_dir.exists():
        return _fail(f"no such directory: {run_dir} (nothing exists at that path)")
    if not run_dir.is_dir():
        return _fail(f"{run_dir} is a file; pass the folder that holds a run's event files")
    if args.png is not None and not args.png.parent.is_dir():
        return _fail(f"--png {args.png}: no such folder {args.png.parent}")
    events = sorted(run_dir.rglob("events.out.tfevents.*"))
    if not events:
        return _fail(f"no TensorBoard event files under {run_dir}")
    from .report import report  # the heavy part (tensorboard, then torch for the rules)

    return report(run_dir, events, args.png, args.json)


if __name__ == "__main__":
    sys.exit(main())
